"""Helpers shared by the test modules: the (backend, device) rows of the registry-driven tests, and the masked
optimizers the ledger tests train with."""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.backends import unavailable_reason

#: (backend, device) pairs that the parity suite compares with the reference backend.
BACKEND_DEVICES = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda"), ("reference", "cuda")]


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (none is visible on this machine)"
    return unavailable_reason(backend, torch.device(device))


def backend_params(pairs=BACKEND_DEVICES):
    """pytest params over (backend, device); those that cannot run here are skipped with the reason."""
    params = []
    for backend, device in pairs:
        why = _skip_reason(backend, device)
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {why}")] if why else []
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def masked_optimizer(name: str, params, backend, *, sgd_lr: float = 0.05, adam_lr: float = 0.01):
    """A masked optimizer by name: ``sgd-momentum`` (with L2 decay), ``adam`` or ``adamw`` (decay 0.1)."""
    if name == "sgd-momentum":
        return dk.optim.MaskedSGD(params, lr=sgd_lr, momentum=0.9, weight_decay=1e-3, backend=backend)
    if name == "adam":
        return dk.optim.MaskedAdam(params, lr=adam_lr, betas=(0.5, 0.999), backend=backend)
    if name == "adamw":
        return dk.optim.MaskedAdamW(params, lr=adam_lr, weight_decay=0.1, backend=backend)
    raise ValueError(f"optimizer name must be 'sgd-momentum', 'adam' or 'adamw', got {name!r}")


#: `dgm train` arguments of a two-task run on the synthetic data set in a few seconds
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--epochs", "1", "--num-tasks", "2", "--max-train-per-class", "32",
                   "--threads", "1", "--backend", "reference", "--set", "batch_size=16",
                   "--set", "critic_widths=[4,8,8]", "--set", "classifier_widths=[4,8,8]",
                   "--set", "classifier_epochs=1", "--set", "max_test_per_class=16", "--set", "samples_per_class=2"]
