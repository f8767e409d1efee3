"""muonkit.orthogonalize against float64 oracles (tests/reference.py).

Contract (docs/API.md): batched over leading dims, same shape and dtype out as in, never modifies
its input, zero in -> zero out, steps=None means 5. Each Newton-Schulz schedule must map the
normalized singular values sigma/||X||_F of its band to the image docs/references.md section 3 gives;
"svd" is the exact polar factor; "gram" is algebraically the same iteration as polar_express.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import muonkit
from reference import (
    ns_spectral,
    polar_factor,
    scalar_image,
    schedule,
    spectral_response,
)

NS_METHODS = ["keller_jordan", "polar_express", "you"]
ALL_METHODS = ["polar_express", "keller_jordan", "you", "gram", "svd"]
# The cheaper schedules of issue 22 item 3; their oracles are at the end of this file. The contracts
# that need no band (shape, dtype, zeros, batching, scale, input untouched) run over CONTRACT_METHODS.
CHEAP = ["cubic5", "aol"]
CONTRACT_METHODS = ALL_METHODS + CHEAP

# Band of each schedule: (lowest normalized input sigma/||X||_F the band is stated for,
# the image of [lo, 1] stated in docs/references.md section 3).
BAND_INPUT_LO = {"keller_jordan": 1e-3, "polar_express": 1e-3, "you": 1e-2, "gram": 1e-3}
STATED_BANDS = {
    "keller_jordan": (0.47, 1.21),
    "polar_express": (0.85, 1.14),
    "you": (0.978, 1.032),
}

# fp32 round-off (eps 6e-8, matrices <= 16 wide, so ~1e-6 per step) amplified through 5 steps by
# at most the product of the leading coefficients (~1.2e3 for polar_express): <= 2e-3.
FP32_SLACK = 2e-3
# Reading the stated bands off docs/references.md to 2-3 digits.
STATED_SLACK = 5e-3

SHAPES = [(1, 8), (8, 1), (6, 6), (4, 16), (16, 4), (3, 2, 5, 9)]
CONDITIONING = ["random", "lowrank_noise", "decay_1e-6"]


def make_matrix(shape, conditioning, seed=0, dtype=torch.float32):
    """A test matrix (batched over leading dims) built in float64, then cast."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    if conditioning == "random":
        X = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    elif conditioning == "lowrank_noise":
        r = max(1, k // 3)
        A = torch.randn(*batch, m, r, generator=g, dtype=torch.float64)
        B = torch.randn(*batch, r, n, generator=g, dtype=torch.float64)
        X = A @ B + 1e-3 * torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    elif conditioning == "decay_1e-6":
        U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
        S = torch.from_numpy(np.geomspace(1.0, 1e-6, k)).expand(*batch, k)
        X = (U * S.unsqueeze(-2)) @ V.mT
    else:
        raise KeyError(conditioning)
    return X.to(dtype)


def global_sup(method):
    """Largest output a schedule gives for any normalized input in (0, 1].

    For "you" this is 1.145, above the 1.032 edge of its [1e-2, 1] band: inputs below 1e-2 can
    overshoot, so "nothing exceeds the upper edge" is checked against this supremum.
    """
    return scalar_image(method, 1e-9)[1]


def test_band_oracle_matches_reference_md():
    """The bands computed from the coefficients agree with the numbers docs/references.md states."""
    for method, (lo, hi) in STATED_BANDS.items():
        got_lo, got_hi = scalar_image(method, BAND_INPUT_LO[method])
        assert abs(got_lo - lo) < 0.01 and abs(got_hi - hi) < 0.01, (method, got_lo, got_hi)


def check_band(G, O, method, slack):
    """Directions with sigma/||X||_F >= the band's lower input edge land in the band; no output
    singular value exceeds the schedule's supremum (or the band's top if every input is in band)."""
    lo_in = BAND_INPUT_LO[method]
    lo_out, hi_out = scalar_image(method, lo_in)
    x, d = spectral_response(G, O)
    in_band = x >= lo_in
    assert in_band.any()
    d_in = d[in_band]
    assert d_in.min().item() >= lo_out - slack, (method, d_in.min().item(), lo_out)
    assert d_in.max().item() <= hi_out + slack, (method, d_in.max().item(), hi_out)
    top = hi_out if bool(in_band.all()) else global_sup(method)
    sv = torch.linalg.svdvals(O.to(torch.float64))
    assert sv.max().item() <= top + slack, (method, sv.max().item(), top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("conditioning", CONDITIONING)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", NS_METHODS + ["gram"])
def test_singular_values_in_band(method, shape, conditioning, dtype):
    G = make_matrix(shape, conditioning, seed=1, dtype=dtype)
    O = muonkit.orthogonalize(G, method)
    assert O.shape == G.shape and O.dtype == G.dtype
    assert torch.isfinite(O).all()
    band_method = "polar_express" if method == "gram" else method
    check_band(G, O, band_method, FP32_SLACK)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", NS_METHODS + ["gram"])
def test_bfloat16_input_with_fp32_compute(method, shape):
    """bf16 in -> bf16 out. Computing in fp32, the only extra error is rounding the output to bf16:
    relative 2^-9 per entry, so ||E||_2 <= ||E||_F <= 2^-9 * 1.21 * sqrt(min(m, n))."""
    G = make_matrix(shape, "random", seed=2, dtype=torch.bfloat16)
    O = muonkit.orthogonalize(G, method, dtype=torch.float32)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    slack = 2.0**-9 * 1.21 * math.sqrt(min(shape[-2:])) + FP32_SLACK
    band_method = "polar_express" if method == "gram" else method
    check_band(G, O, band_method, slack)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bfloat16_input_default_dtype(method):
    """dtype=None leaves the compute dtype to the implementation (it may iterate in bf16, whose
    8-bit mantissa leaves errors of a few percent after 5 steps): check dtype, shape, finiteness
    and a band widened by 0.1."""
    G = make_matrix((6, 10), "random", seed=3, dtype=torch.bfloat16)
    O = muonkit.orthogonalize(G, method)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    assert torch.isfinite(O).all()
    if method == "svd":
        assert (O.double() - polar_factor(G)).abs().max().item() < 0.05  # bf16 output rounding
    else:
        check_band(G, O, "polar_express" if method == "gram" else method, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7), (2, 3, 4, 8)], ids=str)
