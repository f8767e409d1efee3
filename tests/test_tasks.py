"""muonkit.tasks pieces: file readers, torch augmentations, models, optimizer builders, the training
loop and the report helpers. Oracles are written out in each test."""

from __future__ import annotations

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

import muonkit
from muonkit.tasks import TASKS, DataOptions, TaskError, get_task
from muonkit.tasks.charlm import GPT
from muonkit.tasks.cifar10 import CIFAR10
from muonkit.tasks.data import (Shuffler, color_jitter, random_crop, random_erasing, random_flip, read_idx,
                                stdlib_corpus)
from muonkit.tasks.optimizers import BASE_OPTIMIZERS, LR_FROM, OPTIMIZERS, SGDW, build_optimizers, lr_for, state_bytes
from muonkit.tasks.base import batchnorm_statistics_from
from muonkit.tasks.bench import best_lr
from muonkit.tasks.fashion_mnist import BN_IMAGES, ImageData
from muonkit.tasks.report import memory_note, plot, summarize, target_hit, write_json_atomic
from muonkit.tasks.training import PEAK_CPU_RSS, PEAK_CUDA, RunResult, peak_rss_since, start_peak_rss, train_run
from muonkit.tasks.vision import Net

CPU = torch.device("cpu")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 4) + array.tobytes()
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_wrong_type_and_length(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 4) + b"\0" * 16)  # float32 IDX
    with pytest.raises(TaskError, match="bad magic"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\0" * 4)
    with pytest.raises(TaskError, match="truncated"):
        read_idx(path)


def test_flip_and_crop():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    flipped = random_flip(x, gen())
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert torch.equal(random_crop(x, padding=0, generator=gen()), x)
    cropped = random_crop(x, padding=2, generator=gen(1))
    assert cropped.shape == x.shape
    # Every crop is a window of the reflect-padded image.
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    for i in range(2):
        windows = padded[i, 0].unfold(0, 5, 1).unfold(1, 5, 1).reshape(-1, 5, 5)
        assert any(torch.equal(w, cropped[i, 0]) for w in windows)


def test_erasing_zeros_one_rectangle_within_scale():
    x = torch.ones(64, 3, 32, 32)
    erased = random_erasing(x, gen())
    zero = erased[:, 0] == 0
    assert torch.equal(zero, (erased == 0).all(1))  # same rectangle in every channel
    fractions = zero.float().mean((1, 2))
    assert (fractions <= 0.36).all()  # 0.33 plus rounding h and w to whole pixels
    assert (fractions > 0).float().mean() > 0.8
    for mask in zero[fractions > 0]:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_color_jitter_stays_in_range_and_keeps_gray_gray():
    x = torch.rand(16, 3, 8, 8)
    out = color_jitter(x, gen())
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    gray = torch.rand(4, 1, 8, 8).expand(4, 3, 8, 8)
    out = color_jitter(gray, gen())
    torch.testing.assert_close(out[:, 0], out[:, 1])


def test_shuffler_visits_every_example_once_per_epoch():
    s = Shuffler(10, 3)
    g = gen()
    seen = torch.cat([s.indices(step, g) for step in range(s.per_epoch)])
    assert s.per_epoch == 3 and len(set(seen.tolist())) == 9


def test_net_is_the_notebooks():
    assert sum(p.numel() for p in Net(10, width=96).parameters()) == 77_037
    model = Net(10, width=96, in_channels=1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cifar10_schedule_is_torch_one_cycle():
    total = 50
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, cycle_momentum=False)
    for step in range(total):
        assert CIFAR10().lr_multiplier(step, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        schedule.step()


def test_stdlib_corpus_is_bounded_and_deterministic():
    text = stdlib_corpus(50_000)
    assert len(text) == 50_000 and text == stdlib_corpus(50_000)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(vocab=11, context=8, width=16, depth=2, heads=2).eval()
    ids = torch.randint(0, 11, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 11
    torch.testing.assert_close(model(ids)[0, :5], model(changed)[0, :5])
    assert not torch.allclose(model(ids)[0, 5:], model(changed)[0, 5:])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizers_route_like_param_groups(name):
    model = GPT(vocab=11, context=8, width=16, depth=1, heads=2)
    optimizers, notes = build_optimizers(name, model, 0.01, adamw_lr=0.001, weight_decay=0.1, routing={})
    covered = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, covered)) == sorted(id(p) for p in model.parameters())
    assert notes == []
    if name == "torch-muon":
        muon_ids = {id(p) for g in muonkit.param_groups(model) if g["use_muon"] for p in g["params"]}
        assert isinstance(optimizers[0], torch.optim.Muon)
        assert {id(p) for p in optimizers[0].param_groups[0]["params"]} == muon_ids
        assert optimizers[1].param_groups[0]["lr"] == 0.001
    if name == "muon-kj":
        assert {g["lr"] for g in optimizers[0].param_groups if not g["use_muon"]} == {0.001}
    expected = {"muon-pe4": ("polar_express", 4), "muon-aol": ("aol", 4), "muon-cubic5": ("cubic5", 5),
                "muon": ("polar_express", 5)}.get(name)
    if expected is not None:
        assert {(g["orthogonalizer"], g["ns_steps"]) for g in optimizers[0].param_groups if g["use_muon"]} == {expected}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_bench_optimizer_decays_the_same_parameters(name):
    """The parameters muonkit.param_groups does not decay (0D/1D, no_weight_decay() names) get
    weight decay 0 from every optimizer the bench compares; all others get the task's."""
    model = GPT(vocab=11, context=8, width=16, depth=1, heads=2)
    model.no_weight_decay = lambda: {"position.weight"}
    names = {id(p): n for n, p in model.named_parameters()}
    zero = {d.name for d in muonkit.route(model) if d.no_decay}
    assert "position.weight" in zero and "norm.weight" in zero
    optimizers, _ = build_optimizers(name, model, 0.01, adamw_lr=0.001, weight_decay=0.1, routing={})
    decay = {}
    for opt in optimizers:
        for g in opt.param_groups:
            wd = g["decoupled_weight_decay"] if isinstance(opt, SGDW) else g["weight_decay"]
            decay.update({names[id(p)]: wd for p in g["params"]})
    assert decay == {n: 0.0 if n in zero else 0.1 for n in names.values()}


def test_torch_muon_sends_conv_filters_to_adamw_with_a_note():
    optimizers, notes = build_optimizers("torch-muon", Net(10, width=8), 0.01, adamw_lr=0.001, weight_decay=0.0,
                                         routing={})
    assert [type(o) for o in optimizers] == [torch.optim.AdamW]
    assert "only 2D" in notes[0] and "plain AdamW" in notes[1]


def test_training_is_reproducible_and_records_every_step():
    task = get_task("regression")
    data = task.load(DataOptions(), CPU)
    runs = [train_run(task, data, "muon", 0.03, seed=3, steps=6, device=CPU, adamw_lr=0.03, progress=False)
            for _ in range(2)]
    assert runs[0].loss == runs[1].loss and len(runs[0].loss) == len(runs[0].opt_s) == 6
    assert [e[0] for e in runs[0].evals] == [5, 6]
    assert runs[0].optimizer_state_mb > 0


def test_sgdw_decays_like_adamw_then_takes_the_plain_sgd_step():
    """Reference, written out: p <- p (1 - lr wd); b <- mu b + g; p <- p - lr (g + mu b) (Nesterov)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    with_no_grad = torch.nn.Parameter(torch.randn(4))
    lr, wd, mu = 0.1, 0.5, 0.9
    opt = SGDW([p, with_no_grad], lr=lr, momentum=mu, nesterov=True, weight_decay=wd)
    expected, buf = p.detach().clone(), None
    frozen = with_no_grad.detach().clone()
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - lr * wd)
        buf = g.clone() if buf is None else mu * buf + g
        expected = expected - lr * (g + mu * buf)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(with_no_grad.detach(), frozen), "a parameter without a gradient must not decay"
    assert all(g["weight_decay"] == 0 for g in opt.param_groups), "no L2 term on top of the decoupled decay"
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert opt.param_groups[-1]["decoupled_weight_decay"] == wd


def test_bench_sgd_uses_decoupled_weight_decay():
    model = torch.nn.Linear(3, 2)
    (opt,), _ = build_optimizers("sgd", model, 0.1, adamw_lr=0.1, weight_decay=1.0, routing={})
    assert isinstance(opt, SGDW) and opt.param_groups[0]["decoupled_weight_decay"] == 1.0


def test_divergence_ends_the_run():
    task = get_task("regression")
    data = task.load(DataOptions(), CPU)
    run = train_run(task, data, "sgd", 1e6, seed=0, steps=50, device=CPU, adamw_lr=0.01, progress=False)
    assert run.diverged and len(run.loss) < 50 and math.isnan(run.evals[-1][2])


@pytest.mark.slow
def test_modular_stops_at_target(monkeypatch):
    task = get_task("modular")
    monkeypatch.setattr(type(task), "target", 0.0)
    data = task.load(DataOptions(), CPU)
    run = train_run(task, data, "adamw", 1e-3, seed=0, steps=100, device=CPU, adamw_lr=1e-3, progress=False)
    assert run.stopped_at_target and len(run.loss) == task.eval_every


def test_modular_split_is_half_of_all_pairs_and_fixed():
    a = get_task("modular").load(DataOptions(), CPU)
    b = get_task("modular").load(DataOptions(), CPU)
    assert len(a.train_inputs) + len(a.val_inputs) == 97 ** 2 and torch.equal(a.train_inputs, b.train_inputs)
    assert torch.equal(a.val_labels, (a.val_inputs[:, 0] + a.val_inputs[:, 1]) % 97)


def test_summary_and_target_hit():
    task = get_task("regression")
    runs = [RunResult("regression", "sgd", 0.01, seed, 3, [], loss=[1.0] * 3, data_s=[0.0] * 3,
                      fwd_bwd_s=[0.001] * 3, opt_s=[0.002] * 3, evals=evals)
            for seed, evals in enumerate([[(1, 0.1, 0.5), (2, 0.2, 0.01), (3, 0.3, 0.015)],
                                          [(1, 0.1, 0.5), (2, 0.2, 0.3), (3, 0.3, 0.25)]])]
    assert target_hit(task, runs[0]) == (2, 0.2) and target_hit(task, runs[1]) is None
    s = summarize(task, runs)
    assert s["final"] == [0.015, 0.25] and s["best"] == [0.01, 0.25]
    assert s["steps_to_target"] == [2, None] and s["opt_step_ms"] == pytest.approx(2.0)


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": [1, math.nan]})
    assert json.loads((tmp_path / "r.json").read_text())["a"][0] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {"a": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_task_has_lrs_and_grids_for_every_optimizer():
    for task in TASKS.values():
        assert set(BASE_OPTIMIZERS) <= set(task.lrs) <= set(OPTIMIZERS)
        assert set(BASE_OPTIMIZERS) <= set(task.sweep_grid) <= set(OPTIMIZERS)
        assert set(task.default_optimizers) <= set(OPTIMIZERS)
        for name in OPTIMIZERS:
            source = LR_FROM.get(name, name.removesuffix("+cwd"))  # muon-8bit, dion2, nordion2: issue 23
            assert lr_for(name, task.lrs) == task.lrs.get(name, task.lrs[source])


@pytest.mark.parametrize("name", ["muon", "normuon", "adamuon", "muon-kj"])
@pytest.mark.parametrize("cautious", [False, True])
def test_bench_muon_family_options(name, cautious):
    model = GPT(vocab=11, context=8, width=16, depth=1, heads=2)
    full = name + ("+cwd" if cautious else "")
    (opt,), _ = build_optimizers(full, model, 0.01, adamw_lr=0.001, weight_decay=0.1, routing={})
    assert isinstance(opt, muonkit.Muon)
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert {g["variant"] for g in muon_groups} == {"muon" if name == "muon-kj" else name}
    assert {g["cautious_weight_decay"] for g in opt.param_groups} == {cautious}


def test_adamw_cwd_is_muonkit_adamw_with_cautious_decay_and_torch_adamw_without():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    (cwd,), _ = build_optimizers("adamw+cwd", model, 0.01, adamw_lr=0.01, weight_decay=0.1, routing={})
    assert [g["use_muon"] for g in cwd.param_groups] == [False, False]  # decayed, and the 1D bias not
    assert all(g["cautious_weight_decay"] for g in cwd.param_groups)
    with pytest.raises(ValueError, match=r"unknown optimizer 'torch-muon\+cwd'"):
        build_optimizers("torch-muon+cwd", model, 0.01, adamw_lr=0.01, weight_decay=0.1, routing={})


def test_sgdw_cautious_decays_only_where_the_update_agrees():
    """Reference: b <- mu b + g; u = g + mu b (Nesterov); p <- p - lr (u + wd p 1[u p >= 0])."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    lr, wd, mu = 0.1, 0.5, 0.9
    opt = SGDW([p], lr=lr, momentum=mu, nesterov=True, weight_decay=wd, cautious=True)
    expected, buf = p.detach().clone(), None
    for _ in range(3):
        g = torch.randn(6, 5)
        p.grad = g.clone()
        opt.step()
        buf = g.clone() if buf is None else mu * buf + g
        u = g + mu * buf
        expected = expected - lr * (u + wd * expected * (u * expected >= 0))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


def test_state_bytes_counts_muon_one_buffer_adamw_two():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(8, 8, bias=False),
                                torch.nn.Linear(8, 2, bias=False))
    model(torch.randn(3, 4)).sum().backward()
    muon, _ = build_optimizers("muon", model, 0.01, adamw_lr=0.01, weight_decay=0.0, routing={})
    adamw, _ = build_optimizers("adamw", model, 0.01, adamw_lr=0.01, weight_decay=0.0, routing={})
    for opt in muon + adamw:
        opt.step()
    # Muon: one 8x8 momentum buffer; AdamW on stem 4x8 and head 8x2: two moments plus a step scalar.
    assert state_bytes(muon) == 4 * (64 + 2 * (32 + 16) + 2)
    assert state_bytes(adamw) == 4 * (2 * (32 + 64 + 16) + 3)


