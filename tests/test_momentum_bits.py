"""momentum_bits=8: Muon momentum kept as int8 blocks with one float32 scale per block (issue 23;
docs/references.md, 8-bit Muon momentum), against a reference written here from the definition:

    blocks: at most 2048 consecutive elements of one dim-0 slice x[i] (row-major)
    a = max |x| over a block;  code = round(127 x / a) (0 where a = 0);  x_hat = code * (a / 127)

and a step = dequantize, the float32 Muon step, quantize again. The step oracle is the float32
momentum optimizer whose buffer the test replaces by its reference quantization after every step:
the same arithmetic, so the parameters must agree bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import muonkit

BLOCK = 2048


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) by the definition, one block at a time."""
    rows = x.shape[0]
    flat = x.float().reshape(rows, -1)
    n = flat.shape[1]
    blocks = max(1, math.ceil(n / BLOCK))
    codes = torch.zeros(rows, n, dtype=torch.int8)
    scales = torch.zeros(rows, blocks, dtype=torch.float32)
    for i in range(rows):
        for b in range(blocks):
            part = flat[i, b * BLOCK:(b + 1) * BLOCK]
            a = part.abs().max() if part.numel() else torch.tensor(0.0)
            scales[i, b] = a
            if a > 0:
                codes[i, b * BLOCK:(b + 1) * BLOCK] = torch.round(part / a * 127).to(torch.int8)
    return codes.reshape(x.shape), scales


def reference_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows = codes.shape[0]
    flat = codes.float().reshape(rows, -1)
    out = torch.empty_like(flat)
    for b in range(scales.shape[1]):
        out[:, b * BLOCK:(b + 1) * BLOCK] = flat[:, b * BLOCK:(b + 1) * BLOCK] * (scales[:, b:b + 1] / 127)
    return out.reshape(codes.shape)


