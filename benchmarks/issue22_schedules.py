"""Issue 22 item 3's training records: the cheaper schedules against the default, judged by training.

Run (after the runs below, from the repository root):
    python benchmarks/issue22_schedules.py --runs muonkit-runs/i22c --logs muonkit-runs/i22c-sweep-*.log

where muonkit-runs/i22c/<name>/results.json came from `muonkit bench TASK --optimizers
muon,muon-pe4,muon-aol,muon-cubic5,adamw --seeds 3 --steps N --eval-every 10 --threads 1` (with each
candidate's swept lr as --lr), and the logs hold the lr-sweep lines ("sweep muon-aol lr=0.01 seed 0:
val_loss 2.192") of `muonkit bench TASK --lr-sweep --optimizers ... --seeds 1 --threads 1`.

`--run-logs` reads the per-run lines ("muon seed 0: 60 steps, val_acc 0.7210") of invocations stopped
before they wrote results.json. Writes benchmarks/task-runs/issue22c/<run>.json (the CLI's table, per-seed finals, per-optimizer
timings; no per-step curves) and sweeps.json, and prints per task a table: final metric mean ± std
over seeds, whether it is within one std of the default muon row (|difference| <= the larger of
the two stds), steps and seconds to AdamW's mean final metric (median over the seeds that reach
it; seconds are the run's own training clock, so they carry the machine's load), and the optimizer
step's ms.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from issue23_training import _mean_std, sweeps  # the same record format and sweep lines

OUT = Path(__file__).resolve().parent / "task-runs" / "issue22c"
RUN_LINE = re.compile(r"^(\S+) seed (\d+): (\d+) steps, (\S+) (\S+)$")
ORDER = ("muon", "muon-pe4", "muon-aol", "muon-cubic5", "adamw")
WHAT = {"muon": "Polar Express 5 steps (default, 15 products)", "muon-pe4": "Polar Express 4 steps (12)",
        "muon-aol": "aol 4 steps, Turbo-Muon (12)", "muon-cubic5": "cubic5 (10)", "adamw": "torch.optim.AdamW"}


def first_reaching(evals: list[list[float]], target: float, higher_is_better: bool) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or past `target`."""
    for step, seconds, value in evals:
        if (value >= target) if higher_is_better else (value <= target):
            return int(step), float(seconds)
    return None


def summarize(path: Path) -> dict:
    data = json.loads(path.read_text())
    env = data["environment"]
    higher = data["higher_is_better"]
    finals: dict[str, list[float]] = {}
    for run in data["runs"]:
        finals.setdefault(run["optimizer"], []).append(run["evals"][-1][2])
    target = statistics.fmean(finals["adamw"]) if "adamw" in finals else None
    rows = {}
    for name, s in data["summary"].items():
        hits = [first_reaching(r["evals"], target, higher) for r in data["runs"] if r["optimizer"] == name] if target else []
        reached = [h for h in hits if h]
        rows[name] = {"lr": s["lr"], "final": s["final"], "opt_step_ms": s["opt_step_ms"], "fwd_bwd_ms": s["fwd_bwd_ms"],
                      "steps_to_adamw": statistics.median(h[0] for h in reached) if reached else None,
                      "seconds_to_adamw": statistics.median(h[1] for h in reached) if reached else None,
                      "reached": f"{len(reached)}/{len(hits)}"}
    return {"task": data["task"], "metric": data["metric"], "higher_is_better": higher, "steps": data["steps"],
            "seeds": data["seeds"], "wall_seconds": data["wall_seconds"],
            "command": "muonkit " + " ".join(env["argv"][1:]), "date": env["date"], "finished": data["finished"],
            "machine": f"{env['cpu']} ({', '.join(env['cpu_flags'])}), {env['cpu_count']} CPUs, "
                       f"{env['torch_threads']} torch thread(s), torch {env['torch']}",
            "load_average_at_start": env["load_average"], "adamw_final": target, "rows": rows, "table": data["table"]}


