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
