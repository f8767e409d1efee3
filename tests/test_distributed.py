"""Contracts of muonkit.distributed: owner assignment (pure), and multi-process runs (gloo, 2 and 4
processes) equal to a single-process run.

Oracles and tolerances:
- Same gradients on every process (`fixed_grads`): replicated (DDP-style) and FSDP2-sharded runs
  equal the single-process run BIT FOR BIT, parameters and optimizer state, after 3 steps and
  after a checkpoint resumed on another number of ranks. The owner of a matrix runs the same
  kernels on the same data in the same batch position, and elementwise updates do not depend
  on how a tensor is sliced.
- Real data split across ranks (DDP / FSDP2 forward and backward): the averaged gradient differs
  from the single-process full-batch gradient by float32 summation order, so parameters agree to
  atol 1e-5 (a few float32 ulps of the gradient, amplified by 3 orthogonalized steps).

The spawned runs (tests/distributed_worker.py) happen once per session for every module
(tests/conftest.py `spawned`): one 2-process and one 4-process job list.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
import muonkit
from muonkit.distributed import (
    DistributedOrthogonalizer,
    assign_owners,
    load_checkpoint,
    newton_schulz_flops,
    shard_sizes,
)
from muonkit.functional import batched_orthogonalize

DATA_ATOL = 1e-5

JOBS = {
    2: ["replicated", "fsdp", "bytes", "ddp_data", "fsdp_data", "param_groups", "errors", "checkpoint_save", "resume_from_1",
        "replicated_normuon", "fsdp_normuon", "replicated_adamuon", "fsdp_adamuon", "checkpoint_save_normuon",
        "fsdp_nonfinite_skip", "load_unsharded_state_dict"],
    4: ["replicated", "fsdp", "ddp_data", "fsdp_data", "resume_from_2", "fsdp_normuon", "resume_normuon_from_2",
        "resume_normuon_into_other_variants_from_2"],
}


# ------------------------------------------------------------------------- assign_owners (pure)


def test_assign_owners_example_and_determinism():
    assert assign_owners([4.0, 3.0, 3.0, 2.0], 2) == [0, 1, 1, 0]
    costs = [random.Random(s).random() for s in range(50)]
    assert assign_owners(costs, 4) == assign_owners(list(costs), 4)


def test_assign_owners_edge_cases():
    assert assign_owners([], 3) == []
    assert assign_owners([5.0, 1.0, 2.0], 1) == [0, 0, 0]
    # More ranks than items: one item each, largest first onto the lowest rank.
    assert assign_owners([1.0, 3.0], 4) == [1, 0]
    # Equal costs go round-robin in item order.
    assert assign_owners([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_owners([0.0, 0.0], 2) == [0, 1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size"):
            assign_owners([1.0], bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"costs\[1\]"):
            assign_owners([1.0, bad], 2)


def _max_load(costs, owners, world):
    return max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(world))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_assign_owners_balance(world, seed):
    """List scheduling: the busiest rank carries at most the average load plus the largest item."""
    rng = random.Random(seed)
    costs = [rng.choice([1, 4, 16]) * rng.random() for _ in range(rng.randint(1, 40))]
    owners = assign_owners(costs, world)
    assert all(0 <= o < world for o in owners)
    assert _max_load(costs, owners, world) <= sum(costs) / world + max(costs) + 1e-9


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("seed", range(10))
def test_assign_owners_within_four_thirds_of_optimum(world, seed):
    """Largest-first greedy is within 4/3 of the best assignment (Graham 1969), checked by brute force."""
    rng = random.Random(seed)
    costs = [rng.random() for _ in range(rng.randint(1, 7))]
    best = min(_max_load(costs, owners, world) for owners in itertools.product(range(world), repeat=len(costs)))
    assert _max_load(costs, assign_owners(costs, world), world) <= 4 / 3 * best + 1e-12


def test_assign_owners_transformer_block_splits_work():
    """GPT-2-small block shapes: 2 ranks each get about half the Newton-Schulz FLOPs."""
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    costs = [newton_schulz_flops(1, r, c) for r, c in shapes]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) / sum(costs) <= 0.6


def test_newton_schulz_flops():
    assert newton_schulz_flops(1, 768, 3072) * 5 == pytest.approx(40.8e9, rel=0.01)  # docs/references.md section 3
    assert newton_schulz_flops(3, 10, 20) == newton_schulz_flops(3, 20, 10) == 3 * (4 * 100 * 20 + 2 * 1000)


def test_shard_sizes_follow_torch_chunk():
    assert shard_sizes(33, 2) == [17, 16]
    assert shard_sizes(3, 4) == [1, 1, 1, 0]
    assert shard_sizes(1, 2) == [1, 0]
    assert shard_sizes(0, 3) == [0, 0, 0]
    for n in range(0, 20):
        for w in range(1, 6):
            chunks = [len(c) for c in torch.arange(n).chunk(w)] if n else []
            assert shard_sizes(n, w) == chunks + [0] * (w - len(chunks))


def test_batch_position_does_not_change_results_when_sides_are_multiples_of_8():
    """Why such matrices can be owned one by one: results do not depend on their batch position.
    (For small shapes with other sides they can, by buffer alignment; those are owned together.)"""
    torch.manual_seed(0)
    for rows, cols in [(8, 16), (16, 24), (32, 96), (64, 64)]:
        mats = [torch.randn(1, rows, cols) for _ in range(5)]
        together = batched_orthogonalize(mats, method="polar_express", steps=5, dtype=None)
        alone = [batched_orthogonalize([m], method="polar_express", steps=5, dtype=None)[0] for m in mats]
        assert all(torch.equal(a, b) for a, b in zip(together, alone)), (rows, cols)


# ------------------------------------------------------------------------------------- errors


def test_process_group_without_init_process_group():
    assert not dist.is_initialized()
    model = worker.make_model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        muonkit.Muon(muonkit.param_groups(model), process_group=object())


def test_no_torch_distributed_call_without_process_group(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called with process_group=None")

    # One unpatched run first: torch imports some modules lazily, and they probe dist at import.
    warm = worker.make_model()
    worker.train_data(warm, worker.make_optimizer(warm), 1, 0, 1)
    for name in dir(dist):
        if not name.startswith("_") and callable(getattr(dist, name)) and not isinstance(getattr(dist, name), type):
            monkeypatch.setattr(dist, name, forbidden)
    model = worker.make_model()
    opt = worker.make_optimizer(model)
    worker.train_data(model, opt, 2, 0, 1)
    opt.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------- multi-process


@pytest.fixture(scope="module")
def runs(spawned):
    """{world: [results of rank 0, rank 1, ...], "tmp": the checkpoints' folder}: this module's jobs
    (JOBS) of the session's spawn (tests/conftest.py), the 1-process checkpoint saved there first."""
    for world, jobs in JOBS.items():
        assert set(jobs) <= set(worker.SPAWNED_JOBS[world]), (world, sorted(set(jobs) - set(worker.SPAWNED_JOBS[world])))
    return spawned


def _result(runs, world: int, job: str) -> list:
    per_rank = [r[job] for r in runs[world]]
    for value in per_rank:
        if isinstance(value, Exception):
            pytest.fail(f"{job} on {world} processes raised:\n{value}")
    return per_rank


def _assert_equal(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if atol == 0.0:
            assert torch.equal(got[key], want[key]), f"{key}: max diff {(got[key] - want[key]).abs().max():.3g}"
        else:
            torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def reference_fixed():
    return worker.reference(fixed=True)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("job", ["replicated", "fsdp"])
def test_same_gradients_equal_single_process_bit_for_bit(runs, reference_fixed, world, job):
    for rank_result in _result(runs, world, job):
        _assert_equal(rank_result, reference_fixed)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "job"), [(2, "replicated_normuon"), (2, "fsdp_normuon"), (2, "replicated_adamuon"),
                                           (2, "fsdp_adamuon"), (4, "fsdp_normuon")])
