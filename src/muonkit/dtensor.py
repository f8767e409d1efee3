"""DTensor helpers, the one place muonkit looks at torch.distributed.tensor.

Nothing here imports torch.distributed: a DTensor can only exist once torch.distributed.tensor
has been imported, so the checks look the module up in sys.modules, and with process_group=None
muonkit never touches torch.distributed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

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
    return [t.to_local() if is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]


def zeros_like_sharded(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of `shape` and `dtype` on p's device; a DTensor with p's mesh and placements when p is one."""
    if not is_dtensor(p):
        if tuple(shape) == tuple(p.shape):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)  # type: ignore[attr-defined]
