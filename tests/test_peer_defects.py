"""Defects found in other Muon implementations (the peers of docs/references.md section 10), one test each, so that
muonkit never has them. Each test names the peer and the defect it guards against."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import muonkit
from muonkit.layout import resolve, to_matrices


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


def test_orthogonalize_normalizes_each_matrix_of_a_batch_separately():
    # peer 001 divides by x.norm() over the whole batch.
    G = torch.randn(2, 32, 64)
    G[1] *= 1e4
    batched = muonkit.orthogonalize(G)
    alone = torch.stack([muonkit.orthogonalize(G[i]) for i in range(2)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


def test_routing_does_not_use_name_substrings():
    # peer 001 routes by "embed" in the name: a Linear named "embedder_proj" went to AdamW and an
    # nn.Embedding named "tokens" went to Muon.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(100, 32)
            self.embedder_proj = nn.Linear(32, 32)
            self.out = nn.Linear(32, 100)

        def forward(self, x):
            return self.out(self.embedder_proj(self.tokens(x)))

    route = {d.name: d.optimizer for d in muonkit.route(Model())}
    assert route["tokens.weight"] == "adamw"
    assert route["embedder_proj.weight"] == "muon"
    assert route["out.weight"] == "adamw"


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
