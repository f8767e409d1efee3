"""Contracts of muonkit.defer_relay on one process (the 4-rank HSDP runs are tests/test_mesh.py's,
mesh_worker.deferred_hsdp): what it refuses, naming the option and its value, before anything
changes; that it changes nothing where a step has no relay phase; and that a held step applied in
two parts (`Pending.apply_` then `apply_later_`, the deferred path) writes the same bits as one
`apply_` (oracle: the same step applied at once; tolerance: none)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import muonkit
from muonkit import functional
from muonkit.layout import resolve


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for step in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_one_process_has_no_relay_and_nothing_changes():
    a, b = _model(), _model()
    opt_a = muonkit.Muon(a.named_parameters(), lr=0.02)
    opt_b = muonkit.Muon(b.named_parameters(), lr=0.02)
    deferred = muonkit.defer_relay(opt_b, b)
    assert not opt_b._optimizer_step_pre_hooks and not any(m._forward_pre_hooks for m in b.modules())
    _train(a, opt_a)
    _train(b, opt_b)
    assert deferred.pending == 0
    deferred.finish()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    copy.deepcopy(opt_b)  # nothing of the deferral is attached to a one-process optimizer


def test_wrong_types_are_refused():
    model = _model()
    with pytest.raises(TypeError, match="muonkit.Muon, got AdamW"):
        muonkit.defer_relay(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(TypeError, match="torch.nn.Module, got list"):
        muonkit.defer_relay(muonkit.Muon(model.named_parameters()), [model])


@pytest.mark.parametrize(("options", "message"), [
    ({"variant": "dion2"}, r"Muon group 0 has variant='dion2'"),
    ({"variant": "nordion2"}, r"Muon group 0 has variant='nordion2'"),
    ({"diagnostics": True}, r"Muon\(diagnostics=True\)"),
])
def test_options_it_cannot_defer_are_refused_at_hook_up(one_rank_group, options, message):
    model = _model()
    opt = muonkit.Muon(model.named_parameters(), process_group=one_rank_group, **options)
    with pytest.raises(ValueError, match=message):
        muonkit.defer_relay(opt, model)
    assert not opt._distributed.defer_relay and not opt._optimizer_step_pre_hooks


def test_a_parameter_outside_the_model_and_a_second_deferral_are_refused(one_rank_group):
    model, other = _model(), _model()
    opt = muonkit.Muon(model.named_parameters(), process_group=one_rank_group)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not a parameter of the model"):
        muonkit.defer_relay(opt, other)
    deferred = muonkit.defer_relay(opt, model)
    with pytest.raises(ValueError, match="deferred already"):
        muonkit.defer_relay(opt, model)
    deferred.remove()
    assert "add_param_group" not in opt.__dict__ and not opt._optimizer_step_pre_hooks
    assert not any(m._forward_pre_hooks or m._state_dict_pre_hooks for m in model.modules())
    muonkit.defer_relay(opt, model).remove()  # may be hooked up again once removed


def test_a_group_changed_after_hook_up_is_refused_before_the_step_changes_anything(one_rank_group):
    model = _model()
    opt = muonkit.Muon(model.named_parameters(), process_group=one_rank_group)
    muonkit.defer_relay(opt, model)
    model(torch.randn(5, 8)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["variant"] = "dion2"
    with pytest.raises(ValueError, match=r"Muon group 0 has variant='dion2'"):
        opt.step()
    opt.param_groups[0]["variant"] = "muon"
    opt.diagnostics = True
    with pytest.raises(ValueError, match=r"diagnostics=True"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not state["momentum_buffer"].any() for state in opt.state.values())
    opt.diagnostics = False
    opt.step()  # as before
    assert not torch.equal(next(model.parameters()), before[0])


def test_one_rank_group_steps_as_without_the_deferral(one_rank_group):
    """One rank holds every piece: no relay phase, so nothing waits and the bits are the step's."""
    a, b = _model(), _model()
    opt_a = muonkit.Muon(a.named_parameters(), lr=0.02, process_group=one_rank_group)
    opt_b = muonkit.Muon(b.named_parameters(), lr=0.02, process_group=one_rank_group)
    deferred = muonkit.defer_relay(opt_b, b)
    _train(a, opt_a)
    _train(b, opt_b)
    assert deferred.pending == 0 and not opt_b._distributed.relays
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("dtype", "variant", "seeds"), [
    (torch.float32, "muon", None),
    (torch.float32, "normuon", None),
    (torch.bfloat16, "muon", [11, 12, 13]),  # stochastic rounding with the step's seeds
])
def test_a_held_step_applied_in_two_parts_writes_the_same_bits(dtype, variant, seeds):
    """`Pending.apply_` with `later` then `apply_later_` (the deferred path) equals one `apply_`:
    parameters, momentum and second moments, with weight decay and the step's rounding seeds."""
    torch.manual_seed(1)
    shapes = [(16, 8), (8, 24), (12, 12)]
    layouts = [resolve(None, 2)] * 3

    def held():
        generator = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        buffers = [torch.randn(s, generator=generator) for s in shapes]
        moments = [torch.rand(s[0], 1, generator=generator) for s in shapes] if variant == "normuon" else None
        step = functional.muon(params, grads, buffers, layouts, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1,
                               scale="moonlight", rms=0.2, orthogonalizer="polar_express", ns_steps=5, ns_dtype=None,
                               variant=variant, second_moments=moments, rounding_seeds=seeds, hold=True)
        return step, params, buffers, moments

    whole, params, buffers, moments = held()
    whole.apply_()
    parts, params2, buffers2, moments2 = held()
    later = {i: (parts.updates[i], parts.new_second_moments[i]) for i in (0, 2)}
    parts.later = {0, 2}
    for i in later:
        parts.updates[i] = parts.new_second_moments[i] = None
    parts.apply_()
    assert not torch.equal(params2[0], params[0]) and torch.equal(params2[1], params[1])
    parts.apply_later_(later)
    parts.apply_later_(later)  # once: a second call changes nothing
    for a, b in zip([*params, *buffers, *(moments or [])], [*params2, *buffers2, *(moments2 or [])]):
        assert torch.equal(a, b)
    assert not parts.later and parts.applied


