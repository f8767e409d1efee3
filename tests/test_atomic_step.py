"""A step is all or nothing (issue 11): if step() raises, for any reason, no parameter and no state
of any group has changed. Also: gradients of another dtype than their parameter, custom
orthogonalizers called one matrix at a time, the `nonfinite=` option, and `last_stats`.
"""

from __future__ import annotations

import copy

import pytest
import torch

import muonkit
from reference import polar_factor


def snapshot(opt: muonkit.Muon, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt: muonkit.Muon, params: list[torch.Tensor], before) -> None:
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for index, entries in state["state"].items():
        assert now["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(now["state"][index][key], value), (index, key)
    for g_now, g_then in zip(now["param_groups"], state["param_groups"]):
        assert g_now.keys() == g_then.keys()
        for key in g_now:
            same = torch.equal if torch.is_tensor(g_now[key]) else (lambda a, b: a == b or (a != a and b != b))
            assert same(g_now[key], g_then[key]), key


def three_groups(third: dict) -> tuple[muonkit.Muon, list[torch.nn.Parameter]]:
    """An AdamW group, a Muon group on the fused built-in kernel, and a third Muon group."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(16, 8)),
              torch.nn.Parameter(torch.randn(12, 6))]
    opt = muonkit.Muon([{"params": [params[0]], "use_muon": False}, {"params": [params[1]]},
                        {"params": [params[2]], **third}], lr=0.02)
    for _ in range(2):  # state that is not all zeros
        for p in params:
            p.grad = torch.randn_like(p)
        if third.get("orthogonalizer") not in ("raising",):
            opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


class Boom(RuntimeError):
    pass


def raising(X, steps):
    raise Boom("the orthogonalizer failed")


def test_an_orthogonalizer_that_raises_in_the_last_group_leaves_every_group_unchanged():
    opt, params = three_groups({})
    opt.param_groups[2]["orthogonalizer"] = raising
    before = snapshot(opt, params)
    with pytest.raises(Boom):
        opt.step()
    assert_unchanged(opt, params, before)


def test_svd_failing_on_a_nonfinite_gradient_leaves_every_group_unchanged():
    opt, params = three_groups({"orthogonalizer": "svd"})
    params[2].grad[0, 0] = float("nan")
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="failed to converge"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("lr", [torch.tensor([0.1, 0.2]), float("nan"), -1.0, "0.1"], ids=["2-element", "nan", "negative", "str"])
def test_a_bad_lr_in_the_last_group_is_refused_before_anything_changes(lr):
    opt, params = three_groups({})
    opt.param_groups[2]["lr"] = lr
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="Muon group 2: lr"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("key", ["momentum_buffer", "second_moment"])
def test_state_that_does_not_fit_is_refused_before_anything_changes(key):
    opt, params = three_groups({"variant": "normuon"})
    opt.state[params[2]][key] = torch.zeros(3)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=f"Muon group 2: the state '{key}' of parameter '#0'"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_parameter_appended_before_a_failing_step_gets_no_state():
    opt, params = three_groups({})
    extra = torch.nn.Parameter(torch.randn(10, 10))
    extra.grad = torch.randn(10, 10)
    opt.param_groups[1]["params"].append(extra)
    opt.param_groups[2]["orthogonalizer"] = raising
    with pytest.raises(Boom):
        opt.step()
    assert extra not in opt.state or not opt.state[extra]
    opt.param_groups[2]["orthogonalizer"] = "polar_express"
    opt.step()
    assert opt.state[extra]["momentum_buffer"].abs().sum() > 0


@pytest.mark.parametrize("shape", [(10,), (2, 2, 2, 2, 2, 2)], ids=["1D", "6D"])
def test_a_parameter_without_a_gradient_appended_to_a_muon_group_is_refused_before_anything_changes(shape):
    """A parameter appended to a Muon group has no matrix view: refused at the next step, named, even
    before it has a gradient; the AdamW group before it must not have stepped."""
    opt, params = three_groups({})
    extra = torch.nn.Parameter(torch.randn(shape))
    opt.param_groups[1]["params"].append(extra)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"Muon group 1: parameter '#1' (has shape|with shape)"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("use_muon", [True, False])
def test_a_gradient_of_another_dtype_than_its_parameter_steps_as_its_value_in_the_parameter_dtype(grad_dtype, use_muon):
    """torch 2.13 lets a parameter's grad have another dtype (param.grad_dtype); the step uses the
    gradient's value in the state's dtype, exactly as if that had been the gradient."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    b.grad_dtype = grad_dtype
    opt_a = muonkit.Muon([{"params": [a], "use_muon": use_muon}], lr=0.02)
    opt_b = muonkit.Muon([{"params": [b], "use_muon": use_muon}], lr=0.02)
    for _ in range(2):
        g = torch.randn(16, 8).to(grad_dtype)
        b.grad = g
        a.grad = g.to(torch.float32)
        opt_a.step()
        opt_b.step()
        assert b.grad.dtype == grad_dtype  # never modified
    assert torch.equal(a, b)


def test_a_callable_orthogonalizer_gets_one_matrix_at_a_time():
    seen = []

    def one_matrix(X, steps):
        seen.append(tuple(X.shape))
        return polar_factor(X).to(X.dtype)

    experts = torch.nn.Parameter(torch.randn(3, 8, 4, dtype=torch.float64))
    matrix = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    opt = muonkit.Muon([experts, matrix], orthogonalizer=one_matrix, lr=1.0, momentum=0.0, nesterov=False,
                       weight_decay=0.0, scale="naive")
    experts.grad, matrix.grad = torch.randn(3, 8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    before = matrix.detach().clone()
    opt.step()
    assert seen == [(8, 4)] * 4
    assert torch.allclose(before - matrix.detach(), polar_factor(matrix.grad), atol=1e-12)


def test_a_callable_that_declares_batched_gets_stacks_of_same_shaped_matrices():
    seen = []

    def stacked(X, steps):
        seen.append(tuple(X.shape))
        return polar_factor(X).to(X.dtype)

    stacked.batched = True
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(2, 8, 4))]
    opt = muonkit.Muon(params, orthogonalizer=stacked)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen == [(3, 8, 4)]


