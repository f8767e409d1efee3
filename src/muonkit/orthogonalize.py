"""Orthogonalizers: tensor in, approximate polar factor out.

Every function here is pure: the input is never modified, the output has the input's shape and
dtype, leading dimensions are a batch of independent matrices, a zero matrix maps to zero, and the
output does not depend on the input's scale (each matrix is divided by the power of two at its
largest entry before the Frobenius normalization, so every finite input gives its polar factor).

For a matrix X = U S V^T the polar factor is U V^T. The quintic Newton-Schulz iteration
X <- a X + (b A + c A^2) X with A = X X^T applies p(s) = a s + b s^3 + c s^5 to every singular
value s at once; a schedule of (a, b, c) per step pushes the singular values of the normalized
input towards 1.

References:
    Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024).
    Amsel, Persson, Musco, Gower, "The Polar Express", arXiv:2505.16932.
    You / Cesista, tuned 5-step quintic schedule (2025).
    Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz" (2026).
    Huang, "How Much Orthogonalization Does Muon Need?", arXiv:2606.00371 (cubic5).
    Boissin, Massena, Mamalet, Serrurier, "Turbo-Muon", arXiv:2512.04632 (AOL preconditioning);
    Prach, Lampert, "Almost-Orthogonal Layers", arXiv:2208.03160.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]
Method = Literal["polar_express", "keller_jordan", "you", "cubic5", "aol", "gram", "svd"]
Orthogonalizer = Union[Method, Callable[[Tensor, int], Tensor]]
# A working dtype: a floating torch.dtype, or None (the machine's default, `default_ns_dtype`);
# "auto" is an alias of None kept for older code and checkpoints; see `working_dtype`.
NsDtype = Union[torch.dtype, Literal["auto"], None]

# You / Cesista's 5 tuned steps and the convergent tail after them ("you", and "aol" after its scaling).
_YOU: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
    (1.875, -1.25, 0.375),
)
# (a, b, c) per step. After the last listed step a schedule repeats its tail entry.
SCHEDULES: dict[str, tuple[Coefficients, ...]] = {
    # Keller Jordan's quintic: maximal slope at zero, singular values land in ~[0.5, 1.2].
    "keller_jordan": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (arXiv:2505.16932), 5 steps tuned for safety factor 1.02; the tail
    # (1.875, -1.25, 0.375) is the convergent quintic with p(1) = 1, p'(1) = 0, p''(1) = 0.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        (1.875, -1.25, 0.375),
    ),
    # You / Cesista tuned 5 steps; continues with the same convergent tail.
    "you": _YOU,
    # cubic5 (Huang, arXiv:2606.00371): X <- a X + b (X X^T) X, two products a step instead of
    # three. Each step is the classic cubic 1.5 y - 0.5 y^3 at y = alpha x, scaled by u = 1.3: it
    # maps the current band [l, r] into [p(l), 1.3], alpha = (mean of x^2 over [l, r])^(-1/2),
    # starting from l = 7e-3, r = 1 (`cubic5_coefficients`). After 5 steps [7e-3, 1] lies in
    # [0.77, 1.3]: a loose band, by design. Past step 5 the classic cubic (1.5, -0.5) converges to 1.
    "cubic5": (
        (3.3656576453026874, -3.3420991881255913, 0.0),
        (2.5744352167003366, -1.4957376498043133, 0.0),
        (2.536896217781012, -1.4312570057421792, 0.0),
        (2.441890631764536, -1.276403977018072, 0.0),
        (2.2230472113940625, -0.9630649572307908, 0.0),
        (1.5, -0.5, 0.0),
    ),
    # AOL / Turbo-Muon (arXiv:2512.04632): You's 5 steps after the AOL preconditioner; with k <= 5
    # steps it runs the last k of them (the authors' choice: Turbo-Muon is k = 4, dropping You's
    # first, most aggressive step), with more it continues with the convergent tail.
    "aol": _YOU,
}
# Schedules whose first (len - 1) entries are run from the end when fewer steps are asked for.
_FROM_END = frozenset({"aol"})

# Divide by ||X||_F * safety (after scaling max |x| into [1, 2), see `_normalize_`): Polar Express was tuned
# for inputs with spectral norm <= 1/1.02, which leaves room for bf16 round-off.
SAFETY: dict[str, float] = {
    "keller_jordan": 1.0, "polar_express": 1.02, "you": 1.0, "cubic5": 1.0, "aol": 1.0,
}
# ... + eps: Keller Jordan's 1e-7, Polar Express's 1e-6 (its paper's reference code; docs/references.md
# section 3). After that scaling the norm is at least 1, so eps shifts the normalized singular
# values by at most this much, relatively. "aol" does not divide by the Frobenius norm: its eps is
# the floor on each row's absolute Gram sum (the Turbo-Muon authors' 1e-7), which keeps a zero row
# zero.
EPS: dict[str, float] = {
    "keller_jordan": 1e-7, "polar_express": 1e-6, "you": 1e-7, "cubic5": 1e-7, "aol": 1e-7,
}

DEFAULT_STEPS = 5
ORTHOGONALIZERS: tuple[str, ...] = ("polar_express", "keller_jordan", "you", "cubic5", "aol", "gram", "svd")
# The schedules that run as Gram Newton-Schulz on the shapes `uses_gram` names.
GRAM_SCHEDULES = frozenset({"polar_express", "cubic5", "aol"})

# Gram Newton-Schulz rebuilds X and its Gram matrix after this many steps (then every 3) so that
# round-off in the accumulated polynomial Q does not grow with the large early coefficients.
_GRAM_RESTARTS = frozenset({2, 5, 8, 11, 14, 17})
# The default schedule runs as Gram Newton-Schulz on matrices at least this wide (n >= 2 m) and
# this large: there it was 1.3-1.6x faster in fp32 and agrees with the standard iteration to fp32
# round-off (benchmarks/RESULTS.md). Smaller matrices are overhead-bound and the m^3 terms eat
# the gain below n = 2 m.
GRAM_MIN_ASPECT = 2.0
GRAM_MIN_SIDE = 64
# Below this many rows (of the wide orientation) products run one matrix at a time, each matrix
# starting on a 64-byte boundary: for m <= 11 MKL on this CPU rounds a batched GEMM differently
# from a single one, and a GEMM's result depends on its output's alignment, while the stacked
# and per-matrix paths must agree bit for bit (tests/test_speed_contracts.py).
_LOOP_BELOW = 16
_ALIGN_BYTES = 64
# ... except where torch's batched product is its own plain loop: in float32 and float64, below this
# many multiply-adds per matrix (contraction * rows * cols, ATen's bmm_out_or_baddbmm_), bmm and
# baddbmm compute each matrix of the batch with the same scalar loop, so the bits do not depend on
# the batch, and one call replaces one per matrix (ATen offers 16-bit products to oneDNN first,
# and a bfloat16 batch of 2 x 49 matrices did change bits). A depthwise filter read per channel (96 matrices of 1 x 9) ran ~10,000
# single-matrix products per step for its 7 filters (benchmarks/bench_small_matrices.py).
_TINY_PRODUCT = 400


def coefficient_schedule(name: str, steps: int) -> list[Coefficients]:
    """The (a, b, c) of each of `steps` steps of a named schedule, repeating its last entry.

    "aol" with steps <= 5 runs the last `steps` of its 5 tuned steps (Turbo-Muon's 4 skip the first).
    """
    table = SCHEDULES[name]
    if name in _FROM_END and steps < len(table):
        return list(table[len(table) - 1 - steps : len(table) - 1])
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def cubic5_coefficients(lower: float = 7e-3, upper: float = 1.3, steps: int = 5) -> list[tuple[float, float]]:
    """The relaxed cubic schedule of arXiv:2606.00371 (the closed form that gives SCHEDULES["cubic5"]).

    Step t maps the band [l, r] of normalized singular values (r = 1 at the start, then `upper`)
    by p(x) = upper (1.5 alpha x - 0.5 (alpha x)^3), alpha = ((r^2 + r l + l^2) / 3)^(-1/2): p
    peaks at `upper` where alpha x = 1, and the new lower edge is p(l).

    Example:
        >>> [round(a, 4) for a, _ in cubic5_coefficients()][:2]
        [3.3657, 2.5744]
    """
    coefficients, low, high = [], lower, 1.0
    for _ in range(steps):
        alpha = 1.0 / math.sqrt((high * high + high * low + low * low) / 3.0)
        a, b = 1.5 * upper * alpha, -0.5 * upper * alpha**3
        coefficients.append((a, b))
        low, high = a * low + b * low**3, upper
    return coefficients


def bfloat16_speed_from_cpuinfo(cpuinfo: str) -> tuple[bool, str]:
    """Whether the CPU described by the text of /proc/cpuinfo multiplies bfloat16 matrices faster
    than float32 ones, and why, as measured with torch's CPU kernels (benchmarks/RESULTS.md):

    - AMX-BF16 (any vendor): the tile units multiply bfloat16 natively: True.
    - AVX512_BF16 on AMD (vendor AuthenticAMD): a bfloat16 product took 0.34-0.43 of the float32
      time (AMD EPYC): True.
    - AVX512_BF16 on another vendor without AMX: False. On an Intel Xeon (family 6, model 207) whose
      virtual machine exposes avx512_bf16 but not AMX, a bfloat16 product took 1.6-2.0x the float32
      time (2026-12-07): the flag alone does not make bfloat16 faster.
    - Neither flag (AVX2 only): False; bfloat16 products took 50-100x the float32 time.
    """
    flags: set[str] = set()
    vendor = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
    if "amx_bf16" in flags:
        return True, "this CPU multiplies bfloat16 natively (AMX-BF16)"
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return True, "this CPU multiplies bfloat16 natively (AMD with AVX512_BF16)"
    if "avx512_bf16" in flags:
        return False, ("this CPU has AVX512_BF16 without AMX and is not AMD, where bfloat16 products "
                       "measured 1.6-2.0x slower than float32")
    return False, "this CPU has no native bfloat16 products (no AVX512_BF16 or AMX), where bfloat16 is 50-100x slower"


def cpu_bfloat16_speed() -> tuple[bool, str]:
    """`bfloat16_speed_from_cpuinfo` for this machine; (False, why) without /proc/cpuinfo or without
    oneDNN in torch (which bfloat16 CPU products need)."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch has no oneDNN here, which bfloat16 CPU products need"
    try:
        with open("/proc/cpuinfo") as f:
            return bfloat16_speed_from_cpuinfo(f.read())
    except OSError:
        return False, "/proc/cpuinfo cannot be read, so this CPU's bfloat16 speed is unknown"


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices faster than float32 ones (`cpu_bfloat16_speed`:
    AMX-BF16, or AVX512_BF16 on AMD)."""
    return cpu_bfloat16_speed()[0]


# Read once at import: torch.compile cannot trace the file read, and the answer does not change.
# CPU_FAST_BFLOAT16 is what default_ns_dtype reads (tests set it to try both answers); the reason
# goes with the answer this CPU gave.
CPU_FAST_BFLOAT16, CPU_BFLOAT16_REASON = _MACHINE_BFLOAT16 = cpu_bfloat16_speed()


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype Newton-Schulz iterates in on `device` when ns_dtype is None: the fastest accurate one.

    bfloat16 on CUDA and on CPUs that multiply bfloat16 matrices faster than float32 ones (AMX-BF16,
    or AVX512_BF16 on AMD; CPU_FAST_BFLOAT16 from `cpu_bfloat16_speed`): there a product costs
    0.34-0.43 of float32's, and the polar error stays below that of every peer using Keller Jordan's
    coefficients (0.127 vs 0.27; float32 0.093; benchmarks/RESULTS.md, Peers). float32 elsewhere: on
    AVX2-only CPUs bfloat16 products are 50-100 times slower, on an Intel CPU with AVX512_BF16 but no
    AMX 1.6-2.0 times slower. `default_ns_dtype_reason` says which case applied. float64 input is not covered here: it always stays float64 (`working_dtype`).

    Example:
        >>> default_ns_dtype("cuda")
        torch.bfloat16
    """
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and CPU_FAST_BFLOAT16):
        return torch.bfloat16
    return torch.float32


