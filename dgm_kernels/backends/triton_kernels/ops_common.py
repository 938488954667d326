"""What every family's custom ops share: the op namespace and the handling of gradients nobody asked for.

Each ``<family>_ops`` module registers its ops under :data:`NAMESPACE` when it is imported, next to the
kernels it launches; the names (``dgm_triton::mask``, ``dgm_triton::masked_conv_backward``, ...) are part
of what a compiled graph or a saved trace refers to, so they must not change.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

NAMESPACE = "dgm_triton"
#: the ops registered through :func:`triton_op` (all of this backend's ops: a test checks it)
REGISTERED: set[str] = set()


def on_tensor_device(fn):
    """``fn`` run with the device of its first CUDA tensor argument made current.

    Triton launches on the current CUDA device and its current stream; tensors on ``cuda:1`` while device 0 is
    current would otherwise be read by a kernel on the wrong GPU. Making their device current also makes its
    current stream (the caller's, on that device) the one the kernel runs on.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, Tensor) and a.is_cuda), None)
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def triton_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op`` under :data:`NAMESPACE` whose CUDA kernel runs on its tensors' device."""

    def register(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        op.register_kernel("cuda")(on_tensor_device(fn))
        REGISTERED.add(name)
        return op

    return register


def no_grad_placeholder(like: Tensor) -> Tensor:
    """What a backward op returns for a gradient nobody asked for: custom ops must return tensors, not None."""
    return like.new_empty((0,))


def or_placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    return no_grad_placeholder(like) if t is None else t


def or_none(t: Tensor, wanted: bool) -> Tensor | None:
    """Back from a placeholder to the None autograd expects for an input that needs no gradient."""
    return t if wanted else None
