"""The `muonkit` command: argument parsing and printing only; the work lives in muonkit.tasks.

    muonkit bench [TASK] [--optimizers muon,adamw,...] [--steps N | --epochs N] [--seeds K] [--interleave]
                  [--eval-every N]
                  [--lr OPT=VALUE ...] [--lr-sweep] [--data-dir DIR] [--text FILE] [--hf-config NAME_OR_PATH]
                  [--qk-clip TAU] [--per-head] [--tensorboard DIR]
                  [--device cpu|cuda] [--out DIR] [--threads N] [--quiet]
    muonkit explain TASK [--data-dir DIR] [--text FILE] [--hf-config NAME_OR_PATH] [--per-head]
    muonkit ns [--size ROWSxCOLS] [--seed S] [--repeats N] [--out DIR] [--threads N]

Bad input prints one line naming the problem and the fix to stderr and returns 2. The commands need
the `bench` extra (numpy, matplotlib, tqdm), which the library itself never imports: without it,
every command prints one line saying what to install and returns 2.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import muonkit

# The modules of the `bench` extra, which the tasks import.
BENCH_MODULES = ("numpy", "matplotlib", "tqdm")
_missing: str | None = None
try:
    from muonkit.tasks import TASKS, DataOptions, Task, TaskError, get_task
    from muonkit.tasks.charlm import per_head_routing
    from muonkit.tasks.optimizers import OPTIMIZERS, base_name, lr_for
except ImportError as err:
    if err.name not in BENCH_MODULES:
        raise
    _missing = err.name

DATA_DIR_TASKS = ("fashion-mnist", "cifar10")
TEXT_TASKS = ("charlm", "hf-lm")


class UsageError(Exception):
    """A command-line mistake; main() prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")


_C_INT_MAX = 2**31 - 1  # torch.set_num_threads takes a C int


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    if value > _C_INT_MAX:
        raise argparse.ArgumentTypeError(f"expected a positive integer of at most {_C_INT_MAX} (torch's limit), got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64) (a torch seed), got {text!r}")
    return value


