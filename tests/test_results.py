"""benchmarks/RESULTS.md's task section is what benchmarks/bench_tasks.py writes from the saved run
records (benchmarks/task-runs/), with the task defaults as they are now: no number typed by hand,
and no default lr changed without the sweep that chose it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench_tasks():
    spec = importlib.util.spec_from_file_location("bench_tasks", ROOT / "benchmarks" / "bench_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tasks_section_is_regenerated_from_the_records():
    bench_tasks = load_bench_tasks()
    section = bench_tasks.report()
    assert section in (ROOT / "benchmarks" / "RESULTS.md").read_text(), (
        "RESULTS.md's TASKS block differs from `python benchmarks/bench_tasks.py --report-only`; rerun it")


def test_every_default_lr_is_the_best_of_its_sweeps():
    bench_tasks = load_bench_tasks()
    for task_name in ("charlm", "fashion-mnist", "modular", "regression"):
        check = bench_tasks.lr_check(task_name, bench_tasks.sweeps_of(task_name))
        assert "default is" not in check, check


def test_only_narrows_a_stage_command_to_its_optimizers():
    bench_tasks = load_bench_tasks()
    argv = ["fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw,sgd", "--lr", "sgd=0.3", "adamw=1",
            "--seeds", "3"]
    assert bench_tasks.restrict(argv, ["muon", "adamw"]) == [
        "fashion-mnist", "--lr-sweep", "--optimizers", "muon,adamw", "--lr", "adamw=1", "--seeds", "3"]
    # No --lr value left: --lr goes too.
    assert bench_tasks.restrict(argv, ["muon"]) == ["fashion-mnist", "--lr-sweep", "--optimizers", "muon",
                                                    "--seeds", "3"]


def _sweep(results: dict[str, dict[str, float]], date: str) -> dict:
    rows = [f"| {name} | {', '.join(f'{lr}: {v}' for lr, v in by_lr.items())} | x |" for name, by_lr in results.items()]
    return {"task": "fashion-mnist", "score": "val_acc", "steps": 150, "seeds": 1, "adamw_lr_for_hybrids": 0.01,
            "results": {n: {lr: [v] for lr, v in by_lr.items()} for n, by_lr in results.items()},
            "final_metric": {n: {lr: [v] for lr, v in by_lr.items()} for n, by_lr in results.items()},
            "best": {n: float(max(by_lr, key=by_lr.get)) for n, by_lr in results.items()},
            "table": "\n".join(["| optimizer | val_acc | best lr |", "|---|---|---|", *rows]),
            "environment": {"date": date, "cpu_count": 2, "torch_threads": 1, "torch": "2", "device": "cpu"},
            "finished": date}


def test_merging_a_rerun_replaces_its_rows_and_keeps_the_others(tmp_path, monkeypatch):
    import json

    bench_tasks = load_bench_tasks()
    monkeypatch.setattr(bench_tasks, "RUNS", tmp_path)
    (tmp_path / "sweep-fashion-mnist").mkdir()
    stored = _sweep({"muon": {"0.01": 0.7, "0.1": 0.6}, "adamw": {"0.01": 0.65}}, "2026-01-01 00:00:00")
    (tmp_path / "sweep-fashion-mnist" / "sweep.json").write_text(json.dumps(stored))
    (tmp_path / "partial").mkdir()
    rerun = _sweep({"muon": {"0.01": 0.75, "0.3": 0.8}}, "2026-02-02 00:00:00")
    (tmp_path / "partial" / "sweep.json").write_text(json.dumps(rerun))
    argv = bench_tasks.restrict(bench_tasks.STAGES["sweep-fashion-mnist"][1], ["muon"])
    bench_tasks.merge("sweep-fashion-mnist", tmp_path / "partial", argv)

    merged = bench_tasks.load("sweep-fashion-mnist", "sweep.json")
    assert merged["results"] == {"muon": {"0.01": [0.75], "0.3": [0.8]}, "adamw": {"0.01": [0.65]}}
    assert merged["best"] == {"muon": 0.3, "adamw": 0.01}
    assert merged["table"].splitlines()[2:] == ["| muon | 0.01: 0.75, 0.3: 0.8 | x |", "| adamw | 0.01: 0.65 | x |"]
    assert merged["environment"]["date"] == "2026-01-01 00:00:00"  # the rows not rerun
    [entry] = merged["reruns"]
    assert entry["optimizers"] == ["muon"] and entry["environment"]["date"] == "2026-02-02 00:00:00"
    assert entry["command"] == "muonkit bench fashion-mnist --lr-sweep --optimizers muon"
    note = "\n".join(bench_tasks.sweep_section("sweep-fashion-mnist", merged))
    assert "Rows rerun since (muon)" in note and "2026-02-02" in note


def _full_run(optimizer: str, seed: int, rng) -> dict:
    steps = 60
    evals = [[s, s * 0.1, 0.5 + 0.004 * s + 0.01 * rng.random()] for s in range(20, steps + 1, 20)]
    return {"task": "fashion-mnist", "optimizer": optimizer, "lr": 0.01, "seed": seed, "steps": steps, "notes": [],
            "loss": [rng.random() for _ in range(steps)], "data_s": [rng.random() for _ in range(steps)],
            "fwd_bwd_s": [rng.random() for _ in range(steps)], "opt_s": [rng.random() for _ in range(steps)],
            "evals": evals, "diverged": False, "stopped_at_target": False, "peak_memory_mb": 10.0 + seed,
            "peak_memory_kind": None, "optimizer_state_mb": 0.5, "qk_clip": None, "max_logit": [],
            "update_rms_steps": list(range(1, steps + 1)),
            "update_rms": {"w": [rng.random() for _ in range(steps)]}, "diagnosed_steps": []}


def test_a_slimmed_results_record_gives_the_same_table(tmp_path, monkeypatch):
    import json
    import random

    bench_tasks = load_bench_tasks()
    monkeypatch.setattr(bench_tasks, "RUNS", tmp_path)
    rng = random.Random(0)
    runs = [_full_run(name, seed, rng) for name in ("muon", "adamw") for seed in range(3)]
    (tmp_path / "fashion-mnist").mkdir()
    record = {"task": "fashion-mnist", "summary": {}, "runs": runs}
    (tmp_path / "fashion-mnist" / "results.json").write_text(json.dumps(record))
    full = bench_tasks.load("fashion-mnist", "results.json")

    bench_tasks.slim_results("fashion-mnist")
    stored = json.loads((tmp_path / "fashion-mnist" / "results.json").read_text())
    assert all("opt_s" not in r and r["steps_run"] == 60 for r in stored["runs"])
    assert [len(r.get("update_rms_steps", [])) for r in stored["runs"]] == [40, 0, 0, 40, 0, 0]
    assert bench_tasks.load("fashion-mnist", "results.json")["table"] == full["table"]


def test_merging_rerun_rows_into_a_results_record(tmp_path, monkeypatch):
    import json
    import random

    bench_tasks = load_bench_tasks()
    monkeypatch.setattr(bench_tasks, "RUNS", tmp_path)
    rng = random.Random(1)
    (tmp_path / "fashion-mnist").mkdir()
    env = {"date": "2026-01-01 00:00:00", "cpu_count": 2, "torch_threads": 1, "torch": "2", "device": "cpu"}
    head = {"task": "fashion-mnist", "metric": "val_acc", "higher_is_better": True, "steps": 60, "seeds": 2,
            "weight_decay": 1e-3,
            "environment": env, "finished": env["date"], "wall_seconds": 1.0, "summary": {}}
    stored = {**head, "runs": [_full_run(n, s, rng) for n in ("muon", "adamw", "normuon") for s in range(2)]}
    (tmp_path / "fashion-mnist" / "results.json").write_text(json.dumps(stored))
    bench_tasks.slim_results("fashion-mnist")
    before = bench_tasks.load("fashion-mnist", "results.json")["summary"]

    new_runs = [{**_full_run("muon", s, rng), "lr": 0.1} for s in range(2)]
    (tmp_path / "partial").mkdir()
    rerun_env = {**env, "date": "2026-02-02 00:00:00"}
    (tmp_path / "partial" / "results.json").write_text(json.dumps(
        {**head, "environment": rerun_env, "finished": rerun_env["date"], "runs": new_runs}))
    # As `bench_tasks.py --stages fashion-mnist --only muon --interleave --threads 1` runs it.
    argv = bench_tasks.restrict([*bench_tasks.STAGES["fashion-mnist"][1], "--interleave", "--threads", "1"], ["muon"])
    assert argv[-3:] == ["--interleave", "--threads", "1"]
    bench_tasks.merge("fashion-mnist", tmp_path / "partial", argv)

    merged = bench_tasks.load("fashion-mnist", "results.json")
    assert [(r["optimizer"], r["seed"], r["lr"]) for r in merged["runs"]] == [
        ("muon", 0, 0.1), ("muon", 1, 0.1), ("adamw", 0, 0.01), ("adamw", 1, 0.01), ("normuon", 0, 0.01),
        ("normuon", 1, 0.01)]
    assert merged["summary"]["muon"]["final"] == [r["evals"][-1][2] for r in new_runs]
    assert merged["summary"]["normuon"]["opt_step_ms"] == before["normuon"]["opt_step_ms"]
    assert merged["reruns"][0]["environment"]["date"] == "2026-02-02 00:00:00"
    assert (tmp_path / "fashion-mnist" / "curves.png").is_file()
    section = "\n".join(bench_tasks.bench_section("fashion-mnist", merged))
    assert "Rows rerun since (muon)" in section
    assert "--stages fashion-mnist --only muon --interleave --threads 1` reruns them" in section


def test_rows_of_the_float32_default_on_a_bf16_cpu_are_marked():
    """A row of muonkit's Newton-Schulz measured on an AVX-512 BF16 CPU before the default followed the
    machine (its environment has no ns_dtype_default) is named in a note; AdamW and torch.optim.Muon
    rows, rows from AVX2-only CPUs (float32 either way) and rows rerun under today's default are not."""
    bench_tasks = load_bench_tasks()
    bf16 = {"date": "2026-12-02 00:00:00", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "device": "cpu"}
    avx2 = {**bf16, "cpu_flags": ["avx2"]}
    now = {**bf16, "date": "2026-12-07 04:00:00", "ns_dtype_default": "bfloat16"}
    names = ["muon", "adamw", "torch-muon", "normuon", "muon-kj"]
    record = {"summary": dict.fromkeys(names), "environment": bf16}
    assert bench_tasks.float32_default_rows(record) == ["muon", "normuon", "muon-kj"]
    assert "the rows muon, normuon, muon-kj were measured" in bench_tasks.float32_default_note(record)[0]
    assert bench_tasks.float32_default_rows({**record, "environment": avx2}) == []
    rerun = {**record, "reruns": [{"optimizers": ["muon", "normuon"], "environment": now}]}
    assert bench_tasks.float32_default_rows(rerun) == ["muon-kj"]
    assert "the row muon-kj was measured" in bench_tasks.float32_default_note(rerun)[0]
    sweep = {"results": dict.fromkeys(["muon", "adamw"]), "environment": now}
    assert bench_tasks.float32_default_rows(sweep) == [] and bench_tasks.float32_default_note(sweep) == []
    # The report's machine line names the default a record ran; older records name none.
    assert bench_tasks.machine({**now, "cpu": "x", "cpu_count": 2, "torch_threads": 1, "torch": "2"}).endswith(
        "Newton-Schulz in bfloat16 (muonkit's default on it at the time)")
    assert "Newton-Schulz" not in bench_tasks.machine({**bf16, "cpu": "x", "cpu_count": 2, "torch_threads": 1,
                                                       "torch": "2"})
