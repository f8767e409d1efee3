"""One optimizer step over lists of tensors: the Muon math and the AdamW math.

The optimizer class gathers tensors and state and calls these. Every Muon step, in every mode,
runs one per-stack driver (`_stack_updates`): same-shaped matrices are stacked, the momentum
update U is written straight into the stack, orthogonalized, and transformed by the group's
variant (muonkit.variants). `muon` then either applies each stack at once (the fast path: the
fewest temporaries) or holds the results in a `Pending` that the caller applies when every group
is ready (all or nothing: a user's orthogonalizer or the SVD can raise, collectives can fail).
Applying is only arithmetic on checked tensors, and both modes apply through the same
`_apply_moments_` and `_apply_params_`.
Distribution plugs in through `update_many`, the one seam where matrices become their updates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_capturable_supported_devices

from .layout import Layout, from_matrices, matrix_shape, resolve, to_matrices
from .orthogonalize import (
    SCHEDULES,
    NsDtype,
    Orthogonalizer,
    empty_work,
    orthogonalize,
    orthogonalize_,
    svd_polar,
    working_dtype,
)
from .scaling import Scale, update_scale
from .variants import VARIANTS, Selection, Shard, Variant, global_rows, local_rows, slice_norms


class UpdateMany(Protocol):
    """(momentum updates U, their second moments or None, their layouts) -> (updates H, new second
    moments or None), each tensor in its parameter's (or state's) own shape: the seam distributed
    training replaces (it hands each tensor to an owner rank, which calls the local one).

    `slices`, where not None, says that tensor i is this rank's dim-0 slice of a tensor that is
    not a parameter, and which dim-0 entries every group rank holds of it: one size per rank
    (consecutive slices in rank order) or one (start, stop) range per rank (replicas hold equal
    ranges): a selecting variant's selected rows of a row-sharded parameter. A single process
    never gets one."""

    def __call__(
        self,
        tensors: Sequence[Tensor],
        second_moments: Sequence[Tensor | None],
        layouts: Sequence[Layout],
        slices: Sequence[tuple | None] | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None]]: ...


# Tensors whole from every rank's dim-0 slice of them: given this rank's slice of each tensor and
# the (start, stop) dim-0 range every group rank holds (a collective: every rank calls it alike).
GatherRows = Callable[[Sequence[Tensor], Sequence[Sequence[tuple[int, int]]]], list[Tensor]]
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
    `orthogonalize` on each one bit for bit at 1 thread, and to float32 round-off at more (MKL
    threads a lone matrix's GEMM, rounding differently: tests/test_speed_contracts.py); stacking
    only removes per-matrix overhead. A callable without `batched = True` is called on each 2D matrix. This is
    the step driver (`_stack_updates`) with plain Muon's identity transform.
    """
    out: list[Tensor] = [m for m in matrices]
    for i, result, _ in _stack_updates(
        matrices, [m.shape for m in matrices], lambda i, part: _write_(part, matrices[i]), [None] * len(matrices),
        method=method, steps=steps, dtype=dtype, variant=VARIANTS["muon"], beta2=0.0, eps=0.0, keep_inputs=False,
    ):
        out[i] = result.update
    return out


# ------------------------------------------------------------------------- the step driver


@dataclass
class _StackResult:
    """One tensor's share of an orthogonalized stack, as (batch, rows, cols) matrices."""

    update: Tensor  # H: the variant's transform of O
    second_moment: Tensor | None  # the variant's new second moment (None: it keeps none)
    ortho: Tensor  # O, in U's dtype
    inputs: Tensor | None  # U as the orthogonalizer got it (kept for the orthogonality statistics)


