"""class Muon: one torch.optim.Optimizer with Muon groups and AdamW groups."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional
from .functional import VARIANTS, Directions, Variant
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
    "variant",
    "beta2",
    "variant_eps",
    "cautious_weight_decay",
)
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "cautious_weight_decay")
# Options of the whole optimizer: kept in `defaults` (so they survive deepcopy and pickling), never
# in a param group.
_GLOBAL_KEYS = ("nonfinite", "diagnostics", "orthogonality_every")
# torch.optim.AdamW / SGD options that change the update and that muonkit does not implement: a
# group asking for them is refused rather than silently stepped without them.
_UNSUPPORTED = ("amsgrad", "maximize")
NONFINITE = ("propagate", "skip", "raise")
Nonfinite = Literal["propagate", "skip", "raise"]
# Each group counts the steps `nonfinite="skip"` skipped under this key, so that the count is in
# state_dict() and in distributed checkpoints.
SKIPPED = "skipped_steps"


@dataclass
class _GroupStep:
    """One group's share of a step, prepared and checked before anything changes."""

    group: dict[str, Any]
    params: list[Tensor]
    names: list[str]
    states: list[dict[str, Tensor]]
    grads: list[Tensor]
    directions: Directions | None = None
    stats: list[dict[str, Tensor]] | None = field(default=None)


