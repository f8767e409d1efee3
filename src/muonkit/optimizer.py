"""class Muon: one torch.optim.Optimizer with Muon groups and AdamW groups.

The class gathers, checks and dispatches: a step checks every group (muonkit.options,
muonkit.state), then hands each Muon group to the one step driver (muonkit.functional.muon) and
each AdamW group to torch's AdamW math (muonkit.functional.adamw). Loading and pickling rules are
muonkit.checkpoint's.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import checkpoint, functional
from .dtensor import cut_mesh_dims, is_dtensor, is_sharded, local_parts, placements_of
from .layout import Layout, LayoutSpec, matrix_shape, resolve
from .options import (
    ADAMW_FROM,
    ADAMW_KEYS,
    DEFAULTS,
    MUON_KEYS,
    SKIPPED,
    Group,
    Nonfinite,
    adamw_kernel,
    check_adamw_options,
    check_capturable,
    check_global_options,
    check_grad,
    check_group_keys,
    check_muon_options,
    check_options,
    check_param,
    fill_defaults,
    split_names,
)
from .orthogonalize import NsDtype, Orthogonalizer
from .plan import is_local
from .variants import VARIANTS, Shard
from .scaling import Scale
from .quantize import quantize_into_
from .state import (
    adopt_,
    check_state,
    dequantize_momentum,
    drop_unused,
    missing_state,
    momentum_absmax,
    momentum_dtype,
    quantize_momentum,
    rounds_stochastically,
    state_shapes,
)


@dataclass
class _GroupStep:
    """One group's share of a step, prepared and checked before anything changes."""

    group: Group
    params: list[Tensor]
    names: list[str]
    labels: list[str]  # names in last_stats: the parameter's name, else "group{g}.param{i}"
    states: list[dict[str, Tensor]]  # state entries created (or converted) this step
    held: list[dict[str, Tensor]]  # the state each parameter holds already
    grads: list[Tensor]
    positions: list[int]  # each parameter's place in the optimizer's order (seeds its rounding)
    seeds: list[int | None] | None = None
    stats: list[dict[str, Tensor]] | None = None
    # State of the group's parameters without a gradient that a changed variant, state_dtype or
    # stochastic_rounding replaces (so that every parameter's state is the group's, and loads back).
    idle: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)
    momenta: list[Tensor] | None = None  # 8-bit momentum dequantized for this step (local parts)
    # Per parameter cut along a dim other than 0, its new 8-bit momentum's block absmax, agreed
    # between the ranks holding the same rows (`agree_scales_`); None for the others.
    absmax: list[Tensor | None] | None = None
    fused: bool = False  # an AdamW group steps with torch's fused AdamW kernel (options.adamw_kernel)

    def momentum(self) -> list[Tensor]:
        """Each parameter's momentum buffer as the step updates it (local parts): the buffer
        itself, or with momentum_bits=8 its dequantized values, which `requantize_` writes back."""
        if self.group["momentum_bits"] != 8:
            return local_parts(self.state("momentum_buffer"))
        codes, scales = local_parts(self.state("momentum_codes")), local_parts(self.state("momentum_scales"))
        self.momenta = [dequantize_momentum(p, c, s, momentum_dtype(p, self.group))
                        for p, c, s in zip(self.params, codes, scales)]
        return self.momenta

    def agree_scales_(self, pending: functional.Pending) -> None:
        """With momentum_bits=8 and DTensors cut along a dim other than 0 (rowwise tensor
        parallelism): the held step's new momentum (written into this step's dequantized copies
        only) and its blocks' absmax, agreed with the ranks holding the same rows. The collectives
        run here, before anything the optimizer owns changes; every rank calls it for the same
        groups in the same order."""
        if self.momenta is None or not any(cut_mesh_dims(p) for p in self.params):
            return
        pending.apply_momentum_()
        self.absmax = momentum_absmax(self.params, self.momenta)

    def requantize_(self) -> None:
        """With momentum_bits=8, the step's updated momentum written back as codes and scales."""
        if self.momenta is None:
            return
        codes, scales = local_parts(self.state("momentum_codes")), local_parts(self.state("momentum_scales"))
        for p, m, c, s, a in zip(self.params, self.momenta, codes, scales, self.absmax or [None] * len(codes)):
            if a is None:
                quantize_into_(m, c, s)
                continue
            new_codes, new_scales = quantize_momentum(p, m, a)
            c.copy_(new_codes)
            s.copy_(new_scales)
        self.momenta = self.absmax = None

    def state(self, key: str) -> list[Tensor]:
        """`key` of each stepping parameter's state, whether already held or created this step."""
        return [new[key] if key in new else held[key] for new, held in zip(self.states, self.held)]

    def moments(self) -> list[Tensor | None]:
        """Each parameter's second moment where its group's variant keeps one, else None."""
        return [new.get("second_moment", held.get("second_moment")) if "second_moment" in state_shapes(p, self.group)
                else None for p, new, held in zip(self.params, self.states, self.held)]