def _stack_updates(
    like: Sequence[Tensor],
    views: Sequence[Sequence[int]],
    fill: Callable[[int, Tensor], Any],
    moments: Sequence[Tensor | None],
    *,
    method: Orthogonalizer,
    steps: int,
    dtype: NsDtype,
    variant: Variant,
    beta2: float,
    eps: float,
    keep_inputs: bool,
) -> Iterator[tuple[int, _StackResult, list[int] | None]]:
    """The per-stack step driver every Muon step runs: orthogonalize, then transform by the variant.

    Tensor i has U in `like[i]`'s dtype and on its device, a (batch, rows, cols) matrix view of
    shape `views[i]`, and its variant's second moment as matrices in `moments[i]` (read, never
    written). Same-shaped matrices are stacked (`_stacks`); `fill(i, out)` writes tensor i's U
    into its part of the stack. Yields (i, tensor i's result, the stack's indices after its last
    tensor, else None) as soon as each is done, so that a caller either applies them at once (the
    fused step: a stack's temporaries are freed before the next one is made) or holds them until
    every group is ready (all-or-nothing).

    The built-in Newton-Schulz kernels run in place on a work buffer in their working dtype (U is
    written straight into it); any other orthogonalizer (the SVD, a callable) gets U in its own
    dtype, as a stack if it takes batches, else one matrix at a time.
    """
    in_place, batches = runs_in_place(method), _takes_batches(method)
    work = [working_dtype(t, dtype) for t in like]
    keys = [(v[1], v[2], t.dtype, w, t.device) for t, v, w in zip(like, views, work)]
    # Only in-place kernels are cut into runs of bounded size (their temporaries are the stack's);
    # other orthogonalizers get every same-shaped matrix in one call.
    sizes = [math.prod(v) if in_place else 0 for v in views]
    matrix_numel = [v[1] * v[2] if in_place else 0 for v in views]
    for run in _stacks(keys, sizes, matrix_numel, [v[0] for v in views]):
        counts = [views[i][0] for i in run]
        _, rows, cols = views[run[0]]
        first = like[run[0]]
        if in_place:
            X = empty_work(sum(counts), rows, cols, dtype=work[run[0]], device=first.device)
        else:
            X = torch.empty(sum(counts), rows, cols, dtype=first.dtype, device=first.device)
        for i, part in zip(run, X.split(counts)):
            fill(i, part)
        inputs = X.clone().split(counts) if keep_inputs else [None] * len(run)
        if in_place:
            O = orthogonalize_(X, method, steps)  # type: ignore[arg-type]
        elif batches:
            O = orthogonalize(X, method, steps, dtype=dtype)
        else:
            O = torch.stack([orthogonalize(x, method, steps, dtype=dtype) for x in X]) if len(X) else X.clone()
        O = O.to(first.dtype)  # U's dtype (the same for the whole run: it is part of the key)
        outs = O.split(counts)
        for k, (i, o, (h, v), u) in enumerate(zip(run, outs, _transformed(variant, O, outs, [moments[i] for i in run],
                                                                        counts, beta2, eps), inputs)):
            yield i, _StackResult(h, v, o, u), run if k == len(run) - 1 else None


def _transformed(
    variant: Variant, O: Tensor, outs: Sequence[Tensor], moments: Sequence[Tensor | None], counts: Sequence[int],
    beta2: float, eps: float,
) -> list[tuple[Tensor, Tensor | None]]:
    """(H, new second moment) of each tensor of a stack: the variant's transform of its share `outs[k]`
    of the stack O. One call on the whole stack when every tensor has a second moment of one dtype
    (their matrices concatenated; every operation of the transform acts on each matrix on its own,
    so the bits are those of one call per tensor, tests/test_variants.py), else one call per tensor."""
    if len(outs) > 1 and all(v is not None for v in moments) and len({v.dtype for v in moments}) == 1:  # type: ignore[union-attr]
        H, V = variant.transform(O, torch.cat(moments), beta2=beta2, eps=eps)  # type: ignore[arg-type]
        assert V is not None
        return list(zip(H.split(counts), V.split(counts)))
    return [variant.transform(o, v, beta2=beta2, eps=eps) for o, v in zip(outs, moments)]


