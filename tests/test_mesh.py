"""Contracts of N-D device meshes (issue 21): muonkit.plan (pure: pieces, owners, the byte minimum,
the cached plan) and 4 gloo ranks on (2, 2) meshes as torchtitan places a model, flattened sub-mesh
dims included (tests/mesh_worker.py).

Oracles and tolerances:
- `pieces_of` against torch's own split (each placement's `_split_tensor`, left to right) of an
  index tensor: the same global indices in the same local order, exactly.
- Multi-process jobs with the same fixed gradients on every rank equal one process BIT FOR BIT
  (parameters and optimizer state, gathered on every rank, so every replica group is checked): the
  owner of each matrix runs the same kernels on the same data; the matrices whose sides are multiples
  of 8 do not depend on their batch position, the others are owned together.
- bytes sent per step (all ranks together) equal the minimum computed in the worker from the local
  sizes torch gave each rank: N + sum p_r - 2 max p_r per exchanged tensor, 0 for whole experts.
- exchange_dtype=torch.bfloat16: within 2e-2 relative of one process (a bf16 rounding of U and of
  the update, amplified by 3 orthogonalized steps), and every replica holds the same bits.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

import distributed_worker as worker
import mesh_worker
import muonkit
import muonkit.plan
from muonkit.distributed import load_checkpoint
from muonkit.layout import resolve
from muonkit.plan import (
    Spec,
    assign_owners,
    blocks,
    build_plan,
    full_piece,
    is_local,
    minimum_elements,
    piece_numel,
    pieces_of,
    spread_order,
)

KINDS = ["hsdp", "fsdp_tp", "ep", "fsdp"]
# Sub-meshes with flattened dims (torchtitan's `_flatten`): FSDP on "dp" = (dp_replicate, dp_shard) of
# a (2, 2) mesh; HSDP on ("dp_replicate", "dp_shard_cp") of (1, 2, 2) and (2, 1, 2) meshes; FSDP + TP
# with "dp" flattened from (1, 2) dims and two matrices on "dp" alone (2 of the 4 ranks).
FLAT_KINDS = ["flat_fsdp", "hsdp_cp", "hsdp_cp_2x2", "flat_fsdp_tp"]
VARIANT_JOBS = ["hsdp__normuon", "fsdp_tp__normuon", "fsdp_tp__adamuon", "ep__dion2", "hsdp__muon8bit",
                "ep__normuon8bit"]
CHECKPOINTS = ["checkpoint_save_hsdp", "checkpoint_save_fsdp_tp", "resume_fsdp_from_hsdp", "resume_hsdp_from_fsdp_tp",
               "resume_fsdp_tp_from_one", "resume_ep_from_hsdp"]
# 8-bit momentum on FSDP + TP's rowwise pieces: fsdp_tp_muon8bit saves mesh_fsdp_tp__muon8bit, which
# HSDP resumes; FSDP + TP resumes one process's mesh_one__muon8bit (saved by tests/conftest.py).
CHECKPOINTS_8BIT = ["resume_hsdp_from_fsdp_tp__muon8bit", "resume_fsdp_tp_from_one__muon8bit"]
# muonkit.defer_relay on HSDP 2 x 2 trained by forward/backward (mesh_worker.deferred_hsdp).
DEFERRED = ["deferred_hsdp", "deferred_hsdp_prefetch", "deferred_hsdp_grouped", "deferred_hsdp__normuon"]
JOBS = [*KINDS, *FLAT_KINDS, *VARIANT_JOBS, "buckets", "buckets_hsdp", "bf16", "safety", "qkclip_fsdp_tp", "qkclip_flat_fsdp_tp",
        "fsdp_tp_muon8bit", "fsdp_tp_muon8bit_few_rows", "fsdp_tp_switch_bits", "row_slices", "hsdp_few", *CHECKPOINTS, *CHECKPOINTS_8BIT,
        *DEFERRED, "deferred_hsdp_usage", "hsdp_blocks"]


# --------------------------------------------------------------------------------- pieces (pure)


def _torch_indices(shape, mesh_shape, placements, coordinate):
    """The global flat indices a rank holds, by torch's own split of each placement, left to right."""
    t = torch.arange(math.prod(shape)).view(shape)
    for size, index, placement in zip(mesh_shape, coordinate, placements):
        if placement.is_replicate():
            continue
        shards, _ = placement._split_tensor(t, size, with_padding=False)
        t = shards[index] if index < len(shards) else t.narrow(placement.dim, 0, 0)
    return t


def _plain(placement):
    name = type(placement).__name__
    if name == "Replicate":
        return ("R",)
    if name == "_StridedShard":
        return ("SS", placement.dim, placement.split_factor)
    return ("S", placement.dim)


def _indices(shape, piece):
    full = torch.arange(math.prod(shape)).view(shape)
    out = torch.empty([sum(b - a for a, b in ranges) for ranges in piece], dtype=torch.long)
    for global_slices, local_slices in blocks(piece):
        out[local_slices] = full[global_slices]
    return out


CASES = [  # (shape, mesh shape, placements)
    ((8, 6), (2, 2), ("R", "S0")),
    ((33, 6), (2, 2), ("SS0", "S0")),
    ((15, 6), (2, 2), ("SS0", "S0")),
    ((8, 6), (2, 2), ("S0", "S1")),
    ((2, 6), (2, 2), ("SS0", "S0")),
    ((3, 5), (4,), ("S0",)),
    ((0, 5), (2, 2), ("S0", "S0")),
    ((4, 8, 6), (2, 2), ("R", "S0")),
    ((12, 7), (2, 3), ("SS0", "S0")),
    ((12, 7), (2, 2, 2), ("R", "SS0", "S1")),
    ((16, 1), (2, 2), ("S0", "S1")),
]


