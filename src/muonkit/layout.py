"""The matrix view of a parameter: which axes are rows, which are columns, which are a batch.

Muon orthogonalizes matrices, and the "keller_jordan" and "mup" scales depend on which side is
fan_out. A general-purpose optimizer must not guess this from a shape (seeds/002), so the view is
declared: by PyTorch's storage conventions (the default), or by an explicit `Layout`.

Default views by number of dims:
    2D (out, in)                         -> one out x in matrix
    3D (batch, out, in)                  -> a batch of out x in matrices (experts, heads)
    4D/5D conv filter (out, in, *kernel) -> one out x (in * prod(kernel)) matrix
"conv" and "stacked" name the two conventions explicitly, for any number of dims >= 2 (a Conv1d
filter is 3D and needs "conv").
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

    Example:
        Layout(rows=(2,), cols=(1,), batch=(0,)) reads a (experts, in, out) tensor, stored
        transposed, as experts matrices of out x in.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    batch: tuple[int, ...] = ()

    def check(self, ndim: int) -> None:
        axes = sorted(a % ndim if -ndim <= a < ndim else a for a in (*self.batch, *self.rows, *self.cols))
        if axes != list(range(ndim)) or not self.rows or not self.cols:
            raise ValueError(
                f"{self} must name every axis of a {ndim}D tensor exactly once, with at least "
                "one row axis and one column axis"
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


def matrix_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    """(number of matrices, rows, cols) of a tensor of `shape` read through `layout`."""
    size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
    return size(layout.batch), size(layout.rows), size(layout.cols)


def _permutation(layout: Layout, ndim: int) -> list[int]:
    return [a % ndim for a in (*layout.batch, *layout.rows, *layout.cols)]


def to_matrices(t: Tensor, layout: Layout) -> Tensor:
    """A (batch, rows, cols) view of t (a copy only when the layout permutes axes)."""
    batch, rows, cols = matrix_shape(t.shape, layout)
    perm = _permutation(layout, t.ndim)
    if perm != list(range(t.ndim)):
        t = t.permute(perm)
    return t.reshape(batch, rows, cols)


def from_matrices(m: Tensor, layout: Layout, shape: torch.Size) -> Tensor:
    """Inverse of to_matrices: a tensor of `shape` from (batch, rows, cols) matrices."""
    perm = _permutation(layout, len(shape))
    if perm == list(range(len(shape))):
        return m.reshape(shape)
    permuted = m.reshape([shape[a] for a in perm])
    inverse = [0] * len(perm)
    for i, a in enumerate(perm):
        inverse[a] = i
    return permuted.permute(inverse)
