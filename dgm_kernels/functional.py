"""The public ops of dgm_kernels: validation, backend choice, and the composition of a backend's primitives.

Every op takes ``backend=None`` (the current default, see ``dgm_kernels.set_backend``). Scores ``e`` are
real valued; ``s > 0`` is the annealing scale; ``mode`` is ``"anneal"`` (m = sigmoid(s e)) or ``"ste"``
(forward 1[e >= 0], backward through sigmoid's derivative); with ``s_max`` the scores' gradient is
HAT-compensated (SPEC section 3).

Two options on the mask and on every masked or gated op, off by default (the default path is unchanged):

- ``return_mask=True``: the op returns ``(output, m)``, where ``m`` is the mask it applied, differentiable (HAT's
  forward returns its masks, so that its regulariser does not compute them a second time). The op then runs as
  its composition (the mask op, then W * m or y * m in PyTorch) instead of a fused kernel: the same function.
- ``derivative="hat"``: the mask's gradient is computed as HAT's code computes it (``s y (1 - y)`` from the rounded
  y = sigmoid(s e), times its compensation), zero in float32 once ``s e`` passes ~16.6; ``"stable"`` (default) is
  this library's ``s sigmoid(s e) sigmoid(-s e)``, which never rounds to 0 there. For reproducing HAT's
  numbers; it always runs in PyTorch (no backend has a kernel for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, bits
from .backends import reference, resolve

__all__ = [
    "mask",
    "masked_weight",
    "masked_linear",
    "masked_conv2d",
    "masked_conv_transpose2d",
    "gated_conv2d",
    "gated_conv_transpose2d",
    "gated_linear",
    "conv2d",
    "conv_transpose2d",
    "sparsity_regularizer",
    "pack_bits",
    "DERIVATIVES",
]

#: how the mask is differentiated: "stable" (this library) or "hat" (HAT's own float formula)
DERIVATIVES = ("stable", "hat")


def _derivative(derivative) -> str:
    if not isinstance(derivative, str) or derivative not in DERIVATIVES:
        raise ValueError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
    return derivative


def _composed(return_mask, derivative) -> bool:
    """Whether an op runs as its composition around a mask tensor of its own (see the module docstring)."""
    if not isinstance(return_mask, bool):
        raise TypeError(f"return_mask must be a bool, got {type(return_mask).__name__}")
    return return_mask or _derivative(derivative) == "hat"


def _mask_of(impl, scores, s, code, s_max, derivative):
    if derivative == "hat":
        return reference.hat_mask(scores, s, code, s_max)  # HAT's formula: the spec, no kernel
    return impl.mask(scores, s, code, s_max)


def _gate_with(y, m):
    """y * m per unit of dim 1, on operands of one dtype (as ``_gate``: under autocast y may be half precision)."""
    if y.dtype != m.dtype:
        dtype = torch.promote_types(y.dtype, m.dtype)
        y, m = y.to(dtype), m.to(dtype)
    return reference.apply_gate(y, m)


def _common(weight, scores, s, mode, s_max, *, device=None):
    _checks.tensor("weight", weight, floating=True, device=device)
    _checks.tensor("scores", scores, floating=True, device=weight.device)
    _checks.same_dtype("scores", scores, "weight", weight)
    return _checks.scale("s", s), _checks.mode(mode), _checks.optional_scale("s_max", s_max)


def _frozen(name, frozen, shape, device):
    """A frozen argument: a bool tensor of ``shape``, or its packed bits (uint8, see dgm_kernels.bits)."""
    if frozen is None:
        return None
    if isinstance(frozen, torch.Tensor) and frozen.dtype == torch.uint8:
        bits.check_packed(name, frozen, shape, device)
        return frozen
    return _checks.tensor(name, frozen, dtype=torch.bool, device=device, shape=shape)


def _bias(bias, out_channels, weight):
    if bias is None:
        return None
    _checks.tensor("bias", bias, device=weight.device, shape=(out_channels,))
    _checks.same_dtype("bias", bias, "weight", weight)
    return bias


def mask(scores, s, *, mode="anneal", s_max=None, backend=None, derivative="stable"):
    """The mask m(e) of ``scores`` at scale ``s``: sigmoid(s e) (anneal) or 1[e >= 0] (ste); ``derivative``:
    ``"stable"`` or ``"hat"`` (HAT's own float formula, see the module docstring)."""
    _checks.tensor("scores", scores, floating=True)
    s, code, s_max = _checks.scale("s", s), _checks.mode(mode), _checks.optional_scale("s_max", s_max)
    return _mask_of(resolve(backend, scores.device), scores, s, code, s_max, _derivative(derivative))


def masked_weight(weight, scores, s, frozen=None, *, mode="anneal", s_max=None, backend=None):
    """W * m(e) (DGMw). ``scores`` and ``frozen`` have the weight's shape; frozen entries get no gradient."""
    s, code, s_max = _common(weight, scores, s, mode, s_max)
    _checks.tensor("scores", scores, shape=weight.shape)
    frozen = _frozen("frozen", frozen, weight.shape, weight.device)
    return resolve(backend, weight.device).masked_weight(weight, scores, s, frozen, code, s_max)


def _linear_geometry(input, weight) -> None:
    """A linear layer's input [..., in_features] against its weight [out_features, in_features]."""
    _checks.tensor("input", input, floating=True)
    _checks.tensor("weight", weight, ndim=2)
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input must have in_features={weight.shape[1]} in its last dimension, got shape {tuple(input.shape)}"
        )
    _checks.tensor("weight", weight, device=input.device)
    _checks.same_dtype("weight", weight, "input", input)


