"""Slow, obviously-correct float64 oracles for the muonkit tests.

Nothing here imports muonkit: these functions are written from docs/API.md and
docs/references.md only, so that the tests compare two independent implementations.

- `polar_factor`: the exact polar factor U V^T of a (batch of) matrix via a float64 SVD, with
  zero singular values mapped to zero (the partial isometry of a rank-deficient matrix).
- `apply_spectral`: U f(S) V^T for a scalar function f, the exact image of an odd matrix
  polynomial iteration; used to predict what a Newton-Schulz schedule does to each singular value.
- `scalar_image`: the band a coefficient schedule maps an interval of normalized singular values to.
- `update_scale`: the four scale rules.
- `matrices_of` / `from_matrices`: the matrix views of a parameter ('matrix', 'conv', 'stacked'
  or explicit axes), as copies.
- `ReferenceMuon`: the Muon update, one matrix at a time, float64, in the EMA form of docs/references.md
  section 1 (written with explicit arithmetic, not lerp).
- `assert_same` / `state_is_pristine`: state dicts equal bit for bit; state never advanced.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

# Coefficient schedules (a, b, c) and input normalization X / (s ||X||_F + eps), from docs/references.md
# section 3 (eps 1e-6 for Polar Express; 1e-7, Keller Jordan's, for the others), applied after
# dividing X by the power of two at its largest entry (docs/API.md: every finite input gives its
# polar factor).
KELLER_JORDAN = [(3.4445, -4.7750, 2.0315)] * 5
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
POLAR_EXPRESS_TAIL = (1.875, -1.25, 0.375)
YOU = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
SCHEDULES = {
    "keller_jordan": (KELLER_JORDAN, 1.0, 1e-7),
    "polar_express": (POLAR_EXPRESS, 1.02, 1e-6),
    "you": (YOU, 1.0, 1e-7),
}


def schedule(method: str, steps: int = 5) -> list[tuple[float, float, float]]:
    """The (a, b, c) list a method applies for `steps` iterations (docs/references.md section 3)."""
    coeffs, _, _ = SCHEDULES[method]
    if method == "keller_jordan":
        return [coeffs[0]] * steps
    if method == "polar_express":
        return (coeffs + [POLAR_EXPRESS_TAIL] * max(0, steps - len(coeffs)))[:steps]
    assert steps <= len(coeffs), "only the published 5-step 'you' schedule is known"
    return coeffs[:steps]


def scalar_poly(method: str, x: np.ndarray | torch.Tensor, steps: int = 5):
    """The composed odd polynomial applied to already-normalized singular values x."""
    for a, b, c in schedule(method, steps):
        x = a * x + b * x**3 + c * x**5
    return x


def scalar_image(method: str, lo: float, hi: float = 1.0, steps: int = 5, n: int = 200_001):
    """(min, max) of the schedule over normalized inputs sigma/||X||_F in [lo, hi] (dense grid)."""
    _, s, _ = SCHEDULES[method]
    x = np.geomspace(lo, hi, n) / s
    y = scalar_poly(method, x, steps)
    return float(y.min()), float(y.max())


def _svd64(G: torch.Tensor):
    X = G.detach().to(torch.float64)
    return torch.linalg.svd(X, full_matrices=False)


def rank_tolerance(S: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """numpy.linalg.matrix_rank's default cut-off: max(S) * max(rows, cols) * eps(float64)."""
    return S.amax(dim=-1, keepdim=True) * max(rows, cols) * torch.finfo(torch.float64).eps


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U V^T in float64, batched over leading dims; zero singular values -> 0."""
    U, S, Vh = _svd64(G)
    keep = (S > rank_tolerance(S, G.shape[-2], G.shape[-1])).to(torch.float64)
    return (U * keep.unsqueeze(-2)) @ Vh


def apply_spectral(G: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """U f(S) V^T in float64 (batched)."""
    U, S, Vh = _svd64(G)
    return (U * f(S).unsqueeze(-2)) @ Vh


def ns_spectral(G: torch.Tensor, method: str, steps: int = 5) -> torch.Tensor:
    """What an exact-arithmetic Newton-Schulz schedule returns: U p(S' / (s ||G'||_F + eps)) V^T
    for G' = G / 2^floor(log2 max|g|) (per matrix; S' the singular values of G')."""
    _, s, eps = SCHEDULES[method]
    G64 = G.detach().to(torch.float64)
    peak = G64.abs().amax(dim=(-2, -1)).unsqueeze(-1)
    scale = torch.where(peak > 0, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))
    fro = torch.linalg.matrix_norm(G64, ord="fro").unsqueeze(-1) / scale
    return apply_spectral(G, lambda S: scalar_poly(method, S / scale / (s * fro + eps), steps))