def local_update_many(
    *, method: Orthogonalizer, steps: int, dtype: NsDtype, variant: Variant | str, beta2: float, eps: float
) -> UpdateMany:
    """An `update_many` on this process: the step driver on given momentum updates U (each in its
    tensor's own shape). Distributed training runs it on each tensor's owner rank."""
    chosen = VARIANTS[variant] if isinstance(variant, str) else variant

    def update_many(
        tensors: Sequence[Tensor],
        second_moments: Sequence[Tensor | None],
        layouts: Sequence[Layout],
        slices: Sequence[tuple[int, ...] | None] | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        assert slices is None or all(s is None for s in slices), "one process holds whole tensors"
        matrices = [to_matrices(t, layout) for t, layout in zip(tensors, layouts)]
        moments = [None if v is None else to_matrices(v, layout) for v, layout in zip(second_moments, layouts)]
        updates: list[Tensor] = list(tensors)
        new_moments: list[Tensor | None] = [None] * len(tensors)
        for i, r, _ in _stack_updates(
            tensors, [m.shape for m in matrices], lambda i, part: _write_(part, matrices[i]), moments,
            method=method, steps=steps, dtype=dtype, variant=chosen, beta2=beta2, eps=eps, keep_inputs=False,
        ):
            updates[i] = from_matrices(r.update, layouts[i], tensors[i].shape)
            v = second_moments[i]
            if r.second_moment is not None and v is not None:
                new_moments[i] = from_matrices(r.second_moment, layouts[i], v.shape)
        return updates, new_moments

    return update_many


def _lookahead(grad: Tensor, buffer: Tensor, *, momentum: float, nesterov: bool, sign: bool, out: Tensor | None = None) -> Tensor:
    """U = lerp(G, M, momentum) if nesterov else M, from the already-updated buffer M; sign(U) when
    the variant orthogonalizes signs."""
    # Writing into `out` saves a temporary in eager mode; under torch.compile, which cannot trace
    # out= into a strided view, the copy below is fused instead. A large tall part of a stack is
    # written by `_write_`'s transposing copy instead (faster than an elementwise kernel's strided writes).
    direct = out is not None and not torch.compiler.is_compiling() and not _transposes(out)
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
        _write_(out, u)
        return out
    return u


def _transposes(out: Tensor) -> bool:
    """Whether `out` is a part of a work stack whose matrices are tall (rows > cols, stored as their
    transposes, `empty_work`) and larger than STACK_MATRIX_NUMEL elements."""
    return (out.dim() == 3 and out.size(-2) > out.size(-1) and out.stride(-2) == 1
            and out.size(-2) * out.size(-1) > STACK_MATRIX_NUMEL and not torch.compiler.is_compiling())


def _write_(out: Tensor, u: Tensor) -> None:
    """out <- u (the same bits as out.copy_(u)). Into the transposed matrices of a large tall stack
    part, one matrix at a time after any dtype conversion, so that torch takes its blocked 2-D
    transpose copy: 0.29x the time of one strided copy for 3072 x 768 in float32, 0.52x in bfloat16
    (1 thread, 2026-12-07; an elementwise kernel writing strided is as slow as the strided copy).
    Small matrices gain nothing from it and keep the one copy."""
    if not _transposes(out):
        out.copy_(u)
        return
    if u.dtype != out.dtype:
        u = u.to(out.dtype)
    for o, x in zip(out.mT, u):
        o.copy_(x.mT)


def _as_buffer_dtype(grads: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[Tensor]:
    """Grads in their buffers' dtype (a gradient may have another dtype than its parameter)."""
    return [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, buffers)]


@dataclass
class Pending:
    """A Muon step computed and held: `apply_` writes it. Until then nothing the caller owns has
    changed; `apply_` is arithmetic on checked tensors and cannot fail.

    Each list has one entry per parameter: its update H and new second moment (None where the
    variant keeps none), in the parameter's and the state's own shapes."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor]
    second_moments: list[Tensor | None]
    updates: list[Tensor | None]  # None once applied
    new_second_moments: list[Tensor | None]  # None once applied (or where the variant keeps none)
    factors: list[float]
    momentum: float
    lr: float | Tensor
    weight_decay: float
    cautious_weight_decay: bool
    rounding_seeds: list[int | None]
    stats: list[Stats] | None
    accumulates: bool = False  # M <- M + G (the variant's `accumulates`) instead of the lerp
    selections: list[Selection | None] | None = None  # the slices each matrix view updates (Dion2)
    ef_decay: float = 1.0
    layouts: list[Layout] | None = None

    momentum_applied: bool = False  # `apply_momentum_` has run
    # Parameters whose results arrive after the step (muonkit.deferred: relayed pieces still in
    # flight): `apply_` leaves them to `apply_later_`. `applied`: `apply_` has run.
    later: set[int] = field(default_factory=set)
    applied: bool = False

    def apply_momentum_(self) -> None:
        """M <- lerp(M, G, 1 - momentum) (or M + G) in place (the bits the held step computed out of
        place) and the selected slices' error-feedback decay, once: `apply_` skips it if it ran (a
        caller whose buffers are copies, as 8-bit momentum's dequantized ones, may read M first)."""
        if self.momentum_applied:
            return
        if self.params:
            _momentum_(self.momentum_buffers, _as_buffer_dtype(self.grads, self.momentum_buffers), self.momentum,
                       self.accumulates)
        for i in range(len(self.params)):
            _decay_selected_(self, i)
        self.momentum_applied = True

    def apply_(self) -> None:
        """The momentum (`apply_momentum_`), then the second moments and the parameters, as the fast
        path applies them."""
        self.apply_momentum_()
        ready = [i for i in range(len(self.params)) if i not in self.later]
        _apply_moments_(self, ready)
        _apply_params_(self, ready)
        self.applied = True
        if not self.later:
            return
        # Held until the later ones arrive: only what they need. The results of the others, the
        # gradients and 8-bit momentum's dequantized copies are released (of the momentum buffers
        # only the dtype is read from now on: the update's compute dtype).
        self.grads = []
        for i in ready:
            self.updates[i] = self.new_second_moments[i] = None
        self.momentum_buffers = [m.new_empty(0) for m in self.momentum_buffers]

    def apply_later_(self, results: dict[int, tuple[Tensor | None, Tensor | None]]) -> None:
        """The parameters (and second moments) of `results` ({index: (update, new second moment)},
        arrived after `apply_`; None: what arrived with the step, already held), as `apply_`
        applies the others; each once."""
        indices = [i for i in sorted(results) if i in self.later]
        for i in indices:
            update, moment = results[i]
            if update is not None:
                self.updates[i] = update
            if moment is not None:
                self.new_second_moments[i] = moment
            self.later.discard(i)
        _apply_moments_(self, indices)
        _apply_params_(self, indices)
        for i in indices:
            self.updates[i] = self.new_second_moments[i] = None


def _momentum_(buffers: list[Tensor], grads: list[Tensor], momentum: float, accumulates: bool) -> None:
    if accumulates:
        torch._foreach_add_(buffers, grads)
    else:
        torch._foreach_lerp_(buffers, grads, 1.0 - momentum)


def _decay_selected_(step: Pending, i: int) -> None:
    """M_S <- ef_decay M_S on the slices S a selecting variant updated (error feedback)."""
    selection = step.selections[i] if step.selections is not None else None
    if selection is not None and step.ef_decay != 1.0 and step.layouts is not None:
        # Out of place and copied back: a layout that permutes axes has no matrix view of M.
        buffer, layout = step.momentum_buffers[i], step.layouts[i]
        buffer.copy_(from_matrices(selection.scaled(to_matrices(buffer, layout), step.ef_decay), layout, buffer.shape))


def _apply_moments_(step: Pending, indices: Iterable[int]) -> None:
    """For the parameters at `indices`: v <- its new value (where the variant keeps one)."""
    for i in indices:
        v, new = step.second_moments[i], step.new_second_moments[i]
        if v is not None and new is not None:
            v.copy_(new)


def _apply_params_(step: Pending, indices: Iterable[int]) -> None:
    """For the parameters at `indices`: W <- W - lr (lambda D(W) + factor H) (`write_updates_`), and
    their update statistics (with the second moments' new range)."""
    indices = list(indices)
    write_updates_(
        [step.params[i] for i in indices], [step.updates[i] for i in indices], [step.factors[i] for i in indices],
        [step.momentum_buffers[i].dtype for i in indices], lr=step.lr, weight_decay=step.weight_decay,
        cautious_weight_decay=step.cautious_weight_decay, rounding_seeds=[step.rounding_seeds[i] for i in indices],
    )
    if step.stats is not None:
        for i in indices:
            step.stats[i]["update_rms"] = _rms(step.updates[i]) * step.factors[i]
            v = step.second_moments[i]
            if v is not None:
                _record_second_moment(step.stats[i], v)


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
    lr: float | Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    scale: Scale,
    rms: float,
    orthogonalizer: Orthogonalizer,
    ns_steps: int,
    ns_dtype: NsDtype,
    variant: Variant | str = "muon",
    beta2: float = 0.95,
    variant_eps: float = 1e-10,
    fraction: float = 0.25,
    ef_decay: float = 0.95,
    selection: str = "local",
    second_moments: Sequence[Tensor | None] | None = None,
    cautious_weight_decay: bool = False,
    update_many: UpdateMany | None = None,
    shards: Sequence[Shard | None] | None = None,
    gather_rows: GatherRows | None = None,
    shapes: Sequence[torch.Size] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
    stats: Sequence[Stats] | None = None,
    orthogonality: bool = False,
    hold: bool = False,
) -> Pending | None:
    """One Muon step for a list of parameters, applied now or (with `hold`) returned to apply later.

    For each matrix W (rows x cols) of each parameter's matrix view:
        M <- beta M + (1 - beta) G;   U <- (1 - beta) G + beta M  (nesterov) or M
        O <- orthogonalize(U)   (orthogonalize(sign(U)) for a variant with `signs_input`)
        H, v <- variant.transform(O, v)   (H = O for plain Muon; see muonkit.variants)
        W <- W - lr (lambda D(W) + scale(rows, cols) H),   D(W) = W or W * 1[H * W >= 0] (cautious)

    Both modes run the same driver (`_stack_updates`), one stack of same-shaped matrices at a time
    with U written straight into the stack. Without `hold` each stack is applied as soon as it is
    orthogonalized (the fewest temporaries; used when nothing can fail: a built-in kernel on one
    process). With `hold` nothing is modified and the returned `Pending` applies the step; a
    caller that must not change anything until every group is ready (a user's orthogonalizer or
    the SVD can raise; collectives can fail) applies it last.

    Args:
        variant: a muonkit.variants.Variant or its name in muonkit.variants.VARIANTS.
        second_moments: one buffer per parameter (its variant's `second_moment_shape`), or None
            for a variant that keeps none.
        update_many: maps the momentum updates U and the second moments, each in its tensor's own
            shape, to (H, new second moments); None means the driver on this process.
            Distributed training passes one that splits the work across ranks.
        shapes: the full shape of each parameter when `params` are local slices of sharded ones
            (FSDP2); the scale is computed from the full matrix view. None means params' shapes.
        rounding_seeds: per parameter, None (round to nearest) or the seed of its stochastic
            rounding this step (see `write_updates_`).
        stats: one dict per parameter to receive 0-d tensors "grad_rms", "momentum_rms",
            "update_rms" and, with `orthogonality`, "orthogonality_error", "singular_min",
            "singular_max"; "second_moment_min"/"_max" for a variant with a second moment.
        fraction, ef_decay: a selecting variant's (Dion2's) share of slices orthogonalized per
            matrix and the decay of their momentum (muonkit.variants.Dion2).
        selection: where a selecting variant picks the rows of a row-sharded parameter: "local"
            (the top rows of each rank's block, `muonkit.variants.local_rows`) or "global" (the top
            rows of the whole matrix, `muonkit.variants.global_rows`); whole matrices are the same
            either way.
        shards: per parameter, None (this process holds all of it) or how it is sharded (FSDP2:
            `params` are local slices, `shapes` the full shapes); only with `update_many`.
        gather_rows: the collective that gathers every rank's row norms for selection="global".
        hold: compute without modifying anything and return the step as a `Pending`.
    """
    chosen = VARIANTS[variant] if isinstance(variant, str) else variant
    moments = list(second_moments) if second_moments is not None else [None] * len(params)
    if any(v is None for v in moments) and any(chosen.second_moment_shape(p.shape, layout) is not None
                                                for p, layout in zip(params, layouts)):
        raise ValueError(f"variant {chosen.name!r} needs a second-moment buffer for every parameter")
    buffers = list(momentum_buffers)
    grads = _as_buffer_dtype(grads, buffers)
    # The momentum buffer's new value: in place now, or out of place when held (`Pending.apply_`
    # writes the same bits into the buffer).
    if hold:
        if not grads:
            new_buffers = []
        elif chosen.accumulates:
            new_buffers = list(torch._foreach_add(buffers, grads))
        else:
            new_buffers = list(torch._foreach_lerp(buffers, grads, 1.0 - momentum))
    else:
        if grads:
            _momentum_(buffers, grads, momentum, chosen.accumulates)
        new_buffers = buffers
    full = list(shapes) if shapes is not None else [p.shape for p in params]
    shards = list(shards) if shards is not None else [None] * len(params)
    selections, part_slices = _selections(chosen, new_buffers, layouts, fraction, selection, shards, gather_rows)
    step = Pending(
        list(params), grads, buffers, moments, [None] * len(params), [None] * len(params),
        [update_scale(scale, *matrix_shape(s, layout)[1:], rms) for s, layout in zip(full, layouts)],
        momentum, lr, weight_decay, cautious_weight_decay,
        list(rounding_seeds) if rounding_seeds is not None else [None] * len(params),
        list(stats) if stats is not None else None,
        chosen.accumulates, selections, ef_decay, list(layouts),
    )
    if stats is not None:
        for s, g, m in zip(stats, grads, new_buffers):
            _record_inputs(s, g, m)
    if chosen.accumulates:
        nesterov = False  # U = M: a summed momentum has no lookahead
    # A selecting variant orthogonalizes and transforms the selected slices only (of U and of the
    # second moment's matching rows); `_selected` gives them, `_unselected` puts the results back.
    # Read only where used: the local part of a sharded second moment has no matrix view of its own
    # (a layout cutting dim 0 into blocks cuts the full tensor's rows, not the part's).
    matrix_moments = [None if v is None or (update_many is not None and not chosen.selects) else to_matrices(v, layout)
                      for v, layout in zip(moments, layouts)]
    part_moments = [v if sel is None or v is None else sel.gather(v) for v, sel in zip(matrix_moments, selections)]
    if update_many is not None:
        lookaheads = [_lookahead(g, m, momentum=momentum, nesterov=nesterov, sign=chosen.signs_input)
                      for g, m in zip(grads, new_buffers)]
        if chosen.selects:
            # The selected rows of a row-sharded parameter travel rows first, (rows, batch, cols), so
            # that every rank's rows are a dim-0 slice of the one matrix their owner orthogonalizes.
            by_rows = [shard is not None and shard.axis == "rows" for shard in shards]
            parts = [_rows_first(sel.gather(to_matrices(u, layout)), rows)
                     for u, sel, layout, rows in zip(lookaheads, selections, layouts, by_rows)]
            part_moments = [None if v is None else _rows_first(v, rows) for v, rows in zip(part_moments, by_rows)]
            part_layouts = [_ROWS_FIRST if rows else resolve("stacked", 3) for rows in by_rows]
            part_updates, part_new = update_many(parts, part_moments, part_layouts, part_slices)
            for i, sel in enumerate(selections):
                new = part_new[i]
                step.updates[i], step.new_second_moments[i] = _unselected(
                    sel, _rows_first(part_updates[i], by_rows[i]), None if new is None else _rows_first(new, by_rows[i]),
                    params[i], matrix_moments[i], moments[i], layouts[i])
        else:
            updates, new_moments = update_many(lookaheads, moments, layouts)
            step.updates, step.new_second_moments = list(updates), list(new_moments)
        if hold:
            return step
        for i in range(len(params)):
            _decay_selected_(step, i)
        _apply_moments_(step, range(len(params)))
        _apply_params_(step, range(len(params)))
        return None
    views = [matrix_shape(p.shape, layout) for p, layout in zip(params, layouts)]
    if chosen.selects:
        views = [tuple(sel.gather(to_matrices(m, layout)).shape) if sel is not None else view
                 for sel, m, layout, view in zip(selections, new_buffers, layouts, views)]

    def fill(i: int, out: Tensor) -> None:
        if selections[i] is not None:
            out.copy_(selections[i].gather(to_matrices(new_buffers[i], layouts[i])))
            return
        _lookahead(to_matrices(grads[i], layouts[i]), to_matrices(new_buffers[i], layouts[i]),
                   momentum=momentum, nesterov=nesterov, sign=chosen.signs_input, out=out)

    for i, r, run in _stack_updates(
        new_buffers, views, fill, part_moments,
        method=orthogonalizer, steps=ns_steps, dtype=ns_dtype, variant=chosen, beta2=beta2, eps=variant_eps,
        keep_inputs=stats is not None and orthogonality,
    ):
        if selections[i] is not None:
            step.updates[i], step.new_second_moments[i] = _unselected(
                selections[i], r.update, r.second_moment, params[i], matrix_moments[i], moments[i], layouts[i])
        else:
            step.updates[i] = from_matrices(r.update, layouts[i], params[i].shape)
            v = moments[i]
            if r.second_moment is not None and v is not None:
                step.new_second_moments[i] = from_matrices(r.second_moment, layouts[i], v.shape)
        if stats is not None and r.inputs is not None:
            _record_orthogonality(stats[i], r.inputs, r.ortho)
        if hold:
            continue
        # Applied now: the momentum's error feedback (its slices were read into the stack) and the
        # second moment at once, the stack's parameters after its last tensor, each result released
        # once written, so that a step holds one stack's temporaries at a time.
        _decay_selected_(step, i)
        _apply_moments_(step, [i])
        step.new_second_moments[i] = None
        if run is not None:
            _apply_params_(step, run)
            for j in run:
                step.updates[j] = None
    return step if hold else None


