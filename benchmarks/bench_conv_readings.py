"""How Muon should read depthwise and grouped convolution filters: three readings, trained.

Readings of a conv filter (out, in/groups, *kernel) with groups > 1:
  matrix     one out x (in/groups * kernel) matrix (Keller Jordan's conv flattening; the seed notebook's)
  per-group  one (out/groups) x (in/groups * kernel) matrix per group (1 x kernel per channel when depthwise)
  adamw      the filter goes to AdamW
Every other parameter is routed by muonkit's rules, and the optimizer is muonkit.Muon with its
defaults (lr shared by the Muon and AdamW groups) under the task's schedule and weight decay.

Tasks: "seed-net" is the `fashion-mnist` task (the seed notebook's network, depthwise 3x3 filters
96 x (1, 3, 3)); "convnext" is a transformers ConvNeXt built from a config (depthwise 7x7, three
stages of widths 24, 48, 96, one block each, patch size 2) on the same Fashion-MNIST data,
augmentations and evaluation.

Run (from the repository root; each stage is ~10-30 min on 2 shared CPU cores):

    python benchmarks/bench_conv_readings.py --task seed-net --stage sweep   # SWEEP_LRS x seed 0
    python benchmarks/bench_conv_readings.py --task seed-net --stage seeds   # seeds 1, 2 at each reading's best lr
    python benchmarks/bench_conv_readings.py --report-only                   # the tables from the saved JSON

Both stages run the task's sweep budget (150 steps), so that seed 0 of the seeds stage is the
sweep's run. Results go to benchmarks/task-runs/conv-readings/<task>-<stage>-<reading>.json (final validation accuracy
and median optimizer step per run); the report prints one markdown table per task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import muonkit  # noqa: E402
from muonkit.tasks import DataOptions, get_task  # noqa: E402
from muonkit.tasks.bench import environment  # noqa: E402
from muonkit.tasks.fashion_mnist import FashionMNIST  # noqa: E402
from muonkit.tasks.training import train_run  # noqa: E402

OUT = ROOT / "benchmarks" / "task-runs" / "conv-readings"
READINGS = ("matrix", "adamw", "per-group")
SWEEP_LRS = {"seed-net": (1e-2, 3e-2), "convnext": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}
SEEDS = (0, 1, 2)


def grouped(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1


def predicate(reading: str):
    """The routing predicate that reads grouped conv filters as `reading` (None for the rest)."""

    def decide(name: str, p: nn.Parameter, module: nn.Module) -> Any:
        if not (grouped(module) and name.endswith("weight") and p.ndim >= 3):
            return None
        if reading == "matrix":
            return ("muon", "conv")
        if reading == "per-group":
            return ("muon", muonkit.Layout.per_block(module.groups, p.ndim))
        return "adamw"

    return decide


class ConvNeXtFashionMNIST(FashionMNIST):
    """transformers' ConvNextForImageClassification from a config, on the fashion-mnist data."""

    name = "convnext-fashion-mnist"

    def model(self, data: Any) -> nn.Module:
        from transformers import ConvNextConfig, ConvNextForImageClassification

        config = ConvNextConfig(num_channels=1, patch_size=2, num_stages=3, hidden_sizes=[24, 48, 96],
                                depths=[1, 1, 1], num_labels=10, image_size=28)
        return ConvNextForImageClassification(config)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs).logits, targets)

    def evaluate(self, model: nn.Module, data: Any) -> float:
        with torch.inference_mode():
            logits = torch.cat([model(x).logits for x in data.val_images.split(250)])
        return (logits.argmax(-1) == data.val_labels).float().mean().item()


def make_task(task: str, reading: str):
    base = get_task("fashion-mnist") if task == "seed-net" else ConvNeXtFashionMNIST()
    routed = type(base)()
    routed.routing = {**base.routing, "predicate": predicate(reading)}
    return routed


def record_path(task: str, stage: str, reading: str) -> Path:
    return OUT / f"{task}-{stage}-{reading}.json"


