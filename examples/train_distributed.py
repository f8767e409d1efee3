"""Train the `charlm` task (a small character-level GPT) with Muon on N processes, DDP or FSDP2.

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode ddp --steps 100
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode fsdp --steps 100 \
        --checkpoint /tmp/charlm_ckpt
    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --mode fsdp --steps 200 \
        --resume /tmp/charlm_ckpt     # steps 101-200 on 4 processes, the lr schedule continuing

CPU with the gloo backend (CUDA with nccl when available). Every rank draws its own batches; DDP
averages the gradients, FSDP2 reduce-scatters them. Muon splits the Newton-Schulz work across the
ranks (`process_group=`); AdamW groups (embeddings, head, norms) update locally. Rank 0 prints the
training loss every --log-every steps and the validation loss at the end.

--steps is the length of the whole run: a resumed run starts at the step the checkpoint was taken
and continues the lr schedule from there (its state is saved beside the DCP files).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import muonkit
from muonkit.distributed import load_checkpoint, save_checkpoint
from muonkit.tasks import DataOptions, get_task


TRAIN_STATE = "train_state.pt"  # the step and the lr schedule, beside the DCP files


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP around the model, or FSDP2: fully_shard each transformer block, then the root."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="Muon lr (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint", help="save model and optimizer here at the end (any world size can load it)")
    parser.add_argument("--resume", help="load this checkpoint before training")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        task = get_task("charlm")
        data = task.load(DataOptions(), device)
        torch.manual_seed(args.seed)  # the same initial model on every rank
        model = task.model(data).to(device)
        wrapped = wrap(model, args.mode, device)
        # After wrapping: fully_shard replaces every parameter with a sharded DTensor parameter.
        groups = muonkit.param_groups(model)
        lr = task.lrs["muon"] if args.lr is None else args.lr
        opt = muonkit.Muon(
            groups, lr=lr, weight_decay=task.weight_decay, adamw_lr=task.lrs["adamw"], process_group=dist.group.WORLD
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: task.lr_multiplier(s, args.steps))
        first_step = 0
        if args.resume:
            load_checkpoint(args.resume, model, opt)
            progress = torch.load(Path(args.resume) / TRAIN_STATE)
            schedule.load_state_dict(progress["schedule"])
            first_step = progress["step"]
        generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
        if rank == 0:
            print(f"charlm, {args.mode}, {world} processes, {sum(p.numel() for p in model.parameters())} parameters")
        start = time.perf_counter()
        for step in range(first_step, args.steps):
            inputs, targets = task.batch(data, step, generator)
            loss = task.loss(wrapped, inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                total = loss.detach().clone()
                dist.all_reduce(total)  # gloo has no ReduceOp.AVG
                if rank == 0:
                    print(f"step {step + 1:5d}  train loss {total.item() / world:.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
        wrapped.eval()
        with torch.no_grad():
            val = task.evaluate(wrapped, data)
        if rank == 0:
            print(f"val loss {val:.4f} nats/char after {args.steps} steps")
        if args.checkpoint:
            save_checkpoint(args.checkpoint, model, opt)
            if rank == 0:
                torch.save({"step": args.steps, "schedule": schedule.state_dict()}, Path(args.checkpoint) / TRAIN_STATE)
                print(f"saved {args.checkpoint}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