@pytest.mark.parametrize(("shape", "mesh_shape", "spec"), CASES)
def test_pieces_follow_torch_placements(shape, mesh_shape, spec):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    def placement(text):
        if text == "R":
            return Replicate()
        if text.startswith("SS"):
            return _StridedShard(int(text[2:]), split_factor=math.prod(mesh_shape[len(text):]) or 2)
        return Shard(int(text[1:]))

    placements = [placement(text) for text in spec]
    if any(type(p).__name__ == "_StridedShard" for p in placements):
        # FSDP2 over tensor parallelism: the split factor is the size of the mesh dims after it.
        placements = [(_StridedShard(p.dim, split_factor=math.prod(mesh_shape[i + 1:]))
                       if type(p).__name__ == "_StridedShard" else p) for i, p in enumerate(placements)]
    mesh = torch.arange(math.prod(mesh_shape)).view(mesh_shape)
    pieces = pieces_of(shape, mesh, [_plain(p) for p in placements])
    for coordinate in itertools.product(*(range(s) for s in mesh_shape)):
        want = _torch_indices(shape, mesh_shape, placements, coordinate)
        got = _indices(shape, pieces[int(mesh[coordinate])])
        assert got.shape == want.shape and torch.equal(got, want), (coordinate, got, want)


def test_minimum_elements_per_mesh_kind():
    """The formulas of docs/scaling.md per matrix of N elements on W = 4 ranks."""
    shape, n = (8, 16), 128
    mesh = torch.arange(4).view(2, 2)
    kinds = {
        "replicated": ((("R",), ("R",)), 3 * n),
        "fsdp": ((("S", 0),), 2 * 3 * n // 4),
        "hsdp": ((("R",), ("S", 0)), (2 * 2 + 2 - 2) * n // 2),
        "fsdp_tp": ((("SS", 0, 2), ("S", 0)), 2 * 3 * n // 4),
        "rowwise_tp": ((("S", 0), ("S", 1)), 2 * 3 * n // 4),
    }
    for kind, (placements, want) in kinds.items():
        on = torch.arange(4) if len(placements) == 1 else mesh
        pieces = pieces_of(shape, on, placements)
        assert minimum_elements([pieces[r] for r in range(4)], 0) == want, kind


def test_is_local_only_for_batch_axis_shards():
    stacked, conv = resolve("stacked", 3), resolve(None, 2)
    assert is_local((8, 16, 32), [("R",), ("S", 0)], stacked)
    assert is_local((8, 16, 32), [("SS", 0, 2), ("S", 0)], stacked)
    assert not is_local((8, 16, 32), [("S", 0), ("S", 1)], stacked)
    assert not is_local((16, 32), [("S", 0)], conv)
    assert not is_local((8, 16, 32), [("R",), ("R",)], stacked)


# ------------------------------------------------------------------------------- owners (pure)


def _linear_scan_owners(costs, world, order=None):
    """The owner assignment before the heap (a scan of every rank per item), kept as the oracle."""
    loads, counts, owners = [0.0] * world, [0] * world, [0] * len(costs)
    position = {r: k for k, r in enumerate(range(world) if order is None else order)}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], counts[r], position[r]))
        owners[i] = rank
        loads[rank] += costs[i]
        counts[rank] += 1
    return owners


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64, 512])
@pytest.mark.parametrize("seed", range(4))
def test_heap_gives_the_same_owners_as_the_linear_scan(world, seed):
    rng = random.Random(seed)
    costs = [rng.choice([0.0, 1.0, rng.random(), 4 * rng.random()]) for _ in range(rng.randint(0, 300))]
    assert assign_owners(costs, world) == _linear_scan_owners(costs, world)
    order = spread_order(world)
    assert assign_owners(costs, world, order=order) == _linear_scan_owners(costs, world, order)


def test_spread_order_is_bit_reversed_rank():
    assert spread_order(8) == (0, 4, 2, 6, 1, 5, 3, 7)
    assert spread_order(1) == (0,) and spread_order(2) == (0, 1)
    assert spread_order(6) == (0, 4, 2, 1, 5, 3)  # 3 bits; 6 and 7 do not exist
    for world in range(1, 70):
        assert sorted(spread_order(world)) == list(range(world)), world
    # On 512 ranks the first 2^k of the order fall one in each block of 512 / 2^k consecutive ranks:
    # the first 64 one per 8-rank node (an HSDP replica of 64 x 8), the first 8 one per 64-rank block.
    order = spread_order(512)
    for k in range(10):
        first, block = order[: 2**k], 512 >> k
        assert sorted(r // block for r in first) == list(range(2**k)), k
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="world_size"):
            spread_order(bad)


def test_ties_go_by_the_order_and_a_bad_order_is_refused():
    # Equal costs on idle ranks: the ranks in the given order; loads and counts still come first.
    assert assign_owners([1.0] * 4, 4, order=[3, 1, 2, 0]) == [3, 1, 2, 0]
    assert assign_owners([1.0] * 3, 4, order=spread_order(4)) == [0, 2, 1]
    assert assign_owners([2.0, 1.0, 1.0], 4, order=[3, 2, 1, 0], loads=[0.0, 0.0, 0.0, 5.0]) == [2, 1, 0]
    assert assign_owners([1.0, 1.0], 4, order=[3, 2, 1, 0], candidates=[[0, 1], None]) == [1, 3]
    for bad in ([0, 1, 2], [0, 1, 2, 2], [1, 2, 3, 4]):
        with pytest.raises(ValueError, match="order must hold every rank"):
            assign_owners([1.0], 4, order=bad)


def test_owners_respect_candidates_and_initial_loads():
    owners = assign_owners([5.0, 4.0, 3.0, 2.0], 4, candidates=[[2, 3], None, [0], [3]], loads=[0.0, 0.0, 0.0, 10.0])
    # Largest first: 5 onto rank 2 (of 2 and 3; 3 starts loaded), 4 onto the idle rank 0 (before 1),
    # 3 onto rank 0, its only candidate, 2 onto rank 3, its only candidate.
    assert owners == [2, 0, 0, 3]
    # A rank already loaded by local work (experts) gets the items last.
    assert 3 not in assign_owners([1.0] * 3, 4, loads=[0.0, 0.0, 0.0, 100.0])


def _spec(shape, pieces, local=False):
    return Spec(tuple(shape), torch.float32, tuple(pieces), 1, shape[-2], shape[-1], local)


