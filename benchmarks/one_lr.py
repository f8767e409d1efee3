"""One lr for both kinds of group, or a separate `adamw_lr`: muonkit.Muon on `muonkit bench hf-lm`.

muonkit's default scale (Moonlight's) gives the Muon update AdamW's RMS, meant to let one lr serve
the Muon and the AdamW groups. This trains the hf-lm task (a transformers causal LM built from a
preset, on the standard library's source) with muonkit.Muon at the task's Muon lr and the
task's schedule, once with the AdamW groups (embeddings, output layer, norms) at the same lr and
once for each `--adamw-lrs` value, with 3 seeds each (the seed sets init and batch order, as in
`muonkit bench`), and prints the final validation loss per setting.

    PYTHONPATH=src python benchmarks/one_lr.py                       # llama preset, ~5 min on 2 CPU cores
    PYTHONPATH=src python benchmarks/one_lr.py --hf-config qwen3-moe --steps 20 --seeds 0   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import muonkit
from muonkit.tasks import DataOptions, get_task


def run(task, data, lr: float, adamw_lr: float | None, seed: int, steps: int) -> float:
    torch.manual_seed(seed)
    model = task.model(data)
    opt = muonkit.Muon(muonkit.param_groups(model), lr=lr, adamw_lr=adamw_lr, weight_decay=task.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: task.lr_multiplier(step, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        inputs, targets = task.batch(data, step, generator)
        loss = task.loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-config", default="llama")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-2, 3e-3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("hf-lm")
    data = task.load(DataOptions(hf_config=args.hf_config), torch.device("cpu"))
    lr = task.lrs["muon"]
    start = time.time()
    print(f"hf-lm --hf-config {args.hf_config}: muonkit.Muon lr {lr:g}, {args.steps} steps, seeds {args.seeds}")
    print("| AdamW groups' lr | final val_loss (mean ± std) | per seed |\n|---|---|---|")
    for adamw_lr in (None, *args.adamw_lrs):
        losses = [run(task, data, lr, adamw_lr, seed, args.steps) for seed in args.seeds]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        label = f"{lr:g} (one lr, adamw_lr=None)" if adamw_lr is None else f"{adamw_lr:g} (adamw_lr={adamw_lr:g})"
        print(f"| {label} | {statistics.fmean(losses):.4f} ± {spread:.4f} | {', '.join(f'{x:.4f}' for x in losses)} |",
              flush=True)
    print(f"torch {torch.__version__}, 1 thread, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
