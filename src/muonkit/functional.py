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

from .layout import Layout, from_matrices, to_matrices
from .orthogonalize import Orthogonalizer, orthogonalize
from .scaling import Scale, update_scale

OrthogonalizeMany = Callable[[Sequence[Tensor]], list[Tensor]]


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


def batched_orthogonalize(
    matrices: Sequence[Tensor],
    *,
    method: Orthogonalizer,
    steps: int,
    dtype: torch.dtype | None,
) -> list[Tensor]:
    """Orthogonalize (batch, rows, cols) tensors, stacking same-shaped ones into one batched call.

    Matrices are independent whatever the batching, so the result equals calling `orthogonalize`
    on each one; stacking only removes per-matrix overhead.
    """
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        by_shape[(m.shape[-2:], m.dtype, m.device)].append(i)
    out: list[Tensor | None] = [None] * len(matrices)
    for indices in by_shape.values():
        members = [matrices[i] for i in indices]
        stacked = members[0] if len(members) == 1 else torch.cat(members)
        result = orthogonalize(stacked, method, steps, dtype=dtype)
        for i, part in zip(indices, result.split([m.size(0) for m in members])):
            out[i] = part
    return out  # type: ignore[return-value]


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
) -> None:
    """One Muon step for a list of parameters.

    For each matrix W (rows x cols) of each parameter's matrix view:
        M <- beta M + (1 - beta) G;   U <- (1 - beta) G + beta M  (nesterov) or M
        O <- orthogonalize(U)
        W <- W (1 - lr wd) - lr scale(rows, cols) O

    Args:
        orthogonalize_many: maps a list of (batch, rows, cols) tensors to their orthogonalized
            versions; None means `batched_orthogonalize` on this process. Distributed training
            passes one that splits the work across ranks.
    """
    if not params:
        return
    updates = momentum_update_(grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
    matrices = [to_matrices(u, layout) for u, layout in zip(updates, layouts)]
    if orthogonalize_many is None:
        ortho = batched_orthogonalize(matrices, method=orthogonalizer, steps=ns_steps, dtype=ns_dtype)
    else:
        ortho = orthogonalize_many(matrices)
    if weight_decay != 0.0:
        torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
    for p, o, layout in zip(params, ortho, layouts):
        factor = update_scale(scale, o.size(-2), o.size(-1), rms)
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