def test_plan_sends_the_minimum_and_balances():
    """A mixed group: replicated, HSDP, FSDP+TP, rowwise TP and an expert stack on 4 ranks."""
    mesh = torch.arange(4).view(2, 2)
    tensors = [((64, 32), (("R",), ("R",))), ((64, 32), (("R",), ("S", 0))), ((48, 32), (("SS", 0, 2), ("S", 0))),
               ((32, 64), (("S", 0), ("S", 1))), ((33, 16), (("SS", 0, 2), ("S", 0)))]
    specs = []
    for shape, placements in tensors:
        by_rank = pieces_of(shape, mesh, placements)
        specs.append(_spec(shape, [by_rank[r] for r in range(4)]))
    experts = pieces_of((4, 16, 32), mesh, (("R",), ("S", 0)))
    specs.append(Spec((4, 16, 32), torch.float32, tuple(experts[r] for r in range(4)), 4, 16, 32, True))
    plan = build_plan(specs, [None] * len(specs), 4)
    assert plan.local == [5] and plan.owners[5] == -1
    for i, spec in enumerate(specs[:5]):
        sizes = [piece_numel(p) for p in spec.pieces]
        assert sizes[plan.owners[i]] == max(sizes), i  # the owner holds a largest piece
    want = sum(minimum_elements(list(s.pieces), plan.owners[i]) for i, s in enumerate(specs[:5]))
    assert sum(plan.sent_elements) == want
    assert sum(plan.loads) > 0 and all(load > 0 for load in plan.loads)
    # Small buckets: every exchanged tensor alone (the 33-row one is its shape's only member).
    small = build_plan(specs, [None] * len(specs), 4, bucket_bytes=1)
    assert sorted(i for b in small.buckets for i in b) == [0, 1, 2, 3, 4] and len(small.buckets) == 5
    assert small.owners == plan.owners and small.sent_elements == plan.sent_elements


