"""The matrix view of a parameter: which axes are rows, which are columns, which are a batch.

Muon orthogonalizes matrices, and the "keller_jordan" and "mup" scales depend on which side is
fan_out. A general-purpose optimizer must not guess this from a shape (docs/references.md section 10,
peer 002), so the view is declared: by PyTorch's storage conventions (the default), or by an
explicit `Layout`.

Default views by number of dims:
    2D (out, in)                         -> one out x in matrix
    3D (batch, out, in)                  -> a batch of out x in matrices (experts, heads)
    4D/5D conv filter (out, in, *kernel) -> one out x (in * prod(kernel)) matrix
"conv" and "stacked" name the two conventions explicitly, for any number of dims >= 2 (a Conv1d
filter is 3D and needs "conv").

A Layout can also cut an axis into equal blocks, each block its own matrix: a fused qkv weight
(3 * heads * d_head, d) read per head, or a grouped convolution's filter read per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Axes of a tensor read as a batch of rows x cols matrices (rows = fan_out).

    Args:
        rows, cols, batch: the tensor axes (negative counts from the end) whose sizes multiply to
            the rows, the columns and the number of matrices. Every axis is named exactly once.
        blocks: (axis, count) pairs: that axis is cut into `count` equal consecutive blocks, and
            each block is a separate matrix (the block index is an outer batch axis, in the order
            the pairs are given, before `batch`). The axis keeps its role for the size of one block.

    Example:
        Layout(rows=(2,), cols=(1,), batch=(0,)) reads a (experts, in, out) tensor, stored
        transposed, as experts matrices of out x in.
        Layout(rows=(0,), cols=(1,), blocks=((0, 3 * heads),)) reads a fused (3 * heads * d_head, d)
        qkv weight as 3 * heads matrices of d_head x d; `Layout.per_block(3 * heads)` is the same.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    batch: tuple[int, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # Stored as tuples (hashable, comparable) whatever sequences were passed.
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "cols", tuple(self.cols))
        object.__setattr__(self, "batch", tuple(self.batch))
        object.__setattr__(self, "blocks", tuple(tuple(b) for b in self.blocks))

    @classmethod
    def per_block(cls, count: int, ndim: int = 2) -> "Layout":
        """An (out, in, *kernel) tensor whose out axis is cut into `count` blocks, each block the
        matrix (out / count) x (in * prod(kernel)): per-head attention weights, grouped convolutions."""
        return cls(rows=(0,), cols=tuple(range(1, ndim)), blocks=((0, count),))

    def check(self, ndim: int) -> None:
        """Raise ValueError unless this layout names every axis of an `ndim`-D tensor exactly once."""
        for axis in (*self.batch, *self.rows, *self.cols):
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise ValueError(f"{self}: axis {axis!r} is not an int")
        axes = sorted(a % ndim if -ndim <= a < ndim else a for a in (*self.batch, *self.rows, *self.cols))
        if axes != list(range(ndim)) or not self.rows or not self.cols:
            raise ValueError(
                f"{self} must name every axis of a {ndim}D tensor exactly once, with at least "
                "one row axis and one column axis"
            )
        seen = set()
        for block in self.blocks:
            if len(block) != 2:
                raise ValueError(f"{self}: blocks holds (axis, count) pairs, got {block!r}")
            axis, count = block
            if isinstance(axis, bool) or not (isinstance(axis, int) and -ndim <= axis < ndim) or axis % ndim in seen:
                raise ValueError(f"{self}: block axis {axis!r} is not a distinct axis of a {ndim}D tensor")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{self}: block count {count!r} of axis {axis} must be an int >= 1")
            seen.add(axis % ndim)

    def check_shape(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ValueError if a block count does not divide its axis of `shape`."""
        self.check(len(shape))
        for axis, count in self.blocks:
            if shape[axis] % count:
                raise ValueError(
                    f"{self}: axis {axis} of shape {tuple(shape)} has size {shape[axis]}, which {count} "
                    "blocks do not divide"
                )


# A Layout lives in its param group, so in the optimizer's state_dict; torch.load's default
# weights_only unpickler loads only allow-listed classes.
torch.serialization.add_safe_globals([Layout])

LayoutSpec = Union[None, Literal["conv", "stacked"], Layout]
LAYOUT_NAMES = ("conv", "stacked")


def resolve(spec: LayoutSpec, ndim: int) -> Layout:
    """The explicit Layout that a group's `layout` option means for a tensor with `ndim` dims."""
    if isinstance(spec, Layout):
        spec.check(ndim)
        return spec
    # A named (or default) layout of an ndim is one frozen Layout, made once: the step resolves
    # each parameter's layout every step. Not under torch.compile, which traces the plain path.
    memo = (spec is None or isinstance(spec, str)) and isinstance(ndim, int) and not torch.compiler.is_compiling()
    if memo:
        found = _RESOLVED.get((spec, ndim))
        if found is not None:
            return found
    layout = _resolve(spec, ndim)
    if memo:
        _RESOLVED[(spec, ndim)] = layout
    return layout


_RESOLVED: dict[tuple[str | None, int], Layout] = {}


