"""Issue 11's defects outside the step: each test fails without its fix.

1 tensor lr of every one-element shape; 2 copies (deepcopy, pickle, torch.save) that step like the
original, and an optimizer with a process group that refuses to be copied; 3 state dicts checked
at load (kinds, state keys, shapes; torch.optim.AdamW and Adam dicts); 8 torch's error for named and
unnamed parameters mixed; 9 a plain-number AdamW step converted on load; 10 torch.optim.Muon state
dicts translated or refused; 11 load_checkpoint on a damaged checkpoint changes nothing; 12 `muonkit
ns` with a size that does not fit in memory.

Oracles are the real things: torch.optim.AdamW / Adam / Muon, torch's own error messages, a real gloo
process group, real damaged checkpoint files. Everything runs on CPU with one thread (conftest.py), so
equal runs are equal bit for bit.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import muonkit
from muonkit.cli import main
from muonkit.distributed import load_checkpoint, save_checkpoint
from reference import assert_same

# ------------------------------------------------------------------------------------- helpers


def mixed(lr=0.02, adamw_lr=3e-3):
    """A Muon group (two 2D weights) and an AdamW group (a vector and a 3D tensor)."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 10, generator=g)), nn.Parameter(torch.randn(10, 6, generator=g)),
              nn.Parameter(torch.randn(6, generator=g)), nn.Parameter(torch.randn(2, 3, 4, generator=g))]
    opt = muonkit.Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}],
                       lr=lr, adamw_lr=adamw_lr, weight_decay=0.1)
    return params, opt


def grads_for(params, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g) for p in params]


def step(opt, params, t):
    for p, g in zip(params, grads_for(params, t)):
        p.grad = g
    opt.step()


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


# ------------------------------------------------------------------------ 1. tensor lr shapes


@pytest.mark.parametrize("fused", [None, False], ids=["default", "fused_false"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
def test_tensor_lr_of_any_one_element_shape_steps_both_kinds(shape, fused):
    """As torch.optim accepts lr as a one-element tensor of any shape: Muon groups step exactly as
    with the tensor's value as a float; AdamW groups exactly as torch.optim.AdamW given the same
    tensor (by default its fused kernel, with fused=False its default implementation)."""
    lr = torch.full(shape, 0.02)
    ours, opt = mixed(lr=lr, adamw_lr=lr)
    floats, opt_float = mixed(lr=lr.item(), adamw_lr=lr.item())
    opt.param_groups[1]["fused"] = fused
    theirs = [p.detach().clone().requires_grad_() for p in ours[2:]]
    torch_adamw = torch.optim.AdamW(theirs, lr=lr, weight_decay=0.1, fused=fused is None)
    for t in range(3):
        step(opt, ours, t)
        step(opt_float, floats, t)
        for p, g in zip(theirs, grads_for(ours, t)[2:]):
            p.grad = g
        torch_adamw.step()
    assert opt.param_groups[0]["lr"] is lr  # kept as given, so a scheduler can update it in place
    for a, b in zip(ours[:2], floats[:2]):
        assert torch.equal(a, b)
    for a, b in zip(ours[2:], theirs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- 2. copies


def _pickle(opt):
    return pickle.loads(pickle.dumps(opt))


def _torch_save(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_steps_exactly_like_the_original(make_copy):
    params, opt = mixed()
    for t in range(2):
        step(opt, params, t)
    twin = make_copy(opt)
    twin_params = params_of(twin)  # the copy's own copies of the parameters
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, twin_params))
    for t in range(2, 5):
        step(opt, params, t)
        step(twin, twin_params, t)
    assert twin.bytes_sent == 0
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert_same(opt.state_dict(), twin.state_dict())


def test_an_optimizer_with_a_process_group_refuses_to_be_copied(tmp_path):
    """A real gloo group of one process: stepping works, every way of copying the optimizer raises
    a TypeError that says what to do instead."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        W = nn.Parameter(torch.randn(8, 16))
        opt = muonkit.Muon([W], lr=0.02, process_group=dist.group.WORLD)
        W.grad = torch.randn(8, 16)
        opt.step()
        for make_copy in (copy.deepcopy, copy.copy, pickle.dumps, lambda o: torch.save(o, io.BytesIO())):
            with pytest.raises(TypeError, match=r"process_group.*Save opt\.state_dict\(\)"):
                make_copy(opt)
        opt.step()  # still usable
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ 3. checked state-dict loads


def _torch_adamw_run(cls=torch.optim.AdamW, **kw):
    g = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(6, generator=g)), nn.Parameter(torch.randn(3, 4, generator=g))]
    opt = cls(params, **kw)
    for t in range(3):
        step(opt, params, t)
    return params, opt


@pytest.mark.parametrize("fused", [None, False], ids=["default", "fused_false"])
def test_torch_adamw_state_dict_loads_into_adamw_groups_and_continues_bit_for_bit(fused):
    """torch.optim.AdamW()'s state dict loads and continues as torch.optim.AdamW would with the same
    kernel: by default (fused=None, as torch saved it) torch's fused kernel on CPU, so as that
    optimizer switched to fused=True; with the group's fused set to False, as it continues."""
    theirs, torch_opt = _torch_adamw_run(lr=3e-3, betas=(0.85, 0.98), weight_decay=0.05)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = muonkit.Muon([{"params": ours, "use_muon": False}], lr=0.1, weight_decay=0.3)
    # As torch.optim's own tests do: state_dict() returns the live tensors, and load_state_dict keeps
    # tensors that need no cast, so loading it as it is would share the state of the two optimizers.
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    torch_only = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay"}
    assert not torch_only & set(opt.param_groups[0])
    assert opt.param_groups[0]["fused"] is None  # torch's saved option, muonkit's too (tests/test_fused_adamw.py)
    assert opt.param_groups[0]["use_muon"] is False and opt.param_groups[0]["betas"] == (0.85, 0.98)
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["weight_decay"] == 0.05
    opt.param_groups[0]["fused"] = fused
    torch_opt.param_groups[0]["fused"] = fused is None
    for t in range(3, 6):
        step(torch_opt, theirs, t)
        step(opt, ours, t)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], torch_opt.state[b][key])


