"""The options of muonkit.Muon and their checks: which keys each kind of group has, and the
ValueError / TypeError for a bad option, parameter or gradient, naming the group and the value.

Everything here runs before a step or a load changes anything (see muonkit.optimizer).
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import warnings
from collections.abc import Sequence
from typing import Any, Literal, TypedDict, Union

import torch
from torch import Tensor

from .dtensor import is_dtensor
from .layout import LAYOUT_NAMES, Layout, matrix_shape, resolve
from .orthogonalize import ORTHOGONALIZERS, check_ns_dtype
from .scaling import SCALES
from .variants import OPTIONS as VARIANT_OPTIONS
from .variants import check_options as check_variant_options

# The constructor's defaults, the one table of them: Muon(...)'s signature reads it, and so do
# groups added later and the AdamW groups (under the adamw_* keys, see ADAMW_FROM).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.95,
    "nesterov": True,
    "weight_decay": 0.1,
    "scale": "moonlight",
    "rms": 0.2,
    "orthogonalizer": "polar_express",
    "ns_steps": 5,
    "ns_dtype": None,
    "layout": None,
    "variant": "muon",
    **VARIANT_OPTIONS,
    "cautious_weight_decay": False,
    "state_dtype": None,
    "momentum_bits": 32,
    "stochastic_rounding": True,
    "adamw_lr": None,  # None: lr
    "adamw_betas": (0.9, 0.999),
    "adamw_eps": 1e-8,
    "adamw_weight_decay": None,  # None: weight_decay
    "fused": None,  # AdamW groups only: None (automatic, `adamw_kernel`), True (torch's fused kernel) or False
    "nonfinite": "propagate",
    "diagnostics": False,
    "orthogonality_every": 0,
    "capturable": False,
}

MUON_KEYS = (
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "scale",
    "rms",
    "orthogonalizer",
    "ns_steps",
    "ns_dtype",
    "layout",
    "variant",
    "beta2",
    "variant_eps",
    "fraction",
    "ef_decay",
    "selection",
    "cautious_weight_decay",
    "state_dtype",
    "momentum_bits",
    "stochastic_rounding",
)

# A Muon group's momentum is kept in its state dtype (32) or as 8-bit blocks (muonkit.quantize).
MOMENTUM_BITS = (8, 32)

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "cautious_weight_decay", "state_dtype", "stochastic_rounding", "fused")

# An AdamW group's key -> the optimizer default it takes when missing.
ADAMW_FROM = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
    "cautious_weight_decay": "cautious_weight_decay",
    "state_dtype": "state_dtype",
    "stochastic_rounding": "stochastic_rounding",
    "fused": "fused",
}

# Options of the whole optimizer: kept in `defaults` (so they survive deepcopy and pickling), never
# in a param group.
GLOBAL_KEYS = ("nonfinite", "diagnostics", "orthogonality_every", "capturable")

# torch.optim.AdamW / SGD options that change the update and that muonkit does not implement: a
# group asking for them is refused rather than silently stepped without them.
UNSUPPORTED = ("amsgrad", "maximize")

NONFINITE = ("propagate", "skip", "raise")

Nonfinite = Literal["propagate", "skip", "raise"]

# Each group counts the steps `nonfinite="skip"` skipped under this key, so that the count is in
# state_dict() and in distributed checkpoints.
SKIPPED = "skipped_steps"


class MuonGroup(TypedDict, total=False):
    """A Muon param group as the optimizer holds it (every key filled; see Muon's Args)."""

    params: list[Tensor]
    param_names: list[str]
    use_muon: Literal[True]
    lr: float | Tensor
    momentum: float
    nesterov: bool
    weight_decay: float
    scale: str
    rms: float
    orthogonalizer: Any
    ns_steps: int
    ns_dtype: Any
    layout: Any
    variant: str
    beta2: float
    variant_eps: float
    fraction: float
    ef_decay: float
    selection: str
    cautious_weight_decay: bool
    state_dtype: torch.dtype | None
    momentum_bits: int
    stochastic_rounding: bool
    skipped_steps: int


class AdamWGroup(TypedDict, total=False):
    """An AdamW param group as the optimizer holds it (torch.optim.AdamW's keys and muonkit's)."""

    params: list[Tensor]
    param_names: list[str]
    use_muon: Literal[False]
    lr: float | Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float | Tensor
    cautious_weight_decay: bool
    state_dtype: torch.dtype | None
    stochastic_rounding: bool
    fused: bool | None
    skipped_steps: int


Group = Union[MuonGroup, AdamWGroup]


def fill_defaults(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Fill the keys a group of its kind lacks from the optimizer's `defaults`."""
    for key in MUON_KEYS if group["use_muon"] else ADAMW_KEYS:
        group.setdefault(key, defaults[key if group["use_muon"] else ADAMW_FROM[key]])


def split_names(group: dict[str, Any]) -> None:
    """Normalize group["params"] to a list of tensors, moving (name, tensor) names aside."""
    params = group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("params must be an ordered collection (a list), not a set")
    params = list(params)
    named = [isinstance(x, tuple) for x in params]
    if any(named) and not all(named):
        # torch.optim.Optimizer.add_param_group's error, with the first entry that breaks the rule.
        raise ValueError(
            "all optimizer params should be with/without names. Some param names are missing "
            f"(params[{named.index(False)}] is not a (name, tensor) pair)"
        )
    if params and all(named):
        group["param_names"] = [name for name, _ in params]
        params = [t for _, t in params]
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
    group["params"] = params


def check_group_keys(group: dict[str, Any], where: str) -> None:
    """Refuse, in a group as given, a key that muonkit reads elsewhere and this kind of group would
    ignore: an option of the whole optimizer, an option of the other kind of group (an AdamW group
    has no momentum), or a constructor argument (adamw_lr is Muon(adamw_lr=...); a group's is lr).
    Other keys (a user's tag, a scheduler's initial_lr) are kept, as torch.optim keeps them."""
    for key in GLOBAL_KEYS:
        if key in group:
            raise ValueError(f"{key} is an option of the whole optimizer (Muon({key}=...)), not of a param group")
    muon = group["use_muon"]
    for key in sorted(set(group) & (set(DEFAULTS) | set(ADAMW_KEYS)) - set(MUON_KEYS if muon else ADAMW_KEYS)):
        if key in ADAMW_FROM.values() and key not in ADAMW_KEYS:
            fix = (f"it is Muon({key}=...), the AdamW groups' default; a use_muon=False group's own is "
                   f"'{key.removeprefix('adamw_')}'")
        elif muon:
            fix = "it is an option of AdamW groups (use_muon=False)"
        else:
            fix = "it is an option of Muon groups" + (" (an AdamW group's beta1 is betas[0])" if key == "momentum" else "")
        raise ValueError(
            f"{where}: {key}={group[key]!r} is not an option of {'a Muon' if muon else 'an AdamW'} group, "
            f"which would step without it: {fix}"
        )
    # A key that is no option but one letter or two from one of this kind (adamw_options={"beta": ...},
    # muon_options={"momentun": ...}) is kept as a tag, like any other key, and the group steps with the
    # default: say so. Cutoff 0.85 leaves torch's own extra keys alone (OneCycleLR's max_momentum and
    # base_momentum, schedulers' initial_lr, max_lr, min_lr).
    known = set(MUON_KEYS) | set(ADAMW_KEYS) | set(DEFAULTS) | set(GLOBAL_KEYS)
    for key in sorted(k for k in group if isinstance(k, str) and k not in known):
        close = difflib.get_close_matches(key, MUON_KEYS if muon else ADAMW_KEYS, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"{where}: {key}={group[key]!r} is not an option of {'a Muon' if muon else 'an AdamW'} "
                          f"group; it is kept as a tag and the group uses its default {close[0]}. "
                          f"Did you mean {close[0]!r}?", UserWarning, stacklevel=2)


def number(value: Any, name: str, where: str) -> float:
    """A real hyperparameter as a float: Python and NumPy numbers, or a one-element tensor (as
    torch.optim accepts for lr); never a bool."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def check_unsupported(group: dict[str, Any], where: str) -> None:
    for key in UNSUPPORTED:
        if group.get(key):
            raise ValueError(
                f"{where}: {key}={group[key]!r} is not supported by muonkit.Muon (its AdamW groups are "
                f"plain AdamW); remove {key!r} from the group, or train these parameters with "
                f"torch.optim.AdamW({key}=True)"
            )


def check_options(group: dict[str, Any], where: str, *, read_lr: bool = True) -> None:
    """Check a group's options; with read_lr=False a tensor lr is checked without reading its value
    (the step of a capturable optimizer makes no host read; its value was checked when set)."""
    kind = group.get("use_muon")
    if not isinstance(kind, bool):
        raise TypeError(f"{where}: use_muon must be True or False, got {kind!r}")
    missing = [key for key in (MUON_KEYS if kind else ADAMW_KEYS) if key not in group]
    if missing:
        # A group's kind is fixed when it is added: its keys and its parameters' state are that kind's.
        raise ValueError(
            f"{where}: use_muon is {kind} but the group has no {', '.join(map(repr, missing))} "
            f"({'a Muon' if kind else 'an AdamW'} group's option{'s' if len(missing) > 1 else ''}); was use_muon "
            "edited? A group keeps the kind it was built with: set use_muon back, or move the parameters "
            "to a group of the other kind (a new optimizer, or opt.add_param_group({'params': [...], "
            f"'use_muon': {kind}}}))"
        )
    check_unsupported(group, where)
    if group["use_muon"]:
        check_muon_options(group, where, read_lr=read_lr)
    else:
        check_adamw_options(group, where, read_lr=read_lr)


def _check_lr_wd(options: dict[str, Any], where: str, *, read_lr: bool = True) -> None:
    lr = options["lr"]
    if not read_lr and isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point() or lr.is_complex():
            raise ValueError(f"{where}: lr must be a one-element real floating tensor, got {lr!r}")
    elif number(lr, "lr", where) < 0:
        raise ValueError(f"{where}: lr must be >= 0, got {options['lr']!r}")
    if number(options["weight_decay"], "weight_decay", where) < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {options['weight_decay']!r}")


def check_muon_options(options: dict[str, Any], where: str, *, read_lr: bool = True) -> None:
    _check_lr_wd(options, where, read_lr=read_lr)
    momentum = number(options["momentum"], "momentum", where)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {options['momentum']!r}")
    if not isinstance(options["nesterov"], bool):
        raise TypeError(f"{where}: nesterov must be True or False, got {options['nesterov']!r}")
    if options["scale"] not in SCALES:
        raise ValueError(
            f"{where}: unknown scale {options['scale']!r}; choose one of {', '.join(SCALES)}"
        )
    if number(options["rms"], "rms", where) <= 0:
        raise ValueError(f"{where}: rms must be > 0, got {options['rms']!r}")
    method = options["orthogonalizer"]
    if not callable(method) and method not in ORTHOGONALIZERS:
        raise ValueError(
            f"{where}: unknown orthogonalizer {method!r}; choose one of "
            f"{', '.join(ORTHOGONALIZERS)} or pass a callable (X, steps) -> tensor"
        )
    steps = options["ns_steps"]
    try:
        valid = not isinstance(steps, bool) and operator.index(steps) >= 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{where}: ns_steps must be an int >= 0, got {steps!r}")
    check_ns_dtype(options["ns_dtype"], f"{where}: ns_dtype")
    layout = options["layout"]
    if layout is not None and layout not in LAYOUT_NAMES and not isinstance(layout, Layout):
        raise ValueError(
            f"{where}: unknown layout {layout!r}; use None, 'conv', 'stacked' or a muonkit.Layout"
        )
    check_variant_options(options, where)
    bits = options["momentum_bits"]
    if isinstance(bits, bool) or bits not in MOMENTUM_BITS:
        raise ValueError(f"{where}: momentum_bits must be 8 or 32, got {bits!r}")
    _check_cautious(options, where)


def _check_cautious(options: dict[str, Any], where: str) -> None:
    """Options both kinds of group have: cautious decay, state dtype, stochastic rounding."""
    for key in ("cautious_weight_decay", "stochastic_rounding"):
        if not isinstance(options[key], bool):
            raise TypeError(f"{where}: {key} must be True or False, got {options[key]!r}")
    dtype = options["state_dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex):
        raise ValueError(f"{where}: state_dtype must be None or a floating torch.dtype, got {dtype!r}")


def check_global_options(options: dict[str, Any], process_group: Any, exchange_dtype: Any = None) -> None:
    if options["nonfinite"] not in NONFINITE:
        raise ValueError(f"Muon: nonfinite must be one of {', '.join(NONFINITE)}, got {options['nonfinite']!r}")
    if not isinstance(options["diagnostics"], bool):
        raise TypeError(f"Muon: diagnostics must be True or False, got {options['diagnostics']!r}")
    every = options["orthogonality_every"]
    try:
        valid = not isinstance(every, bool) and operator.index(every) >= 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"Muon: orthogonality_every must be an int >= 0, got {every!r}")
    if every and not options["diagnostics"]:
        raise ValueError("Muon: orthogonality_every needs diagnostics=True (it adds to the step's statistics)")
    if exchange_dtype is not None and process_group is None:
        raise ValueError(f"Muon: exchange_dtype={exchange_dtype!r} is the dtype of the exchange between ranks; it needs a process_group")
    if every and process_group is not None:
        raise ValueError(
            "Muon: orthogonality_every is measured on one process only; with a process_group, set it to 0 "
            "(the per-parameter RMS statistics still work)"
        )
    if not isinstance(options["capturable"], bool):
        raise TypeError(f"Muon: capturable must be True or False, got {options['capturable']!r}")
    if options["capturable"]:
        # Each of these reads tensor values on the host during the step.
        for key, allowed, why in (
            ("nonfinite", "propagate", "deciding to skip or raise reads the gradients' finiteness"),
            ("diagnostics", False, "the statistics are copied to the host"),
        ):
            if options[key] != allowed:
                raise ValueError(f"Muon: capturable=True needs {key}={allowed!r} ({why}), got {options[key]!r}")
        if process_group is not None:
            raise ValueError("Muon: capturable=True is for one process; pass process_group=None")


# Hyperparameters a capturable step reads as Python numbers (constants of a captured graph); only lr
# may be a tensor, which the step then reads on the device.
CAPTURABLE_NUMBERS = ("momentum", "weight_decay", "rms", "beta2", "variant_eps", "eps")


def check_capturable(group: dict[str, Any], device: torch.device, where: str) -> None:
    """A capturable step reads a tensor lr on the parameters' device and every other hyperparameter
    as a Python number: anything else would be a host read (or a copy) inside the step."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.device != device:
        raise ValueError(
            f"{where}: capturable=True needs a tensor lr on the parameters' device {device}, got one on {lr.device} "
            f"(torch.tensor(lr, device='{device}'))"
        )
    values = [(key, group[key]) for key in CAPTURABLE_NUMBERS if key in group]
    values += [(f"betas[{i}]", beta) for i, beta in enumerate(group.get("betas", ()))]
    for key, value in values:
        if isinstance(value, Tensor):
            raise ValueError(
                f"{where}: capturable=True reads {key} as a Python number (only lr may be a tensor), got {value!r}; "
                f"pass {key}={value.item()!r}"
            )


def check_adamw_options(options: dict[str, Any], where: str, *, read_lr: bool = True) -> None:
    _check_lr_wd(options, where, read_lr=read_lr)
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(beta, f"betas[{i}]", where) < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {beta!r}")
    if number(options["eps"], "eps", where) < 0:
        raise ValueError(f"{where}: eps must be >= 0, got {options['eps']!r}")
    _check_cautious(options, where)
    fused = options["fused"]
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"{where}: fused must be None, True or False, got {fused!r}")
    if fused and options["cautious_weight_decay"]:
        raise ValueError(
            f"{where}: fused=True with cautious_weight_decay=True: torch's fused AdamW kernel decays every "
            "entry, it has no mask; set one of them off"
        )


# The dtypes torch's fused AdamW kernel steps (float8 types are floating point too; it has no kernel for them).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_fused_param(p: Tensor, name: str, group: dict[str, Any], where: str) -> None:
    """A parameter of a fused=True AdamW group must be one that torch's fused AdamW kernel steps in
    place, exactly as torch.optim.AdamW(fused=True) would: on a device that has the kernel
    (torch.optim.optimizer._get_fused_kernels_supported_devices), of a dtype it has (FUSED_DTYPES),
    with its moments in its own dtype (the kernel reads and writes them in the parameter's dtype; a
    wider state_dtype is muonkit's own widened step), and written round-to-nearest (the kernel
    cannot round stochastically)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    # Only where the kernel takes every floating dtype (CPU and CUDA): elsewhere (mps, xpu, ...) a dtype
    # it lacks would raise inside the kernel, after earlier groups had applied their step.
    devices = [d for d in ("cpu", "cuda") if d in _get_fused_kernels_supported_devices()]
    if p.device.type not in devices:
        raise ValueError(
            f"{where}: parameter '{name}' is on {p.device}, where muonkit does not run torch's fused AdamW "
            f"kernel (fused=True needs one of {', '.join(devices)}: there it takes every floating dtype, so a "
            "step cannot fail halfway); set the group's fused to None"
        )
    if p.dtype not in FUSED_DTYPES:
        raise ValueError(f"{where}: parameter '{name}' is {p.dtype}, which torch's fused AdamW kernel does not step; "
                         "set the group's fused to None or False")
    if group["state_dtype"] is not None and group["state_dtype"] != p.dtype:
        raise ValueError(
            f"{where}: parameter '{name}' is {p.dtype} with state_dtype={group['state_dtype']}, but fused=True "
            "keeps AdamW's moments in the parameter's dtype (torch's fused kernel); set state_dtype=None or "
            "fused=None"
        )
    if group["stochastic_rounding"] and p.dtype.itemsize < 4:
        raise ValueError(
            f"{where}: parameter '{name}' is {p.dtype} and the group rounds it stochastically "
            "(stochastic_rounding=True), which torch's fused AdamW kernel cannot (it rounds to nearest, as "
            "torch.optim.AdamW(fused=True)); set stochastic_rounding=False or fused=None"
        )


def adamw_kernel(group: dict[str, Any], capturable: bool) -> tuple[bool, str]:
    """Whether an AdamW group steps with torch's fused AdamW kernel, and why (the words
    muonkit.explain prints): (True, why) for the kernel, (False, why) for torch's default AdamW.

    fused=True: always (`check_fused_param` refused, before the step, what the kernel cannot do).
    fused=False: never: torch's default AdamW (foreach or for-loop, `functional._adamw_foreach`),
    bit for bit torch.optim.AdamW(). fused=None (the default): the kernel wherever it steps every
    parameter of the group as torch.optim.AdamW(fused=True) would and cannot fail midway, since it
    is the fastest AdamW on CPU (one pass per tensor; benchmarks/RESULTS.md, "fused AdamW by
    default"): every parameter a plain (not DTensor) CPU tensor of a dtype the kernel has
    (FUSED_DTYPES), moments in its own dtype, written round-to-nearest, no cautious weight decay (a
    mask the kernel has not), capturable=False (torch's capturable arithmetic is kept) and not
    under torch.compile (torch wraps its fused functional in torch.compiler.disable: the step would
    break the graph). Else the whole group takes torch's default AdamW, which differs from the
    kernel by round-off only.

    Decided per group from its options and all of its parameters (with a gradient or not), so a
    parameter's kernel does not change with its neighbours' gradients. Not automatic on CUDA or
    other devices (not measured there; fused=True asks for the kernel on CUDA).
    """
    fused = group["fused"]
    if fused is not None:
        return fused, f"fused={fused}"
    if group["cautious_weight_decay"]:
        return False, "fused=None with cautious_weight_decay=True, which torch's fused AdamW kernel cannot apply (no mask)"
    if capturable:
        return False, "fused=None with capturable=True: torch's capturable AdamW arithmetic"
    if torch.compiler.is_compiling():
        return False, "fused=None under torch.compile, which does not trace torch's fused AdamW (a graph break)"
    names = group.get("param_names") or []
    for i, p in enumerate(group["params"]):
        name = names[i] if i < len(names) else f"#{i}"
        why = None
        if is_dtensor(p):
            why = "is a DTensor (its local pieces step with torch's default AdamW)"
        elif p.device.type != "cpu":
            why = f"is on {p.device} (the kernel is chosen automatically on CPU only; fused=True asks for it)"
        elif p.dtype not in FUSED_DTYPES:
            why = f"is {p.dtype}, which torch's fused AdamW kernel does not step"
        elif group["state_dtype"] is not None and group["state_dtype"] != p.dtype:
            why = f"is {p.dtype} with state_dtype={group['state_dtype']} (the kernel keeps moments in the parameter's dtype)"
        elif group["stochastic_rounding"] and p.dtype.itemsize < 4:
            why = f"is {p.dtype} and rounds stochastically (stochastic_rounding=True; the kernel rounds to nearest)"
        if why is not None:
            return False, f"fused=None and parameter '{name}' {why}"
    return True, "fused=None on CPU: as torch.optim.AdamW(fused=True), the fastest AdamW on CPU"


def check_param(p: Tensor, name: str, group: dict[str, Any], where: str) -> None:
    if torch.is_complex(p):
        raise TypeError(
            f"{where}: parameter '{name}' is complex ({p.dtype}); muonkit supports real "
            "parameters only (view it as real with torch.view_as_real)"
        )
    if not p.is_floating_point():
        raise TypeError(f"{where}: parameter '{name}' has dtype {p.dtype}; it must be floating point")
    if overlaps_itself(p):
        raise ValueError(
            f"{where}: parameter '{name}' with shape {tuple(p.shape)} and strides {p.stride()} has elements that "
            "share memory (e.g. made by expand()), so an in-place update cannot be applied to it; make it "
            "its own memory with nn.Parameter(t.clone())"
        )
    if not group["use_muon"]:
        if group.get("fused"):
            check_fused_param(p, name, group, where)
        return
    if p.ndim < 2:
        raise ValueError(
            f"{where}: parameter '{name}' has shape {tuple(p.shape)}; Muon needs a matrix - "
            "route it to AdamW with muonkit.param_groups(model) or a group with use_muon=False (with the "
            "transformers Trainer: optimizer_cls_and_kwargs=(muonkit.MuonFactory, kwargs), which routes the "
            "model, instead of (muonkit.Muon, kwargs), which gets the Trainer's unrouted groups)"
        )
    try:
        layout = resolve(group["layout"], p.ndim)
        layout.check_shape(p.shape)
    except ValueError as err:
        raise ValueError(f"{where}: parameter '{name}' with shape {tuple(p.shape)}: {err}") from None
    _, rows, cols = matrix_shape(p.shape, layout)
    if rows == 0 or cols == 0:
        raise ValueError(f"{where}: parameter '{name}' has an empty matrix view {rows} x {cols}")


def overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of `t` may share memory: with the axes of more than one element sorted by
    stride, each stride must step past the farthest offset the smaller ones reach (every view torch's
    own operations make of unshared memory does)."""
    if is_dtensor(t):
        t = t.to_local()
    if t.layout != torch.strided:
        return False
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_grad(p: Tensor, name: str, where: str) -> None:
    grad = p.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError(
            f"{where}: parameter '{name}' has a sparse gradient; Muon and AdamW need dense gradients "
            "(for nn.Embedding use sparse=False)"
        )
    if grad.shape != p.shape:
        raise RuntimeError(f"{where}: parameter '{name}' has shape {tuple(p.shape)} but its gradient has shape {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise RuntimeError(f"{where}: parameter '{name}' has a gradient of dtype {grad.dtype}; it must be floating point")
    if grad.device != p.device:
        raise RuntimeError(f"{where}: parameter '{name}' is on {p.device} but its gradient is on {grad.device}")
    if is_dtensor(grad) != is_dtensor(p) or (is_dtensor(p) and grad.placements != p.placements):
        raise RuntimeError(f"{where}: parameter '{name}' and its gradient are not sharded alike")
