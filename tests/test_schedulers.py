"""torch LR schedulers drive both kinds of group of one muonkit.Muon.

The scheduled lr must (1) keep the Muon/AdamW lr ratio of the groups, and (2) actually be the lr
each group's update uses: the Muon group is compared with ReferenceMuon fed the same per-step lr
(float64, svd, tolerance 1e-10 as in test_optimizer_reference), the AdamW group with
torch.optim.AdamW under the same scheduler, bit-for-bit.
"""

from __future__ import annotations

import math

import pytest
import torch

import muonkit
from reference import ReferenceMuon

MUON_LR, ADAMW_LR = 0.04, 0.004
STEPS = 8


def make_schedulers(kind, opt):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t // 2))
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    if kind == "onecycle":
        max_lr = [MUON_LR if g.get("use_muon", True) else ADAMW_LR for g in opt.param_groups]
        # cycle_momentum=False: OneCycleLR would cycle one momentum key for all groups.
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=STEPS,
                                                   cycle_momentum=False)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["lambda", "cosine", "onecycle"])
def test_scheduler_drives_both_groups(kind):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    C = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    b_ours = torch.randn(10, generator=g)
    b_theirs = b_ours.clone()
    muon_grads = [(torch.randn(6, 10, generator=g, dtype=torch.float64),
                   torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64))
                  for _ in range(STEPS)]
    adamw_grads = [torch.randn(10, generator=g) for _ in range(STEPS)]

    ref = ReferenceMuon([W, C], lr=MUON_LR, momentum=0.9, nesterov=True, weight_decay=0.1,
                        scale="moonlight")
    opt = muonkit.Muon(
        [{"params": [W, C]}, {"params": [b_ours], "use_muon": False, "lr": ADAMW_LR}],
        lr=MUON_LR, momentum=0.9, nesterov=True, weight_decay=0.1, scale="moonlight",
        orthogonalizer="svd", ns_dtype=torch.float64,
    )
    adamw = torch.optim.AdamW([b_theirs], lr=ADAMW_LR, weight_decay=0.1, fused=True)  # muonkit's default on CPU
    sched = make_schedulers(kind, opt)
    sched_adamw = make_schedulers(kind, adamw) if kind != "onecycle" else (
        torch.optim.lr_scheduler.OneCycleLR(adamw, max_lr=ADAMW_LR, total_steps=STEPS,
                                            cycle_momentum=False))
    seen = []
    for t in range(STEPS):
        lr_muon, lr_adamw = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        seen.append(lr_muon)
        assert math.isclose(lr_muon / lr_adamw, MUON_LR / ADAMW_LR, rel_tol=1e-9), t
        assert lr_adamw == adamw.param_groups[0]["lr"]
        W.grad, C.grad = (x.clone() for x in muon_grads[t])
        b_ours.grad = adamw_grads[t].clone()
        b_theirs.grad = adamw_grads[t].clone()
        ref.step(muon_grads[t], lr=lr_muon)
        opt.step()
        adamw.step()
        sched.step()
        sched_adamw.step()
    assert len(set(seen)) > 2  # the schedule did change the lr
    assert (W - ref.params[0]).abs().max().item() <= 1e-10
    assert (C - ref.params[1]).abs().max().item() <= 1e-10
    assert torch.equal(b_ours, b_theirs)


def test_zero_lr_freezes_both_groups():
    """A schedule at lr 0 moves nothing: the update and the decoupled decay (lr*wd) are both 0."""
    W = torch.randn(6, 10)
    b = torch.randn(10)
    W0, b0 = W.clone(), b.clone()
    opt = muonkit.Muon([{"params": [W]}, {"params": [b], "use_muon": False}], lr=0.02,
                       weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0)
    for _ in range(3):
        W.grad = torch.randn(6, 10)
        b.grad = torch.randn(10)
        opt.step()
        sched.step()
    assert torch.equal(W, W0) and torch.equal(b, b0)


# Defects found in other Muon implementations (the peers of docs/references.md section 10); each
# test names the peer and the defect it guards against, so that muonkit never has it.


def test_lr_ratio_kept_under_a_scheduler():
    # peer 004 (Optimisers.jl): adjusting the lr must keep the Muon/AdamW ratio.
    w = torch.randn(8, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    opt = muonkit.Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=0.02, adamw_lr=0.002)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        w.grad, b.grad = torch.randn(8, 8), torch.randn(8)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(10.0)
