"""Muon's variants as objects: what state each keeps and how it turns the orthogonalized update O
into the applied update H. The step driver (muonkit.functional) calls these and names none.

Adding a variant is one class here and one line in VARIANTS. A variant declares:

- `second_moment_shape(shape, layout)`: the shape of its per-parameter `second_moment` state, or
  None when it keeps none;
- `signs_input`: whether it orthogonalizes sign(U) instead of the momentum update U;
- `transform(O, v, beta2, eps)`: (H, new second moment) from O's (batch, rows, cols) matrices;
- `accumulates`: whether its momentum is a plain sum M <- M + G (then U = M, and `momentum` and
  `nesterov` are not read) rather than Muon's M <- beta M + (1 - beta) G;
- `selects` and `select(M, fraction)`: None (every matrix whole), or the `Selection` of the rows
  or columns of each (batch, rows, cols) matrix of M that the step orthogonalizes and updates; the
  driver orthogonalizes and transforms only those slices (and the second moment's matching rows),
  and multiplies the selected slices of M by `ef_decay` (error feedback). On an FSDP2-sharded
  parameter whose ranks hold blocks of rows, the driver selects rows along the shard dimension
  instead, per block or over the whole matrix (`local_rows`, `global_rows`; option `selection`).

Its options (`beta2`, `variant_eps`, `fraction`, `ef_decay`, `selection`) are keys of every Muon group, checked by `check_options`
whatever the group's variant, so that switching a group's variant never meets an unchecked value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .layout import Layout

# The options every variant reads from its group, with their defaults (docs/references.md, NorMuon).
# Dion2's (docs/references.md, Dion2): the fraction of rows or columns each step orthogonalizes, the
# error-feedback decay of their momentum, and where the top rows are chosen under FSDP2 sharding.
OPTIONS: dict[str, Any] = {"beta2": 0.95, "variant_eps": 1e-10, "fraction": 0.25, "ef_decay": 0.95, "selection": "local"}

SELECTIONS = ("local", "global")


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def check_options(options: dict[str, Any], where: str) -> None:
    """ValueError naming `where` for an unknown variant or a bad beta2, variant_eps, fraction,
    ef_decay or selection."""
    if not isinstance(options["variant"], str) or options["variant"] not in VARIANTS:
        raise ValueError(f"{where}: unknown variant {options['variant']!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 <= _number(options["beta2"], "beta2", where) < 1.0:
        raise ValueError(f"{where}: beta2 must be in [0, 1), got {options['beta2']!r}")
    if _number(options["variant_eps"], "variant_eps", where) < 0:
        raise ValueError(f"{where}: variant_eps must be >= 0, got {options['variant_eps']!r}")
    if not 0.0 < _number(options["fraction"], "fraction", where) <= 1.0:
        raise ValueError(f"{where}: fraction must be in (0, 1], got {options['fraction']!r}")
    if not 0.0 <= _number(options["ef_decay"], "ef_decay", where) <= 1.0:
        raise ValueError(f"{where}: ef_decay must be in [0, 1], got {options['ef_decay']!r}")
    if not isinstance(options["selection"], str) or options["selection"] not in SELECTIONS:
        raise ValueError(f"{where}: selection must be one of {', '.join(SELECTIONS)}, got {options['selection']!r}")


@dataclass
class Selection:
    """The top slices of each matrix of a (batch, rows, cols) stack: rows (`dim` = -2) or columns
    (`dim` = -1), `indices` of shape (batch, k) (in no particular order)."""

    dim: int
    indices: Tensor

    def _index(self, X: Tensor) -> Tensor:
        if self.dim == -2:
            return self.indices.unsqueeze(-1).expand(*self.indices.shape, X.shape[-1])
        return self.indices.unsqueeze(-2).expand(X.shape[0], X.shape[-2], self.indices.shape[-1])

    def gather(self, X: Tensor) -> Tensor:
        """The selected slices of X, (batch, k, cols) or (batch, rows, k)."""
        return torch.gather(X, self.dim, self._index(X))

    def scatter(self, part: Tensor, into: Tensor) -> Tensor:
        """`into` with its selected slices replaced by `part` (out of place)."""
        return into.scatter(self.dim, self._index(into), part)

    def scaled(self, X: Tensor, factor: float) -> Tensor:
        """X with its selected slices multiplied by `factor` (out of place)."""
        index = self._index(X)
        return X.scatter(self.dim, index, torch.gather(X, self.dim, index) * factor)


def top_slices(M: Tensor, fraction: float, dim: int, count: int | None = None) -> Selection:
    """The ceil(fraction * n) slices along `dim` (of n) of each matrix with the largest L1 norms, or
    the top min(count, n) when `count` is given."""
    n = M.shape[dim]
    k = max(1, math.ceil(fraction * n)) if count is None else min(count, n)
    return Selection(dim, torch.topk(slice_norms(M, dim), k, dim=-1, sorted=False).indices)


def slice_norms(M: Tensor, dim: int) -> Tensor:
    """The L1 norm of each slice along `dim` of each matrix of a (batch, rows, cols) stack."""
    return torch.linalg.vector_norm(M, ord=1, dim=-1 if dim == -2 else -2)


# ------------------------------------------------------------ Dion2 on sharded parameters


@dataclass(frozen=True)
class Shard:
    """This rank's part of a parameter sharded along its dim 0 (FSDP2's or HSDP's Shard(0), on a
    mesh of any number of dims), as its matrix view sees it: `axis` "rows" (dim 0 is the view's
    first row axis: each block holds consecutive rows of every matrix); `sizes` the rows of each
    block in dim-0 order (the distinct pieces; a rank holding no row has an empty block), `rank`
    the block this rank holds, `blocks` the block of every group rank (None: block r on rank r),
    `columns` each group rank's range of columns of a 2-D parameter also cut along dim 1."""

    axis: str
    sizes: tuple[int, ...]
    rank: int
    # Per group rank, the index of the block it holds (None: one block per rank, in rank order);
    # replicas (HSDP) hold the same block and select the same rows.
    blocks: tuple[int, ...] | None = None
    # A 2-D parameter cut along dim 1 as well (FSDP2 over tensor parallel's Shard(1): each rank holds
    # a block of rows times a range of columns): per group rank, the index of its range of columns
    # (in dim-1 order); None when every rank holds all columns. Ranks holding the same block of rows
    # select the same rows, from L1 norms summed over the column ranges.
    columns: tuple[int, ...] | None = None

    def ranges(self, counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Per group rank, the (start, stop) dim-0 range of its block's `counts[block]` entries in
        the blocks' concatenation (dim-0 order)."""
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        blocks = self.blocks if self.blocks is not None else range(len(counts))
        return tuple((starts[b], starts[b + 1]) for b in blocks)

    def norm_ranges(self) -> tuple[tuple[int, int], ...]:
        """Per group rank, where its partial row norms go in a vector of (column ranges) x (rows):
        the rows of its block, offset by its column range's index times the rows (each column
        range's partial norms in their own stretch, summed afterwards; replicas write the same)."""
        rows = sum(self.sizes)
        columns = self.columns if self.columns is not None else (0,) * len(self.ranges(self.sizes))
        return tuple((c * rows + a, c * rows + b) for c, (a, b) in zip(columns, self.ranges(self.sizes)))


def shard_quota(rows: int, world: int, fraction: float) -> int:
    """Rows every rank selects from its block under selection="local": ceil(fraction * ceil(rows /
    world)), at least 1, the same on every rank (a shorter block gives all of its rows); microsoft/dion
    dion/dion2.py derives its per-rank count so, for a uniform exchange."""
    return max(1, math.ceil(fraction * -(-rows // world)))


def local_rows(M: Tensor, fraction: float, shard: Shard, norms: Tensor | None = None) -> tuple[Selection, tuple[int, ...]]:
    """selection="local" on a row-sharded parameter: the top `shard_quota` rows of this rank's
    block of each matrix (M: its (batch, block rows, cols) momentum; `norms`, if given, the L1 norms
    of the block's whole rows, (batch, block rows), for a rank holding some of the columns only),
    and how many rows each block selects. The step then orthogonalizes the union of the blocks' rows
    as one matrix."""
    quota = shard_quota(sum(shard.sizes), len(shard.sizes), fraction)
    counts = tuple(min(quota, size) for size in shard.sizes)
    if norms is None:
        return top_slices(M, fraction, -2, quota), counts
    return Selection(-2, torch.topk(norms, min(quota, norms.shape[-1]), dim=-1, sorted=False).indices), counts


def global_rows(norms: Tensor, fraction: float, shard: Shard) -> tuple[Selection, tuple[int, ...]]:
    """selection="global" on a row-sharded parameter with one matrix: the ceil(fraction * rows) rows
    of the whole matrix with the largest L1 norms (`norms`: every row's, gathered from all ranks,
    the same on every rank), as this rank's Selection of its block, and how many fall in each block."""
    rows = norms.shape[-1]
    chosen = torch.topk(norms.reshape(rows), max(1, math.ceil(fraction * rows)), sorted=False).indices
    edges = [0]
    for size in shard.sizes:
        edges.append(edges[-1] + size)
    counts = tuple(int(((chosen >= lo) & (chosen < hi)).sum()) for lo, hi in zip(edges, edges[1:]))
    mine = chosen[(chosen >= edges[shard.rank]) & (chosen < edges[shard.rank + 1])] - edges[shard.rank]
    return Selection(-2, mine.unsqueeze(0)), counts


class Variant:
    """Plain Muon: H = O, no second moment (Keller Jordan, 2024; docs/references.md, Muon)."""

    name: ClassVar[str] = "muon"
    signs_input: ClassVar[bool] = False
    accumulates: ClassVar[bool] = False
    selects: ClassVar[bool] = False  # whether `select` can return a Selection

    def second_moment_shape(self, shape: Sequence[int], layout: Layout) -> tuple[int, ...] | None:
        return None

    def select(self, M: Tensor, fraction: float) -> Selection | None:
        return None

    def transform(self, O: Tensor, second_moment: Tensor | None, *, beta2: float, eps: float) -> tuple[Tensor, Tensor | None]:
        return O, None


class _Normalized(Variant):
    """A variant that divides O by the root of a second moment of O and restores O's Frobenius norm:

        v <- beta2 v + (1 - beta2) q(O);   H = O / (sqrt(v) + eps);   H <- H ||O||_F / ||H||_F

    per matrix, with q(O) the subclass's `squares` of O*O. `second_moment` is not modified. Computed in the
    widest of O's and v's dtypes and float32; H comes out in O's dtype, v in its own.
    """

    def squares(self, squared: Tensor) -> Tensor:
        """q(O) from O*O (a temporary that the transform overwrites once v is formed)."""
        raise NotImplementedError

    def transform(self, O: Tensor, second_moment: Tensor | None, *, beta2: float, eps: float) -> tuple[Tensor, Tensor | None]:
        assert second_moment is not None
        # At least float32: in float16, eps = 1e-10 rounds to 0 and a zero row of O would give 0 / 0.
        given = O.dtype
        dtype = torch.promote_types(torch.promote_types(given, second_moment.dtype), torch.float32)
        O = O.to(dtype)
        squares = torch.mul(O, O)
        v = torch.lerp(second_moment.to(dtype), self.squares(squares), 1.0 - beta2)
        # v = 0 only where O is 0 (a zero row or entry); with eps = 0 that would be 0 / 0, so the
        # denominator is kept >= the smallest normal number (a no-op for any eps above it).
        denominator = v.sqrt().add_(eps).clamp_(min=torch.finfo(dtype).tiny)
        if torch.compiler.is_compiling():  # compile cannot trace out= into a strided tensor; it fuses instead
            H = O / denominator
        else:  # written over O*O, which is no longer read: one O-sized temporary fewer, the same bits
            H = torch.div(O, denominator, out=squares)
        norm_o = torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True)
        norm_h = torch.linalg.vector_norm(H, dim=(-2, -1), keepdim=True)
        # A zero O gives a zero H; the ratio is then 0 rather than 0 / 0.
        H.mul_(torch.where(norm_h > 0, norm_o / norm_h, torch.zeros_like(norm_h)))
        return H.to(given), v.to(second_moment.dtype)


class NorMuon(_Normalized):
    """One second moment per row of each matrix, q = the row means of O*O; starts at 0, no bias
    correction (Li et al., arXiv:2510.05491, and its official normuon.py; docs/references.md).

    The state has the parameter's shape with every column axis cut to its block count (1 when not
    cut), so that it reads through the same layout as a (batch, rows, 1) view and shards along
    dim 0 as the parameter does."""

    name = "normuon"

    def second_moment_shape(self, shape: Sequence[int], layout: Layout) -> tuple[int, ...] | None:
        ndim = len(shape)
        counts = {axis % ndim: count for axis, count in layout.blocks}
        cols = {a % ndim for a in layout.cols}
        return tuple(counts.get(a, 1) if a in cols else size for a, size in enumerate(shape))

    def squares(self, squared: Tensor) -> Tensor:
        return squared.mean(-1, keepdim=True)


class AdaMuon(_Normalized):
    """Orthogonalizes sign(U); one second moment per entry, q = O*O (Si et al., arXiv:2507.11005;
    docs/references.md)."""

    name = "adamuon"
    signs_input = True

    def second_moment_shape(self, shape: Sequence[int], layout: Layout) -> tuple[int, ...] | None:
        return tuple(shape)

    def squares(self, squared: Tensor) -> Tensor:
        return squared


class Dion2(Variant):
    """Orthogonalizes a fraction of each matrix's momentum (Ahn et al., arXiv:2512.16928, and the
    official microsoft/dion dion/dion2.py; docs/references.md, Dion2). Per matrix:

        M <- M + G;   S = the ceil(fraction k) rows, or columns, with the largest L1 norms, of the
        shorter side's k (rows when rows <= cols);   O_S = orthogonalize(M_S);   M_S <- ef_decay M_S;
        H = O_S on S and 0 elsewhere

    so that W decays whole and moves only on S. No second moment."""

    name = "dion2"
    accumulates = True
    selects = True

    def select(self, M: Tensor, fraction: float) -> Selection | None:
        return top_slices(M, fraction, -2 if M.shape[-2] <= M.shape[-1] else -1)


class NorDion2(NorMuon):
    """Dion2 with NorMuon's per-row normalization of the selected rows: always rows (whole rows
    keep the per-row second moment meaningful), and v updated on the selected rows only
    (microsoft/dion dion/nordion2.py; docs/references.md, Dion2)."""

    name = "nordion2"
    accumulates = True
    selects = True

    def select(self, M: Tensor, fraction: float) -> Selection | None:
        return top_slices(M, fraction, -2)


VARIANTS: dict[str, Variant] = {v.name: v for v in (Variant(), NorMuon(), AdaMuon(), Dion2(), NorDion2())}
