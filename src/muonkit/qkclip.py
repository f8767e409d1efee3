"""QK-Clip (Kimi K2's MuonClip): after an optimizer step, shrink the query and key rows of every
attention head whose largest pre-softmax logit exceeded tau; and the chunked per-head max-logit
helper that feeds it (scaled_dot_product_attention does not return its logits).

For head h with S_h = max over the batch and the unmasked positions of scale * q_i . k_j:

    gamma_h = tau / S_h   if S_h > tau, else 1 (the head is not touched)
    W_q^h <- sqrt(gamma_h) W_q^h,   W_k^h <- sqrt(gamma_h) W_k^h

so the head's logits, bilinear in its query and key rows, scale by gamma_h and its largest one
becomes tau. A key head shared by several query heads (grouped-query attention) is handled as
described in `QKClip`.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .deferred import finish_all
from .dtensor import is_dtensor, placements_of
from .plan import pieces_of

SharedKeys = Literal["query", "group"]
_SHARED_KEYS = ("query", "group")


def attention_max_logits(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    block_size: int = 256,
) -> Tensor:
    r"""Per query head, the largest pre-softmax attention logit over the batch and the kept positions.

    .. math::
        S_h = \max_{b,\; i,\; j \le i \text{ if causal}} \; \text{scale} \cdot q_{b,h,i} \cdot k_{b,g(h),j}

    with g(h) = h // (heads / kv_heads), the key head `scaled_dot_product_attention(...,
    enable_gqa=True)` pairs with query head h. The causal mask is SDPA's `is_causal` (query i sees
    keys j <= i). Logits are computed in float32 (or float64 for float64 inputs) one block of at
    most `block_size` queries x `block_size` keys at a time, never the whole T x T matrix; key
    blocks entirely above the diagonal are skipped. No gradient flows through the result.

    Args:
        q: queries, shape (batch, heads, T_q, head_dim).
        k: keys, shape (batch, kv_heads, T_k, head_dim), kv_heads dividing heads.
        scale: the softmax scale; None means 1 / sqrt(head_dim), as in SDPA.
        is_causal: apply SDPA's causal mask.
        block_size: side of the largest logit block formed (default 256).

    Returns:
        A float tensor of shape (heads,) on q's device; -inf where no logit exists (T_q or T_k is 0).

    Example:
        >>> y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> clip.observe(layer, attention_max_logits(q, k, is_causal=True))

    References:
        Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, section 2.1 (S_max).
    """
    if not isinstance(q, Tensor) or not isinstance(k, Tensor):
        raise TypeError(f"q and k must be tensors, got {type(q).__name__} and {type(k).__name__}")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must have shape (batch, heads, T, head_dim); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    b, heads, t_q, d = q.shape
    kb, kv_heads, t_k, kd = k.shape
    if kb != b or kd != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k's {kv_heads} heads must divide q's {heads} heads (grouped-query attention)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    elif not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full((heads,), -math.inf, dtype=dtype, device=q.device)
    if b == 0 or t_q == 0 or t_k == 0:
        return out
    group = heads // kv_heads
    with torch.no_grad():
        # (b, kv_heads, group, T, d): the query heads that share a key head sit together.
        qg = q.detach().reshape(b, kv_heads, group, t_q, d)
        kg = k.detach().unsqueeze(2)
        for i0 in range(0, t_q, block_size):
            qi = qg[:, :, :, i0:i0 + block_size].to(dtype)
            rows = torch.arange(i0, i0 + qi.shape[3], device=q.device)
            stop = min(t_k, i0 + qi.shape[3]) if is_causal else t_k
            for j0 in range(0, stop, block_size):
                kj = kg[:, :, :, j0:j0 + block_size].to(dtype)
                logits = torch.matmul(qi, kj.transpose(-1, -2)) * scale
                if is_causal and j0 + kj.shape[3] - 1 > i0:
                    cols = torch.arange(j0, j0 + kj.shape[3], device=q.device)
                    logits = logits.masked_fill(cols[None, :] > rows[:, None], -math.inf)
                block_max = logits.amax(dim=(-1, -2)).amax(dim=0).reshape(heads)
                out = torch.maximum(out, block_max)
    return out


@dataclass(frozen=True)
class _Rows:
    """A weight or bias whose dim-0 rows hold a query block starting at `q_start` and/or a key block
    starting at `k_start` (None: no such block in this tensor)."""

    tensor: Tensor
    q_start: int | None
    k_start: int | None
    name: str


@dataclass(frozen=True)
class _Layer:
    rows: list[_Rows]
    head_dim: int


class QKClip:
    r"""QK-Clip: rescale the query and key rows of attention heads whose max logit exceeded `tau`.

    Call `observe(i, max_logits)` during the forward passes (the per-head maxima of pair i, e.g.
    from `attention_max_logits`; a running maximum is kept until the next clip), then `step()`
    after `optimizer.step()`. For each query head h with S_h > tau, gamma_h = tau / S_h, and

    - a key head used by one query head (multi-head attention): the head's query rows and key
      rows are each multiplied by sqrt(gamma_h) (Kimi K2, Algorithm 1);
    - a key head shared by several query heads (grouped-query attention), `shared_keys=`:
      "query" (default): the shared key rows are never rescaled and the clipped query head's rows
      are multiplied by gamma_h. This is Kimi K2's rule for the rotary key that MLA shares across
      heads (k^R untouched, q^R scaled by gamma), and keeps every head under tau untouched.
      "group": Megatron-LM's `--qk-clip` rule for GQA: gamma_g = min(1, tau / max of the group's
      S_h); every query head of the group and the key head are multiplied by sqrt(gamma_g), so
      heads under tau that share a key with a clipped head shrink as well.

    Either way every clipped query head's logits scale by at most tau / S_h, so its max logit on
    the observed inputs, recomputed, is <= tau (up to round-off in the weights' dtype). Rows the
    rule leaves alone are kept bit for bit: every head under tau, except, with "group", those
    sharing a key head with a clipped one. This assumes q and k are linear in their rows (a
    projection, optionally a bias, then RoPE); a norm applied to q or k after the projection
    would undo the rescaling.

    Row order: head h owns rows h*head_dim .. (h+1)*head_dim - 1 of the query weight, and key head
    g rows g*head_dim .. (g+1)*head_dim - 1 of the key weight (PyTorch's usual order: q.view(...,
    heads, head_dim)). A fused weight (`fused=True`) holds the query block (heads*head_dim rows),
    then the key block (kv_heads*head_dim rows), then the value rows, as nn.MultiheadAttention's
    in_proj_weight or a `qkv(x).split(...)` does. A bias scales with its rows. Layouts that
    interleave heads otherwise (Megatron's per-group [q, k, v] packing) are not supported.

    Args:
        pairs: one entry per attention layer. With fused=False: (q_weight, k_weight) or
            (q_weight, k_weight, q_bias, k_bias) (a bias may be None). With fused=True: qkv_weight
            or (qkv_weight, qkv_bias). Weights are (rows, in) matrices, biases (rows,) vectors:
            plain tensors, or DTensors (Replicate, Shard, _StridedShard placements on a mesh of any
            number of dims: FSDP2, HSDP, tensor parallelism), whose local rows are rescaled.
        heads: query heads per layer.
        tau: the logit threshold (default 100.0, Kimi K2's). math.inf records and returns the
            maxima without ever rescaling (Megatron-LM's log_max_only).
        kv_heads: key heads per layer (None: heads); must divide heads.
        head_dim: rows per head (None: q_weight rows / heads; fused: rows / (heads + 2 kv_heads)).
        fused: pairs are fused qkv weights (see above).
        shared_keys: "query" or "group", how a key head shared by several query heads is treated.
        process_group: a torch.distributed process group or DeviceMesh; `step()` then all-reduces (MAX) the
            maxima over it first, so every rank rescales the same way. Every rank must call
            `step()`. Required when a weight is a DTensor.
        model: the model whose parameters the weights are (optional). Each `step()` then checks,
            before anything changes, that every weight is still its module's parameter: `fully_shard`
            and `parallelize_module` replace a module's parameters, and a QKClip built before them
            would rescale the old tensors, which the model no longer uses (RuntimeError naming the
            parameter). Without `model` nothing can tell: build QKClip after wrapping the model.

    Example:
        >>> clip = muonkit.QKClip([block.attn.qkv.weight for block in model.blocks], heads=8,
        ...                       tau=100.0, fused=True, model=model)
        >>> # in each block's forward: clip.observe(layer, attention_max_logits(q, k, is_causal=True))
        >>> loss.backward(); opt.step(); clip.step(); opt.zero_grad()

    References:
        Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, section 2.1 and Algorithm 1.
        Megatron-LM `--qk-clip`, NVIDIA/Megatron-LM pull request 1929 (SelfAttention.clip_qk in
        megatron/core/transformer/attention.py: one eta per query group under GQA).
    """

    def __init__(
        self,
        pairs: Sequence[Any],
        *,
        heads: int,
        tau: float = 100.0,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        fused: bool = False,
        shared_keys: SharedKeys = "query",
        process_group: Any = None,
        model: nn.Module | None = None,
    ) -> None:
        _check_count("heads", heads)
        kv_heads = heads if kv_heads is None else kv_heads
        _check_count("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"QKClip: kv_heads={kv_heads} must divide heads={heads} (grouped-query attention)")
        if head_dim is not None:
            _check_count("head_dim", head_dim)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or math.isnan(tau) or tau <= 0:
            raise ValueError(f"QKClip: tau must be a positive number (math.inf: never clip), got {tau!r}")
        if not isinstance(fused, bool):
            raise TypeError(f"QKClip: fused must be True or False, got {fused!r}")
        if shared_keys not in _SHARED_KEYS:
            raise ValueError(f"QKClip: shared_keys must be one of {_SHARED_KEYS}, got {shared_keys!r}")
        if isinstance(pairs, Tensor) or not isinstance(pairs, Sequence) or not pairs:
            raise TypeError("QKClip: pairs must be a non-empty list with one entry per attention layer "
                            f"(e.g. [(q_weight, k_weight), ...]), got {type(pairs).__name__}")
        self.heads = heads
        self.kv_heads = kv_heads
        self.tau = float(tau)
        self.fused = fused
        self.shared_keys = shared_keys
        self._layers = [self._parse(i, entry, head_dim) for i, entry in enumerate(pairs)]
        seen: dict[int, str] = {}
        any_dtensor = False
        for layer in self._layers:
            for r in layer.rows:
                if id(r.tensor) in seen:
                    raise ValueError(f"QKClip: {r.name} is the same tensor as {seen[id(r.tensor)]}; each layer's "
                                     "weights may appear once (fused=True for a qkv weight)")
                seen[id(r.tensor)] = r.name
                any_dtensor |= _check_dtensor(r.tensor, r.name)
        if process_group is not None:
            _check_process_group(process_group)
            from .distributed import process_group_of

            process_group = process_group_of(process_group)[0]
        elif any_dtensor:
            raise ValueError("QKClip: some weights are DTensors (sharded by FSDP2); pass process_group= (e.g. "
                             "the device mesh) so that every rank rescales with the same maxima")
        self.process_group = process_group
        self._owners = None if model is None else _owners(model, self._layers)
        self._maxima: list[Tensor | None] = [None] * len(self._layers)
        # Heads left untouched because their maximum was NaN or +inf, over all steps (see step()).
        self.nonfinite_maxima = 0

    def __len__(self) -> int:
        return len(self._layers)

    def _parse(self, i: int, entry: Any, head_dim: int | None) -> _Layer:
        h, kv = self.heads, self.kv_heads
        where = f"QKClip pairs[{i}]"
        name = f"pairs[{i}]"
        if self.fused:
            weight, bias = (entry, None) if isinstance(entry, Tensor) else _unpack(entry, (2,), where,
                                                                                  "qkv_weight or (qkv_weight, qkv_bias)")
            _check_tensor(weight, 2, f"{where} qkv weight")
            n = weight.shape[0]
            if head_dim is None:
                if n % (h + 2 * kv):
                    raise ValueError(f"{where}: the qkv weight has {n} rows, not a multiple of heads + 2 kv_heads = "
                                     f"{h + 2 * kv}; pass head_dim= if the value block is not kv_heads*head_dim rows")
                head_dim = n // (h + 2 * kv)
            if n < (h + kv) * head_dim:
                raise ValueError(f"{where}: the qkv weight has {n} rows; heads={h} and kv_heads={kv} of "
                                 f"head_dim={head_dim} need at least {(h + kv) * head_dim}")
            rows = [_Rows(weight, 0, h * head_dim, f"{name} qkv weight")]
            if bias is not None:
                _check_tensor(bias, 1, f"{where} qkv bias")
                if bias.shape[0] != n:
                    raise ValueError(f"{where}: the qkv bias has {bias.shape[0]} rows, the weight {n}")
                rows.append(_Rows(bias, 0, h * head_dim, f"{name} qkv bias"))
            return _Layer(rows, head_dim)
        if isinstance(entry, Tensor):
            raise TypeError(f"{where} is one tensor; pass (q_weight, k_weight), or fused=True for fused qkv weights")
        q_w, k_w, *biases = _unpack(entry, (2, 4), where, "(q_weight, k_weight) or (q_weight, k_weight, q_bias, k_bias)")
        q_b, k_b = biases if biases else (None, None)
        _check_tensor(q_w, 2, f"{where} q weight")
        _check_tensor(k_w, 2, f"{where} k weight")
        if head_dim is None:
            if q_w.shape[0] % h:
                raise ValueError(f"{where}: the q weight has {q_w.shape[0]} rows, not a multiple of heads={h}")
            head_dim = q_w.shape[0] // h
        if q_w.shape[0] != h * head_dim or k_w.shape[0] != kv * head_dim:
            raise ValueError(f"{where}: q and k weights have {q_w.shape[0]} and {k_w.shape[0]} rows; heads={h}, "
                             f"kv_heads={kv} of head_dim={head_dim} need {h * head_dim} and {kv * head_dim}")
        rows = [_Rows(q_w, 0, None, f"{name} q weight"), _Rows(k_w, None, 0, f"{name} k weight")]
        for bias, weight, kind in ((q_b, q_w, "q"), (k_b, k_w, "k")):
            if bias is None:
                continue
            _check_tensor(bias, 1, f"{where} {kind} bias")
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"{where}: the {kind} bias has {bias.shape[0]} rows, the {kind} weight {weight.shape[0]}")
            rows.append(_Rows(bias, 0 if kind == "q" else None, 0 if kind == "k" else None, f"{name} {kind} bias"))
        return _Layer(rows, head_dim)

    def observe(self, index: int, max_logits: Tensor) -> None:
        """Record the per-head maxima (shape (heads,)) of layer `index`; the running maximum is kept
        until the next `step()`. Does not synchronize with the device."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._layers):
            raise ValueError(f"QKClip.observe: index must be an int in [0, {len(self._layers)}), got {index!r}")
        if not isinstance(max_logits, Tensor) or tuple(max_logits.shape) != (self.heads,):
            shape = tuple(max_logits.shape) if isinstance(max_logits, Tensor) else type(max_logits).__name__
            raise ValueError(f"QKClip.observe: max_logits must be a tensor of shape ({self.heads},) (one per query "
                             f"head), got {shape}")
        if not max_logits.is_floating_point():
            raise TypeError(f"QKClip.observe: max_logits must be floating point, got {max_logits.dtype}")
        value = max_logits.detach().to(torch.float64)
        previous = self._maxima[index]
        self._maxima[index] = value if previous is None else torch.maximum(previous, value.to(previous.device))

    @torch.no_grad()
    def step(self) -> list[Tensor | None]:
        """Rescale the heads whose observed max logit exceeds tau, then forget the maxima.

        A NaN or +inf maximum never clips (tau / inf = 0 would erase the head's query and key rows
        for good): its head is left as it is, counted in `nonfinite_maxima`, and the first one
        warns. Returns, per layer, the maxima acted on (float64, shape (heads,), on the CPU;
        all-reduced over the process group first), or None for a layer that no rank observed since
        the last step."""
        self._check_owners()
        finish_all()  # the weights rescaled below hold every update of the step (muonkit.deferred)
        maxima = self._gather()
        self._maxima = [None] * len(self._layers)
        if maxima is None:
            return [None] * len(self._layers)
        nonfinite = int((maxima.isnan() | maxima.isposinf()).sum())
        if nonfinite:
            if not self.nonfinite_maxima and self.tau < math.inf:  # tau=inf only records
                warnings.warn(
                    f"QKClip: {nonfinite} observed max logit(s) are NaN or +inf (e.g. logits that overflow "
                    "float16); those heads are left unclipped (counted in QKClip.nonfinite_maxima; this "
                    "warning is shown once)", RuntimeWarning, stacklevel=3,
                )
            self.nonfinite_maxima += nonfinite
        out: list[Tensor | None] = []
        for layer, layer_max in zip(self._layers, maxima):
            out.append(layer_max if bool((~torch.isneginf(layer_max)).any()) else None)
            q_factors, k_factors = self._factors(layer_max.tolist())
            for r in layer.rows:
                _scale_rows_(r, q_factors, k_factors, layer.head_dim)
        return out

    def _check_owners(self) -> None:
        """RuntimeError if a weight is no longer its module's parameter (see `model`)."""
        for name, module, attr, rows in self._owners or ():
            if module._parameters.get(attr) is not rows.tensor:
                raise RuntimeError(
                    f"QKClip: {rows.name} was the model's '{name}' when QKClip was built, and its "
                    f"{type(module).__name__} now holds another tensor there (fully_shard and parallelize_module "
                    "replace a module's parameters): rescaling the old one would change nothing the model uses. "
                    "Build QKClip after wrapping the model, from its current parameters; nothing was changed"
                )

    def _gather(self) -> Tensor | None:
        """The (layers, heads) maxima on the CPU, -inf where unobserved; None if nothing was observed
        and there is no process group to hear from."""
        if self.process_group is None and all(m is None for m in self._maxima):
            return None
        # The same device on every rank for the collective: the first weight's.
        device = _local(self._layers[0].rows[0].tensor)[0].device
        maxima = torch.full((len(self._layers), self.heads), -math.inf, dtype=torch.float64, device=device)
        for i, m in enumerate(self._maxima):
            if m is not None:
                maxima[i] = m.to(device)
        if self.process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.process_group)
        return maxima.cpu()

    def _factors(self, maxima: list[float]) -> tuple[dict[int, float], dict[int, float]]:
        """{query head: factor} and {key head: factor} for the heads to rescale (factors < 1)."""
        gammas = [self.tau / s if self.tau < s < math.inf else 1.0 for s in maxima]
        group = self.heads // self.kv_heads
        q: dict[int, float] = {}
        k: dict[int, float] = {}
        for g in range(self.kv_heads):
            members = range(g * group, (g + 1) * group)
            if group == 1 or self.shared_keys == "group":
                gamma = min(gammas[h] for h in members)
                if gamma < 1.0:
                    root = math.sqrt(gamma)
                    q.update((h, root) for h in members)
                    k[g] = root
            else:
                q.update((h, gammas[h]) for h in members if gammas[h] < 1.0)
        return q, k


def _owners(model: nn.Module, layers: list[_Layer]) -> list[tuple[str, nn.Module, str, _Rows]]:
    """(parameter name, its module, its attribute, rows) for every weight and bias; ValueError for one
    that is not a parameter of `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"QKClip: model must be a torch.nn.Module, got {type(model).__name__}")
    where = {id(p): (f"{prefix}.{attr}" if prefix else attr, module, attr)
             for prefix, module in model.named_modules() for attr, p in module.named_parameters(recurse=False)}
    owners = []
    for rows in (r for layer in layers for r in layer.rows):
        if id(rows.tensor) not in where:
            raise ValueError(f"QKClip: {rows.name} (shape {tuple(rows.tensor.shape)}) is not a parameter of model=; "
                             "pass the model whose attention weights these are, or no model")
        owners.append((*where[id(rows.tensor)], rows))
    return owners


