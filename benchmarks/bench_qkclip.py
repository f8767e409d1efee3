"""QK-Clip on charlm: the largest attention logit over training, and the final validation loss, with
and without the clip, at learning rates high enough that the logits grow.

Run (from the repository root; ~15 minutes on 2 shared CPU cores):

    python benchmarks/bench_qkclip.py [--seeds 2] [--steps 300] [--threads 1] [--write-results]
    python benchmarks/bench_qkclip.py --report-only [--write-results]   # from the saved JSON

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
    parser.add_argument("--report-only", action="store_true", help="table, plot and section from the saved JSON")
    args = parser.parse_args()
    if not args.report_only:
        record = train(args)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results.json").write_text(json.dumps(record, indent=1))
    record = json.loads((OUT / "results.json").read_text())
    text = report_table(record)
    _plot(record, OUT / "max_logits.png")
    print(text)
    if args.write_results:
        write_results("QKCLIP", _section(text, record))


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    machine = environment()
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
    command = f"python benchmarks/bench_qkclip.py --seeds {args.seeds} --steps {args.steps} --threads {args.threads}"
    return {"command": command, "machine": machine, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "seeds": args.seeds,
            "runs": [{"optimizer": name, "lr": lr, "tau": None if math.isinf(tau) else tau,
                      "max_logit": [r.max_logit for r in rs], "final_val_loss": [r.evals[-1][2] for r in rs],
                      "opt_ms": [statistics.median(r.opt_s) * 1e3 for r in rs]}
                     for (name, lr, tau), rs in runs.items()]}


def report_table(record: dict) -> str:
    rows = []
    for run in record["runs"]:
        tau = math.inf if run["tau"] is None else run["tau"]
        peak = [max(m) for m in run["max_logit"]]
        end = [max(m[-10:]) for m in run["max_logit"]]
        clipped = [sum(v > tau for v in m) for m in run["max_logit"]]
        rows.append([run["optimizer"], run["lr"], "none" if run["tau"] is None else f"{tau:g}", _mean(peak, 0),
                     _mean(end, 0), _mean(run["final_val_loss"], 4),
                     "-" if run["tau"] is None else f"{statistics.fmean(clipped):.0f}"])
    headers = ["optimizer", "lr", "QK-Clip tau", "max logit (training)", "max logit (last 10 steps)",
               "final val_loss", "steps clipped"]
    return table(headers, rows)


def _findings(record: dict) -> list[str]:
    """One sentence per (optimizer, lr) run both without and with the clip."""
    lines = []
    plain = {(r["optimizer"], r["lr"]): r for r in record["runs"] if r["tau"] is None}
    for run in record["runs"]:
        base = plain.get((run["optimizer"], run["lr"]))
        if run["tau"] is None or base is None:
            continue
        peak = statistics.fmean(max(m) for m in run["max_logit"])
        base_peak = statistics.fmean(max(m) for m in base["max_logit"])
        loss, base_loss = statistics.fmean(run["final_val_loss"]), statistics.fmean(base["final_val_loss"])
        seeds_over = sum(max(m) > run["tau"] for m in base["max_logit"])
        lines.append(f"- {run['optimizer']} at lr {run['lr']:g}: without the clip the largest logit reached "
                     f"{base_peak:.0f} (mean over seeds; {seeds_over} of {len(base['max_logit'])} seeds passed "
                     f"{run['tau']:g}); with tau {run['tau']:g} it peaked at {peak:.0f} before a clip (one step's "
                     f"update past the last clip) and the final val_loss moved from {base_loss:.4f} to {loss:.4f} "
                     f"({loss - base_loss:+.4f}).")
    return lines


def _mean(values: list[float], digits: int) -> str:
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _plot(record: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = {}
    for run in record["runs"]:
        key = (run["optimizer"], run["lr"])
        colors.setdefault(key, f"C{len(colors)}")
        curve = [max(values) for values in zip(*run["max_logit"])]
        label = f"{run['optimizer']} lr {run['lr']:g}, " + ("no clip" if run["tau"] is None else f"tau {run['tau']:g}")
        ax.plot(range(1, len(curve) + 1), curve, label=label, color=colors[key], ls="-" if run["tau"] is None else "--")
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


def _section(text: str, record: dict) -> str:
    findings = "\n".join(_findings(record))
    return f"""## QK-Clip on charlm (issue 14; `benchmarks/bench_qkclip.py`)

Command: `{record["command"]}`. Machine: {record["machine"]}; {record["date"]}. Each row: charlm's
4-layer width-128 GPT (4 heads of 32), {record["steps"]} steps (5% warmup, linear decay), mean ± std over
{record["seeds"]} seeds; `muonkit bench charlm --optimizers muon --lr muon=0.1 --qk-clip 100` runs the same
configuration. max logit: the largest pre-softmax logit (softmax scale included) of any head in any
training forward pass, before that step's clip; steps clipped: steps whose forward pass saw a head
over tau (mean over seeds). Plot: `benchmarks/task-runs/qkclip/max_logits.png`.

{text}

{findings}
"""


if __name__ == "__main__":
    main()
