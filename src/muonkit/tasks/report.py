"""Summaries of finished runs: the per-optimizer table, results.json (written atomically) and plots."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from muonkit.tasks.base import Task, TaskError  # noqa: E402
from muonkit.tasks.training import PEAK_CPU_RSS, PEAK_CUDA, RunResult  # noqa: E402


# What a command writes into --out; a new run removes them first, so that a run that stops or fails
# never leaves an earlier run's results beside it as if they were its own.
OUTPUT_FILES = ("results.json", "curves.png", "sweep.json", "ns.json", "ns_spectra.png")


def prepare_out_dir(path: Path) -> None:
    """Create `path` (and parents), or raise TaskError saying why it cannot be used as --out; remove
    the outputs of an earlier run there (OUTPUT_FILES)."""
    writable_dir(path, "output", "--out")
    for name in OUTPUT_FILES:
        old = path / name
        if old.is_file() or old.is_symlink():
            old.unlink()


def writable_dir(path: Path, what: str, option: str) -> None:
    """Create `path` (and parents), or raise TaskError saying why it cannot serve as the `what`
    directory that `option` names."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TaskError(f"cannot create {what} directory {path}: {e.strerror or e}; "
                        f"pass {option} with a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TaskError(f"{what} directory {path} is not writable; pass {option} with a writable directory")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write strict JSON (NaN and infinities, e.g. of diverged runs, become null) to a temporary file
    in the same directory, then rename: readers never see half a file."""
    text = json.dumps(_finite_or_null(payload), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def target_hit(task: Task, run: RunResult) -> tuple[int, float] | None:
    """(steps, train seconds) of the first evaluation that reached the task's target."""
    for step, seconds, value in run.evals:
        if task.reached(value):
            return step, seconds
    return None


def first_reaching(task: Task, run: RunResult, value: float) -> tuple[int, float] | None:
    """(steps, train seconds) of the first evaluation of `run` at least as good as `value` (None if never)."""
    for step, seconds, metric in run.evals:
        if math.isfinite(metric) and (metric >= value if task.higher_is_better else metric <= value):
            return step, seconds
    return None


def add_steps_to_reference(task: Task, runs: dict[str, list[RunResult]], summaries: dict[str, dict[str, Any]],
                           reference: str = "adamw") -> None:
    """When `reference` ran: each optimizer's steps and train seconds to reach the reference's mean
    final metric ("steps_to_reference", "seconds_to_reference", per seed), and the median steps as a
    multiple of the steps the reference trained to get there ("reference_step_ratio": the median
    length of its runs); undefined when a seed never reaches it. The reference's own row counts its
    whole runs (their length, and the train seconds of their last evaluation)."""
    if reference not in runs:
        return
    finals = [v for v in summaries[reference]["final"] if v is not None and math.isfinite(v)]
    if not finals:
        return
    value = statistics.fmean(finals)
    own = [len(r.loss) for r in runs[reference]]
    for name, rs in runs.items():
        if name == reference:
            hits = [(n, r.evals[-1][1] if r.evals else None) for n, r in zip(own, rs)]
        else:
            hits = [first_reaching(task, r, value) or (None, None) for r in rs]
        steps = [h[0] for h in hits]
        reached = [s for s in steps if s is not None]
        summaries[name]["reference"] = {"optimizer": reference, "value": value}
        summaries[name]["steps_to_reference"] = steps
        summaries[name]["seconds_to_reference"] = [h[1] for h in hits]
        summaries[name]["reference_step_ratio"] = (
            statistics.median(reached) / statistics.median(own) if reached and own and len(reached) == len(steps) else None)


def summarize(task: Task, runs: list[RunResult]) -> dict[str, Any]:
    """Per-run numbers the table and results.json share."""
    finals = [r.evals[-1][2] if r.evals else math.nan for r in runs]
    pick = max if task.higher_is_better else min
    bests = [pick((v for _, _, v in r.evals if math.isfinite(v)), default=math.nan) for r in runs]
    hits = [target_hit(task, r) for r in runs]
    return {
        "lr": runs[0].lr,
        "seeds": [r.seed for r in runs],
        "final": finals,
        "best": bests,
        "steps_to_target": [h[0] if h else None for h in hits],
        "seconds_to_target": [h[1] if h else None for h in hits],
        "diverged": [r.diverged for r in runs],
        "fwd_bwd_ms": statistics.median(s for r in runs for s in r.fwd_bwd_s) * 1e3,
        "opt_step_ms": statistics.median(_undiagnosed(runs)) * 1e3,
        "peak_memory_mb": max((r.peak_memory_mb for r in runs if r.peak_memory_mb is not None), default=None),
        "peak_memory_kind": next((r.peak_memory_kind for r in runs if r.peak_memory_kind), None),
        "optimizer_state_mb": runs[0].optimizer_state_mb,
        "max_logit": max((max(r.max_logit) for r in runs if r.max_logit), default=None),
    }


