"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``dgm_kernels._C`` as torch custom ops.

``dgm_kernels._C`` defines the ops ``torch.ops.dgm_kernels.*`` (schemas: ``csrc/ops.cpp``) with CPU kernels
(``csrc/cpu``) and, when built with CUDA, CUDA kernels (``csrc/cuda``). This module adds what makes them
first-class PyTorch ops: a fake (meta) kernel for each, so ``torch.compile`` and ``torch.library.opcheck``
can trace them without running them, and autograd formulas that call the fused backward ops. It then wraps
them in the backend contract of :mod:`dgm_kernels.backends` (same signatures as ``ReferenceBackend``).

Conventions of the ops: ``mode`` is the integer code of :mod:`dgm_kernels._modes`; ``s_max <= 0`` means
"no HAT compensation" (the Python ``None``); ``frozen*`` are bool tensors, their packed bits (uint8, the
layout of :mod:`dgm_kernels.bits`; the kernels read the bits themselves) or ``None``; ``reserved`` is a bool
tensor or ``None``.

The mask ledger's kernels are ops too: ``pack_bits``, ``union_count`` and the in-place optimizer steps
``masked_adam_step`` / ``masked_sgd_step`` (mutable arguments declared in their schemas, so torch.compile
and functionalization know what they write).

Importing this module fails with ImportError when the extension was not built; the backend registry turns
that into a "could not be loaded" reason.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import _C  # noqa: F401  (loading the library registers the ops and their CPU/CUDA kernels)
from .._cuda_archs import cuda_arch_reason
from . import reference, thin_conv
from .contract import Backend

_ops = torch.ops.dgm_kernels

# The CPU kernels compute in float32/float64; half-precision CPU tensors are computed in float32 and the
# result rounded back (autograd differentiates the casts). The CUDA kernels take every floating dtype.
_CPU_NATIVE = (torch.float32, torch.float64)


def _s_max_arg(s_max) -> float:
    return 0.0 if s_max is None else float(s_max)


# --------------------------------------------------------------------------------------------------------
# fake kernels: output metadata only (shapes, dtypes, devices; every output is contiguous)
# --------------------------------------------------------------------------------------------------------
def _fake_check(condition: bool, op: str, message: str) -> None:
    # raised while tracing (torch.compile, opcheck), with the words the real kernels use
    torch._check(condition, lambda: f"dgm_kernels::{op}: {message}")


@torch.library.register_fake("dgm_kernels::mask_forward")
def _mask_forward_fake(scores, s, mode, s_max):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgm_kernels::mask_backward")
def _mask_backward_fake(grad_m, scores, s, s_max):
    _fake_check(grad_m.shape == scores.shape, "mask_backward", "grad_m must have the shape of scores")
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgm_kernels::masked_weight_forward")
def _masked_weight_forward_fake(weight, scores, frozen, s, mode, s_max):
    _fake_check(scores.shape == weight.shape, "masked_weight_forward", "scores must have the shape of weight")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgm_kernels::masked_weight_backward")