def test_variants_equal_single_process_bit_for_bit(runs, world, job):
    """NorMuon (with cautious weight decay) and AdaMuon: each matrix's owner normalizes it with its
    second moment, exactly as one process does; the second moments come back sharded."""
    variant = job.split("_")[1]
    reference = worker.reference(fixed=True, variant=variant)
    assert any(key.endswith(".second_moment") for key in reference)
    for rank_result in _result(runs, world, job):
        _assert_equal(rank_result, reference)


@pytest.mark.slow
def test_a_nonfinite_gradient_on_one_shard_skips_the_step_on_every_rank(runs, reference_fixed):
    for rank_result in _result(runs, 2, "fsdp_nonfinite_skip"):
        assert rank_result["skipped"] == 1
        _assert_equal(rank_result["snapshot"], reference_fixed)


@pytest.mark.slow
def test_normuon_checkpoint_resumes_on_other_world_sizes(runs):
    _result(runs, 2, "checkpoint_save_normuon")
    reference = worker.reference(fixed=True, steps=2 * worker.STEPS, variant="normuon")
    for rank_result in _result(runs, 4, "resume_normuon_from_2"):
        _assert_equal(rank_result, reference)
    model = worker.make_model()
    opt = worker.make_optimizer(model, variant="normuon")
    load_checkpoint(runs["tmp"] / worker.checkpoint_name(2, "normuon"), model, opt)
    worker.train_fixed(model, opt, range(worker.STEPS, 2 * worker.STEPS))
    _assert_equal(worker.snapshot(model, opt), reference)


