"""8-bit momentum and Dion2 (issue 23): state bytes, step and Newton-Schulz time, bytes sent.

Run:
    python benchmarks/bench_momentum_dion2.py [--threads 2] [--repeats 5] [--write-results]

Prints three Markdown tables:
- state: bytes of the Muon groups' momentum state, momentum_bits=8 (int8 codes and float32
  scales) over float32 momentum, on GPT-2 small (12 blocks of width 768, every matrix on Muon but
  the embeddings) and on the charlm task's GPT (muonkit.param_groups);
- time: one optimizer step of 4 GPT-2-small blocks with muon, dion2, nordion2, muon 8-bit, and the
  orthogonalization alone (polar_express, 5 steps, float32) of every matrix whole vs of its
  selected quarter (Dion2's rows of the shorter side), timed round-robin in one process;
- bytes: Muon.bytes_sent per step on 2 and 4 gloo ranks (process_group=WORLD, one GPT-2-small
  block), muon vs dion2 vs nordion2, with replicated parameters and with FSDP2-sharded ones
  (fully_shard; Dion2 with selection "local" and "global").

- tasks: on the training tasks' models (charlm's GPT, hf-lm's qwen3-moe preset): one step of muon
  and dion2, the Newton-Schulz work whole vs Dion2's selected slices, momentum bytes at 32 and 8 bits.

- taskbytes (not in the default set): Muon.bytes_sent per step on 2 gloo ranks of the training
  tasks' models, muon vs dion2 vs nordion2, replicated and FSDP2.

`--tables tasks,bytes` (any comma-separated subset of state,time,tasks,bytes,taskbytes) runs only those.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from common import median_ratio, setup, table, time_interleaved, write_results

import muonkit

FRACTION = 0.25


def gpt2_small_matrices(blocks: int = 12) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(768, 2304), nn.Linear(768, 768), nn.Linear(768, 3072), nn.Linear(3072, 768)]
    return nn.Sequential(*layers)


def charlm_model() -> nn.Module:
    from muonkit.tasks.charlm import GPT

    return GPT(vocab=100, context=64)


def momentum_bytes(model: nn.Module, bits: int) -> tuple[int, int]:
    """(bytes of the Muon groups' momentum state, Muon parameters' float32 bytes)."""
    groups = muonkit.param_groups(model) if not isinstance(model, nn.Sequential) else [
        {"params": [p for p in model.parameters() if p.ndim == 2]}]
    opt = muonkit.Muon(groups, momentum_bits=bits)
    keys = {"momentum_buffer", "momentum_codes", "momentum_scales"}
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    state = sum(t.numel() * t.element_size() for p in muon for k, t in opt.state[p].items() if k in keys)
    return state, sum(4 * p.numel() for p in muon)


def state_table() -> str:
    rows = []
    for name, make in (("GPT-2 small (12 x 768)", gpt2_small_matrices), ("charlm GPT (4 x 128)", charlm_model)):
        model = make()
        full, params = momentum_bytes(model, 32)
        eight, _ = momentum_bytes(model, 8)
        rows.append([name, f"{params / 1e6:.2f} MB", f"{full / 1e6:.2f} MB", f"{eight / 1e6:.3f} MB", f"{eight / full:.4f}"])
    return table(["model (Muon matrices)", "params (fp32)", "momentum fp32", "momentum 8-bit", "8-bit / fp32"], rows)


def time_table(repeats: int) -> str:
    torch.manual_seed(0)
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    shapes = shapes * 4
    options = {"muon": {}, "dion2": dict(variant="dion2"), "nordion2": dict(variant="nordion2"),
               "muon 8-bit": dict(momentum_bits=8)}
    steps = {}
    for name, extra in options.items():
        params = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = muonkit.Muon(params, lr=0.02, **extra)
        steps[name] = opt.step
    matrices = [torch.randn(s) for s in shapes]
    selected = [m[: math.ceil(FRACTION * m.shape[0])] if m.shape[0] <= m.shape[1] else m[:, : math.ceil(FRACTION * m.shape[1])]
                for m in matrices]
    ns = {"NS whole matrices": lambda: [muonkit.orthogonalize(m, "polar_express") for m in matrices],
          "NS selected quarter": lambda: [muonkit.orthogonalize(m, "polar_express") for m in selected]}
    timings = time_interleaved({**steps, **ns}, repeats=repeats)
    rows = []
    for name, t in timings.items():
        base = "muon" if name in steps else "NS whole matrices"
        rows.append([name, f"{t.median * 1e3:.1f} ms", f"{median_ratio(t, timings[base]):.2f}x {base}"])
    return table(["4 GPT-2-small blocks (24 matrices)", "median", "ratio"], rows)


VARIANTS = {"muon": {}, "dion2": dict(variant="dion2"), "dion2 global": dict(variant="dion2", selection="global"),
            "nordion2": dict(variant="nordion2")}


def _grad(p: torch.Tensor) -> torch.Tensor:
    """A fixed full gradient, or this rank's Shard(0) rows of it for an FSDP2 parameter."""
    from torch.distributed.tensor import DTensor

    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    if not isinstance(p, DTensor):
        return g
    rows = muonkit.distributed.shard_sizes(p.shape[0], p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    local = g[sum(rows[:rank]) : sum(rows[: rank + 1])].contiguous()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=g.shape, stride=g.stride())


