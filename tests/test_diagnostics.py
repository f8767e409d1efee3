"""Contracts of muonkit.diagnostics (flat scalars, the TensorBoard writer) and of what `muonkit bench`
records per parameter (update RMS, TensorBoard runs, the plot's panel).

Oracles:
- TensorBoard event files are read back with tensorboard's own EventAccumulator; TensorBoard keeps
  scalars in float32, so values are compared after rounding to float32.
- The update RMS the bench measures from the weights, (W_before (1 - lr wd) - W_after) / lr, is
  compared with the update rebuilt here from the optimizer's own state: torch.optim.AdamW's
  m_hat / (sqrt(v_hat) + eps), and SGD's Nesterov g + momentum * buf (float64 round-off of a
  float32 weight difference: rtol 1e-3).
"""

from __future__ import annotations

import copy
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import muonkit
from muonkit.cli import main
from muonkit.diagnostics import TensorBoardWriter, require_tensorboard, stats_scalars
from muonkit.tasks import get_task
from muonkit.tasks.optimizers import SGDW
from muonkit.tasks.training import RunResult, _Watch, run_directory

F32 = struct.Struct("f")


def f32(x: float) -> float:
    return F32.unpack(F32.pack(x))[0]


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ------------------------------------------------------------------------------ flat scalars

STATS = {
    "blocks.0.fc.weight": {"grad_rms": 0.5, "momentum_rms": 0.25, "update_rms": 0.2, "orthogonality_error": 0.01,
                           "singular_min": 0.9, "singular_max": 1.1},
    "head.weight": {"grad_rms": 2.0, "momentum_rms": 1.0, "update_rms": 0.75},
}


def test_stats_scalars_flattens_statistic_first():
    assert stats_scalars(STATS) == {
        "grad_rms/blocks.0.fc.weight": 0.5, "momentum_rms/blocks.0.fc.weight": 0.25,
        "update_rms/blocks.0.fc.weight": 0.2, "orthogonality_error/blocks.0.fc.weight": 0.01,
        "singular_min/blocks.0.fc.weight": 0.9, "singular_max/blocks.0.fc.weight": 1.1,
        "grad_rms/head.weight": 2.0, "momentum_rms/head.weight": 1.0, "update_rms/head.weight": 0.75,
    }
    assert stats_scalars({"w": {"update_rms": torch.tensor(0.5)}}) == {"update_rms/w": 0.5}
    assert stats_scalars({}) == {}


@pytest.mark.parametrize(("stats", "error", "match"), [
    ([("w", {})], TypeError, "stats must be a mapping"),
    ({"w": 0.5}, TypeError, r"stats\['w'\] must be a \{statistic: value\} mapping"),
    ({"w": {"grad_rms": "big"}}, TypeError, r"stats\['w'\]\['grad_rms'\] must be a real number, got str"),
    ({"w": {"grad_rms": True}}, TypeError, "real number, got bool"),
    ({"w": {"grad_rms": torch.ones(2)}}, TypeError, "real number, got Tensor"),
])
def test_stats_scalars_errors(stats, error, match):
    with pytest.raises(error, match=match):
        stats_scalars(stats)


# -------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_writer_round_trip(tmp_path):
    values = {0: {"loss/train": 2.5, **stats_scalars(STATS)}, 3: {"loss/train": 1.0 / 3.0, "lr/muon": 1e-3},
              7: {"loss/train": math.inf}}
    with TensorBoardWriter(tmp_path / "run") as tb:
        for step, scalars in values.items():
            tb.add_scalars(step, scalars)
    got = read_scalars(tmp_path / "run")
    want: dict[str, list[tuple[int, float]]] = {}
    for step, scalars in values.items():
        for tag, value in scalars.items():
            want.setdefault(tag, []).append((step, f32(value)))
    assert got == want


