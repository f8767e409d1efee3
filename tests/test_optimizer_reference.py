"""muonkit.Muon against the slow float64 reference (tests/reference.py: ReferenceMuon).

Gradients are a fixed sequence given to both sides (open loop), so the two runs see the same
momentum and differ only through the orthogonalizer and round-off; that makes every tolerance
below a bound that can be argued, not a measured number.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hypothesis import given
from hypothesis import strategies as st

import muonkit
from muonkit.layout import Layout, resolve, to_matrices
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


def test_default_ns_dtype_is_the_machines(machine_ns_dtype):
    """API.md: ns_dtype None means default_ns_dtype(device) (bfloat16 on CPUs with native bf16
    products, float32 on others; bit-for-bit the same run); each branch: test_orthogonalize.py."""
    shape = (5, 12)
    a = init_param(shape, dtype=torch.float32)
    b = a.clone()
    grads = grads_for(shape, dtype=torch.float32)
    run_muonkit([a], [grads], lr=LR, orthogonalizer="polar_express")
    run_muonkit([b], [grads], lr=LR, orthogonalizer="polar_express", ns_dtype=machine_ns_dtype)
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


# From an adversarial review of the variants, low-precision writes, diagnostics and layouts against
# docs/API.md; each test failed before its fix.


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


# Defects found in other Muon implementations (the peers of docs/references.md section 10); each
# test names the peer and the defect it guards against, so that muonkit never has it.


def _polar64(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


def _one_step_update(p: torch.Tensor, g: torch.Tensor, **options) -> torch.Tensor:
    """The change muonkit makes to p in one step with lr=1, no decay, no momentum."""
    p = p.clone().requires_grad_()
    p.grad = g.clone()
    opt = muonkit.Muon([p], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                       orthogonalizer="svd", **options)
    before = p.detach().clone()
    opt.step()
    return p.detach() - before


def test_conv_scale_uses_flattened_matrix_shape():
    # torch.optim.Muon's _adjust_lr reads shape[:2] = (out, in) of a conv filter; the matrix that
    # is orthogonalized is out x (in*kh*kw), and the scale must come from that shape.
    g = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    delta = _one_step_update(torch.zeros_like(g), g, scale="keller_jordan")
    rows, cols = 8, 4 * 9
    expected = -math.sqrt(max(1, rows / cols)) * _polar64(g.reshape(rows, cols)).reshape(g.shape)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)
    # With torch's reading (8 x 4) the scale would be sqrt(2); it must be 1 here.
    assert math.sqrt(max(1, rows / cols)) == 1.0


def test_momentum_buffer_not_normalized_in_place_without_nesterov():
    # torch 2.13's Muon normalizes its bf16 momentum buffer in place when nesterov=False.
    p = torch.zeros(16, 32, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(16, 32).to(torch.bfloat16) * 10
    p.grad = g.clone()
    opt = muonkit.Muon([p], lr=0.1, momentum=0.9, nesterov=False, ns_dtype=torch.bfloat16)
    opt.step()
    expected = torch.zeros_like(g).lerp_(g, 0.1)
    assert torch.equal(opt.state[p]["momentum_buffer"], expected)


@pytest.mark.parametrize("nesterov", [True, False])
def test_grad_never_modified(nesterov):
    # The seed notebook's muon_update does grad.lerp_(momentum, beta): it overwrites p.grad.
    p = torch.randn(12, 20, requires_grad=True)
    g = torch.randn(12, 20)
    p.grad = g.clone()
    opt = muonkit.Muon([p], nesterov=nesterov)
    opt.step()
    opt.step()
    assert torch.equal(p.grad, g)


def test_param_without_grad_is_not_decayed_or_moved():
    # The seed notebook replaces a missing grad with zeros, so unused weights still decay.
    used = torch.randn(8, 8, requires_grad=True)
    unused = torch.randn(8, 8, requires_grad=True)
    before = unused.detach().clone()
    used.grad = torch.randn(8, 8)
    opt = muonkit.Muon([used, unused], weight_decay=0.5, lr=0.1)
    opt.step()
    assert torch.equal(unused.detach(), before)
    assert torch.count_nonzero(opt.state[unused]["momentum_buffer"]) == 0


def test_stacked_experts_are_orthogonalized_one_by_one():
    # peer 001 flattens any 3D tensor to (dim0, rest), mixing experts into one matrix, and
    # normalizes by the norm of the whole stack.
    g = torch.randn(4, 6, 10, dtype=torch.float64)
    g[0] *= 100.0  # one loud expert must not drown the others
    delta = _one_step_update(torch.zeros_like(g), g, scale="naive")
    for e in range(4):
        torch.testing.assert_close(delta[e], -_polar64(g[e]), rtol=1e-9, atol=1e-12)


def test_stacked_experts_scale_from_each_matrix():
    g = torch.randn(3, 6, 10, dtype=torch.float64)
    delta = _one_step_update(torch.zeros_like(g), g, scale="moonlight", rms=0.2)
    expected = -0.2 * math.sqrt(10) * torch.stack([_polar64(m) for m in g])
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)


def test_layout_is_declared_not_guessed_from_shape():
    # Keras discussion (peer 002): "keller_jordan" and "mup" depend on which side is fan_out, so
    # a tensor stored (in, out) must be declared; muonkit never swaps sides on its own.
    w_in_out = torch.randn(10, 40, dtype=torch.float64)  # stored (in=10, out=40)
    transposed = muonkit.Layout(rows=(1,), cols=(0,))
    delta = _one_step_update(torch.zeros_like(w_in_out), w_in_out, scale="mup", layout=transposed)
    expected = -math.sqrt(40 / 10) * _polar64(w_in_out)
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12)
    view = to_matrices(w_in_out, resolve(transposed, 2))
    assert view.shape == (1, 40, 10)


def test_conv1d_filter_is_one_matrix_when_declared_conv():
    # A Conv1d filter (out, in, k) is 3D; read as "stacked" it would be `out` matrices of in x k.
    conv = nn.Conv1d(6, 8, 3)
    groups = muonkit.param_groups(nn.Sequential(nn.Linear(4, 6), conv, nn.Linear(8, 2)))
    conv_group = next(g for g in groups if g["use_muon"] and conv.weight in g["params"])
    assert conv_group["layout"] == "conv"


@pytest.mark.parametrize("layout, shape", [
    (resolve(None, 2), (6, 4)), (resolve(None, 3), (2, 6, 4)), (resolve(None, 4), (6, 2, 3, 3)),
    (Layout(rows=(2,), cols=(1,), batch=(0,)), (2, 4, 6)), (Layout.per_block(3), (6, 4)),
    (Layout.per_block(2, ndim=4), (6, 2, 3, 3)),
])
def test_memoized_matrix_views_equal_the_plain_ones(monkeypatch, layout, shape):
    # The step reads each (layout, shape)'s view from a memo (muonkit.layout._known_view); the
    # views, their strides and the way back must be those computed without it.
    import muonkit.layout as layout_module

    t = torch.randn(shape)
    monkeypatch.setattr(layout_module, "_known_view", lambda layout, shape: None)
    plain = (to_matrices(t, layout), layout_module.matrix_shape(t.shape, layout))
    back = layout_module.from_matrices(plain[0].clone(), layout, t.shape)
    monkeypatch.undo()
    for _ in range(2):  # the first call fills the memo, the second reads it
        m = to_matrices(t, layout)
        assert torch.equal(m, plain[0]) and m.stride() == plain[0].stride()
        assert layout_module.matrix_shape(t.shape, layout) == plain[1]
        assert torch.equal(layout_module.from_matrices(m.clone(), layout, t.shape), back)
    assert torch.equal(back, t)
    assert resolve(None, len(shape)) is resolve(None, len(shape))  # one frozen Layout per named view
