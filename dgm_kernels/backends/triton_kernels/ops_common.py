"""What every family's custom ops share: the op namespace and the handling of gradients nobody asked for.

Each ``<family>_ops`` module registers its ops under :data:`NAMESPACE` when it is imported, next to the
kernels it launches; the names (``dgm_triton::mask``, ``dgm_triton::masked_conv_backward``, ...) are part
of what a compiled graph or a saved trace refers to, so they must not change.
"""
from __future__ import annotations

from torch import Tensor

NAMESPACE = "dgm_triton"


def no_grad_placeholder(like: Tensor) -> Tensor:
    """What a backward op returns for a gradient nobody asked for: custom ops must return tensors, not None."""
    return like.new_empty((0,))


def or_placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    return no_grad_placeholder(like) if t is None else t


def or_none(t: Tensor, wanted: bool) -> Tensor | None:
    """Back from a placeholder to the None autograd expects for an input that needs no gradient."""
    return t if wanted else None
