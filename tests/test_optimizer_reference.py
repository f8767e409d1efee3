"""muonkit.Muon against the slow float64 reference (tests/reference.py: ReferenceMuon).

Gradients are a fixed sequence given to both sides (open loop), so the two runs see the same
momentum and differ only through the orthogonalizer and round-off; that makes every tolerance
below a bound that can be argued, not a measured number.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import muonkit
from reference import (
    ReferenceMuon,
    matrices_of,
    ns_spectral,
    polar_factor,
    scalar_image,
    update_scale,
)

SCALES = ["naive", "keller_jordan", "mup", "moonlight"]
# Parameter kinds: shape and how the reference views it (API.md `layout=None`).
KINDS = {
    "matrix_wide": ((5, 12), "matrix"),
    "matrix_tall": ((12, 5), "matrix"),
    "conv": ((6, 3, 2, 2), "conv"),  # 6 x 12: wide once flattened, tall-looking as (6, 3)
    "conv_tall": ((8, 2, 1, 1), "conv"),  # 8 x 2
    "conv1d": ((7, 2, 3), None),  # 3D is stacked by default; see test_layout_conv_on_3d
    "stacked": ((3, 7, 4), "stacked"),
}
TABLE_KINDS = ["matrix_wide", "matrix_tall", "conv", "conv_tall", "stacked"]
STEPS = 4
LR = 0.05
MOMENTUM = 0.9


def grads_for(shape, steps=STEPS, seed=0, dtype=torch.float64):
    """Magnitudes vary over steps so that the normalization inside the orthogonalizer matters;
    the matrices of a stacked 3D tensor differ by 1e4 in norm, so that normalizing the stack as a
    whole (instead of each matrix on its own) pushes the small ones out of the Newton-Schulz band
    (visible with the polar_express tests; the exact polar factor is scale-free)."""
    g = torch.Generator().manual_seed(seed)
    slices = torch.ones(shape, dtype=torch.float64)
    if len(shape) == 3:
        slices = torch.logspace(-2, 2, shape[0], dtype=torch.float64).view(-1, 1, 1).expand(shape)
    return [
        (torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (t % 3 - 1) * slices)
        .to(dtype)
        for t in range(steps)
    ]


def init_param(shape, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def run_muonkit(params, grads, **kw):
    """Drive muonkit.Muon through the fixed gradient sequence; params are updated in place.
    `params` is a list of tensors or of group dicts (one tensor per group), `grads` one gradient
    sequence per tensor."""
    opt = muonkit.Muon(params, **kw)
    tensors = [q["params"][0] if isinstance(q, dict) else q for q in params]
    for t in range(len(grads[0])):
        for p, gs in zip(tensors, grads):
            p.grad = gs[t].clone()
        opt.step()
    return opt


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("scale", SCALES)
def test_svd_muon_matches_reference_float64(scale, nesterov, weight_decay, kind):
    """float64 params, float64 orthogonalization, exact polar factor on both sides.

    Tolerance 1e-10: both sides are float64 (round-off ~1e-16 per op), the polar factor amplifies
    input perturbations by at most ~2/(s_min + s_next) * ||U|| (< 1e3 for these random matrices),
    over 4 steps.
    """
    shape, ref_kind = KINDS[kind]
    p = init_param(shape)
    grads = grads_for(shape)
    ref = ReferenceMuon(
        [p], lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=weight_decay, scale=scale,
        kinds=[ref_kind],
    )
    for g in grads:
        ref.step([g])
    run_muonkit(
        [p], [grads], lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=weight_decay,
        scale=scale, orthogonalizer="svd", ns_dtype=torch.float64,
    )
    assert p.dtype == torch.float64
    err = (p - ref.params[0]).abs().max().item()
    assert err <= 1e-10, err


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize("scale", SCALES)
def test_svd_muon_matches_reference_float32(scale, kind):
    """float32 params and momentum, default ns_dtype (float32 on CPU).

    Tolerance 2e-6: params (|W| < 2) and momentum are rounded to fp32 each step (6e-8 relative);
    an fp32 SVD polar factor is accurate to ~1e-6 for these well-conditioned matrices, and enters
    multiplied by lr * scale <= 0.05 * 0.7; 4 steps.
    """
    shape, ref_kind = KINDS[kind]
    p = init_param(shape, dtype=torch.float32)
    grads = grads_for(shape, dtype=torch.float32)
    ref = ReferenceMuon(
        [p], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1, scale=scale,
        kinds=[ref_kind],
    )
    for g in grads:
        ref.step([g])
    run_muonkit(
        [p], [grads], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1, scale=scale,
        orthogonalizer="svd",
    )
    assert p.dtype == torch.float32
    err = (p.double() - ref.params[0]).abs().max().item()
    assert err <= 2e-6, err


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("scale", SCALES)
def test_polar_express_within_band_of_reference(scale, nesterov, kind):
    """Polar Express (fp32, default) against the exact-polar reference.

    With the same momentum on both sides, each step's update differs by lr*scale*(O_pe - O) and
    ||O_pe - O||_2 = max_i |p(x_i) - 1| <= delta = 0.154 whenever every normalized singular value
    x_i of the Nesterov/momentum matrix is >= 1e-3 (its band, docs/references.md section 3; asserted
    below). Decay only shrinks old differences, so per matrix
    ||W_muonkit - W_ref||_2 <= sum_t lr*scale*delta, plus FP32_SLACK-sized round-off per step.
    """
    shape, ref_kind = KINDS[kind]
    lo, hi = scalar_image("polar_express", 1e-3)
    delta = max(1 - lo, hi - 1)
    smallest = []

    def exact_and_record(U):
        S = torch.linalg.svdvals(U)
        smallest.append((S[-1] / torch.linalg.matrix_norm(U)).item())
        return polar_factor(U)

    p = init_param(shape, dtype=torch.float32)
    grads = grads_for(shape, dtype=torch.float32)
    ref = ReferenceMuon(
        [p], lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=0.1, scale=scale,
        kinds=[ref_kind], orthogonalizer=exact_and_record,
    )
    for g in grads:
        ref.step([g])
    assert min(smallest) >= 1e-3  # precondition of the bound
    run_muonkit(
        [p], [grads], lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=0.1, scale=scale,
        orthogonalizer="polar_express",
    )
    for got, want in zip(matrices_of(p.double(), ref_kind), matrices_of(ref.params[0], ref_kind)):
        rows, cols = got.shape
        bound = STEPS * LR * update_scale(scale, rows, cols) * (delta + 2e-3)
        err = torch.linalg.matrix_norm(got - want, ord=2).item()
        assert err <= bound, (err, bound)


@pytest.mark.parametrize("kind", TABLE_KINDS)
@pytest.mark.parametrize("method", ["polar_express", "keller_jordan", "you", "gram"])
def test_ns_muon_matches_reference_with_exact_polynomial(method, kind):
    """Tighter: the reference orthogonalizes with the schedule's own polynomial applied exactly to
    the singular values (U p(S/(s||U||_F)) V^T), so only fp32 round-off separates the two runs:
    per step <= lr*scale*2e-3 (FP32_SLACK of test_orthogonalize) plus fp32 parameter rounding."""
    shape, ref_kind = KINDS[kind]
    poly = "polar_express" if method == "gram" else method
    p = init_param(shape, dtype=torch.float32)
    grads = grads_for(shape, dtype=torch.float32)
    ref = ReferenceMuon(
        [p], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1, scale="moonlight",
        kinds=[ref_kind], orthogonalizer=lambda U: ns_spectral(U, poly),
    )
    for g in grads:
        ref.step([g])
    run_muonkit(
        [p], [grads], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
        scale="moonlight", orthogonalizer=method,
    )
    rows, cols = matrices_of(p, ref_kind)[0].shape
    bound = STEPS * LR * update_scale("moonlight", rows, cols) * 2e-3 + 1e-6
    err = (p.double() - ref.params[0]).abs().max().item()
    assert err <= bound, (err, bound)


def test_callable_orthogonalizer_is_used():
    """orthogonalizer=callable(X, steps) -> X: plugging the reference polar factor in reproduces
    the svd table (float64, same 1e-10 tolerance)."""
    calls = []

    def exact(X, steps):
        calls.append(steps)
        return polar_factor(X).to(X.dtype)

    shapes = [(5, 12), (6, 3, 2, 2), (3, 7, 4)]
    params = [init_param(s, seed=i) for i, s in enumerate(shapes)]
    grads = [grads_for(s, seed=10 + i) for i, s in enumerate(shapes)]
    ref = ReferenceMuon(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                        scale="mup")
    for t in range(STEPS):
        ref.step([g[t] for g in grads])
    run_muonkit(params, grads, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                scale="mup", orthogonalizer=exact, ns_steps=7, ns_dtype=torch.float64)
    assert calls and all(s == 7 for s in calls)
    for p, want in zip(params, ref.params):
        assert (p - want).abs().max().item() <= 1e-10


def test_per_group_options_override_constructor():
    """Group dicts carry their own lr, momentum, nesterov, weight_decay, scale, rms; missing keys
    come from the constructor. float64 + svd, tolerance as in the table (1e-10)."""
    a = init_param((5, 12), seed=3)
    b = init_param((12, 5), seed=4)
    c = init_param((6, 3, 2, 2), seed=5)
    ga, gb, gc = grads_for(a.shape, seed=6), grads_for(b.shape, seed=7), grads_for(c.shape, seed=8)
    opt_kw = dict(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1, scale="moonlight",
                  orthogonalizer="svd", ns_dtype=torch.float64)
    groups = [
        {"params": [a]},
        {"params": [b], "lr": 0.02, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0,
         "scale": "keller_jordan"},
        {"params": [c], "scale": "moonlight", "rms": 0.3},
    ]
    refs = [
        ReferenceMuon([a], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                      scale="moonlight"),
        ReferenceMuon([b], lr=0.02, momentum=0.5, nesterov=False, weight_decay=0.0,
                      scale="keller_jordan"),
        ReferenceMuon([c], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                      scale="moonlight", rms=0.3),
    ]
    for t in range(STEPS):
        for r, g in zip(refs, (ga, gb, gc)):
            r.step([g[t]])
    run_muonkit(groups, [ga, gb, gc], **opt_kw)
    for p, r in zip((a, b, c), refs):
        assert (p - r.params[0]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("scale", ["keller_jordan", "mup"])
def test_layout_conv_on_3d(scale):
    """layout="conv" makes a 3D Conv1d weight (out, in, k) one out x (in*k) matrix, with its scale
    from that flattened shape (the layout-sensitive scales tell the two views apart)."""
    shape = (7, 2, 3)
    p = init_param(shape)
    grads = grads_for(shape)
    ref = ReferenceMuon([p], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                        scale=scale, kinds=["conv"])
    for g in grads:
        ref.step([g])
    run_muonkit([p], [grads], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                scale=scale, orthogonalizer="svd", ns_dtype=torch.float64, layout="conv")
    assert (p - ref.params[0]).abs().max().item() <= 1e-10


@pytest.mark.parametrize(
    "layout_kw,ref_kind",
    [
        (dict(rows=(1,), cols=(2,), batch=(0,)), ((1,), (2,), (0,))),  # == stacked
        (dict(rows=(2,), cols=(1,), batch=(0,)), ((2,), (1,), (0,))),  # stacked, transposed
        (dict(rows=(0,), cols=(1, 2), batch=()), ((0,), (1, 2), ())),  # == conv
        (dict(rows=(1, 2), cols=(0,), batch=()), ((1, 2), (0,), ())),  # conv, transposed
    ],
    ids=["stacked", "stacked_T", "conv", "conv_T"],
)
def test_explicit_layout(layout_kw, ref_kind):
    """muonkit.Layout names the tensor axes of rows, cols and batch. keller_jordan's scale
    sqrt(max(1, rows/cols)) is layout-sensitive, so a transposed view must change the result."""
    shape = (3, 8, 4)
    p = init_param(shape)
    grads = grads_for(shape)
    ref = ReferenceMuon([p], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                        scale="keller_jordan", kinds=[ref_kind])
    for g in grads:
        ref.step([g])
    run_muonkit([p], [grads], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                scale="keller_jordan", orthogonalizer="svd", ns_dtype=torch.float64,
                layout=muonkit.Layout(**layout_kw))
    assert (p - ref.params[0]).abs().max().item() <= 1e-10


def test_default_layout_of_3d_is_stacked():
    shape, _ = KINDS["conv1d"]
    p = init_param(shape)
    grads = grads_for(shape)
    ref = ReferenceMuon([p], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                        scale="mup", kinds=["stacked"])
    for g in grads:
        ref.step([g])
    run_muonkit([p], [grads], lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                scale="mup", orthogonalizer="svd", ns_dtype=torch.float64)
    assert (p - ref.params[0]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rows,cols", [(4, 16), (16, 4), (9, 9), (1, 5), (3, 1)])
def test_update_scale_function(scale, rows, cols):
    """muonkit.update_scale(scale, rows, cols, rms) equals docs/references.md section 2 (1e-12: float
    round-off of a square root)."""
    want = update_scale(scale, rows, cols, 0.2)
    assert math.isclose(muonkit.update_scale(scale, rows, cols, 0.2), want, rel_tol=1e-12)
    if scale == "moonlight":
        assert math.isclose(muonkit.update_scale(scale, rows, cols, 0.5),
                            update_scale(scale, rows, cols, 0.5), rel_tol=1e-12)


def test_multiple_params_and_kinds_in_one_group():
    """One group mixing every kind: each parameter follows its own reference (1e-10)."""
    names = TABLE_KINDS
    params = [init_param(KINDS[k][0], seed=20 + i) for i, k in enumerate(names)]
    grads = [grads_for(KINDS[k][0], seed=30 + i) for i, k in enumerate(names)]
    ref = ReferenceMuon(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                        scale="moonlight", kinds=[KINDS[k][1] for k in names])
    for t in range(STEPS):
        ref.step([g[t] for g in grads])
    run_muonkit(params, grads, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.1,
                scale="moonlight", orthogonalizer="svd", ns_dtype=torch.float64)
    for p, want in zip(params, ref.params):
        assert (p - want).abs().max().item() <= 1e-10


def test_state_is_one_momentum_buffer_per_param():
    """API.md state keys: Muon keeps `momentum_buffer`, equal to the EMA of the gradients."""
    shape = (5, 12)
    p = init_param(shape)
    grads = grads_for(shape)
    opt = run_muonkit([p], [grads], lr=LR, momentum=MOMENTUM, orthogonalizer="svd",
                      ns_dtype=torch.float64)
    state = opt.state[p]
    assert set(state) == {"momentum_buffer"}
    want = torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        want = MOMENTUM * want + (1 - MOMENTUM) * g
    assert torch.allclose(state["momentum_buffer"], want, rtol=0, atol=1e-12)
    assert not math.isnan(p.sum().item())


def test_named_params_equal_plain_params():
    """An iterable of (name, tensor) is accepted and behaves exactly like the tensors alone."""
    shapes = [(5, 12), (6, 3, 2, 2)]
    plain = [init_param(s, seed=40 + i, dtype=torch.float32) for i, s in enumerate(shapes)]
    named = [p.clone() for p in plain]
    grads = [grads_for(s, seed=50 + i, dtype=torch.float32) for i, s in enumerate(shapes)]
    run_muonkit(plain, grads, lr=LR)
    opt = muonkit.Muon([("a.weight", named[0]), ("b.weight", named[1])], lr=LR)
    for t in range(STEPS):
        for p, g in zip(named, grads):
            p.grad = g[t].clone()
        opt.step()
    for a, b in zip(plain, named):
        assert torch.equal(a, b)


def test_default_ns_dtype_is_float32_on_cpu():
    """API.md: ns_dtype None means float32 on CPU (bit-for-bit the same run)."""
    shape = (5, 12)
    a = init_param(shape, dtype=torch.float32)
    b = a.clone()
    grads = grads_for(shape, dtype=torch.float32)
    run_muonkit([a], [grads], lr=LR, orthogonalizer="polar_express")
    run_muonkit([b], [grads], lr=LR, orthogonalizer="polar_express", ns_dtype=torch.float32)
    assert torch.equal(a, b)


@given(
    shape=st.sampled_from([(1, 7), (7, 1), (3, 3), (4, 9), (9, 4), (5, 2, 2), (2, 3, 4),
                           (3, 2, 1, 2), (2, 1, 3, 3, 1)]),
    scale=st.sampled_from(SCALES),
    nesterov=st.booleans(),
    momentum=st.floats(0.0, 0.99),
    weight_decay=st.floats(0.0, 1.0),
    lr=st.floats(1e-4, 0.2),
    seed=st.integers(0, 2**16),
)
def test_property_svd_muon_matches_reference(shape, scale, nesterov, momentum, weight_decay, lr,
                                             seed):
    """Random shapes (2D, stacked 3D, conv 4D/5D) and hyperparameters: float64 + svd against the
    reference, 3 steps, tolerance 1e-10 as in the table."""
    p = init_param(shape, seed=seed)
    grads = grads_for(shape, steps=3, seed=seed + 1)
    ref = ReferenceMuon([p], lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, scale=scale)
    for g in grads:
        ref.step([g])
    run_muonkit([p], [grads], lr=lr, momentum=momentum, nesterov=nesterov,
                weight_decay=weight_decay, scale=scale, orthogonalizer="svd",
                ns_dtype=torch.float64)
    assert (p - ref.params[0]).abs().max().item() <= 1e-10
