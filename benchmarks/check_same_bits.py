"""Train charlm 100 steps with muon, normuon, adamuon, muon+cwd and adamw at this tree and at another
commit, and say whether the final parameters and every training loss are the same bits.

Run:
    python benchmarks/check_same_bits.py [--base e43b6fd] [--steps 100] [--ns-dtype float32]

Since issue-22f muonkit's AdamW groups step on torch's fused AdamW kernel by default on CPU, which
differs from torch's default AdamW (the AdamW of every earlier commit) by round-off. So this tree is
trained twice: with every AdamW group's `fused` set to False (the earlier path: this line must say
"same bits" for a change that keeps behaviour) and with its defaults (the line "default": how far the
fused kernel moved the run). The base runs with `fused=False` too where it has the option.

Each side runs in its own process (1 torch thread) with its own src/ on PYTHONPATH (the base commit
extracted with `git archive`): the charlm task's model and data, seed 0, batches from a generator
seeded 1, the optimizers as `muonkit bench` builds them at the task's lrs. Prints one line per
optimizer: "same bits", or the largest parameter difference and the first differing step, so that
a change meant to keep behaviour (a refactor) is checked end to end; with the final loss of each
side and their difference, for a change that moves the bits on purpose. `--ns-dtype float32` sets
every muonkit group's ns_dtype on both sides (the default is None: the machine's dtype, bfloat16
on CPUs with native bfloat16 products since issue 22, float32 on every CPU before).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OPTIMIZERS = ("muon", "normuon", "adamuon", "muon+cwd", "adamw")

TRAIN = """
import sys, torch
from muonkit.tasks.base import DataOptions
from muonkit.tasks.charlm import CharLM
from muonkit.tasks.optimizers import build_optimizers
torch.set_num_threads(1)
task = CharLM()
data = task.load(DataOptions(), torch.device("cpu"))
out = {}
for name in sys.argv[2].split(","):
    torch.manual_seed(0)
    model = task.model(data)
    opts, _ = build_optimizers(name, model, task.lrs[name.removesuffix("+cwd")], adamw_lr=task.lrs["adamw"],
                               weight_decay=task.weight_decay, routing={})
    if sys.argv[5] == "false":
        for group in (g for opt in opts for g in opt.param_groups if "fused" in g):
            group["fused"] = False
    if sys.argv[4] != "default":
        for group in (g for opt in opts for g in opt.param_groups if "ns_dtype" in g):
            group["ns_dtype"] = getattr(torch, sys.argv[4])
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(int(sys.argv[3])):
        x, y = task.batch(data, step, generator)
        loss = task.loss(model, x, y)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    out[name] = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses}
torch.save(out, sys.argv[1])
"""


def train(src: str, path: str, steps: int, ns_dtype: str, fused: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-c", TRAIN, path, ",".join(OPTIMIZERS), str(steps), ns_dtype, fused], env=env,
                   check=True)
    return torch.load(path)


def verdict(a: dict, b: dict) -> str:
    diff = max((a["params"][k].double() - b["params"][k].double()).abs().max().item() for k in a["params"])
    first = next((i for i, (x, y) in enumerate(zip(a["losses"], b["losses"])) if x != y), None)
    if diff == 0 and first is None:
        return "same bits"
    return f"max |param diff| {diff:.3g}, first differing loss at step {first}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="e43b6fd", help="the commit to compare with")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ns-dtype", default="default", choices=("default", "float32", "bfloat16", "float64"),
                        help="ns_dtype of every muonkit group on both sides (default: the optimizers' own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.base, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before = train(os.path.join(tmp, "src"), os.path.join(tmp, "before.pt"), args.steps, args.ns_dtype, "false")
        after = train(os.path.join(ROOT, "src"), os.path.join(tmp, "after.pt"), args.steps, args.ns_dtype, "false")
        default = train(os.path.join(ROOT, "src"), os.path.join(tmp, "default.pt"), args.steps, args.ns_dtype, "default")
    for name in OPTIMIZERS:
        a = before[name]
        for label, b in (("fused=False", after[name]), ("default", default[name])):
            final_a, final_b = a["losses"][-1], b["losses"][-1]
            print(f"{name:9s} {label:11s} {verdict(a, b)} (final loss {final_b:.6f}; base {final_a:.6f}, "
                  f"difference {final_b - final_a:+.6f})")


if __name__ == "__main__":
    main()
