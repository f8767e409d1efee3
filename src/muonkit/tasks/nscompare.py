"""`muonkit ns`: every orthogonalizer against the exact polar factor U V^T (float64 SVD) on a random
Gaussian matrix and on a gradient-like one (a few strong directions, a decaying tail, noise)."""

from __future__ import annotations

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
             f"time = median of {results['repeats']}",
             "| matrix | method | sv min | sv max | rel. error | ms |", "|---|---|---|---|---|---|"]
    for kind, entry in results["matrices"].items():
        for method, m in entry["methods"].items():
            lines.append(f"| {kind} | {method} | {m['sv_min']:.3f} | {m['sv_max']:.3f} | "
                         f"{m['rel_error']:.2e} | {m['ms']:.1f} |")
    return "\n".join(lines)


def plot_spectra(results: dict[str, Any], path: Path) -> None:
    """Singular values of each method's output (sorted, descending); the exact answer is all ones."""
    kinds = list(results["matrices"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method, m in results["matrices"][kind]["methods"].items():
            ax.plot(m["spectrum"], label=method)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{kind} {results['shape'][0]}x{results['shape'][1]}")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value of the output")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
