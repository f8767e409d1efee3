"""The whole optimizer step against a textbook Newton-Schulz loop, torch.optim.Muon and AdamW.

Run:
    python benchmarks/bench_step.py [--cases a,c,g] [--repeats 7] [--threads 2] [--device cpu|cuda]
        [--torch-muon-repeats 1] [--full-torch-muon] [--base COMMIT] [--isa avx2] [--steps-per-round 1]
        [--clock wall|cpu] [--unfused-adamw-row] [--write-results]

Cases: (a) 4 GPT-2-small blocks (768 wide: q, k, v, o 768x768, fc 3072x768, proj 768x3072 per
block, plus their biases and LayerNorms on AdamW); (b) 12 such layers 512 wide; (c) the seed
notebook's CIFAR-10 network (tests/seed_net.py, routed by muonkit.param_groups); (d) 64 experts
of 256x1024 as one stacked parameter; (e) 200 matrices of 64x64; (f) the charlm task's GPT: the
optimizer's share of a training step (forward + backward + step), muonkit Muon against AdamW;
(g) the same GPT's optimizer step (muonkit.tasks.charlm: width 128, depth 4, routed by
muonkit.param_groups).

The yardstick (issue 12) is the textbook step, what a user writes by hand: Keller Jordan's quintic
(3.4445, -4.7750, 2.0315), float32, 5 steps, Frobenius normalization, one matrix at a time, with
momentum, Nesterov lookahead, decoupled weight decay and the update written one parameter at a
time (`textbook_step`), and torch.optim.AdamW on the other parameters, as muonkit's step has.

Prints (and with --write-results writes into benchmarks/RESULTS.md) one Markdown table per case.
All methods of a case are timed round-robin in this process, the order reversed every other round,
one warm-up round first; "x textbook" is the median over rounds of the method's time over the
textbook's time in the same round. "polar err" is the polar-factor error of a method's update
(one step with momentum 0 and no weight decay, so the update is the orthogonalized gradient,
rescaled by its least-squares factor so that a method's lr scale does not count), max over the
matrices, against a float64 SVD; the gradients are random normal for (a), (b), (d), (e) and a real
backward pass on random inputs for (c) and (g).

torch.optim.Muon orthogonalizes in bfloat16, which is 50-100x slower than float32 on CPUs without
AVX-512 BF16 and 2-3x faster on CPUs with it; the script measures which at start. Where bf16 is
more than 4x slower than fp32 its steps would take minutes in cases a, b, d: there it is timed on
one matrix of each distinct shape and the times multiplied by the counts (its step is a loop over
matrices, so this is exact up to noise), with --torch-muon-repeats rounds, and its ratio is a ratio
of medians (marked *); --full-torch-muon times it whole anyway. The row "muonkit Muon,
ns_dtype='auto'" appears where "auto" differs from the default (a CPU with native bf16 products).
torch.optim.Muon takes 2D matrices only: in (c) the seed notebook's own Muon (the same bf16
algorithm) stands in, and in (d) it gets the 64 experts as separate matrices.

--steps-per-round N times N steps of each method per round (for the small cases, whose one step of
a few ms is at the clock's and the machine's mercy) and reports the time per step. --clock cpu
times by this process's CPU time (time.process_time) instead of the wall clock: with 1 thread on a
machine shared with other jobs it leaves out the waits for a core (with more threads it sums them).

The default step's AdamW group runs on torch's fused AdamW kernel on CPU (fused=None, since
issue-22f; the bits of torch.optim.AdamW(fused=True)). --unfused-adamw-row adds "muonkit Muon,
fused=False": the default step with its AdamW group on torch's default (foreach) AdamW, the default
before issue-22f (it differs from the fused kernel by round-off). Issue-22c's and issue-fa's runs had
the opposite row, `--fused-adamw-row` ("fused=True"), when the default was torch's foreach AdamW.

--base COMMIT adds the row "muonkit Muon (defaults) at COMMIT": muonkit's src/muonkit at that git
commit (imported as muonkit_base), timed in the same rounds, for a change's before/after.

--isa avx2 runs the benchmark as on an AVX2-only CPU: the script re-executes itself with
ATEN_CPU_CAPABILITY=avx2 (torch's own kernels), MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL's float32 products)
and ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN, which torch's fast bfloat16 products need) set, and checks that
torch took the first and refuses oneDNN bfloat16. muonkit's default Newton-Schulz dtype reads the CPU
flags in /proc/cpuinfo, which the variables do not change, so the emulated run sets
muonkit.orthogonalize.CPU_FAST_BFLOAT16 to False (also at --base): the float32 default a real
AVX2-only CPU gets.

With --device cuda every parameter, gradient and state lives on the GPU and every timing is
bracketed by torch.cuda.synchronize(); muonkit's default is then bfloat16, like torch.optim.Muon.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common import (
    Timing,
    bf16_slowdown,
    device_sync,
    environment,
    keller_jordan_ns5,
    median_ratio,
    polar_factor,
    setup,
    table,
    time_interleaved,
    write_results,
)

import muonkit
from muonkit import functional
from muonkit.layout import from_matrices, resolve, to_matrices
from muonkit.orthogonalize import orthogonalize, working_dtype

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

LR, WD = 0.02, 0.1
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
TEXTBOOK = "textbook: fp32 quintic, one matrix at a time"
DEFAULT = "muonkit Muon (defaults)"
UNFUSED = "muonkit Muon, fused=False"


@dataclass
class Case:
    name: str
    muon: list[nn.Parameter]
    adamw: list[nn.Parameter]
    torch_muon_full: bool  # time torch.optim.Muon on every matrix (else one per shape, x count)
    backward: Callable[[], None] | None = None  # sets real gradients; None means random ones


def _params(shapes: list[tuple[int, ...]], device: str, scale: float = 0.02) -> list[nn.Parameter]:
    return [nn.Parameter((torch.randn(s) * scale).to(device)) for s in shapes]


def _gpt_blocks(width: int, blocks: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    matrices, vectors = [], []
    for _ in range(blocks):
        matrices += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        vectors += [(width,)] * 4 + [(3 * width,), (width,), (4 * width,), (width,)]  # LN x2, biases
    return matrices, vectors


def _model_case(name: str, model: nn.Module, loss: Callable[[], torch.Tensor], torch_muon_full: bool) -> Case:
    groups = muonkit.param_groups(model)
    muon = [p for g in groups if g["use_muon"] for p in g["params"]]
    adamw = [p for g in groups if not g["use_muon"] for p in g["params"]]

    def backward():
        model.zero_grad(set_to_none=False)
        loss().backward()

    return Case(name, muon, adamw, torch_muon_full, backward)


def make_case(key: str, device: str) -> Case:
    torch.manual_seed(0)
    if key in "ab":
        width, blocks = (768, 4) if key == "a" else (512, 12)
        matrices, vectors = _gpt_blocks(width, blocks)
        name = f"({key}) {blocks} GPT-2-style blocks, {width} wide"
        return Case(name, _params(matrices, device), _params(vectors, device), torch_muon_full=False)
    if key == "c":
        from seed_net import Net, ResidualBlock, reset_parameters

        model = Net(10)
        reset_parameters(model)
        for block in model.modules():
            if isinstance(block, ResidualBlock):
                block.γ.data.fill_(1.0)  # 0 at init, which would give every Muon matrix a zero gradient
        model.to(device)
        images, labels = torch.randn(16, 3, 32, 32, device=device), torch.randint(0, 10, (16,), device=device)
        return _model_case("(c) seed notebook CIFAR-10 net", model,
                           lambda: nn.functional.cross_entropy(model(images), labels), torch_muon_full=True)
    if key == "d":
        return Case("(d) 64 experts of 256x1024, one stacked parameter", _params([(64, 256, 1024)], device), [],
                    torch_muon_full=False)
    if key == "e":
        return Case("(e) 200 matrices of 64x64", _params([(64, 64)] * 200, device), [], torch_muon_full=True)
    if key == "g":
        from muonkit.tasks.charlm import GPT, CharLM

        task = CharLM()
        model = GPT(96, task.context, width=task.width, depth=task.depth).to(device)
        ids = torch.randint(0, 96, (task.batch_size, task.context + 1), device=device)

        def loss():
            logits = model(ids[:, :-1])
            return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

        return _model_case(f"(g) charlm GPT (width {task.width}, depth {task.depth}): optimizer step", model, loss,
                           torch_muon_full=True)
    raise KeyError(key)


def set_grads(case: Case, params: list[nn.Parameter], seed: int = 1) -> None:
    """Real gradients from a backward pass for model cases, random normal ones otherwise."""
    if case.backward is not None and params is not None and set(map(id, params)) <= set(map(id, case.muon + case.adamw)):
        torch.manual_seed(seed)
        case.backward()
        return
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


# ------------------------------------------------------------------------------------- methods


def newton_schulz5(G: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5, in float32: the textbook orthogonalizer."""
    return keller_jordan_ns5(G, torch.float32)


