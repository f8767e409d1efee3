"""Regenerate the task section of benchmarks/RESULTS.md: lr sweeps and task results of `muonkit bench`.

Run (from the repository root; about 1.5 hours on 2 CPU cores for every stage, one after another):

    python benchmarks/bench_tasks.py                       # every stage, then RESULTS.md
    python benchmarks/bench_tasks.py --stages charlm       # one stage (see STAGES), then RESULTS.md
    python benchmarks/bench_tasks.py --report-only         # RESULTS.md from the saved JSON only
    python benchmarks/bench_tasks.py --stages fashion-mnist --only muon   # rerun some rows of a stage

Each stage calls the command line in-process (muonkit.cli.main) and keeps its results.json /
sweep.json / ns.json under benchmarks/task-runs/<stage>/, so the report can be rebuilt without
retraining; the "default" stage runs ./scripts/bench.sh as a user would and times it. Every record
carries the machine, date and command it was measured with, and the report prints them beside
each table. `--only` reruns some optimizers of a sweep or bench stage (after their lr or grid
changed) and keeps the stored rows of the others; the record and the report say which rows were
rerun, when and how.

A results.json is stored slim (`slim_results`): the per-step lists (loss, times) of each run
become its step count, the summary keeps their medians, and the update-RMS curves the plot draws
(seed 0) are thinned to CURVE_POINTS points; per-step JSON of every run would be megabytes.
It prints each stage's table, and writes the section between the TASKS markers in RESULTS.md
(creating the file if needed). Nothing here types a number by hand: every figure is read from the
JSON that the runs wrote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from muonkit.cli import main  # noqa: E402
from muonkit.tasks import get_task  # noqa: E402
from muonkit.tasks.bench import best_lr  # noqa: E402
from muonkit.tasks.optimizers import lr_for  # noqa: E402
from muonkit.tasks.nscompare import format_table as ns_table  # noqa: E402
from muonkit.tasks.report import (add_steps_to_reference, format_table, memory_note, plot, summarize,  # noqa: E402
                                  write_json_atomic)
from muonkit.tasks.training import RunResult  # noqa: E402

RUNS = ROOT / "benchmarks" / "task-runs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- TASKS:BEGIN (benchmarks/bench_tasks.py) -->", "<!-- TASKS:END -->"

# stage -> (kind, argv after `muonkit bench`). Sweeps use 1 seed and the task's sweep budget.
STAGES: dict[str, tuple[str, list[str]]] = {
    "sweep-charlm": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "muon,adamw,torch-muon"]),
    "sweep-fashion-mnist": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw"]),
    "sweep-modular": ("sweep", ["modular", "--lr-sweep", "--optimizers", "muon,adamw"]),
    # muon-kj and sgd on each task (2026-11-24; sgd rerun 2026-11-30 with decoupled weight decay), and
    # every optimizer on regression.
    "sweep-charlm-kj-sgd": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "muon-kj,sgd"]),
    "sweep-charlm-sgd-edge": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "sgd", "--lr", "sgd=1", "sgd=3"]),
    "sweep-fashion-mnist-kj-sgd": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon-kj,sgd"]),
    "sweep-fashion-mnist-sgd-edge": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "sgd",
                                               "--lr", "sgd=0.3", "sgd=1", "sgd=3"]),
    "sweep-modular-kj-sgd": ("sweep", ["modular", "--lr-sweep", "--optimizers", "muon-kj,sgd"]),
    # The Muon family (issue 10, 2026-12-02): NorMuon, AdaMuon and cautious weight decay.
    "sweep-charlm-variants": ("sweep", ["charlm", "--lr-sweep", "--optimizers", "normuon,adamuon,muon+cwd,normuon+cwd"]),
    "sweep-fashion-mnist-variants": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers",
                                               "normuon,adamuon,muon+cwd,normuon+cwd"]),
    "sweep-modular-variants": ("sweep", ["modular", "--lr-sweep", "--optimizers", "normuon,adamuon,muon+cwd,normuon+cwd"]),
    # Muon's three best lrs of sweep-fashion-mnist (seed 0) on 3 seeds (2026-12-07), as the results table
    # (200 steps, 3 seeds) had lr 0.1 no better than 0.01: 0.1 is still best here, by 0.003.
    "sweep-fashion-mnist-muon-3-seeds": ("sweep", ["fashion-mnist", "--lr-sweep", "--optimizers", "muon", "--lr",
                                                   "muon=0.01", "muon=0.03", "muon=0.1", "--seeds", "3"]),
    # Regression runs take a second: 3 seeds.
    "sweep-regression": ("sweep", ["regression", "--lr-sweep", "--optimizers", "muon,muon-kj,adamw,sgd,torch-muon",
                                   "--seeds", "3"]),
    # Evaluations every 10 (charlm) and 25 (fashion-mnist) steps, so that steps to AdamW's final value
    # are counted finely enough to compare optimizers.
    "charlm": ("bench", ["charlm", "--optimizers", "muon,adamw,torch-muon,normuon,adamuon,muon+cwd,normuon+cwd",
                         "--seeds", "3", "--eval-every", "10"]),
    # torch-muon is not run on fashion-mnist: on this all-conv network it is adamw, bit for bit
    # (tests/test_tasks.py::test_torch_muon_on_the_conv_net_is_exactly_adamw).
    "fashion-mnist": ("bench", ["fashion-mnist", "--optimizers", "muon,adamw,normuon,adamuon,muon+cwd,normuon+cwd",
                                "--seeds", "3", "--eval-every", "25"]),
    "modular": ("bench", ["modular", "--optimizers", "muon,adamw,normuon,adamuon,muon+cwd,normuon+cwd", "--seeds", "3"]),
    "regression": ("bench", ["regression", "--optimizers", "muon,muon-kj,adamw,sgd,torch-muon", "--seeds", "3"]),
    "ns": ("ns", []),
    "default": ("timed", []),
}
# The "default" stage: the README's main-job command, as a user runs it (--out keeps the record here).
DEFAULT_COMMAND = ["./scripts/bench.sh", "--out", "benchmarks/task-runs/default"]
# Where each kind of stage keeps its rows, one per optimizer (what --only merges into).
RECORD_FILE = {"sweep": "sweep.json", "bench": "results.json"}
# The per-step lists of a run that a stored results.json leaves out (slim_run), and the points it
# keeps of each update-RMS curve.
PER_STEP = ("loss", "data_s", "fwd_bwd_s", "opt_s", "max_logit", "diagnosed_steps")
CURVE_POINTS = 40
# Summary entries that depend on the record's other optimizers (AdamW's final): recomputed on load.
REFERENCE_KEYS = ("reference", "steps_to_reference", "seconds_to_reference", "reference_step_ratio")
# Records written before runs recorded their CPU (2026-11-23) ran on a machine of which the Speed
# summary in RESULTS.md records the features; the report names it from there.
UNRECORDED_CPU = {"2026-11-23": "AMD EPYC, AVX2 only (per the Speed summary; not in the record)"}


def wait_for_idle(limit: float = 600.0, below: float = 0.5) -> None:
    """Wait (up to `limit` s) for the 1-minute load average to fall below `below`: `muonkit bench`
    picks its thread count from the load average, which a stage that just ended keeps up for
    minutes, and the timed command is to run as on an idle machine."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(10)


