"""Regenerate the task section of benchmarks/RESULTS.md: lr sweeps and task results of `muonkit bench`.

Run (from the repository root; about an hour on 2 CPU cores, stages run one after another):

    python benchmarks/bench_tasks.py                       # every stage, then RESULTS.md
    python benchmarks/bench_tasks.py --stages charlm       # one stage (see STAGES), then RESULTS.md
    python benchmarks/bench_tasks.py --report-only         # RESULTS.md from the saved JSON only

Each stage calls the command line in-process (muonkit.cli.main) and keeps its results.json /
sweep.json under benchmarks/task-runs/<stage>/, so the report can be rebuilt without retraining.
It prints each stage's table, and writes the section between the TASKS markers in RESULTS.md
(creating the file if needed). Nothing here types a number by hand: every figure is read from the
JSON that the runs wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from muonkit.cli import main  # noqa: E402
from muonkit.tasks import get_task  # noqa: E402

RUNS = ROOT / "benchmarks" / "task-runs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- TASKS:BEGIN (benchmarks/bench_tasks.py) -->", "<!-- TASKS:END -->"

# stage -> (kind, argv after `muonkit bench`). Sweeps use 1 seed and the task's sweep budget.
STAGES: dict[str, tuple[str, list[str]]] = {
    "sweep-charlm": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "muon,adamw,torch-muon"]),
    # The first charlm sweep found adamw's best at the grid's lowest lr; this one extends it down.
    "sweep-charlm-adamw": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "adamw"]),
    "sweep-fashion-mnist": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw"]),
    "sweep-modular": ("sweep", ["modular", "--lr-sweep", "--optimizers", "muon,adamw"]),
    "charlm": ("bench", ["charlm", "--optimizers", "muon,adamw,torch-muon", "--seeds", "3"]),
    "fashion-mnist": ("bench", ["fashion-mnist", "--optimizers", "muon,adamw,torch-muon", "--seeds", "3"]),
    "modular": ("bench", ["modular", "--optimizers", "muon,adamw", "--seeds", "3"]),
    "default": ("timed", []),
}


def run_stage(name: str) -> None:
    kind, argv = STAGES[name]
    out = RUNS / name
    if kind == "timed":
        # A separate process, so the time includes interpreter start-up and imports.
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "muonkit", "bench", "--quiet", "--out", str(out)], check=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
        seconds = time.perf_counter() - start
        (out / "timing.json").write_text(json.dumps({"command": "muonkit bench", "seconds": seconds}))
        return
    code = main(["bench", *argv, "--quiet", "--out", str(out)])
    if code != 0:
        raise SystemExit(f"stage {name} failed with exit code {code}")


def load(name: str, file: str) -> dict | None:
    path = RUNS / name / file
    return json.loads(path.read_text()) if path.is_file() else None


def sweeps_of(task_name: str) -> list[tuple[str, dict]]:
    """Every saved sweep of a task, in STAGES order (a later sweep of an optimizer supersedes)."""
    found = []
    for stage, (kind, argv) in STAGES.items():
        if kind == "sweep" and argv[0] == task_name and (data := load(stage, "sweep.json")):
            found.append((stage, data))
    return found


def lr_check(task_name: str, sweeps: list[tuple[str, dict]]) -> str:
    best: dict[str, float] = {}
    for _, sweep in sweeps:
        best.update(sweep["best"])
    defaults = get_task(task_name).lrs
    differing = [f"{n}: default {defaults[n]:g}, sweep best {b:g}" for n, b in best.items() if defaults[n] != b]
    return ("The task's default lrs equal the sweeps' best." if not differing
            else "Defaults differ from the sweeps' best: " + "; ".join(differing) + ".")


def report() -> str:
    lines = [BEGIN, "## Tasks (`muonkit bench`)", ""]
    env = None
    for stage in ("charlm", "fashion-mnist", "modular", "default", *STAGES):
        data = load(stage, "results.json") or load(stage, "sweep.json")
        if data:
            env = data["environment"]
            break
    if env:
        lines += [f"Measured with torch {env['torch']} on {env['device']} ({env['cpu_count']} CPUs, "
                  f"{env['torch_threads']} torch threads), {env['date']}. The machine is shared with other "
                  "jobs, so times carry their load; compare optimizers within one table.", ""]
    timing = load("default", "timing.json")
    if timing:
        default = load("default", "results.json")
        lines += ["### `muonkit bench` (no arguments)", "",
                  f"Wall-clock {timing['seconds']:.0f} s for the whole command (start-up, corpus, muon and "
                  "adamw runs, plot, JSON).", ""]
        if default:
            lines += [default["table"], ""]
    for task_name in ("charlm", "fashion-mnist", "modular"):
        sweeps = sweeps_of(task_name)
        result = load(task_name, "results.json")
        if not (sweeps or result):
            continue
        task = get_task(task_name)
        lines += [f"### {task_name}", "", task.summary + ".", ""]
        if result:
            lines += [f"{result['seeds']} seeds x {result['steps']} steps, each optimizer at its default lr "
                      f"(weight decay {result['weight_decay']:g} for all); mean ± std over seeds, "
                      "medians for times. Command: `muonkit bench "
                      + " ".join(STAGES[task_name][1]) + "`", "", result["table"], ""]
            notes = sorted({n for r in result["runs"] for n in r["notes"]})
            lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
        for stage, sweep in sweeps:
            lines += [f"lr sweep (`muonkit bench {' '.join(STAGES[stage][1])}`): {sweep['seeds']} seed, "
                      f"{sweep['steps']} steps; hybrids (torch-muon, muon-kj) keep AdamW at lr "
                      f"{sweep['adamw_lr_for_hybrids']:g} on their non-matrix parameters.", "", sweep["table"], ""]
        if sweeps:
            lines += [lr_check(task_name, sweeps), ""]
    lines.append(END)
    return "\n".join(lines)


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated from: {', '.join(STAGES)}")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if not args.report_only:
        for stage in args.stages.split(","):
            print(f"== {stage}", flush=True)
            run_stage(stage)
    section = report()
    write_results(section)
    print(section)