def textbook_step(case: Case, momentum: float = 0.95, weight_decay: float = WD) -> Callable[[], None]:
    """Muon written the plain way, one parameter and one matrix at a time (conv filters as
    out x (in*kh*kw), a 3D parameter as its matrices), with the moonlight scale muonkit uses by
    default and torch.optim.AdamW on the other parameters."""
    buffers = [torch.zeros_like(p) for p in case.muon]
    adamw = torch.optim.AdamW(case.adamw, lr=LR, weight_decay=WD) if case.adamw else None

    @torch.no_grad()
    def step():
        for p, buf in zip(case.muon, buffers):
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum)
            matrices = update.reshape(-1, *p.shape[-2:]) if p.ndim == 3 else update.reshape(1, len(p), -1)
            O = torch.stack([newton_schulz5(m) for m in matrices])
            rows, cols = matrices.shape[-2:]
            p.mul_(1 - LR * weight_decay)
            p.add_(O.view_as(p), alpha=-LR * 0.2 * max(rows, cols) ** 0.5)
        if adamw is not None:
            adamw.step()

    return step


def muonkit_step(case: Case, muon_class: type = muonkit.Muon, **options) -> Callable[[], None]:
    groups = [{"params": case.muon, "use_muon": True}]
    if case.adamw:
        groups.append({"params": case.adamw, "use_muon": False})
    opt = muon_class(groups, **{"lr": LR, "weight_decay": WD, **options})
    return opt.step