def test_torch_adam_state_dict_loads_without_weight_decay_and_is_refused_with_l2_decay():
    theirs, adam = _torch_adamw_run(torch.optim.Adam, lr=3e-3)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = muonkit.Muon([{"params": ours, "use_muon": False}], lr=0.1)
    opt.load_state_dict(copy.deepcopy(adam.state_dict()))
    step(adam, theirs, 3)
    step(opt, ours, 3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    _, l2 = _torch_adamw_run(torch.optim.Adam, lr=3e-3, weight_decay=0.01)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"AdamW group 0.*torch\.optim\.Adam's, with L2 weight decay"):
        opt.load_state_dict(l2.state_dict())
    assert_same(opt.state_dict(), before)


def _damage_wrong_kind_state(sd):
    # AdamW state of another parameter's shape: another model's. (Of this parameter's shape it is what a
    # parameter moved from an AdamW group and saved before its next step holds: loaded fresh, as that step
    # makes it; test_state_dict.py.)
    first = sd["param_groups"][0]["params"][0]
    sd["state"][first] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(10, 6), "exp_avg_sq": torch.zeros(10, 6)}


def _damage_buffer_shape(sd):
    sd["state"][sd["param_groups"][0]["params"][1]]["momentum_buffer"] = torch.zeros(6, 10)


def _damage_exp_avg_shape(sd):
    sd["state"][sd["param_groups"][1]["params"][1]]["exp_avg"] = torch.zeros(2, 12)


def _damage_incomplete_adamw_state(sd):
    del sd["state"][sd["param_groups"][1]["params"][0]]["exp_avg_sq"]


def _damage_step_shape(sd):
    sd["state"][sd["param_groups"][1]["params"][0]]["step"] = torch.tensor([1.0, 2.0])


def _damage_muon_on_vectors(sd):
    sd["param_groups"][1]["use_muon"] = True