class Muon(torch.optim.Optimizer):
    r"""Muon for hidden weight matrices and AdamW for everything else, in one optimizer.

    Each param group carries ``use_muon`` (missing means True). For a Muon group, each matrix
    W (rows x cols) of each parameter's matrix view is updated as

    .. math::
        M &\leftarrow \beta M + (1 - \beta) G \\
        U &\leftarrow (1 - \beta) G + \beta M \quad\text{(nesterov; else } U = M) \\
        O &\leftarrow \operatorname{orthogonalize}(U) \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, s(\text{rows}, \text{cols})\, O

    and AdamW groups get exactly torch.optim.AdamW's update. A ``variant`` other than "muon"
    replaces O by its transform H (muonkit.variants), and ``cautious_weight_decay=True`` decays
    only the entries where the decay agrees with the update.

    A step is all or nothing: every check (options, parameters, gradients, state) runs before any
    parameter or state changes, and the parts that can fail (a user's orthogonalizer, the SVD,
    collectives) run for every group before the first parameter moves.

    Args:
        params: tensors, (name, tensor) pairs (not mixed), or group dicts (see muonkit.param_groups).
        lr: learning rate of Muon groups (default 1e-3; with scale "moonlight" an AdamW-sized lr); a
            float or, as torch.optim accepts, a one-element tensor of any shape.
        momentum: beta in [0, 1) (default 0.95).
        nesterov: Nesterov-style lookahead (default True).
        weight_decay: decoupled weight decay lambda of Muon groups (default 0.1).
        scale: "moonlight" (default; rms * sqrt(max(rows, cols))), "keller_jordan", "mup", "naive".
        rms: target update RMS of the "moonlight" scale (default 0.2).
        orthogonalizer: a name in muonkit.ORTHOGONALIZERS ("polar_express", the default; "aol" is
            Turbo-Muon with ns_steps=4) or a callable (X, steps) -> tensor of X's shape, called on one
            (rows, cols) matrix at a time unless it has ``batched = True`` (then on (k, rows, cols)).
        ns_steps: iterations of the orthogonalizer (default 5).
        ns_dtype: working dtype of the orthogonalizer; None (or its alias "auto") means the fastest
            accurate one for the device, muonkit.orthogonalize.default_ns_dtype: bfloat16 on CUDA
            and on CPUs whose bf16 products are faster (AMX, AMD AVX512_BF16), float32 elsewhere;
            float64 for float64 state. ns_dtype=torch.float32 gives float32 everywhere.
        layout: matrix view of the parameters: None (2D (out, in); 3D stacked (batch, out, in);
            4D/5D conv (out, in, *kernel)), "conv", "stacked", or a muonkit.Layout.
        variant: "muon" (default) or the name of another variant in muonkit.variants.VARIANTS,
            whose class says what state it keeps and how it transforms O.
        beta2: the variants' second-moment decay in [0, 1) (default 0.95).
        variant_eps: the variants' eps in H = O / (sqrt(v) + eps) (default 1e-10).
        fraction: Dion2's and NorDion2's share of each matrix's rows (or columns) orthogonalized and
            updated per step, in (0, 1] (default 0.25).
        ef_decay: Dion2's error-feedback decay of the selected momentum, in [0, 1] (default 0.95).
        selection: "local" (default) or "global": Dion2's rows of a row-sharded parameter (Shard(0), any mesh): each
            block's top ceil(fraction * ceil(rows / blocks)) or the whole matrix's; only those travel (docs/API.md).
        cautious_weight_decay: decay only where the decay and the update agree in sign (both kinds
            of group; default False).
        state_dtype: dtype of the optimizer state (momentum, second moments, AdamW's moments) and
            of the update arithmetic; None (default) means the parameter's dtype. float32 for
            bfloat16 parameters keeps small updates from vanishing in the state.
        momentum_bits: 32 (default: the momentum in the state dtype) or 8 (int8 blocks of at most
            2048 elements of a dim-0 slice with one float32 scale each; muonkit.quantize): about a
            quarter of float32 momentum's bytes.
        stochastic_rounding: write bfloat16/float16 parameters by unbiased stochastic rounding of
            the update computed in float32 (default True; no effect on float32/float64 parameters);
            without it updates below half a bf16 ulp are lost (benchmarks/RESULTS.md, bfloat16).
        adamw_lr, adamw_weight_decay: AdamW groups' lr and decoupled weight decay (None: lr, weight_decay).
        adamw_betas, adamw_eps: AdamW's betas (default (0.9, 0.999)) and eps (default 1e-8).
        fused: AdamW groups' kernel: None (default) torch's fused AdamW on CPU where it applies, True always, False never (docs/API.md).
        nonfinite: what a step does when a gradient holds NaN or Inf: "propagate" (default, as
            torch.optim: the values flow into the parameters and state), "skip" (nothing changes;
            every group's ``skipped_steps`` counts it) or "raise" (RuntimeError, nothing changes).
        diagnostics: record per-parameter statistics of every step in ``last_stats`` (default False).
        orthogonality_every: with diagnostics, every this many steps also measure the
            orthogonalizer's distance from the exact polar factor (an SVD per matrix; 0 = never).
        capturable: make the step safe to capture in a CUDA graph, as torch.optim's capturable mode
            (default False): step counts on the parameters' device, a tensor lr read there, no host
            read; every parameter needs a gradient at every step (else ValueError naming it); needs
            nonfinite="propagate", diagnostics=False, no process_group and Python-number
            hyperparameters besides lr; stochastic rounding draws from the device's default
            generator (docs/API.md, "Capturable steps").
        process_group: a torch.distributed ProcessGroup or DeviceMesh (any number of dims: FSDP, HSDP,
            FSDP + TP, expert parallel) to share the Newton-Schulz work; None (default) means no
            torch.distributed call at all (muonkit.distributed).
        exchange_dtype: None (default: each update travels in its own dtype, equal to one process)
            or torch.bfloat16 / torch.float16: half the bytes, the updates rounded once.

    Example:
        >>> opt = Muon(muonkit.param_groups(model), lr=1e-3, weight_decay=0.1)
        >>> loss.backward(); opt.step(); opt.zero_grad()

    References:
        Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024).
        Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982.
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv:1711.05101.
        Chen et al., "Cautious Weight Decay", arXiv:2510.12402. The variants' papers: muonkit.variants.
        8-bit momentum: arXiv:2509.23106 (blockwise linear quantization of Muon's momentum).
        Formulas and coefficients in the package's docs/references.md.
    """


    def __init__(
        self,
        params: Iterable[Any],
        lr: float = DEFAULTS["lr"],
        momentum: float = DEFAULTS["momentum"],
        nesterov: bool = DEFAULTS["nesterov"],
        weight_decay: float = DEFAULTS["weight_decay"],
        *,
        scale: Scale = DEFAULTS["scale"],
        rms: float = DEFAULTS["rms"],
        orthogonalizer: Orthogonalizer = DEFAULTS["orthogonalizer"],
        ns_steps: int = DEFAULTS["ns_steps"],
        ns_dtype: NsDtype = DEFAULTS["ns_dtype"],
        layout: LayoutSpec = DEFAULTS["layout"],
        variant: str = DEFAULTS["variant"],
        beta2: float = DEFAULTS["beta2"],
        variant_eps: float = DEFAULTS["variant_eps"],
        fraction: float = DEFAULTS["fraction"],
        ef_decay: float = DEFAULTS["ef_decay"],
        selection: str = DEFAULTS["selection"],
        cautious_weight_decay: bool = DEFAULTS["cautious_weight_decay"],
        state_dtype: torch.dtype | None = DEFAULTS["state_dtype"],
        momentum_bits: int = DEFAULTS["momentum_bits"],
        stochastic_rounding: bool = DEFAULTS["stochastic_rounding"],
        adamw_lr: float | None = DEFAULTS["adamw_lr"],
        adamw_betas: tuple[float, float] = DEFAULTS["adamw_betas"],
        adamw_eps: float = DEFAULTS["adamw_eps"],
        adamw_weight_decay: float | None = DEFAULTS["adamw_weight_decay"],
        fused: bool | None = DEFAULTS["fused"],
        nonfinite: Nonfinite = DEFAULTS["nonfinite"],
        diagnostics: bool = DEFAULTS["diagnostics"],
        orthogonality_every: int = DEFAULTS["orthogonality_every"],
        capturable: bool = DEFAULTS["capturable"],
        process_group: Any = None,
        exchange_dtype: torch.dtype | None = None,
    ) -> None:
        given = locals()
        defaults = {key: given[key] for key in DEFAULTS}
        defaults["adamw_lr"] = lr if adamw_lr is None else adamw_lr
        defaults["adamw_betas"] = tuple(adamw_betas)
        defaults["adamw_weight_decay"] = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        check_muon_options(defaults, "Muon")
        check_adamw_options({key: defaults[source] for key, source in ADAMW_FROM.items()}, "Muon (adamw_* arguments)")
        check_global_options(defaults, process_group, exchange_dtype)
        self._distributed = _distributed(process_group, exchange_dtype)
        self.last_stats: dict[str, dict[str, float]] = {}
        self._diagnosed_steps = 0
        self._plan_cache: _PlanCache | None = _PlanCache()
        super().__init__(params, defaults)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent to other ranks exchanging Muon updates (0 without a process_group)."""
        return 0 if self._distributed is None else self._distributed.bytes_sent

    @property
    def diagnostics(self) -> bool:
        """Whether steps record `last_stats`; may be switched between steps (for example on only
        for the steps a logger records, so that the others pay nothing)."""
        return self.defaults["diagnostics"]

    @diagnostics.setter
    def diagnostics(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"Muon.diagnostics must be True or False, got {on!r}")
        if on and self.defaults["capturable"]:
            raise ValueError("Muon.diagnostics cannot be switched on with capturable=True (the statistics are copied to the host)")
        self.defaults["diagnostics"] = on

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
        where = f"{'Muon' if group['use_muon'] else 'AdamW'} group {len(self.param_groups)}"
        check_group_keys(group, where)
        fill_defaults(group, self.defaults)
        group.setdefault(SKIPPED, self.skipped_steps)
        check_options(group, where)
        split_names(group)
        self._check_params(group, where)
        given = set(group)
        super().add_param_group(group)
        added = self.param_groups[-1]
        own = MUON_KEYS if added["use_muon"] else ADAMW_KEYS
        for key in set(self.defaults) - set(own) - given:
            del added[key]
        for p in added["params"]:
            adopt_(self.state[p], missing_state(p, self.state.get(p, {}), added, capturable=self.defaults["capturable"]), added)

    def _check_params(self, group: dict[str, Any], where: str) -> None:
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            check_param(p, name, group, where)
            if group["use_muon"] and is_dtensor(p):
                _check_dtensor(self._distributed, p, name, where)

    # ------------------------------------------------------------------ copies and checkpoints

    def __getstate__(self) -> dict[str, Any]:
        if self._distributed is not None:
            raise TypeError(
                "a muonkit.Muon created with a process_group cannot be pickled or copied (copy.deepcopy, "
                "pickle, torch.save of the optimizer object): the process group belongs to the running "
                "processes. Save opt.state_dict() instead and load it into Muon(..., process_group=pg) "
                "built where it is used"
            )
        # torch.optim.Optimizer keeps defaults, state and param_groups; the diagnostics travel too,
        # so that a copy records the same statistics on the same steps.
        return {**super().__getstate__(), "last_stats": self.last_stats, "_diagnosed_steps": self._diagnosed_steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "defaults" not in state:
            # torch.optim.Optimizer.load_state_dict hands over the loaded groups and state (tensors
            # already cast to the parameters' dtype and device) through __setstate__: they are checked
            # and translated here, before anything of this optimizer changes.
            super().__setstate__(checkpoint.loaded(state["state"], state["param_groups"], self.param_groups,
                                                   self._loading, self.defaults, self._check_params))
            if self._plan_cache is not None:
                self._plan_cache = _PlanCache()  # loaded state is checked again at the next step
            return
        # Unpickling (copy.deepcopy, pickle, torch.load): __getstate__ refuses an optimizer that holds
        # a process group, so a copy never has one; keys added to groups since it was saved are filled.
        self._distributed = None
        self.last_stats, self._diagnosed_steps = {}, 0  # pickled before diagnostics existed
        self._plan_cache = _PlanCache()
        super().__setstate__(state)
        checkpoint.fill_unpickled(self.defaults, self.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of muonkit.Muon, torch.optim.AdamW / Adam or torch.optim.Muon.

        Every group and its parameters' state are checked against this optimizer's groups before
        anything changes; a state dict that does not fit raises ValueError naming the group and
        leaves the optimizer as it was. In short:

        only state dicts whose meaning muonkit knows load (its own, torch.optim.AdamW's / Adam's and
        torch.optim.Muon's; any other optimizer's is refused, named), a group keeps its kind, each
        parameter's state holds its kind's keys in the shapes the step needs, torch's keys are
        translated or refused: the rules are listed in muonkit.checkpoint.

        Example:
            >>> opt = muonkit.Muon([{"params": model.parameters(), "use_muon": False}])
            >>> opt.load_state_dict(torch_adamw.state_dict())
        """
        with _loading(self, state_dict) as loaded:
            super().load_state_dict(loaded)

    # ---------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update every parameter that has a gradient; returns closure() if given.

        All or nothing: checks first, then every group's fallible work (a user's orthogonalizer,
        the SVD, collectives) held, then the updates, which cannot fail. A group whose work cannot
        fail (a built-in kernel on one process) is computed and applied stack by stack instead.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = _plan(self.param_groups, self.state, self._distributed, self.defaults["capturable"], self._plan_cache)
        if not _agreed_finite(plan, self._distributed, self.defaults["nonfinite"]):
            if self.defaults["nonfinite"] == "raise":
                raise RuntimeError(
                    "a gradient holds NaN or Inf (Muon(nonfinite='raise')); no parameter or state was changed: "
                    + ", ".join(f"'{name}'" for item in plan for name, g in zip(item.names, local_parts(item.grads))
                                if not bool(g.isfinite().all()))
                )
            for group in self.param_groups:
                group[SKIPPED] = group.get(SKIPPED, 0) + 1
            if self.defaults["diagnostics"]:
                self.last_stats = {}  # no parameter stepped
            return loss
        orthogonality = _diagnose(plan, self.defaults, self._diagnosed_steps)
        fuses = [item.group["use_muon"] and self._distributed is None
                 and functional.runs_in_place(item.group["orthogonalizer"]) for item in plan]
        held = [self._muon_step(item, orthogonality, hold=True) if item.group["use_muon"] and not fused else None
                for item, fused in zip(plan, fuses)]
        for item, pending in zip(plan, held):
            if pending is not None:
                item.agree_scales_(pending)
        _settle_state(plan, self.state, self._plan_cache)
        for item, fused, pending in zip(plan, fuses, held):
            item.seeds = _rounding_seeds(item, self.defaults["capturable"])  # only once nothing can fail
            if not item.group["use_muon"]:
                self._adamw_step(item)
                continue
            if fused:
                self._muon_step(item, orthogonality, hold=False)
            else:
                pending.rounding_seeds = item.seeds or [None] * len(item.params)
                pending.apply_()
            item.requantize_()
            for p, seed in zip(item.params, item.seeds or []):
                if seed is not None:
                    self.state[p]["step"] += 1
        if self.defaults["diagnostics"]:
            self._diagnosed_steps += 1
            self.last_stats = _collect(plan)
        return loss

    def _muon_step(self, item: _GroupStep, orthogonality: bool, *, hold: bool) -> functional.Pending | None:
        group, moments, layouts = item.group, item.moments(), [resolve(item.group["layout"], p.ndim) for p in item.params]
        update_many = None
        if self._distributed is not None:
            update_many = self._distributed.bind(
                method=group["orthogonalizer"], steps=group["ns_steps"], dtype=group["ns_dtype"], params=item.params,
                variant=group["variant"], beta2=float(group["beta2"]), eps=float(group["variant_eps"]),
                second_moments=moments, layouts=layouts,
            )
        return _held(self._distributed, functional.muon(
            local_parts(item.params), local_parts(item.grads), item.momentum(), layouts,
            lr=_lr(group, self.defaults["capturable"]), momentum=float(group["momentum"]), nesterov=group["nesterov"],
            weight_decay=float(group["weight_decay"]), scale=group["scale"], rms=float(group["rms"]),
            orthogonalizer=group["orthogonalizer"], ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"],
            variant=group["variant"], beta2=float(group["beta2"]), variant_eps=float(group["variant_eps"]),
            fraction=float(group["fraction"]), ef_decay=float(group["ef_decay"]), selection=group["selection"], second_moments=local_parts(moments), cautious_weight_decay=group["cautious_weight_decay"],
            update_many=update_many, **_shards(self._distributed, group, item.params, layouts), shapes=[p.shape for p in item.params], rounding_seeds=item.seeds,
            stats=item.stats, orthogonality=orthogonality, hold=hold,
        ))

    def _adamw_step(self, item: _GroupStep) -> None:
        group = item.group
        beta1, beta2 = group["betas"]
        cautious = group["cautious_weight_decay"]
        # torch's AdamW functional gets lr, betas and weight_decay as torch.optim.AdamW passes them (a
        # tensor as given, so that the group equals torch.optim.AdamW bit for bit with it too; eps and
        # weight_decay as 0-d views, which every path of it takes); cautious weight decay computes with
        # plain numbers (a tensor of another dtype or of shape [1, 1] would not fit the moments).
        lr, decay = group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"]), _scalar(group["weight_decay"])
        if cautious:
            lr, decay, beta1, beta2 = _lr(group, self.defaults["capturable"]), float(decay), float(beta1), float(beta2)
        functional.adamw(
            local_parts(item.params), local_parts(item.grads), local_parts(item.state("exp_avg")),
            local_parts(item.state("exp_avg_sq")), item.state("step"), lr=lr, beta1=beta1, beta2=beta2,
            eps=_scalar(group["eps"]), weight_decay=decay, cautious_weight_decay=cautious, rounding_seeds=item.seeds,
            stats=item.stats, capturable=self.defaults["capturable"], fused=item.fused,
        )


