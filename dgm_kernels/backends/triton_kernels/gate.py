"""The per-channel gate of DGMa and the per-unit gradient blocking of its weights.

- ``gate_forward`` / ``gate_backward``: y = y_pre * m(e)[c] over channel dim 1; the backward writes
  grad_y_pre and reduces grad_y * y_pre over batch and space per channel in the same pass (partial sums
  per (channel, slice), finished by a second small kernel: deterministic, no atomics).
- ``unit_weight_grad``: one program per output unit walks the weight entries of that unit (rows of a conv
  weight ``[out, in/groups, kH, kW]``, strided columns of a transposed one ``[in, out/groups, kH, kW]``)
  and applies the gate and the 1 - min(M_out, M_in) blocking to the weight gradient, never materialising
  the outer product of the two unit vectors. For a gated convolution it also gives grad_e and grad_bias:
  since the convolution is linear in W, ``sum_{n,p} grad_y * y_pre = sum(W * dconv/dW[grad_y]) + b *
  sum(grad_y)`` per output unit, so the gate's reduction needs neither y_pre nor a pass over activations.
- ``gate_weight``: W * m(e)[unit] and b * m(e) (the gated weight, for the "unfused" convolution path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    compute_dtype,
    elementwise_block,
    flush_tiny,
    frozen_at,
    frozen_operand,
    mask_slope,
    mask_value,
    num_warps_for,
    scalar,
    split_scalar,
)


@triton.jit
def _gate_forward_kernel(
    y_ptr, e_ptr, out_ptr, n, C, S, s_hi, s_lo, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c = (offs // S) % C
    m = mask_value(tl.load(e_ptr + c, mask=ok, other=0.0).to(ACC), scalar(s_hi, s_lo, ACC), MODE)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + offs, flush_tiny(y * m).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_backward_kernel(
    g_ptr, y_ptr, e_ptr, gy_ptr, part_ptr, C, S, NS, CHUNK, SPLIT, s_hi, s_lo,
    NEED_Y: tl.constexpr, NEED_E: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # program (c, j): channel c, slice j of the N*S positions of that channel. Positions and offsets in int64:
    # N*S or C*S reach 2**31 on large activations, where int32 products would wrap
    c = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    m = mask_value(tl.load(e_ptr + c).to(ACC), scalar(s_hi, s_lo, ACC), MODE)
    acc = tl.zeros([BLOCK], dtype=ACC)
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, NS)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < hi
        off = (idx // S) * C * S + c * S + idx % S
        g = tl.load(g_ptr + off, mask=ok, other=0.0).to(ACC)
        if NEED_Y:
            tl.store(gy_ptr + off, flush_tiny(g * m).to(gy_ptr.dtype.element_ty), mask=ok)
        if NEED_E:
            acc += g * tl.load(y_ptr + off, mask=ok, other=0.0).to(ACC)
    if NEED_E:
        tl.store(part_ptr + c * SPLIT + j, tl.sum(acc, axis=0))


@triton.jit
def _gate_finish_kernel(
    part_ptr, e_ptr, ge_ptr, C, SPLIT, s_hi, s_lo, smax_hi, smax_lo,
    COMPENSATE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grad_e[c] = dm/de[c] * sum_j partial[c, j]
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    js = tl.arange(0, BLOCK_S)
    ok = cs < C
    part = tl.load(part_ptr + cs[:, None] * SPLIT + js[None, :], mask=ok[:, None] & (js[None, :] < SPLIT), other=0.0)
    total = tl.sum(part, axis=1)
    e = tl.load(e_ptr + cs, mask=ok, other=0.0).to(ACC)
    d = mask_slope(e, scalar(s_hi, s_lo, ACC), scalar(smax_hi, smax_lo, ACC), COMPENSATE)
    tl.store(ge_ptr + cs, flush_tiny(total * d).to(ge_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unit_weight_grad_kernel(
    gw_ptr, w_ptr, e_ptr, b_ptr, gsum_ptr, fout_ptr, fin_ptr, out_w_ptr, out_e_ptr, out_b_ptr,
    OUT_G, IN_G, KK, s_hi, s_lo, smax_hi, smax_lo,
    TRANSPOSED: tl.constexpr, HAS_FROZEN: tl.constexpr, HAS_FROZEN_IN: tl.constexpr, OUT_PACKED: tl.constexpr,
    IN_PACKED: tl.constexpr, HAS_GATE: tl.constexpr, NEED_W: tl.constexpr, NEED_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_B: tl.constexpr, MODE: tl.constexpr, COMPENSATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # program c = one output unit; its weight entries are (r, k), r < IN_G input channels of its group,
    # k < KK kernel taps; OUT_G / IN_G are output / input channels per group. frozen_out / frozen_in are
    # one byte per unit, or packed bits (OUT_PACKED / IN_PACKED) read in place.
    c = tl.program_id(0)
    grp = c // OUT_G
    if TRANSPOSED:  # [in, out/groups, kH, kW]: unit c is column c % OUT_G of the rows of its group
        base = grp.to(tl.int64) * IN_G * OUT_G * KK + (c % OUT_G) * KK
        row_stride = OUT_G * KK
    else:  # [out, in/groups, kH, kW]: unit c is row c
        base = c.to(tl.int64) * IN_G * KK
        row_stride = KK
    s = scalar(s_hi, s_lo, ACC)
    m = 1.0
    if HAS_GATE:
        e = tl.load(e_ptr + c).to(ACC)
        m = mask_value(e, s, MODE)
    out_frozen = 0
    if HAS_FROZEN:
        if OUT_PACKED:
            out_frozen = (tl.load(fout_ptr + c // 8).to(tl.int32) >> (c % 8)) & 1
        else:
            out_frozen = (tl.load(fout_ptr + c) != 0).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, IN_G * KK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < IN_G * KK
        r = idx // KK
        off = base + r * row_stride + idx % KK
        g = tl.load(gw_ptr + off, mask=ok, other=0.0).to(ACC)
        if NEED_E:
            acc += g * tl.load(w_ptr + off, mask=ok, other=0.0).to(ACC)
        if NEED_W:
            gw = g * m
            if HAS_FROZEN:
                blocked = tl.zeros([BLOCK], dtype=tl.int32) + out_frozen
                if HAS_FROZEN_IN:
                    blocked = blocked & frozen_at(fin_ptr, grp * IN_G + r, ok, IN_PACKED).to(tl.int32)
                gw = tl.where(blocked != 0, 0.0, gw)
            tl.store(out_w_ptr + off, flush_tiny(gw).to(out_w_ptr.dtype.element_ty), mask=ok)
    gsum = 0.0
    if HAS_BIAS:
        gsum = tl.load(gsum_ptr + c).to(ACC)
    if NEED_E:
        total = tl.sum(acc, axis=0)
        if HAS_BIAS:
            total += tl.load(b_ptr + c).to(ACC) * gsum
        d = mask_slope(e, s, scalar(smax_hi, smax_lo, ACC), COMPENSATE)
        tl.store(out_e_ptr + c, flush_tiny(total * d).to(out_e_ptr.dtype.element_ty))
    if NEED_B:
        gb = gsum * m
        if HAS_FROZEN:
            gb = tl.where(out_frozen != 0, 0.0, gb)
        tl.store(out_b_ptr + c, flush_tiny(gb).to(out_b_ptr.dtype.element_ty))


@triton.jit
def _gate_weight_kernel(
    w_ptr, e_ptr, b_ptr, out_w_ptr, out_b_ptr, OUT_G, IN_G, KK, s_hi, s_lo,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # W * m[unit], b * m: the gate moved onto the weight (conv(x, W m) + b m = (conv(x, W) + b) m per unit)
    c = tl.program_id(0)
    grp = c // OUT_G
    if TRANSPOSED:
        base = grp.to(tl.int64) * IN_G * OUT_G * KK + (c % OUT_G) * KK
        row_stride = OUT_G * KK
    else:
        base = c.to(tl.int64) * IN_G * KK
        row_stride = KK
    m = mask_value(tl.load(e_ptr + c).to(ACC), scalar(s_hi, s_lo, ACC), MODE)
    for start in range(0, IN_G * KK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < IN_G * KK
        off = base + (idx // KK) * row_stride + idx % KK
        w = tl.load(w_ptr + off, mask=ok, other=0.0).to(ACC)
        tl.store(out_w_ptr + off, flush_tiny(w * m).to(out_w_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        b = tl.load(b_ptr + c).to(ACC)
        tl.store(out_b_ptr + c, flush_tiny(b * m).to(out_b_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
#: blocks of positions per slice of the gate backward's reduction (2048 positions: a DGM layer of 64 x 16 x 16
#: positions per channel gets 8 slices, enough programs to fill a GPU with a few dozen channels)
GATE_SLICE_BLOCKS = 2


def _as_ncs(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t`` ([N, C, ...]) contiguous, with (N, C, S = product of the trailing dims)."""
    t = t.contiguous()
    n, c = t.shape[0], t.shape[1]
    return t, n, c, (t.numel() // (n * c)) if n * c else 0


def gate_forward(y_pre: torch.Tensor, scores: torch.Tensor, s: float, mode: int) -> torch.Tensor:
    y, _n, c, spatial = _as_ncs(y_pre)
    e = scores.contiguous()
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel():
        block = elementwise_block(y.numel())
        _gate_forward_kernel[(triton.cdiv(y.numel(), block),)](
            y, e, out, y.numel(), c, spatial, *split_scalar(s), MODE=mode, ACC=compute_dtype(y.dtype),
            BLOCK=block, num_warps=num_warps_for(block),
        )
    return out


def gate_backward(
    grad_y: torch.Tensor, y_pre: torch.Tensor, scores: torch.Tensor, s: float, s_max: float | None, mode: int,
    need_y: bool = True, need_scores: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_y_pre, grad_e): grad_y * m[c] and dm/de[c] * sum over all dims but 1 of grad_y * y_pre."""
    g, n, c, spatial = _as_ncs(grad_y)
    y = y_pre.contiguous()
    e = scores.contiguous()
    acc = compute_dtype(y.dtype)
    gy = torch.empty(g.shape, dtype=g.dtype, device=g.device) if need_y else None
    ge = torch.empty(e.shape, dtype=e.dtype, device=e.device) if need_scores else None
    positions = n * spatial
    if c == 0 or not (need_y or need_scores):
        return gy, ge
    if positions == 0:
        if ge is not None:
            ge.zero_()
        return gy, ge
    if INTERPRETED:
        block, split = max(16, min(triton.next_power_of_2(positions), 1 << 15)), 1
    else:
        block = 1024
        # slices of GATE_SLICE_BLOCKS blocks, at most 1024 per channel: the split (and so the order of the sum,
        # and the bits of grad_e) depends on the problem's size only, not on the GPU's SM count
        split = max(1, min(triton.cdiv(positions, GATE_SLICE_BLOCKS * block), 1024))
    chunk = triton.cdiv(triton.cdiv(positions, split), block) * block
    split = triton.cdiv(positions, chunk)
    part = torch.empty((c, split), dtype=torch.float64 if acc == tl.float64 else torch.float32, device=g.device)
    _gate_backward_kernel[(c, split)](
        g, y, e, gy if gy is not None else g, part, c, spatial, positions, chunk, split, *split_scalar(s),
        NEED_Y=need_y, NEED_E=need_scores, MODE=mode, ACC=acc, BLOCK=block, num_warps=num_warps_for(block),
    )
    if need_scores:
        block_c = 16 if not INTERPRETED else max(16, triton.next_power_of_2(c))
        _gate_finish_kernel[(triton.cdiv(c, block_c),)](
            part, e, ge, c, split, *split_scalar(s), *split_scalar(s_max), COMPENSATE=s_max is not None,
            ACC=acc, BLOCK_C=block_c, BLOCK_S=max(16, triton.next_power_of_2(split)),
        )
    return gy, ge


def _unit_layout(weight: torch.Tensor, transposed: bool, groups: int) -> tuple[int, int, int, int]:
    """(output units, output channels per group, input channels per group, kernel taps) of a weight."""
    rows, cols = weight.shape[0], weight.shape[1]
    taps = weight[0, 0].numel() if weight.numel() else 0
    if transposed:
        return cols * groups, cols, rows // groups, taps
    return rows, rows // groups, cols, taps


def _unit_block(per_unit: int) -> int:
    if INTERPRETED:
        return max(16, min(triton.next_power_of_2(max(per_unit, 1)), 1 << 15))
    return max(128, min(triton.next_power_of_2(max(per_unit, 1)), 1024))


def unit_weight_grad(
    grad_weight: torch.Tensor, weight: torch.Tensor, frozen_out: torch.Tensor | None,
    frozen_in: torch.Tensor | None, transposed: bool, groups: int, *,
    scores: torch.Tensor | None = None, bias: torch.Tensor | None = None, grad_sum: torch.Tensor | None = None,
    s: float = 1.0, s_max: float | None = None, mode: int = 0,
    need_weight: bool = True, need_scores: bool = False, need_bias: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_W, grad_e, grad_b) of a (gated) weight from the raw weight gradient ``grad_weight``.

    Without ``scores``: grad_W = grad_weight, zero where the unit pair is frozen (``block_unit_grad``).
    With ``scores`` (a gated convolution; ``grad_weight`` = dconv/dW[grad_y], ``grad_sum`` = sum of
    grad_y per output unit, needed when ``bias`` is given): grad_W = grad_weight * m[unit] (blocked),
    grad_e = dm/de * (sum(W * grad_weight) + b * grad_sum) per unit, grad_b = m * grad_sum (blocked).
    ``frozen_out`` / ``frozen_in``: None, bool tensors of one entry per unit, or their packed bits (uint8),
    read inside the kernel.
    """
    gw_in = grad_weight.contiguous()
    w = weight.contiguous()
    units, out_g, in_g, taps = _unit_layout(w, transposed, groups)
    has_gate = scores is not None
    need_scores = need_scores and has_gate
    need_bias = need_bias and bias is not None and has_gate
    out_w = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_weight else None
    out_e = torch.empty((units,), dtype=w.dtype, device=w.device) if need_scores else None
    out_b = torch.empty((units,), dtype=w.dtype, device=w.device) if need_bias else None
    if units == 0 or not (need_weight or need_scores or need_bias):
        return out_w, out_e, out_b
    if taps == 0 or in_g == 0:  # no weight entries: only the bias term is left
        gw_in = w
    e = scores.contiguous() if has_gate else w
    fo, out_packed = frozen_operand("frozen_out", frozen_out, units)
    fi, in_packed = frozen_operand("frozen_in", frozen_in, in_g * groups)
    # the bias term of grad_e needs the per-unit sum of grad_y (convolution_backward's bias gradient)
    has_bias_term = has_gate and bias is not None and grad_sum is not None
    need_bias = need_bias and has_bias_term
    if out_b is not None and not has_bias_term:
        raise ValueError("unit_weight_grad: grad_bias needs scores, bias and grad_sum")
    gsum = grad_sum.contiguous() if has_bias_term else w
    block = _unit_block(in_g * taps)
    _unit_weight_grad_kernel[(units,)](
        gw_in, w, e, bias.contiguous() if bias is not None else w, gsum,
        fo if fo is not None else w, fi if fi is not None else w,
        out_w if out_w is not None else w, out_e if out_e is not None else w, out_b if out_b is not None else w,
        out_g, in_g, taps, *split_scalar(s), *split_scalar(s_max),
        TRANSPOSED=transposed, HAS_FROZEN=fo is not None, HAS_FROZEN_IN=fi is not None and fo is not None,
        OUT_PACKED=out_packed, IN_PACKED=in_packed,
        HAS_GATE=has_gate, NEED_W=need_weight, NEED_E=need_scores, HAS_BIAS=has_bias_term,
        NEED_B=need_bias, MODE=mode, COMPENSATE=s_max is not None, ACC=compute_dtype(w.dtype), BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return out_w, out_e, out_b


def gate_weight(
    weight: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None, transposed: bool, groups: int,
    s: float, mode: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W * m[unit], b * m): the per-unit gate applied to a convolution's weight and bias."""
    w = weight.contiguous()
    units, out_g, in_g, taps = _unit_layout(w, transposed, groups)
    out_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    out_b = torch.empty((units,), dtype=w.dtype, device=w.device) if bias is not None else None
    if units:
        block = _unit_block(in_g * taps)
        _gate_weight_kernel[(units,)](
            w, scores.contiguous(), bias.contiguous() if bias is not None else w, out_w,
            out_b if out_b is not None else w, out_g, in_g, taps, *split_scalar(s), TRANSPOSED=transposed,
            HAS_BIAS=bias is not None, MODE=mode, ACC=compute_dtype(w.dtype), BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return out_w, out_b
