"""Custom op of the sparsity regulariser: the sum of the free mask entries and their count, and its backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import sparsity as sparsity_kernels
from ._common import check_dtype
from .ops_common import triton_op


@triton_op("sparsity_terms", mutates_args=())
def sparsity_terms_op(mask: Tensor, reserved: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return sparsity_kernels.sparsity_terms(mask, reserved)


@sparsity_terms_op.register_fake
def _(mask, reserved):
    # the kernels accumulate in float32 at least (float16 sums of many entries lose everything)
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return mask.new_empty((), dtype=dtype), mask.new_empty((), dtype=dtype)


@triton_op("sparsity_terms_backward", mutates_args=())
def sparsity_terms_backward_op(grad_sum: Tensor, reserved: Optional[Tensor], mask: Tensor) -> Tensor:
    return sparsity_kernels.sparsity_backward(grad_sum, reserved, mask)


@sparsity_terms_backward_op.register_fake
def _(grad_sum, reserved, mask):
    return mask.new_empty(mask.shape)


def _sparsity_setup(ctx, inputs, output):
    mask, reserved = inputs
    ctx.save_for_backward(mask, reserved)
    ctx.mark_non_differentiable(output[1])  # the count


def _sparsity_grad(ctx, grad_sum, _grad_count):
    mask, reserved = ctx.saved_tensors
    return sparsity_terms_backward_op(grad_sum, reserved, mask), None


sparsity_terms_op.register_autograd(_sparsity_grad, setup_context=_sparsity_setup)


def sparsity_terms(mask, reserved):
    """Entry point of the backend contract."""
    check_dtype("mask", mask)
    return sparsity_terms_op(mask, reserved)