def test_qkclip_step_applies_every_deferred_update_first(monkeypatch):
    """QK-Clip rescales weights in place after the step: it finishes the deferred updates first (a
    weight rescaled before its update arrives would differ from the same step without deferral)."""
    import muonkit.qkclip

    calls = []
    monkeypatch.setattr(muonkit.qkclip, "finish_all", lambda: calls.append("finish"))
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    clip = muonkit.QKClip([(q, k)], heads=2, tau=1.0)
    clip.observe(0, torch.tensor([5.0, 0.5]))
    clip.step()
    assert calls == ["finish"]


def test_every_guarded_entry_point_finishes_first(one_rank_group):
    """The places that read or write parameters or optimizer state through torch's and muonkit's APIs
    call finish() first: the optimizer's step (before its checks), state_dict, load_state_dict and
    add_param_group; any module's state_dict and load_state_dict (save_checkpoint, load_checkpoint);
    and the model's forward (after it). The 4-rank runs check the values (tests/test_mesh.py)."""
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False), nn.Linear(4, 4))
    opt = muonkit.Muon(list(model.named_parameters())[:2], process_group=one_rank_group)
    deferred = muonkit.defer_relay(opt, model)
    calls = []
    deferred.finish = lambda: calls.append(1)  # the hooks look it up when they run

    def finishes(action) -> bool:
        before = len(calls)
        action()
        return len(calls) > before

    model(torch.randn(2, 8)).sum().backward()
    assert finishes(opt.step)
    assert finishes(opt.state_dict) and finishes(lambda: opt.load_state_dict(opt.state_dict()))
    assert finishes(lambda: opt.add_param_group({"params": [model[3].bias], "param_names": ["3.bias"], "use_muon": False}))
    assert finishes(model.state_dict) and finishes(model[0].state_dict)
    assert finishes(lambda: model.load_state_dict(model.state_dict()))
    assert finishes(lambda: model[2].load_state_dict(model[2].state_dict()))
    assert finishes(lambda: model(torch.randn(2, 8)))
