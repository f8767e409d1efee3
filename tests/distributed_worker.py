"""What the multi-process tests run: a small mixed model, fixed gradients, and the jobs each spawned
rank executes (gloo on CPU). Imported by tests/test_distributed.py in the pytest process (for the
single-process oracle) and by every spawned rank.

Every job returns plain tensors (full, gathered parameters and optimizer state) that the pytest
process compares with a single-process run on the same gradients.
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import muonkit
from muonkit.distributed import load_checkpoint, save_checkpoint
from ns_dtype_pin import pin_float32_newton_schulz

# Every spawned rank runs the default ns_dtype in float32, as the pytest process does (conftest.py).
pin_float32_newton_schulz()

STEPS = 3
LR = 0.05
BATCH = 8


class Net(nn.Module):
    """Every case the issue names, in one model small enough to spawn cheaply.

    AdamW (by role): the input stem, every bias, the 1-row output head (an empty slice on rank 1).
    Muon: a conv filter (6 x 27), a Linear with 33 rows (17 + 16 on 2 ranks), a stacked 3D
    parameter (5 experts of 4 x 33), a 2-row Linear (empty slices on 4 ranks), and three matrices
    whose sides are multiples of 8 (two of the same shape, owned one by one).
    """

    def __init__(self, fc_rows: int = 33) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(96, fc_rows)
        self.experts = nn.Parameter(torch.randn(5, 4, fc_rows) / math.sqrt(fc_rows))
        self.narrow = nn.Linear(20, 2)
        self.up = nn.Linear(96, 32)
        self.sq1 = nn.Linear(32, 32)
        self.sq2 = nn.Linear(32, 32)
        self.head = nn.Linear(34, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(self.stem(x))).flatten(1)
        e = torch.einsum("bi,eoi->beo", F.relu(self.fc(h)), self.experts).flatten(1)
        s = self.sq2(F.relu(self.sq1(F.relu(self.up(h)))))
        return self.head(torch.cat([self.narrow(e), s], dim=1))


def make_model(fc_rows: int = 33) -> Net:
    torch.manual_seed(0)
    return Net(fc_rows)


# The Muon variants run through the same jobs: their second moments travel to each matrix's owner.
VARIANTS: dict[str, dict[str, Any]] = {
    "muon": {},
    "normuon": dict(variant="normuon", cautious_weight_decay=True),
    "adamuon": dict(variant="adamuon", beta2=0.9),
    # issue 23: 8-bit momentum (FSDP2 shards hold whole blocks) and Dion2 (replicated only).
    "muon8bit": dict(momentum_bits=8),
    "normuon8bit": dict(variant="normuon", momentum_bits=8),
    "dion2": dict(variant="dion2"),
    "nordion2": dict(variant="nordion2", momentum_bits=8),
}


def make_optimizer(model: nn.Module, process_group: Any = None, variant: str = "muon") -> muonkit.Muon:
    # fused=False: FSDP2's AdamW parameters (DTensors) step on torch's default AdamW, never on its fused
    # kernel, whose result depends on where an element sits in its tensor (a shard would not equal the
    # whole): the one-process runs they are compared with step the same way.
    return muonkit.Muon(muonkit.param_groups(model), lr=LR, weight_decay=0.1, adamw_lr=0.01, process_group=process_group,
                        fused=False, **VARIANTS[variant])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 6, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def fixed_grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Full gradients for `step`, the same in every process and independent of the parameters."""
    out = {}
    for index, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator().manual_seed(1000 * step + index)
        out[name] = torch.randn(p.shape, generator=g)
    return out


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """p.grad = the full gradient, or this rank's Shard(0) slice of it for a DTensor parameter."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        g = grads[name]
        if isinstance(p, DTensor):
            rows = muonkit.distributed.shard_sizes(g.shape[0], p.device_mesh.size())
            rank = p.device_mesh.get_local_rank()
            local = g[sum(rows[:rank]) : sum(rows[: rank + 1])].contiguous()
            g = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=g.shape, stride=g.stride())
        p.grad = g


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model: nn.Module, opt: muonkit.Muon) -> dict[str, torch.Tensor]:
    """Full parameters and optimizer state, by name (collective for DTensors: call on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p)
        for key, value in opt.state[p].items():
            out[f"{name}.{key}"] = full(value)
    return out


