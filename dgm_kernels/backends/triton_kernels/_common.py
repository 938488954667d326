"""What every Triton kernel family shares: the mask math as device functions, and launch helpers.

The math is the one of :func:`dgm_kernels.reference.mask_derivative` (SPEC section 3):

- ``sigmoid'(x)`` is computed as ``sigmoid(x) * sigmoid(-x) = z / (1 + z)**2`` with ``z = exp(-|x|)``,
  never as ``sigmoid(x) * (1 - sigmoid(x))``, which cancels to 0 once ``|x|`` passes ~17 in float32;
- HAT compensation: ``s_max * sigmoid'(e) * exp(c - a) * ((1 + exp(-c)) / (1 + exp(-a)))**2`` with
  ``a = |s e|`` and ``c = min(a, 50)``; no term can overflow;
- outputs whose magnitude falls below 1e-30 are stored as exact zeros: subnormal floats cost ~100x on CPUs
  (and this library promises never to produce them).

Kernels compute in float32 (float64 for float64 tensors) whatever the storage dtype, so float16 and
bfloat16 tensors get float32 accuracy up to the final rounding.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

#: |s e| beyond which HAT's compensation stops growing (``reference.HAT_CLAMP``). A ``tl.constexpr`` because
#: the kernels read it (compiled Triton refuses any other global), so that this is the only copy in the Triton
#: code; tests/test_constants.py compares it with the Python and C++ values.
HAT_CLAMP = tl.constexpr(50.0)
#: magnitudes below this are stored as 0 (no subnormal output)
TINY = 1e-30

MODE_ANNEAL = 0
MODE_STE = 1


@triton.jit
def _probe():  # pragma: no cover - only its type matters
    pass


#: True when the kernels of this process were defined by Triton's interpreter (TRITON_INTERPRET=1 was set
#: when they were imported): they then run on CPU tensors, through numpy, and on no GPU compiler.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------
# device functions
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def flush_tiny(v):
    """``v`` with magnitudes below 1e-30 replaced by exact zeros (no subnormal output)."""
    return tl.where(tl.abs(v) < 1e-30, 0.0, v)


@triton.jit
def sigmoid_and_slope(x):
    """``(sigmoid(x), sigmoid(x) * sigmoid(-x))``, both free of cancellation and overflow."""
    z = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + z)
    sig = tl.where(x >= 0, inv, z * inv)
    return sig, z * inv * inv


@triton.jit
def mask_value(e, s, MODE: tl.constexpr):
    """m(e): ``sigmoid(s e)`` (anneal) or ``1[e >= 0]`` (ste), in e's (compute) dtype."""
    if MODE == 1:
        m = tl.where(e >= 0, 1.0, 0.0).to(e.dtype)
    else:
        sig, _unused = sigmoid_and_slope(e * s)
        m = flush_tiny(sig)
    return m


@triton.jit
def mask_slope(e, s, s_max, COMPENSATE: tl.constexpr):
    """dm/de: ``s * sigmoid'(s e)``, or HAT-compensated ``s_max * sigmoid'(e) * r(|s e|)``."""
    x = e * s
    if COMPENSATE:
        a = tl.abs(x)
        c = tl.minimum(a, HAT_CLAMP)
        r = (1.0 + tl.exp(-c)) / (1.0 + tl.exp(-a))
        _sig, slope = sigmoid_and_slope(e)
        d = s_max * slope * (tl.exp(c - a) * r * r)
    else:
        _sig, slope = sigmoid_and_slope(x)
        d = s * slope
    return flush_tiny(d)


@triton.jit
def frozen_at(ptr, offs, ok, PACKED: tl.constexpr):
    """Whether entries ``offs`` (flat row-major indices) are frozen; False where ``ok`` is False.

    ``PACKED``: ``ptr`` holds the packed bits of dgm_kernels.bits (entry i is bit i % 8, least significant
    first, of byte i // 8), read in the kernel so that no dense copy is ever made; otherwise one byte per
    entry (a bool tensor viewed as uint8).
    """
    if PACKED:
        byte = tl.load(ptr + (offs >> 3), mask=ok, other=0).to(tl.int32)
        flag = (byte >> (offs & 7).to(tl.int32)) & 1
    else:
        flag = tl.load(ptr + offs, mask=ok, other=0).to(tl.int32)
    return flag != 0


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """A Python float passed as two float32 halves, rebuilt in the compute dtype.

    Triton passes Python floats as float32; for float64 tensors the second half restores the ~48 bits of
    precision a float32 scalar would lose (s = 1e-4, say, is not a float32 number).
    """
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


# ----------------------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------------------
def split_scalar(value: float | None) -> tuple[float, float]:
    """(hi, lo) float32 halves of ``value`` (0, 0 for None); ``hi + lo`` is ``value`` to ~1e-14."""
    if value is None:
        return 0.0, 0.0
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype kernels compute in for tensors of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` when the kernels cannot run on ``tensor``'s dtype and device."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16 for the triton backend, got {tensor.dtype}"
        )
    if tensor.device.type == "cpu" and tensor.dtype not in (torch.float32, torch.float64):
        # numpy, which runs the interpreter, has no bfloat16 and emulates float16 poorly
        raise TypeError(
            f"{name}: the triton backend runs CPU tensors only in Triton's interpreter, which supports float32 "
            f"and float64; got {tensor.dtype} (use a CUDA GPU, or another backend, for half precision)"
        )


def bool_bytes(flags: torch.Tensor | None) -> torch.Tensor | None:
    """A bool tensor as contiguous uint8 (same bytes, no copy when already contiguous)."""
    if flags is None:
        return None
    return flags.contiguous().view(torch.uint8)


def frozen_operand(name: str, frozen: torch.Tensor | None, numel: int) -> tuple[torch.Tensor | None, bool]:
    """(the bytes a kernel reads for ``frozen``, whether they are packed bits) for a mask of ``numel`` entries.

    ``frozen`` is None, a bool tensor of ``numel`` entries (read in row-major order: made contiguous) or
    its packed bits (uint8, ``ceil(numel / 8)`` bytes, see dgm_kernels.bits).
    """
    if frozen is None:
        return None, False
    if frozen.dtype == torch.uint8:
        if frozen.dim() != 1 or frozen.numel() != (numel + 7) // 8:
            raise ValueError(
                f"{name} (packed bits of a mask of {numel} entries) must be a 1-D uint8 tensor of "
                f"{(numel + 7) // 8} bytes, got shape {tuple(frozen.shape)}"
            )
        return frozen.contiguous(), True
    if frozen.dtype == torch.bool:
        if frozen.numel() != numel:
            raise ValueError(f"{name} must have {numel} entries (one per weight), got shape {tuple(frozen.shape)}")
        return frozen.contiguous().view(torch.uint8), False
    raise TypeError(f"{name} must be a bool tensor or packed bits (uint8), got {frozen.dtype}")


def elementwise_block(n: int) -> int:
    """Elements per program for 1-D kernels.

    On a GPU, 1024 (4 warps x 8 elements per thread). The interpreter pays per program and per operation,
    not per element, so it gets one program for all but large tensors.
    """
    if INTERPRETED:
        return max(16, min(triton.next_power_of_2(max(n, 1)), 1 << 16))
    return 1024


def device_programs(device: torch.device) -> int:
    """About how many programs keep ``device`` busy (4 per SM on a GPU; few in the interpreter)."""
    if INTERPRETED or device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8
