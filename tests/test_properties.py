"""Property tests (issue 18): random optimizer configurations with random faults, and random state
dicts, against the two all-or-nothing contracts.

- step(): succeeds, or raises before any parameter or state tensor changed (every tensor compared bit
  for bit with a copy taken before); a configuration without a fault must step.
- load_state_dict(): loads with its documented meaning (and the next step works), or is refused with
  nothing changed; only muonkit's, torch.optim.AdamW / Adam's and torch.optim.Muon's dicts load.

CI runs a fixed number of derandomized examples per fault kind and per state dict source
(MUONKIT_PROPERTY_EXAMPLES, default 30: 420 examples, about 20 s on one core; set it higher to hunt
longer, e.g. 300). Everything runs on CPU with one thread (conftest.py).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import muonkit

EXAMPLES = int(os.environ.get("MUONKIT_PROPERTY_EXAMPLES", "30"))  # per fault kind and per state dict source
PROPERTY = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MUON_SHAPES = [(6, 8), (8, 6), (2, 4, 5), (4, 2, 2, 2)]
ADAMW_SHAPES = [(5,), (), (3, 4), (2, 3, 2)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


class Boom(RuntimeError):
    pass


def raising_orthogonalizer(X, steps):
    raise Boom("the orthogonalizer failed")


def sign_orthogonalizer(X, steps):
    return X.sign()


def hyper(value):
    """A hyperparameter as torch accepts it: a float, or a one-element tensor of shape [], [1] or [1, 1]."""
    return st.sampled_from([value, torch.tensor(value), torch.tensor([value]), torch.tensor([[value]])])


def make_param(shape, dtype, memory, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    if memory == "transposed" and t.ndim == 2:
        t = t.t().contiguous().t()  # same shape, column-major strides
    elif memory == "channels_last" and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return nn.Parameter(t)


@st.composite
def muon_group(draw, seed):
    shapes = draw(st.lists(st.sampled_from(MUON_SHAPES), min_size=1, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    memory = draw(st.sampled_from(["contiguous", "transposed", "channels_last"]))
    params = [make_param(s, dtype, memory, seed + i) for i, s in enumerate(shapes)]
    group = {"params": params, "use_muon": True}
    options = {
        "lr": hyper(0.02), "momentum": hyper(0.9), "nesterov": st.booleans(), "weight_decay": hyper(0.1),
        "scale": st.sampled_from(["moonlight", "keller_jordan", "mup", "naive"]), "rms": hyper(0.2),
        "orthogonalizer": st.sampled_from(["polar_express", "keller_jordan", "you", "gram", "svd", sign_orthogonalizer]),
        "ns_steps": st.integers(1, 3), "variant": st.sampled_from(["muon", "normuon", "adamuon"]),
        "beta2": hyper(0.9), "variant_eps": hyper(1e-8), "cautious_weight_decay": st.booleans(),
        "state_dtype": st.sampled_from([None, torch.float32, torch.float64]), "stochastic_rounding": st.booleans(),
    }
    for key, strategy in options.items():
        if draw(st.booleans()):
            group[key] = draw(strategy)
    return group


@st.composite
def adamw_group(draw, seed):
    shapes = draw(st.lists(st.sampled_from(ADAMW_SHAPES), min_size=1, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    params = [make_param(s, dtype, "transposed" if draw(st.booleans()) else "contiguous", seed + i)
              for i, s in enumerate(shapes)]
    group = {"params": params, "use_muon": False}
    options = {
        "lr": hyper(3e-3), "betas": st.tuples(hyper(0.9), hyper(0.99)), "eps": hyper(1e-8),
        "weight_decay": hyper(0.01), "cautious_weight_decay": st.booleans(),
        "state_dtype": st.sampled_from([None, torch.float32, torch.float64]), "stochastic_rounding": st.booleans(),
    }
    for key, strategy in options.items():
        if draw(st.booleans()):
            group[key] = draw(strategy)
    return group


@st.composite
def optimizers(draw):
    kinds = draw(st.lists(st.booleans(), min_size=1, max_size=3))
    groups = [draw(muon_group(10 * i) if kind else adamw_group(10 * i)) for i, kind in enumerate(kinds)]
    nonfinite = draw(st.sampled_from(["propagate", "skip", "raise"]))
    diagnostics = draw(st.booleans())
    return muonkit.Muon(groups, lr=0.02, nonfinite=nonfinite, diagnostics=diagnostics)


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def set_grads(opt, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params_of(opt):
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def snapshot(opt):
    """Every parameter and state tensor, cloned, and the groups' other values."""
    params = params_of(opt)
    tensors = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state.get(p, {}).items()}
             for i, p in enumerate(params)}
    groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return tensors, state, groups, [list(g["params"]) for g in opt.param_groups]


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def assert_unchanged(opt, before):
    tensors, state, groups, members = before
    now_tensors, now_state, now_groups, now_members = snapshot(opt)
    assert len(now_members) == len(members) and all(
        len(x) == len(y) and all(p is q for p, q in zip(x, y)) for x, y in zip(now_members, members))
    for i, (a, b) in enumerate(zip(now_tensors, tensors)):
        assert same(a, b), f"parameter {i} changed"
    assert now_state.keys() == state.keys()
    for i in state:
        assert now_state[i].keys() == state[i].keys(), i
        for k in state[i]:
            assert same(now_state[i][k], state[i][k]), (i, k)
    for g_now, g_then in zip(now_groups, groups):
        assert g_now.keys() == g_then.keys()
        for k in g_now:
            assert same(g_now[k], g_then[k]), k


