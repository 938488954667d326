"""The CUDA kernels of dgm_kernels._C (csrc/cuda), op by op, against dgm_kernels.backends.reference.

Every test but the first needs a CUDA GPU and an extension built with CUDA. The ops are called directly
(``torch.ops.dgm_kernels.*``, integer mode, ``s_max <= 0`` for "no compensation"), so a failure points at
one kernel rather than at the autograd glue.

Tolerances
- float64: relative 1e-11 (the rounding of s * e, amplified by exp up to |s e| ~ 700, is ~1e-13).
- float32: relative 3e-5 of each value (the rounding of s * e in float32, amplified by exp up to the
  flush threshold |s e| ~ 70, reaches ~5e-6), plus an absolute 1e-30 for the values that the kernels may
  return as exactly 0 instead of a subnormal (csrc/dgm_kernels.h). Reductions: relative 1e-5 of the sum of
  magnitudes (float32 accumulation).
- float16 / bfloat16 (DESIGN.md): the kernel's largest error against the float32 reference run on the same
  (upcast) inputs is at most twice that of the reference itself run in the low precision, plus half a unit
  in the last place of the largest expected value (the rounding to the storage type that no
  implementation escapes; it matters only for single-value results such as a sum).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from dgm_kernels.backends import reference
from dgm_kernels.bits import unit_block_pattern
from invariants import assert_optimizer_steps_ignore_layout  # noqa: E402

OP_NAMES = (
    "mask_forward",
    "mask_backward",
    "masked_weight_forward",
    "masked_weight_backward",
    "gate_forward",
    "gate_backward",
    "block_unit_grad",
    "sparsity_terms",
    "pack_bits",
    "union_count",
    "masked_adam_step",
    "masked_sgd_step",
)


def _extension():
    """(dgm_kernels._C, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("dgm_kernels._C"), None
    except Exception as exc:  # not built, or built against another torch
        return None, f"dgm_kernels._C cannot be imported ({type(exc).__name__}: {exc})"


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is visible on this machine)"
    ext, why = _extension()
    if ext is None:
        return why
    if not ext.cuda_built():
        return f"dgm_kernels._C was built without its CUDA kernels: {ext.cuda_skip_reason()}"
    # a GPU outside the architectures built (TORCH_CUDA_ARCH_LIST) would fail every launch with "no kernel
    # image is available": say so instead
    from dgm_kernels.backends import unavailable_reason

    return unavailable_reason("cuda", torch.device("cuda"))


_CUDA_SKIP = _cuda_skip_reason()
needs_cuda = pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")

ops = torch.ops.dgm_kernels
ANNEAL, STE = 0, 1
SCHEDULES = {  # (s, mode, s_max); s_max None: no compensation
    "anneal": (2.5, ANNEAL, None),
    "anneal-hat": (400.0, ANNEAL, 400.0),  # |s e| crosses the clamp at 50 for |e| > 0.125
    "ste": (1.0, STE, None),
    "ste-hat": (25.0, STE, 1e4),
}
# odd sizes (the scalar remainder of the 16-byte packs), a tiny one, one of several blocks
SHAPES = {"odd": (3, 5, 7), "one": (1,), "many": (129, 257)}
LAYOUTS = ("contiguous", "strided", "offset")


def _s_max_arg(s_max):
    return -1.0 if s_max is None else float(s_max)


# -- inputs -------------------------------------------------------------------------------------------


def _scores(shape, dtype, device="cuda", generator=None):
    """Scores over the whole range that matters: decided (|e| up to ~3, so |s e| far beyond 50 at s = 400),
    near 0, exact zeros (the ste threshold) and -0."""
    e = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5
    flat = e.view(-1)
    if flat.numel() >= 4:
        flat[0], flat[1], flat[2] = 0.0, -0.0, 1e-3
    return e.to(dtype=dtype, device=device)