def masked_linear(input, weight, scores, s, frozen=None, *, bias=None, mode="anneal", s_max=None, backend=None,
                  return_mask=False, derivative="stable"):
    """``input @ (W * m(e)).T + bias`` with W of shape ``[out_features, in_features]``; ``return_mask`` and
    ``derivative``: see the module docstring."""
    _linear_geometry(input, weight)
    if not _composed(return_mask, derivative):
        w = masked_weight(weight, scores, s, frozen, mode=mode, s_max=s_max, backend=backend)
        return F.linear(input, w, _bias(bias, weight.shape[0], weight))
    s, code, s_max = _common(weight, scores, s, mode, s_max)
    _checks.tensor("scores", scores, shape=weight.shape)
    frozen = _frozen("frozen", frozen, weight.shape, weight.device)
    m = _mask_of(resolve(backend, weight.device), scores, s, code, s_max, derivative)
    out = F.linear(input, reference.apply_weight_mask(weight, m, frozen), _bias(bias, weight.shape[0], weight))
    return (out, m) if return_mask else out


def _conv_geometry(input, weight, *, transposed, stride, padding, dilation, groups, output_padding=0):
    _checks.tensor("input", input, floating=True, ndim=(3, 4))
    _checks.tensor("weight", weight, floating=True, ndim=4, device=input.device)
    _checks.same_dtype("weight", weight, "input", input)
    groups = _checks.positive_int("groups", groups)
    geo = dict(
        stride=_checks.pair("stride", stride, minimum=1),
        padding=_checks.pair("padding", padding, minimum=0),
        dilation=_checks.pair("dilation", dilation, minimum=1),
        groups=groups,
    )
    in_channels = input.shape[-3]
    if transposed:
        geo["output_padding"] = _checks.pair("output_padding", output_padding, minimum=0)
        expected_in, out_channels = weight.shape[0], weight.shape[1] * groups
        layout = "[in_channels, out_channels / groups, kH, kW]"
        if weight.shape[0] % groups:
            raise ValueError(f"weight.shape[0] (in_channels={weight.shape[0]}) must be divisible by groups={groups}")
    else:
        expected_in, out_channels = weight.shape[1] * groups, weight.shape[0]
        layout = "[out_channels, in_channels / groups, kH, kW]"
        if weight.shape[0] % groups:
            raise ValueError(f"weight.shape[0] (out_channels={weight.shape[0]}) must be divisible by groups={groups}")
    if in_channels != expected_in:
        raise ValueError(
            f"input must have {expected_in} channels for a weight of shape {tuple(weight.shape)} "
            f"(layout {layout}, groups={groups}), got {in_channels} (input shape {tuple(input.shape)})"
        )
    return geo, out_channels


def _conv(input, weight, bias, transposed, geo, impl=None, any_layout=True):
    """The convolution step of the masked/gated compositions: the backend's algorithm (its ``conv`` hook) where it
    has one for this call, else ATen's. ``any_layout``: the caller takes an output in any memory layout."""
    if impl is not None:
        out = impl.conv(input, weight, bias, transposed, geo, any_layout)
        if out is not NotImplemented:
            return out
    if transposed:
        return F.conv_transpose2d(
            input, weight, bias, geo["stride"], geo["padding"], geo["output_padding"], geo["groups"], geo["dilation"]
        )
    return F.conv2d(input, weight, bias, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])


def _gate(impl, y, scores, s, code, s_max):
    """The backend's channel gate on operands of one dtype: under autocast the convolution's output may be
    bfloat16 or float16 while the scores stay float32; the result then has the promoted dtype, as the
    reference's ``y * m`` has, on every backend."""
    if y.dtype != scores.dtype:
        dtype = torch.promote_types(y.dtype, scores.dtype)
        y, scores = y.to(dtype), scores.to(dtype)
    return impl.channel_gate(y, scores, s, code, s_max)


