"""What the N-D mesh tests run on 4 spawned gloo ranks (tests/test_mesh.py): a tiny Llama-like model
placed on (2, 2) device meshes as torchtitan places it (HSDP; FSDP2 over tensor parallelism by
`parallelize_module` then `fully_shard`; expert parallelism; sub-meshes with flattened dims such as
"dp_shard_cp"), fixed gradients, and per job the full
parameters and state, the bytes sent per step and the minimum those placements allow.

Job names are "mesh_worker:<kind>" or "mesh_worker:<kind>__<variant>" (tests/distributed_worker.py
runs them); the variants are tests/distributed_worker.py's VARIANTS.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distributed_worker as worker
import muonkit
from muonkit.distributed import load_checkpoint, save_checkpoint

STEPS = 3
# Gathering a snapshot of (_StridedShard, Shard) DTensors warns about sequential all_gathers.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
DIM, HIDDEN, KV, EXPERTS, VOCAB = 32, 64, 16, 4, 48


class Block(nn.Module):
    """Attention and MLP projections of a Llama block (no attention math: the tests use fixed
    gradients), a stack of experts (E, out, in), a 33-row projection (uneven pieces: 9, 9, 9, 6
    rows on 4 ranks) and a 2-row one (empty pieces on some ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(DIM)
        self.wq = nn.Linear(DIM, DIM, bias=False)
        self.wk = nn.Linear(DIM, KV, bias=False)
        self.wv = nn.Linear(DIM, KV, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)
        self.ffn_norm = nn.RMSNorm(DIM)
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)
        self.experts = nn.Parameter(torch.randn(EXPERTS, 16, DIM) / math.sqrt(DIM))
        self.odd = nn.Linear(DIM, 33, bias=False)
        self.narrow = nn.Linear(DIM, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.wo(self.wq(self.attention_norm(x)) + F.pad(self.wk(x) + self.wv(x), (0, DIM - KV)))
        z = self.ffn_norm(h)
        e = torch.einsum("bd,eod->beo", z, self.experts).mean(1)
        return h + self.w2(F.silu(self.w1(z)) * self.w3(z)) + F.pad(e, (0, DIM - 16)) + self.odd(z)[:, :DIM] + \
            F.pad(self.narrow(z), (0, DIM - 2))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:layers]:  # layers=1: the last layer's forward does not run
            h = layer(h)
        return self.output(self.norm(h))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def make_optimizer(model: nn.Module, process_group: Any = None, variant: str = "muon", **options: Any) -> muonkit.Muon:
    # fused=False as in distributed_worker.make_optimizer (DTensor AdamW groups never take the fused kernel).
    return muonkit.Muon(muonkit.param_groups(model), lr=0.05, weight_decay=0.1, adamw_lr=0.01, fused=False,
                        process_group=process_group, **{**worker.VARIANTS[variant], **options})


def mesh_2d(names: tuple[str, str]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


# ------------------------------------------------------------------------------- placements

TP_PLAN = {"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise", "w1": "colwise", "w3": "colwise",
           "w2": "rowwise", "odd": "colwise", "narrow": "colwise"}


def place_hsdp(model: Net) -> Any:
    """HSDP: fully_shard on a (replicate, shard) mesh: (Replicate(), Shard(0))."""
    from torch.distributed.fsdp import fully_shard

    mesh = mesh_2d(("replicate", "shard"))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def place_fsdp_tp(model: Net) -> Any:
    """torchtitan's recipe: tensor parallelism on "tp" (colwise: Shard(0); rowwise: Shard(1)), then
    fully_shard on "dp" ((_StridedShard(0), Shard(0)) and (Shard(0), Shard(1))). The experts are
    left out of tensor parallelism: fully_shard puts them on the dp sub-mesh (Shard(0) over dp,
    replicated over tp), whole matrices on every rank."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = mesh_2d(("dp", "tp"))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.layers:
        parallelize_module(layer, mesh["tp"], {name: styles[style]() for name, style in TP_PLAN.items()})
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh


def place_ep(model: Net) -> Any:
    """Expert parallelism: layer 0's experts (Replicate(), Shard(0)) on (dp, ep) (2 whole experts a
    rank), layer 1's (Shard(0), Shard(0)) (1 a rank); every other parameter a plain tensor (DDP)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = mesh_2d(("dp", "ep"))
    for layer, placements in zip(model.layers, ([Replicate(), Shard(0)], [Shard(0), Shard(0)])):
        layer.experts = nn.Parameter(distribute_tensor(layer.experts.detach(), mesh, placements, src_data_rank=None))
    return mesh


