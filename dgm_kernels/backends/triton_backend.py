"""The ``triton`` backend: every op a torch custom op (namespace ``dgm_triton``) running Triton kernels.

Each op has a fake kernel (shapes only, for ``torch.compile`` and ``torch.library.opcheck``) and an
autograd formula whose backward is itself a custom op, so a compiled graph holds the forward and the
backward as opaque nodes and never traces into Triton launches or into the strategy choice below.

Frozen masks (``frozen``, ``frozen_out``, ``frozen_in``) reach the kernels as bool tensors or as the packed
bits of dgm_kernels.bits (``reads_packed_bits``): the kernels test bit ``i % 8`` of byte ``i // 8`` in place.
The mask ledger's kernels are ops too: ``pack_bits``, ``union_count`` (reserved | task and the per-unit
count of newly reserved entries, one pass over the bits) and the in-place masked optimizer updates
``adam_step`` / ``sgd_step`` (declared as mutating their parameter and state; frozen entries never written).

Fused convolutions (``masked_conv`` / ``gated_conv``) have two implementations, chosen per call:

- ``"fused"``: the implicit-GEMM Triton kernel of ``triton_kernels/conv.py`` applies the mask while it
  loads W (DGMw) or the gate in its epilogue (DGMa); the data gradient runs through the same kernel
  family with the mask (or the gate, then indexed by the contraction) applied on load;
- ``"unfused"``: one small Triton kernel materialises the effective weight (W * m, or W * m[unit] and
  b * m), then ATen's convolution (cuDNN on a GPU) does the rest.

Both share the weight gradient: ATen's ``convolution_backward`` (weight part, and the per-unit sum of
grad_y for the bias) followed by one Triton pass that gives grad_W (blocked by ``frozen``, or by the
unit pattern 1 - min(M_out, M_in)), grad_e and grad_bias. For the gate, grad_e[c] = dm/de[c] * sum over
batch and space of grad_y * y_pre; since the convolution is linear in W this sum equals
sum(W * dconv/dW[grad_y]) + b * sum(grad_y) over unit c, so y_pre is neither stored nor re-read.

:func:`set_conv_strategy` picks ``"fused"``, ``"unfused"`` or ``"auto"`` (default). ``auto`` on a GPU
times both implementations once per shape key (shapes, strides, dtype, geometry, direction) with CUDA
events and caches the faster, as torch inductor's autotuner does; in Triton's interpreter (tests) it
takes the fused kernel for small tensors so that it is what the tests exercise.
"""
from __future__ import annotations

import os
import statistics
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _checks
from .. import bits as _bits_layout
from .contract import Backend
from .triton_kernels import _common
from .triton_kernels import bits as _bits
from .triton_kernels import conv as _conv
from .triton_kernels import gate as _gate
from .triton_kernels import mask as _mask
from .triton_kernels import optim as _optim
from .triton_kernels import sparsity as _sparsity

NAMESPACE = "dgm_triton"

__all__ = ["TritonBackend", "set_conv_strategy", "get_conv_strategy", "conv_choices", "clear_conv_choices"]