def test_tensorboard_writer_errors_before_writing(tmp_path):
    with TensorBoardWriter(tmp_path / "run") as tb:
        for step in (-1, 1.5, True):
            with pytest.raises(ValueError, match="step must be an int >= 0"):
                tb.add_scalars(step, {"loss/train": 1.0})
        with pytest.raises(TypeError, match=r"scalars\['b'\] must be a real number"):
            tb.add_scalars(0, {"a": 1.0, "b": "x"})
    assert read_scalars(tmp_path / "run") == {}  # "a" was not written either


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'muonkit\[tensorboard\]'"):
        require_tensorboard()
    with pytest.raises(ImportError, match=r"muonkit\[tensorboard\]"):
        TensorBoardWriter(tmp_path / "run")
    assert main(["bench", "regression", "--steps", "2", "--tensorboard", str(tmp_path / "tb"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard: TensorBoard logging needs the tensorboard package" in err and "muonkit[tensorboard]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "results.json").exists()


# ------------------------------------------------------------------ update RMS from the weights


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _watched_steps(optimizer, model, steps=3):
    result = RunResult("t", "o", 0.1, 0, steps, [])
    watch = _Watch(model, [optimizer], result, every=1, writer=None)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        watch.before_step(step)
        optimizer.step()
        watch.after_step(step, 0.0, None)
        for group in optimizer.param_groups:
            group["lr"] *= 0.5  # a schedule: each step's own lr must be used
    return result


def test_update_rms_equals_adamw_state():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.3, eps=1e-8)
    result = _watched_steps(opt, model)
    assert result.update_rms_steps == [1, 2, 3]
    beta1, beta2 = opt.param_groups[0]["betas"]
    for name, p in model.named_parameters():
        state = opt.state[p]
        step = float(state["step"])
        m_hat = state["exp_avg"].double() / (1 - beta1**step)
        v_hat = state["exp_avg_sq"].double() / (1 - beta2**step)
        want = float((m_hat / (v_hat.sqrt() + 1e-8)).square().mean().sqrt())
        assert result.update_rms[name][-1] == pytest.approx(want, rel=1e-3), name


def test_update_rms_equals_sgd_nesterov_momentum():
    model = _model()
    opt = SGDW(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.3)
    grads = {}
    result = RunResult("t", "o", 0.1, 0, 1, [])
    watch = _Watch(model, [opt], result, every=1, writer=None)
    torch.nn.functional.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 3)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    watch.before_step(0)
    opt.step()
    watch.after_step(0, 0.0, None)
    for name, p in model.named_parameters():
        update = grads[name] + 0.9 * opt.state[p]["momentum_buffer"]  # Nesterov: g + momentum * buf
        want = float(update.double().square().mean().sqrt())
        assert result.update_rms[name] == [pytest.approx(want, rel=1e-3)], name


