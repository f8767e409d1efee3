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
from muonkit.orthogonalize import default_ns_dtype
from muonkit.tasks.base import Task
from muonkit.tasks.report import add_steps_to_reference, format_table, plot, summarize, target_hit, write_json_atomic
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
    eval_every: int | None = None
    """Steps between evaluations; None means the task's own."""
    qk_clip: float | None = None
    """QK-Clip's tau for every run (tasks with attention); None: no clip."""
    per_head: bool = False
    """Attention's fused qkv weights read per head (tasks with attention)."""
    tensorboard: Path | None = None
    """Where each run writes TensorBoard event files (a sub-directory per run); None: nowhere."""
    interleave: bool = False
    """Run seed by seed, every optimizer in turn (see run_order); False: all seeds of one optimizer,
    then the next."""


def run_order(optimizers: tuple[str, ...], seeds: int, *, interleave: bool) -> list[tuple[str, int]]:
    """The (optimizer, seed) runs of a bench in the order they train.

    Optimizer by optimizer by default. Interleaved, seed by seed with every optimizer in turn, the
    order of the optimizers reversed every other seed: on a shared machine whose load drifts, each
    optimizer's runs then sample the same stretches of it, and no optimizer is always the first of
    a seed (2 optimizers, 2 seeds: a b b a).
    """
    if not interleave:
        return [(name, seed) for name in optimizers for seed in range(seeds)]
    return [(name, seed) for seed in range(seeds) for name in (optimizers[::-1] if seed % 2 else optimizers)]


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


# CPU features that decide which dtype Newton-Schulz runs fastest in (bf16 matmuls are ~2x faster
# than fp32 with AVX-512 BF16 or AMX, and far slower without them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of CPU_FLAGS it has (Linux /proc/cpuinfo; else platform's name)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model, [f for f in CPU_FLAGS if f in flags]


