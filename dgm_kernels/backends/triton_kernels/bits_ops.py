"""Custom ops of the mask ledger's bits: packing a bool mask, and reserved | task with the per-unit count
of newly reserved entries (one pass over the bits). The layout is the one of :mod:`dgm_kernels.bits`."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _checks
from ... import bits as bits_layout
from . import bits as bits_kernels
from .ops_common import NAMESPACE


@torch.library.custom_op(f"{NAMESPACE}::pack_bits", mutates_args=())
def pack_bits_op(mask: Tensor) -> Tensor:
    return bits_kernels.pack_bits(mask)


@pack_bits_op.register_fake
def _(mask):
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op(f"{NAMESPACE}::union_count", mutates_args=())
def union_count_op(
    reserved_bits: Tensor, task_bits: Tensor, outer: int, units: int, inner: int
) -> tuple[Tensor, Tensor]:
    return bits_kernels.union_count(reserved_bits, task_bits, outer, units, inner)


@union_count_op.register_fake
def _(reserved_bits, task_bits, outer, units, inner):
    return reserved_bits.new_empty(reserved_bits.shape), reserved_bits.new_empty((units,), dtype=torch.int64)


def check_count(name: str, value) -> int:
    # bool is an int subclass: True as a dimension is a caller's bug, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (argument checks, then the op)
# ----------------------------------------------------------------------------------------------------------
def pack_bits(mask):
    """The packed bits (dgm_kernels.bits layout) of a bool tensor of any shape and strides."""
    _checks.tensor("mask", mask, dtype=torch.bool)
    return pack_bits_op(mask)


def union_count(reserved_bits, task_bits, outer, units, inner):
    """(reserved | task as packed bits, int64 count per unit of the entries task adds), the mask viewed
    as ``[outer, units, inner]``."""
    outer, units, inner = (check_count(n, v) for n, v in (("outer", outer), ("units", units), ("inner", inner)))
    _checks.tensor("reserved_bits", reserved_bits)
    bits_layout.check_packed("reserved_bits", reserved_bits, (outer, units, inner), reserved_bits.device)
    bits_layout.check_packed("task_bits", task_bits, (outer, units, inner), reserved_bits.device)
    return union_count_op(reserved_bits, task_bits, outer, units, inner)
