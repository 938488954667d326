"""The compiled ops of dgm_kernels._C on the CPU: op registration (opcheck), torch.compile, float64
gradcheck, the C++ argument checks, build information, and the numerically hard corners of the kernels
(|s e| up to 1e5, HAT compensation, subnormals). The parity of every backend with the reference over many
shapes lives in tests/kernels/test_parity.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.backends import reference
from dgm_kernels.backends import resolve
from dgm_kernels._cuda_archs import runs_on
from invariants import assert_optimizer_steps_ignore_layout  # noqa: E402

try:
    from dgm_kernels import _C
    from dgm_kernels.backends import compiled
except ImportError as exc:  # the extension is optional: the reference backend works without it
    pytest.skip(
        f"dgm_kernels._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

ops = torch.ops.dgm_kernels
CPU = torch.device("cpu")
SMALLEST_NORMAL = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: torch.finfo(torch.float64).tiny}


def _scores(shape, dtype, magnitude=3.0, generator=None):
    # a wide spread of magnitudes, both signs, never exactly zero
    e = torch.randn(shape, dtype=dtype, generator=generator)
    scale = 10 ** torch.empty(shape, dtype=dtype).uniform_(-3, 0, generator=generator)
    return e * scale * magnitude + 1e-3


def _packed(flags):
    return reference.pack_bits(flags)


def _noncontiguous(t):
    # same values, transposed storage
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t.repeat(2)[::2]


# ----------------------------------------------------------------------------------------------------------
# build information
# ----------------------------------------------------------------------------------------------------------
def test_build_info_matches_the_registered_kernels():
    built = _C.cuda_built()
    assert isinstance(built, bool)
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("dgm_kernels::mask_forward", "CUDA")
    assert has_cuda_kernel == built
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dgm_kernels::mask_forward", "CPU")
    info = _C.build_info()
    assert info["cuda"] == built
    assert info["openmp_version"] > 0, "the extension must be compiled with OpenMP (-fopenmp)"
    assert _C.openmp_threads() == torch.get_num_threads()
    reason = dk.backend_status()["cuda"]
    assert info["cuda_archs"] == _C.cuda_archs() == compiled.cuda_archs()
    if built:
        assert torch.version.cuda is not None
        assert _C.cuda_skip_reason() is None
        assert reason is None or "no CUDA device is visible" in reason or "cannot run the CUDA kernels" in reason
        # the architectures setup.py built (TORCH_CUDA_ARCH_LIST or the default), each a name the run-time check reads
        assert _C.cuda_archs(), "a CUDA build must record the GPU architectures it was compiled for"
        for name in _C.cuda_archs():
            runs_on(name, (9, 0))  # raises ValueError on a name the run-time check cannot read
    else:
        assert _C.cuda_skip_reason(), "a CPU-only build must say why the CUDA kernels were left out"
        assert "built without CUDA kernels" in reason and _C.cuda_skip_reason() in reason
        assert _C.cuda_archs() == []


def test_unavailable_reasons_name_the_device():
    assert compiled.CompiledBackend("cpu").unavailable_reason(CPU) is None
    assert compiled.CompiledBackend("cpu").unavailable_reason(torch.device("cuda")) == (
        "the cpu backend runs on CPU tensors; got cuda"
    )
    assert "CUDA tensors; got cpu" in compiled.CompiledBackend("cuda").unavailable_reason(CPU)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        compiled.CompiledBackend("triton")


# ----------------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype, (s, mode, s_max) in itertools.product(
        (torch.float32, torch.float64), ((1.0, 0, 0.0), (400.0, 1, 1e4), (25.0, 0, 1e5))
    ):
        w = torch.randn(6, 4, 3, 3, dtype=dtype, generator=g)
        e = _scores((6, 4, 3, 3), dtype, generator=g)
        frozen = torch.rand(6, 4, 3, 3, generator=g) < 0.4
        grad = torch.randn(6, 4, 3, 3, dtype=dtype, generator=g)
        y_pre = torch.randn(3, 4, 5, 2, dtype=dtype, generator=g)
        ec = _scores((4,), dtype, generator=g)
        cases += [
            ("mask_forward", (e.clone().requires_grad_(), s, mode, s_max)),
            ("mask_forward", (_noncontiguous(e).requires_grad_(), s, mode, s_max)),
            ("mask_backward", (grad, e, s, s_max)),
            ("mask_backward", (_noncontiguous(grad), _noncontiguous(e), s, s_max)),
            ("masked_weight_forward", (w.clone().requires_grad_(), e.clone().requires_grad_(), frozen, s, mode, s_max)),
            ("masked_weight_forward", (_noncontiguous(w).requires_grad_(), e.clone().requires_grad_(), None, s, mode, s_max)),
            ("masked_weight_backward", (grad, w, e, frozen, s, s_max, mode)),
            ("masked_weight_backward", (_noncontiguous(grad), w, _noncontiguous(e), None, s, s_max, mode)),
            ("gate_forward", (y_pre.clone().requires_grad_(), ec.clone().requires_grad_(), s, mode, s_max)),
            ("gate_forward", (y_pre[:, :, 0].clone().requires_grad_(), ec.clone().requires_grad_(), s, mode, s_max)),
            ("gate_forward", (y_pre.permute(0, 1, 3, 2).requires_grad_(), ec.clone().requires_grad_(), s, mode, s_max)),
            ("gate_backward", (torch.randn_like(y_pre), y_pre, ec, s, s_max, mode)),
            ("sparsity_terms", (torch.rand(5, 7, dtype=dtype, generator=g).requires_grad_(), None)),
            ("sparsity_terms", (torch.rand(5, 7, dtype=dtype, generator=g).requires_grad_(), torch.rand(5, 7, generator=g) < 0.5)),
        ]
    gw = torch.randn(6, 4, 3, 3)
    for transposed, groups, with_in in itertools.product((False, True), (1, 2), (False, True)):
        rows, cols = 6, 4
        out_units = cols * groups if transposed else rows
        in_units = rows if transposed else cols * groups
        fo = torch.rand(out_units, generator=g) < 0.5
        fi = (torch.rand(in_units, generator=g) < 0.5) if with_in else None
        cases.append(("block_unit_grad", (gw, fo, fi, transposed, groups)))
        cases.append(("block_unit_grad", (gw, _packed(fo), None if fi is None else _packed(fi), transposed, groups)))
    # frozen as packed bits in the mask ops
    w = torch.randn(6, 4, 3, 3, generator=g)
    e = _scores((6, 4, 3, 3), torch.float32, generator=g)
    frozen = torch.rand(6, 4, 3, 3, generator=g) < 0.4
    cases += [
        ("masked_weight_forward", (w.clone().requires_grad_(), e.clone().requires_grad_(), _packed(frozen), 30.0, 0, 400.0)),
        ("masked_weight_backward", (torch.randn_like(w), w, e, _packed(frozen), 30.0, 400.0, 1)),
    ]
    # the ledger's kernels
    for shape in ((1,), (13,), (6, 4, 3, 3), (3, 5, 7)):
        cases.append(("pack_bits", (torch.rand(shape, generator=g) < 0.5,)))
    cases.append(("pack_bits", ((torch.rand(5, 9, generator=g) < 0.5).t(),)))
    for outer, units, inner in ((1, 24, 192), (12, 5, 16), (2, 13, 5), (3, 1, 9)):
        n = outer * units * inner
        r, t = _packed(torch.rand(n, generator=g) < 0.3), _packed(torch.rand(n, generator=g) < 0.5)
        cases.append(("union_count", (r, t, outer, units, inner)))
    for dtype, frozen_form, decoupled, wd in itertools.product(
        (torch.float32, torch.float64), ("none", "bool", "bits"), (False, True), (0.0, 0.01)
    ):
        p, grad, m = (torch.randn(7, 5, dtype=dtype, generator=g) for _ in range(3))
        v = torch.rand(7, 5, dtype=dtype, generator=g)
        fz = torch.rand(7, 5, generator=g) < 0.4
        fz = {"none": None, "bool": fz, "bits": _packed(fz)}[frozen_form]
        cases.append(("masked_adam_step", (p, grad, m, v, fz, 1e-2, 0.9, 0.999, 1e-8, wd, 3, decoupled)))
        buf = torch.randn(7, 5, dtype=dtype, generator=g)
        cases.append(("masked_sgd_step", (p.clone(), grad, buf, fz, 0.1, 0.9, 0.0, wd, decoupled, False)))
        cases.append(("masked_sgd_step", (p.clone(), grad, None, fz, 0.1, 0.0, 0.0, wd, False, True)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("name,args", OPCHECK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPCHECK_CASES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


# ----------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------
def test_gradcheck_float64_through_the_cpu_backend():
    g = torch.Generator().manual_seed(1)
    d = dict(dtype=torch.float64)
    w = torch.randn(3, 2, 2, 2, generator=g, **d).requires_grad_()
    e = (torch.randn(3, 2, 2, 2, generator=g, **d) * 0.5).requires_grad_()
    x = torch.randn(1, 2, 4, 4, generator=g, **d).requires_grad_()
    wc = torch.randn(3, 2, 3, 3, generator=g, **d).requires_grad_()
    ec = (torch.randn(3, generator=g, **d) * 0.5).requires_grad_()
    m = torch.rand(4, 3, generator=g, **d).requires_grad_()
    reserved = torch.rand(4, 3, generator=g) < 0.5
    # only the anneal mode without compensation and without frozen entries has the true derivative as its
    # gradient (ste, HAT compensation and freezing change the gradient on purpose; the parity tests cover them)
    checks = [
        (lambda e: dk.mask(e, 3.0, backend="cpu"), (e,)),
        (lambda w, e: dk.masked_weight(w, e, 2.0, backend="cpu"), (w, e)),
        (lambda x, w, e: dk.masked_conv2d(x, w, e, 2.0, padding=1, backend="cpu"), (x, w, e)),
        (lambda x, w, e: dk.gated_conv2d(x, w, e, 2.0, padding=1, backend="cpu"), (x, wc, ec)),
        (lambda m: dk.sparsity_regularizer([m], [reserved], backend="cpu"), (m,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_frozen_weights_get_exactly_zero_gradient():
    w = torch.randn(5, 4, requires_grad=True)
    e = torch.randn(5, 4, requires_grad=True)
    frozen = torch.rand(5, 4) < 0.5
    dk.masked_weight(w, e, 10.0, frozen, mode="ste", s_max=1e4, backend="cpu").sum().backward()
    assert torch.equal(w.grad[frozen], torch.zeros(int(frozen.sum())))
    assert (w.grad[~frozen] != 0).any() and (e.grad != 0).all()


@pytest.mark.parametrize("transposed,groups", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_gated_conv_blocks_the_same_gradients_as_the_reference(transposed, groups):
    g = torch.Generator().manual_seed(groups + 2 * transposed)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn((4, 6 // groups, 3, 3) if transposed else (6, 4 // groups, 3, 3), generator=g, dtype=torch.float64)
    ec, bias = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    fo = torch.tensor([True, False, True, False, True, True])
    fi = torch.tensor([True, True, False, True])
    op = dk.gated_conv_transpose2d if transposed else dk.gated_conv2d
    ours, ref = _both(
        lambda b, x, w, e, bias: op(x, w, e, 3.0, fo, fi, bias=bias, padding=1, groups=groups, s_max=30.0, backend=b),
        (x, w, ec, bias),
    )
    _assert_matches(ours, ref, torch.float64)
    assert (ours[1][1] == 0).any(), "some weights must be blocked in this case"


def test_op_and_eager_function_paths_agree():
    # eager calls go through small autograd.Functions; torch.compile and direct users through the
    # formulas registered on the ops: both must give the same values and gradients, bit for bit
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    e = _scores((6, 5, 3, 3), torch.float64)
    frozen = torch.rand(6, 5, 3, 3) < 0.3
    results = []
    for via_op in (False, True):
        wr, er = w.clone().requires_grad_(), e.clone().requires_grad_()
        if via_op:
            y = ops.masked_weight_forward(wr, er, frozen, 300.0, 1, 1e4)
        else:
            y = resolve("cpu", CPU).masked_weight(wr, er, 300.0, frozen, 1, 1e4)
        y.backward(torch.ones_like(y) * 0.7)
        results.append((y.detach(), wr.grad, er.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------
class _SmallGenerator(torch.nn.Module):
    """A DGM-like stack: masked transposed convs (DGMw), a channel-gated conv (DGMa), a masked linear."""

    def __init__(self):
        super().__init__()
        self.up1 = dk.nn.MaskedConvTranspose2d(8, 6, 4, bias=False, backend="cpu")
        self.up2 = dk.nn.MaskedConvTranspose2d(6, 4, 4, stride=2, padding=1, bias=False, mode="ste", backend="cpu")
        self.gate = dk.nn.GatedConv2d(4, 5, 3, padding=1, backend="cpu")
        self.head = dk.nn.MaskedLinear(5 * 8 * 8, 3, backend="cpu")

    def forward(self, z):
        h = torch.relu(self.up1(z))
        h = torch.relu(self.up2(h))
        h = torch.relu(self.gate(h))
        return self.head(h.flatten(1))


def _prepared_model():
    torch.manual_seed(3)
    model = _SmallGenerator()
    with torch.no_grad():
        for layer in (model.up1, model.up2, model.gate, model.head):
            layer.scores.copy_(torch.randn_like(layer.scores) * 0.05)
            layer.s, layer.s_max = 40.0, 400.0
    model.up1.set_frozen(torch.rand_like(model.up1.weight) < 0.3)
    model.head.set_frozen(torch.rand_like(model.head.weight) < 0.3)
    model.gate.set_frozen(torch.tensor([True, False, True, False, False]), torch.tensor([True, True, False, False]))
    return model


def _run(fn, model, z):
    model.zero_grad(set_to_none=True)
    out = fn(z)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_torch_compile_fullgraph_matches_eager():
    z = torch.randn(2, 8, 1, 1)
    model = _prepared_model()
    eager_out, eager_grads = _run(model, model, z)
    compiled_model = torch.compile(model, fullgraph=True)
    out, grads = _run(compiled_model, model, z)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # frozen weights stay without gradient under compile too
    frozen = model.up1.frozen_mask()
    assert frozen.any() and torch.equal(grads["up1.weight"][frozen], torch.zeros(int(frozen.sum())))


# ----------------------------------------------------------------------------------------------------------
# numerics against the reference (the hard corners; tests/kernels/test_parity.py covers shapes)
# ----------------------------------------------------------------------------------------------------------
# atol: results below 1e-30 may be flushed to 0, and one just above may land on either side of it
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-29), torch.float64: dict(rtol=1e-11, atol=1e-29)}


def _both(fn_of_backend, inputs):
    """Run fn(backend, *leaves) with fresh leaves for reference and cpu; return (values, grads) of each."""
    results = {}
    for name in ("reference", "cpu"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn_of_backend(name, *leaves)
        grad_out = torch.linspace(-2, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
        out.backward(grad_out)
        results[name] = (out.detach(), [t.grad for t in leaves if t.requires_grad])
    return results["cpu"], results["reference"]


def _assert_matches(ours, ref, dtype):
    torch.testing.assert_close(ours[0], ref[0], **TOL[dtype])
    for a, b in zip(ours[1], ref[1]):
        # results below 1e-30 may be flushed to 0 by the kernels (they never return subnormals)
        b = torch.where(b.abs() < 1e-30, torch.zeros_like(b), b)
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["anneal", "ste"])
@pytest.mark.parametrize("s,s_max", [(1.0, None), (400.0, None), (400.0, 1e4), (1e4, 1e5), (1e5, 1e5), (1e5, None)])
def test_extreme_scales_match_reference(dtype, mode, s, s_max):
    g = torch.Generator().manual_seed(int(s) + (7 if s_max else 0))
    shape = (9, 7, 3, 3)
    w = torch.randn(shape, dtype=dtype, generator=g)
    # |s e| from ~1e-3 up to ~1e5: saturated, compensated and clamped regions all present
    e = torch.randn(shape, dtype=dtype, generator=g) * 10 ** torch.empty(shape, dtype=dtype).uniform_(-5, 0, generator=g)
    frozen = torch.rand(shape, generator=g) < 0.3
    ours, ref = _both(lambda b, w, e: dk.masked_weight(w, e, s, frozen, mode=mode, s_max=s_max, backend=b), (w, e))
    _assert_matches(ours, ref, dtype)

    y_pre = torch.randn(4, 7, 5, 5, dtype=dtype, generator=g)
    ec = e[0, :, 0, 0].clone()
    ours, ref = _both(lambda b, y, e: resolve(b, CPU).channel_gate(y, e, s, dk._modes.MODES[mode], s_max), (y_pre, ec))
    torch.testing.assert_close(ours[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(ours[1][0], ref[1][0], **TOL[dtype])
    # grad_e sums N*H*W products: the reference sums in the input dtype, the kernel in double
    loose = dict(rtol=1e-4, atol=1e-6 * ref[1][1].abs().max().item() + 1e-30) if dtype == torch.float32 else TOL[dtype]
    ref_ge = torch.where(ref[1][1].abs() < 1e-30, torch.zeros_like(ref[1][1]), ref[1][1])
    torch.testing.assert_close(ours[1][1], ref_ge, **loose)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_subnormal_outputs(dtype):
    e = torch.cat([torch.linspace(-1, 1, 2001, dtype=dtype), torch.tensor([-0.0, 0.0], dtype=dtype)])
    grad = torch.full_like(e, 1e-3)
    for s, s_max in [(1e5, 0.0), (1e5, 1e5), (150.0, 1e4)]:
        outputs = [
            ops.mask_forward(e, s, 0, s_max),
            ops.mask_backward(grad, e, s, s_max),
            *ops.masked_weight_backward(grad, torch.full_like(e, 1e-5), e, None, s, s_max, 0),
            ops.masked_weight_forward(torch.full_like(e, 1e-9), e, None, s, 0, s_max),
        ]
        for out in outputs:
            nonzero = out[out != 0].abs()
            assert nonzero.numel() == 0 or nonzero.min() >= SMALLEST_NORMAL[dtype]
    # the derivative of a decided score is small but alive (never the cancelled sig * (1 - sig))
    e_decided = torch.tensor([0.5, -0.5], dtype=dtype)
    plain = ops.mask_backward(torch.ones_like(e_decided), e_decided, 60.0, 0.0)
    assert (plain > 0).all()
    compensated = ops.mask_backward(torch.ones_like(e_decided), e_decided, 1e4, 1e5)
    assert (compensated == 0).all()  # exp(50 - 5000) is far below 1e-30
    compensated = ops.mask_backward(torch.ones_like(e_decided), e_decided, 110.0, 1e5)
    expected = reference.mask_derivative(e_decided, 110.0, 1e5)
    torch.testing.assert_close(compensated, expected, **TOL[dtype])


def test_ste_mask_is_exactly_binary():
    e = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert torch.equal(ops.mask_forward(e, 1.0, 1, 0.0), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))


def test_noncontiguous_inputs_give_contiguous_equal_results():
    w = torch.randn(8, 6, 3, 3).transpose(0, 1)
    e = _scores((6, 8, 3, 3), torch.float32)[:, :, :, :]
    frozen = (torch.rand(8, 6, 3, 3) < 0.5).transpose(0, 1)
    y = ops.masked_weight_forward(w, e, frozen, 30.0, 0, 0.0)
    assert y.is_contiguous()
    torch.testing.assert_close(y, ops.masked_weight_forward(w.contiguous(), e, frozen.contiguous(), 30.0, 0, 0.0), rtol=0, atol=0)
    y_pre = torch.randn(2, 5, 4, 4).to(memory_format=torch.channels_last)
    ec = torch.randn(5)
    out = ops.gate_forward(y_pre, ec, 3.0, 0, 0.0)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ops.gate_forward(y_pre.contiguous(), ec, 3.0, 0, 0.0), rtol=0, atol=0)


def test_reductions_do_not_depend_on_the_thread_count():
    y_pre = torch.randn(16, 6, 40, 40)
    grad_y = torch.randn_like(y_pre)
    ec = torch.randn(6)
    mask = torch.rand(300_000)
    reserved = torch.rand(300_000) < 0.5
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append((ops.gate_backward(grad_y, y_pre, ec, 2.0, 0.0, 0), ops.sparsity_terms(mask, reserved)))
    finally:
        torch.set_num_threads(threads)
    (a_gate, a_sp), (b_gate, b_sp) = results
    assert torch.equal(a_gate[0], b_gate[0]) and torch.equal(a_gate[1], b_gate[1]) and torch.equal(a_sp, b_sp)
    assert a_sp[1].item() == float((~reserved).sum())


def test_half_precision_cpu_tensors_go_through_float32():
    w = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    e = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    y = dk.masked_weight(w, e, 4.0, backend="cpu")
    assert y.dtype == torch.bfloat16
    expected = dk.masked_weight(w.float(), e.float(), 4.0, backend="cpu").to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and e.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# packed frozen bits read inside the kernels, and the ledger kernels' own corners (their parity with the
# reference on every backend: tests/kernels/test_ledger_kernels.py)
# ----------------------------------------------------------------------------------------------------------
# sizes whose chunks (per thread, and the 4096-entry expansion chunks of packed bits) start inside a byte
PACKED_SIZES = [(1,), (9,), (5, 3, 4, 4), (100_003,), (3, 70_001)]


@pytest.mark.parametrize("shape", PACKED_SIZES, ids=str)
def test_masked_weight_backward_reads_packed_bits_like_bools(shape):
    g = torch.Generator().manual_seed(len(shape))
    w, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    e = _scores(shape, torch.float32, generator=g)
    frozen = torch.rand(shape, generator=g) < 0.45
    dense = ops.masked_weight_backward(grad, w, e, frozen, 40.0, 400.0, 0)
    packed = ops.masked_weight_backward(grad, w, e, _packed(frozen), 40.0, 400.0, 0)
    for a, b in zip(dense, packed):
        assert torch.equal(a, b)
    assert torch.equal(packed[0][frozen], torch.zeros(int(frozen.sum())))


@pytest.mark.parametrize("transposed,groups", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_block_unit_grad_reads_packed_bits_like_bools(transposed, groups):
    g = torch.Generator().manual_seed(groups)
    grad = torch.randn(9, 11, 3, 3, generator=g)  # unit counts 9 and 33: partial last bytes
    out_units, in_units = (11 * groups, 9) if transposed else (9, 11 * groups)
    fo, fi = torch.rand(out_units, generator=g) < 0.5, torch.rand(in_units, generator=g) < 0.5
    for frozen_in in (fi, None):
        dense = ops.block_unit_grad(grad, fo, frozen_in, transposed, groups)
        packed = ops.block_unit_grad(grad, _packed(fo), None if frozen_in is None else _packed(frozen_in), transposed, groups)
        assert torch.equal(dense, packed)
        # mixed forms are fine too: the dtype of each argument says which it is
        assert torch.equal(dense, ops.block_unit_grad(grad, fo, None if frozen_in is None else _packed(frozen_in), transposed, groups))


def _adam_args(shape, dtype, seed, frozen_form):
    g = torch.Generator().manual_seed(seed)
    p, grad, m = (torch.randn(shape, dtype=dtype, generator=g) for _ in range(3))
    v = torch.rand(shape, dtype=dtype, generator=g)
    frozen = torch.rand(shape, generator=g) < 0.4
    given = {"none": None, "bool": frozen, "bits": _packed(frozen)}[frozen_form]
    return p, grad, m, v, frozen, given


def test_optimizer_steps_update_non_contiguous_tensors_in_place():
    assert_optimizer_steps_ignore_layout(ops, "cpu")


def test_half_precision_cpu_optimizer_steps_use_the_reference():
    backend = resolve("cpu", CPU)
    p = torch.randn(4, 3, dtype=torch.bfloat16)
    frozen = torch.rand(4, 3) < 0.5
    want = p.clone()
    reference.sgd_step_(want, torch.ones_like(p), None, frozen, 0.1, 0.0, 0.0, 0.0, False, True)
    backend.sgd_step_(p, torch.ones_like(p), None, _packed(frozen), 0.1, 0.0, 0.0, 0.0, False, True)
    assert torch.equal(p, want)


def test_optimizer_step_under_torch_compile_matches_eager():
    # the mutating ops' schemas let torch.compile functionalize them (no graph break, same result)
    def step(p, grad, m, v, frozen):
        ops.masked_adam_step(p, grad, m, v, frozen, 1e-2, 0.9, 0.999, 1e-8, 0.01, 2, True)
        return p * 2

    args = _adam_args((33, 7), torch.float32, 6, "bits")
    eager = [t.clone() for t in args[:4]]
    compiled_ = [t.clone() for t in args[:4]]
    out_eager = step(*eager, args[5])
    out_compiled = torch.compile(step, fullgraph=True)(*compiled_, args[5])
    assert torch.equal(out_eager, out_compiled)
    for a, b in zip(eager, compiled_):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# the C++ argument checks (the ops are public: torch.ops.dgm_kernels.*)
# ----------------------------------------------------------------------------------------------------------
W = torch.randn(4, 3)
E = torch.randn(4, 3)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ops.mask_forward(E.int(), 1.0, 0, 0.0), r"mask_forward \(CPU\): scores must be float32 or float64, got Int"),
        (lambda: ops.mask_forward(E, -1.0, 0, 0.0), r"s must be a finite number > 0, got -1"),
        (lambda: ops.mask_forward(E, float("inf"), 0, 0.0), r"s must be a finite number > 0, got inf"),
        (lambda: ops.mask_forward(E, 1.0, 2, 0.0), r"mode must be 0 \(anneal\) or 1 \(ste\), got 2"),
        (lambda: ops.mask_forward(E, 1.0, 0, float("nan")), r"s_max must be finite"),
        (lambda: ops.mask_backward(E[:2], E, 1.0, 0.0), r"grad_m must have the shape of scores \[4, 3\], got \[2, 3\]"),
        (lambda: ops.mask_backward(E.double(), E, 1.0, 0.0), r"grad_m must have the dtype of scores \(Float\), got Double"),
        (lambda: ops.masked_weight_forward(W, E.t(), None, 1.0, 0, 0.0), r"scores must have the shape of weight \[4, 3\], got \[3, 4\]"),
        (lambda: ops.masked_weight_forward(W, E, W, 1.0, 0, 0.0), r"frozen must be a bool tensor or its packed bits \(uint8\), got Float"),
        (lambda: ops.masked_weight_backward(W, W, E, torch.zeros(3, dtype=torch.uint8), 1.0, 0.0, 0), r"frozen given as packed bits \(uint8\) must be 1-D with ceil\(12 / 8\) = 2 bytes"),
        (lambda: ops.masked_weight_forward(W, E, torch.zeros(3, 4, dtype=torch.bool), 1.0, 0, 0.0), r"frozen must have shape \[4, 3\] \(the shape of weight\), got \[3, 4\]"),
        (lambda: ops.masked_weight_backward(W, W, E, None, 1.0, 0.0, 5), r"mode must be 0 \(anneal\) or 1 \(ste\), got 5"),
        (lambda: ops.gate_forward(torch.randn(5), torch.randn(5), 1.0, 0, 0.0), r"y_pre must have at least 2 dimensions"),
        (lambda: ops.gate_forward(torch.randn(2, 5, 3), torch.randn(4), 1.0, 0, 0.0), r"scores must have shape \[5\] \(one score per channel"),
        (lambda: ops.gate_backward(torch.randn(2, 5), torch.randn(2, 4), torch.randn(4), 1.0, 0.0, 0), r"grad_y must have the shape of y_pre"),
        (lambda: ops.block_unit_grad(torch.randn(6, 2, 3, 3), torch.zeros(5, dtype=torch.bool), None, False, 1), r"frozen_out must have shape \[6\] \(out_channels"),
        (lambda: ops.block_unit_grad(torch.randn(6, 2, 3, 3), torch.zeros(6, dtype=torch.bool), torch.zeros(2, dtype=torch.bool), False, 2), r"frozen_in must have shape \[4\]"),
        (lambda: ops.block_unit_grad(torch.randn(6, 2, 3, 3), torch.zeros(8, dtype=torch.bool), None, True, 4), r"size\(0\) \(6\) must be divisible by groups \(4\)"),
        (lambda: ops.block_unit_grad(torch.randn(6, 2), torch.zeros(6), None, False, 1), r"frozen_out must be a bool tensor or its packed bits \(uint8\), got Float"),
        (lambda: ops.block_unit_grad(torch.randn(6, 2), torch.zeros(2, dtype=torch.uint8), None, False, 1), r"frozen_out given as packed bits \(uint8\) must be 1-D with ceil\(6 / 8\) = 1 bytes"),
        (lambda: ops.pack_bits(torch.zeros(3)), r"pack_bits \(CPU\): mask must be a bool tensor, got Float"),
        (lambda: ops.union_count(torch.zeros(2, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), 1, 3, 7), r"reserved_bits must have shape \[3\] \(ceil\(21 / 8\) bytes for outer \* units \* inner = 1 \* 3 \* 7 entries\), got \[2\]"),
        (lambda: ops.union_count(torch.zeros(3, dtype=torch.uint8), torch.zeros(3), 1, 3, 7), r"task_bits must be packed bits \(uint8\), got Float"),
        (lambda: ops.union_count(torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), 1, 0, 7), r"outer, units and inner must be >= 1"),
        (lambda: ops.masked_adam_step(W.clone(), W, W.clone(), W[:2].clone(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False), r"exp_avg_sq must have the shape of param \[4, 3\], got \[2, 3\]"),
        (lambda: ops.masked_adam_step(W.clone(), W, W.clone(), W.clone(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, False), r"step must be >= 1"),
        (lambda: ops.masked_adam_step(W.clone(), W.double(), W.clone(), W.clone(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False), r"grad must have the dtype of param \(Float\), got Double"),
        (lambda: ops.masked_sgd_step(W.clone(), W, None, None, 0.1, 0.9, 0.0, 0.0, False, True), r"momentum_buffer must be a tensor when momentum != 0"),
        (lambda: ops.masked_sgd_step(W.clone(), W, None, torch.zeros(4, 3, dtype=torch.int32), 0.1, 0.0, 0.0, 0.0, False, True), r"frozen must be a bool tensor or its packed bits \(uint8\), got Int"),
        (lambda: ops.sparsity_terms(E, torch.zeros(4, 4, dtype=torch.bool)), r"reserved must have the shape of mask \[4, 3\], got \[4, 4\]"),
    ],
)
def test_cpp_argument_checks(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# ----------------------------------------------------------------------------------------------------------
# tensor scales (s and s_max as 0-dim tensors under torch.compile; backends/compiled.py)
# ----------------------------------------------------------------------------------------------------------
def test_tensor_scale_ops_equal_the_float_ops_and_pass_opcheck():
    ts = torch.ops.dgm_kernels_ts
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=g)
    e = _scores((6, 5, 3, 3), torch.float64, generator=g)
    y_pre = torch.randn(4, 6, 5, 5, dtype=torch.float64, generator=g)
    gate_e = _scores((6,), torch.float64, generator=g)
    frozen = _packed(torch.rand(6, 5, 3, 3, generator=g) < 0.3)
    s, s_max = torch.tensor(30.0, dtype=torch.float64), torch.tensor(400.0, dtype=torch.float64)
    cases = [(ts.mask_forward, ops.mask_forward, (e, s, 0, s_max)),
             (ts.masked_weight_forward, ops.masked_weight_forward, (w, e, frozen, s, 0, s_max)),
             (ts.gate_forward, ops.gate_forward, (y_pre, gate_e, s, 0, s_max))]
    def leaf(a):  # weights, scores and inputs get gradients; scales, modes and frozen bits do not
        differentiable = isinstance(a, torch.Tensor) and a.dtype == torch.float64 and a.dim() > 0
        return a.clone().requires_grad_() if differentiable else a

    for tensor_op, float_op, args in cases:
        floats = tuple(float(a) if isinstance(a, torch.Tensor) and a.dim() == 0 else a for a in args)
        # the same kernels with the same values: bit for bit, forward and backward
        leaves = [leaf(a) for a in args]
        out = tensor_op(*leaves)
        out.backward(torch.ones_like(out))
        ref_leaves = [leaf(a) for a in floats]
        ref = float_op(*ref_leaves)
        ref.backward(torch.ones_like(ref))
        assert torch.equal(out, ref)
        for a, b in zip(leaves, ref_leaves):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert torch.equal(a.grad, b.grad)
        torch.library.opcheck(tensor_op, args)
