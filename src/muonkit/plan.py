"""The plan of a distributed Muon step: which rank holds which piece of each tensor, which rank owns
(orthogonalizes) each matrix, who sends which piece to whom, and in which buckets. Pure: no
collectives and no DTensor; every rank builds the same plan from the same description of the
tensors (muonkit.distributed describes them and runs the exchange; it caches one plan per group's
shapes, placements, dtypes and layouts).

Pieces. A tensor on a device mesh is held as pieces: for every rank, the global index ranges it holds
along each tensor dim (`pieces_of`, following DTensor's placements left to right: Shard(d) cuts dim
d as torch.chunk does, _StridedShard(d, sf) as FSDP2 over tensor parallelism does, Replicate keeps
it). Ranks that hold equal pieces are replicas.

Exchange (per matrix tensor of N elements, owner o, p_r elements on rank r):

    elements sent (all ranks) = (N - p_o) + sum over r != o of p_r

the pieces the owner lacks, each distinct piece sent once by one of its holders, and every other
rank's piece of the result (`minimum_elements`). The owner is a rank holding a largest piece, the
least loaded by Newton-Schulz work, ties spread over nodes and replicas (`spread_order`). The
result travels back in two hops (a relay): the owner sends each piece it lacked to the holder that
sent it (in HSDP, the owner's own replica) and its own piece to that piece's other holders; each
of those holders forwards its piece to the piece's other holders (its counterparts in the other
replicas). The same bytes as the owner sending every holder its piece, spread over the senders:
with R replicas of S shards the owner sends N instead of (R S - 1)/S N. A
tensor sharded only along batch axes of its matrix view (stacked experts sharded on the expert axis:
expert parallelism) holds whole matrices on every rank: it is orthogonalized where it lives, with no
exchange.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .layout import Layout

Range = tuple[int, int]  # [start, stop) of global indices along one dim
Piece = tuple[tuple[Range, ...], ...]  # per tensor dim, the ranges held, in the order of the local tensor
# A placement as plain data: ("R",) Replicate, ("S", dim) Shard, ("SS", dim, split_factor) _StridedShard.
Placement = tuple

# Buckets hold at most this many bytes of payload (or one tensor, if larger): a bucket's exchange runs
# while the previous bucket's matrices are orthogonalized.
BUCKET_BYTES = 1 << 26


def newton_schulz_flops(batch: int, rows: int, cols: int) -> float:
    """FLOPs of one quintic Newton-Schulz step on `batch` rows x cols matrices: batch (4 m^2 n + 2 m^3)
    with m = min(rows, cols), n = max(rows, cols) (docs/references.md section 3, leading order)."""
    m, n = min(rows, cols), max(rows, cols)
    return float(batch) * (4.0 * m * m * n + 2.0 * m**3)


def assign_owners(
    costs: Sequence[float],
    world_size: int,
    *,
    candidates: Sequence[Sequence[int] | None] | None = None,
    loads: Sequence[float] | None = None,
    order: Sequence[int] | None = None,
) -> list[int]:
    """The rank that owns each item: largest cost first, each onto the least-loaded rank (a heap).

    Deterministic (ties: the earlier item first; among equally loaded ranks the one with fewer
    items, then the one earlier in `order`), so every rank computes the same assignment from the
    same costs. Greedy longest-processing-time scheduling: the busiest rank's load is at most 4/3 of
    the optimum (Graham, 1969), and at most the average load plus the largest cost. O(items log ranks).

    Args:
        candidates: per item, the ranks allowed to own it (None: any rank).
        loads: each rank's load before the items (work it does anyway), default zeros.
        order: every rank once, in the order ties go to them (default: rank order). build_plan
            passes `spread_order(world_size)`, so that with fewer items than ranks the owners are
            spread over nodes and replicas instead of filling the first ones.

    Example:
        >>> assign_owners([4.0, 3.0, 3.0, 2.0], 2)
        [0, 1, 1, 0]
        >>> assign_owners([1.0] * 3, 4, order=spread_order(4))
        [0, 2, 1]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for i, cost in enumerate(costs):
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"costs[{i}] must be a finite number >= 0, got {cost!r}")
    position = list(range(world_size))
    if order is not None:
        if sorted(order) != position:
            raise ValueError(f"order must hold every rank of 0..{world_size - 1} once, got {list(order)!r}")
        for k, rank in enumerate(order):
            position[rank] = k
    heap = [(float(loads[r]) if loads is not None else 0.0, 0, position[r], r) for r in range(world_size)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        allowed = None if candidates is None or candidates[i] is None else set(candidates[i])  # type: ignore[arg-type]
        skipped = []
        while True:
            load, count, key, rank = heapq.heappop(heap)
            if allowed is None or rank in allowed or not heap:
                break
            skipped.append((load, count, key, rank))
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], count + 1, key, rank))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return owners