def _scale_rows_(rows: _Rows, q_factors: dict[int, float], k_factors: dict[int, float], head_dim: int) -> None:
    """Multiply the rows of each listed head by its factor, in the tensor's local piece."""
    local, spans = _local(rows.tensor)
    ranges = []
    if rows.q_start is not None:
        ranges += [(rows.q_start + h * head_dim, f) for h, f in q_factors.items()]
    if rows.k_start is not None:
        ranges += [(rows.k_start + g * head_dim, f) for g, f in k_factors.items()]
    for start, factor in ranges:
        for first, stop, offset in spans:
            lo, hi = max(start, first), min(start + head_dim, stop)
            if lo < hi:
                local[lo - first + offset:hi - first + offset].mul_(factor)


def _local(t: Tensor) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """This rank's piece of `t` (a view) and the rows it holds: (first, stop, local index of first)
    per run of consecutive global rows (placements on any mesh: muonkit.plan.pieces_of)."""
    if not is_dtensor(t):
        return t, [(0, t.shape[0], 0)]
    import torch.distributed as dist

    local = t.to_local()
    piece = pieces_of(t.shape, t.device_mesh.mesh, placements_of(t))[dist.get_rank()]
    spans, offset = [], 0
    for first, stop in piece[0]:
        spans.append((first, stop, offset))
        offset += stop - first
    assert offset == local.shape[0], (tuple(local.shape), piece)
    return local, spans


