"""Train with Muon on N processes: the `charlm` GPT under DDP or FSDP2 (--mode), or a tiny Llama on a
device mesh (--mesh fsdp | hsdp | fsdp+tp | ep) as torchtitan places one.

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode ddp --steps 100
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --mode fsdp --steps 100 \
        --checkpoint /tmp/charlm_ckpt
    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --mode fsdp --steps 200 \
        --resume /tmp/charlm_ckpt     # steps 101-200 on 4 processes, the lr schedule continuing
    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --mesh fsdp+tp --steps 100 \
        --checkpoint /tmp/llama_ckpt  # a (2, 2) mesh: tensor parallel on "tp", then FSDP2 on "dp"
    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --mesh hsdp --steps 200 \
        --resume /tmp/llama_ckpt      # the same checkpoint resharded onto (replicate 2, shard 2)
    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --mesh hsdp --defer-relay
                                      # HSDP with the relay phase under the next forward (opt-in)

Meshes of the tiny Llama (RMSNorm, causal attention, SwiGLU; width 64, 2 layers, on charlm's text):
- fsdp: fully_shard on a 1D mesh of every rank (Shard(0)).
- hsdp: fully_shard on a (2, N/2) (replicate, shard) mesh: (Replicate(), Shard(0)). With
  --defer-relay, `muonkit.defer_relay`: the pieces each rank receives from the other replica after
  a step arrive during the next forward, each layer's just before FSDP gathers it (docs/API.md).
- fsdp+tp: torchtitan's recipe on a (N/2, 2) (dp, tp) mesh: `parallelize_module` on "tp" (q, k, v
  and the MLP's w1, w3 colwise; the output projections rowwise), then `fully_shard` on "dp":
  (_StridedShard(0), Shard(0)) and (Shard(0), Shard(1)). The tp ranks of a dp group read the same
  batch.
- ep: the feed-forward is a mixture of 8 experts, stacked (experts, out, in), sharded on the expert
  axis over every rank (each rank computes its experts for every rank's tokens: an all_gather of the
  tokens, a reduce_scatter of the outputs); the rest fully_shard. Muon orthogonalizes the experts
  where they live.
Muon gets the mesh as process_group; every checkpoint loads on any other mesh or number of processes.

CPU with the gloo backend (CUDA with nccl when available). Rank 0 prints the training loss every
--log-every steps and the validation loss at the end. --steps is the length of the whole run: a
resumed run starts at the step the checkpoint was taken and continues the lr schedule from there
(its state is saved beside the DCP files).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import muonkit
from muonkit.distributed import load_checkpoint, save_checkpoint
from muonkit.tasks import DataOptions, get_task

TRAIN_STATE = "train_state.pt"  # the step and the lr schedule, beside the DCP files
MESHES = ("fsdp", "hsdp", "fsdp+tp", "ep")
EXPERTS = 8  # with --mesh ep: divides 1, 2, 4 and 8 processes


# ---------------------------------------------------------------------------- a tiny Llama


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads / tp of them.
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """A soft mixture of SwiGLU-free experts: out = sum_e softmax(router(x))_e w_out[e] silu(w_in[e] x).
    With `group` set, w_in and w_out are DTensors sharded on the expert axis: each rank applies its
    experts to every rank's tokens and the outputs are summed back to their ranks."""

    def __init__(self, width: int, hidden: int, count: int) -> None:
        super().__init__()
        self.router = nn.Linear(width, count, bias=False)
        self.w_in = nn.Parameter(torch.randn(count, hidden, width) / width**0.5)
        self.w_out = nn.Parameter(torch.randn(count, width, hidden) / hidden**0.5)
        self.group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        if self.group is None:
            return self._mix(x, gates, self.w_in, self.w_out)
        # torch's autograd-aware collectives (the ones its deprecation notices name).
        from torch.distributed._functional_collectives import (
            all_gather_single_autograd,
            reduce_scatter_single_autograd,
        )

        w_in, w_out = self.w_in.to_local(), self.w_out.to_local()  # type: ignore[attr-defined]
        rank, local = dist.get_rank(self.group), w_in.shape[0]
        xs = all_gather_single_autograd(x.contiguous(), 0, self.group)
        gs = all_gather_single_autograd(gates[..., rank * local:(rank + 1) * local].contiguous(), 0, self.group)
        return reduce_scatter_single_autograd(self._mix(xs, gs, w_in, w_out), "sum", 0, self.group)

    @staticmethod
    def _mix(x: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        h = F.silu(torch.einsum("btd,ehd->bteh", x, w_in))
        return torch.einsum("bteh,edh,bte->btd", h, w_out, gates)


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, experts: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(width)
        self.attention = Attention(width, heads)
        self.ffn_norm = nn.RMSNorm(width)
        self.feed_forward = Experts(width, 2 * width, experts) if experts else FeedForward(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 64, depth: int = 2, heads: int = 4,
                 experts: int = 0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.layers = nn.ModuleList(Layer(width, heads, experts) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.output = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids) + self.position(torch.arange(ids.size(1), device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def place(model: Llama, mesh_kind: str, device: torch.device) -> tuple[Any, int, int]:
    """Place `model` on a mesh of every rank; returns (the mesh, this rank's data shard, shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    if mesh_kind == "fsdp+tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        for layer in model.layers:
            parallelize_module(layer, mesh["tp"], plan)
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return mesh, mesh["dp"].get_local_rank(), world // 2
    if mesh_kind == "hsdp":
        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ignored: set[nn.Parameter] = set()
    if mesh_kind == "ep":
        from torch.distributed.tensor import Shard, distribute_tensor

        for layer in model.layers:
            experts = layer.feed_forward
            for name in ("w_in", "w_out"):
                weight = getattr(experts, name)
                setattr(experts, name, nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)], src_data_rank=None)))
                ignored.add(getattr(experts, name))
            experts.group = mesh.get_group()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return mesh, rank, world


# ---------------------------------------------------------------------------------- the run


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
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp", help="the charlm GPT under DDP or FSDP2")
    parser.add_argument("--mesh", choices=MESHES, help="train the tiny Llama on this mesh instead (see above)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="Muon lr (default: the task's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint", help="save model and optimizer here at the end (any mesh or world size can load it)")
    parser.add_argument("--resume", help="load this checkpoint before training")
    parser.add_argument("--defer-relay", action="store_true",
                        help="--mesh hsdp: apply the updates relayed from the other replica in the next forward")
    args = parser.parse_args(argv)
    if args.defer_relay and args.mesh != "hsdp":
        parser.error(f"--defer-relay needs --mesh hsdp (it has no relay phase to defer elsewhere), got --mesh {args.mesh}")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if (args.mesh in ("hsdp", "fsdp+tp") and world % 2) or (args.mesh == "ep" and EXPERTS % world):
        dist.destroy_process_group()
        parser.error(f"--mesh {args.mesh} needs an even number of processes (ep: one that divides {EXPERTS}), got {world}")
    try:
        train(args, cuda)
    finally:
        # The model, the mesh and the optimizer hold the process groups. Free them (reference cycles
        # included: train's locals are gone) before destroying the groups: a group that outlives
        # destroy_process_group is torn down while the interpreter exits, and gloo's worker threads
        # then abort the process ("terminate called without an active exception": docs/API.md).
        gc.collect()
        dist.destroy_process_group()
    return 0


def train(args: argparse.Namespace, cuda: bool) -> None:
    """Train, log on rank 0, save the checkpoint if asked (the process group is initialized)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    task = get_task("charlm")
    data = task.load(DataOptions(), device)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    data_rank, data_shards = rank, world
    if args.mesh is None:
        model = task.model(data).to(device)
        wrapped = wrap(model, args.mode, device)
        group: Any = dist.group.WORLD
        name = f"charlm, {args.mode}"
    else:
        model = Llama(len(data.vocab), data.context, experts=EXPERTS if args.mesh == "ep" else 0).to(device)
        group, data_rank, data_shards = place(model, args.mesh, device)
        wrapped = model
        name = f"llama, {args.mesh}"
    # After placing: fully_shard replaces every parameter with a DTensor parameter.
    lr = task.lrs["muon"] if args.lr is None else args.lr
    opt = muonkit.Muon(muonkit.param_groups(model), lr=lr, weight_decay=task.weight_decay,
                       adamw_lr=task.lrs["adamw"], process_group=group)
    deferred = muonkit.defer_relay(opt, model) if args.defer_relay else None
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: task.lr_multiplier(s, args.steps))
    first_step = 0
    if args.resume:
        load_checkpoint(args.resume, model, opt)
        progress = torch.load(Path(args.resume) / TRAIN_STATE)
        schedule.load_state_dict(progress["schedule"])
        first_step = progress["step"]
    generator = torch.Generator().manual_seed(args.seed * 1000 + data_rank)
    experts = [p for n, p in model.named_parameters() if n.endswith(("w_in", "w_out"))] if args.mesh == "ep" else []
    if rank == 0:
        print(f"{name}, {world} processes, {sum(p.numel() for p in model.parameters())} parameters")
    start = time.perf_counter()
    for step in range(first_step, args.steps):
        inputs, targets = task.batch(data, step, generator)
        loss = task.loss(wrapped, inputs, targets)
        loss.backward()
        for p in experts:
            # An expert's gradient sums every rank's tokens; FSDP2 averages the other gradients.
            p.grad.div_(data_shards)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            total = loss.detach().clone()
            dist.all_reduce(total)  # gloo has no ReduceOp.AVG
            if rank == 0:
                print(f"step {step + 1:5d}  train loss {total.item() / world:.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
    if deferred is not None:
        deferred.finish()  # evaluation runs the model's forward (which applies them), but say it plainly
    wrapped.eval()
    with torch.no_grad():
        val = task.evaluate(wrapped, data)
    if rank == 0:
        print(f"val loss {val:.4f} nats/char after {args.steps} steps; sent {opt.bytes_sent} bytes on rank 0")
    if args.checkpoint:
        save_checkpoint(args.checkpoint, model, opt)
        if rank == 0:
            torch.save({"step": args.steps, "schedule": schedule.state_dict()}, Path(args.checkpoint) / TRAIN_STATE)
            print(f"saved {args.checkpoint}")


if __name__ == "__main__":
    raise SystemExit(main())
