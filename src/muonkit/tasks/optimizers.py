"""The optimizers `muonkit bench` compares, built the same way for every task.

- muon: muonkit.Muon with its defaults on muonkit.param_groups(model); its AdamW groups share the lr
  (the "moonlight" scale makes the Muon lr an AdamW lr).
- muon-kj: muonkit.Muon with Keller Jordan's coefficients and scale; AdamW groups at the task's
  AdamW lr.
- adamw: torch.optim.AdamW on every parameter.
- sgd: torch.optim.SGD (momentum 0.9, Nesterov) on every parameter, with the weight decay decoupled
  as AdamW and Muon decouple it (`SGDW`).
- torch-muon: torch.optim.Muon on the matrices muonkit.route sends to Muon and torch.optim.AdamW on
  the rest (at the task's AdamW lr), as torch's documentation pairs them. torch.optim.Muon accepts
  only 2D parameters, so conv filters go to AdamW and a note says so.
- normuon, adamuon: muon with variant="normuon" / "adamuon" (muonkit's defaults otherwise).
- dion2, nordion2: muon with variant="dion2" / "nordion2" (fraction 0.25, ef_decay 0.95); a task
  without their own lrs uses muon's / normuon's.
- muon-8bit: muon with momentum_bits=8 (int8 blocks with a float32 scale each); a task without its
  own lr uses muon's.
- muon-pe4, muon-aol, muon-cubic5: muon with a cheaper orthogonalizer (issue 22 item 3): Polar
  Express with 4 steps (12 products instead of 15), "aol" with 4 steps (Turbo-Muon, 12), "cubic5"
  (10); a task without their own lrs uses muon's.
- NAME+cwd: NAME with cautious weight decay (decay only where it agrees in sign with the update),
  for every optimizer above except torch-muon (torch.optim.Muon has no such option). adamw+cwd is
  muonkit.Muon with AdamW groups only, which equals torch.optim.AdamW (fused=True on CPU, muonkit's
  default kernel there) when cautious decay is off.
  A task without its own lr for NAME+cwd uses NAME's.

Every optimizer gets the task's weight decay, applied the same way (p *= 1 - lr * weight_decay, before
the update), on the same parameters: all but those muonkit.param_groups does not decay (0D/1D
parameters and no_weight_decay() names, docs/API.md). The comparison varies one thing: the update rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import muonkit

BASE_OPTIMIZERS = ("muon", "muon-kj", "normuon", "adamuon", "adamw", "sgd", "torch-muon")

# Optimizers a task may leave out of its lrs: they take the lr of the one they vary (issue 23).
LR_FROM = {"muon-8bit": "muon", "dion2": "muon", "nordion2": "normuon",
           "muon-pe4": "muon", "muon-aol": "muon", "muon-cubic5": "muon"}
# The rows that vary only muon's orthogonalizer: (orthogonalizer, ns_steps).
CHEAP_ORTHOGONALIZERS = {"muon-pe4": ("polar_express", 4), "muon-aol": ("aol", 4), "muon-cubic5": ("cubic5", 5)}
CAUTIOUS = "+cwd"
OPTIMIZERS = BASE_OPTIMIZERS + tuple(name + CAUTIOUS for name in BASE_OPTIMIZERS if name != "torch-muon") + tuple(LR_FROM)


def base_name(name: str) -> str:
    """The optimizer without its "+cwd" suffix."""
    return name.removesuffix(CAUTIOUS)


def lr_for(name: str, lrs: dict[str, float]) -> float:
    """A task's lr for an optimizer: its own entry, else (for NAME+cwd) NAME's, else (LR_FROM) the
    lr of the optimizer it varies."""
    for candidate in (name, base_name(name), LR_FROM.get(base_name(name))):
        if candidate in lrs:
            return lrs[candidate]
    return lrs[LR_FROM.get(base_name(name), base_name(name))]

ORTHOGONALITY_EVERY = 5
"""With statistics, muonkit optimizers also measure the orthogonality error (an SVD per matrix) on
every 5th step that records statistics."""


def build_optimizers(name: str, model: nn.Module, lr: float, *, adamw_lr: float, weight_decay: float,
                     routing: dict[str, Any], statistics: bool = False) -> tuple[list[torch.optim.Optimizer], list[str]]:
    """The optimizers for one run, and notes about routing the user should see.

    `statistics`: muonkit optimizers are built with `diagnostics=True` (and the orthogonality error
    every ORTHOGONALITY_EVERY diagnosed steps) for `--tensorboard`; torch's optimizers are unchanged."""
    diagnostics = dict(diagnostics=True, orthogonality_every=ORTHOGONALITY_EVERY) if statistics else {}
    base, cautious = base_name(name), name.endswith(CAUTIOUS)
    if base in ("muon", "normuon", "adamuon", "dion2", "nordion2", "muon-8bit"):
        groups = muonkit.param_groups(model, **routing)
        bits = 8 if base == "muon-8bit" else 32
        return [muonkit.Muon(groups, lr=lr, weight_decay=weight_decay, variant="muon" if bits == 8 else base,
                             momentum_bits=bits, cautious_weight_decay=cautious, **diagnostics)], []
    if base in CHEAP_ORTHOGONALIZERS:
        orthogonalizer, steps = CHEAP_ORTHOGONALIZERS[base]
        return [muonkit.Muon(muonkit.param_groups(model, **routing), lr=lr, weight_decay=weight_decay,
                             orthogonalizer=orthogonalizer, ns_steps=steps, cautious_weight_decay=cautious,
                             **diagnostics)], []
    if base == "muon-kj":
        groups = muonkit.param_groups(model, **routing)
        return [muonkit.Muon(groups, lr=lr, weight_decay=weight_decay, orthogonalizer="keller_jordan",
                             scale="keller_jordan", adamw_lr=adamw_lr, cautious_weight_decay=cautious, **diagnostics)], []
    if base == "adamw" and cautious:
        groups = [{**g, "use_muon": False} for g in by_decay(model, routing)]
        return [muonkit.Muon(groups, lr=lr, weight_decay=weight_decay, cautious_weight_decay=True, **diagnostics)], []
    if base == "adamw":
        return [torch.optim.AdamW(by_decay(model, routing), lr=lr, weight_decay=weight_decay)], []
    if base == "sgd":
        groups = by_decay(model, routing, key="decoupled_weight_decay")
        return [SGDW(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, cautious=cautious)], []
    if name == "torch-muon":
        return _torch_muon(model, lr, adamw_lr=adamw_lr, weight_decay=weight_decay, routing=routing)
    raise ValueError(f"unknown optimizer {name!r}")


