"""Custom ops of the fused convolutions: ``masked_conv`` (DGMw) and ``gated_conv`` (DGMa), forward and backward.

Each direction has two implementations, picked per call by :func:`.conv_strategy.choose`:

- fused: the implicit-GEMM kernel of :mod:`.conv` with the mask applied while it loads W, or the gate in its
  epilogue; the data gradient runs through the same kernel family with the mask (or the gate, then indexed
  by the contraction) applied on load;
- unfused: a small Triton kernel materialises the effective weight (W * m, or W * m[unit] and b * m), then
  ATen's convolution (cuDNN on a GPU) does the rest.

Both share the weight gradient: ATen's ``convolution_backward`` (weight part, and the per-unit sum of
grad_y for the bias) followed by one Triton pass that gives grad_W (blocked by ``frozen``, or by the unit
pattern 1 - min(M_out, M_in)), grad_e and grad_bias. For the gate, grad_e[c] = dm/de[c] * sum over batch and
space of grad_y * y_pre; since the convolution is linear in W this sum equals sum(W * dconv/dW[grad_y]) +
b * sum(grad_y) over unit c, so y_pre is neither stored nor re-read.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# the fused kernel is reached through its module (conv_kernels.conv), never bound here by name, so that
# tests can count its launches by patching the module attribute
from . import conv as conv_kernels
from . import gate as gate_kernels
from . import mask as mask_kernels
from ._common import check_dtype
from .conv_strategy import choose, conv_key
from .ops_common import or_none, or_placeholder, triton_op


# ----------------------------------------------------------------------------------------------------------
# geometry and the ATen halves of the unfused path
# ----------------------------------------------------------------------------------------------------------
def out_hw(x: Tensor, weight: Tensor, transposed: bool, stride, padding, dilation, output_padding) -> tuple[int, int]:
    return tuple(
        conv_kernels.output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i],
                                 transposed, output_padding[i])
        for i in range(2)
    )


def out_channels(weight: Tensor, transposed: bool, groups: int) -> int:
    return weight.shape[1] * groups if transposed else weight.shape[0]


def aten_conv(x, weight, bias, transposed, stride, padding, dilation, groups, output_padding) -> Tensor:
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return y.contiguous()  # the op promises a contiguous output (cuDNN may answer channels-last)


def aten_conv_backward(grad_y, x, weight, transposed, stride, padding, dilation, groups, output_padding,
                       need_x: bool, need_w: bool, need_bias_sum: bool):
    if not (need_x or need_w or need_bias_sum):
        return None, None, None
    out_c = out_channels(weight, transposed, groups)
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, [out_c] if need_bias_sum else None, stride, padding, dilation, transposed,
        output_padding, groups, [need_x, need_w, need_bias_sum],
    )


def _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding) -> Tensor:
    oh, ow = out_hw(x, weight, transposed, stride, padding, dilation, output_padding)
    return x.new_empty((x.shape[0], out_channels(weight, transposed, groups), oh, ow))


def _conv_backward_fake(x, weight, scores, need_x, need_w, need_e, need_b, transposed, groups):
    out_c = out_channels(weight, transposed, groups)
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty(scores.shape if need_e else (0,)), weight.new_empty((out_c,) if need_b else (0,)))


# ----------------------------------------------------------------------------------------------------------
# masked convolution (DGMw)
# ----------------------------------------------------------------------------------------------------------
@triton_op("masked_conv", mutates_args=())
def masked_conv_op(
    x: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], bias: Optional[Tensor], s: float,
    mode: int, s_max: Optional[float], transposed: bool, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, output_padding: list[int],
) -> Tensor:
    hw = out_hw(x, weight, transposed, stride, padding, dilation, output_padding)

    def fused():
        return conv_kernels.conv(x, weight, scatter=transposed, out_hw=hw, stride=stride, padding=padding,
                                 dilation=dilation, groups=groups, s=s, mode=mode, weight_scores=scores, bias=bias)

    def unfused():
        w_eff = mask_kernels.masked_weight_forward(weight, scores, s, mode)
        return aten_conv(x, w_eff, bias, transposed, stride, padding, dilation, groups, output_padding)

    out_numel = x.shape[0] * out_channels(weight, transposed, groups) * hw[0] * hw[1]
    key = conv_key("forward", "masked", x, weight, transposed, stride, padding, dilation, groups, output_padding)
    launch = dict(scatter=transposed, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (fused if choose(key, x, weight, out_numel, fused, unfused, launch) == "fused" else unfused)()


@masked_conv_op.register_fake
def _(x, weight, scores, frozen, bias, s, mode, s_max, transposed, stride, padding, dilation, groups, output_padding):
    return _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding)


@triton_op("masked_conv_backward", mutates_args=())
def masked_conv_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, frozen: Optional[Tensor], s: float, mode: int,
    s_max: Optional[float], transposed: bool, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, output_padding: list[int], need_x: bool, need_w: bool, need_e: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = (stride, padding, dilation, groups)

    def fused_x():
        # the data gradient of a convolution is the other kind of convolution with the same (masked) weight
        return conv_kernels.conv(grad_y, weight, scatter=not transposed, out_hw=tuple(x.shape[2:]), stride=stride,
                                 padding=padding, dilation=dilation, groups=groups, s=s, mode=mode,
                                 weight_scores=scores)

    def unfused_x():
        w_eff = mask_kernels.masked_weight_forward(weight, scores, s, mode)
        return aten_conv_backward(grad_y, x, w_eff, transposed, *geometry, output_padding, True, False, False)[0]

    fused = False
    if need_x:
        key = conv_key("backward", "masked", grad_y, weight, transposed, *geometry, output_padding)
        launch = dict(scatter=not transposed, stride=stride, padding=padding, dilation=dilation, groups=groups)
        fused = choose(key, grad_y, weight, x.numel(), fused_x, unfused_x, launch) == "fused"
    aten_x = need_x and not fused
    need_raw_w = need_w or need_e
    # the weight's value does not enter the weight gradient; with aten_x it must be the masked weight
    w_aten = mask_kernels.masked_weight_forward(weight, scores, s, mode) if aten_x else weight
    gx, graw, gb = aten_conv_backward(grad_y, x, w_aten, transposed, *geometry, output_padding,
                                      aten_x, need_raw_w, need_b)
    if fused:
        gx = fused_x()
    gw = ge = None
    if need_raw_w:
        gw, ge = mask_kernels.masked_weight_backward(graw, weight, scores, frozen, s, s_max, mode, need_w, need_e)
    return (or_placeholder(gx.contiguous() if gx is not None else None, x), or_placeholder(gw, weight),
            or_placeholder(ge, weight), or_placeholder(gb, weight))


@masked_conv_backward_op.register_fake
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
    gx, gw, ge, gb = masked_conv_backward_op(grad_y, x, weight, scores, frozen, *ctx.args, need[0], need[1],
                                             need[2], need_b)
    return (or_none(gx, need[0]), or_none(gw, need[1]), or_none(ge, need[2]), None, or_none(gb, need_b)) + (None,) * 9


masked_conv_op.register_autograd(_masked_conv_grad, setup_context=_masked_conv_setup)


# ----------------------------------------------------------------------------------------------------------
# channel-gated convolution (DGMa)
# ----------------------------------------------------------------------------------------------------------
@triton_op("gated_conv", mutates_args=())
def gated_conv_op(
    x: Tensor, weight: Tensor, scores: Tensor, frozen_out: Optional[Tensor], frozen_in: Optional[Tensor],
    bias: Optional[Tensor], s: float, mode: int, s_max: Optional[float], transposed: bool, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, output_padding: list[int],
) -> Tensor:
    hw = out_hw(x, weight, transposed, stride, padding, dilation, output_padding)

    def fused():  # the gate (and the bias) in the kernel's epilogue
        return conv_kernels.conv(x, weight, scatter=transposed, out_hw=hw, stride=stride, padding=padding,
                                 dilation=dilation, groups=groups, s=s, mode=mode, bias=bias, n_gate_scores=scores)

    def unfused():  # (conv(x, W) + b) * m = conv(x, W * m) + b * m per unit: gate the (small) weight instead
        w_eff, b_eff = gate_kernels.gate_weight(weight, scores, bias, transposed, groups, s, mode)
        return aten_conv(x, w_eff, b_eff, transposed, stride, padding, dilation, groups, output_padding)

    out_numel = x.shape[0] * out_channels(weight, transposed, groups) * hw[0] * hw[1]
    key = conv_key("forward", "gated", x, weight, transposed, stride, padding, dilation, groups, output_padding)
    launch = dict(scatter=transposed, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (fused if choose(key, x, weight, out_numel, fused, unfused, launch) == "fused" else unfused)()


@gated_conv_op.register_fake
def _(x, weight, scores, frozen_out, frozen_in, bias, s, mode, s_max, transposed, stride, padding, dilation,
      groups, output_padding):
    return _conv_fake(x, weight, transposed, stride, padding, dilation, groups, output_padding)


@triton_op("gated_conv_backward", mutates_args=())
def gated_conv_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, frozen_out: Optional[Tensor],
    frozen_in: Optional[Tensor], bias: Optional[Tensor], s: float, mode: int, s_max: Optional[float],
    transposed: bool, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    output_padding: list[int], need_x: bool, need_w: bool, need_e: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = (stride, padding, dilation, groups)

    def fused_x():  # the gate of the original output units, which the data gradient contracts over
        return conv_kernels.conv(grad_y, weight, scatter=not transposed, out_hw=tuple(x.shape[2:]), stride=stride,
                                 padding=padding, dilation=dilation, groups=groups, s=s, mode=mode,
                                 k_gate_scores=scores)

    def gated_weight():
        return gate_kernels.gate_weight(weight, scores, None, transposed, groups, s, mode)[0]

    def unfused_x():
        return aten_conv_backward(grad_y, x, gated_weight(), transposed, *geometry, output_padding,
                                  True, False, False)[0]

    fused = False
    if need_x:
        key = conv_key("backward", "gated", grad_y, weight, transposed, *geometry, output_padding)
        launch = dict(scatter=not transposed, stride=stride, padding=padding, dilation=dilation, groups=groups)
        fused = choose(key, grad_y, weight, x.numel(), fused_x, unfused_x, launch) == "fused"
    aten_x = need_x and not fused
    need_raw_w = need_w or need_e
    need_b = need_b and bias is not None
    need_sum = need_b or (need_e and bias is not None)
    w_aten = gated_weight() if aten_x else weight
    gx, graw, gsum = aten_conv_backward(grad_y, x, w_aten, transposed, *geometry, output_padding,
                                        aten_x, need_raw_w, need_sum)
    if fused:
        gx = fused_x()
    gw = ge = gb = None
    if need_raw_w or need_b:
        gw, ge, gb = gate_kernels.unit_weight_grad(
            graw if graw is not None else weight, weight, frozen_out, frozen_in, transposed, groups,
            scores=scores, bias=bias if need_sum else None, grad_sum=gsum, s=s, s_max=s_max, mode=mode,
            need_weight=need_w, need_scores=need_e, need_bias=need_b,
        )
    return (or_placeholder(gx.contiguous() if gx is not None else None, x), or_placeholder(gw, weight),
            or_placeholder(ge, weight), or_placeholder(gb, weight))


@gated_conv_backward_op.register_fake
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
    gx, gw, ge, gb = gated_conv_backward_op(grad_y, x, weight, scores, frozen_out, frozen_in, bias, *ctx.args,
                                            need[0], need[1], need[2], need_b)
    return (or_none(gx, need[0]), or_none(gw, need[1]), or_none(ge, need[2]), None, None,
            or_none(gb, need_b)) + (None,) * 9


gated_conv_op.register_autograd(_gated_conv_grad, setup_context=_gated_conv_setup)


# ----------------------------------------------------------------------------------------------------------
# entry points of the backend contract
# ----------------------------------------------------------------------------------------------------------
def valid_geometry(x: Tensor, weight: Tensor, transposed: bool, geo: dict) -> bool:
    """Whether the convolution is well formed; a malformed one goes to ATen, whose errors users know."""
    stride, dilation = geo["stride"], geo["dilation"]
    out_pad = geo.get("output_padding", (0, 0))
    if transposed and any(op >= max(st, dl) for op, st, dl in zip(out_pad, stride, dilation)):
        return False
    oh, ow = out_hw(x, weight, transposed, stride, geo["padding"], dilation, out_pad)
    return oh > 0 and ow > 0 and x.shape[0] > 0


def _geometry_args(geo: dict) -> tuple:
    # the ops' schema wants lists and ints, whatever sequences the caller gave
    return (list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]), int(geo["groups"]),
            list(geo.get("output_padding", (0, 0))))


def masked_conv(x, weight, scores, s, frozen, bias, transposed, geo, mode, s_max):
    """The op, or NotImplemented for what it does not handle (not 4-D, malformed geometry), which the
    caller then composes from the primitives and a plain convolution."""
    if x.dim() != 4 or not valid_geometry(x, weight, transposed, geo):
        return NotImplemented
    check_dtype("input", x)
    return masked_conv_op(x, weight, scores, frozen, bias, float(s), int(mode), s_max, bool(transposed),
                          *_geometry_args(geo))


def gated_conv(x, weight, scores, s, frozen_out, frozen_in, bias, transposed, geo, mode, s_max):
    if x.dim() != 4 or not valid_geometry(x, weight, transposed, geo):
        return NotImplemented
    check_dtype("input", x)
    return gated_conv_op(x, weight, scores, frozen_out, frozen_in, bias, float(s), int(mode), s_max,
                         bool(transposed), *_geometry_args(geo))