@pytest.mark.parametrize("shape", [(3, 5000), (2, 2048), (4, 3, 3, 3), (2, 64, 64), (5, 7), (1, 4097)])
def test_quantization_matches_the_definition(shape):
    from muonkit.quantize import dequantize, quantize

    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    x.reshape(shape[0], -1)[0, :3] = 0.0
    codes, scales = quantize(x)
    want_codes, want_scales = reference_quantize(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert torch.equal(dequantize(codes, scales), reference_dequantize(want_codes, want_scales))
    # The error bound of linear absmax quantization: half a level of the block's absmax.
    back = dequantize(codes, scales)
    bound = reference_dequantize(torch.ones_like(codes), scales) / 2
    assert bool(((back - x).abs() <= bound * (1 + 1e-6) + 1e-30).all())


def test_a_zero_block_stays_zero_and_a_shard_quantizes_as_the_whole():
    from muonkit.quantize import quantize

    x = torch.randn(6, 3000)
    x[2] = 0.0
    codes, scales = quantize(x)
    assert bool((codes[2] == 0).all()) and bool((scales[2] == 0).all())
    # Blocks never straddle dim-0 slices: the rows 3..5 (an FSDP2 shard) give the same bits.
    part_codes, part_scales = quantize(x[3:])
    assert torch.equal(part_codes, codes[3:]) and torch.equal(part_scales, scales[3:])


# Pieces cut along dims other than 0 (muonkit.plan placements on a mesh of ranks), uneven: rowwise
# tensor parallelism (blocks split between ranks), a 3-D tensor cut along dims 1 and 2, FSDP2 over
# tensor parallelism along dim 1 (_StridedShard), rows and dim 2, empty pieces; float64 momentum;
# FSDP2 over rowwise TP with fewer rows than dp ranks (a rank holds no row: (0, 2500) pieces).
PIECE_CASES = [
    ((5, 3001), (3,), (("S", 1),), torch.float32),
    ((4, 7, 900), (2, 2), (("S", 1), ("S", 2)), torch.float32),
    ((6, 5000), (2, 3), (("SS", 1, 3), ("S", 1)), torch.float32),
    ((9, 3, 2500), (2, 2), (("S", 0), ("S", 2)), torch.float32),
    ((3, 2, 3), (4,), (("S", 2),), torch.float32),
    ((5, 3001), (3,), (("S", 1),), torch.float64),
    ((3, 5000), (4, 2), (("S", 0), ("S", 1)), torch.float32),
]


@pytest.mark.parametrize(("shape", "mesh_shape", "placements", "dtype"), PIECE_CASES)
def test_pieces_cut_along_other_dims_quantize_as_the_whole_tensor(shape, mesh_shape, placements, dtype):
    """Each element of a piece keeps its block (its flat index in its dim-0 slice // 2048): the max
    of the pieces' block absmax over the ranks holding the same rows is the whole tensor's scale, and
    each piece's codes and values are the whole tensor's, a NaN's block included (NaN scale)."""
    from muonkit.plan import blocks, pieces_of
    from muonkit.quantize import dequantize, dequantize_piece, piece_absmax, piece_blocks, quantize, quantize_piece

    def same(a, b):  # equal bits, NaN where the other has NaN
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))

    def part(full, piece):
        out = full.new_empty([sum(b - a for a, b in ranges) for ranges in piece])
        for global_slices, local_slices in blocks(piece):
            out[local_slices] = full[global_slices]
        return out

    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[0]).reshape(-1, *[1] * (len(shape) - 1))).to(dtype)
    x.reshape(shape[0], -1)[-1, 1] = float("nan")
    codes, scales = quantize(x)
    values = dequantize(codes, scales, dtype)
    pieces = pieces_of(shape, torch.arange(math.prod(mesh_shape)).view(mesh_shape), placements)
    assert any(piece[1:] != tuple(((0, n),) for n in shape[1:]) for piece in pieces.values())  # cut along dim >= 1
    partial = {}
    for rank, piece in pieces.items():
        _, touched, members = piece_blocks(shape, piece)
        partial[rank] = piece_absmax(part(x, piece), scales.shape[1], touched, members)
        assert partial[rank].dtype == dtype
    for rank, piece in pieces.items():
        same_rows = [partial[r] for r, other in pieces.items() if other[0] == piece[0]]
        absmax = torch.stack(same_rows).amax(0)
        rows = part(scales, (piece[0], ((0, scales.shape[1]),)))
        assert same(absmax.float(), rows), rank
        ids = piece_blocks(shape, piece)[0]
        local_codes = quantize_piece(part(x, piece), absmax, ids)
        assert local_codes.dtype == torch.int8 and torch.equal(local_codes, part(codes, piece)), rank
        assert same(dequantize_piece(local_codes, absmax.float(), ids, dtype), part(values, piece)), rank


KINDS = {
    "matrix": ((40, 24), None),
    "long_rows": ((3, 4100), None),
    "conv": ((6, 3, 3, 3), None),
    "stacked": ((3, 7, 4), None),
    "per_block": ((24, 6), muonkit.Layout.per_block(6)),
}


def _model_and_grads(shape, seed=0, steps=4):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape) * 0.1)
    grads = [torch.randn(shape) * 10.0 ** (k % 3 - 1) for k in range(steps)]
    return p, grads