def _damage_adamw_keys_without_use_muon(sd):
    group = sd["param_groups"][0]
    del group["use_muon"]
    group["betas"] = (0.9, 0.999)


def _damage_layout(sd):
    sd["param_groups"][0]["layout"] = muonkit.Layout(rows=(1,), cols=(2,), batch=(0,))  # for 3D tensors


def _damage_bad_option(sd):
    sd["param_groups"][1]["betas"] = (0.9, 1.5)


@pytest.mark.parametrize("damage, words", [
    (_damage_wrong_kind_state, r"Muon group 0: parameter '#0': state has keys \['exp_avg', 'exp_avg_sq', 'step'\]"),
    (_damage_buffer_shape, r"Muon group 0: parameter '#1': momentum_buffer should be a floating tensor of shape "
                           r"\(10, 6\), got a tensor of shape \(6, 10\)"),
    (_damage_exp_avg_shape, r"AdamW group 1: parameter '#1': exp_avg should be a floating tensor of shape \(2, 3, 4\)"),
    (_damage_incomplete_adamw_state, r"AdamW group 1: parameter '#0': state has keys \['exp_avg', 'step'\]"),
    (_damage_step_shape, r"AdamW group 1: parameter '#0': step should be a floating tensor of shape \(\)"),
    (_damage_muon_on_vectors, r"AdamW group 1: the state dict's group 1 is a Muon group \(use_muon=True\)"),
    (_damage_adamw_keys_without_use_muon, r"Muon group 0: the state dict's group 0 is an AdamW group \(no use_muon, and betas"),
    (_damage_layout, r"Muon group 0: parameter '#0' with shape \(6, 10\)"),
    (_damage_bad_option, r"AdamW group 1: betas\[1\] must be in \[0, 1\)"),
], ids=lambda x: x.__name__[len("_damage_"):] if callable(x) else "")
def test_a_state_dict_that_does_not_fit_is_refused_at_load_and_changes_nothing(damage, words):
    params, opt = mixed()
    for t in range(2):
        step(opt, params, t)
    sd = copy.deepcopy(opt.state_dict())
    damage(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="load_state_dict: " + words):
        opt.load_state_dict(sd)
    assert_same(opt.state_dict(), before)
    step(opt, params, 2)  # and it still steps


def test_loaded_state_is_cast_like_torch_and_filled_where_missing():
    """A muonkit state dict whose state lacks a parameter (as torch's lazily created state does)
    loads with fresh state for it, and the next steps equal a run that never lost it."""
    params, opt = mixed()
    step(opt, params, 0)
    sd = copy.deepcopy(opt.state_dict())
    untouched = params_of(opt)[3]
    untouched_id = sd["param_groups"][1]["params"][1]
    assert torch.count_nonzero(opt.state[untouched]["exp_avg"]) > 0
    params2, opt2 = mixed()
    for p, q in zip(params2, params):
        p.data.copy_(q)
    del sd["state"][untouched_id]
    opt2.load_state_dict(sd)
    assert set(opt2.state[params2[3]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt2.state[params2[3]]["step"].item() == 0.0


# --------------------------------------------------------------- 8. named and unnamed params


def _torch_error(params):
    with pytest.raises(ValueError) as e:
        torch.optim.AdamW(params)
    return str(e.value)


def test_named_and_unnamed_params_mixed_in_a_group_raise_torchs_value_error():
    W, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4))
    expected = _torch_error([("w", W), b])
    for params in ([("w", W), b], [W, ("b", b)]):
        with pytest.raises(ValueError) as e:
            muonkit.Muon([{"params": params, "use_muon": False}])
        assert str(e.value).startswith(expected), (str(e.value), expected)


def test_named_and_unnamed_groups_mixed_raise_torchs_value_error_and_add_nothing():
    W, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4))
    expected = _torch_error([{"params": [("w", W)]}, {"params": [b]}])
    with pytest.raises(ValueError, match=re.escape(expected)):
        muonkit.Muon([{"params": [("w", W)]}, {"params": [b], "use_muon": False}])
    opt = muonkit.Muon([("w", W)])
    with pytest.raises(ValueError, match=re.escape(expected)):
        opt.add_param_group({"params": [b], "use_muon": False})
    assert len(opt.param_groups) == 1 and set(opt.state) == {W}


