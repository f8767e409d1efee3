"""Issue 23's training records: small summaries of `muonkit bench` runs and the Markdown for RESULTS.md.

Run (after the runs below, from the repository root):
    python benchmarks/issue23_training.py --runs muonkit-runs/i23 --logs muonkit-runs/chain-*.log

where muonkit-runs/i23/<name>/results.json came from (2026-12-07; each invocation writes its
results when all its runs are done, so the optimizers were split to keep what finished):
    muonkit bench charlm --optimizers dion2,muon --lr dion2=0.04 --seeds 3 --steps 100 --threads 1
    muonkit bench charlm --optimizers muon-8bit --seeds 3 --steps 100 --threads 1
    muonkit bench charlm --optimizers normuon,nordion2 --lr nordion2=0.01 --seeds 3 --steps 100 --threads 1
    muonkit bench charlm --optimizers dion2,muon --lr dion2=0.04 --seeds 3 --steps 200 --threads 1   (charlm-200-dion2-muon)
    muonkit bench hf-lm --hf-config qwen3-moe --optimizers muon,muon-8bit,normuon,dion2,nordion2 --seeds 3 --threads 1
    muonkit bench hf-lm --hf-config qwen3-moe --optimizers dion2 --lr dion2=0.01 --seeds 3 --threads 1
    muonkit bench hf-lm --hf-config qwen3-moe --optimizers nordion2 --lr nordion2=0.01 --seeds 3 --threads 1
and the logs hold the lr-sweep lines ("sweep dion2 lr=0.02 seed 0: val_loss 2.201") of
    muonkit bench charlm --lr-sweep --optimizers dion2,nordion2 --lr dion2=0.005 dion2=0.01 dion2=0.02 dion2=0.04 \
        nordion2=0.01 nordion2=0.02 nordion2=0.04 --seeds 1 --threads 1   (stopped after dion2's points)
    muonkit bench charlm --lr-sweep --optimizers dion2 --lr dion2=0.08 --seeds 1 --threads 1
    muonkit bench fashion-mnist --lr-sweep --optimizers dion2,nordion2 --lr dion2=0.01 dion2=0.03 dion2=0.1 \
        nordion2=0.01 nordion2=0.03 nordion2=0.1 --seeds 1 --threads 1   (stopped after two points)
    muonkit bench hf-lm --hf-config qwen3-moe --lr-sweep --optimizers dion2 --lr dion2=0.01 dion2=0.1 --seeds 1 --steps 200 --threads 1

Fourth session (2026-12-07, Intel Xeon avx512_bf16, Newton-Schulz in float32: main at 88b1035,
before issue 22's default change): lr sweeps of NorDion2 (1 seed, the tasks' sweep budgets)
    muonkit bench charlm --lr-sweep --optimizers nordion2 --lr nordion2=0.01 nordion2=0.02 nordion2=0.04 \
        nordion2=0.08 --seeds 1 --threads 1
    muonkit bench fashion-mnist --lr-sweep --optimizers nordion2 --lr nordion2=0.01 nordion2=0.03 nordion2=0.1 --seeds 1 --threads 1
    muonkit bench fashion-mnist --lr-sweep --optimizers nordion2 --lr nordion2=0.3 --seeds 1 --threads 1
then charlm at its default 300 steps, one optimizer per invocation (muonkit-runs/chain_charlm.sh):
    muonkit bench charlm --optimizers OPT [--lr dion2=0.04 | --lr nordion2=0.02] --seeds 3 --threads 1 \
        --out muonkit-runs/i23/charlm-300-OPT        (OPT: muon, muon-8bit, dion2, nordion2, normuon)
and this script with `--ns-dtype float32 --logs muonkit-runs/sweep-*.log`.

Writes benchmarks/task-runs/issue23/<run>.json (the CLI's table, per-seed finals, per-optimizer
timings and state; no per-step curves) and sweeps.json, and prints per task: the table, whether
8-bit momentum lands within one standard deviation of float32 momentum (|mean difference| <= the
float32 runs' std over seeds), and Dion2's gap to Muon (NorDion2's to NorMuon).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "task-runs" / "issue23"
SWEEP_LINE = re.compile(r"^sweep (\S+) lr=(\S+) seed (\d+): (\S+) (\S+)$")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(path: Path, ns_dtype: str | None = None) -> dict:
    data = json.loads(path.read_text())
    env = data["environment"]
    return {"task": data["task"], "metric": data["metric"], "higher_is_better": data["higher_is_better"], "ns_dtype": ns_dtype,
            "steps": data["steps"], "seeds": data["seeds"], "wall_seconds": data["wall_seconds"],
            "command": "muonkit " + " ".join(env["argv"][1:]), "date": env["date"], "finished": data["finished"],
            "machine": f"{env['cpu']} ({', '.join(env['cpu_flags'])}), {env['cpu_count']} CPUs, "
                       f"{env['torch_threads']} torch thread(s), torch {env['torch']}",
            "load_average_at_start": env["load_average"], "summary": data["summary"], "table": data["table"]}


ORDER = ("muon", "muon-8bit", "normuon", "dion2", "nordion2")


def merge(runs: list[dict]) -> dict:
    """One task's invocations as one run: their summaries and table rows (muon, muon-8bit,
    normuon, dion2, nordion2 first), commands joined, the earliest date and latest finish."""
    if len(runs) == 1:
        return runs[0]
    summary: dict = {}
    rows: list[tuple[str, str]] = []
    for run in runs:  # an optimizer run again (at another lr) keeps both rows; the later one's summary counts
        for name, v in run["summary"].items():
            if name in summary:
                summary[f"{name}@{summary[name]['lr']:g}"] = summary[name]
            summary[name] = v
        rows += [(line.split("|")[1].strip(), line) for line in run["table"].splitlines()[2:]]
    rows.sort(key=lambda row: ORDER.index(row[0]) if row[0] in ORDER else len(ORDER))
    table = "\n".join(runs[0]["table"].splitlines()[:2] + [line for _, line in rows])
    return {**runs[0], "summary": summary, "table": table,
            "command": "; ".join(r["command"] for r in runs), "date": min(r["date"] for r in runs),
            "finished": max(r["finished"] for r in runs), "wall_seconds": sum(r["wall_seconds"] for r in runs)}


def report(run: dict) -> str:
    s, metric = run["summary"], run["metric"]
    sign = 1.0 if run["higher_is_better"] else -1.0  # > 0: better than the reference
    commands = "; ".join(f"`{c.replace(' --quiet', '').split(' --out ')[0]}`" for c in run["command"].split("; "))
    dtype = f"; Newton-Schulz dtype {run['ns_dtype']}" if run.get("ns_dtype") else ""
    lines = [f"{commands} ({run['steps']} steps, {run['seeds']} seed(s); "
             f"{run['date']} to {run['finished']}, {run['wall_seconds'] / 60:.0f} min wall; {run['machine']}{dtype}; "
             f"load average at the start {', '.join(f'{x:.1f}' for x in run['load_average_at_start'])})", "",
             run["table"], ""]
    stats = {name: _mean_std(v["final"]) for name, v in s.items()}
    if "muon" in stats and "muon-8bit" in stats:
        (m32, s32), (m8, s8) = stats["muon"], stats["muon-8bit"]
        within = abs(m8 - m32) <= s32
        lines.append(f"- 8-bit momentum within one std of float32 momentum: **{'yes' if within else 'no'}** "
                     f"(final {metric} {m8:.4f} ± {s8:.4f} vs {m32:.4f} ± {s32:.4f}; difference {m8 - m32:+.4f}); "
                     f"optimizer state {s['muon-8bit']['optimizer_state_mb']:.2f} MB vs {s['muon']['optimizer_state_mb']:.2f} MB.")
    for variant, base in (("dion2", "muon"), ("nordion2", "normuon")):
        if variant in stats and base in stats:
            (mv, sv), (mb, sb) = stats[variant], stats[base]
            verdict = "better" if sign * (mv - mb) > 0 else "worse"
            lines.append(f"- {variant} (lr {s[variant]['lr']:g}) vs {base} (lr {s[base]['lr']:g}): {mv:.4f} ± {sv:.4f} vs "
                         f"{mb:.4f} ± {sb:.4f}, gap {mv - mb:+.4f} ({verdict}); optimizer step "
                         f"{s[variant]['opt_step_ms']:.1f} vs {s[base]['opt_step_ms']:.1f} ms.")
    return "\n".join(lines)


def sweeps(logs: list[Path]) -> dict:
    """{task: {optimizer: {lr: [(seed, metric, value)]}}} from the lr-sweep lines of the logs."""
    out: dict = {}
    for log in logs:
        task = None
        for line in log.read_text().splitlines():
            if line.startswith("muonkit lr sweep "):
                task = line.split()[3].rstrip(":")
            match = SWEEP_LINE.match(line.strip())
            if match and task:
                name, lr, seed, metric, value = match.groups()
                out.setdefault(task, {}).setdefault(name, {}).setdefault(lr, []).append([int(seed), metric, float(value)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("muonkit-runs/i23"))
    parser.add_argument("--logs", type=Path, nargs="*", default=[])
    parser.add_argument("--ns-dtype", default=None,
                        help="the Newton-Schulz dtype the runs in --runs used (the group default on their machine)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.runs.glob("*/results.json")):
        (OUT / f"{path.parent.name}.json").write_text(json.dumps(summarize(path, args.ns_dtype), indent=1) + "\n")
    # Every summary kept in OUT (earlier sessions' too), by task and length.
    by_task: dict[str, list[dict]] = {}
    kept = [json.loads(path.read_text()) for path in OUT.glob("*.json") if path.name != "sweeps.json"]
    for run in sorted(kept, key=lambda run: run["date"]):  # in the order they ran: a later lr's summary counts
        config = " " + run["command"].split("--hf-config ")[1].split()[0] if "--hf-config" in run["command"] else ""
        by_task.setdefault(f"{run['task']}{config}, {run['steps']} steps", []).append(run)
    for task, runs in by_task.items():
        print(f"### {task}\n")
        if len(runs) > 1:
            print(f"The optimizers ran in {len(runs)} invocations (each writes its results when all its runs are done):\n")
        merged = merge(runs)
        print(f"{report(merged)}\n")
    found = json.loads((OUT / "sweeps.json").read_text()) if (OUT / "sweeps.json").exists() else {}
    for task, by_name in sweeps(args.logs).items():  # new points join (or replace) the kept ones
        for name, by_lr in by_name.items():
            found.setdefault(task, {}).setdefault(name, {}).update(by_lr)
    if found:
        (OUT / "sweeps.json").write_text(json.dumps(found, indent=1) + "\n")
        print("### lr sweeps (1 seed, the task's sweep budget)\n")
        print("| task | optimizer | metric at each lr |\n|---|---|---|")
        for task, by_name in found.items():
            for name, by_lr in by_name.items():
                cells = ", ".join(f"{lr}: {v[0][2]:.4g}" for lr, v in sorted(by_lr.items(), key=lambda kv: float(kv[0])))
                print(f"| {task} | {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