def test_hsdp_pieces_come_from_the_owners_own_replica():
    """HSDP, 2 replicas x 4 shards (shard innermost: ranks 0-3 are replica 0, one node): the owner
    gets every piece it lacks from its own replica, even when a rank of the other replica is nearer
    by number (owner 3: piece 0 from rank 0, not rank 4)."""
    by_rank = pieces_of((64, 32), torch.arange(8).view(2, 4), (("R",), ("S", 0)))
    spec = _spec((64, 32), [by_rank[r] for r in range(8)])
    for owner in range(8):
        senders = muonkit.plan._senders(spec, owner, [0] * 8)
        assert len(senders) == 3 and all(r // 4 == owner // 4 for r in senders.values()), (owner, senders)
    plan = build_plan([spec], [None], 8)
    assert all(r // 4 == plan.owners[0] // 4 for r in plan.senders[0].values())


def _hsdp_plan(shapes, replicas, shards, order=None):
    """build_plan for (Replicate, Shard(0)) on a replicas x shards mesh (ranks numbered shard
    innermost: replica r holds ranks r * shards ... r * shards + shards - 1)."""
    mesh = torch.arange(replicas * shards).view(replicas, shards)
    specs = {}
    for shape in set(shapes):
        by_rank = pieces_of(shape, mesh, (("R",), ("S", 0)))
        specs[shape] = _spec(shape, [by_rank[r] for r in range(replicas * shards)])
    return build_plan([specs[shape] for shape in shapes], [None] * len(shapes), replicas * shards, order=order)


def _replica_loads(plan, shards):
    loads = torch.tensor(plan.loads, dtype=torch.float64).view(-1, shards).sum(1)
    return loads, float(loads.max() / loads.mean())


def test_owners_hold_a_largest_piece_of_the_second_moment_too():
    """Rowwise tensor parallelism on a 2 x 2 (dp, tp) mesh: a 32 x 64 weight's pieces are equal on
    every rank, but NorMuon's (32, 1) second moment, placed alike, is empty on the tp = 1 ranks
    (1 and 3). The owners come from ranks 0 and 2, so each owner lacks only what it must and the
    bytes, weight and moment, are the sum of their minima (ties spread over 0, 2, 1, 3 would give
    rank 1 the third tensor otherwise)."""
    mesh = torch.arange(4).view(2, 2)
    placements = (("S", 0), ("S", 1))
    weight, moment = pieces_of((32, 64), mesh, placements), pieces_of((32, 1), mesh, placements)
    specs = [_spec((32, 64), [weight[r] for r in range(4)]) for _ in range(4)]
    moments = [_spec((32, 1), [moment[r] for r in range(4)]) for _ in range(4)]
    assert [piece_numel(moment[r]) for r in range(4)] == [16, 0, 16, 0]
    plan = build_plan(specs, moments, 4)
    assert set(plan.owners) == {0, 2}
    want = sum(minimum_elements(list(t.pieces), o) for ts in (specs, moments) for t, o in zip(ts, plan.owners))
    assert sum(plan.sent_elements) == want


def test_hsdp_owners_are_spread_over_the_replicas():
    """HSDP 2 x 2 (ranks [[0, 1], [2, 3]]): two equal matrices go one to each replica (ranks 0 and 2),
    not both to replica 0 (ranks 0 and 1, ties to the lower rank), and the busiest rank sends less;
    the total stays the minimum."""
    plan = _hsdp_plan([(64, 32), (64, 32)], 2, 2)
    packed = _hsdp_plan([(64, 32), (64, 32)], 2, 2, order=range(4))
    assert plan.owners == [0, 2] and packed.owners == [0, 1]
    loads, balance = _replica_loads(plan, 2)
    assert balance == 1.0 and _replica_loads(packed, 2)[1] == 2.0
    for p in (plan, packed):
        assert sum(p.sent_elements) == sum(minimum_elements(list(s.pieces), o) for s, o in zip(p.specs, p.owners))
    # Pieces of 1024: each owner's replica peer sends and relays one piece, each owner sends two.
    assert plan.sent_elements == [2048, 2048, 2048, 2048] and packed.sent_elements == [4096, 4096, 0, 0]


def test_hsdp_64_by_8_on_512_ranks_spreads_the_load_over_the_replicas():
    """512 ranks as 64 replicas of an 8-rank shard group (docs/scaling.md's HSDP on 512 GPUs), fewer
    matrices than ranks. 128 equal matrices: every replica owns 2 (ties to the lower rank gave them
    to ranks 0-127, 16 replicas owning 8 each). Llama-1B's 112 matrices: every replica owns some,
    the replicas' Newton-Schulz loads within 1.5x of their mean (4.6x packed), and the busiest rank
    sends a sixth of what it sent (the relay forwards only its replica's share of the results)."""
    plan = _hsdp_plan([(64, 64)] * 128, 64, 8)
    loads, balance = _replica_loads(plan, 8)
    assert balance == 1.0 and sorted({o // 8 for o in plan.owners}) == list(range(64))
    assert sorted(assign_owners([1.0] * 128, 512)) == list(range(128))  # packed: replicas 0-15, 8 each
    block = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
    plan = _hsdp_plan(block * 16, 64, 8)
    packed = _hsdp_plan(block * 16, 64, 8, order=range(512))
    loads, balance = _replica_loads(plan, 8)
    assert bool((loads > 0).all()) and balance < 1.5, balance
    assert _replica_loads(packed, 8)[1] > 4.5
    assert max(plan.loads) == max(packed.loads)  # one largest matrix on the busiest rank either way
    for p in (plan, packed):
        assert sum(p.sent_elements) == sum(minimum_elements(list(s.pieces), o) for s, o in zip(p.specs, p.owners))
    busiest, busiest_packed = max(plan.sent_elements), max(packed.sent_elements)
    assert busiest_packed > 5.5 * busiest, (busiest_packed, busiest)


def test_sub_meshes_with_flattened_dims_map_to_their_root_dims():
    """`_copies_of`: every copy of a sub-mesh in its root mesh, read from the ranks alone. On a
    (2, 2, 2) root of ranks 0-7 (dims a, b, c), rank 5's sub-meshes: "ac" = (a, c) flattened,
    ("a", "bc") with "bc" flattened, and "b"."""
    from muonkit.distributed import _copies_of

    root = torch.arange(8).view(2, 2, 2)
    assert _copies_of(torch.tensor([0, 1, 4, 5]), root).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert _copies_of(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), root).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    assert _copies_of(torch.tensor([5, 7]), root).tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # A flattened dim's pieces are its own chunks: 5 rows on "ac" (4 ranks) are 2, 2, 1, 0 rows, not
    # chunks of chunks (3 = 2 + 1, 2 = 1 + 1); the copies along b replicate them.
    copies = _copies_of(torch.tensor([0, 1, 4, 5]), root)
    pieces = pieces_of((5, 3), copies, (("R",), ("S", 0)))
    assert [piece_numel(pieces[r]) // 3 for r in (0, 1, 4, 5)] == [2, 2, 1, 0]
    assert all(pieces[r] == pieces[r - 2] for r in (2, 3, 6, 7))
    with pytest.raises(ValueError, match="no slice of its root mesh"):
        _copies_of(torch.tensor([1, 0, 5, 4]), root)  # c before a: not a row-major flattening


def _sends(plan, relay):
    """Elements each rank sends in one step, from the plan's owners and senders alone: each sender
    its piece to the owner; then every holder but the owner gets its piece of the result, from the
    owner (direct), or, with `relay`, from the owner when it holds the owner's piece or sent its
    piece, else from the rank that sent that piece (which got it from the owner)."""
    sent = [0] * plan.world_size
    for i, owner in enumerate(plan.owners):
        for spec, senders in ((plan.specs[i], plan.senders[i]), (plan.moments[i], plan.moment_senders[i])):
            if spec is None or owner < 0:
                continue
            for piece, rank in senders.items():
                sent[rank] += piece_numel(piece)
            for rank, piece in enumerate(spec.pieces):
                if rank == owner or not piece_numel(piece):
                    continue
                direct = not relay or piece == spec.pieces[owner] or senders[piece] == rank
                sent[owner if direct else senders[piece]] += piece_numel(piece)
    return sent


def test_the_relay_spreads_the_owners_sends():
    """HSDP, 2 replicas x 4 shards, one 64 x 32 matrix (N = 2048, pieces of 512): the owner sends
    its replica the 3 pieces it lacked and its own piece to its counterpart: N (direct: (R S - 1)/S N
    = 3584); each of its replica's ranks sends its piece to the owner and forwards the result's piece
    to its counterpart: 1024. The total is unchanged (5120)."""
    by_rank = pieces_of((64, 32), torch.arange(8).view(2, 4), (("R",), ("S", 0)))
    plan = build_plan([_spec((64, 32), [by_rank[r] for r in range(8)])], [None], 8)
    assert plan.owners == [0]
    assert plan.sent_elements == _sends(plan, relay=True) == [2048, 1024, 1024, 1024, 0, 0, 0, 0]
    assert _sends(plan, relay=False) == [3584, 512, 512, 512, 0, 0, 0, 0]
    assert plan.traffic == [{("gather", torch.float32): 1536, ("return", torch.float32): 2048,
                             ("relay", torch.float32): 1536}]
    # Without replicas (FSDP, FSDP + TP) or with whole copies only (DDP) there is nothing to relay.
    for mesh, placements in ((torch.arange(8), (("S", 0),)), (torch.arange(8).view(2, 4), (("SS", 0, 4), ("S", 0))),
                             (torch.arange(8), (("R",),))):
        by_rank = pieces_of((64, 32), mesh, placements)
        plan = build_plan([_spec((64, 32), [by_rank[r] for r in range(8)])], [None], 8)
        assert plan.sent_elements == _sends(plan, relay=False) and ("relay", torch.float32) not in plan.traffic[0]


def test_owners_relaying_their_own_pieces_keep_the_return_inside_the_replica():
    """defer_relay's plan (owner_relays=True), HSDP 2 replicas x 4 shards, one 64 x 32 matrix owned by
    rank 0: the return sends only the 3 pieces the owner lacked to their senders (1536, replica 0),
    and the relay every copy in replica 1 (2048: the owner's own piece too); each rank sends what it
    sent before. Without replicas or with whole copies only (DDP) nothing moves to the relay."""
    by_rank = pieces_of((64, 32), torch.arange(8).view(2, 4), (("R",), ("S", 0)))
    spec = _spec((64, 32), [by_rank[r] for r in range(8)])
    before, plan = build_plan([spec], [None], 8), build_plan([spec], [None], 8, owner_relays=True)
    assert plan.owners == before.owners == [0] and plan.sent_elements == before.sent_elements
    assert plan.traffic == [{("gather", torch.float32): 1536, ("return", torch.float32): 1536,
                             ("relay", torch.float32): 2048}]
    steps = muonkit.plan.returns(spec, 0, plan.senders[0], owner_relays=True)
    assert all(r < 4 for phase, _, dst, _ in steps if phase == "return" for r in dst)
    assert sorted(r for phase, _, dst, _ in steps if phase == "relay" for r in dst) == [4, 5, 6, 7]
    for mesh, placements in ((torch.arange(8), (("S", 0),)), (torch.arange(8), (("R",),))):
        by_rank = pieces_of((64, 32), mesh, placements)
        spec = _spec((64, 32), [by_rank[r] for r in range(8)])
        assert build_plan([spec], [None], 8, owner_relays=True).traffic == build_plan([spec], [None], 8).traffic


def test_full_piece_and_empty_dims():
    assert full_piece((3, 0)) == (((0, 3),), ())
    assert piece_numel(full_piece((3, 0))) == 0


# ------------------------------------------------------------------------- the cached plan (1 rank)


def test_the_plan_is_reused_and_rebuilt_when_the_step_changes(one_rank_group):
    model = mesh_worker.make_model()
    opt = mesh_worker.make_optimizer(model, one_rank_group)
    mesh_worker.train_fixed(model, opt, range(3))
    assert opt._distributed.plans_built == 1  # one Muon group, three steps
    mesh_worker.set_grads(model, mesh_worker.fixed_grads(model, 3))
    model.layers[0].wq.weight.grad = None  # another list of stepping parameters
    opt.step()
    assert opt._distributed.plans_built == 2
    mesh_worker.train_fixed(model, opt, range(4, 5))  # back to every parameter: the cached plan
    assert opt._distributed.plans_built == 2
    for group in opt.param_groups:  # another dtype of the updates
        group["state_dtype"] = torch.float64
    mesh_worker.train_fixed(model, opt, range(5, 6))
    assert opt._distributed.plans_built == 3


def test_exchange_dtype_is_checked(one_rank_group):
    model = mesh_worker.make_model()
    with pytest.raises(ValueError, match="exchange_dtype"):
        mesh_worker.make_optimizer(model, one_rank_group, exchange_dtype=torch.int8)
    with pytest.raises(ValueError, match="exchange_dtype=torch.bfloat16 .* needs a process_group"):
        mesh_worker.make_optimizer(model, None, exchange_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- 4 gloo ranks


# The session's 4-rank spawn runs these (tests/conftest.py `spawned`), after the 1-process checkpoint
# "mesh_one" (resume_fsdp_tp_from_one) is saved in its folder.
SPAWN_JOBS = {4: [f"mesh_worker:{name}" for name in JOBS]}


@pytest.fixture(scope="module")
def runs(spawned):
    return {"ranks": spawned[4], "tmp": spawned["tmp"]}


def _result(runs, job):
    per_rank = [r[f"mesh_worker:{job}"] for r in runs["ranks"]]
    for value in per_rank:
        if isinstance(value, Exception):
            pytest.fail(f"{job} on 4 processes raised:\n{value}")
    return per_rank


def _assert_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key}: max diff {(got[key] - want[key]).abs().max():.3g}"


@pytest.fixture(scope="module")
def reference():
    return mesh_worker.reference()


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, *FLAT_KINDS])
def test_each_mesh_kind_equals_one_process_bit_for_bit(runs, reference, kind):
    for result in _result(runs, kind):
        _assert_equal(result["snapshot"], reference)


@pytest.mark.slow
def test_hsdp_newton_schulz_is_spread_over_both_replicas(runs):
    """Two matrices of equal cost on HSDP 2 x 2 (4 gloo ranks; replica 0: ranks 0 and 1, replica 1:
    ranks 2 and 3): one owner in each replica (ties to the lower rank put both in replica 0), so
    both replicas run Newton-Schulz; every rank has the same plan, the bytes are the minimum and
    each rank sends 2048 elements per step (a packed plan: 4096 from ranks 0 and 1, nothing from 2 and
    3), and the result is one process's bit for bit."""
    per_rank = _result(runs, "hsdp_few")
    plan = per_rank[0]["plan"]
    for result in per_rank:
        assert result["plan"].owners == plan.owners == [0, 2]
        assert result["sent"] == [4 * 2048] * mesh_worker.STEPS
        assert sum(r["sent"][0] for r in per_rank) == result["minimum"]
        _assert_equal(result["snapshot"], mesh_worker.reference_few())
    assert sum(plan.loads[:2]) == sum(plan.loads[2:]) > 0
    packed = build_plan(plan.specs, plan.moments, 4, order=range(4))
    assert packed.owners == [0, 1] and packed.sent_elements == [4096, 4096, 0, 0]


@pytest.mark.slow
def test_the_placements_are_the_ones_named(runs):
    hsdp, fsdp_tp, ep = (_result(runs, kind)[0]["placements"] for kind in ("hsdp", "fsdp_tp", "ep"))
    assert hsdp["layers.0.wq.weight"] == "(Replicate(), Shard(dim=0))"
    assert fsdp_tp["layers.0.wq.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert fsdp_tp["layers.0.wo.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert fsdp_tp["layers.0.experts"] == "(Shard(dim=0),)"  # on the dp sub-mesh
    assert ep == {"layers.0.experts": "(Replicate(), Shard(dim=0))", "layers.1.experts": "(Shard(dim=0), Shard(dim=0))"}


@pytest.mark.slow
def test_the_flattened_sub_meshes_are_the_ones_named(runs):
    """The flattened jobs place parameters on flattened dims (no named root dim of theirs)."""
    got = {kind: _result(runs, kind)[0] for kind in FLAT_KINDS}
    assert got["flat_fsdp"]["meshes"]["layers.0.wq.weight"] == ("dp",)
    assert got["flat_fsdp"]["placements"]["layers.0.wq.weight"] == "(Shard(dim=0),)"
    for kind in ("hsdp_cp", "hsdp_cp_2x2"):
        assert got[kind]["meshes"]["layers.0.wq.weight"] == ("dp_replicate", "dp_shard_cp")
        assert got[kind]["placements"]["layers.0.wq.weight"] == "(Replicate(), Shard(dim=0))"
    tp = got["flat_fsdp_tp"]
    assert tp["meshes"]["layers.0.wq.weight"] == ("dp", "tp")
    assert tp["placements"]["layers.0.wq.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert tp["meshes"]["layers.0.odd.weight"] == ("dp",)  # 2 of the 4 ranks: replicated over "tp"
    assert tp["placements"]["layers.0.odd.weight"] == "(Shard(dim=0),)"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, *FLAT_KINDS, "hsdp__normuon", "fsdp_tp__normuon", "fsdp_tp__adamuon"])
def test_bytes_sent_equal_the_minimum(runs, kind):
    per_rank = _result(runs, kind)
    for step in range(mesh_worker.STEPS):
        assert sum(r["sent"][step] for r in per_rank) == per_rank[0]["minimum"], (step, [r["sent"] for r in per_rank])
    for result in per_rank:
        assert result["plans_built"] == 1
    # Balanced: no rank sends more than 1.6x the mean.
    sent = [r["sent"][0] for r in per_rank]
    assert max(sent) <= 1.6 * sum(sent) / len(sent), sent


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, *FLAT_KINDS, "hsdp__normuon", "fsdp_tp__normuon", "fsdp_tp__adamuon"])
def test_each_rank_sends_what_the_plan_says(runs, kind):
    """Per rank and step, measured bytes_sent = 4 x the plan's sent_elements (float32) = the relayed
    exchange computed from the plan's owners and senders (`_sends`)."""
    per_rank = _result(runs, kind)
    plan = per_rank[0]["plan"]
    want = [4 * e for e in plan.sent_elements]
    assert want == [4 * e for e in _sends(plan, relay=True)]
    for step in range(mesh_worker.STEPS):
        assert [r["sent"][step] for r in per_rank] == want, step


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hsdp", "hsdp_cp_2x2", "hsdp__normuon", "flat_fsdp_tp"])
def test_the_relay_lowers_the_busiest_ranks_bytes(runs, kind):
    """Where pieces have replicas (HSDP 2 x 2; FSDP + TP's matrices on "dp" alone) the relay moves
    the owners' sends to the replicas' ranks: the busiest rank sends less than with a direct return
    (computed from the same plan), the total is the same."""
    per_rank = _result(runs, kind)
    plan = per_rank[0]["plan"]
    measured = [r["sent"][0] for r in per_rank]
    direct = [4 * e for e in _sends(plan, relay=False)]
    assert sum(measured) == sum(direct) == per_rank[0]["minimum"]
    assert max(measured) < max(direct), (measured, direct)


