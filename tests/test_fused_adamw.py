"""AdamW groups with fused=True: torch's fused AdamW kernel, bit for bit torch.optim.AdamW(fused=True).

Checked: the bits against torch (float32 and bfloat16 parameters, weight decay, tensor lr, an lr
scheduler, capturable), the values against a float64 AdamW written here, the refusals (each before
anything changes), state_dict round trips and loading a torch.optim.AdamW(fused=True) state dict.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import muonkit

SHAPES = [(), (7,), (4, 5), (2, 3, 4)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def grads_for(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g) * 10.0 ** (step % 3 - 1)).to(dtype) for s in SHAPES]


def run(ours, ours_p, theirs, theirs_p, steps, dtype=torch.float32, schedulers=(), first=0):
    for t in range(first, first + steps):
        for p, q, g in zip(ours_p, theirs_p, grads_for(t, dtype)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for s in schedulers:
            s.step()


def assert_same(ours, ours_p, theirs, theirs_p):
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q)
        s, t = ours.state[p], theirs.state[q]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], t[key]), key
            assert s[key].dtype == t[key].dtype and s[key].device == t[key].device, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor", "scheduler"])
def test_fused_group_is_torch_fused_adamw_bit_for_bit(dtype, lr_kind):
    """6 steps, weight decay 0.1, with a Muon group in the same optimizer: params and state equal."""
    lr = torch.tensor(3e-3) if lr_kind == "tensor" else 3e-3
    ours_p, theirs_p = make_params(dtype), make_params(dtype)
    muon_w = torch.randn(6, 10)
    ours = muonkit.Muon([{"params": [muon_w]}, {"params": ours_p, "use_muon": False, "lr": lr, "betas": (0.9, 0.95)}],
                        weight_decay=0.1, fused=True, stochastic_rounding=False)
    theirs = torch.optim.AdamW(theirs_p, lr=copy.deepcopy(lr), betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    schedulers = []
    if lr_kind == "scheduler":
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (ours, theirs)]
    muon_w.grad = torch.randn(6, 10)
    run(ours, ours_p, theirs, theirs_p, 6, dtype, schedulers)
    assert_same(ours, ours_p, theirs, theirs_p)
    assert ours.param_groups[1]["fused"] is True
    assert ours.param_groups[1]["lr"] == theirs.param_groups[0]["lr"]


def test_fused_with_capturable_is_torch_fused_capturable_adamw_bit_for_bit():
    ours_p, theirs_p = make_params(), make_params()
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False, "lr": torch.tensor(1e-2)}], weight_decay=0.1,
                        fused=True, capturable=True)
    theirs = torch.optim.AdamW(theirs_p, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True, capturable=True)
    run(ours, ours_p, theirs, theirs_p, 4)
    assert_same(ours, ours_p, theirs, theirs_p)


def reference_adamw(params, steps, lr, betas, eps, weight_decay):
    """AdamW (Loshchilov and Hutter, decoupled decay) in float64."""
    beta1, beta2 = betas
    ws = [p.double().clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for w, m, v, g in zip(ws, ms, vs, grads_for(t)):
            g = g.double()
            w.mul_(1 - lr * weight_decay)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1 ** (t + 1))
            v_hat = v / (1 - beta2 ** (t + 1))
            w.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return ws


def test_fused_group_is_adamw_within_round_off_of_a_float64_reference_and_of_the_default():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    fused_p, default_p = make_params(), make_params()
    fused = muonkit.Muon([{"params": fused_p, "use_muon": False, **kw, "fused": True}])
    default = muonkit.Muon([{"params": default_p, "use_muon": False, **kw}])
    assert default.param_groups[0]["fused"] is None
    run(fused, fused_p, default, default_p, 8)
    for p, q, w in zip(fused_p, default_p, reference_adamw(make_params(), 8, **kw)):
        torch.testing.assert_close(p.double(), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)  # differs from the default by round-off only


def test_constructor_fused_is_the_adamw_groups_default_and_a_group_may_set_its_own():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = muonkit.Muon(muonkit.param_groups(model, adamw=["3.weight"], adamw_options={"fused": True}))
    adamw = [g for g in opt.param_groups if not g["use_muon"]]
    assert adamw and all(g["fused"] is True for g in adamw)
    assert all("fused" not in g for g in opt.param_groups if g["use_muon"])
    opt = muonkit.Muon([{"params": [torch.zeros(3)], "use_muon": False},
                        {"params": [torch.zeros(2)], "use_muon": False, "fused": False}], fused=True)
    assert [g["fused"] for g in opt.param_groups] == [True, False]
    assert muonkit.Muon([torch.zeros(3, 3)]).defaults["fused"] is None


@pytest.mark.parametrize("value", ["yes", 1, torch.tensor(True)], ids=["str", "int", "tensor"])
def test_fused_not_a_bool_or_none_is_refused(value):
    with pytest.raises(TypeError, match=r"Muon \(adamw_\* arguments\): fused must be None, True or False"):
        muonkit.Muon([torch.zeros(3, 3)], fused=value)
    opt = muonkit.Muon([torch.zeros(3, 3)])
    with pytest.raises(TypeError, match=r"AdamW group 1: fused must be None, True or False, got 'yes'|AdamW group 1"):
        opt.add_param_group({"params": [torch.zeros(3)], "use_muon": False, "fused": value})
    assert len(opt.param_groups) == 1


def test_fused_in_a_muon_group_is_refused():
    with pytest.raises(ValueError, match=r"Muon group 0: fused=True is not an option of a Muon group.*AdamW groups"):
        muonkit.Muon([{"params": [torch.zeros(3, 3)], "fused": True}])


@pytest.mark.parametrize(
    "group,dtype,match",
    [
        ({"cautious_weight_decay": True}, torch.float32, r"AdamW group 0: fused=True with cautious_weight_decay=True"),
        ({"stochastic_rounding": True}, torch.bfloat16,
         r"AdamW group 0: parameter '#1' is torch.bfloat16 and the group rounds it stochastically"),
        ({"stochastic_rounding": False, "state_dtype": torch.float32}, torch.bfloat16,
         r"AdamW group 0: parameter '#1' is torch.bfloat16 with state_dtype=torch.float32"),
        ({"state_dtype": torch.float64}, torch.float32,
         r"AdamW group 0: parameter '#0' is torch.float32 with state_dtype=torch.float64"),
    ],
    ids=["cautious", "stochastic_rounding", "wider_state_bf16", "wider_state_fp32"],
)
def test_fused_refuses_what_the_kernel_cannot_do_exactly(group, dtype, match):
    params = [torch.zeros(3), torch.zeros(4, dtype=dtype)]
    with pytest.raises(ValueError, match=match):
        muonkit.Muon([{"params": params, "use_muon": False, "fused": True, **group}])


def test_fused_refuses_a_device_without_torch_s_fused_kernel():
    with pytest.raises(ValueError, match=r"AdamW group 0: parameter '#0' is on meta, where muonkit does not run torch's fused AdamW kernel \(fused=True needs one of cpu, cuda"):
        muonkit.Muon([{"params": [torch.zeros(3, device="meta")], "use_muon": False, "fused": True}])


def test_fused_switched_on_in_param_groups_is_refused_at_the_step_with_nothing_changed():
    p = torch.ones(4, dtype=torch.bfloat16)
    opt = muonkit.Muon([{"params": [p], "use_muon": False}], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    before, state = p.clone(), copy.deepcopy(opt.state[p])
    opt.param_groups[0]["fused"] = True
    with pytest.raises(ValueError, match=r"AdamW group 0: parameter '#0' is torch.bfloat16 and the group rounds"):
        opt.step()
    assert torch.equal(p, before)
    assert all(torch.equal(state[k], opt.state[p][k]) for k in state)


def test_fused_state_dict_round_trip_continues_bit_for_bit():
    a_p, b_p = make_params(), make_params()
    a = muonkit.Muon([{"params": a_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=True)
    b = muonkit.Muon([{"params": b_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=True)
    run(a, a_p, b, b_p, 3)
    saved = a.state_dict()
    assert saved["param_groups"][0]["fused"] is True
    c_p = [p.detach().clone() for p in a_p]
    c = muonkit.Muon([{"params": c_p, "use_muon": False}], lr=1e-2, weight_decay=0.1)  # built with fused=None
    c.load_state_dict(saved)
    assert c.param_groups[0]["fused"] is True  # the saved option, as torch.optim loads it
    run(c, c_p, b, b_p, 3, first=3)
    assert_same(c, c_p, b, b_p)


def test_torch_fused_adamw_state_dict_loads_and_continues_bit_for_bit():
    theirs_p, ours_p = make_params(), make_params()
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, weight_decay=0.1, fused=True)
    ref_p = make_params()
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, fused=True)
    run(theirs, theirs_p, ref, ref_p, 3)
    ours_p = [p.detach().clone() for p in theirs_p]
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False}], lr=5.0, weight_decay=0.0)
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["fused"] is True and group["lr"] == 1e-2 and "foreach" not in group and "capturable" not in group
    run(ours, ours_p, ref, ref_p, 3, first=3)
    assert_same(ours, ours_p, ref, ref_p)


def test_torch_fused_state_dict_of_bf16_params_is_refused_with_stochastic_rounding():
    theirs_p = make_params(torch.bfloat16)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, fused=True)
    for p in theirs_p:
        p.grad = torch.ones_like(p)
    theirs.step()
    ours_p = [p.detach().clone() for p in theirs_p]
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False}], lr=1e-2)  # stochastic_rounding=True
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"load_state_dict: AdamW group 0: parameter .* rounds it stochastically"):
        ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["fused"] is None
    assert ours.state_dict()["param_groups"] == before["param_groups"]


def test_fused_group_records_diagnostics():
    p = torch.randn(5)
    opt = muonkit.Muon([{"params": [p], "use_muon": False, "fused": True}], diagnostics=True)
    p.grad = torch.randn(5)
    opt.step()
    (stats,) = opt.last_stats.values()
    assert stats["update_rms"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capturable", [False, True])
def test_fused_group_on_cuda_is_torch_fused_adamw_bit_for_bit(capturable):
    """On CUDA (torch's main fused kernel): bits, and the step counts on the device as torch keeps them."""
    ours_p = [p.cuda() for p in make_params(torch.bfloat16)]
    theirs_p = [p.clone() for p in ours_p]
    lr = torch.tensor(1e-2, device="cuda")
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False, "lr": lr.clone()}], weight_decay=0.1, fused=True,
                        stochastic_rounding=False, capturable=capturable)
    theirs = torch.optim.AdamW(theirs_p, lr=lr.clone(), weight_decay=0.1, fused=True, capturable=capturable)
    for t in range(4):
        for p, q, g in zip(ours_p, theirs_p, grads_for(t, torch.bfloat16)):
            p.grad, q.grad = g.cuda(), g.cuda()
        ours.step()
        theirs.step()
    assert_same(ours, ours_p, theirs, theirs_p)
    assert ours.state[ours_p[0]]["step"].device.type == "cuda"