class Muon(torch.optim.Optimizer):
    r"""Muon for hidden weight matrices and AdamW for everything else, in one optimizer.

    Each param group carries ``use_muon`` (missing means True). For a Muon group, each matrix
    W (rows x cols) of each parameter's matrix view is updated as

    .. math::
        M &\leftarrow \beta M + (1 - \beta) G \\
        U &\leftarrow (1 - \beta) G + \beta M \quad\text{(nesterov; else } U = M) \\
        O &\leftarrow \operatorname{orthogonalize}(U) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(\text{rows}, \text{cols})\, O

    and AdamW groups get exactly torch.optim.AdamW's update. ``variant="normuon"`` or
    ``"adamuon"`` replace O by its normalized H (see muonkit.functional.normalize_update), and
    ``cautious_weight_decay=True`` decays only the entries where the decay agrees with the update.

    A step is all or nothing: every check (options, parameters, gradients, state) runs before any
    parameter or state changes, and the parts that can fail (a user's orthogonalizer, the SVD,
    collectives) run for every group before the first parameter moves.

    Args:
        params: tensors, (name, tensor) pairs, or group dicts (see muonkit.param_groups).
        lr: learning rate of Muon groups (default 1e-3; with scale "moonlight" an AdamW-sized lr).
        momentum: beta in [0, 1) (default 0.95).
        nesterov: Nesterov-style lookahead (default True).
        weight_decay: decoupled weight decay lambda of Muon groups (default 0.1).
        scale: "moonlight" (default; rms * sqrt(max(rows, cols))), "keller_jordan", "mup", "naive".
        rms: target update RMS of the "moonlight" scale (default 0.2).
        orthogonalizer: "polar_express" (default), "keller_jordan", "you", "gram", "svd" or a
            callable (X, steps) -> tensor of X's shape, called on one (rows, cols) matrix at a
            time unless it has the attribute ``batched = True`` (then on (k, rows, cols) stacks).
        ns_steps: iterations of the orthogonalizer (default 5).
        ns_dtype: working dtype of the orthogonalizer; None means float32 on CPU, bfloat16 on CUDA;
            "auto" also picks bfloat16 on CPUs with native bfloat16 products (2x faster there,
            a larger polar error; muonkit.orthogonalize.working_dtype).
        layout: matrix view of the parameters: None (2D (out, in); 3D stacked (batch, out, in);
            4D/5D conv (out, in, *kernel)), "conv", "stacked", or a muonkit.Layout.
        variant: "muon" (default), "normuon" (one second moment per row of each matrix) or
            "adamuon" (orthogonalize sign(U), one second moment per entry).
        beta2: the variants' second-moment decay in [0, 1) (default 0.95).
        variant_eps: the variants' eps in H = O / (sqrt(v) + eps) (default 1e-10, NorMuon's).
        cautious_weight_decay: decay only where the decay and the update agree in sign (both kinds
            of group; default False).
        adamw_lr: lr of AdamW groups (None: same as lr).
        adamw_betas, adamw_eps: AdamW's betas (default (0.9, 0.999)) and eps (default 1e-8).
        adamw_weight_decay: AdamW's decoupled weight decay (None: same as weight_decay).
        nonfinite: what a step does when a gradient holds NaN or Inf: "propagate" (default, as
            torch.optim: the values flow into the parameters and state), "skip" (nothing changes;
            every group's ``skipped_steps`` counts it) or "raise" (RuntimeError, nothing changes).
        diagnostics: record per-parameter statistics of every step in ``last_stats`` (default False).
        orthogonality_every: with diagnostics, every this many steps also measure the
            orthogonalizer's distance from the exact polar factor (an SVD per matrix; 0 = never).
        process_group: a torch.distributed process group to share the Newton-Schulz work; None
            (default) means no torch.distributed call at all.

    Example:
        >>> opt = Muon(muonkit.param_groups(model), lr=1e-3, weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    References:
        Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024).
        Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982.
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv:1711.05101.
        Li et al., "NorMuon", arXiv:2510.05491. Si et al., "AdaMuon", arXiv:2507.11005.
        Chen et al., "Cautious Weight Decay", arXiv:2510.12402.
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
        variant: Variant = "muon",
        beta2: float = 0.95,
        variant_eps: float = 1e-10,
        cautious_weight_decay: bool = False,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        nonfinite: Nonfinite = "propagate",
        diagnostics: bool = False,
        orthogonality_every: int = 0,
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
            variant=variant,
            beta2=beta2,
            variant_eps=variant_eps,
            cautious_weight_decay=cautious_weight_decay,
            adamw_lr=lr if adamw_lr is None else adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            nonfinite=nonfinite,
            diagnostics=diagnostics,
            orthogonality_every=orthogonality_every,
        )
        _check_muon_options(defaults, "Muon")
        _check_adamw_options(
            dict(
                lr=defaults["adamw_lr"],
                betas=defaults["adamw_betas"],
                eps=adamw_eps,
                weight_decay=defaults["adamw_weight_decay"],
                cautious_weight_decay=cautious_weight_decay,
            ),
            "Muon (adamw_* arguments)",
        )
        _check_global_options(defaults, process_group)
        self._distributed = None
        if process_group is not None:
            from .distributed import DistributedOrthogonalizer

            self._distributed = DistributedOrthogonalizer(process_group)
        self.last_stats: dict[str, dict[str, float]] = {}
        self._diagnosed_steps = 0
        super().__init__(params, defaults)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent exchanging Muon updates since construction (0 without a
        process_group); an all-gather counts as a ring, (world - 1) times this rank's part."""
        return 0 if self._distributed is None else self._distributed.bytes_sent

    @property
    def skipped_steps(self) -> int:
        """Steps that `nonfinite="skip"` skipped (kept in every param group, so in state_dict)."""
        return max((group.get(SKIPPED, 0) for group in self.param_groups), default=0)

    # ---------------------------------------------------------------- groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; missing keys are filled by kind (Muon or AdamW) and everything is checked
        before the group is added, so a rejected group leaves the optimizer unchanged."""
        group = dict(param_group)
        group.setdefault("use_muon", True)
        if not isinstance(group["use_muon"], bool):
            raise TypeError(f"use_muon must be True or False, got {group['use_muon']!r}")
        for key in _GLOBAL_KEYS:
            if key in group:
                raise ValueError(f"{key} is an option of the whole optimizer (Muon({key}=...)), not of a param group")
        index = len(self.param_groups)
        kind = "Muon" if group["use_muon"] else "AdamW"
        self._fill_defaults(group)
        group.setdefault(SKIPPED, self.skipped_steps)
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
            self.state[p].update(_missing_state(p, self.state.get(p, {}), added))

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
            group.setdefault("cautious_weight_decay", d["cautious_weight_decay"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in (("variant", "muon"), ("beta2", 0.95), ("variant_eps", 1e-10), ("cautious_weight_decay", False),
                           ("nonfinite", "propagate"), ("diagnostics", False), ("orthogonality_every", 0)):
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            group.setdefault(SKIPPED, 0)
            self._fill_defaults(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            group.setdefault(SKIPPED, 0)
            self._fill_defaults(group)
            for p in group["params"]:
                self.state[p].update(_missing_state(p, self.state.get(p, {}), group))

    # ---------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update every parameter that has a gradient; returns closure() if given.

        All or nothing: checks first, then every group's fallible work (a user's orthogonalizer,
        the SVD, collectives), then the updates, which cannot fail.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._prepare()
        if self.defaults["nonfinite"] != "propagate" and not self._all_finite(plan):
            if self.defaults["nonfinite"] == "raise":
                raise RuntimeError(
                    "a gradient holds NaN or Inf (Muon(nonfinite='raise')); no parameter or state was changed: "
                    + ", ".join(self._nonfinite_names(plan))
                )
            for group in self.param_groups:
                group[SKIPPED] = group.get(SKIPPED, 0) + 1
            return loss
        orthogonality = self._diagnose(plan)
        for item in plan:
            if item.group["use_muon"] and not self._fuses(item.group):
                item.directions = self._muon_directions(item, orthogonality)
        for item in plan:
            for p, state in zip(item.params, item.states):
                self.state[p].update(state)
            if not item.group["use_muon"]:
                self._adamw_step(item)
            elif item.directions is None:
                self._fused_muon_step(item, orthogonality)
            else:
                self._apply_muon(item)
        if self.defaults["diagnostics"]:
            self.last_stats = _collect(plan)
        return loss

    def _prepare(self) -> list[_GroupStep]:
        # Everything is checked, for all groups, before anything changes, so an error leaves no
        # partial step: options edited through param_groups since construction, parameters
        # appended to a group's list (they get their checks here and their state when the step
        # applies), grads, and the state a loaded state dict left.
        plan = []
        for index, group in enumerate(self.param_groups):
            where = f"{'Muon' if group['use_muon'] else 'AdamW'} group {index}"
            _check_options(group, where)
            names = group.get("param_names") or []
            names = names + [f"#{i}" for i in range(len(names), len(group["params"]))]
            item = _GroupStep(group, [], [], [], [])
            for name, p in zip(names, group["params"]):
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                _check_param(p, name, group, where)
                if not state and group["use_muon"] and _is_dtensor(p):
                    self._check_dtensor(p, name, where)
                _check_grad(p, name, where)
                new = _missing_state(p, state, group)
                _check_state(p, {**state, **new}, group, name, where)
                item.params.append(p)
                item.names.append(name)
                item.states.append(new)
                item.grads.append(p.grad)
            plan.append(item)
        return plan

    def _state(self, item: _GroupStep, key: str) -> list[Tensor]:
        """`key` of each stepping parameter's state, whether already held or created this step."""
        return [new[key] if key in new else self.state[p][key] for p, new in zip(item.params, item.states)]

    def _all_finite(self, plan: list[_GroupStep]) -> bool:
        grads = _local([g for item in plan for g in item.grads])
        if not grads:
            return True
        finite = torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all()
        if self._distributed is not None:
            # Sharded gradients differ between ranks: every rank must take the same decision.
            finite = self._distributed.all_true(finite)
        return bool(finite)

    def _nonfinite_names(self, plan: list[_GroupStep]) -> list[str]:
        return [f"'{name}'" for item in plan for name, g in zip(item.names, _local(item.grads))
                if not bool(g.isfinite().all())]

    def _diagnose(self, plan: list[_GroupStep]) -> bool:
        """Prepare each group's statistics dicts; True when this step measures orthogonality."""
        if not self.defaults["diagnostics"]:
            return False
        self._diagnosed_steps += 1
        for item in plan:
            item.stats = [{} for _ in item.params]
        every = self.defaults["orthogonality_every"]
        return every > 0 and self._diagnosed_steps % every == 0

    def _fuses(self, group: dict[str, Any]) -> bool:
        """Whether a Muon group steps in one fused pass: a built-in kernel on one process."""
        return self._distributed is None and functional.runs_in_place(group["orthogonalizer"])

    def _layouts(self, item: _GroupStep) -> list[Layout]:
        return [resolve(item.group["layout"], p.ndim) for p in item.params]

    def _second_moments(self, item: _GroupStep) -> list[Tensor | None]:
        if item.group["variant"] == "muon":
            return [None] * len(item.params)
        return self._state(item, "second_moment")

    def _muon_directions(self, item: _GroupStep, orthogonality: bool) -> Directions:
        group = item.group
        layouts = self._layouts(item)
        if self._distributed is not None:
            update_many = self._distributed.bind(
                method=group["orthogonalizer"], steps=group["ns_steps"], dtype=group["ns_dtype"],
                params=item.params, variant=group["variant"], beta2=group["beta2"],
                eps=group["variant_eps"], second_moments=self._second_moments(item),
            )
        else:
            update_many = functional.local_update_many(
                method=group["orthogonalizer"], steps=group["ns_steps"], dtype=group["ns_dtype"],
                variant=group["variant"], beta2=group["beta2"], eps=group["variant_eps"],
            )
        return functional.muon_directions(
            _local(item.grads), _local(self._state(item, "momentum_buffer")), layouts,
            momentum=group["momentum"], nesterov=group["nesterov"], update_many=update_many,
            variant=group["variant"], second_moments=_local(self._second_moments(item)),
            stats=item.stats, orthogonality=orthogonality, orthogonalizer=group["orthogonalizer"],
            ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"],
        )

    def _apply_muon(self, item: _GroupStep) -> None:
        group = item.group
        assert item.directions is not None
        functional.apply_muon_(
            _local(item.params), _local(item.grads), _local(self._state(item, "momentum_buffer")), self._layouts(item),
            item.directions, lr=_value(group["lr"]), momentum=group["momentum"],
            weight_decay=group["weight_decay"], scale=group["scale"], rms=group["rms"],
            cautious_weight_decay=group["cautious_weight_decay"], second_moments=_local(self._second_moments(item)),
            shapes=[p.shape for p in item.params], stats=item.stats,
        )

    def _fused_muon_step(self, item: _GroupStep, orthogonality: bool) -> None:
        group = item.group
        functional.muon(
            item.params,
            item.grads,
            self._state(item, "momentum_buffer"),
            self._layouts(item),
            lr=_value(group["lr"]),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            rms=group["rms"],
            orthogonalizer=group["orthogonalizer"],
            ns_steps=group["ns_steps"],
            ns_dtype=group["ns_dtype"],
            variant=group["variant"],
            beta2=group["beta2"],
            variant_eps=group["variant_eps"],
            second_moments=self._second_moments(item),
            cautious_weight_decay=group["cautious_weight_decay"],
            stats=item.stats,
            orthogonality=orthogonality,
        )

    def _adamw_step(self, item: _GroupStep) -> None:
        group = item.group
        beta1, beta2 = group["betas"]
        functional.adamw(
            _local(item.params),
            _local(item.grads),
            _local(self._state(item, "exp_avg")),
            _local(self._state(item, "exp_avg_sq")),
            self._state(item, "step"),
            lr=_value(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            cautious_weight_decay=group["cautious_weight_decay"],
            stats=item.stats,
        )


def _value(x: Any) -> float:
    """A hyperparameter as a Python float (a one-element tensor lr of any shape included)."""
    return float(x)


def _missing_state(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Tensor]:
    """The state entries `group` needs for `p` that `state` lacks, freshly initialized.

    State exists from construction (so that every process has the same state_dict keys); entries
    appear later only for parameters appended to a group, groups whose variant was changed, and
    state dicts saved before a key existed.
    """
    new: dict[str, Tensor] = {}
    if group["use_muon"]:
        if "momentum_buffer" not in state:
            new["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        shape = functional.second_moment_shape(p.shape, resolve(group["layout"], p.ndim), group["variant"])
        if shape is not None and "second_moment" not in state:
            new["second_moment"] = _zeros_like_sharded(p, shape)
    else:
        if "step" not in state:
            new["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                new[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return new


def _zeros_like_sharded(p: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros of `shape` with p's dtype and device; a DTensor with p's mesh and placements when p is one."""
    if not _is_dtensor(p):
        return torch.zeros(shape, dtype=p.dtype, device=p.device)
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=p.dtype, device_mesh=p.device_mesh, placements=p.placements)


def _collect(plan: list[_GroupStep]) -> dict[str, dict[str, float]]:
    """Muon.last_stats from the 0-d tensors a step recorded, with one transfer to the host."""
    keys, values = [], []
    for g, item in enumerate(plan):
        for i, (name, stats) in enumerate(zip(item.names, item.stats or [])):
            label = name if item.group.get("param_names") else f"group{g}.param{i}"
            for key, value in stats.items():
                keys.append((label, key))
                values.append(value.detach().float().reshape(()).cpu())
    result: dict[str, dict[str, float]] = {}
    for (label, key), number in zip(keys, torch.stack(values).tolist() if values else []):
        result.setdefault(label, {})[key] = number
    return result


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
    if options["variant"] not in VARIANTS:
        raise ValueError(f"{where}: unknown variant {options['variant']!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 <= _number(options["beta2"], "beta2", where) < 1.0:
        raise ValueError(f"{where}: beta2 must be in [0, 1), got {options['beta2']!r}")
    if _number(options["variant_eps"], "variant_eps", where) < 0:
        raise ValueError(f"{where}: variant_eps must be >= 0, got {options['variant_eps']!r}")
    _check_cautious(options, where)


def _check_cautious(options: dict[str, Any], where: str) -> None:
    if not isinstance(options["cautious_weight_decay"], bool):
        raise TypeError(
            f"{where}: cautious_weight_decay must be True or False, got {options['cautious_weight_decay']!r}"
        )


def _check_global_options(options: dict[str, Any], process_group: Any) -> None:
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
    if every and process_group is not None:
        raise ValueError(
            "Muon: orthogonality_every is measured on one process only; with a process_group, set it to 0 "
            "(the per-parameter RMS statistics still work)"
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
    _check_cautious(options, where)


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
        layout.check_shape(p.shape)
    except ValueError as err:
        raise ValueError(f"{where}: parameter '{name}' with shape {tuple(p.shape)}: {err}") from None
    _, rows, cols = matrix_shape(p.shape, layout)
    if rows == 0 or cols == 0:
        raise ValueError(f"{where}: parameter '{name}' has an empty matrix view {rows} x {cols}")


def _check_grad(p: Tensor, name: str, where: str) -> None:
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
    if _is_dtensor(grad) != _is_dtensor(p) or (_is_dtensor(p) and grad.placements != p.placements):
        raise RuntimeError(f"{where}: parameter '{name}' and its gradient are not sharded alike")


def _check_state(p: Tensor, state: dict[str, Any], group: dict[str, Any], name: str, where: str) -> None:
    """The state a step will read must fit the parameter (a loaded state dict may not)."""
    if group["use_muon"]:
        expected = {"momentum_buffer": tuple(p.shape)}
        shape = functional.second_moment_shape(p.shape, resolve(group["layout"], p.ndim), group["variant"])
        if shape is not None:
            expected["second_moment"] = shape
    else:
        expected = {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape), "step": ()}
    for key, shape in expected.items():
        value = state.get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
            raise RuntimeError(
                f"{where}: the state {key!r} of parameter '{name}' should be a floating tensor of shape {shape}, "
                f"got {got} (was a state dict of another model or optimizer loaded?)"
            )
        if key != "step" and value.device != p.device:
            raise RuntimeError(f"{where}: the state {key!r} of parameter '{name}' is on {value.device}, not {p.device}")
