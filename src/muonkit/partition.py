"""Which parameter goes to Muon and which to AdamW, why, and which parameters are not decayed.

Decisions follow each parameter's role in the model, not its name: Muon for hidden Linear weights,
conv filters and other matrices; AdamW for embeddings (and weights tied to them), the output
layer, the input stem, 0D/1D parameters and matrices too small for orthogonalization to mean
anything (Keller Jordan's Muon post; Moonlight; the seed notebook's split).

A "free" parameter is a >=2D parameter that is not the weight of a layer muonkit knows (Linear,
Conv, ConvTranspose, Embedding, MultiheadAttention, transformers' Conv1D): ViT's pos_embed and
cls_token, stacked expert weights owned by a custom module, a layer-scale table. Its role is not
in its module's type, so it is read from how one forward pass over `example_inputs` uses it
(observed at the ATen level with a TorchDispatchMode): consumed only as a matrix operand of a
matrix product or a convolution -> Muon; added, concatenated, indexed, multiplied elementwise or
fed as the input of a layer -> AdamW. Without example inputs a free parameter goes to AdamW, and
its reason says how to send it to Muon.
"""

from __future__ import annotations

import fnmatch
import inspect
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .layout import Layout, LayoutSpec, matrix_shape, resolve

Choice = Literal["muon", "adamw"]
PredicateResult = Union[None, Choice, Layout, tuple[Literal["muon"], LayoutSpec]]
Predicate = Callable[[str, nn.Parameter, nn.Module], PredicateResult]

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
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

# ATen ops and the positional operands that are factors of a matrix product: "left" in L @ R is
# stored (out, in), "right" is stored (in, out); a convolution's filter is "conv"; addmm's and
# baddbmm's added term is not a factor.
_MATRIX_OPERANDS: dict[str, dict[int, str]] = {
    "mm": {0: "left", 1: "right"},
    "bmm": {0: "left", 1: "right"},
    "matmul": {0: "left", 1: "right"},
    "mv": {0: "left"},
    "addmm": {1: "left", 2: "right"},
    "addbmm": {1: "left", 2: "right"},
    "baddbmm": {1: "left", 2: "right"},
    "addmv": {1: "left"},
    "linear": {1: "left"},
    "convolution": {1: "conv"},
}
# Ops whose output is the same values as their input (dtype casts, contiguous copies): a later
# use of the output is a use of the parameter it came from.
_COPIES = frozenset({"clone", "_to_copy", "contiguous", "_unsafe_view", "lift_fresh_copy"})


@dataclass(frozen=True)
class Decision:
    """The routing of one parameter.

    Attributes:
        name, shape: as in model.named_parameters().
        optimizer: "muon", "adamw", or "frozen" (requires_grad=False: left out of param_groups).
        reason: why, in words.
        layout: the matrix view of a Muon parameter (a group's `layout` option); None otherwise.
        no_decay: None when the parameter's group weight decay applies; otherwise why its
            weight_decay is 0 ("1D", "model.no_weight_decay()", ...).
    """

    name: str
    shape: tuple[int, ...]
    optimizer: Literal["muon", "adamw", "frozen"]
    reason: str
    layout: LayoutSpec = None
    no_decay: str | None = None


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT-J, ...), recognized without importing transformers: the
    class name, its `nf` (output features) and a 2D weight stored (in, out) = (nx, nf)."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
        and isinstance(nf, int)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == nf
    )


def _is_weight_layer(module: nn.Module) -> bool:
    """A layer whose weight is a dense linear map: Linear, Conv, ConvTranspose, transformers' Conv1D."""
    return isinstance(module, _WEIGHT_LAYERS) or _is_hf_conv1d(module)


def _transposed(ndim: int) -> Layout:
    """(..., in, out): a batch of matrices stored transposed."""
    return Layout(rows=(ndim - 1,), cols=(ndim - 2,), batch=tuple(range(ndim - 2)))


