"""The `muonkit` command line, called in-process through main(argv) on tiny data the tests create.

Every task runs end to end for 2 steps; every kind of bad input gives exit code 2, one line on
stderr naming the problem, no traceback, and no results.json.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from muonkit.cli import main
from muonkit.tasks.optimizers import OPTIMIZERS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """64 training and 16 test images of 28x28, labels 0..9; one file gzipped, the rest plain."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 256, (64, 28, 28)), gz=True)
    write_idx(d / "train-labels-idx1-ubyte", np.arange(64) % 10)
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(16) % 10)
    return d


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """The python-pickle layout with 8 images per training batch and 8 test images."""
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": list(range(8))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 80, encoding="utf-8")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_outputs(out_dir: Path, optimizers: list[str], steps: int) -> dict:
    assert (out_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["optimizer"] for r in results["runs"]] == optimizers
    for r in results["runs"]:
        assert len(r["loss"]) == len(r["fwd_bwd_s"]) == len(r["opt_s"]) == steps
        assert r["evals"][-1][0] == steps
    assert set(results["summary"]) == set(optimizers)
    assert not list(out_dir.glob(".*tmp*")), "temporary files left behind"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("task, extra", [
    ("charlm", ["--optimizers", "muon,adamw"]),
    ("fashion-mnist", ["--optimizers", "muon,adamw,torch-muon"]),
    ("cifar10", ["--optimizers", "muon,adamw"]),
    ("modular", ["--optimizers", "muon,adamw"]),
    ("regression", ["--optimizers", "muon,sgd"]),
])
def test_every_task_end_to_end(task, extra, tmp_path, capsys, fashion_dir, cifar_dir, text_file):
    data = {"charlm": ["--text", str(text_file)], "fashion-mnist": ["--data-dir", str(fashion_dir)],
            "cifar10": ["--data-dir", str(cifar_dir)]}.get(task, [])
    out_dir = tmp_path / "out"
    code, out, err = run(["bench", task, "--steps", "2", "--quiet", "--out", str(out_dir), *data, *extra], capsys)
    assert code == 0, err
    optimizers = extra[1].split(",")
    check_outputs(out_dir, optimizers, steps=2)
    assert "| optimizer | lr |" in out and "`peak MB` is" in out  # the table and what its memory column means
    if task == "fashion-mnist":
        assert "torch.optim.Muon accepts only 2D" in err


@pytest.mark.slow
def test_all_optimizers_and_seeds(tmp_path, capsys):
    out_dir = tmp_path / "out"
    threads = torch.get_num_threads()
    code, out, err = run(["bench", "regression", "--steps", "3", "--seeds", "2", "--quiet", "--out", str(out_dir),
                          "--optimizers", ",".join(OPTIMIZERS), "--lr", "muon=0.05", "sgd=0.02",
                          "--threads", str(threads + 1)], capsys)
    assert code == 0, err
    assert f"{threads + 1} threads" in err and torch.get_num_threads() == threads
    results = check_outputs(out_dir, [n for n in OPTIMIZERS for _ in range(2)], steps=3)
    assert results["summary"]["muon"]["lr"] == 0.05 and results["summary"]["sgd"]["lr"] == 0.02
    assert [r["seed"] for r in results["runs"]][:2] == [0, 1]