@pytest.mark.parametrize("method", NS_METHODS)
def test_matches_exact_polynomial_image(method, shape, dtype):
    """Tighter than the band: the output equals U p(S/(s ||X||_F + eps)) V^T, the schedule's composed
    polynomial applied exactly to the singular values (float64 SVD oracle). Tolerance: fp32 as
    in FP32_SLACK; with float64 compute, 1e-10 (float64 round-off through five steps whose
    coefficients reach ~22)."""
    G = make_matrix(shape, "random", seed=4, dtype=dtype)
    O = muonkit.orthogonalize(G, method, dtype=dtype)
    expected = ns_spectral(G, method)
    tol = FP32_SLACK if dtype == torch.float32 else 1e-10
    err = (O.to(torch.float64) - expected).abs().max().item()
    assert err <= tol, (method, err)


def polar_tolerance(G, eps):
    """First-order bound on the polar factor's round-off: ||dO|| <~ 2 ||dG|| / (s_k + s_{k-1})
    for the two smallest singular values; ||dG|| ~ 100 eps ||G|| covers the SVD's backward error
    for the sizes used here."""
    S = torch.linalg.svdvals(G.to(torch.float64))
    smin = S[..., -1]
    if S.shape[-1] > 1:
        smin = (S[..., -1] + S[..., -2]) / 2
    return (100 * eps * S[..., 0] / smin).max().item()


@pytest.mark.parametrize(
    "conditioning,dtype",
    [
        ("random", torch.float32),
        ("lowrank_noise", torch.float32),
        ("random", torch.float64),
        ("lowrank_noise", torch.float64),
        ("decay_1e-6", torch.float64),
    ],
    ids=["random-fp32", "lowrank-fp32", "random-fp64", "lowrank-fp64", "decay-fp64"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_svd_is_exact_polar_factor(shape, conditioning, dtype):
    G = make_matrix(shape, conditioning, seed=5, dtype=dtype)
    O = muonkit.orthogonalize(G, "svd")
    assert O.dtype == dtype and O.shape == G.shape
    tol = max(polar_tolerance(G, torch.finfo(dtype).eps), 4 * torch.finfo(dtype).eps)
    err = (O.to(torch.float64) - polar_factor(G)).abs().max().item()
    assert err <= tol, (err, tol)


def test_svd_of_rank_deficient_matrix_is_partial_isometry():
    """Exact zeros of a rank-2 float64 product map to zero (the polar factor of a rank-deficient
    matrix is U_r V_r^T), not to unit singular values picked from round-off."""
    g = torch.Generator().manual_seed(6)
    G = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 9, generator=g, dtype=torch.float64
    )
    O = muonkit.orthogonalize(G, "svd")
    sv = torch.linalg.svdvals(O)
    assert torch.allclose(sv[:2], torch.ones(2, dtype=torch.float64), atol=1e-10)
    assert sv[2:].max().item() < 1e-6  # round-off singular values of G are ~1e-15 ||G||
    assert (O - polar_factor(G)).abs().max().item() < 1e-8


def test_gram_equals_polar_express_in_float64():
    """Gram NS is algebraically the same iteration: in float64 the two agree to round-off
    (1e-9: ~1e-13 per step amplified like FP32_SLACK)."""
    for shape in [(4, 16), (16, 4), (6, 6), (2, 3, 5, 12)]:
        G = make_matrix(shape, "random", seed=7, dtype=torch.float64)
        a = muonkit.orthogonalize(G, "gram", dtype=torch.float64)
        b = muonkit.orthogonalize(G, "polar_express", dtype=torch.float64)
        assert (a - b).abs().max().item() < 1e-9, shape


@pytest.mark.parametrize("conditioning", ["random", "lowrank_noise"])
@pytest.mark.parametrize("shape", [(4, 16), (16, 4), (6, 6), (8, 24), (2, 3, 5, 12)], ids=str)
def test_gram_equals_polar_express_in_float32(shape, conditioning):
    """In fp32 they differ only by round-off: docs/references.md measured ~1e-5; both are within
    FP32_SLACK of the exact image, so 2 * FP32_SLACK bounds the difference."""
    G = make_matrix(shape, conditioning, seed=8)
    a = muonkit.orthogonalize(G, "gram")
    b = muonkit.orthogonalize(G, "polar_express")
    assert (a - b).abs().max().item() <= 2 * FP32_SLACK


@pytest.mark.parametrize("method", CONTRACT_METHODS)
@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 4), (3, 4, 6)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_zero_input_gives_zero_output(method, shape, dtype):
    G = torch.zeros(shape, dtype=dtype)
    O = muonkit.orthogonalize(G, method)
    assert O.shape == G.shape and O.dtype == dtype
    assert not torch.isnan(O).any()
    assert torch.count_nonzero(O) == 0


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_zero_matrix_inside_a_batch(method):
    """Each batch element is normalized on its own: a zero member stays zero and does not
    disturb its neighbours."""
    G = make_matrix((3, 5, 8), "random", seed=9)
    G[1] = 0
    O = muonkit.orthogonalize(G, method)
    assert torch.isfinite(O).all()
    assert torch.count_nonzero(O[1]) == 0
    for i in (0, 2):
        solo = muonkit.orthogonalize(G[i], method)
        assert (O[i] - solo).abs().max().item() <= 1e-5  # fp32 batched-vs-single GEMM round-off


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_batched_equals_per_matrix_with_different_norms(method):
    """Norms 1e-3 .. 1e3 in one batch: if the normalization were global the small ones would
    fall out of the band. Tolerance: fp32 round-off of batched vs single GEMMs (1e-5)."""
    G = make_matrix((4, 6, 9), "random", seed=10)
    G = G * torch.tensor([1e-3, 1.0, 1e2, 1e3]).view(4, 1, 1)
    O = muonkit.orthogonalize(G, method)
    for i in range(4):
        solo = muonkit.orthogonalize(G[i].clone(), method)
        assert (O[i] - solo).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("method", CONTRACT_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_input_never_modified(method, dtype):
    for G in [
        make_matrix((6, 10), "random", seed=11, dtype=dtype),
        make_matrix((10, 6), "random", seed=12, dtype=dtype),
        make_matrix((2, 10, 6), "random", seed=13, dtype=dtype).mT,  # non-contiguous view
    ]:
        before = G.clone()
        muonkit.orthogonalize(G, method)
        assert torch.equal(G, before)


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_default_steps_is_five(method):
    G = make_matrix((6, 10), "random", seed=14)
    assert torch.equal(muonkit.orthogonalize(G, method), muonkit.orthogonalize(G, method, 5))


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8), (2, 5, 9)], ids=str)
def test_more_polar_express_steps_keep_converging(shape):
    """Steps 6.. continue with (1.875, -1.25, 0.375), which converges cubically to 1: after 8
    steps every direction above the 1e-3 edge is within fp32 round-off of 1, and closer to the
    polar factor than after 5 steps."""
    G = make_matrix(shape, "random", seed=15)
    x, _ = spectral_response(G, G)
    assert x.min().item() >= 1e-3  # all directions in band, so the polar factor is the target
    P = polar_factor(G)
    err = {}
    for steps in (5, 8):
        O = muonkit.orthogonalize(G, "polar_express", steps)
        err[steps] = torch.linalg.matrix_norm(O.double() - P, ord=2).max().item()
    assert err[8] < err[5]
    assert err[8] <= FP32_SLACK
    assert err[5] <= 0.16  # the band's distance from 1


