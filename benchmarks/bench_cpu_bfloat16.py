"""Is bfloat16 the faster Newton-Schulz dtype on this CPU? The measurement behind `default_ns_dtype`.

Times square float32 and bfloat16 matrix products (and one Newton-Schulz call in each dtype on a
wide matrix) interleaved in one process, and prints the bf16/fp32 ratio beside the answer of the
rule muonkit uses (`muonkit.orthogonalize.bfloat16_speed_from_cpuinfo`: AMX-BF16, or AVX512_BF16
on AMD). The rule holds on this CPU when "bf16 faster" (every ratio < 1) equals its answer.

    PYTHONPATH=src python benchmarks/bench_cpu_bfloat16.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from common import environment, gemm, median_ratio, setup, table, time_interleaved

from muonkit.orthogonalize import cpu_bfloat16_speed, orthogonalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024])
    args = parser.parse_args()
    setup(args.threads)
    fast, why = cpu_bfloat16_speed()
    rows, ratios = [], []
    for size in args.sizes:
        fns = {str(d): gemm(size, d)[0] for d in (torch.float32, torch.bfloat16)}
        t = time_interleaved(fns, repeats=args.repeats, clock=time.process_time)
        ratio = median_ratio(t["torch.bfloat16"], t["torch.float32"])
        ratios.append(ratio)
        rows.append([f"product {size} x {size}", t["torch.float32"].median * 1e3, t["torch.bfloat16"].median * 1e3, ratio])
    G = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    fns = {str(d): (lambda d=d: orthogonalize(G, dtype=d)) for d in (torch.float32, torch.bfloat16)}
    t = time_interleaved(fns, repeats=args.repeats, clock=time.process_time)
    ratio = median_ratio(t["torch.bfloat16"], t["torch.float32"])
    ratios.append(ratio)
    rows.append(["Newton-Schulz 256 x 1024", t["torch.float32"].median * 1e3, t["torch.bfloat16"].median * 1e3, ratio])
    print(environment())
    print(table(["case", "fp32 ms (CPU time)", "bf16 ms (CPU time)", "bf16 / fp32"], rows))
    measured = all(r < 1.0 for r in ratios)
    print(f"\nmeasured: bf16 {'faster' if measured else 'not faster'} (ratios {min(ratios):.2f}-{max(ratios):.2f}); "
          f"rule: {'bfloat16' if fast else 'float32'} ({why}); {'agree' if measured == fast else 'DISAGREE'}")


if __name__ == "__main__":
    main()
