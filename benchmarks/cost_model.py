"""A cost model of distributed Muon's optimizer step at scale: Newton-Schulz work per owner and the
bytes of the exchange, as a share of the training step. docs/scaling.md states the assumptions and
holds the tables this script prints; benchmarks/bench_distributed.py and tests/test_cost_model.py
use the same functions.

    python benchmarks/cost_model.py                  # docs/scaling.md's tables, in markdown
    python benchmarks/cost_model.py --write docs/scaling.md   # regenerate them there
    python benchmarks/cost_model.py --ns-efficiency 0.25 --link-efficiency 0.5   # a pessimistic reading

Pure arithmetic (nothing runs on a GPU or over a network). The Newton-Schulz work of a matrix is
muonkit.distributed.newton_schulz_flops, owners follow the rule of muonkit.distributed.assign_owners
(restricted to the ranks holding a largest piece), and shards split as torch.chunk splits them
(muonkit.distributed.shard_sizes), so the model counts what the library schedules.

The exchange, per Muon tensor of N elements held as pieces p_r on W ranks, one owner o over all
ranks (muonkit.plan's counting, which `Muon.bytes_sent` follows since issue 21):
the owner receives the pieces it lacks, N - p_o elements, each from one holder (gather), and every
other holder gets its piece of the result, sum_{r != o} p_r (return, relay): the owner sends each
piece it lacked to the holder that sent it and its own piece to that piece's other holders, and
each of those senders forwards its piece to the piece's other holders (muonkit.plan.returns). Per
mesh kind:

- fsdp: Shard(0) over W ranks; 2 (W - 1) / W N per tensor over all ranks.
- fsdp+tp: FSDP over W / T ranks x tensor parallel over the T ranks of a node; the same bytes, W pieces.
- hsdp: Replicate over R nodes x Shard(0) over the S ranks of a node; the owner gathers the S - 1
  pieces it lacks (from its own replica, its node), returns them there and its own piece to its R - 1
  copies, and each rank of its replica forwards its piece to its R - 1 copies: (R S + S - 2) / S N
  in all, the owner sending N instead of (R S - 1) / S N.
- ep: fsdp for the tensors that are not experts; a stack of experts sharded on its expert axis (over
  min(W, experts) ranks, replicated beyond) is orthogonalized where it lives: no bytes.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from muonkit.distributed import assign_owners, newton_schulz_flops, shard_sizes

NS_STEPS = 5  # muonkit's default ns_steps
BEGIN, END = "<!-- COST-MODEL:BEGIN -->", "<!-- COST-MODEL:END -->"  # the generated block of docs/scaling.md
MeshKind = Literal["fsdp", "hsdp", "fsdp+tp", "ep"]
MESH_KINDS = ("fsdp", "hsdp", "fsdp+tp", "ep")


# ------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Weight:
    """One Muon tensor at its full shape: (rows, cols), or (experts, rows, cols) for a stack of
    experts; `tp` says how tensor parallelism splits it (colwise: Shard(0), rowwise: Shard(1))."""

    name: str
    shape: tuple[int, ...]
    tp: Literal["colwise", "rowwise", "none"] = "colwise"
    expert: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def batch(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def flops(self, steps: int = NS_STEPS) -> float:
        """Newton-Schulz FLOPs of one optimizer step on this tensor (`steps` quintic iterations)."""
        return steps * newton_schulz_flops(self.batch, *self.shape[-2:])


@dataclass(frozen=True)
class Model:
    """A decoder-only transformer's shapes. Dense Llama-like blocks (q, k, v, o, gate, up, down), a
    GPT-2 block (fused qkv, proj, fc, fc_proj; `gated=False`), or a mixture of experts (`experts` > 0:
    attention as Llama's, a router, and stacked gate / up / down experts of width `expert_ffn`)."""

    name: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool = True
    positions: int = 0  # learned position embeddings (GPT-2)
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    qk_norm: bool = False
    source: str = ""

    def block(self) -> list[Weight]:
        """The Muon tensors of one block."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if not self.gated:
            return [Weight("qkv", (q + 2 * kv, h)), Weight("proj", (h, q), "rowwise"),
                    Weight("fc", (self.ffn, h)), Weight("fc_proj", (h, self.ffn), "rowwise")]
        attention = [Weight("q", (q, h)), Weight("k", (kv, h)), Weight("v", (kv, h)), Weight("o", (h, q), "rowwise")]
        if self.experts:
            e, f = self.experts, self.expert_ffn
            return attention + [
                Weight("router", (e, h), "none"),
                Weight("experts.gate", (e, f, h), "none", expert=True),
                Weight("experts.up", (e, f, h), "none", expert=True),
                Weight("experts.down", (e, h, f), "none", expert=True),
            ]
        return attention + [Weight("gate", (self.ffn, h)), Weight("up", (self.ffn, h)),
                            Weight("down", (h, self.ffn), "rowwise")]

    def weights(self) -> list[Weight]:
        """Every Muon tensor of the model (embeddings, head, norms and biases go to AdamW)."""
        return [replace(w, name=f"layers.{i}.{w.name}") for i in range(self.layers) for w in self.block()]

    def params(self) -> int:
        """All parameters: Muon tensors, embeddings, the head (unless tied), norms and biases."""
        h = self.hidden
        if self.gated:
            norms = self.layers * (2 * h + (2 * self.head_dim if self.qk_norm else 0)) + h
        else:  # LayerNorm gains and biases, and the Linear biases
            biases = sum(w.shape[0] for w in self.block())
            norms = self.layers * (4 * h + biases) + 2 * h
        embeddings = (self.vocab + self.positions) * h + (0 if self.tied else self.vocab * h)
        return sum(w.numel for w in self.weights()) + embeddings + norms

    def active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to."""
        if not self.experts:
            return self.params()
        idle = sum(w.numel for w in self.weights() if w.expert) * (self.experts - self.top_k) // self.experts
        return self.params() - idle


# Real shapes, from each model's published config.json.
MODELS = {
    "gpt2": Model("GPT-2 small", hidden=768, layers=12, ffn=3072, heads=12, kv_heads=12, head_dim=64,
                  vocab=50257, tied=True, gated=False, positions=1024, source="openai-community/gpt2"),
    "llama-1b": Model("Llama-1B", hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8, head_dim=64,
                      vocab=128256, tied=True, source="meta-llama/Llama-3.2-1B"),
    "llama-8b": Model("Llama-8B", hidden=4096, layers=32, ffn=14336, heads=32, kv_heads=8, head_dim=128,
                      vocab=128256, tied=False, source="meta-llama/Llama-3.1-8B"),
    "llama-70b": Model("Llama-70B", hidden=8192, layers=80, ffn=28672, heads=64, kv_heads=8, head_dim=128,
                       vocab=128256, tied=False, source="meta-llama/Llama-3.1-70B"),
    "moe-30b-a3b": Model("MoE-30B-A3B", hidden=2048, layers=48, ffn=0, heads=32, kv_heads=4, head_dim=128,
                         vocab=151936, tied=False, experts=128, top_k=8, expert_ffn=768, qk_norm=True,
                         source="Qwen/Qwen3-30B-A3B"),
}


# ------------------------------------------------------------------------------------ hardware


@dataclass(frozen=True)
class Hardware:
    """The machine and training-step assumptions (docs/scaling.md, "Assumptions")."""

    peak_flops: float = 989e12  # H100 SXM, dense bfloat16 tensor-core peak
    ns_efficiency: float = 0.5  # the fraction of peak Newton-Schulz's bf16 GEMMs achieve
    mfu: float = 0.4  # model FLOPs utilization of the training step
    nvlink: float = 450e9  # NVLink 4, bytes/s per direction per GPU
    infiniband: float = 50e9  # one NDR 400 Gb/s port per GPU, bytes/s per direction
    link_efficiency: float = 0.8  # the fraction of those line rates a collective achieves
    hbm: float = 3.35e12  # H100 SXM HBM3, bytes/s
    elementwise_bytes: int = 20  # per Muon element: gradient read, momentum and parameter read + write
    tokens: int = 4 * 2**20  # a 4M-token batch per step

    def training_step(self, model: Model, world: int) -> float:
        """Seconds of one training step: 6 N_active tokens FLOPs at `mfu` of every GPU's peak."""
        return 6 * model.active_params() * self.tokens / (world * self.mfu * self.peak_flops)


# ------------------------------------------------------------------------------------ meshes


@dataclass(frozen=True)
class Mesh:
    """W ranks, `gpus_per_node` consecutive ranks per node. `inner` is the shard group of hsdp and
    the tensor-parallel size of fsdp+tp, ranks of one node (rank = outer index * inner + inner index)."""

    kind: MeshKind
    world: int
    inner: int = 8
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.kind not in MESH_KINDS:
            raise ValueError(f"mesh kind must be one of {', '.join(MESH_KINDS)}, got {self.kind!r}")
        if self.kind in ("hsdp", "fsdp+tp") and self.world % self.inner:
            raise ValueError(f"a {self.kind} mesh needs world ({self.world}) divisible by inner ({self.inner})")

    def label(self) -> str:
        return {"fsdp": "FSDP", "hsdp": f"HSDP ({self.world // self.inner} x {self.inner})",
                "fsdp+tp": f"FSDP + TP{self.inner}", "ep": "FSDP + EP"}[self.kind]


def pieces(w: Weight, mesh: Mesh) -> np.ndarray:
    """Elements of `w` each rank holds (int64, one per rank)."""
    W, inner_numel = mesh.world, math.prod(w.shape[1:])
    if mesh.kind in ("fsdp", "ep"):
        return np.array(shard_sizes(w.shape[0], W), dtype=np.int64) * inner_numel
    if mesh.kind == "hsdp":
        sizes = np.array(shard_sizes(w.shape[0], mesh.inner), dtype=np.int64) * inner_numel
        return np.tile(sizes, W // mesh.inner)
    # fsdp+tp: tensor parallel over the inner ranks, then FSDP's Shard(0) over the outer ones
    # (of the tensor-parallel shard: the _StridedShard layout of parallelize_module + fully_shard).
    T, D = mesh.inner, W // mesh.inner
    if len(w.shape) != 2 or w.tp not in ("colwise", "rowwise"):
        raise ValueError(f"fsdp+tp models 2D colwise or rowwise tensors; {w.name} is {w.shape} ({w.tp})")
    rows, cols = w.shape
    if w.tp == "colwise":  # [d, t]: dp shard d of tensor-parallel shard t of the rows
        table = np.array([shard_sizes(part, D) for part in shard_sizes(rows, T)], dtype=np.int64).T * cols
    else:
        table = np.outer(shard_sizes(rows, D), shard_sizes(cols, T)).astype(np.int64)
    return table.reshape(-1)  # rank d * T + t


def in_place(w: Weight, mesh: Mesh) -> bool:
    """Whether `w` is orthogonalized where it lives (experts under expert parallelism)."""
    return mesh.kind == "ep" and w.expert


def local_experts(w: Weight, mesh: Mesh) -> np.ndarray:
    """Experts of the stack `w` each rank holds under expert parallelism: Shard(0) over
    ep = min(W, experts) ranks, replicated over the W / ep groups of them."""
    ep = min(mesh.world, w.shape[0])
    return np.resize(np.array(shard_sizes(w.shape[0], ep), dtype=np.int64), mesh.world)  # rank r holds slice r % ep


# ------------------------------------------------------------------------------------ the step


@dataclass
class Traffic:
    """Elements each rank sends and receives in one phase, within its node and across nodes."""

    sent_intra: np.ndarray
    sent_inter: np.ndarray
    recv_intra: np.ndarray
    recv_inter: np.ndarray

    @classmethod
    def zeros(cls, world: int) -> Traffic:
        return cls(*(np.zeros(world, dtype=np.int64) for _ in range(4)))

    def add_many(self, sources: np.ndarray, dst: int, elements: np.ndarray, node: int) -> None:
        """sources[k] sends elements[k] to dst."""
        near = sources // node == dst // node
        np.add.at(self.sent_intra, sources[near], elements[near])
        np.add.at(self.sent_inter, sources[~near], elements[~near])
        self.recv_intra[dst] += int(elements[near].sum())
        self.recv_inter[dst] += int(elements[~near].sum())

    def add(self, other: Traffic) -> None:
        for name in ("sent_intra", "sent_inter", "recv_intra", "recv_inter"):
            getattr(self, name)[:] += getattr(other, name)

    def add_from(self, src: int, destinations: np.ndarray, elements: np.ndarray, node: int) -> None:
        """src sends elements[k] to destinations[k]."""
        near = destinations // node == src // node
        self.sent_intra[src] += int(elements[near].sum())
        self.sent_inter[src] += int(elements[~near].sum())
        np.add.at(self.recv_intra, destinations[near], elements[near])
        np.add.at(self.recv_inter, destinations[~near], elements[~near])

    @property
    def sent(self) -> np.ndarray:
        return self.sent_intra + self.sent_inter

    def seconds(self, hw: Hardware, element_size: int) -> float:
        """The slowest rank's time, links full duplex: max over ranks of max(send, receive), where
        each direction moves its intra-node bytes over NVLink and its inter-node bytes over IB."""
        nv, ib = hw.nvlink * hw.link_efficiency, hw.infiniband * hw.link_efficiency
        send = self.sent_intra / nv + self.sent_inter / ib
        recv = self.recv_intra / nv + self.recv_inter / ib
        return float(np.max(np.maximum(send, recv))) * element_size


@dataclass
class Step:
    """One optimizer step of `weights` on `mesh`: owners, Newton-Schulz FLOPs per rank, and the
    elements of each exchange phase (multiply by the payload's element size for bytes)."""

    mesh: Mesh
    weights: list[Weight]
    owners: list[int]  # -1: orthogonalized in place
    ns_load: np.ndarray  # FLOPs per rank
    local: np.ndarray  # elements of Muon tensors each rank holds (its elementwise work)
    phases: dict[str, Traffic] = field(default_factory=dict)
    items: list[tuple[float, dict[str, Traffic]]] = field(default_factory=list)  # per exchanged tensor: FLOPs, phases

    def bytes_sent(self, element_size: int = 4) -> np.ndarray:
        """Bytes each rank sends in one step, counted as muonkit's `bytes_sent` counts them."""
        return sum((t.sent for t in self.phases.values()), np.zeros(self.mesh.world, dtype=np.int64)) * element_size

    def load_balance(self) -> float:
        """The busiest rank's Newton-Schulz FLOPs over the mean."""
        return float(self.ns_load.max() / self.ns_load.mean()) if self.ns_load.any() else 1.0

    def exchange_seconds(self, hw: Hardware, element_size: int = 4) -> float:
        return sum(t.seconds(hw, element_size) for t in self.phases.values())

    def ns_seconds(self, hw: Hardware) -> float:
        return float(self.ns_load.max()) / (hw.ns_efficiency * hw.peak_flops)

    def link_seconds(self, hw: Hardware, element_size: int = 4) -> float:
        """The busiest rank's link time over all phases together (its sends, or its receives): however
        the phases of different buckets overlap, the exchange takes at least this long."""
        nv, ib = hw.nvlink * hw.link_efficiency, hw.infiniband * hw.link_efficiency
        send = sum((t.sent_intra / nv + t.sent_inter / ib for t in self.phases.values()), np.zeros(self.mesh.world))
        recv = sum((t.recv_intra / nv + t.recv_inter / ib for t in self.phases.values()), np.zeros(self.mesh.world))
        return float(np.max(np.maximum(send, recv))) * element_size

    def chain_seconds(self, hw: Hardware, element_size: int = 4) -> float:
        """The longest chain of one exchanged tensor: its gather, its Newton-Schulz, its return and its
        relay, one after the other (each at its slowest rank). However well buckets overlap, a step
        takes at least this long."""
        rate = hw.ns_efficiency * hw.peak_flops
        return max((flops / rate + sum(t.seconds(hw, element_size) for t in phases.values())
                    for flops, phases in self.items), default=0.0)

    def elementwise_seconds(self, hw: Hardware) -> float:
        return float(self.local.max()) * hw.elementwise_bytes / hw.hbm


def spread_positions(world: int) -> np.ndarray:
    """Each rank's place in the order ties among equally loaded ranks go by: its bit-reversed number
    over ceil(log2 W) bits (muonkit.plan.spread_order; tests/test_cost_model.py checks they agree).
    The first owners of a step go one per node and one per replica instead of filling the first
    nodes."""
    bits = (world - 1).bit_length()
    keys = np.array([int(format(r, f"0{bits}b")[::-1] or "0", 2) for r in range(world)])
    positions = np.empty(world, dtype=np.int64)
    positions[np.argsort(keys, kind="stable")] = np.arange(world)
    return positions


def owners_by_load(
    costs: Sequence[float], candidates: Sequence[np.ndarray], loads: np.ndarray, order: np.ndarray | None = None
) -> tuple[list[int], np.ndarray]:
    """Each item's owner: largest cost first, onto the least-loaded of its candidate ranks (ties: fewer
    items, then the lower `order`, each rank's place in the tie order; default the rank itself);
    `loads` are the ranks' loads before (their local experts' work). With every rank a candidate,
    zero loads and the default order this is muonkit.distributed.assign_owners; with
    `spread_positions(W)` it is muonkit.plan.build_plan's rule (tests/test_cost_model.py checks both).
    Returns the owners and the final loads."""
    loads = np.array(loads, dtype=float)
    counts = np.zeros(len(loads), dtype=np.int64)
    order = np.arange(len(loads)) if order is None else np.asarray(order)
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        ranks = candidates[i]
        rank = int(ranks[np.lexsort((order[ranks], counts[ranks], loads[ranks]))[0]])
        owners[i] = rank
        loads[rank] += costs[i]
        counts[rank] += 1
    return owners, loads


def plan(weights: Sequence[Weight], mesh: Mesh, steps: int = NS_STEPS, *, today: bool = False,
         spread: bool = True, deferred: bool = False) -> Step:
    """Owners and the exchange of one step of `weights` on `mesh`.

    One owner per tensor over all W ranks, among the ranks holding a largest piece, by Newton-Schulz
    FLOPs on top of each rank's local expert work; ties among equally loaded ranks by
    `spread_positions` (`spread=False`: by rank, muonkit before the owners were spread). The owner
    receives every piece it lacks (one holder sends each: in hsdp the owner's own replica, then the
    one that has sent the least so far);
    every other holder gets its piece of the result from the owner ("return") or, in hsdp, from the
    rank of the owner's replica that holds the same shard ("relay"). `today=True`: muonkit before
    issue 21 (muonkit.distributed.assign_owners over all ranks, experts shipped whole; its 1D
    Shard(0) path, so only for fsdp meshes). `deferred=True`: muonkit.defer_relay's plan
    (muonkit.plan.returns with owner_relays): in hsdp the owner sends its own piece's copies in
    the relay phase instead of the return, so the return stays inside the owner's replica.
    """
    if today and mesh.kind != "fsdp":
        raise ValueError(f"before issue 21 muonkit refused {mesh.kind} meshes; today=True needs kind 'fsdp'")
    W, node = mesh.world, mesh.gpus_per_node
    weights = list(weights)
    for w in weights:
        if math.gcd(*w.shape[-2:]) % 8:
            # muonkit owns the tensors of such a shape together (muonkit.distributed); the model does not.
            raise ValueError(f"{w.name}: the model owns each tensor alone, which needs gcd(rows, cols) % 8 == 0; "
                             f"got {w.shape}")
    load = np.zeros(W)
    local = np.zeros(W, dtype=np.int64)
    for w in weights:
        if in_place(w, mesh):
            experts = local_experts(w, mesh)
            load += experts * (w.flops(steps) / w.batch)
            local += experts * (w.numel // w.batch)
    shared = [i for i, w in enumerate(weights) if not in_place(w, mesh)]
    held = {i: pieces(weights[i], mesh) for i in shared}
    costs = [weights[i].flops(steps) for i in shared]
    if today:
        chosen = assign_owners(costs, W)
        load += np.bincount(chosen, weights=costs, minlength=W)
    else:
        candidates = [np.flatnonzero(held[i] == held[i].max()) for i in shared]
        chosen, load = owners_by_load(costs, candidates, load, spread_positions(W) if spread else None)
    owners = [-1] * len(weights)
    items: list[tuple[float, dict[str, Traffic]]] = []
    gathered = np.zeros(W, dtype=np.int64)  # gather payload each rank has sent so far
    for i, owner in zip(shared, chosen):
        # Each tensor's traffic alone (for its chain: gather, Newton-Schulz, return, relay), then summed.
        gather, back, relay = Traffic.zeros(W), Traffic.zeros(W), Traffic.zeros(W)
        items.append((weights[i].flops(steps), {"gather": gather, "return": back, "relay": relay}))
        owners[i] = owner
        p = held[i]
        local += p
        everyone = np.flatnonzero(p)
        everyone = everyone[everyone != owner]
        if mesh.kind == "hsdp":
            # Each shard index's piece the owner lacks comes from one of its holders (one per
            # replica): one in the owner's block of D consecutive ranks (D = the number of distinct
            # non-empty pieces; the owner's own replica), then the one that has sent the least gather
            # payload so far, then the lowest rank (muonkit.plan's rule).
            S = mesh.inner
            block = max(1, int(np.count_nonzero(p[:S])))
            senders = np.array([_sender(np.arange(j, W, S), owner, block, gathered) for j in range(S)
                                if j != owner % S and p[j]], dtype=np.int64)
            gather.add_many(senders, owner, p[senders], node)
            # The result: each piece the owner lacked back to its sender, the owner's own piece to its
            # copies in the other replicas; each sender forwards its piece to its copies.
            copies = np.arange(owner % S, W, S)
            copies = copies[copies != owner]
            if deferred and len(senders):
                back.add_from(owner, senders, p[senders], node)
                relay.add_from(owner, copies, p[copies], node)
            else:
                back.add_from(owner, np.concatenate([senders, copies]), np.concatenate([p[senders], p[copies]]), node)
            for sender in senders:
                others = np.arange(sender % S, W, S)
                others = others[others != sender]
                relay.add_from(int(sender), others, p[others], node)
        else:
            gather.add_many(everyone, owner, p[everyone], node)
            back.add_from(owner, everyone, p[everyone], node)
        gathered += gather.sent
    phases = {name: Traffic.zeros(W) for name in ("gather", "return", "relay")}
    for _, item in items:
        for name, traffic in item.items():
            phases[name].add(traffic)
    if not phases["relay"].sent.any():
        del phases["relay"]
    return Step(mesh, weights, owners, load, local, phases, items)


def _sender(holders: np.ndarray, owner: int, block: int, sent: np.ndarray) -> int:
    """The holder that sends a piece to `owner`: one in the owner's block of `block` consecutive ranks,
    then the least sent so far, then the lowest rank."""
    return int(holders[np.lexsort((holders, sent[holders], holders // block != owner // block))[0]])


# ------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Cell:
    """One model on one mesh: seconds of each part of the optimizer step and its share of the step.
    `exchange` and `chain` with a float32 payload (muonkit's default), the `_bf16` ones with
    `exchange_dtype=torch.bfloat16`."""

    model: Model
    mesh: Mesh
    training_step: float
    ns: float
    load_balance: float
    bytes_sent_max: float  # the busiest rank's bytes per step, float32 payload
    exchange: float
    exchange_bf16: float
    link: float  # the busiest rank's link time, all phases together
    link_bf16: float
    chain: float  # the longest chain of one tensor (gather, Newton-Schulz, return, relay)
    chain_bf16: float
    elementwise: float
    # muonkit.defer_relay under hsdp with a one-node shard group (None elsewhere): the relay phase's
    # time (its plan: every cross-replica piece in it) and the step without it, read serially.
    relay: float | None = None
    relay_bf16: float | None = None
    rest: float | None = None
    rest_bf16: float | None = None

    @property
    def optimizer(self) -> float:
        """Serial: the exchange, Newton-Schulz and the elementwise update one after another."""
        return self.ns + self.exchange + self.elementwise

    def overlapped(self, bf16: bool = False) -> float:
        """The exchange overlapped with Newton-Schulz and with itself (the phases of different
        buckets at once) as well as can be: the longest of Newton-Schulz, the busiest rank's link
        time and one tensor's chain, then the elementwise update. A lower bound that muonkit's
        bucketed exchange (on by default) can approach at best, not a measurement."""
        link, chain = (self.link_bf16, self.chain_bf16) if bf16 else (self.link, self.chain)
        return max(self.ns, link, chain) + self.elementwise

    @property
    def share(self) -> float:
        return self.optimizer / self.training_step

    @property
    def share_overlapped(self) -> float:
        return self.overlapped() / self.training_step

    @property
    def share_bf16(self) -> float:
        return (self.ns + self.exchange_bf16 + self.elementwise) / self.training_step

    @property
    def share_bf16_overlapped(self) -> float:
        return self.overlapped(bf16=True) / self.training_step

    @property
    def forward(self) -> float:
        """The next forward pass: a third of the training step (2 of its 6 N FLOPs per token)."""
        return self.training_step / 3

    def deferred(self, bf16: bool = False) -> float | None:
        """muonkit.defer_relay's reading (hsdp, shard group in a node; None elsewhere): the step
        without the relay phase, serially (gather, Newton-Schulz, return inside the owner's replica,
        elementwise), plus the relay's time beyond the next forward pass, which hides the rest
        (InfiniBand is idle in forward there: FSDP's all-gathers stay on NVLink)."""
        relay, rest = (self.relay_bf16, self.rest_bf16) if bf16 else (self.relay, self.rest)
        if relay is None or rest is None:
            return None
        return rest + max(0.0, relay - self.forward)

    @property
    def share_deferred(self) -> float | None:
        value = self.deferred()
        return None if value is None else value / self.training_step

    @property
    def share_deferred_bf16(self) -> float | None:
        value = self.deferred(bf16=True)
        return None if value is None else value / self.training_step

    def meets(self, target: float = 0.03) -> str:
        """What brings the cell to `target` in this model, the surest first: "default" (muonkit's
        float32 exchange, even with no overlap at all), "bf16 exchange" (`exchange_dtype=
        torch.bfloat16`, even with no overlap), "default, if overlapped" (float32, only if the
        bucketed exchange reaches the overlap bound), "bf16, if overlapped", "deferred relay"
        (muonkit.defer_relay, float32, the rest serial), "deferred relay, bf16", or "no"."""
        for name, share in (("default", self.share), ("bf16 exchange", self.share_bf16),
                            ("default, if overlapped", self.share_overlapped),
                            ("bf16, if overlapped", self.share_bf16_overlapped),
                            ("deferred relay", self.share_deferred),
                            ("deferred relay, bf16", self.share_deferred_bf16)):
            if share is not None and share <= target:
                return name
        return "no"


@functools.lru_cache(maxsize=64)
def _model_plan(model: Model, mesh: Mesh, spread: bool, deferred: bool) -> Step:
    """`plan` of a whole model (the hardware does not enter it: one plan serves every reading)."""
    return plan(model.weights(), mesh, spread=spread, deferred=deferred)


def cell(model: Model, mesh: Mesh, hw: Hardware, *, spread: bool = True) -> Cell:
    step = _model_plan(model, mesh, spread, False)
    deferred: dict[str, float] = {}
    if mesh.kind == "hsdp" and mesh.inner <= mesh.gpus_per_node:
        later = _model_plan(model, mesh, spread, True)
        for key, size in (("", 4), ("_bf16", 2)):
            relay = later.phases.get("relay")
            deferred["relay" + key] = 0.0 if relay is None else relay.seconds(hw, size)
            deferred["rest" + key] = (later.ns_seconds(hw) + later.elementwise_seconds(hw)
                                      + sum(t.seconds(hw, size) for name, t in later.phases.items() if name != "relay"))
    return Cell(model, mesh, hw.training_step(model, mesh.world), step.ns_seconds(hw), step.load_balance(),
                float(step.bytes_sent(4).max()), step.exchange_seconds(hw, 4), step.exchange_seconds(hw, 2),
                step.link_seconds(hw, 4), step.link_seconds(hw, 2), step.chain_seconds(hw, 4),
                step.chain_seconds(hw, 2), step.elementwise_seconds(hw), **deferred)


def hsdp_floor(model: Model, mesh: Mesh, hw: Hardware, element_size: int = 2) -> float:
    """A lower bound on the optimizer step's share under HSDP with the shard group inside a node, for
    any owners and any overlap, when every matrix is orthogonalized once: each replica's copy of a
    result crosses InfiniBand unless its node owns the matrix, so the ranks receive over InfiniBand
    (R - 1) / (R S) of the Muon elements on average, and the busiest at least that; plus the
    elementwise update, which follows the exchange."""
    if mesh.kind != "hsdp" or mesh.inner > mesh.gpus_per_node:
        raise ValueError(f"hsdp_floor needs an hsdp mesh with its shard group inside a node, got {mesh}")
    R, S = mesh.world // mesh.inner, mesh.inner
    muon = sum(w.numel for w in model.weights())
    receive = (R - 1) / (R * S) * muon * element_size / (hw.infiniband * hw.link_efficiency)
    elementwise = muon / S * hw.elementwise_bytes / hw.hbm
    return (receive + elementwise) / hw.training_step(model, mesh.world)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def shapes_table(models: Sequence[Model]) -> str:
    rows = []
    for m in models:
        muon = sum(w.numel for w in m.weights())
        experts = f"{m.experts} (top {m.top_k}, width {m.expert_ffn})" if m.experts else "-"
        rows.append([m.name, m.source, m.hidden, m.layers, m.ffn or "-", m.heads, m.kv_heads, m.head_dim, m.vocab,
                     "yes" if m.tied else "no", experts, f"{m.params() / 1e9:.2f} B", f"{m.active_params() / 1e9:.2f} B",
                     f"{muon / 1e9:.2f} B", len(m.weights())])
    return markdown(["model", "config", "hidden", "layers", "ffn", "heads", "kv heads", "head dim", "vocab", "tied",
                     "experts", "params", "active", "Muon params", "Muon tensors"], rows)


def _percent(share: float, target: float = 0.03) -> str:
    return f"**{100 * share:.2f}%**" if share > target else f"{100 * share:.2f}%"


def share_table(cells: Sequence[Cell]) -> str:
    rows = [[c.model.name, c.mesh.world, c.mesh.label(), f"{c.training_step:.2f}", f"{c.load_balance:.2f}", _ms(c.ns),
             _bytes(c.bytes_sent_max), _ms(c.exchange), _ms(c.chain), _ms(c.elementwise), _percent(c.share),
             _percent(c.share_overlapped), _percent(c.share_bf16), _percent(c.share_bf16_overlapped),
             "-" if c.share_deferred is None else _percent(c.share_deferred), c.meets()]
            for c in cells]
    return markdown(["model", "GPUs", "mesh", "training step (s)", "NS max/mean", "NS (ms)", "bytes sent/rank (max)",
                     "exchange (ms)", "chain (ms)", "elementwise (ms)", "share, float32 serial",
                     "share, float32 overlapped", "share, bf16 serial", "share, bf16 overlapped",
                     "share, deferred relay (float32)", "3% with"], rows)


def moe_bytes_table(model: Model, worlds: Sequence[int]) -> str:
    """Bytes the whole mesh sends per step (float32): the MoE with experts in place, with experts
    shipped whole to an owner (today's 1D Shard(0) path), and its non-expert tensors alone."""
    dense = [w for w in model.weights() if not w.expert]
    rows = []
    for world in worlds:
        after = plan(model.weights(), Mesh("ep", world)).bytes_sent()
        before = plan(model.weights(), Mesh("fsdp", world)).bytes_sent()
        base = plan(dense, Mesh("fsdp", world)).bytes_sent()
        rows.append([world, _bytes(base.sum()), _bytes(after.sum()), f"{after.sum() / base.sum():.2f}",
                     _bytes(before.sum()), f"{before.sum() / base.sum():.1f}",
                     _bytes(after.max()), _bytes(before.max())])
    return markdown(["GPUs", "non-expert tensors alone", "MoE, experts in place (EP)", "ratio (target <= 1.1)",
                     "MoE, experts shipped to owners (before)", "ratio", "per rank max, EP", "per rank max, before"],
                    rows)


def hsdp_table(models: Sequence[Model], world: int, hw: Hardware) -> str:
    """HSDP on `world` GPUs: the 8-GPU shard group with the owners packed (ties to the lower rank, as
    before) and spread, its floor (one owner per matrix, the relay inside the step), the relay under
    the next forward (muonkit.defer_relay), and a 64-GPU shard group (8 nodes, R = W / 64; its
    forward all-gathers cross nodes, so the deferral's reading does not apply there)."""
    rows = []
    for model in models:
        mesh = Mesh("hsdp", world)
        packed, spread = cell(model, mesh, hw, spread=False), cell(model, mesh, hw)
        wide = cell(model, replace(mesh, inner=64), hw)
        rows.append([model.name, _percent(packed.share), _percent(spread.share), _percent(spread.share_bf16_overlapped),
                     f"{100 * hsdp_floor(model, mesh, hw):.2f}%", f"{_ms(spread.relay)} / {_ms(spread.forward)}",
                     _percent(spread.share_deferred), _percent(spread.share_deferred_bf16), spread.meets(),
                     _percent(wide.share),
                     _percent(wide.share_overlapped), _percent(wide.share_bf16), _percent(wide.share_bf16_overlapped),
                     wide.meets()])
    return markdown(["model", "64 x 8, owners packed (before), float32 serial", "64 x 8, owners spread, float32 serial",
                     "64 x 8, spread, bf16 overlapped", "64 x 8, floor with the relay in the step (any owners, bf16, overlapped)",
                     "64 x 8, relay float32 / next forward (ms)", "64 x 8, deferred relay, float32",
                     "64 x 8, deferred relay, bf16", "64 x 8: 3% with",
                     "8 x 64, float32 serial", "8 x 64, float32 overlapped", "8 x 64, bf16 serial",
                     "8 x 64, bf16 overlapped", "8 x 64: 3% with"], rows)


def _listing(cells: Sequence[Cell], share) -> str:
    return "; ".join(f"{c.model.name} {c.mesh.label()} on {c.mesh.world}: {100 * share(c):.1f}%" for c in cells)


def report(hw: Hardware, worlds: Sequence[int] = (8, 64, 512)) -> str:
    dense = [MODELS[k] for k in ("llama-1b", "llama-8b", "llama-70b")]
    moe = MODELS["moe-30b-a3b"]
    cells = [cell(m, Mesh(kind, world), hw) for m in dense for world in worlds for kind in ("fsdp", "hsdp", "fsdp+tp")]
    cells += [cell(moe, Mesh("ep", world), hw) for world in worlds]
    verdicts: dict[str, list[Cell]] = {}
    for c in cells:
        verdicts.setdefault(c.meets(), []).append(c)
    slow = replace(hw, ns_efficiency=hw.ns_efficiency / 2, link_efficiency=hw.link_efficiency / 2)
    slow_cells = [cell(c.model, c.mesh, slow) for c in cells]
    summary = [f"{len(verdicts.get('default', []))} of {len(cells)} cells are at most 3% with muonkit's defaults "
               f"(float32 exchange) even with no overlap."]
    for name, share in (("bf16 exchange", lambda c: c.share_bf16),
                        ("default, if overlapped", lambda c: c.share_overlapped),
                        ("bf16, if overlapped", lambda c: c.share_bf16_overlapped),
                        ("deferred relay", lambda c: c.share_deferred),
                        ("deferred relay, bf16", lambda c: c.share_deferred_bf16),
                        ("no", lambda c: c.share_bf16_overlapped)):
        if verdicts.get(name):
            label = {"bf16 exchange": "With a bf16 exchange, even serial",
                     "default, if overlapped": "With the float32 exchange only if overlapped to the bound",
                     "bf16, if overlapped": "With a bf16 exchange only if overlapped to the bound",
                     "deferred relay": "Only with the relay under the next forward (muonkit.defer_relay; float32, "
                                       "the rest of the step serial)",
                     "deferred relay, bf16": "Only with the relay under the next forward and a bf16 exchange",
                     "no": "Above 3% under every setting of the table (bf16 overlapped shown)"}[name]
            without = ""
            if name.startswith("deferred"):
                without = f" (without it, bf16 overlapped: {_listing(verdicts[name], lambda c: c.share_bf16_overlapped)})"
            summary.append(f"{label}: {_listing(verdicts[name], share)}{without}.")
    slow_over = [c for c in slow_cells if c.meets() == "no"]
    summary.append(f"At half the Newton-Schulz efficiency ({slow.ns_efficiency:g}) and half the link efficiency "
                   f"({slow.link_efficiency:g}), above 3% under every setting: {len(slow_over)} of {len(cells)}"
                   + (f" ({_listing(slow_over, lambda c: c.share_bf16_overlapped)})" if slow_over else "") + ".")
    parts = [
        "### Shapes\n\n" + shapes_table([MODELS[k] for k in MODELS]),
        "### The optimizer step as a share of the training step\n\n" + share_table(cells),
        " ".join(summary),
        f"### HSDP on 512 GPUs: owners, floor and shard group\n\n" + hsdp_table(dense, 512, hw),
        f"### MoE ({moe.name}): bytes the mesh sends per step, float32\n\n" + moe_bytes_table(moe, worlds),
    ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the cost model of docs/scaling.md, as markdown tables")
    defaults = Hardware()
    for name in ("ns_efficiency", "mfu", "link_efficiency"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--write", metavar="PATH", help=f"replace the block between {BEGIN} and {END} in PATH")
    args = parser.parse_args(argv)
    hw = replace(defaults, ns_efficiency=args.ns_efficiency, mfu=args.mfu, link_efficiency=args.link_efficiency)
    changed = [name for name in ("ns_efficiency", "mfu", "link_efficiency") if getattr(hw, name) != getattr(defaults, name)]
    options = "".join(f" --{name.replace('_', '-')} {getattr(hw, name):g}" for name in changed)
    text = f"Generated by `python benchmarks/cost_model.py{options}`.\n\n{report(hw)}"
    if args.write is None:
        print(text)
        return 0
    with open(args.write) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.write} has no {BEGIN} ... {END} block")
    head, rest = doc.split(BEGIN, 1)
    with open(args.write, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