def default_ns_dtype_reason(device: torch.device | str) -> str:
    """Why `default_ns_dtype(device)` is what it is, in one line (what `muonkit.explain` prints)."""
    kind = torch.device(device).type
    chosen = str(default_ns_dtype(device)).removeprefix("torch.")
    if kind == "cuda":
        why = "CUDA multiplies bfloat16 natively"
    elif kind == "cpu" and CPU_FAST_BFLOAT16 == _MACHINE_BFLOAT16[0]:
        why = CPU_BFLOAT16_REASON
    elif kind == "cpu":
        why = ("this CPU multiplies bfloat16 natively" if CPU_FAST_BFLOAT16
               else "this CPU's bfloat16 products are not faster than float32 ones")
    else:
        why = f"bfloat16 is only chosen on CUDA and on CPUs with native bfloat16 products, not on {kind}"
    # Name the other choice: "ns_dtype=torch.float32 gives float32" where float32 is already the
    # default read as if it were a change.
    other = ("ns_dtype=torch.float32 gives float32 (more accurate, slower)" if chosen == "bfloat16"
             else "ns_dtype=torch.bfloat16 asks for bfloat16 anyway")
    return (f"Newton-Schulz runs in {chosen} on {kind} by default (ns_dtype=None): {why}; "
            f"{other}; float64 state stays float64.")


