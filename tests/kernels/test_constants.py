"""The constants of the mask math agree across the implementations that each keep one copy of them:
Python (the reference backend), C++/CUDA (csrc/mask_math.h, read back from the compiled extension, so the
value checked is the one the kernels were built with) and Triton (triton_kernels/_common.py).
"""
from __future__ import annotations

import inspect

import pytest

try:  # the reference backend is moving into dgm_kernels.backends
    from dgm_kernels.backends.reference import HAT_CLAMP
except ImportError:
    from dgm_kernels.reference import HAT_CLAMP

TINY = 1e-30  # the no-subnormal threshold of csrc/dgm_kernels.h; Python has no named copy outside Triton


def _compiled():
    try:
        from dgm_kernels import _C
    except ImportError as exc:
        pytest.skip(f"dgm_kernels._C is not built ({exc})")
    return _C


def _triton_common():
    pytest.importorskip("triton")
    from dgm_kernels.backends.triton_kernels import _common

    return _common


def _value(c):
    return getattr(c, "value", c)  # Triton constants are tl.constexpr wrappers


def test_hat_clamp_is_a_positive_float():
    assert isinstance(HAT_CLAMP, float) and HAT_CLAMP > 0


def test_compiled_hat_clamp_matches_python():
    assert _compiled().HAT_CLAMP == HAT_CLAMP


def test_compiled_tiny_matches_triton():
    _C = _compiled()
    assert _C.TINY == TINY
    assert _value(_triton_common().TINY) == _C.TINY


def test_triton_hat_clamp_matches_python():
    assert _value(_triton_common().HAT_CLAMP) == HAT_CLAMP


def test_triton_kernel_reads_the_named_clamp():
    # a literal in the kernel would make the named constant above a dead copy that could drift unseen
    common = _triton_common()
    fn = getattr(common.mask_slope, "fn", common.mask_slope)
    source = inspect.getsource(fn)
    assert "HAT_CLAMP" in source
    assert repr(HAT_CLAMP) not in source and f"{HAT_CLAMP:g}" not in source.replace("HAT_CLAMP", "")