# ------------------------------------------------------------------------------------ faults


def _bad_option(draw, opt):
    index = draw(st.integers(0, len(opt.param_groups) - 1))
    group = opt.param_groups[index]
    if group["use_muon"]:
        key, value = draw(st.sampled_from([
            ("lr", -1.0), ("lr", float("nan")), ("momentum", 1.0), ("momentum", torch.tensor([0.9, 0.9])),
            ("nesterov", 1), ("weight_decay", -0.1), ("scale", "huge"), ("rms", 0.0), ("orthogonalizer", "qr"),
            ("ns_steps", -1), ("ns_steps", 2.5), ("variant", "adam"), ("beta2", 1.5), ("variant_eps", "tiny"),
            ("cautious_weight_decay", None), ("state_dtype", torch.int32), ("stochastic_rounding", "yes"),
            ("layout", "rows"), ("lr", torch.tensor(0.02j)), ("use_muon", False), ("use_muon", 1),
            ("momentum", None), ("amsgrad", True),
        ]))
    else:
        key, value = draw(st.sampled_from([
            ("lr", -1.0), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("betas", (torch.tensor([0.9, 0.9]), 0.99)),
            ("eps", -1.0), ("eps", float("inf")), ("weight_decay", "0.1"), ("weight_decay", torch.tensor([0.1, 0.1])),
            ("state_dtype", torch.complex64), ("cautious_weight_decay", 0), ("use_muon", True), ("maximize", True),
            ("eps", torch.tensor([1e-8, 1e-8])), ("lr", None),
        ]))
    group[key] = value
    return f"group {index} {key}={value!r}"


def _bad_grad(draw, opt):
    params = params_of(opt)
    p = params[draw(st.integers(0, len(params) - 1))]
    # torch's grad setter itself refuses another shape or dtype; these it lets through.
    kind = draw(st.sampled_from(["sparse", "nan", "inf", "strided"]))
    if kind == "sparse":
        p.grad = p.grad.to_sparse()
    elif kind == "nan":
        p.grad = torch.full(p.shape, float("nan"), dtype=p.dtype)
    elif kind == "inf":
        p.grad = torch.full(p.shape, float("-inf"), dtype=p.dtype)
    else:
        p.grad = torch.randn([*p.shape, 2], dtype=torch.float32).to(p.dtype)[..., 0]
    return f"grad {kind}"


def _bad_state(draw, opt):
    params = params_of(opt)
    p = params[draw(st.integers(0, len(params) - 1))]
    state = opt.state[p]
    key = draw(st.sampled_from(sorted(state)))
    kind = draw(st.sampled_from(["shape", "int", "none", "delete", "scalar"]))
    if kind == "shape":
        state[key] = torch.zeros(3, 1)
    elif kind == "int":
        state[key] = state[key].to(torch.int32)
    elif kind == "none":
        state[key] = None
    elif kind == "delete":
        del state[key]
    else:
        state[key] = 1.0
    return f"state {key} {kind}"


def _bad_param(draw, opt):
    index = draw(st.integers(0, len(opt.param_groups) - 1))
    group = opt.param_groups[index]
    kind = draw(st.sampled_from(["expanded", "duplicate", "int", "complex", "vector_in_muon"]))
    if kind == "expanded":
        p = nn.Parameter(torch.randn(8).expand(6, 8))
    elif kind == "duplicate":
        p = params_of(opt)[0]
    elif kind == "int":
        p = torch.zeros(6, 8, dtype=torch.int64)
    elif kind == "complex":
        p = nn.Parameter(torch.randn(6, 8, dtype=torch.complex64))
    else:
        p = nn.Parameter(torch.randn(5))
    group["params"].append(p)
    if kind != "duplicate":
        p.grad = torch.zeros_like(p)
    return f"param {kind}"


def _raising_orthogonalizer(draw, opt):
    muon = [g for g in opt.param_groups if g["use_muon"]]
    if not muon:
        return None
    muon[draw(st.integers(0, len(muon) - 1))]["orthogonalizer"] = raising_orthogonalizer
    return "raising orthogonalizer"


FAULTS = {"option": _bad_option, "grad": _bad_grad, "state": _bad_state, "param": _bad_param,
          "orthogonalizer": _raising_orthogonalizer}


