"""Argument validation shared by the public ops: every error names the argument, the expected and the actual."""
from __future__ import annotations

import math
import numbers

import torch

from ._modes import MODES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, ndim=None, dtype=None, floating: bool = False, device=None, shape=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on device {device}, got {value.device}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, got {value.dim()} (shape {tuple(value.shape)})"
            )
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def scale(name: str, value) -> float:
    """A strictly positive, finite scale given as a Python number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():
            # a tensor scale stays a tensor under torch.compile: the backends that take one (``tensor_scales``)
            # read its value when the op runs, so a new value is not a new graph (and .item() would break it)
            return value
        value = value.item()
    if torch.compiler.is_compiling():
        # under torch.compile a scale that changes between calls (an annealed s) is symbolic: its value is
        # checked in eager mode and by the compiled kernels' own checks, not here, so the graph does not break
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def optional_scale(name: str, value) -> float | None:
    return None if value is None else scale(name, value)


def mode(value) -> int:
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {value!r}")
    return MODES[value]


def pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    items = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}") from None
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def same_dtype(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if value.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {value.dtype}")