def _product_layout(p: nn.Parameter, operand: torch.Tensor, side: str) -> LayoutSpec:
    """The matrix view of a free parameter from one matrix-product operand made of it.

    In L @ R the contracted size (L's last axis, R's second-to-last) is the fan_in and the other
    side of the operand the fan_out; einsum and matmul may merge batch axes into either, so each
    is a multiple of the parameter's own axis. (..., in, out) when only that reading fits the
    parameter's last two axes (a, b): fan_in a multiple of a and fan_out of b. Otherwise None,
    the default (..., out, in): right when it fits, and harmless when both fit (a square matrix
    has the same scale either way).
    """
    if operand.ndim < 2 or p.ndim < 2:
        return None
    rows, cols = operand.shape[-2:]
    fan_out, fan_in = (rows, cols) if side == "left" else (cols, rows)
    a, b = p.shape[-2:]
    if a == 0 or b == 0:
        return None
    as_stored = fan_out % a == 0 and fan_in % b == 0
    transposed = fan_out % b == 0 and fan_in % a == 0
    return _transposed(p.ndim) if transposed and not as_stored else None


@dataclass(frozen=True)
class _Known:
    """The weight of a layer muonkit knows: what it is, its matrix view, and how that view reads."""

    what: str
    layout: LayoutSpec
    reading: str = ""


def _conv_layout(transposed: bool, ndim: int, groups: int) -> LayoutSpec:
    """A Conv filter (out, in / groups, *kernel), grouped or not, is one out x (in / groups * kernel)
    matrix (Keller Jordan's conv flattening; the seed notebook's). A ConvTranspose filter, stored
    (in, out / groups, *kernel), is one (out / groups) x (in * kernel) matrix per group: fan_out
    is axis 1, and the groups cut axis 0."""
    if not transposed:
        return "conv"
    blocks = ((0, groups),) if groups > 1 else ()
    return Layout(rows=(1,), cols=(0, *range(2, ndim)), blocks=blocks)


# What training measured for the default reading of depthwise and grouped conv filters
# (benchmarks/RESULTS.md, "Depthwise and grouped conv filters").
GROUPED_CONV_EVIDENCE = (
    "measured: it trained better than one matrix per group and than AdamW on the seed notebook's network "
    "and a transformers ConvNeXt on Fashion-MNIST, 3 seeds at each reading's best lr, benchmarks/RESULTS.md; "
    "a predicate returning Layout.per_block(groups, ndim) or 'adamw' picks the others"
)


def _conv_kind(module: nn.Module, transposed: bool) -> _Known:
    groups = module.groups
    name = "transposed-conv filter" if transposed else "conv filter"
    layout = _conv_layout(transposed, module.weight.ndim, groups)
    if transposed:
        stored = "; stored (in, out/groups, *kernel)"
        if groups == 1:
            return _Known(name, layout, f" (out x in*kernel{stored})")
        return _Known(f"grouped {name} (groups={groups})", layout,
                      f" (one (out/groups) x (in*kernel) matrix per group{stored})")
    if groups == 1:
        return _Known(name, layout, " (out x in*kernel)")
    what = "depthwise" if groups == module.in_channels else "grouped"
    return _Known(f"{what} {name} (groups={groups})", layout,
                  f" (out x in/groups*kernel, one matrix for all groups: {GROUPED_CONV_EVIDENCE})")


def _known_weight(module: nn.Module, local_name: str, p: nn.Parameter) -> _Known | None:
    if local_name == "weight" and isinstance(module, _EMBEDDINGS):
        return _Known("embedding", None)
    if local_name == "weight" and isinstance(module, nn.Linear):
        return _Known("Linear weight", "stacked")
    if local_name == "weight" and isinstance(module, _CONVS):
        return _conv_kind(module, transposed=False)
    if local_name == "weight" and isinstance(module, _CONV_TRANSPOSES):
        return _conv_kind(module, transposed=True)
    if local_name == "weight" and _is_hf_conv1d(module):
        return _Known("transformers Conv1D weight", Layout(rows=(1,), cols=(0,)),
                      " (out x in; stored (in, out), read with Layout(rows=(1,), cols=(0,)))")
    if local_name == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
        return _Known("MultiheadAttention in_proj_weight", Layout.per_block(3), " (q, k and v: 3 matrices)")
    if local_name in _ATTENTION_WEIGHTS and isinstance(module, nn.MultiheadAttention):
        return _Known(f"MultiheadAttention {local_name}", "stacked")
    return None