@pytest.mark.slow
def test_a_state_dict_of_one_process_loads_into_fsdp2_sharded_and_resumes_alike(runs):
    """opt.load_state_dict of a one-process state dict (NorMuon, 8-bit momentum) on every FSDP2
    rank (review issue-rv2): each rank keeps its piece of every state tensor, placed as its
    parameter; they stayed whole plain tensors, which the step mixed with the local shards (a
    RuntimeError inside the step, nothing changed)."""
    reference = worker.reference(fixed=True, steps=2 * worker.STEPS, variant="normuon8bit")
    for rank_result in _result(runs, 2, "load_unsharded_state_dict"):
        assert rank_result["placed"] and all(rank_result["placed"].values()), rank_result["placed"]
        _assert_equal(rank_result["snapshot"], reference)


@pytest.mark.slow
def test_a_checkpoint_of_another_variant_loads_its_second_moments_sharded(runs):
    """A NorMuon checkpoint loaded into FSDP2 optimizers built with variant "adamuon" or "muon"
    (review issue-rv2): the saved variant wins, as with load_state_dict, and its second moments
    come back sharded like their parameters. Built "muon", they were plain tensors, held whole on
    every rank and exchanged as replicated ones; built "adamuon" (a second moment of another
    shape), the load was refused. The state equals one process's, and so does the resumed run."""
    _result(runs, 2, "checkpoint_save_normuon")
    saved = worker.reference(fixed=True, variant="normuon")
    resumed = worker.reference(fixed=True, steps=2 * worker.STEPS, variant="normuon")
    for rank_result in _result(runs, 4, "resume_normuon_into_other_variants_from_2"):
        for built, reference in (("adamuon", saved), ("muon", resumed)):
            sharded = rank_result[f"{built}.sharded"]
            assert sharded and all(sharded.values()), (built, sharded)
            _assert_equal(rank_result[f"{built}.snapshot"], reference)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("job", ["ddp_data", "fsdp_data"])
def test_data_parallel_training_matches_single_process(runs, world, job):
    reference = worker.reference(fixed=False)
    per_rank = _result(runs, world, job)
    for rank_result in per_rank:
        _assert_equal(rank_result, reference, atol=DATA_ATOL)
        # Every rank ends with the same parameters, bit for bit.
        _assert_equal(rank_result, per_rank[0])
    moved = max((reference[k] - worker.make_model().state_dict()[k]).abs().max() for k in worker.make_model().state_dict())
    assert moved > 100 * DATA_ATOL


@pytest.mark.slow
def test_bytes_sent_per_step_is_the_minimum(runs):
    """Replicated: each owner sends its results to the W - 1 other ranks, (W - 1) x the Muon bytes in
    all (a ring all-reduce of the same gradients sends 2 (W - 1) / W of them per rank). FSDP2: each
    owner receives the slices it lacks and returns them, 2 (N - largest slice) per tensor in all.
    The same every step."""
    per_rank = _result(runs, 2, "bytes")
    for result in per_rank:
        assert result["no_group"] == 0
        for kind in ("replicated", "fsdp"):
            first, second = result[kind]
            assert first == second > 0, (kind, result[kind])
    total = per_rank[0]["muon_bytes"]
    assert sum(r["replicated"][0] for r in per_rank) == (2 - 1) * total
    assert sum(r["fsdp"][0] for r in per_rank) == per_rank[0]["fsdp_minimum"]
    # Balanced owners: no rank sends more than 0.65 of the total.
    assert max(r["replicated"][0] for r in per_rank) <= 0.65 * total


@pytest.mark.slow
def test_param_groups_on_fsdp_model(runs):
    assert _result(runs, 2, "param_groups") == [True, True]


