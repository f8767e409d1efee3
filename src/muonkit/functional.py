"""One optimizer step over lists of tensors: the Muon math and the AdamW math.

The optimizer class gathers tensors and state and calls these; batching and distribution plug in
through `orthogonalize_many`, the one seam where matrices become their orthogonalized updates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from .layout import Layout, from_matrices, matrix_shape, to_matrices
from .orthogonalize import SCHEDULES, Orthogonalizer, empty_work, orthogonalize, orthogonalize_, working_dtype
from .scaling import Scale, update_scale

OrthogonalizeMany = Callable[[Sequence[Tensor]], list[Tensor]]

# Same-shaped matrices are orthogonalized together in stacks of at most this many elements (or
# one matrix, if larger): enough to amortize the per-call overhead of small matrices (200 of
# 64 x 64 are 0.8M elements), few enough that a step's temporaries stay near three times
# max(largest matrix, 16 MiB of float32).
STACK_NUMEL = 1 << 22
# Matrices above this many elements are orthogonalized one at a time: a single product of that
# size already keeps every thread busy, and a batched product splits its batch across threads,
# so an odd count of large matrices leaves a thread idle (7 of 768 x 768: 12% slower than a loop
# on 2 threads, measured; 16 of 384 x 384: 17% faster).
STACK_MATRIX_NUMEL = 1 << 18


def momentum_update_(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    momentum: float,
    nesterov: bool,
) -> list[Tensor]:
    """M <- lerp(M, G, 1 - momentum); returns U = lerp(G, M, momentum) if nesterov else M.

    The buffers are updated in place; the grads are never modified. Without nesterov the
    returned tensors ARE the buffers, so callers must not modify them.
    """
    grads = list(grads)
    buffers = list(momentum_buffers)
    torch._foreach_lerp_(buffers, grads, 1.0 - momentum)
    if nesterov:
        return list(torch._foreach_lerp(grads, buffers, momentum))
    return buffers


def momentum_update(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    momentum: float,
    nesterov: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """`momentum_update_` out of place: (the new buffers, U); the given buffers are left as they are."""
    new = list(torch._foreach_lerp(list(momentum_buffers), list(grads), 1.0 - momentum))
    return new, (list(torch._foreach_lerp(list(grads), new, momentum)) if nesterov else new)


def _stacks(keys: Sequence[tuple], sizes: Sequence[int], matrix_numel: Sequence[int]) -> list[list[int]]:
    """Indices grouped by key, each group cut into runs of at most STACK_NUMEL elements; a
    tensor whose matrices have more than STACK_MATRIX_NUMEL elements makes a run of its own."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[(i,) if matrix_numel[i] > STACK_MATRIX_NUMEL else key].append(i)
    runs: list[list[int]] = []
    for members in groups.values():
        run: list[int] = []
        total = 0
        for i in members:
            if run and total + sizes[i] > STACK_NUMEL:
                runs.append(run)
                run, total = [], 0
            run.append(i)
            total += sizes[i]
        runs.append(run)
    return runs