def train_fixed(model: nn.Module, opt: muonkit.Muon, steps: range) -> None:
    for step in steps:
        set_grads(model, fixed_grads(model, step))
        opt.step()


def train_data(model: nn.Module, opt: muonkit.Muon, steps: int, rank: int, world: int) -> None:
    x, y = batch()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def shard(model: nn.Module, mesh: Any = None, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in model.children():
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def reference(fixed: bool, steps: int = STEPS, variant: str = "muon") -> dict[str, torch.Tensor]:
    """The single-process run every job is compared with (no torch.distributed)."""
    model = make_model()
    opt = make_optimizer(model, variant=variant)
    if fixed:
        train_fixed(model, opt, range(steps))
    else:
        train_data(model, opt, steps, 0, 1)
    return snapshot(model, opt)


# ------------------------------------------------------------------------------------ jobs


def job_replicated(rank: int, world: int, tmp: Path, variant: str = "muon") -> Any:
    model = make_model()
    opt = make_optimizer(model, dist.group.WORLD, variant)
    train_fixed(model, opt, range(STEPS))
    return snapshot(model, opt)


def job_bytes(rank: int, world: int, tmp: Path) -> Any:
    """Muon.bytes_sent per step, replicated and FSDP2, and the Muon parameters' float32 bytes."""
    out = {}
    for kind in ("replicated", "fsdp"):
        model = make_model() if kind == "replicated" else shard(make_model())
        opt = make_optimizer(model, dist.group.WORLD)
        per_step = []
        for step in range(2):
            before = opt.bytes_sent
            train_fixed(model, opt, range(step, step + 1))
            per_step.append(opt.bytes_sent - before)
        out[kind] = per_step
    groups = muonkit.param_groups(make_model())
    out["muon_bytes"] = sum(4 * p.numel() for g in groups if g["use_muon"] for p in g["params"])
    # The exchange's minimum for Shard(0) pieces: the owner holds a largest slice and receives the
    # rest, then returns every other rank its slice: 2 (N - largest slice) elements per tensor.
    out["fsdp_minimum"] = sum(
        8 * (p.numel() - muonkit.distributed.shard_sizes(p.shape[0], world)[0] * p[0].numel())
        for g in groups if g["use_muon"] for p in g["params"])
    out["no_group"] = make_optimizer(make_model()).bytes_sent
    return out


def job_bytes_variants(rank: int, world: int, tmp: Path) -> Any:
    """Muon.bytes_sent of one replicated step for muon, dion2 and nordion2 (issue 23)."""
    out = {}
    for variant in ("muon", "dion2", "nordion2"):
        model = make_model()
        opt = make_optimizer(model, dist.group.WORLD, variant)
        train_fixed(model, opt, range(1))
        out[variant] = opt.bytes_sent
    return out


def job_fsdp_dion2_refused(rank: int, world: int, tmp: Path) -> Any:
    """The shardings a selecting variant refuses, each before anything changes: dim 0 read as
    columns (a transposed layout), and selection="global" on a row-sharded stack of matrices."""
    out = {}
    for key, ndim, layout, selection in (("columns", 2, muonkit.Layout(rows=(1,), cols=(0,)), "local"),
                                         ("global_stack", 4, muonkit.Layout(rows=(0,), cols=(2, 3), batch=(1,)), "global")):
        model = shard(make_model())
        groups = muonkit.param_groups(model)
        target = next(g for g in groups if g["use_muon"] and g["params"][0].ndim == ndim)
        target["layout"] = layout
        opt = muonkit.Muon(groups, lr=LR, adamw_lr=0.01, process_group=dist.group.WORLD, variant="dion2",
                           selection=selection)
        set_grads(model, fixed_grads(model, 0))
        before = snapshot(model, opt)
        try:
            opt.step()
            out[key] = ("no error", False)
        except ValueError as err:
            out[key] = (str(err), all(torch.equal(a, b) for a, b in zip(before.values(), snapshot(model, opt).values())))
    # 2-D weights cut along dim 1 only (Shard(1) on every rank, dim 0 whole): the shard dimension is
    # the columns, which no selection here picks along.
    from torch.distributed.tensor import Shard

    model = shard(make_model(), shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] >= world else None)
    opt = muonkit.Muon(muonkit.param_groups(model), lr=LR, adamw_lr=0.01, process_group=dist.group.WORLD, variant="dion2")
    set_grads_dim1(model, fixed_grads(model, 0))
    before = snapshot(model, opt)
    try:
        opt.step()
        out["columns_only"] = ("no error", False)
    except ValueError as err:
        out["columns_only"] = (str(err), all(torch.equal(a, b) for a, b in zip(before.values(), snapshot(model, opt).values())))
    return out


