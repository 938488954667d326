"""Drop-in masked layers built on :mod:`dgm_kernels.functional`.

Each layer holds its weight, optional bias and the current task's scores as parameters, and its frozen
state as packed-bit buffers. A layer knows its kind (class attributes ``mask_kind``: ``"weight"`` for one score
per weight, ``"unit"`` for one gate per output unit; ``transposed``; ``linear``) and how to grow
(:meth:`MaskedLayer.grow`), so that :class:`dgm_kernels.MaskLedger` keeps only bits and widths. The caller sets ``s`` (annealing scale), ``s_max`` (HAT compensation; None: off),
``mode`` (``"anneal"`` or ``"ste"``), ``derivative`` (``"stable"`` or ``"hat"``: HAT's own float formula for the
mask's gradient, see :mod:`dgm_kernels.functional`) and ``backend`` (None: the current default) as plain attributes;
they travel with ``state_dict`` (as the module's extra state), so a state dict round-trips the whole layer.

``layer(x, return_mask=True)`` returns ``(output, m)``: the mask the forward applied, differentiable, for a
regulariser (HAT's forward returns its masks).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks, bits
from . import functional as F

__all__ = ["MaskedLayer", "MaskedLinear", "MaskedConv2d", "MaskedConvTranspose2d", "GatedConv2d",
           "GatedConvTranspose2d", "GatedLinear", "Conv2d", "ConvTranspose2d", "WEIGHT", "UNIT"]

#: ``mask_kind`` of the layers: one mask entry per weight (DGMw), or one per output unit (DGMa)
WEIGHT, UNIT = "weight", "unit"


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


def _grown_bits(packed, old_shape, new_shape) -> torch.Tensor:
    """Packed bits of ``new_shape`` with the old entries in place (old block first) and the new ones 0."""
    grown = torch.zeros(new_shape, dtype=torch.bool, device=packed.device)
    grown[tuple(slice(0, d) for d in old_shape)] = bits.unpack_bits_reference(packed, old_shape)
    return bits.pack_bits_reference(grown)


class MaskedLayer(nn.Module):
    """What every masked layer shares: the mask's schedule parameters, the backend, its kind and its growth.

    Subclasses set the class attributes ``mask_kind`` (WEIGHT or UNIT), ``transposed`` and ``linear``.
    """

    mask_kind: str = WEIGHT
    transposed: bool = False
    linear: bool = False

    def __init__(self, mode: str, backend: str | None):
        super().__init__()
        _checks.mode(mode)
        self.mode = mode
        self.s = 1.0
        self.s_max: float | None = None
        self.derivative = "stable"
        self.backend = backend

    def _schedule(self):
        return dict(mode=self.mode, s_max=self.s_max, backend=self.backend)

    def _options(self, return_mask):
        # passed only when not the default, so that the default forward is the very call it always was
        opts = {"return_mask": True} if return_mask else {}
        if self.derivative != "stable":
            opts["derivative"] = self.derivative
        return opts

    def current_mask(self) -> torch.Tensor:
        """The mask m(e) the layer applies now (no gradient)."""
        with torch.no_grad():
            return F.mask(self.scores, self.s, mode=self.mode, backend=self.backend)

    def get_extra_state(self):
        state = {"s": float(self.s), "s_max": None if self.s_max is None else float(self.s_max), "mode": self.mode}
        if self.derivative != "stable":  # absent by default: a default layer's state dict is what it always was
            state["derivative"] = self.derivative
        return state

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not {"s", "s_max", "mode"} <= set(state):
            raise ValueError(f"extra state of {type(self).__name__} must be a dict with s, s_max, mode; got {state!r}")
        _checks.scale("s", state["s"])
        _checks.optional_scale("s_max", state["s_max"])
        _checks.mode(state["mode"])
        derivative = state.get("derivative", "stable")
        if derivative not in F.DERIVATIVES:
            raise ValueError(f"extra state of {type(self).__name__}: derivative must be one of {F.DERIVATIVES}, "
                             f"got {derivative!r}")
        self.s, self.s_max, self.mode, self.derivative = state["s"], state["s_max"], state["mode"], derivative

    def _make_params(self, weight_shape, bias: bool, factory) -> None:
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_width, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_torch(self.weight, self.bias)
        if hasattr(self, "scores"):
            nn.init.zeros_(self.scores)

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def in_width(self) -> int:
        """Input units (features or channels)."""
        return self.in_features if self.linear else self.in_channels

    @property
    def out_width(self) -> int:
        """Output units (features or channels)."""
        return self.out_features if self.linear else self.out_channels

    @property
    def out_dim(self) -> int:
        """The weight's dimension that indexes output units (1 for a transposed convolution's weight)."""
        return 1 if self.transposed else 0

    @property
    def kernel_area(self) -> int:
        return 1 if self.linear else self.kernel_size[0] * self.kernel_size[1]

    def mask_shape(self) -> tuple:
        """The shape of the layer's mask: the weight's (WEIGHT) or ``(out_width,)`` (UNIT)."""
        return tuple(self.weight.shape) if self.mask_kind == WEIGHT else (self.out_width,)

    # -- growth -----------------------------------------------------------------------------------------------
    def check_growth(self, extra_in: int, extra_out: int) -> None:
        """Raise ValueError where ``grow(extra_in, extra_out)`` cannot be done (nothing changes then)."""
        for name, value in (("extra_in", extra_in), ("extra_out", extra_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if getattr(self, "groups", 1) != 1 and (extra_in or extra_out):
            raise ValueError(f"{type(self).__name__} has groups={self.groups}: growing grouped layers is not supported")

    def grow(self, extra_in: int, extra_out: int) -> list[tuple[nn.Parameter, nn.Parameter, tuple]]:
        """Add ``extra_in`` input and ``extra_out`` output units.

        Old values stay in place (old block first); new weights and biases get the initialisation of a fresh
        layer of the new size; the scores start at 0 (a new task); the frozen state keeps its old entries and
        leaves the new ones free. Returns ``(old parameter, new parameter, old block)`` for every replaced
        parameter, so that an optimizer can swap them and grow its state alike.
        """
        self.check_growth(extra_in, extra_out)
        if not extra_in and not extra_out:
            return []
        w = self.weight
        in_dim = 0 if self.transposed else 1
        new_shape = list(w.shape)
        new_shape[in_dim] += extra_in
        new_shape[self.out_dim] += extra_out
        new_w = torch.empty(new_shape, dtype=w.dtype, device=w.device)
        new_b = None if self.bias is None else torch.empty(new_shape[self.out_dim], dtype=w.dtype, device=w.device)
        _reset_like_torch(new_w, new_b)  # the distribution of a fresh layer of the new size
        old_block = tuple(slice(0, d) for d in w.shape)
        old_mask_shape = self.mask_shape()
        with torch.no_grad():
            new_w[old_block] = w
            if new_b is not None:
                new_b[: self.bias.shape[0]] = self.bias
        old_scores = self.scores
        changes = [(w, nn.Parameter(new_w, requires_grad=w.requires_grad), old_block)]
        if new_b is not None:
            changes.append((self.bias, nn.Parameter(new_b, requires_grad=self.bias.requires_grad),
                            (slice(0, self.bias.shape[0]),)))
        if self.linear:
            self.in_features += extra_in
            self.out_features += extra_out
        else:
            self.in_channels += extra_in
            self.out_channels += extra_out
        self.weight = changes[0][1]
        if new_b is not None:
            self.bias = changes[1][1]
        self.scores = nn.Parameter(torch.zeros(self.mask_shape(), dtype=w.dtype, device=w.device),
                                   requires_grad=old_scores.requires_grad)
        changes.append((old_scores, self.scores, tuple(slice(0, d) for d in old_mask_shape)))
        self._grow_frozen(old_mask_shape, tuple(w.shape))
        return changes

    def _grow_frozen(self, old_mask_shape, old_weight_shape) -> None:
        raise NotImplementedError


class _PerWeightMasked(MaskedLayer):
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

    def _grow_frozen(self, old_mask_shape, old_weight_shape) -> None:
        self.frozen = _grown_bits(self.frozen, old_weight_shape, tuple(self.weight.shape))
        if self.bias is not None:
            self.frozen_bias = _grown_bits(self.frozen_bias, (old_weight_shape[self.out_dim],), tuple(self.bias.shape))

    def _live_bias(self):
        # a frozen unit's bias enters as a constant: it gets exactly zero gradient, as the frozen weights do
        if self.bias is None:
            return None
        return torch.where(bits.unpack_bits_reference(self.frozen_bias, self.bias.shape), self.bias.detach(), self.bias)

    def frozen_mask(self) -> torch.Tensor:
        """The frozen state as a bool tensor of the weight's shape."""
        return bits.unpack_bits(self.frozen, self.weight.shape)


