"""Optimizer state: what each parameter's state holds, how it is created, converted and checked.

Muon groups keep `momentum_buffer` (with momentum_bits=8: `momentum_codes`, int8 of the parameter's
shape, and `momentum_scales`, float32, one per block; muonkit.quantize), and `second_moment` where
the group's variant keeps one, and a float32 `step` where 16-bit parameters round stochastically; AdamW groups keep torch.optim.AdamW's
`step`, `exp_avg`, `exp_avg_sq`. Loading a state dict (muonkit's or torch's) is muonkit.checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dtensor import cut_mesh_dims, distribute_like, is_dtensor, local_parts, local_piece, zeros_like_sharded
from .layout import resolve
from .options import number
from .quantize import dequantize, dequantize_piece, piece_absmax, piece_blocks, quantize, quantize_piece, scales_shape
from .variants import VARIANTS

# The per-parameter state a kind of group always holds once it has any (torch.optim.Muon's and
# torch.optim.AdamW's keys); Muon groups with a variant also hold "second_moment".
MUON_STATE = ("momentum_buffer",)

# The 8-bit momentum's entries (momentum_bits=8), in the dtypes they are always kept in.
QUANTIZED_STATE = ("momentum_codes", "momentum_scales")
_QUANTIZED_DTYPES = {"momentum_codes": torch.int8, "momentum_scales": torch.float32}

# A Muon group's entries that a switch of its variant or momentum_bits may leave unused.
_SWITCHABLE = ("second_moment", "momentum_buffer", *QUANTIZED_STATE)

ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")

# The entries only one kind of group keeps (use_muon -> keys); `step` is both kinds' (AdamW's count,
# a Muon group's rounding seed) with different meanings.
_OWN_KEYS = {True: ("momentum_buffer", *QUANTIZED_STATE, "second_moment"), False: ("exp_avg", "exp_avg_sq")}


def of_other_kind(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether `state` was made by a group of the other kind than `group`'s: its parameter was moved
    between a Muon and an AdamW group (add_param_group, or appended to a group's params). None of it
    means anything to the new kind (an AdamW `step` of a Muon parameter's rounding count would
    bias-correct a fresh AdamW as if it had run that many steps): the parameter starts fresh."""
    return any(key in state for key in _OWN_KEYS[not group["use_muon"]])


def adopt_(state: dict[str, Any], new: dict[str, Any], group: dict[str, Any]) -> None:
    """Add the `new` entries (from `missing_state`) to a parameter's `state`, which a group of the
    other kind made is first emptied of (`of_other_kind`)."""
    if of_other_kind(state, group):
        state.clear()
    state.update(new)


def state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype `group` keeps the state of `p` in."""
    return group["state_dtype"] or p.dtype


def momentum_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype 8-bit momentum is dequantized to and updated in: the state dtype, at least float32."""
    return torch.promote_types(state_dtype(p, group), torch.float32)