@pytest.mark.slow
def test_unsupported_sharding_errors(runs):
    """Shard(1) and 2D meshes are supported (issue 21); a Partial placement and a group other than the
    mesh's ranks are refused at construction, naming the parameter."""
    messages = _result(runs, 2, "errors")[0]
    assert messages["dim1"] is None and messages["mesh2d"] is None and messages["mesh2d_as_mesh"] is None
    assert "'sq1.weight'" in messages["partial"] and "Partial" in messages["partial"]
    assert "device mesh of ranks [0, 1]" in messages["other_group"] and "has ranks [0]" in messages["other_group"]
    member, outsider = _result(runs, 2, "errors")
    assert member["non_member"] is None
    assert outsider["non_member"] is not None and "not a member" in outsider["non_member"]


@pytest.fixture(scope="module")
def reference_resumed():
    return worker.reference(fixed=True, steps=2 * worker.STEPS)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "world"), [(1, 2), (2, 4)])
def test_checkpoint_resumes_on_other_world_size(runs, reference_resumed, source, world):
    _result(runs, 2, "checkpoint_save")
    for rank_result in _result(runs, world, f"resume_from_{source}"):
        _assert_equal(rank_result, reference_resumed)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one_process(runs, reference_resumed):
    _result(runs, 2, "checkpoint_save")
    model = worker.make_model()
    opt = worker.make_optimizer(model)
    load_checkpoint(runs["tmp"] / "checkpoint_2", model, opt)
    worker.train_fixed(model, opt, range(worker.STEPS, 2 * worker.STEPS))
    _assert_equal(worker.snapshot(model, opt), reference_resumed)


@pytest.mark.slow
def test_checkpoint_from_a_different_model(runs):
    _result(runs, 2, "checkpoint_save")
    model = worker.make_model(fc_rows=34)
    opt = worker.make_optimizer(model)
    with pytest.raises(ValueError, match=r"different model.*fc\.weight: checkpoint \(33, 96\), model \(34, 96\)"):
        load_checkpoint(runs["tmp"] / "checkpoint_2", model, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(runs["tmp"] / "nowhere", model, opt)


@pytest.mark.slow
def test_spawned_jobs_are_quick(runs):
    """Keeps the multi-process tests small: every job's own CPU time per rank (excluding the spawn) under
    20 s. CPU time, not wall-clock time: on a machine shared with other jobs (load 20 on 2 cores) a
    job's wall-clock time grows with the load while its CPU time does not."""
    for world in (2, 4):
        for name in worker.SPAWNED_JOBS[world]:
            assert max(r[f"{name}.cpu_seconds"] for r in runs[world]) < 20.0, (world, name)


# ------------------------------------------------------------------------- the torchrun example


@pytest.mark.slow
def test_torchrun_example_trains_checkpoints_and_resumes_on_another_world_size(tmp_path, train_distributed):
    checkpoint = tmp_path / "ckpt"
    first = train_distributed(2, "--mode", "fsdp", "--steps", "4", "--checkpoint", str(checkpoint))
    assert "charlm, fsdp, 2 processes" in first and "step     4" in first and f"saved {checkpoint}" in first
    resumed = train_distributed(1, "--mode", "ddp", "--steps", "6", "--resume", str(checkpoint))
    # The resumed run starts where the checkpoint was taken: steps 5 and 6 only.
    assert "charlm, ddp, 1 processes" in resumed
    assert "step     4" not in resumed and "step     6" in resumed and "val loss" in resumed


# From an adversarial review of the variants, low-precision writes, diagnostics and layouts against
# docs/API.md; each test failed before its fix.


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


def test_an_optimizer_built_before_fully_shard_warns_that_nothing_has_a_gradient(one_rank_group):
    """fully_shard replaces a module's parameters: an optimizer built on the old ones sees no gradient
    (the model's new parameters get them) and would change nothing, silently. It warns, naming the
    order to build them in; built after fully_shard, the same step moves the weights and does not warn."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    too_early = muonkit.Muon(model.parameters(), lr=0.1)
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 8)).sum().backward()
    before = [p.full_tensor().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="no parameter of this optimizer has a gradient.*build the optimizer after") as seen:
        too_early.step()
    assert seen[0].filename == __file__  # points at the caller's step()
    assert all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))

    after = muonkit.Muon(model.parameters(), lr=0.1, process_group=one_rank_group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after.step()
    assert not any(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