def _check_dtensor(t: Tensor, name: str) -> bool:
    if not is_dtensor(t):
        return False
    try:
        placements_of(t)
    except ValueError as err:
        raise ValueError(f"QKClip: {name} is a DTensor with {err}") from None
    return True


def _check_process_group(group: Any) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("QKClip(process_group=...) needs torch.distributed to be initialized: call "
                           "torch.distributed.init_process_group(...) first, or pass process_group=None")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("QKClip: this process is not a member of process_group; pass process_group=None here, "
                         "or a group that contains this rank")
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    if not isinstance(group, dist.ProcessGroup) and not (mesh_module and isinstance(group, mesh_module.DeviceMesh)):
        raise TypeError(f"QKClip: process_group must be a torch.distributed.ProcessGroup or DeviceMesh, got "
                        f"{type(group).__name__}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"QKClip: {name} must be an int >= 1, got {value!r}")


def _check_tensor(t: Any, ndim: int, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        kind = "a (rows, in) matrix" if ndim == 2 else "a (rows,) vector"
        raise ValueError(f"{name} must be {kind}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def _unpack(entry: Any, lengths: tuple[int, ...], where: str, expected: str) -> tuple:
    if not isinstance(entry, (tuple, list)) or len(entry) not in lengths:
        raise TypeError(f"{where} must be {expected}, got {type(entry).__name__}"
                        + (f" of length {len(entry)}" if isinstance(entry, (tuple, list)) else ""))
    return tuple(entry)
