"""The GPU path, checked in one run: correctness, step speed, training, compile, CUDA graphs, rounding.

Run (on a machine with a GPU; under 8 minutes on one H100; needs only torch and muonkit):
    PYTHONPATH=src python benchmarks/gpu_check.py --device cuda --out gpu-check
and, the same code at small sizes on CPU (under a minute; tests/test_gpu_check.py runs it):
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick --out DIR

Writes DIR/gpu_check.json and prints one Markdown table per section:

1. orthogonalizers: every muonkit orthogonalizer in bfloat16 and float32, one matrix and a batch,
   tall and wide, on the device: relative Frobenius distance from the float64 SVD polar factor
   (computed on the CPU), beside the same method's float32 distance on the CPU. ok: finite, and
   within 1.25x the CPU float32 distance plus 0.02 (float32) or 0.06 (bfloat16: 8 mantissa bits).
2. step: the optimizer step at GPT-2-small (12 blocks of 768, embeddings on AdamW), one
   Llama-3.2-1B layer (2048 wide, 8192 MLP, 8 KV heads) and an MoE layer (64 experts of
   2048 -> 1408 -> 2048, stacked 3D parameters; torch.optim.Muon gets them as 2D matrices), for
   muonkit's default Muon, torch.optim.Muon (adjust_lr_fn "match_rms_adamw") and a textbook loop
   (Keller Jordan's quintic in bfloat16, one matrix at a time), each with torch.optim.AdamW on the
   other parameters. Steps and their Newton-Schulz part alone are timed round-robin (order
   reversed every other round, one warm-up round; CUDA events on CUDA, perf_counter on CPU);
   median ms, ratio to the textbook, the Newton-Schulz share of the step (median NS time over
   median step time), and the peak memory a step allocates above what was allocated before it
   (CUDA only).
3. graph: Muon(capturable=True)'s step captured in a CUDA graph (3 warm-up steps on a side
   stream, then torch.cuda.graph, then replays with the gradients copied into the captured .grad
   tensors) against the eager capturable step over 8 steps: bit_identical, and the largest
   difference as a fraction of how far the steps moved the parameter (ok below 3e-2 on CUDA,
   where the orthogonalizer runs in bfloat16 and cuBLAS may choose another algorithm on the
   capture stream; 1e-4 on CPU); the AdamW step counts are on the device and equal 8. On CPU
   there is no capture: the same harness replays the eager step (captured: false). A parameter
   without a gradient is refused (ValueError).
4. rounding: muonkit.functional.stochastic_round of float32 to bfloat16 on the device against its
   definition: every result is one of x's two bf16 neighbours (x itself when representable), the
   mean over 2^20 draws of each x is x within 5 standard deviations (max_z), a seed gives the same
   bits twice, and the default-generator path (capturable steps) is unbiased too.
5. training: charlm (4-layer GPT, width 128) for 200 steps, muon at lr 1e-2 and adamw at 1e-3,
   3 seeds each, on the device and on the CPU in the same run; ok: the device's mean final
   training loss (mean of the last 20 steps) within the CPU seeds' spread (4 standard errors of
   the difference, at least 0.05 nats). Quick: a 1-layer width-32 model, 8 steps, 2 seeds, and
   the CPU runs are the device runs.
6. compile: torch.compile(opt.step) (inductor; quick: the aot_eager backend, which skips the C++
   build) against the eager step over 5 steps, for the default and the capturable optimizer; ok:
   difference over update below the graph section's tolerance.

The sections run in this order and the JSON is rewritten after each, so a run cut short keeps
what finished. Options: --sections (a comma-separated subset of the names above), --repeats
(timed rounds of the step section, default 7; quick 3), --budget-s (start no section after this
many seconds; the rest are recorded as not run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import environment, keller_jordan_ns5, table

import muonkit
from muonkit import functional
from muonkit.orthogonalize import ORTHOGONALIZERS, orthogonalize

# In the order they run: the quick and central checks first, the slow compile last.
SECTIONS = ("orthogonalizers", "step", "graph", "rounding", "training", "compile")
LR, WD = 0.02, 0.1


# ------------------------------------------------------------------------------------- timing


class Clock:
    """Elapsed milliseconds of a function: CUDA events on CUDA (device time between two events
    recorded on the current stream, read after synchronizing), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_s = time.perf_counter()
        fn()
        return (time.perf_counter() - start_s) * 1e3