def _autocasting(x) -> bool:
    """Under autocast the fused convolutions (custom ops, which autocast does not cast) would compute in another
    dtype than ATen's autocast convolution of the composition: they step aside, so that every backend gives the
    reference's dtypes."""
    return torch.is_autocast_enabled(x.device.type)


def _batched(input):
    return (input.unsqueeze(0), True) if input.dim() == 3 else (input, False)


def _masked_conv(transposed, input, weight, scores, s, frozen, bias, geo, out_channels, mode, s_max, backend,
                 return_mask=False, derivative="stable"):
    composed = _composed(return_mask, derivative)
    s, code, s_max = _common(weight, scores, s, mode, s_max)
    _checks.tensor("scores", scores, shape=weight.shape)
    frozen = _frozen("frozen", frozen, weight.shape, weight.device)
    bias = _bias(bias, out_channels, weight)
    impl = resolve(backend, input.device)
    x, unbatched = _batched(input)
    if composed:
        m = _mask_of(impl, scores, s, code, s_max, derivative)
        out = _conv(x, reference.apply_weight_mask(weight, m, frozen), bias, transposed, geo, impl)
        out = out.squeeze(0) if unbatched else out
        return (out, m) if return_mask else out
    out = NotImplemented
    if not _autocasting(x):
        out = impl.masked_conv(x, weight, scores, s, frozen, bias, transposed, geo, code, s_max)
    if out is NotImplemented:
        out = _conv(x, impl.masked_weight(weight, scores, s, frozen, code, s_max), bias, transposed, geo, impl)
    return out.squeeze(0) if unbatched else out


def masked_conv2d(
    input, weight, scores, s, frozen=None, *, bias=None, stride=1, padding=0, dilation=1, groups=1,
    mode="anneal", s_max=None, backend=None, return_mask=False, derivative="stable",
):
    """conv2d(input, W * m(e)) (DGMw); W is ``[out, in/groups, kH, kW]``; frozen weights get no gradient.
    ``return_mask`` and ``derivative``: see the module docstring."""
    geo, out_channels = _conv_geometry(
        input, weight, transposed=False, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _masked_conv(False, input, weight, scores, s, frozen, bias, geo, out_channels, mode, s_max, backend,
                        return_mask, derivative)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, backend=None):
    """``F.conv2d`` with the backend's algorithm where it has a faster one for the call, else ATen's; the same
    values (to float rounding) and gradients of every order. The ``cpu`` backend runs the backward of a
    convolution of a 1-channel input (an MNIST critic's or classifier's first layer) on its own kernels
    (``dgm_kernels/backends/thin_conv.py``); other backends and calls are ``F.conv2d``."""
    geo, out_channels = _conv_geometry(
        input, weight, transposed=False, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _plain_conv(False, input, weight, bias, geo, out_channels, backend)


def _plain_conv(transposed, input, weight, bias, geo, out_channels, backend):
    # the backend's hook decides per call (and steps aside under autocast where its kernels would change dtypes)
    bias = _bias(bias, out_channels, weight)
    x, unbatched = _batched(input)
    out = _conv(x, weight, bias, transposed, geo, resolve(backend, input.device))
    return out.squeeze(0) if unbatched else out


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     backend=None):
    """``F.conv_transpose2d`` with the backend's algorithm where it has a faster one for the call, else ATen's (the
    ``cpu`` backend: a 1x1 input as one matrix product, a 1-channel output, e.g. an MNIST generator's last layer, on
    its own kernels, other shapes on a channels-last input); the same values to float rounding, gradients of every
    order. The output may be channels-last."""
    geo, out_channels = _conv_geometry(
        input, weight, transposed=True, stride=stride, padding=padding, dilation=dilation, groups=groups,
        output_padding=output_padding,
    )
    return _plain_conv(True, input, weight, bias, geo, out_channels, backend)


def masked_conv_transpose2d(
    input, weight, scores, s, frozen=None, *, bias=None, stride=1, padding=0, output_padding=0, groups=1,
    dilation=1, mode="anneal", s_max=None, backend=None, return_mask=False, derivative="stable",
):
    """conv_transpose2d(input, W * m(e)) (DGMw); W is ``[in, out/groups, kH, kW]``. ``return_mask`` and
    ``derivative``: see the module docstring."""
    geo, out_channels = _conv_geometry(
        input, weight, transposed=True, stride=stride, padding=padding, dilation=dilation, groups=groups,
        output_padding=output_padding,
    )
    return _masked_conv(True, input, weight, scores, s, frozen, bias, geo, out_channels, mode, s_max, backend,
                        return_mask, derivative)


