"""The mask m(e) and the masked weight W * m(e) (DGMw), forward and one-pass backward.

Launchers take tensors already validated by ``dgm_kernels.functional`` (matching shapes, devices and
dtypes); inputs may be non-contiguous (they are made contiguous), outputs are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
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
def _mask_forward_kernel(
    e_ptr, w_ptr, out_ptr, n, s_hi, s_lo,
    HAS_W: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # out = m(e), or W * m(e) when HAS_W
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = scalar(s_hi, s_lo, ACC)
    m = mask_value(tl.load(e_ptr + offs, mask=ok, other=0.0).to(ACC), s, MODE)
    if HAS_W:
        m = flush_tiny(m * tl.load(w_ptr + offs, mask=ok, other=0.0).to(ACC))
    tl.store(out_ptr + offs, m.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mask_backward_kernel(
    g_ptr, e_ptr, w_ptr, frozen_ptr, gw_ptr, ge_ptr, n, s_hi, s_lo, smax_hi, smax_lo,
    HAS_W: tl.constexpr, HAS_FROZEN: tl.constexpr, FROZEN_PACKED: tl.constexpr, NEED_W: tl.constexpr,
    NEED_E: tl.constexpr, MODE: tl.constexpr, COMPENSATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # mask:          ge = g * dm/de
    # masked weight: gw = g * m * !frozen, ge = g * W * dm/de   (one read of g, e and W)
    # frozen: one byte per entry, or packed bits (FROZEN_PACKED) read in place
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = scalar(s_hi, s_lo, ACC)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(ACC)
    e = tl.load(e_ptr + offs, mask=ok, other=0.0).to(ACC)
    if NEED_W:
        gw = g * mask_value(e, s, MODE)
        if HAS_FROZEN:
            gw = tl.where(frozen_at(frozen_ptr, offs, ok, FROZEN_PACKED), 0.0, gw)
        tl.store(gw_ptr + offs, flush_tiny(gw).to(gw_ptr.dtype.element_ty), mask=ok)
    if NEED_E:
        ge = g * mask_slope(e, s, scalar(smax_hi, smax_lo, ACC), COMPENSATE)
        if HAS_W:
            ge = ge * tl.load(w_ptr + offs, mask=ok, other=0.0).to(ACC)
        tl.store(ge_ptr + offs, flush_tiny(ge).to(ge_ptr.dtype.element_ty), mask=ok)


def _launch_1d(kernel, n, *args, **meta):
    block = elementwise_block(n)
    kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, num_warps=num_warps_for(block), **meta)


def mask_forward(scores: torch.Tensor, s: float, mode: int) -> torch.Tensor:
    """m(e), contiguous, in scores' dtype."""
    e = scores.contiguous()
    out = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    if e.numel():
        _launch_1d(_mask_forward_kernel, e.numel(), e, e, out, e.numel(), *split_scalar(s),
                   HAS_W=False, MODE=mode, ACC=compute_dtype(e.dtype))
    return out


def masked_weight_forward(weight: torch.Tensor, scores: torch.Tensor, s: float, mode: int) -> torch.Tensor:
    """W * m(e) (scores of W's shape), contiguous."""
    w, e = weight.contiguous(), scores.contiguous()
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if w.numel():
        _launch_1d(_mask_forward_kernel, w.numel(), e, w, out, w.numel(), *split_scalar(s),
                   HAS_W=True, MODE=mode, ACC=compute_dtype(w.dtype))
    return out


def mask_backward(grad_m: torch.Tensor, scores: torch.Tensor, s: float, s_max: float | None) -> torch.Tensor:
    """grad_e = grad_m * dm/de."""
    g, e = grad_m.contiguous(), scores.contiguous()
    ge = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    if e.numel():
        _launch_1d(_mask_backward_kernel, e.numel(), g, e, e, e, ge, ge, e.numel(), *split_scalar(s),
                   *split_scalar(s_max), HAS_W=False, HAS_FROZEN=False, FROZEN_PACKED=False, NEED_W=False,
                   NEED_E=True, MODE=0, COMPENSATE=s_max is not None, ACC=compute_dtype(e.dtype))
    return ge


def masked_weight_backward(
    grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, frozen: torch.Tensor | None,
    s: float, s_max: float | None, mode: int, need_weight: bool = True, need_scores: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_W, grad_e) of W * m(e) in one pass; None for a gradient that is not needed.

    ``grad`` is the gradient of the masked weight (for a masked convolution: the convolution's weight
    gradient, computed with the masked weight's value unused). ``frozen``: None, a bool tensor of W's shape
    or its packed bits (uint8), read inside the kernel.
    """
    g, w, e = grad.contiguous(), weight.contiguous(), scores.contiguous()
    gw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_weight else None
    ge = torch.empty(e.shape, dtype=e.dtype, device=e.device) if need_scores else None
    if w.numel() and (need_weight or need_scores):
        fz, packed = frozen_operand("frozen", frozen, w.numel())
        _launch_1d(_mask_backward_kernel, w.numel(), g, e, w, fz if fz is not None else e,
                   gw if gw is not None else g, ge if ge is not None else g, w.numel(), *split_scalar(s),
                   *split_scalar(s_max), HAS_W=True, HAS_FROZEN=fz is not None, FROZEN_PACKED=packed,
                   NEED_W=need_weight, NEED_E=need_scores, MODE=mode, COMPENSATE=s_max is not None,
                   ACC=compute_dtype(w.dtype))
    return gw, ge