def place_fsdp(model: Net) -> Any:
    """FSDP2 on a 1D mesh of 4, the mesh passed as process_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def _flattened(shape: tuple[int, ...], names: tuple[str, ...], flatten: tuple[str, ...], name: str) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    mesh[flatten]._flatten(name)
    return mesh


def place_flat_fsdp(model: Net) -> Any:
    """FSDP2 on "dp", a (2, 2) ("dp_replicate", "dp_shard") mesh flattened (torchtitan without HSDP):
    Shard(0) over 4 ranks, on a sub-mesh whose one dim spans two root dims."""
    from torch.distributed.fsdp import fully_shard

    mesh = _flattened((2, 2), ("dp_replicate", "dp_shard"), ("dp_replicate", "dp_shard"), "dp")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh


def _place_hsdp_cp(model: Net, shape: tuple[int, int, int]) -> Any:
    """torchtitan's HSDP with context parallelism: fully_shard on ("dp_replicate", "dp_shard_cp"),
    "dp_shard_cp" the flattened ("dp_shard", "cp") of a 3-D mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = _flattened(shape, ("dp_replicate", "dp_shard", "cp"), ("dp_shard", "cp"), "dp_shard_cp")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp_replicate", "dp_shard_cp"])
    fully_shard(model, mesh=mesh["dp_replicate", "dp_shard_cp"])
    return mesh


def place_flat_fsdp_tp(model: Net) -> Any:
    """FSDP2 over tensor parallelism with a flattened data-parallel dim: a (1, 2, 2) ("dp_replicate",
    "dp_shard", "tp") mesh, "dp" = ("dp_replicate", "dp_shard") flattened; tensor parallel on "tp",
    fully_shard on "dp". `odd` and `narrow` are left out of tensor parallelism (as torchtitan leaves
    a router): they live on "dp" alone, a flattened sub-mesh of 2 of the 4 ranks."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _flattened((1, 2, 2), ("dp_replicate", "dp_shard", "tp"), ("dp_replicate", "dp_shard"), "dp")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.layers:
        parallelize_module(layer, mesh["tp"], {name: styles[style]() for name, style in TP_PLAN.items()
                                               if name not in ("odd", "narrow")})
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh


PLACE = {"hsdp": place_hsdp, "fsdp_tp": place_fsdp_tp, "ep": place_ep, "fsdp": place_fsdp, "flat_fsdp": place_flat_fsdp,
         "hsdp_cp": functools.partial(_place_hsdp_cp, shape=(1, 2, 2)),
         "hsdp_cp_2x2": functools.partial(_place_hsdp_cp, shape=(2, 1, 2)), "flat_fsdp_tp": place_flat_fsdp_tp}


# ------------------------------------------------------------------------------- gradients


def fixed_grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    out = {}
    for index, (name, p) in enumerate(model.named_parameters()):
        out[name] = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + index))
    return out


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """p.grad = the full gradient placed as p is (torch's own split, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = grads[name]
        if isinstance(p, DTensor):
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


def train_fixed(model: nn.Module, opt: muonkit.Muon, steps: range) -> list[int]:
    """Fixed-gradient steps; the bytes this rank sent in each."""
    sent = []
    for step in steps:
        set_grads(model, fixed_grads(model, step))
        before = opt.bytes_sent
        opt.step()
        sent.append(opt.bytes_sent - before)
    return sent


def reference(steps: int = STEPS, variant: str = "muon", **options: Any) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = make_optimizer(model, variant=variant, **options)
    train_fixed(model, opt, range(steps))
    return worker.snapshot(model, opt)


def minimum_bytes(model: nn.Module, opt: muonkit.Muon) -> int:
    """The exchange's minimum for this placement, from each rank's local sizes as torch placed them:
    per tensor of N elements with p_r on rank r, the owner (a rank with a largest piece) receives
    the N - p_o it lacks and returns every other rank its piece: N + sum p_r - 2 max p_r elements.
    Tensors holding whole matrices everywhere (the experts here) send nothing."""
    from torch.distributed.tensor import DTensor

    sizes = []
    for group in opt.param_groups:
        if not group["use_muon"]:
            continue
        for p in group["params"]:
            tensors = [p] + [v for k, v in opt.state[p].items() if k == "second_moment"]
            for t in tensors:
                local = t.to_local() if isinstance(t, DTensor) else t
                sizes.append((t.numel(), local.numel(), local.element_size(), p.ndim == 3 and isinstance(p, DTensor)))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sizes)
    total = 0
    for per_rank in zip(*every):
        numel, _, size, whole = per_rank[0]
        if whole:
            continue
        pieces = [local for _, local, _, _ in per_rank]
        total += size * (numel + sum(pieces) - 2 * max(pieces))
    return total