def report(run: dict) -> str:
    metric, rows = run["metric"], run["rows"]
    command = run["command"].replace(" --quiet", "").split(" --out ")[0]
    lines = [f"`{command}` ({run['steps']} steps, {run['seeds']} seeds; {run['date']} to {run['finished']}, "
             f"{run['wall_seconds'] / 60:.0f} min wall; {run['machine']}; load average at the start "
             f"{', '.join(f'{x:.1f}' for x in run['load_average_at_start'])}). AdamW's mean final {metric}: "
             + ("no adamw row." if run["adamw_final"] is None else f"{run['adamw_final']:.4f}."), "",
             f"| optimizer | schedule (products) | lr | final {metric} | vs muon | steps to AdamW's final | "
             "seconds to AdamW's final | opt ms/step | fwd+bwd ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    base = _mean_std(rows["muon"]["final"]) if "muon" in rows else None
    for name in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = rows[name]
        mean, std = _mean_std(r["final"])
        verdict = ""
        if base and name not in ("muon", "adamw"):
            diff = mean - base[0]
            better = diff > 0 if run["higher_is_better"] else diff < 0
            within = abs(diff) <= max(std, base[1])
            verdict = f"{diff:+.4f} ({'within one std' if within else ('better' if better else 'worse') + ' beyond one std'})"
        steps = "not reached" if r["steps_to_adamw"] is None else f"{r['steps_to_adamw']:g} ({r['reached']})"
        seconds = "not reached" if r["seconds_to_adamw"] is None else f"{r['seconds_to_adamw']:.1f}"
        lines.append(f"| {name} | {WHAT.get(name, '')} | {r['lr']:g} | {mean:.4f} ± {std:.4f} | {verdict} | {steps} | "
                     f"{seconds} | {r['opt_step_ms']:.1f} | {r['fwd_bwd_ms']:.1f} |")
    return "\n".join(lines)


def finals_from_logs(logs: list[Path]) -> dict:
    """{task: {optimizer: [(seed, steps, metric, value)]}} from the per-run lines of `muonkit bench` logs
    ("muon seed 0: 60 steps, val_acc 0.7210"), for invocations stopped before they wrote results.json."""
    out: dict = {}
    for log in logs:
        task = None
        for line in log.read_text().splitlines():
            if line.startswith("muonkit bench "):
                task = line.split()[2].rstrip(":")
            match = RUN_LINE.match(line.strip())
            if match and task:
                name, seed, steps, metric, value = match.groups()
                out.setdefault(task, {}).setdefault(name, []).append([int(seed), int(steps), metric, float(value)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("muonkit-runs/i22c"))
    parser.add_argument("--logs", type=Path, nargs="*", default=[])
    parser.add_argument("--run-logs", type=Path, nargs="*", default=[],
                        help="logs of bench invocations whose per-run final metrics are read from their lines")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.runs.glob("*/results.json")):
        run = summarize(path)
        (OUT / f"{path.parent.name}.json").write_text(json.dumps(run, indent=1) + "\n")
        print(f"### {run['task']}, {run['steps']} steps\n\n{report(run)}\n")
    runs = finals_from_logs(args.run_logs)
    if runs:
        (OUT / "run-lines.json").write_text(json.dumps(runs, indent=1) + "\n")
        for task, by_name in runs.items():
            print(f"### {task}: final metric per run, from the logs\n")
            print("| optimizer | runs (seed: value) | mean ± std | vs muon |\n|---|---|---|---|")
            base = _mean_std([r[3] for r in by_name["muon"]]) if "muon" in by_name else None
            for name in sorted(by_name, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
                values = [r[3] for r in by_name[name]]
                mean, std = _mean_std(values)
                verdict = ""
                if base and name != "muon":
                    within = abs(mean - base[0]) <= max(std, base[1])
                    verdict = f"{mean - base[0]:+.4f} ({'within' if within else 'beyond'} one std)"
                cells = ", ".join(f"{r[0]}: {r[3]:.4f}" for r in by_name[name])
                print(f"| {name} | {cells} | {mean:.4f} ± {std:.4f} | {verdict} |")
            print()
    found = sweeps(args.logs)
    if found:
        (OUT / "sweeps.json").write_text(json.dumps(found, indent=1) + "\n")
        print("### lr sweeps (1 seed)\n")
        print("| task | optimizer | metric at each lr |\n|---|---|---|")
        for task, by_name in found.items():
            for name, by_lr in by_name.items():
                cells = ", ".join(f"{lr}: {v[0][2]:.4g}" for lr, v in sorted(by_lr.items(), key=lambda kv: float(kv[0])))
                print(f"| {task} | {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