@contextmanager
def _loading(optimizer: Muon, state_dict: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The state dict Muon.load_state_dict hands to torch.optim's, held as `optimizer._loading` meanwhile.

    The optimizer's load pre-hooks (register_load_state_dict_pre_hook: a user's remapping of renamed
    parameters) run first, as torch.optim runs them, so that the names matched (checkpoint.by_names)
    and the state taken as saved are those of the state dict they return; torch.optim then loads it
    with the hooks set aside, so that they do not run twice. torch.optim casts every floating state
    tensor it loads to its parameter's dtype, which would round the float32 state of a bfloat16
    parameter to bfloat16: __setstate__ takes such values from `_loading` as given, in the dtype their
    group keeps state in (muonkit.checkpoint.loaded).
    """
    state_dict = state_dict.copy()
    hooks = optimizer._optimizer_load_state_dict_pre_hooks
    for hook in list(hooks.values()):
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    optimizer._loading = state_dict = checkpoint.by_names(state_dict, optimizer.param_groups)
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    try:
        yield state_dict
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = hooks
        del optimizer._loading


def _held(distributed: Any, pending: functional.Pending | None) -> functional.Pending | None:
    """A held step whose relayed pieces are still in flight (muonkit.deferred) leaves those
    parameters to apply once they arrive: the orthogonalizer's newest unclaimed record is its."""
    if distributed is not None and pending is not None:
        for record in distributed.relays:
            if record.step is None:
                record.step = pending
                pending.later.update(record.pending())
    return pending