def run_stage(name: str, only: list[str] | None = None, bench_options: list[str] | None = None) -> None:
    """Run a stage into benchmarks/task-runs/<name>/; with `only`, run those optimizers of a sweep or
    bench stage and merge their rows into the stored record (`merge`). `bench_options` (e.g.
    --interleave, --threads 1) go to `muonkit bench` of a bench stage; its record's command says so."""
    kind, argv = STAGES[name]
    if kind == "bench":
        argv = [*argv, *(bench_options or [])]
    out = RUNS / name
    if only:
        if kind not in RECORD_FILE:
            raise SystemExit(f"--only {','.join(only)}: stage {name} is a {kind} stage; only sweep and bench "
                             "stages keep one row per optimizer")
        unknown = [o for o in only if o not in stage_optimizers(argv)]
        if unknown:
            raise SystemExit(f"--only: {', '.join(unknown)} not among stage {name}'s optimizers "
                             f"({', '.join(stage_optimizers(argv))})")
        if not (out / RECORD_FILE[kind]).is_file():
            raise SystemExit(f"--only: stage {name} has no stored {RECORD_FILE[kind]} to keep the other rows of; "
                             "run the stage whole")
        narrowed = restrict(argv, only)
        # Kept if the merge fails, so that the rerun need not be trained again (merge() takes it).
        partial = Path(tempfile.mkdtemp(prefix=f"bench-tasks-{name}-"))
        code = main(["bench", *narrowed, "--quiet", "--out", str(partial)])
        if code != 0:
            raise SystemExit(f"stage {name} --only {','.join(only)} failed with exit code {code}; "
                             "the stored record is unchanged")
        print(f"merging {partial} into {out}", flush=True)
        merge(name, partial, narrowed)
        shutil.rmtree(partial)
        return
    if kind == "timed":
        # A separate process, as a user runs it: the time includes the script's set-up check,
        # interpreter start-up and imports.
        wait_for_idle()
        before = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
        start = time.perf_counter()
        done = subprocess.run(DEFAULT_COMMAND, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(done.stdout, end="")
        if done.returncode != 0:
            raise SystemExit(f"stage {name} failed with exit code {done.returncode}:\n{done.stderr}")
        (out / "timing.json").write_text(json.dumps({"command": " ".join(DEFAULT_COMMAND), "seconds": seconds,
                                                     "start": before}, indent=1))
        slim_results("default")
        return
    if kind == "ns":
        wait_for_idle()  # its table is mostly timings
        code = main(["ns", *argv, "--out", str(out)])
    else:
        code = main(["bench", *argv, "--quiet", "--out", str(out)])
    if code != 0:
        raise SystemExit(f"stage {name} failed with exit code {code}")
    if kind == "bench":
        slim_results(name)


def stage_optimizers(argv: list[str]) -> list[str]:
    """The optimizers a stage's argv names after --optimizers."""
    return argv[argv.index("--optimizers") + 1].split(",")


def restrict(argv: list[str], only: list[str]) -> list[str]:
    """A stage's argv for the optimizers in `only`: --optimizers narrowed to them (in the stage's
    order), and the --lr values of the others dropped (with --lr itself when none is left)."""
    out: list[str] = []
    option = None
    for arg in argv:
        if arg.startswith("--"):
            option = arg
            out.append(arg)
        elif option == "--optimizers":
            out.append(",".join(n for n in arg.split(",") if n in only))
        elif option != "--lr" or arg.split("=")[0] in only:
            out.append(arg)
    return [a for i, a in enumerate(out) if a != "--lr" or (i + 1 < len(out) and not out[i + 1].startswith("--"))]


def merge(stage: str, partial: Path, argv: list[str]) -> None:
    """Put the rows of a partial run in `partial` (its command: `muonkit bench` + `argv`, the stage's
    own narrowed by --only) into the stage's stored record, in place of the same optimizers' rows.
    The other rows keep theirs; the record lists the rerun (which rows, its machine, date and
    command) under "reruns", which the report prints beside the table."""
    kind = STAGES[stage][0]
    file = RECORD_FILE[kind]
    old = json.loads((RUNS / stage / file).read_text())
    new = json.loads((partial / file).read_text())
    for key in ("task", "steps", "seeds") + (("score",) if kind == "sweep" else ("metric", "weight_decay")):
        if old.get(key) != new.get(key):
            raise SystemExit(f"--only: the rerun's {key} {new.get(key)!r} differs from the stored {stage} record's "
                             f"{old.get(key)!r}; rerun the stage whole")
    rerun = stage_optimizers(argv)
    order = [n for n in stage_optimizers(STAGES[stage][1]) if n in rerun or n in old.get("best", old.get("summary"))]
    entry = {"optimizers": rerun, "command": "muonkit bench " + " ".join(argv),
             "environment": new["environment"], "finished": new["finished"]}
    # An earlier rerun still stands for the rows this one leaves alone.
    earlier = [{**r, "optimizers": [o for o in r["optimizers"] if o not in rerun]} for r in old.get("reruns", [])]
    merged = {**old, "reruns": [r for r in earlier if r["optimizers"]] + [entry]}
    if kind == "sweep":
        entry["adamw_lr_for_hybrids"] = new["adamw_lr_for_hybrids"]
        for key in ("results", "final_metric", "best"):
            merged[key] = {n: (new if n in rerun else old)[key][n] for n in order}
        rows = {}
        for record in (old, new):  # the rerun's rows win
            rows.update({row.split("|")[1].strip(): row for row in record["table"].splitlines()[2:]})
        merged["table"] = "\n".join(new["table"].splitlines()[:2] + [rows[n] for n in order])
        write_json_atomic(RUNS / stage / file, merged)
        return
    entry["wall_seconds"] = new["wall_seconds"]
    # The rerun's runs still have their per-step lists: slim_results summarizes them.
    merged["summary"] = {n: old["summary"][n] for n in order if n not in rerun}
    merged["runs"] = sorted([r for r in old["runs"] if r["optimizer"] not in rerun] + new["runs"],
                            key=lambda r: (order.index(r["optimizer"]), r["seed"]))
    write_json_atomic(RUNS / stage / file, merged)
    slim_results(stage)
    plot(get_task(merged["task"]), runs_of(load(stage, file)), RUNS / stage / "curves.png")


def _three_digits(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def slim_run(run: dict) -> dict:
    """A run as stored: its per-step lists (PER_STEP) become `steps_run`, the steps it trained; seed
    0's update-RMS curves, the ones the plot draws, keep CURVE_POINTS evenly spaced points to 3
    significant digits, the other seeds' none. A slim run is returned as it is."""
    if "steps_run" in run:
        return run
    slim = {k: v for k, v in run.items() if k not in PER_STEP + ("update_rms", "update_rms_steps")}
    slim["steps_run"] = len(run["loss"])
    steps = run.get("update_rms_steps", [])
    if run["seed"] == 0 and steps:
        last = len(steps) - 1
        keep = sorted({round(i * last / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)}) if last >= CURVE_POINTS else range(last + 1)
        slim["update_rms_steps"] = [steps[i] for i in keep]
        slim["update_rms"] = {name: [_three_digits(values[i]) for i in keep if i < len(values)]
                              for name, values in run["update_rms"].items()}
    return slim


def slim_results(stage: str) -> None:
    """Rewrite a stage's results.json slim (slim_run), its summary as today's report computes it
    from the full runs: the table it gives stays the same, to the digit."""
    path = RUNS / stage / "results.json"
    record = load(stage, "results.json")
    if record is None:
        return
    record["runs"] = [slim_run(r) for r in record["runs"]]
    write_json_atomic(path, record)


def runs_of(record: dict) -> dict[str, list[RunResult]]:
    """A results.json's runs by optimizer. A slim run has no per-step lists: its loss is `steps_run`
    NaNs, as only its length is read (add_steps_to_reference: the steps the reference trained)."""
    runs: dict[str, list[RunResult]] = {}
    for run in record["runs"]:
        fields = {k: v for k, v in run.items() if k in RunResult.__dataclass_fields__}
        fields["evals"] = [(s, t, math.nan if v is None else v) for s, t, v in fields.get("evals", [])]
        if "steps_run" in run:
            fields["loss"] = [math.nan] * run["steps_run"]
        runs.setdefault(run["optimizer"], []).append(RunResult(**fields))
    return runs


def load(name: str, file: str) -> dict | None:
    """A saved record; a results.json gets its summary and table rebuilt by today's
    muonkit.tasks.report, so that every column is computed the same way in every table: from the
    runs where they kept their per-step lists, else (slim runs) from the summary stored with them,
    computed by that code when they were slimmed. The columns against AdamW are always recomputed."""
    path = RUNS / name / file
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if file == "results.json":
        task = get_task(record["task"])
        runs = runs_of(record)
        slim = {run["optimizer"] for run in record["runs"] if "steps_run" in run}
        summaries = {n: {k: v for k, v in record["summary"][n].items() if k not in REFERENCE_KEYS} if n in slim
                     else summarize(task, rs) for n, rs in runs.items()}
        add_steps_to_reference(task, runs, summaries)
        record["summary"], record["table"] = summaries, format_table(task, summaries)
    return record


def sweeps_of(task_name: str) -> list[tuple[str, dict]]:
    """Every saved sweep of a task, in STAGES order (a later sweep of an optimizer supersedes)."""
    found = []
    for stage, (kind, argv) in STAGES.items():
        if kind == "sweep" and argv[0] == task_name and (data := load(stage, "sweep.json")):
            found.append((stage, data))
    return found


def lr_check(task_name: str, sweeps: list[tuple[str, dict]]) -> str:
    """The best lr of each optimizer over the union of its sweeps (a later sweep of the same lr
    supersedes), ranked as `muonkit bench --lr-sweep` ranks them, against the task's defaults."""
    task = get_task(task_name)
    scores: dict[str, dict[str, list[float]]] = {}
    finals: dict[str, dict[str, list[float]]] = {}
    for _, sweep in sweeps:
        for name, by_lr in sweep["results"].items():
            scores.setdefault(name, {}).update(by_lr)
            finals.setdefault(name, {}).update(sweep.get("final_metric", {}).get(name, {}))
    by_steps = task.stop_at_target or task.sweep_by_steps
    messages = []
    for name, by_lr in scores.items():
        best = float(best_lr(by_lr, finals[name], by_steps=by_steps, higher_is_better=task.higher_is_better))
        tried = ", ".join(f"{lr:g}" for lr in sorted(map(float, by_lr)))
        default = lr_for(name, task.lrs)
        messages.append(f"{name}: best {best:g} of {tried}" + ("" if default == best else f" (default is {default:g})"))
    return "Best over all sweeps (the default lr of each): " + "; ".join(messages) + "."


def never_reached(task_name: str, sweeps: list[tuple[str, dict]]) -> list[str]:
    """A note for each optimizer that reached the target at no lr of a steps-scored sweep: its
    default is only the tie-break's pick (the best final metric)."""
    lines = []
    for stage, sweep in sweeps:
        if sweep["score"] != "steps to target":
            continue
        for name, by_lr in sweep["results"].items():
            # null (newer records) or NaN (older ones): a diverged run.
            if all(v is None or v != v or v > sweep["steps"] for values in by_lr.values() for v in values):
                finals = sorted({f"{v:.3g}" for vs in sweep.get("final_metric", {}).get(name, {}).values()
                                 for v in vs if v is not None})
                note = (f"{name} reached the target at no lr of `{stage}` (final {get_task(task_name).metric} "
                        f"{', '.join(finals)}), so its default lr is only the tie-break's pick.")
                lines += [note, ""]
    return lines


def comparison(result: dict) -> str:
    """Muon against each other optimizer: means and per-seed wins of the final metric, or of steps to
    target for tasks that stop there; written from the JSON, so it says whichever way it came out."""
    summary, lower = result["summary"], not result["higher_is_better"]
    task = get_task(result["task"])
    by_steps = task.stop_at_target or task.sweep_by_steps
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
    text = "Measured: " + "; ".join(sentences) + "."
    variants = [name for name in summary if name not in ("muon", "adamw", "sgd", "muon-kj", "torch-muon")]
    if variants and not by_steps:
        better = []
        for name in variants:
            finals = [v for v in summary[name][key] if v is not None]
            if len(finals) < 2 or len(muon) < 2:
                continue
            gap = statistics.fmean(muon) - statistics.fmean(finals)
            gap = gap if lower else -gap
            spread = max(statistics.stdev(muon), statistics.stdev(finals))
            verdict = "better than muon beyond one std" if gap > spread else (
                "worse than muon beyond one std" if -gap > spread else "within one std of muon")
            better.append(f"{name} {statistics.fmean(finals):.4g} vs muon {statistics.fmean(muon):.4g}: {verdict} "
                          f"(larger std {spread:.3g})")
        if better:
            text += " Variants: " + "; ".join(better) + "."
    return text


def machine(env: dict) -> str:
    """'AMD EPYC (avx2, avx512f, avx512_bf16), 2 CPUs, 2 torch threads, torch 2.13.0+cpu on cpu'."""
    cpu = env.get("cpu")
    if cpu is None:
        cpu = UNRECORDED_CPU.get(env["date"][:10], "CPU not recorded")
    elif env.get("cpu_flags") is not None:
        cpu += f" ({', '.join(env['cpu_flags']) or 'none of avx2, avx512f, avx512_bf16, amx_bf16'})"
    threads = env["torch_threads"]
    # Records from before 2026-12-07 carry no ns_dtype_default: muonkit's default was float32 then.
    ns = env.get("ns_dtype_default")
    return (f"{cpu}, {env['cpu_count']} CPUs, {threads} torch thread{'s' * (threads != 1)}, torch {env['torch']} "
            f"on {env['device']}" + (f", Newton-Schulz in {ns} (muonkit's default on it at the time)" if ns else ""))


def measured(record: dict, command: str, env: dict | None = None) -> str:
    """Machine, date, load and command of a record. Records with "finished" took their environment
    when the run started; older ones took it when the run ended."""
    env = env or record["environment"]
    when = "start" if "finished" in record or "start" in record else "end"
    load = env.get("load_average")
    at_load = f", load average {load[0]:.1f}" if load else ""
    return f"Machine: {machine(env)}{at_load} at the {when}, {env['date']}. Command: `{command}`"


def has_bf16(env: dict) -> bool:
    return any(f in env.get("cpu_flags", ()) for f in ("avx512_bf16", "amx_bf16"))


# Optimizers that run no muonkit Newton-Schulz: the default ns dtype does not move their rows.
NO_NEWTON_SCHULZ = ("adamw", "adamw+cwd", "sgd", "sgd+cwd", "torch-muon")


def row_environments(record: dict) -> dict[str, dict]:
    """The environment each row of a record (bench or sweep) ran in: its --only rerun's, else the record's."""
    names = list(record.get("summary") or record.get("results") or {})
    envs = {name: record["environment"] for name in names}
    for rerun in record.get("reruns", []):
        envs.update({name: rerun["environment"] for name in rerun["optimizers"]})
    return envs


def float32_default_rows(record: dict) -> list[str]:
    """The rows of a record (bench or sweep, with its --only reruns) that ran muonkit's Newton-Schulz
    in the float32 default that preceded 2026-12-07 on a CPU where the default is bfloat16 since
    (AVX-512 BF16 or AMX): their environment has no ns_dtype_default and the CPU has the flags. Rows
    from AVX2-only CPUs keep float32 under today's default too."""
    envs = row_environments(record)
    return [name for name, env in envs.items() if name not in NO_NEWTON_SCHULZ and env.get("device", "cpu") == "cpu"
            and has_bf16(env) and "ns_dtype_default" not in env]


def float32_default_note(record: dict) -> list[str]:
    """A visible line at a table whose Muon rows are the float32 default's, not today's (see
    float32_default_rows); none when every row is today's default."""
    rows = float32_default_rows(record)
    if not rows:
        return []
    one = len(rows) == 1
    return [f"**Not the current default:** the {'row' if one else 'rows'} {', '.join(rows)} "
            f"{'was' if one else 'were'} measured with the float32 Newton-Schulz default that preceded "
            "2026-12-07; on this CPU (AVX-512 BF16) muonkit's default is bfloat16 since. `ns_dtype=torch.float32` "
            f"reproduces {'it' if one else 'them'}.", ""]


def bench_section(stage: str, result: dict) -> list[str]:
    lines = [f"{result['seeds']} seeds x {result['steps']} steps, each optimizer at its default lr (weight "
             f"decay {result['weight_decay']:g} for all); mean ± std over seeds, medians for times. "
             + measured(result, "muonkit bench " + " ".join(STAGES[stage][1])), ""]
    lines += reruns_note(stage, result) + float32_default_note(result) + [result["table"], ""]
    lines += [comparison(result), ""]
    if all("peak_memory_kind" in r for r in result["runs"]):
        lines += [memory_note(result["summary"]), ""]
    else:
        lines += ["`peak MB` shows \"-\": this run predates the CPU memory measurement (2026-11-24); `opt state "
                  "MB` is the optimizer state tensors.", ""]
    if "torch-muon" in result["summary"]:
        envs = row_environments(result)
        muon_ns, env = envs.get("muon", {}).get("ns_dtype_default"), envs["torch-muon"]
        if has_bf16(env) and muon_ns == "float32":
            lines += ["torch-muon's optimizer step is torch.optim.Muon's, which always runs Newton-Schulz in "
                      "bfloat16; muon's rows ran muonkit's default on their CPU, float32 (an Intel AVX-512 BF16 "
                      "CPU without AMX, where bf16 matrix products measured slower than float32), so the two "
                      "columns compare each one's default dtype, not one dtype.", ""]
        elif has_bf16(env) and not float32_default_rows(result):
            lines += ["torch-muon's optimizer step is torch.optim.Muon's, which runs Newton-Schulz in bfloat16; "
                      "this CPU has AVX-512 BF16, where muonkit's default (ns_dtype=None) is bfloat16 too, so "
                      "both columns compare one dtype.", ""]
        elif has_bf16(env):
            lines += ["torch-muon's optimizer step is torch.optim.Muon's, which runs Newton-Schulz in bfloat16; "
                      "this CPU has AVX-512 BF16, where bf16 matrix products are ~2.3x faster than fp32 (muonkit's "
                      "default on CPU until 2026-12-07), which its `opt ms/step` and `seconds to` columns carry.", ""]
        else:
            lines += ["torch-muon's optimizer step is torch.optim.Muon's, which runs Newton-Schulz in bfloat16; "
                      "bf16 matrix products are 50-100x slower than fp32 on the CPU of this run (no AVX-512 BF16 "
                      "or AMX), which its `opt ms/step` and `seconds to` columns carry. On a CPU with AVX-512 "
                      "BF16 they are ~2.3x faster than fp32 instead (Speed summary below).", ""]
    notes = sorted({n for r in result["runs"] for n in r["notes"]})
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    return lines


def sweep_section(stage: str, sweep: dict) -> list[str]:
    seeds = f"{sweep['seeds']} seed" + ("s" if sweep["seeds"] > 1 else "")
    return [f"lr sweep, {seeds}, {sweep['steps']} steps, scored by {sweep['score']}; hybrids (torch-muon, "
            f"muon-kj) keep AdamW at lr {sweep['adamw_lr_for_hybrids']:g} on their non-matrix parameters. "
            + measured(sweep, "muonkit bench " + " ".join(STAGES[stage][1])), "",
            *reruns_note(stage, sweep), *float32_default_note(sweep), sweep["table"], ""]


def reruns_note(stage: str, record: dict) -> list[str]:
    """A paragraph per `--only` rerun merged into a record: which rows, machine, date, command."""
    lines = []
    for rerun in record.get("reruns", []):
        rows = ", ".join(rerun["optimizers"])
        # The options of bench_tasks.py itself that the rerun's `muonkit bench` command carries.
        words = rerun["command"].split()
        options = " --interleave" * ("--interleave" in words)
        options += f" --threads {words[words.index('--threads') + 1]}" if "--threads" in words else ""
        lines += [f"Rows rerun since ({rows}), in place of the run above's, as `python benchmarks/bench_tasks.py "
                  f"--stages {stage} --only {','.join(rerun['optimizers'])}{options}` reruns them (finished "
                  f"{rerun['finished']}). " + measured(rerun, rerun["command"]) + "."
                  + (" Times compare only rows of one run." if "runs" in record else ""), ""]
    return lines


def report() -> str:
    lines = [BEGIN, "## Tasks (`muonkit bench`)", "",
             "Regenerated by `python benchmarks/bench_tasks.py` (`--stages NAME,...` reruns some stages, "
             "`--only OPT,...` only those optimizers' rows of them, `--report-only` rebuilds this section from the records in benchmarks/task-runs/). Each table "
             "gives the machine, date and command of its own run: the records come from AMD EPYC machines, "
             "AVX2 only (2026-11-23 and 2026-11-30; bf16 matrix products 50-100x slower than fp32) or with "
             "AVX-512 BF16 (2026-11-24 to 2026-12-07; ~2.3x faster), and an Intel Xeon with AVX-512 BF16 "
             "(2026-12-07, the runs of the new default). muonkit's default Newton-Schulz dtype follows the "
             "machine since 2026-12-07 (bfloat16 where bf16 products are native, float32 on AVX2-only CPUs; "
             "float32 everywhere before): each table's machine line names the default it ran, and a table "
             "whose Muon rows are the old float32 default's on an AVX-512 BF16 CPU says so. The "
             "machines are shared "
             "with other jobs, so times carry their load; compare optimizers within one table.", ""]
    timing = load("default", "timing.json")
    if timing:
        default = load("default", "results.json")
        # The machine and threads from the command's own record; date and load from just before it.
        env = {**default["environment"], **timing.get("start", {})}
        lines += ["### `muonkit bench` (no arguments)", "",
                  f"Wall-clock {timing['seconds']:.0f} s for the whole command (set-up check, start-up, corpus, "
                  "muon and adamw runs, plot, JSON; the issue asks for under 3 minutes on 2 cores). "
                  + measured(timing, timing["command"], env)
                  + (f". The load average ({env['load_average'][0]:.0f}) was above the machine's {env['cpu_count']} "
                     "CPUs, so this wall-clock measures the machine's load more than the command"
                     if env.get("load_average") and env["load_average"][0] > env["cpu_count"] else ""), ""]
        if default:
            lines += float32_default_note(default) + [default["table"], ""]
            if all("peak_memory_kind" in r for r in default["runs"]):
                lines += [memory_note(default["summary"]), ""]
    for task_name in ("charlm", "fashion-mnist", "modular", "regression"):
        sweeps = sweeps_of(task_name)
        result = load(task_name, "results.json")
        if not (sweeps or result):
            continue
        task = get_task(task_name)
        lines += [f"### {task_name}", "", task.summary + ".", ""]
        if result:
            lines += bench_section(task_name, result)
            if task_name == "fashion-mnist":
                lines += ["torch-muon is not run separately: torch.optim.Muon accepts only 2D parameters and "
                          "every Muon-routed tensor of this network is a conv filter, so torch-muon is AdamW on "
                          "all parameters, bit for bit the adamw row (tests/test_tasks.py::"
                          "test_torch_muon_on_the_conv_net_is_exactly_adamw).", ""]
        if task.sweep_by_steps:
            lines += [f"This task's sweep is scored by steps to the target ({task.target:g}), not by the final "
                      f"{task.metric}: every workable lr ends the budget at the same floor, within seed noise.", ""]
        for stage, sweep in sweeps:
            lines += sweep_section(stage, sweep)
        if sweeps:
            lines += [lr_check(task_name, sweeps), ""]
            lines += never_reached(task_name, sweeps)
    ns = load("ns", "ns.json")
    if ns:
        ns_env = ns["environment"]
        ns_dtype = ns_env.get("ns_dtype_default", "float32")
        old_default = has_bf16(ns_env) and "ns_dtype_default" not in ns_env
        lines += ["### `muonkit ns`: orthogonalizers vs the exact polar factor", "",
                  *(["**Not the current default:** measured in float32, muonkit's default until 2026-12-07; on "
                     "this CPU (AVX-512 BF16) `muonkit.orthogonalize` runs Newton-Schulz in bfloat16 by default "
                     "since.", ""] if old_default else []),
                  f"Each orthogonalizer (the Newton-Schulz ones at their default 5 steps, in {ns_dtype}, "
                  "muonkit's default on the machine of the run) on a random "
                  "Gaussian matrix and on a "
                  "gradient-like one (four strong directions, a decaying tail, noise), against U V^T from a "
                  "float64 SVD: the range of the output's singular values (all 1 for the exact factor), the "
                  "relative Frobenius error and the median time. "
                  + measured(ns, "muonkit ns --out benchmarks/task-runs/ns"), "",
                  ns_table(ns), "", "![singular values of each orthogonalizer's output](task-runs/ns/ns_spectra.png)",
                  ""]
    lines += ["Not swept: cifar10 (CIFAR-10 is not available offline; every optimizer keeps the notebook's lr "
              "1e-2). Every other task's default lr per optimizer is the best of the sweeps above.", "", END]
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
    parser.add_argument("--only", help="comma-separated optimizers: rerun only their rows of each sweep or "
                        "bench stage, keeping the other rows stored")
    parser.add_argument("--interleave", action="store_true",
                        help="bench stages: `muonkit bench --interleave` (seed by seed, every optimizer in turn)")
    parser.add_argument("--threads", help="bench stages: `muonkit bench --threads N` (default: the command's own)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--slim", action="store_true",
                        help="rewrite every stored results.json slim (per-step lists dropped), then the report")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.slim:
        for stage in ("default", *(name for name, (kind, _) in STAGES.items() if kind == "bench")):
            slim_results(stage)
    elif not args.report_only:
        for stage in args.stages.split(","):
            print(f"== {stage}" + (f" (only {args.only})" if args.only else ""), flush=True)
            options = ["--interleave"] * args.interleave + (["--threads", args.threads] if args.threads else [])
            run_stage(stage, args.only.split(",") if args.only else None, options)
    section = report()
    write_results(section)
    print(section)