# ----------------------------------------------------------------- 9. plain-number AdamW step


@pytest.mark.parametrize("as_number", [float, int], ids=["float", "int"])
def test_plain_number_step_is_converted_on_load_like_torch_adamw(as_number):
    params, opt = mixed()
    for t in range(3):
        step(opt, params, t)
    sd = opt.state_dict()
    old = copy.deepcopy(sd)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = as_number(state["step"].item())
    clones = [p.detach().clone().requires_grad_() for p in params]
    params2, opt2 = mixed()
    for p, q in zip(params2, clones):
        p.data.copy_(q)
    opt2.load_state_dict(old)
    for p in params2[2:]:
        s = opt2.state[p]["step"]
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.ndim == 0 and s.item() == 3.0
    for t in range(3, 5):
        step(opt, params, t)
        step(opt2, params2, t)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert_same(opt.state_dict(), opt2.state_dict())


# ---------------------------------------------------------------- 10. torch.optim.Muon dicts

TORCH_MUON_STEPS = 4
TORCH_MUON_LR = 0.05


def _torch_muon_then_ours(adjust_lr_fn, nesterov, shape=(16, 48)):
    g = torch.Generator().manual_seed(3)
    theirs = nn.Parameter(0.5 * torch.randn(shape, generator=g))
    grads = [torch.randn(shape, generator=g) * 10.0 ** (t % 3 - 1) for t in range(1 + TORCH_MUON_STEPS)]
    torch_opt = torch.optim.Muon([theirs], lr=TORCH_MUON_LR, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                 adjust_lr_fn=adjust_lr_fn)
    theirs.grad = grads[0].clone()
    torch_opt.step()
    ours = nn.Parameter(theirs.detach().clone())
    opt = muonkit.Muon([ours], lr=1.0, momentum=0.5, nesterov=not nesterov, weight_decay=0.0)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    return theirs, torch_opt, ours, opt, grads[1:]


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("adjust_lr_fn, scale", [(None, "keller_jordan"), ("original", "keller_jordan"),
                                                 ("match_rms_adamw", "moonlight")])
def test_torch_muon_state_dict_loads_translated_and_continues_like_torch(adjust_lr_fn, scale, nesterov):
    """torch.optim.Muon trained a step, its state dict loaded into muonkit.Muon: the group is
    translated, and the next steps agree with torch's (fp32 vs bf16 Newton-Schulz: the tolerance of
    tests/test_torch_parity.py, 5% of the update budget sum_t lr*scale*||O_t||_F)."""
    theirs, torch_opt, ours, opt, grads = _torch_muon_then_ours(adjust_lr_fn, nesterov)
    group = opt.param_groups[0]
    assert not {"adjust_lr_fn", "ns_coefficients", "eps"} & set(group)
    assert (group["scale"], group["orthogonalizer"], group["momentum"], group["nesterov"]) == (
        scale, "keller_jordan", 0.9, nesterov)
    assert group["lr"] == TORCH_MUON_LR and group["weight_decay"] == 0.1 and group["ns_steps"] == 5
    if scale == "moonlight":
        assert group["rms"] == 0.2
    assert torch.equal(opt.state[ours]["momentum_buffer"], torch_opt.state[theirs]["momentum_buffer"])
    for g in grads:
        theirs.grad, ours.grad = g.clone(), g.clone()
        torch_opt.step()
        opt.step()
    rows, cols = theirs.shape
    factor = {"keller_jordan": math.sqrt(max(1, rows / cols)), "moonlight": 0.2 * math.sqrt(max(rows, cols))}[scale]
    budget = TORCH_MUON_STEPS * TORCH_MUON_LR * factor * 1.21 * math.sqrt(min(rows, cols))
    err = torch.linalg.matrix_norm(ours.detach() - theirs.detach()).item()
    assert err <= 0.05 * budget, (err, budget)


