"""The whole optimizer step, muonkit against torch.optim.Muon, one-matrix-at-a-time and AdamW.

Run:
    /work/venv/bin/python benchmarks/bench_step.py [--cases a,b,c,d,e,f] [--repeats 5] [--threads 2]
        [--torch-muon-repeats 1] [--full-torch-muon] [--write-results]

Cases: (a) 4 GPT-2-small blocks (768 wide: q, k, v, o 768x768, fc 3072x768, proj 768x3072 per
block, plus their biases and LayerNorms on AdamW); (b) 12 such layers 512 wide; (c) the seed
notebook's CIFAR-10 network (tests/seed_net.py, routed by muonkit.param_groups); (d) 64 experts
of 256x1024 as one stacked parameter; (e) 200 matrices of 64x64; (f) the charlm task's GPT
(muonkit.tasks.charlm: width 128, depth 4, batch 16 x 128 characters): the optimizer's share of
a training step (forward + backward + step), muonkit Muon against AdamW.

Prints (and with --write-results writes into benchmarks/RESULTS.md) one Markdown table per case: median step time over --repeats rounds after one warm-up
round, all methods timed round-robin in this process; the ratio to muonkit; and the polar-factor
error of each method's Muon update (one step with momentum 0 and no weight decay, so the update is
the orthogonalized gradient; the update is rescaled by its least-squares factor, so a method's
lr scale does not count, only how far its singular values are from 1), max over the matrices.

torch.optim.Muon orthogonalizes in bfloat16, which is ~100x slower than float32 on CPUs without
AVX-512 BF16 and ~2.3x faster on CPUs with it; the script measures which at start. Where bf16 is
more than 4x slower than fp32, its steps would take minutes in cases a, b, d: there it is timed on
one matrix of each distinct shape and the times multiplied by the counts (its step is a loop over
matrices, so this is exact up to noise), with --torch-muon-repeats rounds; --full-torch-muon times
it whole anyway. muonkit's default orthogonalizes in float32 on CPU; the row "muonkit Muon,
ns_dtype=bfloat16" (run only where bf16 is not slow) is the like-for-like comparison with
torch.optim.Muon's precision.
It takes 2D matrices only: in (c) the seed notebook's own Muon (the same bf16 algorithm) stands
in, and in (d) it gets the 64 experts as separate matrices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from common import Timing, bf16_slowdown, environment, polar_factor, setup, table, time_interleaved, write_results

import muonkit
from muonkit import functional
from muonkit.layout import resolve
from muonkit.orthogonalize import orthogonalize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

LR, WD = 0.02, 0.1


@dataclass
class Case:
    name: str
    muon: list[nn.Parameter]
    adamw: list[nn.Parameter]
    torch_muon_full: bool  # time torch.optim.Muon on every matrix (else one per shape, x count)
    model: nn.Module | None = None
    extra: dict = field(default_factory=dict)


def _params(shapes: list[tuple[int, ...]], scale: float = 0.02) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(s) * scale) for s in shapes]


def _gpt_blocks(width: int, blocks: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    matrices, vectors = [], []
    for _ in range(blocks):
        matrices += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        vectors += [(width,)] * 4 + [(3 * width,), (width,), (4 * width,), (width,)]  # LN x2, biases
    return matrices, vectors


def make_case(key: str) -> Case:
    torch.manual_seed(0)
    if key in "ab":
        width, blocks = (768, 4) if key == "a" else (512, 12)
        matrices, vectors = _gpt_blocks(width, blocks)
        name = f"({key}) {blocks} GPT-2-style blocks, {width} wide"
        return Case(name, _params(matrices), _params(vectors), torch_muon_full=False)
    if key == "c":
        from seed_net import Net, reset_parameters

        model = Net(10)
        reset_parameters(model)
        groups = muonkit.param_groups(model)
        muon = [p for g in groups if g["use_muon"] for p in g["params"]]
        adamw = [p for g in groups if not g["use_muon"] for p in g["params"]]
        return Case("(c) seed notebook CIFAR-10 net", muon, adamw, torch_muon_full=True, model=model)
    if key == "d":
        return Case("(d) 64 experts of 256x1024, one stacked parameter", _params([(64, 256, 1024)]), [],
                    torch_muon_full=False)
    if key == "e":
        return Case("(e) 200 matrices of 64x64", _params([(64, 64)] * 200), [], torch_muon_full=True)
    raise KeyError(key)


def set_grads(params: list[nn.Parameter], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


# ------------------------------------------------------------------------------------- methods


def muonkit_step(case: Case, **options) -> Callable[[], None]:
    groups = [{"params": case.muon, "use_muon": True}]
    if case.adamw:
        groups.append({"params": case.adamw, "use_muon": False})
    opt = muonkit.Muon(groups, **{"lr": LR, "weight_decay": WD, **options})
    return opt.step


def per_matrix_step(case: Case, **options) -> Callable[[], None]:
    """muonkit's own math, one parameter and one matrix at a time (no stacking)."""
    momentum = options.get("momentum", 0.95)
    wd = options.get("weight_decay", WD)
    buffers = [torch.zeros_like(p) for p in case.muon]
    layouts = [resolve(None, p.ndim) for p in case.muon]
    adamw = torch.optim.AdamW(case.adamw, lr=LR, weight_decay=WD) if case.adamw else None

    def one_at_a_time(matrices):
        return [torch.stack([orthogonalize(x) for x in m]) for m in matrices]

    @torch.no_grad()
    def step():
        for p, buf, layout in zip(case.muon, buffers, layouts):
            functional.muon([p], [p.grad], [buf], [layout], lr=LR, momentum=momentum, nesterov=True,
                            weight_decay=wd, scale="moonlight", rms=0.2, orthogonalizer="polar_express",
                            ns_steps=5, ns_dtype=None, orthogonalize_many=one_at_a_time)
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