def interleaved(candidates: dict[str, Callable[[], object]], clock: Clock, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each candidate per round: one warm-up round, then `repeats` rounds, each
    candidate once per round, the order reversed every other round."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(clock(candidates[name]))
    return times


def peak_step_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call allocates at its peak above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    fn()  # the first step creates the optimizer state (torch's optimizers create it lazily)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------------- 1. orthogonalizers


def polar64(G: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U V^T of each matrix of G, float64 SVD on the CPU."""
    U, _, Vh = torch.linalg.svd(G.detach().cpu().double(), full_matrices=False)
    return U @ Vh


def polar_distance(O: torch.Tensor, exact: torch.Tensor) -> float:
    """max over matrices of ||O - U V^T||_F / ||U V^T||_F."""
    O = O.detach().cpu().double().reshape(exact.shape)
    return float((torch.linalg.matrix_norm(O - exact) / torch.linalg.matrix_norm(exact)).max())


def check_orthogonalizers(device: torch.device, quick: bool) -> dict[str, Any]:
    # Spectra from 1e-3 to 1 (log-spaced) with random singular vectors: the range a 5-step
    # schedule is designed for, so that the CPU float32 distance is small and a device error shows.
    rows, cols, batch = (96, 48, 3) if quick else (1536, 512, 8)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for shape_name, shape in (("single tall", (rows, cols)), ("single wide", (cols, rows)),
                              ("batched tall", (batch, rows, cols)), ("batched wide", (batch, cols, rows))):
        G = _with_spectrum(shape, generator)
        exact = polar64(G)
        for method in ORTHOGONALIZERS:
            cpu = polar_distance(orthogonalize(G, method, dtype=torch.float32), exact)
            for dtype in (torch.bfloat16, torch.float32):
                out = orthogonalize(G.to(device), method, dtype=dtype)
                distance = polar_distance(out, exact)
                bound = 1.25 * cpu + (0.06 if dtype == torch.bfloat16 else 0.02)
                rows_out.append(dict(shape=shape_name, size="x".join(map(str, shape)), method=method,
                                     dtype=str(dtype).removeprefix("torch."), device_distance=distance,
                                     cpu_fp32_distance=cpu, bound=bound,
                                     ok=math.isfinite(distance) and distance <= bound and out.shape == G.shape
                                     and out.device.type == device.type))
    return dict(rows=rows_out, ok=all(r["ok"] for r in rows_out))


def _with_spectrum(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    *batch, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=generator, dtype=torch.float64))
    S = torch.logspace(-3, 0, k, dtype=torch.float64)
    return ((U * S) @ V.mT).float()


# ------------------------------------------------------------------------------------- 2. step


def step_cases(quick: bool) -> dict[str, tuple[list[tuple[int, ...]], list[tuple[int, ...]]]]:
    """Name -> (Muon parameter shapes, AdamW parameter shapes)."""
    d = 32 if quick else 1  # quick: every width divided by 32
    w, vocab = 768 // d, 50257 // d
    gpt_muon, gpt_adamw = [], [(vocab, w), (1024 // d, w)]  # token and position embeddings
    for _ in range(2 if quick else 12):
        gpt_muon += [(3 * w, w), (w, w), (4 * w, w), (w, 4 * w)]
        gpt_adamw += [(w,)] * 4 + [(3 * w,), (w,), (4 * w,), (w,)]
    h, mlp, kv = 2048 // d, 8192 // d, 512 // d
    llama_muon = [(h, h), (kv, h), (kv, h), (h, h), (mlp, h), (mlp, h), (h, mlp)]
    experts, e_h, e_mlp = (4 if quick else 64), 2048 // d, 1408 // d
    moe_muon = [(experts, e_mlp, e_h), (experts, e_mlp, e_h), (experts, e_h, e_mlp), (experts, e_h)]
    return {
        "GPT-2 small (12 blocks of 768)" if not quick else "GPT-2 small / 32": (gpt_muon, gpt_adamw),
        "Llama-3.2-1B layer" if not quick else "Llama-1B layer / 32": (llama_muon, [(h,), (h,)]),
        "MoE layer (64 experts, 2048->1408)" if not quick else "MoE layer / 32": (moe_muon[:3], [(h,)]),
    }


def textbook_ns(G: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5 in bfloat16: the loop a user writes by hand."""
    return keller_jordan_ns5(G, torch.bfloat16)


def _matrices(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-2:])


def build_methods(muon: list[nn.Parameter], adamw: list[nn.Parameter]) -> dict[str, tuple[Callable, Callable]]:
    """Method -> (whole step, its Newton-Schulz part alone on the current gradients)."""
    methods: dict[str, tuple[Callable, Callable]] = {}

    opt = muonkit.Muon([{"params": muon}, {"params": adamw, "use_muon": False}], lr=LR, weight_decay=WD)
    ours = dict(opt.param_groups[0])
    methods["muonkit Muon (default)"] = (opt.step, lambda: functional.batched_orthogonalize(
        [_matrices(p.grad) for p in muon], method=ours["orthogonalizer"], steps=ours["ns_steps"],
        dtype=ours["ns_dtype"]))

    if hasattr(torch.optim, "Muon"):  # torch >= 2.9
        methods["torch.optim.Muon"] = _torch_muon(muon, adamw)

    buffers = [torch.zeros_like(p) for p in muon]
    textbook_adamw = torch.optim.AdamW(adamw, lr=LR, weight_decay=WD)

    @torch.no_grad()
    def textbook_step():
        for p, buf in zip(muon, buffers):
            buf.lerp_(p.grad, 1 - 0.95)
            update = _matrices(p.grad.lerp(buf, 0.95))
            O = torch.stack([textbook_ns(m) for m in update]).to(p.dtype)
            p.mul_(1 - LR * WD)
            p.add_(O.view_as(p), alpha=-LR * 0.2 * max(update.shape[-2:]) ** 0.5)
        textbook_adamw.step()

    methods["textbook bf16 loop"] = (textbook_step, lambda: [textbook_ns(m) for p in muon for m in _matrices(p.grad)])
    return methods


def _torch_muon(muon: list[nn.Parameter], adamw: list[nn.Parameter]) -> tuple[Callable, Callable]:
    """torch.optim.Muon with torch.optim.AdamW on the rest, and its Newton-Schulz function alone."""
    # torch.optim.Muon takes 2D parameters: a stacked 3D parameter is handed over as its matrices,
    # leaf views of its storage whose gradients are views of its gradient.
    matrices = []
    for p in muon:
        if p.ndim == 2:
            matrices.append(p)
            continue
        for i, m in enumerate(_matrices(p.detach())):
            view = nn.Parameter(m)
            view.grad = p.grad[i]
            matrices.append(view)
    torch_muon = torch.optim.Muon(matrices, lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW(adamw, lr=LR, weight_decay=WD)

    def torch_step():
        torch_muon.step()
        torch_adamw.step()

    from torch.optim._muon import _zeropower_via_newtonschulz

    theirs = dict(torch_muon.param_groups[0])
    return torch_step, lambda: [
        _zeropower_via_newtonschulz(m.grad, theirs["ns_coefficients"], theirs["ns_steps"], theirs["eps"]) for m in matrices]


def check_step(device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    clock = Clock(device)
    results = []
    for case, (muon_shapes, adamw_shapes) in step_cases(quick).items():
        torch.manual_seed(0)
        muon = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in muon_shapes]
        adamw = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in adamw_shapes]
        for p in muon + adamw:
            p.grad = torch.randn_like(p)
        methods = build_methods(muon, adamw)
        memory = {name: peak_step_mb(step, device) for name, (step, _) in methods.items()}
        candidates = {}
        for name, (step, ns) in methods.items():
            candidates[name] = step
            candidates[name + " NS"] = ns
        times = interleaved(candidates, clock, repeats)
        textbook = times["textbook bf16 loop"]
        for name in methods:
            step_ms, ns_ms = statistics.median(times[name]), statistics.median(times[name + " NS"])
            results.append(dict(case=case, method=name, step_ms=step_ms,
                                x_textbook=statistics.median(a / b for a, b in zip(times[name], textbook)),
                                ns_ms=ns_ms, ns_share=ns_ms / step_ms, peak_step_mb=memory[name],
                                finite=all(bool(p.isfinite().all()) for p in muon + adamw)))
        del muon, adamw, methods, candidates
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=results, ok=all(r["finite"] for r in results), timer="cuda events" if clock.cuda else "perf_counter")


