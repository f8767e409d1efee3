"""Validation at construction (messages name the problem), sparse gradients at step(), and the
gradient-handling contract: zero gradients give no NaN, p.grad is never modified, params without
a gradient are skipped."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import muonkit
from reference import state_is_pristine


def message(excinfo) -> str:
    return str(excinfo.value)


def W() -> torch.Tensor:
    return torch.randn(4, 5)


# (what is wrong, how the optimizer is built, the exception, words the message must hold): every
# message names the option or the parameter and the bad value, and where there is one, the fix.
CONSTRUCTION_ERRORS = [
    ("vector in a Muon group (names)", lambda: muonkit.Muon([("fc.weight", W()), ("fc.bias", torch.randn(5))]),
     ValueError, ["muonkit.param_groups", "fc.bias"]),
    ("vector in a Muon group dict", lambda: muonkit.Muon([{"params": [W(), torch.randn(7)]}]),
     ValueError, ["muonkit.param_groups", "7"]),
    ("scalar in a Muon group", lambda: muonkit.Muon([W(), torch.tensor(1.0)]), ValueError, ["muonkit.param_groups"]),
    ("negative lr", lambda: muonkit.Muon([W()], lr=-0.1), ValueError, ["lr", "-0.1"]),
    ("tiny negative lr", lambda: muonkit.Muon([W()], lr=-1e-8), ValueError, ["lr", "-1e-08"]),
    ("negative lr in a group", lambda: muonkit.Muon([{"params": [W()], "lr": -0.5}]), ValueError, ["lr", "-0.5"]),
    ("momentum 1", lambda: muonkit.Muon([W()], momentum=1.0), ValueError, ["momentum", "1.0"]),
    ("momentum -0.1", lambda: muonkit.Muon([W()], momentum=-0.1), ValueError, ["momentum", "-0.1"]),
    ("momentum 1.5", lambda: muonkit.Muon([W()], momentum=1.5), ValueError, ["momentum", "1.5"]),
    ("momentum 1 in a group", lambda: muonkit.Muon([{"params": [W()], "momentum": 1.0}]), ValueError, ["momentum", "1.0"]),
    ("unknown scale", lambda: muonkit.Muon([W()], scale="spectral_bogus"), ValueError, ["scale", "spectral_bogus"]),
    ("unknown scale in a group", lambda: muonkit.Muon([{"params": [W()], "scale": "bogus_scale"}]),
     ValueError, ["scale", "bogus_scale"]),
    ("unknown orthogonalizer", lambda: muonkit.Muon([W()], orthogonalizer="newton_bogus"),
     ValueError, ["orthogonalizer", "newton_bogus"]),
    ("unknown variant", lambda: muonkit.Muon([W()], variant="dion9"), ValueError, ["variant", "dion9"]),
    ("beta2 1", lambda: muonkit.Muon([W()], beta2=1.0), ValueError, ["beta2", "1.0"]),
    ("negative variant_eps", lambda: muonkit.Muon([W()], variant_eps=-1.0), ValueError, ["variant_eps", "-1.0"]),
    ("complex parameter", lambda: muonkit.Muon([torch.randn(4, 5, dtype=torch.complex64)]), TypeError, ["complex"]),
]


@pytest.mark.parametrize("build, error, words", [case[1:] for case in CONSTRUCTION_ERRORS],
                         ids=[case[0] for case in CONSTRUCTION_ERRORS])
def test_construction_errors_name_the_problem(build, error, words):
    with pytest.raises(error) as e:
        build()
    for word in words:
        assert word in message(e)


def test_vectors_fine_in_adamw_group():
    muonkit.Muon([{"params": [torch.randn(4, 5)]},
                  {"params": [torch.randn(7), torch.tensor(1.0)], "use_muon": False}])


def test_momentum_zero_is_allowed():
    muonkit.Muon([torch.randn(4, 5)], momentum=0.0)


def test_unknown_orthogonalizer_in_functional_api():
    with pytest.raises(ValueError) as e:
        muonkit.orthogonalize(torch.randn(4, 5), "newton_bogus")
    assert "newton_bogus" in message(e)


def test_complex_parameter_in_adamw_group():
    """The orthogonalizer is undefined on complex input; AdamW groups are torch's AdamW, which
    supports complex tensors, so only Muon groups must refuse them (either outcome of the AdamW
    case is accepted, but no silent corruption: if accepted, a step runs)."""
    p = torch.randn(5, dtype=torch.complex64)
    try:
        opt = muonkit.Muon([{"params": [p], "use_muon": False}])
    except (ValueError, TypeError) as e:
        assert "complex" in str(e).lower()
        return
    p.grad = torch.randn(5, dtype=torch.complex64)
    opt.step()
    assert torch.isfinite(torch.view_as_real(p)).all()


# ---- sparse gradients -----------------------------------------------------------------------

def _snapshot(opt, params):
    return [p.clone() for p in params], {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for p in params if p in opt.state
    }


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for p in params:
        now = opt.state[p] if p in opt.state else {}
        before = states.get(id(p), {})
        assert set(now) == set(before)
        for k in now:
            assert torch.equal(torch.as_tensor(now[k]), torch.as_tensor(before[k])), k


def test_sparse_gradient_raises_and_changes_nothing_in_muon_group():
    dense = torch.randn(4, 6)
    sparse = torch.randn(5, 6)
    opt = muonkit.Muon([dense, sparse], lr=0.02, weight_decay=0.1)
    dense.grad, sparse.grad = torch.randn(4, 6), torch.randn(5, 6)
    opt.step()  # state exists now
    snapshot = _snapshot(opt, [dense, sparse])
    dense.grad = torch.randn(4, 6)
    sparse.grad = torch.randn(5, 6).to_sparse()
    with pytest.raises((RuntimeError, ValueError, TypeError)) as e:
        opt.step()
    assert "sparse" in message(e).lower()
    _assert_unchanged(opt, [dense, sparse], snapshot)


def test_sparse_gradient_on_first_step_creates_no_state():
    dense = torch.randn(4, 6)
    sparse = torch.randn(5, 6)
    opt = muonkit.Muon([dense, sparse], lr=0.02, weight_decay=0.1)
    dense.grad = torch.randn(4, 6)
    sparse.grad = torch.randn(5, 6).to_sparse()
    before = dense.clone(), sparse.clone()
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(sparse, before[1])
    assert all(state_is_pristine(opt.state[p]) for p in (dense, sparse) if p in opt.state)


def test_sparse_gradient_in_adamw_group_changes_no_group():
    """The whole step is refused before any group is updated: a Muon group listed before the
    AdamW group with the sparse gradient is not stepped either."""
    w = torch.randn(4, 6)
    b = torch.randn(6)
    opt = muonkit.Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=0.02,
                       weight_decay=0.1)
    w.grad, b.grad = torch.randn(4, 6), torch.randn(6)
    opt.step()
    snapshot = _snapshot(opt, [w, b])
    w.grad = torch.randn(4, 6)
    b.grad = torch.randn(6).to_sparse()
    with pytest.raises((RuntimeError, ValueError, TypeError)) as e:
        opt.step()
    assert "sparse" in message(e).lower()
    _assert_unchanged(opt, [w, b], snapshot)


# ---- gradient handling ----------------------------------------------------------------------

@pytest.mark.parametrize("orthogonalizer", list(muonkit.ORTHOGONALIZERS))
@pytest.mark.parametrize("ns_dtype", [None, torch.bfloat16, torch.float64], ids=str)
def test_zero_gradients_give_no_nan(orthogonalizer, ns_dtype):
    params = [torch.randn(4, 6), torch.randn(6, 2, 3, 3), torch.randn(2, 5, 3)]
    bias = torch.randn(6)
    before = [p.clone() for p in params] + [bias.clone()]
    opt = muonkit.Muon([{"params": params}, {"params": [bias], "use_muon": False}], lr=0.02,
                       weight_decay=0.0, orthogonalizer=orthogonalizer, ns_dtype=ns_dtype)
    for _ in range(3):
        for p in params + [bias]:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params + [bias], before):
        assert torch.isfinite(p).all()
        assert torch.equal(p, b)  # zero update and no decay: nothing moves
    for p in params:
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()


def test_svd_with_bfloat16_ns_dtype():
    """torch has no bf16 SVD. Either muonkit computes the svd orthogonalizer in a dtype that has
    one, or it refuses the combination at construction with a ValueError naming it; failing
    inside step() with torch's NotImplementedError is neither."""
    w = torch.randn(4, 6)
    try:
        opt = muonkit.Muon([w], orthogonalizer="svd", ns_dtype=torch.bfloat16)
    except ValueError as e:
        assert "svd" in str(e) and "bfloat16" in str(e)
        return
    w.grad = torch.randn(4, 6)
    opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("orthogonalizer", list(muonkit.ORTHOGONALIZERS))
