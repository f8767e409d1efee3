"""class Muon: one torch.optim.Optimizer with Muon groups and AdamW groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import functional
from .functional import Directions, Variant
from .layout import Layout, LayoutSpec, resolve
from .options import (
    ADAMW_KEYS,
    GLOBAL_KEYS,
    MUON_KEYS,
    SKIPPED,
    Nonfinite,
    check_adamw_options,
    check_capturable,
    check_global_options,
    check_grad,
    check_muon_options,
    check_options,
    check_param,
    is_dtensor,
    local_parts,
    split_names,
)
from .orthogonalize import NsDtype, Orthogonalizer
from .scaling import Scale
from .state import (
    check_known,
    check_state,
    checked_state,
    from_torch_adamw,
    from_torch_muon,
    missing_state,
    rounds_stochastically,
    uncast,
)


@dataclass
class _GroupStep:
    """One group's share of a step, prepared and checked before anything changes."""

    group: dict[str, Any]
    params: list[Tensor]
    names: list[str]
    labels: list[str]  # names in last_stats: the parameter's name, else "group{g}.param{i}"
    states: list[dict[str, Tensor]]
    grads: list[Tensor]
    positions: list[int]  # each parameter's place in the optimizer's order (seeds its rounding)
    seeds: list[int | None] | None = None
    directions: Directions | None = None
    stats: list[dict[str, Tensor]] | None = field(default=None)
    # State of the group's parameters without a gradient that a changed variant, state_dtype or
    # stochastic_rounding replaces (so that every parameter's state is the group's, and loads back).
    idle: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)


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
        params: tensors, (name, tensor) pairs (not mixed), or group dicts (see muonkit.param_groups).
        lr: learning rate of Muon groups (default 1e-3; with scale "moonlight" an AdamW-sized lr); a
            float or, as torch.optim accepts, a one-element tensor of any shape.
        momentum: beta in [0, 1) (default 0.95).
        nesterov: Nesterov-style lookahead (default True).
        weight_decay: decoupled weight decay lambda of Muon groups (default 0.1).
        scale: "moonlight" (default; rms * sqrt(max(rows, cols))), "keller_jordan", "mup", "naive".
        rms: target update RMS of the "moonlight" scale (default 0.2).
        orthogonalizer: "polar_express" (default), "keller_jordan", "you", "gram", "svd" or a
            callable (X, steps) -> tensor of X's shape, called on one (rows, cols) matrix at a
            time unless it has the attribute ``batched = True`` (then on (k, rows, cols) stacks).
        ns_steps: iterations of the orthogonalizer (default 5).
        ns_dtype: working dtype of the orthogonalizer; None means float32 on CPU, bfloat16 on CUDA
            (float64 for float64 state); "auto" also picks bfloat16 on CPUs with native bfloat16
            products (2x faster there, a larger polar error; muonkit.orthogonalize.working_dtype).
        layout: matrix view of the parameters: None (2D (out, in); 3D stacked (batch, out, in);
            4D/5D conv (out, in, *kernel)), "conv", "stacked", or a muonkit.Layout.
        variant: "muon" (default), "normuon" (one second moment per row of each matrix) or
            "adamuon" (orthogonalize sign(U), one second moment per entry).
        beta2: the variants' second-moment decay in [0, 1) (default 0.95).
        variant_eps: the variants' eps in H = O / (sqrt(v) + eps) (default 1e-10, NorMuon's).
        cautious_weight_decay: decay only where the decay and the update agree in sign (both kinds
            of group; default False).
        state_dtype: dtype of the optimizer state (momentum, second moments, AdamW's moments) and
            of the update arithmetic; None (default) means the parameter's dtype. float32 for
            bfloat16 parameters keeps small updates from vanishing in the state.
        stochastic_rounding: write bfloat16/float16 parameters by unbiased stochastic rounding of
            the update computed in float32 (default True; no effect on float32/float64
            parameters). Without it, updates below half a bf16 ulp are lost: at lr 3e-4 a bf16
            run drifted 0.62 (relative) from the float32 run, 0.13 with it
            (tests/test_low_precision.py; benchmarks/RESULTS.md, bfloat16 parameters).
        adamw_lr: lr of AdamW groups (None: same as lr).
        adamw_betas, adamw_eps: AdamW's betas (default (0.9, 0.999)) and eps (default 1e-8).
        adamw_weight_decay: AdamW's decoupled weight decay (None: same as weight_decay).
        nonfinite: what a step does when a gradient holds NaN or Inf: "propagate" (default, as
            torch.optim: the values flow into the parameters and state), "skip" (nothing changes;
            every group's ``skipped_steps`` counts it) or "raise" (RuntimeError, nothing changes).
        diagnostics: record per-parameter statistics of every step in ``last_stats`` (default False).
        orthogonality_every: with diagnostics, every this many steps also measure the
            orthogonalizer's distance from the exact polar factor (an SVD per matrix; 0 = never).
        capturable: make the step safe to capture in a CUDA graph, as torch.optim's capturable
            mode (default False): step counters live on the parameters' device, a tensor lr is read
            there, and the step makes no host read. Every parameter must have a gradient at every
            step (a parameter without one raises ValueError naming it, in eager mode and at
            capture alike); needs nonfinite="propagate", diagnostics=False, no process_group and
            Python-number hyperparameters besides lr. Stochastic rounding then draws from the
            device's default generator (see docs/API.md, "Capturable steps").
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
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        nonfinite: Nonfinite = "propagate",
        diagnostics: bool = False,
        orthogonality_every: int = 0,
        capturable: bool = False,
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
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            adamw_lr=lr if adamw_lr is None else adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            nonfinite=nonfinite,
            diagnostics=diagnostics,
            orthogonality_every=orthogonality_every,
            capturable=capturable,
        )
        check_muon_options(defaults, "Muon")
        check_adamw_options(
            dict(
                lr=defaults["adamw_lr"],
                betas=defaults["adamw_betas"],
                eps=adamw_eps,
                weight_decay=defaults["adamw_weight_decay"],
                cautious_weight_decay=cautious_weight_decay,
                state_dtype=state_dtype,
                stochastic_rounding=stochastic_rounding,
            ),
            "Muon (adamw_* arguments)",
        )
        check_global_options(defaults, process_group)
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
        for key in GLOBAL_KEYS:
            if key in group:
                raise ValueError(f"{key} is an option of the whole optimizer (Muon({key}=...)), not of a param group")
        index = len(self.param_groups)
        kind = "Muon" if group["use_muon"] else "AdamW"
        self._fill_defaults(group)
        group.setdefault(SKIPPED, self.skipped_steps)
        where = f"{kind} group {index}"
        check_options(group, where)
        split_names(group)
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            check_param(p, name, group, where)
            if group["use_muon"] and is_dtensor(p):
                self._check_dtensor(p, name, where)
        given = set(group)
        super().add_param_group(group)
        added = self.param_groups[-1]
        own = MUON_KEYS if added["use_muon"] else ADAMW_KEYS
        for key in set(self.defaults) - set(own) - given:
            del added[key]
        for p in added["params"]:
            self.state[p].update(missing_state(p, self.state.get(p, {}), added, capturable=self.defaults["capturable"]))

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
            for key in MUON_KEYS:
                group.setdefault(key, d[key])
        else:
            group.setdefault("lr", d["adamw_lr"])
            group.setdefault("betas", d["adamw_betas"])
            group.setdefault("eps", d["adamw_eps"])
            group.setdefault("weight_decay", d["adamw_weight_decay"])
            group.setdefault("cautious_weight_decay", d["cautious_weight_decay"])
            group.setdefault("state_dtype", d["state_dtype"])
            group.setdefault("stochastic_rounding", d["stochastic_rounding"])

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
            super().__setstate__(self._loaded(state["state"], state["param_groups"]))
            return
        # Unpickling (copy.deepcopy, pickle, torch.load): __getstate__ refuses an optimizer that holds
        # a process group, so a copy never has one; keys added to groups since it was saved are filled.
        self._distributed = None
        self.last_stats, self._diagnosed_steps = {}, 0  # pickled before diagnostics existed
        super().__setstate__(state)
        for key, value in (("variant", "muon"), ("beta2", 0.95), ("variant_eps", 1e-10), ("cautious_weight_decay", False),
                           ("state_dtype", None), ("stochastic_rounding", False), ("nonfinite", "propagate"),
                           ("diagnostics", False), ("orthogonality_every", 0), ("capturable", False)):
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            group.setdefault(SKIPPED, 0)
            self._fill_defaults(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of muonkit.Muon, torch.optim.AdamW / Adam or torch.optim.Muon.

        Every group and its parameters' state are checked against this optimizer's groups before
        anything changes; a state dict that does not fit raises ValueError naming the group and
        leaves the optimizer as it was:

        - only state dicts whose meaning muonkit knows load: its own (groups with ``use_muon``),
          torch.optim.AdamW's / Adam's (``betas`` and ``amsgrad``) and torch.optim.Muon's
          (``ns_coefficients``); any other optimizer's (SGD, RMSprop, RAdam, ...) is refused, named;
        - a group keeps its kind: a loaded group is an AdamW group if its ``use_muon`` is False, or,
          without ``use_muon`` (torch's optimizers), if it has ``betas``; else a Muon group;
        - each parameter's state holds its kind's keys (Muon ``momentum_buffer``, and
          ``second_moment`` with a variant; AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) with the
          shapes the step needs; missing state (torch creates it lazily) is made fresh; a
          plain-number AdamW ``step`` (torch's older format) becomes a float32 tensor, as
          torch.optim.AdamW converts it;
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
        # torch.optim casts every floating state tensor it loads to its parameter's dtype, which would
        # round the float32 state of a bfloat16 parameter to bfloat16: _loaded takes such values from
        # the state dict as given, in the dtype their group keeps state in.
        self._loading = state_dict
        try:
            super().load_state_dict(state_dict)
        finally:
            del self._loading

    def _loaded(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The checked, translated groups and state of a load; raises before anything changes."""
        new_state = type(state)(dict)  # torch's defaultdict(dict), as Optimizer.__init__ makes it
        new_state.update(state)  # entries that are not parameters (torch keeps them as they are)
        saved_ids = [i for group in self._loading["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        as_saved = {id(p): self._loading["state"].get(i, {}) for i, p in zip(saved_ids, params)}
        new_groups = []
        for index, (saved, current) in enumerate(zip(groups, self.param_groups)):
            group = dict(saved)
            use_muon = current["use_muon"]
            kind = "Muon" if use_muon else "AdamW"
            where = f"load_state_dict: {kind} group {index}"
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
            self._fill_defaults(group)
            check_options(group, where)
            names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                check_param(p, name, group, where)
                if use_muon and is_dtensor(p):
                    self._check_dtensor(p, name, where)
                loaded = uncast(state.get(p, {}), as_saved.get(id(p), {}), p, group)
                new_state[p] = checked_state(loaded, p, group, f"{where}: parameter '{name}'",
                                             capturable=self.defaults["capturable"])
            new_groups.append(group)
        return {"state": new_state, "param_groups": new_groups}

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
            if self.defaults["diagnostics"]:
                self.last_stats = {}  # no parameter stepped
            return loss
        orthogonality = self._diagnose(plan)
        for item in plan:
            if item.group["use_muon"] and not self._fuses(item.group):
                item.directions = self._muon_directions(item, orthogonality)
        for item in plan:
            for p, state in [*zip(item.params, item.states), *item.idle]:
                self.state[p].update(state)
            if item.group["use_muon"] and item.group["variant"] == "muon":
                # A group switched to plain Muon drops its second moments, so that its state is the
                # kind's (and loads back) and a later switch back starts them from zero.
                for p in item.group["params"]:
                    self.state[p].pop("second_moment", None)
            item.seeds = self._rounding_seeds(item)
            if not item.group["use_muon"]:
                self._adamw_step(item)
                continue
            if item.directions is None:
                self._fused_muon_step(item, orthogonality)
            else:
                self._apply_muon(item)
            for p, seed in zip(item.params, item.seeds or []):
                if seed is not None:
                    self.state[p]["step"] += 1
        if self.defaults["diagnostics"]:
            self._diagnosed_steps += 1
            self.last_stats = _collect(plan)
        return loss

    def _prepare(self) -> list[_GroupStep]:
        # Everything is checked, for all groups, before anything changes, so an error leaves no
        # partial step: options edited through param_groups since construction, parameters
        # appended to a group's list (they get their checks here and their state when the step
        # applies), grads, and the state a loaded state dict left.
        capturable = self.defaults["capturable"]
        plan = []
        position = -1
        seen: dict[int, str] = {}  # id of each parameter -> where it is (a parameter steps once)
        for index, group in enumerate(self.param_groups):
            where = f"{'Muon' if group.get('use_muon') else 'AdamW'} group {index}"
            check_options(group, where, read_lr=not capturable)
            names = group.get("param_names") or []
            names = names + [f"#{i}" for i in range(len(names), len(group["params"]))]
            given = len(group.get("param_names") or [])
            item = _GroupStep(group, [], [], [], [], [], [])
            for i, (name, p) in enumerate(zip(names, group["params"])):
                position += 1
                if id(p) in seen:
                    raise ValueError(
                        f"{where}: parameter '{name}' is also {seen[id(p)]}; a parameter belongs to one group, "
                        "once (remove the one appended to param_groups[...]['params'])"
                    )
                seen[id(p)] = f"parameter '{name}' of {where}"
                if p.grad is None:
                    if capturable:
                        raise ValueError(
                            f"{where}: parameter '{name}' has no gradient; with capturable=True every parameter "
                            "steps at every step (a captured graph cannot skip one, and its replays would not "
                            "see a gradient that appears later): give it a gradient (zero_grad(set_to_none=False) "
                            "keeps zeros) or leave it out of the optimizer"
                        )
                    state = self.state.get(p, {})
                    if state:
                        check_param(p, name, group, where)
                        new = missing_state(p, state, group)
                        if new:
                            item.idle.append((p, new))
                    continue
                state = self.state.get(p, {})
                check_param(p, name, group, where)
                if capturable:
                    check_capturable(group, p.device, where)
                if not state and group["use_muon"] and is_dtensor(p):
                    self._check_dtensor(p, name, where)
                check_grad(p, name, where)
                new = missing_state(p, state, group, capturable=capturable)
                check_state(p, {**state, **new}, group, name, where)
                item.params.append(p)
                item.names.append(name)
                item.labels.append(name if i < given else f"group{index}.param{i}")
                item.states.append(new)
                item.grads.append(p.grad)
                item.positions.append(position)
            plan.append(item)
        return plan

    def _state(self, item: _GroupStep, key: str) -> list[Tensor]:
        """`key` of each stepping parameter's state, whether already held or created this step."""
        return [new[key] if key in new else self.state[p][key] for p, new in zip(item.params, item.states)]

    def _all_finite(self, plan: list[_GroupStep]) -> bool:
        # A tensor is finite when its largest and smallest entries are (both are NaN if any entry
        # is): plain reductions, ~3x faster on CPU than the inf-norm. Empty shards have neither.
        every = local_parts([g for item in plan for g in item.grads])
        if not every:
            return True
        grads = [g for g in every if g.numel()]
        if grads:
            foreach_max = getattr(torch, "_foreach_max", None)  # not in every torch >= 2.5
            highs = foreach_max(grads) if foreach_max is not None else [g.amax() for g in grads]
            finite = torch.stack([*highs, *(g.amin() for g in grads)]).isfinite().all()
        else:
            finite = torch.ones((), dtype=torch.bool, device=every[0].device)
        if self._distributed is not None:
            # Sharded gradients differ between ranks: every rank must take the same decision.
            finite = self._distributed.all_true(finite)
        return bool(finite)

    def _nonfinite_names(self, plan: list[_GroupStep]) -> list[str]:
        return [f"'{name}'" for item in plan for name, g in zip(item.names, local_parts(item.grads))
                if not bool(g.isfinite().all())]

    def _diagnose(self, plan: list[_GroupStep]) -> bool:
        """Prepare each group's statistics dicts; True when this step measures orthogonality."""
        if not self.defaults["diagnostics"]:
            return False
        for item in plan:
            item.stats = [{} for _ in item.params]
        every = self.defaults["orthogonality_every"]
        # The count moves when the step has applied (a step that raises is not counted).
        return every > 0 and (self._diagnosed_steps + 1) % every == 0

    def _rounding_seeds(self, item: _GroupStep) -> list[int | None] | None:
        """Per parameter, the seed of this step's stochastic rounding (None: round to nearest),
        from its step count and place, so that a resumed run and every rank round alike. Muon
        parameters that round stochastically keep a `step` count for it (AdamW ones have one)."""
        if not item.group["stochastic_rounding"]:
            return None
        seeds: list[int | None] = []
        for p, position in zip(item.params, item.positions):
            if not rounds_stochastically(p, item.group):
                seeds.append(None)
                continue
            if self.defaults["capturable"]:
                seeds.append(functional.DEFAULT_GENERATOR)  # no read of the device step count
                continue
            step = self.state[p]["step"]
            if item.group["use_muon"]:
                step += 1
            seeds.append((int(step) * 1_000_003 + position) % (1 << 62))
        return seeds

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
                params=item.params, variant=group["variant"], beta2=_value(group["beta2"]),
                eps=_value(group["variant_eps"]), second_moments=self._second_moments(item),
            )
        else:
            update_many = functional.local_update_many(
                method=group["orthogonalizer"], steps=group["ns_steps"], dtype=group["ns_dtype"],
                variant=group["variant"], beta2=_value(group["beta2"]), eps=_value(group["variant_eps"]),
            )
        return functional.muon_directions(
            local_parts(item.grads), local_parts(self._state(item, "momentum_buffer")), layouts,
            momentum=_value(group["momentum"]), nesterov=group["nesterov"], update_many=update_many,
            variant=group["variant"], second_moments=local_parts(self._second_moments(item)),
            stats=item.stats, orthogonality=orthogonality, orthogonalizer=group["orthogonalizer"],
            ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"],
        )

    def _apply_muon(self, item: _GroupStep) -> None:
        group = item.group
        assert item.directions is not None
        functional.apply_muon_(
            local_parts(item.params), local_parts(item.grads), local_parts(self._state(item, "momentum_buffer")), self._layouts(item),
            item.directions, lr=_lr(group, self.defaults["capturable"]), momentum=_value(group["momentum"]),
            weight_decay=_value(group["weight_decay"]), scale=group["scale"], rms=_value(group["rms"]),
            cautious_weight_decay=group["cautious_weight_decay"], second_moments=local_parts(self._second_moments(item)),
            shapes=[p.shape for p in item.params], rounding_seeds=item.seeds, stats=item.stats,
        )

    def _fused_muon_step(self, item: _GroupStep, orthogonality: bool) -> None:
        group = item.group
        functional.muon(
            item.params,
            item.grads,
            self._state(item, "momentum_buffer"),
            self._layouts(item),
            lr=_lr(group, self.defaults["capturable"]),
            momentum=_value(group["momentum"]),
            nesterov=group["nesterov"],
            weight_decay=_value(group["weight_decay"]),
            scale=group["scale"],
            rms=_value(group["rms"]),
            orthogonalizer=group["orthogonalizer"],
            ns_steps=group["ns_steps"],
            ns_dtype=group["ns_dtype"],
            variant=group["variant"],
            beta2=_value(group["beta2"]),
            variant_eps=_value(group["variant_eps"]),
            second_moments=self._second_moments(item),
            cautious_weight_decay=group["cautious_weight_decay"],
            rounding_seeds=item.seeds,
            stats=item.stats,
            orthogonality=orthogonality,
        )

    def _adamw_step(self, item: _GroupStep) -> None:
        group = item.group
        beta1, beta2 = group["betas"]
        if group["cautious_weight_decay"]:
            # As lr and weight_decay there: cautious decay computes with plain numbers (a tensor beta1
            # of another dtype or of shape [1, 1] would not fit the moments it mixes).
            beta1, beta2 = _value(beta1), _value(beta2)
        functional.adamw(
            local_parts(item.params),
            local_parts(item.grads),
            local_parts(self._state(item, "exp_avg")),
            local_parts(self._state(item, "exp_avg_sq")),
            self._state(item, "step"),
            lr=_adamw_lr(group, self.defaults["capturable"]),
            beta1=beta1,
            beta2=beta2,
            eps=_scalar(group["eps"]),
            weight_decay=_scalar(_adamw_weight_decay(group)),
            cautious_weight_decay=group["cautious_weight_decay"],
            rounding_seeds=item.seeds,
            stats=item.stats,
            capturable=self.defaults["capturable"],
        )


def _lr(group: dict[str, Any], capturable: bool) -> float | Tensor:
    """A Muon group's lr: a float, or with capturable=True a tensor lr as it is, read on its device."""
    lr = group["lr"]
    return lr if capturable and isinstance(lr, Tensor) else _value(lr)


def _value(x: Any) -> float:
    """A hyperparameter as a Python float: Muon groups compute with floats, whatever one-element
    tensor (of any shape) or NumPy number the checks accepted."""
    return float(x)


def _scalar(x: Any) -> Any:
    """A one-element tensor hyperparameter as a 0-d view of it (the same value), as every path of
    torch's AdamW functional takes eps and weight_decay (its foreach path refuses shape [1], and an
    [1, 1] eps would broadcast a 1-D parameter's update to 2-D); other values as they are."""
    return x.reshape(()) if isinstance(x, Tensor) else x


def _adamw_weight_decay(group: dict[str, Any]) -> float | Tensor:
    """An AdamW group's weight decay as torch's AdamW functional takes it, or as a float where cautious
    weight decay computes with it."""
    decay = group["weight_decay"]
    return _value(decay) if group["cautious_weight_decay"] else decay


def _adamw_lr(group: dict[str, Any], capturable: bool) -> float | Tensor:
    """An AdamW group's lr as torch's AdamW functional gets it from torch.optim.AdamW: a tensor lr as
    given (one element, any shape), so that the group equals torch.optim.AdamW bit for bit with it
    too (torch computes with the tensor); a float where cautious weight decay needs one, unless the
    step is capturable (then cautious decay reads the tensor on its device)."""
    lr = group["lr"]
    return lr if isinstance(lr, Tensor) and (capturable or not group["cautious_weight_decay"]) else _value(lr)


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


# -------------------------------------------------------------------------- validation helpers