def per_matrix_step(case: Case, **options) -> Callable[[], None]:
    """muonkit's own math, one parameter and one matrix at a time (no stacking)."""
    momentum = options.get("momentum", 0.95)
    wd = options.get("weight_decay", WD)
    buffers = [torch.zeros_like(p) for p in case.muon]
    layouts = [resolve(None, p.ndim) for p in case.muon]
    adamw = torch.optim.AdamW(case.adamw, lr=LR, weight_decay=WD) if case.adamw else None

    def one_at_a_time(tensors, second_moments, layouts):
        updates = [from_matrices(torch.stack([orthogonalize(x) for x in to_matrices(t, layout)]), layout, t.shape)
                   for t, layout in zip(tensors, layouts)]
        return updates, [None] * len(tensors)

    @torch.no_grad()
    def step():
        for p, buf, layout in zip(case.muon, buffers, layouts):
            functional.muon([p], [p.grad], [buf], [layout], lr=LR, momentum=momentum, nesterov=True,
                            weight_decay=wd, scale="moonlight", rms=0.2, orthogonalizer="polar_express",
                            ns_steps=5, ns_dtype=None, update_many=one_at_a_time)
        if adamw is not None:
            adamw.step()

    return step


def torch_muon_step(case: Case, params: list[nn.Parameter] | None = None, **options) -> Callable[[], None]:
    params = case.muon if params is None else params
    if any(p.ndim != 2 for p in params):
        from seed_net import SeedMuon

        muon = SeedMuon(params, lr=LR, weight_decay=options.get("weight_decay", WD),
                        momentum=options.get("momentum", 0.95))
    else:
        muon = torch.optim.Muon(params, lr=LR, weight_decay=options.get("weight_decay", WD),
                                momentum=options.get("momentum", 0.95), adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(case.adamw, lr=LR, weight_decay=WD) if case.adamw and params is case.muon else None

    def step():
        muon.step()
        if adamw is not None:
            adamw.step()

    return step


def adamw_step(case: Case) -> Callable[[], None]:
    return torch.optim.AdamW(case.muon + case.adamw, lr=LR, weight_decay=WD).step


# ------------------------------------------------------------------------------- measurements


def matrices_of(p: torch.Tensor) -> torch.Tensor:
    return p.detach().reshape(-1, *p.shape[-2:]) if p.ndim == 3 else p.detach().reshape(p.size(0), -1)[None]


def update_error(case: Case, make_step: Callable[..., Callable[[], None]], params: list[nn.Parameter]) -> float:
    """Polar-factor error of one step's update with momentum 0 and no weight decay; every
    parameter the step moves (also the AdamW ones) is restored afterwards."""
    before = [p.detach().clone() for p in params]
    others = [(p, p.detach().clone()) for p in case.adamw]
    set_grads(case, params, seed=7)
    grads = [p.grad.clone() for p in params]
    make_step(momentum=0.0, weight_decay=0.0)()
    worst = 0.0
    for p, b, g in zip(params, before, grads):
        delta = (matrices_of(b) - matrices_of(p)).cpu().double()
        exact = polar_factor(matrices_of(g))
        fit = (delta * exact).sum((-2, -1), keepdim=True) / (delta * delta).sum((-2, -1), keepdim=True)
        err = torch.linalg.matrix_norm(fit * delta - exact) / torch.linalg.matrix_norm(exact)
        worst = max(worst, float(err.max()))
        with torch.no_grad():
            p.copy_(b)
    with torch.no_grad():
        for p, b in others:
            p.copy_(b)
    return worst


def representatives(case: Case, device: str) -> tuple[list[nn.Parameter], Counter]:
    """One 2D matrix per distinct matrix shape of the Muon params, and how many matrices each stands for."""
    counts: Counter = Counter()
    for p in case.muon:
        batch = p.shape[0] if p.ndim == 3 else 1
        counts[tuple(p.shape[-2:])] += batch
    return _params(list(counts), device), counts


def run_case(key: str, args: argparse.Namespace, full_torch: bool, device: str, base: object | None = None) -> str:
    case = make_case(key, device)
    params = case.muon + case.adamw
    set_grads(case, params)
    sync = device_sync(device)
    fns = {
        TEXTBOOK: textbook_step(case),
        DEFAULT: muonkit_step(case),
        "muonkit, one matrix at a time": per_matrix_step(case),
        "AdamW alone (torch)": adamw_step(case),
    }
    if base is not None:
        fns[f"{DEFAULT} at {args.base}"] = muonkit_step(case, base.Muon)
    if args.unfused_adamw_row and case.adamw:
        fns[UNFUSED] = muonkit_step(case, fused=False)
    auto = working_dtype(case.muon[0], "auto")
    with_auto = auto != working_dtype(case.muon[0], None)
    if with_auto:
        fns[f"muonkit Muon, ns_dtype='auto' ({auto})"] = muonkit_step(case, ns_dtype="auto")
    torch_label = "torch.optim.Muon (bf16) + AdamW" if key != "c" else "seed notebook Muon (bf16) + AdamW"
    full = case.torch_muon_full or full_torch
    if full:
        fns[torch_label] = torch_muon_step(case)
    saved = [p.detach().clone() for p in params]
    n = args.steps_per_round
    clock = time.process_time if args.clock == "cpu" else None
    timings = {name: _per_step(t, n) for name, t in
               time_interleaved({name: _times(fn, n) for name, fn in fns.items()}, repeats=args.repeats, sync=sync,
                                clock=clock).items()}
    if not full and args.torch_muon_repeats > 0:  # 0: no torch.optim.Muon row
        reps, counts = representatives(case, device)
        set_grads(case, reps)
        rep_fns = {str(shape): torch_muon_step(case, [p]) for p, shape in zip(reps, counts)}
        rep_times = time_interleaved(rep_fns, repeats=args.torch_muon_repeats, warmup=0, sync=sync, clock=clock)
        rest = (time_interleaved({"adamw": torch.optim.AdamW(case.adamw, lr=LR).step}, repeats=args.repeats, sync=sync,
                                 clock=clock)
                if case.adamw else {})
        total = sum(rep_times[str(s)].median * n for s, n in counts.items()) + (rest["adamw"].median if rest else 0.0)
        timings[torch_label + " *"] = Timing(total, total, total, args.torch_muon_repeats)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    makers: dict[str, Callable[..., Callable[[], None]]] = {
        TEXTBOOK: lambda **o: textbook_step(case, **o),
        DEFAULT: lambda **o: muonkit_step(case, **o),
        "muonkit, one matrix at a time": lambda **o: per_matrix_step(case, **o),
    }
    if with_auto:
        makers[f"muonkit Muon, ns_dtype='auto' ({auto})"] = lambda **o: muonkit_step(case, ns_dtype="auto", **o)
    if full:
        makers[torch_label] = lambda **o: torch_muon_step(case, **o)
    errors = {name: update_error(case, make, case.muon) for name, make in makers.items()}
    if not full and args.torch_muon_repeats > 0:
        reps, _ = representatives(case, device)
        errors[torch_label + " *"] = max(update_error(case, lambda **o: torch_muon_step(case, [p], **o), [p])
                                         for p in reps)
    base = timings[TEXTBOOK]
    rows = [[name, t.median * 1e3, median_ratio(t, base), errors.get(name, "-")] for name, t in timings.items()]
    counts = Counter(tuple(p.shape) for p in case.muon)
    header = (f"\n{case.name}: Muon matrices {sum(p.numel() for p in case.muon) / 1e6:.2f}M params "
              f"({', '.join(f'{n} x {s}' for s, n in counts.items())}), AdamW {sum(p.numel() for p in case.adamw) / 1e3:.1f}k")
    note = ("\n* torch.optim.Muon timed on one matrix per shape x count, median of "
            f"{args.torch_muon_repeats}; its ratio is a ratio of medians" if not full and args.torch_muon_repeats > 0 else "")
    return header + "\n" + table(["method", "step ms", "x textbook", "polar err"], rows) + note


def _times(fn: Callable[[], None], n: int) -> Callable[[], None]:
    if n == 1:
        return fn

    def steps() -> None:
        for _ in range(n):
            fn()

    return steps


def _per_step(t: Timing, n: int) -> Timing:
    return Timing(t.median / n, t.low / n, t.high / n, t.runs, tuple(x / n for x in t.samples))


def charlm_share(repeats: int, device: str) -> str:
    """(f) The optimizer's share of a charlm training step, muonkit Muon vs AdamW."""
    import torch.nn.functional as F

    from muonkit.tasks.charlm import GPT, CharLM

    task = CharLM()
    torch.manual_seed(0)
    vocab = 96
    rows = []
    for label in ("muonkit Muon", "AdamW (torch)"):
        model = GPT(vocab, task.context, width=task.width, depth=task.depth).to(device)
        if label == "muonkit Muon":
            opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-2, weight_decay=WD)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=WD)
        ids = torch.randint(0, vocab, (task.batch_size, task.context + 1), device=device)

        def forward_backward():
            opt.zero_grad(set_to_none=False)
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

        forward_backward()
        t = time_interleaved({"fb": forward_backward, "step": opt.step}, repeats=repeats, sync=device_sync(device))
        fb, st = t["fb"].median, t["step"].median
        rows.append([label, fb * 1e3, st * 1e3, f"{100 * st / (fb + st):.1f}%"])
    return (f"\n(f) charlm GPT (muonkit.tasks.charlm: width {task.width}, depth {task.depth}, batch {task.batch_size} "
            f"x {task.context}): optimizer share of a training step\n"
            + table(["optimizer", "forward+backward ms", "step ms", "step share"], rows))


