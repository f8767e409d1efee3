"""benchmarks/gpu_check.py cannot rot: its quick CPU mode runs here as a real process and writes a
complete, passing report; and its checks fail when what they check is broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_quick_cpu_run_writes_a_complete_passing_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # One timed round of the step section (quick's default is 3): this checks the report, not the times.
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {name: s.get("error", "not ok") for name, s in report["sections"].items() if not s["ok"]}
    assert done.returncode == 0 and report["ok"], (failed, done.stdout[-3000:], done.stderr[-3000:])
    assert report["device"] == "cpu" and report["quick"] and report["torch"] == torch.__version__
    sections = report["sections"]
    assert list(sections) == ["orthogonalizers", "step", "graph", "rounding", "training", "compile"]

    rows = sections["orthogonalizers"]["rows"]
    import muonkit

    assert {(r["shape"], r["method"], r["dtype"]) for r in rows} == {
        (shape, method, dtype) for shape in ("single tall", "single wide", "batched tall", "batched wide")
        for method in muonkit.ORTHOGONALIZERS for dtype in ("bfloat16", "float32")}
    assert all(r["device_distance"] < 0.5 for r in rows)
    assert all(r["device_distance"] < 1e-4 for r in rows if r["method"] == "svd" and r["dtype"] == "float32")

    steps = sections["step"]["rows"]
    assert {r["method"] for r in steps} == {"muonkit Muon (default)", "torch.optim.Muon", "textbook bf16 loop"}
    assert len({r["case"] for r in steps}) == 3 and sections["step"]["timer"] == "perf_counter"
    assert all(r["step_ms"] > 0 and r["ns_ms"] > 0 and r["peak_step_mb"] is None for r in steps)

    training = {r["optimizer"]: r for r in sections["training"]["rows"]}
    assert set(training) == {"muon", "adamw"}
    assert all(len(r["device_losses"]) == r["seeds"] for r in training.values())

    assert [r["capturable"] for r in sections["compile"]["rows"]] == [False, True]
    graph = sections["graph"]
    assert graph["captured"] is False and graph["bit_identical"] and graph["no_gradient_refused"]
    assert graph["step_counts_on_device"]
    assert {r["path"] for r in sections["rounding"]["rows"]} == {"seeded generator", "default generator (capturable)"}
    assert "## rounding" in done.stdout and "all ok" in done.stdout


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_rounding_check_fails_for_round_to_nearest(gpu_check, monkeypatch):
    # Round-to-nearest gives neighbours, but its mean is off by up to half a gap: the check must see it.
    monkeypatch.setattr(gpu_check.functional, "stochastic_round", lambda x, dtype, seed: x.to(dtype))
    result = gpu_check.check_rounding(torch.device("cpu"), True)
    assert not result["ok"] and all(r["only_neighbours"] and r["max_z"] > 5 for r in result["rows"])


def test_orthogonalizer_check_fails_for_a_wrong_factor(gpu_check, monkeypatch):
    real = gpu_check.orthogonalize

    def off_on_device(G, method, dtype=None):
        out = real(G, method, dtype=dtype)
        return out * 1.1 if dtype == torch.bfloat16 else out  # a 10% error in one dtype only

    monkeypatch.setattr(gpu_check, "orthogonalize", off_on_device)
    result = gpu_check.check_orthogonalizers(torch.device("cpu"), True)
    assert not result["ok"]
    assert {r["dtype"] for r in result["rows"] if not r["ok"]} == {"bfloat16"}


def test_graph_check_sees_a_replay_that_differs(gpu_check, monkeypatch):
    # A "replay" that skips every other step must not pass as equal to eager.
    real = gpu_check.replayable

    def skipping(step, device, warmup):
        replay, captured = real(step, device, warmup)
        calls = []
        return (lambda: calls.append(1) or (replay() if len(calls) % 2 else None)), captured

    monkeypatch.setattr(gpu_check, "replayable", skipping)
    result = gpu_check.check_graph(torch.device("cpu"), True)
    assert not result["ok"] and not result["bit_identical"]
