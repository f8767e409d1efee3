"""One optimizer step over lists of tensors: the Muon math and the AdamW math.

The optimizer class gathers tensors and state and calls these. A Muon step has two halves:

- directions: momentum lookahead U, O = orthogonalize(U), and for the NorMuon / AdaMuon variants the
  normalized H with its new second moment. Nothing the caller owns is modified.
- apply: the momentum and second-moment buffers take their new values, weight decay (plain or
  cautious) and W <- W - lr * scale * H. Only arithmetic on checked tensors: it cannot fail.

`muon` runs both. With a built-in Newton-Schulz orthogonalizer and no `update_many` it fuses them one
stack of same-shaped matrices at a time (U written straight into the kernel's work buffer, each
stack applied as soon as it is orthogonalized), which holds the fewest temporaries; the kernels
cannot fail on checked input, so nothing is lost. Callers that must not change anything until every
group's directions exist (a user's orthogonalizer or the SVD can raise; collectives can fail) call
`muon_directions` first and `apply_muon_` later. Batching and distribution plug in through
`update_many`, the one seam where matrices become their updates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_capturable_supported_devices

from .layout import Layout, from_matrices, matrix_shape, to_matrices
from .orthogonalize import SCHEDULES, Orthogonalizer, empty_work, orthogonalize, orthogonalize_, svd_polar, working_dtype
from .scaling import Scale, update_scale

Variant = Literal["muon", "normuon", "adamuon"]
VARIANTS: tuple[str, ...] = ("muon", "normuon", "adamuon")

# (momentum updates U, their second moments or None, their layouts) -> (updates H, new second
# moments or None), each tensor in its parameter's (or state's) own shape: the seam distributed
# training replaces (it hands each tensor to an owner rank, which calls the local one).
UpdateMany = Callable[
    [Sequence[Tensor], Sequence["Tensor | None"], Sequence[Layout]], "tuple[list[Tensor], list[Tensor | None]]"
]
# Per-parameter statistics of a step: 0-d tensors under the keys of Muon.last_stats.
Stats = dict[str, Tensor]

# A rounding seed meaning "draw from the device's default generator" rather than from a generator
# seeded on the host: CUDA graphs capture the default generator (each replay draws new numbers),
# so a capturable step rounds with it. Host seeds are >= 0.
DEFAULT_GENERATOR = -1

# Same-shaped matrices are orthogonalized together in stacks of at most this many elements (or
# one matrix, if larger): enough to amortize the per-call overhead of small matrices (200 of
# 64 x 64 are 0.8M elements), few enough that a step's temporaries stay near three times
# max(largest matrix, 16 MiB of float32).
STACK_NUMEL = 1 << 22
# Matrices above this many elements are stacked at most one per CPU thread (one at a time on one
# thread, and on CUDA): a single product of that size already keeps a thread busy, and a batched
# product splits its batch across the threads, so a batch of exactly one matrix per thread
# synchronizes once per product instead of inside it (16 of 768 x 768 in pairs on 2 threads:
# 0.39-0.63 of one at a time, measured 2026-12-02), while an odd batch would leave a thread idle
# (7 of 768 x 768 as one batch on 2 threads: 12% slower than a loop, 2026-11-24). On one thread
# stacking them is 5-11% slower than a loop, so they stay alone there.
STACK_MATRIX_NUMEL = 1 << 18


def _large_run_count(device: torch.device, dtype: torch.dtype) -> int:
    """How many large matrices (above STACK_MATRIX_NUMEL elements) one batched call may hold. In
    float16, torch's CPU matrix_norm of a batch differs in the last bit from one matrix alone, so
    float16 work stays one matrix at a time (float32, bfloat16 and float64 are batch-invariant)."""
    if device.type != "cpu" or dtype == torch.float16:
        return 1
    return max(1, torch.get_num_threads())


def _stacks(
    keys: Sequence[tuple],
    sizes: Sequence[int],
    matrix_numel: Sequence[int],
    counts: Sequence[int] | None = None,
) -> list[list[int]]:
    """Indices grouped by key (whose last two entries are the working dtype and the device), each
    group cut into runs of at most STACK_NUMEL elements. Tensors whose matrices have more than
    STACK_MATRIX_NUMEL elements run in batches of at most `_large_run_count` matrices (`counts[i]`
    matrices in tensor i), and one tensor with more makes a run of its own."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        large = matrix_numel[i] > STACK_MATRIX_NUMEL
        groups[(key, large)].append(i)
    runs: list[list[int]] = []
    for (key, large), members in groups.items():
        limit = _large_run_count(key[-1], key[-2]) if large else None
        run: list[int] = []
        total = count = 0
        for i in members:
            matrices = counts[i] if counts is not None else 1
            full = total + sizes[i] > STACK_NUMEL or (limit is not None and count + matrices > limit)
            if run and full:
                runs.append(run)
                run, total, count = [], 0, 0
            run.append(i)
            total += sizes[i]
            count += matrices
        runs.append(run)
    return runs