def _settle_state(plan: list[_GroupStep], state: Any, cache: _PlanCache | None) -> None:
    """The state the step's checks created (or converted) stored, and the entries a group no longer
    reads dropped (muonkit.state.drop_unused); nothing here can fail, and it runs once every held
    update is computed. A step from a cached plan creates no state; once a step of that plan has
    stored and dropped nothing (`settled`), none of the next ones drops any either (drop_unused reads
    nothing the plan's fingerprint does not), so they skip this. A step that dropped some forgets the plan."""
    if cache is not None and cache.hit and cache.settled:
        return
    dropped = False
    for item in plan:
        for p, created in [*zip(item.params, item.states), *item.idle]:
            adopt_(state[p], created, item.group)
        for p in item.group["params"]:
            dropped = drop_unused(state[p], p, item.group) or dropped
    if cache is not None:
        cache.settled = cache.key is not None and not dropped
        if dropped:
            cache.key = None


def _distributed(process_group: Any, exchange_dtype: torch.dtype | None) -> Any:
    """The optimizer's muonkit.distributed.DistributedOrthogonalizer (None without a process group;
    torch.distributed is then never imported)."""
    if process_group is None:
        return None
    from .distributed import DistributedOrthogonalizer

    return DistributedOrthogonalizer(process_group, exchange_dtype)