def _torch_muon_dict(**kw):
    W = nn.Parameter(torch.randn(8, 12))
    torch_opt = torch.optim.Muon([W], **kw)
    W.grad = torch.randn(8, 12)
    torch_opt.step()
    return torch_opt.state_dict()


def _with_adjust_lr_fn(name):
    sd = _torch_muon_dict()
    sd["param_groups"][0]["adjust_lr_fn"] = name  # torch.optim.Muon refuses it at construction
    return sd


@pytest.mark.parametrize("make_dict, words", [
    (lambda: _torch_muon_dict(ns_coefficients=(3.4, -4.7, 2.0)), r"ns_coefficients=\(3\.4, -4\.7, 2\.0\) have no muonkit equivalent"),
    (lambda: _torch_muon_dict(eps=1e-8), r"eps=1e-08 has no muonkit equivalent"),
    (lambda: _with_adjust_lr_fn("arbitrary"), r"adjust_lr_fn='arbitrary' has no muonkit equivalent"),
], ids=["ns_coefficients", "eps", "adjust_lr_fn"])
def test_torch_muon_options_without_a_muonkit_equivalent_are_refused(make_dict, words):
    W = nn.Parameter(torch.randn(8, 12))
    opt = muonkit.Muon([W], lr=0.02)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="load_state_dict: Muon group 0: torch.optim.Muon's " + words):
        opt.load_state_dict(make_dict())
    assert_same(opt.state_dict(), before)


# ------------------------------------------------------------ 11. damaged distributed checkpoints


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    opt = muonkit.Muon(muonkit.param_groups(model), lr=0.02)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    return model, opt


def _truncate(path):
    (data,) = path.glob("*.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def _delete(path):
    (data,) = path.glob("*.distcp")
    data.unlink()


def _corrupt_metadata(path):
    (path / ".metadata").write_bytes(b"not a pickle")


@pytest.mark.parametrize("damage", [_truncate, _delete, _corrupt_metadata], ids=["truncated", "deleted", "metadata"])
def test_load_checkpoint_of_a_damaged_checkpoint_changes_nothing_and_raises_an_exception(tmp_path, damage):
    saved_model, saved_opt = _model_and_opt(0)
    path = tmp_path / "checkpoint"
    save_checkpoint(path, saved_model, saved_opt)
    damage(path)
    model, opt = _model_and_opt(1)
    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(Exception, match=re.escape(repr(str(path)))):  # an Exception, not only a BaseException
        load_checkpoint(path, model, opt)
    assert_same(model.state_dict(), model_before, "model")
    assert_same(opt.state_dict(), opt_before, "optimizer")


def test_load_checkpoint_still_loads_an_intact_checkpoint(tmp_path):
    saved_model, saved_opt = _model_and_opt(0)
    save_checkpoint(tmp_path / "checkpoint", saved_model, saved_opt)
    model, opt = _model_and_opt(1)
    load_checkpoint(tmp_path / "checkpoint", model, opt)
    assert_same(model.state_dict(), saved_model.state_dict(), "model")
    assert_same(opt.state_dict()["state"], saved_opt.state_dict()["state"], "optimizer")


def test_load_checkpoint_of_another_model_with_second_moments_names_the_path_and_the_keys(tmp_path):
    """review issue-rv2: a NorMuon checkpoint (second moments) loaded into another model: the
    ValueError naming the checkpoint and the mis-shaped key, not a TypeError from building it (the
    second-moment loop had rebound the name of the checkpoint's path)."""
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 8))
    opt = muonkit.Muon([{"params": [saved[1].weight]}, {"params": [saved[0].weight, saved[0].bias, saved[1].bias],
                                                          "use_muon": False}], variant="normuon")
    save_checkpoint(tmp_path / "checkpoint", saved, opt)
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 9))
    other_opt = muonkit.Muon([{"params": [other[1].weight]}, {"params": [other[0].weight, other[0].bias, other[1].bias],
                                                              "use_muon": False}])
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path / "checkpoint"))) + r".*1\.weight: checkpoint \(8, 8\)"):
        load_checkpoint(tmp_path / "checkpoint", other, other_opt)


