"""Custom ops of the masked optimizer steps: Adam/AdamW and SGD updated in place, frozen entries never written.

The ops declare what they write (``mutates_args``), so that functionalization (torch.compile) knows, and
return nothing.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import optim as optim_kernels
from ._common import check_dtype
from .ops_common import triton_op


@triton_op("adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adam_step_op(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, frozen: Optional[Tensor], lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, step: int, decoupled: bool,
) -> None:
    optim_kernels.adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step,
                             decoupled)


@adam_step_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    return None


@triton_op("sgd_step", mutates_args=("param", "momentum_buffer"))
def sgd_step_op(
    param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], frozen: Optional[Tensor], lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool,
) -> None:
    optim_kernels.sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov,
                            first_step)


@sgd_step_op.register_fake
def _(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (arguments validated by the caller: dgm_kernels.optim)
# ----------------------------------------------------------------------------------------------------------
def adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam (``decoupled``: AdamW) update in place; frozen entries of param and state never written."""
    check_dtype("param", param)
    adam_step_op(param, grad, exp_avg, exp_avg_sq, frozen, float(lr), float(beta1), float(beta2), float(eps),
                 float(weight_decay), int(step), bool(decoupled))


def sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD update in place (``momentum_buffer`` may be None when ``momentum == 0``)."""
    check_dtype("param", param)
    if momentum == 0:
        momentum_buffer = None  # not read nor written without momentum (as in the reference)
    sgd_step_op(param, grad, momentum_buffer, frozen, float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov), bool(first_step))