# --------------------------------------------------------------------------------- 3. training


def check_training(device: torch.device, quick: bool) -> dict[str, Any]:
    from muonkit.tasks.base import DataOptions
    from muonkit.tasks.charlm import CharLM
    from muonkit.tasks.training import train_run

    task = CharLM()
    if quick:  # a 1-layer width-32 model on batches of 4: the same loop, ~50x less arithmetic
        task.width, task.depth, task.batch_size = 32, 1, 4
    steps, seeds = (8, 2) if quick else (200, 3)
    tail = max(1, min(20, steps // 4))
    # On the CPU the device runs are the CPU runs (the comparison then checks only itself).
    places = {"device": device, "cpu": torch.device("cpu")} if device.type != "cpu" else {"device": device}
    final: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    for label, place in places.items():
        data = task.load(DataOptions(), place)
        start = time.perf_counter()
        for optimizer, lr in (("muon", 1e-2), ("adamw", 1e-3)):
            for seed in range(seeds):
                run = train_run(task, data, optimizer, lr, seed, steps, place, adamw_lr=1e-3, progress=False,
                                stop_at_target=False, eval_every=steps)
                final.setdefault(label, {}).setdefault(optimizer, []).append(statistics.fmean(run.loss[-tail:]))
        seconds[label] = time.perf_counter() - start
    final.setdefault("cpu", final["device"])
    device_label = "device"
    rows, ok = [], True
    for optimizer in ("muon", "adamw"):
        ours, cpu = final[device_label][optimizer], final["cpu"][optimizer]
        spread = math.sqrt(statistics.variance(cpu) / len(cpu) + statistics.variance(ours) / len(ours))
        allowed = max(4 * spread, 0.05)
        difference = statistics.fmean(ours) - statistics.fmean(cpu)
        rows.append(dict(optimizer=optimizer, steps=steps, seeds=seeds, device_mean=statistics.fmean(ours),
                         cpu_mean=statistics.fmean(cpu), difference=difference, allowed=allowed,
                         device_losses=ours, cpu_losses=cpu, ok=abs(difference) <= allowed))
        ok &= abs(difference) <= allowed
    muon_better = statistics.fmean(final[device_label]["muon"]) < statistics.fmean(final[device_label]["adamw"])
    return dict(rows=rows, seconds=seconds, muon_below_adamw=muon_better, ok=ok and all(
        math.isfinite(x) for losses in final[device_label].values() for x in losses))


# ---------------------------------------------------------------------------------- 4. compile


def _net(device: torch.device, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    w = 64 if quick else 512
    return nn.Sequential(nn.Linear(32, w), nn.ReLU(), nn.Linear(w, 2 * w), nn.ReLU(), nn.Linear(2 * w, w),
                         nn.LayerNorm(w), nn.Linear(w, 10)).to(device)


def _grads(net: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.device) for p in net.parameters()]


@torch.no_grad()
def _relative_to_update(a: nn.Module, b: nn.Module, start: nn.Module) -> float:
    """max over parameters of max |a - b| / max |b - start|: a difference as a fraction of how far
    the steps moved the parameter (the parameter itself would hide an error in the update)."""
    return max(float((p - q).abs().max() / (q - p0).abs().max().clamp_min(1e-30))
               for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()))


def _tolerance(device: torch.device) -> float:
    """Allowed `_relative_to_update` between two orders of the same arithmetic: the orthogonalizer
    runs in bfloat16 on CUDA (8 bits: a fused kernel may round differently), float32 on the CPU."""
    return 3e-2 if device.type == "cuda" else 1e-4


def check_compile(device: torch.device, quick: bool) -> dict[str, Any]:
    rows = []
    for capturable in (False, True):
        torch._dynamo.reset()
        start_net, eager_net, compiled_net = _net(device, quick), _net(device, quick), _net(device, quick)
        eager = muonkit.Muon(muonkit.param_groups(eager_net), lr=LR, capturable=capturable)
        compiled = muonkit.Muon(muonkit.param_groups(compiled_net), lr=LR, capturable=capturable)
        # Quick (CPU) runs trace with dynamo and AOT autograd but skip inductor's C++ build (a minute on
        # a small CPU); the device run compiles with inductor, torch.compile's default.
        step = torch.compile(compiled.step, backend="aot_eager" if quick else "inductor")
        start = time.perf_counter()
        for i in range(5):
            for net in (eager_net, compiled_net):
                for p, g in zip(net.parameters(), _grads(net, i)):
                    p.grad = g
            eager.step()
            step()
        difference = _relative_to_update(compiled_net, eager_net, start_net)
        rows.append(dict(capturable=capturable, backend="aot_eager" if quick else "inductor", steps=5,
                         difference_over_update=difference, tolerance=_tolerance(device),
                         seconds=time.perf_counter() - start, ok=difference < _tolerance(device)))
    return dict(rows=rows, ok=all(r["ok"] for r in rows))


# -------------------------------------------------------------------------------- 5. cuda graph


def replayable(step: Callable[[], object], device: torch.device, warmup: Callable[[int], None]) -> tuple[Callable[[], None], bool]:
    """`step` as a function that replays it: on CUDA, captured in a CUDA graph after 3 warm-up
    steps on a side stream (torch.cuda.graphs: "warm up on a side stream before capture"); on the
    CPU, the eager step itself. `warmup(i)` sets the gradients of warm-up step i before it."""
    if device.type != "cuda":
        for i in range(3):
            warmup(i)
            step()
        return step, False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            warmup(i)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run: parameters and state change only on replay
    return graph.replay, True


def check_graph(device: torch.device, quick: bool) -> dict[str, Any]:
    start_net, eager_net, graph_net = _net(device, quick), _net(device, quick), _net(device, quick)
    eager = muonkit.Muon(muonkit.param_groups(eager_net), lr=LR, capturable=True)
    graphed = muonkit.Muon(muonkit.param_groups(graph_net), lr=LR, capturable=True)
    # The captured step reads these tensors: later gradients are copied into them, never replaced.
    static = [torch.zeros_like(p) for p in graph_net.parameters()]
    for p, g in zip(graph_net.parameters(), static):
        p.grad = g

    def load(i: int) -> None:
        for g, new in zip(static, _grads(graph_net, i)):
            g.copy_(new)

    replay, captured = replayable(graphed.step, device, load)
    for i in range(3):
        for p, g in zip(eager_net.parameters(), _grads(eager_net, i)):
            p.grad = g
        eager.step()
    steps = 8
    for i in range(3, steps):
        load(i)
        replay()
        for p, g in zip(eager_net.parameters(), _grads(eager_net, i)):
            p.grad = g
        eager.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    same = all(torch.equal(p, q) for p, q in zip(graph_net.parameters(), eager_net.parameters()))
    difference = _relative_to_update(graph_net, eager_net, start_net)
    counts = [float(s["step"]) for s in graphed.state.values() if "step" in s]
    next(iter(eager_net.parameters())).grad = None
    try:
        eager.step()
        refused = False
    except ValueError as err:
        refused = "has no gradient" in str(err)
    # Bit for bit is expected (the same kernels); cuBLAS may pick another algorithm on the capture
    # stream, so the check allows the compile section's tolerance and reports which it was.
    return dict(captured=captured, steps=steps, bit_identical=same, difference_over_update=difference,
                adamw_step_counts=sorted(set(counts)), step_counts_on_device=all(
                    s["step"].device.type == device.type for s in graphed.state.values() if "step" in s),
                no_gradient_refused=refused,
                ok=difference < _tolerance(device) and refused and set(counts) == {float(steps)})


# ------------------------------------------------------------------------ 6. stochastic rounding


def check_rounding(device: torch.device, quick: bool) -> dict[str, Any]:
    draws = 1 << (14 if quick else 20)
    # Values at fractions 1/8 .. 7/8 of the gap between two bf16 neighbours, of both signs and
    # several binades, plus exactly representable ones (which must not move).
    base = torch.tensor([1.0, -3.0, 0.0078125, 1e-30, 6e4], dtype=torch.float32)
    gap = torch.nextafter(base.bfloat16(), torch.full_like(base.bfloat16(), math.inf)).float() - base.bfloat16().float()
    fractions = torch.arange(0, 8, dtype=torch.float32) / 8
    x_cpu = (base.bfloat16().float()[:, None] + gap[:, None] * fractions).flatten()
    # x's bf16 neighbours (computed on the CPU): the largest at or below it, the smallest at or above.
    nearest = x_cpu.bfloat16()
    below = torch.nextafter(nearest, torch.full_like(nearest, -math.inf)).float()
    above = torch.nextafter(nearest, torch.full_like(nearest, math.inf)).float()
    down = torch.where(nearest.float() <= x_cpu, nearest.float(), below).to(device)
    up = torch.where(nearest.float() >= x_cpu, nearest.float(), above).to(device)
    x = x_cpu.to(device)
    rows = []
    for path, seed in (("seeded generator", 12345), ("default generator (capturable)", functional.DEFAULT_GENERATOR)):
        torch.manual_seed(0)
        samples = x.expand(draws, -1).contiguous()
        rounded = functional.stochastic_round(samples, torch.bfloat16, seed).float()
        neighbours = bool(((rounded == down) | (rounded == up)).all())
        mean = rounded.double().mean(0)
        p = ((x - down) / torch.where(up > down, up - down, torch.ones_like(x))).double()
        sd = ((up - down).double() * torch.sqrt(p * (1 - p) / draws)).clamp_min(1e-300)
        z = float(((mean - x.double()).abs() / sd).masked_fill(up == down, 0).max())
        repeat = functional.stochastic_round(samples, torch.bfloat16, seed)
        deterministic = torch.equal(repeat.float(), rounded) if seed != functional.DEFAULT_GENERATOR else None
        rows.append(dict(path=path, values=int(x.numel()), draws=draws, only_neighbours=neighbours, max_z=z,
                         same_bits_with_same_seed=deterministic,
                         ok=neighbours and z < 5 and deterministic is not False))
    return dict(rows=rows, ok=all(r["ok"] for r in rows))


# --------------------------------------------------------------------------------------- main


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "orthogonalizers": check_orthogonalizers,
    "step": check_step,
    "graph": check_graph,
    "rounding": check_rounding,
    "training": check_training,
    "compile": check_compile,
}


