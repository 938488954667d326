"""Fused masked optimizer updates (Adam/AdamW and SGD) that never write a frozen entry.

One kernel per parameter reads the parameter, its gradient, its state and its frozen flags (a bool tensor
or packed bits, read in place) and writes the new parameter and state. Frozen entries are masked out of
the loads and of the stores: their parameter and state bytes are never written, so they stay
bit-identical whatever the gradient, the momentum or the weight decay (zeroing a gradient would not do:
momentum and decay still move a weight whose gradient is 0).

The arithmetic follows ``dgm_kernels.backends.reference.adam_step_`` / ``sgd_step_`` operation by operation, in
the tensor's precision (float32 for float16/bfloat16 storage), with the scalar factors (bias corrections,
1 - beta, ...) computed in double precision on the host, as PyTorch does before casting a Python scalar
to the tensor's dtype; float32 division and square root are the correctly rounded ones (``div_rn`` /
``sqrt_rn``), not the fast approximations, so that a float32 update agrees with PyTorch's to a bit or two.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, elementwise_block, frozen_at, frozen_operand, num_warps_for, scalar, split_scalar


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded square root: ``sqrt_rn`` for float32 (tl.sqrt is the approximate one there);
    float64's tl.sqrt is already IEEE-exact (and sqrt_rn takes float32 only)."""
    if ACC == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """Correctly rounded division (float32's ``/`` may be the approximate ``div.full``)."""
    if ACC == tl.float64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, f_ptr, n,
    b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, step_hi, step_lo, sb2_hi, sb2_lo,
    eps_hi, eps_lo, wd_hi, wd_lo, decay_hi, decay_lo,
    HAS_FROZEN: tl.constexpr, PACKED: tl.constexpr, L2: tl.constexpr, DECOUPLED: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    upd = offs < n
    if HAS_FROZEN:
        upd = upd & ~frozen_at(f_ptr, offs, upd, PACKED)
    p = tl.load(p_ptr + offs, mask=upd, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=upd, other=0.0).to(ACC)
    if L2:  # Adam's L2 penalty enters the gradient
        g = g + scalar(wd_hi, wd_lo, ACC) * p
    m = tl.load(m_ptr + offs, mask=upd, other=0.0).to(ACC)
    m = m * scalar(b1_hi, b1_lo, ACC) + g * scalar(omb1_hi, omb1_lo, ACC)
    v = tl.load(v_ptr + offs, mask=upd, other=0.0).to(ACC)
    v = v * scalar(b2_hi, b2_lo, ACC) + g * g * scalar(omb2_hi, omb2_lo, ACC)
    denom = _div(_sqrt(v, ACC), scalar(sb2_hi, sb2_lo, ACC), ACC) + scalar(eps_hi, eps_lo, ACC)
    if DECOUPLED:  # AdamW: the decay scales the weight itself
        p = p * scalar(decay_hi, decay_lo, ACC)
    p = p - _div(scalar(step_hi, step_lo, ACC) * m, denom, ACC)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=upd)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=upd)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=upd)


@triton.jit
def _sgd_kernel(
    p_ptr, g_ptr, buf_ptr, f_ptr, n, lr_hi, lr_lo, mom_hi, mom_lo, damp_hi, damp_lo, wd_hi, wd_lo,
    HAS_FROZEN: tl.constexpr, PACKED: tl.constexpr, L2: tl.constexpr, MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr, NESTEROV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    upd = offs < n
    if HAS_FROZEN:
        upd = upd & ~frozen_at(f_ptr, offs, upd, PACKED)
    p = tl.load(p_ptr + offs, mask=upd, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=upd, other=0.0).to(ACC)
    if L2:
        g = g + scalar(wd_hi, wd_lo, ACC) * p
    if MOMENTUM:
        if FIRST:  # the buffer starts as the gradient (no dampening on the first step)
            buf = g
        else:
            mom = scalar(mom_hi, mom_lo, ACC)
            buf = tl.load(buf_ptr + offs, mask=upd, other=0.0).to(ACC) * mom + g * scalar(damp_hi, damp_lo, ACC)
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=upd)
        if NESTEROV:
            g = g + scalar(mom_hi, mom_lo, ACC) * buf
        else:
            g = buf
    p = p - scalar(lr_hi, lr_lo, ACC) * g
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=upd)


class _InPlace:
    """Contiguous working copies of non-contiguous tensors, copied back after the kernel.

    The kernels index entries by their row-major position (the order of the frozen bits), so they need
    dense row-major memory; a parameter stored otherwise is updated through a copy. Copying back writes
    frozen entries with their own unchanged bytes, which keeps them bit-identical.
    """

    def __init__(self, *tensors: torch.Tensor | None):
        self.pairs = [(t, t if t is None or t.is_contiguous() else t.contiguous()) for t in tensors]

    @property
    def work(self) -> list[torch.Tensor | None]:
        return [w for _, w in self.pairs]

    def finish(self) -> None:
        for t, w in self.pairs:
            if t is not None and w is not t:
                t.copy_(w)


def _launch(kernel, n: int, *args, **meta) -> None:
    block = elementwise_block(n)
    kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, num_warps=num_warps_for(block), **meta)


def adam_step_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    frozen: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, decoupled: bool,
) -> None:
    """One Adam (``decoupled``: AdamW) update of ``param``, ``exp_avg`` and ``exp_avg_sq`` in place."""
    n = param.numel()
    if n == 0:
        return
    fz, packed = frozen_operand("frozen", frozen, n)
    io = _InPlace(param, exp_avg, exp_avg_sq)
    p, m, v = io.work
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    scalars = (beta1, 1 - beta1, beta2, 1 - beta2, lr / bias1, math.sqrt(bias2), eps, weight_decay,
               1 - lr * weight_decay)
    _launch(
        _adam_kernel, n, p, grad.contiguous(), m, v, fz if fz is not None else p, n,
        *(half for value in scalars for half in split_scalar(value)),
        HAS_FROZEN=fz is not None, PACKED=packed, L2=weight_decay != 0 and not decoupled,
        DECOUPLED=weight_decay != 0 and decoupled, ACC=compute_dtype(param.dtype),
    )
    io.finish()


def sgd_step_(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None, frozen: torch.Tensor | None,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool,
) -> None:
    """One SGD update of ``param`` (and ``momentum_buffer`` when ``momentum != 0``) in place."""
    n = param.numel()
    if n == 0:
        return
    fz, packed = frozen_operand("frozen", frozen, n)
    has_momentum = momentum != 0
    io = _InPlace(param, momentum_buffer if has_momentum else None)
    p, buf = io.work
    _launch(
        _sgd_kernel, n, p, grad.contiguous(), buf if buf is not None else p, fz if fz is not None else p, n,
        *split_scalar(lr), *split_scalar(momentum), *split_scalar(1 - dampening), *split_scalar(weight_decay),
        HAS_FROZEN=fz is not None, PACKED=packed, L2=weight_decay != 0, MOMENTUM=has_momentum,
        FIRST=bool(first_step), NESTEROV=bool(nesterov), ACC=compute_dtype(param.dtype),
    )
    io.finish()
