"""Sharing Muon's orthogonalization across the ranks of a process group or device mesh: the
collectives. Who owns which matrix and who sends what is muonkit.plan's (pure); no math lives here:
the owner of a matrix calls `muonkit.functional.local_update_many` exactly as a single process would.

Parameters may be plain tensors (replicated, as under DDP, whose gradients are already averaged) or
DTensors on a mesh of any number of dims whose ranks are the group's, with Replicate(), Shard(d)
and _StridedShard(d) placements: FSDP2 (Shard(0)), HSDP (Replicate(), Shard(0)), FSDP2 over tensor
parallelism (as `parallelize_module` then `fully_shard` make them), expert parallelism (stacked
experts sharded on the expert axis), and mixes of them in one group. Each matrix has one owner
among all ranks; the owner receives the pieces it lacks (each distinct piece once), assembles the
full tensor, orthogonalizes it, and returns every rank that holds a piece (replicas included) its
piece of the result: to the rank that sent the piece (in HSDP the owner's own replica), which
relays it to the piece's other holders (muonkit.plan.returns). A tensor sharded along batch axes
only (every rank holds whole matrices) is orthogonalized where it lives, with no exchange.

The exchange runs in buckets (muonkit.plan.BUCKET_BYTES): one all_to_all per bucket and wire dtype
brings the pieces to their owners, started while the previous bucket is orthogonalized, and one
returns the results; a bucket with pieces to relay is waited for once the next bucket's return is
started, and its relays' all_to_all started then; the others stay in flight until the step's last
bucket is done. Every rank issues the same collectives in the same order (the plan is the same on
every rank); each handle is kept with its buffers until it completes.

Equality with a single process: the owner runs the same kernels on the same data, so results are
bit-for-bit equal when the kernels also see the same memory alignment. CPU GEMM kernels give
alignment-dependent round-off for small matrices, so a parameter is owned on its own only when
gcd(rows, cols) is a multiple of 8 (then every matrix of a batch starts 64-byte aligned, in any
batch position, for 2-byte and wider dtypes); the parameters of any other matrix shape are owned
together, in the single process's batch order. With `exchange_dtype=torch.bfloat16` the pieces and
the results travel in bfloat16 (half the bytes); every holder of a piece, the owner included,
then applies the same rounded update.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .dtensor import is_dtensor, is_sharded, placements_of, zeros_like_sharded
from .functional import UpdateMany, local_update_many
from .layout import Layout, matrix_shape
from .orthogonalize import Orthogonalizer
from .plan import (
    BUCKET_BYTES,
    ExchangePlan,
    Piece,
    Spec,
    assign_owners,
    blocks,
    build_plan,
    full_piece,
    holders,
    is_local,
    newton_schulz_flops,
    piece_numel,
    piece_shape,
    pieces_of,
    returns,
    shard_sizes,
)
from .variants import Variant

__all__ = ["DistributedOrthogonalizer", "assign_owners", "newton_schulz_flops", "shard_sizes", "save_checkpoint",
           "load_checkpoint"]

SUPPORTED = (
    "muonkit supports plain (replicated) tensors and DTensors with placements Replicate(), Shard(dim) or "
    "_StridedShard(dim) on a device mesh of any number of dims whose ranks are the process group's"
)
PLANS_KEPT = 16  # plans cached per optimizer (one per group and set of stepping parameters, usually)
EXCHANGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def process_group_of(process_group: Any) -> tuple[Any, Any]:
    """(the ProcessGroup, the DeviceMesh or None) of Muon's `process_group=` argument: a ProcessGroup
    as it is; a 1D DeviceMesh's group; an N-D mesh's ranks as one group (the default group when the
    mesh spans every rank, else the mesh flattened)."""
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    if mesh_module is None or not isinstance(process_group, mesh_module.DeviceMesh):
        return process_group, None
    mesh = process_group
    if mesh.get_coordinate() is None:
        raise ValueError("this process is not a member of Muon's device mesh; pass process_group=None here")
    if mesh.ndim == 1:
        return mesh.get_group(), mesh
    if sorted(mesh.mesh.flatten().tolist()) == list(range(dist.get_world_size())):
        return dist.group.WORLD, mesh
    return mesh._flatten().get_group(), mesh


class DistributedOrthogonalizer:
    """Splits the orthogonalization of a Muon group's updates across the ranks of `process_group`.

    `Muon(..., process_group=pg)` creates one and calls `bind` on every step of every Muon group;
    the bound function maps the list of momentum updates (the same parameters, in the same order,
    on every rank) to their orthogonalized versions. The plan of a step (muonkit.plan) is cached per
    group's shapes, placements, dtypes and layouts and rebuilt when any of them changes.

    Args:
        process_group: a ProcessGroup or a DeviceMesh (any number of dims).
        exchange_dtype: None (each tensor travels in its own dtype; equal to one process) or a
            16-bit dtype for the momentum updates and the results (half the bytes of float32).
        bucket_bytes: payload per bucket of the overlapped exchange.

    Attributes:
        bytes_sent: bytes this rank has sent to other ranks so far.
        plans_built: how many plans were built (a step that reuses its plan builds none).
    """

    def __init__(self, process_group: Any, exchange_dtype: torch.dtype | None = None,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        if not dist.is_available():
            raise RuntimeError("Muon(process_group=...) needs torch.distributed, which this PyTorch build lacks")
        if not dist.is_initialized():
            raise RuntimeError(
                "Muon(process_group=...) needs torch.distributed to be initialized: call "
                "torch.distributed.init_process_group(...) before creating the optimizer, or pass "
                "process_group=None to train on one process"
            )
        if exchange_dtype is not None and exchange_dtype not in EXCHANGE_DTYPES:
            raise ValueError(f"Muon: exchange_dtype must be None or one of {EXCHANGE_DTYPES}, got {exchange_dtype!r}")
        group, self.mesh = process_group_of(process_group)
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            # What dist.new_group(ranks) returns on a process not in `ranks`.
            raise ValueError(
                "this process is not a member of Muon's process_group (dist.new_group returned "
                "GroupMember.NON_GROUP_MEMBER here); create the optimizer with process_group=None on "
                "processes outside the group, or with a group that contains this rank"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
                f"or a DeviceMesh, got {type(process_group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of Muon's process_group")
        self.group = group
        self.rank = rank
        self.world_size = dist.get_world_size(group)
        self.ranks = dist.get_process_group_ranks(group)
        self.exchange_dtype = exchange_dtype
        self.bucket_bytes = bucket_bytes
        self.bytes_sent = 0
        self.plans_built = 0
        self._plans: dict[tuple, ExchangePlan] = {}
        self._meshes: dict[int, tuple[Any, Tensor]] = {}  # id(mesh) -> (mesh, _mesh_ranks(mesh))
        self._pieces: dict[tuple, tuple[Piece, ...]] = {}
        self._device: torch.device | None = None  # where this step's tensors live (the buffers' device)
        # muonkit.deferred: leave the relay phase in flight after the step (`relays`, oldest first).
        self.defer_relay = False
        self.relays: list[Relayed] = []

    # ------------------------------------------------------------------------------ checks

    def check_param(self, p: Tensor, where: str) -> None:
        """Raise ValueError if `p` is a DTensor this class cannot orthogonalize; `where` names it."""
        if not is_dtensor(p):
            return
        try:
            self._placed(p)
        except ValueError as err:
            raise ValueError(f"{where} is a DTensor {err}; {SUPPORTED}") from None

    def _placed(self, p: Tensor) -> tuple[int, tuple[tuple, ...]]:
        """(the id of p's mesh, p's placements on a mesh of all the group's ranks). A DTensor on a
        sub-mesh (FSDP2's dp mesh under tensor parallelism, for parameters left out of it; a
        flattened dim such as torchtitan's "dp_shard_cp") is replicated along the root mesh's other
        dims, which come first (`_mesh_ranks`)."""
        mesh = p.device_mesh  # type: ignore[attr-defined]
        try:
            placements = placements_of(p)
        except ValueError as err:
            raise ValueError(f"with {err}") from None
        if id(mesh) not in self._meshes:
            self._meshes[id(mesh)] = (mesh, self._mesh_ranks(mesh))
        ranks = self._meshes[id(mesh)][1]
        return id(mesh), (("R",),) * (ranks.ndim - len(placements)) + tuple(placements)

    def _mesh_ranks(self, mesh: Any) -> Tensor:
        """The group ranks of `mesh` as a tensor of shape (*other, *mesh.shape): `mesh` itself when
        its ranks are the group's; else every copy of the sub-mesh in its root mesh, along the
        leading dims (the root dims it does not use, along which its DTensors are replicated). A dim
        of the sub-mesh may span several root dims (a flattened dim: its coordinate runs over them
        row-major), found from the ranks themselves, so named and flattened dims read alike."""
        group = sorted(self.ranks)
        ranks = mesh.mesh
        if sorted(ranks.flatten().tolist()) != group:
            root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else None
            if root is None or root is mesh or sorted(root.mesh.flatten().tolist()) != group:
                raise ValueError(
                    f"on a device mesh of ranks {sorted(ranks.flatten().tolist())}, but Muon's process_group has ranks "
                    f"{group}; pass process_group=<the mesh> (Muon accepts a DeviceMesh of any number of dims) or its "
                    "group, or the root mesh whose sub-mesh it is"
                )
            ranks = _copies_of(ranks, root.mesh)
        flat = torch.tensor([dist.get_group_rank(self.group, g) for g in ranks.flatten().tolist()])
        return flat.view(ranks.shape)

    def agree(self, has_grad: Sequence[bool], finite: Tensor | None, device: torch.device) -> tuple[list[int], bool]:
        """One all_reduce: which parameters have a gradient on some ranks but not on all (their
        indices in `has_grad`), and whether every rank's gradients are finite (`finite` None: True)."""
        flags = torch.tensor([*(not h for h in has_grad), *has_grad, 0 if finite is None else int(not bool(finite))],
                             dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        n = len(has_grad)
        mixed = [i for i in range(n) if flags[i] and flags[n + i]]
        return mixed, not bool(flags[-1])

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
        layouts: Sequence[Layout] | None = None,
    ) -> UpdateMany:
        """The `update_many` of one step's Muon group, split across the ranks.

        Each tensor's owner runs `functional.local_update_many` (orthogonalize the matrix views,
        then the variant's transform with the second moment) on the full tensor, exactly
        as a single process would; the second moments travel to the owner and back with it.

        Args:
            method, steps, dtype, variant, beta2, eps: passed to local_update_many.
            params: the parameters (DTensors when sharded) whose local momentum updates the bound
                function receives, in the same order on every rank.
            second_moments: the parameters' second-moment state tensors (DTensors when sharded).
            layouts: the parameters' layouts (which axes are batch axes decides whether a sharded
                tensor holds whole matrices); None: the layouts the bound function gets.
        """
        local = local_update_many(method=method, steps=steps, dtype=dtype, variant=variant, beta2=beta2, eps=eps)
        moments = list(second_moments) if second_moments is not None else [None] * len(params)

        def update_many(
            tensors: Sequence[Tensor], states: Sequence[Tensor | None], views: Sequence[Layout],
            slices: Sequence[tuple[int, ...] | None] | None = None,
        ) -> tuple[list[Tensor], list[Tensor | None]]:
            if not tensors:
                return [], []
            own = list(layouts) if layouts is not None else list(views)
            plan = self.plan(tensors, states, params, moments, own, views, slices)
            return self._exchange(plan, list(tensors), list(states), list(views), local, params)

        return update_many

    def plan(self, tensors: Sequence[Tensor], states: Sequence[Tensor | None], params: Sequence[Tensor],
             moments: Sequence[Tensor | None], layouts: Sequence[Layout], views: Sequence[Layout],
             slices: Sequence[tuple[int, ...] | None] | None = None) -> ExchangePlan:
        """The cached plan of a step with these tensors (built when their shapes, placements, dtypes
        or layouts are new). `slices[i]`, if given, says tensor i (and its state) is this rank's
        dim-0 slice of a tensor that is no parameter, with one dim-0 size per group rank in rank
        order, or one (start, stop) dim-0 range per group rank (replicas hold equal ranges): the
        selected rows of a row-sharded parameter. They are part of the cache key."""
        rows = list(slices) if slices is not None else [None] * len(tensors)
        keys = [self._key(t, p, layout, view, self.exchange_dtype, r)
                for t, p, layout, view, r in zip(tensors, params, layouts, views, rows)]
        moment_keys = [None if s is None else self._key(s, v, layout, view, None, r)
                       for s, v, layout, view, r in zip(states, moments, layouts, views, rows)]
        key = (tuple(keys), tuple(moment_keys), self.defer_relay)
        plan = self._plans.get(key)
        if plan is None:
            specs = [self._spec(t, p, k) for t, p, k in zip(tensors, params, keys)]
            moment_specs = [None if s is None else self._spec(s, v, k, local=spec.local)  # type: ignore[arg-type]
                            for s, v, k, spec in zip(states, moments, moment_keys, specs)]
            plan = build_plan(specs, moment_specs, self.world_size, bucket_bytes=self.bucket_bytes,
                              owner_relays=self.defer_relay)
            if len(self._plans) >= PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
            self.plans_built += 1
        return plan

    def gather_rows(self, tensors: Sequence[Tensor], ranges: Sequence[Sequence[tuple[int, int]]]) -> list[Tensor]:
        """Each tensor whole, from this rank's dim-0 slice of it (`ranges[i]`: per group rank, the
        (start, stop) dim-0 range it holds; replicas hold equal ranges): one all_gather of a padded
        flat buffer per dtype. Dion2's selection="global" gathers the row norms of sharded matrices
        with it (a few bytes per row; not an owner exchange, so it is not part of the plan)."""
        out: list[Tensor] = list(tensors)
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            items = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            inner = {i: math.prod(tensors[i].shape[1:]) for i in items}
            lengths = [sum((ranges[i][r][1] - ranges[i][r][0]) * inner[i] for i in items) for r in range(self.world_size)]
            length = max(lengths)
            buffer = torch.zeros(length, dtype=dtype, device=tensors[items[0]].device)
            if lengths[self.rank]:
                torch.cat([tensors[i].reshape(-1) for i in items], out=buffer[: lengths[self.rank]])
            gathered = torch.empty(self.world_size * length, dtype=dtype, device=buffer.device)
            dist.all_gather_single(gathered, buffer, group=self.group)
            self.bytes_sent += (self.world_size - 1) * length * buffer.element_size()
            for i in items:
                whole = tensors[i].new_zeros((max(stop for _, stop in ranges[i]), *tensors[i].shape[1:]))
                out[i] = whole
            for r in range(self.world_size):
                offset = r * length
                for i in items:
                    start, stop = ranges[i][r]
                    n = (stop - start) * inner[i]
                    out[i][start:stop] = gathered[offset : offset + n].view(stop - start, *tensors[i].shape[1:])
                    offset += n
        return out

    def row_ranges(self, p: Tensor) -> tuple[tuple[int, int], ...]:
        """Per group rank, the (start, stop) range of dim 0 that rank holds of the DTensor `p`,
        from `muonkit.plan.pieces_of` (replicas hold equal ranges; a rank holding no row has an
        empty range). ValueError unless every rank holds one range of dim 0 and all of the other dims
        (FSDP2's and HSDP's Shard(0), on a mesh of any number of dims)."""
        ranges, columns = self.row_blocks(p)
        if columns is not None:
            raise ValueError(f"with placements {self._placed(p)[1]} cuts dim 1 as well (rank ranges {columns})")
        return ranges

    def row_blocks(self, p: Tensor) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...] | None]:
        """`row_ranges` of `p`, and for a 2-D `p` also cut along dim 1 (FSDP2 over tensor parallel's
        Shard(1)) per group rank the (start, stop) range of dim 1 it holds (None: every rank holds
        all of dim 1). ValueError unless every rank holds one range of dim 0 and, of a 2-D `p`, one
        range of dim 1 (of a larger one, all of its other dims)."""
        mesh_id, placements = self._placed(p)
        by_rank = pieces_of(tuple(p.shape), self._meshes[mesh_id][1], placements)
        rest = full_piece(p.shape[1:])
        ranges, columns = [], []
        for r in range(self.world_size):
            first, *others = by_rank[r]
            cut = tuple(others) != rest and piece_numel(by_rank[r])
            if cut and (p.ndim != 2 or len(others[0]) != 1):
                raise ValueError(f"with placements {placements} cuts dims other than dim 0 (rank {r} holds {by_rank[r]})")
            if len(first) > 1:
                raise ValueError(f"with placements {placements} gives rank {r} several ranges of dim 0: {first}")
            ranges.append(first[0] if first and piece_numel(by_rank[r]) else None)
            columns.append(others[0][0] if p.ndim == 2 and others[0] else (p.shape[-1], p.shape[-1]))
        if any(r is None for r in ranges) and any(r is not None for r in ranges):
            end = max(r[1] for r in ranges if r is not None)
            ranges = [(end, end) if r is None else r for r in ranges]
        whole = p.ndim != 2 or all(c == (0, p.shape[1]) for c, r in zip(columns, ranges) if r is not None and r[1] > r[0])
        return tuple(ranges), None if whole else tuple(columns)  # type: ignore[arg-type]

    def _key(self, t: Tensor, p: Tensor | None, layout: Layout, view: Layout, wire: torch.dtype | None,
             rows: tuple[int, ...] | None = None) -> tuple:
        """What a tensor's spec depends on: its local shape and dtype, its view, and for a sharded
        DTensor its full shape, placements and mesh (or the dim-0 sizes `rows` of its slices)."""
        placement = None
        if rows is not None:
            placement = ("rows", tuple(rows), self._columns(p))
        elif p is not None and is_sharded(p):
            mesh_id, placements = self._placed(p)
            placement = (tuple(p.shape), placements, mesh_id, is_local(p.shape, placements, layout))
        return (tuple(t.shape), t.dtype, wire or t.dtype, view, placement)

    def _columns(self, p: Tensor | None) -> tuple[tuple[tuple[int, int], ...], int] | None:
        """For a 2-D DTensor cut along dim 1 (a parameter or its second moment under tensor
        parallel's Shard(1)): per group rank the dim-1 ranges it holds, and dim 1's size; else None."""
        if p is None or p.ndim != 2 or not is_sharded(p):
            return None
        mesh_id, placements = self._placed(p)
        if not any(pl[0] != "R" and pl[1] == 1 for pl in placements):  # Shard(1) or _StridedShard(1)
            return None
        key = (tuple(p.shape), placements, mesh_id)
        if key not in self._pieces:
            by_rank = pieces_of(key[0], self._meshes[mesh_id][1], placements)
            self._pieces[key] = tuple(by_rank[r] for r in range(self.world_size))
        return tuple(piece[1] for piece in self._pieces[key]), p.shape[1]

    def _spec(self, t: Tensor, p: Tensor | None, key: tuple, *, local: bool | None = None) -> Spec:
        shape, _, wire, view, placement = key
        if placement is None:
            pieces = (full_piece(shape),) * self.world_size
            return Spec(shape, wire, pieces, *matrix_shape(shape, view), local=False)
        if placement[0] == "rows":
            ranges = _ranges(placement[1])
            columns = placement[2]
            full = (max(stop for _, stop in ranges), *shape[1:-1], shape[-1] if columns is None else columns[1])
            if len(ranges) != self.world_size or ranges[self.rank][1] - ranges[self.rank][0] != shape[0]:
                raise RuntimeError(f"dim-0 slices {placement[1]} do not fit a local part of shape {shape} on rank {self.rank}")
            rest = [full_piece(shape[1:])] * self.world_size
            if columns is not None:  # the rows (rows, 1, cols) of a 2-D tensor cut along dim 1: each rank's columns
                rest = [(*full_piece(shape[1:-1]), c) for c in columns[0]]
            pieces = tuple((((a, b),) if b > a else (), *other) for (a, b), other in zip(ranges, rest))
            if piece_shape(pieces[self.rank]) != tuple(shape) and shape[0]:
                raise RuntimeError(f"rows {placement} do not fit a local part of shape {shape} on rank {self.rank}")
            return Spec(full, wire, pieces, *matrix_shape(full, view), local=False)
        full, placements, mesh_id, whole = placement
        if local is None:
            local = whole
        if local and t.shape != p.to_local().shape:  # type: ignore[union-attr]
            # Expert parallel: whole matrices here; the pieces are the parameter's (for the loads), the
            # same on every rank. A selecting variant's part of them (fewer rows or columns of the same
            # matrices) is read as the parameter with those matrices, when its dim 0 is the parameter's.
            lead = p.to_local().shape[0]  # type: ignore[union-attr]
            full = (full[0], *shape[1:]) if len(shape) == len(full) and shape[0] == lead else tuple(full)
        cache_key = (full, placements, mesh_id)
        pieces = self._pieces.get(cache_key)
        if pieces is None:
            by_rank = pieces_of(full, self._meshes[mesh_id][1], placements)
            pieces = tuple(by_rank[r] for r in range(self.world_size))
            self._pieces[cache_key] = pieces
        if piece_shape(pieces[self.rank]) != tuple(t.shape) and not local:
            raise RuntimeError(
                f"a tensor of shape {full} with placements {placements} has a local part of shape {tuple(t.shape)} on "
                f"rank {self.rank}; muonkit.plan.pieces_of gives {piece_shape(pieces[self.rank])}"
            )
        return Spec(tuple(full), wire, pieces, *matrix_shape(full, view), local=local)

    # ------------------------------------------------------------------------------ the exchange

    def _exchange(
        self,
        plan: ExchangePlan,
        tensors: list[Tensor],
        states: list[Tensor | None],
        layouts: list[Layout],
        local: UpdateMany,
        params: Sequence[Tensor] = (),
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        n = len(tensors)
        self._device = tensors[0].device
        out: list[Tensor | None] = [None] * n
        state_out: list[Tensor | None] = [None] * n
        gathering = self._start_gather(plan, 0, tensors, states) if plan.buckets else None
        if plan.local:
            updates, new_states = local([tensors[i] for i in plan.local], [states[i] for i in plan.local],
                                        [layouts[i] for i in plan.local])
            for i, u, v in zip(plan.local, updates, new_states):
                out[i], state_out[i] = u, v
        in_flight: list[list] = []  # returns, waited for once the last bucket is done
        relays: dict[int, list] = {}  # bucket -> its relays, waited for after the returns (or later: `defer_relay`)
        relaying: tuple[int, list] | None = None  # a bucket whose returns its relays forward next
        for b, bucket in enumerate(plan.buckets):
            assert gathering is not None
            full, full_states = self._finish_gather(plan, bucket, gathering, tensors, states)
            gathering = self._start_gather(plan, b + 1, tensors, states) if b + 1 < len(plan.buckets) else None
            mine = [i for i in bucket if plan.owners[i] == self.rank]
            updates, new_states = local([full[i] for i in mine], [full_states.get(i) for i in mine],
                                        [layouts[i] for i in mine])
            results = dict(zip(mine, updates))
            state_results = {i: v for i, v in zip(mine, new_states) if v is not None}
            returned = self._start_return(plan, b, results, state_results, tensors, states, out, state_out)
            if relaying is not None:  # the previous bucket's relays forward what they received
                relays[relaying[0]] = self._relay(plan, *relaying, tensors, states, out, state_out)
                relaying = None
            if any(phase == "relay" for phase, _ in plan.traffic[b]):
                relaying = (b, returned)
            else:
                in_flight.append(returned)
        if relaying is not None:
            relays[relaying[0]] = self._relay(plan, *relaying, tensors, states, out, state_out)
        for handles in in_flight:
            self._finish_return(handles, out, state_out)
        if self.defer_relay and relays:
            # Left in flight: the entries this rank receives by relay stay None until `Relayed.wait`.
            self.relays.append(Relayed(self, relays, n, list(params)))
            return out, state_out  # type: ignore[return-value]
        for handles in relays.values():
            self._finish_return(handles, out, state_out)
        return out, state_out  # type: ignore[return-value]

    def _relay(self, plan: ExchangePlan, b: int, returned: list, tensors: list[Tensor], states: list[Tensor | None],
               out: list, state_out: list) -> list:
        """Wait for bucket b's returns and start its relays' forwarding."""
        relayed: dict[tuple[int, bool], Tensor] = {}
        self._finish_return(returned, out, state_out, relayed)
        if plan.owner_relays:  # the owners relay their own pieces, as the return would have sent them
            for i in plan.buckets[b]:
                if plan.owners[i] == self.rank:
                    for spec, _, _, _, is_update in self._payloads(plan, i, tensors, states):
                        relayed[(i, is_update)] = (out if is_update else state_out)[i].reshape(-1).to(spec.dtype)
        return self._start_relay(plan, b, relayed, tensors, states)

    def _payloads(self, plan: ExchangePlan, i: int, tensors: list[Tensor], states: list[Tensor | None]):
        """Tensor i's payloads: (its spec, the senders of its pieces, this rank's part, its dtype)."""
        yield plan.specs[i], plan.senders[i], tensors[i], tensors[i].dtype, True
        spec, state = plan.moments[i], states[i]
        if spec is not None and state is not None:
            yield spec, plan.moment_senders[i], state, state.dtype, False

    def _start_gather(self, plan: ExchangePlan, b: int, tensors: list[Tensor], states: list[Tensor | None]) -> list:
        """Start the all_to_alls that bring bucket b's pieces to their owners (one per wire dtype)."""
        me, bucket = self.rank, plan.buckets[b]
        sends: dict[torch.dtype, list[list[Tensor]]] = {}
        receives: dict[torch.dtype, list[list[tuple[int, bool, Piece]]]] = {}
        for i in bucket:
            owner = plan.owners[i]
            for spec, senders, part, _, is_update in self._payloads(plan, i, tensors, states):
                send = sends.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                receive = receives.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                if owner != me and senders.get(spec.pieces[me]) == me:
                    send[owner].append(part.reshape(-1).to(spec.dtype))
                if owner == me:
                    for piece, sender in senders.items():
                        receive[sender].append((i, is_update, piece))
        return self._all_to_alls(plan.traffic[b], "gather", sends, receives)

    def _finish_gather(self, plan: ExchangePlan, bucket: list[int], handles: list, tensors: list[Tensor],
                       states: list[Tensor | None]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Wait for bucket's pieces and assemble the full tensors this rank owns."""
        me = self.rank
        full: dict[int, Tensor] = {}
        full_states: dict[int, Tensor] = {}
        for i in bucket:
            if plan.owners[i] != me:
                continue
            for spec, _, part, dtype, is_update in self._payloads(plan, i, tensors, states):
                target = full if is_update else full_states
                if spec.pieces[me] == full_piece(spec.shape):
                    target[i] = part
                    continue
                target[i] = torch.empty(spec.shape, dtype=dtype, device=part.device)
                _insert_(target[i], spec.pieces[me], part)
        for work, _, received, layout in handles:
            work.wait()
            for src, entries in enumerate(layout):
                offset = 0
                buffer = received[src]
                for i, is_update, piece in entries:
                    size = piece_numel(piece)
                    target = full if is_update else full_states
                    _insert_(target[i], piece, buffer[offset : offset + size].view(piece_shape(piece)))
                    offset += size
        return full, full_states

    def _start_return(self, plan: ExchangePlan, b: int, results: dict[int, Tensor], state_results: dict[int, Tensor],
                      tensors: list[Tensor], states: list[Tensor | None], out: list, state_out: list) -> list:
        """Start the all_to_alls that send bucket b's results from their owners to the relays and to
        the replicas of the owners' own pieces (muonkit.plan.returns); this rank's own pieces of its
        results are written to `out` / `state_out` now."""
        me, bucket = self.rank, plan.buckets[b]
        sends: dict[torch.dtype, list[list[Tensor]]] = {}
        receives: dict[torch.dtype, list[list[tuple[int, bool, Piece]]]] = {}
        for i in bucket:
            owner = plan.owners[i]
            for spec, senders, part, dtype, is_update in self._payloads(plan, i, tensors, states):
                send = sends.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                receive = receives.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                target = out if is_update else state_out
                piece = spec.pieces[me]
                if owner == me:
                    result = (results if is_update else state_results)[i]
                    for phase, _, destinations, returned in returns(spec, owner, senders, owner_relays=plan.owner_relays):
                        if phase == "return":
                            payload = _extract(result, returned).reshape(-1).to(spec.dtype)
                            for dst in destinations:
                                send[dst].append(payload)
                    mine = _extract(result, piece)
                    # Rounded like every other holder's copy (the same bits on every replica).
                    target[i] = mine.to(spec.dtype).to(dtype) if spec.dtype != dtype else mine
                elif not piece_numel(piece):
                    target[i] = part.new_empty(part.shape)
                elif (piece == spec.pieces[owner] and not (plan.owner_relays and senders)) or senders.get(piece) == me:
                    receive[owner].append((i, is_update, piece))
        return [(*handle, tensors, states) for handle in self._all_to_alls(plan.traffic[b], "return", sends, receives)]

    def _start_relay(self, plan: ExchangePlan, b: int, relayed: dict[tuple[int, bool], Tensor],
                     tensors: list[Tensor], states: list[Tensor | None]) -> list:
        """Start the all_to_alls in which each relay forwards the pieces of bucket b's results it
        received from their owners (`relayed`, as they travelled) to the pieces' other holders."""
        me, bucket = self.rank, plan.buckets[b]
        sends: dict[torch.dtype, list[list[Tensor]]] = {}
        receives: dict[torch.dtype, list[list[tuple[int, bool, Piece]]]] = {}
        for i in bucket:
            owner = plan.owners[i]
            for spec, senders, _, _, is_update in self._payloads(plan, i, tensors, states):
                send = sends.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                receive = receives.setdefault(spec.dtype, [[] for _ in range(self.world_size)])
                piece = spec.pieces[me]
                if not piece_numel(piece):
                    continue
                if piece == spec.pieces[owner]:  # the owner's piece: returned, or relayed by the owner
                    if not (plan.owner_relays and senders):
                        continue
                    source = owner
                else:
                    source = senders[piece]
                if source != me:
                    receive[source].append((i, is_update, piece))
                    continue
                for dst in holders(spec.pieces)[piece]:
                    if dst != me:
                        send[dst].append(relayed[(i, is_update)])
        return [(*handle, tensors, states) for handle in self._all_to_alls(plan.traffic[b], "relay", sends, receives)]

    def _finish_return(self, handles: list, out: list, state_out: list,
                       relayed: dict[tuple[int, bool], Tensor] | None = None) -> None:
        """Wait for returned pieces and write them to `out` / `state_out`; with `relayed`, also keep
        each as it travelled (for `_start_relay`)."""
        for work, _, received, layout, tensors, states in handles:
            work.wait()
            for src, entries in enumerate(layout):
                offset = 0
                for i, is_update, piece in entries:
                    size = piece_numel(piece)
                    dtype = (tensors[i] if is_update else states[i]).dtype
                    value = received[src][offset : offset + size].view(piece_shape(piece))
                    (out if is_update else state_out)[i] = value.to(dtype) if value.dtype != dtype else value
                    if relayed is not None:
                        relayed[(i, is_update)] = value.reshape(-1)
                    offset += size

    def _all_to_alls(self, traffic: dict, phase: str, sends: dict, receives: dict) -> list:
        """One asynchronous all_to_all per wire dtype that carries anything on some rank (the plan's
        `traffic`, the same on every rank), in a fixed dtype order. Returns (work, send buffer, the
        received pieces per source, what each source's pieces are) per collective, kept together
        so that no buffer is freed while its collective runs."""
        handles = []
        for dtype in sorted(sends, key=str):
            if not traffic.get((phase, dtype)):
                continue
            flat = [t for parts in sends[dtype] for t in parts]
            send_sizes = [sum(t.numel() for t in parts) for parts in sends[dtype]]
            recv_sizes = [sum(piece_numel(piece) for _, _, piece in entries) for entries in receives[dtype]]
            device = flat[0].device if flat else torch.device("cpu")
            send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
            recv = torch.empty(sum(recv_sizes), dtype=dtype, device=self._device or device)
            work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group, async_op=True)
            self.bytes_sent += sum(send_sizes) * send.element_size()
            handles.append((work, send, list(recv.split(recv_sizes)), receives[dtype]))
        return handles


class Relayed:
    """A Muon group's step whose relay phase is still in flight (`DistributedOrthogonalizer.defer_relay`,
    set by muonkit.deferred): per bucket, its relay all_to_alls, kept with their buffers until
    waited for, and the tensors (indices into the group's `params`) this rank receives pieces of by
    them. `step` is the held step (muonkit.functional.Pending) that applies them once they arrive;
    waiting issues no collective, so a rank may wait for any bucket at any time."""

    def __init__(self, exchange: DistributedOrthogonalizer, relays: dict[int, list], n: int, params: list[Tensor]) -> None:
        self.exchange, self.handles, self.params = exchange, relays, params
        # Only what the relays bring (the step's other results are not held here: they are freed
        # once applied).
        self.out: list[Tensor | None] = [None] * n
        self.state_out: list[Tensor | None] = [None] * n
        self.indices = {b: sorted({i for *_, layout, _, _ in handles for entries in layout for i, _, _ in entries})
                        for b, handles in relays.items()}
        self.step: Any = None

    def pending(self) -> dict[int, int]:
        """Per tensor still to arrive, its bucket."""
        return {i: b for b, indices in self.indices.items() if b in self.handles for i in indices}

    def wait(self, b: int) -> dict[int, tuple[Tensor | None, Tensor | None]]:
        """Wait for bucket b's relays (once; later calls return {}): per tensor received, its
        update and new second moment (None for what did not come by relay, and where the variant
        keeps none). The handles and their buffers are released."""
        handles = self.handles.pop(b, None)
        if handles is None:
            return {}
        self.exchange._finish_return(handles, self.out, self.state_out)
        results = {i: (self.out[i], self.state_out[i]) for i in self.indices[b]}
        for i in self.indices[b]:
            self.out[i] = self.state_out[i] = None
        return results


def _copies_of(sub: Tensor, root: Tensor) -> Tensor:
    """The ranks of every copy of sub-mesh `sub` (this rank's, as DeviceMesh.mesh gives it) in its
    root mesh `root`, as a tensor of shape (copies, *sub.shape): each dim of `sub` runs row-major
    over the root dims along which its ranks move (one for a named dim, several for a flattened
    one), the copies over the remaining root dims. ValueError if `sub` is no such slice of `root`."""
    position = {r: i for i, r in enumerate(root.flatten().tolist())}
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in root.shape), indexing="ij"), -1).reshape(-1, root.ndim)
    coordinates = grid[[position[r] for r in sub.flatten().tolist()]].view(*sub.shape, root.ndim)
    spans = [[k for k in range(root.ndim) if bool((coordinates.diff(dim=d)[..., k] != 0).any())]
             for d in range(sub.ndim)]
    used = [k for span in spans for k in span]
    others = [k for k in range(root.ndim) if k not in used]
    copies = root.permute(*others, *used).reshape(-1, *sub.shape)
    mine = [bool((copy == sub).all()) for copy in copies]
    if len(set(used)) != len(used) or sum(mine) != 1:
        raise ValueError(f"on a device mesh of ranks {sub.tolist()} that is no slice of its root mesh {root.tolist()} "
                         "(each of its dims one or several root dims, flattened in order)")
    return copies


