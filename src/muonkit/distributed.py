"""Sharing Muon's orthogonalization across the ranks of a process group: who owns which matrix, and
the collectives. No math lives here; the owner of a matrix calls
`muonkit.functional.batched_orthogonalize` exactly as a single process would.

Two kinds of parameters, both handled in one exchange per Muon group and step:

- replicated (plain tensors, as under DDP, whose gradients are already averaged; or DTensors with
  placement Replicate()): every rank holds every full momentum update. Each parameter has one
  owner rank (`assign_owners`, balanced by Newton-Schulz FLOPs); the owner orthogonalizes it and
  one all_gather of a flat buffer per dtype hands every result to every rank.
- sharded (DTensors with placement Shard(0) on a 1D mesh, as made by FSDP2's `fully_shard`):
  every rank holds a dim-0 slice (possibly empty). One all_to_all sends every slice to the owner,
  which assembles the full tensor and orthogonalizes its matrix view; a second all_to_all returns
  the slices.

Equality with a single process: the owner runs the same kernels on the same data, so results are
bit-for-bit equal when the kernels also see the same memory alignment. CPU GEMM kernels give
alignment-dependent round-off for small matrices, so a parameter is owned on its own only when
gcd(rows, cols) is a multiple of 8 (then every matrix of a batch starts 64-byte aligned, in any
batch position, for 2-byte and wider dtypes); the parameters of any other matrix shape are owned
together, in the single process's batch order.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .dtensor import is_dtensor, is_sharded
from .functional import UpdateMany, local_update_many
from .layout import Layout, matrix_shape
from .orthogonalize import Orthogonalizer
from .variants import Variant

SUPPORTED = (
    "muonkit supports plain (replicated) tensors and DTensors on a 1D device mesh with placement "
    "Shard(0) (FSDP2's fully_shard default) or Replicate()"
)


def newton_schulz_flops(batch: int, rows: int, cols: int) -> float:
    """FLOPs of one quintic Newton-Schulz step on `batch` rows x cols matrices: batch (4 m^2 n + 2 m^3)
    with m = min(rows, cols), n = max(rows, cols) (docs/references.md section 3, leading order)."""
    m, n = min(rows, cols), max(rows, cols)
    return float(batch) * (4.0 * m * m * n + 2.0 * m**3)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that owns each item: largest cost first, each onto the least-loaded rank.

    Deterministic (ties: the earlier item first; among equally loaded ranks the one with fewer
    items, then the lower rank), so every rank computes the same assignment from the same costs. Greedy longest-processing-time scheduling: the busiest
    rank's load is at most 4/3 of the optimum (Graham, 1969), and at most the average load plus
    the largest cost.

    Example:
        >>> assign_owners([4.0, 3.0, 3.0, 2.0], 2)
        [0, 1, 1, 0]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for i, cost in enumerate(costs):
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"costs[{i}] must be a finite number >= 0, got {cost!r}")
    loads = [0.0] * world_size
    counts = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], counts[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
        counts[rank] += 1
    return owners


def shard_sizes(length: int, world_size: int) -> list[int]:
    """Dim-0 sizes of the slices of Shard(0) on `world_size` ranks (torch.chunk's split: ceil-sized
    slices, then the remainder, then empty ones). 33 rows on 2 ranks: [17, 16]; 3 on 4: [1, 1, 1, 0]."""
    chunk = -(-length // world_size) if length else 0
    return [max(0, min(chunk, length - r * chunk)) for r in range(world_size)]


@dataclass(frozen=True)
class _Entry:
    """One tensor of a step (a momentum update or a second moment): its full shape, its matrix
    view's size (for the cost), and its dim-0 slices if it is sharded."""

    shape: torch.Size  # the full tensor's shape
    batch: int
    rows: int
    cols: int
    dtype: torch.dtype
    slices: tuple[int, ...] | None  # dim-0 size on each rank; None when replicated

    @property
    def inner(self) -> int:
        return math.prod(self.shape[1:])