def test_grad_is_never_modified(orthogonalizer, nesterov):
    params = [torch.randn(4, 6), torch.randn(6, 2, 3, 3), torch.randn(2, 5, 3)]
    bias = torch.randn(6)
    opt = muonkit.Muon([{"params": params}, {"params": [bias], "use_muon": False}], lr=0.02,
                       weight_decay=0.1, nesterov=nesterov, orthogonalizer=orthogonalizer)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params + [bias]]
        for p, g in zip(params + [bias], grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params + [bias], grads):
            assert torch.equal(p.grad, g)


def test_grad_is_never_modified_bf16_params_plain_momentum():
    """docs/references.md: torch's Muon normalizes a bf16 buffer in place when nesterov=False; the
    same hazard applies to the gradient and the buffer here."""
    p = torch.randn(4, 6).bfloat16()
    opt = muonkit.Muon([p], lr=0.02, nesterov=False, momentum=0.0, ns_dtype=torch.bfloat16,
                       orthogonalizer="keller_jordan")
    g = torch.randn(4, 6).bfloat16()
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g)
    # momentum 0: the buffer is the gradient itself, unnormalized
    assert torch.equal(opt.state[p]["momentum_buffer"], g)


def test_params_without_grad_are_skipped():
    """No decay (weight_decay > 0 would shrink them) and no state advanced. (docs/references.md section 5 suggests
    pre-creating state for distributed checkpoints, so zero-initialized state is accepted.)"""
    used_w, idle_w = torch.randn(4, 6), torch.randn(5, 6)
    used_b, idle_b = torch.randn(6), torch.randn(3)
    idle_before = idle_w.clone(), idle_b.clone()
    opt = muonkit.Muon([{"params": [used_w, idle_w]},
                        {"params": [used_b, idle_b], "use_muon": False}],
                       lr=0.05, weight_decay=0.5)
    for _ in range(3):
        used_w.grad = torch.randn(4, 6)
        used_b.grad = torch.randn(6)
        opt.step()
    assert torch.equal(idle_w, idle_before[0]) and torch.equal(idle_b, idle_before[1])
    assert idle_w.grad is None and idle_b.grad is None
    assert state_is_pristine(opt.state[idle_w] if idle_w in opt.state else {})
    assert state_is_pristine(opt.state[idle_b] if idle_b in opt.state else {})
    assert not state_is_pristine(opt.state[used_w])