def emulate_isa(isa: str, argv: list[str]) -> str:
    """Re-execute this script with `isa`'s variables set (they must be there before torch loads its
    kernels); in the re-executed process, check they took effect and return a line saying so."""
    wanted = ISA_ENV[isa]
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], {**os.environ, **wanted})
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if capability != isa.upper() or onednn_bf16:
        raise SystemExit(f"--isa {isa}: torch's CPU capability is {capability} and oneDNN bfloat16 is "
                         f"{'on' if onednn_bf16 else 'off'}; the emulation did not take")
    sys.modules["muonkit.orthogonalize"].CPU_FAST_BFLOAT16 = False
    return (f"Emulated {isa.upper()}-only CPU: " + ", ".join(f"{k}={v}" for k, v in wanted.items())
            + f" (torch CPU capability {capability}, oneDNN bfloat16 products off); muonkit's CPU_FAST_BFLOAT16 "
            "set False (it reads /proc/cpuinfo, which the emulation does not change): default Newton-Schulz dtype "
            f"{sys.modules['muonkit.orthogonalize'].default_ns_dtype('cpu')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,c,g,b,d,e,f")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--torch-muon-repeats", type=int, default=1, help="rounds for the torch.optim.Muon row where it is timed on one matrix per shape (0: no such row)")
    parser.add_argument("--full-torch-muon", action="store_true",
                        help="time torch.optim.Muon on every matrix even where bf16 is slow (default: only where it is not)")
    parser.add_argument("--steps-per-round", type=int, default=1, help="steps of each method timed together per round")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this process's CPU time (for 1 thread on a shared machine)")
    parser.add_argument("--unfused-adamw-row", action="store_true",
                        help="add the default step with fused=False (torch's default AdamW on its AdamW group, the "
                             "default before issue-22f)")
    parser.add_argument("--base", default="", help="also time muonkit's default step at this git commit")
    parser.add_argument("--isa", default="", choices=("", *ISA_ENV),
                        help="emulate a CPU with only this instruction set (re-executes under its variables)")
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    emulation = emulate_isa(args.isa, argv) if args.isa else ""
    base = None
    if args.base:
        from bench_step_options import base_package

        base = base_package(args.base)
        if args.isa:
            sys.modules["muonkit_base.orthogonalize"].CPU_FAST_BFLOAT16 = False
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    out = [f"Machine at start: {setup(args.threads, args.device)}; {time.strftime('%Y-%m-%d %H:%M')} UTC"]
    out += [emulation] if emulation else []
    slowdown = bf16_slowdown(device=args.device)
    full_torch = args.full_torch_muon or slowdown < 4.0
    out += [f"bfloat16 / float32 time of a 512x512 matrix product on {args.device}: {slowdown:.2f}",
            f"Median of {args.repeats} rounds after 1 warm-up round ({args.steps_per_round} step(s) of each method per "
            f"round, {'CPU time of this process' if args.clock == 'cpu' else 'wall clock'}), all methods round-robin "
            "(order reversed every other round); x textbook = median of per-round ratios."]
    print("\n".join(out))
    for key in args.cases.split(","):
        text = charlm_share(args.repeats, args.device) if key == "f" else run_case(key, args, full_torch, args.device, base)
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment(args.device)}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_step.py " + " ".join(argv)
        key = "SPEED-STEP" + ("" if args.cases == parser.get_default("cases") else "-" + args.cases.replace(",", ""))
        key += "" if args.threads == 2 else f"-{args.threads}THREADS"
        key += "" if args.device == "cpu" else f"-{args.device.upper()}"
        key += f"-{args.isa.upper()}" if args.isa else ""
        write_results(key, f"### Optimizer step (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
