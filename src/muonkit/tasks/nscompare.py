"""`muonkit ns`: every orthogonalizer against the exact polar factor U V^T (float64 SVD) on a random
Gaussian matrix and on a gradient-like one (a few strong directions, a decaying tail, noise)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import muonkit  # noqa: E402


def _orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def gradient_like(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T + noise: four directions 10x stronger than a tail decaying as 1/(i+1)^1.5,
    plus Gaussian noise at 1e-3 of the top singular value (gradients are nearly low-rank)."""
    k = min(rows, cols)
    s = (torch.arange(k, dtype=torch.float64) + 1) ** -1.5
    s[:4] *= 10
    g = _orthonormal(rows, k, generator) @ torch.diag(s) @ _orthonormal(cols, k, generator).T
    return (g + 1e-3 * s[0] * torch.randn(rows, cols, generator=generator, dtype=torch.float64)).float()


def exact_polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


# Peak memory of `compare` in bytes per matrix element: the growth of ru_maxrss was 13.3 float64
# copies of the matrix at 2000x2000 and 8.5 at 1000x4000 (the inputs, their float64 SVDs, the
# orthogonalizers' work); rounded up to 16 copies.
PEAK_BYTES_PER_ELEMENT = 16 * 8


def memory_needed(rows: int, cols: int) -> int:
    """About the most memory `compare(rows, cols)` holds at once, in bytes."""
    return PEAK_BYTES_PER_ELEMENT * rows * cols


def memory_available() -> int | None:
    """Bytes the system can still give this process without swapping (MemAvailable on Linux, the
    free physical pages elsewhere); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def compare(rows: int, cols: int, *, seed: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Singular-value range, relative Frobenius error vs U V^T and median time of each method."""
    generator = torch.Generator().manual_seed(seed)
    matrices = {"random": torch.randn(rows, cols, generator=generator), "gradient-like": gradient_like(rows, cols, generator)}
    results: dict[str, Any] = {"shape": [rows, cols], "seed": seed, "repeats": repeats, "matrices": {}}
    for kind, g in matrices.items():
        exact = exact_polar(g)
        entry: dict[str, Any] = {"input_spectrum": (torch.linalg.svdvals(g.double()) /
                                                    torch.linalg.matrix_norm(g.double())).tolist(), "methods": {}}
        for method in muonkit.ORTHOGONALIZERS:
            muonkit.orthogonalize(g, method)  # warm-up: the first call pays for allocation
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = muonkit.orthogonalize(g, method)
                times.append(time.perf_counter() - start)
            sv = torch.linalg.svdvals(out.double())
            entry["methods"][method] = {
                "sv_min": float(sv.min()),
                "sv_max": float(sv.max()),
                "rel_error": float(torch.linalg.matrix_norm(out.double() - exact) / torch.linalg.matrix_norm(exact)),
                "ms": statistics.median(times) * 1e3,
                "spectrum": sv.tolist(),
            }
        results["matrices"][kind] = entry
    return results


def format_table(results: dict[str, Any]) -> str:
    rows, cols = results["shape"]
    lines = [f"orthogonalizers on {rows}x{cols} float32 matrices vs exact U V^T (float64 SVD); "
             f"time = median of {results['repeats']}"
             + (f", {threads} torch thread{'s' * (threads != 1)}"
                if (threads := results.get("environment", {}).get("torch_threads")) else ""),
             "| matrix | method | sv min | sv max | rel. error | ms |", "|---|---|---|---|---|---|"]
    for kind, entry in results["matrices"].items():
        for method, m in entry["methods"].items():
            lines.append(f"| {kind} | {method} | {m['sv_min']:.3f} | {m['sv_max']:.3f} | "
                         f"{m['rel_error']:.2e} | {m['ms']:.1f} |")
    return "\n".join(lines)


# Line styles that keep coinciding curves visible: "gram" runs the "polar_express" polynomial (and
# "polar_express" itself runs as Gram Newton-Schulz on wide matrices), so it is drawn dashed on top.
_STYLES = {
    "polar_express": dict(color="tab:blue", lw=3.0, alpha=0.6),
    "keller_jordan": dict(color="tab:orange", lw=1.6),
    "you": dict(color="tab:green", lw=1.6),
    # cubic5 and aol had no entry and took the cycle's first colors: blue and orange, polar_express's
    # and keller_jordan's.
    "cubic5": dict(color="tab:purple", lw=1.6),
    "aol": dict(color="tab:brown", lw=1.6),
    "gram": dict(color="tab:red", lw=1.4, ls=(0, (4, 3))),
    "svd": dict(color="black", lw=1.0, ls=":"),
}
_LABELS = {"gram": "gram (Polar Express polynomial\non the Gram matrix)", "svd": "svd (exact: all 1)"}


def plot_spectra(results: dict[str, Any], path: Path) -> None:
    """Per matrix kind: the singular values of each method's output (sorted, descending; the exact
    polar factor has all ones) above the input's singular values (log scale, over its Frobenius norm,
    as Newton-Schulz sees them)."""
    kinds = list(results["matrices"])
    rows, cols = results["shape"]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.2 * len(kinds) + 2.6, 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2, 1]}, sharex="col")
    for column, kind in enumerate(kinds):
        entry = results["matrices"][kind]
        top, bottom = axes[0][column], axes[1][column]
        for method, m in entry["methods"].items():
            top.plot(m["spectrum"], label=_LABELS.get(method, method), **_STYLES.get(method, {}))
        top.set_title(f"{kind} input: output singular values")
        top.grid(alpha=0.3)
        bottom.semilogy(entry["input_spectrum"], color="gray", lw=1.6)
        bottom.set_title("input singular values / Frobenius norm", fontsize=10)
        bottom.set_xlabel("singular value index (descending)")
        bottom.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("singular value of the output")
    axes[1][0].set_ylabel("input")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False)
    fig.suptitle(f"Each orthogonalizer on {rows}x{cols} float32 matrices (seed {results['seed']}) vs the exact "
                 "polar factor U V^T (float64 SVD)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
