"""Muon's exchange on N-D device meshes, measured on 4 gloo ranks (CPU): bytes per step against the
minimum, and the step time with the exchange in small buckets (overlapped with Newton-Schulz) vs
one bucket.

    python benchmarks/bench_meshes.py                      # width 256, 2 layers, 7 repeats
    python benchmarks/bench_meshes.py --width 512 --repeats 5
    python benchmarks/bench_meshes.py --plan-ranks 512     # the plan's cost alone (no processes)

Spawns 4 CPU processes (gloo, one thread each) holding a Llama-like stack per layer: wq, wk, wv, wo
(w x w), w1, w3 (4w x w), w2 (w x 4w) and 8 stacked experts (8, w, w), placed as:
- ddp: plain tensors (replicated);  fsdp: fully_shard on a 1D mesh of 4;
- hsdp: fully_shard on (replicate 2, shard 2);
- fsdp+tp: parallelize_module on "tp" (colwise q, k, v, w1, w3; rowwise wo, w2) then fully_shard on
  "dp" of (dp 2, tp 2); the experts stay on the dp sub-mesh (whole matrices: no exchange);
- ep: the experts (Shard(0), Shard(0)) on (dp 2, ep 2) (2 whole experts a rank), the rest plain.
Prints one table (rank 0): the bytes all ranks send in one step (Muon.bytes_sent), the busiest rank's,
the minimum for those placements (per tensor of N elements with p_r on rank r: N + sum p_r - 2 max p_r,
computed from the local sizes torch gave each rank; 0 for whole experts), and the median step time
(--repeats, fixed gradients) with the exchange in one bucket and in 256 KiB buckets, timed interleaved.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import muonkit
from muonkit.dtensor import placements_of
from muonkit.layout import resolve
from muonkit.plan import is_local

WORLD = 4
KINDS = ("ddp", "fsdp", "hsdp", "fsdp+tp", "ep")
SMALL_BUCKET = 1 << 18


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, nn.Linear(width, width, bias=False))
        self.w1 = nn.Linear(width, 4 * width, bias=False)
        self.w3 = nn.Linear(width, 4 * width, bias=False)
        self.w2 = nn.Linear(4 * width, width, bias=False)
        self.experts = nn.Parameter(torch.randn(8, width, width) / width**0.5)


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(Layer(width) for _ in range(depth)))


def place(model: nn.Module, kind: str) -> object:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if kind == "ddp":
        return dist.group.WORLD
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
        dp = mesh
    elif kind == "hsdp":
        mesh = dp = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("dp", "tp"))
        dp = mesh["dp"]
    if kind == "ep":
        for layer in model:
            layer.experts = nn.Parameter(distribute_tensor(layer.experts.detach(), mesh, [Shard(0), Shard(0)],
                                                           src_data_rank=None))
        return mesh
    if kind == "fsdp+tp":
        plan = {name: ColwiseParallel() for name in ("wq", "wk", "wv", "w1", "w3")}
        plan.update(wo=RowwiseParallel(), w2=RowwiseParallel())
        for layer in model:
            parallelize_module(layer, mesh["tp"], plan)
    for layer in model:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    return mesh


def set_grads(model: nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for index, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + index))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


def minimum_bytes(opt: muonkit.Muon) -> int:
    from torch.distributed.tensor import DTensor

    sizes = []
    for group in opt.param_groups:
        for p in group["params"]:
            whole = isinstance(p, DTensor) and is_local(p.shape, placements_of(p), resolve(group["layout"], p.ndim))
            local = p.to_local() if isinstance(p, DTensor) else p
            sizes.append((p.numel(), local.numel(), local.element_size(), whole))
    every: list = [None] * WORLD
    dist.all_gather_object(every, sizes)
    total = 0
    for per_rank in zip(*every):
        numel, _, size, whole = per_rank[0]
        if not whole:
            pieces = [local for _, local, _, _ in per_rank]
            total += size * (numel + sum(pieces) - 2 * max(pieces))
    return total


def measure(kind: str, width: int, depth: int, repeats: int) -> dict:
    optimizers = []
    for bucket in (None, SMALL_BUCKET):
        model = make_model(width, depth)
        opt = muonkit.Muon(model.parameters(), lr=0.02, process_group=place(model, kind))
        if bucket is not None:
            opt._distributed.bucket_bytes = bucket
        optimizers.append((model, opt))
    times: list[list[float]] = [[], []]
    sent = []
    for step in range(repeats + 1):
        for which, (model, opt) in enumerate(optimizers):
            set_grads(model, step)
            dist.barrier()
            before, start = opt.bytes_sent, time.perf_counter()
            opt.step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step:  # the first step builds the plan
                times[which].append(float(elapsed))
            if which == 0:
                sent.append(opt.bytes_sent - before)
    every = torch.tensor(sent[-1:], dtype=torch.float64)
    total = every.clone()
    dist.all_reduce(total)
    dist.all_reduce(every, op=dist.ReduceOp.MAX)
    model, opt = optimizers[0]
    plan = next(iter(opt._distributed._plans.values()))
    buckets = len(next(iter(optimizers[1][1]._distributed._plans.values())).buckets)
    return {"sent": int(total), "busiest": int(every), "minimum": minimum_bytes(opt), "one": statistics.median(times[0]),
            "small": statistics.median(times[1]), "buckets": buckets, "loads": max(plan.loads) / max(1e-9, statistics.mean(plan.loads))}


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = [(kind, measure(kind, args.width, args.depth, args.repeats)) for kind in KINDS]
        if rank == 0:
            print(f"4 gloo ranks, 1 thread each, width {args.width}, depth {args.depth}, float32, median of {args.repeats}, "
                  f"torch {torch.__version__}")
            print("| mesh | bytes/step (all ranks) | busiest rank | minimum | sent / minimum | NS load max/mean "
                  "| step ms, 1 bucket | step ms, 256 KiB buckets | buckets | small / one |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for kind, r in rows:
                ratio = r["sent"] / r["minimum"] if r["minimum"] else float("nan")
                print(f"| {kind} | {r['sent']} | {r['busiest']} | {r['minimum']} | {ratio:.3f} | {r['loads']:.2f} "
                      f"| {1e3 * r['one']:.1f} | {1e3 * r['small']:.1f} | {r['buckets']} | {r['small'] / r['one']:.2f} |")
    finally:
        dist.destroy_process_group()


def plan_timing(world: int) -> None:
    """The plan of a Llama-1B-like model (16 layers of 2048 x 2048 q, o; 512 x 2048 k, v; 8192 x 2048 w1,
    w3; 2048 x 8192 w2) under FSDP on `world` ranks: build time (once per run), and the owner assignment
    with the heap against the scan over every rank it replaced (the same owners). No processes."""
    from muonkit.plan import Spec, assign_owners, build_plan, newton_schulz_flops, pieces_of

    shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (8192, 2048)] * 16
    start = time.perf_counter()
    pieces = {}
    for shape in set(shapes):
        by_rank = pieces_of(shape, torch.arange(world), [("S", 0)])
        pieces[shape] = tuple(by_rank[r] for r in range(world))
    specs = [Spec(shape, torch.float32, pieces[shape], 1, *shape, False) for shape in shapes]
    plan = build_plan(specs, [None] * len(specs), world)
    built = time.perf_counter() - start
    costs = [newton_schulz_flops(1, *shape) for shape in shapes]

    def scan() -> list[int]:
        loads, counts, owners = [0.0] * world, [0] * world, [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(world), key=lambda r: (loads[r], counts[r], r))
            owners[i], loads[rank], counts[rank] = rank, loads[rank] + costs[i], counts[rank] + 1
        return owners

    timings = {}
    for name, fn in (("scan", scan), ("heap", lambda: assign_owners(costs, world))):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            owners = fn()
            times.append(time.perf_counter() - t)
        timings[name] = (statistics.median(times), owners)
    assert timings["scan"][1] == timings["heap"][1]
    print(f"Llama-1B-like, {len(shapes)} matrices, FSDP on {world} ranks: plan built once in {built:.2f} s; "
          f"owners: scan {1e3 * timings['scan'][0]:.2f} ms, heap {1e3 * timings['heap'][0]:.2f} ms (same owners); "
          f"bytes per step, all ranks: {4 * sum(plan.sent_elements)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plan-ranks", type=int, default=0, help="only time the plan of a Llama-1B on this many ranks")
    args = parser.parse_args(argv)
    if args.plan_ranks:
        plan_timing(args.plan_ranks)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(port, args), nprocs=WORLD, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