class DistributedOrthogonalizer:
    """Splits the orthogonalization of a Muon group's updates across the ranks of `process_group`.

    `Muon(..., process_group=pg)` creates one and calls `bind` on every step of every Muon group;
    the bound function maps the list of (batch, rows, cols) matrix views of the momentum updates
    (the same parameters, in the same order, on every rank) to their orthogonalized versions.

    Attributes:
        bytes_sent: bytes this rank has sent so far (all_gather counted as a ring: (W-1) times its
            padded buffer; all_to_all as the slices it sends to other ranks).
    """

    def __init__(self, process_group: Any) -> None:
        if not dist.is_available():
            raise RuntimeError("Muon(process_group=...) needs torch.distributed, which this PyTorch build lacks")
        if not dist.is_initialized():
            raise RuntimeError(
                "Muon(process_group=...) needs torch.distributed to be initialized: call "
                "torch.distributed.init_process_group(...) before creating the optimizer, or pass "
                "process_group=None to train on one process"
            )
        if process_group is dist.GroupMember.NON_GROUP_MEMBER:
            # What dist.new_group(ranks) returns on a process not in `ranks`.
            raise ValueError(
                "this process is not a member of Muon's process_group (dist.new_group returned "
                "GroupMember.NON_GROUP_MEMBER here); create the optimizer with process_group=None on "
                "processes outside the group, or with a group that contains this rank"
            )
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
                f"or device_mesh.get_group()), got {type(process_group).__name__}"
            )
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("this process is not a member of Muon's process_group")
        self.group = process_group
        self.rank = rank
        self.world_size = dist.get_world_size(process_group)
        self.bytes_sent = 0

    # ------------------------------------------------------------------------------ checks

    def check_param(self, p: Tensor, where: str) -> None:
        """Raise ValueError if `p` is a DTensor this class cannot orthogonalize; `where` names it."""
        if not is_dtensor(p):
            return
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1:
            raise ValueError(
                f"{where} is a DTensor on a {mesh.ndim}D device mesh (placements {placements}); {SUPPORTED}"
            )
        placement = placements[0]
        if not (placement.is_replicate() or (placement.is_shard() and placement.dim == 0)):
            raise ValueError(f"{where} is a DTensor with placement {placement!r}; {SUPPORTED}")
        mesh_ranks = mesh.mesh.flatten().tolist()
        group_ranks = dist.get_process_group_ranks(self.group)
        if mesh_ranks != group_ranks:
            raise ValueError(
                f"{where} is sharded over ranks {mesh_ranks}, but Muon's process_group has ranks "
                f"{group_ranks}; pass process_group=device_mesh.get_group()"
            )

    # ------------------------------------------------------------------------------ the step

    def bind(
        self,
        *,
        method: Orthogonalizer,
        steps: int,
        dtype: torch.dtype | None,
        params: Sequence[Tensor],
        variant: Variant | str,
        beta2: float = 0.95,
        eps: float = 1e-10,
        second_moments: Sequence[Tensor | None] | None = None,
    ) -> UpdateMany:
        """The `update_many` of one step's Muon group, split across the ranks.

        Each tensor's owner runs `functional.local_update_many` (orthogonalize the matrix views,
        then the variant's transform with the second moment) on the full tensor, exactly
        as a single process would; the second moments travel to the owner and back with it.

        Args:
            method, steps, dtype, variant, beta2, eps: passed to local_update_many on the owner rank.
            params: the parameters (DTensors when sharded) whose local momentum updates the bound
                function receives, in the same order on every rank.
            second_moments: the parameters' second-moment state tensors (DTensors when sharded).
        """
        local = local_update_many(method=method, steps=steps, dtype=dtype, variant=variant, beta2=beta2, eps=eps)
        moments = list(second_moments) if second_moments is not None else [None] * len(params)

        def update_many(
            tensors: Sequence[Tensor],
            states: Sequence[Tensor | None],
            layouts: Sequence[Layout],
            slices: Sequence[tuple[int, ...] | None] | None = None,
        ) -> tuple[list[Tensor], list[Tensor | None]]:
            given = list(slices) if slices is not None else [None] * len(tensors)
            entries = [self._entry(t, p, layout, n) for t, p, layout, n in zip(tensors, params, layouts, given)]
            state_entries = [
                None if s is None else self._entry(s, v, layout, n)
                for s, v, layout, n in zip(states, moments, layouts, given)
            ]
            return self._exchange(list(tensors), entries, list(states), state_entries, list(layouts), local)

        return update_many

    def all_true(self, flag: Tensor) -> Tensor:
        """Whether a boolean is true on every rank (one all_reduce)."""
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return value[0] > 0

    def gather_rows(self, tensors: Sequence[Tensor], sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Each tensor whole, from this rank's dim-0 slice of it (`sizes[i]`: its dim-0 size on
        every rank): one all_gather of a padded flat buffer per dtype (`_all_gather`'s pattern).
        Dion2's selection="global" gathers the row norms of sharded matrices with it."""
        out: list[Tensor] = [t for t in tensors]
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            items = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            inner = {i: math.prod(tensors[i].shape[1:]) for i in items}
            lengths = [sum(sizes[i][r] * inner[i] for i in items) for r in range(self.world_size)]
            length = max(lengths)
            buffer = torch.zeros(length, dtype=dtype, device=tensors[items[0]].device)
            if lengths[self.rank]:
                torch.cat([tensors[i].reshape(-1) for i in items], out=buffer[: lengths[self.rank]])
            gathered = torch.empty(self.world_size * length, dtype=dtype, device=buffer.device)
            dist.all_gather_single(gathered, buffer, group=self.group)
            self.bytes_sent += (self.world_size - 1) * length * buffer.element_size()
            pieces: dict[int, list[Tensor]] = {i: [] for i in items}
            for r in range(self.world_size):
                offset = r * length
                for i in items:
                    n = sizes[i][r] * inner[i]
                    pieces[i].append(gathered[offset : offset + n].view(sizes[i][r], *tensors[i].shape[1:]))
                    offset += n
            for i in items:
                out[i] = torch.cat(pieces[i])
        return out

    def _entry(self, local: Tensor, full: Tensor | None, layout: Layout, slices: tuple[int, ...] | None = None) -> _Entry:
        """`local` is this rank's part of `full` (a Shard(0) DTensor) or all of it; or, given
        `slices` (dim-0 sizes on every rank), this rank's slice of a tensor that is no parameter."""
        if slices is not None:
            if local.shape[0] != slices[self.rank]:
                raise RuntimeError(f"a slice of shape {tuple(local.shape)} on rank {self.rank}; expected {slices[self.rank]} rows")
            shape = torch.Size((sum(slices), *local.shape[1:]))
            return _Entry(shape, *matrix_shape(shape, layout), local.dtype, tuple(slices))
        if full is not None and is_sharded(full):
            slices = tuple(shard_sizes(full.shape[0], self.world_size))
            if tuple(local.shape) != (slices[self.rank], *full.shape[1:]):
                raise RuntimeError(
                    f"a tensor of shape {tuple(full.shape)} has a local slice of shape {tuple(local.shape)} on "
                    f"rank {self.rank}; Shard(0) should give {slices[self.rank]} rows (sizes {list(slices)})"
                )
            return _Entry(full.shape, *matrix_shape(full.shape, layout), local.dtype, slices)
        return _Entry(local.shape, *matrix_shape(local.shape, layout), local.dtype, None)

    def _owners(self, entries: Sequence[_Entry]) -> list[int]:
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault((e.rows, e.cols, e.dtype), []).append(i)
        items: list[list[int]] = []
        for (rows, cols, _), members in groups.items():
            if math.gcd(rows, cols) % 8 == 0:
                items.extend([i] for i in members)
            else:
                items.append(members)
        costs = [sum(newton_schulz_flops(entries[i].batch, entries[i].rows, entries[i].cols) for i in item) for item in items]
        owners = [0] * len(entries)
        for item, owner in zip(items, assign_owners(costs, self.world_size)):
            for i in item:
                owners[i] = owner
        return owners

    def _exchange(
        self,
        tensors: list[Tensor],
        entries: list[_Entry],
        states: list[Tensor | None],
        state_entries: list[_Entry | None],
        layouts: list[Layout],
        local: UpdateMany,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        if not tensors:
            return [], []
        device = tensors[0].device
        owners = self._owners(entries)
        n = len(entries)
        sharded = [i for i, e in enumerate(entries) if e.slices is not None]
        replicated = [i for i, e in enumerate(entries) if e.slices is None]
        with_state = [i for i, e in enumerate(state_entries) if e is not None]
        state_sharded = [i for i in with_state if state_entries[i].slices is not None]  # type: ignore[union-attr]
        state_replicated = [i for i in with_state if state_entries[i].slices is None]  # type: ignore[union-attr]
        full = self._gather_slices(tensors, entries, owners, sharded, device)
        full_states = self._gather_slices(states, state_entries, owners, state_sharded, device)  # type: ignore[arg-type]
        mine = [i for i in range(n) if owners[i] == self.rank]
        for i in mine:
            if entries[i].slices is None:
                full[i] = tensors[i]
            if i in state_replicated:
                full_states[i] = states[i]  # type: ignore[assignment]
        updates, new_states = local([full[i] for i in mine], [full_states.get(i) for i in mine], [layouts[i] for i in mine])
        results = dict(zip(mine, updates))
        state_results = {i: v for i, v in zip(mine, new_states) if v is not None}
        out: list[Tensor | None] = [None] * n
        state_out: list[Tensor | None] = [None] * n
        self._scatter_slices(results, entries, owners, sharded, out, device)
        self._scatter_slices(state_results, state_entries, owners, state_sharded, state_out, device)  # type: ignore[arg-type]
        self._all_gather(results, entries, owners, replicated, out, device)
        self._all_gather(state_results, state_entries, owners, state_replicated, state_out, device)  # type: ignore[arg-type]
        return out, state_out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ collectives

    def _gather_slices(
        self, tensors: list[Tensor], entries: list[_Entry], owners: list[int], sharded: list[int], device: torch.device
    ) -> dict[int, Tensor]:
        """all_to_all: every rank's slice of each sharded tensor to its owner; returns the owner's
        full tensors."""
        full: dict[int, Tensor] = {}
        for dtype in _dtypes(entries, sharded):
            items = [i for i in sharded if entries[i].dtype == dtype]
            sends = [[tensors[i] for i in items if owners[i] == dst] for dst in range(self.world_size)]
            owned = [i for i in items if owners[i] == self.rank]
            recv_sizes = [sum(entries[i].slices[src] * entries[i].inner for i in owned) for src in range(self.world_size)]
            received = self._all_to_all(sends, recv_sizes, dtype, device)
            pieces: dict[int, list[Tensor]] = {i: [] for i in owned}
            for src, buffer in enumerate(received):
                offset = 0
                for i in owned:
                    size = entries[i].slices[src] * entries[i].inner
                    pieces[i].append(buffer[offset : offset + size].view(_slice_shape(entries[i], src)))
                    offset += size
            for i in owned:
                full[i] = torch.cat(pieces[i])
        return full

    def _scatter_slices(
        self,
        results: dict[int, Tensor],
        entries: list[_Entry],
        owners: list[int],
        sharded: list[int],
        out: list[Tensor | None],
        device: torch.device,
    ) -> None:
        """all_to_all: each owner returns every rank its slice of each result of a sharded tensor."""
        for dtype in _dtypes(entries, sharded):
            items = [i for i in sharded if entries[i].dtype == dtype]
            owned = [i for i in items if owners[i] == self.rank]
            parts = {i: results[i].split(list(entries[i].slices)) for i in owned}
            sends = [[parts[i][dst] for i in owned] for dst in range(self.world_size)]
            recv_sizes = [
                sum(entries[i].slices[self.rank] * entries[i].inner for i in items if owners[i] == src)
                for src in range(self.world_size)
            ]
            received = self._all_to_all(sends, recv_sizes, dtype, device)
            for src, buffer in enumerate(received):
                offset = 0
                for i in items:
                    if owners[i] != src:
                        continue
                    shape = _slice_shape(entries[i], self.rank)
                    out[i] = buffer[offset : offset + shape.numel()].view(shape)
                    offset += shape.numel()

    def _all_gather(
        self,
        results: dict[int, Tensor],
        entries: list[_Entry],
        owners: list[int],
        replicated: list[int],
        out: list[Tensor | None],
        device: torch.device,
    ) -> None:
        """all_gather of one padded flat buffer per dtype: every owner's results to every rank."""
        for dtype in _dtypes(entries, replicated):
            items = [i for i in replicated if entries[i].dtype == dtype]
            sizes = [sum(entries[i].shape.numel() for i in items if owners[i] == r) for r in range(self.world_size)]
            length = max(sizes)
            own = [results[i].reshape(-1) for i in items if owners[i] == self.rank]
            buffer = torch.zeros(length, dtype=dtype, device=device)
            if own:
                torch.cat(own, out=buffer[: sizes[self.rank]])
            gathered = torch.empty(self.world_size * length, dtype=dtype, device=device)
            dist.all_gather_single(gathered, buffer, group=self.group)
            self.bytes_sent += (self.world_size - 1) * length * buffer.element_size()
            offsets = [r * length for r in range(self.world_size)]
            for i in items:
                r, n = owners[i], entries[i].shape.numel()
                out[i] = gathered[offsets[r] : offsets[r] + n].view(entries[i].shape)
                offsets[r] += n

    def _all_to_all(
        self, sends: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype, device: torch.device
    ) -> list[Tensor]:
        send_sizes = [sum(t.numel() for t in ts) for ts in sends]
        flat = [t.reshape(-1) for ts in sends for t in ts]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        self.bytes_sent += (sum(send_sizes) - send_sizes[self.rank]) * recv.element_size()
        return list(recv.split(recv_sizes))


def _dtypes(entries: Sequence[_Entry], indices: Sequence[int]) -> list[torch.dtype]:
    """The dtypes among `indices`, in an order every rank agrees on."""
    return sorted({entries[i].dtype for i in indices}, key=str)


def _slice_shape(entry: _Entry, rank: int) -> torch.Size:
    assert entry.slices is not None
    return torch.Size((entry.slices[rank], *entry.shape[1:]))


# ---------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save `model` and `optimizer` with torch.distributed.checkpoint, on every rank of the job.

    Keys are parameter names (get_state_dict), sharded DTensors are written slice by slice, so the
    checkpoint loads on any number of ranks, sharded or not (`load_checkpoint`). Works without an
    initialized process group too (one process).
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_ok():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path, no_dist=_no_dist())


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint written by `save_checkpoint` (on any number of ranks) into `model` and
    `optimizer`, resharding as needed.

    All or nothing: the checkpoint is read into copies of the model's and the optimizer's tensors
    (so a load needs that much extra memory for a moment) and applied only once every read has
    succeeded. Raises ValueError if it was written for a different model, RuntimeError naming the
    path if it cannot be read (a missing, truncated or corrupted file); in both cases `model` and
    `optimizer` are left as they were.
    """
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.utils._pytree import tree_map_only

    model_state, optim_state = get_state_dict(model, optimizer)
    # get_state_dict returns the live tensors, and dcp.load reads into the tensors it is given.
    staging = tree_map_only(Tensor, lambda t: t.detach().clone(), {"model": model_state, "optim": optim_state})
    _check_checkpoint(path, staging)
    try:
        with _one_process_ok():
            dcp.load(staging, checkpoint_id=path, no_dist=_no_dist())
    except CheckpointException as err:
        # A BaseException that `except Exception` would let through; every rank raises it.
        raise RuntimeError(
            f"cannot read checkpoint {os.fspath(path)!r}: {_first_failure(err)}; the model and optimizer "
            "are unchanged"
        ) from err
    set_state_dict(model, optimizer, model_state_dict=staging["model"], optim_state_dict=staging["optim"])


def _first_failure(err: Any) -> str:
    """One line for a CheckpointException: the first failing rank's exception."""
    for rank, (exc, _) in sorted(err.failures.items()):
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__} on rank {rank}: {first[0] if first else ''}"
    return str(err).strip().splitlines()[0]


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    # DCP warns whenever no process group is initialized, even with no_dist=True; one process is
    # a supported case here (train on W ranks, continue on one).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r} (expected a save_checkpoint directory)") from None
    except Exception as err:
        raise RuntimeError(f"cannot read the metadata of checkpoint {os.fspath(path)!r}: {err}") from err
    tensors = {key: md for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    saved = {key: tuple(md.size) for key, md in tensors.items()}
    expected = dict(_tensor_shapes(state))
    # Second moments are read as saved and judged by load_state_dict (through set_state_dict), so that
    # both load paths accept the same: the group's saved variant decides which one it keeps, another
    # variant's starts from zeros, and none is made fresh (sharded ones must still fit).
    for key in {*expected, *saved}:
        if not key.startswith("optim.state.") or not key.endswith(".second_moment") or saved.get(key) == expected.get(key):
            continue
        *path, last = key.split(".")
        try:
            holder = _parent(state, path)
        except KeyError:
            continue
        if is_dtensor(holder.get(last)):
            continue
        if key in saved:
            holder[last] = torch.empty(saved[key], dtype=tensors[key].properties.dtype)
            expected[key] = saved[key]
        else:
            del holder[last]
            del expected[key]
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [f"{key}: checkpoint {saved[key]}, model {expected[key]}" for key in expected if key in saved and saved[key] != expected[key]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append(f"not in this model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        if wrong:
            problems.append(f"different shapes: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was saved from a different model or optimizer: " + "; ".join(problems)
        )


def _parent(state: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """The dict that holds the entry at dotted `path` + one more key of a nested state dict (keys as
    DCP flattens them: a parameter's name holds dots itself, so the path is matched greedily)."""
    node: Any = state
    i = 0
    while i < len(path):
        for j in range(len(path), i, -1):
            key = ".".join(path[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(".".join(path))
    return node


def _tensor_shapes(state: Any, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    """(dotted key, full shape) of every tensor in a nested state dict, keyed as DCP flattens it."""
    if isinstance(state, Tensor):
        return [(prefix, tuple(state.shape))]
    if isinstance(state, dict):
        return [item for key, value in state.items() for item in _tensor_shapes(value, f"{prefix}.{key}" if prefix else str(key))]
    return []
