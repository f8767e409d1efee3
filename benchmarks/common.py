"""Shared helpers of the benchmark scripts: thread setup, interleaved timing, tables, errors.

Timing on a shared machine is noisy, so every script times its candidates round-robin in one
process (warm-up first, then `repeats` rounds, each candidate once per round, the order reversed
every other round) and reports the median; a ratio between two candidates is the median of their
per-round ratios (`median_ratio`), which is far steadier than a ratio of medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median: float  # seconds
    low: float
    high: float
    runs: int
    samples: tuple[float, ...] = ()  # one time per round, in round order


def median_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's time over b's time in the same round (both from one
    `time_interleaved` call); the ratio of the medians for timings without matching rounds."""
    if a.samples and len(a.samples) == len(b.samples):
        return statistics.median(x / y for x, y in zip(a.samples, b.samples))
    return a.median / b.median


def setup(threads: int = 2, device: str = "cpu") -> str:
    """Fix the thread count and return one line describing how the numbers were measured."""
    torch.set_num_threads(threads)
    return environment(device)


def environment(device: str = "cpu") -> str:
    """CPU model and the flags that decide bf16 speed, cores, GPU, torch, threads, load average."""
    cpu = platform.processor() or platform.machine()
    flags = ["CPU flags unknown"]
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        present = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present]
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (
        f"{cpu} ({', '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Timing]:
    """Wall time of each candidate, timed round-robin so all see the same machine load; the order
    is reversed every other round so that no candidate always runs after the same one. `sync`
    (torch.cuda.synchronize on a GPU) runs before each clock reading. `clock` replaces the wall
    clock (time.perf_counter), e.g. by time.process_time: this process's CPU time, which on a CPU
    shared with other jobs leaves out the time spent waiting for a core."""
    sync = sync or (lambda: None)
    now = clock or time.perf_counter
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            sync()
            start = now()
            candidates[name]()
            sync()
            times[name].append(now() - start)
    return {
        name: Timing(statistics.median(ts), min(ts), max(ts), len(ts), tuple(ts)) for name, ts in times.items()
    }


def gemm(size: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Callable[[], object], float]:
    """A square matrix product to time beside the candidates, and its flop count: the peak."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3


def device_sync(device: str) -> Callable[[], object] | None:
    """What `time_interleaved` must call around each timing on `device`."""
    return torch.cuda.synchronize if device == "cuda" else None


def bf16_slowdown(size: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Median time of a bfloat16 square matrix product over the float32 one on this device:
    0.34-0.46 on CPUs with AVX-512 BF16, 50-100 on AVX2-only ones."""
    fns = {str(dtype): gemm(size, dtype, device)[0] for dtype in (torch.float32, torch.bfloat16)}
    t = time_interleaved(fns, repeats=repeats, sync=device_sync(device))
    return median_ratio(t[str(torch.bfloat16)], t[str(torch.float32)])


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """Exact U V^T of each matrix (float64 SVD)."""
    U, _, Vh = torch.linalg.svd(G.detach().cpu().double(), full_matrices=False)
    return U @ Vh


def polar_error(O: torch.Tensor, G: torch.Tensor) -> float:
    """max over matrices of ||O - U V^T||_F / ||U V^T||_F for the exact polar factor of G."""
    exact = polar_factor(G)
    err = torch.linalg.matrix_norm(O.detach().cpu().double() - exact) / torch.linalg.matrix_norm(exact)
    return float(err.max())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (the format benchmarks/RESULTS.md keeps)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-2 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.1e}"
    return str(value)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_results(key: str, text: str, path: str = RESULTS) -> None:
    """Put `text` between the <!-- key:BEGIN --> and <!-- key:END --> markers of RESULTS.md,
    appending the block if the markers are missing; the rest of the file is left alone."""
    begin, end = f"<!-- {key}:BEGIN -->", f"<!-- {key}:END -->"
    try:
        with open(path) as f:
            content = f.read()
    except FileNotFoundError:
        content = ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + ("\n\n" if content.strip() else "") + block + "\n"
    with open(path, "w") as f:
        f.write(content)


def keller_jordan_ns5(G: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5 in `dtype`: the loop a user writes by hand (five
    quintic steps with his coefficients, docs/references.md), the textbook baseline of the benchmarks."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X
