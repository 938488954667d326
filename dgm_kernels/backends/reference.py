"""The reference backend: plain PyTorch, the spec of every op.

Autograd does the backward of everything except the mask itself: the derivative of sigmoid is written
out in a numerically sound form (``sigmoid(x) * sigmoid(-x)``), because autograd's own formula for
``torch.sigmoid`` (``y * (1 - y)``) cancels to zero once ``|x|`` passes ~17 in float32 (~37 in float64)
and would silently kill the gradient of every score that is already decided (SPEC section 3).

Every other backend must compute the same functions, forward and every gradient.
"""
from __future__ import annotations

import math

import torch

from .. import _modes
from ..bits import as_dense, pack_bits_reference, unit_block_pattern, unpack_bits_reference
from .contract import Backend

#: |s e| beyond which HAT's compensation ``cosh(clamp(s e, -50, 50))`` stops growing.
HAT_CLAMP = 50.0


def mask_derivative(scores: torch.Tensor, s: float, s_max: float | None) -> torch.Tensor:
    """dm/de for the mask of ``scores`` at scale ``s``, HAT-compensated when ``s_max`` is given.

    Without compensation: ``s * sigmoid'(s e)``.
    With compensation (HAT): the plain derivative times ``(s_max / s) * (cosh(clamp(s e, +-50)) + 1) /
    (cosh(e) + 1)``, which simplifies to ``s_max * sigmoid'(e) * r(|s e|)`` with
    ``r(a) = (cosh(min(a, 50)) + 1) / (cosh(a) + 1) = exp(c - a) * ((1 + exp(-c)) / (1 + exp(-a)))**2``
    (``c = min(a, 50)``): 1 inside the clamp, ~exp(50 - a) beyond. No term can overflow.
    """
    x = scores * s
    if s_max is None:
        return s * torch.sigmoid(x) * torch.sigmoid(-x)
    a = x.abs()
    c = a.clamp(max=HAT_CLAMP)
    ratio = torch.exp(c - a) * ((1 + torch.exp(-c)) / (1 + torch.exp(-a))) ** 2
    return s_max * torch.sigmoid(scores) * torch.sigmoid(-scores) * ratio


class _Mask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, s, mode, s_max):
        ctx.save_for_backward(scores)
        ctx.s, ctx.s_max = s, s_max
        if mode == _modes.STE:
            return (scores >= 0).to(scores.dtype)
        return torch.sigmoid(scores * s)

    @staticmethod
    def backward(ctx, grad_m):
        (scores,) = ctx.saved_tensors
        return grad_m * mask_derivative(scores, ctx.s, ctx.s_max), None, None, None


def mask(scores, s, mode, s_max):
    return _Mask.apply(scores, s, mode, s_max)


class _HatMask(torch.autograd.Function):
    """HAT's own numerics (Serra et al. 2018), for reproducing its published numbers: the derivative autograd gives
    ``sigmoid(s e)``, ``s * y * (1 - y)`` from the rounded output y, times HAT's compensation
    ``(s_max / s) * (cosh(clamp(s e, +-50)) + 1) / (cosh(e) + 1)``. In float32 y rounds to 1 once ``s e`` passes
    ~16.6, and the derivative is then exactly 0 (on the negative side it lasts until y underflows, ~-88): the
    library's stable derivative (:func:`mask_derivative`) keeps those gradients."""

    @staticmethod
    def forward(ctx, scores, s, mode, s_max):
        y = torch.sigmoid(scores * s)
        ctx.save_for_backward(scores, y)
        ctx.s, ctx.s_max = s, s_max
        return (scores >= 0).to(scores.dtype) if mode == _modes.STE else y

    @staticmethod
    def backward(ctx, grad_m):
        scores, y = ctx.saved_tensors
        # the order of HAT's float operations: sigmoid's backward, the chain rule through s * e, then the factor
        grad = grad_m * (1 - y) * y * ctx.s
        if ctx.s_max is not None:
            num = torch.cosh(torch.clamp(ctx.s * scores, -HAT_CLAMP, HAT_CLAMP)) + 1
            den = torch.cosh(scores) + 1
            grad = grad * (ctx.s_max / ctx.s * num / den)
        return grad, None, None, None


def hat_mask(scores, s, mode, s_max):
    """m(e) as :func:`mask`, differentiated with HAT's own float formula (see :class:`_HatMask`)."""
    return _HatMask.apply(scores, s, mode, s_max)


def apply_weight_mask(weight, m, frozen):
    """W * m with the frozen entries of W constants (the composition of every per-weight op, given its mask)."""
    frozen = as_dense(frozen, weight.shape)
    if frozen is not None:
        # where frozen, the weight enters as a constant: autograd gives it exactly zero gradient
        weight = torch.where(frozen, weight.detach(), weight)
    return weight * m