# ------------------------------------------------------------------ observing one forward pass

@dataclass(frozen=True)
class _Use:
    """One ATen op that consumed a free parameter."""

    op: str
    matrix: bool
    """The parameter was a factor of a matrix product or a convolution's filter."""
    layout: LayoutSpec = None
    """The matrix view that use implies (None: the default)."""
    feeds: str | None = None
    """For a matrix product with a layer's weight as the other factor: that weight's name."""


@dataclass
class _Observation:
    """What one forward pass showed."""

    order: list[Any] = field(default_factory=list)
    """Known layers (modules) and free parameters, in the order the forward pass first runs them."""
    uses: dict[int, list[_Use]] = field(default_factory=dict)
    """Free parameter id -> how the forward pass consumed it, in order."""


class _UseRecorder(TorchDispatchMode):
    """Records how ATen ops consume the free parameters (and what feeds them).

    A tensor comes from a parameter when it shares the parameter's storage (views: transposes,
    reshapes, expands) or is the output of a copy of it (_COPIES). View ops are not uses.
    """

    def __init__(self, free: dict[int, nn.Parameter], weights: dict[int, str], seen: _Observation):
        super().__init__()
        self.free = free
        self.weights = weights
        self.seen = seen
        self.source: dict[int, int] = {}
        """Storage address -> id of the parameter whose values it holds."""
        self.keep: list[torch.Tensor] = []
        """Copies of parameters, kept alive so that no other tensor reuses their addresses."""

    def watch(self, p: nn.Parameter) -> None:
        if p.numel() and p.layout == torch.strided and p.device.type != "meta":
            self.source[p.untyped_storage().data_ptr()] = id(p)

    def _origin(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return None
        return self.source.get(t.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        op = func.overloadpacket.__name__
        operands = [(i, leaf) for i, a in enumerate(args) for leaf in tree_leaves(a)]
        operands += [(None, leaf) for leaf in tree_leaves(kwargs)]
        origins = [(i, self._origin(t)) for i, t in operands]
        factors = _MATRIX_OPERANDS.get(op, {})
        for (position, operand), (_, pid) in zip(operands, origins):
            if pid is None:
                continue
            if op in _COPIES:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                        self.source.setdefault(t.untyped_storage().data_ptr(), pid)
                        self.keep.append(t)
                continue
            if pid not in self.free:
                continue
            side = factors.get(position)
            matrix = side is not None
            feeds = next(
                (self.weights[other] for i, other in origins
                 if other in self.weights and i != position and i in factors),
                None,
            )
            p = self.free[pid]
            layout = None
            if side == "conv":
                layout = _conv_layout(bool(args[6]), p.ndim, int(args[8]))
            elif matrix:
                layout = _product_layout(p, operand, side)
            uses = self.seen.uses.setdefault(pid, [])
            if matrix and feeds is None and not any(u.matrix and u.feeds is None for u in uses):
                self.seen.order.append(p)
            uses.append(_Use(op, matrix, layout, feeds))
        return out


def _observe(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    free: dict[int, nn.Parameter],
    weights: dict[int, str],
) -> _Observation:
    """One forward pass (eval mode, no grad): execution order of the known layers and of the free
    parameters used as matrices, and every use of each free parameter."""
    seen = _Observation()
    visited: set[int] = set()

    def record(module: nn.Module, _inputs: Any) -> None:
        if id(module) not in visited:
            visited.add(id(module))
            seen.order.append(module)

    layers = [m for m in model.modules() if isinstance(m, _EMBEDDINGS) or _is_weight_layer(m)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    recorder = _UseRecorder(free, weights, seen)
    params = {id(p): p for p in model.parameters()}
    for pid in (*free, *weights):
        recorder.watch(params[pid])
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recorder:
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(*example_inputs)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    return seen


# ------------------------------------------------------------------------------ weight decay

def _no_decay_names(model: nn.Module) -> dict[str, str]:
    """{entry: the module whose no_weight_decay() listed it} over every module of the model, each
    entry made a full name by its module's prefix (timm's convention, read on every module)."""
    entries: dict[str, str] = {}
    for prefix, module in model.named_modules():
        listing = getattr(module, "no_weight_decay", None)
        if listing is None:
            continue
        where = f"{prefix}.no_weight_decay()" if prefix else "model.no_weight_decay()"
        if not callable(listing):
            raise TypeError(f"{where}: no_weight_decay must be a method returning parameter names, got {listing!r}")
        names = listing()
        if isinstance(names, str) or not isinstance(names, Collection):
            raise TypeError(f"{where} must return a collection of names, got {names!r}")
        for entry in names:
            if not isinstance(entry, str):
                raise TypeError(f"{where} returned {entry!r}; expected parameter names (str)")
            if entry:
                entries.setdefault(f"{prefix}.{entry}" if prefix else entry, where)
    return entries


def _listed(name: str, entries: dict[str, str]) -> str | None:
    """Which no_weight_decay() lists `name`: as a name, an fnmatch pattern, or a module prefix."""
    for entry, where in entries.items():
        if name == entry or name.startswith(entry + ".") or fnmatch.fnmatchcase(name, entry):
            return where
    return None


# ----------------------------------------------------------------------------------- routing

def route(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    min_size: int = 2,
    exclude_from_decay: bool = True,
) -> list[Decision]:
    """Decide Muon or AdamW for every parameter of `model`, with a reason for each.

    Rules, first match wins: names in `muon=` / `adamw=`; the predicate; 0D/1D -> AdamW;
    embeddings and weights tied to them -> AdamW; the output layer and the input stem -> AdamW;
    a matrix view with a side < min_size -> AdamW; Linear/Conv/ConvTranspose/transformers Conv1D/
    MultiheadAttention projection weights -> Muon; free parameters -> Muon when example_inputs
    show them consumed only as matrix-product or convolution operands, else AdamW.

    Args:
        muon, adamw: parameter names forced to that optimizer (they win over everything).
        predicate: (name, param, module) -> "muon" | "adamw" | a muonkit.Layout (Muon with that
            matrix view) | ("muon", layout) | None; None falls through to the role-based rules.
        example_inputs: the positional inputs (a tuple) or keyword inputs (a dict) of one forward
            pass, run in eval mode without grad. It records which layer reads the input first and
            which produces the output last, and how free parameters are used. Without it,
            registration order (the order of model.modules()) stands in for execution order and
            free parameters go to AdamW.
        min_size: matrices whose matrix view has a side shorter than this go to AdamW.
        exclude_from_decay: True (default): 0D/1D parameters and the names a module lists in its
            `no_weight_decay()` method (timm's convention: names, fnmatch patterns or module
            prefixes, relative to that module) get weight_decay 0 (Decision.no_decay says why).
            False: every parameter gets its group's weight decay.

    Example:
        >>> for d in muonkit.route(model, example_inputs=(x,)):
        ...     print(d.name, d.optimizer, d.reason)
    """
    unknown = (set(muon) | set(adamw)) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no parameters named {sorted(unknown)} in the model")
    both = set(muon) & set(adamw)
    if both:
        raise ValueError(f"parameters {sorted(both)} are named in both muon= and adamw=")
    if isinstance(example_inputs, torch.Tensor) or not (
        example_inputs is None or isinstance(example_inputs, (Sequence, Mapping))
    ):
        raise TypeError(
            "example_inputs must be a tuple of positional inputs (e.g. (x,)) or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}"
        )

    owner: dict[int, tuple[str, nn.Module]] = {}
    owners_of: dict[int, list[nn.Module]] = {}
    known: dict[int, _Known] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local_name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module_name, module))
            owners_of.setdefault(id(p), []).append(module)
            role = _known_weight(module, local_name, p)
            if role is not None:
                known.setdefault(id(p), role)
    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDINGS)
    }
    names_of = {id(p): n for n, p in model.named_parameters()}
    free = {id(p): p for p in model.parameters() if p.ndim >= 2 and id(p) not in known}

    uses: dict[int, list[_Use]] | None = None
    if example_inputs is not None:
        weights = {pid: names_of[pid] for pid in known}
        seen = _observe(model, example_inputs, free, weights)
        order, uses = seen.order, seen.uses
        order_source = "in the forward pass"
    else:
        order = [m for m in model.modules() if isinstance(m, _EMBEDDINGS) or _is_weight_layer(m)]
        order_source = "in registration order"
    first = order[0] if order and not isinstance(order[0], _EMBEDDINGS) else None
    last = order[-1] if order and not isinstance(order[-1], _EMBEDDINGS) else None
    no_decay_entries = _no_decay_names(model) if exclude_from_decay else {}

    decisions = []
    for name, p in model.named_parameters():
        module_name, module = owner[id(p)]
        shape = tuple(p.shape)
        if not p.requires_grad:
            decisions.append(Decision(name, shape, "frozen", "requires_grad=False: not optimized"))
            continue
        units = owners_of[id(p)] + [p]
        rule = _Rule(
            name=name, p=p, module=module,
            known=known.get(id(p)),
            uses=None if uses is None or id(p) not in free else uses.get(id(p), []),
            tied_to=embedding_weights.get(id(p)) if not isinstance(module, _EMBEDDINGS) else None,
            is_stem=any(u is first for u in units),
            is_output=any(u is last for u in units),
            order_source=order_source,
        )
        choice, reason, layout = rule.decide(muon=muon, adamw=adamw, predicate=predicate, min_size=min_size)
        no_decay = None
        if exclude_from_decay:
            no_decay = f"{p.ndim}D" if p.ndim < 2 else _listed(name, no_decay_entries)
        decisions.append(Decision(name, shape, choice, reason, layout if choice == "muon" else None, no_decay))
    return decisions


