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
from .orthogonalize import ORTHOGONALIZERS, NsDtype, Orthogonalizer, check_ns_dtype
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
        params: tensors, (name, tensor) pairs, or group dicts (see muonkit.param_groups).
        lr: learning rate of Muon groups (default 1e-3; with scale "moonlight" an AdamW-sized lr).
        momentum: beta in [0, 1) (default 0.95).
        nesterov: Nesterov-style lookahead (default True).
        weight_decay: decoupled weight decay lambda of Muon groups (default 0.1).
        scale: "moonlight" (default; rms * sqrt(max(rows, cols))), "keller_jordan", "mup", "naive".
        rms: target update RMS of the "moonlight" scale (default 0.2).
        orthogonalizer: "polar_express" (default), "keller_jordan", "you", "gram", "svd" or a
            callable (X, steps) -> tensor of X's shape.
        ns_steps: iterations of the orthogonalizer (default 5).
        ns_dtype: working dtype of the orthogonalizer; None means float32 on CPU, bfloat16 on CUDA;
            "auto" also picks bfloat16 on CPUs with native bfloat16 products (2x faster there,
            1-10% larger polar error; muonkit.orthogonalize.working_dtype).
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
        ns_dtype: NsDtype = None,
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
        state = self.state[p]
        if state:
            return
        if group["use_muon"]:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            self._fill_defaults(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            self._fill_defaults(group)
            for p in group["params"]:
                self._init_state(p, group)

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
            lr=group["lr"],
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


def _split_names(group: dict[str, Any]) -> None:
    """Normalize group["params"] to a list of tensors, moving (name, tensor) names aside."""
    params = group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("params must be an ordered collection (a list), not a set")
    params = list(params)
    if params and all(isinstance(x, tuple) for x in params):
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


def _check_options(group: dict[str, Any], where: str) -> None:
    for key in _UNSUPPORTED:
        if group.get(key):
            raise ValueError(
                f"{where}: {key}={group[key]!r} is not supported by muonkit.Muon (its AdamW groups are "
                f"plain AdamW); remove {key!r} from the group, or train these parameters with "
                f"torch.optim.AdamW({key}=True)"
            )
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
    check_ns_dtype(options["ns_dtype"], f"{where}: ns_dtype")
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
