"""Defects found by an adversarial review of muonkit.Muon's variants, low-precision writes, diagnostics
and layouts against docs/API.md; each test failed before its fix.

- The fused path (built-in kernels, one process) and the two-phase path (process_group, "svd",
  callables) must give the same bits for the same kernel: a process group of one rank equals no
  process group, whatever the parameter, state and Newton-Schulz dtypes.
- NorMuon / AdaMuon normalization must not divide 0 by an eps that underflowed (float16).
- last_stats: the second-moment range on every path, labels by place in the group, nothing stale
  after a skipped step; a failed step does not move the orthogonality_every count.
- A group whose variant is changed keeps a state that fits it (fresh second moments) and a
  state_dict that loads back.
- A Layout axis that is not an int is a ValueError naming the parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import muonkit


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process (the two-phase distributed path)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _run(param_dtype, state_dtype, ns_dtype, variant, process_group=None, steps=3):
    torch.manual_seed(0)
    shapes = [(16, 24), (24, 16), (4, 2, 3, 3)]
    params = [torch.nn.Parameter((0.1 * torch.randn(s)).to(param_dtype)) for s in shapes]
    opt = muonkit.Muon(params, lr=0.02, variant=variant, state_dtype=state_dtype, ns_dtype=ns_dtype,
                       process_group=process_group, diagnostics=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(param_dtype)
        opt.step()
    return params, opt


DTYPES = [  # (parameter, state_dtype, ns_dtype)
    (torch.bfloat16, None, None),
    (torch.float16, torch.float32, torch.float64),
    (torch.float32, torch.float64, None),
    (torch.float32, None, torch.float64),
    (torch.float64, torch.float32, None),
]


@pytest.mark.parametrize("variant", ["muon", "normuon", "adamuon"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(x).replace("torch.", "") for x in d))
def test_a_process_group_of_one_rank_equals_one_process_bit_for_bit(one_rank_group, dtypes, variant):
    fused, fused_opt = _run(*dtypes, variant)
    shared, shared_opt = _run(*dtypes, variant, process_group=one_rank_group)
    for a, b in zip(fused, shared):
        assert torch.equal(a, b)
        for key, value in fused_opt.state[a].items():
            assert torch.equal(value, shared_opt.state[b][key]), key
    # The same statistics; a norm over another memory layout of H may differ in the last bit.
    assert fused_opt.last_stats.keys() == shared_opt.last_stats.keys()
    for name, stats in fused_opt.last_stats.items():
        assert stats == pytest.approx(shared_opt.last_stats[name], rel=1e-6)


@pytest.mark.parametrize("dtype, eps", [(torch.float16, 1e-10), (torch.float32, 0.0)], ids=["float16", "eps0"])
@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd"])
@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_variants_keep_a_zero_gradient_row_finite(variant, orthogonalizer, dtype, eps):
    """A row with zero gradient has O = 0 there and v = 0; H = 0 / (0 + eps) must be 0 even when
    eps is 0 or below float16's smallest number (1e-10): the row only decays, the others move."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16).to(dtype))
    before = p.detach().clone()
    opt = muonkit.Muon([p], lr=0.01, weight_decay=0.1, variant=variant, orthogonalizer=orthogonalizer,
                       stochastic_rounding=False, variant_eps=eps)
    g = torch.randn(8, 16).to(dtype)
    g[0] = 0
    p.grad = g
    opt.step()
    assert p.isfinite().all()
    assert torch.equal(p.detach()[0], before[0] * (1 - 0.01 * 0.1))
    assert (p.detach()[1:] != before[1:] * (1 - 0.01 * 0.1)).any()


def _callable(X, steps):
    return muonkit.orthogonalize(X, "polar_express", steps)


@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd", _callable], ids=["fused", "svd", "callable"])
@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_second_moment_range_is_recorded_on_every_path(variant, orthogonalizer):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = muonkit.Muon([("w", p)], lr=0.01, variant=variant, orthogonalizer=orthogonalizer, diagnostics=True)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    v = opt.state[p]["second_moment"]
    assert opt.last_stats["w"]["second_moment_min"] == v.min().item()
    assert opt.last_stats["w"]["second_moment_max"] == v.max().item()


def test_unnamed_statistics_are_labelled_by_their_place_in_the_group():
    """"group{g}.param{i}": i is the parameter's index in its group, also when earlier parameters
    have no gradient this step."""
    first, second = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5, 5))
    bias = torch.nn.Parameter(torch.randn(3))
    opt = muonkit.Muon([{"params": [first, second]}, {"params": [bias], "use_muon": False}], diagnostics=True)
    second.grad = torch.randn_like(second)
    bias.grad = torch.randn_like(bias)
    opt.step()
    assert set(opt.last_stats) == {"group0.param1", "group1.param0"}
    assert opt.last_stats["group0.param1"]["grad_rms"] == pytest.approx(second.grad.pow(2).mean().sqrt().item())


def test_a_skipped_step_leaves_no_statistics_of_an_earlier_step():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = muonkit.Muon([("w", p)], diagnostics=True, nonfinite="skip")
    p.grad = torch.randn_like(p)
    opt.step()
    assert "w" in opt.last_stats
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.last_stats == {}


def test_a_failed_step_does_not_count_towards_orthogonality_every():
    def failing(X, steps):
        raise RuntimeError("boom")

    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = muonkit.Muon([("w", p)], diagnostics=True, orthogonality_every=2)
    copy_of = copy.deepcopy(opt)
    q = copy_of.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    opt.param_groups[0]["orthogonalizer"] = failing
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    opt.param_groups[0]["orthogonalizer"] = "polar_express"
    for _ in range(2):
        opt.step()
        copy_of.step()
        assert opt.last_stats == copy_of.last_stats


