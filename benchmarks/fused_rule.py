"""Fused q/k/v and gate/up Linears per head (muonkit's routing) or as one matrix: which trains better.

A tiny Phi-3 (`muonkit bench hf-lm --hf-config phi3`: fused `qkv_proj` and `gate_up_proj`) trained
with muon at hf-lm's lr and steps. (A) muonkit's default routing: qkv_proj per head (8 matrices
16x64), gate_up_proj as gate and up apart (2 matrices 176x64). (B) the same, but those two weights
each one matrix (a predicate giving them a plain Linear layout); every other parameter routed as in
A (checked with muonkit.route before training). A and B interleaved seed by seed (a b b a ...), one
torch thread. Prints the final val loss (nats/char) per seed and mean +- std of each.

    PYTHONPATH=src python benchmarks/fused_rule.py                # 3 seeds x 200 steps, ~6 min on 1 thread
    PYTHONPATH=src python benchmarks/fused_rule.py --steps 5 --seeds 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import muonkit
from muonkit.tasks.base import DataOptions
from muonkit.tasks.bench import run_order
from muonkit.tasks.hflm import HFLM
from muonkit.tasks.training import train_run

FUSED = ("qkv_proj.weight", "gate_up_proj.weight")


def one_matrix(name: str, param: torch.Tensor, module: torch.nn.Module) -> muonkit.Layout | None:
    return muonkit.Layout(rows=(0,), cols=(1,)) if name.endswith(FUSED) else None


class OneMatrix(HFLM):
    routing = {**HFLM.routing, "predicate": one_matrix}


def check_routing(a: HFLM, b: HFLM, model: torch.nn.Module) -> None:
    """B differs from A only on the fused weights, and there only in the layout."""
    da = {d.name: d for d in muonkit.route(model, **a.routing)}
    db = {d.name: d for d in muonkit.route(model, **b.routing)}
    assert da.keys() == db.keys()
    key = lambda d: (d.optimizer, d.layout, d.no_decay)  # noqa: E731
    differ = sorted(n for n in da if key(da[n]) != key(db[n]))
    assert differ and all(n.endswith(FUSED) for n in differ), differ
    assert all(da[n].optimizer == db[n].optimizer == "muon" for n in differ)
    for n in differ:
        print(f"  {n}: A {da[n].layout}  B {db[n].layout}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=HFLM.default_steps)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=HFLM.lrs["muon"], help="muon's lr (default hf-lm's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = {"A per head": HFLM(), "B one matrix": OneMatrix()}
    device = torch.device("cpu")
    data = tasks["A per head"].load(DataOptions(hf_config="phi3"), device)
    check_routing(*tasks.values(), tasks["A per head"].model(data))
    lr, adamw_lr = args.lr, HFLM.lrs["adamw"]
    print(f"hf-lm phi3, muon lr {lr:g}, {args.steps} steps, {args.seeds} seeds, interleaved, 1 thread, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    finals: dict[str, list[float]] = {name: [] for name in tasks}
    for name, seed in run_order(tuple(tasks), args.seeds, interleave=True):
        t0 = time.perf_counter()
        result = train_run(tasks[name], data, "muon", lr, seed, args.steps, device, adamw_lr=adamw_lr, progress=False)
        assert not result.diverged and result.evals[-1][0] == args.steps, (result.diverged, result.evals[-1:])
        finals[name].append(result.evals[-1][2])
        print(f"  {name:13s} seed {seed}: val {finals[name][-1]:.4f}  ({time.perf_counter() - t0:.0f} s, "
              f"load {os.getloadavg()[0]:.2f})", flush=True)
    print("| routing | final val loss (mean +- std) |\n|---|---|")
    for name, values in finals.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(values):.4f} +- {std:.4f} |")
    a, b = (statistics.fmean(v) for v in finals.values())
    print(f"B - A: {b - a:+.4f}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
