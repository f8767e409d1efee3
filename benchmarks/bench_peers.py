"""muonkit against the other Muon implementations: one step's time and its direction's polar error.

Run (from the repository root; the pip-installable peers come with the `peers` extra):

    python benchmarks/bench_peers.py [--cases gpt2,charlm] [--threads 1] [--repeats 7] [--clock wall|cpu]
                                     [--rows "SUBSTRING;..."] [--write-results]

Cases: "gpt2", 4 GPT-2-small blocks (768 wide: q, k, v, o 768x768, fc 3072x768, proj 768x3072 per
block, 28.3M parameters, all on Muon), and "charlm", the Muon matrices of the charlm task's GPT
(muonkit.tasks.charlm, routed by muonkit.param_groups: width 128, depth 4). Only the matrices are
stepped (every implementation routes vectors to AdamW its own way, and that part is not Muon's).

Rows, each a fresh optimizer (all stepping one set of parameters), all timed round-robin in this
process (one warm-up round, then --repeats rounds, the order reversed every other round):
  - muonkit Muon, NorMuon and AdaMuon at their defaults, with ns_dtype="auto" (bfloat16 where this
    CPU multiplies it natively), and with ns_dtype=torch.bfloat16 (the peers' dtype, so that a ratio
    separates the Newton-Schulz dtype from the rest of the step);
  - torch.optim.Muon (bfloat16 Keller Jordan quintic);
  - Keller Jordan's reference step, written here: momentum, Nesterov lookahead,
    benchmarks/common.keller_jordan_ns5 in bfloat16, his max(1, rows/cols)^0.5 scale;
  - where installed: pytorch-optimizer's Muon, NorMuon and AdaMuon (`pip install pytorch-optimizer`)
    and heavyball's Muon (`pip install heavyball`; run eagerly: heavyball.utils.compile_mode = None,
    since its torch.compile takes minutes per shape on a small CPU).

`--clock cpu` times each step by this process's CPU time (time.process_time) instead of the wall
clock: on a machine shared with other jobs it leaves out the waits for a core (with 1 thread every
op runs in the calling thread). `--rows` keeps only the rows whose name contains one of the given
substrings, separated by ";" (torch.optim.Muon is always kept: the ratios are taken against it).

"x torch" is the median over rounds of a row's time over torch.optim.Muon's in the same round; for
muonkit's rows "x peer" is the same against the fastest other implementation of that variant (by
median).

"polar err" is how far the direction one step applies is from the exact one: each matrix's
gradient has singular values 1/i (i = 1..min(rows, cols)) between random orthogonal factors, one
step from a fresh state with no weight decay, the applied delta of each matrix rescaled by its
least-squares factor (so that an implementation's lr scale does not count), and the relative
Frobenius distance to the variant's exact update, max over matrices. The exact update is computed
in float64 from the SVD polar factor: U V^T for Muon, and NorMuon's row normalization of it
(muonkit.variants; an implementation whose rule differs shows the difference here). AdaMuon has
none ("-"): its first update divides each entry by its own magnitude, sign(O) / sqrt(1 - beta2),
so its distance would count the sign flips of O's near-zero entries, not the orthogonalization.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common import environment, keller_jordan_ns5, median_ratio, setup, table, time_interleaved, write_results

import muonkit
from muonkit.orthogonalize import working_dtype

LR = 0.02
FAMILIES = ("muon", "normuon", "adamuon")


@dataclass
class Row:
    family: str  # which exact update its direction is compared with
    peer: bool  # another implementation (not muonkit's)
    make: Callable[[list[nn.Parameter], float], Callable[[], object]]  # (params, weight_decay) -> step


def gpt2_shapes() -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    for _ in range(4):
        shapes += [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    return shapes


def charlm_shapes() -> list[tuple[int, int]]:
    from muonkit.tasks.charlm import GPT, CharLM

    task = CharLM()
    model = GPT(96, task.context, width=task.width, depth=task.depth)
    return [tuple(p.shape) for g in muonkit.param_groups(model) if g["use_muon"] for p in g["params"]]


CASES = {"gpt2": ("4 GPT-2-small blocks, 768 wide", gpt2_shapes), "charlm": ("charlm GPT's Muon matrices", charlm_shapes)}


# ------------------------------------------------------------------------------------ the rows


def muonkit_row(variant: str, **options) -> Callable[[list[nn.Parameter], float], Callable[[], object]]:
    def make(params, weight_decay):
        return muonkit.Muon(params, lr=LR, weight_decay=weight_decay, variant=variant, **options).step
    return make


def torch_muon(params, weight_decay):
    return torch.optim.Muon(params, lr=LR, weight_decay=weight_decay).step


def keller_jordan(params, weight_decay, momentum=0.95):
    """Keller Jordan's Muon step (his muon.py's muon_update and step), one matrix at a time, bf16."""
    buffers = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step():
        for p, buf in zip(params, buffers):
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum)
            update = keller_jordan_ns5(update, torch.bfloat16)
            update *= max(1, p.size(-2) / p.size(-1)) ** 0.5
            p.mul_(1 - LR * weight_decay)
            p.add_(update.reshape(p.shape).to(p.dtype), alpha=-LR)

    return step


def pytorch_optimizer_row(name: str) -> Callable[[list[nn.Parameter], float], Callable[[], object]]:
    def make(params, weight_decay):
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, name)
        options = {"foreach": None} if name == "AdaMuon" else {}
        return cls([{"params": params, "use_muon": True}], lr=LR, weight_decay=weight_decay, **options).step
    return make


def heavyball_muon(params, weight_decay):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball.Muon(params, lr=LR, weight_decay=weight_decay).step


def rows(bf16_native: bool) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for family in FAMILIES:
        out[f"muonkit {family} (defaults)"] = Row(family, False, muonkit_row(family))
        if bf16_native:
            out[f"muonkit {family}, ns_dtype='auto'"] = Row(family, False, muonkit_row(family, ns_dtype="auto"))
        out[f"muonkit {family}, ns_dtype=bf16"] = Row(family, False, muonkit_row(family, ns_dtype=torch.bfloat16))
    out["torch.optim.Muon"] = Row("muon", True, torch_muon)
    out["Keller Jordan reference (bf16)"] = Row("muon", True, keller_jordan)
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        for name, family in (("Muon", "muon"), ("NorMuon", "normuon"), ("AdaMuon", "adamuon")):
            out[f"pytorch-optimizer {name}"] = Row(family, True, pytorch_optimizer_row(name))
    if importlib.util.find_spec("heavyball") is not None:
        out["heavyball Muon (eager)"] = Row("muon", True, heavyball_muon)
    return out


# ------------------------------------------------------------------------------ measurements


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def exact_update(family: str, G: torch.Tensor, beta2: float = 0.95, eps: float = 1e-10) -> torch.Tensor:
    """A fresh state's first update direction in float64 (up to a scale per matrix), Muon or NorMuon."""
    O = polar(G)
    if family == "muon":
        return O
    return O / ((1 - beta2) * (O * O).mean(-1, keepdim=True)).sqrt().add(eps)