# ------------------------------------------------------------------------------------ jobs


def _run(kind: str, variant: str = "muon", bucket_bytes: int | None = None, **options: Any) -> dict[str, Any]:
    model = make_model()
    mesh = PLACE[kind](model)
    opt = make_optimizer(model, mesh, variant, **options)
    if bucket_bytes is not None:
        opt._distributed.bucket_bytes = bucket_bytes
    sent = train_fixed(model, opt, range(STEPS))
    return {"snapshot": worker.snapshot(model, opt), "sent": sent, "minimum": minimum_bytes(model, opt),
            "plans_built": opt._distributed.plans_built, "plan": next(iter(opt._distributed._plans.values())),
            "buckets": [len(plan.buckets) for plan in opt._distributed._plans.values()],
            "placements": {n: repr(tuple(p.placements)) for n, p in model.named_parameters() if hasattr(p, "placements")},
            "meshes": {n: p.device_mesh.mesh_dim_names for n, p in model.named_parameters() if hasattr(p, "placements")}}


def job(kind: str, rank: int, world: int, tmp: Path, variant: str = "muon") -> Any:
    return _run(kind, variant)


def buckets(rank: int, world: int, tmp: Path, kind: str = "fsdp_tp") -> Any:
    """4 KiB buckets (FSDP + TP; HSDP: each bucket's relays forward its results while the next
    bucket is orthogonalized): many exchanges in flight, overlapped with the owners' work."""
    return _run(kind, bucket_bytes=4096)


buckets_hsdp = functools.partial(buckets, kind="hsdp")


def bf16(rank: int, world: int, tmp: Path) -> Any:
    """exchange_dtype=torch.bfloat16 on FSDP + TP: each rank's local pieces (replicas must agree)."""
    from torch.distributed.tensor import DTensor

    out = _run("fsdp_tp", exchange_dtype=torch.bfloat16)
    model = make_model()
    mesh = place_hsdp(model)
    opt = make_optimizer(model, mesh, exchange_dtype=torch.bfloat16)
    out["hsdp_sent"] = train_fixed(model, opt, range(STEPS))
    out["hsdp_local"] = {n: p.to_local().clone() for n, p in model.named_parameters() if isinstance(p, DTensor)}
    out["hsdp_snapshot"] = worker.snapshot(model, opt)
    return out