@pytest.mark.slow
@pytest.mark.parametrize(("job", "kind"), [("buckets", "fsdp_tp"), ("buckets_hsdp", "hsdp")])
def test_small_buckets_overlap_and_change_nothing(runs, reference, job, kind):
    """4 KiB buckets: each bucket's gather is started before the previous bucket's matrices are
    orthogonalized, and its return left in flight (HSDP: relayed once the next bucket's return is
    started); the result and every rank's bytes are the same as with one bucket."""
    per_rank = _result(runs, job)
    for result in per_rank:
        assert result["buckets"][0] >= 10, result["buckets"]
        _assert_equal(result["snapshot"], reference)
    assert [sum(r["sent"][s] for r in per_rank) for s in range(mesh_worker.STEPS)] == [per_rank[0]["minimum"]] * 3
    assert [r["sent"] for r in per_rank] == [r["sent"] for r in _result(runs, kind)]


@pytest.mark.slow
def test_experts_are_orthogonalized_where_they_live(runs):
    """Expert parallel: only the plain (replicated) matrices travel; the experts add nothing."""
    per_rank = _result(runs, "ep")
    model = mesh_worker.make_model()
    plain = sum(4 * p.numel() for g in muonkit.param_groups(model) if g["use_muon"] for p in g["params"] if p.ndim == 2)
    assert sum(r["sent"][0] for r in per_rank) == 3 * plain  # each owner to the 3 other ranks


