"""Test setup shared by every test module (shared helpers live in ``tests/helpers.py`` and
``tests/invariants.py``, imported by name: a conftest is not a module to import from).

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


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    for name, why in dgm_kernels.backend_status().items():
        lines.append(f"dgm_kernels backend {name}: {'available' if why is None else why}")
    return lines
