"""Plasticity of DGM's generator (SPEC section 3): the schedules of s, HAT's compensation, the sparsity regulariser.

The scale s of m = sigmoid(s e) is annealed during each task so that the mask ends nearly binary. Schedules
(``S`` is the final maximum, 1e4 for DGMw, 1e5 for DGMa; ``i`` the batch of ``B`` in epoch ``ep`` of ``E``):

==========  ===================================================================================================
``hat``     HAT: s = (S - 1/S) i / B + 1/S, restarting every epoch (``dgm_kernels.hat_scale``).
``dgmw``    the DGMw code: the epoch maximum grows, s_max(ep) = (S - 1/S) ep / E + 1/S, and within the epoch HAT's
            rule runs up to it: s = (s_max(ep) - 1/s_max(ep)) i / B + 1/s_max(ep). As in the code, epoch 0 has
            s_max(0) = 1/S < 1, so s then runs *down* from S to 1/S (the scores start at 0, where the mask is 0.5
            whatever s is), and the last epoch stops at S (E-1)/E.
``dgma``    the DGMa code: s = s_max(ep), constant within the epoch.
``task``    HAT's rule over the whole task (all epochs as one): s = (S - 1/S) j / J + 1/S for iteration j of J;
            for short runs with few epochs, where an epoch-level schedule leaves s small for a large share of
            the training.
==========  ===================================================================================================

HAT's gradient compensation divides out the s-dependence of the scores' gradient: the ops of dgm_kernels apply it
when given ``s_max`` (``grad_e = grad_m * s_max * sigmoid'(e)`` wherever ``|s e| <= 50``). The ``s_max`` used for
the compensation is the maximum of the current epoch (``dgmw``, ``dgma``) or ``S`` (``hat``, ``task``): the scale
the current annealing is heading to. With Adam the overall scale of the gradient barely matters; what matters is
that every score, decided or not, keeps a gradient (SPEC section 3).

Sparsity regulariser (SPEC section 3): ``R = sum m (1 - M) / sum (1 - M)`` over all masked layers, weighted by
``lambda_eff = lambda * current_size / initial_size``; the size is the number of mask entries of the generator
(weights for DGMw, channels for DGMa), so the weight grows with the network.
"""
from __future__ import annotations

import math

import torch

import dgm_kernels as dk

__all__ = ["SCHEDULES", "scale_at", "sparsity_weight", "sparsity_loss"]

SCHEDULES = ("hat", "dgmw", "dgma", "task")


def scale_at(schedule: str, S: float, epoch: int, epochs: int, batch: int, batches: int) -> tuple[float, float]:
    """(s, s_max for the compensation) at batch ``batch`` of ``batches`` in epoch ``epoch`` of ``epochs``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"s schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not S > 0:
        raise ValueError(f"S (s_max) must be > 0, got {S!r}")
    if not (0 <= epoch < epochs and 0 <= batch < batches):
        raise ValueError(f"need 0 <= epoch < epochs and 0 <= batch < batches, got epoch={epoch}/{epochs}, "
                         f"batch={batch}/{batches}")
    # every schedule is HAT's linear rule (dgm_kernels.hat_scale) over some span: the epoch, the task, or, for
    # the epoch maximum of dgmw / dgma, the epochs
    if schedule == "hat":
        return dk.hat_scale(batch, batches, S), S
    if schedule == "task":
        return dk.hat_scale(epoch * batches + batch, epochs * batches, S), S
    top = dk.hat_scale(epoch, epochs, S)
    if schedule == "dgma":
        return top, top
    return dk.hat_scale(batch, batches, top), top


def sparsity_weight(lam: float, current_size: int, initial_size: int) -> float:
    """lambda_eff = lambda * current size / initial size (SPEC section 3)."""
    if initial_size <= 0:
        raise ValueError(f"initial_size must be > 0, got {initial_size}")
    return float(lam) * current_size / initial_size


def sparsity_loss(generator, reserved: list[torch.Tensor] | None) -> torch.Tensor:
    """R over the generator's masked layers, with the masks the layers apply now (differentiable in the scores).

    ``reserved``: the cumulative binary masks of earlier tasks (``MaskLedger.reserved_mask`` per layer), or None
    for the first task.
    """
    layers = [layer for _, layer in generator.masked_layers()]
    return dk.sparsity_regularizer(generator.current_masks(), reserved, backend=layers[0].backend)


def float_scores_bytes(ledger) -> int:
    """What DGM's original code keeps for the same tasks: one float32 score per mask entry per task (the ledger
    keeps one bit; ``dgm info`` and the ledger's memory benchmark compare the two)."""
    return sum(4 * math.prod(shape) for name in ledger.names for shape in ledger.task_mask_shapes(name))
