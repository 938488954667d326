"""Custom ops of the mask family: m(e) and W * m(e), each with a backward that is itself an op.

The backward being an op keeps a compiled graph from tracing into Triton launches: forward and backward
stay opaque nodes, and the fake kernels give their shapes.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import mask as mask_kernels
from ._common import check_dtype
from .ops_common import or_none, or_placeholder, triton_op


@triton_op("mask", mutates_args=())
def mask_op(scores: Tensor, s: float, mode: int, s_max: Optional[float]) -> Tensor:
    return mask_kernels.mask_forward(scores, s, mode)


@mask_op.register_fake
def _(scores, s, mode, s_max):
    return scores.new_empty(scores.shape)


@triton_op("mask_backward", mutates_args=())
def mask_backward_op(grad_m: Tensor, scores: Tensor, s: float, s_max: Optional[float]) -> Tensor:
    return mask_kernels.mask_backward(grad_m, scores, s, s_max)


@mask_backward_op.register_fake
def _(grad_m, scores, s, s_max):
    return scores.new_empty(scores.shape)


def _mask_setup(ctx, inputs, output):
    scores, s, _mode, s_max = inputs
    ctx.save_for_backward(scores)
    ctx.s, ctx.s_max = s, s_max


def _mask_grad(ctx, grad_m):
    (scores,) = ctx.saved_tensors
    return mask_backward_op(grad_m, scores, ctx.s, ctx.s_max), None, None, None


mask_op.register_autograd(_mask_grad, setup_context=_mask_setup)


@triton_op("masked_weight", mutates_args=())
def masked_weight_op(
    weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, mode: int, s_max: Optional[float]
) -> Tensor:
    # frozen and s_max do not change the value; they are inputs so that the autograd formula sees them
    return mask_kernels.masked_weight_forward(weight, scores, s, mode)


@masked_weight_op.register_fake
def _(weight, scores, frozen, s, mode, s_max):
    return weight.new_empty(weight.shape)


@triton_op("masked_weight_backward", mutates_args=())
def masked_weight_backward_op(
    grad: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, s_max: Optional[float],
    mode: int, need_weight: bool, need_scores: bool,
) -> tuple[Tensor, Tensor]:
    gw, ge = mask_kernels.masked_weight_backward(grad, weight, scores, frozen, s, s_max, mode, need_weight,
                                                 need_scores)
    return or_placeholder(gw, weight), or_placeholder(ge, weight)


@masked_weight_backward_op.register_fake
def _(grad, weight, scores, frozen, s, s_max, mode, need_weight, need_scores):
    return (weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape if need_scores else (0,)))


def _masked_weight_setup(ctx, inputs, output):
    weight, scores, frozen, s, mode, s_max = inputs
    ctx.save_for_backward(weight, scores, frozen)
    ctx.s, ctx.mode, ctx.s_max = s, mode, s_max


def _masked_weight_grad(ctx, grad):
    weight, scores, frozen = ctx.saved_tensors
    need_w, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gw, ge = masked_weight_backward_op(grad, weight, scores, frozen, ctx.s, ctx.s_max, ctx.mode, need_w, need_e)
    return or_none(gw, need_w), or_none(ge, need_e), None, None, None, None


masked_weight_op.register_autograd(_masked_weight_grad, setup_context=_masked_weight_setup)


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (argument normalisation, then the op)
# ----------------------------------------------------------------------------------------------------------
def mask(scores, s, mode, s_max):
    check_dtype("scores", scores)
    return mask_op(scores, float(s), int(mode), s_max)


def masked_weight(weight, scores, s, frozen, mode, s_max):
    check_dtype("weight", weight)
    return masked_weight_op(weight, scores, frozen, float(s), int(mode), s_max)
