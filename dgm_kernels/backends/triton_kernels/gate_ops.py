"""Custom ops of the gate family (DGMa): the per-channel gate and the per-unit blocking of weight gradients."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import gate as gate_kernels
from ._common import check_dtype
from .ops_common import or_none, or_placeholder, triton_op


@triton_op("channel_gate", mutates_args=())
def channel_gate_op(y_pre: Tensor, scores: Tensor, s: float, mode: int, s_max: Optional[float]) -> Tensor:
    return gate_kernels.gate_forward(y_pre, scores, s, mode)


@channel_gate_op.register_fake
def _(y_pre, scores, s, mode, s_max):
    return y_pre.new_empty(y_pre.shape)


@triton_op("channel_gate_backward", mutates_args=())
def channel_gate_backward_op(
    grad_y: Tensor, y_pre: Tensor, scores: Tensor, s: float, s_max: Optional[float], mode: int,
    need_y: bool, need_scores: bool,
) -> tuple[Tensor, Tensor]:
    gy, ge = gate_kernels.gate_backward(grad_y, y_pre, scores, s, s_max, mode, need_y, need_scores)
    return or_placeholder(gy, y_pre), or_placeholder(ge, y_pre)


@channel_gate_backward_op.register_fake
def _(grad_y, y_pre, scores, s, s_max, mode, need_y, need_scores):
    return (y_pre.new_empty(y_pre.shape if need_y else (0,)),
            y_pre.new_empty(scores.shape if need_scores else (0,)))


def _channel_gate_setup(ctx, inputs, output):
    y_pre, scores, s, mode, s_max = inputs
    ctx.save_for_backward(y_pre, scores)
    ctx.s, ctx.mode, ctx.s_max = s, mode, s_max


def _channel_gate_grad(ctx, grad_y):
    y_pre, scores = ctx.saved_tensors
    need_y, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gy, ge = channel_gate_backward_op(grad_y, y_pre, scores, ctx.s, ctx.s_max, ctx.mode, need_y, need_e)
    return or_none(gy, need_y), or_none(ge, need_e), None, None, None


channel_gate_op.register_autograd(_channel_gate_grad, setup_context=_channel_gate_setup)


@triton_op("block_unit_grad", mutates_args=())
def block_unit_grad_op(
    weight: Tensor, frozen_out: Tensor, frozen_in: Optional[Tensor], transposed: bool, groups: int
) -> Tensor:
    # the identity; a custom op may not return an alias of its input, hence the copy (weights are small)
    return weight.clone(memory_format=torch.contiguous_format)


@block_unit_grad_op.register_fake
def _(weight, frozen_out, frozen_in, transposed, groups):
    return weight.new_empty(weight.shape)


@triton_op("block_unit_grad_backward", mutates_args=())
def block_unit_grad_backward_op(
    grad: Tensor, weight: Tensor, frozen_out: Tensor, frozen_in: Optional[Tensor], transposed: bool, groups: int
) -> Tensor:
    gw, _, _ = gate_kernels.unit_weight_grad(grad, weight, frozen_out, frozen_in, transposed, groups)
    return gw


@block_unit_grad_backward_op.register_fake
def _(grad, weight, frozen_out, frozen_in, transposed, groups):
    return weight.new_empty(weight.shape)


def _block_unit_grad_setup(ctx, inputs, output):
    weight, frozen_out, frozen_in, transposed, groups = inputs
    # the weight is saved for its shape and dtype only (the kernel reads no value of it)
    ctx.save_for_backward(weight, frozen_out, frozen_in)
    ctx.transposed, ctx.groups = transposed, groups


def _block_unit_grad_grad(ctx, grad):
    weight, frozen_out, frozen_in = ctx.saved_tensors
    gw = block_unit_grad_backward_op(grad, weight, frozen_out, frozen_in, ctx.transposed, ctx.groups)
    return gw, None, None, None, None


block_unit_grad_op.register_autograd(_block_unit_grad_grad, setup_context=_block_unit_grad_setup)


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (arguments validated by dgm_kernels.functional; the dtype is this backend's)
# ----------------------------------------------------------------------------------------------------------
def channel_gate(y_pre, scores, s, mode, s_max):
    check_dtype("y_pre", y_pre)
    return channel_gate_op(y_pre, scores.reshape(-1), float(s), int(mode), s_max)


def block_unit_grad(weight, frozen_out, frozen_in, transposed, groups):
    check_dtype("weight", weight)
    return block_unit_grad_op(weight, frozen_out, frozen_in, bool(transposed), int(groups))