def rounds_stochastically(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether `p` is written by stochastic rounding (a 16-bit parameter of a group that asks)."""
    return group["stochastic_rounding"] and p.dtype.itemsize < 4


def step_device(p: Tensor, capturable: bool) -> torch.device:
    """Where a `step` count lives: on the host, as torch.optim keeps it, or with capturable=True (or
    in a fused=True AdamW group, as torch.optim.AdamW(fused=True) keeps it) on the parameter's device,
    so that a captured (or fused) step counts on the device."""
    return p.device if capturable else torch.device("cpu")


def missing_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], *, capturable: bool = False) -> dict[str, Tensor]:
    """The state entries `group` needs for `p` that `state` lacks or holds in another dtype or on
    another device: new zeros, or the held values converted (a `step` goes to `step_device`).

    State exists from construction (so that every process has the same state_dict keys); entries
    appear later only for parameters appended to a group, groups whose variant, state_dtype or
    stochastic_rounding was changed, and state dicts saved before a key existed. A second moment
    of another variant (of another shape: per row, per entry) is replaced by zeros.
    """
    if of_other_kind(state, group):
        state = {}  # a parameter moved from a group of the other kind starts fresh (see `adopt_`)
    dtype = state_dtype(p, group)
    shapes = {key: shape for key, shape in state_shapes(p, group).items() if key != "step"}
    switched: set[tuple[int, ...] | None] = set()
    if "second_moment" in shapes:
        layout = resolve(group["layout"], p.ndim)
        switched = {v.second_moment_shape(p.shape, layout) for v in VARIANTS.values()}
    new: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        held = state.get(key)
        if key in QUANTIZED_STATE:
            if held is None and key not in new:
                new.update(_quantized_from(p, state.get("momentum_buffer")))
            continue
        # Another variant's second moment (the group's variant was changed) starts again from zero.
        if held is None and key == "momentum_buffer" and isinstance(state.get("momentum_codes"), Tensor):
            new[key] = _dequantized_from(p, state["momentum_codes"], state["momentum_scales"], dtype)
        elif held is None or (key == "second_moment" and isinstance(held, Tensor) and tuple(held.shape) != shape
                              and tuple(held.shape) in switched):
            new[key] = zeros_like_sharded(p, shape, dtype)
        elif isinstance(held, Tensor) and held.is_floating_point() and held.dtype != dtype:
            new[key] = held.to(dtype)
    step = state.get("step")
    # torch's fused AdamW counts on the device too; fused=None takes the kernel on CPU parameters only,
    # whose counts are on the CPU either way (so a state dict moves between the two kernels as it is).
    capturable = capturable or bool(group.get("fused"))
    if step is None and (not group["use_muon"] or rounds_stochastically(p, group)):
        new["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device(p, capturable))
    elif isinstance(step, Tensor) and step.device != step_device(p, capturable):
        new["step"] = step.to(step_device(p, capturable))
    return new


def _quantized_from(p: Tensor, buffer: Any) -> dict[str, Tensor]:
    """8-bit momentum entries for `p`: zeros, or `buffer` (a momentum_buffer held from before the
    group's momentum_bits was set to 8) quantized (for a DTensor cut along a dim other than 0, a
    collective: `momentum_absmax`)."""
    codes = zeros_like_sharded(p, tuple(p.shape), torch.int8)
    scales = zeros_like_sharded(p, scales_shape(p.shape), torch.float32, rows=True)
    if isinstance(buffer, Tensor) and tuple(buffer.shape) == tuple(p.shape):
        local = local_parts([buffer])[0]
        local_codes, local_scales = quantize_momentum(p, local, momentum_absmax([p], [local])[0])
        local_parts([codes])[0].copy_(local_codes)
        local_parts([scales])[0].copy_(local_scales)
    return {"momentum_codes": codes, "momentum_scales": scales}


def _dequantized_from(p: Tensor, codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """A momentum_buffer in `dtype` from 8-bit momentum held from before momentum_bits was set to 32."""
    buffer = zeros_like_sharded(p, tuple(p.shape), dtype)
    if tuple(codes.shape) == tuple(p.shape) and tuple(scales.shape) == scales_shape(p.shape):
        local = local_parts([codes, scales])
        local_parts([buffer])[0].copy_(dequantize_momentum(p, local[0], local[1], torch.promote_types(dtype, torch.float32)))
    return buffer


# 8-bit momentum of a parameter's local piece. A DTensor cut along a dim other than 0 (rowwise tensor
# parallelism) holds parts of its dim-0 slices' blocks: each block's scale is the max over the ranks
# holding the same rows (`momentum_absmax`), every rank keeps all the scales of its rows
# (dtensor.row_placements), and codes and values are computed element by element with them, so that
# they are the whole tensor's (muonkit.quantize). Any other parameter quantizes its piece alone.


def _cut_blocks(p: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`quantize.piece_blocks` of p's local piece (x: a local tensor of its shape) if p is a DTensor
    cut along a dim other than 0, else None."""
    if not cut_mesh_dims(p):
        return None
    return piece_blocks(tuple(p.shape), local_piece(p), x.device)


def momentum_absmax(params: list[Tensor], xs: list[Tensor]) -> list[Tensor | None]:
    """For each DTensor p of `params` cut along a dim other than 0, with x its momentum's local piece:
    each block's absmax over all of its elements (rows of x, blocks per slice), agreed with the ranks
    that hold the same rows; None for the other parameters, which need none. A collective (one
    all_gather per mesh dim for all the parameters on the same ranks): every rank calls it with the
    same parameters in the same order."""
    out: list[Tensor | None] = [None] * len(params)
    together: dict[tuple, list[int]] = {}
    for i, (p, x) in enumerate(zip(params, xs)):
        blocks = _cut_blocks(p, x)
        if blocks is None:
            continue
        out[i] = piece_absmax(x, scales_shape(p.shape)[1], blocks[1], blocks[2])
        ranks = p.device_mesh.mesh  # type: ignore[attr-defined]
        key = (tuple(ranks.shape), tuple(ranks.flatten().tolist()), cut_mesh_dims(p), out[i].dtype, x.device)  # type: ignore[union-attr]
        together.setdefault(key, []).append(i)
    if not together:
        return out
    from .distributed import amax_across

    for key, indices in together.items():
        # Every rank keys its parameters alike and takes the first one's mesh: the same groups.
        parts = [out[i] for i in indices]
        agreed = amax_across(torch.cat([t.reshape(-1) for t in parts]), params[indices[0]].device_mesh, key[2])  # type: ignore[union-attr, attr-defined]
        for i, part in zip(indices, agreed.split([t.numel() for t in parts])):  # type: ignore[union-attr]
            out[i] = part.view(out[i].shape)  # type: ignore[union-attr]
    return out


def quantize_momentum(p: Tensor, x: Tensor, absmax: Tensor | None) -> tuple[Tensor, Tensor]:
    """(codes, scales) of x, the local piece of a momentum of p, with its `momentum_absmax`."""
    if absmax is None:
        return quantize(x)
    ids = _cut_blocks(p, x)[0]  # type: ignore[index]
    return quantize_piece(x, absmax, ids), absmax.to(torch.float32)


def dequantize_momentum(p: Tensor, codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The momentum of p's local piece in `dtype` from its local `codes` and `scales`."""
    blocks = _cut_blocks(p, codes)
    if blocks is None:
        return dequantize(codes, scales, dtype)
    return dequantize_piece(codes, scales, blocks[0], dtype)


def drop_unused(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> bool:
    """A Muon group whose variant keeps no second moment, or whose momentum_bits changed (it was
    switched), drops the entries it no longer reads, so that its state is its kind's (and loads
    back) and a later switch starts it from zero. Returns whether it dropped any."""
    if not group["use_muon"]:
        return False
    shapes = state_shapes(p, group)
    dropped = False
    for key in _SWITCHABLE:
        if key in state and key not in shapes:
            del state[key]
            dropped = True
    return dropped


def state_shapes(p: Tensor, group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of each state entry `group` keeps for `p`."""
    if not group["use_muon"]:
        return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
    if group["momentum_bits"] == 8:
        shapes = {"momentum_codes": tuple(p.shape), "momentum_scales": scales_shape(p.shape)}
    else:
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
        if not _fits(key, value, shape):
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise RuntimeError(
                f"{where}: the state {key!r} of parameter '{name}' should be {_kind(key)} of shape {shape}, "
                f"got {got} (was the group's layout edited since the state was made, or a state dict of another "
                "model or optimizer loaded? A changed layout needs new state: move the parameter to a new "
                "optimizer or group)"
            )
        if key != "step" and value.device != p.device:
            raise RuntimeError(f"{where}: the state {key!r} of parameter '{name}' is on {value.device}, not {p.device}")
        if key != "step" and is_dtensor(value) != is_dtensor(p):
            raise RuntimeError(
                f"{where}: the state {key!r} of parameter '{name}' is {'a DTensor' if is_dtensor(value) else 'a plain tensor'}, "
                f"its parameter {'a DTensor' if is_dtensor(p) else 'a plain tensor'}; a parameter's state is placed as it is"
            )


def _fits(key: str, value: Any, shape: tuple[int, ...]) -> bool:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        return False
    return value.dtype == _QUANTIZED_DTYPES[key] if key in QUANTIZED_STATE else value.is_floating_point()


def _kind(key: str) -> str:
    return f"a {_QUANTIZED_DTYPES[key]} tensor" if key in QUANTIZED_STATE else "a floating tensor"


def checked_state(state: dict[str, Any], p: Tensor, group: dict[str, Any], where: str, *, capturable: bool = False) -> dict[str, Any]:
    """A loaded parameter's state, checked against its group's kind and its shape: the kind's keys
    (all of them once there is any state), missing ones (a variant's second moment, or no state at
    all) freshly made; a plain-number AdamW step becomes a float32 tensor, as torch.optim.AdamW
    converts it. State the other kind of group made (a parameter moved between a Muon and an AdamW
    group and saved before its next step) is made fresh, as that step makes it (`adopt_`), when its
    tensors have the parameter's shape (else it is another model's, and refused below)."""
    if of_other_kind(state, group) and all(
            tuple(value.shape) == tuple(p.shape) for key, value in state.items()
            if key in ("momentum_buffer", "momentum_codes", "exp_avg", "exp_avg_sq") and isinstance(value, Tensor)):
        state = {}
    shapes = state_shapes(p, group)
    required = MUON_STATE if group["use_muon"] else ADAMW_STATE
    # A Muon group keeps a step count only to seed stochastic rounding of 16-bit parameters; one
    # saved with bfloat16 parameters may be loaded for float32 ones, which do not read it. A plain
    # Muon group drops a second moment left by a variant it was switched from.
    # momentum_bits may differ from the saving group's: either form of the momentum is converted.
    unknown = sorted(set(state) - set(shapes) - ({"step", *_SWITCHABLE} if group["use_muon"] else set()))
    if group["use_muon"]:
        complete = "momentum_buffer" in state or set(QUANTIZED_STATE) <= set(state)
    else:
        complete = set(required) <= set(state)
    if unknown or (state and not complete):
        raise ValueError(
            f"{where}: state has keys {sorted(state)}, but {'a Muon' if group['use_muon'] else 'an AdamW'} group's "
            f"state is {list(shapes)}; was the state dict saved from a different optimizer or group?"
        )
    state = dict(state)
    if "second_moment" not in shapes:
        state.pop("second_moment", None)
    if is_dtensor(p):
        # A state dict of an unsharded optimizer (one process, or DDP) loaded on every rank of a sharded
        # one: each rank keeps its piece of each whole tensor, placed as its parameter is.
        for key, value in state.items():
            if key != "step" and isinstance(value, Tensor) and not is_dtensor(value) and tuple(value.shape) == shapes.get(key):
                state[key] = distribute_like(p, value, rows=key == "momentum_scales")
    step = state.get("step")
    if step is not None and not isinstance(step, Tensor):
        state["step"] = torch.tensor(number(step, "step", where), dtype=torch.float32)
    state.update(missing_state(p, state, group, capturable=capturable))
    for key, shape in shapes.items():
        value = state[key]
        if not _fits(key, value, shape):
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(f"{where}: {key} should be {_kind(key)} of shape {shape}, got {got}")
    for key in _SWITCHABLE:
        if key in state and key not in shapes:
            del state[key]
    return state
