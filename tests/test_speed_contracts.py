"""The contracts behind muonkit's speed work (issue 4); none of these tests is timed.

- Stacking is invisible: same-shaped matrices orthogonalized as one batch give the same BITS as
  one at a time at 1 thread (every kernel operation acts on each matrix on its own, and MKL's
  one-thread GEMM is batch-invariant); at 2 threads they agree to the iteration's own float32
  round-off (MKL threads a lone matrix's GEMM, see test_stacked_equals_one_at_a_time); a Muon step
  over a stacked 3D parameter equals the step over its matrices as separate parameters, bit for bit.
- The default schedule switches to Gram Newton-Schulz on wide matrices only where it equals the
  standard iteration to float32 round-off.
- The benchmarks measure what they say: the textbook yardstick of bench_step.py is Keller Jordan's
  quintic, and the minimax schedules behind bench_levers.py's AOL verdict keep their stated error.
- Memory: Muon keeps one buffer per matrix; a step holds at most three matrix-sized temporaries
  (counted by a dispatch mode that follows every storage an op allocates until it is freed), and
  a Newton-Schulz step allocates nothing.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import muonkit
from muonkit import functional
from muonkit.diagnostics import LiveBytes
from muonkit.layout import from_matrices, to_matrices
from muonkit.orthogonalize import EPS, SAFETY, coefficient_schedule, newton_schulz, orthogonalize, uses_gram
from torch.utils._python_dispatch import TorchDispatchMode

IN_PLACE_METHODS = ["polar_express", "keller_jordan", "you", "gram"]
# square, wide (Gram for the default), wide below the Gram threshold, tall, tiny, conv-like tall,
# larger ones (standard and Gram), two above functional.STACK_MATRIX_NUMEL (batched one
# per thread), and per-channel depthwise filters (torch's batched loop for tiny products)
SHAPES = [(48, 48), (64, 256), (40, 72), (200, 64), (3, 5), (32, 9), (256, 300), (600, 256), (520, 520), (320, 1024),
          (1, 9), (49, 1), (2, 49)]  # tiny products: one batched call (issue 25)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", IN_PLACE_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stacked_equals_one_at_a_time(method, shape, threads):
    g = torch.Generator().manual_seed(1)
    count = 7 if shape[0] * shape[1] < 10_000 else 2
    # different norms per matrix: each is normalized on its own
    matrices = [torch.randn(1, *shape, generator=g) * 10.0 ** (i - 3) for i in range(count)]
    matrices.append(torch.randn(2, *shape, generator=g))  # a stacked parameter among them
    stacked = functional.batched_orthogonalize(matrices, method=method, steps=5, dtype=None)
    for m, s in zip(matrices, stacked):
        for part, alone in [(s, m)] + [(s[i], m[i]) for i in range(m.size(0))]:
            if threads == 1:
                assert torch.equal(part, orthogonalize(alone, method)), shape
            else:
                assert_same_to_round_off(part, alone, method, shape)


def assert_same_to_round_off(part, alone, method, shape):
    """Stacked and lone results differ by at most twice the float32 round-off of the iteration.

    At more than one thread the bits may differ: ATen hands a float32 baddbmm to MKL's strided
    batch GEMM, which runs a batch of ONE matrix as a threaded GEMM but gives each matrix of a
    larger batch one thread, and the two round differently where alpha or beta != 1 (measured on
    an Intel Xeon with AVX512_BF16, torch 2.13, 2 threads: (64 x 64) @ (64 x 64|200|256) with
    baddbmm(beta=b, alpha=c), rows 63-128; alpha = beta = 1 and rows 16-48, 200, 256 kept the
    bits; an AMD EPYC kept them all). Both are float32 runs of the same iteration, so each is within
    its float32 round-off of the float64 run; the lone run's error measured per matrix (1e-6 here,
    the stacked one at most 0.98 of it) bounds the gap at twice that, far below any real stacking
    bug (another matrix's norm or data: differences of order 1e-2 and above)."""
    lone = orthogonalize(alone, method)
    if torch.equal(part, lone):
        return
    round_off = (lone.double() - orthogonalize(alone.double(), method)).abs().max().item()
    gap = (part.double() - lone.double()).abs().max().item()
    assert gap <= 2 * round_off, (shape, gap, round_off)


def _step_twice(params, **options):
    opt = muonkit.Muon(params, lr=0.02, **options)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("orthogonalizer", ["polar_express", "gram", "keller_jordan"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_stacked_parameter_equals_separate_matrices_bit_for_bit(orthogonalizer, nesterov, threads):
    """64 x 256 experts (Gram route for the default) as one (4, 64, 256) parameter and as four."""
    torch.manual_seed(3)
    experts = torch.nn.Parameter(torch.randn(4, 64, 256) * 0.02)
    separate = [torch.nn.Parameter(e.detach().clone()) for e in experts]
    opt_a = muonkit.Muon([experts], lr=0.02, nesterov=nesterov, orthogonalizer=orthogonalizer)
    opt_b = muonkit.Muon(separate, lr=0.02, nesterov=nesterov, orthogonalizer=orthogonalizer)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        experts.grad = torch.randn(experts.shape, generator=g)
        for p, grad in zip(separate, experts.grad):
            p.grad = grad.clone()
        opt_a.step()
        opt_b.step()
    for i, p in enumerate(separate):
        assert torch.equal(experts[i], p)
        assert torch.equal(opt_a.state[experts]["momentum_buffer"][i], opt_b.state[p]["momentum_buffer"])


def one_matrix_at_a_time(tensors, second_moments, layouts, dtype=None):
    """An `update_many` without stacking: each parameter's matrices orthogonalized on their own."""
    updates = [from_matrices(orthogonalize(to_matrices(t, layout), dtype=dtype), layout, t.shape)
               for t, layout in zip(tensors, layouts)]
    return updates, [None] * len(tensors)


@pytest.mark.parametrize("ns_dtype", [None, pytest.param(torch.float16, marks=pytest.mark.slow), torch.bfloat16],
                         ids=["default", "float16", "bfloat16"])
def test_muon_step_equals_per_matrix_path_bit_for_bit(threads, ns_dtype):
    """The stacked step (U written straight into the stack) against the generic path fed one
    matrix at a time, over a mix of shapes, layouts and a bf16 parameter, in each working dtype."""
    torch.manual_seed(5)
    shapes = [(48, 48), (48, 48), (64, 256), (256, 64), (16, 8, 3, 3), (3, 32, 16), (32, 32),
              (520, 520), (520, 520), (520, 520),  # large: batched one per thread
              (600, 480)]  # large and tall: written into its transposed stack part one matrix at a time
    params = [torch.randn(s) * 0.05 for s in shapes]
    params[-2] = params[-2].bfloat16()
    other = [p.clone() for p in params]
    layouts = [muonkit.layout.resolve(None, p.ndim) for p in params]
    bufs_a = [torch.zeros_like(p) for p in params]
    bufs_b = [torch.zeros_like(p) for p in params]
    options = dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.1, scale="moonlight", rms=0.2,
                   orthogonalizer="polar_express", ns_steps=5, ns_dtype=ns_dtype)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        functional.muon(params, grads, bufs_a, layouts, **options)
        functional.muon(other, [g.clone() for g in grads], bufs_b, layouts, **options,
                        update_many=lambda *a: one_matrix_at_a_time(*a, dtype=ns_dtype))
    for a, b in zip(params, other):
        assert torch.equal(a, b)
    for a, b in zip(bufs_a, bufs_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("conditioning", ["random", "lowrank", "decay"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 384), (512, 128), (2, 64, 200)], ids=str)
def test_default_gram_route_matches_standard_newton_schulz(shape, conditioning):
    """Where the default runs as Gram NS it equals standard NS to float32 round-off: measured
    <= 1e-5 (the same size as standard NS's own float32-vs-float64 error), bound 5e-5."""
    assert uses_gram(shape[-2], shape[-1])
    g = torch.Generator().manual_seed(6)
    *batch, m, n = shape
    if conditioning == "random":
        G = torch.randn(shape, generator=g)
    elif conditioning == "lowrank":
        G = torch.randn(*batch, m, 8, generator=g) @ torch.randn(*batch, 8, n, generator=g)
        G += 1e-3 * torch.randn(shape, generator=g)
    else:
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        S = torch.logspace(0, -6, min(m, n), dtype=torch.float64)
        G = ((U * S.unsqueeze(-2)) @ Vh).float()
    standard = newton_schulz(G, coefficient_schedule("polar_express", 5), safety=SAFETY["polar_express"],
                             eps=EPS["polar_express"])
    assert (orthogonalize(G) - standard).abs().max().item() <= 5e-5


@pytest.mark.parametrize("device_threads", [1, 2, 3, 5])
def test_large_matrices_run_one_per_thread(device_threads, monkeypatch):
    """Above STACK_MATRIX_NUMEL, a run holds at most one matrix per CPU thread; a tensor with more
    matrices than threads runs alone; small matrices still stack up to STACK_NUMEL."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: device_threads)
    cpu = torch.device("cpu")
    big = functional.STACK_MATRIX_NUMEL + 1
    f32 = torch.float32
    keys = [("big", f32, cpu)] * 5 + [("stacked", f32, cpu)] * 2 + [("small", f32, cpu)] * 3
    matrix_numel = [big] * 7 + [100] * 3
    counts = [1, 1, 1, 1, 1, 4, 1, 1, 1, 1]
    sizes = [n * c for n, c in zip(matrix_numel, counts)]
    runs = functional._stacks(keys, sizes, matrix_numel, counts)
    singles = list(range(5))
    expected = [singles[i:i + device_threads] for i in range(0, 5, device_threads)]
    if device_threads >= 5:
        expected = [singles]
    stacked = [[5], [6]] if device_threads < 5 else [[5, 6]]
    assert runs == expected + stacked + [[7, 8, 9]]


@pytest.mark.parametrize("device, dtype", [("cuda", torch.float32), ("cpu", torch.float16)])
def test_large_matrices_run_alone_off_cpu_and_in_float16(device, dtype, monkeypatch):
    """One at a time on CUDA, and in float16 (whose CPU matrix_norm differs in a batch)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    big = functional.STACK_MATRIX_NUMEL + 1
    runs = functional._stacks([("big", dtype, torch.device(device))] * 3, [big] * 3, [big] * 3, [1] * 3)
    assert runs == [[0], [1], [2]]


def test_gram_threshold():
    assert not uses_gram(64, 64) and not uses_gram(100, 150) and not uses_gram(32, 1024)
    assert uses_gram(64, 128) and uses_gram(3072, 768) and uses_gram(768, 3072)


_PRODUCTS = frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul"})


class ProductCalls(TorchDispatchMode):
    """Counts the ATen matrix-product calls made inside the block, by op name."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _PRODUCTS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def product_calls(fn) -> Counter:
    with ProductCalls() as counter:
        fn()
    return counter.calls


def _muon_step_products(shape, layout=None) -> Counter:
    p = torch.nn.Parameter(torch.randn(shape))
    opt = muonkit.Muon([{"params": [p], "layout": layout}], lr=0.02)
    p.grad = torch.randn(shape)
    opt.step()  # state exists before counting
    return product_calls(opt.step)


@pytest.mark.parametrize("method", IN_PLACE_METHODS)
@pytest.mark.parametrize("shape", [(96, 9), (7, 96, 9), (49, 24), (672, 9, 1), (200, 64)], ids=str)
def test_tall_matrices_take_the_path_of_their_transpose(method, shape):
    """Issue 25: a tall matrix (a depthwise 96 x 3 x 3 filter read as one 96 x 9 matrix) is
    orthogonalized through its wide transpose: the same product calls as the transpose itself,
    alone and in a Muon step."""
    G = torch.randn(shape)
    assert product_calls(lambda: orthogonalize(G, method)) == product_calls(lambda: orthogonalize(G.mT, method))
    if len(shape) == 2:
        assert _muon_step_products(shape) == _muon_step_products(shape[::-1])


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (1, 49), (2, 49), (3, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tiny_matrices_run_as_one_batch(shape, dtype):
    """Issue 25: matrices whose products are tiny (m^2 n < 400 multiply-adds in the wide
    orientation, torch's own batch-invariant loop) run as one batched product per Newton-Schulz
    product whatever the batch: a depthwise filter read per channel (C matrices 1 x 9) made
    ~1,400 single-matrix products per filter and step before. Bits: test_stacked_equals_one_at_a_time."""
    one = product_calls(lambda: orthogonalize(torch.randn(1, *shape, dtype=dtype)))
    many = product_calls(lambda: orthogonalize(torch.randn(96, *shape, dtype=dtype)))
    assert one == many and sum(one.values()) == 15  # 5 steps x 3 products
    per_channel = muonkit.Layout.per_block(96, 4)
    assert _muon_step_products((96, 1, 3, 3), per_channel) == _muon_step_products((1, 1, 3, 3), muonkit.Layout.per_block(1, 4))


def test_muon_state_is_one_buffer_per_matrix():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = muonkit.Muon(muonkit.param_groups(model), lr=0.01)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if group["use_muon"]:
                assert list(state) == ["momentum_buffer"]
                assert state["momentum_buffer"].shape == p.shape
                assert state["momentum_buffer"].dtype == p.dtype
            else:
                assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
                assert state["step"].numel() == 1


def _peak_extra_bytes(param: torch.nn.Parameter, **options) -> tuple[int, int]:
    opt = muonkit.Muon([param], lr=0.02, **options)
    param.grad = torch.randn_like(param)
    opt.step()  # state and any lazy setup exist before counting
    with LiveBytes() as tracker:
        opt.step()
    return tracker.peak, param.numel() * param.element_size()


@pytest.mark.parametrize(
    "shape",
    [(256, 256), (128, 512), (512, 128), (128, 256), (100, 150), (8, 64, 256), (32, 16, 3, 3)],
    ids=str,
)
@pytest.mark.parametrize("nesterov", [True, False])
def test_step_holds_at_most_three_matrix_sized_temporaries(shape, nesterov):
    """Three matrix sizes, plus a little for per-matrix norms and scalars."""
    peak, size = _peak_extra_bytes(torch.nn.Parameter(torch.randn(shape)), nesterov=nesterov)
    assert peak <= 3 * size + 4096, peak / size


@pytest.mark.parametrize("method", ["keller_jordan", "gram"])
def test_newton_schulz_steps_allocate_nothing(method):
    """The work buffers are allocated once: 2 or 12 steps make the same allocations."""
    G = torch.randn(64, 192)
    counts = []
    for steps in (2, 12):
        with LiveBytes() as tracker:
            orthogonalize(G, method, steps)
        counts.append(tracker.allocations)
    assert counts[0] == counts[1]


def test_live_bytes_tracker_sees_frees():
    with LiveBytes() as tracker:
        a = torch.empty(1000)
        b = a + 1
        del a, b
        c = torch.empty(10)
    assert tracker.peak == 8000 and tracker.live == 40
    del c


def test_live_bytes_counts_new_storages_until_freed():
    existing = torch.zeros(1000)
    with LiveBytes() as tracker:
        doubled = existing * 2  # new: 4000 bytes
        temporary = doubled + 1  # new: 4000 more, then freed
        del temporary
        existing.add_(1)  # in place: nothing new
    assert tracker.peak == 8000 and tracker.live == 4000 and tracker.allocations == 2
    del doubled
    assert tracker.live == 0


# ---- the measuring instruments of benchmarks/bench_levers.py and bench_step.py -------------------


def _load_benchmark(name):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


@pytest.mark.parametrize("lo,steps", [(1e-3, 5), (4e-3 / 1.02, 4), (0.05, 3)])
def test_greedy_minimax_schedule_keeps_its_stated_error(lo, steps):
    """The AOL verdict rests on greedy_schedule: its schedule maps [lo, 1] into [1 - E, 1 + E] for
    the E it reports (checked on a dense float64 grid), and E is attained (the bound is tight)."""
    levers = _load_benchmark("bench_levers")
    schedule, error = levers.greedy_schedule(lo, steps)
    x = torch.logspace(math.log10(lo), 0, 200_001, dtype=torch.float64)
    for a, b, c in schedule:
        x = a * x + b * x**3 + c * x**5
    deviation = (x - 1).abs().max().item()
    assert deviation <= error + 1e-9 and deviation >= error - 1e-6, (deviation, error)


def test_lowest_edge_brackets_the_error():
    """lowest_edge(4, E) is the smallest lower edge whose 4-step greedy schedule stays within E."""
    levers = _load_benchmark("bench_levers")
    edge = levers.lowest_edge(4, 0.141)
    assert levers.greedy_schedule(edge, 4)[1] <= 0.141 < levers.greedy_schedule(edge * 0.95, 4)[1]


def test_symmetric_half_product_is_the_product():
    levers = _load_benchmark("bench_levers")
    g = torch.Generator().manual_seed(9)
    X = torch.randn(37, 50, generator=g, dtype=torch.float64)
    A = X @ X.T
    assert torch.allclose(levers._symmetric_product(X, X.T), A, rtol=0, atol=1e-12)
    assert torch.allclose(levers._symmetric_product(A, A), A @ A, rtol=1e-13, atol=0)


def test_textbook_orthogonalizer_is_keller_jordans_quintic():
    """bench_step's yardstick: 5 steps of (3.4445, -4.7750, 2.0315) after X / (||X||_F + 1e-7), in
    float32, tall inputs transposed: equal to a float64 iteration up to fp32 round-off."""
    bench_step = _load_benchmark("bench_step")
    g = torch.Generator().manual_seed(10)
    for shape in [(24, 40), (40, 24)]:
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        X = G.T if shape[0] > shape[1] else G
        X = X / (X.norm() + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
        X = X.T if shape[0] > shape[1] else X
        out = bench_step.newton_schulz5(G.float())
        assert out.dtype == torch.float32 and (out.double() - X).abs().max().item() < 1e-4


# Defects found in other Muon implementations (the peers of docs/references.md section 10); each
# test names the peer and the defect it guards against, so that muonkit never has it.


def test_orthogonalize_normalizes_each_matrix_of_a_batch_separately():
    # peer 001 divides by x.norm() over the whole batch.
    G = torch.randn(2, 32, 64)
    G[1] *= 1e4
    batched = muonkit.orthogonalize(G)
    alone = torch.stack([muonkit.orthogonalize(G[i]) for i in range(2)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 600, 480), (1, 480, 600), (3, 40, 20)], ids=str)
def test_a_stack_part_is_written_as_one_copy_would(shape, dtype):
    """functional._write_ (one 2-D transposing copy per matrix into a large tall part of a work
    stack) gives the bits of one copy_, in every working dtype, also where it keeps the one copy."""
    from muonkit.orthogonalize import empty_work

    u = torch.randn(shape) * 1e3
    a, b = empty_work(*shape, dtype=dtype), empty_work(*shape, dtype=dtype)
    a.copy_(u)
    functional._write_(b, u)
    assert torch.equal(a, b)
    assert functional._transposes(b) == (shape[1] > shape[2] and shape[1] * shape[2] > functional.STACK_MATRIX_NUMEL)