def _rand(shape, dtype, device="cuda", generator=None):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a non-contiguous view (strided) or a view whose data pointer is 1 element past
    a 16-byte boundary (offset: the kernels' vectorised path must then step aside)."""
    if layout == "contiguous":
        return t
    flat = t.reshape(-1)
    if layout == "strided":
        wide = torch.zeros((2 * flat.numel(),), dtype=t.dtype, device=t.device)
        wide[::2] = flat
        return wide[::2].view(t.shape) if t.dim() == 1 else wide.view(-1, 2)[:, 0].view(t.shape)
    base = torch.zeros((flat.numel() + 1,), dtype=t.dtype, device=t.device)
    base[1:] = flat
    return base[1:].view(t.shape)


# -- the reference of each op ----------------------------------------------------------------------------


def ref_mask_forward(e, s, mode, s_max):
    return reference.mask(e, s, mode, s_max)


def ref_mask_backward(g, e, s, s_max):
    return g * reference.mask_derivative(e, s, s_max)


def ref_masked_weight_forward(w, e, frozen, s, mode, s_max):
    return reference.masked_weight(w, e, s, frozen, mode, s_max)


def ref_masked_weight_backward(g, w, e, frozen, s, s_max, mode):
    w = w.detach().clone().requires_grad_(True)
    e = e.detach().clone().requires_grad_(True)
    out = reference.masked_weight(w, e, s, frozen, mode, s_max)
    gw, ge = torch.autograd.grad(out, (w, e), g)
    return gw, ge


def ref_gate_forward(y_pre, e, s, mode, s_max):
    return reference.channel_gate(y_pre, e, s, mode, s_max)


def ref_gate_backward(g, y_pre, e, s, s_max, mode):
    y_pre = y_pre.detach().clone().requires_grad_(True)
    e = e.detach().clone().requires_grad_(True)
    out = reference.channel_gate(y_pre, e, s, mode, s_max)
    return torch.autograd.grad(out, (y_pre, e), g)


def ref_block_unit_grad(g, frozen_out, frozen_in, transposed, groups):
    block = unit_block_pattern(g.shape, frozen_out, frozen_in, transposed, groups)
    block = block[(...,) + (None,) * (g.dim() - 2)]
    return torch.where(block, torch.zeros_like(g), g)


def ref_sparsity_terms(m, reserved):
    total, count = reference.sparsity_terms(m, reserved)
    return torch.stack([total, count])


# -- comparisons ---------------------------------------------------------------------------------------


def _assert_no_subnormal(t: torch.Tensor, what: str):
    if t.dtype in (torch.float32, torch.float64, torch.bfloat16):
        tiny = torch.finfo(t.dtype).tiny
        bad = (t != 0) & (t.abs() < tiny)
        assert not bad.any(), f"{what}: {int(bad.sum())} subnormal outputs"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str):
    """float32/float64 kernel output against the reference computed in float64 from the same inputs."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.is_contiguous(), f"{what}: output is not contiguous"
    assert actual.device == expected.device, f"{what}: on {actual.device}, expected {expected.device}"
    _assert_no_subnormal(actual, what)
    rtol = 1e-11 if actual.dtype == torch.float64 else 3e-5
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=1e-30, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_low_precision_rule(actual: torch.Tensor, torch_low: torch.Tensor, truth32: torch.Tensor, what: str):
    """DESIGN.md's fp16/bf16 rule (see the module docstring)."""
    assert actual.dtype == torch_low.dtype and actual.shape == truth32.shape, what
    kernel_err = (actual.float() - truth32).abs().max().item() if truth32.numel() else 0.0
    torch_err = (torch_low.float() - truth32).abs().max().item() if truth32.numel() else 0.0
    half_ulp = 0.5 * torch.finfo(actual.dtype).eps * (truth32.abs().max().item() if truth32.numel() else 0.0)
    assert kernel_err <= 2 * torch_err + half_ulp, (
        f"{what}: kernel error {kernel_err:.3g} > 2 x PyTorch {actual.dtype} error {torch_err:.3g} "
        f"(+ half an ulp {half_ulp:.3g})"
    )


# Each case: (op name, kernel call, reference call, input builder). The builder returns the argument
# tuple for a given dtype; the reference gets the same arguments with the float tensors in float64.