def summary_table(name: str, result: dict[str, Any]) -> str:
    if "rows" in result:
        rows = result["rows"]
        headers = [k for k in rows[0] if not k.endswith("_losses")]
        return table(headers, [[r[k] for k in headers] for r in rows])
    headers = [k for k in result if k not in ("seconds_section",)]
    return table(headers, [[result[k] for k in headers]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite's CPU run)")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of the step section (default 7; quick 3)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no section after this many seconds (it is recorded as not run); default: no limit")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False (use --device cpu)")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    repeats = args.repeats or (3 if args.quick else 7)
    if device.type == "cpu":
        torch.set_num_threads(min(os.cpu_count() or 1, 16))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        environment=environment(device.type), torch=torch.__version__, quick=args.quick,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        argv=sys.argv[1:] if argv is None else argv, sections={},
    )
    started = time.perf_counter()
    for name in sections:
        start = time.perf_counter()
        if args.budget_s is not None and start - started > args.budget_s:
            report["sections"][name] = dict(ok=False, error=f"not run: --budget-s {args.budget_s:g} s spent", seconds_section=0.0)
            print(f"\n## {name}: not run (--budget-s {args.budget_s:g} s spent)", flush=True)
            continue
        try:
            result = CHECKS[name](device, args.quick, repeats) if name == "step" else CHECKS[name](device, args.quick)
        except Exception as err:  # recorded, so that one failing section does not hide the others
            result = dict(ok=False, error=f"{type(err).__name__}: {err}")
        result["seconds_section"] = time.perf_counter() - start
        report["sections"][name] = result
        print(f"\n## {name} ({result['seconds_section']:.1f} s): {'ok' if result['ok'] else 'FAILED'}")
        print(result["error"] if "error" in result else summary_table(name, result), flush=True)
        with open(args.out / "gpu_check.json", "w") as f:  # after every section: a timeout keeps what ran
            json.dump(report, f, indent=1)
    report["seconds"] = time.perf_counter() - started
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    with open(args.out / "gpu_check.json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'all ok' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s; wrote {args.out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