# ------------------------------------------------------------------------ 12. muonkit ns --size


def _one_line_exit_2(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_ns_with_a_size_beyond_memory_prints_one_line_and_exits_2(tmp_path, capsys):
    err = _one_line_exit_2(["ns", "--size", "1000000x1000000", "--out", str(tmp_path / "ns")], capsys)
    assert "--size 1000000x1000000 is too large for this machine's memory" in err
    assert not (tmp_path / "ns").exists()


def test_ns_with_an_allocation_that_fails_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    """When the memory estimate lets a size through (here: it is told of 4 EiB), the allocator's own
    failure (4 TB of float32) is reported the same way."""
    from muonkit.tasks import nscompare

    monkeypatch.setattr(nscompare, "memory_available", lambda: 1 << 62)
    err = _one_line_exit_2(["ns", "--size", "1000000x1000000", "--out", str(tmp_path / "ns")], capsys)
    assert "an allocation failed" in err


# ------------------------------------------------------------- issue 18: seven more defects


def snapshot(opt):
    """Every parameter and state tensor of `opt`, cloned, in a fixed order."""
    params = params_of(opt)
    return [p.detach().clone() for p in params] + [
        (i, k, v.clone()) for i, p in enumerate(params) for k, v in sorted(opt.state.get(p, {}).items())
        if isinstance(v, torch.Tensor)]


def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        if isinstance(a, tuple):
            assert a[:2] == b[:2] and torch.equal(a[2], b[2]), a[:2]
        else:
            assert torch.equal(a, b)


def test_qkclip_leaves_a_head_with_an_infinite_max_logit_as_it_is_counts_and_warns_once():
    """Issue 18.1: gamma = tau / inf = 0 would zero the head's query and key rows for good. The head
    with +inf (and one with NaN) keeps its rows bit for bit; the finite head over tau is still clipped
    by Kimi K2's rule; the count is kept and the warning comes once."""
    from muonkit.qkclip import QKClip

    g = torch.Generator().manual_seed(0)
    q, k = nn.Parameter(torch.randn(12, 5, generator=g)), nn.Parameter(torch.randn(12, 5, generator=g))
    q0, k0 = q.detach().clone(), k.detach().clone()
    clip = QKClip([(q, k)], heads=3, tau=10.0)
    clip.observe(0, torch.tensor([math.inf, 40.0, 1.0]))
    with pytest.warns(RuntimeWarning, match="NaN or \\+inf"):
        clip.step()
    assert torch.equal(q[:4], q0[:4]) and torch.equal(k[:4], k0[:4])  # head 0: untouched
    root = math.sqrt(10.0 / 40.0)
    assert torch.equal(q[4:8], q0[4:8] * root) and torch.equal(k[4:8], k0[4:8] * root)
    assert torch.equal(q[8:], q0[8:]) and torch.equal(k[8:], k0[8:])
    assert clip.nonfinite_maxima == 1
    clip.observe(0, torch.tensor([math.nan, math.inf, 1.0]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        clip.step()
    assert clip.nonfinite_maxima == 3
    assert torch.equal(q[:4], q0[:4]) and torch.equal(q[4:8], q0[4:8] * root)


@pytest.mark.parametrize("fused", [None, False], ids=["default", "fused_false"])
@pytest.mark.parametrize("key", ["eps", "weight_decay"])
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["1", "1x1"])
def test_tensor_eps_and_weight_decay_of_one_element_step_an_adamw_group_like_torch(key, shape, fused):
    """Issue 18.2: an AdamW group's eps or weight_decay as a one-element tensor (torch.optim.AdamW takes
    shape [1]) steps exactly as torch.optim.AdamW given its 0-d value, on the fused kernel (the
    default) and on muonkit's foreach path for float32 groups (fused=False), and after the Muon
    group moved nothing fails."""
    value = torch.full(shape, 0.01 if key == "eps" else 0.1)
    ours, opt = mixed()
    opt.param_groups[1][key] = value
    opt.param_groups[1]["fused"] = fused
    theirs = [p.detach().clone().requires_grad_() for p in ours[2:]]
    torch_adamw = torch.optim.AdamW(theirs, lr=3e-3, **{"fused": True} if fused is None else {"foreach": False},
                                    **{"weight_decay": 0.1, key: value.reshape(())})
    for t in range(3):
        step(opt, ours, t)
        for p, g in zip(theirs, grads_for(ours, t)[2:]):
            p.grad = g
        torch_adamw.step()
    for a, b in zip(ours[2:], theirs):
        assert torch.equal(a, b)
    assert opt.param_groups[1][key] is value


def test_a_variant_switch_leaves_parameters_without_a_gradient_loadable_by_both_paths(tmp_path):
    """Issue 18.3: after NorMuon -> AdaMuon mid-run, a parameter that got no gradient had kept NorMuon's
    per-row second moment, and load_checkpoint refused the checkpoint for an AdaMuon optimizer while
    load_state_dict loaded it. Now the switch gives every parameter of the group AdaMuon's (zeros), and
    a checkpoint with the old moment (as written before the fix) loads through both paths alike."""

    def build(variant):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False))
        return model, muonkit.Muon([{"params": list(model.parameters()), "variant": variant}], lr=0.02)

    model, opt = build("normuon")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["variant"] = "adamuon"
    model[1].weight.grad = None
    opt.step()
    idle = model[1].weight
    assert opt.state[idle]["second_moment"].shape == idle.shape and not opt.state[idle]["second_moment"].any()
    save_checkpoint(tmp_path / "now", model, opt)
    model_b, opt_b = build("adamuon")
    load_checkpoint(tmp_path / "now", model_b, opt_b)
    assert_same(opt.state_dict(), opt_b.state_dict())

    opt.state[idle]["second_moment"] = torch.rand(4, 1)  # what the step left before the fix
    save_checkpoint(tmp_path / "stale", model, opt)
    model_c, opt_c = build("adamuon")
    model_d, opt_d = build("adamuon")
    load_checkpoint(tmp_path / "stale", model_c, opt_c)
    model_d.load_state_dict(model.state_dict())
    opt_d.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_same(opt_c.state_dict(), opt_d.state_dict())
    assert not opt_c.state[model_c[1].weight]["second_moment"].any()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1),
    lambda p: torch.optim.RMSprop([p], lr=0.01, momentum=0.9),
    lambda p: torch.optim.RAdam([p]),
    lambda p: torch.optim.NAdam([p]),
    lambda p: torch.optim.Adagrad([p]),
], ids=["SGD", "RMSprop", "RAdam", "NAdam", "Adagrad"])
@pytest.mark.parametrize("use_muon", [True, False], ids=["muon", "adamw"])
def test_a_state_dict_of_another_torch_optimizer_is_refused_by_name_and_changes_nothing(make, use_muon):
    """Issue 18.4: torch.optim.SGD's state dict loaded into a Muon group (its L2 decay read as decoupled,
    dampening ignored, its buffer read as Muon's). Only muonkit's, torch AdamW/Adam's and torch Muon's
    load; any other optimizer's is refused, naming it, before anything changes."""
    params, opt = mixed()
    step(opt, params, 0)
    target = params[0] if use_muon else params[2]
    other = nn.Parameter(target.detach().clone())
    foreign = make(other)
    other.grad = torch.randn_like(other)
    foreign.step()
    sd = opt.state_dict()
    group = 0 if use_muon else 1
    sd["param_groups"][group] = {**foreign.state_dict()["param_groups"][0],
                                 "params": sd["param_groups"][group]["params"]}
    sd["state"][sd["param_groups"][group]["params"][0]] = foreign.state_dict()["state"][0]
    name = {"RAdam": "RAdam, Adamax", "Adagrad": "torch.optim.Adagrad's"}.get(type(foreign).__name__, type(foreign).__name__)
    before, groups = snapshot(opt), copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=rf"load_state_dict: \w+ group {group}: .*{name}"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups]


