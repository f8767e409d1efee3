"""Muon(capturable=True): no host read inside a step, the same update as the default step, state on
the parameters' device, and parameters without a gradient refused by name.

Host reads are counted with a TorchDispatchMode: every op that hands a tensor's value to Python
(`aten._local_scalar_dense` under .item()/float()/int(), `aten.is_nonzero` under bool(),
`aten.item`, `aten.equal`) is recorded, and so are Tensor.tolist / Tensor.numpy calls. The
default step may read its CPU `step` counters, as torch.optim's non-capturable step does (torch
keeps them on the host unless capturable); nothing else. (A tensor lr is read on the host by the default step, as by torch.optim.AdamW's default step:
only the capturable step reads it on the device.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import muonkit
from reference import assert_same

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
}


class HostReads(TorchDispatchMode):
    """Records every op inside the mode that copies a tensor's value to the host, and the calls of
    Tensor.tolist / Tensor.numpy, which read a CPU tensor's memory without dispatching an op."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor]] = []
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append((str(func), args[0]))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def recorded(t, *args, _name=name, _original=original, **kwargs):
                self.reads.append((f"Tensor.{_name}", t))
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def host_reads(opt: muonkit.Muon) -> list[str]:
    """The host reads of one opt.step(), but those of the CPU step counters of a non-capturable optimizer."""
    steps = set()
    if not opt.defaults["capturable"]:
        steps = {s["step"].data_ptr() for s in opt.state.values() if "step" in s and s["step"].device.type == "cpu"}
    with HostReads() as mode:
        opt.step()
    return [f"{name} of a {tuple(t.shape)} {t.dtype} tensor" for name, t in mode.reads if t.data_ptr() not in steps]


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12),
                         nn.LayerNorm(12), nn.Linear(12, 4)).to(dtype)