def _tau(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number (or inf), got {text!r}")
    return value


def _default_out(name: str) -> Path:
    return Path("muonkit-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _optimizers_epilog() -> str:
    """What each --optimizers name is, from muonkit.tasks.optimizers' docstring (its bullet list):
    the help listed 19 names (muon-kj, muon-pe4, dion2, ...) without a word on any."""
    import muonkit.tasks.optimizers as optimizers

    text = inspect.cleandoc(optimizers.__doc__ or "")
    bullets = text[text.index("- muon:"):text.index("\n\n", text.index("- muon:"))]
    return "optimizers (--optimizers):\n" + textwrap.indent(bullets, "  ")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="muonkit", description="Muon optimizer toolkit: benchmarks and diagnostics.")
    parser.add_argument("--version", action="version", version=f"muonkit {muonkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{bench,explain,ns}")

    bench = commands.add_parser(
        "bench", help="train a task with several optimizers and compare them",
        description=textwrap.fill(
            "Train TASK with each optimizer and seed; print a table and write results.json and curves.png to "
            "--out. Without arguments: charlm on the standard library's source, muon vs adamw.", 78),
        epilog=_optimizers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("task", nargs="?", default="charlm", help=f"one of: {', '.join(TASKS)} (default charlm)")
    bench.add_argument("--optimizers", help=f"comma-separated, from: {', '.join(OPTIMIZERS)} "
                                            "(default: the task's own list)")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive_int, help="training steps per run (default: the task's)")
    budget.add_argument("--epochs", type=_positive_int, help="training epochs per run")
    bench.add_argument("--seeds", type=_positive_int, default=1, help="runs per optimizer, seeds 0..K-1 (default 1)")
    bench.add_argument("--interleave", action="store_true",
                       help="run seed by seed, every optimizer in turn (their order reversed every other seed), "
                            "instead of all seeds of one optimizer, then the next: on a machine whose load drifts, "
                            "every optimizer's times then see the same load (not with --lr-sweep)")
    bench.add_argument("--eval-every", type=_positive_int, metavar="N",
                       help="evaluate every N steps (default: the task's; finer steps-to-target counts cost evaluations)")
    bench.add_argument("--lr", nargs="+", action="extend", default=[], metavar="OPT=VALUE",
                       help="override an optimizer's learning rate, e.g. --lr muon=0.02 adamw=1e-3; with "
                            "--lr-sweep, the lrs to try instead of the task's grid (repeat OPT for several)")
    bench.add_argument("--lr-sweep", action="store_true",
                       help="rerun the learning-rate sweep that chose the task's default lrs (budget: the "
                            "task's sweep steps unless --steps/--epochs)")
    bench.add_argument("--data-dir", type=Path, help="data directory (fashion-mnist: IDX files; cifar10: "
                                                     "cifar-10-batches-py)")
    bench.add_argument("--text", type=Path, help="charlm, hf-lm: a UTF-8 text file (default: the standard library's source)")
    bench.add_argument("--hf-config", metavar="NAME_OR_PATH",
                       help="hf-lm: a tiny preset (llama, qwen2, qwen3-moe, gpt2, phi3; default llama) or a transformers "
                            "config.json (needs muonkit[hf])")
    bench.add_argument("--qk-clip", type=_tau, metavar="TAU",
                       help="QK-Clip (Kimi K2) for tasks with attention (charlm, modular): after each step, "
                            "shrink the query and key rows of every head whose largest attention logit exceeded "
                            "TAU (Kimi K2 used 100); 'inf' only records the logits. The table gains a max-logit column")
    bench.add_argument("--per-head", action="store_true",
                       help="tasks with attention (charlm, modular): read each fused qkv weight as one matrix per "
                            "head (3 x heads matrices of head_dim x width) for Muon's orthogonalization and scale")
    bench.add_argument("--tensorboard", type=Path, metavar="DIR",
                       help="also write TensorBoard event files, one sub-directory per run (task, optimizer, lr, "
                            "seed): loss, metric, lr, update RMS per parameter, and for muonkit optimizers their "
                            "statistics (orthogonality error, ...); needs the tensorboard package")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench.add_argument("--out", type=Path, help="output directory (default ./muonkit-runs/<task>-<time>)")
    bench.add_argument("--threads", type=_thread_count,
                       help="torch CPU threads (default: the cores the load average leaves idle, at least 1)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(func=_bench)

    explain = commands.add_parser(
        "explain", help="print which parameters of a task's model go to Muon or AdamW",
        description="Print the routing table of TASK's model: each parameter's optimizer (Muon or AdamW), "
                    "weight decay and the reason. For your own model, call muonkit.explain(model) in Python "
                    "(README.md, 'Use it in your model').")
    explain.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    explain.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    explain.add_argument("--text", type=Path, help="charlm, hf-lm: the corpus that sets the vocabulary size")
    explain.add_argument("--hf-config", metavar="NAME_OR_PATH", help="hf-lm: as `muonkit bench hf-lm --hf-config`")
    explain.add_argument("--per-head", action="store_true", help="as `muonkit bench --per-head`: qkv weights per head")
    explain.set_defaults(func=_explain)

    ns = commands.add_parser(
        "ns", help="compare the orthogonalizers with the exact SVD polar factor",
        description="Orthogonalize random and gradient-like matrices with every built-in orthogonalizer; "
                    "print each one's distance from the exact (SVD) polar factor, its singular values and its "
                    "time; write ns.json and ns_spectra.png (the singular values) to --out.")
    ns.add_argument("--size", default="128x512", help="ROWSxCOLS of the test matrices (default 128x512); a size "
                                                    "whose run would not fit in the available memory is refused")
    ns.add_argument("--seed", type=_seed, default=0, help="seed of the test matrices (default 0)")
    ns.add_argument("--repeats", type=_positive_int, default=5, help="timing repeats; the median is shown")
    ns.add_argument("--out", type=Path, help="output directory (default ./muonkit-runs/ns-<time>)")
    ns.add_argument("--threads", type=_thread_count,
                    help="torch CPU threads (default: the cores the load average leaves idle, at least 1)")
    ns.set_defaults(func=_ns)
    return parser


def _parse_optimizers(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    if text is None:
        return tuple(default)
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise UsageError(f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"--optimizers takes a comma-separated list from: {', '.join(OPTIMIZERS)}")
    if "torch-muon" in names and not hasattr(torch.optim, "Muon"):
        raise UsageError(f"torch-muon needs torch.optim.Muon (torch >= 2.9; this is {torch.__version__}); "
                         "upgrade torch or leave torch-muon out of --optimizers")
    return names


def _parse_lrs(items: Sequence[str]) -> list[tuple[str, float]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            # --lr takes several values, so a TASK written after it lands here.
            hint = f" (to run task {item!r}, put it before --lr)" if not sep and item in TASKS else ""
            raise UsageError(f"bad --lr {item!r}; write OPT=VALUE with OPT one of {', '.join(OPTIMIZERS)}, "
                             f"e.g. --lr muon=0.02{hint}")
        if "," in value:
            # --optimizers takes a comma-separated list; --lr takes its pairs apart.
            raise UsageError(f"bad --lr {item!r}: separate OPT=VALUE pairs with spaces, not commas, e.g. "
                             f"--lr {' '.join(item.split(','))}")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"bad --lr {item!r}: the learning rate must be a positive number, e.g. {name}=0.01")
        pairs.append((name, lr))
    return pairs


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; use --device cpu")
    return torch.device(name)


# Optimizers whose non-matrix parameters train with AdamW at the task's adamw lr, which --lr adamw=...
# sets; `muon` and its variants keep one lr for both kinds of group (the "moonlight" scale).
_USES_ADAMW_LR = ("muon-kj", "torch-muon")


def _check_lr_names(pairs: list[tuple[str, float]], optimizers: tuple[str, ...]) -> None:
    for name, _ in pairs:
        if name in optimizers or (name == "adamw" and any(base_name(o) in _USES_ADAMW_LR for o in optimizers)):
            continue
        raise UsageError(f"--lr {name}=... is for an optimizer this run does not use "
                         f"(--optimizers {','.join(optimizers)}); add {name} to --optimizers or drop it")


def _data_options(args: argparse.Namespace, task_name: str) -> DataOptions:
    if args.text is not None and task_name not in TEXT_TASKS:
        raise UsageError(f"--text is for {' and '.join(TEXT_TASKS)} only, not {task_name}; drop it")
    if args.data_dir is not None and task_name not in DATA_DIR_TASKS:
        raise UsageError(f"--data-dir is for {' and '.join(DATA_DIR_TASKS)} only, not {task_name}; drop it")
    if args.hf_config is not None and task_name != "hf-lm":
        raise UsageError(f"--hf-config is for hf-lm only, not {task_name}; drop it")
    return DataOptions(data_dir=args.data_dir, text=args.text, hf_config=args.hf_config)


def _check_attention(task: Task, flag: str, used: bool) -> None:
    if used and not task.supports_qk_clip:
        supported = ", ".join(name for name, t in TASKS.items() if t.supports_qk_clip)
        raise UsageError(f"{flag} needs a task with attention ({supported}), not {task.name}; drop it")


def _bench(args: argparse.Namespace) -> int:
    from muonkit.tasks.bench import auto_threads

    if args.task not in TASKS and args.task in OPTIMIZERS:
        # `--optimizers muon adamw`: the second name lands in TASK ("unknown task 'adamw'").
        raise UsageError(f"unknown task {args.task!r}: it is an optimizer; --optimizers takes a comma-separated "
                         f"list, e.g. --optimizers muon,{args.task}")
    task = get_task(args.task)
    optimizers = _parse_optimizers(args.optimizers, task.default_optimizers)
    pairs = _parse_lrs(args.lr)
    _check_lr_names(pairs, optimizers)
    # A run uses the last lr given for an optimizer; a sweep tries every lr given for it instead of
    # the task's grid.
    lrs = {**{n: lr_for(n, task.lrs) for n in OPTIMIZERS}, **dict(pairs)}
    grid = {**{n: lr_for(n, task.sweep_grid) for n in OPTIMIZERS},
            **{n: tuple(lr for m, lr in pairs if m == n) for n, _ in pairs}}
    device = _device(args.device)
    options = _data_options(args, task.name)
    for flag, used in (("--qk-clip", args.qk_clip is not None), ("--per-head", args.per_head)):
        _check_attention(task, flag, used)
    if args.interleave and args.lr_sweep:
        raise UsageError("--interleave orders the runs of a bench, not of --lr-sweep; drop one of them")
    if args.tensorboard is not None:
        from muonkit.diagnostics import require_tensorboard

        try:
            require_tensorboard()
        except ImportError as e:
            raise UsageError(f"--tensorboard: {e}") from None

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or auto_threads())
    try:
        return _run_bench(args, task, optimizers, lrs, grid, device, options)
    finally:
        # main() may run inside a larger process (tests, scripts): leave its thread count as found.
        torch.set_num_threads(previous_threads)


def _run_bench(args: argparse.Namespace, task: Task, optimizers: tuple[str, ...], lrs: dict[str, float],
               grid: dict[str, tuple[float, ...]], device: torch.device, options: DataOptions) -> int:
    from muonkit.tasks.bench import BenchConfig, run_bench, run_sweep
    from muonkit.tasks.report import memory_note, prepare_out_dir, writable_dir

    out = args.out or _default_out(task.name + ("-sweep" if args.lr_sweep else ""))
    started = time.perf_counter()
    data = task.load(options, device)
    prepare_out_dir(out)
    if args.tensorboard is not None:
        writable_dir(args.tensorboard, "TensorBoard", "--tensorboard")
    if args.steps:
        steps = args.steps
    elif args.epochs:
        steps = args.epochs * task.steps_per_epoch(data)
    else:
        steps = task.sweep_steps if args.lr_sweep else task.default_steps
    config = BenchConfig(task, optimizers, lrs, grid, args.seeds, steps, device, out, progress=not args.quiet,
                         eval_every=args.eval_every, qk_clip=args.qk_clip, tensorboard=args.tensorboard,
                         per_head=args.per_head, interleave=args.interleave)
    what = "lr sweep" if args.lr_sweep else "bench"
    threads = torch.get_num_threads()
    _log(f"muonkit {what} {task.name}: {', '.join(optimizers)}; {args.seeds} seed(s) x {steps} steps on {device}"
         f"{', interleaved' if args.interleave else ''}; torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}")
    if args.lr_sweep:
        table, _ = run_sweep(config, data, _log)
        written = [out / "sweep.json"]
    else:
        table, payload = run_bench(config, data, _log)
        table += "\n\n" + memory_note(payload["summary"])
        if args.qk_clip is not None:
            table += (f" QK-Clip tau {args.qk_clip:g}: `max logit` is the largest pre-softmax attention logit of any "
                      "head in a training forward pass (before that step's clip), largest over seeds.")
        written = [out / "results.json", out / "curves.png"]
    print(table)
    if args.tensorboard is not None:
        written.append(args.tensorboard)
    print(f"total {time.perf_counter() - started:.1f} s; wrote {', '.join(map(str, written))}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    _check_attention(task, "--per-head", args.per_head)
    model = task.explain_model(_data_options(args, task.name))
    routing = {**task.routing, **per_head_routing(model)} if args.per_head else task.routing
    muonkit.explain(model, file=sys.stdout, **routing)
    return 0


def _ns(args: argparse.Namespace) -> int:
    from muonkit.tasks.bench import auto_threads, environment
    from muonkit.tasks.nscompare import compare, format_table, memory_available, memory_needed, plot_spectra
    from muonkit.tasks.report import prepare_out_dir, write_json_atomic

    text_rows, sep, text_cols = args.size.lower().partition("x")
    if not (sep and text_rows.isdigit() and text_cols.isdigit() and int(text_rows) >= 2 and int(text_cols) >= 2):
        raise UsageError(f"bad --size {args.size!r}; write ROWSxCOLS with both at least 2, e.g. 256x1024")
    rows, cols = int(text_rows), int(text_cols)
    too_big = f"--size {rows}x{cols} is too large for this machine's memory"
    needed, available = memory_needed(rows, cols), memory_available()
    if available is not None and needed > available:
        raise UsageError(f"{too_big} (needs about {needed / 2**30:,.1f} GiB, {available / 2**30:,.1f} GiB "
                         "available); try a smaller size, e.g. 256x1024")
    out = args.out or _default_out("ns")
    prepare_out_dir(out)
    # As for bench: more threads than idle cores made the timings noise on a busy machine (128x512,
    # load 6 on 2 cores: 280-350 ms for methods that take 1 ms on one thread).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or auto_threads())
    try:
        env = environment(torch.device("cpu"))
        results = compare(rows, cols, seed=args.seed, repeats=args.repeats)
    except (MemoryError, RuntimeError) as err:
        # torch's CPU allocator reports a failed allocation as a RuntimeError ("can't allocate memory").
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise UsageError(f"{too_big}: an allocation failed; try a smaller size, e.g. 256x1024") from None
    finally:
        # main() may run inside a larger process (tests, scripts): leave its thread count as found.
        torch.set_num_threads(previous_threads)
    results["environment"] = env
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    plot_spectra(results, out / "ns_spectra.png")
    write_json_atomic(out / "ns.json", results)
    print(format_table(results))
    print(f"wrote {out / 'ns.json'}, {out / 'ns_spectra.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, with a one-line message)."""
    if _missing is not None:
        print(f"muonkit: error: the command line needs {', '.join(BENCH_MODULES)} ({_missing} is missing); "
              "install them with: pip install 'muonkit[bench]'", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("missing command; use one of bench, explain, ns (see `muonkit --help`)")
        return args.func(args)
    except (UsageError, TaskError) as e:
        print(f"muonkit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; silence the flush at exit as well.
        sys.stdout = open(os.devnull, "w")
        return 1
    except KeyboardInterrupt:
        print("muonkit: interrupted; no results were written", file=sys.stderr)
        return 130
    except OSError as e:
        # Writing the results (disk full, a directory where a file should go): one line, no traceback.
        target = e.filename2 or e.filename  # os.replace(tmp, path) names the destination second
        where = f" {target}" if target else ""
        print(f"muonkit: error: cannot write{where}: {e.strerror or e}; pass --out with a writable "
              "directory that has free space", file=sys.stderr)
        return 2
