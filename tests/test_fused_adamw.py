"""AdamW groups on torch's fused AdamW kernel, bit for bit torch.optim.AdamW(fused=True): with
fused=True, and by default (fused=None) on CPU wherever the kernel applies (muonkit.options.adamw_kernel).

Checked: the bits against torch (float32 and bfloat16 parameters, weight decay, tensor lr, an lr
scheduler, capturable), the values against a float64 AdamW written here, the refusals (each before
anything changes), state_dict round trips and loading a torch.optim.AdamW(fused=True) state dict;
the automatic choice on each branch (the kernel taken; each condition that falls back to the
fused=False path, bit for bit), decided per group over all its parameters, again when a parameter
is appended; a checkpoint of the earlier default path continuing on the kernel; parameters and
gradients laid out otherwise than dense and alike (which torch's CPU kernel gets wrong).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import muonkit
import muonkit.functional
from muonkit.options import adamw_kernel

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


# ---- fused=None: the automatic choice


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of parameters each call of torch's fused AdamW kernel (through muonkit) stepped."""
    calls = []
    fused = muonkit.functional._fused_adamw

    def counted(params, *args, **kwargs):
        calls.append(len(params))
        return fused(params, *args, **kwargs)

    monkeypatch.setattr(muonkit.functional, "_fused_adamw", counted)
    return calls


def test_default_takes_the_fused_kernel_on_cpu_bit_for_bit_torch_fused_and_near_a_float64_reference(kernel_calls):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours_p, theirs_p = make_params(), make_params()
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False, **kw}])
    theirs = torch.optim.AdamW(theirs_p, **kw, fused=True)
    assert ours.param_groups[0]["fused"] is None
    assert adamw_kernel(ours.param_groups[0], False)[0]
    run(ours, ours_p, theirs, theirs_p, 8)
    assert kernel_calls == [len(SHAPES)] * 8
    assert_same(ours, ours_p, theirs, theirs_p)
    for p, w in zip(ours_p, reference_adamw(make_params(), 8, **kw)):
        torch.testing.assert_close(p.double(), w, rtol=1e-6, atol=1e-6)