def _call_case(case, dtype, layout="contiguous", shape=(3, 5, 7), schedule="anneal-hat", generator=None):
    s, mode, s_max = SCHEDULES[schedule]
    g = generator
    if case == "mask_forward":
        e = _scores(shape, dtype, generator=g)
        args = (_layout(e, layout),)
        return (lambda e: ops.mask_forward(e, s, mode, _s_max_arg(s_max)),
                lambda e: ref_mask_forward(e, s, mode, s_max), args)
    if case == "mask_backward":
        e, gm = _scores(shape, dtype, generator=g), _rand(shape, dtype, generator=g)
        args = (_layout(gm, layout), _layout(e, layout))
        return (lambda gm, e: ops.mask_backward(gm, e, s, _s_max_arg(s_max)),
                lambda gm, e: ref_mask_backward(gm, e, s, s_max), args)
    if case in ("masked_weight_forward", "masked_weight_backward"):
        w, e = _rand(shape, dtype, generator=g), _scores(shape, dtype, generator=g)
        frozen = _layout((torch.rand(shape, generator=g) < 0.3).cuda(), layout)
        if case == "masked_weight_forward":
            args = (_layout(w, layout), _layout(e, layout), frozen)
            return (lambda w, e, f: ops.masked_weight_forward(w, e, f, s, mode, _s_max_arg(s_max)),
                    lambda w, e, f: ref_masked_weight_forward(w, e, f, s, mode, s_max), args)
        grad = _rand(shape, dtype, generator=g)
        args = (_layout(grad, layout), _layout(w, layout), _layout(e, layout), frozen)
        return (lambda gr, w, e, f: ops.masked_weight_backward(gr, w, e, f, s, _s_max_arg(s_max), mode),
                lambda gr, w, e, f: ref_masked_weight_backward(gr, w, e, f, s, s_max, mode), args)
    raise KeyError(case)


def _to64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


ELEMENTWISE = ("mask_forward", "mask_backward", "masked_weight_forward", "masked_weight_backward")


# -- the test that runs everywhere -----------------------------------------------------------------------


def test_every_op_has_a_cuda_kernel_when_built_with_cuda():
    ext, why = _extension()
    if ext is None:
        pytest.skip(why)
    if not ext.cuda_built():
        pytest.skip(f"dgm_kernels._C was built without its CUDA kernels: {ext.cuda_skip_reason()}")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dgm_kernels::"))
    assert {f"dgm_kernels::{op}" for op in OP_NAMES} <= set(names), f"ops missing from the library: {names}"
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"dgm_kernels ops without a CUDA kernel: {missing}"


# -- float32 / float64 parity ----------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", ELEMENTWISE)
def test_elementwise_parity(case, schedule, dtype):
    for shape_name, shape in SHAPES.items():
        for layout in LAYOUTS:
            kernel, ref, args = _call_case(case, dtype, layout, shape, schedule)
            got = _as_tuple(kernel(*args))
            want = _as_tuple(ref(*_to64(args)))
            for i, (a, b) in enumerate(zip(got, want)):
                assert a.dtype == dtype
                assert_matches(a, b, f"{case}[{i}] {schedule} {shape_name} {layout}")


@needs_cuda
def test_masked_weight_backward_without_frozen_and_frozen_exact_zero():
    s, mode, s_max = SCHEDULES["anneal-hat"]
    w, e, g = _rand((33, 9), torch.float32), _scores((33, 9), torch.float32), _rand((33, 9), torch.float32)
    gw, ge = ops.masked_weight_backward(g, w, e, None, s, s_max, mode)
    rgw, rge = ref_masked_weight_backward(g.double(), w.double(), e.double(), None, s, s_max, mode)
    assert_matches(gw, rgw, "grad_weight (no frozen)")
    assert_matches(ge, rge, "grad_scores (no frozen)")
    # frozen entries get exactly zero, even where the incoming gradient is inf or NaN
    frozen = torch.zeros_like(w, dtype=torch.bool)
    frozen[::2] = True
    g_bad = g.clone()
    g_bad[::2] = float("nan")
    gw, _ = ops.masked_weight_backward(g_bad, w, e, frozen, s, s_max, mode)
    assert (gw[::2] == 0).all() and not torch.signbit(gw[::2]).any()


