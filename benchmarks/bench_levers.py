"""Issue 12's levers, each measured on its own: speed against the kernel it would replace, and
accuracy against the float64 polar factor.

Run:
    python benchmarks/bench_levers.py [--repeats 7] [--threads 2] [--train-steps 100] [--write-results]

Prints three Markdown tables and the facts behind the AOL verdict.

Speed: each lever's variant and its baseline are timed round-robin in one process (order reversed
every other round); "x baseline" is the median over rounds of the variant's time over the
baseline's. The last rows time bench_step.py's cases whole: (a) with the squares stacked
(`stacking_rows`), and (c), (g) with the normalization before issue 11 (`normalization_rows`). Baselines: muonkit's own kernel (`orthogonalize`, fp32 Polar Express, Gram
Newton-Schulz on wide matrices) for variants of muonkit's code path; a plain Polar Express loop
(`plain_polar_express`, one matrix, out-of-place products) for variants written in that style, so
that only the lever differs.

Accuracy, on three sets of matrices: the Nesterov momentum U of every Muon matrix of the charlm GPT
after --train-steps steps of muonkit Muon on its corpus (real gradients: their stable rank is low,
so most singular values sit far below the largest), two random normal 768x768 matrices, and a
gradient-like 768x3072 (four strong directions, a decaying tail, noise). Columns: the largest and
the median polar error ||O - U V^T||_F / ||U V^T||_F over the set, and the range of u_i^T O v_i over
the directions with sigma_i / ||G||_F >= 1e-3 (Polar Express's band, docs/references.md section 3: its
image of [1e-3, 1] is [0.859, 1.141]; in float32 the default itself reaches a little below it on
real momentum, whose directions near 1e-3 have eigenvalues of X X^T near float32 round-off). "bound"
is "holds" when, on every set, both errors are at most muonkit's default's (+1e-4 for round-off)
and that range lies inside the band widened to the default's own range (+-1e-3).

Fusion (a proposal, not in muonkit): the default step of bench_step.py's cases (a) and (g) timed
against the same step with the Newton-Schulz kernel replaced by the identity, which leaves
exactly the step's elementwise work (momentum, lookahead into the work buffer, decay, update,
dtype copies). That work passes over parameter-sized tensors 11 times (lerp of M: read G and M,
write M; lookahead: read G and M, write U; decay: read and write W; update: read O and W, write
W); a fused pair of kernels (before the kernel: read G and M, write M and U; after it: read O and
W, write W) passes 7 times, so fusion saves at most about 4/11 of the elementwise time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from common import environment, median_ratio, setup, table, time_interleaved, write_results

import muonkit
from muonkit import functional
from muonkit.orthogonalize import SAFETY, SCHEDULES, coefficient_schedule, gram_newton_schulz, orthogonalize

kernels = sys.modules["muonkit.orthogonalize"]  # the module (muonkit.orthogonalize is also the function)

PE = coefficient_schedule("polar_express", 5)
YOU = SCHEDULES["you"][:5]
BAND_LO, BAND_HI = 0.859, 1.141
BAND_TOL = 1e-3
ERROR_TOL = 1e-4


# ----------------------------------------------------------------------------- plain kernels


def _wide(G: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (G.mT, True) if G.size(-2) > G.size(-1) else (G, False)


def _quintic(X: torch.Tensor, schedule, A: torch.Tensor | None = None, dtypes=None) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X per step, out of place; A for the first step may be given."""
    for k, (a, b, c) in enumerate(schedule):
        if dtypes is not None:
            X = X.to(dtypes[k])
        if A is None or k > 0:
            A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X


def plain_polar_express(G: torch.Tensor) -> torch.Tensor:
    """Polar Express, 5 steps, fp32, Frobenius normalization: the baseline of the plain variants."""
    X, flip = _wide(G.float())
    X = _quintic(X / (X.norm() * SAFETY["polar_express"] + 1e-6), PE)
    return X.mT if flip else X