def test_gradient(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Singular values 1/i between random orthogonal factors: a spread spectrum, as momentum has."""
    m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return ((U / torch.arange(1, k + 1, dtype=torch.float64)) @ V.T).float()


def direction_error(row: Row, grads: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    params = [nn.Parameter(torch.randn(g.shape) * 0.02) for g in grads]
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    row.make(params, 0.0)()
    worst = 0.0
    for p, b, exact in zip(params, before, exact):
        delta = (b - p.detach()).double()
        fit = (delta * exact).sum() / (delta * delta).sum()
        worst = max(worst, float(torch.linalg.matrix_norm(fit * delta - exact) / torch.linalg.matrix_norm(exact)))
    return worst


def run_case(key: str, args: argparse.Namespace, bf16_native: bool) -> str:
    title, make_shapes = CASES[key]
    shapes = make_shapes()
    candidates = rows(bf16_native)
    if args.rows:
        wanted = args.rows.split(";")
        candidates = {n: r for n, r in candidates.items() if n == "torch.optim.Muon" or any(w in n for w in wanted)}
    # One set of parameters and gradients that every optimizer steps (each keeps its own state), so
    # that memory holds one copy of the model: the values drift, the work per step does not.
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    steps = {name: row.make(params, 0.1) for name, row in candidates.items()}

    def timed(name):
        def run():
            for p, g in zip(params, grads):  # heavyball sets .grad to None after its step
                p.grad = g
            steps[name]()
        return run

    clock = time.process_time if args.clock == "cpu" else None
    timings = time_interleaved({name: timed(name) for name in candidates}, repeats=args.repeats, clock=clock)
    generator = torch.Generator().manual_seed(7)
    test_grads = [test_gradient(s, generator) for s in shapes]
    exact = {family: [exact_update(family, g) for g in test_grads] for family in ("muon", "normuon")}
    errors = {name: direction_error(row, test_grads, exact[row.family]) if row.family in exact else "-"
              for name, row in candidates.items()}
    reference = timings["torch.optim.Muon"]
    fastest_peer = {}
    for family in FAMILIES:
        peers = [n for n, r in candidates.items() if r.peer and r.family == family]
        if peers:
            fastest_peer[family] = min(peers, key=lambda n: timings[n].median)
    table_rows = []
    for name, row in candidates.items():
        t = timings[name]
        peer = fastest_peer.get(row.family)
        versus = f"{median_ratio(t, timings[peer]):.2f}" if peer is not None and not row.peer else "-"
        table_rows.append([name, t.median * 1e3, median_ratio(t, reference), versus, errors[name]])
    count = sum(math.prod(s) for s in shapes)
    kinds = ", ".join(f"{shapes.count(s)} x {s[0]}x{s[1]}" for s in dict.fromkeys(shapes))
    note = "; x peer: against " + ", ".join(f"{f}: {n}" for f, n in fastest_peer.items()) if fastest_peer else ""
    return (f"\n{title}: {count / 1e6:.1f}M parameters ({kinds}), {args.threads} thread(s){note}\n"
            + table(["implementation", "step ms", "x torch", "x peer", "polar err"], table_rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt2,charlm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--rows", default="", help="keep the rows whose name has one of these substrings (separated by ;)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    machine = setup(args.threads)
    bf16_native = working_dtype(torch.zeros(2, 2), "auto") == torch.bfloat16
    out = [f"Machine at start: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"Median of {args.repeats} interleaved rounds after 1 warm-up round ({'CPU time of this process' if args.clock == 'cpu' else 'wall clock'}); "
           "ratios are medians of per-round ratios."]
    print("\n".join(out), flush=True)
    for key in args.cases.split(","):
        text = run_case(key, args, bf16_native)
        print(text, flush=True)
        out.append(text)
    out.append(f"\nMachine at end: {environment()}")
    print(out[-1])
    if args.write_results:
        command = "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        key = f"PEERS-{args.cases.replace(',', '')}-{args.threads}THREADS"
        write_results(key, f"### Peers (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