def test_torch_muon_on_the_conv_net_is_exactly_adamw():
    """Why benchmarks run torch-muon on fashion-mnist only as a note: with every Muon-routed tensor
    4D, it trains exactly like adamw at the same lr."""
    task = get_task("fashion-mnist")
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    losses = {}
    for name in ("adamw", "torch-muon"):
        torch.manual_seed(0)
        model = Net(10, width=8, in_channels=1)
        optimizers, _ = build_optimizers(name, model, 0.003, adamw_lr=0.003, weight_decay=1e-3, routing={})
        losses[name] = []
        for _ in range(3):
            loss = task.loss(model, x, y)
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["adamw"] == losses["torch-muon"]


def test_peak_rss_grows_with_a_big_tensor_and_resets():
    start = start_peak_rss()
    if start is None:
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs is missing or not writable)")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    del x
    assert peak_rss_since(start) >= 60 * 2**20
    # A new start forgets that peak: a 1 MiB tensor does not bring it back.
    start = start_peak_rss()
    y = torch.ones(2**20 // 4)
    del y
    assert 0 <= peak_rss_since(start) < 32 * 2**20


def test_peak_rss_is_none_without_a_start():
    assert peak_rss_since(None) is None


def test_cpu_run_records_its_peak_memory():
    task = get_task("regression")
    run = train_run(task, task.load(DataOptions(), CPU), "muon", 0.03, seed=0, steps=3, device=CPU, adamw_lr=0.03,
                    progress=False)
    if start_peak_rss() is None:
        assert run.peak_memory_mb is None and run.peak_memory_kind is None
    else:
        assert run.peak_memory_kind == PEAK_CPU_RSS and 0 <= run.peak_memory_mb < 1024


def test_memory_note_says_what_peak_mb_measured():
    assert "VmHWM" in memory_note({"muon": {"peak_memory_kind": PEAK_CPU_RSS}})
    assert "max_memory_allocated" in memory_note({"muon": {"peak_memory_kind": PEAK_CUDA}})
    assert "not measured" in memory_note({"muon": {"peak_memory_kind": None}})


def test_best_lr():
    nan = math.nan
    # Final metric, lower is better; a diverged seed makes its lr the worst.
    assert best_lr({"0.1": [2.0, 2.2], "0.3": [1.5, 1.7], "1": [1.0, nan]}, None, by_steps=False,
                   higher_is_better=False) == "0.3"
    assert best_lr({"0.1": [0.7], "0.3": [0.8]}, None, by_steps=False, higher_is_better=True) == "0.3"
    # Steps to target: fewer is better, whatever the metric's direction.
    assert best_lr({"0.1": [300.0], "0.3": [150.0]}, {"0.1": [0.99], "0.3": [0.99]}, by_steps=True,
                   higher_is_better=True) == "0.3"
    # Ties (e.g. budget + 1: never reached) go to the better final metric, not to the first lr.
    ties = {"0.1": [1001.0], "0.3": [1001.0], "1": [1001.0]}
    assert best_lr(ties, {"0.1": [0.4], "0.3": [0.6], "1": [0.5]}, by_steps=True, higher_is_better=True) == "0.3"
    assert best_lr(ties, {"0.1": [0.4], "0.3": [0.6], "1": [0.5]}, by_steps=True, higher_is_better=False) == "0.1"
    assert best_lr({"0.1": [nan], "0.3": [1001.0]}, {"0.1": [nan], "0.3": [0.1]}, by_steps=True,
                   higher_is_better=True) == "0.3"


def test_batchnorm_statistics_from_images():
    """Inside the block a BatchNorm's running mean and (unbiased) variance are those of its input
    over the images (float64 oracle, one batch); dropout stays off and no random number is drawn;
    on exit the running averages, momentum and modes are as before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3))
    model.eval()
    images = torch.rand(16, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model[0](images).double()
    rng = torch.get_rng_state()
    with batchnorm_statistics_from(model, images, batch_size=16):
        bn = model[1]
        torch.testing.assert_close(bn.running_mean.double(), conv.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var.double(), conv.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-7)
        assert not any(m.training for m in model.modules())
        first, second = model(images), model(images)
        assert torch.equal(first, second)  # dropout off
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[5].momentum == 0.3 and not model.training


def test_image_tasks_evaluate_with_statistics_of_the_current_weights():
    """The running averages a model carries (here: garbage) do not change the accuracy, and the
    evaluation leaves them as they were."""
    task = get_task("fashion-mnist")
    g = gen(0)
    train = torch.randint(0, 256, (BN_IMAGES + 8, 1, 28, 28), dtype=torch.uint8, generator=g)
    data = ImageData(train, torch.zeros(len(train), dtype=torch.long), torch.rand(40, 1, 28, 28, generator=g),
                     torch.randint(0, 10, (40,), generator=g), Shuffler(len(train), 8))
    torch.manual_seed(0)
    model = Net(10, width=8, in_channels=1)
    with torch.no_grad():
        model[1].γ.fill_(1.0)  # let the residual branches, and their BatchNorms, matter
    model.eval()
    with torch.inference_mode():
        clean = task.evaluate(model, data)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-3, 3)
                m.running_var.uniform_(5, 10)
        garbage = {k: v.clone() for k, v in model.state_dict().items()}
        assert task.evaluate(model, data) == clean
    assert all(torch.equal(v, garbage[k]) for k, v in model.state_dict().items())
    assert "BatchNorm statistics recomputed" in task.evaluation


@pytest.mark.parametrize("seeds, words, absent", [(1, "one seed", "band"), (3, "mean over 3 seeds, band = min..max", None)])
def test_plot_title_names_a_band_only_when_there_is_one(seeds, words, absent, tmp_path, monkeypatch):
    import matplotlib.figure

    titles = []
    original = matplotlib.figure.FigureBase.suptitle
    monkeypatch.setattr(matplotlib.figure.FigureBase, "suptitle",
                        lambda fig, text, **kw: titles.append(text) or original(fig, text, **kw))
    task = get_task("regression")
    runs = [RunResult("regression", "muon", 0.1, seed, 4, [], evals=[(2, 0.1, 0.5), (4, 0.2, 0.3)])
            for seed in range(seeds)]
    plot(task, {"muon": runs}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert len(titles) == 1 and words in titles[0]
    assert absent is None or absent not in titles[0]


def test_steps_to_adamw_final_and_ratio():
    """Each optimizer's steps to reach AdamW's mean final metric, and the median as a multiple of
    the steps AdamW trained to end there; a seed that never reaches it makes the ratio undefined."""
    task = get_task("regression")  # lower is better

    def run(name, seed, values):
        return RunResult("regression", name, 0.1, seed, 4, [], evals=[(s + 1, 0.1 * s, v) for s, v in enumerate(values)])

    runs = {"adamw": [run("adamw", 0, [0.5, 0.3, 0.2, 0.1]), run("adamw", 1, [0.5, 0.3, 0.2, 0.1])],
            "muon": [run("muon", 0, [0.3, 0.1, 0.05, 0.01]), run("muon", 1, [0.2, 0.09, 0.05, 0.01])],
            "sgd": [run("sgd", 0, [0.5, 0.4, 0.3, 0.2]), run("sgd", 1, [0.5, 0.4, 0.3, 0.05])]}
    summaries = {name: {"final": [r.evals[-1][2] for r in rs]} for name, rs in runs.items()}
    from muonkit.tasks.report import add_steps_to_reference
    for rs in runs.values():
        for r in rs:
            r.loss = [1.0] * 4
    add_steps_to_reference(task, runs, summaries)
    assert summaries["adamw"]["steps_to_reference"] == [4, 4] and summaries["adamw"]["reference_step_ratio"] == 1.0
    assert summaries["muon"]["steps_to_reference"] == [2, 2] and summaries["muon"]["reference_step_ratio"] == 0.5
    assert summaries["sgd"]["steps_to_reference"] == [None, 4] and summaries["sgd"]["reference_step_ratio"] is None
    # Train seconds at those evaluations (0.1 per step here); AdamW's own row: its last evaluation's.
    assert summaries["muon"]["seconds_to_reference"] == [0.1, 0.1]
    assert summaries["sgd"]["seconds_to_reference"] == [None, 0.1 * 3]
    assert summaries["adamw"]["seconds_to_reference"] == [0.1 * 3] * 2
    runs["adamw"][1].evals[-1] = (4, 0.3, 0.3)  # a worse seed: AdamW's own row still counts its 4 steps
    summaries["adamw"]["final"] = [0.1, 0.3]
    add_steps_to_reference(task, runs, summaries)
    assert summaries["adamw"]["steps_to_reference"] == [4, 4] and summaries["adamw"]["reference_step_ratio"] == 1.0


def test_table_names_the_metric_its_target_counts():
    """The columns read "steps to val_loss 2", not "steps to 2"."""
    from muonkit.tasks.report import format_table

    summary = {"lr": 0.01, "final": [1.9], "best": [1.9], "steps_to_target": [250], "seconds_to_target": [22.0],
               "fwd_bwd_ms": 60.0, "opt_step_ms": 20.0, "peak_memory_mb": None, "optimizer_state_mb": 3.0}
    header = format_table(get_task("charlm"), {"muon": summary}).splitlines()[0]
    assert "| steps to val_loss 2 | seconds to val_loss 2 |" in header, header


def test_per_head_routing_reads_each_qkv_weight_per_head():
    from muonkit.tasks.charlm import per_head_routing
    model = GPT(vocab=11, context=8, width=16, depth=2, heads=2)
    decisions = {d.name: d for d in muonkit.route(model, **per_head_routing(model))}
    qkv = decisions["blocks.1.qkv.weight"]
    assert qkv.optimizer == "muon" and qkv.layout == muonkit.Layout.per_block(6)
    assert "6 matrices 8x16" in qkv.reason
    assert decisions["blocks.1.proj.weight"].layout != qkv.layout
    with pytest.raises(TaskError, match="--per-head needs attention blocks"):
        per_head_routing(torch.nn.Linear(3, 3))


def test_per_head_flag_needs_a_task_with_attention(capsys):
    from muonkit.cli import main
    assert main(["bench", "regression", "--per-head", "--steps", "1"]) == 2
    assert "--per-head needs a task with attention (charlm, modular), not regression" in capsys.readouterr().err