def test_closure_is_called_and_its_loss_returned():
    w = torch.randn(4, 6, requires_grad=True)
    opt = muonkit.Muon([w], lr=0.02)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0


# ---- review findings (2026-11-30): options that would be ignored, edits between steps ---------

@pytest.mark.parametrize("key", ["amsgrad", "maximize"])
@pytest.mark.parametrize("use_muon", [False, True])
def test_unsupported_torch_options_are_refused_not_ignored(key, use_muon):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError) as e:
        muonkit.Muon([{"params": [p], "use_muon": use_muon, key: True}])
    assert key in message(e) and "not supported" in message(e)
    muonkit.Muon([{"params": [p], "use_muon": use_muon, key: False}])  # False asks for nothing


# A group holding an option of the other kind, or a constructor argument, would step without it: an
# AdamW group has no momentum (its beta1 is betas[0]); adamw_lr is Muon(adamw_lr=...), a group's is lr.
IGNORED_KEYS = [
    (False, "momentum", 0.5, ["betas"]),
    (False, "nesterov", False, ["Muon groups"]),
    (False, "ns_steps", 3, ["Muon groups"]),
    (False, "adamw_lr", 1e-5, ["'lr'"]),
    (False, "adamw_betas", (0.5, 0.5), ["'betas'"]),
    (True, "betas", (0.5, 0.5), ["AdamW groups"]),
    (True, "eps", 1e-3, ["AdamW groups"]),
    (True, "adamw_weight_decay", 0.0, ["Muon(adamw_weight_decay=...)"]),
]