def load_runs(task: str, stage: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every reading's runs of a stage, and one of its records (for the command, date and steps)."""
    runs, first = [], None
    for reading in READINGS:
        path = record_path(task, stage, reading)
        if path.exists():
            record = json.loads(path.read_text())
            runs += record["runs"]
            first = first or record
    return runs, first


def run(task: str, stage: str, readings: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    base = make_task(task, "adamw")
    data = base.load(DataOptions(), torch.device("cpu"))
    for reading in readings:
        path = record_path(task, stage, reading)
        record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        record.setdefault("environment", environment(torch.device("cpu")))
        record.setdefault("command", " ".join(["python", *sys.argv]))
        record["steps"] = base.sweep_steps
        runs = record.setdefault("runs", [])
        done = {(r["lr"], r["seed"]) for r in runs}
        if stage == "sweep":
            plan = [(lr, 0) for lr in SWEEP_LRS[task]]
        else:
            best = best_lr(task, reading)
            plan = [(best, seed) for seed in SEEDS]
        for lr, seed in plan:
            if (lr, seed) in done:
                continue
            if stage == "seeds" and seed == 0:  # the sweep's run: same lr, seed and budget
                runs.append(next(r for r in load_runs(task, "sweep")[0]
                                 if (r["reading"], r["lr"], r["seed"]) == (reading, lr, 0)))
            else:
                t0 = time.perf_counter()
                result = train_run(make_task(task, reading), data, "muon", lr, seed, base.sweep_steps,
                                   torch.device("cpu"), adamw_lr=lr, progress=False)
                runs.append({"reading": reading, "lr": lr, "seed": seed, "final": result.evals[-1][2],
                             "opt_step_ms": 1e3 * statistics.median(result.opt_s[5:]), "diverged": result.diverged})
                print(f"{task} {reading:9s} lr={lr:g} seed={seed} acc={runs[-1]['final']:.4f} "
                      f"opt={runs[-1]['opt_step_ms']:.1f}ms ({time.perf_counter() - t0:.0f}s)", flush=True)
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))


def best_lr(task: str, reading: str) -> float:
    sweep = [r for r in load_runs(task, "sweep")[0] if r["reading"] == reading]
    return max(sweep, key=lambda r: r["final"])["lr"]


def report() -> str:
    lines = []
    for task in ("seed-net", "convnext"):
        sweep_runs, sweep = load_runs(task, "sweep")
        if sweep is None:
            continue
        seed_runs, seeds = load_runs(task, "seeds")
        lines += [f"**{task}** ({sweep['steps']} steps; sweep at seed 0: `{sweep['command']}`, "
                  f"{sweep['environment']['date']})", "",
                  "| reading | " + " | ".join(f"lr {lr:g}" for lr in SWEEP_LRS[task])
                  + " | best lr | seeds 0, 1, 2 at best lr | mean | opt step ms |",
                  "|---|" + "---|" * (len(SWEEP_LRS[task]) + 4)]
        for reading in READINGS:
            by_lr = {r["lr"]: r["final"] for r in sweep_runs if r["reading"] == reading}
            cells = [f"{by_lr[lr]:.3f}" if lr in by_lr else "-" for lr in SWEEP_LRS[task]]
            finals = sorted((r for r in seed_runs if r["reading"] == reading), key=lambda r: r["seed"])
            best = f"{finals[0]['lr']:g}" if finals else "-"
            values = ", ".join(f"{r['final']:.3f}" for r in finals) or "-"
            mean = f"{statistics.mean(r['final'] for r in finals):.3f}" if finals else "-"
            ms = f"{statistics.median(r['opt_step_ms'] for r in finals):.1f}" if finals else "-"
            lines.append(f"| {reading} | " + " | ".join(cells) + f" | {best} | {values} | {mean} | {ms} |")
        if seeds is not None:
            lines += ["", f"Seeds 1 and 2: `{seeds['command']}`, {seeds['environment']['date']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("seed-net", "convnext"), default="seed-net")
    parser.add_argument("--stage", choices=("sweep", "seeds"), default="sweep")
    parser.add_argument("--readings", default=",".join(READINGS), help="comma-separated, of " + ", ".join(READINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        run(args.task, args.stage, args.readings.split(","), args.threads)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