def _check_dtensor(distributed: Any, p: Tensor, name: str, where: str) -> None:
    if distributed is None:
        raise ValueError(
            f"{where}: parameter '{name}' is a DTensor (e.g. sharded by FSDP2's fully_shard); "
            "pass process_group=<its device mesh, or the group it is sharded over> to Muon"
        )
    distributed.check_param(p, f"{where}: parameter '{name}'")


@dataclass
class _PlanCache:
    """The per-parameter part of the last step's plan, kept while nothing it was checked on changes.

    `key` is `_fingerprint` of the step it was made for; `entries` hold, per group, each stepping
    parameter with its name, its label and its place. It is kept only for a step that created no
    state (every parameter's state complete, none idle) and has no DTensor (whose checks read the
    process group's layout)."""

    key: tuple | None = None
    entries: list[list[tuple[Tensor, str, str, int]]] = field(default_factory=list)
    fused: list[bool] = field(default_factory=list)  # per group, `_GroupStep.fused`
    hit: bool = False  # whether the last plan came from the cache
    settled: bool = False  # whether a step of this plan has applied and dropped no state


def _meta(value: Any) -> Any:
    """What the checks read of an option or state value: a tensor's kind, dtype, device and shape
    (its values are checked every step by check_options, or never), anything else itself."""
    if isinstance(value, Tensor):
        return (type(value), value.layout, value.dtype, value.device, value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_meta(v) for v in value)
    return value