def _symmetric_product(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P @ Q for a product known to be symmetric, from its upper block rows: the top half of the
    rows in full, the bottom-right block, and a mirrored copy (3/4 of the flops)."""
    m = P.size(0)
    h = m // 2
    out = torch.empty(m, m, dtype=P.dtype)
    torch.mm(P[:h], Q, out=out[:h])
    out[h:, h:] = P[h:] @ Q[:, h:]
    out[h:, :h] = out[:h, h:].mT
    return out


def symmetric_polar_express(G: torch.Tensor) -> torch.Tensor:
    """Lever: X X^T and A A computed as symmetric half products."""
    X, flip = _wide(G.float())
    X = X / (X.norm() * SAFETY["polar_express"] + 1e-6)
    for a, b, c in PE:
        A = _symmetric_product(X, X.mT)
        X = a * X + (b * A + c * _symmetric_product(A, A)) @ X
    return X.mT if flip else X


def turbo_muon(G: torch.Tensor) -> torch.Tensor:
    """Lever, as published (Boissin et al., arXiv:2512.04632, github.com/thib-s/flash-newton-schulz):
    rows of the wide X scaled by s_i = (sum_j |X X^T|_ij)^(-1/2) (AOL), then the last four steps of
    You's schedule, the first reusing X X^T. Converges to the polar factor of diag(s) X, not of X."""
    X, flip = _wide(G.float())
    A = X @ X.mT
    s = A.abs().sum(-1).clamp_min(1e-7).rsqrt()
    X = X * s[:, None]
    X = _quintic(X, YOU[1:], A=A * s[:, None] * s[None, :])
    return X.mT if flip else X


def _minimax_quintic(lo: float, hi: float, iterations: int = 100) -> tuple[tuple[float, float, float], float]:
    """The odd quintic a x + b x^3 + c x^5 closest to 1 in max norm on [lo, hi] (Remez exchange on
    four alternation points), and its error E: it maps [lo, hi] into [1 - E, 1 + E]."""
    xs = np.array([lo, lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, hi])
    for _ in range(iterations):
        system = np.array([[x, x**3, x**5, (-1) ** i] for i, x in enumerate(xs)])
        a, b, c, E = np.linalg.solve(system, np.ones(4))
        roots = np.roots([5 * c, 3 * b, a])  # p'(x) = 0 as a quadratic in x^2
        inner = sorted(np.sqrt(r.real) for r in roots if abs(r.imag) < 1e-12 and lo**2 < r.real < hi**2)
        if len(inner) != 2:
            break
        new = np.array([lo, inner[0], inner[1], hi])
        if np.allclose(new, xs, rtol=1e-15, atol=0):
            break
        xs = new
    return (float(a), float(b), float(c)), abs(float(E))


def greedy_schedule(lo: float, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """Polar Express's construction (Amsel et al., arXiv:2505.16932, section 3): each step the
    minimax quintic on the current interval [l, u], which becomes [1 - E, 1 + E]. Returns the
    schedule and the final E: the schedule maps [lo, 1] into [1 - E, 1 + E]."""
    schedule, hi, error = [], 1.0, 1.0
    for _ in range(steps):
        coefficients, error = _minimax_quintic(lo, hi)
        schedule.append(coefficients)
        lo, hi = 1 - error, 1 + error
    return schedule, error


def lowest_edge(steps: int, error: float) -> float:
    """The smallest lower edge l whose greedy `steps`-step schedule maps [l, 1] within `error` of 1."""
    lo, hi = 1e-6, 0.5
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if greedy_schedule(mid, steps)[1] <= error else (mid, hi)
    return hi


AOL_EDGE = 4e-3
AOL_SCHEDULE, AOL_ERROR = greedy_schedule(AOL_EDGE / 1.02, 4)


def aol_scalar_four_steps(G: torch.Tensor) -> torch.Tensor:
    """Lever: divide by min(||X||_F, sqrt(max_i sum_j |X X^T|_ij)), both bounds on ||X||_2 (the
    second is AOL's with one scale for all rows, so the polar factor stays X's), then 4 greedy
    minimax steps for [4e-3, 1] (AOL_SCHEDULE), the first reusing X X^T."""
    X, flip = _wide(G.float())
    A = X @ X.mT
    bound = torch.minimum(A.diagonal().sum().sqrt(), A.abs().sum(-1).max().sqrt()) * 1.02
    X = _quintic(X / bound, AOL_SCHEDULE, A=A / bound**2)
    return X.mT if flip else X


def schatten8_polar_express(G: torch.Tensor) -> torch.Tensor:
    """Lever: divide by (sum sigma^8)^(1/8) = ||A^2||_F^(1/4) of the Frobenius-normalized X, which
    bounds ||X||_2 at least as tightly as ||X||_F and costs no product (A^2 is the first step's),
    then Polar Express's 5 steps."""
    X, flip = _wide(G.float())
    X = X / (X.norm() + 1e-30)
    A = X @ X.mT
    A2 = A @ A
    s = A2.norm().sqrt().sqrt() * SAFETY["polar_express"]
    X, A, A2 = X / s, A / s**2, A2 / s**4
    (a, b, c), rest = PE[0], PE[1:]
    X = _quintic(a * X + (b * A + c * A2) @ X, rest)
    return X.mT if flip else X


def mixed_polar_express(G: torch.Tensor) -> torch.Tensor:
    """Lever: Polar Express with steps 2-4 in bfloat16, the first and last in float32."""
    X, flip = _wide(G.float())
    f, h = torch.float32, torch.bfloat16
    X = _quintic(X / (X.norm() * SAFETY["polar_express"] + 1e-6), PE, dtypes=[f, h, h, h, f]).float()
    return X.mT if flip else X


class ReusedBuffers:
    """Lever: muonkit's kernels with their work buffers kept from one call to the next (keyed by
    the order in which a call asks for them), instead of allocated per call."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.count = 0
        self.original = kernels._like

    def like(self, X: torch.Tensor, m: int, n: int) -> torch.Tensor:
        key = (self.count, X.size(0), m, n, X.dtype, X.device)
        self.count += 1
        if key not in self.buffers:
            self.buffers[key] = self.original(X, m, n)
        return self.buffers[key]

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        self.count = 0
        kernels._like = self.like
        try:
            return orthogonalize(G)
        finally:
            kernels._like = self.original

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run on one thread (the thread count is restored afterwards)."""

    def run() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def frobenius_only_(X: torch.Tensor, safety: float, eps: float) -> None:
    """muonkit's normalization before issue 11 (item 5): X / (||X||_F * safety + eps), without
    dividing by the power of two at max |x| first (overflows to zeros for float32 entries near 1e20)."""
    X.div_(torch.linalg.matrix_norm(X, keepdim=True).mul_(safety).add_(eps))


def normalization_rows(repeats: int) -> list[list[object]]:
    """The cost of dividing by the power of two at max |x| before the Frobenius norm: each case's
    default step with the current normalization against the same step with `frobenius_only_`."""
    from bench_step import make_case, muonkit_step, set_grads

    rows = []
    for key in ("c", "g"):
        case = make_case(key, "cpu")
        set_grads(case, case.muon + case.adamw)
        old_step = muonkit_step(case)

        def old() -> None:
            current = kernels._normalize_
            kernels._normalize_ = frobenius_only_
            try:
                old_step()
            finally:
                kernels._normalize_ = current

        t = time_interleaved({"old": old, "new": muonkit_step(case)}, repeats=repeats)
        rows.append([f"({key}) step: max |x| scaling before the Frobenius norm (issue 11 item 5)", case.name.split(")")[0] + ")",
                     "yes (every method)", "Frobenius only", t["old"].median * 1e3, t["new"].median * 1e3,
                     median_ratio(t["new"], t["old"])])
    return rows


def stacking_rows(repeats: int) -> list[list[object]]:
    """Case (a)'s default step against the same step with its 768x768 squares stacked: in runs of
    up to functional.STACK_NUMEL elements (7, 7, 2), and in pairs (the step's temporaries stay
    within the 16 MiB stack budget either way)."""
    from bench_step import make_case, muonkit_step, set_grads

    case = make_case("a", "cpu")
    set_grads(case, case.muon + case.adamw)

    def patched(stack_numel: int) -> Callable[[], None]:
        step = muonkit_step(case)

        def run() -> None:
            saved = functional.STACK_MATRIX_NUMEL, functional.STACK_NUMEL
            functional.STACK_MATRIX_NUMEL, functional.STACK_NUMEL = 1 << 20, stack_numel
            try:
                step()
            finally:
                functional.STACK_MATRIX_NUMEL, functional.STACK_NUMEL = saved

        return run

    t = time_interleaved({"default": muonkit_step(case), "runs of 7": patched(functional.STACK_NUMEL),
                          "pairs": patched(2 * 768 * 768)}, repeats=repeats)
    return [[f"(a) step, squares stacked ({name})", "4 GPT-2 blocks", "no (functional.STACK_MATRIX_NUMEL)",
             "muonkit step", t["default"].median * 1e3, t[name].median * 1e3, median_ratio(t[name], t["default"])]
            for name in ("runs of 7", "pairs")]


# ------------------------------------------------------------------------------ matrix sets


def charlm_momentum(steps: int) -> list[torch.Tensor]:
    """U = lerp(G, M, 0.95) of every Muon matrix of the charlm GPT after `steps` Muon steps."""
    from muonkit.tasks.base import DataOptions
    from muonkit.tasks.charlm import CharLM

    torch.manual_seed(0)
    task = CharLM()
    data = task.load(DataOptions(), torch.device("cpu"))
    model = task.model(data)
    opt = muonkit.Muon(muonkit.param_groups(model), lr=task.lrs["muon"], weight_decay=task.weight_decay)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        inputs, targets = task.batch(data, step, generator)
        opt.zero_grad()
        task.loss(model, inputs, targets).backward()
        if step < steps:
            opt.step()
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    return [torch.lerp(p.grad, torch.lerp(opt.state[p]["momentum_buffer"], p.grad, 0.05), 0.95).detach()
            for p in muon]


def gradient_like(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    U = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))[0]
    S = torch.cat([torch.tensor([30.0, 20, 15, 10], dtype=torch.float64), torch.logspace(0, -3, m - 4, dtype=torch.float64)])
    return ((U * S) @ V.T + 0.01 * torch.randn(m, n, generator=generator, dtype=torch.float64)).float()


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], matrices: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(max error, median error, lowest and highest in-band response) of fn over the matrices."""
    errors, low, high = [], float("inf"), float("-inf")
    for G in matrices:
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        exact = U @ Vh
        O = fn(G).double()
        errors.append(float(torch.linalg.matrix_norm(O - exact) / torch.linalg.matrix_norm(exact)))
        response = torch.einsum("ri,rc,ic->i", U, O, Vh)
        in_band = S / S.norm() >= 1e-3
        low, high = min(low, float(response[in_band].min())), max(high, float(response[in_band].max()))
    return max(errors), statistics.median(errors), low, high


def fusion_rows(repeats: int) -> list[list[object]]:
    """Per case: the default step, the step without its kernel, the elementwise share, and 4/11 of it."""
    from bench_step import make_case, muonkit_step, set_grads

    rows = []
    for key in ("a", "g"):
        case = make_case(key, "cpu")
        set_grads(case, case.muon + case.adamw)
        full, without = muonkit_step(case), muonkit_step(case)

        def no_kernel() -> None:
            original = functional.orthogonalize_
            functional.orthogonalize_ = lambda X, method, steps: X
            try:
                without()
            finally:
                functional.orthogonalize_ = original

        t = time_interleaved({"full": full, "elementwise": no_kernel}, repeats=repeats)
        share = median_ratio(t["elementwise"], t["full"])
        rows.append([case.name, t["full"].median * 1e3, t["elementwise"].median * 1e3, f"{100 * share:.1f}%",
                     f"{100 * share * 4 / 11:.1f}%"])
    return rows


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--write-results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    out = [f"Machine at start: {setup(args.threads)}; {time.strftime('%Y-%m-%d %H:%M')}"]
    print(out[0], flush=True)

    g = torch.Generator().manual_seed(0)
    square, wide = torch.randn(768, 768, generator=g), torch.randn(768, 3072, generator=g)
    squares16 = torch.randn(16, 768, 768, generator=g)
    wide4 = torch.randn(4, 768, 3072, generator=g)
    small = torch.randn(200, 64, 64, generator=g)
    reused_square, reused_small = ReusedBuffers(), ReusedBuffers()
    bf16 = lambda G: orthogonalize(G, dtype=torch.bfloat16)  # noqa: E731
    gram = lambda G: gram_newton_schulz(G, PE, safety=SAFETY["polar_express"], eps=1e-6)  # noqa: E731

    # (lever, in muonkit?, workload name, baseline name, baseline, variant, accuracy function or None)
    levers = [
        ("squares: Gram Newton-Schulz (restarts after steps 2 and 5)", "no (only n >= 2m)", "768x768",
         "muonkit", lambda: orthogonalize(square), lambda: gram(square), gram),
        ("squares: symmetric half products for X X^T and A A", "no", "768x768",
         "plain PE", lambda: plain_polar_express(square), lambda: symmetric_polar_express(square),
         symmetric_polar_express),
        ("squares: 16 of 768x768 as one batch (threads split the batch)", "no (one at a time above 2^18 elements)",
         "16 x 768x768", "muonkit", lambda: [orthogonalize(x) for x in squares16], lambda: orthogonalize(squares16),
         None),
        ("squares: 7 of 768x768 as one batch (odd count)", "no (one at a time above 2^18 elements)",
         "7 x 768x768", "muonkit", lambda: [orthogonalize(x) for x in squares16[:7]],
         lambda: orthogonalize(squares16[:7]), None),
        ("threads: 2 instead of 1 (torch.set_num_threads)", "-", "768x768", "1 thread",
         one_thread(lambda: orthogonalize(square)), lambda: orthogonalize(square), None),
        ("squares: 16 of 768x768 as one batch, 1 thread", "no (one at a time above 2^18 elements)",
         "16 x 768x768", "muonkit", one_thread(lambda: [orthogonalize(x) for x in squares16]),
         one_thread(lambda: orthogonalize(squares16)), None),
        ("rectangles: 4 of 768x3072 as one batch", "no (one at a time above 2^18 elements)",
         "4 x 768x3072", "muonkit", lambda: [orthogonalize(x) for x in wide4], lambda: orthogonalize(wide4), None),
        ("AOL: Turbo-Muon as published (row scaling, 4 steps)", "no", "768x768",
         "plain PE", lambda: plain_polar_express(square), lambda: turbo_muon(square), turbo_muon),
        ("AOL: Turbo-Muon as published (row scaling, 4 steps)", "no", "768x3072",
         "plain PE", lambda: plain_polar_express(wide), lambda: turbo_muon(wide), None),
        (f"AOL bound as one scalar, 4 minimax steps for [{AOL_EDGE:g}, 1]", "no", "768x768",
         "plain PE", lambda: plain_polar_express(square), lambda: aol_scalar_four_steps(square),
         aol_scalar_four_steps),
        ("Schatten-8 bound (from A^2), Polar Express 5 steps", "no", "768x768",
         "plain PE", lambda: plain_polar_express(square), lambda: schatten8_polar_express(square),
         schatten8_polar_express),
        ("bfloat16: ns_dtype='auto' on this CPU", "yes, opt-in (ns_dtype='auto')", "768x768",
         "muonkit", lambda: orthogonalize(square), lambda: bf16(square), bf16),
        ("bfloat16: ns_dtype='auto' on this CPU", "yes, opt-in (ns_dtype='auto')", "768x3072",
         "muonkit", lambda: orthogonalize(wide), lambda: bf16(wide), None),
        ("bfloat16 steps 2-4, fp32 first and last", "no", "768x768",
         "plain PE", lambda: plain_polar_express(square), lambda: mixed_polar_express(square), mixed_polar_express),
        ("work buffers reused across calls", "no", "768x768",
         "muonkit", lambda: orthogonalize(square), lambda: reused_square(square), None),
        ("work buffers reused across calls", "no", "200 x 64x64",
         "muonkit", lambda: orthogonalize(small), lambda: reused_small(small), None),
    ]
    rows = []
    for name, kept, workload, base_name, base, variant, _ in levers:
        t = time_interleaved({"base": base, "variant": variant}, repeats=args.repeats)
        rows.append([name, workload, kept, base_name, t["base"].median * 1e3, t["variant"].median * 1e3,
                     median_ratio(t["variant"], t["base"])])
        print(rows[-1], flush=True)
    rows += stacking_rows(args.repeats) + normalization_rows(args.repeats)
    speed = table(["lever", "workload", "in muonkit", "baseline", "baseline ms", "variant ms", "x baseline"], rows)
    held = f"{reused_square.held_bytes() / 2**20:.1f} MiB for one 768x768, {reused_small.held_bytes() / 2**20:.1f} MiB for 200 x 64x64"
    out.append(f"\nSpeed (median of {args.repeats} rounds, ratio = median of per-round ratios)\n{speed}\n"
               f"Reused buffers stay allocated between steps: {held} (float32), per distinct stack shape.")
    print(out[-1], flush=True)

    sets = {
        f"charlm momentum ({args.train_steps} steps)": charlm_momentum(args.train_steps),
        "random 768x768": [torch.randn(768, 768, generator=g) for _ in range(2)],
        "gradient-like 768x3072": [gradient_like(768, 3072, g)],
    }
    variants = {"muonkit default (fp32 Polar Express)": orthogonalize}
    variants.update({name: fn for name, _, _, _, _, _, fn in levers if fn is not None})
    results = {name: {s: accuracy(fn, ms) for s, ms in sets.items()} for name, fn in variants.items()}
    default = results["muonkit default (fp32 Polar Express)"]
    rows = []
    for name, by_set in results.items():
        holds = all(
            worst <= default[s][0] + ERROR_TOL and median <= default[s][1] + ERROR_TOL
            and low >= min(BAND_LO, default[s][2]) - BAND_TOL and high <= max(BAND_HI, default[s][3]) + BAND_TOL
            for s, (worst, median, low, high) in by_set.items()
        )
        cells = [f"{w:.4f} / {m:.4f} [{lo:.3f}, {hi:.3f}]" for w, m, lo, hi in by_set.values()]
        rows.append([name, *cells, "holds" if holds else "misses"])
    accuracy_table = table(["variant", *[f"{s}: max / median err [in-band range]" for s in sets], "bound"], rows)
    charlm = sets[f"charlm momentum ({args.train_steps} steps)"]
    spread = [float(torch.linalg.matrix_norm(G) / torch.linalg.matrix_norm(G, 2)) for G in charlm]
    band_error = max(1 - BAND_LO, BAND_HI - 1)
    facts = (
        f"Why no normalization lets a step go on real momentum: 4 greedy minimax steps map [l, 1] within "
        f"{band_error:.3f} of 1 only for l >= {lowest_edge(4, band_error):.2e} (5 steps: l >= "
        f"{lowest_edge(5, band_error):.2e}). A direction at sigma/||G||_F = 1e-3 sits at 1e-3 ||G||_F / B after "
        f"normalizing by a bound B >= sigma_max, at most 1e-3 ||G||_F / sigma_max: on the charlm momentum "
        f"||G||_F / sigma_max is {min(spread):.2f}-{max(spread):.2f} (median {statistics.median(spread):.2f}). "
        f"The 4-step schedule used above (lower edge {AOL_EDGE:g}) has error {AOL_ERROR:.3f}."
    )
    out.append(f"\nAccuracy against the float64 polar factor\n{accuracy_table}\n\n{facts}")
    fusion = table(["case", "default step ms", "step without kernel ms", "elementwise share", "fusion saves at most"],
                   fusion_rows(args.repeats))
    out.append(f"\nFusing momentum, lookahead, decay and update (proposal; median of {args.repeats})\n{fusion}")
    out.append(f"\nMachine at end: {environment()}")
    print("\n".join(out[-3:]))
    if args.write_results:
        command = "python benchmarks/bench_levers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("SPEED-LEVERS", f"### Levers (`{command.strip()}`)\n\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
