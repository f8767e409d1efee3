"""QK-Clip on charlm: the largest attention logit over training, and the final validation loss, with
and without the clip, at learning rates high enough that the logits grow.

Run (from the repository root; ~15 minutes on 2 shared CPU cores):

    python benchmarks/bench_qkclip.py [--seeds 2] [--steps 300] [--threads 1] [--write-results]

Each configuration (optimizer, lr, tau) trains charlm's default 300 steps through the same
`train_run` as `muonkit bench charlm --qk-clip TAU`; tau = inf records the logits without clipping.
Seeds are the outer loop, so every configuration sees the same machine load. It prints a table
(max logit: the largest pre-softmax logit of any head in any training forward pass, before that
step's clip; at end: the same over the last 10 steps), writes benchmarks/task-runs/qkclip/
results.json and max_logits.png, and with --write-results the QKCLIP section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import environment, table, write_results  # noqa: E402
from muonkit.tasks import DataOptions, get_task  # noqa: E402
from muonkit.tasks.training import train_run  # noqa: E402

OUT = ROOT / "benchmarks" / "task-runs" / "qkclip"
# (optimizer, lr, tau): muon's lr 0.1 is 10x charlm's default (its max logit passes 100 within 50
# steps); adamw's 1e-2 is 10x its default. Each without (inf) and with Kimi K2's tau = 100.
CONFIGS = [("muon", 1e-2, math.inf), ("muon", 1e-1, math.inf), ("muon", 1e-1, 100.0),
           ("adamw", 1e-2, math.inf), ("adamw", 1e-2, 100.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = environment()
    date = time.strftime("%Y-%m-%d")
    task = get_task("charlm")
    data = task.load(DataOptions(), torch.device("cpu"))
    runs: dict[tuple, list] = {config: [] for config in CONFIGS}
    for seed in range(args.seeds):
        for name, lr, tau in CONFIGS:
            run = train_run(task, data, name, lr, seed, args.steps, torch.device("cpu"), adamw_lr=task.lrs["adamw"],
                            progress=False, qk_clip=tau)
            runs[(name, lr, tau)].append(run)
            print(f"{name} lr={lr:g} tau={tau:g} seed {seed}: max logit {max(run.max_logit):.1f}, "
                  f"final val_loss {run.evals[-1][2]:.4f}", file=sys.stderr, flush=True)
    rows, records = [], []
    for (name, lr, tau), rs in runs.items():
        peak = [max(r.max_logit) for r in rs]
        end = [max(r.max_logit[-10:]) for r in rs]
        final = [r.evals[-1][2] for r in rs]
        clipped = [sum(m > tau for m in r.max_logit) for r in rs]
        rows.append([name, lr, "none" if math.isinf(tau) else f"{tau:g}", _mean(peak, 0), _mean(end, 0),
                     _mean(final, 4), "-" if math.isinf(tau) else f"{statistics.fmean(clipped):.0f}"])
        records.append({"optimizer": name, "lr": lr, "tau": None if math.isinf(tau) else tau,
                        "max_logit": [r.max_logit for r in rs], "final_val_loss": final,
                        "opt_ms": [statistics.median(r.opt_s) * 1e3 for r in rs]})
    headers = ["optimizer", "lr", "QK-Clip tau", "max logit (training)", "max logit (last 10 steps)",
               "final val_loss", "steps clipped"]
    text = table(headers, rows)
    command = f"python benchmarks/bench_qkclip.py --seeds {args.seeds} --steps {args.steps} --threads {args.threads}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"command": command, "machine": machine, "date": date,
                                                   "steps": args.steps, "seeds": args.seeds, "runs": records},
                                                  indent=1))
    _plot(runs, OUT / "max_logits.png")
    print(text)
    if args.write_results:
        write_results("QKCLIP", _section(text, command, machine, date, args))


def _mean(values: list[float], digits: int) -> str:
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _plot(runs: dict[tuple, list], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (name, lr, tau), rs in runs.items():
        curve = [max(values) for values in zip(*(r.max_logit for r in rs))]
        label = f"{name} lr {lr:g}, " + ("no clip" if math.isinf(tau) else f"tau {tau:g}")
        ax.plot(range(1, len(curve) + 1), curve, label=label, ls="-" if math.isinf(tau) else "--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit (before the clip)")
    ax.axhline(100.0, color="gray", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("charlm: largest logit over heads, layers and seeds per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _section(text: str, command: str, machine: str, date: str, args: argparse.Namespace) -> str:
    return f"""## QK-Clip on charlm (issue 14; `benchmarks/bench_qkclip.py`)

Command: `{command}`. Machine: {machine}; {date}. Each row: charlm's 4-layer width-128 GPT (4 heads
of 32), {args.steps} steps (5% warmup, linear decay), mean ± std over {args.seeds} seeds. `muonkit bench
charlm --optimizers muon --lr muon=0.1 --qk-clip 100` runs the same configuration. max logit: the
largest pre-softmax logit (softmax scale included) of any head in any training forward pass, before
that step's clip; steps clipped: steps whose forward pass saw a head over tau. Plot:
`benchmarks/task-runs/qkclip/max_logits.png`.

{text}
"""


if __name__ == "__main__":
    main()