def update_error(make_step: Callable[..., Callable[[], None]], params: list[nn.Parameter]) -> float:
    """Polar-factor error of one step's update with momentum 0 and no weight decay."""
    before = [p.detach().clone() for p in params]
    set_grads(params, seed=7)
    grads = [p.grad.clone() for p in params]
    make_step(momentum=0.0, weight_decay=0.0)()
    worst = 0.0
    for p, b, g in zip(params, before, grads):
        delta = matrices_of(b) - matrices_of(p)
        exact = polar_factor(matrices_of(g)).to(delta.dtype)
        fit = (delta * exact).sum((-2, -1), keepdim=True) / (delta * delta).sum((-2, -1), keepdim=True)
        err = torch.linalg.matrix_norm(fit * delta - exact) / torch.linalg.matrix_norm(exact)
        worst = max(worst, float(err.max()))
        with torch.no_grad():
            p.copy_(b)
    return worst


def representatives(case: Case) -> tuple[list[nn.Parameter], Counter]:
    """One 2D matrix per distinct matrix shape of the Muon params, and how many matrices each stands for."""
    counts: Counter = Counter()
    for p in case.muon:
        batch = p.shape[0] if p.ndim == 3 else 1
        counts[tuple(p.shape[-2:])] += batch
    return _params(list(counts)), counts


