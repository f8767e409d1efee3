"""The step's per-parameter checks are cached between steps (issue 22): a step whose groups,
parameters, gradients' and state's shapes, dtypes and devices and options are those of the last
checked step skips them; any change runs them again, so a bad value is still refused with nothing
changed. The cached step gives the bits of the uncached one.
"""

from __future__ import annotations

import pytest
import torch

import muonkit
from muonkit import optimizer as optimizer_module
from test_atomic_step import assert_unchanged, snapshot


def model_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 12)),
            torch.nn.Parameter(torch.randn(8))]


def build(params: list[torch.nn.Parameter], **options) -> muonkit.Muon:
    return muonkit.Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}], lr=0.02, **options)


def set_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    """The names of the parameters whose state the step checked, in order."""
    seen: list[str] = []
    real = optimizer_module.check_state

    def counting(p, state, group, name, where):
        seen.append(name)
        real(p, state, group, name, where)

    monkeypatch.setattr(optimizer_module, "check_state", counting)
    return seen


def warm(opt: muonkit.Muon, params: list[torch.nn.Parameter], checks: list[str]) -> None:
    """Two steps (the first creates the state, the second is checked and cached), then a third
    that must not check anything."""
    for seed in (1, 2):
        set_grads(params, seed)
        opt.step()
    checks.clear()
    set_grads(params, 3)
    opt.step()
    assert checks == []


def test_cached_steps_give_the_uncached_bits():
    runs = []
    for cached in (True, False):
        params = model_params()
        opt = build(params, variant="normuon")
        if not cached:
            opt._plan_cache = None
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for seed in range(6):
            set_grads(params, seed)
            opt.step()
            scheduler.step()
        runs.append(([p.detach().clone() for p in params], opt.state_dict()))
    (cached_params, cached_state), (plain_params, plain_state) = runs
    for a, b in zip(cached_params, plain_params):
        assert torch.equal(a, b)
    for index, entries in plain_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(cached_state["state"][index][key], value), (index, key)


def test_a_new_lr_keeps_the_cache_but_is_still_checked(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    opt.param_groups[0]["lr"] = 0.01
    set_grads(params, 4)
    opt.step()
    assert checks == []
    opt.param_groups[0]["lr"] = -1.0
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="Muon group 0: lr must be >= 0"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_changed_option_runs_the_checks_again(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    opt.param_groups[0]["variant"] = "normuon"  # needs a second moment: the step makes it
    set_grads(params, 4)
    opt.step()
    assert checks == ["#0", "#1", "#0"]
    assert opt.state[params[0]]["second_moment"].shape == (16, 1)
    opt.param_groups[0]["layout"] = muonkit.Layout.per_block(3)  # a valid option that 16 rows do not fit
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="parameter '#0' with shape \\(16, 8\\)"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("replacement, error, message", [
    (torch.randn(8, 16), RuntimeError, "parameter '#0' has shape \\(8, 16\\) but its gradient has shape \\(16, 8\\)"),
    (torch.randn(16, 8, dtype=torch.complex64), TypeError, "parameter '#0' is complex"),
])
def test_a_replaced_parameter_is_checked_again(checks, replacement, error, message):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    params[0].data = replacement  # its gradient stays the (16, 8) float32 one
    before = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_replaced_parameter_that_fits_is_stepped_with_fresh_checks(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    params[0].data = params[0].data.double()  # the state follows: converted to float64 by the step
    params[0].grad = params[0].grad.double()
    opt.step()
    assert "#0" in checks
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float64


def test_an_added_group_is_checked(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    extra = torch.nn.Parameter(torch.randn(6, 6))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn(6, 6)
    made = opt.state[extra]["momentum_buffer"]
    opt.state[extra]["momentum_buffer"] = torch.zeros(6, 5)
    before = snapshot(opt, params + [extra])
    with pytest.raises(RuntimeError, match="Muon group 2: the state 'momentum_buffer' of parameter '#0' should be"):
        opt.step()
    assert_unchanged(opt, params + [extra], before)
    opt.state[extra]["momentum_buffer"] = made
    checks.clear()
    opt.step()
    assert checks == ["#0", "#1", "#0", "#0"]


def test_an_appended_parameter_is_checked(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    extra = torch.nn.Parameter(torch.randn(5))  # Muon needs a matrix
    extra.grad = torch.randn(5)
    opt.param_groups[0]["params"].append(extra)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="parameter '#2' has shape \\(5,\\); Muon needs a matrix"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("bad", [torch.zeros(12, 8), torch.zeros(8, 12, dtype=torch.int32), 3.0])
def test_a_cached_plan_still_refuses_a_bad_state(checks, bad):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    opt.state[params[1]]["momentum_buffer"] = bad
    values = [p.detach().clone() for p in params]
    held = {key: value.clone() for key, value in opt.state[params[0]].items()}
    with pytest.raises(RuntimeError, match="the state 'momentum_buffer' of parameter '#1' should be"):
        opt.step()
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    assert all(torch.equal(opt.state[params[0]][key], value) for key, value in held.items())
    assert opt.state[params[1]]["momentum_buffer"] is bad


def test_a_loaded_state_dict_is_checked_again(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    checks.clear()
    opt.step()
    assert checks == ["#0", "#1", "#0"]


def test_a_missing_gradient_changes_the_plan(checks):
    params = model_params()
    opt = build(params)
    warm(opt, params, checks)
    params[1].grad = None
    moved = params[1].detach().clone()
    opt.step()
    assert checks == ["#0", "#0"]
    assert torch.equal(params[1].detach(), moved)


def test_state_a_switched_option_leaves_is_dropped_after_a_skipped_step(checks):
    # A cached plan skips the state bookkeeping (drop_unused) only once a step of it has applied:
    # here the first step of the new plan is skipped (a NaN gradient), so the next one, although
    # its plan comes from the cache, must still drop the second moment NorMuon kept.
    params = model_params()
    opt = build(params, variant="normuon", nonfinite="skip")
    warm(opt, params, checks)
    assert "second_moment" in opt.state[params[0]]
    opt.param_groups[0]["variant"] = "muon"
    set_grads(params, 4)
    params[2].grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and "second_moment" in opt.state[params[0]]
    checks.clear()
    set_grads(params, 5)
    opt.step()
    assert checks == []  # the plan of the skipped step, from the cache
    assert "second_moment" not in opt.state[params[0]] and "second_moment" not in opt.state[params[1]]
    set_grads(params, 6)
    opt.step()  # and after the drop the plan is made (and checked) again
    assert checks == ["#0", "#1", "#0"]