def nan_setup(nonfinite):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(16, 8)),
              torch.nn.Parameter(torch.randn(4, 2, 3, 3))]
    opt = muonkit.Muon([{"params": [params[0]], "use_muon": False}, {"params": params[1:]}], lr=0.02,
                       nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0, 0, 0, 0] = float("inf")
    return opt, params


def test_nonfinite_propagate_is_torch_behaviour():
    opt, params = nan_setup("propagate")
    opt.step()
    assert not params[2].isfinite().all()


def test_nonfinite_raise_names_the_parameter_and_changes_nothing():
    opt, params = nan_setup("raise")
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="NaN or Inf.*'#1'"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_nonfinite_skip_changes_nothing_counts_the_skip_and_the_count_round_trips():
    opt, params = nan_setup("skip")
    before = snapshot(opt, params)
    opt.step()
    assert opt.skipped_steps == 1
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(opt.state_dict()["state"][index][key], value)
    other = muonkit.Muon([{"params": [torch.nn.Parameter(torch.randn(8))], "use_muon": False},
                          {"params": [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(4, 2, 3, 3))]}],
                         nonfinite="skip")
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1
    params[2].grad[0, 0, 0, 0] = 1.0
    opt.step()
    assert opt.skipped_steps == 1
    assert all(p.isfinite().all() for p in params)


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of propagate, skip, raise, got 'ignore'"):
        muonkit.Muon([torch.nn.Parameter(torch.randn(4, 4))], nonfinite="ignore")


def rms(t):
    return (t.double().pow(2).mean().sqrt()).item()


def test_last_stats_match_values_computed_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    opt = muonkit.Muon(muonkit.param_groups(model), lr=0.01, diagnostics=True, orthogonality_every=2)
    hidden = model[2].weight
    for step in range(1, 3):
        model(torch.randn(32, 6)).square().mean().backward()
        g = hidden.grad.clone()
        m_before = opt.state[hidden]["momentum_buffer"].clone()
        w_before = hidden.detach().clone()
        opt.step()
        stats = opt.last_stats["2.weight"]
        m = m_before.lerp(g, 0.05)
        u = g.lerp(m, 0.95)
        scale = 0.2 * 16**0.5
        update = (w_before * (1 - 0.01 * 0.1) - hidden.detach()) / 0.01
        assert stats["grad_rms"] == pytest.approx(rms(g), rel=1e-5)
        assert stats["momentum_rms"] == pytest.approx(rms(m), rel=1e-5)
        assert stats["update_rms"] == pytest.approx(rms(update), rel=1e-4)
        if step == 2:
            O = muonkit.orthogonalize(u)
            exact = polar_factor(u)
            error = ((O.double() - exact).norm() / exact.norm()).item()
            assert stats["orthogonality_error"] == pytest.approx(error, rel=1e-3)
            s = torch.linalg.svdvals(O.double())
            assert stats["singular_min"] == pytest.approx(s.min().item(), rel=1e-4)
            assert stats["singular_max"] == pytest.approx(s.max().item(), rel=1e-4)
        else:
            assert "orthogonality_error" not in stats
        bias = opt.last_stats["0.bias"]
        assert set(bias) == {"grad_rms", "momentum_rms", "update_rms"}
        opt.zero_grad()


def test_no_diagnostics_means_no_stats():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    assert opt.last_stats == {}