def runs_in_place(method: Orthogonalizer) -> bool:
    """Whether `method` is one of the built-in Newton-Schulz kernels, which run in place on a
    caller's stacked work buffer and cannot fail on finite or non-finite float input."""
    return isinstance(method, str) and (method in SCHEDULES or method == "gram")


def _takes_batches(method: Orthogonalizer) -> bool:
    """A callable orthogonalizer gets one (rows, cols) matrix at a time unless it declares
    `batched = True`, in which case it gets (k, rows, cols) stacks of same-shaped matrices."""
    return not callable(method) or getattr(method, "batched", False) is True


def batched_orthogonalize(
    matrices: Sequence[Tensor],
    *,
    method: Orthogonalizer,
    steps: int,
    dtype: torch.dtype | None,
) -> list[Tensor]:
    """Orthogonalize (batch, rows, cols) tensors, stacking same-shaped ones into batched calls.

    Every operation of the kernels acts on each matrix on its own, so the result equals calling
    `orthogonalize` on each one bit for bit (tests/test_speed_contracts.py); stacking only removes
    per-matrix overhead. A callable without `batched = True` is called on each 2D matrix.
    """
    out: list[Tensor | None] = [None] * len(matrices)
    if not _takes_batches(method):
        for i, m in enumerate(matrices):
            out[i] = torch.stack([orthogonalize(x, method, steps, dtype=dtype) for x in m]) if len(m) else m.clone()
        return out  # type: ignore[return-value]
    keys = [(m.shape[-2:], m.dtype, working_dtype(m, dtype), m.device) for m in matrices]
    if not runs_in_place(method):
        for run in _stacks(keys, [0] * len(matrices), [0] * len(matrices)):
            members = [matrices[i] for i in run]
            stacked = members[0] if len(members) == 1 else torch.cat(members)
            result = orthogonalize(stacked, method, steps, dtype=dtype)
            for i, part in zip(run, result.split([m.size(0) for m in members])):
                out[i] = part
        return out  # type: ignore[return-value]
    numel = [m.numel() for m in matrices]
    for run in _stacks(keys, numel, [m.size(-2) * m.size(-1) for m in matrices], [m.size(0) for m in matrices]):
        first = matrices[run[0]]
        sizes = [matrices[i].size(0) for i in run]
        X = empty_work(sum(sizes), *first.shape[-2:], dtype=working_dtype(first, dtype), device=first.device)
        for i, part in zip(run, X.split(sizes)):
            part.copy_(matrices[i])
        for i, part in zip(run, orthogonalize_(X, method, steps).split(sizes)):  # type: ignore[arg-type]
            out[i] = part.to(matrices[i].dtype)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ variants


def second_moment_shape(shape: torch.Size | Sequence[int], layout: Layout, variant: Variant) -> tuple[int, ...] | None:
    """The shape of a parameter's second-moment state for `variant` (None for plain Muon).

    NorMuon keeps one value per row of each matrix: the parameter's shape with every column axis
    cut to its block count (1 when not cut), so the state reads through the same layout as a
    (batch, rows, 1) view and shards along dim 0 as the parameter does. AdaMuon keeps one value
    per element: the parameter's shape.
    """
    if variant == "muon":
        return None
    if variant == "adamuon":
        return tuple(shape)
    ndim = len(shape)
    counts = {axis % ndim: count for axis, count in layout.blocks}
    cols = {a % ndim for a in layout.cols}
    return tuple(counts.get(a, 1) if a in cols else size for a, size in enumerate(shape))