def working_dtype(tensor: Tensor, dtype: NsDtype) -> torch.dtype:
    """The dtype Newton-Schulz iterates in for `tensor`.

    A torch.dtype is used as given (ns_dtype=torch.float32 gives float32 everywhere). Otherwise
    float64 input stays float64, and any other input gets `default_ns_dtype(tensor.device)`:
    bfloat16 on CUDA and on CPUs with native bfloat16 products, float32 elsewhere. "auto" means
    the same as None (before the default followed the machine, it asked for this choice).

    Example:
        >>> working_dtype(torch.zeros(2, 2), torch.float32)
        torch.float32
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if tensor.dtype == torch.float64:
        return torch.float64
    return default_ns_dtype(tensor.device)


def uses_gram(rows: int, cols: int) -> bool:
    """Whether "polar_express" (the default), "cubic5" and "aol" run as Gram Newton-Schulz on a
    rows x cols matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return m >= GRAM_MIN_SIDE and n >= GRAM_MIN_ASPECT * m


def empty_work(
    batch: int, rows: int, cols: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Tensor:
    """An uninitialized (batch, rows, cols) buffer for `orthogonalize_`.

    It is contiguous in the wide orientation (the transpose of a contiguous tensor when
    rows > cols), so the kernels read it without a transposing copy.
    """
    if rows > cols:
        return _stack(batch, cols, rows, dtype=dtype, device=device).mT
    return _stack(batch, rows, cols, dtype=dtype, device=device)


def _matrix_step(m: int, n: int, dtype: torch.dtype) -> int:
    """Elements from one matrix of a stack to the next: m n, rounded up to 64 bytes below
    _LOOP_BELOW rows so that every matrix starts on a 64-byte boundary."""
    if m >= _LOOP_BELOW:
        return m * n
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    return -(-m * n // align) * align


def _stack(batch: int, m: int, n: int, *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialized (batch, m, n) stack of row-major matrices laid out by `_matrix_step`."""
    step = _matrix_step(m, n, dtype)
    return torch.empty(batch * step, dtype=dtype, device=device).as_strided((batch, m, n), (step, n, 1))


def _work_copy(G: Tensor, dtype: NsDtype) -> Tensor:
    """G as a fresh (batch, rows, cols) work buffer in the working dtype."""
    X = empty_work(G[..., 0, 0].numel(), G.size(-2), G.size(-1), dtype=working_dtype(G, dtype), device=G.device)
    return X.copy_(G.reshape(X.shape))


def _like(X: Tensor, m: int, n: int) -> Tensor:
    return _stack(X.size(0), m, n, dtype=X.dtype, device=X.device)


def _normalize_(X: Tensor, safety: float, eps: float, *, frobenius: bool = True) -> None:
    """X <- Y / (||Y||_F * safety + eps) with Y = X / 2^floor(log2 max |x|), each matrix on its own
    (X <- Y only, without `frobenius`: the AOL preconditioner in the kernel scales the rows).

    The polar factor does not depend on scale, and dividing by (the power of two at) the largest
    entry first makes 1 <= max |y| < 2 and ||Y||_F <= 2 sqrt(m n) for every finite nonzero X: in
    float32 an X with entries near 1e20 has ||X||_F = inf (which would give zeros), and one near
    1e-30 would be swamped by eps. A power of two divides exactly, so Y / ||Y||_F has the bits
    of X / ||X||_F wherever eps does not change the rounded denominator. A zero matrix stays zero.
    """
    # max |x| as max(max x, -min x): two plain reductions, ~20x faster on CPU than the inf-norm
    # (torch.linalg.vector_norm(X, inf)), which reads X through abs() per element; same value,
    # NaN included.
    peak = torch.maximum(X.amax(dim=(-2, -1), keepdim=True), X.amin(dim=(-2, -1), keepdim=True).neg_())
    scale = torch.exp2(torch.floor(torch.log2(peak)))
    X.div_(scale.masked_fill_(peak == 0, 1.0))
    if not frobenius:
        return
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    X.div_(norm.mul_(safety).add_(eps))


# One matrix at a time. unbind makes the views x[i] would, in one call per operand (the products
# are the same; for the seed notebook net's 7 depthwise filters this loop is ~100 small products
# per step, where indexing cost as much as multiplying).
def _looped_bmm(a: Tensor, b: Tensor, *, out: Tensor) -> Tensor:
    for x, y, o in zip(a.unbind(), b.unbind(), out.unbind()):
        torch.mm(x, y, out=o)
    return out


def _looped_baddbmm(c: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0, alpha: float = 1.0, out: Tensor) -> Tensor:
    for z, x, y, o in zip(c.unbind(), a.unbind(), b.unbind(), out.unbind()):
        torch.addmm(z, x, y, beta=beta, alpha=alpha, out=o)
    return out


def _products(m: int, n: int, dtype: torch.dtype) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(bmm, baddbmm) for a wide batch of m x n matrices: torch's batched kernels, or loops.

    The largest product of either kernel is (m x m) @ (m x n): below _TINY_PRODUCT multiply-adds
    every product is tiny, and in float32/float64 torch's batched kernels are batch-invariant."""
    tiny = m * m * n < _TINY_PRODUCT and dtype in (torch.float32, torch.float64)
    if m >= _LOOP_BELOW or tiny:
        return torch.bmm, torch.baddbmm
    return _looped_bmm, _looped_baddbmm


def _carve(buffer: Tensor, count: int, m: int) -> list[Tensor]:
    """`count` (batch, m, m) scratch views laid end to end in a contiguous (batch, m, n) buffer."""
    if count == 0:
        return []
    flat = buffer.view(-1)
    size = buffer.size(0) * m * m
    return [flat[i * size : (i + 1) * size].view(-1, m, m) for i in range(count)]


def _aol_(X: Tensor, A: Tensor, floor: float) -> None:
    """AOL preconditioning: X <- D X and A <- D A D for A = X X^T, D = diag(s),
    s_i = max(sum_j |A_ij|, floor)^(-1/2), each matrix of the batch on its own.

    Then ||D X||_2 <= 1 (Prach and Lampert's AOL bound, Theorem 1 of arXiv:2208.03160, applied to
    X^T): the row sums bound the spectral norm more tightly than ||X||_F does, so more of the
    spectrum starts near 1. A Gram matrix already formed is reused, so this costs no product. D
    does not commute with X's singular vectors: the result tends to the polar factor of D X, which
    is the polar factor of X when the rows of X have equal weight in the row sums and close to it
    otherwise (Turbo-Muon, arXiv:2512.04632).
    """
    s = A.abs().sum(dim=-1).clamp_min_(floor).rsqrt_()
    X.mul_(s.unsqueeze(-1))
    A.mul_(s.unsqueeze(-1)).mul_(s.unsqueeze(-2))


def _newton_schulz_(X: Tensor, schedule: Sequence[Coefficients], *, aol: float | None = None) -> Tensor:
    """Quintic Newton-Schulz on a normalized, contiguous, wide (batch, m, n) X; overwrites X.

    bmm/baddbmm into reused buffers, so a step allocates nothing: X, the next X (which also holds
    A = X X^T until B = b A + c A^2 has been formed) and B; 2 + m/n matrix sizes. A step with
    c = 0 is cubic, X <- a X + b A X: two products, A held in B's buffer. `aol`: precondition X with
    `_aol_` (this floor) instead of having been divided by its norm; the first step reuses its A.
    """
    m, n = X.size(-2), X.size(-1)
    bmm, baddbmm = _products(m, n, X.dtype)
    B = _like(X, m, m)
    Y = _like(X, m, n)
    own_A = _like(X, m, m) if m < _LOOP_BELOW else None

    def gram_buffer(c: float) -> Tensor:
        if c == 0.0:
            return B
        return own_A if own_A is not None else _carve(Y, 1, m)[0]

    if aol is not None:
        A = gram_buffer(schedule[0][2] if schedule else 0.0)
        bmm(X, X.mT, out=A)
        _aol_(X, A, aol)
    for step, (a, b, c) in enumerate(schedule):
        A = gram_buffer(c)
        if step > 0 or aol is None:
            bmm(X, X.mT, out=A)
        if c == 0.0:
            baddbmm(X, A, X, beta=a, alpha=b, out=Y)
        else:
            baddbmm(A, A, A, beta=b, alpha=c, out=B)
            baddbmm(X, B, X, beta=a, out=Y)
        X, Y = Y, X
    return X


def _gram_newton_schulz_(X: Tensor, schedule: Sequence[Coefficients], *, aol: float | None = None) -> Tensor:
    """Gram Newton-Schulz on a normalized, contiguous, wide (batch, m, n) X; overwrites X.

    Buffers: X, a spare m x n for Q X, Q, and the scratch R, P and T, carved from the spare
    while it is free (as many as fit; the rest allocated once): 2 + m/n matrix sizes for n >= 3m,
    3 for n = 2m. A cubic step (c = 0) forms P = a I + b R without a product. `aol`: as in
    `_newton_schulz_`, preconditioning X and its first R.
    """
    m, n = X.size(-2), X.size(-1)
    bmm, baddbmm = _products(m, n, X.dtype)
    Y = _like(X, m, n)
    Q = _like(X, m, m)
    carved = 0 if m < _LOOP_BELOW else min(3, n // m)
    extra = [_like(X, m, m) for _ in range(3 - carved)]
    R, P, T = _carve(Y, carved, m) + extra
    bmm(X, X.mT, out=R)
    if aol is not None:
        _aol_(X, R, aol)
    q_is_identity = True
    for step, (a, b, c) in enumerate(schedule):
        if step in _GRAM_RESTARTS and not q_is_identity:
            bmm(Q, X, out=Y)
            X, Y = Y, X
            R, P, T = _carve(Y, carved, m) + extra
            bmm(X, X.mT, out=R)
            q_is_identity = True
        if c == 0.0:
            torch.mul(R, b, out=P)
        else:
            baddbmm(R, R, R, beta=b, alpha=c, out=P)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        if step + 1 < len(schedule) and step + 1 not in _GRAM_RESTARTS:
            bmm(P, R, out=T)
            bmm(T, P, out=R)
        if q_is_identity:
            Q.copy_(P)
            q_is_identity = False
        else:
            bmm(P, Q, out=T)
            Q.copy_(T)
    if not q_is_identity:
        bmm(Q, X, out=Y)
        X = Y
    return X


Kernel = Callable[..., Tensor]


def _iterate_(X: Tensor, kernel: Kernel, schedule: Sequence[Coefficients], safety: float, eps: float,
              *, aol: bool = False) -> Tensor:
    """Normalize X (a buffer from `empty_work`) in place and run `kernel` on its wide view
    (with `aol`, scale it by a power of two only, and let the kernel precondition it, eps its floor)."""
    transposed = X.size(-2) > X.size(-1)
    W = X.mT if transposed else X
    m, n = W.shape[-2:]
    if W.stride() != (_matrix_step(m, n, W.dtype), n, 1) or _misaligned(W):
        W = _like(W, m, n).copy_(W)
    _normalize_(W, safety, eps, frobenius=not aol)
    W = kernel(W, schedule, aol=eps) if aol else kernel(W, schedule)
    return W.mT if transposed else W


def _misaligned(W: Tensor) -> bool:
    """Whether W's first matrix is off a 64-byte boundary. Under torch.compile this is False
    without reading the address (a graph break): compiled code is not bit-identical to eager
    anyway (benchmarks/RESULTS.md), and buffers from `empty_work` are aligned."""
    return not torch.compiler.is_compiling() and W.data_ptr() % _ALIGN_BYTES != 0


def _run(G: Tensor, kernel: Kernel, schedule: Sequence[Coefficients], safety: float, eps: float,
         dtype: NsDtype) -> Tensor:
    return _iterate_(_work_copy(G, dtype), kernel, schedule, safety, eps).reshape(G.shape).to(G.dtype)


def newton_schulz(
    G: Tensor,
    schedule: Sequence[Coefficients],
    *,
    safety: float = 1.0,
    eps: float = 1e-7,
    dtype: NsDtype = None,
) -> Tensor:
    """Quintic Newton-Schulz with one (a, b, c) per step, on the wide orientation of G.

    Per step: A = X X^T, B = b A + c A A, X <- a X + B X: 4 m^2 n + 2 m^3 flops for m <= n.
    """
    return _run(G, _newton_schulz_, schedule, safety, eps, dtype)


def gram_newton_schulz(
    G: Tensor,
    schedule: Sequence[Coefficients],
    *,
    safety: float = 1.0,
    eps: float = 1e-7,
    dtype: NsDtype = None,
) -> Tensor:
    """Newton-Schulz on the small Gram matrix: the same polynomial, fewer m x n products.

    With X_k = Q_k X and R_k = X_k X_k^T (all polynomials in X X^T, so they commute):
    P_k = a I + b R_k + c R_k^2, Q_{k+1} = P_k Q_k, R_{k+1} = P_k R_k P_k. The wide X is touched
    only to form R and to apply Q, at the start, at each restart and at the end: 5 steps cost
    8 m^2 n + 28 m^3 flops instead of 20 m^2 n + 10 m^3.
    """
    return _run(G, _gram_newton_schulz_, schedule, safety, eps, dtype)


def orthogonalize_(X: Tensor, method: Method = "polar_express", steps: int | None = None) -> Tensor:
    """Orthogonalize each matrix of X, a (batch, rows, cols) buffer from `empty_work`; overwrites X.

    The in-place core of `orthogonalize`, for callers that own a work buffer in the working
    dtype: functional.muon writes momentum updates of same-shaped matrices straight into one.
    Every operation acts on each matrix of the batch on its own, so a matrix gives the same bits
    alone or in a stack. Methods: the Newton-Schulz schedules (with "cubic5" and "aol") and "gram".

    Returns:
        (batch, rows, cols) in X's dtype: a view of X or of a new buffer.
    """
    n_steps = DEFAULT_STEPS if steps is None else steps
    if method == "gram" or (method in GRAM_SCHEDULES and uses_gram(X.size(-2), X.size(-1))):
        kernel, name = _gram_newton_schulz_, "polar_express" if method == "gram" else method
    elif method in SCHEDULES:
        kernel, name = _newton_schulz_, method
    else:
        raise ValueError(f"orthogonalize_ runs {', '.join(SCHEDULES)} or 'gram', not {method!r}")
    if X.numel() == 0:
        return X
    return _iterate_(X, kernel, coefficient_schedule(name, n_steps), SAFETY[name], EPS[name], aol=name == "aol")


def svd_polar(G: Tensor, *, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Exact polar factor U V^T by SVD (float64 by default); zero singular values map to zero.

    LAPACK scales its input internally, so every finite input gives its polar factor (tested from
    1e-40 to 1e30 in float32). torch has no SVD in 16-bit floats: for those the SVD runs in float32
    and the factor is rounded to the requested dtype.
    """
    work = dtype if dtype is not None else working_dtype(G, None)
    rounding = work if work.itemsize < 4 else None
    if rounding is not None:
        work = torch.float32
    X = G.reshape(-1, G.size(-2), G.size(-1)).to(work)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    cutoff = S[..., :1] * (max(G.shape[-2:]) * torch.finfo(work).eps)
    keep = (S > cutoff).to(work)
    O = (U * keep.unsqueeze(-2)) @ Vh
    if rounding is not None:
        O = O.to(rounding)
    return O.reshape(G.shape).to(G.dtype)


@torch.no_grad()
def orthogonalize(
    G: Tensor,
    method: Orthogonalizer = "polar_express",
    steps: int | None = None,
    *,
    dtype: NsDtype = None,
) -> Tensor:
    """Approximate polar factor of each matrix in G (the last two dims).

    For G = U S V^T the polar factor is U V^T; it does not depend on G's scale, and every finite
    G gives it (each matrix is divided by the power of two at its largest entry before the
    Frobenius normalization).
    Every method runs without autograd, as an optimizer step does: the result never requires
    grad, also for an input that does.

    Args:
        G: real floating-point tensor of shape (..., rows, cols); not modified.
        method: "polar_express" (default), "keller_jordan", "you", "cubic5" (Huang's relaxed
            cubic: 10 products for 5 steps instead of 15; singular values land in [0.77, 1.3]),
            "aol" (Turbo-Muon: AOL row scaling instead of the Frobenius norm, then You's schedule;
            its published setting is steps=4, 12 products), "gram" (Gram Newton-Schulz with the
            Polar Express schedule), "svd" (exact), or a callable (X, steps) -> tensor. Polar
            Express with 4 steps (12 products) is method="polar_express", steps=4.
        steps: iterations; None means 5. Steps past a schedule's end repeat its tail, which
            for "polar_express", "you", "cubic5", "aol" and "gram" converges to the exact polar
            factor; "aol" with fewer than 5 runs the last `steps` of You's 5.
        dtype: working precision; None (or its alias "auto") means float64 for float64 input
            (and float64 for "svd"), else the machine's default `default_ns_dtype(G.device)`:
            bfloat16 on CUDA and on CPUs with native bfloat16 products, float32 elsewhere.

    Returns:
        A tensor with G's shape and dtype.

    Raises:
        TypeError: G is not a tensor, or its dtype is an integer, bool or complex one.

    Example:
        >>> O = orthogonalize(torch.randn(4, 64, 256))
        >>> O.shape
        torch.Size([4, 64, 256])
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"orthogonalize needs a tensor, got {type(G).__name__}")
    if not G.dtype.is_floating_point:
        raise TypeError(
            f"orthogonalize needs a real floating-point tensor, got dtype {G.dtype}; convert it first (G.float())"
        )
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., rows, cols) tensor, got shape {tuple(G.shape)}")
    n_steps = _check_steps(steps)
    check_ns_dtype(dtype, "dtype")
    if not callable(method) and method not in ORTHOGONALIZERS:
        raise ValueError(
            f"unknown orthogonalizer {method!r}; choose one of {', '.join(ORTHOGONALIZERS)} or pass a callable"
        )
    if callable(method):
        # A clone, so that a user's in-place kernel cannot corrupt the momentum buffer it was given.
        out = method(G.clone(), n_steps)
        if out.shape != G.shape:
            raise ValueError(
                f"orthogonalizer {method!r} returned shape {tuple(out.shape)} for input {tuple(G.shape)}"
            )
        return out.to(G.dtype)
    if G.numel() == 0:
        return G.clone()
    if method == "svd":
        return svd_polar(G, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float64)
    return orthogonalize_(_work_copy(G, dtype), method, n_steps).reshape(G.shape).to(G.dtype)


def check_ns_dtype(dtype: object, name: str) -> None:
    """ValueError unless `dtype` is None, "auto" or a floating torch.dtype; `name` is the option's."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{name} must be None, 'auto' or a floating torch.dtype, got {dtype!r}")


def _check_steps(steps: object) -> int:
    """`steps` as an int (None means DEFAULT_STEPS); a clear error for anything but a count >= 0."""
    if steps is None:
        return DEFAULT_STEPS
    try:
        count = operator.index(steps)
    except TypeError:
        raise TypeError(f"steps must be a whole number, got {steps!r}") from None
    if count < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return count
