"""Drop-in masked layers built on :mod:`dgm_kernels.functional`.

Each layer holds its weight, optional bias and the current task's scores as parameters, and its frozen
state as bool buffers. The caller sets ``s`` (annealing scale), ``s_max`` (HAT compensation; None: off),
``mode`` (``"anneal"`` or ``"ste"``) and ``backend`` (None: the current default) as plain attributes; they
travel with ``state_dict`` (as the module's extra state), so a state dict round-trips the whole layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks, bits
from . import functional as F

__all__ = ["MaskedLinear", "MaskedConv2d", "MaskedConvTranspose2d", "GatedConv2d", "GatedConvTranspose2d"]


def _reset_like_torch(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # the initialisation torch.nn.Conv2d / Linear use, so the layers are drop-in
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _no_bits(numel: int, device) -> torch.Tensor:
    return torch.zeros(bits.packed_size(numel), dtype=torch.uint8, device=device)


def _as_bits(name, frozen, shape, device) -> torch.Tensor:
    if isinstance(frozen, torch.Tensor) and frozen.dtype == torch.uint8:
        bits.check_packed(name, frozen, shape, device)
        return frozen.clone()
    _checks.tensor(name, frozen, dtype=torch.bool, device=device, shape=shape)
    return bits.pack_bits_reference(frozen)


class _MaskedLayer(nn.Module):
    """Common state: the mask's schedule parameters and the backend."""

    def __init__(self, mode: str, backend: str | None):
        super().__init__()
        _checks.mode(mode)
        self.mode = mode
        self.s = 1.0
        self.s_max: float | None = None
        self.backend = backend

    def _schedule(self):
        return dict(mode=self.mode, s_max=self.s_max, backend=self.backend)

    def current_mask(self) -> torch.Tensor:
        """The mask m(e) the layer applies now (no gradient)."""
        with torch.no_grad():
            return F.mask(self.scores, self.s, mode=self.mode, backend=self.backend)

    def get_extra_state(self):
        return {"s": float(self.s), "s_max": None if self.s_max is None else float(self.s_max), "mode": self.mode}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not {"s", "s_max", "mode"} <= set(state):
            raise ValueError(f"extra state of {type(self).__name__} must be a dict with s, s_max, mode; got {state!r}")
        _checks.scale("s", state["s"])
        _checks.optional_scale("s_max", state["s_max"])
        _checks.mode(state["mode"])
        self.s, self.s_max, self.mode = state["s"], state["s_max"], state["mode"]

    def _make_params(self, weight_shape, bias: bool, factory) -> None:
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_channels_, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_torch(self.weight, self.bias)
        if hasattr(self, "scores"):
            nn.init.zeros_(self.scores)


class _PerWeightMasked(_MaskedLayer):
    """DGMw: one score per weight; ``frozen`` (weight's shape) blocks the weight's gradient, ``frozen_bias`` (one
    bit per output unit, only with a bias) the bias's."""

    def _make_mask_state(self, factory) -> None:
        self.scores = nn.Parameter(torch.zeros_like(self.weight, **factory))
        # packed bits (dgm_kernels.bits): 1 bit per weight; the ops unpack them inside their kernels
        self.register_buffer("frozen", _no_bits(self.weight.numel(), self.weight.device))
        self.register_buffer("frozen_bias", None if self.bias is None else _no_bits(self.bias.numel(), self.weight.device))

    def set_frozen(self, frozen: torch.Tensor, frozen_bias: torch.Tensor | None = None) -> None:
        """Freeze the weights where ``frozen`` (bool, the weight's shape, or its packed bits) is True, and the
        bias where ``frozen_bias`` (bool or packed bits, one per output unit; None: leave as it is) is True."""
        dev = self.weight.device
        self.frozen = _as_bits("frozen", frozen, self.weight.shape, dev)
        if frozen_bias is not None:
            if self.bias is None:
                raise ValueError(f"frozen_bias must be None for a {type(self).__name__} built with bias=False")
            self.frozen_bias = _as_bits("frozen_bias", frozen_bias, self.bias.shape, dev)

    def _live_bias(self):
        # a frozen unit's bias enters as a constant: it gets exactly zero gradient, as the frozen weights do
        if self.bias is None:
            return None
        return torch.where(bits.unpack_bits_reference(self.frozen_bias, self.bias.shape), self.bias.detach(), self.bias)

    def frozen_mask(self) -> torch.Tensor:
        """The frozen state as a bool tensor of the weight's shape."""
        return bits.unpack_bits(self.frozen, self.weight.shape)


