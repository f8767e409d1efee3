"""The seed notebook's recipe against muonkit's defaults on the notebook's network: accuracy and step time.

Both sides train the notebook's network (width 96, dropout 0.1 as in the notebook, one input
channel) on Fashion-MNIST for 300 steps at the notebook's lr 1e-2 and weight decay 1e-3 under
OneCycleLR (torch's defaults, momentum cycling included), from the same initial weights, batches
and augmentations (the `fashion-mnist` task's pipeline, batch 32):
  notebook  the notebook's Muon class (tests/seed_net.py: bf16 Keller Jordan Newton-Schulz) on
            every 4D weight but the stem, torch.optim.AdamW on the rest, one OneCycleLR each
  muonkit   muonkit.Muon(muonkit.param_groups(model), lr=1e-2, weight_decay=1e-3), one OneCycleLR
The two runs of a seed advance in lockstep in one process (a step of one, then a step of the
other), so both optimizers' steps are timed under the same machine load. Accuracy: the full
10,000-image test set after the last step, with BatchNorm statistics recomputed on 256 training
images (the task's evaluation).

Run (from the repository root; ~15 min per seed on 2 shared CPU cores):

    python benchmarks/bench_seed_recipe.py --seeds 0 1

It prints a table (accuracy per seed and their mean, median optimizer step of each side and
the ratio) and writes benchmarks/task-runs/seed-recipe/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import muonkit  # noqa: E402
from muonkit.tasks import DataOptions, get_task  # noqa: E402
from muonkit.tasks.base import accuracy, batchnorm_statistics_from  # noqa: E402
from muonkit.tasks.bench import environment  # noqa: E402
from muonkit.tasks.data import to_float_images  # noqa: E402
from muonkit.tasks.fashion_mnist import BN_IMAGES, DEFAULT_DIR, load_idx_pair  # noqa: E402
from muonkit.tasks.vision import Net  # noqa: E402
from seed_net import SeedMuon, notebook_split  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY, STEPS = 1e-2, 1e-3, 300
OUT = ROOT / "benchmarks" / "task-runs" / "seed-recipe"


def notebook_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    muon_names, adamw_names = notebook_split(model)
    params = dict(model.named_parameters())
    return [SeedMuon([params[n] for n in muon_names], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY),
            torch.optim.AdamW([params[n] for n in adamw_names], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)]


def muonkit_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    return [muonkit.Muon(muonkit.param_groups(model), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)]


SIDES = {"notebook": notebook_optimizers, "muonkit": muonkit_optimizers}


def run_seed(seed: int, task: Any, data: Any, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    torch.manual_seed(seed)
    initial = Net(10, width=96, in_channels=1, res_p_drop=0.1, head_p_drop=0.1)
    models, optimizers, schedulers, step_ms = {}, {}, {}, {}
    for side, build in SIDES.items():
        model = Net(10, width=96, in_channels=1, res_p_drop=0.1, head_p_drop=0.1)
        model.load_state_dict(initial.state_dict())
        models[side], optimizers[side] = model, build(model)
        schedulers[side] = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=STEPS)
                            for opt in optimizers[side]]
        step_ms[side] = []
    generator = torch.Generator().manual_seed(seed)
    dropout = {side: torch.Generator().manual_seed(seed) for side in SIDES}
    for step in range(STEPS):
        x, y = task.batch(data, step, generator)
        for side, model in models.items():
            model.train()
            state = torch.get_rng_state()
            torch.set_rng_state(dropout[side].get_state())  # the same dropout masks on both sides
            loss = F.cross_entropy(model(x), y)
            dropout[side].set_state(torch.get_rng_state())
            torch.set_rng_state(state)
            model.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            for opt in optimizers[side]:
                opt.step()
            step_ms[side].append(1e3 * (time.perf_counter() - t0))
            for sched in schedulers[side]:
                sched.step()
    result: dict[str, Any] = {"seed": seed}
    for side, model in models.items():
        model.eval()
        with torch.inference_mode(), batchnorm_statistics_from(model, to_float_images(data.train_images[:BN_IMAGES])):
            result[side] = {"acc": accuracy(model, *test, batch_size=250),
                            "opt_step_ms": statistics.median(step_ms[side][10:])}
    return result


def table(record: dict[str, Any]) -> str:
    runs = record["runs"]
    lines = ["| seed | notebook acc | muonkit acc | notebook opt step ms | muonkit opt step ms | ratio |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        nb, mk = r["notebook"], r["muonkit"]
        lines.append(f"| {r['seed']} | {nb['acc']:.4f} | {mk['acc']:.4f} | {nb['opt_step_ms']:.2f} | "
                     f"{mk['opt_step_ms']:.2f} | {mk['opt_step_ms'] / nb['opt_step_ms']:.2f} |")
    mean = {side: statistics.mean(r[side]["acc"] for r in runs) for side in SIDES}
    ms = {side: statistics.mean(r[side]["opt_step_ms"] for r in runs) for side in SIDES}
    lines.append(f"| mean | {mean['notebook']:.4f} | {mean['muonkit']:.4f} | {ms['notebook']:.2f} | "
                 f"{ms['muonkit']:.2f} | {ms['muonkit'] / ms['notebook']:.2f} |")
    lines.append(f"\nmuonkit - notebook accuracy (mean of {len(runs)} seeds): {mean['muonkit'] - mean['notebook']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        torch.set_num_threads(args.threads)
        task = get_task("fashion-mnist")
        data = task.load(DataOptions(), torch.device("cpu"))
        images, labels = load_idx_pair(DEFAULT_DIR, "t10k")
        test = (to_float_images(images), labels)
        record = {"environment": environment(torch.device("cpu")), "command": " ".join(["python", *sys.argv]),
                  "steps": STEPS, "threads": args.threads, "runs": []}
        for seed in args.seeds:
            record["runs"].append(run_seed(seed, task, data, test))
            print(json.dumps(record["runs"][-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    record = json.loads(args.out.read_text())
    print(f"`{record['command']}`, {record['environment']['date']}, {record['environment']['cpu']}, "
          f"{record['threads']} thread(s)\n")
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
