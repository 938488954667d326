"""The ``triton`` backend: every op a torch custom op (namespace ``dgm_triton``) running Triton kernels.

The ops live next to their kernels, one module per family in :mod:`.triton_kernels` (``mask_ops``,
``gate_ops``, ``sparsity_ops``, ``bits_ops``, ``optim_ops``, ``conv_ops``); importing this module imports
them all, which registers the ops. Each op has a fake kernel (shapes only, for ``torch.compile`` and
``torch.library.opcheck``) and an autograd formula whose backward is itself a custom op, so a compiled graph
holds the forward and the backward as opaque nodes and never traces into Triton launches or into the
convolution strategy choice (:mod:`.triton_kernels.conv_strategy`, re-exported here).

Frozen masks (``frozen``, ``frozen_out``, ``frozen_in``) reach the kernels as bool tensors or as the packed
bits of dgm_kernels.bits (the backend contract): the kernels test bit ``i % 8`` of byte ``i // 8`` in place.

This module holds only the backend object: availability, and the contract's methods mapped to the
families' entry points.
"""
from __future__ import annotations

import os

import torch

from .contract import Backend
from .triton_kernels import bits_ops, conv_ops, gate_ops, mask_ops, optim_ops, sparsity_ops
from .triton_kernels._common import INTERPRETED
from .triton_kernels.conv_strategy import (
    CONV_STRATEGIES,
    clear_conv_choices,
    conv_choices,
    get_conv_strategy,
    set_conv_strategy,
)
from .triton_kernels.ops_common import NAMESPACE

__all__ = ["TritonBackend", "set_conv_strategy", "get_conv_strategy", "conv_choices", "clear_conv_choices",
           "CONV_STRATEGIES", "NAMESPACE"]

_NO_GPU = (
    "Triton kernels need a CUDA GPU; none is visible (set TRITON_INTERPRET=1 to run them in the interpreter, "
    "for tests)"
)


def _interpret_set_too_late() -> str:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not INTERPRETED:
        return (" (TRITON_INTERPRET is set now, but was not when dgm_kernels' Triton kernels were defined: set it "
                "before importing the triton backend)")
    return ""


class TritonBackend(Backend):
    """Triton kernels on CUDA GPUs (and on the CPU through Triton's interpreter, for tests)."""

    name = "triton"

    def __init__(self) -> None:
        self._reasons: dict[str, str | None] = {}

    # -- availability ------------------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device | str | None = None) -> str | None:
        key = "any" if device is None else str(torch.device(device))
        if key not in self._reasons:  # a plain dict lookup afterwards: cheap, and traceable by dynamo
            self._reasons[key] = self._reason(None if device is None else torch.device(device))
        return self._reasons[key]

    @staticmethod
    def _reason(device: torch.device | None) -> str | None:
        if device is None:
            if INTERPRETED:
                return None
            return None if torch.cuda.is_available() else _NO_GPU + _interpret_set_too_late()
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return _NO_GPU
            if torch.version.hip is None:
                major, minor = torch.cuda.get_device_capability(device)
                if major < 7:
                    return f"Triton kernels need an NVIDIA GPU of compute capability >= 7.0, got {major}.{minor}"
            return None
        if device.type == "cpu":
            if INTERPRETED:
                return None
            return ("Triton kernels run on CUDA GPUs; CPU tensors run only in Triton's interpreter (set "
                    "TRITON_INTERPRET=1 before importing dgm_kernels' triton backend; it is meant for tests)"
                    + _interpret_set_too_late())
        return f"Triton kernels run on CUDA GPUs (and, in the interpreter, on the CPU), not on {device.type} tensors"

    # -- the contract: each method is one family's entry point (argument checks, then the custom op) -------
    # plain function attributes, not bound methods: the entry points take no backend state
    mask = staticmethod(mask_ops.mask)
    masked_weight = staticmethod(mask_ops.masked_weight)
    channel_gate = staticmethod(gate_ops.channel_gate)
    block_unit_grad = staticmethod(gate_ops.block_unit_grad)
    sparsity_terms = staticmethod(sparsity_ops.sparsity_terms)
    pack_bits = staticmethod(bits_ops.pack_bits)
    union_count = staticmethod(bits_ops.union_count)
    adam_step_ = staticmethod(optim_ops.adam_step_)
    sgd_step_ = staticmethod(optim_ops.sgd_step_)
    masked_conv = staticmethod(conv_ops.masked_conv)
    gated_conv = staticmethod(conv_ops.gated_conv)