class MaskedLinear(_PerWeightMasked):
    linear = True

    def __init__(self, in_features, out_features, bias=True, *, mode="anneal", backend=None, device=None, dtype=None):
        super().__init__(mode, backend)
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self._make_params((out_features, in_features), bias, factory)
        self._make_mask_state(factory)

    def forward(self, input, *, return_mask=False):
        return F.masked_linear(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                               **self._schedule(), **self._options(return_mask))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mode={self.mode!r}"


class _ConvGeometry:
    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding=0):
        self.in_channels, self.out_channels = in_channels, out_channels
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

    def forward(self, input, *, return_mask=False):
        return F.masked_conv2d(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                               **self._conv_kwargs(False), **self._schedule(), **self._options(return_mask))


class MaskedConvTranspose2d(_ConvGeometry, _PerWeightMasked):
    transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, *, mode="anneal", backend=None, device=None, dtype=None):
        _PerWeightMasked.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding)
        self._make_params(self._weight_shape(True), bias, factory)
        self._make_mask_state(factory)

    def forward(self, input, *, return_mask=False):
        return F.masked_conv_transpose2d(input, self.weight, self.scores, self.s, self.frozen, bias=self._live_bias(),
                                         **self._conv_kwargs(True), **self._schedule(), **self._options(return_mask))