@needs_cuda
def test_mask_special_values():
    e = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30, 60.0, -60.0], device="cuda")
    for s, mode, s_max in SCHEDULES.values():
        m = ops.mask_forward(e, s, mode, _s_max_arg(s_max))
        rm = ref_mask_forward(e.double(), s, mode, s_max)
        torch.testing.assert_close(m.double(), rm, equal_nan=True, rtol=1e-6, atol=1e-30)
        ge = ops.mask_backward(torch.ones_like(e), e, s, _s_max_arg(s_max))
        rge = ref_mask_backward(torch.ones_like(e).double(), e.double(), s, s_max)
        torch.testing.assert_close(ge.double(), rge, equal_nan=True, rtol=1e-5, atol=1e-30)
    # the derivative far in the tails is tiny but not zero where float32 can hold it (no 1 - sigmoid cancellation)
    ge = ops.mask_backward(torch.ones(1, device="cuda"), torch.tensor([-0.05], device="cuda"), 400.0, -1.0)
    assert ge.item() > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 5, 7), (4, 6), (1, 1, 1, 1), (3, 4, 9), (64, 3, 33, 31), (2, 70000)],
    ids=["nchw-odd", "linear", "1x1", "ncl", "splits", "many-channels"],
)
def test_gate_parity(shape, schedule, dtype):
    s, mode, s_max = SCHEDULES[schedule]
    for layout in ("contiguous", "strided", "offset"):
        y_pre = _layout(_rand(shape, dtype), layout)
        e = _layout(_scores((shape[1],), dtype), layout)
        y = ops.gate_forward(y_pre, e, s, mode, _s_max_arg(s_max))
        assert_matches(y, ref_gate_forward(y_pre.double(), e.double(), s, mode, s_max), f"gate_forward {layout}")
        g = _layout(_rand(shape, dtype), layout)
        gx, ge = ops.gate_backward(g, y_pre, e, s, _s_max_arg(s_max), mode)
        rgx, rge = ref_gate_backward(g.double(), y_pre.double(), e.double(), s, s_max, mode)
        assert_matches(gx, rgx, f"gate_backward grad_y_pre {layout}")
        # grad_e is a sum: relative to the sum of magnitudes, not to the (possibly cancelling) value
        scale = (g.double() * y_pre.double()).abs().sum(dim=[d for d in range(len(shape)) if d != 1])
        bound = 1e-5 * scale * reference.mask_derivative(e.double(), s, s_max) + 1e-30
        err = (ge.double() - rge).abs()
        assert (err <= bound).all(), f"gate_backward grad_e {layout}: max error {err.max().item():.3g}"
        _assert_no_subnormal(ge, "gate_backward grad_e")


@needs_cuda
def test_gate_backward_is_deterministic():
    y_pre, g = _rand((64, 3, 33, 31), torch.float32), _rand((64, 3, 33, 31), torch.float32)
    e = _scores((3,), torch.float32)
    first = ops.gate_backward(g, y_pre, e, 2.0, -1.0, ANNEAL)[1]
    for _ in range(3):
        again = ops.gate_backward(g, y_pre, e, 2.0, -1.0, ANNEAL)[1]
        assert torch.equal(first, again), "grad_e differs between identical calls"