@functools.lru_cache(maxsize=64)
def spread_order(world_size: int) -> tuple[int, ...]:
    """Every rank once, by its bit-reversed number (over ceil(log2 W) bits): 0, 4, 2, 6, 1, 5, 3, 7
    on 8 ranks. For W a power of two, the first 2^k ranks of the order are W / 2^k apart: one in each
    block of W / 2^k consecutive ranks, for every k. Launchers number a node's ranks consecutively
    and meshes put the sharded dims innermost, so the owners of a step with fewer matrices than ranks
    go one per node and one per replica first (HSDP: every replica owns a share of the matrices and
    the relay sends its results to the others) instead of filling the first nodes, whose ranks would
    each forward most of the step's results to every other replica."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    bits = (world_size - 1).bit_length()
    return tuple(sorted(range(world_size), key=lambda r: int(format(r, f"0{bits}b")[::-1] or "0", 2)))


def shard_sizes(length: int, world_size: int) -> list[int]:
    """Dim-0 sizes of the slices of Shard(0) on `world_size` ranks (torch.chunk's split: ceil-sized
    slices, then the remainder, then empty ones). 33 rows on 2 ranks: [17, 16]; 3 on 4: [1, 1, 1, 0]."""
    chunk = -(-length // world_size) if length else 0
    return [max(0, min(chunk, length - r * chunk)) for r in range(world_size)]


# ------------------------------------------------------------------------------------- pieces


def _take(ranges: Sequence[Range], start: int, stop: int) -> tuple[Range, ...]:
    """Positions [start, stop) of the index sequence that `ranges` spell, as ranges."""
    out: list[Range] = []
    position = 0
    for lo, hi in ranges:
        a, b = max(start, position), min(stop, position + hi - lo)
        if a < b:
            begin = lo + a - position
            if out and out[-1][1] == begin:
                out[-1] = (out[-1][0], begin + b - a)
            else:
                out.append((begin, begin + b - a))
        position += hi - lo
    return tuple(out)


def _length(ranges: Sequence[Range]) -> int:
    return sum(hi - lo for lo, hi in ranges)


def _chunk(ranges: Sequence[Range], count: int, index: int) -> tuple[Range, ...]:
    """Chunk `index` of `ranges` cut as torch.chunk cuts a dim into `count` (ceil-sized chunks, then
    the remainder, then empty ones)."""
    length = _length(ranges)
    size = -(-length // count) if length else 0
    start = min(index * size, length)
    return _take(ranges, start, min(start + size, length))


def _concat(parts: Sequence[tuple[Range, ...]]) -> tuple[Range, ...]:
    return _take([r for part in parts for r in part], 0, sum(_length(p) for p in parts))


def pieces_of(shape: Sequence[int], mesh: torch.Tensor | Sequence, placements: Sequence[Placement]) -> dict[int, Piece]:
    """Each rank's piece of a tensor of `shape` placed on `mesh` (a tensor of ranks, one mesh dim per
    placement), keyed by rank: DTensor's placements applied left to right.

    Example: a (4, 6) tensor on mesh [[0, 1], [2, 3]] with (Replicate, Shard(0)): ranks 0 and 2 hold
    rows 0-1, ranks 1 and 3 rows 2-3: {0: (((0, 2),), ((0, 6),)), 1: (((2, 4),), ((0, 6),)), ...}.
    """
    mesh = torch.as_tensor(mesh)
    if mesh.ndim != len(placements):
        raise ValueError(f"a {mesh.ndim}D mesh needs {mesh.ndim} placements, got {tuple(placements)}")
    full = tuple(((0, int(n)),) if n else () for n in shape)
    pieces: dict[int, Piece] = {}
    for coordinate in itertools.product(*(range(s) for s in mesh.shape)):
        piece = list(full)
        for mesh_dim, placement in enumerate(placements):
            size, index = mesh.shape[mesh_dim], coordinate[mesh_dim]
            if placement[0] == "R":
                continue
            dim = placement[1]
            if placement[0] == "S":
                piece[dim] = _chunk(piece[dim], size, index)
            elif placement[0] == "SS":
                parts = [_chunk(piece[dim], placement[2], j) for j in range(placement[2])]
                piece[dim] = _concat([_chunk(part, size, index) for part in parts])
            else:
                raise ValueError(f"unknown placement {placement!r}")
        pieces[int(mesh[coordinate])] = tuple(piece)
    return pieces


def full_piece(shape: Sequence[int]) -> Piece:
    return tuple(((0, int(n)),) if n else () for n in shape)


@functools.lru_cache(maxsize=1 << 16)
def piece_shape(piece: Piece) -> tuple[int, ...]:
    # Cached: a plan on many ranks asks for the same few pieces' sizes again and again.
    return tuple(_length(ranges) for ranges in piece)


@functools.lru_cache(maxsize=1 << 16)
def piece_numel(piece: Piece) -> int:
    return math.prod(piece_shape(piece))


def blocks(piece: Piece) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(global slices, local slices) of each rectangular block of a piece."""
    per_dim = []
    for ranges in piece:
        local, out = 0, []
        for lo, hi in ranges:
            out.append((slice(lo, hi), slice(local, local + hi - lo)))
            local += hi - lo
        per_dim.append(out)
    return [(tuple(g for g, _ in combo), tuple(l for _, l in combo)) for combo in itertools.product(*per_dim)]


