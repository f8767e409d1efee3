"""torch.optim's generic optimizer checks, written for muonkit.Muon.

PyTorch checks every optimizer with the same tests (test/test_optim.py, class TestOptimRenewed,
driven by the OptimizerInfo entries of torch/testing/_internal/common_optimizers.py). These are
muonkit's own tests modelled on them, for three configurations: "muon" (two Muon groups of 2D
parameters), "adamw" (two AdamW groups) and "mixed" (a Muon group and an AdamW group). Where torch
only checks that something runs or that the loss goes down, these also compare with an oracle when
one exists: the same run with a float lr, the uninterrupted run, torch.optim.SGD driven by the same
schedulers, torch.optim.AdamW on zero gradients.

torch's checks that do not apply, and why:

- test_errors: muonkit's own table of bad inputs is tests/test_errors.py.
- foreach / fused / capturable / differentiable implementations (test_foreach_matches_forloop,
  test_fused_matches_forloop, test_peak_memory_foreach, test_defaults_changed_to_foreach,
  test_set_default_dtype_works_with_foreach, test_foreach_large_tensor, test_fused_large_tensor,
  test_cpu_load_state_dict, test_fused_cpu_matches_cuda, test_fused_does_not_step_if_foundinf,
  test_fused_error_on_params_on_meta, test_optim_infos_do_not_specify_global_cliquey_kwargs):
  muonkit has one implementation per kind of group and no such flags (stacked == per-matrix is
  tests/test_speed_contracts.py).
- test_complex, test_complex_2d: complex parameters are refused (tests/test_errors.py).
- test_rosenbrock_sparse: sparse gradients are refused (tests/test_errors.py).
- maximize=True inputs: refused, not implemented (tests/test_errors.py).
- test_forloop_goes_right_direction_multigpu, test_state_dict_with_cuda_params,
  test_mixed_device_dtype: the suite runs on CPU (CUDA cases would sit behind the `cuda` marker).
- test_second_order_optims_return_consistent_types: for closure-driven optimizers (LBFGS).
- test_non_empty_state: muonkit creates every parameter's state at construction (checked in
  test_step_is_noop_when_params_have_no_grad).
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.nn as nn
from torch.optim import SGD
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import muonkit
from reference import assert_same

CONFIGS = ["muon", "adamw", "mixed"]
NAMES = ("w1", "w2", "b")
LR = 0.02
ADAMW_LR = 3e-3


# ------------------------------------------------------------------------------ the problem


def make_params(seed=0, contiguous=True, config="mixed"):
    """w1 (6, 5), w2 (4, 6) and b (4,); b is a constant when every group is a Muon group."""
    g = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=1.0):
        values = scale * torch.randn(*shape, generator=g)
        if contiguous:
            return values
        holder = torch.zeros(*shape, 2)
        holder[..., 0] = values
        return holder[..., 0]  # the same values, every other element of its storage

    w1, w2, b = nn.Parameter(tensor(6, 5, scale=0.5)), nn.Parameter(tensor(4, 6, scale=0.5)), nn.Parameter(tensor(4))
    b.requires_grad_(config != "muon")
    return {"w1": w1, "w2": w2, "b": b}


def group_list(config, params, named=False, lrs=(None, None)):
    """Two param groups of the configuration; lrs[i] (when given) is group i's own lr."""
    def entries(*names):
        return [(n, params[n]) if named else params[n] for n in names]

    if config == "muon":
        groups = [{"params": entries("w1")}, {"params": entries("w2"), "weight_decay": 0.0}]
    elif config == "adamw":
        groups = [{"params": entries("w1", "w2"), "use_muon": False},
                  {"params": entries("b"), "use_muon": False, "weight_decay": 0.0}]
    else:
        groups = [{"params": entries("w1", "w2")}, {"params": entries("b"), "use_muon": False}]
    for group, lr in zip(groups, lrs):
        if lr is not None:
            group["lr"] = lr
    return groups


def build(config, seed=0, named=False, contiguous=True, lrs=(None, None), **kw):
    params = make_params(seed, contiguous, config)
    kw = {"lr": LR, "adamw_lr": ADAMW_LR, "weight_decay": 0.1, **kw}
    return params, muonkit.Muon(group_list(config, params, named, lrs), **kw)


