"""Time and achieved GFLOP/s of each orthogonalizer against the fp32 GEMM peak of the same run.

Run:
    python benchmarks/bench_orthogonalize.py [--repeats 5] [--threads 2] [--sizes 256x256,512x512]
        [--write-results]

Prints one Markdown table per size: method, median ms, nominal GFLOP/s (5 steps of
4 m^2 n + 2 m^3 for m <= n, whatever the method really computes), percent of the fp32 GEMM peak
(a 1024^3 torch.mm timed in the same rounds), speed-up over standard Newton-Schulz, the
polar-factor error against a float64 SVD and the largest difference from standard NS. The GEMM
and all methods are timed round-robin, so they share the machine's load; "x standard NS" is the
median over rounds of standard NS's time over the method's. bf16 rows (explicit and dtype="auto")
run at every size on CPUs with native bf16 products, and up to 512 elsewhere.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import environment, gemm, median_ratio, polar_error, setup, table, time_interleaved, write_results

from muonkit.orthogonalize import (
    CPU_FAST_BFLOAT16,
    SAFETY,
    coefficient_schedule,
    gram_newton_schulz,
    newton_schulz,
    orthogonalize,
)

SIZES = ((256, 256), (512, 512), (768, 768), (768, 3072), (1024, 4096))
# bf16 runs 50-100x slower than fp32 on CPUs without AVX-512 BF16; there it is timed on small sizes only.
BF16_MAX_SIDE = 1 << 30 if CPU_FAST_BFLOAT16 else 512


def nominal_flops(m: int, n: int, steps: int = 5) -> float:
    m, n = min(m, n), max(m, n)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def candidates(G: torch.Tensor) -> dict[str, object]:
    pe = coefficient_schedule("polar_express", 5)
    found = {
        "polar_express (default)": lambda: orthogonalize(G),
        "newton_schulz (standard)": lambda: newton_schulz(G, pe, safety=SAFETY["polar_express"]),
        "gram_newton_schulz": lambda: gram_newton_schulz(G, pe, safety=SAFETY["polar_express"]),
        "keller_jordan": lambda: orthogonalize(G, "keller_jordan"),
        "you": lambda: orthogonalize(G, "you"),
        "svd (float64)": lambda: orthogonalize(G, "svd"),
        "svd (float32)": lambda: orthogonalize(G, "svd", dtype=torch.float32),
    }
    if max(G.shape) <= BF16_MAX_SIDE:
        found["polar_express bf16"] = lambda: orthogonalize(G, dtype=torch.bfloat16)
        found["polar_express, dtype='auto'"] = lambda: orthogonalize(G, dtype="auto")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(f"{m}x{n}" for m, n in SIZES))
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    out = [f"Machine at start: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M')}"]
    print(out[0])
    torch.manual_seed(0)
    peak_fn, peak_flops = gemm(1024)
    for spec in args.sizes.split(","):
        m, n = (int(x) for x in spec.split("x"))
        G = torch.randn(m, n)
        fns = candidates(G)
        timings = time_interleaved({"fp32 GEMM 1024^3": peak_fn, **fns}, repeats=args.repeats)
        peak = peak_flops / timings.pop("fp32 GEMM 1024^3").median
        standard = newton_schulz(G, coefficient_schedule("polar_express", 5), safety=SAFETY["polar_express"])
        base = timings["newton_schulz (standard)"]
        rows = []
        for name, t in timings.items():
            result = fns[name]()
            gflops = nominal_flops(m, n) / t.median / 1e9
            rows.append([
                name,
                t.median * 1e3,
                gflops,
                f"{100 * gflops * 1e9 / peak:.0f}%",
                median_ratio(base, t),
                polar_error(result, G),
                float((result.float() - standard).abs().max()),
            ])
        text = (f"\n{m}x{n}: fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s (median of {args.repeats}), "
                f"nominal {nominal_flops(m, n) / 1e9:.2f} GFLOP per call\n"
                + table(["method", "ms", "GFLOP/s", "of peak", "x standard NS", "polar err", "max |diff| vs NS"], rows))
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment()}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_orthogonalize.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("SPEED-ORTHOGONALIZE", f"### Orthogonalizers (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