def _masked_weight_backward_fake(grad, weight, scores, frozen, s, s_max, mode):
    _fake_check(grad.shape == weight.shape, "masked_weight_backward", "grad must have the shape of weight")
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dgm_kernels::gate_forward")
def _gate_forward_fake(y_pre, scores, s, mode, s_max):
    _fake_check(y_pre.dim() >= 2, "gate_forward", "y_pre must have at least 2 dimensions [N, C, ...]")
    _fake_check(scores.dim() == 1 and scores.shape[0] == y_pre.shape[1], "gate_forward",
                "scores must have one entry per channel (dim 1) of y_pre")
    return torch.empty_like(y_pre, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgm_kernels::gate_backward")
def _gate_backward_fake(grad_y, y_pre, scores, s, s_max, mode):
    _fake_check(grad_y.shape == y_pre.shape, "gate_backward", "grad_y must have the shape of y_pre")
    return (
        torch.empty_like(y_pre, memory_format=torch.contiguous_format),
        torch.empty_like(scores, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dgm_kernels::block_unit_grad")
def _block_unit_grad_fake(grad_weight, frozen_out, frozen_in, transposed, groups):
    return torch.empty_like(grad_weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("dgm_kernels::sparsity_terms")
def _sparsity_terms_fake(mask, reserved):
    return mask.new_empty((2,))


@torch.library.register_fake("dgm_kernels::pack_bits")
def _pack_bits_fake(mask):
    _fake_check(mask.dtype == torch.bool, "pack_bits", "mask must be a bool tensor")
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("dgm_kernels::union_count")
def _union_count_fake(reserved_bits, task_bits, outer, units, inner):
    nbytes = (outer * units * inner + 7) // 8
    _fake_check(reserved_bits.dim() == 1 and reserved_bits.shape[0] == nbytes, "union_count",
                "reserved_bits must hold ceil(outer * units * inner / 8) bytes")
    _fake_check(task_bits.shape == reserved_bits.shape, "union_count", "task_bits must have the shape of reserved_bits")
    return reserved_bits.new_empty((nbytes,)), reserved_bits.new_empty((units,), dtype=torch.int64)


@torch.library.register_fake("dgm_kernels::masked_adam_step")
def _masked_adam_step_fake(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _fake_check(t.shape == param.shape, "masked_adam_step", f"{name} must have the shape of param")
    return None


@torch.library.register_fake("dgm_kernels::masked_sgd_step")
def _masked_sgd_step_fake(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
    _fake_check(grad.shape == param.shape, "masked_sgd_step", "grad must have the shape of param")
    return None


# --------------------------------------------------------------------------------------------------------
# autograd: every forward op's backward is one fused op
#
# Each formula is stated once, in the table of _Formula entries below, and two autograd paths are generated from it:
# - registered on the op (torch.library.register_autograd): what torch.compile, opcheck and anyone calling
#   torch.ops.dgm_kernels.* directly use;
# - a small torch.autograd.Function that the backend calls in eager mode: torch.library's generic Python
#   autograd wrapper costs more per call than the kernels themselves on DGM-sized tensors (a 24x12x4x4
#   weight); figures in docs/performance.md, "Autograd of the compiled ops".
# --------------------------------------------------------------------------------------------------------
class _Formula(NamedTuple):
    """The autograd of one forward op of dgm_kernels._C.

    ``save(*inputs)`` returns the tensors to save for the backward (None allowed) and the other inputs it
    needs; ``grads(grad_out, *saved_tensors, *others)`` returns one gradient per input of the op (None for
    the non-differentiable ones).
    """

    op: str
    save: Callable[..., tuple[tuple, tuple]]
    grads: Callable[..., tuple]


def _sparsity_grad(grad, reserved, mask_shape):
    # d(sum over free m)/dm = free; the count has no gradient
    g = grad[0].expand(mask_shape)
    if reserved is not None:
        g = torch.where(reserved, torch.zeros_like(g), g)
    return g


# The eager path skips autograd at the dispatcher inside its forward (the mechanism torch.library's own
# wrapper uses), so the op goes straight to its CPU/CUDA kernel.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _use_eager_functions() -> bool:
    # under torch.compile (and if the private guard ever disappears) the registered formulas are used
    return _below_autograd is not None and not torch.compiler.is_compiling()


def _with_autograd(formula: _Formula) -> Callable:
    """Register ``formula`` on its op and return the function the backend calls the op through."""
    op = getattr(_ops, formula.op)

    # the parameter names are those torch.library passes by keyword
    def setup_context(ctx, inputs, output):
        tensors, ctx.others = formula.save(*inputs)
        ctx.save_for_backward(*tensors)

    def backward_of(ctx, grad):
        return formula.grads(grad, *ctx.saved_tensors, *ctx.others)

    torch.library.register_autograd(f"dgm_kernels::{formula.op}", backward_of, setup_context=setup_context)

    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        with _below_autograd():
            return op(*inputs)

    # made with type() so that the name (and the grad_fn's, "_MaskForwardFnBackward") names the op
    name = "_" + "".join(word.capitalize() for word in formula.op.split("_")) + "Fn"
    eager_fn = type(name, (torch.autograd.Function,), {
        "__module__": __name__, "forward": staticmethod(forward), "backward": staticmethod(backward_of)})

    def call(*inputs):
        return eager_fn.apply(*inputs) if _use_eager_functions() else op(*inputs)

    return call


# the table: one entry per forward op
_mask = _with_autograd(_Formula(
    "mask_forward",  # (scores, s, mode, s_max) -> m
    save=lambda scores, s, mode, s_max: ((scores,), (s, s_max)),
    grads=lambda grad_m, scores, s, s_max: (_ops.mask_backward(grad_m, scores, s, s_max), None, None, None),
))
_masked_weight = _with_autograd(_Formula(
    "masked_weight_forward",  # (weight, scores, frozen, s, mode, s_max) -> weight * m
    save=lambda weight, scores, frozen, s, mode, s_max: ((weight, scores, frozen), (s, mode, s_max)),
    grads=lambda grad, weight, scores, frozen, s, mode, s_max: (
        *_ops.masked_weight_backward(grad, weight, scores, frozen, s, s_max, mode), None, None, None, None
    ),
))
_gate = _with_autograd(_Formula(
    "gate_forward",  # (y_pre, scores, s, mode, s_max) -> y_pre * m per channel
    save=lambda y_pre, scores, s, mode, s_max: ((y_pre, scores), (s, mode, s_max)),
    grads=lambda grad_y, y_pre, scores, s, mode, s_max: (
        *_ops.gate_backward(grad_y, y_pre, scores, s, s_max, mode), None, None, None
    ),
))
_sparsity_terms = _with_autograd(_Formula(
    "sparsity_terms",  # (mask, reserved) -> [sum of free m, count of free entries]
    save=lambda mask, reserved: ((reserved,), (mask.shape,)),
    grads=lambda grad, reserved, mask_shape: (_sparsity_grad(grad, reserved, mask_shape), None),
))


class _BlockUnitGrad(torch.autograd.Function):
    """Identity forward; the backward zeroes the weight gradient of frozen units (dgm_kernels::block_unit_grad).

    Not an _Formula: its forward is no op of dgm_kernels._C, so there is no op to register a formula on, and
    this Function is its only autograd path (eager and torch.compile alike).

    The forward returns a view of the weight rather than a copy: DGMa weights go straight into a
    convolution, and a copy per step would cost as much as the op saves.
    """

    @staticmethod
    def forward(ctx, weight, frozen_out, frozen_in, transposed, groups):
        ctx.save_for_backward(frozen_out, frozen_in)
        ctx.transposed, ctx.groups = transposed, groups
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        frozen_out, frozen_in = ctx.saved_tensors
        return _ops.block_unit_grad(grad, frozen_out, frozen_in, ctx.transposed, ctx.groups), None, None, None, None


# --------------------------------------------------------------------------------------------------------
# tensor scales: mask_forward, masked_weight_forward and gate_forward with s and s_max as 0-dim tensors
#
# The kernels take s as a float argument, and torch.compile makes a float argument a constant of its graph: an
# annealed s (a new value every training iteration) would recompile the graph every iteration, and dynamo gives
# up after its recompile limit. Under torch.compile the backend calls these ops instead when the caller gives s
# as a tensor (``tensor_scales``): s and s_max are then inputs of the graph, read when the op runs, so one graph
# serves every value. They run the same kernels with the same float64 values as the eager path. Eager calls never
# come here (a tensor s is turned into a float by dgm_kernels._checks.scale outside torch.compile).
# Tagged cudagraph_unsafe: the value is read on the host when the op runs, which a CUDA graph replay would skip
# (torch.compile keeps these ops out of its CUDA graphs).
# --------------------------------------------------------------------------------------------------------
_HOST_READ = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _tensor_op(name, fake):
    def register(fn):
        op = torch.library.custom_op(f"dgm_kernels_ts::{name}", fn, mutates_args=(), tags=_HOST_READ)
        op.register_fake(fake)
        return op
    return register


def _like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@_tensor_op("mask_forward", lambda scores, s, mode, s_max: _like(scores))
def _mask_forward_ts(scores: torch.Tensor, s: torch.Tensor, mode: int, s_max: torch.Tensor) -> torch.Tensor:
    return _ops.mask_forward(scores, float(s), mode, float(s_max))


@_tensor_op("mask_backward", lambda grad_m, scores, s, s_max: _like(scores))
def _mask_backward_ts(grad_m: torch.Tensor, scores: torch.Tensor, s: torch.Tensor, s_max: torch.Tensor) -> torch.Tensor:
    return _ops.mask_backward(grad_m, scores, float(s), float(s_max))


@_tensor_op("masked_weight_forward", lambda weight, scores, frozen, s, mode, s_max: _like(weight))
def _masked_weight_forward_ts(weight: torch.Tensor, scores: torch.Tensor, frozen: torch.Tensor | None,
                              s: torch.Tensor, mode: int, s_max: torch.Tensor) -> torch.Tensor:
    return _ops.masked_weight_forward(weight, scores, frozen, float(s), mode, float(s_max))


@_tensor_op("masked_weight_backward", lambda grad, weight, scores, frozen, s, s_max, mode: (_like(weight), _like(weight)))
def _masked_weight_backward_ts(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                               frozen: torch.Tensor | None, s: torch.Tensor, s_max: torch.Tensor,
                               mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.masked_weight_backward(grad, weight, scores, frozen, float(s), float(s_max), mode)


@_tensor_op("gate_forward", lambda y_pre, scores, s, mode, s_max: _like(y_pre))
def _gate_forward_ts(y_pre: torch.Tensor, scores: torch.Tensor, s: torch.Tensor, mode: int,
                     s_max: torch.Tensor) -> torch.Tensor:
    return _ops.gate_forward(y_pre, scores, float(s), mode, float(s_max))


@_tensor_op("gate_backward", lambda grad_y, y_pre, scores, s, s_max, mode: (_like(y_pre), _like(scores)))
def _gate_backward_ts(grad_y: torch.Tensor, y_pre: torch.Tensor, scores: torch.Tensor, s: torch.Tensor,
                      s_max: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ops.gate_backward(grad_y, y_pre, scores, float(s), float(s_max), mode)


def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor) or t is None))
    ctx.mode = next(v for v in inputs if isinstance(v, int) and not isinstance(v, bool))


def _mask_ts_backward(ctx, grad_m):
    scores, s, s_max = ctx.saved_tensors
    return _mask_backward_ts(grad_m, scores, s, s_max), None, None, None


def _masked_weight_ts_backward(ctx, grad):
    weight, scores, frozen, s, s_max = ctx.saved_tensors
    grad_w, grad_e = _masked_weight_backward_ts(grad, weight, scores, frozen, s, s_max, ctx.mode)
    return grad_w, grad_e, None, None, None, None


def _gate_ts_backward(ctx, grad_y):
    y_pre, scores, s, s_max = ctx.saved_tensors
    grad_y_pre, grad_e = _gate_backward_ts(grad_y, y_pre, scores, s, s_max, ctx.mode)
    return grad_y_pre, grad_e, None, None, None


_mask_forward_ts.register_autograd(_mask_ts_backward, setup_context=_save_all)
_masked_weight_forward_ts.register_autograd(_masked_weight_ts_backward, setup_context=_save_all)
_gate_forward_ts.register_autograd(_gate_ts_backward, setup_context=_save_all)


def _scale_tensor(value) -> torch.Tensor:
    # s_max None (no compensation) is 0.0 for the kernels, as in _s_max_arg
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(_s_max_arg(value), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# the backend objects
# --------------------------------------------------------------------------------------------------------
def cuda_built() -> bool:
    """True when ``dgm_kernels._C`` holds the CUDA kernels."""
    return bool(_C.cuda_built())


def cuda_archs() -> list[str]:
    """The GPU architectures the CUDA kernels were built for (``sm_80``: a cubin, ``compute_90``: PTX); empty
    without CUDA kernels, or for a library built before the list was recorded (then no GPU is turned down)."""
    archs = getattr(_C, "cuda_archs", None)
    return list(archs()) if archs is not None else []


def _device_index(device) -> int:
    if device is None or torch.device(device).index is None:
        return torch.cuda.current_device()
    return torch.device(device).index


class CompiledBackend(Backend):
    """The compiled kernels on one device type: ``CompiledBackend("cpu")`` or ``CompiledBackend("cuda")``."""

    tensor_scales = True

    def __init__(self, name: str):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"CompiledBackend name must be 'cpu' or 'cuda', got {name!r}")
        self.name = name
        self._device_type = name
        # device index -> cuda_arch_reason of its GPU: unavailable_reason runs on every op call (resolve)
        self._arch_reasons: dict[int, str | None] = {}

    def __repr__(self) -> str:
        return f"CompiledBackend({self.name!r})"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        if device is not None and torch.device(device).type != self._device_type:
            return f"the {self.name} backend runs on {self.name.upper()} tensors; got {torch.device(device).type}"
        if self.name == "cpu":
            return None
        if not _C.cuda_built():
            why = _C.cuda_skip_reason()
            return (
                "dgm_kernels._C was built without CUDA kernels"
                + (f" ({why})" if why else "")
                + "; rebuild with a CUDA build of torch and nvcc (DGM_KERNELS_CUDA=1 pip install --no-build-isolation .)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        if device is None:
            # "any device of this machine": runnable when one GPU can run the kernels, else the first one's reason
            reasons = [self._arch_reason(i) for i in range(torch.cuda.device_count())]
            return None if not reasons or None in reasons else reasons[0]
        return self._arch_reason(_device_index(device))

    def _arch_reason(self, index: int) -> str | None:
        """Why GPU ``index`` cannot run the built architectures (its compute capability against cuda_archs())."""
        if index not in self._arch_reasons:
            capability = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
            self._arch_reasons[index] = cuda_arch_reason(capability, cuda_archs(), f"GPU {index} ({name})")
        return self._arch_reasons[index]

    # Half-precision tensors on the CPU go through float32 (see _CPU_NATIVE).
    def _native(self, t: torch.Tensor) -> bool:
        return self.name == "cuda" or t.dtype in _CPU_NATIVE

    def mask(self, scores, s, mode, s_max):
        if not self._native(scores):
            return self.mask(scores.float(), s, mode, s_max).to(scores.dtype)
        if isinstance(s, torch.Tensor):  # under torch.compile only (see "tensor scales")
            return _mask_forward_ts(scores, s, int(mode), _scale_tensor(s_max))
        args = (scores, float(s), int(mode), _s_max_arg(s_max))
        return _mask(*args)

    def masked_weight(self, weight, scores, s, frozen, mode, s_max):
        if not self._native(weight):
            return self.masked_weight(weight.float(), scores.float(), s, frozen, mode, s_max).to(weight.dtype)
        if isinstance(s, torch.Tensor):
            return _masked_weight_forward_ts(weight, scores, frozen, s, int(mode), _scale_tensor(s_max))
        args = (weight, scores, frozen, float(s), int(mode), _s_max_arg(s_max))
        return _masked_weight(*args)

    def channel_gate(self, y_pre, scores, s, mode, s_max):
        if not self._native(y_pre):
            return self.channel_gate(y_pre.float(), scores.float(), s, mode, s_max).to(y_pre.dtype)
        if isinstance(s, torch.Tensor):
            return _gate_forward_ts(y_pre, scores, s, int(mode), _scale_tensor(s_max))
        args = (y_pre, scores, float(s), int(mode), _s_max_arg(s_max))
        return _gate(*args)

    def block_unit_grad(self, weight, frozen_out, frozen_in, transposed, groups):
        return _BlockUnitGrad.apply(weight, frozen_out, frozen_in, bool(transposed), int(groups))

    def sparsity_terms(self, mask, reserved):
        if mask.dtype in (torch.float16, torch.bfloat16):
            # the terms are float32 (backends.reference.terms_dtype): the kernels write the mask's dtype
            return self.sparsity_terms(mask.float(), reserved)
        terms = _sparsity_terms(mask, reserved)
        return terms[0], terms[1]

    # -- convolutions: a better algorithm where ATen's is slow --------------------------------------------
    def conv(self, x, weight, bias, transposed, geo, any_layout):
        """Convolutions of a 1-channel input (an MNIST critic's first layer) and transposed convolutions to a
        1-channel output (an MNIST generator's last layer) on this library's kernels (:mod:`.thin_conv`), gradients of
        every order included. Other transposed convolutions on the CPU: of a 1x1 input (the generators' first layer) as one matrix product;
        where the caller takes any memory layout (``any_layout``), the others on a channels-last input (oneDNN's
        fast layout, faster for the DCGAN generator's forward + backward; the output is channels-last too, with
        the same values). Not before the channel gate, whose kernels read contiguous memory (measured slower
        there). Others: ATen's choice. Figures: docs/performance.md, "Measurements behind
        dgm_kernels/backends/compiled.py"."""
        if self.name != "cpu" or x.dim() != 4 or x.dtype not in _CPU_NATIVE:
            return NotImplemented
        if not transposed:
            if thin_conv.is_thin(x, weight, geo) and not torch.is_autocast_enabled("cpu"):
                return thin_conv.thin_conv2d(x, weight, bias, geo["stride"], geo["padding"])
            return NotImplemented
        if _is_pointwise_transpose(x, geo):
            return _pointwise_transpose(x, weight, bias)
        if thin_conv.is_thin_transpose(x, weight, geo) and not torch.is_autocast_enabled("cpu"):
            return thin_conv.thin_conv_transpose2d(x, weight, bias, geo["stride"], geo["padding"], geo["output_padding"])
        if not any_layout:
            return NotImplemented
        return torch.nn.functional.conv_transpose2d(
            x.contiguous(memory_format=torch.channels_last), weight, bias, geo["stride"], geo["padding"],
            geo["output_padding"], geo["groups"], geo["dilation"])

    # -- the mask ledger's kernels (signatures of dgm_kernels.reference) -----------------------------------
    def pack_bits(self, mask):
        return _ops.pack_bits(mask)

    def union_count(self, reserved_bits, task_bits, outer, units, inner):
        return _ops.union_count(reserved_bits, task_bits, int(outer), int(units), int(inner))

    def adam_step_(self, param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps, weight_decay, step, decoupled):
        if not self._native(param):  # half precision on the CPU: PyTorch's own ops, in the tensors' dtype
            return reference.adam_step_(param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1, beta2, eps,
                                        weight_decay, step, decoupled)
        _ops.masked_adam_step(param, grad, exp_avg, exp_avg_sq, frozen, float(lr), float(beta1), float(beta2),
                              float(eps), float(weight_decay), int(step), bool(decoupled))

    def sgd_step_(self, param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay, nesterov, first_step):
        if not self._native(param):
            return reference.sgd_step_(param, grad, momentum_buffer, frozen, lr, momentum, dampening, weight_decay,
                                       nesterov, first_step)
        _ops.masked_sgd_step(param, grad, momentum_buffer if momentum != 0 else None, frozen, float(lr),
                             float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(first_step))


def _is_pointwise_transpose(x, geo) -> bool:
    """conv_transpose2d of a [N, C, 1, 1] input without padding, groups or dilation: on the CPU, ATen runs it
    per sample through im2col, slower than the one GEMM of _pointwise_transpose at the DGM generators' first
    layers (figure in docs/performance.md)."""
    return (x.shape[2] == 1 and x.shape[3] == 1 and geo["groups"] == 1 and geo["padding"] == (0, 0) and geo["output_padding"] == (0, 0)
            and geo["dilation"] == (1, 1))


def _pointwise_transpose(x, weight, bias):
    """conv_transpose2d(x, weight, bias) for a 1x1 input: out[n, o, i, j] = sum_c x[n, c] W[c, o, i, j] + b[o]."""
    cin, cout, kh, kw = weight.shape
    out = torch.mm(x.reshape(x.shape[0], cin), weight.reshape(cin, cout * kh * kw)).view(x.shape[0], cout, kh, kw)
    return out if bias is None else out + bias.view(1, cout, 1, 1)


__all__ = ["CompiledBackend", "cuda_archs", "cuda_built"]