class MaskedLinear(_PerWeightMasked):
    def __init__(self, in_features, out_features, bias=True, *, mode="anneal", backend=None, device=None, dtype=None):
        super().__init__(mode, backend)
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.out_channels_ = out_features
        self._make_params((out_features, in_features), bias, factory)
        self._make_mask_state(factory)

    def forward(self, input):
        return F.masked_linear(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                               **self._schedule())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mode={self.mode!r}"


class _ConvGeometry:
    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding=0):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.out_channels_ = out_channels
        self.kernel_size = _checks.pair("kernel_size", kernel_size, minimum=1)
        self.stride = _checks.pair("stride", stride, minimum=1)
        self.padding = _checks.pair("padding", padding, minimum=0)
        self.dilation = _checks.pair("dilation", dilation, minimum=1)
        self.output_padding = _checks.pair("output_padding", output_padding, minimum=0)
        self.groups = _checks.positive_int("groups", groups)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % self.groups:
                raise ValueError(f"{name} ({value}) must be divisible by groups ({self.groups})")

    def _conv_kwargs(self, transposed):
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if transposed:
            kw["output_padding"] = self.output_padding
        return kw

    def _weight_shape(self, transposed):
        if transposed:
            return (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class MaskedConv2d(_ConvGeometry, _PerWeightMasked):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 *, mode="anneal", backend=None, device=None, dtype=None):
        _PerWeightMasked.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self._make_params(self._weight_shape(False), bias, factory)
        self._make_mask_state(factory)

    def forward(self, input):
        return F.masked_conv2d(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                               **self._conv_kwargs(False), **self._schedule())


class MaskedConvTranspose2d(_ConvGeometry, _PerWeightMasked):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, *, mode="anneal", backend=None, device=None, dtype=None):
        _PerWeightMasked.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding)
        self._make_params(self._weight_shape(True), bias, factory)
        self._make_mask_state(factory)

    def forward(self, input):
        return F.masked_conv_transpose2d(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                                         **self._conv_kwargs(True), **self._schedule())


class _ChannelGated(_ConvGeometry, _MaskedLayer):
    """DGMa: one score per output channel; ``frozen_out`` / ``frozen_in`` (unit vectors) block the weight.

    ``input_masked=False`` (the first layer of a network) keeps no ``frozen_in``: the output unit alone
    decides whether a weight is frozen.
    """

    transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, output_padding,
                 input_masked, mode, backend, device, dtype):
        _MaskedLayer.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding)
        self._make_params(self._weight_shape(self.transposed), bias, factory)
        self.scores = nn.Parameter(torch.zeros(out_channels, **factory))
        dev = self.weight.device
        # packed bits (dgm_kernels.bits), one per unit
        self.register_buffer("frozen_out", _no_bits(out_channels, dev))
        self.register_buffer("frozen_in", _no_bits(in_channels, dev) if input_masked else None)

    def set_frozen(self, frozen_out: torch.Tensor, frozen_in: torch.Tensor | None = None) -> None:
        """Freeze output units (and, for a layer with a masked input, input units): bool vectors or packed bits.

        A weight is frozen where its output unit and its input unit are both frozen.
        """
        dev = self.weight.device
        self.frozen_out = _as_bits("frozen_out", frozen_out, (self.out_channels,), dev)
        if self.frozen_in is None:
            if frozen_in is not None:
                raise ValueError("frozen_in must be None for a layer built with input_masked=False")
        elif frozen_in is not None:
            self.frozen_in = _as_bits("frozen_in", frozen_in, (self.in_channels,), dev)

    def forward(self, input):
        op = F.gated_conv_transpose2d if self.transposed else F.gated_conv2d
        return op(input, self.weight, self.scores, self.s, self.frozen_out, self.frozen_in, bias=self.bias,
                  **self._conv_kwargs(self.transposed), **self._schedule())


class GatedConv2d(_ChannelGated):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 *, input_masked=True, mode="anneal", backend=None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, 0,
                         input_masked, mode, backend, device, dtype)


class GatedConvTranspose2d(_ChannelGated):
    transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, *, input_masked=True, mode="anneal", backend=None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         output_padding, input_masked, mode, backend, device, dtype)