@dataclass
class _Rule:
    """Everything known about one parameter, and the rules that decide it."""

    name: str
    p: nn.Parameter
    module: nn.Module
    known: _Known | None
    uses: list[_Use] | None
    """How the forward pass used a free parameter; None without example_inputs or when not free."""
    tied_to: str | None
    is_stem: bool
    is_output: bool
    order_source: str

    @property
    def default_layout(self) -> LayoutSpec:
        if self.known is not None:
            return self.known.layout
        matrix_uses = [u for u in self.uses or () if u.matrix and u.layout is not None]
        return matrix_uses[0].layout if matrix_uses else "stacked"

    def decide(
        self, *, muon: Collection[str], adamw: Collection[str], predicate: Predicate | None, min_size: int
    ) -> tuple[Choice, str, LayoutSpec]:
        name, p = self.name, self.p
        shape = tuple(p.shape)
        if name in muon:
            if p.ndim < 2:
                raise ValueError(f"'{name}' has shape {shape}; only matrices can go to Muon")
            return "muon", "named in muon=", self.default_layout
        if name in adamw:
            return "adamw", "named in adamw=", None
        if predicate is not None:
            decided = self._from_predicate(predicate(name, p, self.module))
            if decided is not None:
                return decided
        kind = type(self.module).__name__
        if p.ndim == 0:
            return "adamw", "scalar (0D)", None
        if p.ndim == 1:
            role = "norm gain or shift" if isinstance(self.module, _NORMS) else "bias or scale vector"
            return "adamw", f"1D {role} of {kind}", None
        if self.known is not None and self.known.what == "embedding":
            return "adamw", f"embedding ({kind}): a lookup table, not a dense linear map", None
        if self.tied_to is not None:
            return "adamw", f"tied to embedding '{self.tied_to}'", None
        if self.known is None:
            verdict = self._free()
            if verdict is not None:
                return "adamw", verdict, None
        if self.is_output:
            return "adamw", f"output layer: the last {kind} {self.order_source}", None
        if self.is_stem:
            return "adamw", f"input stem: the first {kind} {self.order_source}", None
        layout = self.default_layout
        batch, rows, cols = matrix_shape(p.shape, resolve(layout, p.ndim))
        view = f"{batch} matrices {rows}x{cols}" if batch > 1 else f"{rows}x{cols}"
        if min(rows, cols) < min_size:
            what = f"{self.known.what}: " if self.known is not None else ""
            reading = self.known.reading if self.known is not None else ""
            return "adamw", f"{what}matrix view {view}{reading} too small to orthogonalize (side < {min_size})", None
        if self.known is not None:
            return "muon", f"hidden {self.known.what} {view}{self.known.reading}", layout
        ops = sorted({f"aten.{u.op}" for u in self.uses or ()})
        if any(u.op == "convolution" for u in self.uses or ()):
            reading = "a conv filter (out x in/groups*kernel; per group when transposed)"
        elif isinstance(layout, Layout):
            reading = "stored (..., in, out)"
        else:
            reading = "read as (..., out, in)"
        return "muon", (f"free parameter of {kind}, a matrix operand of {', '.join(ops)} "
                        f"{self.order_source}: {view}, {reading}"), layout

    def _free(self) -> str | None:
        """The AdamW reason of a free parameter that is not used as a matrix, else None."""
        kind = type(self.module).__name__
        how_to = (f"send it to Muon with muon=['{self.name}'], a predicate, or example_inputs "
                  "that show it consumed as a matrix product operand")
        if self.uses is None:
            return (f"free parameter of {kind}: not a layer's weight, and without example_inputs "
                    f"muonkit cannot tell a matrix from a table or an offset; {how_to}")
        if not self.uses:
            return f"free parameter of {kind}, not used by the forward pass over example_inputs; {how_to}"
        fed = next((u for u in self.uses if u.feeds is not None), None)
        if fed is not None:
            return (f"free parameter of {kind}, the input of a matrix product with '{fed.feeds}' "
                    f"(aten.{fed.op}): data such as learned tokens, not a weight")
        other = next((u for u in self.uses if not u.matrix), None)
        if other is not None:
            return (f"free parameter of {kind}, used by aten.{other.op} in the forward pass (added, "
                    "concatenated, indexed or multiplied elementwise): not a linear map")
        return None

    def _from_predicate(self, result: PredicateResult) -> tuple[Choice, str, LayoutSpec] | None:
        name, shape = self.name, tuple(self.p.shape)
        if result is None:
            return None
        if result == "adamw":
            return "adamw", "chosen by predicate", None
        if result == "muon":
            layout, how = self.default_layout, "chosen by predicate"
        elif isinstance(result, Layout):
            layout = result
        elif isinstance(result, tuple) and len(result) == 2 and result[0] == "muon":
            layout = result[1]
        else:
            raise ValueError(
                f"predicate returned {result!r} for '{name}'; expected 'muon', 'adamw', a muonkit.Layout, "
                "('muon', layout) or None"
            )
        if self.p.ndim < 2:
            raise ValueError(f"predicate sent '{name}' with shape {shape} to Muon; only matrices can go")
        try:
            resolved = resolve(layout, self.p.ndim)
            resolved.check_shape(self.p.shape)
        except ValueError as err:
            raise ValueError(f"predicate gave '{name}' with shape {shape} the layout {layout!r}: {err}") from None
        if result != "muon":
            batch, rows, cols = matrix_shape(self.p.shape, resolved)
            how = f"chosen by predicate: {batch} matrices {rows}x{cols} with layout {layout!r}"
        return "muon", how, layout