def _gated_conv(transposed, input, weight, scores, s, frozen_out, frozen_in, bias, geo, out_channels, mode, s_max, backend,
                norm=None, return_mask=False, derivative="stable"):
    composed = _composed(return_mask, derivative)
    s, code, s_max = _common(weight, scores, s, mode, s_max)
    _checks.tensor("scores", scores, shape=(out_channels,))
    in_channels = weight.shape[0] if transposed else weight.shape[1] * geo["groups"]
    frozen_out = _frozen("frozen_out", frozen_out, (out_channels,), weight.device)
    frozen_in = _frozen("frozen_in", frozen_in, (in_channels,), weight.device)
    bias = _bias(bias, out_channels, weight)
    impl = resolve(backend, input.device)
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be None or a callable (e.g. a BatchNorm module), got {type(norm).__name__}")
    x, unbatched = _batched(input)
    out = m = NotImplemented
    if norm is None and not composed and not _autocasting(x):
        # a fused kernel gates in its epilogue: no room for a norm before it, nor a mask to hand back
        out = impl.gated_conv(x, weight, scores, s, frozen_out, frozen_in, bias, transposed, geo, code, s_max)
    if out is NotImplemented:
        if frozen_out is not None:
            weight = impl.block_unit_grad(weight, frozen_out, frozen_in, transposed, geo["groups"])
            if bias is not None:  # a frozen unit's bias is part of what the old task generates with
                bias = torch.where(bits.as_dense(frozen_out, (out_channels,)), bias.detach(), bias)
        y = _conv(x, weight, bias, transposed, geo, impl, any_layout=False)
        if norm is not None:
            y = norm(y)
        if composed:
            m = _mask_of(impl, scores, s, code, s_max, derivative)
            out = _gate_with(y, m)
        else:
            out = _gate(impl, y, scores, s, code, s_max)
    out = out.squeeze(0) if unbatched else out
    return (out, m) if return_mask else out