@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd"])
def test_a_parameter_that_overlaps_itself_is_refused_where_it_enters(orthogonalizer):
    """Issue 18.5: nn.Parameter(row.expand(6, 8)) failed its in-place update only after earlier groups
    moved. Refused at construction, in add_param_group and (appended to a group) at step(), naming it,
    with nothing changed; views that do not overlap (transposed, strided) are accepted."""
    row = torch.randn(8)
    params, opt = mixed()
    with pytest.raises(ValueError, match="parameter 'bad' with shape \\(6, 8\\) and strides \\(0, 1\\)"):
        muonkit.Muon([("ok", params[0]), ("bad", nn.Parameter(row.expand(6, 8)))], orthogonalizer=orthogonalizer)
    with pytest.raises(ValueError, match="AdamW group 2: parameter '#0'"):
        opt.add_param_group({"params": [nn.Parameter(row.expand(3, 8))], "use_muon": False})
    assert len(opt.param_groups) == 2
    opt.param_groups[0]["orthogonalizer"] = orthogonalizer
    bad = nn.Parameter(row.expand(6, 8))
    opt.param_groups[1]["params"].append(bad)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    bad.grad = torch.randn(6, 8)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="AdamW group 1: parameter '#2'.*share memory"):
        opt.step()
    assert_unchanged(opt, before)
    base = torch.randn(8, 12)
    fine = [nn.Parameter(base.t()), nn.Parameter(base[:, ::3]), nn.Parameter(base[::2, 1:])]
    muonkit.Muon(fine)