@pytest.mark.slow
@pytest.mark.parametrize("job", VARIANT_JOBS)
def test_variants_on_new_placements_equal_one_process(runs, job):
    variant = job.split("__")[1]
    want = mesh_worker.reference(variant=variant)
    for result in _result(runs, job):
        _assert_equal(result["snapshot"], want)


@pytest.mark.slow
def test_a_layout_cutting_sharded_rows_into_blocks_with_second_moments_equals_one_process(runs):
    """A layout that cuts dim 0 into blocks (routing's per-head reading of a fused q/k/v Linear) on
    HSDP pieces that cut through the blocks, with NorMuon (a second moment per row): equal to one
    process bit for bit. The step read each rank's piece of the second moment through the layout,
    which cuts the full tensor's rows: a reshape error when the piece's rows were no multiple of the
    block count."""
    model = mesh_worker.make_model()
    opt = mesh_worker.blocked_optimizer(model, variant="normuon")
    mesh_worker.train_fixed(model, opt, range(mesh_worker.STEPS))
    want = worker.snapshot(model, opt)
    for result in _result(runs, "hsdp_blocks"):
        _assert_equal(result, want)


@pytest.mark.slow
def test_8bit_momentum_on_rowwise_pieces_equals_one_process(runs):
    """momentum_bits=8 on FSDP + TP, wo and w2 rowwise ((Shard(0), Shard(1)): each tp rank holds half
    of every row, so half of each block): parameters, codes and scales (full tensors) equal one
    process's bit for bit; every tp rank keeps its rows' whole scales ((Shard(0), Replicate()))."""
    want = mesh_worker.reference(variant="muon8bit")
    for result in _result(runs, "fsdp_tp_muon8bit"):
        assert result["placements"] == {"momentum_codes": "(Shard(dim=0), Shard(dim=1))",
                                        "momentum_scales": "(Shard(dim=0), Replicate())"}
        assert "layers.0.wo.weight.momentum_scales" in want
        _assert_equal(result["snapshot"], want)


@pytest.mark.slow
def test_8bit_momentum_on_rowwise_pieces_without_rows_equals_one_process(runs):
    """FSDP over rowwise TP with fewer rows than dp ranks: the ranks holding no row of a weight
    agree its scales too (their empty pieces raised inside the step while the others waited)."""
    want = mesh_worker.few_rows_8bit(mesh_worker.make_few_rows())
    for rank, result in enumerate(_result(runs, "fsdp_tp_muon8bit_few_rows")):
        assert result["local"] == ([(1, 32), (2, 2050)] if rank < 2 else [(0, 32), (1, 2050)])
        _assert_equal(result["snapshot"], want)


@pytest.mark.slow
def test_switching_momentum_bits_on_rowwise_pieces_equals_one_process(runs):
    model = mesh_worker.make_model()
    want = mesh_worker.switch_bits(model, mesh_worker.make_optimizer(model))
    for result in _result(runs, "fsdp_tp_switch_bits"):
        _assert_equal(result, want)


