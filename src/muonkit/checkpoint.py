"""Checkpoints: loading a state dict (muonkit's, torch.optim.AdamW's / Adam's, torch.optim.Muon's)
into muonkit.Muon, checked and translated before anything changes, and the keys an older pickled
optimizer lacks.

Muon.load_state_dict and Muon.__setstate__ call these. Every group and its parameters' state are
checked against the optimizer's groups before anything changes; a state dict that does not fit
raises ValueError naming the group and leaves the optimizer as it was:

- only state dicts whose meaning muonkit knows load: its own (groups with ``use_muon``),
  torch.optim.AdamW's / Adam's (``betas`` and ``amsgrad``) and torch.optim.Muon's
  (``ns_coefficients``); any other optimizer's (SGD, RMSprop, RAdam, ...) is refused, named;
- a group keeps its kind: a loaded group is an AdamW group if its ``use_muon`` is False, or,
  without ``use_muon`` (torch's optimizers), if it has ``betas``; else a Muon group;
- each parameter's state holds its kind's keys (Muon ``momentum_buffer``, or
  ``momentum_codes`` and ``momentum_scales`` with momentum_bits=8, taken as saved, and
  ``second_moment`` with a variant; AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) with the
  shapes the step needs; missing state (torch creates it lazily) is made fresh; a
  plain-number AdamW ``step`` (torch's older format) becomes a float32 tensor, as
  torch.optim.AdamW converts it;
- torch.optim.AdamW's implementation flags are dropped, but ``fused``, which is an AdamW group's
  option in muonkit too (kept as saved and checked: a torch.optim.AdamW(fused=True) state dict
  steps on with torch's fused kernel); ``amsgrad`` or ``maximize`` set, or
  torch.optim.Adam's L2 weight decay (``decoupled_weight_decay=False`` with weight_decay > 0),
  are refused;
- torch.optim.Muon's ``adjust_lr_fn`` "original" (or None) becomes scale "keller_jordan",
  "match_rms_adamw" becomes scale "moonlight" with rms 0.2; its default ``ns_coefficients``
  (Keller Jordan's) and ``eps`` (1e-7) become orthogonalizer "keller_jordan"; anything else
  has no muonkit equivalent and is refused. The Newton-Schulz iteration then runs in this
  group's ``ns_dtype`` (torch.optim.Muon runs bfloat16);
- missing muonkit keys (an older state dict) are filled from the constructor's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .options import GLOBAL_KEYS, SKIPPED, check_options, check_unsupported, fill_defaults, number
from .orthogonalize import EPS, SCHEDULES
from .state import QUANTIZED_STATE, checked_state, state_dtype

# Keys added to muonkit.Muon since its first release, with the values that keep an optimizer pickled
# before them behaving as it did (not the defaults: an old pickle had no stochastic rounding).
ADDED_LATER: dict[str, Any] = {
    "variant": "muon",
    "beta2": 0.95,
    "variant_eps": 1e-10,
    "fraction": 0.25,
    "ef_decay": 0.95,
    "selection": "local",
    "cautious_weight_decay": False,
    "state_dtype": None,
    "momentum_bits": 32,
    "stochastic_rounding": False,
    "nonfinite": "propagate",
    "diagnostics": False,
    "orthogonality_every": 0,
    "capturable": False,
    "fused": None,
}

# Keys of torch.optim.AdamW / Adam groups that pick an implementation (muonkit picks its own) or are
# checked at load (amsgrad, maximize, decoupled_weight_decay): dropped from a loaded group. `fused` is
# kept: it is an AdamW group's option in muonkit too (checked like any option; the group steps with
# torch's fused kernel, as the saving torch.optim.AdamW did).
_TORCH_ADAMW_KEYS = (
    "amsgrad", "maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay"
)

# torch.optim.Muon's group keys that muonkit spells as scale and orthogonalizer (see from_torch_muon).
_TORCH_MUON_KEYS = ("adjust_lr_fn", "ns_coefficients", "eps")

# torch.optim.Muon's adjust_lr_fn (None means "original") -> muonkit's scale. torch's _adjust_lr:
# "original" sqrt(max(1, A/B)), "match_rms_adamw" 0.2*sqrt(max(A, B)) (torch/optim/_muon.py, 2.13).
_ADJUST_LR_FN_TO_SCALE = {None: "keller_jordan", "original": "keller_jordan", "match_rms_adamw": "moonlight"}

_TORCH_MUON_RMS = 0.2


# Group keys that only other torch.optim optimizers save, and which one: their state dicts mean something
# muonkit does not implement (SGD's L2 decay and dampening, RMSprop's square average, ...).
_FOREIGN_KEYS = {
    "dampening": "torch.optim.SGD", "centered": "torch.optim.RMSprop", "alpha": "torch.optim.RMSprop or ASGD",
    "lambd": "torch.optim.ASGD", "lr_decay": "torch.optim.Adagrad", "initial_accumulator_value": "torch.optim.Adagrad",
    "rho": "torch.optim.Adadelta", "momentum_decay": "torch.optim.NAdam", "etas": "torch.optim.Rprop",
    "step_sizes": "torch.optim.Rprop", "max_iter": "torch.optim.LBFGS", "beta2_decay": "torch.optim.Adafactor",
}


# Keys only muonkit's groups have.
_MUONKIT_KEYS = ("skipped_steps", "scale", "orthogonalizer", "variant", "layout", "state_dtype", "stochastic_rounding")


def check_known(group: dict[str, Any], where: str) -> None:
    """Refuse a loaded group of an optimizer whose state muonkit cannot read with its meaning: one
    without `use_muon` (so not muonkit's) must be torch.optim.AdamW's or Adam's (`betas` and `amsgrad`)
    or torch.optim.Muon's (`ns_coefficients`)."""
    if "use_muon" in group:
        return
    foreign = sorted({name for key, name in _FOREIGN_KEYS.items() if key in group})
    if foreign:
        what = f"the state dict is {' / '.join(foreign)}'s"
    elif any(key in group for key in _MUONKIT_KEYS):
        return  # muonkit's own, without use_muon: its kind is judged by the caller
    elif "betas" in group and "amsgrad" not in group:
        what = ("the state dict's group has betas but no amsgrad, so it is not torch.optim.AdamW's or Adam's "
                "(torch.optim.RAdam, Adamax and SparseAdam groups look like this)")
    elif "betas" not in group and "ns_coefficients" not in group:
        what = ("the state dict's group has neither betas (torch.optim.AdamW / Adam) nor ns_coefficients "
                "(torch.optim.Muon), so it is another optimizer's")
    else:
        return
    keys = sorted(key for key in group if key not in ("params", "param_names"))
    raise ValueError(
        f"{where}: {what} (group keys {keys}); muonkit loads only its own state dicts, torch.optim.AdamW / "
        "Adam's and torch.optim.Muon's, whose meaning it knows. Keep training with that optimizer, or start "
        "muonkit's state fresh (load the model's weights only)"
    )


def by_names(state_dict: dict[str, Any], current_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The state dict to load, with its groups and parameters in this optimizer's order where their
    `param_names` say they were saved in another one.

    torch.optim loads by position. When every group, saved and current, names its parameters and
    the saved names are the current ones in another order (a model whose modules are registered in
    another order), position would give a parameter another's state; the names then decide: each
    group's parameters are reordered to the current order. Parameters in another group than when
    saved, or groups in another order, are refused (ValueError naming a parameter): a group's
    options belong to its parameters, and an lr scheduler's state is per group position. Other
    names (renamed by a wrapper: DDP's "module.", torch.compile's "_orig_mod.") keep torch's
    positions. A state dict whose params are names already (DCP's set_state_dict, which matched
    them by name) keeps this optimizer's `param_names`.
    """
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(current_groups):
        return state_dict  # torch's own checks refuse it
    if any("param_names" not in g for g in current_groups):
        return state_dict
    if any(isinstance(i, str) for g in saved_groups for i in g.get("params", ())):
        # Keyed by name (DCP): the saved order's param_names would label this optimizer's parameters.
        return {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != "param_names"} for g in saved_groups]}
    if any("param_names" not in g or len(g["param_names"]) != len(g.get("params", ())) for g in saved_groups):
        return state_dict
    saved = [list(g["param_names"]) for g in saved_groups]
    current = [list(g["param_names"]) for g in current_groups]
    everything = [n for names in current for n in names]
    if (saved == current or not all(saved) or not all(current) or len(set(everything)) != len(everything)
            or sorted(everything) != sorted(n for names in saved for n in names)):
        return state_dict
    saved_in = {n: j for j, names in enumerate(saved) for n in names}
    groups = []
    for index, names in enumerate(current):
        j = saved_in[names[0]]
        homes = sorted({saved_in[n] for n in names})
        if homes != [j] or len(saved[j]) != len(names):
            listed = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(
                f"load_state_dict: the state dict names this optimizer's parameters, grouped otherwise: group "
                f"{index} here holds {listed}, saved in group{'s' if len(homes) > 1 else ''} "
                f"{', '.join(map(str, homes))}{'' if len(homes) > 1 else ' with ' + str(len(saved[j])) + ' parameters'}; "
                "build the optimizer with the groups of the one that saved it (a group's options, lr and weight "
                "decay included, belong to its parameters), then regroup"
            )
        if j != index:
            raise ValueError(
                f"load_state_dict: the state dict's group {j} holds the parameters of this optimizer's group {index} "
                f"({names[0]!r}, ...): its groups are in another order; build the optimizer with its groups in the "
                "saved order (an lr scheduler's state is per group position too)"
            )
        ids = dict(zip(saved[j], saved_groups[j]["params"]))
        groups.append({**saved_groups[j], "params": [ids[n] for n in names], "param_names": names})
    return {**state_dict, "param_groups": groups}


def fill_unpickled(defaults: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Keys an optimizer pickled before they existed lacks, in its defaults and its groups."""
    for key, value in ADDED_LATER.items():
        defaults.setdefault(key, value)
    for group in groups:
        group.setdefault("use_muon", True)
        group.setdefault(SKIPPED, 0)
        fill_defaults(group, defaults)


def loaded(
    state: dict[Any, Any],
    groups: list[dict[str, Any]],
    current_groups: list[dict[str, Any]],
    state_dict: dict[str, Any],
    defaults: dict[str, Any],
    check_params: Callable[[dict[str, Any], str], None],
) -> dict[str, Any]:
    """The checked, translated groups and state of a load; raises before anything changes.

    `state` and `groups` are what torch.optim.Optimizer.load_state_dict hands over (tensors cast to
    their parameters' dtype and device), `current_groups` the optimizer's groups, `state_dict` the
    dict as given (for state kept in another dtype than its parameter's), and `check_params`
    the optimizer's check of a group's parameters.
    """
    new_state = type(state)(dict)  # torch's defaultdict(dict), as Optimizer.__init__ makes it
    new_state.update(state)  # entries that are not parameters (torch keeps them as they are)
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in current_groups for p in group["params"]]
    as_saved = {id(p): state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params)}
    new_groups = []
    for index, (saved, current) in enumerate(zip(groups, current_groups)):
        group = dict(saved)
        use_muon = current["use_muon"]
        where = f"load_state_dict: {'Muon' if use_muon else 'AdamW'} group {index}"
        check_known(group, where)
        saved_kind = group.get("use_muon", "betas" not in group)
        if not isinstance(saved_kind, bool):
            raise ValueError(f"{where}: use_muon must be True or False, got {saved_kind!r}")
        if saved_kind != use_muon:
            why = (f"use_muon={saved_kind}" if "use_muon" in group else
                   "no use_muon, and betas as torch.optim.AdamW's groups have" if "betas" in group else
                   "no use_muon and no betas")
            raise ValueError(
                f"{where}: the state dict's group {index} is {'a Muon' if saved_kind else 'an AdamW'} group "
                f"({why}); a group keeps the kind it was built with - build the optimizer with the "
                "same groups as the one that saved the state dict"
            )
        group["use_muon"] = use_muon
        group.setdefault(SKIPPED, 0)
        if use_muon:
            from_torch_muon(group, where)
        else:
            from_torch_adamw(group, where)  # drops torch.optim.AdamW's own "capturable" flag
        for key in GLOBAL_KEYS:
            if key in group:
                raise ValueError(f"{where}: {key} is an option of the whole optimizer, not of a param group")
        fill_defaults(group, defaults)
        check_options(group, where)
        check_params(group, where)
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            loaded_state = uncast(state.get(p, {}), as_saved.get(id(p), {}), p, group)
            new_state[p] = checked_state(loaded_state, p, group, f"{where}: parameter '{name}'",
                                         capturable=defaults["capturable"])
        new_groups.append(group)
    return {"state": new_state, "param_groups": new_groups}