def _fresh_twin(opt, p, variant):
    """A new optimizer of `variant` over a copy of p, holding the same momentum as opt."""
    q = torch.nn.Parameter(p.detach().clone())
    twin = muonkit.Muon([q], lr=0.02, variant=variant, orthogonalizer="svd")
    twin.state[q]["momentum_buffer"].copy_(opt.state[p]["momentum_buffer"])
    return q, twin


@pytest.mark.parametrize("path", [["normuon", "adamuon"], ["adamuon", "normuon"], ["normuon", "muon", "normuon"]],
                         ids="->".join)
def test_a_changed_variant_starts_its_second_moment_from_zero(path):
    """docs/API.md: a group whose variant is changed later gets its second_moment (zeros) at the next
    step; the step then equals a fresh optimizer of that variant with the same momentum."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    opt = muonkit.Muon([p], lr=0.02, variant=path[0], orthogonalizer="svd")
    for variant in path[1:]:
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
        opt.param_groups[0]["variant"] = variant
    q, twin = _fresh_twin(opt, p, path[-1])
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["second_moment"], twin.state[q]["second_moment"])


def test_a_state_dict_saved_after_switching_to_plain_muon_loads_back():
    p, idle = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([p, idle], variant="normuon")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["variant"] = "muon"
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all("second_moment" not in state for state in saved["state"].values())
    opt.load_state_dict(saved)
    opt.step()


@pytest.mark.parametrize("layout", [muonkit.Layout(rows=(0.0,), cols=(1,)),
                                    muonkit.Layout(rows=(0,), cols=(True,)),
                                    muonkit.Layout(rows=(0,), cols=(1,), blocks=((1.0, 2),))], ids=str)
def test_a_layout_axis_that_is_not_an_int_is_refused_naming_the_parameter(layout):
    p = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="parameter 'w'.*axis"):
        muonkit.Muon([{"params": [("w", p)], "layout": layout}])


def _three_groups(muon_options, adamw_options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(8, 6))]
    opt = muonkit.Muon([{"params": [params[0]], "use_muon": False, "cautious_weight_decay": True, **adamw_options},
                        {"params": [params[1]], **muon_options},
                        {"params": [params[2]], "orthogonalizer": "svd", "variant": "normuon", **muon_options}], lr=0.02)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("key, value", [("momentum", 0.9), ("weight_decay", 0.3), ("rms", 0.3), ("beta2", 0.9),
                                        ("variant_eps", 1e-8), ("adamw weight_decay", 0.3)])
def test_one_element_tensor_hyperparameters_step_as_their_value(key, value, shape):
    """The checks accept any one-element tensor as a number; the step must use its value (a [1]
    momentum crashed in torch._foreach_lerp_ after earlier groups had moved)."""
    muon_key = key.removeprefix("adamw ")
    as_tensor = torch.tensor(value, dtype=torch.float64).reshape(shape)
    muon, adamw = ({}, {muon_key: as_tensor}) if key.startswith("adamw") else ({muon_key: as_tensor}, {})
    got = _three_groups(muon, adamw)
    muon, adamw = ({}, {muon_key: value}) if key.startswith("adamw") else ({muon_key: value}, {})
    expected = _three_groups(muon, adamw)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_a_state_dict_saved_right_after_a_variant_switch_loads_and_continues_alike():
    """Saved between the switch and the next step: the loaded optimizer starts the new variant's
    second moment from zero, as the original does at that step."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = muonkit.Muon([p], variant="normuon")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["variant"] = "adamuon"
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    loaded = muonkit.Muon([q], variant="normuon")
    loaded.load_state_dict(saved)
    q.grad = p.grad.clone()
    opt.step()
    loaded.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["second_moment"], loaded.state[q]["second_moment"])


@pytest.mark.parametrize("into", [0, 1], ids=["same_group", "other_kind"])
def test_a_parameter_appended_twice_is_refused_before_anything_changes(into):
    """An appended parameter that is already in a group would step twice (Muon and AdamW state
    mixed in one entry): refused, naming both places, with nothing changed."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([{"params": [a]}, {"params": [b], "use_muon": False}], lr=0.1)
    opt.param_groups[into]["params"].append(a)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = [a.detach().clone(), b.detach().clone()]
    momentum = opt.state[a]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match=f"group {into}: parameter '#\\d' is also parameter '#0' of Muon group 0"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert list(opt.state[a]) == ["momentum_buffer"] and torch.equal(opt.state[a]["momentum_buffer"], momentum)


def test_statistics_of_an_empty_fsdp_shard_are_recorded_without_a_second_moment_range():
    """With FSDP2 a rank may hold an empty slice of a parameter (3 rows on 4 ranks): the held step's
    apply records its statistics without min/max of an empty second moment (which raises)."""
    from muonkit import functional
    from muonkit.layout import resolve

    local = torch.empty(0, 6)
    v = torch.empty(0, 1)
    stats = [{}]
    pending = functional.muon(
        [local], [torch.empty(0, 6)], [torch.empty(0, 6)], [resolve(None, 2)], lr=0.1, momentum=0.9, nesterov=True,
        weight_decay=0.1, scale="moonlight", rms=0.2, orthogonalizer="polar_express", ns_steps=5, ns_dtype=None,
        variant="normuon", second_moments=[v], update_many=lambda us, vs, layouts: ([torch.empty(0, 6)], [torch.empty(0, 1)]),
        shapes=[torch.Size((3, 6))], stats=stats, hold=True,
    )
    pending.apply_()
    assert set(stats[0]) == {"grad_rms", "momentum_rms", "update_rms"}
