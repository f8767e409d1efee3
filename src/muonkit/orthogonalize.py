"""Orthogonalizers: tensor in, approximate polar factor out.

Every function here is pure: the input is never modified, the output has the input's shape and
dtype, leading dimensions are a batch of independent matrices, and a zero matrix maps to zero.

For a matrix X = U S V^T the polar factor is U V^T. The quintic Newton-Schulz iteration
X <- a X + (b A + c A^2) X with A = X X^T applies p(s) = a s + b s^3 + c s^5 to every singular
value s at once; a schedule of (a, b, c) per step pushes the singular values of the normalized
input towards 1.

References:
    Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024).
    Amsel, Persson, Musco, Gower, "The Polar Express", arXiv:2505.16932.
    You / Cesista, tuned 5-step quintic schedule (2025).
    Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz" (2026).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

Coefficients = tuple[float, float, float]
Method = Literal["polar_express", "keller_jordan", "you", "gram", "svd"]
Orthogonalizer = Union[Method, Callable[[Tensor, int], Tensor]]

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
    "you": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
        (1.875, -1.25, 0.375),
    ),
}

# Divide by ||X||_F * safety: Polar Express was tuned for inputs with spectral norm <= 1/1.02,
# which leaves room for bf16 round-off.
SAFETY: dict[str, float] = {"keller_jordan": 1.0, "polar_express": 1.02, "you": 1.0}

DEFAULT_STEPS = 5
ORTHOGONALIZERS: tuple[str, ...] = ("polar_express", "keller_jordan", "you", "gram", "svd")

_EPS = 1e-7
# Gram Newton-Schulz rebuilds X and its Gram matrix after this many steps (then every 3) so that
# round-off in the accumulated polynomial Q does not grow with the large early coefficients.
_GRAM_RESTARTS = frozenset({2, 5, 8, 11, 14, 17})


def coefficient_schedule(name: str, steps: int) -> list[Coefficients]:
    """The (a, b, c) of each of `steps` steps of a named schedule, repeating its last entry."""
    table = SCHEDULES[name]
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def working_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """float64 stays float64; otherwise float32 on CPU and bfloat16 on CUDA unless given."""
    if dtype is not None:
        return dtype
    if tensor.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if tensor.device.type == "cuda" else torch.float32


def _as_wide_batch(G: Tensor, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """(batch, m, n) copy of G in `dtype` with m <= n, and whether it was transposed."""
    transposed = G.size(-2) > G.size(-1)
    X = G.mT if transposed else G
    X = X.reshape(-1, X.size(-2), X.size(-1)).to(dtype=dtype, copy=True)
    return X, transposed


def _restore(X: Tensor, G: Tensor, transposed: bool) -> Tensor:
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def _normalize_(X: Tensor, safety: float) -> None:
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    X.div_(norm.mul_(safety).add_(_EPS))


def newton_schulz(
    G: Tensor,
    schedule: Sequence[Coefficients],
    *,
    safety: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Quintic Newton-Schulz with one (a, b, c) per step, on the wide orientation of G.

    Per step: A = X X^T, B = b A + c A A, X <- a X + B X. Three buffers are reused across
    steps (A, B and the next X), so a step allocates nothing.
    """
    X, transposed = _as_wide_batch(G, working_dtype(G, dtype))
    _normalize_(X, safety)
    m = X.size(-2)
    A = X.new_empty(X.size(0), m, m)
    B = torch.empty_like(A)
    Y = torch.empty_like(X)
    for a, b, c in schedule:
        torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        torch.baddbmm(X, B, X, beta=a, out=Y)
        X, Y = Y, X
    return _restore(X, G, transposed)


def gram_newton_schulz(
    G: Tensor,
    schedule: Sequence[Coefficients],
    *,
    safety: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Newton-Schulz on the small Gram matrix: the same polynomial, fewer m x n products.

    With X_k = Q_k X and R_k = X_k X_k^T (all polynomials in X X^T, so they commute):
    P_k = a I + b R_k + c R_k^2, Q_{k+1} = P_k Q_k, R_{k+1} = P_k R_k P_k. The wide X is touched
    only to form R and to apply Q, at the start, at each restart and at the end.
    """
    X, transposed = _as_wide_batch(G, working_dtype(G, dtype))
    _normalize_(X, safety)
    R = torch.bmm(X, X.mT)
    Q: Tensor | None = None
    for step, (a, b, c) in enumerate(schedule):
        if step in _GRAM_RESTARTS and Q is not None:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        P = torch.baddbmm(R, R, R, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        last_of_round = step + 1 == len(schedule) or step + 1 in _GRAM_RESTARTS
        if not last_of_round:
            R = torch.bmm(torch.bmm(P, R), P)
    if Q is not None:
        X = torch.bmm(Q, X)
    return _restore(X, G, transposed)


def svd_polar(G: Tensor, *, dtype: torch.dtype | None = torch.float64) -> Tensor:
    """Exact polar factor U V^T by SVD (float64 by default); zero singular values map to zero."""
    work = dtype if dtype is not None else working_dtype(G, None)
    X = G.reshape(-1, G.size(-2), G.size(-1)).to(work)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    cutoff = S[..., :1] * (max(G.shape[-2:]) * torch.finfo(work).eps)
    keep = (S > cutoff).to(work)
    return ((U * keep.unsqueeze(-2)) @ Vh).reshape(G.shape).to(G.dtype)


def orthogonalize(
    G: Tensor,
    method: Orthogonalizer = "polar_express",
    steps: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor of each matrix in G (the last two dims).

    Args:
        G: tensor of shape (..., rows, cols); not modified.
        method: "polar_express" (default), "keller_jordan", "you", "gram" (Gram Newton-Schulz
            with the Polar Express schedule), "svd" (exact), or a callable (X, steps) -> tensor.
        steps: iterations; None means 5. Steps past a schedule's end repeat its tail, which
            for "polar_express", "you" and "gram" converges to the exact polar factor.
        dtype: working precision; None means float32 on CPU, bfloat16 on CUDA, float64 for
            float64 input (and float64 for "svd").

    Returns:
        A tensor with G's shape and dtype.

    Example:
        >>> O = orthogonalize(torch.randn(4, 64, 256))
        >>> O.shape
        torch.Size([4, 64, 256])
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., rows, cols) tensor, got shape {tuple(G.shape)}")
    n_steps = DEFAULT_STEPS if steps is None else steps
    if n_steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if callable(method):
        out = method(G, n_steps)
        if out.shape != G.shape:
            raise ValueError(
                f"orthogonalizer {method!r} returned shape {tuple(out.shape)} for input {tuple(G.shape)}"
            )
        return out.to(G.dtype)
    if G.numel() == 0:
        return G.clone()
    if method == "svd":
        return svd_polar(G, dtype=dtype if dtype is not None else torch.float64)
    if method == "gram":
        return gram_newton_schulz(
            G,
            coefficient_schedule("polar_express", n_steps),
            safety=SAFETY["polar_express"],
            dtype=dtype,
        )
    if method in SCHEDULES:
        return newton_schulz(
            G, coefficient_schedule(method, n_steps), safety=SAFETY[method], dtype=dtype
        )
    raise ValueError(
        f"unknown orthogonalizer {method!r}; choose one of {', '.join(ORTHOGONALIZERS)} or pass a callable"
    )