class _UnitGated(MaskedLayer):
    """One score per output unit (DGMa, HAT); ``frozen_out`` / ``frozen_in`` (unit vectors) block the weight.

    ``input_masked=False`` (the first layer of a network) keeps no ``frozen_in``: the output unit alone
    decides whether a weight is frozen.
    """

    mask_kind = UNIT

    def _make_unit_state(self, input_masked: bool, factory) -> None:
        self.scores = nn.Parameter(torch.zeros(self.out_width, **factory))
        dev = self.weight.device
        # packed bits (dgm_kernels.bits), one per unit
        self.register_buffer("frozen_out", _no_bits(self.out_width, dev))
        self.register_buffer("frozen_in", _no_bits(self.in_width, dev) if input_masked else None)

    def set_frozen(self, frozen_out: torch.Tensor, frozen_in: torch.Tensor | None = None) -> None:
        """Freeze output units (and, for a layer with a masked input, input units): bool vectors or packed bits.

        A weight is frozen where its output unit and its input unit are both frozen.
        """
        dev = self.weight.device
        self.frozen_out = _as_bits("frozen_out", frozen_out, (self.out_width,), dev)
        if self.frozen_in is None:
            if frozen_in is not None:
                raise ValueError("frozen_in must be None for a layer built with input_masked=False")
        elif frozen_in is not None:
            self.frozen_in = _as_bits("frozen_in", frozen_in, (self.in_width,), dev)

    def _grow_frozen(self, old_mask_shape, old_weight_shape) -> None:
        self.frozen_out = _grown_bits(self.frozen_out, old_mask_shape, (self.out_width,))
        if self.frozen_in is not None:
            old_in = old_weight_shape[0] if self.transposed else old_weight_shape[1] * getattr(self, "groups", 1)
            self.frozen_in = _grown_bits(self.frozen_in, (old_in,), (self.in_width,))


class _ChannelGated(_ConvGeometry, _UnitGated):
    """DGMa on a convolution: one score per output channel (see :class:`_UnitGated`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, output_padding,
                 input_masked, mode, backend, device, dtype):
        MaskedLayer.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, output_padding)
        self._make_params(self._weight_shape(self.transposed), bias, factory)
        self._make_unit_state(input_masked, factory)

    def forward(self, input, norm=None, *, return_mask=False):
        """The gated convolution; with ``norm`` (a callable, e.g. a BatchNorm), the gate comes after it:
        ``norm(conv(input)) * m`` (a closed unit then emits exactly 0). ``return_mask``: also return m."""
        op = F.gated_conv_transpose2d if self.transposed else F.gated_conv2d
        return op(input, self.weight, self.scores, self.s, self.frozen_out, self.frozen_in, bias=self.bias,
                  norm=norm, **self._conv_kwargs(self.transposed), **self._schedule(), **self._options(return_mask))


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


class GatedLinear(_UnitGated):
    """A fully connected layer with one gate per output feature (HAT's unit mask; DGMa's dense layers).

    Weight ``[out_features, in_features]``; after a flatten of a gated convolution's ``[C, H, W]`` output, the
    ledger freezes input feature ``i`` with channel ``i // (H W)``.
    """

    linear = True

    def __init__(self, in_features, out_features, bias=True, *, input_masked=True, mode="anneal", backend=None,
                 device=None, dtype=None):
        MaskedLayer.__init__(self, mode, backend)
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self._make_params((out_features, in_features), bias, factory)
        self._make_unit_state(input_masked, factory)

    def forward(self, input, norm=None, *, return_mask=False):
        """The gated linear map; with ``norm`` (a callable, e.g. a BatchNorm1d), ``norm(linear(input)) * m``.
        ``return_mask``: also return m."""
        return F.gated_linear(input, self.weight, self.scores, self.s, self.frozen_out, self.frozen_in,
                              bias=self.bias, norm=norm, **self._schedule(), **self._options(return_mask))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_masked={self.frozen_in is not None}, mode={self.mode!r}")


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` (same parameters, initialisation and state dict) whose forward is
    :func:`dgm_kernels.functional.conv2d`: the backend's faster algorithm where it has one (the ``cpu`` backend: the
    backward of a 1-channel input's convolution, e.g. a WGAN-GP critic's first layer on MNIST, differentiable to any
    order). ``backend``: None follows the current default (``dgm_kernels.use_backend``). Padding modes other than
    zeros and string paddings run ``torch.nn.Conv2d``'s own forward."""

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(input)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                        backend=self.backend)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` (same parameters, initialisation and state dict) whose forward is
    :func:`dgm_kernels.functional.conv_transpose2d`: the backend's faster algorithm where it has one (the ``cpu``
    backend: e.g. a generator's last layer, to a 1-channel image). ``backend``: None follows the current
    default. Calls with ``output_size`` and padding modes other than zeros run ``torch.nn.ConvTranspose2d``'s own
    forward."""

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input, output_size=None):
        if output_size is not None or self.padding_mode != "zeros":
            return super().forward(input, output_size)
        return F.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation, backend=self.backend)
