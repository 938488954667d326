"""Masked optimizers: Adam, AdamW and SGD whose update leaves every frozen entry bit-identical.

Zeroed gradients are not enough to protect old tasks: momentum, Adam's moments and weight decay still
move a weight whose gradient is 0. These optimizers skip frozen entries inside the update itself (one
fused kernel per parameter on the compiled and Triton backends). Frozen state is given per parameter as a
bool tensor of its shape or as packed bits (dgm_kernels.bits), usually by ``MaskLedger.attach(optimizer)``.
It is not part of the optimizer's state_dict: the ledger owns it.
"""
from __future__ import annotations

import torch

from . import _checks
from .backends import resolve
from .bits import check_packed
from .functional import pack_bits


class _MaskedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults, backend):
        super().__init__(params, defaults)
        self.backend = backend
        self._frozen: dict[int, torch.Tensor] = {}

    def _owns(self, param) -> bool:
        return any(p is param for g in self.param_groups for p in g["params"])

    def set_frozen(self, param: torch.Tensor, frozen: torch.Tensor | None) -> None:
        """Freeze the entries of ``param`` where ``frozen`` is True (None: nothing frozen)."""
        if not self._owns(param):
            raise ValueError("param must be one of this optimizer's parameters")
        if frozen is None:
            self._frozen.pop(id(param), None)
            return
        if frozen.dtype == torch.uint8:
            check_packed("frozen", frozen, param.shape, param.device)
            bits = frozen
        else:
            _checks.tensor("frozen", frozen, dtype=torch.bool, device=param.device, shape=param.shape)
            bits = pack_bits(frozen, backend=self.backend)
        self._frozen[id(param)] = bits

    def frozen_of(self, param):
        return self._frozen.get(id(param))

    def forget(self, param) -> None:
        self._frozen.pop(id(param), None)

    def _kernel(self, param, name):
        """The backend's fused update (``adam_step_`` or ``sgd_step_`` of the backend contract)."""
        return getattr(resolve(self.backend, param.device), name)


class MaskedAdam(_MaskedOptimizer):
    """Adam (``decoupled=True``: AdamW) that never changes a frozen entry."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, decoupled=False, backend=None):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=decoupled), backend)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                self._kernel(p, "adam_step_")(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], self.frozen_of(p), group["lr"], beta1, beta2,
                    group["eps"], group["weight_decay"], state["step"], group["decoupled"],
                )
        return loss


class MaskedAdamW(MaskedAdam):
    """AdamW (decoupled weight decay) that never changes a frozen entry."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True, backend=backend)


class MaskedSGD(_MaskedOptimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay that never changes a frozen entry."""

    def __init__(self, params, lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *, backend=None):
        if not lr > 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0, momentum and weight_decay >= 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov), backend)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                first = "momentum_buffer" not in state
                if first and group["momentum"] != 0:
                    state["momentum_buffer"] = torch.zeros_like(p)
                self._kernel(p, "sgd_step_")(
                    p, p.grad, state.get("momentum_buffer"), self.frozen_of(p), group["lr"], group["momentum"],
                    group["dampening"], group["weight_decay"], group["nesterov"], first,
                )
        return loss