@pytest.mark.parametrize("use_muon, key, value, words", IGNORED_KEYS, ids=[f"{u}-{k}" for u, k, _, _ in IGNORED_KEYS])
def test_an_option_a_group_of_its_kind_would_ignore_is_refused_naming_it(use_muon, key, value, words):
    p = torch.nn.Parameter(torch.randn(4, 4))
    kind = "Muon" if use_muon else "AdamW"
    with pytest.raises(ValueError) as e:
        muonkit.Muon([{"params": [p], "use_muon": use_muon, key: value}])
    for word in [f"{kind} group 0", key, repr(value), *words]:
        assert word in message(e), word
    opt = muonkit.Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))]}])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=f"{kind} group 1: {key}"):
        opt.add_param_group({"params": [p], "use_muon": use_muon, key: value})
    assert len(opt.param_groups) == 1 and p not in opt.state and opt.state_dict() == before
    groups = muonkit.param_groups(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), adamw=["2.weight"],
                                  **{"muon_options" if use_muon else "adamw_options": {key: value}})
    with pytest.raises(ValueError, match=key):
        muonkit.Muon(groups)


def test_keys_torch_optim_and_schedulers_add_to_groups_still_load_and_step():
    """Unknown keys (a user's tag, a scheduler's initial_lr) pass as in torch.optim, and OneCycleLR's
    momentum in AdamW groups (docs/API.md) keeps stepping and round-trips."""
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = muonkit.Muon([{"params": [params[0]], "name": "blocks"}, {"params": [params[1]], "use_muon": False, "initial_lr": 0.1}])
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=5)
    assert opt.param_groups[1]["momentum"] > 0
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    again = muonkit.Muon([{"params": [params[0]], "name": "blocks"}, {"params": [params[1]], "use_muon": False}])
    again.load_state_dict(opt.state_dict())
    again.step()


@pytest.mark.parametrize("use_muon, key, meant", [(False, "beta", "betas"), (True, "momentun", "momentum"),
                                                   (True, "weight_decy", "weight_decay")])
