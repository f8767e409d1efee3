"""bfloat16 parameters without master weights: what the optimizer state dtype and stochastic rounding
do to training, against the same run in float32 (issue 13; chooses muonkit's default).

Run:
    python benchmarks/bench_low_precision.py [--steps 300] [--seeds 2] [--lr 0.01] [--threads 1] [--write-results]

Trains the charlm task's GPT (muonkit.tasks.charlm, width 128, depth 4) with muonkit.Muon at the task's
lr in five ways: float32 parameters (the reference), and bfloat16 parameters with each of
{state in bfloat16, state in float32} x {round to nearest, stochastic rounding}. Prints a Markdown
table: final validation loss (of the trained weights, computed in float32; mean over seeds), its
gap to the float32 run, the share of parameter entries a step changes at the end of training
(median over the last 20 steps), and the optimizer's ms per step (median). With --write-results the table goes into benchmarks/RESULTS.md between the
LOW-PRECISION-lr<lr> markers, with the machine and date.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from common import environment, setup, write_results

import muonkit
from muonkit.tasks import DataOptions, get_task

CONFIGS = {
    "float32 parameters (reference)": (torch.float32, dict()),
    "bf16, bf16 state, round to nearest": (torch.bfloat16, dict(stochastic_rounding=False)),
    "bf16, fp32 state, round to nearest": (torch.bfloat16, dict(state_dtype=torch.float32, stochastic_rounding=False)),
    "bf16, bf16 state, stochastic rounding (muonkit's default)": (torch.bfloat16, dict(stochastic_rounding=True)),
    "bf16, fp32 state, stochastic rounding": (torch.bfloat16, dict(state_dtype=torch.float32, stochastic_rounding=True)),
}


def run(task, data, dtype, options, *, steps: int, lr: float, seed: int) -> tuple[float, float, float]:
    """(final val loss, share of entries changed per step at the end, median optimizer ms per step)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = task.model(data).to(dtype)
    opt = muonkit.Muon(muonkit.param_groups(model, **task.routing), lr=lr, weight_decay=task.weight_decay, **options)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: task.lr_multiplier(s, steps))
    changed, seconds = [], []
    for step in range(steps):
        inputs, targets = task.batch(data, step, generator)
        loss = task.loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()] if step >= steps - 20 else None
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
        schedule.step()
        if before is not None:
            moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
            changed.append(moved / sum(p.numel() for p in model.parameters()))
    model.eval()
    with torch.inference_mode():
        # The loss of the trained (bf16) weights computed in float32: a bf16 forward would round
        # the loss itself to bf16's 8 bits (2.2109, 2.2422, ... in steps of 0.0078).
        final = task.evaluate(copy.deepcopy(model).float(), data)
    return final, statistics.median(changed), 1000 * statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: the charlm task's muon lr")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    setup(args.threads)
    task = get_task("charlm")
    data = task.load(DataOptions(), torch.device("cpu"))
    lr = args.lr or task.lrs["muon"]
    results = {}
    for name, (dtype, options) in CONFIGS.items():
        runs = [run(task, data, dtype, options, steps=args.steps, lr=lr, seed=seed) for seed in range(args.seeds)]
        results[name] = [statistics.mean(r[i] for r in runs) for i in range(3)]
        print(f"{name}: {results[name]}", flush=True)
    reference = results["float32 parameters (reference)"][0]
    lines = [f"charlm GPT, muonkit.Muon lr {lr:g}, {args.steps} steps, mean of {args.seeds} seeds; "
             f"{environment()}, {time.strftime('%Y-%m-%d')}", "",
             "| parameters and optimizer | final val loss (computed in float32) | gap to float32 | entries changed per step (end) | opt ms/step |",
             "|---|---|---|---|---|"]
    for name, (final, changed, ms) in results.items():
        lines.append(f"| {name} | {final:.4f} | {final - reference:+.4f} | {100 * changed:.1f}% | {ms:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        command = "python benchmarks/bench_low_precision.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "write_results" and v is not None)
        write_results(f"LOW-PRECISION-lr{lr:g}", f"### bfloat16 parameters (`{command}`)\n\n{table}")


if __name__ == "__main__":
    main()
