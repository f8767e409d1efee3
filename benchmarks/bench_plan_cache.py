"""The step with and without the cached per-parameter checks (issue 22), on bench_step's small cases.

Run (from the repository root):

    python benchmarks/bench_plan_cache.py [--cases c,g] [--repeats 21] [--threads 1] [--write-results]

For each case (bench_step's (c) seed notebook CIFAR-10 net and (g) charlm GPT: muonkit.param_groups
routing, real gradients from one backward pass), two muonkit.Muon at defaults step their own copies
of the parameters with the same gradients: one with the plan cache (muonkit's default), one with it
switched off (`opt._plan_cache = None`: every step runs every per-parameter check, as before).
Both are timed round-robin (benchmarks/common.time_interleaved); "ratio" is the median over rounds of
the cached step's time over the uncached one's in the same round. Also printed: the time of
`optimizer._plan` alone both ways (the checks are all that differs).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from bench_step import make_case, set_grads
from common import environment, median_ratio, setup, table, time_interleaved, write_results

import muonkit
from muonkit import optimizer as optimizer_module


def build(muon, adamw, cached: bool) -> muonkit.Muon:
    groups = [{"params": muon, "use_muon": True}] + ([{"params": adamw, "use_muon": False}] if adamw else [])
    opt = muonkit.Muon(groups, lr=0.02, weight_decay=0.1)
    if not cached:
        opt._plan_cache = None
    return opt


def run_case(key: str, repeats: int) -> str:
    case = make_case(key, "cpu")
    set_grads(case, case.muon + case.adamw)
    opts = {}
    for cached in (True, False):
        muon, adamw = copy.deepcopy(case.muon), copy.deepcopy(case.adamw)
        for copied, original in zip(muon + adamw, case.muon + case.adamw):
            copied.grad = original.grad.clone()
        opts["cached checks (default)" if cached else "checks every step (before)"] = build(muon, adamw, cached)
    for opt in opts.values():
        opt.step()
    steps = time_interleaved({name: opt.step for name, opt in opts.items()}, repeats=repeats)

    def plan_of(opt):
        return lambda: optimizer_module._plan(opt.param_groups, opt.state, opt._check_dtensor, False, opt._plan_cache)

    plans = time_interleaved({name: plan_of(opt) for name, opt in opts.items()}, repeats=repeats)
    cached, plain = (list(steps.values())[i] for i in (0, 1))
    rows = [[name, steps[name].median * 1e3, plans[name].median * 1e3] for name in opts]
    rows.append(["ratio (cached / every step)", median_ratio(cached, plain), median_ratio(*plans.values())])
    return (f"\n{case.name}: {len(case.muon)} Muon and {len(case.adamw)} AdamW parameters\n"
            + table(["step", "step ms", "_plan ms"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="c,g")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    out = [f"Machine at start: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"Median of {args.repeats} interleaved rounds after 1 warm-up round; ratios are medians of per-round ratios."]
    print("\n".join(out), flush=True)
    for key in args.cases.split(","):
        text = run_case(key, args.repeats)
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment()}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_plan_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("PLAN-CACHE", f"### Cached step checks (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