@pytest.fixture(scope="module")
def reference_resumed_8bit():
    return mesh_worker.reference(steps=2 * mesh_worker.STEPS, variant="muon8bit")


@pytest.mark.slow
@pytest.mark.parametrize("job", CHECKPOINTS_8BIT)
def test_8bit_checkpoints_of_rowwise_pieces_reshard(runs, reference_resumed_8bit, job):
    _result(runs, "fsdp_tp_muon8bit")
    for result in _result(runs, job):
        _assert_equal(result, reference_resumed_8bit)


@pytest.mark.slow
def test_8bit_checkpoint_of_rowwise_pieces_resumes_on_one_process(runs, reference_resumed_8bit):
    _result(runs, "fsdp_tp_muon8bit")
    model = mesh_worker.make_model()
    opt = mesh_worker.make_optimizer(model, variant="muon8bit")
    load_checkpoint(runs["tmp"] / "mesh_fsdp_tp__muon8bit", model, opt)
    mesh_worker.train_fixed(model, opt, range(mesh_worker.STEPS, 2 * mesh_worker.STEPS))
    _assert_equal(worker.snapshot(model, opt), reference_resumed_8bit)


@pytest.mark.slow
def test_bfloat16_exchange_halves_the_bytes_and_replicas_agree(runs, reference):
    per_rank = _result(runs, "bf16")
    fsdp_tp = _result(runs, "fsdp_tp")
    assert sum(r["sent"][0] for r in per_rank) * 2 == sum(r["sent"][0] for r in fsdp_tp)
    for result in per_rank:
        for snapshot in (result["snapshot"], result["hsdp_snapshot"]):
            assert any(not torch.equal(snapshot[key], want) for key, want in reference.items())  # rounded
            for key, want in reference.items():
                torch.testing.assert_close(snapshot[key], want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # HSDP replicas: ranks 0 and 2 (and 1 and 3) hold the same pieces, and the same bits.
    for a, b in ((0, 2), (1, 3)):
        for name, value in per_rank[a]["hsdp_local"].items():
            assert torch.equal(value, per_rank[b]["hsdp_local"][name]), name


@pytest.mark.slow
def test_every_rank_takes_the_same_decision(runs):
    for rank, result in enumerate(_result(runs, "safety")):
        assert result["skipped"] == 1, rank
        assert result["missing"] is not None and "'layers.1.w2.weight'" in result["missing"], rank
        assert ("here: no gradient" if rank == 1 else "here: a gradient") in result["missing"], rank
        assert result["unchanged"], rank
        assert result["rebuilt"] == 1 and result["reused_old"] == 1, rank


@pytest.mark.slow
def test_dim0_slices_of_tensors_that_are_no_parameter(runs):
    """update_many(..., slices): one owner assembles 10 rows from slices of 3, 0, 5 and 2 and returns
    each rank its rows; sent: 2 (10 - 5) rows of 16 floats per tensor, 3 tensors."""
    per_rank = _result(runs, "row_slices")
    assert all(r["equal"] for r in per_rank)
    assert sum(r["sent"] for r in per_rank) == 3 * 2 * (10 - 5) * 16 * 4


@pytest.mark.slow
@pytest.mark.parametrize("job", ["qkclip_fsdp_tp", "qkclip_flat_fsdp_tp"])
def test_qkclip_on_fsdp_over_tensor_parallel_pieces(runs, job):
    want = worker.qkclip_reference()
    for result in _result(runs, job):
        assert result["placements"][0] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert result["maxima"] == want["maxima"]
        for name, value in want["weights"].items():
            assert torch.equal(result["weights"][name], value), name


@pytest.fixture(scope="module")
def reference_resumed():
    return mesh_worker.reference(steps=2 * mesh_worker.STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("job", [name for name in CHECKPOINTS if name.startswith("resume_")])
def test_checkpoints_reshard_between_meshes(runs, reference_resumed, job):
    _result(runs, "checkpoint_save_hsdp")
    _result(runs, "checkpoint_save_fsdp_tp")
    for result in _result(runs, job):
        _assert_equal(result, reference_resumed)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hsdp", "fsdp_tp"])
def test_mesh_checkpoints_resume_on_one_process(runs, reference_resumed, source):
    _result(runs, f"checkpoint_save_{source}")
    model = mesh_worker.make_model()
    opt = mesh_worker.make_optimizer(model)
    load_checkpoint(runs["tmp"] / f"mesh_{source}", model, opt)
    mesh_worker.train_fixed(model, opt, range(mesh_worker.STEPS, 2 * mesh_worker.STEPS))
    _assert_equal(worker.snapshot(model, opt), reference_resumed)


@pytest.mark.slow
@pytest.mark.parametrize(("job", "variant"), [("deferred_hsdp", "muon"), ("deferred_hsdp_prefetch", "muon"),
                                              ("deferred_hsdp_grouped", "muon"), ("deferred_hsdp__normuon", "normuon")])
def test_deferred_relay_equals_the_step_and_one_process_bit_for_bit(runs, job, variant):
    """Forward/backward on HSDP 2 x 2: with and without defer_relay the same losses every step as one
    process, the same parameters once each forward has run (none waiting: the model's forward hook
    applies what its modules did not, layer 1's when the forward skips it), and the same snapshot
    at the end (after finish()). A step with no forward before it applies what still waits first.
    The prefetch job has each FSDP module all-gather the next one in its pre-forward; the grouped
    job shards both layers as one FSDP group (layer 0's pre-forward gathers layer 1)."""
    reference = mesh_worker.reference_trained(variant)
    for rank, result in enumerate(_result(runs, job)):
        for step, (a, b, one) in enumerate(zip(result["losses_a"], result["losses_b"], reference["losses"])):
            assert torch.equal(a, one) and torch.equal(b, one), (rank, step, float(a), float(b), float(one))
        assert result["equal_after_forward"] == [(0, True)] * (mesh_worker.DEFER_STEPS - 2), rank
        waiting, after = result["pending_before_forwardless_step"]
        assert waiting > 0 and after == waiting, rank  # applied by the step, not before
        _assert_equal(result["snapshot_b"], result["snapshot_a"])
        _assert_equal(result["snapshot_a"], reference["snapshot"])
        assert result["sent"][0] == result["sent"][1], rank  # the same bytes, in other phases


@pytest.mark.slow
@pytest.mark.parametrize("job", ["deferred_hsdp", "deferred_hsdp__normuon"])
def test_deferred_relay_is_applied_by_the_forward_of_its_module(runs, job):
    """After step 0 every rank has parameters waiting for their relay, still holding their old values
    (read directly: not guarded); inside layer 0's forward of step 1 layer 0's waiting parameters
    hold their new values and, on some rank, a layer-1 one still its old value (its bucket not
    waited for yet)."""
    old_in_layer1 = 0
    for rank, result in enumerate(_result(runs, job)):
        assert result["waiting"], f"rank {rank} received nothing by relay"
        for name in result["waiting"]:
            assert torch.equal(result["after_step0"][name], result["before_step0"][name]), (rank, name)
            assert not torch.equal(result["after_step0"][name], result["after_step0_a"][name]), (rank, name)
            probed = result["probe"][name]
            if name.startswith("layers.0."):
                assert torch.equal(probed, result["after_step0_a"][name]), (rank, name)
            else:
                old_in_layer1 += torch.equal(probed, result["before_step0"][name])
    assert old_in_layer1 > 0


@pytest.mark.slow
@pytest.mark.parametrize("job", DEFERRED)
def test_state_dicts_right_after_a_deferred_step_equal_the_steps(runs, job):
    """model.state_dict() (after step 1) and the optimizer's state_dict() (after the last step), taken
    while updates wait, apply them first: equal to the undeferred model's and optimizer's."""
    for rank, result in enumerate(_result(runs, job)):
        for key in ("model_state_dict_equal", "optim_state_dict_equal"):
            waiting, equal, finished = result[key]
            assert waiting and equal and finished, (rank, key, result[key])


@pytest.mark.slow
def test_deferred_relay_through_a_training_loops_usual_calls(runs):
    """defer_relay under an LR scheduler stepped between step() and the next forward (lr 1, 1/2,
    1/3, ...: a waiting update applied at the scheduler's new lr would differ), two accumulated
    forwards per step, an evaluation under torch.no_grad, a forward that raises after the root's
    pre-forward (the layers' updates still wait, the next forward applies them) and a step skipped
    for a NaN gradient (nonfinite="skip"): every loss and the evaluation equal the undeferred
    model's, and so do the parameters and optimizer state at the end, bit for bit
    (mesh_worker.deferred_hsdp_usage)."""
    for result in _result(runs, "deferred_hsdp_usage"):
        assert all(result["losses_equal"]) and len(result["losses_equal"]) == 10
        assert result["eval_equal"] is True
        assert result["waiting"][3] == 0 and all(n > 0 for i, n in enumerate(result["waiting"]) if i != 3), result
        assert result["waiting_after_failure"] > 0
        assert result["skipped"] == [1, 1]
        _assert_equal(result["snapshot_b"], result["snapshot_a"])


@pytest.mark.slow
def test_checkpoints_right_after_a_deferred_step_apply_the_updates_first(runs):
    """save_checkpoint while updates wait writes the state with them (loaded on one process: the
    state the 4 ranks held once finished); load_checkpoint while updates wait applies them first, so
    none lands on the loaded parameters (after finish() the state is the checkpoint's)."""
    results = _result(runs, "deferred_hsdp")
    for rank, result in enumerate(results):
        for key in ("save", "load"):
            waiting, after = result[key]
            assert waiting > 0 and after == 0, (rank, key, result[key])
        _assert_equal(result["loaded"], result["saved"])
    model = mesh_worker.make_model()
    opt = mesh_worker.make_optimizer(model)
    load_checkpoint(runs["tmp"] / "mesh_deferred", model, opt)
    _assert_equal(worker.snapshot(model, opt), results[0]["saved"])


@pytest.mark.slow
def test_spawned_mesh_jobs_are_quick(runs):
    """Every mesh job's CPU time per rank under 40 s (CPU time: wall-clock time grows with the machine's load)."""
    for name in JOBS:
        assert max(r[f"mesh_worker:{name}.cpu_seconds"] for r in runs["ranks"]) < 40.0, name


# ---------------------------------------------------------------------- the torchrun example


def _losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step\s+(\d+)\s+train loss ([\d.]+)", output)}


@pytest.mark.slow
def test_torchrun_llama_fsdp_tp_trains_and_resumes_across_a_reshard(tmp_path, train_distributed):
    """torchtitan's recipe on (dp 2, tp 2), then the checkpoint resharded onto HSDP on 2 processes
    (2 replicas x 1 shard; 2 x 2 HSDP resharding is mesh_worker's, in the spawned jobs) and onto one
    process; the loss falls and each resumed run starts at step 5. The HSDP run takes --defer-relay
    (hooked up under torchrun; with one shard per replica there is no relay phase to defer: the
    deferred steps are mesh_worker.deferred_hsdp's)."""
    checkpoint = tmp_path / "llama"
    first = train_distributed(4, "--mesh", "fsdp+tp", "--steps", "4", "--checkpoint", str(checkpoint))
    losses = _losses(first)
    assert "llama, fsdp+tp, 4 processes" in first and sorted(losses) == [1, 2, 3, 4], first
    assert losses[4] < losses[1] - 0.1, losses
    for processes, mesh, extra in ((2, "hsdp", ["--defer-relay"]), (1, "fsdp", [])):
        resumed = _losses(train_distributed(processes, "--mesh", mesh, "--steps", "6", "--resume", str(checkpoint), *extra))
        assert sorted(resumed) == [5, 6] and max(resumed.values()) < losses[1] - 0.1, (mesh, resumed)


@pytest.mark.slow
def test_torchrun_llama_expert_parallel_resumes_on_one_process(tmp_path, train_distributed):
    checkpoint = tmp_path / "moe"
    first = train_distributed(2, "--mesh", "ep", "--steps", "3", "--checkpoint", str(checkpoint))
    losses = _losses(first)
    assert "llama, ep, 2 processes" in first and losses[3] < losses[1], losses
    resumed = _losses(train_distributed(1, "--mesh", "ep", "--steps", "5", "--resume", str(checkpoint)))
    assert sorted(resumed) == [4, 5] and max(resumed.values()) < losses[1], resumed