class SGDW(torch.optim.SGD):
    """torch.optim.SGD with decoupled weight decay: each parameter with a gradient is multiplied by
    1 - lr * weight_decay before the SGD update, as AdamW and Muon do.

    torch.optim.SGD's own `weight_decay` adds weight_decay * p to the gradient (L2), which momentum
    then amplifies ~1 / (1 - momentum) times; with the modular task's weight decay of 1 that
    collapsed every run to chance accuracy, so SGD did not get the same regularization as the
    others. The decay factor lives in each group as `decoupled_weight_decay`.

    With `cautious=True` the decay applies only where it agrees in sign with the update u the SGD
    step subtracts (u = b' or g + momentum * b' with Nesterov, b' = momentum * b + g the new buffer):
    W <- W - lr (u + weight_decay * W * 1[u W >= 0]).
    """

    def __init__(self, params: Any, lr: float, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, cautious: bool = False) -> None:
        if weight_decay < 0:
            raise ValueError(f"SGDW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        self.cautious = cautious
        self.defaults["decoupled_weight_decay"] = weight_decay  # for groups added later
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", weight_decay)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The direction torch.optim.SGD's step is about to subtract from p (dampening 0)."""
        g, mu = p.grad, group["momentum"]
        if not mu:
            return g
        buffer = self.state[p].get("momentum_buffer")
        new = g if buffer is None else buffer * mu + g
        return g + mu * new if group["nesterov"] else new

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            decay = group["lr"] * group["decoupled_weight_decay"]
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not (decay and with_grad):
                continue
            if self.cautious:
                for p in with_grad:
                    p.sub_(torch.where(self._update(p, group) * p >= 0, p, 0.0), alpha=decay)
            else:
                torch._foreach_mul_(with_grad, 1.0 - decay)
        super().step()
        return loss


def by_decay(model: nn.Module, routing: dict[str, Any], names: list[str] | None = None, *,
             key: str = "weight_decay") -> list[dict[str, Any]]:
    """The trainable parameters (or those `names`) in param groups split as muonkit.param_groups
    splits them for weight decay: the ones it does not decay get `key`: 0.0, the others no key
    (the optimizer's weight decay)."""
    params = dict(model.named_parameters())
    wanted = set(params) if names is None else set(names)
    decayed: dict[str, Any] = {"params": []}
    kept: dict[str, Any] = {"params": [], key: 0.0}
    for d in muonkit.route(model, **routing):
        if d.optimizer != "frozen" and d.name in wanted:
            (decayed if d.no_decay is None else kept)["params"].append(params[d.name])
    return [g for g in (decayed, kept) if g["params"]]


def _torch_muon(model: nn.Module, lr: float, *, adamw_lr: float, weight_decay: float,
                routing: dict[str, Any]) -> tuple[list[torch.optim.Optimizer], list[str]]:
    params = dict(model.named_parameters())
    matrices, rest, not_2d = [], [], []
    for d in muonkit.route(model, **routing):
        if d.optimizer == "frozen":
            continue
        if d.optimizer == "muon" and len(d.shape) == 2:
            matrices.append(d.name)
        else:
            rest.append(d.name)
            if d.optimizer == "muon":
                not_2d.append(d.name)
    notes = []
    if not_2d:
        notes.append(f"torch-muon: torch.optim.Muon accepts only 2D parameters; {len(not_2d)} Muon-routed "
                     f"tensors ({not_2d[0]}, ...) with {len(params[not_2d[0]].shape)}D shapes go to AdamW instead")
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:
        optimizers.append(torch.optim.Muon(by_decay(model, routing, matrices), lr=lr, weight_decay=weight_decay))
    else:
        notes.append("torch-muon: no 2D matrices to give torch.optim.Muon; it is plain AdamW on this model")
    if rest:
        optimizers.append(torch.optim.AdamW(by_decay(model, routing, rest), lr=adamw_lr, weight_decay=weight_decay))
    return optimizers, notes


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes held in optimizer state tensors (momentum and second-moment buffers)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total