def normalize_update(
    O: Tensor, second_moment: Tensor, *, variant: Variant, beta2: float, eps: float
) -> tuple[Tensor, Tensor]:
    """NorMuon / AdaMuon: (H, new second moment) from orthogonalized (batch, rows, cols) matrices O.

    With q = mean over the columns of O*O (NorMuon, shape (batch, rows, 1)) or O*O (AdaMuon):
        v <- beta2 v + (1 - beta2) q;   H = O / (sqrt(v) + eps);   H <- H ||O||_F / ||H||_F
    per matrix. `second_moment` is not modified. Computed in the widest of O's and v's dtypes and
    float32; H comes out in O's dtype, v in its own.

    References:
        Li et al., "NorMuon: Making Muon more efficient and scalable", arXiv:2510.05491 (and the
        official normuon.py: v has one entry per row, starts at 0, no bias correction).
        Si et al., "AdaMuon: Adaptive Muon Optimizer", arXiv:2507.11005.
    """
    # At least float32: in float16, eps = 1e-10 rounds to 0 and a zero row of O would give 0 / 0.
    given = O.dtype
    dtype = torch.promote_types(torch.promote_types(given, second_moment.dtype), torch.float32)
    O = O.to(dtype)
    squares = O * O
    q = squares.mean(-1, keepdim=True) if variant == "normuon" else squares
    v = torch.lerp(second_moment.to(dtype), q, 1.0 - beta2)
    # v = 0 only where O is 0 (a zero row or entry); with eps = 0 that would be 0 / 0, so the
    # denominator is kept >= the smallest normal number (a no-op for any eps above it).
    H = O / v.sqrt().add_(eps).clamp_(min=torch.finfo(dtype).tiny)
    norm_o = torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True)
    norm_h = torch.linalg.vector_norm(H, dim=(-2, -1), keepdim=True)
    # A zero O gives a zero H; the ratio is then 0 rather than 0 / 0.
    H.mul_(torch.where(norm_h > 0, norm_o / norm_h, torch.zeros_like(norm_h)))
    return H.to(given), v.to(second_moment.dtype)


