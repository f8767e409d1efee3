"""Time and achieved GFLOP/s of each orthogonalizer against the fp32 GEMM peak of the same run.

Run:
    python benchmarks/bench_orthogonalize.py [--repeats 5] [--threads 2] [--sizes 256x256,512x512]
        [--write-results]
    python benchmarks/bench_orthogonalize.py --schedules [--repeats 15] [--threads 1]
        [--sizes 256x256,768x3072,charlm,fashion-mnist] [--write-results]

With --schedules (issue 22 item 3) it times the cheaper schedules against the default instead, all
at the default working dtype (dtype=None, and the same again in float32 and bfloat16): Polar
Express with 4 steps, "aol" with 4 (Turbo-Muon), "cubic5"; a size may also be "charlm" or
"fashion-mnist", the Muon-routed matrices of that task's model (random gradients), timed as the
optimizer orthogonalizes them (same-shaped matrices stacked) and as a whole Muon step. Prints
median ms, the median per-round ratio to the default's time, the products per call and the
distance from the float64 SVD polar factor.

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
    working_dtype,
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


# (label, orthogonalizer, steps); the first is the default the others are compared with.
SCHEDULES = (("polar_express 5 (default)", "polar_express", 5), ("polar_express 4", "polar_express", 4),
             ("aol 4 (Turbo-Muon)", "aol", 4), ("cubic5", "cubic5", 5))
SCHEDULE_SIZES = ("256x256", "512x512", "768x3072", "charlm", "fashion-mnist")


def products(method: str, steps: int, m: int, n: int) -> str:
    """Matrix products per call of the standard kernel (quintic 3 a step, cubic 2), and whether the
    Gram path (fewer m x n products, more m x m ones) runs instead at this shape."""
    from muonkit.orthogonalize import uses_gram

    count = 2 * steps if method == "cubic5" else 3 * steps
    return f"{count}" + (" (Gram)" if uses_gram(m, n) else "")


def task_groups(task: str) -> tuple[torch.nn.Module, list[dict]]:
    """`task`'s model (charlm's at a 96-character vocabulary) and its param groups as the bench routes them."""
    import muonkit
    from muonkit.tasks import get_task
    from muonkit.tasks.charlm import GPT

    torch.manual_seed(0)
    spec = get_task(task)
    model = GPT(96, spec.context, width=spec.width, depth=spec.depth) if task == "charlm" else spec.model(None)
    return model, muonkit.param_groups(model, **spec.routing)


def model_matrices(task: str) -> list[torch.Tensor]:
    """Random gradients shaped like the Muon-routed parameters of `task`'s model, one
    (1, rows, cols) matrix each (a conv filter read as out x in*kh*kw)."""
    _, groups = task_groups(task)
    return [torch.randn(1, p.shape[0], p[0].numel()) for g in groups if g["use_muon"] for p in g["params"]]


def model_step(task: str, method: str, steps: int, dtype: torch.dtype | None = None):
    """A Muon step (muonkit defaults but the orthogonalizer and ns_dtype) on `task`'s model with fixed
    random gradients."""
    import muonkit

    model, groups = task_groups(task)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return muonkit.Muon(groups, lr=1e-3, orthogonalizer=method, ns_steps=steps, ns_dtype=dtype).step


def schedules_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    from muonkit.functional import batched_orthogonalize

    out = [f"Machine at start: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M')}",
           "Working dtype: dtype=None is the default Newton-Schulz dtype of this machine and torch "
           f"(float32 on CPU before issue 22 item 1; `working_dtype` decides): here "
           f"{working_dtype(torch.zeros(1, 1), None)}."]
    print("\n".join(out))
    for spec in args.sizes.split(","):
        fns: dict[str, object] = {}
        # name -> (orthogonalizer, steps, dtype, what is timed: the default's row with the same suffix is the base)
        meta: dict[str, tuple[str, int, torch.dtype | None, str]] = {}
        if spec in ("charlm", "fashion-mnist"):
            mats = model_matrices(spec)
            shapes = sorted({tuple(m.shape[-2:]) for m in mats})
            head = f"{spec}: {len(mats)} Muon matrices, shapes {', '.join('x'.join(map(str, s)) for s in shapes)}"
            for dtype in (None, torch.float32, torch.bfloat16):
                dname = "None" if dtype is None else str(dtype).removeprefix("torch.")
                for label, method, steps in SCHEDULES:
                    for what, fn in ((f" NS, dtype={dname}", lambda mm=method, st=steps, dt=dtype: batched_orthogonalize(
                                         mats, method=mm, steps=st, dtype=dt)),
                                     (f" Muon step, dtype={dname}", model_step(spec, method, steps, dtype))):
                        fns[label + what] = fn
                        meta[label + what] = (method, steps, dtype, what)
            m = n = 0
        else:
            m, n = (int(x) for x in spec.split("x"))
            G = torch.randn(m, n)
            head = f"{m}x{n}"
            for dtype in (None, torch.float32, torch.bfloat16):
                for label, method, steps in SCHEDULES:
                    suffix = f", dtype={'None' if dtype is None else str(dtype).removeprefix('torch.')}"
                    fns[label + suffix] = (lambda mm=method, st=steps, dt=dtype: orthogonalize(G, mm, st, dtype=dt))
                    meta[label + suffix] = (method, steps, dtype, suffix)
        timings = time_interleaved(fns, repeats=args.repeats)
        rows = []
        for name, t in timings.items():
            method, steps, dtype, suffix = meta[name]
            base_name = SCHEDULES[0][0] + suffix
            if m:
                error = polar_error(orthogonalize(G, method, steps, dtype=dtype), G)
                count = products(method, steps, m, n)
            else:
                error, count = float("nan"), products(method, steps, 1, 1)
            rows.append([name, t.median * 1e3, median_ratio(t, timings[base_name]), count, error])
        text = (f"\n{head} (median of {args.repeats} interleaved rounds)\n"
                + table(["schedule", "ms", "x default", "products", "polar err"], rows))
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment()}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_orthogonalize.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("SPEED-SCHEDULES", f"### Cheaper schedules (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--schedules", action="store_true", help="time the cheaper schedules against the default")
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.schedules:
        args.sizes = args.sizes or ",".join(SCHEDULE_SIZES)
        return schedules_main(args, argv)
    args.sizes = args.sizes or ",".join(f"{m}x{n}" for m, n in SIZES)
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