def minimum_elements(pieces: Sequence[Piece], owner: int) -> int:
    """Elements the exchange of one tensor sends, all ranks together, with `owner` orthogonalizing it:
    the distinct pieces `owner` lacks once each, and every other rank's piece of the result."""
    mine = pieces[owner]
    distinct = {p for r, p in enumerate(pieces) if p != mine and piece_numel(p)}
    return sum(piece_numel(p) for p in distinct) + sum(piece_numel(p) for r, p in enumerate(pieces) if r != owner)


def is_local(shape: Sequence[int], placements: Sequence[Placement], layout: Layout) -> bool:
    """Whether every rank holds whole matrices of the layout's view: sharded along batch axes only
    (stacked experts on the expert axis), never along a row, column or blocked axis."""
    ndim = len(shape)
    batch = {a % ndim for a in layout.batch}
    blocked = {a % ndim for a, _ in layout.blocks}
    dims = {p[1] % ndim for p in placements if p[0] != "R"}
    return bool(dims) and dims <= batch and not dims & blocked


# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Spec:
    """One tensor of a step as the plan sees it (the same on every rank)."""

    shape: tuple[int, ...]  # the full tensor
    dtype: torch.dtype  # its dtype on the wire
    pieces: tuple[Piece, ...]  # per group rank
    batch: int  # its matrix view: batch x rows x cols
    rows: int
    cols: int
    local: bool  # orthogonalized where it lives (every rank holds whole matrices)


@dataclass
class ExchangePlan:
    """Who owns each tensor and what every rank sends and receives, bucket by bucket.

    Attributes:
        owners: per tensor, its owner's group rank (-1 for a tensor orthogonalized where it lives).
        buckets: the exchanged tensors' indices, bucket by bucket (each bucket's exchange may run
            while the previous bucket's matrices are orthogonalized).
        local: the indices of the tensors every rank orthogonalizes in place (expert parallel).
        senders: per tensor, {piece: the rank that sends it to the owner} for the pieces the owner
            lacks; the same rank is the piece's relay: it receives the piece of the result from the
            owner and forwards it to the piece's other holders.
        sent_elements: per rank, the elements it sends per step, all phases (with `moments`, those too).
        loads: per rank, the Newton-Schulz FLOPs it runs per step (owned and local tensors).
        traffic: per bucket, per phase ("gather": pieces to the owners; "return": the owners' results
            to the relays and to the replicas of the owners' own pieces; "relay": the relays' pieces
            to their other holders), per wire dtype: elements sent by all ranks (a collective with
            none is skipped on every rank).
    """

    world_size: int
    specs: list[Spec]
    moments: list[Spec | None]
    owners: list[int]
    buckets: list[list[int]]
    local: list[int]
    senders: list[dict[Piece, int]]
    moment_senders: list[dict[Piece, int]]
    sent_elements: list[int]
    loads: list[float]
    traffic: list[dict[tuple[str, torch.dtype], int]] = field(default_factory=list)
    owner_relays: bool = False  # the owners relay the copies of their own pieces (`returns`)