def test_a_misspelt_option_warns_naming_the_option_it_resembles(use_muon, key, meant):
    """adamw_options={"beta": ...} was kept as a tag without a word, and the group stepped with the
    default betas; the group is still built (a tag is allowed), with a warning naming the option."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    groups = muonkit.param_groups(model, adamw=["2.weight"],
                                  **{"muon_options" if use_muon else "adamw_options": {key: 0.5}})
    with pytest.warns(UserWarning, match=rf"group \d: {key}=0.5 is not an option .* Did you mean '{meant}'\?"):
        opt = muonkit.Muon(groups)
    assert any(key in g for g in opt.param_groups)
    # Keys torch.optim, schedulers and users put in groups are not near misses.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        muonkit.Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4)), ], "name": "blocks", "initial_lr": 0.1,
                       "max_lr": 0.1, "min_lr": 0.0, "base_momentum": 0.85, "max_momentum": 0.95}])


def test_option_edited_into_a_bad_value_fails_before_anything_changes():
    """A typo written into param_groups after construction is caught by step() before any group
    moves: the earlier group, the decay and the momentum of the bad group all stay as they were."""
    v, w = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6, 8))
    opt = muonkit.Muon([{"params": [v]}, {"params": [w]}], lr=0.02, weight_decay=0.1)
    v.grad, w.grad = torch.randn(6, 8), torch.randn(6, 8)
    opt.step()
    snapshot = _snapshot(opt, [v, w])
    opt.param_groups[1]["scale"] = "moonlite"
    with pytest.raises(ValueError) as e:
        opt.step()
    assert "group 1" in message(e) and "moonlite" in message(e)
    _assert_unchanged(opt, [v, w], snapshot)
    opt.param_groups[1]["amsgrad"] = True
    opt.param_groups[1]["scale"] = "moonlight"
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    _assert_unchanged(opt, [v, w], snapshot)


def test_parameter_appended_to_a_group_gets_state_and_checks_like_torch_optim():
    w = torch.nn.Parameter(torch.randn(6, 8))
    opt = muonkit.Muon([w], lr=0.02)
    q = torch.nn.Parameter(torch.randn(5, 7))
    opt.param_groups[0]["params"].append(q)
    w.grad, q.grad = torch.randn(6, 8), torch.randn(5, 7)
    before = q.detach().clone()
    opt.step()
    assert set(opt.state[q]) == {"momentum_buffer"} and not torch.equal(q.detach(), before)
    vector = torch.nn.Parameter(torch.randn(5))
    opt.param_groups[0]["params"].append(vector)
    vector.grad = torch.randn(5)
    with pytest.raises(ValueError, match="param_groups"):
        opt.step()


@pytest.mark.parametrize("value", [np.float32(0.01), np.float64(0.01), np.int64(0), torch.tensor(0.01)], ids=repr)
def test_numpy_and_tensor_numbers_are_numbers(value):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([p], lr=value, adamw_lr=value, ns_steps=np.int64(3))
    p.grad = torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("bad", [np.float32("nan"), torch.tensor(-1.0), "0.01"], ids=repr)
def test_bad_numbers_still_rejected(bad):
    with pytest.raises(ValueError, match="lr"):
        muonkit.Muon([torch.nn.Parameter(torch.randn(4, 4))], lr=bad)


def test_orthogonalize_checks_its_arguments_even_for_empty_input():
    with pytest.raises(ValueError, match="nonsense"):
        muonkit.orthogonalize(torch.zeros(0, 4), "nonsense")
    with pytest.raises(TypeError, match="2.5"):
        muonkit.orthogonalize(torch.randn(3, 4), steps=2.5)
    with pytest.raises(ValueError, match="-1"):
        muonkit.orthogonalize(torch.zeros(0, 4), steps=-1)


@pytest.mark.parametrize("nesterov", [True, False])
def test_orthogonalizer_that_raises_leaves_its_group_unchanged(nesterov):
    """A user's orthogonalizer returning the wrong shape: the error names it, and the group's momentum
    and parameters are as before the step (the new momentum is only written after it returns)."""
    w = torch.nn.Parameter(torch.randn(6, 8))
    calls = []

    def flaky(X, steps):
        calls.append(1)
        return muonkit.orthogonalize(X, "svd") if len(calls) == 1 else X[..., :-1]

    opt = muonkit.Muon([w], lr=0.02, weight_decay=0.1, nesterov=nesterov, orthogonalizer=flaky)
    w.grad = torch.randn(6, 8)
    opt.step()
    snapshot = _snapshot(opt, [w])
    w.grad = torch.randn(6, 8)
    with pytest.raises(ValueError, match="returned shape"):
        opt.step()
    _assert_unchanged(opt, [w], snapshot)


# From an adversarial review of the variants, low-precision writes, diagnostics and layouts against
# docs/API.md; each test failed before its fix.


@pytest.mark.parametrize("layout", [muonkit.Layout(rows=(0.0,), cols=(1,)),
                                    muonkit.Layout(rows=(0,), cols=(True,)),
                                    muonkit.Layout(rows=(0,), cols=(1,), blocks=((1.0, 2),))], ids=str)
def test_a_layout_axis_that_is_not_an_int_is_refused_naming_the_parameter(layout):
    p = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match="parameter 'w'.*axis"):
        muonkit.Muon([{"params": [("w", p)], "layout": layout}])


@pytest.mark.parametrize("into", [0, 1], ids=["same_group", "other_kind"])
def test_a_parameter_appended_twice_is_refused_before_anything_changes(into):
    """An appended parameter that is already in a group would step twice (Muon and AdamW state
    mixed in one entry): refused, naming both places, with nothing changed."""
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([{"params": [a]}, {"params": [b], "use_muon": False}], lr=0.1)
    opt.param_groups[into]["params"].append(a)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = [a.detach().clone(), b.detach().clone()]
    momentum = opt.state[a]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match=f"group {into}: parameter '#\\d' is also parameter '#0' of Muon group 0"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert list(opt.state[a]) == ["momentum_buffer"] and torch.equal(opt.state[a]["momentum_buffer"], momentum)
