"""The mask ledger's bit kernels: packing a bool mask into bits, and the union + per-unit popcount of a commit.

Layout (dgm_kernels.bits): entry ``i`` of the row-major flattened mask is bit ``i % 8`` (least significant
first) of byte ``i // 8``; the padding bits of the last byte are 0.

``union_count`` views a mask of ``n = outer * units * inner`` entries as ``[outer, units, inner]``: unit ``u``
owns the ``outer`` bit ranges ``[(o * units + u) * inner, + inner)``. Those ranges start anywhere inside a
byte, so a program works on whole bytes and cuts each byte to the bits of its range with a mask. One kernel
reads every byte of both operands, writes ``reserved | task`` and popcounts ``task & ~reserved`` per unit:

- program ``(unit block, outer chunk)``: a ``[BU, BK]`` tile, one row per unit, one column per (range,
  byte of that range); every range is given the same number of byte columns (the most a range of
  ``inner`` bits can straddle), columns past a range's end are masked off;
- each byte of the union is written by exactly one lane, the one whose range holds the byte's first bit,
  so no two programs write the same byte and nothing needs atomics;
- the counts of a unit are summed in registers and stored once per chunk (int64); more than one chunk
  (on a GPU, for parallelism when there are few units) leaves ``chunks x units`` partials, summed by
  PyTorch: deterministic, and a few hundred integers at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, device_programs


@triton.jit
def _pack_kernel(m_ptr, out_ptr, n, nbytes, BLOCK: tl.constexpr):
    # BLOCK bytes per program: a [BLOCK, 8] tile of flags, each row weighted by 1, 2, 4, ... 128 and summed
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    idx = b[:, None] * 8 + bit[None, :]
    flags = (tl.load(m_ptr + idx, mask=idx < n, other=0) != 0).to(tl.int32)
    byte = tl.sum(flags << bit[None, :], axis=1)
    tl.store(out_ptr + b, byte.to(tl.uint8), mask=b < nbytes)


@triton.jit
def _popcount8(x):
    """Set bits of each value of ``x`` (int32 holding 0..255): SWAR, no popc instruction (or interpreter op) needed."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def _union_count_kernel(
    r_ptr, t_ptr, u_ptr, part_ptr, n, outer, units, inner, o_per_chunk, RANGE_BYTES,
    BU: tl.constexpr, BK: tl.constexpr,
):
    us = tl.program_id(0) * BU + tl.arange(0, BU)
    chunk = tl.program_id(1)
    o_lo = chunk * o_per_chunk
    lanes = tl.minimum(o_per_chunk, outer - o_lo) * RANGE_BYTES
    u_ok = us < units
    acc = tl.zeros([BU, BK], dtype=tl.int32)
    for k0 in range(0, lanes, BK):
        k = k0 + tl.arange(0, BK)
        o = (o_lo + k // RANGE_BYTES).to(tl.int64)
        q = k % RANGE_BYTES  # the q-th byte that this lane's range touches
        start = (o[None, :] * units + us[:, None]) * inner  # first bit of range (o, u)
        end = start + inner
        first = (start // 8 + q[None, :]) * 8  # first bit of this lane's byte
        ok = u_ok[:, None] & (k < lanes)[None, :] & (first < end)
        byte = first // 8
        r = tl.load(r_ptr + byte, mask=ok, other=0).to(tl.int32)
        t = tl.load(t_ptr + byte, mask=ok, other=0).to(tl.int32)
        lo = tl.maximum(start - first, 0).to(tl.int32)  # bits of the byte before the range (first byte only)
        hi = tl.minimum(tl.maximum(end - first, 0), 8).to(tl.int32)  # bits of the byte up to the range's end
        in_range = ((1 << hi) - 1) ^ ((1 << lo) - 1)
        acc += _popcount8(t & ~r & in_range)
        # the owner of a byte is the range that holds its first bit; it also clears the padding bits
        valid = tl.minimum(tl.maximum(n - first, 0), 8).to(tl.int32)
        tl.store(u_ptr + byte, ((r | t) & ((1 << valid) - 1)).to(tl.uint8), mask=ok & (first >= start))
    tl.store(part_ptr + chunk * units + us, tl.sum(acc, axis=1).to(tl.int64), mask=u_ok)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The packed bits (uint8, ``ceil(numel / 8)`` bytes) of a bool tensor of any shape and strides."""
    # A strided mask is copied once (n bytes) into row-major order: the order that defines the bits.
    flags = mask.contiguous().view(torch.uint8).reshape(-1)
    n = flags.numel()
    nbytes = (n + 7) // 8
    out = torch.empty((nbytes,), dtype=torch.uint8, device=mask.device)
    if nbytes:
        if INTERPRETED:
            block = max(16, min(triton.next_power_of_2(nbytes), 1 << 13))
        else:
            block = 128  # 128 bytes x 8 flags: 1024 lanes, 4 warps
        _pack_kernel[(triton.cdiv(nbytes, block),)](flags, out, n, nbytes, BLOCK=block, num_warps=4)
    return out


def union_count(
    reserved_bits: torch.Tensor, task_bits: torch.Tensor, outer: int, units: int, inner: int, *,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``reserved | task`` packed, newly reserved entries per unit as int64 ``[units]``) in one pass.

    ``chunks`` (tests): split each unit's ranges over this many programs; by default one program per unit
    block in the interpreter, and on a GPU enough to fill it.
    """
    r, t = reserved_bits.contiguous(), task_bits.contiguous()
    n = outer * units * inner
    union = torch.empty_like(r)
    if n == 0:
        return union, torch.zeros((units,), dtype=torch.int64, device=r.device)
    range_bytes = (inner + 14) // 8  # the most bytes a range of `inner` bits can straddle
    lanes_per_unit = outer * range_bytes
    tile = (1 << 14) if INTERPRETED else 1024
    bk = max(16, min(triton.next_power_of_2(lanes_per_unit), 1024 if not INTERPRETED else 1 << 12))
    bu = max(1, min(triton.next_power_of_2(units), tile // bk))
    unit_blocks = triton.cdiv(units, bu)
    if chunks is None:
        chunks = 1 if INTERPRETED else max(1, min(triton.cdiv(device_programs(r.device), unit_blocks),
                                                  triton.cdiv(lanes_per_unit, bk)))
    o_per_chunk = triton.cdiv(outer, max(1, min(int(chunks), outer)))
    chunks = triton.cdiv(outer, o_per_chunk)
    partial = torch.empty((chunks, units), dtype=torch.int64, device=r.device)
    _union_count_kernel[(unit_blocks, chunks)](
        r, t, union, partial, n, outer, units, inner, o_per_chunk, range_bytes, BU=bu, BK=bk, num_warps=4,
    )
    return union, (partial[0] if chunks == 1 else partial.sum(dim=0))
