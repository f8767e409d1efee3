"""Blockwise linear 8-bit quantization of the momentum: pure tensor in, tensor out.

A tensor x is stored as int8 codes of its shape and one float32 scale per block:

    a = max |x| over the block;   code = round(127 x / a)  (0 where a = 0);   x_hat = code * (a / 127)

(absmax linear quantization, docs/references.md, 8-bit Muon momentum). A block is at most
BLOCK = 2048 consecutive elements of one dim-0 slice x[i] (flattened in row-major order): a slice
of n elements holds ceil(n / 2048) blocks, the last one shorter when 2048 does not divide n. Blocks
never straddle two dim-0 slices, so the codes and the scales, of shape (x.shape[0], blocks per
slice), shard along dim 0 exactly as the parameter does (FSDP2, DCP resharding), and a shard
quantizes to the same bits as the whole tensor.

Stored bytes per element: 1 + 4 / min(2048, slice size) (a 768 x 768 matrix: 1.005, 0.251x float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

BLOCK = 2048
LEVELS = 127  # codes in [-127, 127]: symmetric, so that -x quantizes to -code


def scales_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The shape of the scales of a tensor of `shape` (ndim >= 1): (shape[0], blocks per slice)."""
    rows = int(shape[0])
    slice_numel = math.prod(int(s) for s in shape[1:])
    return rows, max(1, -(-slice_numel // BLOCK))


def _blocks(x: Tensor) -> Tensor:
    """x as (rows, blocks, BLOCK) with the last block of each slice zero-padded (a copy)."""
    rows, blocks = scales_shape(x.shape)
    flat = x.reshape(rows, math.prod(x.shape[1:]))
    pad = blocks * BLOCK - flat.shape[1]
    return torch.nn.functional.pad(flat, (0, pad)).reshape(rows, blocks, BLOCK)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes of x's shape, float32 scales of `scales_shape(x.shape)`) for a float tensor x.

    The arithmetic is float32 (float64 for float64 x); a non-finite block keeps a non-finite scale
    (its values are lost, as they would be in the update they came from)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    blocks = _blocks(x.to(dtype))
    absmax = blocks.abs().amax(-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(blocks / safe * LEVELS).clamp_(-LEVELS, LEVELS)
    codes = codes.reshape(x.shape[0], blocks.shape[1] * BLOCK)[:, : math.prod(x.shape[1:])].to(torch.int8).reshape(x.shape)
    return codes, absmax.squeeze(-1).to(torch.float32)


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = code * (scale / 127) in `dtype` (float32 or wider), of the codes' shape."""
    blocks = _blocks(codes.to(dtype))
    values = blocks * (scales.to(dtype) / LEVELS).unsqueeze(-1)
    return values.reshape(codes.shape[0], blocks.shape[1] * BLOCK)[:, : math.prod(codes.shape[1:])].reshape(codes.shape)


def quantize_into_(x: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Write `quantize(x)` into existing `codes` and `scales` (local tensors of the same shapes)."""
    new_codes, new_scales = quantize(x)
    codes.copy_(new_codes)
    scales.copy_(new_scales)