def gated_conv2d(
    input, weight, scores, s, frozen_out=None, frozen_in=None, *, bias=None, stride=1, padding=0, dilation=1,
    groups=1, mode="anneal", s_max=None, backend=None, norm=None, return_mask=False, derivative="stable",
):
    """conv2d(input, W) + bias, multiplied per output channel by m(e) (DGMa).

    ``scores`` has one entry per output channel. The weight's gradient is zero where both the output unit
    (``frozen_out``) and the input unit (``frozen_in``; None: the input is not masked, only the output
    decides) are frozen; the bias of a frozen output unit gets no gradient either. ``norm`` (a callable such as
    a BatchNorm module): the gate comes after it, ``norm(conv(input, W) + bias) * m(e)``, so that a closed unit
    emits exactly 0. ``return_mask`` and ``derivative``: see the module docstring.
    """
    geo, out_channels = _conv_geometry(
        input, weight, transposed=False, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _gated_conv(False, input, weight, scores, s, frozen_out, frozen_in, bias, geo, out_channels, mode, s_max, backend,
                       norm, return_mask, derivative)


def gated_conv_transpose2d(
    input, weight, scores, s, frozen_out=None, frozen_in=None, *, bias=None, stride=1, padding=0,
    output_padding=0, groups=1, dilation=1, mode="anneal", s_max=None, backend=None, norm=None, return_mask=False,
    derivative="stable",
):
    """conv_transpose2d(input, W) + bias, multiplied per output channel by m(e) (DGMa); ``norm``, ``return_mask``
    and ``derivative`` as for :func:`gated_conv2d`."""
    geo, out_channels = _conv_geometry(
        input, weight, transposed=True, stride=stride, padding=padding, dilation=dilation, groups=groups,
        output_padding=output_padding,
    )
    return _gated_conv(True, input, weight, scores, s, frozen_out, frozen_in, bias, geo, out_channels, mode, s_max, backend,
                       norm, return_mask, derivative)


def gated_linear(
    input, weight, scores, s, frozen_out=None, frozen_in=None, *, bias=None, mode="anneal", s_max=None,
    backend=None, norm=None, return_mask=False, derivative="stable",
):
    """``(input @ W.T + bias) * m(e)`` per output feature, W of shape ``[out_features, in_features]`` (HAT's unit
    gate on a fully connected layer; DGMa's on a classifier or a generator's dense block).

    ``scores`` has one entry per output feature. As for :func:`gated_conv2d`: the weight's gradient is zero where
    the output feature (``frozen_out``) and the input feature (``frozen_in``; None: only the output decides) are
    both frozen, the bias of a frozen output feature gets no gradient, and ``norm`` (a callable such as a
    ``BatchNorm1d``) comes before the gate. ``input`` is ``[..., in_features]``; the gate acts on the last dim.
    ``return_mask`` and ``derivative``: see the module docstring.
    """
    composed = _composed(return_mask, derivative)
    _linear_geometry(input, weight)
    s, code, s_max = _common(weight, scores, s, mode, s_max)
    out_features, in_features = weight.shape
    _checks.tensor("scores", scores, shape=(out_features,))
    frozen_out = _frozen("frozen_out", frozen_out, (out_features,), weight.device)
    frozen_in = _frozen("frozen_in", frozen_in, (in_features,), weight.device)
    bias = _bias(bias, out_features, weight)
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be None or a callable (e.g. a BatchNorm1d module), got {type(norm).__name__}")
    impl = resolve(backend, input.device)
    if frozen_out is not None:
        # the same primitive as the gated convolutions: a linear weight is their [out, in] layout with no taps
        weight = impl.block_unit_grad(weight, frozen_out, frozen_in, False, 1)
        if bias is not None:
            bias = torch.where(bits.as_dense(frozen_out, (out_features,)), bias.detach(), bias)
    y = F.linear(input, weight, bias)
    if norm is not None:
        y = norm(y)
    # channel_gate gates dim 1: any leading dims fold into the batch, the features become the channels
    if composed:
        m = _mask_of(impl, scores, s, code, s_max, derivative)
        out = _gate_with(y.reshape(-1, out_features), m).reshape(y.shape[:-1] + (out_features,))
        return (out, m) if return_mask else out
    out = _gate(impl, y.reshape(-1, out_features), scores, s, code, s_max)
    return out.reshape(y.shape[:-1] + (out_features,))


def sparsity_regularizer(masks, reserved=None, *, backend=None, soft=False):
    """R = sum_l sum_i m_i (1 - M_i) / sum_l sum_i (1 - M_i) over all masked layers (SPEC section 3).

    ``masks``: the current masks m of every layer (float tensors); ``reserved``: the cumulative binary
    masks M of earlier tasks (bool tensors of the same shapes), or None (first task: R = sum m / count).
    Entries of the list may be None for layers with nothing reserved yet. R is 0 when nothing is free. Sums and
    counts are kept in float32 (float64 for float64 masks), and so is R: in float16 they overflow past 65504.

    ``soft=True``: the entries of ``reserved`` are floating tensors in [0, 1], HAT's soft cumulative mask (the max
    over finished tasks of sigmoid(s_max e_t)); the terms are then sum m (1 - M) and sum (1 - M), computed in
    PyTorch whatever the backend (no kernel takes a real-valued M).
    """
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)) or not masks:
        raise TypeError(f"masks must be a non-empty list of tensors, got {type(masks).__name__}")
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__}")
    if reserved is None:
        reserved = [None] * len(masks)
    if isinstance(reserved, torch.Tensor) or not isinstance(reserved, (list, tuple)) or len(reserved) != len(masks):
        got = len(reserved) if isinstance(reserved, (list, tuple)) else type(reserved).__name__
        raise ValueError(f"reserved must be None or a list of {len(masks)} entries (one per mask), got {got}")
    first = _checks.tensor("masks[0]", masks[0], floating=True)
    for i, (m, r) in enumerate(zip(masks, reserved)):
        _checks.tensor(f"masks[{i}]", m, floating=True, device=first.device)
        _checks.same_dtype(f"masks[{i}]", m, "masks[0]", first)
        if r is not None:
            if soft:
                _checks.tensor(f"reserved[{i}]", r, floating=True, device=first.device, shape=m.shape)
            else:
                _checks.tensor(f"reserved[{i}]", r, dtype=torch.bool, device=first.device, shape=m.shape)
    impl = resolve(backend, first.device)
    terms_of = reference.soft_sparsity_terms if soft else impl.sparsity_terms
    terms = [impl.sparsity_terms(m, None) if r is None else terms_of(m, r) for m, r in zip(masks, reserved)]
    numerator = torch.stack([t[0] for t in terms]).sum()
    free = torch.stack([t[1] for t in terms]).sum()
    return numerator / free.clamp(min=1)


def pack_bits(mask, *, backend=None):
    """Pack a bool tensor into bits (the layout of :mod:`dgm_kernels.bits`) with the backend's kernel."""
    _checks.tensor("mask", mask, dtype=torch.bool)
    return resolve(backend, mask.device).pack_bits(mask)