def spectral_response(G: torch.Tensor, O: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized input singular values sigma_i/||G||_F, u_i^T O v_i) for the input's SVD.

    If O = U f(S) V^T + E then u_i^T O v_i = f(sigma_i) + e_i with |e_i| <= ||E||_2, whatever the
    clustering of the singular values, so this reads off how O treats each input direction.
    """
    U, S, Vh = _svd64(G)
    O64 = O.detach().to(torch.float64)
    d = torch.einsum("...ri,...rc,...ic->...i", U, O64, Vh)
    fro = torch.linalg.matrix_norm(G.detach().to(torch.float64), ord="fro").unsqueeze(-1)
    return S / fro.clamp_min(1e-300), d


def update_scale(scale: str, rows: int, cols: int, rms: float = 0.2) -> float:
    """docs/references.md section 2."""
    if scale == "naive":
        return 1.0
    if scale == "keller_jordan":
        return math.sqrt(max(1.0, rows / cols))
    if scale == "mup":
        return math.sqrt(rows / cols)
    if scale == "moonlight":
        return rms * math.sqrt(max(rows, cols))
    raise KeyError(scale)


def _axes_of(kind, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batch, rows, cols) tensor axes of a kind: 'matrix' (2D), 'conv' (out x in*prod(kernel)),
    'stacked' (one matrix per leading index), or an explicit (rows, cols, batch) tuple of axes."""
    if kind == "matrix":
        assert ndim == 2
        return (), (0,), (1,)
    if kind == "conv":
        assert ndim >= 3
        return (), (0,), tuple(range(1, ndim))
    if kind == "stacked":
        assert ndim == 3
        return (0,), (1,), (2,)
    rows, cols, batch = kind
    assert sorted(rows + cols + batch) == list(range(ndim))
    return tuple(batch), tuple(rows), tuple(cols)


def matrices_of(t: torch.Tensor, kind) -> list[torch.Tensor]:
    """The matrices Muon works on, as copies (rows = prod of row axes, cols = prod of col axes)."""
    batch, rows, cols = _axes_of(kind, t.ndim)
    p = t.permute(*batch, *rows, *cols)
    nb = math.prod(t.shape[a] for a in batch)
    nr = math.prod(t.shape[a] for a in rows)
    nc = math.prod(t.shape[a] for a in cols)
    m = p.reshape(nb, nr, nc)
    return [m[i].clone() for i in range(nb)]


def from_matrices(mats: Sequence[torch.Tensor], kind, shape: torch.Size) -> torch.Tensor:
    """Inverse of matrices_of."""
    batch, rows, cols = _axes_of(kind, len(shape))
    perm = (*batch, *rows, *cols)
    p = torch.stack(list(mats)).reshape([shape[a] for a in perm])
    inverse = [perm.index(a) for a in range(len(shape))]
    return p.permute(*inverse).contiguous()


def default_kind(t: torch.Tensor) -> str:
    """API.md `layout=None`: 2D matrix, 3D stacked, 4D/5D conv."""
    return {2: "matrix", 3: "stacked", 4: "conv", 5: "conv"}[t.ndim]


class ReferenceMuon:
    """Muon, one matrix at a time, everything in float64 (docs/references.md section 1).

        M <- beta*M + (1-beta)*G
        U <- (1-beta)*G + beta*M   if nesterov else M
        O <- orthogonalizer(U)     (default: the exact polar factor)
        W <- W*(1 - lr*wd) - lr*scale(rows, cols)*O
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        scale: str,
        rms: float = 0.2,
        kinds: Sequence | None = None,
        orthogonalizer: Callable[[torch.Tensor], torch.Tensor] = polar_factor,
    ):
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.kinds = list(kinds) if kinds is not None else [default_kind(p) for p in params]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay, self.scale, self.rms = weight_decay, scale, rms
        self.orthogonalizer = orthogonalizer

    def step(self, grads: Sequence[torch.Tensor], lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        beta = self.momentum
        for W, M, G, kind in zip(self.params, self.buffers, grads, self.kinds):
            G = G.detach().to(torch.float64)
            M.copy_(beta * M + (1 - beta) * G)
            U = (1 - beta) * G + beta * M if self.nesterov else M.clone()
            new_views = []
            for Wm, Um in zip(matrices_of(W, kind), matrices_of(U, kind)):
                rows, cols = Wm.shape
                O = self.orthogonalizer(Um)
                new_views.append(
                    Wm * (1 - lr * self.weight_decay)
                    - lr * update_scale(self.scale, rows, cols, self.rms) * O
                )
            W.copy_(from_matrices(new_views, kind, W.shape))


def assert_same(a, b, where="state dict"):
    """Nested dicts/lists of tensors and plain values are equal: tensors bit for bit, with dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def state_is_pristine(state: dict) -> bool:
    """True if an optimizer state entry was never advanced: absent/empty, or only pre-created
    zeros (step 0, zero buffers). docs/references.md section 5 recommends pre-creating state for every
    parameter (for distributed checkpoints), so "no state" is read as "no state advanced"."""
    for value in state.values():
        if torch.is_tensor(value) and torch.count_nonzero(value) != 0:
            return False
        if not torch.is_tensor(value) and value != 0:
            return False
    return True