def test_runs_are_reproducible(tmp_path, capsys):
    losses = []
    for name in ("a", "b"):
        assert run(["bench", "regression", "--steps", "5", "--quiet", "--out", str(tmp_path / name)], capsys)[0] == 0
        losses.append([r["loss"] for r in json.loads((tmp_path / name / "results.json").read_text())["runs"]])
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_epochs_and_lr_sweep(tmp_path, capsys):
    code, out, err = run(["bench", "regression", "--epochs", "2", "--quiet", "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    check_outputs(tmp_path / "e", ["muon", "sgd"], steps=2)  # full batch: one step per epoch
    code, out, err = run(["bench", "regression", "--lr-sweep", "--steps", "2", "--optimizers", "sgd", "--quiet",
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(sweep["results"]["sgd"]) == {"0.003", "0.01", "0.03", "0.1"} and "sgd" in sweep["best"]
    # regression's sweep is scored by steps to target, with the final metric kept to break ties
    assert sweep["score"] == "steps to target" and set(sweep["final_metric"]["sgd"]) == set(sweep["results"]["sgd"])
    assert "best lr" in out and "not reached (final val_mse" in out
    code, out, err = run(["bench", "regression", "--lr-sweep", "--steps", "2", "--optimizers", "sgd", "--quiet",
                          "--lr", "sgd=0.5", "sgd=0.7", "--out", str(tmp_path / "s2")], capsys)
    assert code == 0, err
    assert set(json.loads((tmp_path / "s2" / "sweep.json").read_text())["results"]["sgd"]) == {"0.5", "0.7"}


def routing_table(text: str) -> dict[str, str]:
    """{parameter name: "Muon" | "AdamW"} from the rows of muonkit.explain's table."""
    rows = (re.match(r"(\S+)\s+\[[\d, ]*\]\s+(Muon|AdamW)\s", line) for line in text.splitlines())
    return {m[1]: m[2] for m in rows if m}


def test_explain_cifar10_is_the_notebook_table(capsys):
    """The notebook's split: every 4D filter but the stem to Muon, the depthwise filters (groups=96,
    one 96 x 9 matrix each) included."""
    code, out, err = run(["explain", "cifar10"], capsys)
    assert code == 0, err
    from muonkit.tasks.vision import Net
    model = Net(10, width=96)
    expected = {n: ("Muon" if p.ndim == 4 and n != "0.weight" else "AdamW") for n, p in model.named_parameters()}
    assert routing_table(out) == expected
    assert "depthwise conv filter (groups=96) 96x9" in out


def test_explain_charlm_routes_embeddings_and_head_to_adamw(capsys, text_file):
    code, out, err = run(["explain", "charlm", "--text", str(text_file)], capsys)
    assert code == 0, err
    rows = routing_table(out)
    assert rows["token.weight"] == rows["head.weight"] == rows["blocks.0.attn_norm.weight"] == "AdamW"
    assert rows["blocks.0.qkv.weight"] == rows["blocks.3.fc_proj.weight"] == "Muon"


def test_ns(tmp_path, capsys, monkeypatch):
    import muonkit.tasks.bench

    # Timed on bench's default threads (the cores the load leaves idle): on a busy 2-core machine
    # torch's 2 default threads timed 1-ms methods at 300 ms. The caller's count is restored.
    monkeypatch.setattr(muonkit.tasks.bench, "auto_threads", lambda: 2)
    before = torch.get_num_threads()
    code, out, err = run(["ns", "--size", "16x40", "--repeats", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert torch.get_num_threads() == before != 2
    results = json.loads((tmp_path / "ns.json").read_text())
    assert results["environment"]["torch_threads"] == 2 and "2 torch threads" in out.splitlines()[0]
    assert results["environment"]["cpu"] and results["finished"]
    svd = results["matrices"]["random"]["methods"]["svd"]
    assert svd["rel_error"] < 1e-5 and abs(svd["sv_min"] - 1) < 1e-5
    assert (tmp_path / "ns_spectra.png").read_bytes()[:8] == PNG_MAGIC
    assert "polar_express" in out and "gradient-like" in out


def test_ns_plot_draws_each_orthogonalizer_in_its_own_style(tmp_path, monkeypatch):
    """In ns_spectra.png no two methods share a color and line style (cubic5 and aol took the
    color cycle's first two, polar_express's blue and keller_jordan's orange)."""
    import matplotlib.axes
    import matplotlib.figure

    import muonkit
    from muonkit.tasks import nscompare

    drawn = {}
    original = matplotlib.axes.Axes.plot

    def plot(ax, *args, **kw):
        if kw.get("label"):  # the methods' curves (the input spectrum below has no label)
            drawn[kw["label"]] = (kw.get("color"), str(kw.get("ls", "-")))
        return original(ax, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: None)  # no PNG needed
    methods = {m: {"spectrum": [1.0, 0.9]} for m in muonkit.ORTHOGONALIZERS}
    nscompare.plot_spectra({"shape": [2, 4], "seed": 0, "matrices": {
        "random": {"input_spectrum": [0.8, 0.6], "methods": methods}}}, tmp_path / "s.png")
    assert len(drawn) == len(muonkit.ORTHOGONALIZERS)
    assert all(color is not None for color, _ in drawn.values()), drawn
    assert len(set(drawn.values())) == len(drawn), drawn


@pytest.mark.parametrize("command, words", [
    ("explain", "muonkit.explain(model)"), ("ns", "polar factor, its"),
    ("bench", "- muon-kj: muonkit.Muon with Keller Jordan's coefficients and scale"),
    ("bench", "- muon-pe4, muon-aol, muon-cubic5: muon with a cheaper orthogonalizer"),
])
def test_subcommand_help_says_what_it_does(command, words, capsys):
    """`muonkit explain --help` and `ns --help` had a usage line and options only; explain's says
    how to route your own model (it takes a built-in task). bench's lists what each --optimizers
    name is (it listed 19 names without a word on any)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and words in out, out


def _corrupt_magic(d: Path) -> None:
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 20)


def _truncate(d: Path) -> None:
    raw = (d / "t10k-images-idx3-ubyte").read_bytes()
    (d / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])


def _mismatch(d: Path) -> None:
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(15) % 10)


def _remove(d: Path) -> None:
    (d / "t10k-images-idx3-ubyte").unlink()


def _wrong_size(d: Path) -> None:
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((16, 8, 8)))


@pytest.mark.parametrize("damage, words", [
    (_corrupt_magic, "bad magic number"),
    (_truncate, "truncated or malformed"),
    (_mismatch, "do not match"),
    (_remove, "has no t10k-images-idx3-ubyte"),
    (_wrong_size, "not 28x28"),
])
def test_malformed_fashion_dir(damage, words, fashion_dir, tmp_path, capsys):
    damage(fashion_dir)
    out_dir = tmp_path / "out"
    code, out, err = run(["bench", "fashion-mnist", "--data-dir", str(fashion_dir), "--steps", "2", "--quiet",
                          "--out", str(out_dir)], capsys)
    assert_usage_error(code, err, words)
    assert not out_dir.exists()


def assert_usage_error(code: int, err: str, words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("muonkit: error: ") and words in lines[0], err
    assert "Traceback" not in err


def bad_inputs(tmp: Path, cifar_dir: Path, text_file: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("")
    short = tmp / "short.txt"
    short.write_text("print('hi')\n" * 20)
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("café ".encode("latin-1") * 1000)
    (cifar_dir / "data_batch_3").write_bytes(b"not a pickle")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    return [
        (["bench", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["bench", "charlm", "--optimizers", "muon,lion"], "unknown optimizer 'lion'"),
        (["bench", "fashion-mnist", "--data-dir", str(tmp / "missing")], "does not exist"),
        (["bench", "cifar10", "--data-dir", str(tmp / "missing")], "does not exist"),
        (["bench", "cifar10", "--data-dir", str(cifar_dir)], "is not a CIFAR-10 python pickle"),
        (["bench", "charlm", "--text", str(empty)], "has 0 characters"),
        (["bench", "charlm", "--text", str(short)], "pass --text with a longer file"),
        (["bench", "charlm", "--text", str(tmp / "nope.txt")], "does not exist"),
        (["bench", "charlm", "--text", str(latin1)], "is not UTF-8"),
        (["bench", "charlm", "--text", str(text_file), "--out", str(a_file / "sub")], "cannot create output directory"),
        (["bench", "charlm", "--lr", "muon"], "bad --lr 'muon'"),
        (["bench", "--lr", "muon=0.02", "modular"], "put it before --lr"),
        # A list written as --optimizers takes it: commas in --lr, spaces in --optimizers.
        (["bench", "--lr", "muon=0.01,adamw=0.001"], "separate OPT=VALUE pairs with spaces, not commas, e.g. "
                                                     "--lr muon=0.01 adamw=0.001"),
        (["bench", "--optimizers", "muon", "adamw"], "it is an optimizer; --optimizers takes a comma-separated "
                                                     "list, e.g. --optimizers muon,adamw"),
        (["bench", "charlm", "--lr", "lion=0.1"], "bad --lr 'lion=0.1'"),
        (["bench", "charlm", "--lr", "muon=-1"], "must be a positive number"),
        (["bench", "charlm", "--lr", "adamw=fast"], "must be a positive number"),
        (["bench", "regression", "--optimizers", "muon,sgd", "--lr", "adamw=0.5"], "does not use"),
        (["bench", "charlm", "--text", str(a_dir)], "is a directory"),
        (["bench", "fashion-mnist", "--data-dir", str(a_file)], "is a file, not a directory"),
        (["bench", "charlm", "--steps", "0"], "expected a positive integer"),
        (["bench", "charlm", "--steps", "2", "--epochs", "1"], "not allowed with argument"),
        (["bench", "modular", "--text", str(text_file)], "--text is for charlm and hf-lm only"),
        (["bench", "regression", "--data-dir", str(tmp)], "--data-dir is for"),
        (["explain", "nosuchtask"], "unknown task"),
        (["ns", "--size", "12"], "bad --size '12'"),
        (["frobnicate"], "invalid choice"),
        ([], "missing command"),
    ]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, cifar_dir, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, words in bad_inputs(tmp_path, cifar_dir, text_file):
        code, out, err = run(argv, capsys)
        assert_usage_error(code, err, words)
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "muonkit-runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_requested_without_cuda(capsys):
    code, out, err = run(["bench", "regression", "--device", "cuda"], capsys)
    assert_usage_error(code, err, "CUDA is not available")


@pytest.mark.parametrize("damage, words", [
    (lambda batch: batch[b"labels"].__setitem__(0, -1), "labels must be in 0..9"),
    (lambda batch: (batch.__setitem__(b"data", batch[b"data"][:0]), batch.__setitem__(b"labels", [])),
     "holds no images"),
])
def test_malformed_cifar_labels_and_empty_batches(damage, words, cifar_dir, tmp_path, capsys):
    with open(cifar_dir / "test_batch", "rb") as f:
        batch = pickle.load(f)
    damage(batch)
    with open(cifar_dir / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    code, out, err = run(["bench", "cifar10", "--data-dir", str(cifar_dir), "--steps", "2", "--quiet",
                          "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, err, words)


def test_adamw_lr_is_accepted_for_the_hybrids(tmp_path, capsys):
    code, out, err = run(["bench", "regression", "--optimizers", "muon-kj", "--lr", "adamw=0.05", "--steps", "2",
                          "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err


def test_diverged_runs_write_strict_json(tmp_path, capsys):
    """NaN is not JSON: a diverged run's values are null, and any strict parser reads the file."""
    out_dir = tmp_path / "o"
    code, out, err = run(["bench", "regression", "--optimizers", "sgd", "--lr", "sgd=1e6", "--steps", "20",
                          "--quiet", "--out", str(out_dir)], capsys)
    assert code == 0, err

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    payload = json.loads((out_dir / "results.json").read_text(), parse_constant=refuse)
    assert payload["summary"]["sgd"]["diverged"] == [True] and payload["summary"]["sgd"]["final"] == [None]
    assert (out_dir / "results.json").stat().st_mode & 0o777 == (out_dir / "curves.png").stat().st_mode & 0o777


def test_a_new_run_removes_the_previous_runs_outputs(tmp_path, capsys, monkeypatch):
    """An interrupted run in a reused --out must not leave the earlier run's results looking like its own."""
    import muonkit.tasks.bench as bench

    out_dir = tmp_path / "o"
    code, _, err = run(["bench", "regression", "--steps", "2", "--quiet", "--out", str(out_dir)], capsys)
    assert code == 0 and (out_dir / "results.json").exists() and (out_dir / "curves.png").exists(), err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", interrupted)
    code, _, err = run(["bench", "regression", "--steps", "2", "--quiet", "--out", str(out_dir)], capsys)
    assert code == 130 and "no results were written" in err
    assert not (out_dir / "results.json").exists() and not (out_dir / "curves.png").exists()


def test_an_unwritable_result_file_is_one_line_and_exit_2(tmp_path, capsys):
    out_dir = tmp_path / "o"
    (out_dir / "results.json").mkdir(parents=True)  # a directory where the file must go
    code, out, err = run(["bench", "regression", "--steps", "2", "--quiet", "--out", str(out_dir)], capsys)
    last = err.strip().splitlines()[-1]  # after the runs' progress lines
    assert err.splitlines()[0].endswith(", 1 thread"), err  # not "1 threads" (one thread: tests/conftest.py)
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("muonkit: error: cannot write") and str(out_dir / "results.json") in last, last
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_interleave_runs_seed_by_seed_and_writes_the_same_results(tmp_path, capsys):
    """--interleave trains seed by seed, every optimizer in turn, their order reversed every other
    seed; the results are the default order's, run for run (timings aside)."""
    argv = ["bench", "regression", "--optimizers", "muon,adamw,sgd", "--seeds", "3", "--steps", "2", "--quiet"]
    logged = {}
    for name, extra in (("default", []), ("interleaved", ["--interleave"])):
        code, _, err = run([*argv, *extra, "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        logged[name] = re.findall(r"^(\S+) seed (\d): ", err, flags=re.MULTILINE)
    assert logged["default"] == [(n, s) for n in ("muon", "adamw", "sgd") for s in "012"]
    assert logged["interleaved"] == [("muon", "0"), ("adamw", "0"), ("sgd", "0"), ("sgd", "1"), ("adamw", "1"),
                                     ("muon", "1"), ("muon", "2"), ("adamw", "2"), ("sgd", "2")]
    default, interleaved = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("default", "interleaved"))
    assert list(interleaved) == list(default) and list(interleaved["summary"]) == list(default["summary"])
    assert ([(r["optimizer"], r["seed"], r["loss"], [e[2] for e in r["evals"]]) for r in interleaved["runs"]]
            == [(r["optimizer"], r["seed"], r["loss"], [e[2] for e in r["evals"]]) for r in default["runs"]])


def test_interleave_is_refused_with_an_lr_sweep(tmp_path, capsys):
    code, _, err = run(["bench", "regression", "--lr-sweep", "--interleave", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--interleave" in err and "Traceback" not in err
    assert not (tmp_path / "sweep.json").exists()