def environment(device: torch.device) -> dict[str, Any]:
    cpu, flags = cpu_description()
    return {
        "muonkit": muonkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # The dtype Newton-Schulz runs in when ns_dtype is left at None (it follows the machine).
        "ns_dtype_default": str(default_ns_dtype(device)).removeprefix("torch."),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _save_plot(task: Task, runs: dict[str, list[RunResult]], path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        plot(task, runs, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_bench(config: BenchConfig, data: Any, log: Log) -> tuple[str, dict[str, Any]]:
    """Train every optimizer for every seed; write the plot and then results.json. Returns the table
    and the results payload."""
    task = config.task
    started = time.perf_counter()
    env = environment(config.device)  # the machine as the runs found it (date and load at the start)
    if task.evaluation:
        log(f"evaluation: {task.evaluation}")
    # A throwaway run of 2 steps and one evaluation first: the first run in a process pays one-time
    # costs (library caches, code pages, allocator arenas: ~90 MB of resident memory on charlm,
    # measured 2026-11-24) that every later run reuses, and would otherwise charge them to the first
    # optimizer's time and peak memory.
    train_run(task, data, config.optimizers[0], config.lrs[config.optimizers[0]], 0, min(2, config.steps),
              config.device, adamw_lr=config.lrs["adamw"], progress=False, stop_at_target=False,
              qk_clip=config.qk_clip, per_head=config.per_head)
    # Keyed in --optimizers order, each list in seed order, whichever order the runs train in.
    runs: dict[str, list[RunResult]] = {name: [] for name in config.optimizers}
    for name, seed in run_order(config.optimizers, config.seeds, interleave=config.interleave):
        run = train_run(task, data, name, config.lrs[name], seed, config.steps, config.device,
                        adamw_lr=config.lrs["adamw"], progress=config.progress, eval_every=config.eval_every,
                        qk_clip=config.qk_clip, tensorboard=config.tensorboard,
                        per_head=config.per_head)
        if seed == 0:
            for note in run.notes:
                log(f"note: {note}")
        final = run.evals[-1][2] if run.evals else math.nan
        state = "diverged" if run.diverged else f"{task.metric} {final:.4f}"
        log(f"{name} seed {seed}: {len(run.loss)} steps, {state}")
        runs[name].append(run)
    summaries = {name: summarize(task, rs) for name, rs in runs.items()}
    add_steps_to_reference(task, runs, summaries)
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
        "evaluation": task.evaluation or None,
        "qk_clip": config.qk_clip,
        "per_head": config.per_head,
        "wall_seconds": time.perf_counter() - started,
        "environment": env,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "summary": summaries,
        "table": table,
        "runs": [run.to_json() for rs in runs.values() for run in rs],
    }
    write_json_atomic(config.out / "results.json", payload)
    return table, payload


def _mean(values: list[float]) -> float:
    """Mean of a list, NaN if it is empty or any entry is not finite (a diverged run; null in JSON)."""
    finite = values and all(x is not None and math.isfinite(x) for x in values)
    return sum(values) / len(values) if finite else math.nan


def best_lr(scores: dict[str, list[float]], finals: dict[str, list[float]] | None, *, by_steps: bool,
            higher_is_better: bool) -> str:
    """The lr (a key of `scores`) with the best mean score over seeds; a diverged run makes its lr
    the worst. Scored by steps to target (lower is better), lrs that tie (above all: several that
    never reach the target within the budget) are told apart by their mean final metric."""

    def key(lr: str) -> tuple[float, float]:
        mean = _mean(scores[lr])
        if by_steps:
            primary = mean
        else:
            primary = -mean if higher_is_better else mean
        final = _mean(finals.get(lr, [])) if finals else math.nan
        secondary = -final if higher_is_better else final
        return (primary if math.isfinite(primary) else math.inf, secondary if math.isfinite(secondary) else math.inf)

    return min(scores, key=key)


def run_sweep(config: BenchConfig, data: Any, log: Log) -> tuple[str, dict[str, Any]]:
    """Each optimizer at each lr of the task's grid (seeds 0..K-1), at the task's default lrs otherwise.

    The score is the final metric, or for tasks that stop at their target (modular) or ask for it
    (regression) the steps to reach it (a run that never does scores as the budget + 1; ties go to
    the better final metric). A diverged run scores worst. Writes sweep.json; returns a table and
    the payload.
    """
    task = config.task
    by_steps = task.stop_at_target or task.sweep_by_steps
    unit = "steps to target" if by_steps else task.metric
    env = environment(config.device)  # date and load at the start
    if task.evaluation:
        log(f"evaluation: {task.evaluation}")
    scores: dict[str, dict[str, list[float]]] = {}
    finals: dict[str, dict[str, list[float]]] = {}
    for name in config.optimizers:
        scores[name], finals[name] = {}, {}
        for lr in config.grid[name]:
            values, final_values = [], []
            for seed in range(config.seeds):
                run = train_run(task, data, name, lr, seed, config.steps, config.device,
                                adamw_lr=task.lrs["adamw"], progress=config.progress, eval_every=config.eval_every,
                                qk_clip=config.qk_clip, tensorboard=config.tensorboard,
                            per_head=config.per_head)
                final = math.nan if run.diverged or not run.evals else run.evals[-1][2]
                if run.diverged:
                    value = math.nan
                elif by_steps:
                    hit = target_hit(task, run)
                    value = float(hit[0]) if hit else float(config.steps + 1)
                else:
                    value = final
                values.append(value)
                final_values.append(final)
                log(f"sweep {name} lr={lr:g} seed {seed}: {unit} {value:.4g}")
            scores[name][f"{lr:g}"] = values
            finals[name][f"{lr:g}"] = final_values
    best: dict[str, float] = {}
    lines = [f"| optimizer | {unit} at each lr (mean over {config.seeds} seed(s), budget {config.steps} steps) "
             "| best lr |", "|---|---|---|"]
    for name, by_lr in scores.items():
        best[name] = float(best_lr(by_lr, finals[name], by_steps=by_steps, higher_is_better=task.higher_is_better))
        cells = []
        for lr, values in by_lr.items():
            m = _mean(values)
            if not math.isfinite(m):
                cells.append(f"{lr}: diverged")
            elif by_steps and m > config.steps:
                cells.append(f"{lr}: not reached (final {task.metric} {_mean(finals[name][lr]):.3g})")
            else:
                cells.append(f"{lr}: {m:.4g}")
        lines.append(f"| {name} | {', '.join(cells)} | {best[name]:g} |")
    table = "\n".join(lines)
    payload = {"task": task.name, "score": unit, "steps": config.steps, "seeds": config.seeds, "qk_clip": config.qk_clip,
               "per_head": config.per_head,
               "adamw_lr_for_hybrids": task.lrs["adamw"], "results": scores, "final_metric": finals, "best": best,
               "table": table, "environment": env, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(config.out / "sweep.json", payload)
    return table, payload