def _fingerprint(param_groups: list[dict[str, Any]], held_state: dict[Tensor, Any], capturable: bool) -> tuple:
    """Everything the per-parameter checks of `_plan` read: each group's options (lr by its kind
    only: a scheduler changes its value every step, and check_options reads that every step), its
    parameters in order with their kind, shape, strides, dtype and device, their gradients' and
    their state entries' kind, shape, dtype and device. Equal fingerprints give equal check results.

    Read every step, so written for speed (the tensors' entries inline, not through `_meta`): for
    a small model it is a tenth of the step (benchmarks/RESULTS.md)."""
    parts: list[Any] = [capturable, torch.compiler.is_compiling()]  # both decide the AdamW kernel
    append = parts.append
    for group in param_groups:
        append(tuple([(key, type(value) if key == "lr" and not isinstance(value, Tensor) else _meta(value))
                      for key, value in group.items() if key not in ("params", SKIPPED)]))
        for p in group["params"]:
            grad, state = p.grad, held_state.get(p)
            append((id(p), type(p), p.layout, p.dtype, p.device, p.shape, p.stride(),
                    None if grad is None else (type(grad), grad.layout, grad.dtype, grad.device, grad.shape),
                    tuple([(key, type(value), value.layout, value.dtype, value.device, value.shape)
                           if isinstance(value, Tensor) else (key, _meta(value)) for key, value in state.items()])
                    if state else None))
    return tuple(parts)


def _plan(param_groups: list[dict[str, Any]], held_state: dict[Tensor, Any], distributed: Any,
          capturable: bool, cache: _PlanCache | None = None) -> list[_GroupStep]:
    """Each group's share of a step.

    Everything is checked, for all groups, before anything changes, so an error leaves no
    partial step: options edited through param_groups since construction, parameters appended
    to a group's list (they get their checks here and their state when the step applies), grads,
    and the state a loaded state dict left. With a `cache`, the per-parameter checks of a step
    whose `_fingerprint` equals the cached one are not run again (their result is the same); the
    options are checked at every step.
    """
    key = _fingerprint(param_groups, held_state, capturable) if cache is not None else None
    if cache is not None and key == cache.key:
        for index, group in enumerate(param_groups):
            check_options(group, f"{'Muon' if group.get('use_muon') else 'AdamW'} group {index}", read_lr=not capturable)
        cache.hit = True
        return [_cached_step(group, entries, held_state, fused)
                for group, entries, fused in zip(param_groups, cache.entries, cache.fused)]
    if cache is not None:
        cache.hit = cache.settled = False
    plan = []
    position = -1
    cacheable = cache is not None
    seen: dict[int, str] = {}  # id of each parameter -> where it is (a parameter steps once)
    for index, group in enumerate(param_groups):
        where = f"{'Muon' if group.get('use_muon') else 'AdamW'} group {index}"
        check_options(group, where, read_lr=not capturable)
        names = group.get("param_names") or []
        given = len(names)
        names = names + [f"#{i}" for i in range(given, len(group["params"]))]
        item = _GroupStep(group, [], [], [], [], [], [], [])
        for i, (name, p) in enumerate(zip(names, group["params"])):
            position += 1
            if id(p) in seen:
                raise ValueError(
                    f"{where}: parameter '{name}' is also {seen[id(p)]}; a parameter belongs to one group, "
                    "once (remove the one appended to param_groups[...]['params'])"
                )
            seen[id(p)] = f"parameter '{name}' of {where}"
            state = held_state.get(p, {})
            if p.grad is None:
                if capturable:
                    raise ValueError(
                        f"{where}: parameter '{name}' has no gradient; with capturable=True every parameter "
                        "steps at every step (a captured graph cannot skip one, and its replays would not "
                        "see a gradient that appears later): give it a gradient (zero_grad(set_to_none=False) "
                        "keeps zeros) or leave it out of the optimizer"
                    )
                # Checked without a gradient too: the step reads every Muon parameter's matrix view.
                check_param(p, name, group, where)
                if state:
                    new = missing_state(p, state, group)
                    if new:
                        item.idle.append((p, new))
                        cacheable = False
                continue
            check_param(p, name, group, where)
            if capturable:
                check_capturable(group, p.device, where)
            if is_dtensor(p):
                cacheable = False
                if not state and group["use_muon"]:
                    _check_dtensor(distributed, p, name, where)
            if group["use_muon"] and VARIANTS[group["variant"]].selects and is_sharded(p) and not _whole_matrices(p, group):
                _check_selectable(distributed, p, resolve(group["layout"], p.ndim), group, name, where)
            check_grad(p, name, where)
            new = missing_state(p, state, group, capturable=capturable)
            check_state(p, {**state, **new}, group, name, where)
            cacheable = cacheable and not new
            item.params.append(p)
            item.names.append(name)
            item.labels.append(name if i < given else f"group{index}.param{i}")
            item.states.append(new)
            item.held.append(state)
            item.grads.append(p.grad)
            item.positions.append(position)
        item.fused = not group["use_muon"] and adamw_kernel(group, capturable)[0]
        plan.append(item)
    if position >= 0 and not any(item.params for item in plan):
        warnings.warn(
            "muonkit.Muon.step(): no parameter of this optimizer has a gradient, so nothing changed. Call "
            "loss.backward() before step(); with FSDP2 (fully_shard) or parallelize_module, build the optimizer "
            "after them: they replace the module's parameters, and an optimizer built before holds the old "
            "ones, which never get a gradient", stacklevel=5)  # _plan, step, no_grad, torch.optim's hook wrapper
    if cache is not None:
        cache.key = key if cacheable else None
        cache.entries = [list(zip(item.params, item.names, item.labels, item.positions)) for item in plan] if cacheable else []
        cache.fused = [item.fused for item in plan] if cacheable else []
    return plan