def _resolve(spec: LayoutSpec, ndim: int) -> Layout:
    if ndim < 2:
        raise ValueError(f"a {ndim}D tensor is not a matrix")
    if spec is None:
        if ndim == 3:
            spec = "stacked"
        elif ndim in (2, 4, 5):
            spec = "conv"
        else:
            raise ValueError(
                f"no default matrix view for a {ndim}D tensor; declare layout='conv', "
                "layout='stacked' or a muonkit.Layout"
            )
    if spec == "conv":
        return Layout(rows=(0,), cols=tuple(range(1, ndim)))
    if spec == "stacked":
        return Layout(rows=(ndim - 2,), cols=(ndim - 1,), batch=tuple(range(ndim - 2)))
    raise ValueError(f"unknown layout {spec!r}; use 'conv', 'stacked' or a muonkit.Layout")


def _split(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[list[int], list[int]]:
    """The shape with every blocked axis cut into (count, size / count), and for each original axis
    the position of its within-block part in that shape; the block parts come first among its axes."""
    ndim = len(shape)
    counts = {axis % ndim: count for axis, count in layout.blocks}
    expanded: list[int] = []
    position = [0] * ndim
    for axis, size in enumerate(shape):
        if axis in counts:
            expanded.append(counts[axis])
            size //= counts[axis]
        position[axis] = len(expanded)
        expanded.append(size)
    return expanded, position


def matrix_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    """(number of matrices, rows, cols) of a tensor of `shape` read through `layout`."""
    view = _known_view(layout, shape)
    return view[1] if view is not None else _matrix_shape(shape, layout)


def _matrix_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    ndim = len(shape)
    counts = {axis % ndim: count for axis, count in layout.blocks}
    # Lists, not generators, inside math.prod: torch.compile traces a list without a graph break.
    size = lambda axes: math.prod([shape[a] // counts.get(a % ndim, 1) for a in axes])  # noqa: E731
    return size(layout.batch) * math.prod(list(counts.values())), size(layout.rows), size(layout.cols)


def _permutation(layout: Layout, shape: torch.Size | tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(the split shape, the order of its axes that puts blocks, batch, rows, cols first to last)."""
    ndim = len(shape)
    expanded, position = _split(shape, layout)
    blocks = [position[axis % ndim] - 1 for axis, _ in layout.blocks]
    order = blocks + [position[a % ndim] for a in (*layout.batch, *layout.rows, *layout.cols)]
    return expanded, order


# Each (layout, shape) a step reads, with its matrix shape, split shape and axis order, computed
# once: a step reads every parameter's view several times per step, and for small models that
# bookkeeping costs as much as the products (benchmarks/RESULTS.md, the seed notebook net). Keyed by
# the layout's id (the entry holds the layout, so the id is not reused while it is there); cleared
# when it holds _VIEWS_MAX entries. Not under torch.compile, which traces the plain path.
_VIEWS: dict[tuple[int, tuple[int, ...]], tuple[Layout, tuple[int, int, int], list[int], list[int], bool]] = {}
_VIEWS_MAX = 4096


def _known_view(layout: Layout, shape: torch.Size | tuple[int, ...]) -> tuple[Layout, tuple[int, int, int], list[int], list[int], bool] | None:
    """(layout, matrix shape, split shape, axis order, whether the view is a plain reshape) of
    `shape` read through `layout`; None under torch.compile or for a shape that is not a tuple."""
    if not isinstance(shape, tuple) or torch.compiler.is_compiling():
        return None
    key = (id(layout), shape)
    view = _VIEWS.get(key)
    if view is not None and view[0] is layout:
        return view
    expanded, order = _permutation(layout, shape)
    view = (layout, _matrix_shape(shape, layout), expanded, order,
            len(expanded) == len(shape) and order == list(range(len(order))))
    if len(_VIEWS) >= _VIEWS_MAX:
        _VIEWS.clear()
    _VIEWS[key] = view
    return view


def to_matrices(t: Tensor, layout: Layout) -> Tensor:
    """A (batch, rows, cols) view of t (a copy only when the layout permutes axes)."""
    view = _known_view(layout, t.shape)
    if view is not None:
        _, (batch, rows, cols), expanded, order, plain = view
        if plain:
            return t.reshape(batch, rows, cols)
    else:
        batch, rows, cols = _matrix_shape(t.shape, layout)
        expanded, order = _permutation(layout, t.shape)
    if len(expanded) != t.ndim:
        t = t.reshape(expanded)
    if order != list(range(len(order))):
        t = t.permute(order)
    return t.reshape(batch, rows, cols)


def from_matrices(m: Tensor, layout: Layout, shape: torch.Size) -> Tensor:
    """Inverse of to_matrices: a tensor of `shape` from (batch, rows, cols) matrices (a view when
    the layout neither permutes nor cuts axes, or when m's memory allows it)."""
    view = _known_view(layout, shape)
    expanded, order = (view[2], view[3]) if view is not None else _permutation(layout, shape)
    if order == list(range(len(order))):
        return m.reshape(shape)
    permuted = m.reshape([expanded[a] for a in order])
    inverse = [0] * len(order)
    for i, a in enumerate(order):
        inverse[a] = i
    return permuted.permute(inverse).reshape(shape)
