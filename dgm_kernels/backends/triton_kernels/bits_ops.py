"""Custom ops of the mask ledger's bits: packing a bool mask, and reserved | task with the per-unit count
of newly reserved entries (one pass over the bits). The layout is the one of :mod:`dgm_kernels.bits`."""
from __future__ import annotations

import torch
from torch import Tensor

from . import bits as bits_kernels
from .ops_common import triton_op


@triton_op("pack_bits", mutates_args=())
def pack_bits_op(mask: Tensor) -> Tensor:
    return bits_kernels.pack_bits(mask)


@pack_bits_op.register_fake
def _(mask):
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


@triton_op("union_count", mutates_args=())
def union_count_op(
    reserved_bits: Tensor, task_bits: Tensor, outer: int, units: int, inner: int
) -> tuple[Tensor, Tensor]:
    return bits_kernels.union_count(reserved_bits, task_bits, outer, units, inner)


@union_count_op.register_fake
def _(reserved_bits, task_bits, outer, units, inner):
    return reserved_bits.new_empty(reserved_bits.shape), reserved_bits.new_empty((units,), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract (arguments validated by the caller: functional.pack_bits, the ledger)
# ----------------------------------------------------------------------------------------------------------
def pack_bits(mask):
    """The packed bits (dgm_kernels.bits layout) of a bool tensor of any shape and strides."""
    return pack_bits_op(mask)


def union_count(reserved_bits, task_bits, outer, units, inner):
    """(reserved | task as packed bits, int64 count per unit of the entries task adds), the mask viewed
    as ``[outer, units, inner]``."""
    return union_count_op(reserved_bits, task_bits, int(outer), int(units), int(inner))
