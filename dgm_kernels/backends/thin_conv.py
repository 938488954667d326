"""A plain convolution of a (1-channel) image, differentiable to any order, with the ``cpu`` backend's
gradient kernels (``dgm_kernels::conv2d_input_grad`` and ``conv2d_weight_grad``, ``csrc/cpu/conv_ops.cpp``).

Why: the first layer of the MNIST critics and classifiers reads a 1-channel image, and ATen's oneDNN backward of
that layer runs at a few GFLOP/s on a CPU (both gradients take 5-10x the forward's time); the WGAN-GP critic step
runs that backward four times and the generator step once more (docs/performance.md). The forward stays ATen's.

The three functions close under differentiation, so the gradient penalty's double backward (and any higher
order) runs on the same kernels. With y = conv(x, W), gY the gradient of y:

- ``conv``: forward ``F.conv2d``; gradients ``input_grad(gY, W)`` and ``weight_grad(gY, x)``;
- ``input_grad(gY, W)`` is linear in gY and in W: its gradients are ``conv(g, W)`` (to gY) and
  ``weight_grad(gY, g)`` (to W);
- ``weight_grad(gY, x)`` likewise: ``conv(x, g)`` (to gY) and ``input_grad(gY, g)`` (to x).

The spec of the two ops is ``aten::convolution_backward``; tests/kernels/test_thin_conv.py checks both and the
first and second derivatives of :func:`thin_conv2d` against ``F.conv2d``'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _C  # noqa: F401  (registers the ops)

_ops = torch.ops.dgm_kernels

#: the most input channels (output channels of a transposed convolution) for which the cpu backend's ``conv`` hook
#: takes this path. Measured (``python -m benchmarks.critic_convs``, docs/performance.md): at 1 channel 2.5-3.2x
#: PyTorch's forward + backward and 1.2-1.4x its gradient penalty; at 3 channels 0.9-1.1x and 0.5x
THIN_INPUT_CHANNELS = 1


@torch.library.register_fake("dgm_kernels::conv2d_weight_grad")
def _weight_grad_fake(grad_out, input, kernel_size, stride, padding):
    torch._check(grad_out.dim() == 4 and input.dim() == 4,
                 lambda: "dgm_kernels::conv2d_weight_grad: grad_out and input must be 4-D")
    return grad_out.new_empty((grad_out.shape[1], input.shape[1], kernel_size[0], kernel_size[1]))


@torch.library.register_fake("dgm_kernels::conv2d_input_grad")
def _input_grad_fake(grad_out, weight, stride, padding, input_size):
    torch._check(grad_out.dim() == 4 and weight.dim() == 4,
                 lambda: "dgm_kernels::conv2d_input_grad: grad_out and weight must be 4-D")
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1], input_size[0], input_size[1]))


# The Functions take ctx in forward (no setup_context): measured 4 us per call against 29 us (torch 2.14.1, CPU),
# and the gradient penalty applies them a dozen times per critic step.
class _Conv(torch.autograd.Function):
    # One node for both gradients. (Two nodes, one per path, would let the penalty's grad(D(x_hat), x_hat) skip the
    # weight gradient, which it computes here without needing it, about 0.7 ms per critic step: but the weight
    # path's node would then hold x as a constant and lose d(weight gradient)/dx, a second derivative.)
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geo = (tuple(stride), tuple(padding))
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geo
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _InputGrad.apply(grad, weight, stride, padding, tuple(x.shape[2:]))
        if ctx.needs_input_grad[1]:
            gw = _WeightGrad.apply(grad, x, tuple(weight.shape[2:]), stride, padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None


class _InputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, weight, stride, padding, input_size):
        ctx.save_for_backward(grad_out, weight)
        ctx.geo = (stride, padding)
        return _ops.conv2d_input_grad(grad_out, weight, stride, padding, input_size)

    @staticmethod
    def backward(ctx, g):
        grad_out, weight = ctx.saved_tensors
        stride, padding = ctx.geo
        d_grad_out = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_out = _Conv.apply(g, weight, None, stride, padding)
        if ctx.needs_input_grad[1]:
            d_weight = _WeightGrad.apply(grad_out, g, tuple(weight.shape[2:]), stride, padding)
        return d_grad_out, d_weight, None, None, None


class _WeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, x, kernel_size, stride, padding):
        ctx.save_for_backward(grad_out, x)
        ctx.geo = (stride, padding)
        return _ops.conv2d_weight_grad(grad_out, x, kernel_size, stride, padding)

    @staticmethod
    def backward(ctx, g):
        grad_out, x = ctx.saved_tensors
        stride, padding = ctx.geo
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = _Conv.apply(x, g, None, stride, padding)
        if ctx.needs_input_grad[1]:
            d_x = _InputGrad.apply(grad_out, g, stride, padding, tuple(x.shape[2:]))
        return d_grad_out, d_x, None, None, None


def thin_conv2d(x, weight, bias, stride, padding):
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1) whose gradients, of every order, run on
    the ``conv2d_input_grad`` / ``conv2d_weight_grad`` kernels. CPU float32/float64 tensors."""
    return _Conv.apply(x, weight, bias, tuple(stride), tuple(padding))


def thin_conv_transpose2d(x, weight, bias, stride, padding, output_padding):
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)`` (groups 1, dilation 1): the forward
    of a transposed convolution is the input gradient of the convolution it transposes, so it runs on
    ``conv2d_input_grad`` (fast where the output has few channels: a generator's last layer), and its gradients
    are the same closed family. ``weight``: ``[in_channels, out_channels, kH, kW]``."""
    size = tuple((n - 1) * s - 2 * p + k + op for n, s, p, k, op in
                 zip(x.shape[2:], stride, padding, weight.shape[2:], output_padding))
    y = _InputGrad.apply(x, weight, tuple(stride), tuple(padding), size)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _plain(x, weight, geo) -> bool:
    return (x.dim() == 4 and geo["groups"] == 1 and geo["dilation"] == (1, 1) and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype)


def is_thin_transpose(x, weight, geo) -> bool:
    """Whether the ``cpu`` backend takes :func:`thin_conv_transpose2d` for this transposed convolution: at most
    :data:`THIN_INPUT_CHANNELS` output channels, and an output padding below the stride (the geometry of an
    input gradient)."""
    return (_plain(x, weight, geo) and weight.shape[1] <= THIN_INPUT_CHANNELS
            and all(op < s for op, s in zip(geo["output_padding"], geo["stride"])))


def is_thin(x, weight, geo) -> bool:
    """Whether the ``cpu`` backend takes :func:`thin_conv2d` for this (non-transposed) convolution."""
    return _plain(x, weight, geo) and x.shape[1] <= THIN_INPUT_CHANNELS
