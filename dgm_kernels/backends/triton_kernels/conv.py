"""Implicit-GEMM 2-D convolution that applies a mask while it loads the weight (W * m is never stored).

One kernel covers the four convolutions the masked layers need:

| call                      | kernel kind | input      | weight layout as given             |
|---------------------------|-------------|------------|------------------------------------|
| conv2d forward            | gather      | x          | ``[out, in/groups, kH, kW]``       |
| conv_transpose2d forward  | scatter     | x          | ``[in, out/groups, kH, kW]``       |
| grad_x of conv2d          | scatter     | grad_y     | the conv2d weight, read transposed |
| grad_x of conv_transpose2d| gather      | grad_y     | the transposed weight, read as conv|

("gather": y[o] = sum_k x[o * stride - pad + k * dil] W[k]; "scatter", the transposed convolution, is
also computed as a gather: y[o] = sum over taps k with (o + pad - k * dil) divisible by the stride of
x[(o + pad - k * dil) / stride] W[k].) The data gradient of a convolution is the other kind with the same
weight, which is why one mask-on-load kernel family serves the forward and the backward.

GEMM view: M = output pixels (batch x rows x columns), N = output channels of a group, K = input
channels of a group x kernel taps, flattened (channel-major), so that layers with few input channels per
group (an RGB input has 3; a depthwise convolution 1) waste no lanes of the K tile. A program computes a BM x BN tile and
loops over K in BK blocks, loading an x tile [BM, BK] (any strides: non-contiguous inputs are not copied)
and a weight tile [BK, BN] to which the mask is applied in registers. For the transposed kind a tile
holds the output pixels of one phase (o mod stride), and K enumerates only the taps that reach that
phase (kh0 + j * stride / gcd(stride, dilation)): no multiply is spent on the zeros that a
zero-insertion formulation would process.

Mask on load (``W_MASK``): per-weight scores of the weight's shape (DGMw). ``K_GATE``: a per-unit gate
indexed by the K channel (the gated layer's data gradient, where the original output units are the
contraction). Epilogue: ``HAS_BIAS`` adds a bias, ``N_GATE`` multiplies by a per-unit gate (the gated
layer's forward).

Precision: products in the storage dtype on tensor cores (float16/bfloat16; float32 uses TF32 only when
``torch.backends.cudnn.allow_tf32`` allows it for cuDNN too), accumulation in float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, mask_value, split_scalar


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, e_ptr, kg_ptr, b_ptr, ng_ptr, y_ptr,
    N, H, W, C_K_G, C_N_G, C_OUT, OH, OW, QH, QW, KH, KW, STEP_H, STEP_W,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW, OFF_H, OFF_W,
    s_hi, s_lo,
    SCATTER: tl.constexpr, W_MASK: tl.constexpr, K_GATE: tl.constexpr, N_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    s = tl.cast(s_hi, tl.float32) + tl.cast(s_lo, tl.float32)
    if SCATTER:
        phases = SH * SW
        grp = pid_z // phases
        rh = (pid_z % phases) // SW
        rw = pid_z % SW
        # The taps that reach output rows of phase rh: kh * DH = rh + PH (mod SH), i.e. kh0 + j * STEP_H
        # (STEP_H = SH / gcd(SH, DH)); kh0 is the first solution below STEP_H (KH + STEP_H: none).
        # OFF_H, a multiple of SH, keeps numerators >= 0 (Triton's integer division truncates).
        # (rh * 0 + ...: a tensor even where Triton specialised KH and STEP_H to the constant 1, so that the
        # loop-carried value keeps one type)
        # (jh / jw, not kh / kw: the K loop below assigns [BK] tensors to kh / kw, and the compiler refuses a name
        # whose type changes across loops; the interpreter, plain Python, accepted it)
        kh0 = rh * 0 + (KH + STEP_H)
        for jh in range(0, STEP_H):
            kh0 = tl.where((((rh + PH - jh * DH + OFF_H) % SH) == 0) & (kh0 == KH + STEP_H), jh, kh0)
        kw0 = rw * 0 + (KW + STEP_W)
        for jw in range(0, STEP_W):
            kw0 = tl.where((((rw + PW - jw * DW + OFF_W) % SW) == 0) & (kw0 == KW + STEP_W), jw, kw0)
        cnt_h = tl.where(kh0 < KH, (KH - kh0 + STEP_H - 1) // STEP_H, 0)
        cnt_w = tl.where(kw0 < KW, (KW - kw0 + STEP_W - 1) // STEP_W, 0)
    else:
        grp = pid_z
        rh = 0
        rw = 0
        kh0 = 0
        kw0 = 0
        cnt_h = KH
        cnt_w = KW
    taps = cnt_h * cnt_w

    # M: output pixels of this phase, row-major over (batch, qh, qw)
    rows = pid_m * BM + tl.arange(0, BM)
    qw = rows % QW
    t = rows // QW
    qh = t % QH
    nb = t // QH
    if SCATTER:
        oh = qh * SH + rh
        ow = qw * SW + rw
        ih_row = qh
        iw_row = qw
    else:
        oh = qh
        ow = qw
        ih_row = qh * SH - PH
        iw_row = qw * SW - PW
    row_ok = (nb < N) & (oh < OH) & (ow < OW)
    x_row = nb * sxn + (grp * C_K_G) * sxc + ih_row * sxh + iw_row * sxw

    # N: output channels of the group
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < C_N_G
    kernel_taps = KH * KW
    if SCATTER:  # weight [C_in = groups * C_K_G, C_N_G, kH, kW]
        w_col = grp * C_K_G * C_N_G * kernel_taps + cols * kernel_taps
        w_k_stride = C_N_G * kernel_taps
    else:  # weight [C_out = groups * C_N_G, C_K_G, kH, kW]
        w_col = (grp * C_N_G + cols) * (C_K_G * kernel_taps)
        w_k_stride = kernel_taps

    # K: (input channel of the group, tap of this phase), channel-major
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, C_K_G * taps, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < C_K_G * taps
        ci = ks // taps
        tap = ks % taps
        kh = kh0 + (tap // cnt_w) * STEP_H
        kw = kw0 + (tap % cnt_w) * STEP_W
        if SCATTER:
            ih_col = (rh + PH - kh * DH + OFF_H) // SH - OFF_H // SH
            iw_col = (rw + PW - kw * DW + OFF_W) // SW - OFF_W // SW
        else:
            ih_col = kh * DH
            iw_col = kw * DW
        ih = ih_row[:, None] + ih_col[None, :]
        iw = iw_row[:, None] + iw_col[None, :]
        a_ok = (row_ok[:, None] & k_ok[None, :]) & ((ih >= 0) & (ih < H)) & ((iw >= 0) & (iw < W))
        x_col = ci * sxc + ih_col * sxh + iw_col * sxw
        a = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=a_ok, other=0.0)
        w_off = (ci * w_k_stride + kh * KW + kw)[:, None] + w_col[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(w_ptr + w_off, mask=w_ok, other=0.0).to(tl.float32)
        if W_MASK:  # DGMw: the mask applied in registers, W * m never stored
            b = b * mask_value(tl.load(e_ptr + w_off, mask=w_ok, other=0.0).to(tl.float32), s, MODE)
        if K_GATE:  # DGMa data gradient: the gate of the units this GEMM contracts over
            g = mask_value(tl.load(kg_ptr + grp * C_K_G + ci, mask=k_ok, other=0.0).to(tl.float32), s, MODE)
            b = b * g[:, None]
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)

    out_ch = grp * C_N_G + cols
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_ch, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if N_GATE:  # DGMa forward: the gate in the epilogue
        acc = acc * mask_value(tl.load(ng_ptr + out_ch, mask=col_ok, other=0.0).to(tl.float32), s, MODE)[None, :]
    y_off = nb[:, None] * (C_OUT * OH * OW) + out_ch[None, :] * (OH * OW) + (oh * OW + ow)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


#: offsets the kernel computes in 32-bit arithmetic must stay below this
INT32_LIMIT = 2**31
#: the largest grid dimension 1 and 2 of a CUDA launch (dimension 0 may go to 2**31 - 1)
GRID_YZ_LIMIT = 65535


def unlaunchable_reason(x: torch.Tensor, weight: torch.Tensor, out_numel: int, *, scatter: bool, stride, padding,
                        dilation, groups: int) -> str | None:
    """Why :func:`conv` cannot take this call (None: it can); the caller then uses ATen's convolution.

    The kernel computes element offsets in int32 from arbitrary strides: what must fit is the largest offset an
    operand's addressing reaches, not its element count (a strided view of few elements can span more memory).
    For x that is ``sum((size - 1) * stride)`` plus the excursions of the padded window (negative rows and columns
    before the load mask drops them, and the transposed convolution's phase offsets). The grid's dimension 2 is
    groups x (stride_h x stride_w for a transposed convolution), dimension 1 the output-channel blocks.
    """
    kh, kw = weight.shape[-2:]
    sxh, sxw = x.stride(-2), x.stride(-1)
    reach = sum((size - 1) * st for size, st in zip(x.shape, x.stride()))
    window = ((padding[0] + dilation[0] * kh + stride[0]) * sxh + (padding[1] + dilation[1] * kw + stride[1]) * sxw)
    if reach + window >= INT32_LIMIT:
        return f"the input's addressing reaches offset {reach + window}, beyond int32"
    if max(weight.numel(), out_numel) >= INT32_LIMIT:
        return f"the weight ({weight.numel()}) or the output ({out_numel}) has 2**31 elements or more"
    phases = stride[0] * stride[1] if scatter else 1
    if groups * phases > GRID_YZ_LIMIT:
        return f"groups x phases = {groups * phases} programs in grid dimension 2, beyond {GRID_YZ_LIMIT}"
    return None


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, scatter: bool,
                output_padding: int = 0) -> int:
    if scatter:
        return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _blocks(m: int, c_n: int, k_total: int) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) for M output pixels, N output channels, K = channels x taps per group.

    tl.dot needs every tile dimension >= 16."""
    bn = max(16, min(triton.next_power_of_2(c_n), 64))
    bk = max(16, min(triton.next_power_of_2(k_total), 128 if INTERPRETED else 32))
    if INTERPRETED:  # the interpreter pays per program and per op: few, large tiles
        return max(16, min(triton.next_power_of_2(m), 256)), bn, bk, 4
    bm = 128 if m >= 8192 and bn <= 32 else 64
    return bm, bn, bk, 4


def conv(
    x: torch.Tensor, weight: torch.Tensor, *, scatter: bool, out_hw: tuple[int, int], stride, padding, dilation,
    groups: int, s: float = 1.0, mode: int = 0, weight_scores: torch.Tensor | None = None,
    k_gate_scores: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    n_gate_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """The convolution of ``x`` ([N, C, H, W], any strides) with the masked/gated ``weight``.

    ``scatter=False``: conv2d with a ``[out, in/groups, kH, kW]`` weight; ``True``: conv_transpose2d with
    a ``[in, out/groups, kH, kW]`` weight. ``out_hw`` is the output's spatial size (it fixes the transposed
    convolution's output padding). Returns a contiguous tensor in x's dtype.
    """
    if x.dtype == torch.float64:
        raise TypeError("the fused Triton convolution supports float32, float16 and bfloat16, not float64")
    n, _c, h, w_in = x.shape
    w = weight.contiguous()
    rows, cols, kh, kw = w.shape
    if scatter:
        c_k, c_n = rows // groups, cols
    else:
        c_k, c_n = cols, rows // groups
    c_out = c_n * groups
    oh, ow = out_hw
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.numel() == 0 or w.numel() == 0:
        # an empty contraction: only the bias (and the gate) remain
        y.zero_()
        if bias is not None:
            y += bias.view(1, -1, 1, 1)
        if n_gate_scores is not None:
            from .mask import mask_forward

            y *= mask_forward(n_gate_scores, s, mode).view(1, -1, 1, 1)
        return y
    sh, sw = stride
    if scatter:
        qh, qw = triton.cdiv(oh, sh), triton.cdiv(ow, sw)
        phases = sh * sw
        off_h = sh * ((kh - 1) * dilation[0] // sh + 1)
        off_w = sw * ((kw - 1) * dilation[1] // sw + 1)
        step_h, step_w = sh // math.gcd(sh, dilation[0]), sw // math.gcd(sw, dilation[1])
        taps = triton.cdiv(kh, step_h) * triton.cdiv(kw, step_w)  # at most, per phase
    else:
        qh, qw, phases, off_h, off_w, step_h, step_w = oh, ow, 1, 0, 0, 1, 1
        taps = kh * kw
    m_total = n * qh * qw
    bm, bn, bk, warps = _blocks(m_total, c_n, c_k * taps)
    grid = (triton.cdiv(m_total, bm), triton.cdiv(c_n, bn), groups * phases)
    if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT:  # unlaunchable_reason keeps such calls away
        raise ValueError(f"the fused Triton convolution cannot launch a grid of {grid}")
    if x.dtype == torch.float32:
        # TF32 exactly when PyTorch lets cuDNN use it for convolutions, so both strategies agree
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    else:
        precision = None  # float16/bfloat16 operands: the products are exact in float32 anyway
    dummy = w
    e = weight_scores.contiguous() if weight_scores is not None else None
    kg = k_gate_scores.contiguous() if k_gate_scores is not None else None
    ng = n_gate_scores.contiguous() if n_gate_scores is not None else None
    b = bias.contiguous() if bias is not None else None
    _conv_kernel[grid](
        x, w, e if e is not None else dummy, kg if kg is not None else dummy, b if b is not None else dummy,
        ng if ng is not None else dummy, y,
        n, h, w_in, c_k, c_n, c_out, oh, ow, qh, qw, kh, kw, step_h, step_w,
        *x.stride(),
        sh, sw, padding[0], padding[1], dilation[0], dilation[1], off_h, off_w,
        *split_scalar(s),
        SCATTER=scatter, W_MASK=e is not None, K_GATE=kg is not None, N_GATE=ng is not None,
        HAS_BIAS=b is not None, MODE=mode, INPUT_PRECISION=precision, BM=bm, BN=bn, BK=bk, num_warps=warps,
    )
    return y