_G = torch.Generator().manual_seed(7)
INPUT = torch.randn(5, 8, generator=_G)
TARGET = torch.randn(4, 8, generator=_G)


def loss_of(params):
    hidden = torch.tanh(params["w1"] @ INPUT)
    return (params["w2"] @ hidden + params["b"][:, None] - TARGET).pow(2).mean()


def closure(opt, params):
    opt.zero_grad()
    loss = loss_of(params)
    loss.backward()
    return loss


def run(opt, params, steps):
    for _ in range(steps):
        opt.step(functools.partial(closure, opt, params))


def clone_params(params, config):
    with torch.no_grad():
        return {n: nn.Parameter(p.clone(), requires_grad=p.requires_grad) for n, p in params.items()}


def assert_params_equal(a, b):
    for name in NAMES:
        assert torch.equal(a[name], b[name]), name


def without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


# -------------------------------------------------------------------------------- tensor lr


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("config", CONFIGS)
def test_tensor_lr(config, shape):
    """A one-element tensor lr of any shape steps like the same lr as a float (torch's tolerance
    for float32: an AdamW group computes with the tensor, a Muon group with its value)."""
    lrs = (torch.full(shape, LR), torch.full(shape, ADAMW_LR if config != "muon" else LR / 2))
    floats, opt_float = build(config, lrs=tuple(lr.item() for lr in lrs))
    tensors, opt = build(config, lrs=lrs)
    run(opt_float, floats, 5)
    run(opt, tensors, 5)
    for name in NAMES:
        torch.testing.assert_close(tensors[name], floats[name])
    assert all(group["lr"] is lr for group, lr in zip(opt.param_groups, lrs))


# ------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("config", CONFIGS)
def test_two_identical_runs_give_identical_state_dicts(config):
    a, opt_a = build(config)
    b, opt_b = build(config)
    run(opt_a, a, 4)
    run(opt_b, b, 4)
    assert_same(opt_a.state_dict(), opt_b.state_dict())


