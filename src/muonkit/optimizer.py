"""class Muon: one torch.optim.Optimizer with Muon groups and AdamW groups."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import functional
from .layout import LAYOUT_NAMES, Layout, LayoutSpec, matrix_shape, resolve
from .orthogonalize import EPS, ORTHOGONALIZERS, SCHEDULES, Orthogonalizer
from .scaling import SCALES, Scale

_MUON_KEYS = (
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
)
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
# torch.optim.AdamW / SGD options that change the update and that muonkit does not implement: a
# group asking for them is refused rather than silently stepped without them.
_UNSUPPORTED = ("amsgrad", "maximize")
# The per-parameter state of each kind of group (torch.optim.Muon's and torch.optim.AdamW's keys).
_MUON_STATE = ("momentum_buffer",)
_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
# Keys of torch.optim.AdamW / Adam groups that pick an implementation (muonkit has one) or are checked
# at load (amsgrad, maximize, decoupled_weight_decay): dropped from a loaded group.
_TORCH_ADAMW_KEYS = (
    "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"
)
# torch.optim.Muon's group keys that muonkit spells as scale and orthogonalizer (see _from_torch_muon).
_TORCH_MUON_KEYS = ("adjust_lr_fn", "ns_coefficients", "eps")
# torch.optim.Muon's adjust_lr_fn (None means "original") -> muonkit's scale. torch's _adjust_lr:
# "original" sqrt(max(1, A/B)), "match_rms_adamw" 0.2*sqrt(max(A, B)) (torch/optim/_muon.py, 2.13).
_ADJUST_LR_FN_TO_SCALE = {None: "keller_jordan", "original": "keller_jordan", "match_rms_adamw": "moonlight"}
_TORCH_MUON_RMS = 0.2


class Muon(torch.optim.Optimizer):
    r"""Muon for hidden weight matrices and AdamW for everything else, in one optimizer.

    Each param group carries ``use_muon`` (missing means True). For a Muon group, each matrix
    W (rows x cols) of each parameter's matrix view is updated as

    .. math::
        M &\leftarrow \beta M + (1 - \beta) G \\
        U &\leftarrow (1 - \beta) G + \beta M \quad\text{(nesterov; else } U = M) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(\text{rows}, \text{cols})\,
             \operatorname{orthogonalize}(U)

    and AdamW groups get exactly torch.optim.AdamW's update.

    Args:
        params: tensors, (name, tensor) pairs (not mixed), or group dicts (see muonkit.param_groups).
        lr: learning rate of Muon groups (default 1e-3; with scale "moonlight" an AdamW-sized lr); a
            float or, as torch.optim accepts, a one-element tensor of any shape.
        momentum: beta in [0, 1) (default 0.95).
        nesterov: Nesterov-style lookahead (default True).
        weight_decay: decoupled weight decay lambda of Muon groups (default 0.1).
        scale: "moonlight" (default; rms * sqrt(max(rows, cols))), "keller_jordan", "mup", "naive".
        rms: target update RMS of the "moonlight" scale (default 0.2).
        orthogonalizer: "polar_express" (default), "keller_jordan", "you", "gram", "svd" or a
            callable (X, steps) -> tensor of X's shape.
        ns_steps: iterations of the orthogonalizer (default 5).
        ns_dtype: working dtype of the orthogonalizer; None means float32 on CPU, bfloat16 on CUDA.
        layout: matrix view of the parameters: None (2D (out, in); 3D stacked (batch, out, in);
            4D/5D conv (out, in, *kernel)), "conv", "stacked", or a muonkit.Layout.
        adamw_lr: lr of AdamW groups (None: same as lr).
        adamw_betas, adamw_eps: AdamW's betas (default (0.9, 0.999)) and eps (default 1e-8).
        adamw_weight_decay: AdamW's decoupled weight decay (None: same as weight_decay).
        process_group: a torch.distributed process group to share the Newton-Schulz work; None
            (default) means no torch.distributed call at all.

    Example:
        >>> opt = Muon(muonkit.param_groups(model), lr=1e-3, weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    References:
        Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024).
        Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982.
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv:1711.05101.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        *,
        scale: Scale = "moonlight",
        rms: float = 0.2,
        orthogonalizer: Orthogonalizer = "polar_express",
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
        layout: LayoutSpec = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scale=scale,
            rms=rms,
            orthogonalizer=orthogonalizer,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            layout=layout,
            adamw_lr=lr if adamw_lr is None else adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        )
        _check_muon_options(defaults, "Muon")
        _check_adamw_options(
            dict(
                lr=defaults["adamw_lr"],
                betas=defaults["adamw_betas"],
                eps=adamw_eps,
                weight_decay=defaults["adamw_weight_decay"],
            ),
            "Muon (adamw_* arguments)",
        )
        self._distributed = None
        if process_group is not None:
            from .distributed import DistributedOrthogonalizer

            self._distributed = DistributedOrthogonalizer(process_group)
        super().__init__(params, defaults)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent exchanging Muon updates since construction (0 without a
        process_group); an all-gather counts as a ring, (world - 1) times this rank's part."""
        return 0 if self._distributed is None else self._distributed.bytes_sent

    # ---------------------------------------------------------------- groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing keys are filled by kind (Muon or AdamW) and everything is checked
        before the group is added, so a rejected group leaves the optimizer unchanged."""
        group = dict(param_group)
        group.setdefault("use_muon", True)
        if not isinstance(group["use_muon"], bool):
            raise TypeError(f"use_muon must be True or False, got {group['use_muon']!r}")
        index = len(self.param_groups)
        kind = "Muon" if group["use_muon"] else "AdamW"
        self._fill_defaults(group)
        where = f"{kind} group {index}"
        _check_options(group, where)
        _split_names(group)
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            _check_param(p, name, group, where)
            if group["use_muon"] and _is_dtensor(p):
                self._check_dtensor(p, name, where)
        given = set(group)
        super().add_param_group(group)
        added = self.param_groups[-1]
        own = _MUON_KEYS if added["use_muon"] else _ADAMW_KEYS
        for key in set(self.defaults) - set(own) - given:
            del added[key]
        for p in added["params"]:
            self._init_state(p, added)

    def _check_dtensor(self, p: Tensor, name: str, where: str) -> None:
        if self._distributed is None:
            raise ValueError(
                f"{where}: parameter '{name}' is a DTensor (e.g. sharded by FSDP2's fully_shard); "
                "pass process_group=<the group it is sharded over> to Muon"
            )
        self._distributed.check_param(p, f"{where}: parameter '{name}'")

    def _fill_defaults(self, group: dict[str, Any]) -> None:
        d = self.defaults
        if group["use_muon"]:
            for key in _MUON_KEYS:
                group.setdefault(key, d[key])
        else:
            group.setdefault("lr", d["adamw_lr"])
            group.setdefault("betas", d["adamw_betas"])
            group.setdefault("eps", d["adamw_eps"])
            group.setdefault("weight_decay", d["adamw_weight_decay"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        # State exists from construction so that every process has the same state_dict keys.
        if not self.state[p]:
            self.state[p].update(_new_state(p, group["use_muon"]))

    # ------------------------------------------------------------------ copies and checkpoints

    def __getstate__(self) -> dict[str, Any]:
        if self._distributed is not None:
            raise TypeError(
                "a muonkit.Muon created with a process_group cannot be pickled or copied (copy.deepcopy, "
                "pickle, torch.save of the optimizer object): the process group belongs to the running "
                "processes. Save opt.state_dict() instead and load it into Muon(..., process_group=pg) "
                "built where it is used"
            )
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "defaults" not in state:
            # torch.optim.Optimizer.load_state_dict hands over the loaded groups and state (tensors
            # already cast to the parameters' dtype and device) through __setstate__: they are checked
            # and translated here, before anything of this optimizer changes.
            super().__setstate__(self._loaded(state["state"], state["param_groups"]))
            return
        # Unpickling (copy.deepcopy, pickle, torch.load): __getstate__ refuses an optimizer that holds
        # a process group, so a copy never has one; keys added to groups since it was saved are filled.
        self._distributed = None
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            self._fill_defaults(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of muonkit.Muon, torch.optim.AdamW / Adam or torch.optim.Muon.

        Every group and its parameters' state are checked against this optimizer's groups before
        anything changes; a state dict that does not fit raises ValueError naming the group and
        leaves the optimizer as it was:

        - a group keeps its kind: a loaded group is an AdamW group if its ``use_muon`` is False, or,
          without ``use_muon`` (torch's optimizers), if it has ``betas``; else a Muon group;
        - each parameter's state holds its kind's keys (Muon ``momentum_buffer``; AdamW ``step``,
          ``exp_avg``, ``exp_avg_sq``) with the parameter's shape; a plain-number AdamW ``step``
          (torch's older format) becomes a float32 tensor, as torch.optim.AdamW converts it;
        - torch.optim.AdamW's implementation flags are dropped; ``amsgrad`` or ``maximize`` set, or
          torch.optim.Adam's L2 weight decay (``decoupled_weight_decay=False`` with weight_decay > 0),
          are refused;
        - torch.optim.Muon's ``adjust_lr_fn`` "original" (or None) becomes scale "keller_jordan",
          "match_rms_adamw" becomes scale "moonlight" with rms 0.2; its default ``ns_coefficients``
          (Keller Jordan's) and ``eps`` (1e-7) become orthogonalizer "keller_jordan"; anything else
          has no muonkit equivalent and is refused. The Newton-Schulz iteration then runs in this
          group's ``ns_dtype`` (torch.optim.Muon runs bfloat16);
        - missing muonkit keys (an older state dict) are filled from the constructor's defaults.

        Example:
            >>> opt = muonkit.Muon([{"params": model.parameters(), "use_muon": False}])
            >>> opt.load_state_dict(torch_adamw.state_dict())
        """
        super().load_state_dict(state_dict)

    def _loaded(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The checked, translated groups and state of a load; raises before anything changes."""
        new_state = type(state)(dict)  # torch's defaultdict(dict), as Optimizer.__init__ makes it
        new_state.update(state)  # entries that are not parameters (torch keeps them as they are)
        new_groups = []
        for index, (saved, current) in enumerate(zip(groups, self.param_groups)):
            group = dict(saved)
            use_muon = current["use_muon"]
            kind = "Muon" if use_muon else "AdamW"
            where = f"load_state_dict: {kind} group {index}"
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
            if use_muon:
                _from_torch_muon(group, where)
            else:
                _from_torch_adamw(group, where)
            self._fill_defaults(group)
            _check_options(group, where)
            names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                _check_param(p, name, group, where)
                if use_muon and _is_dtensor(p):
                    self._check_dtensor(p, name, where)
                if p in state:
                    new_state[p] = _checked_state(state[p], p, use_muon, f"{where}: parameter '{name}'")
                else:
                    new_state[p] = _new_state(p, use_muon)
            new_groups.append(group)
        return {"state": new_state, "param_groups": new_groups}

    # ---------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update every parameter that has a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _check_grads(self) -> None:
        # Checked for all groups before anything changes, so an error leaves no partial step:
        # options edited through param_groups since construction, parameters appended to a group's
        # list (they get their checks and state here, as torch.optim creates state lazily), grads.
        appended = []
        for index, group in enumerate(self.param_groups):
            where = f"{'Muon' if group['use_muon'] else 'AdamW'} group {index}"
            _check_options(group, where)
            names = group.get("param_names") or []
            names = names + [f"#{i}" for i in range(len(names), len(group["params"]))]
            for name, p in zip(names, group["params"]):
                if p.grad is None:
                    continue
                if not self.state.get(p):
                    _check_param(p, name, group, where)
                    if group["use_muon"] and _is_dtensor(p):
                        self._check_dtensor(p, name, where)
                    appended.append((p, group))
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"group {index}: parameter '{name}' has a sparse gradient; Muon and AdamW "
                        "need dense gradients (for nn.Embedding use sparse=False)"
                    )
                if p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"group {index}: parameter '{name}' has shape {tuple(p.shape)} but its "
                        f"gradient has shape {tuple(p.grad.shape)}"
                    )
        for p, group in appended:
            self._init_state(p, group)

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        layouts = [resolve(group["layout"], p.ndim) for p in params]
        orthogonalize_many = None
        if self._distributed is not None:
            orthogonalize_many = self._distributed.bind(
                method=group["orthogonalizer"],
                steps=group["ns_steps"],
                dtype=group["ns_dtype"],
                params=params,
                layouts=layouts,
            )
        functional.muon(
            _local(params),
            _local([p.grad for p in params]),
            _local([self.state[p]["momentum_buffer"] for p in params]),
            layouts,
            lr=_scalar(group["lr"]),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            rms=group["rms"],
            orthogonalizer=group["orthogonalizer"],
            ns_steps=group["ns_steps"],
            ns_dtype=group["ns_dtype"],
            orthogonalize_many=orthogonalize_many,
            shapes=[p.shape for p in params],
        )

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        functional.adamw(
            _local(params),
            _local([p.grad for p in params]),
            _local([self.state[p]["exp_avg"] for p in params]),
            _local([self.state[p]["exp_avg_sq"] for p in params]),
            [self.state[p]["step"] for p in params],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )


# -------------------------------------------------------------------------- validation helpers


def _is_dtensor(t: Tensor) -> bool:
    # Looked up, not imported: with process_group=None nothing touches torch.distributed, and no
    # tensor can be a DTensor before torch.distributed.tensor has been imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor's local slice (a view: updating it updates the DTensor); other tensors as they are."""
    return [t.to_local() if _is_dtensor(t) else t for t in tensors]


def _scalar(value: float | Tensor) -> float:
    """A hyperparameter the step uses as a Python float: a one-element tensor of any shape (a tensor
    lr, as torch.optim accepts) gives its value; numbers are returned as floats."""
    return value.item() if isinstance(value, Tensor) else float(value)


def _new_state(p: Tensor, use_muon: bool) -> dict[str, Tensor]:
    """The state of a parameter that has not been stepped (torch.optim.Muon's and AdamW's keys)."""
    if use_muon:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _checked_state(state: dict[str, Any], p: Tensor, use_muon: bool, where: str) -> dict[str, Any]:
    """A loaded parameter's state, checked against its kind and shape; an empty one is filled, and a
    plain-number AdamW step becomes a float32 tensor (as torch.optim.AdamW converts it)."""
    if not state:
        return _new_state(p, use_muon)
    keys = _MUON_STATE if use_muon else _ADAMW_STATE
    if set(state) != set(keys):
        kind = "Muon" if use_muon else "AdamW"
        raise ValueError(
            f"{where}: state has keys {sorted(state)}, but a {kind} group's state is {list(keys)}; "
            "was the state dict saved from a different optimizer or group?"
        )
    state = dict(state)
    for key in keys:
        value = state[key]
        if key == "step":
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{where}: step must be a number or a one-element tensor, got {value!r}")
            else:
                state[key] = torch.tensor(_number(value, "step", where), dtype=torch.float32)
        elif not isinstance(value, Tensor) or value.shape != p.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: {key} has {got}, but the parameter has shape {tuple(p.shape)}")
    return state


def _from_torch_adamw(group: dict[str, Any], where: str) -> None:
    """Check and drop the keys of a torch.optim.AdamW / Adam group that muonkit has no use for."""
    _check_unsupported(group, where)
    decay = _number(group.get("weight_decay", 0.0), "weight_decay", where)
    if group.get("decoupled_weight_decay", True) is False and decay != 0:
        raise ValueError(
            f"{where}: the group is torch.optim.Adam's, with L2 weight decay (decoupled_weight_decay=False, "
            f"weight_decay={group['weight_decay']!r}); muonkit's AdamW groups decay decoupled, as "
            "torch.optim.AdamW - keep training with torch.optim.Adam or set the group's weight_decay to 0"
        )
    for key in _TORCH_ADAMW_KEYS:
        group.pop(key, None)


def _from_torch_muon(group: dict[str, Any], where: str) -> None:
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


def _split_names(group: dict[str, Any]) -> None:
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


def _number(value: Any, name: str, where: str) -> float:
    """A real hyperparameter as a float: Python and NumPy numbers, or a one-element tensor (as
    torch.optim accepts for lr); never a bool."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _check_unsupported(group: dict[str, Any], where: str) -> None:
    for key in _UNSUPPORTED:
        if group.get(key):
            raise ValueError(
                f"{where}: {key}={group[key]!r} is not supported by muonkit.Muon (its AdamW groups are "
                f"plain AdamW); remove {key!r} from the group, or train these parameters with "
                f"torch.optim.AdamW({key}=True)"
            )


def _check_options(group: dict[str, Any], where: str) -> None:
    _check_unsupported(group, where)
    if group["use_muon"]:
        _check_muon_options(group, where)
    else:
        _check_adamw_options(group, where)


def _check_lr_wd(options: dict[str, Any], where: str) -> None:
    if _number(options["lr"], "lr", where) < 0:
        raise ValueError(f"{where}: lr must be >= 0, got {options['lr']!r}")
    if _number(options["weight_decay"], "weight_decay", where) < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {options['weight_decay']!r}")


def _check_muon_options(options: dict[str, Any], where: str) -> None:
    _check_lr_wd(options, where)
    momentum = _number(options["momentum"], "momentum", where)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {options['momentum']!r}")
    if not isinstance(options["nesterov"], bool):
        raise TypeError(f"{where}: nesterov must be True or False, got {options['nesterov']!r}")
    if options["scale"] not in SCALES:
        raise ValueError(
            f"{where}: unknown scale {options['scale']!r}; choose one of {', '.join(SCALES)}"
        )
    if _number(options["rms"], "rms", where) <= 0:
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
    ns_dtype = options["ns_dtype"]
    if ns_dtype is not None and not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
        raise ValueError(f"{where}: ns_dtype must be None or a floating torch.dtype, got {ns_dtype!r}")
    layout = options["layout"]
    if layout is not None and layout not in LAYOUT_NAMES and not isinstance(layout, Layout):
        raise ValueError(
            f"{where}: unknown layout {layout!r}; use None, 'conv', 'stacked' or a muonkit.Layout"
        )


def _check_adamw_options(options: dict[str, Any], where: str) -> None:
    _check_lr_wd(options, where)
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _number(beta, f"betas[{i}]", where) < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {beta!r}")
    if _number(options["eps"], "eps", where) < 0:
        raise ValueError(f"{where}: eps must be >= 0, got {options['eps']!r}")


def _check_param(p: Tensor, name: str, group: dict[str, Any], where: str) -> None:
    if torch.is_complex(p):
        raise TypeError(
            f"{where}: parameter '{name}' is complex ({p.dtype}); muonkit supports real "
            "parameters only (view it as real with torch.view_as_real)"
        )
    if not p.is_floating_point():
        raise TypeError(f"{where}: parameter '{name}' has dtype {p.dtype}; it must be floating point")
    if not group["use_muon"]:
        return
    if p.ndim < 2:
        raise ValueError(
            f"{where}: parameter '{name}' has shape {tuple(p.shape)}; Muon needs a matrix - "
            "route it to AdamW with muonkit.param_groups(model) or a group with use_muon=False"
        )
    try:
        layout = resolve(group["layout"], p.ndim)
    except ValueError as err:
        raise ValueError(f"{where}: parameter '{name}' with shape {tuple(p.shape)}: {err}") from None
    _, rows, cols = matrix_shape(p.shape, layout)
    if rows == 0 or cols == 0:
        raise ValueError(f"{where}: parameter '{name}' has an empty matrix view {rows} x {cols}")