@needs_cuda
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("with_in", [False, True], ids=["out-only", "out-and-in"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
def test_block_unit_grad(transposed, groups, with_in, dtype):
    for rows_per_group, cols, kernel in ((2, 3, (3, 3)), (5, 4, (4, 4)), (1, 7, (1, 1)), (3, 2, ())):
        rows = rows_per_group * groups
        units_other = cols * groups
        out_units, in_units = (units_other, rows) if transposed else (rows, units_other)
        grad = _rand((rows, cols) + kernel, dtype)
        frozen_out = (torch.rand(out_units) < 0.5).cuda()
        frozen_in = (torch.rand(in_units) < 0.5).cuda() if with_in else None
        for layout in LAYOUTS:
            got = ops.block_unit_grad(_layout(grad, layout), frozen_out, frozen_in, transposed, groups)
            want = ref_block_unit_grad(grad, frozen_out, frozen_in, transposed, groups)
            assert got.is_contiguous()
            assert torch.equal(got, want), f"block_unit_grad rows={rows} cols={cols} kernel={kernel} {layout}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 7, 1000, 300001])
def test_sparsity_terms(n, dtype):
    m = torch.rand(n, dtype=torch.float64).to(dtype=dtype, device="cuda")
    reserved = (torch.rand(n) < 0.4).cuda()
    for r in (None, reserved):
        for layout in LAYOUTS:
            got = ops.sparsity_terms(_layout(m, layout), r)
            want = ref_sparsity_terms(m.double(), r)
            assert got.shape == (2,) and got.dtype == dtype
            assert got[1].item() == want[1].item(), "free count"
            torch.testing.assert_close(got[0].double(), want[0], rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    # a NaN in a reserved entry does not reach the sum (a select, not a product)
    m_nan = m.clone()
    m_nan[0] = float("nan")
    r0 = torch.zeros(n, dtype=torch.bool, device="cuda")
    r0[0] = True
    assert torch.isfinite(ops.sparsity_terms(m_nan, r0)).all()


@needs_cuda
def test_empty_tensors():
    f = torch.float32
    empty = torch.empty(0, 3, device="cuda", dtype=f)
    assert ops.mask_forward(empty, 1.0, ANNEAL, -1.0).shape == (0, 3)
    assert ops.mask_backward(empty, empty, 1.0, -1.0).shape == (0, 3)
    assert ops.masked_weight_forward(empty, empty, None, 1.0, STE, -1.0).shape == (0, 3)
    gw, ge = ops.masked_weight_backward(empty, empty, empty, None, 1.0, 5.0, ANNEAL)
    assert gw.shape == ge.shape == (0, 3)
    e = _scores((3,), f)
    assert ops.gate_forward(empty, e, 1.0, ANNEAL, -1.0).shape == (0, 3)
    gx, ge = ops.gate_backward(empty, empty, e, 1.0, -1.0, ANNEAL)
    assert gx.shape == (0, 3) and torch.equal(ge, torch.zeros_like(e)), "grad_e of an empty batch is 0"
    gx, ge = ops.gate_backward(torch.empty(2, 0, device="cuda"), torch.empty(2, 0, device="cuda"),
                               torch.empty(0, device="cuda"), 1.0, -1.0, ANNEAL)
    assert gx.shape == (2, 0) and ge.shape == (0,)
    out = ops.block_unit_grad(torch.empty(0, 3, 3, 3, device="cuda"), torch.empty(0, dtype=torch.bool, device="cuda"),
                              None, False, 1)
    assert out.shape == (0, 3, 3, 3)
    assert ops.sparsity_terms(torch.empty(0, device="cuda"), None).tolist() == [0.0, 0.0]


@needs_cuda
def test_bad_arguments_name_the_argument():
    e = _scores((4,), torch.float32)
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(anneal\) or 1 \(ste\), got 7"):
        ops.mask_forward(e, 1.0, 7, -1.0)
    with pytest.raises(RuntimeError, match=r"s must be a finite number > 0, got -1"):
        ops.mask_forward(e, -1.0, ANNEAL, -1.0)
    with pytest.raises(RuntimeError, match=r"grad_m must have the dtype of scores"):
        ops.mask_backward(e.double(), e, 1.0, -1.0)
    with pytest.raises(RuntimeError, match=r"scores must be on the device of weight \(cuda:0\), got cpu"):
        ops.masked_weight_forward(e, e.cpu(), None, 1.0, ANNEAL, -1.0)
    with pytest.raises(RuntimeError, match=r"frozen must be a bool tensor or its packed bits \(uint8\), got Float"):
        ops.masked_weight_backward(e, e, e, e, 1.0, -1.0, ANNEAL)
    with pytest.raises(RuntimeError, match=r"frozen given as packed bits \(uint8\) must be 1-D with ceil\(4 / 8\) = 1 bytes"):
        ops.masked_weight_backward(e, e, e, torch.zeros(2, dtype=torch.uint8, device="cuda"), 1.0, -1.0, ANNEAL)
    with pytest.raises(RuntimeError, match=r"pack_bits \(CUDA\): mask must be a bool tensor, got Float"):
        ops.pack_bits(e)
    with pytest.raises(RuntimeError, match=r"reserved_bits must have shape \[3\]"):
        ops.union_count(torch.zeros(2, dtype=torch.uint8, device="cuda"), torch.zeros(2, dtype=torch.uint8, device="cuda"), 1, 3, 7)
    with pytest.raises(RuntimeError, match=r"exp_avg must have the shape of param"):
        ops.masked_adam_step(e.clone(), e, e[:2].clone(), e.clone(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffer must be a tensor when momentum != 0"):
        ops.masked_sgd_step(e.clone(), e, None, None, 0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match=r"scores must have shape \[3\]"):
        ops.gate_forward(_rand((2, 3, 4), torch.float32), e, 1.0, ANNEAL, -1.0)
    with pytest.raises(RuntimeError, match=r"frozen_out must have shape \[4\]"):
        ops.block_unit_grad(_rand((4, 2, 3, 3), torch.float32), torch.zeros(3, dtype=torch.bool, device="cuda"),
                            None, False, 1)
    with pytest.raises(RuntimeError, match=r"must be divisible by groups"):
        ops.block_unit_grad(_rand((4, 2), torch.float32), torch.zeros(4, dtype=torch.bool, device="cuda"),
                            None, False, 3)
    with pytest.raises(RuntimeError, match=r"reserved must have the shape of mask"):
        ops.sparsity_terms(e, torch.zeros(5, dtype=torch.bool, device="cuda"))


# -- packed frozen bits, and the ledger ops' layout test (their parity with the reference, float16 and
# bfloat16 included: tests/kernels/test_ledger_kernels.py) ------------------------------------------------


def _packed(flags):
    return reference.pack_bits(flags)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("n", [1, 9, 1000, 100_003])
def test_masked_weight_backward_reads_packed_bits_like_bools(n, dtype):
    s, mode, s_max = SCHEDULES["anneal-hat"]
    g, w, e = _rand((n,), dtype), _rand((n,), dtype), _scores((n,), dtype)
    frozen = (torch.rand(n) < 0.4).cuda()
    for layout in LAYOUTS:
        dense = ops.masked_weight_backward(_layout(g, layout), w, e, frozen, s, _s_max_arg(s_max), mode)
        packed = ops.masked_weight_backward(_layout(g, layout), w, e, _packed(frozen), s, _s_max_arg(s_max), mode)
        for a, b in zip(dense, packed):
            assert torch.equal(a, b), layout
        assert (packed[0][frozen] == 0).all()


@needs_cuda
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("groups", [1, 3])
def test_block_unit_grad_reads_packed_bits_like_bools(transposed, groups):
    grad = _rand((9, 11, 3, 3), torch.float32)  # 9 and 33 units: partial last bytes
    out_units, in_units = (11 * groups, 9) if transposed else (9, 11 * groups)
    fo, fi = (torch.rand(out_units) < 0.5).cuda(), (torch.rand(in_units) < 0.5).cuda()
    for frozen_in in (fi, None):
        dense = ops.block_unit_grad(grad, fo, frozen_in, transposed, groups)
        packed_in = None if frozen_in is None else _packed(frozen_in)
        assert torch.equal(dense, ops.block_unit_grad(grad, _packed(fo), packed_in, transposed, groups))
        assert torch.equal(dense, ops.block_unit_grad(grad, fo, packed_in, transposed, groups))


@needs_cuda
def test_optimizer_steps_update_non_contiguous_tensors_in_place():
    assert_optimizer_steps_ignore_layout(ops, "cuda")


# -- float16 / bfloat16: DESIGN.md's rule --------------------------------------------------------------


def _low_precision_cases(dtype):
    """(name, kernel outputs, PyTorch outputs in dtype, float32 reference outputs) for every op."""
    shape = (8, 6, 9, 11)
    for schedule, (s, mode, s_max) in SCHEDULES.items():
        sm = _s_max_arg(s_max)
        e32 = _scores((2000,), torch.float32) * 0.2  # mostly undecided: sigmoid' is large and rounding shows
        g32, w32 = _rand((2000,), torch.float32), _rand((2000,), torch.float32)
        frozen = (torch.rand(2000) < 0.3).cuda()
        e, g, w = e32.to(dtype), g32.to(dtype), w32.to(dtype)
        e32, g32, w32 = e.float(), g.float(), w.float()  # the reference sees exactly the low-precision inputs
        yield (f"mask_forward {schedule}", ops.mask_forward(e, s, mode, sm),
               ref_mask_forward(e, s, mode, s_max), ref_mask_forward(e32, s, mode, s_max))
        yield (f"mask_backward {schedule}", ops.mask_backward(g, e, s, sm),
               ref_mask_backward(g, e, s, s_max), ref_mask_backward(g32, e32, s, s_max))
        yield (f"masked_weight_forward {schedule}", ops.masked_weight_forward(w, e, frozen, s, mode, sm),
               ref_masked_weight_forward(w, e, frozen, s, mode, s_max),
               ref_masked_weight_forward(w32, e32, frozen, s, mode, s_max))
        got = ops.masked_weight_backward(g, w, e, frozen, s, sm, mode)
        low = ref_masked_weight_backward(g, w, e, frozen, s, s_max, mode)
        f32 = ref_masked_weight_backward(g32, w32, e32, frozen, s, s_max, mode)
        for i in range(2):
            yield f"masked_weight_backward[{i}] {schedule}", got[i], low[i], f32[i]
        y, gy = _rand(shape, dtype), _rand(shape, dtype)
        ec = (_scores((shape[1],), torch.float32) * 0.2).to(dtype)
        yield (f"gate_forward {schedule}", ops.gate_forward(y, ec, s, mode, sm),
               ref_gate_forward(y, ec, s, mode, s_max), ref_gate_forward(y.float(), ec.float(), s, mode, s_max))
        got = ops.gate_backward(gy, y, ec, s, sm, mode)
        low = ref_gate_backward(gy, y, ec, s, s_max, mode)
        f32 = ref_gate_backward(gy.float(), y.float(), ec.float(), s, s_max, mode)
        for i in range(2):
            yield f"gate_backward[{i}] {schedule}", got[i], low[i], f32[i]
    m = torch.rand(5000, device="cuda").to(dtype)
    reserved = (torch.rand(5000) < 0.4).cuda()
    yield ("sparsity_terms", ops.sparsity_terms(m, reserved), ref_sparsity_terms(m, reserved),
           ref_sparsity_terms(m.float(), reserved))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_rule(dtype):
    for name, got, low, truth32 in _low_precision_cases(dtype):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert_low_precision_rule(got, low, truth32.float(), f"{name} ({dtype})")


# -- large tensors: the reductions past float32's exact integers ---------------------------------------------


@needs_cuda
def test_large_gate_backward_reduction():
    # 2 channels of 2^23 + 2^21 elements each: > 2^24 elements in all, a channel far beyond one block
    shape = (80, 2, 256, 512)
    y_pre = torch.rand(shape, device="cuda") + 0.5  # positive terms: an accumulation error cannot hide
    g = torch.rand(shape, device="cuda")
    e = torch.tensor([0.3, -0.2], device="cuda")
    gx, ge = ops.gate_backward(g, y_pre, e, 2.0, -1.0, ANNEAL)
    want = (g.double() * y_pre.double()).sum(dim=(0, 2, 3)) * reference.mask_derivative(e.double(), 2.0, None)
    torch.testing.assert_close(ge.double(), want, rtol=1e-5, atol=0)
    m = reference.mask(e, 2.0, ANNEAL, None)
    torch.testing.assert_close(gx[:, 1], g[:, 1] * m[1], rtol=1e-6, atol=1e-30)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_large_sparsity_terms(dtype):
    n = (1 << 24) + 3
    m = torch.rand(n, device="cuda", dtype=dtype)
    reserved = torch.rand(n, device="cuda") < 0.25
    got = ops.sparsity_terms(m, reserved)
    free = ~reserved
    want_sum = torch.where(free, m.double(), 0.0).sum()
    want_count = int(free.sum().item())
    assert got[1].item() == float(torch.tensor(want_count, dtype=torch.float64).to(dtype).item())
    torch.testing.assert_close(got[0].double(), want_sum, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    whole = ops.sparsity_terms(m, None)
    assert whole[1].item() == float(torch.tensor(float(n), dtype=dtype).item())
    torch.testing.assert_close(whole[0].double(), m.double().sum(), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


# -- torch.library.opcheck on CUDA tensors --------------------------------------------------------------------


def _opcheck_cases():
    s, mode, s_max = 3.0, ANNEAL, 50.0
    shape = (4, 3, 5, 5)
    e = _scores((7, 5), torch.float32)
    w, g = _rand((7, 5), torch.float32), _rand((7, 5), torch.float32)
    frozen = (torch.rand(7, 5) < 0.3).cuda()
    y, gy, ec = _rand(shape, torch.float32), _rand(shape, torch.float32), _scores((3,), torch.float32)
    fo, fi = (torch.rand(6) < 0.5).cuda(), (torch.rand(3) < 0.5).cuda()
    m, reserved = torch.rand(100, device="cuda"), (torch.rand(100) < 0.3).cuda()

    def rg(t):
        return t.detach().clone().requires_grad_(True)

    return [
        ("mask_forward", (rg(e), s, mode, s_max)),
        ("mask_forward", (rg(e), s, STE, -1.0)),
        ("mask_backward", (g, e, s, s_max)),
        ("masked_weight_forward", (rg(w), rg(e), frozen, s, mode, s_max)),
        ("masked_weight_forward", (rg(w), rg(e), None, s, STE, -1.0)),
        ("masked_weight_backward", (g, w, e, frozen, s, s_max, mode)),
        ("gate_forward", (rg(y), rg(ec), s, mode, s_max)),
        ("gate_backward", (gy, y, ec, s, s_max, mode)),
        # block_unit_grad has no autograd formula of its own (the compiled backend wraps it in a Function)
        ("block_unit_grad", (_rand((6, 1, 3, 3), torch.float32), fo, fi, False, 3)),
        ("block_unit_grad", (_rand((3, 2, 4, 4), torch.float32), fo, None, True, 3)),
        ("sparsity_terms", (rg(m), reserved)),
        ("sparsity_terms", (m, None)),
        ("masked_weight_backward", (g, w, e, reference.pack_bits(frozen), s, s_max, mode)),
        ("block_unit_grad", (_rand((6, 1, 3, 3), torch.float32), reference.pack_bits(fo), reference.pack_bits(fi), False, 3)),
        ("pack_bits", (frozen,)),
        ("union_count", (reference.pack_bits(frozen), reference.pack_bits(~frozen), 7, 5, 1)),
        ("masked_adam_step", (w.clone(), g, e.clone(), e.abs(), reference.pack_bits(frozen), 1e-2, 0.9, 0.999, 1e-8, 0.01, 2, True)),
        ("masked_adam_step", (w.clone(), g, e.clone(), e.abs(), None, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1, False)),
        ("masked_sgd_step", (w.clone(), g, e.clone(), frozen, 0.1, 0.9, 0.0, 0.01, True, False)),
        ("masked_sgd_step", (w.clone(), g, None, None, 0.1, 0.0, 0.0, 0.0, False, True)),
    ]


@needs_cuda
def test_opcheck_on_cuda_tensors():
    # the fake kernels and autograd formulas are registered from Python by the compiled backend
    import dgm_kernels.backends.compiled  # noqa: F401

    for name, args in _opcheck_cases():
        torch.library.opcheck(getattr(ops, name).default, args)