def test_update_rms_every_hundredth_of_the_steps_and_the_last():
    model = _model()
    result = RunResult("t", "o", 0.1, 0, 250, [])
    watch = _Watch(model, [torch.optim.SGD(model.parameters(), lr=0.1)], result, every=250 // 100, writer=None)
    assert [s + 1 for s in range(250) if watch.records(s)] == list(range(2, 251, 2))
    result.steps = 7
    watch = _Watch(model, [torch.optim.SGD(model.parameters(), lr=0.1)], result, every=3, writer=None)
    assert [s + 1 for s in range(7) if watch.records(s)] == [3, 6, 7]


# ---------------------------------------------------------------------------- muonkit bench


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_bench_tensorboard_one_directory_per_run(tmp_path, capsys):
    tb, out = tmp_path / "tb", tmp_path / "out"
    argv = ["bench", "regression", "--optimizers", "adamw,sgd", "--steps", "6", "--seeds", "2", "--tensorboard",
            str(tb), "--out", str(out), "--quiet", "--threads", "1"]
    assert main(argv) == 0
    assert str(tb) in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    task = get_task("regression")
    assert sorted(p.name for p in tb.iterdir()) == sorted(
        run_directory(tb, "regression", r["optimizer"], r["lr"], r["seed"]).name for r in results["runs"])
    for run in results["runs"]:
        scalars = read_scalars(run_directory(tb, "regression", run["optimizer"], run["lr"], run["seed"]))
        assert scalars["loss/train"] == [(i + 1, f32(v)) for i, v in enumerate(run["loss"])]
        assert scalars[f"metric/{task.metric}"] == [(s, f32(v)) for s, _, v in run["evals"]]
        lr_tag = {"adamw": "lr/adamw", "sgd": "lr/sgdw"}[run["optimizer"]]
        # The task's schedule: 5% warmup (1 step of 6 here), then linear decay to 0.
        assert scalars[lr_tag] == [(s + 1, f32(run["lr"] * task.lr_multiplier(s + 1, 6))) for s in range(6)]
        assert run["update_rms_steps"] == [1, 2, 3, 4, 5, 6]
        for name, values in run["update_rms"].items():
            assert scalars[f"update_rms/{name}"] == [(s, f32(v)) for s, v in zip(run["update_rms_steps"], values)]
            assert all(v > 0 for v in values)
        assert any("loss" in tag for tag in scalars) and any("update_rms" in tag for tag in scalars)
    # A rerun into the same directory replaces each run's events instead of adding a second file.
    assert main(argv) == 0
    for run_dir in tb.iterdir():
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


def test_bench_plot_gains_the_update_rms_panel(tmp_path):
    from muonkit.tasks.report import plot

    def run(name, with_rms):
        r = RunResult("regression", name, 0.1, 0, 4, [], evals=[(4, 1.0, 0.5)])
        if with_rms:
            r.update_rms_steps = [1, 2, 3, 4]
            r.update_rms = {"blocks.0.fc.weight": [0.2, 0.2, 0.19, 0.18], "blocks.1.fc.weight": [0.3, 0.2, 0.1, 0.1],
                            "head.weight": [1.0, math.nan, 0.5, 0.4]}
        return r

    task = get_task("regression")
    plot(task, {"a": [run("a", False)], "b": [run("b", False)]}, tmp_path / "plain.png")
    plot(task, {"a": [run("a", True)], "b": [run("b", True)]}, tmp_path / "panel.png")
    (width, plain), (_, panel) = _png_size(tmp_path / "plain.png"), _png_size(tmp_path / "panel.png")
    assert panel > 1.7 * plain and width == _png_size(tmp_path / "plain.png")[0]


def test_update_rms_panel_tells_more_than_ten_roles_apart():
    """Past ten roles (an MoE Llama has 14) each role keeps its own (color, line style) and every color
    is one of tab10's hues: tab20's light/dark pairs of one hue read as the darker-is-deeper shading."""
    import matplotlib
    import matplotlib.pyplot as plt
    from muonkit.tasks.report import _plot_update_rms

    r = RunResult("hf-lm", "muon", 0.1, 0, 2, [])
    r.update_rms_steps = [1, 2]
    r.update_rms = {f"layers.{i}.w{k}": [0.2, 0.3] for k in range(14) for i in range(2)}
    fig = plt.figure()
    try:
        _plot_update_rms(fig, {"muon": r})
        lines = fig.axes[0].get_lines()
        looks = {(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in lines}
        tab10 = {matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors}
        assert len(lines) == 28 and len(looks) == 14  # 2 layers per role share a look; 14 roles, 14 looks
        assert {matplotlib.colors.to_hex(line.get_color()) for line in lines} <= tab10
    finally:
        plt.close(fig)


def test_muonkit_statistics_only_on_recorded_steps():
    """Built with diagnostics (as for --tensorboard), Muon computes statistics on the recorded steps
    only: last_stats stays empty through a step that records nothing."""
    import muonkit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    opt = muonkit.Muon(muonkit.param_groups(model), lr=0.02, diagnostics=True, orthogonality_every=1)
    result = RunResult("t", "o", 0.02, 0, 3, [])
    watch = _Watch(model, [opt], result, every=2, writer=None)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    seen = []
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        watch.before_step(step)
        opt.step()
        watch.after_step(step, 0.0, None)
        seen.append(dict(opt.last_stats))
    assert seen[0] == {} and seen[1] and result.diagnosed_steps == result.update_rms_steps == [2, 3]
    assert seen[2] != seen[1] and "orthogonality_error" in seen[2]["2.weight"]


def test_summary_optimizer_time_leaves_out_diagnosed_steps():
    from muonkit.tasks.report import summarize

    run = RunResult("regression", "muon", 0.1, 0, 6, [], evals=[(6, 1.0, 0.5)],
                    opt_s=[0.01, 0.5, 0.01, 0.5, 0.02, 0.5], fwd_bwd_s=[0.1] * 6, diagnosed_steps=[2, 4, 6])
    assert summarize(get_task("regression"), [run])["opt_step_ms"] == pytest.approx(10.0)
    run.diagnosed_steps = []
    assert summarize(get_task("regression"), [run])["opt_step_ms"] == pytest.approx(260.0)


def test_bench_tensorboard_muon_statistics(tmp_path):
    """muon's run gets Muon.last_stats on the recorded steps (tags with "orthogonality" every 5th);
    its update RMS there equals the one measured from the weights."""
    tb, out = tmp_path / "tb", tmp_path / "out"
    assert main(["bench", "regression", "--optimizers", "muon", "--steps", "10", "--tensorboard", str(tb),
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    scalars = read_scalars(run_directory(tb, "regression", "muon", run["lr"], 0))
    assert run["diagnosed_steps"] == run["update_rms_steps"] == list(range(1, 11))
    matrices = [t.split("/", 1)[1] for t in scalars if t.startswith("orthogonality_error/")]
    assert matrices and all(len(scalars[f"orthogonality_error/{m}"]) == 2 for m in matrices)  # steps 5, 10
    for name, values in run["update_rms"].items():
        logged = [v for _, v in scalars[f"update_rms/{name}"]]
        assert logged == pytest.approx(values, rel=1e-3), name
        assert len(scalars[f"grad_rms/{name}"]) == len(scalars[f"momentum_rms/{name}"]) == 10
    assert {"lr/muon", "lr/adamw", "loss/train", "metric/val_mse"} <= set(scalars)


def test_bench_tensorboard_directory_that_cannot_be_made(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["bench", "regression", "--steps", "2", "--tensorboard", str(a_file / "tb"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot create TensorBoard directory {a_file / 'tb'}" in err and "pass --tensorboard with" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "results.json").exists()


# From an adversarial review of the variants, low-precision writes, diagnostics and layouts against
# docs/API.md; each test failed before its fix.


def _callable(X, steps):
    return muonkit.orthogonalize(X, "polar_express", steps)


@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd", _callable], ids=["fused", "svd", "callable"])
@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_second_moment_range_is_recorded_on_every_path(variant, orthogonalizer):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = muonkit.Muon([("w", p)], lr=0.01, variant=variant, orthogonalizer=orthogonalizer, diagnostics=True)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    v = opt.state[p]["second_moment"]
    assert opt.last_stats["w"]["second_moment_min"] == v.min().item()
    assert opt.last_stats["w"]["second_moment_max"] == v.max().item()


def test_unnamed_statistics_are_labelled_by_their_place_in_the_group():
    """"group{g}.param{i}": i is the parameter's index in its group, also when earlier parameters
    have no gradient this step."""
    first, second = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5, 5))
    bias = torch.nn.Parameter(torch.randn(3))
    opt = muonkit.Muon([{"params": [first, second]}, {"params": [bias], "use_muon": False}], diagnostics=True)
    second.grad = torch.randn_like(second)
    bias.grad = torch.randn_like(bias)
    opt.step()
    assert set(opt.last_stats) == {"group0.param1", "group1.param0"}
    assert opt.last_stats["group0.param1"]["grad_rms"] == pytest.approx(second.grad.pow(2).mean().sqrt().item())


def test_a_skipped_step_leaves_no_statistics_of_an_earlier_step():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = muonkit.Muon([("w", p)], diagnostics=True, nonfinite="skip")
    p.grad = torch.randn_like(p)
    opt.step()
    assert "w" in opt.last_stats
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.last_stats == {}


def test_a_failed_step_does_not_count_towards_orthogonality_every():
    def failing(X, steps):
        raise RuntimeError("boom")

    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = muonkit.Muon([("w", p)], diagnostics=True, orthogonality_every=2)
    copy_of = copy.deepcopy(opt)
    q = copy_of.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    opt.param_groups[0]["orthogonalizer"] = failing
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    opt.param_groups[0]["orthogonalizer"] = "polar_express"
    for _ in range(2):
        opt.step()
        copy_of.step()
        assert opt.last_stats == copy_of.last_stats


def test_statistics_of_an_empty_fsdp_shard_are_recorded_without_a_second_moment_range():
    """With FSDP2 a rank may hold an empty slice of a parameter (3 rows on 4 ranks): the held step's
    apply records its statistics without min/max of an empty second moment (which raises)."""
    from muonkit import functional
    from muonkit.layout import resolve

    local = torch.empty(0, 6)
    v = torch.empty(0, 1)
    stats = [{}]
    pending = functional.muon(
        [local], [torch.empty(0, 6)], [torch.empty(0, 6)], [resolve(None, 2)], lr=0.1, momentum=0.9, nesterov=True,
        weight_decay=0.1, scale="moonlight", rms=0.2, orthogonalizer="polar_express", ns_steps=5, ns_dtype=None,
        variant="normuon", second_moments=[v], update_many=lambda us, vs, layouts: ([torch.empty(0, 6)], [torch.empty(0, 1)]),
        shapes=[torch.Size((3, 6))], stats=stats, hold=True,
    )
    pending.apply_()
    assert set(stats[0]) == {"grad_rms", "momentum_rms", "update_rms"}