@pytest.mark.parametrize("fault", [None, "closure", *FAULTS])
@PROPERTY
@given(data=st.data())
def test_a_step_succeeds_or_changes_nothing(fault, data):
    opt = data.draw(optimizers(), label="optimizer")
    set_grads(opt, 0)
    opt.step()  # state that is not all zeros
    set_grads(opt, 1)
    what = FAULTS[fault](data.draw, opt) if fault in FAULTS else fault
    fault = fault if what is not None else None
    event(f"fault: {what}")
    closure = None
    if fault == "closure":
        def closure():
            raise Boom("the closure failed")
    before = snapshot(opt)
    try:
        opt.step(closure)
    except Exception as err:
        assert fault is not None, f"a step without a fault raised {err!r}"
        assert isinstance(err, (ValueError, TypeError, RuntimeError)) and type(err) is not NotImplementedError, (
            f"{what}: not a clear error: {err!r}")
        assert_unchanged(opt, before)
        event("step refused")
    else:
        assert fault not in ("closure", "orthogonalizer") or what is None, f"{what} did not raise"


# ----------------------------------------------------------------------------- state dicts


@st.composite
def damaged(draw, sd):
    """A muonkit state dict with one field dropped, retyped or reshaped."""
    sd = copy.deepcopy(sd)
    where = draw(st.sampled_from(["group", "state"]))
    if where == "group":
        group = sd["param_groups"][draw(st.integers(0, len(sd["param_groups"]) - 1))]
        key = draw(st.sampled_from(sorted(k for k in group if k != "params")))
        how = draw(st.sampled_from(["drop", "string", "none", "tensor2"]))
        if how == "drop":
            del group[key]
        else:
            group[key] = {"string": "x", "none": None, "tensor2": torch.ones(2)}[how]
        return sd, f"group {key} {how}"
    entries = [(i, k) for i, s in sorted(sd["state"].items()) for k in sorted(s)]
    i, key = draw(st.sampled_from(entries))
    how = draw(st.sampled_from(["drop", "string", "int", "reshape", "transpose", "extra"]))
    value = sd["state"][i][key]
    if how == "drop":
        del sd["state"][i][key]
    elif how == "string":
        sd["state"][i][key] = "x"
    elif how == "int":
        sd["state"][i][key] = value.to(torch.int64)
    elif how == "reshape":
        sd["state"][i][key] = value.reshape(-1, 1) if value.numel() else torch.zeros(1)
    elif how == "transpose":
        sd["state"][i][key] = value.transpose(0, -1).contiguous() if value.ndim else value.reshape(1)
    else:
        sd["state"][i]["exp_inf"] = torch.zeros(1)
    return sd, f"state {key} {how}"


def clone_optimizer(opt):
    """A fresh optimizer with the same groups over copies of the parameters (no state history)."""
    groups = []
    for group in opt.param_groups:
        copies = [nn.Parameter(p.detach().clone() + 1) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "skipped_steps")}, "params": copies})
    return muonkit.Muon(groups, lr=0.02, nonfinite=opt.defaults["nonfinite"])


TORCH_OPTIMIZERS = {
    "AdamW": (False, lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01), True),
    "Adam": (False, lambda ps: torch.optim.Adam(ps, lr=1e-3), True),
    "Adam-L2": (False, lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01), False),
    "SGD": (None, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False),
    "RMSprop": (None, lambda ps: torch.optim.RMSprop(ps, lr=0.01), False),
    "Muon": (True, lambda ps: torch.optim.Muon(ps, lr=0.02), True),
}


@pytest.mark.parametrize("source", ["muonkit", *TORCH_OPTIMIZERS])
@PROPERTY
@given(data=st.data())
def test_a_state_dict_loads_with_its_meaning_or_changes_nothing(source, data):
    opt = data.draw(optimizers(), label="optimizer")
    set_grads(opt, 0)
    opt.step()
    target = clone_optimizer(opt)
    set_grads(target, 2)
    target.step()
    expected = None  # None: either; True: must load; False: must be refused
    if source == "muonkit":
        sd, what = data.draw(damaged(opt.state_dict()), label="damage")
        event(f"damage: {what}")
    else:
        kind, make, loads = TORCH_OPTIMIZERS[source]
        sd = copy.deepcopy(opt.state_dict())
        for index, group in enumerate(opt.param_groups):
            if kind is not None and group["use_muon"] != kind:
                continue
            if source == "Muon" and any(p.ndim != 2 for p in group["params"]):
                continue
            theirs = [nn.Parameter(p.detach().float().clone()) for p in group["params"]]
            foreign = make(theirs)
            for p in theirs:
                p.grad = torch.randn_like(p)
            foreign.step()
            foreign_sd = foreign.state_dict()
            ids = sd["param_groups"][index]["params"]
            sd["param_groups"][index] = {**foreign_sd["param_groups"][0], "params": ids}
            for i, state in zip(ids, (foreign_sd["state"].get(j, {}) for j in range(len(theirs)))):
                sd["state"][i] = state
            expected = loads if expected is None else expected and loads
    event(f"source: {source}, expected: {expected}")
    before = snapshot(target)
    try:
        target.load_state_dict(sd)
    except Exception as err:
        assert expected is not True, f"{source} was refused: {err!r}"
        assert isinstance(err, (ValueError, TypeError, RuntimeError)), f"not a clear error: {err!r}"
        assert_unchanged(target, before)
        return
    assert expected is not False, f"{source} loaded"
    set_grads(target, 3)
    target.step()  # what loaded is state the step can read