def masked_weight(weight, scores, s, frozen, mode, s_max):
    return apply_weight_mask(weight, mask(scores, s, mode, s_max), frozen)


def apply_gate(y_pre, m):
    """y_pre * m per unit of dim 1 (the composition of every gated op, given its gate)."""
    return y_pre * m.view((1, -1) + (1,) * (y_pre.dim() - 2))


def channel_gate(y_pre, scores, s, mode, s_max):
    return apply_gate(y_pre, mask(scores, s, mode, s_max))


def block_unit_grad(weight, frozen_out, frozen_in, transposed, groups):
    in_channels, out_channels = (weight.shape[0], weight.shape[1] * groups) if transposed else (weight.shape[1] * groups, weight.shape[0])
    frozen_out, frozen_in = as_dense(frozen_out, (out_channels,)), as_dense(frozen_in, (in_channels,))
    block = unit_block_pattern(weight.shape, frozen_out, frozen_in, transposed, groups)
    block = block[(...,) + (None,) * (weight.dim() - 2)]
    return torch.where(block, weight.detach(), weight)


def terms_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the regulariser's terms for masks of ``dtype``: float64 stays, everything else is float32 (a
    float16 sum or count passes 65504 and overflows; a bfloat16 count stops being exact at 256)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparsity_terms(mask, reserved):
    """(sum of m over free entries, number of free entries) of one layer, in ``terms_dtype``; free = not reserved."""
    acc = terms_dtype(mask.dtype)
    if reserved is None:
        return mask.sum(dtype=acc), torch.tensor(float(mask.numel()), dtype=acc, device=mask.device)
    free = ~reserved
    return torch.where(free, mask, torch.zeros_like(mask)).sum(dtype=acc), free.sum().to(acc)


def soft_sparsity_terms(mask, reserved):
    """(sum of m (1 - M), sum of (1 - M)) of one layer for a real-valued cumulative mask M in [0, 1] (HAT's
    regulariser: M is the max over finished tasks of sigmoid(s_max e_t)), in ``terms_dtype``."""
    acc = terms_dtype(mask.dtype)
    free = 1 - reserved.to(mask.dtype)
    return (mask * free).sum(dtype=acc), free.sum(dtype=acc)


def pack_bits(mask):
    return pack_bits_reference(mask)


def union_count(reserved_bits, task_bits, outer, units, inner):
    """(packed reserved | task, newly reserved entries per unit) for a mask viewed as [outer, units, inner]."""
    n = outer * units * inner
    reserved, task = unpack_bits_reference(reserved_bits, (n,)), unpack_bits_reference(task_bits, (n,))
    new = (task & ~reserved).view(outer, units, inner)
    return pack_bits_reference(reserved | task), new.sum(dim=(0, 2))


def adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam (decoupled: AdamW) update in place; entries where ``frozen`` stay bit-identical.

    Frozen entries keep their value and their moments: a gradient, a momentum or a weight decay never
    reaches them, whatever the optimizer state says.
    """
    frozen = as_dense(frozen, param.shape)
    g = grad if weight_decay == 0 or decoupled else grad + weight_decay * param
    m = exp_avg * beta1 + g * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
    p = param * (1 - lr * weight_decay) if decoupled and weight_decay != 0 else param
    p = p - (lr / bias1) * m / denom
    for target, value in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        target.copy_(value if frozen is None else torch.where(frozen, target, value))


def sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD (momentum, dampening, Nesterov, L2 weight decay) update in place; frozen entries untouched.

    ``momentum_buffer`` may be None when ``momentum == 0``; on ``first_step`` the buffer is the gradient.
    """
    frozen = as_dense(frozen, param.shape)
    g = grad if weight_decay == 0 else grad + weight_decay * param
    if momentum != 0:
        buf = g.clone() if first_step else momentum_buffer * momentum + g * (1 - dampening)
        g = g + momentum * buf if nesterov else buf
        momentum_buffer.copy_(buf if frozen is None else torch.where(frozen, momentum_buffer, buf))
    p = param - lr * g
    param.copy_(p if frozen is None else torch.where(frozen, param, p))


class ReferenceBackend(Backend):
    """Plain PyTorch on any device; the spec of every other backend (it unpacks packed bits in PyTorch)."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        return None

    mask = staticmethod(mask)
    masked_weight = staticmethod(masked_weight)
    channel_gate = staticmethod(channel_gate)
    block_unit_grad = staticmethod(block_unit_grad)
    sparsity_terms = staticmethod(sparsity_terms)
    pack_bits = staticmethod(pack_bits)
    union_count = staticmethod(union_count)
    adam_step_ = staticmethod(adam_step_)
    sgd_step_ = staticmethod(sgd_step_)

