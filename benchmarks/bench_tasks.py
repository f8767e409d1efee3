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
    # The first sweeps found these optimizers' best at an edge of the grid; these extend it.
    "sweep-charlm-adamw": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "adamw", "--lr", "adamw=3e-4"]),
    "sweep-fashion-mnist": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw"]),
    "sweep-fashion-mnist-edges": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw",
                                            "--lr", "muon=0.1", "adamw=0.03"]),
    "sweep-modular": ("sweep", ["modular", "--lr-sweep", "--optimizers", "muon,adamw"]),
    "charlm": ("bench", ["charlm", "--optimizers", "muon,adamw,torch-muon", "--seeds", "3"]),
    # torch-muon is not run on fashion-mnist: on this all-conv network it is adamw, bit for bit
    # (tests/test_tasks.py::test_torch_muon_on_the_conv_net_is_exactly_adamw).
    "fashion-mnist": ("bench", ["fashion-mnist", "--optimizers", "muon,adamw", "--seeds", "3"]),
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
    """The best lr of each optimizer over the union of its sweeps, against the task's defaults."""
    scores: dict[str, dict[str, list[float]]] = {}
    lower = True
    for _, sweep in sweeps:
        lower = sweep["score"] == "steps to target" or sweep["score"] in ("val_loss", "val_mse")
        for name, by_lr in sweep["results"].items():
            scores.setdefault(name, {}).update(by_lr)
    defaults = get_task(task_name).lrs
    worst = float("inf") if lower else -float("inf")
    messages = []
    for name, by_lr in scores.items():
        means = {float(lr): (sum(v) / len(v) if all(x == x for x in v) else worst) for lr, v in by_lr.items()}
        best = (min if lower else max)(means, key=means.__getitem__)
        tried = ", ".join(f"{lr:g}" for lr in sorted(means))
        messages.append(f"{name}: best {best:g} of {tried}"
                        + ("" if defaults[name] == best else f" (default is {defaults[name]:g})"))
    return "Best over all sweeps: " + "; ".join(messages) + "."


def comparison(result: dict) -> str:
    """Muon against each other optimizer: means and per-seed wins of the final metric, or of steps to
    target for tasks that stop there; written from the JSON, so it says whichever way it came out."""
    summary, lower = result["summary"], not result["higher_is_better"]
    by_steps = result["task"] == "modular"
    key, what = ("steps_to_target", "steps to target") if by_steps else ("final", f"final {result['metric']}")
    if "muon" not in summary:
        return ""

    def value(v: float | None) -> float:
        return float("inf") if v is None else v

    muon = [value(v) for v in summary["muon"][key]]
    sentences = []
    for name, s in summary.items():
        if name == "muon":
            continue
        other = [value(v) for v in s[key]]
        wins = sum((m < o) if (lower or by_steps) else (m > o) for m, o in zip(muon, other))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        sentences.append(f"muon {mean(muon):.4g} vs {name} {mean(other):.4g} (mean {what}); "
                         f"muon better in {wins} of {len(muon)} seeds")
    return "Measured: " + "; ".join(sentences) + "."


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
            lines += [comparison(result), ""]
            if "torch-muon" in result["summary"]:
                lines += ["torch-muon's optimizer step is torch.optim.Muon's, which runs Newton-Schulz in "
                          "bfloat16; bf16 matmuls are slower than fp32 on this CPU (no AMX), which its "
                          "`opt ms/step` and `seconds to` columns carry.", ""]
            if task_name == "fashion-mnist":
                lines += ["torch-muon is not run separately: torch.optim.Muon accepts only 2D parameters and "
                          "every Muon-routed tensor of this network is a conv filter, so torch-muon is AdamW on "
                          "all parameters, bit for bit the adamw row (tests/test_tasks.py::"
                          "test_torch_muon_on_the_conv_net_is_exactly_adamw).", ""]
            notes = sorted({n for r in result["runs"] for n in r["notes"]})
            lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
        for stage, sweep in sweeps:
            lines += [f"lr sweep (`muonkit bench {' '.join(STAGES[stage][1])}`): {sweep['seeds']} seed, "
                      f"{sweep['steps']} steps; hybrids (torch-muon, muon-kj) keep AdamW at lr "
                      f"{sweep['adamw_lr_for_hybrids']:g} on their non-matrix parameters.", "", sweep["table"], ""]
        if sweeps:
            lines += [lr_check(task_name, sweeps), ""]
    lines += ["Not swept here: cifar10 (CIFAR-10 is not available offline; every optimizer keeps the "
              "notebook's lr 1e-2), regression, and the muon-kj and sgd defaults of every task; their lrs "
              "are set by hand in muonkit/tasks/*.py. `peak MB` is CUDA's max allocated memory and is "
              "not measured on CPU; `opt state MB` is the optimizer state.", "", END]
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
