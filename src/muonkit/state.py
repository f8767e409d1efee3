"""Optimizer state: what each parameter's state holds, how it is created, converted and checked.

Muon groups keep `momentum_buffer` (and `second_moment` where the group's variant keeps one, and a
float32 `step` where 16-bit parameters round stochastically); AdamW groups keep torch.optim.AdamW's
`step`, `exp_avg`, `exp_avg_sq`. Loading a state dict (muonkit's or torch's) is muonkit.checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dtensor import zeros_like_sharded
from .layout import resolve
from .options import number
from .variants import VARIANTS

# The per-parameter state a kind of group always holds once it has any (torch.optim.Muon's and
# torch.optim.AdamW's keys); Muon groups with a variant also hold "second_moment".
MUON_STATE = ("momentum_buffer",)

ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


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
    of another variant (of another shape: per row, per entry) is replaced by zeros.
    """
    dtype = state_dtype(p, group)
    shapes = {key: shape for key, shape in state_shapes(p, group).items() if key != "step"}
    switched: set[tuple[int, ...] | None] = set()
    if "second_moment" in shapes:
        layout = resolve(group["layout"], p.ndim)
        switched = {v.second_moment_shape(p.shape, layout) for v in VARIANTS.values()}
    new: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        held = state.get(key)
        # Another variant's second moment (the group's variant was changed) starts again from zero.
        if held is None or (key == "second_moment" and isinstance(held, Tensor) and tuple(held.shape) != shape
                            and tuple(held.shape) in switched):
            new[key] = zeros_like_sharded(p, shape, dtype)
        elif isinstance(held, Tensor) and held.is_floating_point() and held.dtype != dtype:
            new[key] = held.to(dtype)
    step = state.get("step")
    if step is None and (not group["use_muon"] or rounds_stochastically(p, group)):
        new["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device(p, capturable))
    elif isinstance(step, Tensor) and step.device != step_device(p, capturable):
        new["step"] = step.to(step_device(p, capturable))
    return new


def drop_unused(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
    """A Muon group whose variant keeps no second moment (it was switched) drops the one it held,
    so that its state is its kind's (and loads back) and a later switch starts it from zero."""
    if group["use_muon"] and "second_moment" in state and "second_moment" not in state_shapes(p, group):
        del state["second_moment"]


def state_shapes(p: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of each state entry `group` keeps for `p`."""
    if not group["use_muon"]:
        return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
    shapes = {"momentum_buffer": tuple(p.shape)}
    second = VARIANTS[group["variant"]].second_moment_shape(p.shape, resolve(group["layout"], p.ndim))
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
    if "second_moment" not in shapes:
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