def set_grads_dim1(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """p.grad = the full gradient placed as p is, by torch's own split (any placements)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = grads[name]
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


# ---------------------------------------------------- Dion2 on FSDP2 (tests/test_dion2.py)

# Parameters of every kind a selecting variant takes sharded: row-sharded matrices (wide, tall,
# 33 rows in uneven blocks, 2 rows that leave empty blocks on 4 ranks, a conv filter) and a
# batch-sharded stack of 5 matrices (each rank holds whole ones).
DION2_SHAPES = {"wide": (12, 40), "tall": (40, 12), "odd": (33, 20), "tiny": (2, 20), "conv": (8, 3, 2, 2),
                "stack": (5, 6, 10)}
DION2_STEPS = 3
DION2_OPTIONS = dict(lr=0.05, weight_decay=0.1, fraction=0.25, ef_decay=0.9, beta2=0.8, scale="moonlight",
                     orthogonalizer="svd")


class Dion2Params(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name, shape in DION2_SHAPES.items():
            self.register_parameter(name, nn.Parameter(0.5 * torch.randn(shape, generator=g, dtype=torch.float64)))


def dion2_grads(step: int) -> dict[str, torch.Tensor]:
    """float64 gradients whose rows grow in norm with their index (x1 to x4), so that a whole
    matrix's top rows crowd into the last blocks while every block still has its own top rows."""
    out = {}
    for index, (name, shape) in enumerate(DION2_SHAPES.items()):
        g = torch.Generator().manual_seed(100 * step + index)
        rows = shape[0] if name != "stack" else shape[1]
        growth = 1.0 + 3.0 * torch.arange(rows, dtype=torch.float64) / rows
        growth = growth.reshape(rows, *([1] * (len(shape) - 1))) if name != "stack" else growth.reshape(1, rows, 1)
        out[name] = torch.randn(shape, generator=g, dtype=torch.float64) * growth
    return out


def job_fsdp_dion2(rank: int, world: int, tmp: Path, variant: str, selection: str) -> Any:
    """DION2_STEPS steps of a selecting variant on FSDP2-sharded float64 parameters; the full
    parameters and state, and this rank's bytes_sent per step."""
    model = shard(Dion2Params())
    opt = muonkit.Muon([{"params": list(model.parameters()), "param_names": list(DION2_SHAPES)}],
                       variant=variant, selection=selection, process_group=dist.group.WORLD, **DION2_OPTIONS)
    for step in range(DION2_STEPS):
        set_grads(model, dion2_grads(step))
        opt.step()
    return snapshot(model, opt)


def _step_dtensors(model: nn.Module, opt: muonkit.Muon, grads_of: Callable[[int], dict[str, torch.Tensor]]) -> list[int]:
    """DION2_STEPS steps with each gradient split from the full one by torch (set_grads_dim1: any
    placements); this rank's bytes_sent per step."""
    sent = []
    for step in range(DION2_STEPS):
        set_grads_dim1(model, grads_of(step))
        before = opt.bytes_sent
        opt.step()
        sent.append(opt.bytes_sent - before)
    return sent


def job_hsdp_dion2(rank: int, world: int, tmp: Path, variant: str, selection: str) -> Any:
    """job_fsdp_dion2 on HSDP: a (2, world / 2) (replicate, shard) mesh passed as process_group,
    so each parameter is (Replicate(), Shard(0)): world / 2 blocks of rows, each held by 2 replicas."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard(Dion2Params(), mesh)
    opt = muonkit.Muon([{"params": list(model.parameters()), "param_names": list(DION2_SHAPES)}],
                       variant=variant, selection=selection, process_group=mesh, **DION2_OPTIONS)
    sent = _step_dtensors(model, opt, dion2_grads)
    return {**snapshot(model, opt), "sent": sent}


# FSDP2 over tensor parallelism on a (dp, tp) = (2, 2) mesh (torchtitan's recipe): rowwise weights are
# (Shard(0), Shard(1)), each rank a block of rows times a range of columns (uneven both ways in "odd",
# one row a block in "tiny"); the colwise one is (_StridedShard(0), Shard(0)), 4 uneven blocks of rows
# (7, 6, 7, 6) in dim-0 order.
TP_SHAPES = {"wide": (12, 40), "tall": (40, 12), "odd": (33, 21), "tiny": (2, 20), "colwise": (26, 12)}


class TPParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        for name, (rows, cols) in TP_SHAPES.items():
            layer = nn.Linear(cols, rows, bias=False, dtype=torch.float64)
            layer.weight.data = 0.5 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
            self.add_module(name, layer)


def tp_grads(step: int) -> dict[str, torch.Tensor]:
    """float64 gradients of TPParams whose rows grow in norm with their index (as dion2_grads)."""
    out = {}
    for index, (name, (rows, cols)) in enumerate(TP_SHAPES.items()):
        g = torch.Generator().manual_seed(100 * step + index + 50)
        growth = 1.0 + 3.0 * torch.arange(rows, dtype=torch.float64).unsqueeze(1) / rows
        out[f"{name}.weight"] = torch.randn(rows, cols, generator=g, dtype=torch.float64) * growth
    return out


def job_fsdp_tp_dion2(rank: int, world: int, tmp: Path, variant: str, selection: str) -> Any:
    """DION2_STEPS steps of a selecting variant on TPParams placed by parallelize_module (rowwise:
    Shard(1) on tp; colwise: Shard(0)) and fully_shard on dp, the 2-D mesh passed as process_group;
    the full parameters and state, the placements, and the bytes this rank sent per step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = TPParams()
    parallelize_module(model, mesh["tp"], {name: ColwiseParallel() if name == "colwise" else RowwiseParallel()
                                           for name in TP_SHAPES})
    fully_shard(model, mesh=mesh["dp"])
    opt = muonkit.Muon([{"params": list(model.parameters()), "param_names": [n for n, _ in model.named_parameters()]}],
                       variant=variant, selection=selection, process_group=mesh, **DION2_OPTIONS)
    sent = _step_dtensors(model, opt, tp_grads)
    return {**snapshot(model, opt), "sent": sent,
            "placements": {n: repr(tuple(p.placements)) for n, p in model.named_parameters()}}


def job_fsdp_dion2_rows_8bit(rank: int, world: int, tmp: Path) -> Any:
    """One step of Dion2 with 8-bit momentum and no weight decay on the sharded standard model:
    per Muon parameter, its full shape and the rows of this rank's block that moved."""
    model = shard(make_model())
    opt = muonkit.Muon(muonkit.param_groups(model), lr=LR, weight_decay=0.0, adamw_lr=0.01,
                       process_group=dist.group.WORLD, variant="dion2", momentum_bits=8)
    params = [(name, p) for g in opt.param_groups if g["use_muon"] for name, p in zip(g["param_names"], g["params"])]
    before = {name: p.to_local().detach().clone() for name, p in params}
    train_fixed(model, opt, range(1))
    return {name: (tuple(p.shape), (p.to_local().detach() != before[name]).flatten(1).any(-1).sum().item())
            for name, p in params}


def job_bytes_fsdp_variants(rank: int, world: int, tmp: Path) -> Any:
    """Muon.bytes_sent of one FSDP2 step of the standard model for muon, dion2 (local and global
    selection) and nordion2 (issue 23)."""
    out = {}
    for variant, selection in (("muon", "local"), ("dion2", "local"), ("dion2", "global"), ("nordion2", "local")):
        model = shard(make_model())
        opt = muonkit.Muon(muonkit.param_groups(model), lr=LR, weight_decay=0.1, adamw_lr=0.01,
                           process_group=dist.group.WORLD, variant=variant, selection=selection)
        train_fixed(model, opt, range(1))
        out[f"{variant}_{selection}"] = opt.bytes_sent
    return out


def job_fsdp(rank: int, world: int, tmp: Path, variant: str = "muon") -> Any:
    model = shard(make_model())
    opt = make_optimizer(model, dist.group.WORLD, variant)
    train_fixed(model, opt, range(STEPS))
    return snapshot(model, opt)


def job_fsdp_nonfinite_skip(rank: int, world: int, tmp: Path) -> Any:
    """nonfinite="skip" on FSDP2: a NaN in the first row of the first parameter sits in rank 0's
    shard only, yet every rank skips the step (the decision is all-reduced); the other steps are
    the fixed ones, so the result is the reference run's, with one skipped step counted."""
    model = shard(make_model())
    opt = muonkit.Muon(muonkit.param_groups(model), lr=LR, weight_decay=0.1, adamw_lr=0.01,
                       process_group=dist.group.WORLD, nonfinite="skip")
    train_fixed(model, opt, range(1))
    grads = fixed_grads(model, 1)
    first = next(iter(grads))
    grads[first][0].fill_(float("nan"))
    set_grads(model, grads)
    opt.step()
    train_fixed(model, opt, range(1, STEPS))
    return {"snapshot": snapshot(model, opt), "skipped": opt.skipped_steps}


def job_ddp_data(rank: int, world: int, tmp: Path) -> Any:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model, dist.group.WORLD)
    train_data(ddp, opt, STEPS, rank, world)
    return snapshot(model, opt)


