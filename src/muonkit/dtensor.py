"""DTensor helpers, the one place muonkit looks at torch.distributed.tensor.

Nothing here imports torch.distributed: a DTensor can only exist once torch.distributed.tensor
has been imported, so the checks look the module up in sys.modules, and with process_group=None
muonkit never touches torch.distributed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a torch.distributed.tensor.DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor sharded along a dim on some mesh dim (not a replicated one)."""
    return is_dtensor(t) and any(not p.is_replicate() for p in t.placements)  # type: ignore[attr-defined]


def placements_of(t: Tensor) -> tuple[tuple, ...]:
    """A DTensor's placements as plain data (muonkit.plan.Placement): ("R",) for Replicate(),
    ("S", dim) for Shard(dim), ("SS", dim, split_factor) for _StridedShard (FSDP2 over tensor
    parallelism). Raises ValueError for any other placement (Partial: a pending reduction)."""
    out = []
    for p in t.placements:  # type: ignore[attr-defined]
        if p.is_replicate():
            out.append(("R",))
        elif type(p).__name__ == "_StridedShard":  # its is_shard() is False (torch 2.13)
            out.append(("SS", p.dim % t.ndim, int(p.split_factor)))
        elif p.is_shard() and type(p).__name__ == "Shard":
            out.append(("S", p.dim % t.ndim))
        else:
            raise ValueError(f"placement {p!r} (of placements {tuple(t.placements)}) is not Replicate(), "  # type: ignore[attr-defined]
                             "Shard(dim) or _StridedShard(dim)")
    return tuple(out)


def local_parts(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor's local slice (a view: updating it updates the DTensor); other tensors as they are."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:  # no DTensor can exist (the step calls this for every list it reads)
        return list(tensors)
    kind = module.DTensor
    return [t.to_local() if isinstance(t, kind) else t for t in tensors]  # type: ignore[attr-defined]


def zeros_like_sharded(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype, *, rows: bool = False) -> Tensor:
    """Zeros of `shape` and `dtype` on p's device; a DTensor with p's mesh and placements when p is
    one, or with `rows=True` `row_placements(p)` (per-row state of p: cut as p's dim 0 is)."""
    if not is_dtensor(p):
        if tuple(shape) == tuple(p.shape):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import zeros

    placements = row_placements(p) if rows else p.placements  # type: ignore[attr-defined]
    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=placements)  # type: ignore[attr-defined]


def cut_mesh_dims(p: Tensor) -> tuple[int, ...]:
    """The mesh dims along which a DTensor is cut in a dim other than 0 (rowwise tensor parallelism's
    Shard(1)); () for other tensors. The ranks that differ from this one along those mesh dims only
    hold the same dim-0 indices, and together all of the other dims."""
    if not is_dtensor(p):
        return ()
    return tuple(i for i, q in enumerate(placements_of(p)) if q[0] != "R" and q[1] != 0)


def row_placements(p: Tensor) -> tuple:
    """Placements for state with one row per dim-0 index of the DTensor p (8-bit momentum's scales):
    p's own, but Replicate() on the mesh dims that cut p along another dim (`cut_mesh_dims`)."""
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    cut = cut_mesh_dims(p)
    if not cut:
        return placements
    from torch.distributed.tensor import Replicate, Shard

    def along_rows(q: Any) -> Any:
        if type(q).__name__ == "_StridedShard":
            return type(q)(0, split_factor=q.split_factor)
        return Shard(0) if q.is_shard() else q

    return tuple(Replicate() if i in cut else along_rows(q) for i, q in enumerate(placements))


def local_piece(p: Tensor) -> tuple:
    """This rank's piece of the DTensor p: per dim the global index ranges it holds, in its local
    tensor's order (muonkit.plan.pieces_of)."""
    mesh = p.device_mesh  # type: ignore[attr-defined]
    return _piece(tuple(p.shape), tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), placements_of(p),
                  mesh.get_rank())


@functools.lru_cache(maxsize=1024)
def _piece(shape: tuple[int, ...], mesh_shape: tuple[int, ...], ranks: tuple[int, ...], placements: tuple,
           rank: int) -> tuple:
    from .plan import pieces_of

    return pieces_of(shape, torch.tensor(ranks).view(mesh_shape), placements)[rank]


def distribute_like(p: Tensor, value: Tensor, *, rows: bool = False) -> Tensor:
    """`value`, a whole tensor that every rank holds alike (the state of an unsharded optimizer,
    loaded on every rank), as a DTensor placed as the DTensor `p` is (with `rows=True` as
    `row_placements(p)`, as per-row state is): each rank keeps its own piece of it (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    placements = row_placements(p) if rows else p.placements  # type: ignore[attr-defined]
    return distribute_tensor(value, p.device_mesh, placements, src_data_rank=None)  # type: ignore[attr-defined]