def _insert_(full: Tensor, piece: Piece, part: Tensor) -> None:
    """Write `part` (a rank's piece) into its place in `full`."""
    for global_slices, local_slices in blocks(piece):
        full[global_slices].copy_(part[local_slices])


def _extract(full: Tensor, piece: Piece) -> Tensor:
    """A rank's piece of `full`: a view when it is one block, else a copy."""
    parts = blocks(piece)
    if len(parts) == 1:
        return full[parts[0][0]]
    out = full.new_empty(piece_shape(piece))
    for global_slices, local_slices in parts:
        out[local_slices].copy_(full[global_slices])
    return out


def amax_across(t: Tensor, mesh: Any, mesh_dims: Sequence[int]) -> Tensor:
    """The elementwise max of `t` over the ranks of the DeviceMesh `mesh` that differ from this one
    only along `mesh_dims` (every one of them calls it with a tensor of t's shape and dtype): one
    all_gather per mesh dim, then torch.amax (a NaN on any rank gives NaN, as one process's amax)."""
    for mesh_dim in mesh_dims:
        group = mesh.get_group(mesh_dim)
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, t.contiguous(), group=group)
        t = torch.stack(gathered).amax(0)
    return t


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
    # variant's starts from zeros, and none is made fresh; a parameter's DTensor second moment of
    # another shape is read into one of the saved shape, placed as its parameter. So is the momentum
    # saved in the other form (8-bit codes and scales, or a momentum_buffer): the saved group's
    # momentum_bits decides which one it keeps.
    as_built = set(expected)  # (the loop below edits `expected`)
    for key in sorted({*expected, *saved}):  # in the same order on every rank (state entries are added)
        if not key.startswith("optim.state.") or saved.get(key) == expected.get(key):
            continue
        suffix = next((s for s in (".second_moment", *_MOMENTA) if key.endswith(s)), None)
        if suffix is None:
            continue
        fqn = key.removeprefix("optim.state.").removesuffix(suffix)
        if suffix in _MOMENTA:
            other = (".momentum_codes",) if suffix == ".momentum_buffer" else (".momentum_buffer",)
            counterparts = as_built if key in saved else saved
            if (key in saved) == (key in as_built) or not any(f"optim.state.{fqn}{o}" in counterparts for o in other):
                continue  # another shape, or no momentum saved: refused below
        *parents, last = key.split(".")  # not `path`: the checkpoint's, which the errors below name
        try:
            holder = _parent(state, parents)
        except KeyError:
            continue
        if key in saved:
            # Sharded like its parameter (DCP reshards into it), as the state a step makes: a plain
            # tensor would be held whole on every rank (and a second moment exchanged as a replicated one).
            param = state["model"].get(fqn)
            dtype = tensors[key].properties.dtype
            rows = suffix == ".momentum_scales"  # per-row state: placed as dtensor.row_placements says
            holder[last] = (zeros_like_sharded(param, saved[key], dtype, rows=rows) if is_dtensor(param)
                            else torch.empty(saved[key], dtype=dtype))
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


# A Muon parameter's momentum in its two forms: momentum_bits=32, and 8-bit codes with their scales.
_MOMENTA = (".momentum_buffer", ".momentum_codes", ".momentum_scales")


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


def _ranges(slices: Sequence[int | tuple[int, int]]) -> list[tuple[int, int]]:
    """The `slices` of the bound update_many as (start, stop) dim-0 ranges per rank: sizes are
    consecutive slices in rank order; ranges are as given (replicas hold equal ones)."""
    if all(isinstance(n, int) for n in slices):
        starts = [sum(slices[:r]) for r in range(len(slices))]  # type: ignore[arg-type]
        return [(a, a + n) for a, n in zip(starts, slices)]  # type: ignore[operator]
    return [(int(a), int(b)) for a, b in slices]  # type: ignore[misc]