@pytest.mark.parametrize("named1", [True, False], ids=["to_named", "to_unnamed"])
@pytest.mark.parametrize("named0", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_deterministic(config, named0, named1):
    """A loaded optimizer gives back the state dict it loaded, and then steps bit for bit like the
    one it came from; their state dicts stay equal (apart from optional parameter names)."""
    params, opt = build(config, named=named0)
    run(opt, params, 5)
    params_c = clone_params(params, config)
    _, opt_c = None, muonkit.Muon(group_list(config, params_c, named1), lr=LR, adamw_lr=ADAMW_LR, weight_decay=0.1)
    saved = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(copy.deepcopy(saved))
    loaded = opt_c.state_dict()
    if named0 or not named1:
        assert_same(loaded, saved)
    else:  # a state dict without names keeps the loading optimizer's names
        assert_same(without_param_names(loaded), saved)
    for _ in range(5):
        run(opt, params, 1)
        run(opt_c, params_c, 1)
        assert_params_equal(params, params_c)
    assert_same(without_param_names(opt.state_dict()), without_param_names(opt_c.state_dict()))
    # repeated groups have the same representation (pytorch/pytorch#36831)
    opt_c.param_groups.extend(opt_c.param_groups)
    assert_same(without_param_names(opt.state_dict())["param_groups"][-1],
                without_param_names(opt_c.state_dict())["param_groups"][-1])


OLDER_KEYS = {True: {"params", "use_muon", "lr", "momentum", "nesterov", "weight_decay"},
              False: {"params", "use_muon", "lr", "betas", "eps", "weight_decay"}}


@pytest.mark.parametrize("config", CONFIGS)
def test_can_load_older_state_dict(config):
    """A state dict holding only the keys torch's optimizers have (later keys deleted) loads; the
    missing keys come from the constructor, and the run continues bit for bit."""
    params, opt = build(config)
    run(opt, params, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in set(group) - OLDER_KEYS[group["use_muon"]]:
            del group[key]
    params_c = clone_params(params, config)
    _, opt_c = None, muonkit.Muon(group_list(config, params_c), lr=LR, adamw_lr=ADAMW_LR, weight_decay=0.1)
    opt_c.load_state_dict(old)
    run(opt, params, 3)
    run(opt_c, params_c, 3)
    assert_params_equal(params, params_c)


@pytest.mark.parametrize("config", CONFIGS)
def test_load_nontensor_step(config):
    """AdamW's step as a plain number (torch's older format) loads as a float32 tensor and the run
    continues bit for bit."""
    params, opt = build(config)
    run(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    params_c = clone_params(params, config)
    _, opt_c = None, muonkit.Muon(group_list(config, params_c), lr=LR, adamw_lr=ADAMW_LR, weight_decay=0.1)
    opt_c.load_state_dict(sd)
    run(opt, params, 2)
    run(opt_c, params_c, 2)
    assert_params_equal(params, params_c)
    assert_same(opt.state_dict(), opt_c.state_dict())


@pytest.mark.parametrize("named1", [True, False], ids=["to_named", "to_unnamed"])
@pytest.mark.parametrize("named0", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("config", CONFIGS)
def test_can_load_from_to_named_state_dict(config, named0, named1):
    params, opt = build(config, named=named0)
    run(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = muonkit.Muon(group_list(config, params, named1), lr=LR, adamw_lr=ADAMW_LR, weight_decay=0.1)
    opt2.load_state_dict(sd)
    run(opt2, params, 1)
    if named0 or named1:
        names = [group["param_names"] for group in opt2.state_dict()["param_groups"]]
        expected = [[n for n in NAMES if any(p is params[n] for p in g["params"])] for g in opt2.param_groups]
        assert names == expected


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_equality_with_weights_only(config, named):
    params, opt = build(config, named=named)
    run(opt, params, 3)
    sd = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    for weights_only in (True, False):
        buffer.seek(0)
        assert_same(torch.load(buffer, weights_only=weights_only), sd)


# ---------------------------------------------------------------------------------- deepcopy


def public_attrs(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("config", CONFIGS)
def test_deepcopy_copies_all_public_attrs_and_the_copy_steps(config):
    params, opt = build(config)
    run(opt, params, 3)
    twin = copy.deepcopy(opt)
    assert public_attrs(opt) == public_attrs(twin) == {"defaults", "state", "param_groups", "last_stats"}
    # torch.optim.Optimizer.__setstate__ adds defaults["differentiable"] = False (muonkit never reads it)
    assert_same({k: v for k, v in twin.defaults.items() if k != "differentiable"}, opt.defaults)
    assert_same(twin.state_dict(), opt.state_dict())
    twin_params = {}
    for group, twin_group in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(group["params"], twin_group["params"]):
            assert q is not p and torch.equal(q, p)
            twin_params[next(n for n in NAMES if params[n] is p)] = q
    if config == "muon":
        twin_params["b"] = params["b"]  # a constant, not the optimizer's
    run(opt, params, 3)
    run(twin, twin_params, 3)
    assert_params_equal(params, twin_params)
    assert_same(twin.state_dict(), opt.state_dict())


# ------------------------------------------------------------------------------------- hooks


def hook_optimizer(config):
    """One 2D parameter without a gradient, in the configuration's first kind of group."""
    p = torch.tensor([[1.0, 1.0]])
    return muonkit.Muon([{"params": [p], "use_muon": config != "adamw"}])


@pytest.mark.parametrize("config", CONFIGS)
def test_step_pre_and_post_hooks(config):
    opt = hook_optimizer(config)
    data = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: data.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: data.append("post"))
    opt.step()
    opt.step()
    assert data == ["pre", "post"] * 2
    pre.remove()
    post.remove()
    opt.step()
    assert data == ["pre", "post"] * 2


@pytest.mark.parametrize("config", CONFIGS)
def test_global_and_local_step_hooks_run_in_order(config):
    opt = hook_optimizer(config)
    sgd = SGD([torch.tensor([1.0, 1.0])])
    data = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
               register_optimizer_step_post_hook(lambda o, a, k: data.append(5))]
    try:
        for o in (opt, sgd):
            handles.append(o.register_step_pre_hook(lambda o, a, k: data.append(1)))
            handles.append(o.register_step_post_hook(lambda o, a, k: data.append(2)))
        opt.step()
        sgd.step()
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    sgd.step()
    assert data == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_pre_and_post_hooks(config):
    opt = hook_optimizer(config)

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre_hook"] and "test" not in sd["state"]


@pytest.mark.parametrize("config", CONFIGS)
def test_load_state_dict_pre_hooks_prepend_and_post_hook(config):
    opt = hook_optimizer(config)
    sd = opt.state_dict()

    def set_002(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def replace_003(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    def post(optimizer):
        optimizer.state["post_saw_lr"] = optimizer.param_groups[0]["lr"]

    opt.register_load_state_dict_pre_hook(set_002)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(replace_003, prepend=True)  # runs first, set_002 then wins
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    assert opt.state["post_saw_lr"] == 0.002
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.step()  # the hooks' extra state entries do not disturb the step


# ------------------------------------------------------------------------------ no-op steps


@pytest.mark.parametrize("config", CONFIGS)
def test_step_is_noop_when_params_have_no_grad(config):
    params, opt = build(config)
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = copy.deepcopy(opt.state_dict())
    loss = opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(loss, torch.tensor([1.0]))
    assert_params_equal(params, before)
    assert_same(opt.state_dict(), state_before)
    assert all(opt.state[p] for group in opt.param_groups for p in group["params"])


@pytest.mark.parametrize("config", CONFIGS)
def test_step_is_noop_for_zero_grads(config):
    """Without weight decay a zero gradient moves nothing (torch skips configs with weight decay:
    decay applies whenever a gradient exists, see the next test)."""
    params, opt = build(config, weight_decay=0.0, adamw_weight_decay=0.0)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    before = {n: p.detach().clone() for n, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert_params_equal(params, before)


@pytest.mark.parametrize("config", CONFIGS)
def test_zero_grads_with_weight_decay_only_decay(config):
    """torch's semantics: a zero gradient is a gradient, so weight decay applies. A Muon group gives
    W (1 - lr wd) exactly and keeps a zero momentum; an AdamW group equals torch.optim.AdamW(fused=True)
    (muonkit's default kernel on CPU, muonkit.options.adamw_kernel)."""
    params, opt = build(config)
    before = {n: p.detach().clone() for n, p in params.items()}
    torch_params = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    adamw_groups = [{"params": [torch_params[next(n for n in NAMES if params[n] is p)] for p in g["params"]],
                     "lr": g["lr"], "weight_decay": g["weight_decay"]}
                    for g in opt.param_groups if not g["use_muon"]]
    torch_adamw = torch.optim.AdamW(adamw_groups, fused=True) if adamw_groups else None
    for group in opt.param_groups + (torch_adamw.param_groups if torch_adamw else []):
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    for _ in range(2):
        opt.step()
        if torch_adamw:
            torch_adamw.step()
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n in NAMES if params[n] is p)
            if group["use_muon"]:
                expected = before[name] * (1 - group["lr"] * group["weight_decay"])
                expected = expected * (1 - group["lr"] * group["weight_decay"])
                assert torch.equal(p, expected), name
                assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0
            else:
                assert torch.equal(p, torch_params[name]), name


# ---------------------------------------------------------------------------------- printing


@pytest.mark.parametrize("config", CONFIGS)
def test_optimizer_can_be_printed(config):
    _, opt = build(config, lrs=(torch.tensor(LR), None))
    text = repr(opt)
    assert text.startswith("Muon (")
    for index, group in enumerate(opt.param_groups):
        assert f"Parameter Group {index}" in text
        for key in group:
            if key != "params":
                assert f"{key}: " in text, key
    assert f"use_muon: {opt.param_groups[0]['use_muon']}" in text


# ------------------------------------------------------------------ lr, weight decay, schedulers


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("config", CONFIGS)
def test_goes_right_direction(config, contiguous):
    """20 steps lower the loss, and non-contiguous parameters step like contiguous ones."""
    params, opt = build(config, contiguous=contiguous)
    reference, opt_reference = build(config)
    initial = loss_of(params).item()
    run(opt, params, 20)
    run(opt_reference, reference, 20)
    assert not params["w1"].is_contiguous() or contiguous
    assert loss_of(params).item() < initial
    for name in NAMES:
        torch.testing.assert_close(params[name], reference[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_param_groups_weight_decay(config):
    params, opt = build(config)
    assert opt.param_groups[1]["weight_decay"] != opt.param_groups[0]["weight_decay"] or config == "mixed"
    initial = loss_of(params).item()
    run(opt, params, 20)
    assert loss_of(params).item() < initial


@pytest.mark.parametrize("config", CONFIGS)
def test_param_groups_lr(config):
    """The groups given an lr train; a group left at the constructor's lr of 1e-28 does not move."""
    params = make_params(0, True, config)
    irrelevant = nn.Parameter(torch.randn(2, 3))
    frozen = irrelevant.detach().clone()
    groups = group_list(config, params, lrs=(LR if config != "adamw" else ADAMW_LR, ADAMW_LR))
    groups.append({"params": [irrelevant], "use_muon": config == "muon"})
    opt = muonkit.Muon(groups, lr=1e-28)
    initial = loss_of(params).item()
    for _ in range(20):
        closure(opt, params)
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert loss_of(params).item() < initial
    assert torch.equal(irrelevant, frozen)


SCHEDULERS = {
    "StepLR": lambda o: [StepLR(o, gamma=0.9, step_size=10)],
    "ReduceLROnPlateau": lambda o: [ReduceLROnPlateau(o)],
    "ReduceLROnPlateau-reducing": lambda o: [ReduceLROnPlateau(o, mode="max", patience=1, factor=0.5)],
    "ExponentialLR": lambda o: [ExponentialLR(o, gamma=0.9)],
    "LinearLR": lambda o: [LinearLR(o, start_factor=0.4, total_iters=4)],
    "ConstantLR+ExponentialLR": lambda o: [ConstantLR(o, factor=0.4, total_iters=4), ExponentialLR(o, gamma=0.9)],
    "ExponentialLR+ReduceLROnPlateau": lambda o: [ExponentialLR(o, gamma=0.9), ReduceLROnPlateau(o, mode="max")],
    "PolynomialLR": lambda o: [PolynomialLR(o, power=0.9, total_iters=4)],
    "ChainedScheduler": lambda o: [ChainedScheduler([StepLR(o, gamma=0.8, step_size=3), ExponentialLR(o, gamma=0.95)])],
    "SequentialLR": lambda o: [SequentialLR(o, [LinearLR(o, start_factor=0.1, total_iters=5),
                                                CosineAnnealingLR(o, T_max=15)], milestones=[5])],
}


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


@pytest.mark.parametrize("lr_type", [float, torch.tensor], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("config", CONFIGS)
def test_lr_schedulers_drive_every_group(config, name, lr_type):
    """Each group's lr follows the schedulers exactly as torch.optim.SGD's groups do under the same
    schedulers and losses, and 20 steps lower the loss."""
    lrs = (LR if config != "adamw" else ADAMW_LR, ADAMW_LR if config != "muon" else LR / 2)
    params, opt = build(config, lrs=tuple(lr_type(lr) for lr in lrs))
    sgd = SGD([{"params": [torch.zeros(1)], "lr": lr_type(lr)} for lr in lrs])
    ours, theirs = SCHEDULERS[name](opt), SCHEDULERS[name](sgd)
    initial = loss_of(params).item()
    seen = []
    for _ in range(20):
        loss = opt.step(functools.partial(closure, opt, params)).item()
        sgd.step()  # no gradient: a no-op, called so that its schedulers see the usual order
        step_schedulers(ours, loss)
        step_schedulers(theirs, loss)
        seen.append([float(g["lr"]) for g in opt.param_groups])
        assert seen[-1] == [float(g["lr"]) for g in sgd.param_groups]
    assert loss_of(params).item() < initial
    if name != "ReduceLROnPlateau":  # its default patience of 10 steps may never reduce in 20
        assert any(lr != list(lrs) for lr in seen)