@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd"])
@pytest.mark.parametrize("variant", ["muon", "normuon", "dion2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_step_equals_float32_momentum_requantized_every_step(kind, variant, orthogonalizer):
    shape, layout = KINDS[kind]
    p8, grads = _model_and_grads(shape)
    p32 = copy.deepcopy(p8)
    options = dict(lr=0.03, layout=layout, variant=variant, orthogonalizer=orthogonalizer)
    opt8 = muonkit.Muon([p8], momentum_bits=8, **options)
    opt32 = muonkit.Muon([p32], **options)
    for g in grads:
        p8.grad, p32.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
        buffer = opt32.state[p32]["momentum_buffer"]
        codes, scales = reference_quantize(buffer)
        buffer.copy_(reference_dequantize(codes, scales))
        state = opt8.state[p8]
        assert "momentum_buffer" not in state
        assert torch.equal(state["momentum_codes"], codes) and torch.equal(state["momentum_scales"], scales)
        assert torch.equal(p8, p32)


def test_8bit_momentum_tracks_float32_momentum_in_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 4))
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    losses = {}
    for bits in (8, 32):
        m = copy.deepcopy(model)
        opt = muonkit.Muon(muonkit.param_groups(m), lr=0.02, momentum_bits=bits)
        for _ in range(40):
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[bits] = loss.item()
    assert losses[8] < 0.9 * torch.nn.functional.mse_loss(model(x), y).item()
    assert abs(losses[8] - losses[32]) < 0.1 * losses[32]


def _state_bytes(opt, keys):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k in keys)


def test_state_bytes_of_gpt2_small_shapes_are_under_three_tenths_of_float32():
    # One GPT-2-small block's matrices (d = 768): attention qkv and projection, MLP in and out.
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    full = sum(p.numel() * 4 for p in params)
    opt8 = muonkit.Muon(params, momentum_bits=8)
    opt32 = muonkit.Muon(params, momentum_bits=32)
    assert _state_bytes(opt32, {"momentum_buffer"}) == full
    ratio = _state_bytes(opt8, {"momentum_codes", "momentum_scales"}) / full
    assert ratio <= 0.30
    # 1 byte per element and 4 per block of at most 2048 elements of a row.
    want = sum(r * c + 4 * r * math.ceil(c / BLOCK) for r, c in shapes) / full
    assert ratio == want


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bit_for_bit_and_resumes_alike(tmp_path, param_dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 3000), torch.nn.Linear(3000, 4)).to(param_dtype)
    batches = [torch.randn(4, 8, dtype=param_dtype) for _ in range(5)]

    def train(m, opt, xs):
        for x in xs:
            m(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    opt = muonkit.Muon(muonkit.param_groups(model), lr=0.01, momentum_bits=8, stochastic_rounding=False)
    train(model, opt, batches[:3])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = copy.deepcopy(model)
    opt2 = muonkit.Muon(muonkit.param_groups(resumed), lr=0.01, momentum_bits=8, stochastic_rounding=False)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    saved, loaded = opt.state_dict()["state"], opt2.state_dict()["state"]
    quantized = [i for i in saved if "momentum_codes" in saved[i]]
    assert quantized
    for i in saved:
        for key in saved[i]:
            assert saved[i][key].dtype == loaded[i][key].dtype, key
            assert torch.equal(saved[i][key], loaded[i][key]), key
    for i in quantized:
        assert loaded[i]["momentum_scales"].dtype == torch.float32
        assert loaded[i]["momentum_codes"].dtype == torch.int8
    train(model, opt, batches[3:])
    train(resumed, opt2, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_switching_momentum_bits_converts_the_momentum():
    p = torch.nn.Parameter(torch.randn(30, 20))
    opt = muonkit.Muon([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.randn(30, 20)
        opt.step()
    buffer = opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["momentum_bits"] = 8
    p.grad = torch.zeros(30, 20)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"momentum_codes", "momentum_scales"}
    # A zero gradient: the momentum was quantized, then scaled by momentum.
    want = reference_dequantize(*reference_quantize(buffer)) * 0.95
    assert torch.allclose(reference_dequantize(state["momentum_codes"], state["momentum_scales"]), want, rtol=0.02, atol=1e-3)
    opt.param_groups[0]["momentum_bits"] = 32
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}
    sd = opt.state_dict()
    fresh = muonkit.Muon([torch.nn.Parameter(p.detach().clone())], lr=0.01, momentum_bits=8)
    sd["param_groups"][0]["momentum_bits"] = 8  # float32 momentum loaded into an 8-bit group
    fresh.load_state_dict(sd)
    assert set(fresh.state[fresh.param_groups[0]["params"][0]]) == {"momentum_codes", "momentum_scales"}


@pytest.mark.parametrize("bits", [16, 4, 0, True, "8", 8.5, None])
def test_bad_momentum_bits_is_refused_naming_the_group_and_value(bits):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"Muon.*momentum_bits must be 8 or 32, got " + repr(bits).replace(".", r"\.")):
        muonkit.Muon([p], momentum_bits=bits)
    opt = muonkit.Muon([p])
    with pytest.raises(ValueError, match=r"Muon group 1: momentum_bits must be 8 or 32"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "momentum_bits": bits})
    p.grad = torch.randn(4, 4)
    opt.param_groups[0]["momentum_bits"] = bits
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"Muon group 0: momentum_bits must be 8 or 32"):
        opt.step()
    assert torch.equal(p, before) and not any(opt.state[p]["momentum_buffer"].flatten())