@pytest.mark.parametrize("value, error, words", [
    (False, ValueError, "use_muon is False but the group has no 'betas', 'eps'"),
    (1, TypeError, "use_muon must be True or False, got 1"),
    (None, TypeError, "use_muon must be True or False, got None"),
])
def test_editing_use_muon_names_the_group_and_key_and_changes_nothing(value, error, words):
    """Issue 18.6: a bare KeyError('betas') / KeyError('momentum') at the next step."""
    params, opt = mixed()
    step(opt, params, 0)
    opt.param_groups[0]["use_muon"] = value
    before = snapshot(opt)
    with pytest.raises(error, match=re.escape(words)):
        step(opt, params, 1)
    assert_unchanged(opt, before)
    opt.param_groups[0]["use_muon"] = True
    opt.param_groups[1]["use_muon"] = True
    with pytest.raises(ValueError, match="Muon group 1: use_muon is True but the group has no 'momentum'"):
        step(opt, params, 1)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("argv, words", [
    (["ns", "--seed", "100000000000000000000"], "argument --seed: expected an integer in [-2**63, 2**64)"),
    (["ns", "--seed", "-9223372036854775809"], "argument --seed"),
    (["bench", "regression", "--threads", "99999999999"], "argument --threads: expected a positive integer of at most"),
])
def test_cli_integers_beyond_torchs_range_print_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, words):
    """Issue 18.7: a traceback and exit 1, and `ns` had already made its --out directory."""
    err = _one_line_exit_2([*argv, "--out", str(tmp_path / "out")], capsys)
    assert words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape, state_dtype", [((1,), torch.float64), ((1, 1), None)], ids=["1-float64-state", "1x1"])
def test_tensor_betas_with_cautious_weight_decay_step_like_float_betas(shape, state_dtype):
    """Found by tests/test_properties.py: an AdamW group with tensor betas and cautious weight decay
    failed after the Muon group moved (float32 beta1 mixed into float64 moments; a [1, 1] beta1
    broadcast a 1-D moment to 2-D). It steps as with the betas' values as floats."""
    runs = []
    for betas in [(torch.full(shape, 0.9), torch.full(shape, 0.99)), (0.9, 0.99)]:
        params, opt = mixed()
        opt.param_groups[1].update(betas=betas, cautious_weight_decay=True, state_dtype=state_dtype)
        for t in range(2):
            step(opt, params, t)
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