def qwen3_moe_model() -> nn.Module:
    """`muonkit bench hf-lm --hf-config qwen3-moe`'s model (its tiny preset, a 100-symbol vocabulary)."""
    import transformers

    from muonkit.tasks.hflm import PRESETS

    config = transformers.AutoConfig.for_model(**{**PRESETS["qwen3-moe"], "vocab_size": 100})
    return transformers.AutoModelForCausalLM.from_config(config)


def task_table(repeats: int) -> str:
    """On the training tasks' models (their Muon groups by muonkit.param_groups): one optimizer step
    of muon and dion2, the Newton-Schulz work alone (every Muon matrix whole vs Dion2's selected
    slices, polar_express, 5 steps), and the Muon groups' momentum bytes at 32 and 8 bits."""
    from muonkit.layout import resolve, to_matrices
    from muonkit.variants import VARIANTS

    makers = {"charlm GPT": charlm_model}
    try:
        import transformers  # noqa: F401

        makers["hf-lm qwen3-moe"] = qwen3_moe_model
    except ImportError:
        pass
    rows = []
    for label, make in makers.items():
        torch.manual_seed(0)
        steps, matrices = {}, []
        for name, extra in (("muon", {}), ("dion2", dict(variant="dion2"))):
            model = make()
            groups = muonkit.param_groups(model)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 0.01
            steps[name] = muonkit.Muon(groups, lr=0.01, **extra).step
        for g in groups:
            if g["use_muon"]:
                matrices += [to_matrices(p.detach(), resolve(g.get("layout"), p.ndim)).clone() for p in g["params"]]
        selected = [VARIANTS["dion2"].select(m, FRACTION).gather(m) for m in matrices]
        ns = {"NS whole": lambda: [muonkit.orthogonalize(m, "polar_express") for m in matrices],
              "NS selected": lambda: [muonkit.orthogonalize(m, "polar_express") for m in selected]}
        t = time_interleaved({**steps, **ns}, repeats=repeats)
        full, _ = momentum_bytes(make(), 32)
        eight, _ = momentum_bytes(make(), 8)
        rows.append([label, len(matrices), f"{t['muon'].median * 1e3:.1f} ms", f"{t['dion2'].median * 1e3:.1f} ms",
                     f"{median_ratio(t['dion2'], t['muon']):.2f}x", f"{t['NS whole'].median * 1e3:.1f} ms",
                     f"{t['NS selected'].median * 1e3:.1f} ms", f"{median_ratio(t['NS selected'], t['NS whole']):.2f}x",
                     f"{full / 1e6:.3f} MB", f"{eight / 1e6:.3f} MB", f"{eight / full:.3f}"])
    return table(["model", "Muon tensors", "muon step", "dion2 step", "dion2 / muon", "NS whole", "NS selected",
                  "selected / whole", "momentum fp32", "momentum 8-bit", "8-bit / fp32"], rows)


def _bytes_rank(rank: int, world: int, path: str, queue) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    out = {}
    for kind in ("replicated", "FSDP2"):
        for name, extra in VARIANTS.items():
            if kind == "replicated" and name == "dion2 global":
                continue  # whole matrices on every rank: the same rows as "local"
            torch.manual_seed(0)
            model = gpt2_small_matrices(1)
            if kind == "FSDP2":
                for layer in model:
                    fully_shard(layer)
                fully_shard(model)
            opt = muonkit.Muon([{"params": [p for p in model.parameters() if p.ndim == 2]}], lr=0.02,
                               process_group=dist.group.WORLD, **extra)
            per_step = []
            for _ in range(2):
                for p in model.parameters():
                    p.grad = _grad(p)
                before = opt.bytes_sent
                opt.step()
                per_step.append(opt.bytes_sent - before)
            out[kind, name] = per_step[-1]
    queue.put(out)
    dist.destroy_process_group()