def run_case(key: str, repeats: int, torch_repeats: int, full_torch: bool, with_bf16: bool) -> str:
    case = make_case(key)
    params = case.muon + case.adamw
    set_grads(params)
    fns = {
        "muonkit Muon (defaults)": muonkit_step(case),
        "muonkit, one matrix at a time": per_matrix_step(case),
        "AdamW alone (torch)": adamw_step(case),
    }
    if with_bf16:
        fns["muonkit Muon, ns_dtype=bfloat16"] = muonkit_step(case, ns_dtype=torch.bfloat16)
    torch_label = "torch.optim.Muon (bf16) + AdamW" if key != "c" else "seed notebook Muon (bf16) + AdamW"
    full = case.torch_muon_full or full_torch
    if full:
        fns[torch_label] = torch_muon_step(case)
    saved = [p.detach().clone() for p in params]
    timings = time_interleaved(fns, repeats=repeats)
    if not full:
        reps, counts = representatives(case)
        set_grads(reps)
        rep_fns = {str(shape): torch_muon_step(case, [p]) for p, shape in zip(reps, counts)}
        rep_times = time_interleaved(rep_fns, repeats=torch_repeats, warmup=0)
        rest = time_interleaved({"adamw": torch.optim.AdamW(case.adamw, lr=LR).step}, repeats=repeats) if case.adamw else {}
        total = sum(rep_times[str(s)].median * n for s, n in counts.items()) + (rest["adamw"].median if rest else 0.0)
        timings[torch_label + " *"] = Timing(total, total, total, torch_repeats)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    errors = {
        "muonkit Muon (defaults)": update_error(lambda **o: muonkit_step(case, **o), case.muon),
        "muonkit, one matrix at a time": update_error(lambda **o: per_matrix_step(case, **o), case.muon),
    }
    if with_bf16:
        errors["muonkit Muon, ns_dtype=bfloat16"] = update_error(
            lambda **o: muonkit_step(case, ns_dtype=torch.bfloat16, **o), case.muon)
    if full:
        errors[torch_label] = update_error(lambda **o: torch_muon_step(case, **o), case.muon)
    else:
        reps, _ = representatives(case)
        errors[torch_label + " *"] = max(update_error(lambda **o: torch_muon_step(case, [p], **o), [p]) for p in reps)
    base = timings["muonkit Muon (defaults)"].median
    rows = [[name, t.median * 1e3, t.median / base, base / t.median, errors.get(name, "-")] for name, t in timings.items()]
    counts = Counter(tuple(p.shape) for p in case.muon)
    header = (f"\n{case.name}: Muon matrices {sum(p.numel() for p in case.muon) / 1e6:.2f}M params "
              f"({', '.join(f'{n} x {s}' for s, n in counts.items())}), AdamW {sum(p.numel() for p in case.adamw) / 1e3:.1f}k")
    note = ("\n* torch.optim.Muon timed on one matrix per shape x count, median of "
            f"{torch_repeats}" if not full else "")
    return header + "\n" + table(["method", "step ms", "x muonkit", "muonkit speed-up", "polar err"], rows) + note


def charlm_share(repeats: int) -> str:
    """(f) The optimizer's share of a charlm training step, muonkit Muon vs AdamW."""
    import torch.nn.functional as F

    from muonkit.tasks.charlm import CharLM, GPT

    task = CharLM()
    torch.manual_seed(0)
    vocab = 96
    rows = []
    for label in ("muonkit Muon", "AdamW (torch)"):
        model = GPT(vocab, task.context, width=task.width, depth=task.depth)
        if label == "muonkit Muon":
            opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-2, weight_decay=WD)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=WD)
        ids = torch.randint(0, vocab, (task.batch_size, task.context + 1))

        def forward_backward():
            opt.zero_grad(set_to_none=False)
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

        forward_backward()
        t = time_interleaved({"fb": forward_backward, "step": opt.step}, repeats=repeats)
        fb, st = t["fb"].median, t["step"].median
        rows.append([label, fb * 1e3, st * 1e3, f"{100 * st / (fb + st):.1f}%"])
    return ("\n(f) charlm GPT (muonkit.tasks.charlm: width 128, depth 4, batch 16 x 128): optimizer share of "
            "a training step\n" + table(["optimizer", "forward+backward ms", "step ms", "step share"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b,c,d,e,f")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-muon-repeats", type=int, default=1)
    parser.add_argument("--full-torch-muon", action="store_true",
                        help="time torch.optim.Muon on every matrix even where bf16 is slow (default: only where it is not)")
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    out = [f"Machine at start: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M')}"]
    slowdown = bf16_slowdown()
    full_torch = args.full_torch_muon or slowdown < 4.0
    out += [f"bfloat16 / float32 time of a 512x512 matrix product here: {slowdown:.2f}",
            f"Median of {args.repeats} after 1 warm-up round, all methods round-robin; ratios from the same rounds."]
    print("\n".join(out))
    for key in args.cases.split(","):
        text = charlm_share(args.repeats) if key == "f" else run_case(key, args.repeats, args.torch_muon_repeats, full_torch, with_bf16=slowdown < 4.0)
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment()}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        key = "SPEED-STEP" + ("" if args.cases == parser.get_default("cases") else "-" + args.cases.replace(",", ""))
        key += "" if args.threads == 2 else f"-{args.threads}THREADS"
        write_results(key, f"### Optimizer step (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
