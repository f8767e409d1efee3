"""Blockwise linear 8-bit quantization of the momentum: pure tensor in, tensor out.

A tensor x is stored as int8 codes of its shape and one float32 scale per block:

    a = max |x| over the block;   code = round(127 x / a)  (0 where a = 0);   x_hat = code * (a / 127)

(absmax linear quantization, docs/references.md, 8-bit Muon momentum). A block is at most
BLOCK = 2048 consecutive elements of one dim-0 slice x[i] (flattened in row-major order): a slice
of n elements holds ceil(n / 2048) blocks, the last one shorter when 2048 does not divide n. Blocks
never straddle two dim-0 slices, so the codes and the scales, of shape (x.shape[0], blocks per
slice), shard along dim 0 exactly as the parameter does (FSDP2, DCP resharding), and a shard
quantizes to the same bits as the whole tensor.

A piece cut along other dims too (rowwise tensor parallelism's Shard(1)) holds parts of blocks: its
elements keep their blocks (`piece_blocks`: each local element's block from its flat index in its
dim-0 slice), `piece_absmax` gives each block's largest |x| over the piece (0 for blocks it does not
touch), the max of those over the pieces of the same rows is the block's scale, and `quantize_piece` /
`dequantize_piece` apply it elementwise: the same bits as `quantize` / `dequantize` of the whole tensor.

Stored bytes per element: 1 + 4 / min(2048, slice size) (a 768 x 768 matrix: 1.005, 0.251x float32).
"""

from __future__ import annotations

import functools
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


# ------------------------------------------------------------------------ pieces of other dims


@functools.lru_cache(maxsize=256)
def piece_blocks(shape: tuple[int, ...], piece: tuple[tuple[tuple[int, int], ...], ...],
                 device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor, Tensor]:
    """For the piece of a tensor of `shape` that holds, per dim d, the global indices `piece[d]` (a
    tuple of [start, stop) ranges, in the local tensor's order; muonkit.plan.pieces_of):
    (`ids`, `touched`, `members`), int64 tensors on `device`, cached (read them, never write).

    `ids` (one per element of a local dim-0 slice, row-major) is each element's block: its flat index
    in the whole dim-0 slice // BLOCK. `touched` are the blocks the piece holds elements of, in
    order, and `members` (len(touched), width) per touched block the local positions in a slice of
    its elements, padded with the local slice's size (one past its end)."""
    strides = [math.prod(shape[d + 1:]) for d in range(1, len(shape))]
    flat = torch.zeros((), dtype=torch.int64)
    for ranges, stride in zip(piece[1:], strides):
        index = (torch.cat([torch.arange(lo, hi, dtype=torch.int64) for lo, hi in ranges]) if ranges
                 else torch.zeros(0, dtype=torch.int64))
        flat = flat.unsqueeze(-1) + index * stride
    ids = flat.reshape(-1) // BLOCK
    touched, slot, sizes = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(slot, stable=True)
    members = torch.full((touched.numel(), int(sizes.max()) if ids.numel() else 0), ids.numel(), dtype=torch.int64)
    column = torch.arange(ids.numel(), dtype=torch.int64) - (torch.cumsum(sizes, 0) - sizes)[slot[order]]
    members[slot[order], column] = order
    return ids.to(device), touched.to(device), members.to(device)


def _rows(x: Tensor) -> Tensor:
    """x as (dim-0 slices, elements of a slice), with no row too (an uneven dim-0 cut leaves some ranks
    none: reshape(0, -1) is refused as ambiguous)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def piece_absmax(x: Tensor, blocks: int, touched: Tensor, members: Tensor) -> Tensor:
    """Per local dim-0 slice of the piece x and per block of the whole slice (`blocks` of them), the
    largest |x| of the block's elements in x (0 for a block x holds none of; NaN where one is NaN,
    as torch.amax), in x's arithmetic dtype (float32; float64 for float64 x): (x.shape[0], blocks)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = x.shape[0]
    flat = _rows(x).to(dtype).abs()
    out = flat.new_zeros(rows, blocks)
    if touched.numel():
        padded = torch.cat([flat, flat.new_zeros(rows, 1)], 1)
        out[:, touched] = padded[:, members].amax(-1)
    return out


def quantize_piece(x: Tensor, absmax: Tensor, ids: Tensor) -> Tensor:
    """int8 codes of the piece x with its blocks' absmax (`piece_absmax` taken over every piece of
    the same rows): the arithmetic of `quantize`, element by element."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    flat = _rows(x).to(dtype)
    codes = torch.round(flat / safe[:, ids] * LEVELS).clamp_(-LEVELS, LEVELS)
    return codes.to(torch.int8).reshape(x.shape)


def dequantize_piece(codes: Tensor, scales: Tensor, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = code * (scale / 127) in `dtype` of the piece `codes` with its rows' `scales` (all the
    blocks of each local dim-0 slice): the arithmetic of `dequantize`, element by element."""
    flat = _rows(codes).to(dtype)
    return (flat * (scales.to(dtype) / LEVELS)[:, ids]).reshape(codes.shape)
