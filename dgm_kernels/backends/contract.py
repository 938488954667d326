"""The backend contract: every op a backend implements, with its signature and meaning, stated once.

A backend is an object of a subclass of :class:`Backend`. The reference backend (``backends/reference.py``) is
its complete implementation in plain PyTorch and the spec of the others: a fast backend computes the same
function, forward and every gradient. Arguments arrive validated by :mod:`dgm_kernels.functional` (or by the
ledger and the optimizers), so a backend checks only what its own kernels cannot take (a dtype, a size).

Conventions: ``mode`` is the integer code of :mod:`dgm_kernels._modes`; ``s > 0``; ``s_max`` is None (no HAT
compensation) or > 0; a ``frozen``, ``frozen_out``, ``frozen_in`` or ``reserved`` argument is None, a bool
tensor, or (for the ``frozen*`` arguments) its packed bits in the layout of :mod:`dgm_kernels.bits`: every
backend reads packed bits, usually inside its kernels.
"""
from __future__ import annotations

import abc

import torch


class Backend(abc.ABC):
    """What every backend provides. Abstract methods are required; hooks default to "not for this call"."""

    #: the backend's name in the registry
    name: str = ""
    #: False where the kernels take no float64 (the parity tests then skip float64 gradcheck)
    supports_float64: bool = True
    #: True where mask / masked_weight / channel_gate also take s and s_max as 0-dim tensors under torch.compile
    #: (one compiled graph for every value of an annealed s; see backends/compiled.py, "tensor scales")
    tensor_scales: bool = False

    @abc.abstractmethod
    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        """None when the backend can run on tensors of ``device`` (None: on some device of this machine), else a
        sentence saying why not."""

    # -- the masks ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def mask(self, scores, s, mode, s_max):
        """m(e): sigmoid(s e) (anneal) or 1[e >= 0] (ste); differentiable in scores through the stable derivative
        ``s sigmoid(s e) sigmoid(-s e)``, HAT-compensated when ``s_max`` is given."""

    @abc.abstractmethod
    def masked_weight(self, weight, scores, s, frozen, mode, s_max):
        """W * m(e) (DGMw), differentiable in weight (zero gradient where ``frozen``) and in scores."""

    @abc.abstractmethod
    def channel_gate(self, y_pre, scores, s, mode, s_max):
        """y_pre * m(e) per channel (dim 1) (DGMa), differentiable in both. ``y_pre`` and ``scores`` have one dtype
        (under autocast the functional layer promotes them first, as the reference's product would)."""

    @abc.abstractmethod
    def block_unit_grad(self, weight, frozen_out, frozen_in, transposed, groups):
        """The weight unchanged, whose gradient is zero where its output unit and its input unit are both frozen
        (``frozen_in`` None: where its output unit is)."""

    @abc.abstractmethod
    def sparsity_terms(self, mask, reserved):
        """(sum of ``mask`` over entries not ``reserved``, number of such entries): 0-dim tensors of
        ``terms_dtype(mask.dtype)`` (float32 for half masks, whose sums and counts overflow), differentiable in
        the first term."""

    # -- the ledger and the optimizers ----------------------------------------------------------------------
    @abc.abstractmethod
    def pack_bits(self, mask):
        """The packed bits (:mod:`dgm_kernels.bits`) of a bool tensor of any shape."""

    @abc.abstractmethod
    def union_count(self, reserved_bits, task_bits, outer, units, inner):
        """(packed ``reserved | task``, int64 count per unit of the entries ``task`` adds), the mask seen as
        ``[outer, units, inner]``."""

    @abc.abstractmethod
    def adam_step_(self, param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step,
                   decoupled):
        """One Adam (``decoupled``: AdamW) update in place; frozen entries and their moments stay bit-identical."""

    @abc.abstractmethod
    def sgd_step_(self, param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov,
                  first_step):
        """One SGD update (momentum, dampening, Nesterov, L2 decay) in place; frozen entries stay bit-identical."""

    # -- optional hooks: a better algorithm for some calls ---------------------------------------------------
    def masked_conv(self, x, weight, scores, s, frozen, bias, transposed, geo, mode, s_max):
        """A fused DGMw convolution, or NotImplemented: functional composes ``masked_weight`` and ``conv``."""
        return NotImplemented

    def gated_conv(self, x, weight, scores, s, frozen_out, frozen_in, bias, transposed, geo, mode, s_max):
        """A fused DGMa convolution, or NotImplemented: functional composes ``block_unit_grad``, ``conv`` and
        ``channel_gate``."""
        return NotImplemented

    def conv(self, x, weight, bias, transposed, geo, any_layout):
        """The convolution step of those compositions where the backend beats ATen for the call, or
        NotImplemented. ``any_layout``: the caller takes an output in any memory layout."""
        return NotImplemented


def required_ops() -> list[str]:
    """The names every backend must implement."""
    return sorted(Backend.__abstractmethods__)
