"""HAT's training-time schedule of the mask's scale ``s`` and its clamp of the scores, for any masked layers.

HAT (Serra et al., 2018) anneals ``s`` linearly within an epoch, from ``1 / s_max`` at the first batch to
``s_max`` at the end, so that the gates start soft (every unit gets a gradient) and end nearly binary; it
compensates the scores' gradient for ``s`` (the ops' ``s_max`` argument) and clamps the scores to a small range
after every update: beyond ``|e| = 6`` the gate at ``s_max = 400`` is binary to float precision, and a score
that kept growing would take many steps to come back.
"""
from __future__ import annotations

import torch

from . import nn as dnn

__all__ = ["hat_scale", "clamp_scores_", "HAT_SCORE_LIMIT"]

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
