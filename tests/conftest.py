"""Test setup shared by every test module.

Triton kernels run on the CPU through the interpreter when no GPU is visible: TRITON_INTERPRET must be set
before any Triton kernel is defined, i.e. before dgm_kernels' Triton modules are imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# parity is checked at float32 precision: no TF32 in cuDNN or matmuls on GPUs that have it
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import dgm_kernels  # noqa: E402
from dgm_kernels.backends import unavailable_reason  # noqa: E402

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


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, why in dgm_kernels.backend_status().items():
        lines.append(f"dgm_kernels backend {name}: {'available' if why is None else why}")
    return lines