def uncast(loaded: dict[str, Any], saved: dict[str, Any], p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """A loaded state with its floating tensors (but `step`) taken from the `saved` values, in the
    group's state dtype, where that differs from the parameter's dtype that torch cast them to."""
    loaded = dict(loaded)
    # 8-bit momentum keeps its own dtypes (int8 codes, float32 scales) whatever the parameter's.
    for key in QUANTIZED_STATE:
        value = saved.get(key)
        if key in loaded and isinstance(value, Tensor):
            loaded[key] = value.to(device=p.device)
    dtype = state_dtype(p, group)
    if dtype == p.dtype:
        return loaded
    for key, value in saved.items():
        if (key in loaded and key != "step" and key not in QUANTIZED_STATE and isinstance(value, Tensor)
                and value.is_floating_point()):
            loaded[key] = value.to(dtype=dtype, device=p.device)
    return loaded


def from_torch_adamw(group: dict[str, Any], where: str) -> None:
    """Check and drop the keys of a torch.optim.AdamW / Adam group that muonkit has no use for."""
    check_unsupported(group, where)
    decay = number(group.get("weight_decay", 0.0), "weight_decay", where)
    if group.get("decoupled_weight_decay", True) is False and decay != 0:
        raise ValueError(
            f"{where}: the group is torch.optim.Adam's, with L2 weight decay (decoupled_weight_decay=False, "
            f"weight_decay={group['weight_decay']!r}); muonkit's AdamW groups decay decoupled, as "
            "torch.optim.AdamW - keep training with torch.optim.Adam or set the group's weight_decay to 0"
        )
    for key in _TORCH_ADAMW_KEYS:
        group.pop(key, None)


def from_torch_muon(group: dict[str, Any], where: str) -> None:
    """Translate a torch.optim.Muon group's adjust_lr_fn, ns_coefficients and eps into muonkit's scale
    and orthogonalizer; refuse values muonkit has no equivalent for."""
    theirs = [key for key in _TORCH_MUON_KEYS if key in group]
    ours = [key for key in ("scale", "rms", "orthogonalizer") if key in group]
    if not theirs:
        return
    if ours:
        raise ValueError(
            f"{where}: the group has both torch.optim.Muon's keys ({', '.join(theirs)}) and muonkit's "
            f"({', '.join(ours)}); keep one set"
        )
    adjust = group.pop("adjust_lr_fn", None)
    if not isinstance(adjust, (str, type(None))) or adjust not in _ADJUST_LR_FN_TO_SCALE:
        raise ValueError(
            f"{where}: torch.optim.Muon's adjust_lr_fn={adjust!r} has no muonkit equivalent; muonkit has "
            "'original' (scale='keller_jordan') and 'match_rms_adamw' (scale='moonlight', rms=0.2)"
        )
    group["scale"] = _ADJUST_LR_FN_TO_SCALE[adjust]
    if group["scale"] == "moonlight":
        group["rms"] = _TORCH_MUON_RMS
    coefficients = group.pop("ns_coefficients", SCHEDULES["keller_jordan"][0])
    try:
        known = tuple(float(c) for c in coefficients) == SCHEDULES["keller_jordan"][0]
    except (TypeError, ValueError):
        known = False
    if not known:
        raise ValueError(
            f"{where}: torch.optim.Muon's ns_coefficients={coefficients!r} have no muonkit equivalent; "
            f"muonkit's orthogonalizer 'keller_jordan' is {SCHEDULES['keller_jordan'][0]} (torch's default)"
        )
    eps = group.pop("eps", EPS["keller_jordan"])
    if eps != EPS["keller_jordan"]:
        raise ValueError(
            f"{where}: torch.optim.Muon's eps={eps!r} has no muonkit equivalent; the orthogonalizer "
            f"'keller_jordan' normalizes with eps={EPS['keller_jordan']} (torch's default)"
        )
    group["orthogonalizer"] = "keller_jordan"