def local_update_many(
    *, method: Orthogonalizer, steps: int, dtype: torch.dtype | None, variant: Variant, beta2: float, eps: float
) -> UpdateMany:
    """The single-process `update_many`: orthogonalize the matrix views (stacking same shapes), then
    normalize each parameter's matrices on their own for NorMuon / AdaMuon. Distributed training
    runs this same function on each tensor's owner rank."""

    def update_many(
        tensors: Sequence[Tensor], second_moments: Sequence[Tensor | None], layouts: Sequence[Layout]
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        matrices = [to_matrices(t, layout) for t, layout in zip(tensors, layouts)]
        ortho = batched_orthogonalize(matrices, method=method, steps=steps, dtype=dtype)
        updates, new_moments = [], []
        for t, o, v, layout in zip(tensors, ortho, second_moments, layouts):
            if variant != "muon":
                assert v is not None
                o, new_v = normalize_update(o, to_matrices(v, layout), variant=variant, beta2=beta2, eps=eps)
                new_moments.append(from_matrices(new_v, layout, v.shape))
            else:
                new_moments.append(None)
            updates.append(from_matrices(o, layout, t.shape))
        return updates, new_moments

    return update_many


# -------------------------------------------------------------------------------------- Muon


@dataclass
class Directions:
    """The result of `muon_directions`: each parameter's update H (its own shape, before lr and
    scale) and new second moment (None for plain Muon)."""

    updates: list[Tensor]
    second_moments: list[Tensor | None]


def _lookahead(grad: Tensor, buffer: Tensor, *, momentum: float, nesterov: bool, sign: bool, out: Tensor | None = None) -> Tensor:
    """U = lerp(G, M, momentum) if nesterov else M, from the already-updated buffer M; sign(U) for AdaMuon."""
    # Writing into `out` saves a temporary in eager mode; under torch.compile, which cannot trace
    # out= into a strided view, the copy below is fused instead.
    direct = out is not None and not torch.compiler.is_compiling()
    if nesterov:
        if direct and grad.dtype == buffer.dtype == out.dtype:
            u = torch.lerp(grad, buffer, momentum, out=out)
        else:
            u = torch.lerp(grad.to(buffer.dtype), buffer, momentum)
    else:
        u = buffer
    if sign:
        u = torch.sign(u, out=out) if direct and u.dtype == out.dtype else torch.sign(u)
    if out is not None and u is not out:
        out.copy_(u)
        return out
    return u


def _as_buffer_dtype(grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[Tensor]:
    """Grads in their buffers' dtype (a gradient may have another dtype than its parameter)."""
    return [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, buffers)]


def muon_directions(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    layouts: Sequence[Layout],
    *,
    momentum: float,
    nesterov: bool,
    update_many: UpdateMany,
    variant: Variant = "muon",
    second_moments: Sequence[Tensor | None] | None = None,
    stats: Sequence[Stats] | None = None,
    orthogonality: bool = False,
    orthogonalizer: Orthogonalizer = "polar_express",
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> Directions:
    """The first half of a Muon step: every parameter's update, with nothing modified.

    M' = lerp(M, G, 1 - momentum) is formed out of place; U = lerp(G, M', momentum) (nesterov) or
    M'; sign(U) for AdaMuon; then `update_many` maps U (and the second moments) to the updates H
    (and the new second moments). With `stats` and `orthogonality`, the orthogonalizer
    (`orthogonalizer`, `ns_steps`, `ns_dtype`) runs once more on U to measure its output.
    """
    second_moments = list(second_moments) if second_moments is not None else [None] * len(grads)
    grads = _as_buffer_dtype(grads, momentum_buffers)
    new_buffers = list(torch._foreach_lerp(list(momentum_buffers), grads, 1.0 - momentum)) if grads else []
    lookaheads = [
        _lookahead(g, m, momentum=momentum, nesterov=nesterov, sign=variant == "adamuon")
        for g, m in zip(grads, new_buffers)
    ]
    updates, new_moments = update_many(lookaheads, second_moments, layouts)
    if stats is not None:
        for i in range(len(grads)):
            _record_inputs(stats[i], grads[i], new_buffers[i])
        if orthogonality:
            matrices = [to_matrices(u, layout) for u, layout in zip(lookaheads, layouts)]
            ortho = batched_orthogonalize(matrices, method=orthogonalizer, steps=ns_steps, dtype=ns_dtype)
            for s, u, o in zip(stats, matrices, ortho):
                _record_orthogonality(s, u, o)
    return Directions(list(updates), list(new_moments))


def apply_muon_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    layouts: Sequence[Layout],
    directions: Directions,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    scale: Scale,
    rms: float,
    cautious_weight_decay: bool = False,
    second_moments: Sequence[Tensor | None] | None = None,
    shapes: Sequence[torch.Size] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
    stats: Sequence[Stats] | None = None,
) -> None:
    """The second half of a Muon step: buffers take their new values, then decay and the update.

    M <- lerp(M, G, 1 - momentum) in place (the same bits `muon_directions` computed out of place),
    v <- its new value, and per matrix W <- W - lr (lambda D(W) + scale(rows, cols) H) with
    D(W) = W, or W * 1[H * W >= 0] for cautious weight decay (see `write_updates_` for how a
    low-precision parameter is written). `stats` receive "update_rms" and, for NorMuon / AdaMuon,
    the range of the new second moment.
    """
    if not params:
        return
    shapes = [p.shape for p in params] if shapes is None else shapes
    torch._foreach_lerp_(list(momentum_buffers), _as_buffer_dtype(grads, momentum_buffers), 1.0 - momentum)
    for v, new in zip(second_moments or [], directions.second_moments):
        if v is not None and new is not None:
            v.copy_(new)
    factors = [update_scale(scale, *matrix_shape(shape, layout)[1:], rms) for shape, layout in zip(shapes, layouts)]
    write_updates_(
        params, directions.updates, factors, [m.dtype for m in momentum_buffers], lr=lr, weight_decay=weight_decay,
        cautious_weight_decay=cautious_weight_decay, rounding_seeds=rounding_seeds,
    )
    if stats is not None:
        for s, h, factor, v in zip(stats, directions.updates, factors, second_moments or [None] * len(params)):
            s["update_rms"] = _rms(h) * factor
            if v is not None:
                _record_second_moment(s, v)


def write_updates_(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    factors: Sequence[float],
    compute_dtypes: Sequence[torch.dtype],
    *,
    lr: float | Tensor,
    weight_decay: float,
    cautious_weight_decay: bool,
    rounding_seeds: Sequence[int | None] | None = None,
) -> None:
    """W <- W - lr (weight_decay D(W) + factor H), D(W) = W or W 1[H W >= 0] (cautious).

    A parameter whose compute dtype (its state's) is its own dtype, and that has no rounding seed,
    is updated in place in its dtype (torch.optim's arithmetic). Any other is computed in its
    compute dtype from a widened copy and written back once: round-to-nearest, or, with a
    rounding seed, stochastically rounded (`stochastic_round`), so that updates smaller than
    half a bf16 ulp still move it on average.

    A tensor lr (a capturable step's) is read on its device: `_write_updates_at_tensor_lr_`.
    """
    seeds = list(rounding_seeds) if rounding_seeds is not None else [None] * len(params)
    if isinstance(lr, Tensor):
        _write_updates_at_tensor_lr_(params, updates, factors, compute_dtypes, seeds, lr=lr, weight_decay=weight_decay,
                                     cautious_weight_decay=cautious_weight_decay)
        return
    direct, wide = [], []
    for i, p in enumerate(params):
        (direct if p.dtype == compute_dtypes[i] and seeds[i] is None else wide).append(i)
    if weight_decay != 0.0 and not cautious_weight_decay and direct:
        torch._foreach_mul_([params[i] for i in direct], 1.0 - lr * weight_decay)
    grouped: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for i in direct:
        if weight_decay != 0.0 and cautious_weight_decay:
            _cautious_decay_(params[i], updates[i], lr * weight_decay)
        targets, values = grouped[-lr * factors[i]]
        targets.append(params[i])
        values.append(updates[i].to(params[i].dtype))
    for alpha, (targets, values) in grouped.items():
        torch._foreach_add_(targets, values, alpha=alpha)
    for i in wide:
        p = params[i]
        dtype = torch.promote_types(compute_dtypes[i], torch.float32)
        w = p.to(dtype)
        if weight_decay != 0.0:
            if cautious_weight_decay:
                _cautious_decay_(w, updates[i], lr * weight_decay)
            else:
                w.mul_(1.0 - lr * weight_decay)
        w.add_(updates[i].to(dtype), alpha=-lr * factors[i])
        p.copy_(w if seeds[i] is None else stochastic_round(w, p.dtype, seeds[i]))


def _write_updates_at_tensor_lr_(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    factors: Sequence[float],
    compute_dtypes: Sequence[torch.dtype],
    seeds: Sequence[int | None],
    *,
    lr: Tensor,
    weight_decay: float,
    cautious_weight_decay: bool,
) -> None:
    """`write_updates_` with a one-element tensor lr, which only device arithmetic reads (addcmul with
    the 0-d lr where the float path adds with alpha): the same rule, rounded differently. 16-bit
    parameters are computed in float32 and rounded once, so that lr itself is never rounded to 16
    bits (the float path's alpha is not either)."""
    lr = lr.reshape(())
    for p, h, factor, dtype, seed in zip(params, updates, factors, compute_dtypes, seeds):
        widen = p.dtype != dtype or seed is not None or p.dtype.itemsize < 4
        w = p.to(torch.promote_types(dtype, torch.float32)) if widen else p
        if weight_decay != 0.0:
            if cautious_weight_decay:
                _cautious_decay_(w, h, lr * weight_decay)
            else:
                w.mul_(1.0 - lr * weight_decay)
        w.addcmul_(h.to(w.dtype), lr.to(w.dtype), value=-factor)
        if widen:
            p.copy_(w if seed is None else stochastic_round(w, p.dtype, seed))


def stochastic_round(x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """x rounded to `dtype` up or down at random, so that E[result] = x: the neighbour on x's
    side of round-to-nearest is taken with probability (distance to nearest) / (gap between them).

    The random numbers come from a generator seeded with `seed` on x's device (the global RNG is
    left alone, and every process of a data-parallel job rounds alike), or with seed
    DEFAULT_GENERATOR from the device's default generator (capturable steps). float32 to bfloat16, the
    common case, takes the bit path (`_stochastic_round_to_bfloat16`); other pairs the general one.

    References:
        Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015.
        Zamirai et al., "Revisiting BFloat16 Training", arXiv:2010.06192.
    """
    generator = None if seed == DEFAULT_GENERATOR else torch.Generator(device=x.device).manual_seed(seed)
    if x.dtype == torch.float32 and dtype == torch.bfloat16:
        rounded = _stochastic_round_to_bfloat16(x, generator)
    else:
        nearest = x.to(dtype)
        gap = x - nearest.to(x.dtype)
        toward = torch.nextafter(nearest, torch.where(gap > 0, math.inf, -math.inf).to(dtype))
        width = toward.to(x.dtype) - nearest.to(x.dtype)
        chance = torch.where(width != 0, gap / width, 0.0)
        rounded = torch.where(torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < chance, toward, nearest)
    # Beyond dtype's largest finite value (but short of round-to-nearest's overflow) the upper
    # neighbour is inf: a finite x stays finite, as round-to-nearest keeps it.
    return torch.where(rounded.isinf() & x.isfinite(), x.to(dtype), rounded)


def _stochastic_round_to_bfloat16(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """float32 -> bfloat16 by stochastic rounding on the bits: bfloat16 is the upper 16 bits of
    float32, so adding a uniform random integer in [0, 2^16) to the lower 16 bits carries into the
    upper half with probability (lower bits) / 2^16 = (|x| - |down|) / (|up| - |down|), and dropping
    the lower bits then gives |down| or |up| (the sign bit is never reached: the magnitude rounds).
    A NaN is kept as a NaN (its payload could carry into the sign bit); `stochastic_round` keeps
    finite values finite."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    bits = noise.add_(x.view(torch.int32)).bitwise_and_(-(1 << 16))
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the lower 16 bits are zero
    return torch.where(x.isnan(), x.to(torch.bfloat16), rounded)


def _cautious_decay_(p: Tensor, update: Tensor, amount: float | Tensor) -> None:
    """W <- W - amount * W * 1[u * W >= 0]: decay only where it agrees with the update u (a tensor
    amount, from a capturable step's tensor lr, is read on the device)."""
    agreeing = torch.where(update * p >= 0, p, 0.0)
    if isinstance(amount, Tensor):
        p.addcmul_(agreeing, amount.to(p.dtype), value=-1.0)
    else:
        p.sub_(agreeing, alpha=amount)


def muon(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    layouts: Sequence[Layout],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    scale: Scale,
    rms: float,
    orthogonalizer: Orthogonalizer,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    variant: Variant = "muon",
    beta2: float = 0.95,
    variant_eps: float = 1e-10,
    second_moments: Sequence[Tensor | None] | None = None,
    cautious_weight_decay: bool = False,
    update_many: UpdateMany | None = None,
    shapes: Sequence[torch.Size] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
    stats: Sequence[Stats] | None = None,
    orthogonality: bool = False,
) -> None:
    """One Muon step for a list of parameters.

    For each matrix W (rows x cols) of each parameter's matrix view:
        M <- beta M + (1 - beta) G;   U <- (1 - beta) G + beta M  (nesterov) or M
        O <- orthogonalize(U)   (orthogonalize(sign(U)) for AdaMuon)
        H <- O, or for NorMuon / AdaMuon: v <- beta2 v + (1 - beta2) q(O), H = O / (sqrt(v) + eps),
             H <- H ||O||_F / ||H||_F   (q: row means of O*O, or O*O; see `normalize_update`)
        W <- W - lr (lambda D(W) + scale(rows, cols) H),   D(W) = W or W * 1[H * W >= 0] (cautious)

    Args:
        second_moments: one buffer per parameter (shape `second_moment_shape`) for NorMuon/AdaMuon.
        update_many: maps matrix views of U and of the second moments to (H, new second moments);
            None means `local_update_many` on this process. Distributed training passes one that
            splits the work across ranks.
        shapes: the full shape of each parameter when `params` are local slices of sharded ones
            (FSDP2); the scale is computed from the full matrix view. None means params' shapes.
        rounding_seeds: per parameter, None (round to nearest) or the seed of its stochastic
            rounding this step (see `write_updates_`).
        stats: one dict per parameter to receive 0-d tensors "grad_rms", "momentum_rms",
            "update_rms" and, with `orthogonality`, "orthogonality_error",
            "singular_min", "singular_max"; "second_moment_min"/"_max" for NorMuon/AdaMuon.
    """
    if not params:
        return
    if second_moments is None:
        second_moments = [None] * len(params)
    if variant != "muon" and any(v is None for v in second_moments):
        raise ValueError(f"variant {variant!r} needs a second-moment buffer for every parameter")
    if update_many is None and runs_in_place(orthogonalizer):
        _fused_muon_(
            params, grads, momentum_buffers, second_moments, layouts, shapes or [p.shape for p in params],
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_dtype=ns_dtype, variant=variant, beta2=beta2,  # type: ignore[arg-type]
            eps=variant_eps, cautious_weight_decay=cautious_weight_decay, rounding_seeds=rounding_seeds, stats=stats,
            orthogonality=orthogonality,
        )
        return
    if update_many is None:
        update_many = local_update_many(method=orthogonalizer, steps=ns_steps, dtype=ns_dtype, variant=variant,
                                        beta2=beta2, eps=variant_eps)
    directions = muon_directions(
        grads, momentum_buffers, layouts, momentum=momentum, nesterov=nesterov, update_many=update_many,
        variant=variant, second_moments=second_moments, stats=stats, orthogonality=orthogonality,
        orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_dtype=ns_dtype,
    )
    apply_muon_(
        params, grads, momentum_buffers, layouts, directions, lr=lr, momentum=momentum, weight_decay=weight_decay,
        scale=scale, rms=rms, cautious_weight_decay=cautious_weight_decay, second_moments=second_moments,
        shapes=shapes, rounding_seeds=rounding_seeds, stats=stats,
    )


def _fused_muon_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    second_moments: Sequence[Tensor | None],
    layouts: Sequence[Layout],
    shapes: Sequence[torch.Size],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    scale: Scale,
    rms: float,
    orthogonalizer: str,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    variant: Variant,
    beta2: float,
    eps: float,
    cautious_weight_decay: bool,
    rounding_seeds: Sequence[int | None] | None,
    stats: Sequence[Stats] | None,
    orthogonality: bool,
) -> None:
    """`muon` for the built-in kernels, one stack of same-shaped matrices at a time.

    U is written straight into the stack's work buffer and the update is read from the kernel's
    output, so a stack holds about three matrix-sized temporaries per matrix and nothing else.
    """
    grads = _as_buffer_dtype(grads, momentum_buffers)
    torch._foreach_lerp_(list(momentum_buffers), grads, 1.0 - momentum)
    seeds = list(rounding_seeds) if rounding_seeds is not None else [None] * len(params)
    views = [matrix_shape(p.shape, layout) for p, layout in zip(params, layouts)]
    # Keyed by the state's dtype, the dtype of U: the same working dtype as `orthogonalize(U)` on the
    # two-phase path, so that both paths give the same bits.
    keys = [(rows, cols, working_dtype(m, ns_dtype), p.device) for p, m, (_, rows, cols) in zip(params, momentum_buffers, views)]
    for run in _stacks(keys, [p.numel() for p in params], [rows * cols for _, rows, cols in views],
                       [batch for batch, _, _ in views]):
        _, rows, cols = views[run[0]]
        sizes = [views[i][0] for i in run]
        X = empty_work(sum(sizes), rows, cols, dtype=keys[run[0]][2], device=params[run[0]].device)
        for i, part in zip(run, X.split(sizes)):
            _lookahead(to_matrices(grads[i], layouts[i]), to_matrices(momentum_buffers[i], layouts[i]),
                       momentum=momentum, nesterov=nesterov, sign=variant == "adamuon", out=part)
        inputs = X.clone() if stats is not None and orthogonality else None
        ortho = orthogonalize_(X, orthogonalizer, ns_steps)  # type: ignore[arg-type]
        updates, factors = [], []
        for k, (i, o) in enumerate(zip(run, ortho.split(sizes))):
            # O in U's dtype, as `orthogonalize` returns it on the two-phase path.
            o = o.to(momentum_buffers[i].dtype)
            if variant != "muon":
                v = second_moments[i]
                h, new_v = normalize_update(o, to_matrices(v, layouts[i]), variant=variant, beta2=beta2, eps=eps)  # type: ignore[arg-type]
                v.copy_(from_matrices(new_v, layouts[i], v.shape))  # type: ignore[union-attr]
            else:
                h = o
            updates.append(from_matrices(h, layouts[i], params[i].shape))
            factors.append(update_scale(scale, *matrix_shape(shapes[i], layouts[i])[1:], rms))
            if stats is not None:
                _record_inputs(stats[i], grads[i], momentum_buffers[i])
                stats[i]["update_rms"] = _rms(h) * factors[-1]
                if inputs is not None:
                    _record_orthogonality(stats[i], inputs.split(sizes)[k], o)
                if second_moments[i] is not None:
                    _record_second_moment(stats[i], second_moments[i])  # type: ignore[arg-type]
        write_updates_(
            [params[i] for i in run], updates, factors, [momentum_buffers[i].dtype for i in run], lr=lr,
            weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
            rounding_seeds=[seeds[i] for i in run],
        )


# ---------------------------------------------------------------------------------- statistics


def _rms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.float()) / max(1, t.numel()) ** 0.5


def _record_inputs(stats: Stats, grad: Tensor, buffer: Tensor) -> None:
    stats["grad_rms"] = _rms(grad)
    stats["momentum_rms"] = _rms(buffer)


def _record_second_moment(stats: Stats, v: Tensor) -> None:
    if v.numel() == 0:  # an empty FSDP2 shard of this rank
        return
    stats["second_moment_min"] = v.min().float()
    stats["second_moment_max"] = v.max().float()


def _record_orthogonality(stats: Stats, inputs: Tensor, outputs: Tensor) -> None:
    """Relative Frobenius distance of the orthogonalizer's output from the exact float64 polar
    factor of its input (over all matrices of the parameter), and its singular-value range."""
    exact = svd_polar(inputs.double())
    out = outputs.double()
    scale = torch.linalg.vector_norm(exact)
    distance = torch.linalg.vector_norm(out - exact)
    stats["orthogonality_error"] = torch.where(scale > 0, distance / scale, distance).float()
    singular = torch.linalg.svdvals(out)
    stats["singular_min"] = singular.min().float()
    stats["singular_max"] = singular.max().float()


# ------------------------------------------------------------------------------------- AdamW


def _adamw_foreach(params: Sequence[Tensor], lr: Any, beta1: Any, beta2: Any) -> bool | None:
    """torch's multi-tensor (foreach) AdamW where it gives the bits of its single-tensor loop (torch's
    CPU default) in 0.4x its time for the many small tensors (biases, norm gains) AdamW groups hold:
    float32 and float64 parameters with float hyperparameters (tests/test_torch_parity.py).
    Otherwise torch's default (None): 16-bit parameters (torch's CPU foreach kernels round them
    differently), tensor lr or betas (its foreach path needs capturable=True for them), and under
    torch.compile (its CPU foreach path stacks step sizes that compile cannot place)."""
    if any(isinstance(h, Tensor) for h in (lr, beta1, beta2)) or torch.compiler.is_compiling():
        return None
    return True if all(p.dtype in (torch.float32, torch.float64) for p in params) else None


def _capturable_adam_flags(device: torch.device, capturable: bool) -> dict[str, bool]:
    """torch's adam functional flags for a step with no host read. Its single-tensor capturable
    branch (`if capturable or differentiable:` in torch/optim/adam.py) is one branch for both
    flags; capturable=True also asserts a device type it supports (cuda, xpu, ...), which CPU is not,
    so on CPU the same branch is reached with differentiable=True (whose only other change there,
    a clone of exp_avg before addcdiv_, leaves the values as they are)."""
    if not capturable:
        return {"capturable": False, "differentiable": False}
    supported = device.type in _get_capturable_supported_devices()
    return {"capturable": supported, "differentiable": not supported}


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    cautious_weight_decay: bool = False,
    rounding_seeds: Sequence[int | None] | None = None,
    stats: Sequence[Stats] | None = None,
    capturable: bool = False,
) -> None:
    """One AdamW step (decoupled weight decay), by the same functional torch.optim.AdamW calls,
    so that muonkit's AdamW groups equal torch.optim.AdamW bit for bit; see `_adamw_foreach` for which
    of torch's implementations runs.

    With `cautious_weight_decay`, the decay applies only where it agrees with AdamW's update
    u = m_hat / (sqrt(v_hat) + eps): W <- W - lr (u + lambda W 1[u W >= 0]). The sign of u is the
    sign of the new first moment, which is all the mask needs.

    A parameter whose moments are kept in a wider dtype than its own, or that has a rounding seed,
    is stepped as a widened copy and written back once (round-to-nearest, or stochastically
    rounded with its seed; see `write_updates_`).

    With `capturable`, `steps` are on the parameters' device and torch's capturable arithmetic runs
    (bias corrections as device tensors, no host read; single-tensor, `_capturable_adam_flags`).
    """
    if not params:
        return
    seeds = list(rounding_seeds) if rounding_seeds is not None else [None] * len(params)
    widened = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if p.dtype != m.dtype or seeds[i] is not None]
    params, exp_avgs, exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
    originals = {i: (params[i], exp_avgs[i], exp_avg_sqs[i]) for i in widened}
    for i in widened:
        dtype = torch.promote_types(exp_avgs[i].dtype, torch.float32)
        params[i], exp_avgs[i], exp_avg_sqs[i] = params[i].to(dtype), exp_avgs[i].to(dtype), exp_avg_sqs[i].to(dtype)
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
    if cautious_weight_decay and weight_decay != 0.0:
        for p, g, m in zip(params, grads, exp_avgs):
            _cautious_decay_(p, torch.lerp(m, g, 1.0 - beta1), lr * weight_decay)
        weight_decay = 0.0
    _torch_adam(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        [],
        list(steps),
        foreach=False if capturable else _adamw_foreach(params, lr, beta1, beta2),
        **_capturable_adam_flags(params[0].device, capturable),
        fused=None,
        grad_scale=None,
        found_inf=None,
        has_complex=False,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )
    for i in widened:
        target, exp_avg, exp_avg_sq = originals[i]
        target.copy_(params[i] if seeds[i] is None else stochastic_round(params[i], target.dtype, seeds[i]))
        exp_avg.copy_(exp_avgs[i])
        exp_avg_sq.copy_(exp_avg_sqs[i])
    if stats is not None:
        for s, g, m, v, step in zip(stats, grads, exp_avgs, exp_avg_sqs, steps):
            _record_inputs(s, g, m)
            t = float(step)
            m_hat = m / (1.0 - beta1**t)
            v_hat = v / (1.0 - beta2**t)
            s["update_rms"] = _rms(m_hat / (v_hat.sqrt() + eps))