def job_fsdp_data(rank: int, world: int, tmp: Path) -> Any:
    model = shard(make_model())
    opt = make_optimizer(model, dist.group.WORLD)
    train_data(model, opt, STEPS, rank, world)
    return snapshot(model, opt)


def job_param_groups(rank: int, world: int, tmp: Path) -> Any:
    def summary(model: nn.Module) -> list:
        return [(g["param_names"], g["use_muon"], g.get("layout")) for g in muonkit.param_groups(model)]

    return summary(make_model()) == summary(shard(make_model()))


def job_errors(rank: int, world: int, tmp: Path) -> Any:
    """The messages of the errors for unsupported placements and groups (None: accepted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    messages = {}
    # FSDP2 allows other dims only for even splits; None keeps its default Shard(0).
    dim1 = shard(make_model(), shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else None)
    mesh_2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    hsdp = shard(make_model(), mesh=mesh_2d)
    replicas = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    partial = make_model()
    partial.sq1.weight = nn.Parameter(DTensor.from_local(partial.sq1.weight.detach(), replicas["replicate"], [Partial()]))
    cases = (("dim1", dim1, dist.group.WORLD), ("mesh2d", hsdp, dist.group.WORLD), ("mesh2d_as_mesh", hsdp, mesh_2d),
             ("other_group", shard(make_model(), mesh=replicas), replicas["shard"].get_group()),
             ("partial", partial, dist.group.WORLD))
    for key, model, group in cases:
        try:
            make_optimizer(model, group)
            messages[key] = None
        except ValueError as err:
            messages[key] = str(err)
    # A group without this rank: dist.new_group returns GroupMember.NON_GROUP_MEMBER on the others.
    only_rank0 = dist.new_group([0])
    try:
        make_optimizer(make_model(), only_rank0)
        messages["non_member"] = None
    except ValueError as err:
        messages["non_member"] = str(err)
    return messages


def job_checkpoint_save(rank: int, world: int, tmp: Path, variant: str = "muon") -> Any:
    """Train the first steps sharded on `world` ranks and save with torch.distributed.checkpoint."""
    model = shard(make_model())
    opt = make_optimizer(model, dist.group.WORLD, variant)
    train_fixed(model, opt, range(STEPS))
    save_checkpoint(tmp / checkpoint_name(world, variant), model, opt)
    return True


def checkpoint_name(world: int, variant: str = "muon") -> str:
    return f"checkpoint_{world}" + ("" if variant == "muon" else f"_{variant}")


def _resume(source: int, variant: str = "muon") -> Callable[[int, int, Path], Any]:
    def job(rank: int, world: int, tmp: Path) -> Any:
        model = shard(make_model())
        opt = make_optimizer(model, dist.group.WORLD, variant)
        load_checkpoint(tmp / checkpoint_name(source, variant), model, opt)
        train_fixed(model, opt, range(STEPS, 2 * STEPS))
        return snapshot(model, opt)

    return job


def job_resume_normuon_into_other_variants(rank: int, world: int, tmp: Path) -> Any:
    """The 2-rank NorMuon checkpoint loaded into optimizers built with variant "adamuon" (a second
    moment of another shape) and "muon" (none); the saved groups' variant wins. Per build: whether
    each second moment came back a DTensor, and the state as loaded ("adamuon") or after the resumed
    steps ("muon")."""
    from torch.distributed.tensor import DTensor

    out = {}
    for built in ("adamuon", "muon"):
        model = shard(make_model())
        opt = make_optimizer(model, dist.group.WORLD, built)
        load_checkpoint(tmp / checkpoint_name(2, "normuon"), model, opt)
        out[f"{built}.sharded"] = {name: isinstance(opt.state[p]["second_moment"], DTensor)
                                   for name, p in model.named_parameters() if "second_moment" in opt.state[p]}
        if built == "muon":
            train_fixed(model, opt, range(STEPS, 2 * STEPS))
        out[f"{built}.snapshot"] = snapshot(model, opt)
    return out


def job_load_unsharded_state_dict(rank: int, world: int, tmp: Path) -> Any:
    """A one-process optimizer's state_dict() (NorMuon, 8-bit momentum) loaded with load_state_dict
    into the FSDP2 optimizer on every rank: whether every state tensor came back a DTensor, and the
    resumed run."""
    from torch.distributed.tensor import DTensor

    single = make_model()
    single_opt = make_optimizer(single, variant="normuon8bit")
    train_fixed(single, single_opt, range(STEPS))
    model = make_model()
    model.load_state_dict(single.state_dict())
    shard(model)
    opt = make_optimizer(model, dist.group.WORLD, "normuon8bit")
    opt.load_state_dict(single_opt.state_dict())
    placed = {f"{name}.{key}": isinstance(value, DTensor) for name, p in model.named_parameters()
              for key, value in opt.state[p].items() if key != "step"}
    train_fixed(model, opt, range(STEPS, 2 * STEPS))
    return {"placed": placed, "snapshot": snapshot(model, opt)}


def _variant(job: Callable[..., Any], variant: str) -> Callable[[int, int, Path], Any]:
    return lambda rank, world, tmp: job(rank, world, tmp, variant)


# ------------------------------------------------------------- QK-Clip (tests/test_qkclip.py)

QK_HEADS, QK_DIM, QK_WIDTH, QK_TAU = 3, 5, 6, 10.0
# Each rank sees part of the maxima; together heads 0 and 1 exceed tau and head 2 does not. Head
# 1's rows (5..9) are split by Shard(0) on 2 ranks (rows 0..7 and 8..14).
QK_OBSERVED = [torch.tensor([50.0, 1.0, 5.0]), torch.tensor([2.0, 400.0, 3.0])]


class QKLayers(nn.Module):
    """The q and k projections of one attention layer (3 heads of 5 rows, with biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(QK_WIDTH, QK_HEADS * QK_DIM)
        self.k = nn.Linear(QK_WIDTH, QK_HEADS * QK_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def _qk_model() -> QKLayers:
    torch.manual_seed(0)
    return QKLayers()


def _qk_clip(model: QKLayers, process_group: Any) -> muonkit.QKClip:
    return muonkit.QKClip([(model.q.weight, model.k.weight, model.q.bias, model.k.bias)], heads=QK_HEADS,
                          tau=QK_TAU, process_group=process_group)


def qkclip_reference() -> dict[str, Any]:
    """One process that observes every rank's maxima."""
    model = _qk_model()
    clip = _qk_clip(model, None)
    for maxima in QK_OBSERVED:
        clip.observe(0, maxima)
    (acted_on,) = clip.step()
    return {"maxima": acted_on.tolist(), "weights": {n: full(p) for n, p in model.named_parameters()}}


def job_qkclip_replicated(rank: int, world: int, tmp: Path) -> Any:
    model = _qk_model()
    clip = _qk_clip(model, dist.group.WORLD)
    clip.observe(0, QK_OBSERVED[rank])
    (acted_on,) = clip.step()
    return {"maxima": acted_on.tolist(), "weights": {n: full(p) for n, p in model.named_parameters()}}


def job_qkclip_fsdp(rank: int, world: int, tmp: Path) -> Any:
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_qk_model())
    params = [model.q.weight, model.k.weight, model.q.bias, model.k.bias]
    try:
        _qk_clip(model, None)
        error = None
    except ValueError as err:
        error = str(err)
    clip = _qk_clip(model, dist.group.WORLD)
    clip.observe(0, QK_OBSERVED[rank])
    clip.step()
    weights = {n: full(p) for n, p in model.named_parameters()}
    x = torch.randn(4, QK_WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        forward_q = model(x)
    return {"weights": weights, "error": error, "placements": [repr(p.placements[0]) for p in params],
            "local_rows": [p.to_local().shape[0] for p in params], "forward_q": forward_q,
            "expected_q": F.linear(x, weights["q.weight"], weights["q.bias"])}


JOBS: dict[str, Callable[[int, int, Path], Any]] = {
    "replicated": job_replicated,
    "fsdp": job_fsdp,
    "bytes": job_bytes,
    "ddp_data": job_ddp_data,
    "fsdp_data": job_fsdp_data,
    "param_groups": job_param_groups,
    "errors": job_errors,
    "checkpoint_save": job_checkpoint_save,
    "resume_from_1": _resume(1),
    "resume_from_2": _resume(2),
    **{f"{kind}_{v}": _variant(job, v) for v in ("normuon", "adamuon")
       for kind, job in (("replicated", job_replicated), ("fsdp", job_fsdp))},
    "checkpoint_save_normuon": _variant(job_checkpoint_save, "normuon"),
    **{f"{kind}_{v}": _variant(job, v) for v in ("muon8bit", "normuon8bit")
       for kind, job in (("replicated", job_replicated), ("fsdp", job_fsdp), ("checkpoint_save", job_checkpoint_save))},
    **{f"resume_{v}_from_{source}": _resume(source, v) for v in ("muon8bit", "normuon8bit") for source in (1, 2)},
    **{f"replicated_{v}": _variant(job_replicated, v) for v in ("dion2", "nordion2")},
    "bytes_variants": job_bytes_variants,
    "fsdp_dion2_refused": job_fsdp_dion2_refused,
    **{f"fsdp_{v}_{sel}": (lambda v, sel: lambda rank, world, tmp: job_fsdp_dion2(rank, world, tmp, v, sel))(v, sel)
       for v in ("dion2", "nordion2") for sel in ("local", "global")},
    **{f"hsdp_{v}_{sel}": (lambda v, sel: lambda rank, world, tmp: job_hsdp_dion2(rank, world, tmp, v, sel))(v, sel)
       for v in ("dion2", "nordion2") for sel in ("local", "global")},
    **{f"fsdp_tp_{v}_{sel}": (lambda v, sel: lambda rank, world, tmp: job_fsdp_tp_dion2(rank, world, tmp, v, sel))(v, sel)
       for v in ("dion2", "nordion2") for sel in ("local", "global")},
    "bytes_fsdp_variants": job_bytes_fsdp_variants,
    "fsdp_dion2_rows_8bit": job_fsdp_dion2_rows_8bit,
    "resume_normuon_from_2": _resume(2, "normuon"),
    "resume_normuon_into_other_variants_from_2": job_resume_normuon_into_other_variants,
    "load_unsharded_state_dict": job_load_unsharded_state_dict,
    "qkclip_replicated": job_qkclip_replicated,
    "qkclip_fsdp": job_qkclip_fsdp,
    "fsdp_nonfinite_skip": job_fsdp_nonfinite_skip,
}


def job(name: str) -> Callable[[int, int, Path], Any]:
    """The job called `name`: one of JOBS, or "module:function" of another worker module."""
    if ":" in name:
        import importlib

        module, function = name.split(":")
        return getattr(importlib.import_module(module), function)
    return JOBS[name]


# The jobs the test modules read, in the order each world size runs them (tests/conftest.py `spawned`:
# one spawn per world size for the whole session). Checkpoint names carry the variant, so every
# module's jobs share one folder.
SPAWNED_JOBS = {
    2: [
        # test_distributed.py
        "replicated", "fsdp", "bytes", "ddp_data", "fsdp_data", "param_groups", "errors", "checkpoint_save",
        "resume_from_1", "replicated_normuon", "fsdp_normuon", "replicated_adamuon", "fsdp_adamuon",
        "checkpoint_save_normuon", "fsdp_nonfinite_skip", "load_unsharded_state_dict",
        # test_dion2.py
        "replicated_dion2", "replicated_nordion2", "bytes_variants", "fsdp_dion2_refused",
        # test_momentum_bits.py
        *[f"{kind}_{v}" for v in ("muon8bit", "normuon8bit") for kind in ("replicated", "fsdp", "checkpoint_save")],
        *[f"resume_{v}_from_1" for v in ("muon8bit", "normuon8bit")],
        # test_qkclip.py
        "qkclip_replicated", "qkclip_fsdp",
    ],
    4: [
        # test_distributed.py
        "replicated", "fsdp", "ddp_data", "fsdp_data", "resume_from_2", "fsdp_normuon", "resume_normuon_from_2",
        "resume_normuon_into_other_variants_from_2",
        # test_dion2.py
        "replicated_dion2", "replicated_nordion2", "bytes_variants", "fsdp_dion2_refused",
        # test_momentum_bits.py
        *[f"{kind}_{v}" for v in ("muon8bit", "normuon8bit") for kind in ("replicated", "fsdp")],
        *[f"resume_{v}_from_{s}" for v in ("muon8bit", "normuon8bit") for s in (1, 2)],
    ],
}


FORKSERVER_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.tensor.parallel",
                      "torch.distributed.checkpoint", "muonkit", "muonkit.distributed", "distributed_worker", "mesh_worker"]


def spawn(world: int, jobs: list[str], tmp: Path, timeout: float) -> list[dict]:
    """Run `jobs` on `world` spawned gloo ranks (`run` below); each rank's {job: result or error}.
    Ranks still alive after `timeout` seconds are killed and TimeoutError is raised.

    A rank killed by a signal (once: a SIGSEGV inside gloo with 8+ processes on 2 loaded cores) is
    no result of the code under test: the whole run is started again once, on a fresh rendezvous
    file, with a warning; a second death fails. A job's error is a result and is never retried."""
    import warnings

    import torch.multiprocessing as mp

    # A fork server that has imported torch and the workers once: each rank is a fork of it (~0.2
    # CPU-s) rather than a new interpreter importing torch (~3 CPU-s). Ranks init gloo after the fork.
    mp.set_forkserver_preload(FORKSERVER_PRELOAD)
    for attempt in range(2):
        context = mp.start_processes(run, args=(world, str(tmp), jobs, attempt), nprocs=world, join=False,
                                     start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} processes did not finish {jobs} in {timeout} s")
            break
        except mp.ProcessExitedException as err:
            if attempt or not err.signal_name:
                raise
            warnings.warn(f"a spawned gloo rank died by {err.signal_name}; running the {world} ranks again once",
                          RuntimeWarning)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
    return load_results(world, tmp)


def load_results(world: int, tmp: Path) -> list[dict]:
    """Each rank's {job: result or error} of the `world`-rank run that wrote them to `tmp`."""
    return [torch.load(tmp / f"result_{world}_{rank}.pt", weights_only=False) for rank in range(world)]


def run(rank: int, world: int, tmp: str, jobs: list[str], attempt: int = 0) -> None:
    """Entry point of a spawned rank: run `jobs` in order, save {job: result or error} to
    tmp/result_{world}_{rank}.pt. Checkpoints are shared through `tmp` by all world sizes."""
    torch.set_num_threads(1)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    path = Path(tmp)
    dist.init_process_group(
        "gloo", init_method=f"file://{path / f'rendezvous_{world}_{attempt}'}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    try:
        for name in jobs:
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                results[name] = job(name)(rank, world, path)
            except Exception:
                results[name] = RuntimeError(traceback.format_exc())
            results[f"{name}.seconds"] = time.perf_counter() - start
            # the rank's own CPU time: what the job costs, whatever else the machine runs
            results[f"{name}.cpu_seconds"] = time.process_time() - cpu_start
            dist.barrier()
    finally:
        torch.save(results, path / f"result_{world}_{rank}.pt")
        gc.collect()  # the jobs' models and optimizers hold the group: free them first (docs/API.md, Distributed)
        dist.destroy_process_group()