# The layout of a selected part sent rows first: (rows, batch, cols).
_ROWS_FIRST = Layout(rows=(0,), cols=(2,), batch=(1,))


def _rows_first(part: Tensor, rows: bool) -> Tensor:
    """(batch, rows, cols) <-> (rows, batch, cols) for the parts of row-sharded parameters."""
    return part.transpose(0, 1) if rows else part


def _selections(
    variant: Variant,
    buffers: Sequence[Tensor],
    layouts: Sequence[Layout],
    fraction: float,
    selection: str,
    shards: Sequence[Shard | None],
    gather_rows: GatherRows | None,
) -> tuple[list[Selection | None], list[tuple[int, ...] | None]]:
    """Each parameter's Selection (None for a variant that selects nothing), and for a sharded one
    the dim-0 size of its selected part on every rank (its rows per rank when row-sharded, its
    matrices per rank when batch-sharded).

    A row-sharded parameter's rows are chosen along the shard dimension (microsoft/dion dion2.py
    aligns its selection with the shard dimension), per rank's block or over the whole matrix
    (`selection`); a batch-sharded one's ranks hold whole matrices, selected as on one process. A
    2-D parameter also cut along dim 1 (FSDP2 over tensor parallel's Shard(1)) scores each row by
    its L1 norm over all columns: the ranks' partial norms are gathered and summed, so the ranks
    holding a block's columns select the same rows."""
    selections: list[Selection | None] = [None] * len(buffers)
    slices: list[tuple[int, ...] | None] = [None] * len(buffers)
    if not variant.selects:
        return selections, slices
    matrices = [to_matrices(m, layout) for m, layout in zip(buffers, layouts)]
    rows = [shard is not None and shard.axis == "rows" for shard in shards]
    # The row norms every rank needs whole: the whole matrix's (global), or a column-cut block's
    # (each rank holds part of its rows: the norms of all of them are the sums over the column ranges).
    gathered = [i for i, shard in enumerate(shards) if rows[i] and (selection == "global" or shard.columns is not None)]  # type: ignore[union-attr]
    whole: dict[int, Tensor] = {}
    if gathered:
        assert gather_rows is not None and all(matrices[i].shape[0] == 1 for i in gathered)
        norms = gather_rows([slice_norms(matrices[i], -2).reshape(-1).double() for i in gathered],
                            [shards[i].norm_ranges() for i in gathered])  # type: ignore[union-attr]
        whole = {i: n.view(-1, sum(shards[i].sizes)).sum(0) for i, n in zip(gathered, norms)}  # type: ignore[union-attr]
    for i, (M, shard) in enumerate(zip(matrices, shards)):
        if rows[i] and selection == "global":
            selections[i], counts = global_rows(whole[i], fraction, shard)  # type: ignore[arg-type]
            slices[i] = shard.ranges(counts)  # type: ignore[union-attr]
        elif rows[i]:
            start = sum(shard.sizes[: shard.rank])  # type: ignore[union-attr]
            block = whole[i][start : start + shard.sizes[shard.rank]].unsqueeze(0) if i in whole else None  # type: ignore[union-attr]
            selections[i], counts = local_rows(M, fraction, shard, block)  # type: ignore[arg-type]
            slices[i] = shard.ranges(counts)  # type: ignore[union-attr]
        else:
            selections[i] = variant.select(M, fraction)
            slices[i] = None if shard is None else shard.sizes
    return selections, slices