def _nothing(like: Tensor) -> Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for (custom ops return tensors)."""
    return like.new_empty((0,))


def _or_nothing(t: Tensor | None, like: Tensor) -> Tensor:
    return _nothing(like) if t is None else t


def _or_none(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


# ==========================================================================================================
# elementwise and reduction ops
# ==========================================================================================================
@torch.library.custom_op(f"{NAMESPACE}::mask", mutates_args=())
def _mask_op(scores: Tensor, s: float, mode: int, s_max: Optional[float]) -> Tensor:
    return _mask.mask_forward(scores, s, mode)


@_mask_op.register_fake
def _(scores, s, mode, s_max):
    return scores.new_empty(scores.shape)


@torch.library.custom_op(f"{NAMESPACE}::mask_backward", mutates_args=())
def _mask_backward_op(grad_m: Tensor, scores: Tensor, s: float, s_max: Optional[float]) -> Tensor:
    return _mask.mask_backward(grad_m, scores, s, s_max)


@_mask_backward_op.register_fake
def _(grad_m, scores, s, s_max):
    return scores.new_empty(scores.shape)


def _mask_setup(ctx, inputs, output):
    scores, s, _mode, s_max = inputs
    ctx.save_for_backward(scores)
    ctx.s, ctx.s_max = s, s_max


def _mask_grad(ctx, grad_m):
    (scores,) = ctx.saved_tensors
    return _mask_backward_op(grad_m, scores, ctx.s, ctx.s_max), None, None, None


_mask_op.register_autograd(_mask_grad, setup_context=_mask_setup)


@torch.library.custom_op(f"{NAMESPACE}::masked_weight", mutates_args=())
def _masked_weight_op(
    weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, mode: int, s_max: Optional[float]
) -> Tensor:
    # frozen and s_max do not change the value; they are inputs so that the autograd formula sees them
    return _mask.masked_weight_forward(weight, scores, s, mode)


@_masked_weight_op.register_fake
def _(weight, scores, frozen, s, mode, s_max):
    return weight.new_empty(weight.shape)


@torch.library.custom_op(f"{NAMESPACE}::masked_weight_backward", mutates_args=())
def _masked_weight_backward_op(
    grad: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, s_max: Optional[float],
    mode: int, need_weight: bool, need_scores: bool,
) -> tuple[Tensor, Tensor]:
    gw, ge = _mask.masked_weight_backward(grad, weight, scores, frozen, s, s_max, mode, need_weight, need_scores)
    return _or_nothing(gw, weight), _or_nothing(ge, weight)


@_masked_weight_backward_op.register_fake
def _(grad, weight, scores, frozen, s, s_max, mode, need_weight, need_scores):
    return (weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape if need_scores else (0,)))


def _masked_weight_setup(ctx, inputs, output):
    weight, scores, frozen, s, mode, s_max = inputs
    ctx.save_for_backward(weight, scores, frozen)
    ctx.s, ctx.mode, ctx.s_max = s, mode, s_max


def _masked_weight_grad(ctx, grad):
    weight, scores, frozen = ctx.saved_tensors
    need_w, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gw, ge = _masked_weight_backward_op(grad, weight, scores, frozen, ctx.s, ctx.s_max, ctx.mode, need_w, need_e)
    return _or_none(gw, need_w), _or_none(ge, need_e), None, None, None, None


_masked_weight_op.register_autograd(_masked_weight_grad, setup_context=_masked_weight_setup)


@torch.library.custom_op(f"{NAMESPACE}::channel_gate", mutates_args=())
def _channel_gate_op(y_pre: Tensor, scores: Tensor, s: float, mode: int, s_max: Optional[float]) -> Tensor:
    return _gate.gate_forward(y_pre, scores, s, mode)


@_channel_gate_op.register_fake
def _(y_pre, scores, s, mode, s_max):
    return y_pre.new_empty(y_pre.shape)


@torch.library.custom_op(f"{NAMESPACE}::channel_gate_backward", mutates_args=())
def _channel_gate_backward_op(
    grad_y: Tensor, y_pre: Tensor, scores: Tensor, s: float, s_max: Optional[float], mode: int,
    need_y: bool, need_scores: bool,
) -> tuple[Tensor, Tensor]:
    gy, ge = _gate.gate_backward(grad_y, y_pre, scores, s, s_max, mode, need_y, need_scores)
    return _or_nothing(gy, y_pre), _or_nothing(ge, y_pre)


@_channel_gate_backward_op.register_fake
def _(grad_y, y_pre, scores, s, s_max, mode, need_y, need_scores):
    return (y_pre.new_empty(y_pre.shape if need_y else (0,)),
            y_pre.new_empty(scores.shape if need_scores else (0,)))


def _channel_gate_setup(ctx, inputs, output):
    y_pre, scores, s, mode, s_max = inputs
    ctx.save_for_backward(y_pre, scores)
    ctx.s, ctx.mode, ctx.s_max = s, mode, s_max


def _channel_gate_grad(ctx, grad_y):
    y_pre, scores = ctx.saved_tensors
    need_y, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gy, ge = _channel_gate_backward_op(grad_y, y_pre, scores, ctx.s, ctx.s_max, ctx.mode, need_y, need_e)
    return _or_none(gy, need_y), _or_none(ge, need_e), None, None, None


_channel_gate_op.register_autograd(_channel_gate_grad, setup_context=_channel_gate_setup)


@torch.library.custom_op(f"{NAMESPACE}::block_unit_grad", mutates_args=())
def _block_unit_grad_op(
    weight: Tensor, frozen_out: Tensor, frozen_in: Optional[Tensor], transposed: bool, groups: int
) -> Tensor:
    # the identity; a custom op may not return an alias of its input, hence the copy (weights are small)
    return weight.clone(memory_format=torch.contiguous_format)


@_block_unit_grad_op.register_fake
def _(weight, frozen_out, frozen_in, transposed, groups):
    return weight.new_empty(weight.shape)


@torch.library.custom_op(f"{NAMESPACE}::block_unit_grad_backward", mutates_args=())
def _block_unit_grad_backward_op(
    grad: Tensor, weight: Tensor, frozen_out: Tensor, frozen_in: Optional[Tensor], transposed: bool, groups: int
) -> Tensor:
    gw, _, _ = _gate.unit_weight_grad(grad, weight, frozen_out, frozen_in, transposed, groups)
    return gw


@_block_unit_grad_backward_op.register_fake
def _(grad, weight, frozen_out, frozen_in, transposed, groups):
    return weight.new_empty(weight.shape)


def _block_unit_grad_setup(ctx, inputs, output):
    weight, frozen_out, frozen_in, transposed, groups = inputs
    # the weight is saved for its shape and dtype only (the kernel reads no value of it)
    ctx.save_for_backward(weight, frozen_out, frozen_in)
    ctx.transposed, ctx.groups = transposed, groups


def _block_unit_grad_grad(ctx, grad):
    weight, frozen_out, frozen_in = ctx.saved_tensors
    return _block_unit_grad_backward_op(grad, weight, frozen_out, frozen_in, ctx.transposed, ctx.groups), None, None, None, None


_block_unit_grad_op.register_autograd(_block_unit_grad_grad, setup_context=_block_unit_grad_setup)


@torch.library.custom_op(f"{NAMESPACE}::sparsity_terms", mutates_args=())
def _sparsity_terms_op(mask: Tensor, reserved: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _sparsity.sparsity_terms(mask, reserved)


@_sparsity_terms_op.register_fake
def _(mask, reserved):
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return mask.new_empty((), dtype=dtype), mask.new_empty((), dtype=dtype)


@torch.library.custom_op(f"{NAMESPACE}::sparsity_terms_backward", mutates_args=())
def _sparsity_terms_backward_op(grad_sum: Tensor, reserved: Optional[Tensor], mask: Tensor) -> Tensor:
    return _sparsity.sparsity_backward(grad_sum, reserved, mask)


@_sparsity_terms_backward_op.register_fake
def _(grad_sum, reserved, mask):
    return mask.new_empty(mask.shape)


def _sparsity_setup(ctx, inputs, output):
    mask, reserved = inputs
    ctx.save_for_backward(mask, reserved)
    ctx.mark_non_differentiable(output[1])


def _sparsity_grad(ctx, grad_sum, _grad_count):
    mask, reserved = ctx.saved_tensors
    return _sparsity_terms_backward_op(grad_sum, reserved, mask), None


_sparsity_terms_op.register_autograd(_sparsity_grad, setup_context=_sparsity_setup)


# ==========================================================================================================
# the mask ledger: bit packing, union + per-unit popcount, masked optimizer steps
# ==========================================================================================================
@torch.library.custom_op(f"{NAMESPACE}::pack_bits", mutates_args=())
def _pack_bits_op(mask: Tensor) -> Tensor:
    return _bits.pack_bits(mask)


@_pack_bits_op.register_fake
def _(mask):
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op(f"{NAMESPACE}::union_count", mutates_args=())
def _union_count_op(
    reserved_bits: Tensor, task_bits: Tensor, outer: int, units: int, inner: int
) -> tuple[Tensor, Tensor]:
    return _bits.union_count(reserved_bits, task_bits, outer, units, inner)


@_union_count_op.register_fake
def _(reserved_bits, task_bits, outer, units, inner):
    return reserved_bits.new_empty(reserved_bits.shape), reserved_bits.new_empty((units,), dtype=torch.int64)


# The updates are in place (optimizer steps): the ops declare what they write, so that functionalization
# (torch.compile) knows, and return nothing.
@torch.library.custom_op(f"{NAMESPACE}::adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def _adam_step_op(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, frozen: Optional[Tensor], lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, step: int, decoupled: bool,
) -> None:
    _optim.adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled)


@_adam_step_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sgd_step", mutates_args=("param", "momentum_buffer"))
def _sgd_step_op(
    param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], frozen: Optional[Tensor], lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, first_step: bool,
) -> None:
    _optim.sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov,
                     first_step)


@_sgd_step_op.register_fake
def _(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None


def _check_frozen_arg(frozen, param: Tensor) -> None:
    """``frozen``: None, a bool tensor of param's shape, or its packed bits on param's device."""
    if frozen is None:
        return
    _checks.tensor("frozen", frozen, device=param.device)
    if frozen.dtype == torch.uint8:
        _bits_layout.check_packed("frozen", frozen, param.shape, param.device)
    else:
        _checks.tensor("frozen", frozen, dtype=torch.bool, shape=param.shape)


def _check_like_param(name: str, t, param: Tensor) -> None:
    _checks.tensor(name, t, dtype=param.dtype, device=param.device, shape=param.shape)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


# ==========================================================================================================
# convolutions: strategy choice
# ==========================================================================================================
CONV_STRATEGIES = ("auto", "fused", "unfused")
_strategy = "auto"
_choices: dict[tuple, str] = {}
_choices_lock = threading.Lock()
#: in the interpreter, "auto" takes the fused kernel up to this many output (or weight) elements
_INTERPRETER_FUSED_LIMIT = 1 << 16


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


def _fusable(x: Tensor, weight: Tensor, out_numel: int) -> bool:
    if x.dtype == torch.float64:  # tl.dot has no float64 path worth using; ATen handles it
        return False
    return max(x.numel(), out_numel, weight.numel()) <= _conv.MAX_ELEMENTS


def _choose(key: tuple, x: Tensor, weight: Tensor, out_numel: int,
            fused: Callable[[], object], unfused: Callable[[], object]) -> str:
    if not _fusable(x, weight, out_numel):
        return "unfused"
    if _strategy != "auto":
        return _strategy
    if _common.INTERPRETED or x.device.type != "cuda":
        small = max(out_numel, weight.numel()) <= _INTERPRETER_FUSED_LIMIT
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


def _conv_key(direction: str, kind: str, x: Tensor, weight: Tensor, transposed: bool, stride, padding,
              dilation, groups, output_padding) -> tuple:
    return (direction, kind, transposed, tuple(x.shape), tuple(x.stride()), tuple(weight.shape), x.dtype,
            str(x.device), tuple(stride), tuple(padding), tuple(dilation), groups, tuple(output_padding))


def _out_hw(x: Tensor, weight: Tensor, transposed: bool, stride, padding, dilation, output_padding) -> tuple[int, int]:
    return tuple(
        _conv.output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i], transposed,
                          output_padding[i])
        for i in range(2)
    )


def _out_channels(weight: Tensor, transposed: bool, groups: int) -> int:
    return weight.shape[1] * groups if transposed else weight.shape[0]


def _aten_conv(x, weight, bias, transposed, stride, padding, dilation, groups, output_padding) -> Tensor:
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return y.contiguous()  # the op promises a contiguous output (cuDNN may answer channels-last)


def _aten_conv_backward(grad_y, x, weight, transposed, stride, padding, dilation, groups, output_padding,
                        need_x: bool, need_w: bool, need_bias_sum: bool):
    if not (need_x or need_w or need_bias_sum):
        return None, None, None
    out_c = _out_channels(weight, transposed, groups)
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, [out_c] if need_bias_sum else None, stride, padding, dilation, transposed,
        output_padding, groups, [need_x, need_w, need_bias_sum],
    )


def _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding) -> Tensor:
    oh, ow = _out_hw(x, weight, transposed, stride, padding, dilation, output_padding)
    return x.new_empty((x.shape[0], _out_channels(weight, transposed, groups), oh, ow))


def _conv_backward_fake(x, weight, scores, need_x, need_w, need_e, need_b, transposed, groups):
    out_c = _out_channels(weight, transposed, groups)
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty(scores.shape if need_e else (0,)), weight.new_empty((out_c,) if need_b else (0,)))


# ==========================================================================================================
# masked convolution (DGMw)
# ==========================================================================================================
@torch.library.custom_op(f"{NAMESPACE}::masked_conv", mutates_args=())
def _masked_conv_op(
    x: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], bias: Optional[Tensor], s: float,
    mode: int, s_max: Optional[float], transposed: bool, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, output_padding: list[int],
) -> Tensor:
    out_hw = _out_hw(x, weight, transposed, stride, padding, dilation, output_padding)

    def fused():
        return _conv.conv(x, weight, scatter=transposed, out_hw=out_hw, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, s=s, mode=mode, weight_scores=scores, bias=bias)

    def unfused():
        w_eff = _mask.masked_weight_forward(weight, scores, s, mode)
        return _aten_conv(x, w_eff, bias, transposed, stride, padding, dilation, groups, output_padding)

    out_numel = x.shape[0] * _out_channels(weight, transposed, groups) * out_hw[0] * out_hw[1]
    key = _conv_key("forward", "masked", x, weight, transposed, stride, padding, dilation, groups, output_padding)
    return (fused if _choose(key, x, weight, out_numel, fused, unfused) == "fused" else unfused)()


@_masked_conv_op.register_fake
def _(x, weight, scores, frozen, bias, s, mode, s_max, transposed, stride, padding, dilation, groups, output_padding):
    return _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding)


@torch.library.custom_op(f"{NAMESPACE}::masked_conv_backward", mutates_args=())
def _masked_conv_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, mode: int,
    s_max: Optional[float], transposed: bool, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, output_padding: list[int], need_x: bool, need_w: bool, need_e: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = (stride, padding, dilation, groups)

    def fused_x():
        # the data gradient of a convolution is the other kind of convolution with the same (masked) weight
        return _conv.conv(grad_y, weight, scatter=not transposed, out_hw=tuple(x.shape[2:]), stride=stride,
                          padding=padding, dilation=dilation, groups=groups, s=s, mode=mode, weight_scores=scores)

    def unfused_x():
        w_eff = _mask.masked_weight_forward(weight, scores, s, mode)
        return _aten_conv_backward(grad_y, x, w_eff, transposed, *geometry, output_padding, True, False, False)[0]

    fused = False
    if need_x:
        key = _conv_key("backward", "masked", grad_y, weight, transposed, *geometry, output_padding)
        fused = _choose(key, grad_y, weight, x.numel(), fused_x, unfused_x) == "fused"
    aten_x = need_x and not fused
    need_raw_w = need_w or need_e
    # the weight's value does not enter the weight gradient; with aten_x it must be the masked weight
    w_aten = _mask.masked_weight_forward(weight, scores, s, mode) if aten_x else weight
    gx, graw, gb = _aten_conv_backward(grad_y, x, w_aten, transposed, *geometry, output_padding,
                                       aten_x, need_raw_w, need_b)
    if fused:
        gx = fused_x()
    gw = ge = None
    if need_raw_w:
        gw, ge = _mask.masked_weight_backward(graw, weight, scores, frozen, s, s_max, mode, need_w, need_e)
    return (_or_nothing(gx.contiguous() if gx is not None else None, x), _or_nothing(gw, weight),
            _or_nothing(ge, weight), _or_nothing(gb, weight))


@_masked_conv_backward_op.register_fake
def _(grad_y, x, weight, scores, frozen, s, mode, s_max, transposed, stride, padding, dilation, groups,
      output_padding, need_x, need_w, need_e, need_b):
    return _conv_backward_fake(x, weight, scores, need_x, need_w, need_e, need_b, transposed, groups)


def _masked_conv_setup(ctx, inputs, output):
    x, weight, scores, frozen, bias, s, mode, s_max, transposed, stride, padding, dilation, groups, out_pad = inputs
    ctx.save_for_backward(x, weight, scores, frozen)
    ctx.args = (s, mode, s_max, transposed, stride, padding, dilation, groups, out_pad)
    ctx.has_bias = bias is not None


def _masked_conv_grad(ctx, grad_y):
    x, weight, scores, frozen = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = ctx.has_bias and need[4]
    gx, gw, ge, gb = _masked_conv_backward_op(grad_y, x, weight, scores, frozen, *ctx.args, need[0], need[1],
                                              need[2], need_b)
    return (_or_none(gx, need[0]), _or_none(gw, need[1]), _or_none(ge, need[2]), None, _or_none(gb, need_b)) + (None,) * 9


_masked_conv_op.register_autograd(_masked_conv_grad, setup_context=_masked_conv_setup)


# ==========================================================================================================
# channel-gated convolution (DGMa)
# ==========================================================================================================
@torch.library.custom_op(f"{NAMESPACE}::gated_conv", mutates_args=())
def _gated_conv_op(
    x: Tensor, weight: Tensor, scores: Tensor, frozen_out: Optional[Tensor], frozen_in: Optional[Tensor],
    bias: Optional[Tensor], s: float, mode: int, s_max: Optional[float], transposed: bool, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, output_padding: list[int],
) -> Tensor:
    out_hw = _out_hw(x, weight, transposed, stride, padding, dilation, output_padding)

    def fused():  # the gate (and the bias) in the kernel's epilogue
        return _conv.conv(x, weight, scatter=transposed, out_hw=out_hw, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, s=s, mode=mode, bias=bias, n_gate_scores=scores)

    def unfused():  # (conv(x, W) + b) * m = conv(x, W * m) + b * m per unit: gate the (small) weight instead
        w_eff, b_eff = _gate.gate_weight(weight, scores, bias, transposed, groups, s, mode)
        return _aten_conv(x, w_eff, b_eff, transposed, stride, padding, dilation, groups, output_padding)

    out_numel = x.shape[0] * _out_channels(weight, transposed, groups) * out_hw[0] * out_hw[1]
    key = _conv_key("forward", "gated", x, weight, transposed, stride, padding, dilation, groups, output_padding)
    return (fused if _choose(key, x, weight, out_numel, fused, unfused) == "fused" else unfused)()


@_gated_conv_op.register_fake
def _(x, weight, scores, frozen_out, frozen_in, bias, s, mode, s_max, transposed, stride, padding, dilation,
      groups, output_padding):
    return _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding)


@torch.library.custom_op(f"{NAMESPACE}::gated_conv_backward", mutates_args=())
def _gated_conv_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, frozen_out: Optional[Tensor],
    frozen_in: Optional[Tensor], bias: Optional[Tensor], s: float, mode: int, s_max: Optional[float],
    transposed: bool, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    output_padding: list[int], need_x: bool, need_w: bool, need_e: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = (stride, padding, dilation, groups)

    def fused_x():  # the gate of the original output units, which the data gradient contracts over
        return _conv.conv(grad_y, weight, scatter=not transposed, out_hw=tuple(x.shape[2:]), stride=stride,
                          padding=padding, dilation=dilation, groups=groups, s=s, mode=mode, k_gate_scores=scores)

    def gated_weight():
        return _gate.gate_weight(weight, scores, None, transposed, groups, s, mode)[0]

    def unfused_x():
        return _aten_conv_backward(grad_y, x, gated_weight(), transposed, *geometry, output_padding,
                                   True, False, False)[0]

    fused = False
    if need_x:
        key = _conv_key("backward", "gated", grad_y, weight, transposed, *geometry, output_padding)
        fused = _choose(key, grad_y, weight, x.numel(), fused_x, unfused_x) == "fused"
    aten_x = need_x and not fused
    need_raw_w = need_w or need_e
    need_b = need_b and bias is not None
    need_sum = need_b or (need_e and bias is not None)
    w_aten = gated_weight() if aten_x else weight
    gx, graw, gsum = _aten_conv_backward(grad_y, x, w_aten, transposed, *geometry, output_padding,
                                         aten_x, need_raw_w, need_sum)
    if fused:
        gx = fused_x()
    gw = ge = gb = None
    if need_raw_w or need_b:
        gw, ge, gb = _gate.unit_weight_grad(
            graw if graw is not None else weight, weight, frozen_out, frozen_in, transposed, groups,
            scores=scores, bias=bias if need_sum else None, grad_sum=gsum, s=s, s_max=s_max, mode=mode,
            need_weight=need_w, need_scores=need_e, need_bias=need_b,
        )
    return (_or_nothing(gx.contiguous() if gx is not None else None, x), _or_nothing(gw, weight),
            _or_nothing(ge, weight), _or_nothing(gb, weight))


@_gated_conv_backward_op.register_fake
def _(grad_y, x, weight, scores, frozen_out, frozen_in, bias, s, mode, s_max, transposed, stride, padding,
      dilation, groups, output_padding, need_x, need_w, need_e, need_b):
    return _conv_backward_fake(x, weight, scores, need_x, need_w, need_e, need_b and bias is not None,
                               transposed, groups)


def _gated_conv_setup(ctx, inputs, output):
    (x, weight, scores, frozen_out, frozen_in, bias, s, mode, s_max, transposed, stride, padding, dilation,
     groups, out_pad) = inputs
    ctx.save_for_backward(x, weight, scores, frozen_out, frozen_in, bias)
    ctx.args = (s, mode, s_max, transposed, stride, padding, dilation, groups, out_pad)


def _gated_conv_grad(ctx, grad_y):
    x, weight, scores, frozen_out, frozen_in, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b = bias is not None and need[5]
    gx, gw, ge, gb = _gated_conv_backward_op(grad_y, x, weight, scores, frozen_out, frozen_in, bias, *ctx.args,
                                             need[0], need[1], need[2], need_b)
    return (_or_none(gx, need[0]), _or_none(gw, need[1]), _or_none(ge, need[2]), None, None,
            _or_none(gb, need_b)) + (None,) * 9


_gated_conv_op.register_autograd(_gated_conv_grad, setup_context=_gated_conv_setup)


# ==========================================================================================================
# the backend object
# ==========================================================================================================
_NO_GPU = (
    "Triton kernels need a CUDA GPU; none is visible (set TRITON_INTERPRET=1 to run them in the interpreter, "
    "for tests)"
)


def _interpret_set_too_late() -> str:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not _common.INTERPRETED:
        return (" (TRITON_INTERPRET is set now, but was not when dgm_kernels' Triton kernels were defined: set it "
                "before importing the triton backend)")
    return ""


def _valid_geometry(x: Tensor, weight: Tensor, transposed: bool, geo: dict) -> bool:
    """Whether the convolution is well formed; a malformed one goes to ATen, whose errors users know."""
    stride, dilation = geo["stride"], geo["dilation"]
    out_pad = geo.get("output_padding", (0, 0))
    if transposed and any(op >= max(st, dl) for op, st, dl in zip(out_pad, stride, dilation)):
        return False
    oh, ow = _out_hw(x, weight, transposed, stride, geo["padding"], dilation, out_pad)
    return oh > 0 and ow > 0 and x.shape[0] > 0


class TritonBackend(Backend):
    """Triton kernels on CUDA GPUs (and on the CPU through Triton's interpreter, for tests)."""

    name = "triton"
    #: frozen / frozen_out / frozen_in given as packed bits (uint8) reach the kernels as they are: the
    #: masked-weight and gate backward kernels and the optimizer steps read the bits in place

    def __init__(self) -> None:
        self._reasons: dict[str, str | None] = {}

    # -- availability ------------------------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device | str | None = None) -> str | None:
        key = "any" if device is None else str(torch.device(device))
        if key not in self._reasons:  # a plain dict lookup afterwards: cheap, and traceable by dynamo
            self._reasons[key] = self._reason(None if device is None else torch.device(device))
        return self._reasons[key]

    @staticmethod
    def _reason(device: torch.device | None) -> str | None:
        if device is None:
            if _common.INTERPRETED:
                return None
            return None if torch.cuda.is_available() else _NO_GPU + _interpret_set_too_late()
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return _NO_GPU
            if torch.version.hip is None:
                major, minor = torch.cuda.get_device_capability(device)
                if major < 7:
                    return f"Triton kernels need an NVIDIA GPU of compute capability >= 7.0, got {major}.{minor}"
            return None
        if device.type == "cpu":
            if _common.INTERPRETED:
                return None
            return ("Triton kernels run on CUDA GPUs; CPU tensors run only in Triton's interpreter (set "
                    "TRITON_INTERPRET=1 before importing dgm_kernels' triton backend; it is meant for tests)"
                    + _interpret_set_too_late())
        return f"Triton kernels run on CUDA GPUs (and, in the interpreter, on the CPU), not on {device.type} tensors"

    # -- primitives ---------------------------------------------------------------------------------------
    def mask(self, scores, s, mode, s_max):
        _common.check_dtype("scores", scores)
        return _mask_op(scores, float(s), int(mode), s_max)

    def masked_weight(self, weight, scores, s, frozen, mode, s_max):
        _common.check_dtype("weight", weight)
        return _masked_weight_op(weight, scores, frozen, float(s), int(mode), s_max)

    def channel_gate(self, y_pre, scores, s, mode, s_max):
        _common.check_dtype("y_pre", y_pre)
        if y_pre.dim() < 2 or y_pre.shape[1] != scores.numel():
            raise ValueError(
                f"y_pre must have dim 1 of size {scores.numel()} (one score per channel), got shape {tuple(y_pre.shape)}"
            )
        return _channel_gate_op(y_pre, scores.reshape(-1), float(s), int(mode), s_max)

    def block_unit_grad(self, weight, frozen_out, frozen_in, transposed, groups):
        _common.check_dtype("weight", weight)
        return _block_unit_grad_op(weight, frozen_out, frozen_in, bool(transposed), int(groups))

    def sparsity_terms(self, mask, reserved):
        _common.check_dtype("mask", mask)
        return _sparsity_terms_op(mask, reserved)

    # -- the mask ledger --------------------------------------------------------------------------------------
    def pack_bits(self, mask):
        """The packed bits (dgm_kernels.bits layout) of a bool tensor of any shape and strides."""
        _checks.tensor("mask", mask, dtype=torch.bool)
        return _pack_bits_op(mask)

    def union_count(self, reserved_bits, task_bits, outer, units, inner):
        """(reserved | task as packed bits, int64 count per unit of the entries task adds), the mask viewed
        as ``[outer, units, inner]``."""
        outer, units, inner = (_check_count(n, v) for n, v in (("outer", outer), ("units", units), ("inner", inner)))
        _checks.tensor("reserved_bits", reserved_bits)
        _bits_layout.check_packed("reserved_bits", reserved_bits, (outer, units, inner), reserved_bits.device)
        _bits_layout.check_packed("task_bits", task_bits, (outer, units, inner), reserved_bits.device)
        return _union_count_op(reserved_bits, task_bits, outer, units, inner)

    def adam_step_(self, param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step,
                   decoupled):
        """One Adam (``decoupled``: AdamW) update in place; frozen entries of param and state never written."""
        _checks.tensor("param", param)
        _common.check_dtype("param", param)
        for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            _check_like_param(name, t, param)
        _check_frozen_arg(frozen, param)
        _adam_step_op(param, grad, exp_avg, exp_avg_sq, frozen, float(lr), float(beta1), float(beta2), float(eps),
                      float(weight_decay), int(step), bool(decoupled))

    def sgd_step_(self, param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov,
                  first_step):
        """One SGD update in place (``momentum_buffer`` may be None when ``momentum == 0``)."""
        _checks.tensor("param", param)
        _common.check_dtype("param", param)
        _check_like_param("grad", grad, param)
        if momentum != 0:
            if momentum_buffer is None:
                raise ValueError(f"momentum_buffer must be a tensor when momentum != 0 (momentum={momentum})")
            _check_like_param("momentum_buffer", momentum_buffer, param)
        else:
            momentum_buffer = None  # not read nor written without momentum (as in the reference)
        _check_frozen_arg(frozen, param)
        _sgd_step_op(param, grad, momentum_buffer, frozen, float(lr), float(momentum), float(dampening),
                     float(weight_decay), bool(nesterov), bool(first_step))

    # -- fused convolutions ---------------------------------------------------------------------------------
    @staticmethod
    def _conv_args(geo: dict) -> tuple:
        return (list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]), int(geo["groups"]),
                list(geo.get("output_padding", (0, 0))))

    def masked_conv(self, x, weight, scores, s, frozen, bias, transposed, geo, mode, s_max):
        if x.dim() != 4 or not _valid_geometry(x, weight, transposed, geo):
            return NotImplemented
        _common.check_dtype("input", x)
        return _masked_conv_op(x, weight, scores, frozen, bias, float(s), int(mode), s_max, bool(transposed),
                               *self._conv_args(geo))

    def gated_conv(self, x, weight, scores, s, frozen_out, frozen_in, bias, transposed, geo, mode, s_max):
        if x.dim() != 4 or not _valid_geometry(x, weight, transposed, geo):
            return NotImplemented
        _common.check_dtype("input", x)
        return _gated_conv_op(x, weight, scores, frozen_out, frozen_in, bias, float(s), int(mode), s_max,
                              bool(transposed), *self._conv_args(geo))
