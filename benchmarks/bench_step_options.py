"""What each optimizer option costs per step, against the default step and against an earlier commit.

Run:
    python benchmarks/bench_step_options.py [--cases a,c,g] [--repeats 9] [--threads 2] [--base f4bf751]
        [--base-options] [--write-results]

Cases (as in bench_step.py): (a) 4 GPT-2-small blocks, (c) the seed notebook's network, (g) the charlm
task's GPT. Rows: muonkit.Muon with its defaults; the same class at `--base` (a git commit, extracted
with `git archive` and imported as a separate package: by default f4bf751, the step before the
all-or-nothing two-phase step, per-parameter diagnostics and the Muon variants existed); and the
default with one option changed: nonfinite "skip" / "raise" (issue 11), diagnostics=True (issue 14;
the default has it off), variant "normuon" / "adamuon" and cautious weight decay (issue 10).

Every row steps its own copy of the same parameters with the same gradients. Rows are timed
round-robin in one process, the order reversed every other round, one warm-up round first; "x
default" is the median over rounds of the row's time over the default's time in the same round.
"peak MB" is the most memory a step allocates beyond what existed before it
(muonkit.diagnostics.LiveBytes, one step after the timing), "state MB" the optimizer state.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from common import environment, median_ratio, setup, table, time_interleaved, write_results

import muonkit
from muonkit.diagnostics import LiveBytes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

LR, WD = 0.02, 0.1
OPTIONS: dict[str, dict] = {
    "default": {},
    "nonfinite='skip'": dict(nonfinite="skip"),
    "nonfinite='raise'": dict(nonfinite="raise"),
    "diagnostics=True": dict(diagnostics=True),
    "variant='normuon'": dict(variant="normuon"),
    "variant='adamuon'": dict(variant="adamuon"),
    "cautious_weight_decay=True": dict(cautious_weight_decay=True),
    "normuon + cautious": dict(variant="normuon", cautious_weight_decay=True),
    "orthogonalizer=callable (held)": dict(orthogonalizer="callable"),
}


def polar_express(X: torch.Tensor, steps: int) -> torch.Tensor:
    """The default kernel as a user's (batched) callable: the step holds its work until every group is ready."""
    return muonkit.orthogonalize(X, "polar_express", steps)


polar_express.batched = True  # type: ignore[attr-defined]


def base_package(commit: str) -> object:
    """muonkit's src/muonkit at `commit`, imported as the package `muonkit_base`."""
    directory = tempfile.mkdtemp(prefix="muonkit_base_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "src/muonkit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    os.rename(os.path.join(directory, "src", "muonkit"), os.path.join(directory, "src", "muonkit_base"))
    sys.path.insert(0, os.path.join(directory, "src"))
    return importlib.import_module("muonkit_base")


def gpt2_blocks() -> nn.Module:
    layers = []
    for _ in range(4):
        layers += [nn.LayerNorm(768), nn.Linear(768, 768), nn.Linear(768, 768), nn.Linear(768, 768),
                   nn.Linear(768, 768), nn.LayerNorm(768), nn.Linear(768, 3072), nn.Linear(3072, 768)]
    # The first and last layers are hidden matrices here too: route everything 2D to Muon.
    return nn.Sequential(nn.Linear(768, 768), *layers, nn.Linear(768, 768))


def seed_net() -> nn.Module:
    from seed_net import Net

    return Net(10, width=96)


def charlm_model() -> nn.Module:
    from muonkit.tasks.charlm import GPT

    return GPT(vocab=100, context=64)


CASES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "a": ("4 GPT-2-small blocks", gpt2_blocks),
    "c": ("seed notebook network", seed_net),
    "g": ("charlm GPT", charlm_model),
}


def groups_of(model: nn.Module) -> list[dict]:
    """Plain dicts (use_muon, params) that both the current and the base Muon accept."""
    return [{"params": g["params"], "use_muon": g["use_muon"], **({"layout": g["layout"]} if g.get("layout") else {})}
            for g in muonkit.param_groups(model, exclude_from_decay=False)]


def make_step(muon_class: type, model: nn.Module, grads: list[torch.Tensor], options: dict) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    copy = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    groups = [{**g, "params": [copy[index[id(p)]] for p in g["params"]]} for g in groups_of(model)]
    for p, g in zip(copy, grads):
        p.grad = g.clone()
    if options.get("orthogonalizer") == "callable":
        options = {**options, "orthogonalizer": polar_express}
    opt = muon_class(groups, lr=LR, weight_decay=WD, **options)
    return opt.step, opt


def state_mb(opt: torch.optim.Optimizer) -> float:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)) / 2**20


def peak_mb(step: Callable[[], None]) -> float:
    with torch.no_grad(), LiveBytes() as tracker:
        step()
    return tracker.peak / 2**20


def run_case(key: str, base: object | None, repeats: int, base_options: bool) -> str:
    name, build = CASES[key]
    torch.manual_seed(0)
    model = build()
    grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]
    steps, optimizers = {}, {}
    if base is not None and not base_options:
        steps["base commit, defaults"], optimizers["base commit, defaults"] = make_step(base.Muon, model, grads, {})
    for label, options in OPTIONS.items():
        if base is not None and base_options:
            steps[f"base: {label}"], optimizers[f"base: {label}"] = make_step(base.Muon, model, grads, options)
        steps[label], optimizers[label] = make_step(muonkit.Muon, model, grads, options)
    timings = time_interleaved(steps, repeats=repeats)
    against = (lambda label: label if label.startswith("base: ") else f"base: {label}") if base_options else (lambda label: "default")
    rows = [[label, f"{1e3 * timings[label].median:.1f}", f"{median_ratio(timings[label], timings[against(label)]):.3f}",
             f"{peak_mb(steps[label]):.1f}",
             f"{state_mb(optimizers[label]):.1f}"] for label in steps]
    muon_params = sum(p.numel() for g in groups_of(model) if g["use_muon"] for p in g["params"])
    return (f"#### ({key}) {name}: {muon_params / 1e6:.2f}M parameters on Muon\n\n"
            + table(["step", "median ms", "x base" if base_options else "x default", "peak MB", "state MB"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,c,g")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", default="f4bf751", help="a git commit to compare with ('' for none)")
    parser.add_argument("--base-options", action="store_true", help="time every option row at --base too")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    machine = setup(args.threads)
    base = base_package(args.base) if args.base else None
    sections = [run_case(key, base, args.repeats, args.base_options) for key in args.cases.split(",")]
    command = " ".join(["python benchmarks/bench_step_options.py", *sys.argv[1:]])
    title = "Each option against the same option at the base commit" if args.base_options else "Cost of each option"
    text = (f"### {title} (`{command}`)\n\n{machine}, {time.strftime('%Y-%m-%d')}; median of "
            f"{args.repeats} interleaved rounds.\n\n" + "\n\n".join(sections))
    print(text)
    if args.write_results:
        write_results("STEP-REDESIGN" if args.base_options else "STEP-OPTIONS", text)


if __name__ == "__main__":
    main()
