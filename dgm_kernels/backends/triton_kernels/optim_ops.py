"""Custom ops of the masked optimizer steps: Adam/AdamW and SGD updated in place, frozen entries never written.

The ops declare what they write (``mutates_args``), so that functionalization (torch.compile) knows, and
return nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _checks
from ... import bits as bits_layout
from . import optim as optim_kernels
from ._common import check_dtype
from .ops_common import NAMESPACE


@torch.library.custom_op(f"{NAMESPACE}::adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adam_step_op(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, frozen: Optional[Tensor], lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, step: int, decoupled: bool,
) -> None:
    optim_kernels.adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step,
                             decoupled)


@adam_step_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sgd_step", mutates_args=("param", "momentum_buffer"))
def sgd_step_op(
    param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], frozen: Optional[Tensor], lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool,
) -> None:
    optim_kernels.sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov,
                            first_step)


@sgd_step_op.register_fake
def _(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None


def check_frozen_arg(frozen, param: Tensor) -> None:
    """``frozen``: None, a bool tensor of param's shape, or its packed bits on param's device."""
    if frozen is None:
        return
    _checks.tensor("frozen", frozen, device=param.device)
    if frozen.dtype == torch.uint8:
        bits_layout.check_packed("frozen", frozen, param.shape, param.device)
    else:
        _checks.tensor("frozen", frozen, dtype=torch.bool, shape=param.shape)


def check_like_param(name: str, t, param: Tensor) -> None:
    _checks.tensor(name, t, dtype=param.dtype, device=param.device, shape=param.shape)


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (argument checks, then the op)
# ----------------------------------------------------------------------------------------------------------
def adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam (``decoupled``: AdamW) update in place; frozen entries of param and state never written."""
    _checks.tensor("param", param)
    check_dtype("param", param)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_like_param(name, t, param)
    check_frozen_arg(frozen, param)
    adam_step_op(param, grad, exp_avg, exp_avg_sq, frozen, float(lr), float(beta1), float(beta2), float(eps),
                 float(weight_decay), int(step), bool(decoupled))


def sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD update in place (``momentum_buffer`` may be None when ``momentum == 0``)."""
    _checks.tensor("param", param)
    check_dtype("param", param)
    check_like_param("grad", grad, param)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError(f"momentum_buffer must be a tensor when momentum != 0 (momentum={momentum})")
        check_like_param("momentum_buffer", momentum_buffer, param)
    else:
        momentum_buffer = None  # not read nor written without momentum (as in the reference)
    check_frozen_arg(frozen, param)
    sgd_step_op(param, grad, momentum_buffer, frozen, float(lr), float(momentum), float(dampening),
                float(weight_decay), bool(nesterov), bool(first_step))
