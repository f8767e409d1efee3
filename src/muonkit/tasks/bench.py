"""`muonkit bench`: every (optimizer, seed) run of a task, the lr sweep, and what gets written."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import muonkit
from muonkit.tasks.base import Task
from muonkit.tasks.report import format_table, plot, summarize, write_json_atomic
from muonkit.tasks.training import RunResult, train_run

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    task: Task
    optimizers: tuple[str, ...]
    lrs: dict[str, float]
    grid: dict[str, tuple[float, ...]]
    """The lrs an lr sweep tries for each optimizer."""
    seeds: int
    steps: int
    device: torch.device
    out: Path
    progress: bool = True


def auto_threads() -> int:
    """Torch threads for a run: the cores the 1-minute load average leaves idle, at least one.

    On a shared machine, more threads than idle cores makes every parallel region wait for a
    descheduled thread; measured here, 2 threads ran a charlm step 5x slower than 1 under load.
    """
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "muonkit": muonkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _save_plot(task: Task, runs: dict[str, list[RunResult]], path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    plot(task, runs, tmp)
    os.replace(tmp, path)


def run_bench(config: BenchConfig, data: Any, log: Log) -> tuple[str, dict[str, Any]]:
    """Train every optimizer for every seed; write the plot and then results.json. Returns the table
    and the results payload."""
    task = config.task
    runs: dict[str, list[RunResult]] = {}
    started = time.perf_counter()
    for name in config.optimizers:
        runs[name] = []
        for seed in range(config.seeds):
            run = train_run(task, data, name, config.lrs[name], seed, config.steps, config.device,
                            adamw_lr=config.lrs["adamw"], progress=config.progress)
            if seed == 0:
                for note in run.notes:
                    log(f"note: {note}")
            final = run.evals[-1][2] if run.evals else math.nan
            state = "diverged" if run.diverged else f"{task.metric} {final:.4f}"
            log(f"{name} seed {seed}: {len(run.loss)} steps, {state}")
            runs[name].append(run)
    summaries = {name: summarize(task, rs) for name, rs in runs.items()}
    table = format_table(task, summaries)
    _save_plot(task, runs, config.out / "curves.png")
    payload = {
        "task": task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "target": task.target,
        "steps": config.steps,
        "seeds": config.seeds,
        "weight_decay": task.weight_decay,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment(config.device),
        "summary": summaries,
        "table": table,
        "runs": [run.to_json() for rs in runs.values() for run in rs],
    }
    write_json_atomic(config.out / "results.json", payload)
    return table, payload


def run_sweep(config: BenchConfig, data: Any, log: Log) -> tuple[str, dict[str, Any]]:
    """Each optimizer at each lr of the task's grid (seeds 0..K-1), at the task's default lrs otherwise.

    The score is the final metric, or for tasks that stop at their target (modular) the steps to
    reach it (a run that never does scores as the budget + 1). A diverged run scores worst. Writes
    sweep.json; returns a table and the payload.
    """
    task = config.task
    by_steps = task.stop_at_target
    unit = "steps to target" if by_steps else task.metric
    lower_is_better = by_steps or not task.higher_is_better
    worst = math.inf if lower_is_better else -math.inf
    scores: dict[str, dict[str, list[float]]] = {}
    for name in config.optimizers:
        scores[name] = {}
        for lr in config.grid[name]:
            values = []
            for seed in range(config.seeds):
                run = train_run(task, data, name, lr, seed, config.steps, config.device,
                                adamw_lr=task.lrs["adamw"], progress=config.progress)
                if run.diverged:
                    value = math.nan
                elif by_steps:
                    value = float(len(run.loss)) if run.stopped_at_target else float(config.steps + 1)
                else:
                    value = run.evals[-1][2]
                values.append(value)
                log(f"sweep {name} lr={lr:g} seed {seed}: {unit} {value:.4g}")
            scores[name][f"{lr:g}"] = values
    best: dict[str, float] = {}
    lines = [f"| optimizer | {unit} at each lr (mean over {config.seeds} seed(s), budget {config.steps} steps) "
             "| best lr |", "|---|---|---|"]
    for name, by_lr in scores.items():
        means = {lr: (sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.nan) for lr, v in by_lr.items()}
        ranked = {lr: (m if math.isfinite(m) else worst) for lr, m in means.items()}
        best[name] = float((min if lower_is_better else max)(ranked, key=ranked.__getitem__))
        cells = ", ".join(f"{lr}: " + ("diverged" if not math.isfinite(m) else
                                       "not reached" if by_steps and m > config.steps else f"{m:.4g}")
                          for lr, m in means.items())
        lines.append(f"| {name} | {cells} | {best[name]:g} |")
    table = "\n".join(lines)
    payload = {"task": task.name, "score": unit, "steps": config.steps, "seeds": config.seeds,
               "adamw_lr_for_hybrids": task.lrs["adamw"], "results": scores, "best": best,
               "table": table, "environment": environment(config.device)}
    write_json_atomic(config.out / "sweep.json", payload)
    return table, payload
