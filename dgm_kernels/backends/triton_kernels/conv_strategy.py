"""Which implementation a fused convolution of the triton backend runs, per call.

- ``"fused"``: the implicit-GEMM Triton kernel of :mod:`.conv` applies the mask while it loads W (DGMw) or
  the gate in its epilogue (DGMa);
- ``"unfused"``: one small Triton kernel materialises the effective weight, then ATen's convolution (cuDNN
  on a GPU) does the rest.

:func:`set_conv_strategy` picks ``"fused"``, ``"unfused"`` or ``"auto"`` (default). ``auto`` on a GPU times
both implementations once per shape key (shapes, strides, dtype, geometry, direction) with CUDA events and
caches the faster, as torch inductor's autotuner does; in Triton's interpreter (tests) it takes the fused
kernel for small tensors so that it is what the tests exercise. The state is process-wide: the custom ops
read it inside their implementation, so a compiled graph never bakes a choice in.
"""
from __future__ import annotations

import statistics
import threading
import warnings
from typing import Callable

import torch
from torch import Tensor

from . import conv as conv_kernels
from ._common import INTERPRETED

CONV_STRATEGIES = ("auto", "fused", "unfused")
#: in the interpreter, "auto" takes the fused kernel up to this many output (or weight) elements
INTERPRETER_FUSED_LIMIT = 1 << 16

_strategy = "auto"
_choices: dict[tuple, str] = {}
_choices_lock = threading.Lock()  # the ops, hence choose(), may run from several threads at once


def set_conv_strategy(strategy: str) -> None:
    """How the triton backend runs convolutions: ``"fused"`` (mask applied on load in a Triton
    implicit-GEMM kernel), ``"unfused"`` (Triton elementwise kernel + ATen/cuDNN convolution) or
    ``"auto"`` (the faster per shape, timed once on a GPU and cached). float64 always runs unfused."""
    global _strategy
    if strategy not in CONV_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, CONV_STRATEGIES))}, got {strategy!r}")
    _strategy = strategy


def get_conv_strategy() -> str:
    return _strategy


def conv_choices() -> dict[tuple, str]:
    """The choices ``auto`` made so far: shape key -> ``"fused"`` or ``"unfused"`` (for benchmarks/reports)."""
    with _choices_lock:
        return dict(_choices)


def clear_conv_choices() -> None:
    with _choices_lock:
        _choices.clear()


def conv_key(direction: str, kind: str, x: Tensor, weight: Tensor, transposed: bool, stride, padding,
             dilation, groups, output_padding) -> tuple:
    """What the timing of ``auto`` depends on; one cached choice per key."""
    return (direction, kind, transposed, tuple(x.shape), tuple(x.stride()), tuple(weight.shape), x.dtype,
            str(x.device), tuple(stride), tuple(padding), tuple(dilation), groups, tuple(output_padding))


def _time_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median GPU time of ``fn`` in milliseconds, after one warm-up call (which also compiles kernels)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fusable(x: Tensor, weight: Tensor, out_numel: int, geometry: dict) -> bool:
    """Whether the fused kernel can take the call at all (dtype, int32 offsets, grid limits, bfloat16 dot)."""
    if x.dtype == torch.float64:  # tl.dot has no float64 path worth using; ATen handles it
        return False
    if x.dtype == torch.bfloat16 and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 8:
        return False  # tl.dot on bfloat16 operands needs sm_80 or newer
    return conv_kernels.unlaunchable_reason(x, weight, out_numel, **geometry) is None


def choose(key: tuple, x: Tensor, weight: Tensor, out_numel: int,
           fused: Callable[[], object], unfused: Callable[[], object], geometry: dict) -> str:
    """``"fused"`` or ``"unfused"`` for this call; ``fused`` / ``unfused`` compute the result, and ``auto``
    on a GPU times them (their results are thrown away) the first time it meets ``key``. ``geometry``: the
    keyword arguments of :func:`conv.unlaunchable_reason` (scatter, stride, padding, dilation, groups)."""
    if not fusable(x, weight, out_numel, geometry):
        return "unfused"
    if _strategy != "auto":
        return _strategy
    if INTERPRETED or x.device.type != "cuda":
        small = max(out_numel, weight.numel()) <= INTERPRETER_FUSED_LIMIT
        return "fused" if small else "unfused"
    with _choices_lock:
        cached = _choices.get(key)
    if cached is not None:
        return cached
    if torch.cuda.is_current_stream_capturing():
        return "unfused"  # no timing (nor Triton compilation) inside a CUDA graph capture; not cached
    with torch.cuda.device(x.device):
        try:
            fused_ms = _time_ms(fused)
        except Exception as exc:  # e.g. a Triton compilation failure on an untested GPU: "auto" must not fail
            warnings.warn(f"dgm_kernels triton backend: the fused convolution failed for {key} and is not used "
                          f"for it ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
            fused_ms = float("inf")
        choice = "fused" if fused_ms <= _time_ms(unfused) else "unfused"
    with _choices_lock:
        _choices[key] = choice
    return choice