def _runs_in_place(method: Orthogonalizer) -> bool:
    """Whether `orthogonalize_` runs the method on a caller's stacked work buffer."""
    return isinstance(method, str) and (method in SCHEDULES or method == "gram")


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
    per-matrix overhead.
    """
    out: list[Tensor | None] = [None] * len(matrices)
    keys = [(m.shape[-2:], m.dtype, m.device) for m in matrices]
    if not _runs_in_place(method):
        for run in _stacks(keys, [0] * len(matrices), [0] * len(matrices)):
            members = [matrices[i] for i in run]
            stacked = members[0] if len(members) == 1 else torch.cat(members)
            result = orthogonalize(stacked, method, steps, dtype=dtype)
            for i, part in zip(run, result.split([m.size(0) for m in members])):
                out[i] = part
        return out  # type: ignore[return-value]
    for run in _stacks(keys, [m.numel() for m in matrices], [m.size(-2) * m.size(-1) for m in matrices]):
        first = matrices[run[0]]
        sizes = [matrices[i].size(0) for i in run]
        X = empty_work(sum(sizes), *first.shape[-2:], dtype=working_dtype(first, dtype), device=first.device)
        for i, part in zip(run, X.split(sizes)):
            part.copy_(matrices[i])
        for i, part in zip(run, orthogonalize_(X, method, steps).split(sizes)):  # type: ignore[arg-type]
            out[i] = part.to(matrices[i].dtype)
    return out  # type: ignore[return-value]


def _stacked_muon_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    layouts: Sequence[Layout],
    shapes: Sequence[torch.Size],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    scale: Scale,
    rms: float,
    orthogonalizer: str,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
) -> None:
    """U, orthogonalize(U) and the parameter update, one stack of same-shaped matrices at a time.

    U is written straight into the stack's work buffer and the update is read from the kernel's
    output, so a stack holds about three matrix-sized temporaries per matrix and nothing else.
    """
    views = [matrix_shape(p.shape, layout) for p, layout in zip(params, layouts)]
    keys = [(rows, cols, working_dtype(p, ns_dtype), p.device) for p, (_, rows, cols) in zip(params, views)]
    for run in _stacks(keys, [p.numel() for p in params], [rows * cols for _, rows, cols in views]):
        _, rows, cols = views[run[0]]
        sizes = [views[i][0] for i in run]
        X = empty_work(sum(sizes), rows, cols, dtype=keys[run[0]][2], device=params[run[0]].device)
        for i, part in zip(run, X.split(sizes)):
            # Splitting the matrix dims of a slice of X is always a view, so writes land in X.
            target = from_matrices(part, layouts[i], params[i].shape)
            if not nesterov:
                target.copy_(momentum_buffers[i])
            elif grads[i].dtype == X.dtype == momentum_buffers[i].dtype:
                torch.lerp(grads[i], momentum_buffers[i], momentum, out=target)
            else:
                target.copy_(torch.lerp(grads[i], momentum_buffers[i], momentum))
        ortho = orthogonalize_(X, orthogonalizer, ns_steps)  # type: ignore[arg-type]
        updates: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for i, o in zip(run, ortho.split(sizes)):
            _, r, c = matrix_shape(shapes[i], layouts[i])
            targets, values = updates[-lr * update_scale(scale, r, c, rms)]
            targets.append(params[i])
            values.append(from_matrices(o, layouts[i], params[i].shape).to(params[i].dtype))
        for alpha, (targets, values) in updates.items():
            torch._foreach_add_(targets, values, alpha=alpha)


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
    orthogonalize_many: OrthogonalizeMany | None = None,
    shapes: Sequence[torch.Size] | None = None,
) -> None:
    """One Muon step for a list of parameters.

    For each matrix W (rows x cols) of each parameter's matrix view:
        M <- beta M + (1 - beta) G;   U <- (1 - beta) G + beta M  (nesterov) or M
        O <- orthogonalize(U)
        W <- W (1 - lr wd) - lr scale(rows, cols) O

    Args:
        orthogonalize_many: maps a list of (batch, rows, cols) tensors to their orthogonalized
            versions; None means stacking same-shaped matrices on this process, with the same
            bits as `batched_orthogonalize`. Distributed training passes one that splits the
            work across ranks.
        shapes: the full shape of each parameter when `params` are local slices of sharded ones
            (FSDP2); the scale is computed from the full matrix view. None means params' shapes.
    """
    if not params:
        return
    shapes = [p.shape for p in params] if shapes is None else shapes
    if orthogonalize_many is None and _runs_in_place(orthogonalizer):
        torch._foreach_lerp_(list(momentum_buffers), list(grads), 1.0 - momentum)
        if weight_decay != 0.0:
            torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
        _stacked_muon_(
            params, grads, momentum_buffers, layouts, shapes,
            lr=lr, momentum=momentum, nesterov=nesterov, scale=scale, rms=rms,
            orthogonalizer=orthogonalizer, ns_steps=ns_steps, ns_dtype=ns_dtype,  # type: ignore[arg-type]
        )
        return
    if orthogonalize_many is None:
        # A user's callable or the SVD can raise: the new momentum is kept aside until it returns, so
        # that an error leaves this group's buffers and parameters as they were.
        buffers, updates = momentum_update(grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
        matrices = [to_matrices(u, layout) for u, layout in zip(updates, layouts)]
        ortho = batched_orthogonalize(matrices, method=orthogonalizer, steps=ns_steps, dtype=ns_dtype)
        torch._foreach_copy_(list(momentum_buffers), buffers)
    else:
        updates = momentum_update_(grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
        matrices = [to_matrices(u, layout) for u, layout in zip(updates, layouts)]
        ortho = orthogonalize_many(matrices)
    if weight_decay != 0.0:
        torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
    for p, o, layout, shape in zip(params, ortho, layouts, shapes):
        _, rows, cols = matrix_shape(shape, layout)
        factor = update_scale(scale, rows, cols, rms)
        p.add_(from_matrices(o, layout, p.shape).to(p.dtype), alpha=-lr * factor)


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (decoupled weight decay), by the same functional torch.optim.AdamW calls,
    so that muonkit's AdamW groups equal torch.optim.AdamW bit for bit."""
    if not params:
        return
    _torch_adam(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        [],
        list(steps),
        foreach=None,
        capturable=False,
        differentiable=False,
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
