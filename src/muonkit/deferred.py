"""The relay phase of a step left in flight and applied before the next forward uses it (opt-in).

Under HSDP (Replicate over replicas, Shard(0) inside a node) each matrix has one owner among all
ranks, and after the step every rank receives over InfiniBand its piece of every result its
replica does not own: the relay phase (muonkit.plan.returns). InfiniBand is idle during the next
forward pass there (FSDP's all-gathers stay inside the node; the cross-replica all-reduce runs in
backward), so `defer_relay` lets step() start the relay collectives and return: each parameter
whose update comes by relay gets it just before the module that holds it runs its forward (a
forward pre-hook registered with prepend=True, so it runs before FSDP2's pre-forward all-gathers
the shards), and everything left is applied before anything else reads the parameters or the
optimizer's state through torch's or muonkit's APIs (the list in `DeferredRelay`).

The arithmetic is the step's own: the update of a relayed parameter is applied with the lr,
weight decay, scale and rounding seed its step captured (muonkit.functional.Pending), so the
parameters equal a step without deferral bit for bit once applied. Where a step has no relay
phase (one process, DDP, FSDP, FSDP + TP, expert parallel: every rank receives its pieces from
their owners directly) nothing is deferred and nothing changes.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .optimizer import Muon
from .variants import VARIANTS

if TYPE_CHECKING:
    from .distributed import Relayed

__all__ = ["DeferredRelay", "defer_relay", "finish_all"]

_LIVE: weakref.WeakSet[DeferredRelay] = weakref.WeakSet()


def defer_relay(optimizer: Muon, model: nn.Module) -> DeferredRelay:
    """Leave the relay phase of `optimizer`'s steps in flight until `model` needs it.

    Call it once, after the model is wrapped (fully_shard) and the optimizer built, before training.
    Returns the `DeferredRelay` whose `finish()` applies everything still in flight (call it before
    reading parameters directly: evaluation outside the model's forward, an EMA, logging weights).

    Raises:
        TypeError: `optimizer` is no muonkit.Muon or `model` no torch.nn.Module.
        ValueError: an option the deferral cannot honour (naming it and its value): a selecting
            variant ("dion2", "nordion2"), diagnostics=True, a Muon parameter that is not one of
            `model`'s, an optimizer that is already deferred.

    Example:
        >>> opt = muonkit.Muon(muonkit.param_groups(model), process_group=mesh)
        >>> deferred = muonkit.defer_relay(opt, model)
        >>> loss = model(x).sum(); loss.backward(); opt.step(); opt.zero_grad()
        >>> deferred.finish()  # before evaluating with the parameters read directly
    """
    return DeferredRelay(optimizer, model)


def finish_all() -> None:
    """Apply every deferred update still in flight in this process (muonkit.QKClip.step calls it)."""
    for deferred in list(_LIVE):
        deferred.finish()


class DeferredRelay:
    """An optimizer whose steps leave their relay phase in flight (`defer_relay` makes one).

    Pending updates are applied: per module, in a forward pre-hook of the module that holds the
    parameter, or of its FSDP2 module (whose pre-forward all-gathers it; with
    `set_modules_to_forward_prefetch`, of the module that prefetches it), waiting for the buckets
    holding that module's parameters (and the earlier ones, done by then); what is left after the
    model's forward (a module it skipped, buckets this rank only sends in), in a forward hook of
    the model. All of them: before the optimizer's next step(), state_dict(), load_state_dict()
    and add_param_group(); before any state_dict() or load_state_dict() of the model or one of its
    modules (so also muonkit's save_checkpoint and load_checkpoint, and DCP's get_state_dict); in
    muonkit.QKClip.step(); and in `finish()`.

    Not guarded: reading a parameter's tensor directly (p.data, p.to_local(), p.full_tensor(),
    model.parameters() read outside a forward), FSDPModule.unshard() called by hand, and a forward
    of a module that uses a parameter it does not hold. Call `finish()` first there.
    """

    def __init__(self, optimizer: Muon, model: nn.Module) -> None:
        if not isinstance(optimizer, Muon):
            raise TypeError(f"defer_relay: optimizer must be a muonkit.Muon, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"defer_relay: model must be a torch.nn.Module, got {type(model).__name__}")
        self.optimizer, self.model = optimizer, model
        self._distributed = optimizer._distributed
        self._in_flight: dict[int, list[tuple[Relayed, int]]] = {}  # id(param) -> (record, bucket)
        self._handles: list[Any] = []
        self._appliers: dict[nn.Module, list[Tensor]] = {}
        self._params: set[int] = set()
        if self._distributed is None:
            return  # one process: no relay phase, nothing to hook
        if self._distributed.defer_relay:
            raise ValueError("defer_relay: this optimizer's relay phase is deferred already (one DeferredRelay per optimizer)")
        self._appliers = _appliers(model)
        self._params = {id(p) for params in self._appliers.values() for p in params}
        self.check()
        self._hook_up()
        self._distributed.defer_relay = True
        _LIVE.add(self)

    @property
    def pending(self) -> int:
        """How many parameters of this rank wait for their update (0 right after `finish()`)."""
        return len(self._in_flight)

    def check(self) -> None:
        """ValueError naming the option and its value if a step cannot be deferred now (run at
        hook-up and before every step, so a group changed since is refused before it steps)."""
        if self._distributed is None:
            return
        if self.optimizer.defaults["diagnostics"]:
            raise ValueError("defer_relay: Muon(diagnostics=True) records every update in last_stats during "
                             "step(); a deferred update arrives after it. Switch diagnostics off (opt.diagnostics = False)")
        for g, group in enumerate(self.optimizer.param_groups):
            if not group["use_muon"]:
                continue
            variant = group["variant"]
            if (VARIANTS[variant] if isinstance(variant, str) else variant).selects:
                raise ValueError(f"defer_relay: Muon group {g} has variant={group['variant']!r}, which updates the "
                                 "rows it selects after the exchange; its relay cannot be deferred (use it without "
                                 "defer_relay, or a variant that updates whole matrices)")
            names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                if id(p) not in self._params:
                    raise ValueError(f"defer_relay: Muon group {g}: parameter {name!r} is not a parameter of the model "
                                     "given, so no forward of it could apply its update; pass the model that holds "
                                     "every parameter (after fully_shard), or call defer_relay after wrapping it")

    def finish(self) -> None:
        """Wait for every relay in flight and apply its updates (a no-op when none is). Issues no
        collective, so it may run on some ranks and not on others."""
        if self._distributed is None:
            return
        for record in list(self._distributed.relays):
            for b in list(record.handles):
                _apply(record, b)
        self._distributed.relays.clear()
        self._in_flight.clear()

    def remove(self) -> None:
        """`finish()`, then stop deferring: later steps apply their relays within step() again."""
        self.finish()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._distributed is not None:
            self._distributed.defer_relay = False
            self.optimizer.__dict__.pop("add_param_group", None)
        _LIVE.discard(self)

    # ------------------------------------------------------------------------------ hook-up

    def _hook_up(self) -> None:
        def finish(*_: Any) -> None:
            self.finish()

        def before_step(*_: Any) -> None:
            self.finish()
            self.check()

        optimizer, register = self.optimizer, self._handles.append
        register(optimizer.register_step_pre_hook(before_step))
        register(optimizer.register_step_post_hook(lambda *_: self._track()))
        register(optimizer.register_state_dict_pre_hook(finish))
        register(optimizer.register_load_state_dict_pre_hook(finish))
        add_param_group = optimizer.add_param_group

        def add_param_group_after_finish(param_group: dict[str, Any]) -> None:
            self.finish()
            add_param_group(param_group)

        optimizer.add_param_group = add_param_group_after_finish  # type: ignore[method-assign]
        for module in self.model.modules():
            register(module.register_state_dict_pre_hook(finish))
            register(module.register_load_state_dict_pre_hook(finish))
        for module in self._appliers:
            register(module.register_forward_pre_hook(self._pre_forward_hook(module), prepend=True))
        # After the model's forward whatever is left (the updates of modules it skipped, the relays
        # this rank only sends in) is waited for: by then the relay is done (the premise), and its
        # buffers are not held through the backward pass.
        register(self.model.register_forward_hook(finish))

    def _pre_forward_hook(self, module: nn.Module) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if not self._in_flight:
                return
            for target in (module, *_gathered_with(module)):
                self._apply_params(self._appliers.get(target, ()))

        return hook

    def _track(self) -> None:
        """After a step: which parameter waits for which bucket of which record."""
        self._in_flight.clear()
        for record in self._distributed.relays:
            for i, b in record.pending().items():
                self._in_flight.setdefault(id(record.params[i]), []).append((record, b))

    def _apply_params(self, params: Any) -> None:
        for p in params:
            for record, b in self._in_flight.pop(id(p), ()):
                # Earlier buckets were issued first and are done by now (collectives of one group
                # run in order): waiting for them too costs nothing and frees their buffers.
                for earlier in sorted(record.handles):
                    if earlier <= b:
                        _apply(record, earlier)


def _apply(record: Relayed, b: int) -> None:
    """Wait for bucket b of `record` and apply what it brought, if its step was applied (a step
    that raised before applying anything leaves its relays to be waited for and dropped)."""
    results = record.wait(b)
    if results and record.step is not None and record.step.applied:
        with torch.no_grad():
            record.step.apply_later_(results)


def _appliers(model: nn.Module) -> dict[nn.Module, list[Tensor]]:
    """Per module whose forward pre-hook applies them, the parameters: each module's own, or, under
    FSDP2, those of the nearest fully_shard module holding it (its pre-forward all-gathers them)."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    out: dict[nn.Module, list[Tensor]] = {}
    seen_by: dict[int, set[int]] = {}

    def visit(module: nn.Module, manager: nn.Module | None) -> None:
        if fsdp is not None and isinstance(module, fsdp):
            manager = module
            state = module._get_fsdp_state()
            if not (hasattr(state, "_states_to_forward_prefetch") and hasattr(state, "_modules")):
                raise RuntimeError("defer_relay: this torch's FSDP2 keeps its forward prefetch or its grouped modules "
                                   "where muonkit does not look (FSDPState._states_to_forward_prefetch, ._modules); "
                                   "deferring could let it all-gather a parameter before its update")
        params = [p for p in module._parameters.values() if p is not None]
        if params:
            held = out.setdefault(manager if manager is not None else module, [])
            seen = seen_by.setdefault(id(held), set())
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    held.append(p)
        for child in module.children():
            visit(child, manager)

    visit(model, None)
    return out


def _gathered_with(module: nn.Module) -> list[nn.Module]:
    """The other modules whose parameters FSDP2 all-gathers in `module`'s pre-forward: those
    sharded with it as one group (`fully_shard([a, b])`: the first to run gathers them all, see
    FSDPState._pre_forward) and those it prefetches (`FSDPModule.set_modules_to_forward_prefetch`)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return []
    state = get_state()
    return [m for s in (state, *state._states_to_forward_prefetch) for m in s._modules if m is not module]