def set_grads(net: nn.Module, step: int) -> None:
    """The same gradients for every optimizer under comparison: a function of the step only."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


# Every variant of the step: each Muon variant and orthogonalizer, cautious decay, 16-bit parameters
# with float32 state and stochastic rounding, a tensor lr.
CASES = {
    "default": dict(),
    "normuon": dict(variant="normuon"),
    "adamuon": dict(variant="adamuon"),
    "keller_jordan": dict(orthogonalizer="keller_jordan"),
    "you": dict(orthogonalizer="you"),
    "gram": dict(orthogonalizer="gram"),
    "svd": dict(orthogonalizer="svd"),
    "cautious": dict(cautious_weight_decay=True),
    "no_nesterov": dict(nesterov=False),
    "bf16_state_fp32": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
    "bf16_nearest": dict(dtype=torch.bfloat16, stochastic_rounding=False),
    "tensor_lr": dict(lr=torch.tensor(0.02)),
    "tensor_lr_cautious": dict(lr=torch.tensor(0.02), cautious_weight_decay=True),
}


def build(case: str, capturable: bool) -> tuple[nn.Module, muonkit.Muon]:
    options = dict(CASES[case])
    net = model(options.pop("dtype", torch.float32))
    if isinstance(options.get("lr"), torch.Tensor):
        options["lr"] = options["lr"].clone()
    options.setdefault("lr", 0.02)
    return net, muonkit.Muon(muonkit.param_groups(net), capturable=capturable, **options)


@pytest.mark.parametrize(
    "case, capturable",
    [(case, True) for case in CASES] + [(case, False) for case in CASES if "lr" not in CASES[case]],
    ids=lambda x: {True: "capturable", False: "default"}.get(x, x) if isinstance(x, bool) else x,
)
def test_step_makes_no_host_read(case, capturable):
    net, opt = build(case, capturable)
    assert {g["use_muon"] for g in opt.param_groups} == {True, False}  # both kinds of group step
    for step in range(3):
        set_grads(net, step)
        assert host_reads(opt) == [], f"step {step}"


def test_host_read_counter_sees_reads():
    # The counter is not blind: the optimizer's own non-capturable reads are found once the CPU
    # step counters are no longer excepted, and so are nonfinite="skip"'s finiteness check and a
    # plain .item(). fused=False: torch's default AdamW reads its step count on the host (the fused
    # kernel, the default AdamW on CPU, reads it inside).
    net = model()
    opt = muonkit.Muon(muonkit.param_groups(net), lr=0.02, fused=False)
    set_grads(net, 0)
    with HostReads() as mode:
        opt.step()
    assert any(t is opt.state[p]["step"] for _, t in mode.reads for p in opt.state if "step" in opt.state[p])
    net, opt = model(), None
    opt = muonkit.Muon(muonkit.param_groups(net), nonfinite="skip")
    set_grads(net, 0)
    assert host_reads(opt)
    for read in (lambda t: t.item(), lambda t: bool(t), lambda t: t.tolist(), lambda t: t.numpy(), lambda t: torch.equal(t, t)):
        with HostReads() as mode:
            read(torch.ones(()))
        assert len(mode.reads) == 1
    assert torch.Tensor.tolist(torch.ones(2)) == [1.0, 1.0]  # unpatched after the mode


@pytest.mark.parametrize("case", list(CASES))
def test_capturable_equals_default(case):
    """Muon groups with a float lr run the same arithmetic: bit for bit. AdamW groups run torch's
    capturable arithmetic (bias corrections as tensors, torch.optim.AdamW(capturable=True)'s):
    equal to rounding. A tensor lr is applied by addcmul: equal to rounding."""
    net_a, a = build(case, False)
    net_b, b = build(case, True)
    for step in range(4):
        set_grads(net_a, step)
        set_grads(net_b, step)
        a.step()
        b.step()
    # A float lr and no stochastic rounding (a capturable step draws it from the default generator).
    exact = "lr" not in CASES[case] and CASES[case].get("dtype") != torch.bfloat16 or case == "bf16_nearest"
    tol = 1e-2 if CASES[case].get("dtype") == torch.bfloat16 else 2e-6
    for group_a, group_b in zip(a.param_groups, b.param_groups):
        for pa, pb in zip(group_a["params"], group_b["params"]):
            if group_a["use_muon"] and exact:
                assert torch.equal(pa, pb), case
                assert torch.equal(a.state[pa]["momentum_buffer"], b.state[pb]["momentum_buffer"])
            else:
                torch.testing.assert_close(pb, pa, rtol=tol, atol=tol)


def test_capturable_adamw_is_torchs_capturable_arithmetic():
    # torch.optim.AdamW(capturable=True) refuses CPU tensors; its differentiable=True mode runs the same
    # branch of torch's single-tensor AdamW (bias corrections from the tensor step), which the AdamW
    # groups of a capturable Muon must equal bit for bit.
    net = model()
    ours = muonkit.Muon([{"params": list(net.parameters()), "use_muon": False}], lr=3e-3, weight_decay=0.1,
                        capturable=True)
    ref_params = [p.detach().clone() for p in net.parameters()]
    theirs = torch.optim.AdamW(ref_params, lr=3e-3, weight_decay=0.1, foreach=False, differentiable=True)
    for step in range(5):
        set_grads(net, step)
        for p, q in zip(net.parameters(), ref_params):
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(net.parameters(), ref_params):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


def test_capturable_state_lives_on_the_parameters_device_and_round_trips():
    # The step counters are on the parameters' device (cpu here; cuda in benchmarks/gpu_check.py); a
    # state dict saved by a capturable optimizer continues bit for bit in a new one, and loads into a
    # default one with its counters moved to the host, as torch.optim keeps them.
    net, opt = build("bf16_state_fp32", True)  # with stochastic rounding: a Muon `step` count too
    for step in range(2):
        set_grads(net, step)
        opt.step()
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    assert steps and all(s.device == p.device for s, p in zip(steps, net.parameters()))
    saved = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    resumed = muonkit.Muon(muonkit.param_groups(net2), lr=0.02, state_dtype=torch.float32, capturable=True)
    resumed.load_state_dict(saved)
    assert_same(resumed.state_dict(), opt.state_dict())
    for step in range(2, 4):
        set_grads(net, step)
        set_grads(net2, step)
        torch.manual_seed(step)  # the rounding's generator
        opt.step()
        torch.manual_seed(step)
        resumed.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert_same(resumed.state_dict(), opt.state_dict())
    plain = muonkit.Muon(muonkit.param_groups(copy.deepcopy(net)), lr=0.02, state_dtype=torch.float32)
    plain.load_state_dict(saved)
    assert all(s["step"].device.type == "cpu" for s in plain.state.values() if "step" in s)


def test_stochastic_rounding_of_a_capturable_step_draws_from_the_default_generator():
    # Seeded on the device rather than from the host step count: the global generator decides, so
    # two runs from the same torch.manual_seed round alike, and the rounding stays unbiased.
    results = []
    for _ in range(2):
        net, opt = build("default", True)
        net.to(torch.bfloat16)
        set_grads(net, 0)
        torch.manual_seed(7)
        opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x = torch.full((200_000,), 1.0 + 2**-9, dtype=torch.float32)  # a quarter of the way from 1 to next bf16
    torch.manual_seed(0)
    rounded = muonkit.functional.stochastic_round(x, torch.bfloat16, muonkit.functional.DEFAULT_GENERATOR).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - (1.0 + 2**-9)) < 4 * 2**-7 * (0.25 * 0.75 / 200_000) ** 0.5


def test_parameter_without_gradient_is_refused_by_name_and_nothing_changes():
    net, opt = build("default", True)
    set_grads(net, 0)
    net[2].bias.grad = None
    before = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter '2\.bias' has no gradient; with capturable=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert_same(opt.state_dict(), state)
    # The default step skips it, as torch.optim does.
    net, opt = build("default", False)
    set_grads(net, 0)
    net[2].bias.grad = None
    opt.step()
    assert torch.equal(net[2].bias, model()[2].bias)


def test_capturable_refuses_what_would_read_the_host():
    net = model()
    for options, message in (
        (dict(nonfinite="skip"), "capturable=True needs nonfinite='propagate'"),
        (dict(diagnostics=True), "capturable=True needs diagnostics=False"),
        (dict(capturable=1), "capturable must be True or False"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            muonkit.Muon(muonkit.param_groups(net), **{"capturable": True, **options})
    opt = muonkit.Muon(muonkit.param_groups(net), capturable=True)
    with pytest.raises(ValueError, match="diagnostics cannot be switched on with capturable=True"):
        opt.diagnostics = True
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    muon_group["momentum"] = torch.tensor(0.9, dtype=torch.float64)
    set_grads(net, 0)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"reads momentum as a Python number .* pass momentum=0\.9"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="capturable is an option of the whole optimizer"):
        muonkit.Muon([{"params": list(net.parameters()), "capturable": True}])


def test_tensor_lr_is_read_on_the_device_so_a_scheduler_reaches_the_step():
    # torch's LR schedulers fill a tensor lr in place: a captured graph then sees the new value. A
    # capturable step that reads the tensor must follow it like the default step follows a float.
    net_a, a = build("default", False)
    net_b, b = build("tensor_lr", True)
    sched_a = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 0.5**s)
    sched_b = torch.optim.lr_scheduler.LambdaLR(b, lambda s: 0.5**s)
    lr_tensors = [g["lr"] for g in b.param_groups]
    for step in range(3):
        set_grads(net_a, step)
        set_grads(net_b, step)
        a.step()
        b.step()
        sched_a.step()
        sched_b.step()
    assert all(g["lr"] is t for g, t in zip(b.param_groups, lr_tensors))
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=2e-6, atol=2e-6)


def test_capturable_step_compiles_as_one_graph_with_what_breaks_the_default_one():
    # A tensor lr and stochastic rounding of bf16 parameters read the host in the default step
    # (graph breaks, docs/API.md); the capturable step reads neither there: one graph, no break.
    torch._dynamo.reset()
    net = model(torch.bfloat16)
    for capturable, breaks in ((False, True), (True, False)):
        opt = muonkit.Muon(muonkit.param_groups(net), lr=torch.tensor(0.01), capturable=capturable)
        set_grads(net, 0)
        explanation = torch._dynamo.explain(opt.step)()
        assert (explanation.graph_break_count > 0) == breaks, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_default_state_dict_continues_in_a_capturable_optimizer():
    # Saved by the default step (CPU step counts), loaded with capturable=True: the counts move to
    # the parameters' device and the Muon groups continue bit for bit with the default run.
    net, opt = build("default", False)
    for step in range(2):
        set_grads(net, step)
        opt.step()
    net2 = copy.deepcopy(net)
    resumed = muonkit.Muon(muonkit.param_groups(net2), lr=0.02, capturable=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(s["step"].device == p.device for p, s in resumed.state.items() if "step" in s)
    for step in range(2, 5):
        set_grads(net, step)
        set_grads(net2, step)
        opt.step()
        resumed.step()
    for group_a, group_b in zip(opt.param_groups, resumed.param_groups):
        for pa, pb in zip(group_a["params"], group_b["params"]):
            if group_a["use_muon"]:
                assert torch.equal(pa, pb)
            else:
                torch.testing.assert_close(pb, pa, rtol=2e-6, atol=2e-6)
                assert float(resumed.state[pb]["step"]) == float(opt.state[pa]["step"]) == 5.0


def test_tensor_lr_is_not_rounded_to_the_parameters_dtype():
    # A bf16 parameter (bf16 state, round to nearest) moved by lr * factor = 0.0101 * 7 = 0.0707:
    # the float lr path gives bf16(-0.0707) = -0.0708; rounding the tensor lr to bf16 first
    # (0.0100708) would give bf16(-0.0704956) = -0.0703.
    results = []
    for lr in (0.0101, torch.tensor(0.0101)):
        p = torch.zeros(4, 4, dtype=torch.bfloat16)
        muonkit.functional.write_updates_([p], [torch.ones(4, 4, dtype=torch.bfloat16)], [7.0], [torch.bfloat16],
                                          lr=lr, weight_decay=0.0, cautious_weight_decay=False)
        results.append(p)
    assert torch.equal(results[0], torch.full((4, 4), -0.0707).bfloat16())
    assert torch.equal(results[1], results[0])