def _task_bytes_rank(rank: int, world: int, path: str, queue) -> None:
    """Muon.bytes_sent of one step (the second) of the training tasks' models on `world` ranks:
    muon, dion2 and nordion2, replicated and FSDP2 (fully_shard of the whole model)."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    out = {}
    for label, make in _task_models().items():
        for kind in ("replicated", "FSDP2"):
            for name in ("muon", "dion2", "nordion2"):
                torch.manual_seed(0)
                model = make()
                if kind == "FSDP2":
                    fully_shard(model)
                opt = muonkit.Muon(muonkit.param_groups(model), lr=0.02, process_group=dist.group.WORLD, **VARIANTS[name])
                sent = 0
                for _ in range(2):
                    for p in model.parameters():
                        p.grad = _grad(p)
                    before = opt.bytes_sent
                    opt.step()
                    sent = opt.bytes_sent - before
                out[label, kind, name] = sent
    queue.put(out)
    dist.destroy_process_group()


def _task_models() -> dict:
    makers = {"charlm GPT": charlm_model}
    try:
        import transformers  # noqa: F401

        makers["hf-lm qwen3-moe"] = qwen3_moe_model
    except ImportError:
        pass
    return makers


def task_bytes_table(world: int = 2) -> str:
    """Bytes per step (all ranks) of the training tasks' Muon groups on `world` gloo ranks."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    path = os.path.join(tempfile.mkdtemp(), "rendezvous")
    procs = [context.Process(target=_task_bytes_rank, args=(r, world, path, queue)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    result = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    rows = [[label, world, kind, name, f"{sent / 1e6:.4f} MB", f"{sent / result[label, kind, 'muon']:.3f}"]
            for (label, kind, name), sent in result.items()]
    return table(["model", "ranks", "parameters", "variant", "bytes_sent per step (all ranks)", "/ muon"], rows)


def bytes_table() -> str:
    import torch.multiprocessing as mp

    rows = []
    for world in (2, 4):
        context = mp.get_context("spawn")
        queue = context.Queue()
        path = os.path.join(tempfile.mkdtemp(), "rendezvous")
        procs = [context.Process(target=_bytes_rank, args=(r, world, path, queue)) for r in range(world)]
        for p in procs:
            p.start()
        # All ranks together: under muonkit.plan each matrix's owner is the least-loaded rank, so
        # one rank's share depends on the owners; the total is what the exchange costs.
        per_rank = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        result = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
        for (kind, name), sent in result.items():
            muon = result[kind, "muon"]
            rows.append([world, kind, name, f"{sent / 1e6:.3f} MB", f"{sent / muon:.3f}"])
    return table(["ranks", "parameters", "variant", "bytes_sent per step (all ranks)", "/ muon"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tables", default="state,time,tasks,bytes",
                        help="comma-separated subset of state,time,tasks,bytes,taskbytes")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    chosen = args.tables.split(",")
    machine = setup(args.threads)
    parts = [f"Measured: {machine}; command: python benchmarks/bench_momentum_dion2.py --threads {args.threads} "
             f"--repeats {args.repeats}" + ("" if args.tables == "state,time,tasks,bytes" else f" --tables {args.tables}")]
    if "state" in chosen:
        parts.append("\nMomentum state of the Muon groups\n\n" + state_table())
    if "time" in chosen:
        parts.append("\nStep and Newton-Schulz time (Dion2 fraction 0.25)\n\n" + time_table(args.repeats))
    if "tasks" in chosen:
        parts.append("\nThe training tasks' models: step, Newton-Schulz work and momentum bytes (Dion2 fraction 0.25)\n\n"
                     + task_table(args.repeats))
    if "bytes" in chosen:
        parts.append("\nBytes sent per step under process_group (one GPT-2-small block: replicated, and FSDP2-sharded "
                     "with fully_shard)\n\n" + bytes_table())
    if "taskbytes" in chosen:
        parts.append("\nBytes sent per step under process_group on the training tasks' models (2 gloo ranks; "
                     "muonkit.param_groups; replicated, and FSDP2 with fully_shard of the whole model)\n\n"
                     + task_bytes_table())
    text = "\n".join(parts)
    print(text)
    if args.write_results:
        write_results("MOMENTUM-DION2-BENCH", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
