"""Small tall matrices: the Muon step on depthwise conv filters, by reading and orthogonalizer.

The seed notebook's network has 7 depthwise filters (96, 1, 3, 3) and 7 pointwise (96, 96, 1, 1).
Issue 25 saw the default step on them cost ~5x the Keller Jordan path. This times a Muon step over
exactly those 14 filters (random gradients), interleaved, median of --repeats rounds:
  - depthwise read as one 96 x 9 matrix (tall; the default) and as its transpose 9 x 96
    (a (9, 96) parameter), default orthogonalizer and Keller Jordan's;
  - depthwise read per channel (96 matrices 1 x 9 each, Layout.per_block(96, 4)), with the tiny
    products batched (now) and one matrix at a time (before: orthogonalize._TINY_PRODUCT = 0).

Run (from the repository root):

    python benchmarks/bench_small_matrices.py --repeats 15 --threads 1

It prints one row per configuration (median ms per step) and its ratio to the default step
with the 96 x 9 reading.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import muonkit  # noqa: E402

ortho = importlib.import_module("muonkit.orthogonalize")  # the module (muonkit.orthogonalize is also a function)

CHANNELS, BLOCKS = 96, 7


def optimizer(depthwise_shape, layout, **options) -> muonkit.Muon:
    torch.manual_seed(0)
    depthwise = [torch.nn.Parameter(torch.randn(depthwise_shape) * 0.1) for _ in range(BLOCKS)]
    pointwise = [torch.nn.Parameter(torch.randn(CHANNELS, CHANNELS, 1, 1) * 0.1) for _ in range(BLOCKS)]
    opt = muonkit.Muon([{"params": depthwise, "layout": layout}, {"params": pointwise, "layout": "conv"}],
                       lr=0.01, weight_decay=1e-3, **options)
    for p in depthwise + pointwise:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


CONFIGS = {
    "default, depthwise as one 96x9 matrix (tall)": (lambda: optimizer((CHANNELS, 1, 3, 3), "conv"), False),
    "default, its transpose 9x96 (wide)": (lambda: optimizer((9, CHANNELS), "conv"), False),
    "keller_jordan, one 96x9 matrix": (lambda: optimizer((CHANNELS, 1, 3, 3), "conv", orthogonalizer="keller_jordan"), False),
    "keller_jordan bf16, one 96x9 matrix": (lambda: optimizer((CHANNELS, 1, 3, 3), "conv", orthogonalizer="keller_jordan",
                                                             ns_dtype=torch.bfloat16), False),
    "default, per channel (96 x 1x9), batched": (lambda: optimizer((CHANNELS, 1, 3, 3), muonkit.Layout.per_block(CHANNELS, 4)), False),
    "default, per channel, one matrix at a time (before)": (
        lambda: optimizer((CHANNELS, 1, 3, 3), muonkit.Layout.per_block(CHANNELS, 4)), True),
}


def time_step(opt: muonkit.Muon, looped: bool) -> float:
    saved = ortho._TINY_PRODUCT
    ortho._TINY_PRODUCT = 0 if looped else saved
    try:
        t0 = time.perf_counter()
        opt.step()
        return 1e3 * (time.perf_counter() - t0)
    finally:
        ortho._TINY_PRODUCT = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    built = {name: (make(), looped) for name, (make, looped) in CONFIGS.items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, (opt, looped) in built.items():
            times[name].append(time_step(opt, looped))
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved steps, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    base = statistics.median(times[next(iter(times))])
    print("| configuration (7 depthwise + 7 pointwise filters) | ms per step | ratio |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