def build_plan(
    specs: Sequence[Spec],
    moments: Sequence[Spec | None],
    world_size: int,
    *,
    bucket_bytes: int = BUCKET_BYTES,
    order: Sequence[int] | None = None,
    owner_relays: bool = False,
) -> ExchangePlan:
    """The plan of one group's step. `moments[i]` is tensor i's second moment (None without one).

    Owners: each tensor whose matrix sides are both multiples of 8 is an item of its own; the other
    tensors of one (rows, cols, dtype) form one item, owned together, so that its owner stacks them
    as one process does (CPU kernels round small matrices differently by buffer alignment;
    muonkit.distributed). Items go largest Newton-Schulz cost first onto the least-loaded rank among
    those holding a largest piece of every tensor of the item (so that the owner receives the least),
    counting the local tensors' work in the loads; among equally loaded ranks, the one first in
    `order` (default `spread_order(world_size)`: owners spread over nodes and replicas).
    `owner_relays`: the owners relay the copies of their own pieces (`returns`).
    """
    n = len(specs)
    loads = [0.0] * world_size
    local = [i for i, s in enumerate(specs) if s.local]
    for i in local:
        s = specs[i]
        for r, piece in enumerate(s.pieces):
            loads[r] += newton_schulz_flops(piece_numel(piece) // max(1, s.rows * s.cols), s.rows, s.cols)
    exchanged = [i for i in range(n) if not specs[i].local]
    groups: dict[tuple, list[int]] = {}
    items: list[list[int]] = []
    for i in exchanged:
        s = specs[i]
        if math.gcd(s.rows, s.cols) % 8 == 0:
            items.append([i])
        else:
            key = (s.rows, s.cols, s.dtype)
            if key not in groups:
                groups[key] = []
                items.append(groups[key])
            groups[key].append(i)
    costs = [sum(newton_schulz_flops(specs[i].batch, specs[i].rows, specs[i].cols) for i in item) for item in items]
    candidates = [_largest_holders([specs[i] for i in item], [m for i in item if (m := moments[i]) is not None],
                                   world_size) for item in items]
    owners = [-1] * n
    order = spread_order(world_size) if order is None else order
    chosen = assign_owners(costs, world_size, candidates=candidates, loads=loads, order=order)
    for item, owner in zip(items, chosen):
        for i in item:
            owners[i] = owner
    for item, cost in zip(items, costs):
        loads[owners[item[0]]] += cost
    sent = [0] * world_size
    senders = [_senders(specs[i], owners[i], sent) if owners[i] >= 0 else {} for i in range(n)]
    moment_senders = [_senders(m, owners[i], sent) if m is not None and owners[i] >= 0 else {}
                      for i, m in enumerate(moments)]
    for i in exchanged:
        for spec, chosen in ((specs[i], senders[i]), (moments[i], moment_senders[i])):
            if spec is not None:
                for _, src, dst, piece in returns(spec, owners[i], chosen):
                    sent[src] += piece_numel(piece) * len(dst)
    buckets = _buckets(exchanged, items, specs, moments, bucket_bytes)
    plan = ExchangePlan(world_size, list(specs), list(moments), owners, buckets, local, senders, moment_senders,
                        sent, loads, owner_relays=owner_relays)
    plan.traffic = [_traffic(plan, bucket) for bucket in buckets]
    return plan


@functools.lru_cache(maxsize=256)
def _holdings(pieces: tuple[Piece, ...]) -> tuple[tuple[int, ...], dict[Piece, list[int]]]:
    """(each rank's piece size, the ranks holding each non-empty piece) of one placement: read once
    per distinct placement (tensors of one shape and placement share their pieces)."""
    sizes = tuple(piece_numel(p) for p in pieces)
    holders: dict[Piece, list[int]] = {}
    for r, (piece, size) in enumerate(zip(pieces, sizes)):
        if size:
            holders.setdefault(piece, []).append(r)
    return sizes, holders


def holders(pieces: tuple[Piece, ...]) -> dict[Piece, list[int]]:
    """The ranks holding each distinct non-empty piece, in rank order."""
    return _holdings(pieces)[1]


def returns(spec: Spec, owner: int, senders: dict[Piece, int], *,
            owner_relays: bool = False) -> list[tuple[str, int, list[int], Piece]]:
    """How the owner's result goes back to every holder of a piece: (phase, source, destinations,
    piece) in a fixed order. "return": the owner sends each piece it lacked to its sender (the
    relay), and its own piece to that piece's other holders; "relay": each relay sends its piece to
    the piece's other holders. A piece with one holder is returned in one hop.

    With `owner_relays` (muonkit.defer_relay), a tensor whose pieces the owner lacks (it is sharded)
    sends the copies of the owner's own piece in the relay phase too, the owner relaying it: under
    HSDP every piece that crosses to another replica then travels in the relay phase, which the
    next forward hides, and the return phase stays inside the owner's replica."""
    mine = spec.pieces[owner]
    out = []
    for piece, ranks in holders(spec.pieces).items():
        if piece == mine:
            others = [r for r in ranks if r != owner]
            if others:
                out.append(("relay" if owner_relays and senders else "return", owner, others, piece))
            continue
        relay = senders[piece]
        out.append(("return", owner, [relay], piece))
        others = [r for r in ranks if r != relay]
        if others:
            out.append(("relay", relay, others, piece))
    return out


def _largest_holders(specs: Sequence[Spec], moments: Sequence[Spec], world_size: int) -> list[int] | None:
    """The ranks that hold a largest piece of every one of `specs` and of their `moments` (second
    moments travel with their tensor: an owner holding a largest piece of both receives the least
    of both); of `specs` alone where no rank holds both; None: any rank."""
    def largest(tensors: Sequence[Spec]) -> set[int]:
        allowed = set(range(world_size))
        for s in tensors:
            sizes = _holdings(s.pieces)[0]
            most = max(sizes)
            allowed &= {r for r, size in enumerate(sizes) if size == most}
        return allowed

    allowed = largest(specs)
    both = allowed & largest(moments) if moments else allowed
    allowed = both or allowed
    return sorted(allowed) if allowed and len(allowed) < world_size else None


def _senders(spec: Spec, owner: int, sent: list[int]) -> dict[Piece, int]:
    """For each non-empty piece the owner lacks, the holder that sends it: one in the owner's block
    of D consecutive ranks if any (D = the number of distinct pieces: launchers number a node's
    ranks consecutively and meshes put the sharded dims innermost, so HSDP's owner gets the piece
    from its own replica, on its own node), then the one that has sent the least so far, then the
    lowest rank; `sent` is updated."""
    mine = spec.pieces[owner]
    holders = _holdings(spec.pieces)[1]
    block = max(1, len(holders))
    out = {}
    for piece, ranks in holders.items():
        if piece == mine:
            continue
        rank = ranks[0] if len(ranks) == 1 else min(ranks, key=lambda r: (r // block != owner // block, sent[r], r))
        out[piece] = rank
        sent[rank] += piece_numel(piece)
    return out


def _buckets(exchanged: list[int], items: list[list[int]], specs: Sequence[Spec], moments: Sequence[Spec | None],
             bucket_bytes: int) -> list[list[int]]:
    """Consecutive items (in the order of their first tensor) cut into buckets of at most
    `bucket_bytes` of payload; an item is never split (its tensors are stacked together)."""
    del exchanged
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for item in sorted(items, key=lambda item: item[0]):
        item_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for i in item
                         for s in (specs[i], moments[i]) if s is not None)
        if current and size + item_bytes > bucket_bytes:
            out.append(sorted(current))
            current, size = [], 0
        current.extend(item)
        size += item_bytes
    if current:
        out.append(sorted(current))
    return out


def _traffic(plan: ExchangePlan, bucket: list[int]) -> dict[tuple[str, torch.dtype], int]:
    out: dict[tuple[str, torch.dtype], int] = {}
    for i in bucket:
        owner = plan.owners[i]
        for spec, senders in ((plan.specs[i], plan.senders[i]), (plan.moments[i], plan.moment_senders[i])):
            if spec is None:
                continue
            key = ("gather", spec.dtype)
            out[key] = out.get(key, 0) + sum(piece_numel(p) for p in senders)
            for phase, _, dst, piece in returns(spec, owner, senders, owner_relays=plan.owner_relays):
                out[(phase, spec.dtype)] = out.get((phase, spec.dtype), 0) + piece_numel(piece) * len(dst)
    return out
