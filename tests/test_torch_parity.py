"""muonkit.Muon against torch.optim.Muon (2D matrices) and torch.optim.AdamW (use_muon=False).

AdamW groups: on CPU by default (fused=None) torch.optim.AdamW(fused=True) bit for bit, with
fused=False torch.optim.AdamW() (its single-tensor loop and its foreach implementation) bit for bit.

torch.optim.Muon runs Keller Jordan's Newton-Schulz in bfloat16 and normalizes by
norm().clamp(min=eps); its adjust_lr_fn "original" is muonkit's scale "keller_jordan" and
"match_rms_adamw" is "moonlight". Gradients are a fixed sequence (open loop), so differences come
only from the orthogonalization arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

import muonkit
from reference import state_is_pristine

ADJUST_TO_SCALE = {"original": "keller_jordan", "match_rms_adamw": "moonlight"}
SHAPES = [(16, 48), (48, 16), (24, 24), (1, 20), (20, 1)]
STEPS = 5
LR = 0.05


def fixed_run(shape, seed=0, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    W0 = 0.5 * torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * 10.0 ** (t % 3 - 1) for t in range(steps)]
    return W0, grads


def step_both(opt_a, a, opt_b, b, grads):
    for g in grads:
        a.grad = g.clone()
        b.grad = g.clone()
        opt_a.step()
        opt_b.step()


def muon_pair(shape, adjust, nesterov, ns_dtype, seed=0):
    W0, grads = fixed_run(shape, seed)
    a, b = W0.clone(), W0.clone()
    kw = dict(lr=LR, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    theirs = torch.optim.Muon([a], adjust_lr_fn=adjust, **kw)
    ours = muonkit.Muon([b], scale=ADJUST_TO_SCALE[adjust], orthogonalizer="keller_jordan",
                        ns_dtype=ns_dtype, **kw)
    step_both(theirs, a, ours, b, grads)
    rows, cols = shape
    scale = {"original": math.sqrt(max(1, rows / cols)),
             "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols))}[adjust]
    # sum over steps of lr * scale * ||O_t||_F, with ||O||_F <= 1.21 sqrt(min(m, n)) (the
    # keller_jordan schedule's largest output singular value is 1.2024).
    budget = STEPS * LR * scale * 1.21 * math.sqrt(min(rows, cols))
    return a, b, budget


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_muon_fp32_vs_bf16(shape, adjust, nesterov):
    """muonkit in fp32 (ns_dtype=torch.float32; the default is bf16 on CPUs with native bf16) vs torch in bf16.

    Tolerance: ||W_ours - W_torch||_F <= 5% of the total update budget sum_t lr*scale*||O_t||_F.
    bf16 keeps 8 significant bits (unit round-off 2^-9 = 0.2%); 5 iterations round the iterate,
    X X^T, the polynomial and the product (~20 roundings on the path, each propagated by a
    polynomial of slope ~1 near the fixed band) give ~4%; measured <= 2.5% (1 x N worst).
    """
    a, b, budget = muon_pair(shape, adjust, nesterov, ns_dtype=torch.float32)
    err = torch.linalg.matrix_norm(a - b).item()
    assert err <= 0.05 * budget, (err, budget)


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_muon_bf16_vs_bf16(shape, adjust, nesterov):
    """Both in bf16: the same iteration in the same precision, so only op order (fused addmm,
    where the normalization divides) differs; 0.2% of the budget is one bf16 unit round-off
    (2^-9) and does not compound. (Measured: bit-for-bit equal.)"""
    a, b, budget = muon_pair(shape, adjust, nesterov, ns_dtype=torch.bfloat16)
    err = torch.linalg.matrix_norm(a - b).item()
    assert err <= 2.0**-9 * budget, (err, budget)


def test_torch_muon_nesterov_false_buffer_not_modified_by_us():
    """docs/references.md section 3: torch normalizes a bf16 momentum buffer in place when nesterov=False. muonkit
    must not: after a step with a bf16 parameter the buffer is the plain EMA (1-beta)*G."""
    W = torch.randn(6, 10).bfloat16()
    G = torch.randn(6, 10).bfloat16()
    opt = muonkit.Muon([W], lr=LR, momentum=0.9, nesterov=False, weight_decay=0.0,
                       orthogonalizer="keller_jordan")
    W.grad = G.clone()
    opt.step()
    buf = opt.state[W]["momentum_buffer"]
    assert torch.allclose(buf.double(), 0.1 * G.double(), rtol=2.0**-7, atol=0)  # bf16 rounding


# ---- AdamW groups ---------------------------------------------------------------------------

ADAMW_SHAPES = [(), (7,), (4, 5), (2, 3, 4), (3, 2, 2, 2)]


def adamw_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in ADAMW_SHAPES]


def adamw_grads(seed, steps):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in ADAMW_SHAPES] for _ in range(steps)]


# muonkit's AdamW-group fused option -> the torch.optim.AdamW implementation it equals bit for bit on CPU.
KERNELS = {
    "default": (None, dict(fused=True)),
    "fused_false_single_tensor": (False, dict(foreach=False)),
    "fused_false_foreach": (False, dict(foreach=True)),
}


@pytest.mark.parametrize(
    "group_kw,ctor_kw,torch_kw",
    [
        (dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), {},
         dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
        (dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0), {},
         dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)),
        # Missing keys are filled from the constructor: adamw_lr None -> lr,
        # adamw_weight_decay None -> weight_decay.
        ({}, dict(lr=2e-3, weight_decay=0.05, adamw_betas=(0.85, 0.98), adamw_eps=1e-7),
         dict(lr=2e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)),
        ({}, dict(lr=0.02, weight_decay=0.05, adamw_lr=4e-3, adamw_weight_decay=0.01),
         dict(lr=4e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
    ],
    ids=["explicit", "explicit_no_wd", "from_ctor", "adamw_lr_wd"],
)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_adamw_group_is_torch_adamw_bit_for_bit(group_kw, ctor_kw, torch_kw, kernel):
    """AdamW groups are exactly torch.optim.AdamW: by default torch's fused kernel
    (torch.optim.AdamW(fused=True)); with fused=False its single-tensor loop (torch's CPU default)
    and its foreach implementation (muonkit's then): torch.equal on params and state, 6 steps, with
    a Muon group sharing the optimizer."""
    fused, implementation = KERNELS[kernel]
    ours_p, theirs_p = adamw_params(), adamw_params()
    muon_w = torch.randn(6, 10)
    ours = muonkit.Muon(
        [{"params": [muon_w]}, {"params": ours_p, "use_muon": False, **group_kw}], **ctor_kw, fused=fused
    )
    theirs = torch.optim.AdamW(theirs_p, **torch_kw, **implementation)
    for grads in adamw_grads(1, 6):
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        muon_w.grad = torch.randn(6, 10)
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q)
        s, t = ours.state[p], theirs.state[q]
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        assert s["step"].dtype == torch.float32 and s["step"].ndim == 0
        assert torch.equal(s["step"], t["step"])
        assert torch.equal(s["exp_avg"], t["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,), (torch.float16,), (torch.float16, torch.float32, torch.float64)],
                         ids=["bfloat16", "float16", "mixed"])
@pytest.mark.parametrize("kernel", ["default", "fused_false_single_tensor"])
def test_adamw_group_of_16_bit_parameters_in_their_own_dtype_is_torch_adamw_bit_for_bit(dtypes, kernel):
    """With round-to-nearest and state in the parameters' dtype, 16-bit and mixed groups step in
    torch's arithmetic: by default its fused kernel, with fused=False its CPU default loop (its
    foreach kernels round 16-bit tensors differently)."""
    fused, implementation = KERNELS[kernel]
    ours_p = [p.to(dtypes[i % len(dtypes)]) for i, p in enumerate(adamw_params())]
    theirs_p = [p.clone() for p in ours_p]
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, stochastic_rounding=False,
                        fused=fused)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, weight_decay=0.1, **implementation)
    for grads in adamw_grads(1, 6):
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q), p.dtype
        assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("kernel", ["default", "fused_false_single_tensor"])
def test_adamw_group_with_tensor_betas_is_torch_adamw_bit_for_bit(kernel):
    fused, implementation = KERNELS[kernel]
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    ours_p, theirs_p = adamw_params(), adamw_params()
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False, "betas": betas}], lr=1e-2, weight_decay=0.1, fused=fused)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, weight_decay=0.1, betas=betas, **implementation)
    for grads in adamw_grads(2, 4):
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kernel", ["default", "fused_false_foreach"])
def test_adamw_only_optimizer_skips_params_without_grad_like_torch(kernel):
    fused, implementation = KERNELS[kernel]
    ours_p, theirs_p = adamw_params(2), adamw_params(2)
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=fused)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, weight_decay=0.1, **implementation)
    for grads in adamw_grads(3, 4):
        for i, (p, q, g) in enumerate(zip(ours_p, theirs_p, grads)):
            if i == 1:
                continue  # never gets a gradient: no decay, no state on either side
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q)
    assert state_is_pristine(ours.state.get(ours_p[1], {}))