# ---------------------------------------------------------------- FSDP2 shards and DCP resharding

import distributed_worker as worker  # noqa: E402


# `spawned` (tests/conftest.py): the session's 2- and 4-rank runs of distributed_worker.SPAWNED_JOBS,
# which hold this module's 8-bit jobs; the 1-process checkpoints are saved before the spawn, the
# 2-rank ones by the 2-rank run, and each world resumes from both.


def _per_rank(spawned, world, job):
    results = [r[job] for r in spawned[world]]
    for value in results:
        if isinstance(value, Exception):
            pytest.fail(f"{job} on {world} ranks raised:\n{value}")
    return results


def _assert_snapshots_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["muon8bit", "normuon8bit"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["replicated", "fsdp"])
def test_sharded_and_replicated_8bit_momentum_equals_one_process_bit_for_bit(spawned, kind, world, variant):
    want = worker.reference(True, variant=variant)
    assert any(key.endswith("momentum_codes") for key in want)
    for got in _per_rank(spawned, world, f"{kind}_{variant}"):
        _assert_snapshots_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["muon8bit", "normuon8bit"])
@pytest.mark.parametrize("world, source", [(2, 1), (4, 1), (4, 2)])
def test_8bit_checkpoint_reshards_through_dcp(spawned, world, source, variant):
    want = worker.reference(True, steps=2 * worker.STEPS, variant=variant)
    for got in _per_rank(spawned, world, f"resume_{variant}_from_{source}"):
        _assert_snapshots_equal(got, want)


@pytest.mark.parametrize("saved_bits, built_bits", [(8, 32), (32, 8)])
def test_load_checkpoint_takes_the_momentum_in_the_form_it_was_saved(tmp_path, saved_bits, built_bits):
    """review issue-rv2: a checkpoint saved with momentum_bits=8 loads into an optimizer built with
    32 (and back) as load_state_dict does (the saved group's momentum_bits wins) and resumes bit for
    bit; load_checkpoint refused it as 'a different model'."""
    from muonkit.distributed import load_checkpoint, save_checkpoint

    def make(bits):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 6))
        opt = muonkit.Muon([{"params": [model[1].weight]},
                            {"params": [model[0].weight, model[0].bias, model[1].bias], "use_muon": False}],
                           lr=0.02, momentum_bits=bits, variant="normuon")
        return model, opt

    def steps(model, opt, seeds):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    model, opt = make(saved_bits)
    steps(model, opt, range(2))
    save_checkpoint(tmp_path / "checkpoint", model, opt)
    resumed, resumed_opt = make(built_bits)
    load_checkpoint(tmp_path / "checkpoint", resumed, resumed_opt)
    assert resumed_opt.param_groups[0]["momentum_bits"] == saved_bits
    steps(model, opt, range(2, 4))
    steps(resumed, resumed_opt, range(2, 4))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key, value in opt.state[model[1].weight].items():
        assert torch.equal(value, resumed_opt.state[resumed[1].weight][key]), key
