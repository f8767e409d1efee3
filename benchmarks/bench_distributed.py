"""Distributed Muon: per-rank Newton-Schulz time on W ranks vs 1, and bytes sent per step.

    python benchmarks/bench_distributed.py                 # 2 ranks, width 384, depth 4, 7 repeats
    python benchmarks/bench_distributed.py --world 4 --width 256 --repeats 5
    python benchmarks/bench_distributed.py --computed      # only the computed tables (no processes)

The computed tables (printed after the measured one; alone with --computed) give, for GPT-2 small,
Llama-1B and a 128-expert MoE at their real shapes on 8, 64 and 512 ranks, the bytes each rank
sends per step and the Newton-Schulz load max/mean, before issue 21 (1D FSDP only, owners over all
ranks, stacked experts shipped whole to one owner and back) and after (HSDP and FSDP + TP8 meshes,
owners among the ranks holding a largest piece, experts orthogonalized where they live under expert
parallelism). They come from benchmarks/cost_model.py, which counts bytes as Muon.bytes_sent does
(tests/test_cost_model.py checks it against muonkit's plan and against gloo runs).

Spawns --world CPU processes (gloo, one thread each) holding the Muon matrices of a GPT-like model
(per block: qkv 3w x w, proj w x w, fc 4w x w, fc_proj w x 4w). Prints one table:

- NS time per rank, 1 rank: every rank orthogonalizes all matrices (what one process does), median
  of --repeats; all ranks run at once so the machine is as loaded as in the W-rank phase.
- NS time per rank, W ranks: the slowest rank's median time on the matrices it owns
  (muonkit.distributed.assign_owners, balanced by Newton-Schulz FLOPs); the ratio to the line above
  is the speed-up target (<= 0.6 on 2 ranks).
- Muon step, replicated / FSDP2: median wall time of optimizer.step() with process_group (NS work
  plus the exchange), for plain tensors and for fully_shard-ed Linear layers.
- Bytes sent per rank per step (Muon.bytes_sent: all_gather counted as a ring,
  all_to_all as the slices sent to other ranks), next to a ring all-reduce of the same matrices'
  float32 gradients, 2 (W-1)/W * 4 N bytes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import muonkit
from muonkit.distributed import assign_owners, newton_schulz_flops, shard_sizes
from muonkit.functional import batched_orthogonalize


def model_shapes(width: int, depth: int) -> list[tuple[int, int]]:
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * depth


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(cols, rows, bias=False) for rows, cols in model_shapes(width, depth)))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_grads(model: nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor

    for index, p in enumerate(model.parameters()):
        full = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + index))
        if isinstance(p, DTensor):
            rows = shard_sizes(full.shape[0], p.device_mesh.size())
            rank = p.device_mesh.get_local_rank()
            local = full[sum(rows[:rank]) : sum(rows[: rank + 1])].contiguous()
            full = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=full.shape, stride=full.stride())
        p.grad = full


def step_stats(model: nn.Module, repeats: int) -> tuple[float, int]:
    """(median seconds of optimizer.step(), bytes this rank sent per step)."""
    opt = muonkit.Muon(model.parameters(), lr=0.01, process_group=dist.group.WORLD)
    set_grads(model, 0)
    seconds = median_seconds(opt.step, repeats)
    before = opt.bytes_sent
    opt.step()
    return seconds, opt.bytes_sent - before


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shapes = model_shapes(args.width, args.depth)
        torch.manual_seed(0)
        matrices = [torch.randn(1, r, c) for r, c in shapes]
        owners = assign_owners([newton_schulz_flops(1, r, c) for r, c in shapes], world)
        mine = [m for m, o in zip(matrices, owners) if o == rank]

        def orthogonalize(ms):
            return lambda: batched_orthogonalize(ms, method="polar_express", steps=5, dtype=None)

        one_rank = median_seconds(orthogonalize(matrices), args.repeats)
        own_share = median_seconds(orthogonalize(mine), args.repeats)
        replicated = step_stats(make_model(args.width, args.depth), args.repeats)
        from torch.distributed.fsdp import fully_shard

        sharded_model = make_model(args.width, args.depth)
        for layer in sharded_model:
            fully_shard(layer)
        fully_shard(sharded_model)
        sharded = step_stats(sharded_model, args.repeats)
        queue.put((rank, one_rank, own_share, replicated, sharded))
    finally:
        dist.destroy_process_group()


def computed_tables(worlds: tuple[int, ...] = (8, 64, 512)) -> str:
    """Bytes per rank per step (float32 payload) and NS load max/mean, before and after issue 21, with
    the owners packed (ties to the lower rank, issue 21 as first landed) and spread (ties by
    bit-reversed rank, muonkit.plan.spread_order)."""
    import cost_model as cm

    def mb(values) -> str:
        return f"{values.mean() / 1e6:.1f} / {values.max() / 1e6:.1f}"

    rows = []
    for key, kinds in (("gpt2", ("fsdp", "hsdp")), ("llama-1b", ("fsdp", "hsdp", "fsdp+tp")), ("moe-30b-a3b", ("ep",))):
        model = cm.MODELS[key]
        weights = model.weights()
        for world in worlds:
            before = cm.plan(weights, cm.Mesh("fsdp", world), today=True)
            for kind in kinds:
                mesh = cm.Mesh(kind, world)
                after = cm.plan(weights, mesh)
                packed = cm.plan(weights, mesh, spread=False)
                old = kind in ("fsdp", "ep")  # what muonkit ran before issue 21 (1D Shard(0))
                rows.append([model.name, world, mesh.label(),
                             mb(before.bytes_sent()) if old else "refused",
                             f"{before.load_balance():.2f}" if old else "refused",
                             mb(packed.bytes_sent()), mb(after.bytes_sent()), mb(after.bytes_sent(2)),
                             f"{after.load_balance():.2f}",
                             f"{_replica_balance(packed, mesh):.2f} / {_replica_balance(after, mesh):.2f}"])
    return cm.markdown(["model", "ranks", "mesh (after)", "before: MB sent/rank, mean / max",
                        "before: NS max/mean", "after, owners packed: MB sent/rank, mean / max",
                        "after, owners spread: MB sent/rank, mean / max",
                        "after, spread, bf16 exchange: MB mean / max", "after: NS max/mean",
                        "after: NS max/mean per node, packed / spread"], rows)


def _replica_balance(step, mesh) -> float:
    """Newton-Schulz FLOPs per node (8 consecutive ranks: an HSDP replica, a TP group), max / mean."""
    loads = step.ns_load.reshape(-1, min(mesh.world, mesh.gpus_per_node)).sum(1)
    return float(loads.max() / loads.mean()) if loads.any() else 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="distributed Muon: NS time per rank and bytes per step")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--computed", action="store_true", help="print only the computed tables")
    args = parser.parse_args(argv)
    if args.computed:
        print(f"# bench_distributed --computed: benchmarks/cost_model.py's plans, {datetime.date.today()}")
        print(computed_tables())
        return 0

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(worker, args=(args.world, free_port(), args, queue), nprocs=args.world)
    rows = sorted(queue.get() for _ in range(args.world))
    one_rank = max(r[1] for r in rows)
    share = max(r[2] for r in rows)
    shapes = model_shapes(args.width, args.depth)
    numel = sum(r * c for r, c in shapes)
    all_reduce = 2 * (args.world - 1) / args.world * 4 * numel
    flops = 5 * sum(newton_schulz_flops(1, r, c) for r, c in shapes)

    print(f"# bench_distributed: {args.world} ranks, width {args.width}, depth {args.depth} "
          f"({len(shapes)} matrices, {numel / 1e6:.2f} M params, {flops / 1e9:.1f} GFLOP per NS pass), "
          f"median of {args.repeats}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per rank, "
          f"torch {torch.__version__}, {datetime.date.today()}")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| NS time per rank, 1 rank (all matrices) | {one_rank * 1e3:.1f} ms |")
    print(f"| NS time per rank, {args.world} ranks (slowest rank's share) | {share * 1e3:.1f} ms |")
    print(f"| ratio ({args.world} ranks / 1) | {share / one_rank:.2f} |")
    for name, index in (("replicated (DDP)", 3), ("FSDP2", 4)):
        seconds = max(r[index][0] for r in rows)
        sent = max(r[index][1] for r in rows)
        print(f"| Muon step, {name} | {seconds * 1e3:.1f} ms |")
        print(f"| bytes sent per rank per step, {name} | {sent / 1e6:.2f} MB ({sent / all_reduce:.2f}x the all-reduce) |")
    print(f"| ring all-reduce of the same gradients (fp32) | {all_reduce / 1e6:.2f} MB |")
    print()
    print(computed_tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