# ------------------------------------------------------------------------------ param groups

def param_groups(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    min_size: int = 2,
    exclude_from_decay: bool = True,
    muon_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for muonkit.Muon: Muon groups by matrix layout, AdamW groups, split by decay.

    Returns plain dicts ({"params", "param_names", "use_muon", ...}) that can be printed, edited
    and passed to muonkit.Muon as they are. `muon_options` / `adamw_options` are merged into the
    Muon / AdamW groups (e.g. {"lr": 0.02}). Parameters that are not decayed (see `route`'s
    `exclude_from_decay`) sit in groups of their own with "weight_decay": 0.0, which neither the
    options nor Muon(weight_decay=...) change; the other groups take the weight decay of the options
    or of Muon's constructor.

    Example:
        >>> opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-3, weight_decay=0.1)
    """
    decisions = route(
        model, muon=muon, adamw=adamw, predicate=predicate,
        example_inputs=example_inputs, min_size=min_size, exclude_from_decay=exclude_from_decay,
    )
    params = dict(model.named_parameters())
    groups: dict[Any, dict[str, Any]] = {}
    for d in decisions:
        if d.optimizer == "frozen":
            continue
        decayed = d.no_decay is None
        key = ("muon", d.layout, decayed) if d.optimizer == "muon" else ("adamw", decayed)
        if key not in groups:
            extra = (muon_options if d.optimizer == "muon" else adamw_options) or {}
            group: dict[str, Any] = {"params": [], "param_names": [], "use_muon": d.optimizer == "muon"}
            if d.optimizer == "muon":
                group["layout"] = d.layout
            group.update(extra)
            if not decayed:
                group["weight_decay"] = 0.0
            groups[key] = group
        groups[key]["params"].append(params[d.name])
        groups[key]["param_names"].append(d.name)
    return list(groups.values())


def format_table(decisions: Sequence[Decision]) -> str:
    """The routing table: name, shape, optimizer, decay, reason, and a summary line."""
    header = ("Parameter name", "Shape", "Optimizer", "Decay", "Reason")
    rows = [
        (d.name, str(list(d.shape)), {"muon": "Muon", "adamw": "AdamW"}.get(d.optimizer, "-"),
         "-" if d.optimizer == "frozen" else "default" if d.no_decay is None else f"0 ({d.no_decay})",
         d.reason)
        for d in decisions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + f"  {r[4]}"  # noqa: E731
    body = [line(header), "-" * (sum(widths) + 8 + len(header[4]))] + [line(r) for r in rows]
    counts: dict[str, tuple[int, int]] = {}
    for d in decisions:
        n, c = counts.get(d.optimizer, (0, 0))
        counts[d.optimizer] = (n + 1, c + int(torch.Size(d.shape).numel()))
    summary = ", ".join(f"{k}: {n} tensors, {c:,} values" for k, (n, c) in sorted(counts.items()))
    note = ("Decay: 'default' is the weight_decay of the parameter's group (Muon(weight_decay=...), "
            "adamw_weight_decay=, or muon_options/adamw_options); '0 (...)' groups keep weight_decay 0.")
    return "\n".join(body + [summary, note])


def _low_precision_note(model: nn.Module) -> str:
    """A line on how muonkit.Muon writes 16-bit parameters, when the model has any."""
    low = [p for p in model.parameters() if p.requires_grad and p.is_floating_point() and p.dtype.itemsize < 4]
    if not low:
        return ""
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in low}))
    return (f"\n{len(low)} trainable tensors are {dtypes}: muonkit.Muon writes them by stochastic rounding of the "
            "float32 update by default (stochastic_rounding=False for round-to-nearest) and keeps their state in "
            "their own dtype unless state_dtype=torch.float32.")


def explain(
    model: nn.Module,
    *,
    file: TextIO | None = sys.stdout,
    **routing: Any,
) -> str:
    """Print (to `file`, unless None) and return the routing table of `model`.

    Takes the same keyword arguments as `route`.

    Example:
        >>> muonkit.explain(model, example_inputs=(x,))
    """
    text = format_table(route(model, **routing)) + _low_precision_note(model)
    if file is not None:
        print(text, file=file)
    return text


ROUTING_KEYWORDS = tuple(
    name for name, prm in inspect.signature(param_groups).parameters.items() if prm.kind is prm.KEYWORD_ONLY
)
"""The keyword arguments of param_groups (muonkit.MuonFactory tells them from Muon's)."""
