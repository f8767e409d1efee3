"""Optimizer state: what each parameter's state holds, how it is created and converted, and how a
loaded state dict (muonkit's, torch.optim.AdamW's, torch.optim.Muon's) is checked and translated.

Muon groups keep `momentum_buffer` (and `second_moment` for NorMuon / AdaMuon, and a float32 `step`
where 16-bit parameters round stochastically); AdamW groups keep torch.optim.AdamW's `step`,
`exp_avg`, `exp_avg_sq`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import functional
from .layout import resolve
from .options import check_unsupported, is_dtensor, number
from .orthogonalize import EPS, SCHEDULES

# The per-parameter state a kind of group always holds once it has any (torch.optim.Muon's and
# torch.optim.AdamW's keys); Muon groups with a variant also hold "second_moment".
MUON_STATE = ("momentum_buffer",)

ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")

# Keys of torch.optim.AdamW / Adam groups that pick an implementation (muonkit has one) or are checked
# at load (amsgrad, maximize, decoupled_weight_decay): dropped from a loaded group.
_TORCH_ADAMW_KEYS = (
    "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"
)

# torch.optim.Muon's group keys that muonkit spells as scale and orthogonalizer (see from_torch_muon).
_TORCH_MUON_KEYS = ("adjust_lr_fn", "ns_coefficients", "eps")

# torch.optim.Muon's adjust_lr_fn (None means "original") -> muonkit's scale. torch's _adjust_lr:
# "original" sqrt(max(1, A/B)), "match_rms_adamw" 0.2*sqrt(max(A, B)) (torch/optim/_muon.py, 2.13).
_ADJUST_LR_FN_TO_SCALE = {None: "keller_jordan", "original": "keller_jordan", "match_rms_adamw": "moonlight"}

_TORCH_MUON_RMS = 0.2


def state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype `group` keeps the state of `p` in."""
    return group["state_dtype"] or p.dtype


def rounds_stochastically(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether `p` is written by stochastic rounding (a 16-bit parameter of a group that asks)."""
    return group["stochastic_rounding"] and p.dtype.itemsize < 4


def step_device(p: Tensor, capturable: bool) -> torch.device:
    """Where a `step` count lives: on the host, as torch.optim keeps it, or with capturable=True on
    the parameter's device, so that a captured step counts on the device."""
    return p.device if capturable else torch.device("cpu")


def missing_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], *, capturable: bool = False) -> dict[str, Tensor]:
    """The state entries `group` needs for `p` that `state` lacks or holds in another dtype or on
    another device: new zeros, or the held values converted (a `step` goes to `step_device`).

    State exists from construction (so that every process has the same state_dict keys); entries
    appear later only for parameters appended to a group, groups whose variant, state_dtype or
    stochastic_rounding was changed, and state dicts saved before a key existed. A second moment
    of the other variant (NorMuon's per row, AdaMuon's per entry) is replaced by zeros.
    """
    dtype = state_dtype(p, group)
    shapes: dict[str, tuple[int, ...]] = {}
    switched: tuple[int, ...] | None = None
    if group["use_muon"]:
        shapes["momentum_buffer"] = tuple(p.shape)
        layout = resolve(group["layout"], p.ndim)
        shape = functional.second_moment_shape(p.shape, layout, group["variant"])
        if shape is not None:
            shapes["second_moment"] = shape
            other = "adamuon" if group["variant"] == "normuon" else "normuon"
            switched = functional.second_moment_shape(p.shape, layout, other)  # type: ignore[arg-type]
    else:
        shapes["exp_avg"] = shapes["exp_avg_sq"] = tuple(p.shape)
    new: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        held = state.get(key)
        # The other variant's second moment (the group's variant was changed) starts again from zero.
        if held is None or (key == "second_moment" and isinstance(held, Tensor) and tuple(held.shape) != shape
                            and tuple(held.shape) == switched):
            new[key] = _zeros_like_sharded(p, shape, dtype)
        elif isinstance(held, Tensor) and held.is_floating_point() and held.dtype != dtype:
            new[key] = held.to(dtype)
    step = state.get("step")
    if step is None and (not group["use_muon"] or rounds_stochastically(p, group)):
        new["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device(p, capturable))
    elif isinstance(step, Tensor) and step.device != step_device(p, capturable):
        new["step"] = step.to(step_device(p, capturable))
    return new


def _zeros_like_sharded(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of `shape` and `dtype` on p's device; a DTensor with p's mesh and placements when p is one."""
    if not is_dtensor(p):
        if tuple(shape) == tuple(p.shape):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)


def state_shapes(p: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of each state entry `group` keeps for `p`."""
    if not group["use_muon"]:
        return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
    shapes = {"momentum_buffer": tuple(p.shape)}
    second = functional.second_moment_shape(p.shape, resolve(group["layout"], p.ndim), group["variant"])
    if second is not None:
        shapes["second_moment"] = tuple(second)
    if rounds_stochastically(p, group):
        shapes["step"] = ()
    return shapes


def check_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], name: str, where: str) -> None:
    """The state a step will read must fit the parameter (a loaded state dict may not)."""
    for key, shape in state_shapes(p, group).items():
        value = state.get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise RuntimeError(
                f"{where}: the state {key!r} of parameter '{name}' should be a floating tensor of shape {shape}, "
                f"got {got} (was a state dict of another model or optimizer loaded?)"
            )
        if key != "step" and value.device != p.device:
            raise RuntimeError(f"{where}: the state {key!r} of parameter '{name}' is on {value.device}, not {p.device}")


