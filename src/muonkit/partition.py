"""Which parameter goes to Muon and which to AdamW, and why.

Decisions follow each parameter's role in the model, not its name: Muon for hidden Linear weights,
conv filters and other matrices; AdamW for embeddings (and weights tied to them), the output
layer, the input stem, 0D/1D parameters and matrices too small for orthogonalization to mean
anything (Keller Jordan's Muon post; Moonlight; the seed notebook's split).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import torch
from torch import nn

from .layout import Layout, LayoutSpec, matrix_shape, resolve

Choice = Literal["muon", "adamw"]
Predicate = Callable[[str, nn.Parameter, nn.Module], "Choice | None"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WEIGHT_LAYERS = (nn.Linear, *_CONVS, *_CONV_TRANSPOSES)
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class Decision:
    """The routing of one parameter."""

    name: str
    shape: tuple[int, ...]
    optimizer: Literal["muon", "adamw", "frozen"]
    reason: str
    layout: LayoutSpec = None


def _layout_of(module: nn.Module, p: nn.Parameter) -> LayoutSpec:
    if isinstance(module, _CONV_TRANSPOSES):
        # ConvTranspose stores (in, out // groups, *kernel): fan_out is axis 1.
        return Layout(rows=(1,), cols=(0, *range(2, p.ndim)))
    if isinstance(module, _CONVS):
        return "conv"
    return "stacked"


def _execution_order(model: nn.Module, example_inputs: Sequence[Any]) -> list[nn.Module]:
    order: list[nn.Module] = []
    seen: set[int] = set()

    def record(module: nn.Module, _inputs: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    layers = [m for m in model.modules() if isinstance(m, (*_EMBEDDINGS, *_WEIGHT_LAYERS))]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def route(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | None = None,
    min_size: int = 2,
) -> list[Decision]:
    """Decide Muon or AdamW for every parameter of `model`, with a reason for each.

    Args:
        muon, adamw: parameter names forced to that optimizer (they win over everything).
        predicate: (name, param, module) -> "muon" | "adamw" | None; None falls through to the
            role-based rules.
        example_inputs: positional inputs for one forward pass that records which layer reads
            the input first and which produces the output last; without them, registration
            order (the order of model.modules()) stands in for execution order.
        min_size: matrices whose matrix view has a side shorter than this go to AdamW.
    """
    unknown = (set(muon) | set(adamw)) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no parameters named {sorted(unknown)} in the model")
    both = set(muon) & set(adamw)
    if both:
        raise ValueError(f"parameters {sorted(both)} are named in both muon= and adamw=")

    owner: dict[int, tuple[str, nn.Module]] = {}
    owners_of: dict[int, list[nn.Module]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), (module_name, module))
            owners_of.setdefault(id(p), []).append(module)
    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDINGS)
    }

    if example_inputs is not None:
        layers = _execution_order(model, example_inputs)
        order_source = "in the forward pass"
    else:
        layers = [m for m in model.modules() if isinstance(m, (*_EMBEDDINGS, *_WEIGHT_LAYERS))]
        order_source = "in registration order"
    stem = layers[0] if layers and isinstance(layers[0], _WEIGHT_LAYERS) else None
    output = layers[-1] if layers and isinstance(layers[-1], _WEIGHT_LAYERS) else None

    decisions = []
    for name, p in model.named_parameters():
        module_name, module = owner[id(p)]
        shape = tuple(p.shape)
        if not p.requires_grad:
            decisions.append(Decision(name, shape, "frozen", "requires_grad=False: not optimized"))
            continue
        layout = _layout_of(module, p) if p.ndim >= 2 else None
        choice, reason = _decide(
            name, p, module, layout,
            muon=muon, adamw=adamw, predicate=predicate, min_size=min_size,
            tied_to=embedding_weights.get(id(p)) if not isinstance(module, _EMBEDDINGS) else None,
            is_stem=any(m is stem for m in owners_of[id(p)]),
            is_output=any(m is output for m in owners_of[id(p)]),
            order_source=order_source,
        )
        decisions.append(Decision(name, shape, choice, reason, layout if choice == "muon" else None))
    return decisions


def _decide(
    name: str,
    p: nn.Parameter,
    module: nn.Module,
    layout: LayoutSpec,
    *,
    muon: Collection[str],
    adamw: Collection[str],
    predicate: Predicate | None,
    min_size: int,
    tied_to: str | None,
    is_stem: bool,
    is_output: bool,
    order_source: str,
) -> tuple[Choice, str]:
    kind = type(module).__name__
    if name in muon:
        if p.ndim < 2:
            raise ValueError(f"'{name}' has shape {tuple(p.shape)}; only matrices can go to Muon")
        return "muon", "named in muon="
    if name in adamw:
        return "adamw", "named in adamw="
    if predicate is not None:
        choice = predicate(name, p, module)
        if choice not in (None, "muon", "adamw"):
            raise ValueError(f"predicate returned {choice!r} for '{name}'; expected 'muon', 'adamw' or None")
        if choice == "muon" and p.ndim < 2:
            raise ValueError(f"predicate sent '{name}' with shape {tuple(p.shape)} to Muon; only matrices can go")
        if choice is not None:
            return choice, "chosen by predicate"
    if p.ndim == 0:
        return "adamw", "scalar (0D)"
    if p.ndim == 1:
        role = "norm gain or shift" if isinstance(module, _NORMS) else "bias or scale vector"
        return "adamw", f"1D {role} of {kind}"
    if isinstance(module, _EMBEDDINGS):
        return "adamw", f"embedding ({kind}): a lookup table, not a dense linear map"
    if tied_to is not None:
        return "adamw", f"tied to embedding '{tied_to}'"
    if is_output:
        return "adamw", f"output layer: the last {kind} {order_source}"
    if is_stem:
        return "adamw", f"input stem: the first {kind} {order_source}"
    _, rows, cols = matrix_shape(p.shape, resolve(layout, p.ndim))
    if min(rows, cols) < min_size:
        return "adamw", f"matrix view {rows}x{cols} too small to orthogonalize (side < {min_size})"
    if isinstance(module, nn.Linear):
        return "muon", f"hidden Linear weight {rows}x{cols}"
    if isinstance(module, (*_CONVS, *_CONV_TRANSPOSES)):
        return "muon", f"hidden conv filter as {rows}x{cols} (out x in*kernel)"
    batch = matrix_shape(p.shape, resolve(layout, p.ndim))[0]
    what = f"{batch} stacked matrices" if batch > 1 else "matrix"
    return "muon", f"{what} {rows}x{cols} of {kind}, read as (..., out, in)"


def param_groups(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | None = None,
    min_size: int = 2,
    muon_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for muonkit.Muon: one Muon group per matrix layout, one AdamW group.

    Returns plain dicts ({"params", "param_names", "use_muon", ...}) that can be printed, edited
    and passed to muonkit.Muon as they are. `muon_options` / `adamw_options` are merged into the
    Muon / AdamW groups (e.g. {"lr": 0.02}).

    Example:
        >>> opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-3)
    """
    decisions = route(
        model, muon=muon, adamw=adamw, predicate=predicate,
        example_inputs=example_inputs, min_size=min_size,
    )
    params = dict(model.named_parameters())
    groups: dict[Any, dict[str, Any]] = {}
    for d in decisions:
        if d.optimizer == "frozen":
            continue
        key = ("muon", d.layout) if d.optimizer == "muon" else ("adamw",)
        if key not in groups:
            extra = (muon_options if d.optimizer == "muon" else adamw_options) or {}
            groups[key] = {"params": [], "param_names": [], "use_muon": d.optimizer == "muon"}
            if d.optimizer == "muon":
                groups[key]["layout"] = d.layout
            groups[key].update(extra)
        groups[key]["params"].append(params[d.name])
        groups[key]["param_names"].append(d.name)
    return list(groups.values())


def format_table(decisions: Sequence[Decision]) -> str:
    """The routing table: name, shape, optimizer, reason, and a summary line."""
    header = ("Parameter name", "Shape", "Optimizer", "Reason")
    rows = [(d.name, str(list(d.shape)), {"muon": "Muon", "adamw": "AdamW"}.get(d.optimizer, "-"), d.reason)
            for d in decisions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}"  # noqa: E731
    body = [line(header), "-" * (sum(widths) + 6 + len(header[3]))] + [line(r) for r in rows]
    counts = {}
    for d in decisions:
        n, c = counts.get(d.optimizer, (0, 0))
        counts[d.optimizer] = (n + 1, c + int(torch.Size(d.shape).numel()))
    summary = ", ".join(f"{k}: {n} tensors, {c:,} values" for k, (n, c) in sorted(counts.items()))
    return "\n".join(body + [summary])


def explain(
    model: nn.Module,
    *,
    file: TextIO | None = sys.stdout,
    **routing: Any,
) -> str:
    """Print (to `file`, unless None) and return the routing table of `model`.

    Takes the same keyword arguments as `route`.
    """
    text = format_table(route(model, **routing))
    if file is not None:
        print(text, file=file)
    return text