def make_few() -> nn.Module:
    """Two matrices (64 x 32 and 32 x 64, equal Newton-Schulz cost) for 4 ranks: fewer matrices than
    ranks, where the tie order decides the owners."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64, bias=False), nn.Linear(64, 32, bias=False))


def reference_few(steps: int = STEPS) -> dict[str, torch.Tensor]:
    model = make_few()
    opt = muonkit.Muon(model.parameters(), lr=0.05, weight_decay=0.1)
    train_fixed(model, opt, range(steps))
    return worker.snapshot(model, opt)


def hsdp_few(rank: int, world: int, tmp: Path) -> Any:
    """make_few on HSDP 2 x 2: the two owners should sit in different replicas."""
    from torch.distributed.fsdp import fully_shard

    model = make_few()
    mesh = mesh_2d(("replicate", "shard"))
    fully_shard(model, mesh=mesh)
    opt = muonkit.Muon(model.parameters(), lr=0.05, weight_decay=0.1, process_group=mesh)
    sent = train_fixed(model, opt, range(STEPS))
    return {"snapshot": worker.snapshot(model, opt), "sent": sent, "minimum": minimum_bytes(model, opt),
            "plan": next(iter(opt._distributed._plans.values()))}


def checkpoint_save(kind: str, rank: int, world: int, tmp: Path) -> Any:
    model = make_model()
    mesh = PLACE[kind](model)
    opt = make_optimizer(model, mesh)
    train_fixed(model, opt, range(STEPS))
    save_checkpoint(tmp / f"mesh_{kind}", model, opt)
    return True


def resume(kind: str, source: str, rank: int, world: int, tmp: Path) -> Any:
    """Load checkpoint mesh_<source> (<placement>[__<variant>]) onto `kind`'s placement, STEPS more steps."""
    model = make_model()
    mesh = PLACE[kind](model)
    opt = make_optimizer(model, mesh, source.partition("__")[2] or "muon")
    load_checkpoint(tmp / f"mesh_{source}", model, opt)
    train_fixed(model, opt, range(STEPS, 2 * STEPS))
    return worker.snapshot(model, opt)


def safety(rank: int, world: int, tmp: Path) -> Any:
    """Every rank takes the same decision: a NaN in one rank's piece skips the step everywhere; a
    Muon parameter whose gradient is missing on one rank only raises on every rank, nothing changed;
    a parameter without a gradient on every rank is left out and the plan rebuilt."""
    model = make_model()
    mesh = place_fsdp_tp(model)
    opt = make_optimizer(model, mesh, nonfinite="skip")
    out: dict[str, Any] = {}
    train_fixed(model, opt, range(1))
    grads = fixed_grads(model, 1)
    grads["layers.0.wq.weight"][0, 0] = float("nan")  # on the ranks that hold row 0 only
    set_grads(model, grads)
    opt.step()
    out["skipped"] = opt.skipped_steps
    before = worker.snapshot(model, opt)
    set_grads(model, fixed_grads(model, 1))
    if rank == 1:
        model.layers[1].w2.weight.grad = None
    try:
        opt.step()
        out["missing"] = None
    except ValueError as err:
        out["missing"] = str(err)
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before.values(), worker.snapshot(model, opt).values()))
    built = opt._distributed.plans_built
    set_grads(model, fixed_grads(model, 1))
    model.layers[1].w2.weight.grad = None
    opt.step()
    out["rebuilt"] = opt._distributed.plans_built - built
    set_grads(model, fixed_grads(model, 2))
    opt.step()
    out["reused_old"] = opt._distributed.plans_built - built
    return out


def qkclip_fsdp_tp(rank: int, world: int, tmp: Path, flat: bool = False) -> Any:
    """QK-Clip on q and k projections placed colwise on "tp" and fully_shard on "dp" (uneven
    (_StridedShard(0), Shard(0)) pieces of 15 rows); each rank observes part of the maxima. `flat`:
    "dp" flattened from ("dp_replicate", "dp_shard") of a (1, 2, 2) mesh."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    if flat:
        mesh = _flattened((1, 2, 2), ("dp_replicate", "dp_shard", "tp"), ("dp_replicate", "dp_shard"), "dp")
    else:
        mesh = mesh_2d(("dp", "tp"))
    model = worker._qk_model()
    parallelize_module(model, mesh["tp"], {"q": ColwiseParallel(), "k": ColwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    clip = muonkit.QKClip([(model.q.weight, model.k.weight, model.q.bias, model.k.bias)], heads=worker.QK_HEADS,
                          tau=worker.QK_TAU, process_group=mesh)
    clip.observe(0, worker.QK_OBSERVED[rank % 2])
    (acted_on,) = clip.step()
    return {"maxima": acted_on.tolist(), "weights": {n: worker.full(p) for n, p in model.named_parameters()},
            "placements": [repr(tuple(p.placements)) for p in model.parameters()]}


qkclip_flat_fsdp_tp = functools.partial(qkclip_fsdp_tp, flat=True)


def fsdp_tp_muon8bit(rank: int, world: int, tmp: Path) -> Any:
    """momentum_bits=8 on FSDP + TP, rowwise (Shard(0), Shard(1)) pieces included: the snapshot after
    STEPS steps, the checkpoint mesh_fsdp_tp__muon8bit, and the 8-bit state's placements."""
    model = make_model()
    mesh = place_fsdp_tp(model)
    opt = make_optimizer(model, mesh, "muon8bit")
    train_fixed(model, opt, range(STEPS))
    save_checkpoint(tmp / "mesh_fsdp_tp__muon8bit", model, opt)
    state = opt.state[model.layers[0].wo.weight]
    return {"snapshot": worker.snapshot(model, opt),
            "placements": {key: repr(tuple(state[key].placements)) for key in ("momentum_codes", "momentum_scales")}}