def uncast(loaded: dict[str, Any], saved: dict[str, Any], p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """A loaded state with its floating tensors (but `step`) taken from the `saved` values, in the
    group's state dtype, where that differs from the parameter's dtype that torch cast them to."""
    dtype = state_dtype(p, group)
    if dtype == p.dtype:
        return loaded
    loaded = dict(loaded)
    for key, value in saved.items():
        if key in loaded and key != "step" and isinstance(value, Tensor) and value.is_floating_point():
            loaded[key] = value.to(dtype=dtype, device=p.device)
    return loaded


def checked_state(state: dict[str, Any], p: Tensor, group: dict[str, Any], where: str, *, capturable: bool = False) -> dict[str, Any]:
    """A loaded parameter's state, checked against its group's kind and its shape: the kind's keys
    (all of them once there is any state), missing ones (a variant's second moment, or no state at
    all) freshly made; a plain-number AdamW step becomes a float32 tensor, as torch.optim.AdamW
    converts it."""
    shapes = state_shapes(p, group)
    required = MUON_STATE if group["use_muon"] else ADAMW_STATE
    # A Muon group keeps a step count only to seed stochastic rounding of 16-bit parameters; one
    # saved with bfloat16 parameters may be loaded for float32 ones, which do not read it. A plain
    # Muon group drops a second moment left by a variant it was switched from.
    unknown = sorted(set(state) - set(shapes) - ({"step", "second_moment"} if group["use_muon"] else set()))
    if unknown or (state and not set(required) <= set(state)):
        raise ValueError(
            f"{where}: state has keys {sorted(state)}, but {'a Muon' if group['use_muon'] else 'an AdamW'} group's "
            f"state is {list(shapes)}; was the state dict saved from a different optimizer or group?"
        )
    state = dict(state)
    if group["use_muon"] and group["variant"] == "muon":
        state.pop("second_moment", None)
    step = state.get("step")
    if step is not None and not isinstance(step, Tensor):
        state["step"] = torch.tensor(number(step, "step", where), dtype=torch.float32)
    state.update(missing_state(p, state, group, capturable=capturable))
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(f"{where}: {key} should be a floating tensor of shape {shape}, got {got}")
    return state


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
