"""HAT's training-time schedule of the mask's scale ``s`` and its clamp of the scores, for any masked layers.

HAT (Serra et al., 2018) anneals ``s`` linearly within an epoch, from ``1 / s_max`` at the first batch to
``s_max`` at the end, so that the gates start soft (every unit gets a gradient) and end nearly binary; it
compensates the scores' gradient for ``s`` (the ops' ``s_max`` argument) and clamps the scores to a small range
after every update: beyond ``|e| = 6`` the gate at ``s_max = 400`` is binary to float precision, and a score
that kept growing would take many steps to come back.

:func:`soft_block_gradients_` is HAT's own protection of old tasks, for reproducing its numbers: the gradients of
a gated layer scaled by ``1 - min(M_out, M_in)`` with M the soft cumulative mask (max over finished tasks of
``sigmoid(s_max e_t)``). The library's default protection is binary (``MaskLedger`` freezes what a task's mask
``1[e >= 0]`` reserved, and the masked optimizers leave it bit-identical); the soft one leaves a small gradient
on units whose soft mask is not 1 in float, so old tasks are then protected only approximately, as in HAT.
"""
from __future__ import annotations

import torch

from . import nn as dnn

__all__ = ["hat_scale", "clamp_scores_", "soft_block_gradients_", "HAT_SCORE_LIMIT"]

#: HAT's bound on the scores (its embeddings): sigmoid(400 * 6) is 1 in any float type
HAT_SCORE_LIMIT = 6.0


def _count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def hat_scale(batch: int, batches: int, s_max: float) -> float:
    """s at batch ``batch`` of ``batches``: ``(s_max - 1/s_max) * batch / batches + 1/s_max``.

    ``batch`` runs over ``0 .. batches`` (``batches`` itself gives ``s_max``, the end of the annealing). A
    schedule over several epochs passes the batch counted from the first epoch and the total number of batches.
    """
    batches = _count("batches", batches, 1)
    batch = _count("batch", batch, 0)
    if batch > batches:
        raise ValueError(f"batch must be <= batches ({batches}), got {batch}")
    if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or not s_max > 0 or s_max == float("inf"):
        raise ValueError(f"s_max must be a finite number > 0, got {s_max!r}")
    # the fraction first, then one multiply-add: dgm.plasticity's schedules rely on this exact order
    return (s_max - 1.0 / s_max) * (batch / batches) + 1.0 / s_max


def _layers(layers):
    if isinstance(layers, torch.nn.Module):
        if isinstance(layers, dnn.MaskedLayer):
            return [layers]
        return [m for m in layers.modules() if isinstance(m, dnn.MaskedLayer)]
    found = []
    for item in layers:
        layer = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if not isinstance(layer, dnn.MaskedLayer):
            raise TypeError(f"layers must hold dgm_kernels.nn masked layers (or (name, layer) pairs), got "
                            f"{type(layer).__name__}")
        found.append(layer)
    return found


def clamp_scores_(layers, limit: float = HAT_SCORE_LIMIT) -> None:
    """Clamp every layer's scores to ``[-limit, limit]`` in place (HAT, after each optimizer step).

    ``layers``: a module (every :mod:`dgm_kernels.nn` layer inside it), or an iterable of layers or of
    ``(name, layer)`` pairs (``MaskLedger``'s order). Only the scores change: the clamp is not recorded by
    autograd and leaves any optimizer state alone.
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"limit must be a number > 0, got {limit!r}")
    chosen = _layers(layers)
    with torch.no_grad():
        for layer in chosen:
            layer.scores.clamp_(-limit, limit)


def _unit_vector(name, value, layer, length=None):
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dim() != 1:
        got = f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a 1-d floating tensor (a soft mask in [0, 1]), got {got}")
    if value.device != layer.weight.device:
        raise ValueError(f"{name} must be on device {layer.weight.device}, got {value.device}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per output unit), got {value.shape[0]}")
    return value.to(layer.weight.dtype)


def soft_block_gradients_(layer, out_mask: torch.Tensor, in_mask: torch.Tensor | None = None) -> None:
    """HAT's gradient blocking, in place, after ``backward()``: the weight's gradient times ``1 - min(M_out, M_in)``
    per (output unit, input unit), the bias's times ``1 - M_out``.

    ``layer``: a gated layer (``GatedLinear``, ``GatedConv2d``, ``GatedConvTranspose2d``; groups 1). ``out_mask``:
    its soft cumulative mask, one value in [0, 1] per output unit. ``in_mask``: the previous layer's (None for a
    first layer, whose input is not gated: ``1 - M_out`` alone); after a flatten of ``[C, H, W]`` it has C entries
    and input feature i takes channel ``i // (H W)``, as in :class:`dgm_kernels.MaskLedger`. Parameters without a
    gradient are left alone.
    """
    if not isinstance(layer, dnn.MaskedLayer) or layer.mask_kind != dnn.UNIT:
        raise TypeError(f"layer must be a gated dgm_kernels.nn layer (GatedLinear, GatedConv2d, GatedConvTranspose2d), "
                        f"got {type(layer).__name__}")
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(f"layer must have groups=1 (the soft blocking is written for dense layers), got {layer.groups}")
    post = _unit_vector("out_mask", out_mask, layer, layer.out_width)
    w = layer.weight
    extra = (1,) * (w.dim() - 2)  # the kernel taps of a convolution's weight
    out_dim = layer.out_dim
    post_view = post.view((-1, 1) + extra) if out_dim == 0 else post.view((1, -1) + extra)
    if in_mask is None:
        block = post_view
    else:
        pre = _unit_vector("in_mask", in_mask, layer)
        if layer.in_width % pre.shape[0]:
            raise ValueError(f"in_mask must have {layer.in_width} entries (one per input unit) or a divisor of it (the "
                             f"channels of a flattened [C, H, W] input), got {pre.shape[0]}")
        pre = pre.repeat_interleave(layer.in_width // pre.shape[0])
        pre_view = pre.view((1, -1) + extra) if out_dim == 0 else pre.view((-1, 1) + extra)
        block = torch.minimum(post_view, pre_view)
    with torch.no_grad():
        if w.grad is not None:
            w.grad.mul_(1 - block)
        if layer.bias is not None and layer.bias.grad is not None:
            layer.bias.grad.mul_(1 - post)