@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_transpose_equivariance(method):
    """orth(X^T) = orth(X)^T (tall inputs are transposed inside); fp32 round-off 1e-5."""
    G = make_matrix((2, 5, 11), "random", seed=16)
    a = muonkit.orthogonalize(G.mT.contiguous(), method)
    b = muonkit.orthogonalize(G, method).mT
    assert (a - b).abs().max().item() <= 1e-5


# ---- property tests ------------------------------------------------------------------------

shapes = st.tuples(
    st.sampled_from([(), (2,), (2, 3)]),
    st.integers(1, 12),
    st.integers(1, 12),
).map(lambda t: (*t[0], t[1], t[2]))


@given(
    method=st.sampled_from(ALL_METHODS),
    shape=shapes,
    log_scale=st.floats(-2.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_scales(method, shape, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(shape, generator=g) * 10.0**log_scale
    before = G.clone()
    O = muonkit.orthogonalize(G, method)
    assert torch.equal(G, before)
    assert O.shape == G.shape and O.dtype == G.dtype
    assert torch.isfinite(O).all()
    sv = torch.linalg.svdvals(O.double())
    if method == "svd":
        assert sv.max().item() <= 1 + 1e-5  # a partial isometry, up to fp32 round-off
        return
    band_method = "polar_express" if method == "gram" else method
    check_band(G, O, band_method, FP32_SLACK)


@given(
    method=st.sampled_from(ALL_METHODS),
    shape=shapes,
    log_scale=st.floats(-2.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_scale_invariance(method, shape, log_scale, seed):
    """orth(c X) = orth(X): the normalization divides out c. Tolerance 2e-3: the normalization's
    eps (<= 1e-6) is relative <= 1e-4 at ||cX||_F >= 1e-2, times |x p'(x)| <= ~3, plus fp32
    round-off (FP32_SLACK); for svd the polar factor is scale-free up to conditioning, so only
    well-conditioned draws (sigma_min/sigma_max >= 1e-2) are compared there."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(shape, generator=g)
    if method == "svd":
        S = torch.linalg.svdvals(G.double())
        if (S[..., -1] / S[..., 0]).min().item() < 1e-2:
            return
    a = muonkit.orthogonalize(G * 10.0**log_scale, method)
    b = muonkit.orthogonalize(G, method)
    assert (a - b).abs().max().item() <= 2e-3


def test_svd_with_bfloat16_compute_dtype():
    """torch has no bf16 SVD: dtype=torch.bfloat16 with "svd" must either compute in a dtype that
    has one (output within bf16 rounding, 0.05, of the polar factor) or raise a ValueError naming
    the combination - not torch's NotImplementedError."""
    G = make_matrix((6, 10), "random", seed=17)
    try:
        O = muonkit.orthogonalize(G, "svd", dtype=torch.bfloat16)
    except ValueError as e:
        assert "svd" in str(e) and "bfloat16" in str(e)
        return
    assert O.dtype == G.dtype
    assert (O.double() - polar_factor(G)).abs().max().item() < 0.05


@pytest.mark.parametrize("method,eps", [("polar_express", 1e-6), ("keller_jordan", 1e-7), ("you", 1e-7)])
def test_normalization_eps_is_the_schedules_own(method, eps):
    """Y / (||Y||_F * s + eps) for Y = X / 2^floor(log2 max|x|), with docs/references.md section 3's eps
    per schedule (Polar Express 1e-6): a float64 iteration written here with that eps is the
    oracle to 1e-12, and the other schedules' eps would miss it by more than 1e-9 (so the eps is
    seen)."""
    safety = {"polar_express": 1.02, "keller_jordan": 1.0, "you": 1.0}[method]
    G = make_matrix((16, 32), "random", seed=7, dtype=torch.float64) * 1e-6 / 16

    def oracle(eps):
        Y = G / 2.0 ** math.floor(math.log2(G.abs().max().item()))
        X = Y / (torch.linalg.matrix_norm(Y) * safety + eps)
        for a, b, c in schedule(method):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X

    O = muonkit.orthogonalize(G, method, dtype=torch.float64)
    assert (O - oracle(eps)).abs().max().item() < 1e-12
    other = 1e-7 if eps == 1e-6 else 1e-6
    assert (O - oracle(other)).abs().max().item() > 1e-9


# ---- every finite input (issue 11, item 5) ---------------------------------------------------

NS_AND_GRAM = NS_METHODS + ["gram"]


@pytest.mark.parametrize("exponent", [66, 100, -100], ids=lambda k: f"2^{k}")
@pytest.mark.parametrize("method", CONTRACT_METHODS)
def test_scaling_by_a_power_of_two_changes_no_bit(method, exponent):
    """The polar factor does not depend on scale, and a power of two scales exactly: the output
    for 2^k G is the output for G, bit for bit. 2^66 G has entries near 1e20 and ||G||_F = inf in
    float32 (a Frobenius-only normalization gives zeros); at 2^-100 a normalization eps of 1e-6
    would swamp ||G||_F ~ 1e-29."""
    G = make_matrix((2, 16, 32), "random", seed=20)
    scaled = G * 2.0**exponent
    assert torch.isfinite(scaled).all() and torch.equal(scaled * 2.0**-exponent, G)
    assert torch.equal(muonkit.orthogonalize(scaled, method), muonkit.orthogonalize(G, method))


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30, 1e-40], ids=str)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_huge_and_tiny_inputs_against_the_oracle(method, scale):
    """float32 inputs near 1e20, 1e30, 1e-30 and subnormal ones (1e-40, 23 bits fewer): the
    oracles are computed in float64 from the very values the kernel gets, so subnormal rounding
    of the input is not counted against it; tolerance FP32_SLACK (svd: its fp32 round-off)."""
    G = (make_matrix((3, 12, 20), "random", seed=21, dtype=torch.float64) * scale).float()
    assert torch.isfinite(G).all() and G.abs().max() > 0
    O = muonkit.orthogonalize(G, method)
    assert torch.isfinite(O).all()
    if method == "svd":
        assert (O.double() - polar_factor(G)).abs().max().item() <= 1e-5
        in_fp32 = muonkit.orthogonalize(G, "svd", dtype=torch.float32)  # LAPACK's own scaling
        assert (in_fp32.double() - polar_factor(G)).abs().max().item() <= 1e-5
    else:
        expected = ns_spectral(G, "polar_express" if method == "gram" else method)
        assert (O.double() - expected).abs().max().item() <= FP32_SLACK


@pytest.mark.parametrize("method", NS_AND_GRAM)
def test_stacked_paths_take_huge_and_tiny_inputs(method):
    """The stacked paths (functional.batched_orthogonalize, orthogonalize_ on an empty_work buffer)
    normalize each matrix by its own largest entry: a huge, a tiny and an ordinary matrix in one
    stack each give their polar factor, bit for bit what orthogonalize gives each alone."""
    from muonkit import functional
    from muonkit.orthogonalize import empty_work, orthogonalize_

    base = make_matrix((3, 24, 40), "random", seed=22, dtype=torch.float64)
    G = (base * torch.tensor([1e20, 1e-30, 1.0], dtype=torch.float64).view(3, 1, 1)).float()
    stacked = functional.batched_orthogonalize([G[i : i + 1] for i in range(3)], method=method, steps=5, dtype=None)
    X = empty_work(3, 24, 40, dtype=torch.float32)
    X.copy_(G)
    in_place = orthogonalize_(X, method)
    expected = ns_spectral(G, "polar_express" if method == "gram" else method)
    for i in range(3):
        alone = muonkit.orthogonalize(G[i], method)
        assert torch.equal(stacked[i][0], alone) and torch.equal(in_place[i], alone)
        assert (alone.double() - expected[i]).abs().max().item() <= FP32_SLACK


# ---- what orthogonalize accepts (issue 11, item 6) -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("method", CONTRACT_METHODS + ["callable"])
def test_integer_bool_and_complex_inputs_are_refused(method, dtype):
    G = torch.ones(4, 6, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        muonkit.orthogonalize(G, (lambda X, steps: X) if method == "callable" else method)


def test_non_tensor_input_is_refused():
    with pytest.raises(TypeError, match="tensor"):
        muonkit.orthogonalize(np.ones((4, 6), dtype=np.float32))


@pytest.mark.parametrize("dtype", [torch.int32, "bf16", 16, torch.complex64], ids=str)
def test_bad_working_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="dtype"):
        muonkit.orthogonalize(torch.randn(4, 6), dtype=dtype)


@pytest.mark.parametrize("method", CONTRACT_METHODS + ["callable"])
def test_requires_grad_input_is_orthogonalized_without_autograd(method):
    """One behaviour for every method (docs/API.md): orthogonalize runs without autograd, as an
    optimizer step does; the output is the one for the same values without requires_grad, does
    not require grad, and nothing reaches G.grad."""
    def own(X, steps):
        return X / torch.linalg.matrix_norm(X, keepdim=True)

    chosen = own if method == "callable" else method
    plain = make_matrix((2, 6, 10), "random", seed=23)
    G = plain.clone().requires_grad_()
    with torch.enable_grad():
        O = muonkit.orthogonalize(G, chosen)
    assert not O.requires_grad and O.grad_fn is None
    assert torch.equal(O, muonkit.orthogonalize(plain, chosen))
    assert G.grad is None


# ---- the working dtype -------------------------------------------------------------------------


CPUINFO = "processor\t: {n}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: fpu sse2 avx2 {flags}\n\n"


@pytest.mark.parametrize("vendor, flags, fast, says", [
    ("AuthenticAMD", "avx512f avx512_bf16", True, "AMD with AVX512_BF16"),
    ("GenuineIntel", "avx512f avx512_bf16 avx512_fp16", False, "1.6-2.0x slower"),
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", True, "AMX-BF16"),
    ("AuthenticAMD", "avx512f", False, "50-100x slower"),
    ("GenuineIntel", "", False, "50-100x slower"),
    ("", "", False, "50-100x slower"),
], ids=["amd-avx512bf16", "intel-avx512bf16-no-amx", "intel-amx", "amd-avx512-no-bf16", "intel-avx2", "empty"])
def test_bfloat16_speed_follows_the_measured_cpu_classes(vendor, flags, fast, says):
    """bf16 is the CPU default only where it was measured faster than float32: AMX, or AVX512_BF16 on
    AMD (0.34-0.43x); an Intel CPU exposing avx512_bf16 without AMX measured 1.6-2.0x slower."""
    from muonkit.orthogonalize import bfloat16_speed_from_cpuinfo

    text = "".join(CPUINFO.format(n=n, vendor=vendor, family=25 if vendor == "AuthenticAMD" else 6, flags=flags)
                   for n in range(2))
    got, why = bfloat16_speed_from_cpuinfo(text)
    assert got is fast and says in why, (got, why)


def test_cpu_fast_bfloat16_reads_this_cpu(machine_ns_dtype):
    """This machine's answer is the rule above applied to its /proc/cpuinfo (and oneDNN in torch)."""
    from muonkit.orthogonalize import CPU_BFLOAT16_REASON, bfloat16_speed_from_cpuinfo, cpu_has_fast_bfloat16

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    expected, reason = bfloat16_speed_from_cpuinfo(text)
    expected = expected and torch.backends.mkldnn.is_available()
    assert cpu_has_fast_bfloat16() is expected
    assert machine_ns_dtype == (torch.bfloat16 if expected else torch.float32)
    if torch.backends.mkldnn.is_available():
        assert CPU_BFLOAT16_REASON == reason


@pytest.mark.parametrize("fast", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_default_ns_dtype_follows_the_machine(monkeypatch, fast):
    """Issue 22 item 1: the default (None, and its alias "auto") is bfloat16 on CUDA and on a CPU
    with native bf16 products, float32 on other CPUs; float64 input stays float64; an explicit
    dtype wins."""
    kernels = importlib.import_module("muonkit.orthogonalize")  # the module, not the function
    monkeypatch.setattr(kernels, "CPU_FAST_BFLOAT16", fast)
    cpu = torch.bfloat16 if fast else torch.float32
    assert kernels.default_ns_dtype("cpu") == cpu
    assert kernels.default_ns_dtype(torch.device("cpu")) == cpu
    assert kernels.default_ns_dtype("cuda") == torch.bfloat16
    assert kernels.default_ns_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert kernels.default_ns_dtype("meta") == torch.float32
    x32, x64 = torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64)
    for default in (None, "auto"):
        assert kernels.working_dtype(x32, default) == cpu
        assert kernels.working_dtype(x32.bfloat16(), default) == cpu
        assert kernels.working_dtype(x64, default) == torch.float64
    assert kernels.working_dtype(x32, torch.float32) == torch.float32
    assert kernels.working_dtype(x64, torch.float32) == torch.float32
    assert kernels.working_dtype(x32, torch.float64) == torch.float64
    G = make_matrix((6, 10), "random", seed=24)
    for default in (None, "auto"):
        assert torch.equal(muonkit.orthogonalize(G, dtype=default), muonkit.orthogonalize(G, dtype=cpu))
        assert torch.equal(muonkit.orthogonalize(G, "svd", dtype=default), muonkit.orthogonalize(G, "svd"))
    # float32 on request, also where bfloat16 is the default: bits of a float32 run, not of a bf16 one.
    f32 = muonkit.orthogonalize(G, dtype=torch.float32)
    bf16 = muonkit.orthogonalize(G, dtype=torch.bfloat16)
    assert not torch.equal(f32, bf16)
    assert torch.equal(muonkit.orthogonalize(G), bf16 if fast else f32)


@pytest.mark.parametrize("fast", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_muon_default_step_runs_in_the_machine_default(monkeypatch, fast):
    """The optimizer's default step is the step at default_ns_dtype's dtype; ns_dtype=torch.float32
    gives the float32 step on every machine; float64 parameters step in float64."""
    kernels = importlib.import_module("muonkit.orthogonalize")
    monkeypatch.setattr(kernels, "CPU_FAST_BFLOAT16", fast)

    def step(dtype, *args):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 8 * 16, dtype=dtype).reshape(8, 16))
        w.grad = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
        muonkit.Muon([w], lr=0.02, **dict(args)).step()
        return w.detach()

    chosen = torch.bfloat16 if fast else torch.float32
    default = step(torch.float32)
    assert torch.equal(default, step(torch.float32, ("ns_dtype", "auto")))
    assert torch.equal(default, step(torch.float32, ("ns_dtype", chosen)))
    other = torch.float32 if fast else torch.bfloat16
    assert not torch.equal(default, step(torch.float32, ("ns_dtype", other)))
    assert torch.equal(step(torch.float64), step(torch.float64, ("ns_dtype", torch.float64)))
    assert not torch.equal(step(torch.float64), step(torch.float64, ("ns_dtype", torch.float32)))


@pytest.mark.filterwarnings("ignore:muonkit. Sequential")
@pytest.mark.parametrize("fast", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_explain_says_which_ns_dtype_and_why(monkeypatch, fast):
    kernels = importlib.import_module("muonkit.orthogonalize")
    monkeypatch.setattr(kernels, "CPU_FAST_BFLOAT16", fast)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    text = muonkit.explain(model, file=None)
    if fast:
        assert "Newton-Schulz runs in bfloat16 on cpu by default" in text and "natively" in text
    else:
        assert "Newton-Schulz runs in float32 on cpu by default" in text and "slower" in text
    # The other choice is named, not the one already made (a float32 machine was told
    # "ns_dtype=torch.float32 gives float32").
    assert ("ns_dtype=torch.float32 gives float32" in text) == fast
    assert ("ns_dtype=torch.bfloat16" in text) != fast
    assert "CUDA multiplies bfloat16 natively" in kernels.default_ns_dtype_reason("cuda")
    assert "bfloat16 on cuda" in kernels.default_ns_dtype_reason("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_ns_dtype_on_a_cuda_tensor():
    x = torch.randn(8, 16, device="cuda")
    kernels = importlib.import_module("muonkit.orthogonalize")
    assert kernels.working_dtype(x, None) == torch.bfloat16
    assert kernels.working_dtype(x.double(), None) == torch.float64
    assert kernels.working_dtype(x, torch.float32) == torch.float32


def test_muon_takes_ns_dtype_auto():
    w = torch.nn.Parameter(torch.randn(8, 16))
    w.grad = torch.randn(8, 16)
    muonkit.Muon([w], lr=0.02, ns_dtype="auto").step()
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="ns_dtype"):
        muonkit.Muon([w], ns_dtype="fast")


# ---- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 12), (64, 96)], ids=str)
@pytest.mark.parametrize("dtype", [None, "auto"], ids=str)
def test_orthogonalize_compiles_without_graph_breaks(shape, dtype):
    """Issue 13: reading a buffer's address (alignment check of the small-matrix path) broke the
    graph; so did detecting bf16 support. torch._dynamo.explain counts the breaks."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(muonkit.orthogonalize)(torch.randn(shape), dtype=dtype)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


# ---- cheaper schedules: cubic5, AOL / Turbo-Muon, Polar Express with 4 steps (issue 22, item 3) -----

# Turbo-Muon's 4 steps (arXiv:2512.04632; the authors' code runs the last k of You's 5 tuned steps).
TURBO_MUON_4 = [(3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


def relaxed_cubic(lower=7e-3, upper=1.3, steps=5):
    """arXiv:2606.00371's relaxed cubic, written here from its closed form: each step is the classic
    cubic 1.5 y - 0.5 y^3 at y = alpha x, scaled to peak at `upper`, alpha = (mean of x^2 over the
    current band [l, r])^(-1/2); the band's lower edge moves to p(l), its upper edge to `upper`."""
    out, low, high = [], lower, 1.0
    for _ in range(steps):
        alpha = 1.0 / math.sqrt((high * high + high * low + low * low) / 3.0)
        a, b = 1.5 * upper * alpha, -0.5 * upper * alpha**3
        out.append((a, b, 0.0))
        low, high = a * low + b * low**3, upper
    return out


def cheap_oracle(G, method, steps):
    """What exact arithmetic gives, in float64: the wide orientation divided by the power of two at
    its largest entry; then "cubic5" divides by ||X||_F + 1e-7 and "aol" multiplies row i by
    max(sum_j |X X^T|_ij, 1e-7)^(-1/2); then the schedule's polynomial on the singular values of
    that matrix (its own SVD), transposed back."""
    X = G.detach().to(torch.float64)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    peak = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(peak > 0, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))
    if method == "aol":
        s = (X @ X.mT).abs().sum(dim=-1).clamp_min(1e-7).rsqrt()
        X = s.unsqueeze(-1) * X
        coefficients = TURBO_MUON_4[4 - steps :]
    else:
        X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
        coefficients = relaxed_cubic()[:steps]
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    for a, b, c in coefficients:
        S = a * S + b * S**3 + c * S**5
    O = (U * S.unsqueeze(-2)) @ Vh
    return O.mT if tall else O


def relative_distance(O, reference):
    """Largest over the batch of ||O - reference||_F / ||reference||_F, in float64."""
    O, reference = O.to(torch.float64), reference.to(torch.float64)
    return (torch.linalg.matrix_norm(O - reference) / torch.linalg.matrix_norm(reference)).max().item()


def logspaced_spectrum(shape, seed):
    """Random singular vectors, singular values log-spaced from 1 to 1e-3 (the band Muon's schedules
    are designed for; benchmarks/gpu_check.py uses the same)."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    return ((U * torch.logspace(0, -3, k, dtype=torch.float64)) @ V.mT).float()


# Tall, wide, square, batched; the last three are large and wide enough for the Gram path
# (uses_gram: m >= 64, n >= 2m), which "cubic5" and "aol" take like the default.
CHEAP_SHAPES = [(6, 10), (10, 6), (7, 7), (2, 3, 4, 8), (64, 160), (160, 64), (3, 64, 192)]


def test_cubic5_is_the_papers_closed_form():
    """SCHEDULES["cubic5"] is the closed form with lower edge 7e-3 and upper edge 1.3 to the last bit,
    and its 5 steps map [7e-3, 1] into [0.77, 1.3] (dense float64 grid), the band docs/references.md
    states; past step 5 the classic cubic (1.5, -0.5) takes the band to 1."""
    from muonkit.orthogonalize import SCHEDULES, coefficient_schedule, cubic5_coefficients

    assert [t[:2] for t in relaxed_cubic()] == cubic5_coefficients() == [t[:2] for t in SCHEDULES["cubic5"][:5]]
    assert all(c == 0.0 for _, _, c in SCHEDULES["cubic5"])
    x = np.geomspace(7e-3, 1.0, 200_001)
    for a, b, _ in relaxed_cubic():
        x = a * x + b * x**3
    assert 0.77 <= x.min() < 0.78 and 1.299 < x.max() <= 1.3 + 1e-12
    for a, b, _ in coefficient_schedule("cubic5", 12)[5:]:
        x = a * x + b * x**3
    assert np.abs(x - 1).max() < 1e-6


def test_aol_schedule_is_turbo_muons():
    """"aol" with k <= 5 steps runs the last k of You's 5 (Turbo-Muon's 4 drop the first); more steps
    continue with the convergent tail (1.875, -1.25, 0.375)."""
    from muonkit.orthogonalize import SCHEDULES, coefficient_schedule

    assert coefficient_schedule("aol", 4) == TURBO_MUON_4
    assert coefficient_schedule("aol", 5) == list(SCHEDULES["you"][:5])
    assert coefficient_schedule("aol", 0) == []
    assert coefficient_schedule("aol", 7) == list(SCHEDULES["you"][:5]) + [(1.875, -1.25, 0.375)] * 2


@pytest.mark.parametrize("conditioning", CONDITIONING)
@pytest.mark.parametrize("shape", CHEAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method,steps", [("cubic5", 5), ("aol", 4), ("cubic5", 3), ("aol", 2)], ids=str)
def test_cheap_schedule_matches_its_float64_oracle_in_float32(method, steps, shape, conditioning):
    """The float32 kernel (standard or Gram) equals the float64 oracle to 1e-4 relative: fp32
    round-off (6e-8, growing ~sqrt(n) per product) amplified through the steps by their slopes
    (<= ~3.4 each); measured <= 3.4e-5 on these cases."""
    G = make_matrix(shape, conditioning, seed=30)
    O = muonkit.orthogonalize(G, method, steps, dtype=torch.float32)
    assert O.shape == G.shape and O.dtype == G.dtype
    assert relative_distance(O, cheap_oracle(G, method, steps)) <= 1e-4


@pytest.mark.parametrize("shape", CHEAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method,steps", [("cubic5", 5), ("aol", 4)], ids=str)
def test_cheap_schedule_matches_its_float64_oracle_in_bfloat16(method, steps, shape):
    """Iterating in bfloat16 (8-bit mantissa, 2^-9 relative per rounding, amplified by the steps'
    slopes): within 0.05 relative of the float64 oracle on random matrices (measured <= 0.028).
    Directions far below the largest (1e-3 and less) are bf16 noise that the schedules lift, so
    ill-conditioned inputs are compared with the polar factor below, not here."""
    G = make_matrix(shape, "random", seed=31)
    for source in (G, G.to(torch.bfloat16)):
        O = muonkit.orthogonalize(source, method, steps, dtype=torch.bfloat16)
        assert O.shape == source.shape and O.dtype == source.dtype
        assert relative_distance(O, cheap_oracle(source, method, steps)) <= 0.05


# Relative distance from the exact polar factor (float64 SVD) on the log-spaced spectrum 1 .. 1e-3:
# the default 5-step Polar Express is at 0.15-0.27 there (measured), the cheaper schedules leave
# more of the small directions short of 1 (measured: polar_express 4 steps 0.35-0.50, cubic5
# 0.43-0.58, aol 4 steps 0.38-0.48, bf16 within 0.01 of fp32). These bounds are what a user gets
# for 12 or 10 products instead of 15; docs/references.md section 3.
POLAR_DISTANCE = {("polar_express", 5): 0.3, ("polar_express", 4): 0.55, ("cubic5", 5): 0.62, ("aol", 4): 0.55}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64), (3, 64, 192), (4, 10, 7), (4, 7, 10)], ids=str)
@pytest.mark.parametrize("method,steps", list(POLAR_DISTANCE), ids=str)
def test_distance_from_the_svd_polar_factor(method, steps, shape, dtype):
    G = logspaced_spectrum(shape, seed=32)
    O = muonkit.orthogonalize(G, method, steps, dtype=dtype)
    assert relative_distance(O, polar_factor(G)) <= POLAR_DISTANCE[(method, steps)]


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (2, 3, 4, 8), (64, 160)], ids=str)
def test_cubic5_band(shape):
    """Every direction with sigma/||X||_F >= 7e-3 lands in cubic5's band [0.77, 1.3] (fp32 slack), and
    no output singular value exceeds 1.3: the cubic peaks at its upper edge."""
    G = logspaced_spectrum(shape, seed=33)
    O = muonkit.orthogonalize(G, "cubic5", dtype=torch.float32)
    x, d = spectral_response(G, O)
    kept = d[x >= 7e-3]
    assert kept.min().item() >= 0.77 - FP32_SLACK and kept.max().item() <= 1.3 + FP32_SLACK
    assert torch.linalg.svdvals(O.double()).max().item() <= 1.3 + FP32_SLACK


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (16, 48), (64, 160), (3, 32, 32)], ids=str)
def test_aol_bounds_the_spectral_norm_more_tightly_than_frobenius(shape):
    """With 0 steps "aol" returns the preconditioned input D X: its spectral norm is at most 1
    (the AOL bound; float32 slack), and on these random matrices larger than that of
    X / ||X||_F, which is what lets Turbo-Muon drop a step."""
    G = make_matrix(shape, "random", seed=34)
    top_aol = torch.linalg.matrix_norm(muonkit.orthogonalize(G, "aol", 0, dtype=torch.float32).double(), ord=2)
    top_fro = torch.linalg.matrix_norm(
        muonkit.orthogonalize(G, "polar_express", 0, dtype=torch.float32).double(), ord=2) * 1.02
    assert top_aol.max().item() <= 1 + 1e-5
    assert (top_aol > top_fro).all()


@pytest.mark.parametrize("method", CHEAP)
def test_gram_path_equals_the_standard_path_in_float64(method):
    """On shapes uses_gram picks, the Gram kernel runs the same polynomial (and the AOL scaling of
    its first Gram matrix): in float64 the two paths agree to round-off."""
    from muonkit.orthogonalize import _gram_newton_schulz_, _newton_schulz_, coefficient_schedule, empty_work
    from muonkit.orthogonalize import _iterate_, uses_gram

    steps = 4 if method == "aol" else 5
    G = make_matrix((2, 64, 160), "random", seed=35, dtype=torch.float64)
    assert uses_gram(64, 160)
    out = []
    for kernel in (_gram_newton_schulz_, _newton_schulz_):
        X = empty_work(2, 64, 160, dtype=torch.float64).copy_(G)
        out.append(_iterate_(X, kernel, coefficient_schedule(method, steps), 1.0, 1e-7, aol=method == "aol").clone())
    assert (out[0] - out[1]).abs().max().item() < 1e-9
    assert torch.equal(muonkit.orthogonalize(G, method, steps), out[0])


@pytest.mark.parametrize("scale", [1e20, 1e-30, 1e-40], ids=str)
@pytest.mark.parametrize("method,steps", [("cubic5", 5), ("aol", 4)], ids=str)
def test_cheap_schedules_take_huge_and_tiny_inputs(method, steps, scale):
    """Each matrix is divided by the power of two at its largest entry first, so inputs near 1e20
    and subnormal ones give the oracle's output (computed from the very values the kernel gets)."""
    G = (make_matrix((3, 12, 20), "random", seed=36, dtype=torch.float64) * scale).float()
    O = muonkit.orthogonalize(G, method, steps, dtype=torch.float32)
    assert torch.isfinite(O).all()
    assert relative_distance(O, cheap_oracle(G, method, steps)) <= 1e-4


@pytest.mark.parametrize("method", CHEAP)
def test_cheap_schedules_stack_bit_for_bit(method):
    """The stacked path the optimizer uses (functional.batched_orthogonalize) gives each matrix the
    bits orthogonalize gives it alone, for small (looped) and Gram-sized matrices."""
    from muonkit import functional

    for shape in [(3, 8, 12), (3, 64, 160)]:
        G = make_matrix(shape, "random", seed=37)
        stacked = functional.batched_orthogonalize([G[i : i + 1] for i in range(3)], method=method, steps=4, dtype=None)
        for i in range(3):
            assert torch.equal(stacked[i][0], muonkit.orthogonalize(G[i], method, 4))


@pytest.mark.parametrize("method", CHEAP)
def test_muon_takes_the_cheap_orthogonalizers(method):
    """Muon(orthogonalizer=...) runs them (Turbo-Muon: ns_steps=4); a name that is not an
    orthogonalizer is a ValueError that names it and lists the choices."""
    W = torch.nn.Parameter(make_matrix((16, 24), "random", seed=38))
    W.grad = make_matrix((16, 24), "random", seed=39)
    before = W.detach().clone()
    muonkit.Muon([W], lr=0.1, orthogonalizer=method, ns_steps=4).step()
    assert not torch.equal(W.detach(), before) and torch.isfinite(W).all()
    with pytest.raises(ValueError, match=r"'cubic'.*cubic5, aol"):
        muonkit.Muon([W], lr=0.1, orthogonalizer="cubic")
    with pytest.raises(ValueError, match=r"'turbo'.*cubic5, aol"):
        muonkit.orthogonalize(W.detach(), "turbo")