def _undiagnosed(runs: list[RunResult]) -> list[float]:
    """Optimizer seconds of the steps that did not also compute optimizer statistics (all steps if
    every step did)."""
    clean = []
    for r in runs:
        diagnosed = set(r.diagnosed_steps)
        clean += [s for i, s in enumerate(r.opt_s) if i + 1 not in diagnosed]
    return clean or [s for r in runs for s in r.opt_s]


def _mean_spread(values: list[float], digits: int) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "diverged" if values else "-"
    mean = statistics.fmean(finite)
    text = f"{mean:.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text


def _to_target(values: list[Any], fmt: str) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    median = statistics.median(reached)
    # Sub-second times (tiny tasks such as regression) keep two significant digits, not "0.0".
    text = format(median, ".2g" if fmt.endswith("f") and 0 < abs(median) < 1 else fmt)
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def format_table(task: Task, summaries: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per optimizer; mean ± std over seeds, medians for the timings."""
    digits = 4
    # "steps to 2" left the reader to guess what reaches 2: name the metric.
    target = f"{task.metric} {task.target:g}"
    header = ["optimizer", "lr", f"final {task.metric}", f"best {task.metric}", f"steps to {target}",
              f"seconds to {target}", "fwd+bwd ms/step", "opt ms/step", "peak MB", "opt state MB"]
    with_reference = any("reference" in s for s in summaries.values())
    if with_reference:
        header[6:6] = ["steps to AdamW's final", "× AdamW's steps to it", "seconds to AdamW's final"]
    logits = any(s.get("max_logit") is not None for s in summaries.values())
    if logits:
        header.append("max logit")
    rows = []
    for name, s in summaries.items():
        peak = "-" if s["peak_memory_mb"] is None else f"{s['peak_memory_mb']:.0f}"
        row = [name, f"{s['lr']:g}", _mean_spread(s["final"], digits), _mean_spread(s["best"], digits),
               _to_target(s["steps_to_target"], "g"), _to_target(s["seconds_to_target"], ".1f"),
               f"{s['fwd_bwd_ms']:.1f}", f"{s['opt_step_ms']:.1f}", peak, f"{s['optimizer_state_mb']:.2f}"]
        if with_reference:
            ratio = s.get("reference_step_ratio")
            row[6:6] = [_to_target(s.get("steps_to_reference", []), "g"), "-" if ratio is None else f"{ratio:.2f}",
                        _to_target(s.get("seconds_to_reference", []), ".1f")]
        if logits:
            row.append("-" if s.get("max_logit") is None else f"{s['max_logit']:.1f}")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def memory_note(summaries: dict[str, dict[str, Any]]) -> str:
    """One sentence saying what the table's `peak MB` column measured (and `opt state MB`)."""
    kinds = {s.get("peak_memory_kind") for s in summaries.values()}
    if PEAK_CPU_RSS in kinds:
        peak = ("`peak MB` is the CPU process's peak resident memory during a run (VmHWM, reset through "
                "/proc/self/clear_refs when the run starts) minus its resident memory at that start: what the "
                "run added (model, gradients, optimizer state, activations, temporaries, evaluation), largest "
                "over seeds, after a throwaway 2-step run has paid the process's one-time allocations. It "
                "also moves with how the allocator reuses freed memory: on charlm, repeated runs of one "
                "optimizer differed by up to ~15 MB (2026-11-24), so compare rows only beyond that")
    elif PEAK_CUDA in kinds:
        peak = ("`peak MB` is torch.cuda.max_memory_allocated during a run (everything on the device, data "
                "included), largest over seeds")
    else:
        peak = ("`peak MB` was not measured (\"-\"): not on CUDA, and /proc/self/clear_refs could not reset the "
                "peak resident memory here")
    return peak + "; `opt state MB` is the optimizer state tensors."


def plot(task: Task, runs_by_optimizer: dict[str, list[RunResult]], path: Path) -> None:
    """Validation metric vs step and vs train seconds (mean over seeds, band from min to max when
    there is more than one seed); below, one panel per optimizer: each parameter's update RMS over
    the steps (seed 0)."""
    watched = {name: runs[0] for name, runs in runs_by_optimizer.items() if runs and runs[0].update_rms_steps}
    fig = plt.figure(figsize=(11, 8.2 if watched else 4.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(4.2, 4.0)) if watched else (fig, None)
    axes = top.subplots(1, 2)
    shown: list[float] = []
    for name, runs in runs_by_optimizer.items():
        curves = [_curve(r) for r in runs if r.evals]
        if not curves:
            continue
        grid = max((c[0] for c in curves), key=len)
        seconds = np.mean([_extend(c[0], c[1], grid, per_step=True) for c in curves], axis=0)
        values = np.array([_extend(c[0], c[2], grid, per_step=False) for c in curves])
        values[~np.isfinite(values)] = np.nan
        shown += [float(v) for v in values.ravel() if np.isfinite(v)]
        diverged = sum(r.diverged for r in runs)
        label = f"{name} (lr {runs[0].lr:g})" + (f", {diverged} of {len(runs)} diverged" if diverged else "")
        # Mean and band over the seeds still finite at each step, so one diverged seed does not erase
        # the others; a few points get markers, so that a single evaluation is still visible.
        finite = np.isfinite(values).any(0)
        x_step, x_sec, vals = grid[finite], seconds[finite], values[:, finite]
        marker = "o" if len(x_step) <= 3 else None
        for ax, x in zip(axes, (x_step, x_sec)):
            if not len(x):
                ax.plot([], [], label=label)  # diverged at every evaluation: still in the legend
                continue
            (line,) = ax.plot(x, np.nanmean(vals, 0), marker=marker, label=label)
            if len(curves) > 1:
                ax.fill_between(x, np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.2)
    # A loss or error falling over decades (regression's MSE) is flat near zero on a linear axis.
    log_scale = (not task.higher_is_better and shown and min(shown) > 0 and max(shown) > 10 * min(shown))
    for ax, xlabel in zip(axes, ("step", "train seconds")):
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(task.metric)
        ax.axhline(task.target, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend()
    seeds = max((len(r) for r in runs_by_optimizer.values()), default=0)
    over = f"mean over {seeds} seeds, band = min..max" if seeds > 1 else "one seed"
    top.suptitle(f"{task.name}: {over}; dashed = target {task.target:g}")
    if bottom is not None:
        _plot_update_rms(bottom, watched)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_update_rms(fig: Any, runs: dict[str, RunResult]) -> None:
    """A panel per optimizer: the update RMS (before lr, without weight decay) of every parameter
    over the steps, on a shared logarithmic axis. One color per role (the name without its layer
    numbers: blocks.*.qkv.weight), darker for deeper layers. Colors are tab10's ten hues; roles past
    the tenth repeat them with another line style (tab20's light/dark pairs of one hue read as the
    shading of depth: an MoE Llama's q_proj looked like a shallow embed_tokens)."""
    names = list(dict.fromkeys(n for run in runs.values() for n in run.update_rms))
    roles = {name: re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names}
    order = list(dict.fromkeys(roles.values()))
    depth = {name: [n for n in names if roles[n] == roles[name]].index(name) for name in names}
    layers = {role: sum(1 for n in names if roles[n] == role) for role in order}
    colors = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True))
    for ax, (optimizer, run) in zip(axes, runs.items()):
        steps = np.array(run.update_rms_steps, dtype=float)
        for name in names:
            values = np.array(run.update_rms.get(name, []), dtype=float)
            keep = np.isfinite(values) & (values > 0)
            if not keep.any():
                continue
            role = roles[name]
            shade = 0.35 + 0.65 * (depth[name] + 1) / layers[role]
            hue, style = divmod(order.index(role), colors.N)[::-1]
            ax.plot(steps[: len(values)][keep], values[keep], lw=1, color=colors(hue),
                    ls=styles[style % len(styles)], alpha=shade, label=role if depth[name] == layers[role] - 1 else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{optimizer} (lr {run.lr:g})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("update RMS (before lr, without weight decay)")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle("update RMS per parameter, seed 0 (one color per role, darker = deeper layer): a layer far "
                 "from the others, or drifting, is where to look", fontsize=10)


def _curve(run: RunResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps, seconds, values = (np.array(column, dtype=float) for column in zip(*run.evals))
    return steps, seconds, values


def _extend(steps: np.ndarray, ys: np.ndarray, grid: np.ndarray, *, per_step: bool) -> np.ndarray:
    """`ys` on the longer step grid of another seed: a run that stopped early (target reached or
    diverged) keeps its last value; its clock goes on at its own mean seconds per step."""
    out = np.interp(grid, steps, ys)
    beyond = grid > steps[-1]
    if per_step:
        out[beyond] = ys[-1] + (grid[beyond] - steps[-1]) * ys[-1] / steps[-1]
    else:
        out[beyond] = ys[-1]
    return out