def make_few_rows() -> nn.Module:
    """Two rowwise projections with fewer rows than the dp ranks hold pieces for: (1, 64) and
    (3, 4100) (three 2048-element blocks per row, split between the tp ranks)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1, bias=False), nn.Linear(4100, 3, bias=False))


def few_rows_8bit(model: nn.Module, process_group: Any = None) -> dict[str, torch.Tensor]:
    """STEPS fixed-gradient steps with momentum_bits=8; the snapshot."""
    opt = muonkit.Muon([{"params": list(model.parameters())}], lr=0.05, momentum_bits=8, process_group=process_group)
    train_fixed(model, opt, range(STEPS))
    return worker.snapshot(model, opt)


def fsdp_tp_muon8bit_few_rows(rank: int, world: int, tmp: Path) -> Any:
    """`few_rows_8bit` on FSDP over rowwise TP ((Shard(0), Shard(1))): dp rank 1 holds no row of the
    (1, 64) weight ((0, 32) pieces) and one of the (3, 4100) one; its ranks still agree scales."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    mesh = mesh_2d(("dp", "tp"))
    model = make_few_rows()
    parallelize_module(model, mesh["tp"], {"0": RowwiseParallel(), "1": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return {"snapshot": few_rows_8bit(model, mesh), "local": [tuple(p.to_local().shape) for p in model.parameters()]}


def switch_bits(model: nn.Module, opt: muonkit.Muon) -> dict[str, torch.Tensor]:
    """Step 0 with float32 momentum, step 1 after switching every Muon group to momentum_bits=8 (its
    buffers quantized), step 2 after switching back (dequantized); the snapshot."""
    for step, bits in enumerate((32, 8, 32)):
        for group in opt.param_groups:
            if group["use_muon"]:
                group["momentum_bits"] = bits
        train_fixed(model, opt, range(step, step + 1))
    return worker.snapshot(model, opt)


def fsdp_tp_switch_bits(rank: int, world: int, tmp: Path) -> Any:
    """`switch_bits` on FSDP + TP: the rowwise pieces' buffers quantized with agreed scales."""
    model = make_model()
    return switch_bits(model, make_optimizer(model, place_fsdp_tp(model)))


def row_slices(rank: int, world: int, tmp: Path) -> Any:
    """The bound update_many with `slices`: each rank holds dim-0 slices (3, 0, 5, 2 rows) of
    tensors that are no parameter (the selected rows of sharded ones); its results must be its
    rows of the single-process results."""
    from muonkit.distributed import DistributedOrthogonalizer
    from muonkit.functional import local_update_many
    from muonkit.layout import resolve

    sizes = (3, 0, 5, 2)
    start = sum(sizes[:rank])
    full = [torch.randn(10, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    parts = [f[start:start + sizes[rank]].clone() for f in full]
    layouts = [resolve(None, 2)] * 3
    exchange = DistributedOrthogonalizer(dist.group.WORLD)
    bound = exchange.bind(method="polar_express", steps=5, dtype=None, params=parts, variant="muon")
    got, _ = bound(parts, [None] * 3, layouts, [sizes] * 3)
    want, _ = local_update_many(method="polar_express", steps=5, dtype=None, variant="muon", beta2=0.95,
                                eps=1e-10)(full, [None] * 3, layouts)
    return {"equal": all(torch.equal(g, w[start:start + sizes[rank]]) for g, w in zip(got, want)),
            "sent": exchange.bytes_sent}


# ----------------------------------------------------------------- the relay left in flight

# SKIP_STEP's forward runs layer 0 only (layer 1 gets no gradient); NO_FORWARD_STEP runs no forward
# (fixed gradients set by hand): the updates still waiting are applied by its step().
DEFER_STEPS, SKIP_STEP, NO_FORWARD_STEP = 5, 2, 3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tokens and targets on every rank (HSDP's gradient sums of equal values by twos, then
    a division by 4, are exact: the gradients are one process's)."""
    generator = torch.Generator().manual_seed(500 + step)
    return torch.randint(VOCAB, (8,), generator=generator), torch.randint(VOCAB, (8,), generator=generator)


def forward_backward(model: nn.Module, step: int) -> torch.Tensor:
    if step == NO_FORWARD_STEP:
        set_grads(model, fixed_grads(model, step))
        return torch.zeros(())
    tokens, targets = batch(step)
    loss = F.cross_entropy(model(tokens, layers=1 if step == SKIP_STEP else None), targets)
    loss.backward()
    return loss.detach()


def reference_trained(variant: str = "muon") -> dict[str, Any]:
    """One process: the losses of DEFER_STEPS forward/backward steps and the snapshot after them."""
    model = make_model()
    opt = make_optimizer(model, variant=variant)
    losses = []
    for step in range(DEFER_STEPS):
        losses.append(forward_backward(model, step))
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "snapshot": worker.snapshot(model, opt)}


def _locals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _same(a: Any, b: Any) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(a, torch.Tensor):
        a, b = (t.to_local() if isinstance(t, DTensor) else t for t in (a, b))
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _place_hsdp_grouped(model: Net) -> Any:
    """HSDP with both layers sharded as one group (`fully_shard([layer 0, layer 1])`: layer 0's
    pre-forward all-gathers layer 1 too)."""
    from torch.distributed.fsdp import fully_shard

    mesh = mesh_2d(("replicate", "shard"))
    fully_shard(list(model.layers), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def deferred_hsdp(rank: int, world: int, tmp: Path, variant: str = "muon", prefetch: bool = False,
                  grouped: bool = False) -> Any:
    """HSDP 2 x 2 (fully_shard, gloo) trained by forward/backward: model A steps as usual, model B
    with muonkit.defer_relay, in lockstep on the same batches (SKIP_STEP's forward skips layer 1,
    NO_FORWARD_STEP has none). Per step: the losses, and after B's forward how many of its
    parameters still wait and whether they equal A's; after step 0
    which parameters wait for their relay on this rank and their values then; inside layer 0's
    forward (step 1) the values of the waiting ones; B's model state_dict right after step 1 and its
    optimizer state_dict right after the last step against A's; the snapshots after `finish()`. With
    `prefetch`, each FSDP module prefetches the next one's all-gather in its pre-forward; with
    `grouped`, the two layers are sharded as one FSDP group."""
    models, opts = [], []
    for _ in range(2):
        model = make_model()
        mesh = (_place_hsdp_grouped if grouped else place_hsdp)(model)
        if prefetch:
            model.set_modules_to_forward_prefetch([model.layers[0]])
            model.layers[0].set_modules_to_forward_prefetch([model.layers[1]])
        models.append(model)
        opts.append(make_optimizer(model, mesh, variant))
        opts[-1]._distributed.bucket_bytes = 4096  # several buckets: a module waits for its own
    (model_a, model_b), (opt_a, opt_b) = models, opts
    deferred = muonkit.defer_relay(opt_b, model_b)
    sharded = dict(model_b.named_parameters())  # the sharded parameters, which the optimizer updates
    out: dict[str, Any] = {"losses_a": [], "losses_b": [], "equal_after_forward": [], "probe": {}}

    def probe(*_: Any) -> None:  # a pre-hook of layers[0].wq: inside layer 0's forward, after FSDP's pre-forward
        if len(out["losses_b"]) == 1:
            out["probe"] = {n: sharded[n].to_local().clone() for n in out["waiting"]}

    model_b.layers[0].wq.register_forward_pre_hook(probe)
    after_a = []
    for step in range(DEFER_STEPS):
        out["losses_a"].append(forward_backward(model_a, step))
        opt_a.step()
        opt_a.zero_grad()
        after_a.append(_locals(model_a))
        before_b = _locals(model_b)
        waiting = deferred.pending
        out["losses_b"].append(forward_backward(model_b, step))
        if step == NO_FORWARD_STEP:
            out["pending_before_forwardless_step"] = (waiting, deferred.pending)
        elif step:  # the model's forward hook applied what its modules' did not (layer 1 on SKIP_STEP)
            out["equal_after_forward"].append((deferred.pending, all(
                torch.equal(sharded[n].to_local(), after_a[step - 1][n]) for n in sharded)))
        opt_b.step()
        opt_b.zero_grad()
        if step == 0:
            out["waiting"] = sorted(n for n, p in sharded.items() if id(p) in deferred._in_flight)
            out["before_step0"] = {n: before_b[n] for n in out["waiting"]}
            out["after_step0"] = {n: sharded[n].to_local().clone() for n in out["waiting"]}
            out["after_step0_a"] = {n: after_a[0][n] for n in out["waiting"]}
        if step == 1:
            out["model_state_dict_equal"] = (deferred.pending > 0, _same(model_b.state_dict(), model_a.state_dict()),
                                             deferred.pending == 0)
        if step == DEFER_STEPS - 1:
            out["optim_state_dict_equal"] = (deferred.pending > 0, _same(opt_b.state_dict(), opt_a.state_dict()),
                                             deferred.pending == 0)
    deferred.finish()
    out["sent"] = (opt_a.bytes_sent, opt_b.bytes_sent)
    out["snapshot_a"], out["snapshot_b"] = worker.snapshot(model_a, opt_a), worker.snapshot(model_b, opt_b)
    if variant == "muon" and not prefetch and not grouped:
        out.update(_deferred_checkpoints(model_b, opt_b, deferred, tmp / "mesh_deferred"))
    return out


def _deferred_checkpoints(model: nn.Module, opt: muonkit.Muon, deferred: Any, path: Path) -> dict[str, Any]:
    """save_checkpoint right after a step whose updates wait (it applies them first: "saved" is the
    state it should hold), then load_checkpoint right after the next one (it applies them first too,
    or they would land on the loaded parameters): (waiting before, waiting after) each."""
    out: dict[str, Any] = {}
    for step in (DEFER_STEPS, DEFER_STEPS + 1):
        forward_backward(model, step)
        opt.step()
        opt.zero_grad()
        waiting = deferred.pending
        if step == DEFER_STEPS:
            save_checkpoint(path, model, opt)
            out["save"] = (waiting, deferred.pending)
            out["saved"] = worker.snapshot(model, opt)
        else:
            load_checkpoint(path, model, opt)
            out["load"] = (waiting, deferred.pending)
    deferred.finish()
    out["loaded"] = worker.snapshot(model, opt)
    return out


def deferred_hsdp_usage(rank: int, world: int, tmp: Path) -> Any:
    """Models A (as usual) and B (defer_relay) in lockstep on HSDP 2 x 2 while the loop does what
    training loops do between step() and the next forward: an LR scheduler steps after every step
    (B's waiting updates keep their step's lr), every step accumulates two forwards, step 1 is
    preceded by an evaluation (model.eval(), torch.no_grad()), step 2 by a forward that raises after
    the root's pre-forward, and step 3's gradient holds a NaN (nonfinite="skip"). Per step: B's
    waiting count after step() and after the failed forward, whether the losses and the evaluation
    equal A's; at the end the snapshots and the skipped steps."""
    models, opts, schedulers = [], [], []
    for _ in range(2):
        model = make_model()
        opt = make_optimizer(model, place_hsdp(model), nonfinite="skip")
        opt._distributed.bucket_bytes = 4096
        models.append(model)
        opts.append(opt)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)))
    deferred = muonkit.defer_relay(opts[1], models[1])
    failing = [False]

    def fail(*_: Any) -> None:
        if failing[0]:
            raise KeyError("a forward that fails")

    for model in models:
        model.tok_embeddings.register_forward_pre_hook(fail)
    out: dict[str, Any] = {"waiting": [], "losses_equal": [], "eval_equal": None, "waiting_after_failure": None}
    for step in range(5):
        if step == 1:
            outputs = []
            for model in models:
                model.eval()
                with torch.no_grad():
                    outputs.append(model(batch(99)[0]))
                model.train()
            out["eval_equal"] = torch.equal(*outputs)
        if step == 2:
            failing[0] = True
            for model in models:
                try:
                    model(batch(98)[0])
                except KeyError:
                    pass
            failing[0] = False
            out["waiting_after_failure"] = deferred.pending
        for micro in range(2):
            tokens, targets = batch(10 * step + micro)
            losses = [F.cross_entropy(model(tokens), targets) for model in models]
            for loss in losses:
                loss.backward()
            out["losses_equal"].append(torch.equal(*(loss.detach() for loss in losses)))
        if step == 3:
            for model in models:
                model.layers[0].wq.weight.grad.to_local().fill_(float("nan"))
        for opt, scheduler in zip(opts, schedulers):
            opt.step()
            scheduler.step()
            opt.zero_grad()
        out["waiting"].append(deferred.pending)
    deferred.finish()
    out["skipped"] = [opt.skipped_steps for opt in opts]
    out["snapshot_a"], out["snapshot_b"] = (worker.snapshot(m, o) for m, o in zip(models, opts))
    return out


deferred_hsdp_prefetch = functools.partial(deferred_hsdp, prefetch=True)
deferred_hsdp_grouped = functools.partial(deferred_hsdp, grouped=True)
deferred_hsdp__normuon = functools.partial(deferred_hsdp, variant="normuon")


# ---------------------------------------------------- a layout that cuts a sharded dim 0 into blocks


def blocked_optimizer(model: nn.Module, process_group: Any = None, variant: str = "muon") -> muonkit.Muon:
    """make_optimizer with each `odd` weight (33 rows) read as 3 matrices of 11 rows
    (Layout.per_block(3), as routing reads a fused q/k/v Linear): HSDP's 17- and 16-row pieces cut
    through a block, and neither is a multiple of 3 rows."""
    groups = muonkit.param_groups(model)
    odd: list[tuple[str, nn.Parameter]] = []
    for group in groups:
        pairs = list(zip(group["param_names"], group["params"]))
        odd += [(n, p) for n, p in pairs if n.endswith("odd.weight")]
        kept = [(n, p) for n, p in pairs if not n.endswith("odd.weight")]
        group["param_names"], group["params"] = [n for n, _ in kept], [p for _, p in kept]
    groups.append({"params": [p for _, p in odd], "param_names": [n for n, _ in odd],
                   "layout": muonkit.Layout.per_block(3)})
    return muonkit.Muon([g for g in groups if g["params"]], lr=0.05, weight_decay=0.1, adamw_lr=0.01,
                        process_group=process_group, **worker.VARIANTS[variant])


def hsdp_blocks(rank: int, world: int, tmp: Path) -> Any:
    """NorMuon (a second moment per row) on HSDP 2 x 2 with blocked_optimizer's layout: the snapshot
    after the fixed steps."""
    model = make_model()
    opt = blocked_optimizer(model, place_hsdp(model), "normuon")
    train_fixed(model, opt, range(STEPS))
    return worker.snapshot(model, opt)


KINDS = set(PLACE)


def __getattr__(name: str) -> Any:
    """mesh_worker.<kind>[__<variant>], checkpoint_save_<kind>, resume_<kind>_from_<source>."""
    if name.startswith("checkpoint_save_"):
        return functools.partial(checkpoint_save, name.removeprefix("checkpoint_save_"))
    if name.startswith("resume_"):
        kind, _, source = name.removeprefix("resume_").partition("_from_")
        return functools.partial(resume, kind, source)
    kind, _, variant = name.partition("__")
    if kind in KINDS:
        return functools.partial(job, kind, variant=variant or "muon")
    raise AttributeError(name)