def _shard_axis(layout: Layout, ndim: int) -> str | None:
    """How a Shard(0) parameter's matrix view is cut: "rows" when dim 0 is its first row axis,
    "batch" when it is its first batch axis (with no blocks either way), else None."""
    if layout.blocks:
        return None
    if layout.rows[0] % ndim == 0:
        return "rows"
    if layout.batch and layout.batch[0] % ndim == 0:
        return "batch"
    return None


def _shards(distributed: Any, group: dict[str, Any], params: list[Tensor], layouts: list[Layout]) -> dict[str, Any]:
    """functional.muon's `shards` (per parameter its `muonkit.variants.Shard` or None) and
    `gather_rows` (the row-norm gather) for a selecting variant's group with a process group."""
    if distributed is None or not VARIANTS[group["variant"]].selects:
        return {}
    return {"shards": [_shard(distributed, p, layout, group) for p, layout in zip(params, layouts)],
            "gather_rows": distributed.gather_rows}


def _shard(distributed: Any, p: Tensor, layout: Layout, group: dict[str, Any]) -> Shard | None:
    """A row-sharded parameter's `muonkit.variants.Shard`: its blocks of rows, in dim-0 order, from
    the dim-0 range each group rank holds (on a mesh of any number of dims; replicas hold the same
    block); None for a parameter this rank holds whole matrices of (unsharded, expert parallel)."""
    if not is_sharded(p) or _whole_matrices(p, group):
        return None
    ranges, cut = distributed.row_blocks(p)
    first = next(r for r in ranges if r[0] == 0 and r[1] > 0)
    replicas = ranges.count(first)  # every block is held as often as the first one
    starts = sorted({a for a, b in ranges if b > a})
    sizes = [dict(ranges)[a] - a for a in starts]
    sizes += [0] * (len(ranges) // replicas - len(sizes))
    blocks = tuple(starts.index(a) if b > a else len(starts) for a, b in ranges)
    batch, rows, _ = matrix_shape(p.shape, layout)
    per_slice = rows // p.shape[0]
    columns = None if cut is None else tuple(sorted(set(cut)).index(c) for c in cut)
    return Shard("rows", tuple(n * per_slice for n in sizes), blocks[distributed.rank], blocks, columns)


def _check_selectable(distributed: Any, p: Tensor, layout: Layout, group: dict[str, Any], name: str, where: str) -> None:
    """ValueError naming the parameter unless a selecting variant can step this sharded parameter
    (one holding parts of matrices): every rank must hold one range of dim 0 (Shard(0), replicated
    or not), dim 0 must be its matrices' first row axis, and selection="global" needs one matrix
    per parameter (its ranks' counts of rows then agree)."""
    axis = _shard_axis(layout, p.ndim)
    variant = group["variant"]
    try:
        ranges, columns = distributed.row_blocks(p)
    except ValueError as err:
        raise ValueError(
            f"{where}: parameter '{name}' is a DTensor {err}; variant {variant!r} selects rows along the shard "
            "dimension, so every rank must hold one range of dim 0 and all of the other dims (FSDP2 or HSDP's "
            "Shard(0)), or of a 2-D parameter one range of dim 1 too (FSDP2 over tensor parallel's Shard(1)); "
            "use variant 'muon' or 'normuon' for this parameter's group"
        ) from None
    if columns is not None and (axis != "rows" or len({r for r in ranges if r[1] > r[0]}) < 2):
        raise ValueError(
            f"{where}: parameter '{name}' is a DTensor cut along dim 1 (column ranges {columns}) "
            f"{'and read with layout ' + str(layout) if axis != 'rows' else 'but not along dim 0'}; variant {variant!r} "
            "selects along the shard dimension: the rows of FSDP2's dim-0 blocks (summing each row's L1 norm over "
            "the column ranges), so dim 0 must be the first row axis and cut into blocks; selecting the columns "
            "of a parameter cut only along dim 1 is not built (use variant 'muon' or 'normuon' for this "
            "parameter's group)"
        )
    if axis != "rows":
        raise ValueError(
            f"{where}: parameter '{name}' is sharded along dim 0, which its layout {layout} reads as "
            f"{'cut into blocks' if layout.blocks else 'columns (or an inner axis)'}; variant {variant!r} selects "
            "rows along the shard dimension, so it needs dim 0 to be the first row axis or the first batch "
            "axis (use variant 'muon' or 'normuon' for this parameter's group)"
        )
    if axis == "rows" and group["selection"] == "global" and matrix_shape(p.shape, layout)[0] > 1:
        raise ValueError(
            f"{where}: parameter '{name}' is sharded along its rows and holds {matrix_shape(p.shape, layout)[0]} "
            f"matrices; variant {variant!r} with selection='global' picks each matrix's rows over all ranks "
            "for one matrix per parameter only (use selection='local')"
        )


def _cached_step(group: dict[str, Any], entries: list[tuple[Tensor, str, str, int]],
                 held_state: dict[Tensor, Any], fused: bool) -> _GroupStep:
    """A group's share of a step from a cached plan: its checked parameters with their current
    gradients and state (complete, so nothing is created), and its AdamW kernel."""
    params = [p for p, _, _, _ in entries]
    return _GroupStep(group, params, [name for _, name, _, _ in entries], [label for _, _, label, _ in entries],
                      [{} for _ in entries], [held_state.get(p, {}) for p in params], [p.grad for p in params],
                      [position for *_, position in entries], fused=fused)


def _lr(group: dict[str, Any], capturable: bool) -> float | Tensor:
    """A group's lr as a float, or with capturable=True a tensor lr as it is, read on its device."""
    lr = group["lr"]
    return lr if capturable and isinstance(lr, Tensor) else float(lr)


def _diagnose(plan: list[_GroupStep], defaults: dict[str, Any], diagnosed_steps: int) -> bool:
    """Prepare each group's statistics dicts; True when this step measures orthogonality."""
    if not defaults["diagnostics"]:
        return False
    for item in plan:
        item.stats = [{} for _ in item.params]
    every = defaults["orthogonality_every"]
    # The count moves when the step has applied (a step that raises is not counted).
    return every > 0 and (diagnosed_steps + 1) % every == 0


def _scalar(x: Any) -> Any:
    """A one-element tensor hyperparameter as a 0-d view of it (the same value), as every path of
    torch's AdamW functional takes eps and weight_decay (its foreach path refuses shape [1], and an
    [1, 1] eps would broadcast a 1-D parameter's update to 2-D); other values as they are."""
    return x.reshape(()) if isinstance(x, Tensor) else x


def _rounding_seeds(item: _GroupStep, capturable: bool) -> list[int | None] | None:
    """Per parameter, the seed of this step's stochastic rounding (None: round to nearest), from
    its step count and place, so that a resumed run and every rank round alike. Muon parameters
    that round stochastically keep a `step` count for it (AdamW ones have one). A capturable step
    reads no count: it draws from the device's default generator."""
    if not item.group["stochastic_rounding"] or all(p.dtype.itemsize >= 4 for p in item.params):
        return None  # no parameter rounds stochastically (`rounds_stochastically`): all round to nearest
    seeds: list[int | None] = []
    for p, position, new, held in zip(item.params, item.positions, item.states, item.held):
        if not rounds_stochastically(p, item.group):
            seeds.append(None)
            continue
        if capturable:
            seeds.append(functional.DEFAULT_GENERATOR)
            continue
        step = new["step"] if "step" in new else held["step"]
        if item.group["use_muon"]:
            # In place: with the step's own += 1 a Muon count moves by two per step. Kept as it has
            # always been, since the seeds (so the bits) and the saved counts depend on it.
            step += 1
        seeds.append((int(step) * 1_000_003 + position) % (1 << 62))
    return seeds


def _whole_matrices(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether a sharded DTensor holds whole matrices of its view on every rank (expert parallel)."""
    try:
        return is_local(p.shape, placements_of(p), resolve(group["layout"], p.ndim))
    except ValueError:
        return False


def _finite(plan: list[_GroupStep]) -> Tensor | None:
    """Whether every local gradient of the step is finite (a 0-d bool tensor; None without any)."""
    # A tensor is finite when its largest and smallest entries are (both are NaN if any entry
    # is): plain reductions, ~3x faster on CPU than the inf-norm. Empty shards have neither.
    every = local_parts([g for item in plan for g in item.grads])
    if not every:
        return None
    grads = [g for g in every if g.numel()]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=every[0].device)
    foreach_max = getattr(torch, "_foreach_max", None)  # not in every torch >= 2.5
    highs = foreach_max(grads) if foreach_max is not None else [g.amax() for g in grads]
    return torch.stack([*highs, *(g.amin() for g in grads)]).isfinite().all()


def _agreed_finite(plan: list[_GroupStep], distributed: Any, nonfinite: str) -> bool:
    """Whether the step goes ahead: every gradient finite (on every rank), or nonfinite="propagate".

    With a process group one all_reduce makes every rank decide alike (sharded gradients differ
    between ranks), and a Muon parameter with a gradient on some ranks but not on others raises
    ValueError on every rank before anything changes (the ranks would exchange different lists)."""
    finite = _finite(plan) if nonfinite != "propagate" else None
    if distributed is None:
        return finite is None or bool(finite)
    params = [(index, name, p) for index, item in enumerate(plan) if item.group["use_muon"]
              for name, p in zip(item.group.get("param_names") or [f"#{i}" for i in range(len(item.group["params"]))],
                                 item.group["params"])]
    device = params[0][2].device if params else torch.device("cpu")
    mixed, all_finite = distributed.agree([p.grad is not None for *_, p in params], finite, device)
    if mixed:
        named = ", ".join(f"'{params[i][1]}' of Muon group {params[i][0]} (here: {'a' if params[i][2].grad is not None else 'no'} "
                          "gradient)" for i in mixed[:5])
        raise ValueError(
            f"parameters with a gradient on some ranks of the process group and not on others: {named}; every rank "
            "must step the same Muon parameters (give an unused one a zero gradient, e.g. zero_grad(set_to_none=False)); "
            "nothing was changed"
        )
    return all_finite


def _collect(plan: list[_GroupStep]) -> dict[str, dict[str, float]]:
    """Muon.last_stats from the 0-d tensors a step recorded, with one transfer to the host."""
    keys, values = [], []
    for item in plan:
        for label, stats in zip(item.labels, item.stats or []):
            for key, value in stats.items():
                keys.append((label, key))
                values.append(value.detach().float().reshape(()).cpu())
    result: dict[str, dict[str, float]] = {}
    for (label, key), number in zip(keys, torch.stack(values).tolist() if values else []):
        result.setdefault(label, {})[key] = number
    return result