# Each case: (Muon options, the group's parameter dtypes, the words of the reason). Every one steps on CPU.
FALLBACKS = {
    "fused_false": (dict(fused=False), (torch.float32,), "fused=False"),
    "cautious": (dict(cautious_weight_decay=True), (torch.float32,), "cautious_weight_decay=True"),
    "capturable": (dict(capturable=True), (torch.float32,), "capturable=True"),
    "bf16_stochastic": (dict(), (torch.float32, torch.bfloat16), "parameter '#1' is torch.bfloat16 and rounds stochastically"),
    "wider_state": (dict(state_dtype=torch.float32, stochastic_rounding=False), (torch.float32, torch.bfloat16),
                    "parameter '#1' is torch.bfloat16 with state_dtype=torch.float32"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_default_falls_back_to_the_fused_false_path_bit_for_bit_where_the_kernel_does_not_apply(case, kernel_calls):
    """A group where one condition fails steps wholly on the path of fused=False (torch's default
    AdamW, or muonkit's widened / stochastically rounded / cautious / capturable step around it)."""
    options, dtypes, words = FALLBACKS[case]
    params = [[p.to(dtypes[i % len(dtypes)]) for i, p in enumerate(make_params())] for _ in range(2)]
    ours = muonkit.Muon([{"params": params[0], "use_muon": False}], lr=1e-2, weight_decay=0.1, **options)
    forced = muonkit.Muon([{"params": params[1], "use_muon": False}], lr=1e-2, weight_decay=0.1,
                          **{**options, "fused": False})
    fused, reason = adamw_kernel(ours.param_groups[0], ours.defaults["capturable"])
    assert not fused and words in reason, reason
    for t in range(4):
        for p, q, g in zip(*params, grads_for(t)):
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        ours.step()
        forced.step()
    assert kernel_calls == []
    assert_same(ours, params[0], forced, params[1])


def test_default_keeps_torch_s_default_adamw_off_cpu_and_for_dtypes_the_kernel_lacks():
    group = {"params": [torch.zeros(3), torch.zeros(2, device="meta")], "use_muon": False, "fused": None,
             "cautious_weight_decay": False, "state_dtype": None, "stochastic_rounding": True}
    fused, reason = adamw_kernel(group, False)
    assert not fused and "parameter '#1' is on meta" in reason
    group["params"] = [torch.zeros(3), torch.zeros(2, dtype=torch.float8_e4m3fn)]
    fused, reason = adamw_kernel(group, False)
    assert not fused and "torch.float8_e4m3fn, which torch's fused AdamW kernel does not step" in reason
    group["params"] = [torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float16)]
    assert not adamw_kernel(group, False)[0]  # float16 rounds stochastically by default
    group["stochastic_rounding"] = False
    assert adamw_kernel(group, False)[0]


def test_a_group_with_a_dtensor_steps_wholly_on_the_fused_false_path(one_rank_group, kernel_calls):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    base = make_params()
    ours_p = [base[0].clone(), distribute_tensor(base[2].clone(), mesh, [Shard(0)])]
    forced_p = [base[0].clone(), base[2].clone()]
    ours = muonkit.Muon([{"params": ours_p, "use_muon": False}], lr=1e-2, weight_decay=0.1)
    forced = muonkit.Muon([{"params": forced_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=False)
    fused, reason = adamw_kernel(ours.param_groups[0], False)
    assert not fused and "parameter '#1' is a DTensor" in reason
    for t in range(3):
        g = grads_for(t)
        ours_p[0].grad, ours_p[1].grad = g[0].clone(), distribute_tensor(g[2].clone(), mesh, [Shard(0)])
        forced_p[0].grad, forced_p[1].grad = g[0].clone(), g[2].clone()
        ours.step()
        forced.step()
    assert kernel_calls == []
    assert torch.equal(ours_p[0], forced_p[0]) and torch.equal(ours_p[1].full_tensor(), forced_p[1])


def test_the_choice_is_made_again_when_a_parameter_is_appended_or_a_group_added(kernel_calls):
    """Per group, over all of its parameters: a bfloat16 parameter (stochastic rounding) appended to
    a group takes the whole group off the kernel from the next step; a group added later decides
    for itself; a parameter without a gradient counts too."""
    ps = make_params()
    opt = muonkit.Muon([{"params": ps[:2], "use_muon": False}], lr=1e-2)
    for p, g in zip(ps, grads_for(0)):
        p.grad = g
    opt.step()
    assert kernel_calls == [2]
    low = torch.zeros(3, dtype=torch.bfloat16)  # no gradient: it does not step, but decides
    opt.param_groups[0]["params"].append(low)
    opt.step()
    assert kernel_calls == [2]
    opt.add_param_group({"params": ps[2:], "use_muon": False})
    opt.step()
    assert kernel_calls == [2, 2]
    opt.param_groups[0]["params"].pop()
    opt.step()
    assert kernel_calls == [2, 2, 2, 2]


def test_a_checkpoint_of_the_earlier_default_path_continues_on_the_kernel_bit_for_bit():
    """A state dict saved before fused=None meant the kernel (its groups hold fused None; their
    state is torch's foreach AdamW's, the same keys, a float32 step on the CPU) loads and continues
    as torch.optim.AdamW continuing with fused=True; loading it into fused=False continues as torch's
    default AdamW."""
    old_p, ref_p = make_params(), make_params()
    old = muonkit.Muon([{"params": old_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=False)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1)
    run(old, old_p, ref, ref_p, 3)
    saved = copy.deepcopy(old.state_dict())
    saved["param_groups"][0]["fused"] = None  # as the earlier default saved it
    ref_saved = copy.deepcopy(ref.state_dict())
    for fused in (None, False):
        new_p = [p.detach().clone() for p in old_p]
        new = muonkit.Muon([{"params": new_p, "use_muon": False}], lr=1e-2, weight_decay=0.1)
        new.load_state_dict(copy.deepcopy(saved))
        new.param_groups[0]["fused"] = fused
        cont_p = [p.detach().clone() for p in ref_p]
        cont = torch.optim.AdamW(cont_p, lr=1e-2, weight_decay=0.1)
        cont.load_state_dict(copy.deepcopy(ref_saved))
        cont.param_groups[0]["fused"] = fused is None
        run(new, new_p, cont, cont_p, 3, first=3)
        assert_same(new, new_p, cont, cont_p)


def _layouts():
    """Each case: (parameter, gradient) with the same values, laid out otherwise than contiguous."""
    base, grad = torch.randn(6, 4), torch.randn(6, 4)
    wide = torch.randn(6, 9)
    wide[:, :4] = base
    return {
        "transposed_grad": (base.clone(), grad.t().contiguous().t()),
        "transposed_param": (base.t().contiguous().t(), grad.clone()),
        "sliced_param": (wide[:, :4], grad.clone()),
    }


@pytest.mark.parametrize("case", ["transposed_grad", "transposed_param", "sliced_param"])
@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused_true"])
def test_the_kernel_steps_parameters_and_gradients_of_any_layout(case, fused):
    """torch's fused CPU kernel ignores strides (a transposed gradient gave a wrong step, a sliced
    parameter had its neighbours written): muonkit hands it dense tensors laid out alike, so every
    layout steps as contiguous tensors do, bit for bit, and nothing beside the parameter moves."""
    p, g = _layouts()[case]
    q = p.contiguous().clone()
    outside = p.untyped_storage().nbytes() > p.numel() * p.element_size()
    before = torch.tensor([], dtype=p.dtype).set_(p.untyped_storage()).clone()
    ours = muonkit.Muon([{"params": [p], "use_muon": False}], lr=1e-2, weight_decay=0.1, fused=fused)
    theirs = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.contiguous()
        ours.step()
        theirs.step()
    assert torch.equal(p, q)
    assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
    if outside:
        after = torch.tensor([], dtype=p.dtype).set_(p.untyped_storage())
        assert torch.equal(after.view(6, 9)[:, 4:], before.view(6, 9)[:, 4:])


def test_explain_says_which_adamw_kernel_and_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    text = muonkit.explain(model, file=None)
    assert "AdamW groups step with torch's fused AdamW kernel" in text
    text = muonkit.explain(model.to(torch.bfloat16), file=None)
    assert "torch's default AdamW" in text and "rounds stochastically" in text


def test_a_parameter_moved_from_a_muon_group_starts_fresh_on_the_kernel_and_a_closure_steps_alike(kernel_calls):
    """A matrix moved from a Muon group to an AdamW group starts AdamW fresh (its momentum is not an
    AdamW moment) and steps on the kernel as a fresh torch.optim.AdamW(fused=True); step(closure)
    returns the closure's loss and steps the same bits."""
    w, other = torch.randn(4, 6), torch.randn(5)
    opt = muonkit.Muon([{"params": [w]}, {"params": [other], "use_muon": False}], lr=1e-2, weight_decay=0.1)
    w.grad, other.grad = torch.randn(4, 6), torch.randn(5)
    opt.step()
    assert kernel_calls == [1]
    opt.param_groups[0]["params"].remove(w)
    opt.param_groups[1]["params"].insert(0, w)
    theirs_w = w.detach().clone()
    theirs = torch.optim.AdamW([theirs_w], lr=1e-2, weight_decay=0.1, fused=True)
    for t in range(3):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(t))
        w.grad, theirs_w.grad, other.grad = g.clone(), g.clone(), torch.randn(5)
        assert opt.step(lambda: torch.tensor(float(t))) == t
        theirs.step()
    assert kernel_calls == [1, 2, 2, 2]
    assert torch.equal(w, theirs_w)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"} and float(opt.state[w]["step"]) == 3
    assert torch.equal(opt.state[w]["exp_avg_sq"], theirs.state[theirs_w]["exp_avg_sq"])