def _unselected(
    selection: Selection | None,
    update: Tensor,
    second_moment: Tensor | None,
    param: Tensor,
    matrix_moment: Tensor | None,
    moment: Tensor | None,
    layout: Layout,
) -> tuple[Tensor, Tensor | None]:
    """A selecting variant's results on the selected slices, put back in the parameter's and the
    second moment's shapes: H is 0 off the selection, v keeps its values there."""
    assert selection is not None
    matrices = selection.scatter(update, update.new_zeros(matrix_shape(param.shape, layout)))
    new_moment = None
    if second_moment is not None and moment is not None and matrix_moment is not None:
        new_moment = from_matrices(selection.scatter(second_moment.to(matrix_moment.dtype), matrix_moment), layout, moment.shape)
    return from_matrices(matrices, layout, param.shape), new_moment


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
    fused: bool = False,
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

    With `fused=True` the step is torch's fused AdamW kernel, as torch.optim.AdamW(fused=True) runs
    it (`_fused_adamw`; muonkit.Muon's AdamW groups take it by default on CPU,
    muonkit.options.adamw_kernel); False, the path above.
    """
    if not params:
        return
    if fused:
        _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, cautious_weight_decay=cautious_weight_decay,
                     rounding_seeds=rounding_seeds)
        if stats is not None:
            _adamw_stats(stats, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps)
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
        _adamw_stats(stats, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps)


def _adamw_stats(stats: Sequence[Stats], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], beta1: Any, beta2: Any, eps: Any) -> None:
    for s, g, m, v, step in zip(stats, grads, exp_avgs, exp_avg_sqs, steps):
        _record_inputs(s, g, m)
        t = float(step)
        m_hat = m / (1.0 - beta1**t)
        v_hat = v / (1.0 - beta2**t)
        s["update_rms"] = _rms(m_hat / (v_hat.sqrt() + eps))


def _fused_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: Any,
    beta2: Any,
    eps: Any,
    weight_decay: Any,
    cautious_weight_decay: bool,
    rounding_seeds: Sequence[int | None] | None,
) -> None:
    """torch's fused AdamW kernel (torch._fused_adamw_ through torch's adam functional), with the
    arguments torch.optim.AdamW(fused=True) gives it: lr as given (a tensor too), the other
    hyperparameters as numbers; `steps` on the parameters' device. The kernel updates the moments
    in the parameter's dtype and writes the parameter round-to-nearest, so a widened state, a
    stochastic rounding seed or cautious weight decay (a mask it has not) is refused here too
    (muonkit.options.check_fused_param refuses them before a step).

    torch's fused CPU kernel (torch 2.13) walks each tensor's memory in order and ignores its
    strides: a gradient laid out otherwise than its parameter (a transposed one) gives a wrong step,
    and a parameter that is a slice of a larger tensor has the memory beside it written. So each
    parameter is stepped as a dense tensor (itself, or a contiguous copy written back), with its
    gradient and moments laid out alike (themselves, or copies; moments written back)."""
    if cautious_weight_decay and float(weight_decay) != 0.0:
        raise ValueError("adamw: fused=True cannot apply cautious_weight_decay (torch's fused kernel has no mask)")
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        if m.dtype != p.dtype or (rounding_seeds is not None and rounding_seeds[i] is not None):
            raise ValueError(
                f"adamw: fused=True steps parameter {i} ({p.dtype}) in its own dtype, round-to-nearest; got "
                f"moments in {m.dtype}" + (" and a stochastic rounding seed" if m.dtype == p.dtype else "")
            )
    dense, moments = list(params), [list(exp_avgs), list(exp_avg_sqs)]
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
    contiguous = Tensor.is_contiguous
    laid_out = all(all(map(contiguous, tensors)) for tensors in (params, grads, exp_avgs, exp_avg_sqs))
    if not laid_out:
        dense = [p if _dense(p) else p.contiguous() for p in params]
        grads = [g if _alike(g, d) else torch.empty_like(d).copy_(g) for g, d in zip(grads, dense)]
        moments = [[m if _alike(m, d) else torch.empty_like(d).copy_(m) for m, d in zip(ms, dense)] for ms in moments]
    _torch_adam(
        dense,
        grads,
        moments[0],
        moments[1],
        [],
        list(steps),
        foreach=False,
        capturable=False,
        differentiable=False,
        fused=True,
        grad_scale=None,
        found_inf=None,
        has_complex=False,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=float(beta1),
        beta2=float(beta2),
        lr=lr,
        weight_decay=float(weight_decay),
        eps=float(eps),
        maximize=False,
    )
    if laid_out:
        return
    for targets, stepped in zip((params, exp_avgs, exp_avg_sqs), (dense, *moments)):
        for target, t in zip(targets, stepped):
            if t is not target:
                target.copy_(t)


def _alike(t: Tensor, like: Tensor) -> bool:
    """Whether `t` is laid out as `like` (of the same shape) in memory."""
    return (t.is_contiguous() and like.is_contiguous()) or t.stride() == like.stride()


def _dense(t: Tensor) -> bool:
    """Whether `t` fills its memory without gaps or overlaps (contiguous up to an order of its axes)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True
