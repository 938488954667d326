"""The triton backend against the reference: every primitive, both convolution strategies, the custom-op
registration (opcheck, torch.compile) and, on a GPU, half precision and the per-shape strategy choice.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (float32/float64, small tensors).
"""
import os

import torch

if not torch.cuda.is_available():  # before anything defines a Triton kernel (see tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dgm_kernels  # noqa: E402
from dgm_kernels import functional as F  # noqa: E402
from dgm_kernels.backends import reference  # noqa: E402
from dgm_kernels.backends import unavailable_reason  # noqa: E402

_WHY = unavailable_reason("triton")
if _WHY is not None:  # pragma: no cover - e.g. triton not installed
    pytest.skip(f"triton backend cannot run here: {_WHY}", allow_module_level=True)

from dgm_kernels.backends import triton_backend as TB  # noqa: E402
from dgm_kernels.backends.triton_kernels import _common  # noqa: E402
from dgm_kernels.backends.triton_kernels import bits as bit_kernels  # noqa: E402
from dgm_kernels.backends.triton_kernels import conv as conv_kernels  # noqa: E402
from dgm_kernels.backends.triton_kernels import conv_strategy  # noqa: E402
from dgm_kernels.bits import pack_bits_reference, unit_block_pattern, unpack_bits_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _common.INTERPRETED else "cpu")
needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (none is visible on this machine)")
ANNEAL, STE = "anneal", "ste"


@pytest.fixture(autouse=True)
def _auto_strategy():
    yield
    conv_strategy.set_conv_strategy("auto")


def _close(actual, expected, what, rtol=1e-4, atol_scale=1e-5):
    """allclose with an absolute floor scaled to the expected tensor's magnitude.

    The bound, from the error of the compiled kernels on a GPU (the interpreter is exact by comparison): the
    elementwise ops use ex2.approx (relative error <= 2**-22), approximate division (<= 2 ulp) and FMA contraction
    (<= 1 ulp per contracted pair), under 16 ulps (1e-6) in all; the gate's reduction sums up to 2**20 float32
    terms in a blockwise order, <= 20 ulps of the sum of their magnitudes; the fused convolution accumulates K
    products (K <= 1024 here) in another order than cuDNN's, <= K * 2**-24 = 6e-5 of the sum of |products|. rtol
    1e-4 covers the largest; atol, scaled to the tensor's magnitude, covers entries whose terms cancel.
    """
    assert actual is not None and expected is not None, f"{what}: a gradient is missing"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_scale * scale, msg=lambda m: f"{what}: {m}")


def _grads(fn, backend, tensors, seed=7):
    """fn(*leaves, backend) and the gradients of its floating inputs for a fixed random grad_output."""
    # detach() keeps the strides: non-contiguous inputs stay non-contiguous leaves
    leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in tensors]
    out = fn(*leaves, backend)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad if t is not None and t.is_floating_point() else None for t in leaves]


def _compare(fn, tensors, what, **tol):
    outs, grads = _grads(fn, "triton", tensors)
    ref_outs, ref_grads = _grads(fn, "reference", tensors)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        _close(o, r, f"{what} output {i}", **tol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None and g is None:
            continue
        _close(g, r, f"{what} grad of input {i}", **tol)
    return outs, grads


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).to(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------
def test_unavailable_reason():
    backend = TB.TritonBackend()
    assert backend.unavailable_reason(DEVICE) is None
    assert backend.unavailable_reason(None) is None
    why = backend.unavailable_reason(torch.device("meta"))
    assert why is not None and "meta" in why
    if _common.INTERPRETED:
        assert backend.unavailable_reason("cpu") is None
    elif not torch.cuda.is_available():  # pragma: no cover - the module is skipped then
        assert "CUDA GPU" in backend.unavailable_reason("cpu")


def test_set_conv_strategy_rejects_unknown_names():
    with pytest.raises(ValueError, match="strategy must be one of"):
        conv_strategy.set_conv_strategy("fastest")
    conv_strategy.set_conv_strategy("fused")
    assert conv_strategy.get_conv_strategy() == "fused"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's dtype limit concerns CPU tensors only")
def test_half_precision_on_cpu_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="scores.*float32 and float64"):
        F.mask(torch.zeros(3, dtype=torch.float16), 1.0, backend="triton")


# ----------------------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------------------
SCHEDULES = [(1.0, None), (3.0, 40.0), (400.0, 400.0), (1e4, 1e4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [ANNEAL, STE])
@pytest.mark.parametrize("s,s_max", SCHEDULES)
def test_mask(dtype, mode, s, s_max):
    # scores spread over the regions that matter: |e| > 17 (naive sigmoid' cancels), |s e| > 50 (clamp)
    e = _rand(6, 9, dtype=dtype, scale=8.0)
    _compare(lambda e, b: F.mask(e, s, mode=mode, s_max=s_max, backend=b), [e], f"mask {mode} s={s}")


def test_mask_derivative_survives_where_the_naive_formula_cancels():
    e = torch.tensor([20.0, -25.0, 30.0], device=DEVICE, requires_grad=True)
    F.mask(e, 1.0, backend="triton").sum().backward()
    assert (e.grad > 0).all(), e.grad  # sigmoid(x) * (1 - sigmoid(x)) would give exact zeros here


def test_no_subnormal_outputs():
    e = torch.linspace(-60, 60, 241, device=DEVICE, requires_grad=True)
    w = torch.ones_like(e)
    m = F.masked_weight(w, e, 5.0, s_max=None, backend="triton")
    m.backward(torch.full_like(m, 1e-20))
    for name, t in (("mask", m), ("grad_e", e.grad)):
        tiny = (t != 0) & (t.abs() < 1e-30)
        assert not tiny.any(), f"{name} holds subnormal-range values {t[tiny]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [ANNEAL, STE])
@pytest.mark.parametrize("with_frozen", [False, True])
@pytest.mark.parametrize("s,s_max", [(2.0, None), (30.0, 100.0)])
def test_masked_weight(dtype, mode, with_frozen, s, s_max):
    w, e = _rand(5, 3, 3, 2, dtype=dtype), _rand(5, 3, 3, 2, dtype=dtype, scale=2.0)
    frozen = (torch.rand(5, 3, 3, 2) < 0.4).to(DEVICE) if with_frozen else None
    _, grads = _compare(lambda w, e, b: F.masked_weight(w, e, s, frozen, mode=mode, s_max=s_max, backend=b),
                        [w, e], f"masked_weight {mode}")
    if with_frozen:
        assert (grads[0][frozen] == 0).all(), "frozen weights must get exactly zero gradient"


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 7), (2, 4, 3, 5), (1, 3, 1, 1)])
@pytest.mark.parametrize("mode", [ANNEAL, STE])
@pytest.mark.parametrize("s_max", [None, 50.0])
def test_channel_gate(shape, mode, s_max):
    y, e = _rand(*shape), _rand(shape[1], scale=2.0)
    backend_of = {"triton": TB.TritonBackend(), "reference": reference.ReferenceBackend()}
    _compare(lambda y, e, b: backend_of[b].channel_gate(y, e, 4.0, 0 if mode == ANNEAL else 1, s_max),
             [y, e], f"channel_gate {shape}")


def test_channel_gate_non_contiguous_input():
    y = _rand(3, 8, 5, 4).transpose(2, 3)
    e = _rand(8)
    backend_of = {"triton": TB.TritonBackend(), "reference": reference.ReferenceBackend()}
    _compare(lambda y, e, b: backend_of[b].channel_gate(y, e, 2.0, 0, 10.0), [y, e], "channel_gate strided")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_frozen_in", [False, True])
def test_block_unit_grad(transposed, groups, with_frozen_in):
    rows, cols = 4, 3  # conv: [out=4, in/groups=3]; transposed: [in=4, out/groups=3]
    out_c = cols * groups if transposed else rows
    in_c = rows if transposed else cols * groups
    w = _rand(rows, cols, 3, 2)
    frozen_out = (torch.arange(out_c) % 2 == 0).to(DEVICE)
    frozen_in = (torch.arange(in_c) % 3 != 1).to(DEVICE) if with_frozen_in else None
    backend_of = {"triton": TB.TritonBackend(), "reference": reference.ReferenceBackend()}
    _compare(lambda w, b: backend_of[b].block_unit_grad(w, frozen_out, frozen_in, transposed, groups), [w],
             "block_unit_grad")


@pytest.mark.parametrize("with_reserved", [False, True])
def test_sparsity_regularizer(with_reserved):
    masks = [torch.rand(6, 3, 4, 4, device=DEVICE), torch.rand(17, device=DEVICE)]
    reserved = [(torch.rand(m.shape) < 0.5).to(DEVICE) for m in masks] if with_reserved else None
    if with_reserved:
        reserved[1] = None  # a layer with nothing reserved yet

    def fn(a, b, backend):
        return F.sparsity_regularizer([a, b], reserved, backend=backend)

    _compare(fn, masks, "sparsity_regularizer")


# ----------------------------------------------------------------------------------------------------------
# convolutions
# ----------------------------------------------------------------------------------------------------------
# (name, N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, output_padding)
GEOMETRIES = [
    ("dgm_k4s2p1", 2, 6, 4, 5, 4, 4, 2, 1, 1, 1, 0),
    ("1x1", 2, 5, 7, 3, 4, 1, 1, 0, 1, 1, 0),
    ("odd", 1, 3, 5, 7, 5, (3, 2), (2, 1), (1, 0), 1, 1, (1, 0)),
    ("dilation", 2, 4, 4, 7, 6, 3, (1, 2), 2, 2, 1, (0, 1)),
    ("groups", 2, 6, 4, 5, 5, 3, 2, 1, 1, 2, 1),
    ("first_layer", 1, 8, 6, 1, 1, 4, 1, 0, 1, 1, 0),  # DGM's 1x1 -> 4x4 (conv: 4x4 -> 1x1)
]


def _conv_inputs(geometry, transposed, gated, dtype=torch.float32, layout="contiguous"):
    _name, n, c_in, c_out, h, w, k, stride, padding, dilation, groups, out_pad = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    if _name == "first_layer" and not transposed:  # its mirror image: a 4x4 input reduced to 1x1
        h, w = kh, kw
    shape = (c_in, c_out // groups, kh, kw) if transposed else (c_out, c_in // groups, kh, kw)
    if layout == "strided":  # a view with a step: not dense, no stride order
        x = _rand(n, c_in, h, 2 * w, dtype=dtype)[..., ::2]
    elif layout == "channels_last":
        x = _rand(n, c_in, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = _rand(n, c_in, h, w, dtype=dtype)
    weight = _rand(*shape, dtype=dtype) * 0.5
    if gated:
        scores = _rand(c_out, dtype=dtype, scale=2.0)
        frozen = ((torch.arange(c_out) % 2 == 0).to(DEVICE), (torch.arange(c_in) % 3 == 0).to(DEVICE))
    else:
        scores = _rand(*shape, dtype=dtype, scale=2.0)
        frozen = ((torch.rand(shape) < 0.3).to(DEVICE),)
    bias = _rand(c_out, dtype=dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kwargs["output_padding"] = out_pad
    return x, weight, scores, frozen, bias, kwargs


def _conv_fn(transposed, gated, frozen, kwargs, mode, s, s_max, use_bias):
    if gated:
        op = F.gated_conv_transpose2d if transposed else F.gated_conv2d
    else:
        op = F.masked_conv_transpose2d if transposed else F.masked_conv2d

    def fn(x, weight, scores, bias, backend):
        return op(x, weight, scores, s, *frozen, bias=bias if use_bias else None, mode=mode, s_max=s_max,
                  backend=backend, **kwargs)

    return fn


@pytest.fixture
def fused_kernel_calls(monkeypatch):
    """Counts the launches of the fused convolution kernel, so a test knows which strategy really ran."""
    calls = []
    original = conv_kernels.conv

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scatter"))
        return original(*args, **kwargs)

    monkeypatch.setattr(conv_kernels, "conv", counting)
    return calls


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("gated", [False, True], ids=["masked", "gated"])
@pytest.mark.parametrize("strategy", ["fused", "unfused"])
def test_conv_parity(geometry, transposed, gated, strategy, fused_kernel_calls):
    conv_strategy.set_conv_strategy(strategy)
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(geometry, transposed, gated)
    # alternate the schedule across cases to cover both modes, with and without compensation and bias
    variant = (GEOMETRIES.index(geometry) + transposed) % 2
    mode, s_max, use_bias = (ANNEAL, 20.0, True) if variant == 0 else (STE, None, False)
    fn = _conv_fn(transposed, gated, frozen, kwargs, mode, 3.0, s_max, use_bias)
    _, grads = _compare(fn, [x, weight, scores, bias], f"{strategy} {geometry[0]} transposed={transposed}")
    # forward and data gradient: two launches of the fused kernel, of opposite kinds
    assert fused_kernel_calls == ([transposed, not transposed] if strategy == "fused" else [])
    if not gated:
        assert (grads[1][frozen[0]] == 0).all()


@pytest.mark.parametrize("strategy", ["fused", "unfused"])
@pytest.mark.parametrize("gated", [False, True], ids=["masked", "gated"])
@pytest.mark.parametrize("layout", ["strided", "channels_last"])
def test_conv_non_contiguous_inputs(strategy, gated, layout):
    conv_strategy.set_conv_strategy(strategy)
    for transposed in (False, True):
        x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[0], transposed, gated, layout=layout)
        assert not x.is_contiguous()
        # scores with the same values and other strides
        scores = torch.stack([scores, scores], dim=-1)[..., 0]
        assert not scores.is_contiguous()
        fn = _conv_fn(transposed, gated, frozen, kwargs, ANNEAL, 2.0, 10.0, True)
        _compare(fn, [x, weight, scores, bias], f"{layout} x, {strategy}, transposed={transposed}")


def test_conv_unbatched_input_and_partial_gradients():
    # 3-D input (functional adds the batch dim) and only some inputs requiring gradients
    conv_strategy.set_conv_strategy("fused")
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[0], True, False)
    x = x[0]
    outs = {}
    for backend in ("triton", "reference"):
        e = scores.clone().requires_grad_(True)
        y = F.masked_conv_transpose2d(x, weight, e, 3.0, *frozen, bias=bias, backend=backend, **kwargs)
        y.square().sum().backward()
        outs[backend] = (y.detach(), e.grad)
    _close(outs["triton"][0], outs["reference"][0], "unbatched output")
    _close(outs["triton"][1], outs["reference"][1], "unbatched grad_e")


def test_auto_strategy_uses_the_fused_kernel_for_small_tensors_in_the_interpreter(fused_kernel_calls):
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU, auto times both strategies (see test_auto_strategy_times_and_caches_on_gpu)")
    conv_strategy.set_conv_strategy("auto")
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[0], False, False)
    F.masked_conv2d(x, weight, scores, 2.0, *frozen, bias=bias, backend="triton", **kwargs)
    assert fused_kernel_calls == [False]


def test_float64_convolution_runs_unfused_and_passes_gradcheck(fused_kernel_calls):
    conv_strategy.set_conv_strategy("fused")  # float64 must fall back to the unfused path whatever the setting
    tiny = ("tiny", 1, 2, 4, 3, 2, 2, 2, 1, 1, 2, 1)
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(tiny, True, True, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, weight, scores, bias)]
    # no frozen units here: a frozen weight's zero gradient is by design not the numerical derivative
    assert torch.autograd.gradcheck(
        lambda x, w, e, b: F.gated_conv_transpose2d(x, w, e, 2.0, bias=b, backend="triton", **kwargs),
        leaves, fast_mode=True,
    )
    assert fused_kernel_calls == []


def test_primitives_gradcheck_float64():
    e = _rand(4, 5, dtype=torch.float64).requires_grad_(True)
    w = _rand(4, 5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, e: F.masked_weight(w, e, 1.5, backend="triton"), (w, e), fast_mode=True)
    y = _rand(2, 4, 3, dtype=torch.float64).requires_grad_(True)
    g = _rand(4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, g: TB.TritonBackend().channel_gate(y, g, 1.5, 0, None), (y, g),
                                    fast_mode=True)


# ----------------------------------------------------------------------------------------------------------
# custom-op registration
# ----------------------------------------------------------------------------------------------------------
def _opcheck_cases():
    def rg(*shape):
        return _rand(*shape).requires_grad_(True)

    def flags(*shape, p=0.4):
        return (torch.rand(*shape) < p).to(DEVICE)

    w, e, x, b = rg(4, 2, 3, 3), rg(4, 2, 3, 3), rg(2, 4, 5, 5), rg(4)
    conv_geo = ([2, 2], [1, 1], [1, 1], 2, [0, 0])
    ops = torch.ops.dgm_triton
    return {
        "mask": (ops.mask, (rg(5, 7), 2.0, 0, 10.0)),
        "mask_ste": (ops.mask, (rg(5, 7), 2.0, 1, None)),
        "masked_weight": (ops.masked_weight, (w, e, flags(4, 2, 3, 3), 2.0, 0, 10.0)),
        "channel_gate": (ops.channel_gate, (rg(2, 4, 3, 3), rg(4), 2.0, 0, None)),
        "block_unit_grad": (ops.block_unit_grad, (w, flags(4), flags(4), False, 2)),
        "sparsity_terms": (ops.sparsity_terms, (torch.rand(5, 7, device=DEVICE).requires_grad_(True), flags(5, 7))),
        "masked_conv": (ops.masked_conv, (x, w, e, flags(4, 2, 3, 3), b, 2.0, 0, 10.0, False, *conv_geo)),
        "masked_conv_transposed": (ops.masked_conv, (rg(2, 4, 3, 3), w, e, None, None, 2.0, 1, None, True,
                                                     [2, 2], [1, 1], [1, 1], 2, [1, 1])),
        "gated_conv": (ops.gated_conv, (x, w, rg(4), flags(4), flags(4), b, 2.0, 0, 10.0, False, *conv_geo)),
        "gated_conv_transposed": (ops.gated_conv, (rg(1, 4, 3, 3), w, rg(4), flags(4), None, b, 2.0, 1, 5.0, True,
                                                   [2, 2], [1, 1], [1, 1], 2, [1, 1])),
        "masked_conv_backward": (ops.masked_conv_backward, (_rand(2, 4, 3, 3), x.detach(), w.detach(), e.detach(),
                                                            None, 2.0, 0, None, False, *conv_geo, True, False, True, True)),
    }


_CONV_OPS = [case for case in _opcheck_cases() if "conv" in case]
# the strategy only matters to the convolutions
_OPCHECK = [(case, "fused") for case in _opcheck_cases()] + [(case, "unfused") for case in _CONV_OPS]


@pytest.mark.parametrize("case,strategy", _OPCHECK, ids=[f"{c}-{s}" for c, s in _OPCHECK])
def test_opcheck(case, strategy):
    conv_strategy.set_conv_strategy(strategy)
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _small_generator(backend):
    torch.manual_seed(0)
    nn = dgm_kernels.nn
    layers = torch.nn.ModuleList([
        nn.MaskedConvTranspose2d(8, 6, 4, 1, 0, bias=False, backend=backend),
        nn.GatedConvTranspose2d(6, 4, 4, 2, 1, backend=backend),
        nn.MaskedConv2d(4, 3, 3, 1, 1, backend=backend),
    ]).to(DEVICE)
    for i, layer in enumerate(layers):
        layer.s, layer.s_max = 5.0, 50.0
        with torch.no_grad():
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=torch.Generator().manual_seed(i)))
    layers[1].frozen_out[::2] = True
    layers[2].frozen[0] = True

    def forward(z):
        h = torch.relu(layers[0](z))
        h = torch.relu(layers[1](h))
        return torch.tanh(layers[2](h))

    return layers, forward


@pytest.mark.parametrize("compiler", ["aot_eager"] + (["inductor"] if DEVICE.type == "cuda" else []))
def test_torch_compile_fullgraph(compiler):
    # Inductor on the CPU needs ~25 s of C++ compilation here; the interpreter run checks dynamo + AOT autograd.
    z = _rand(2, 8, 1, 1)
    results = {}
    for backend in ("reference", "triton"):
        layers, forward = _small_generator(backend)
        fn = torch.compile(forward, fullgraph=True, backend=compiler) if backend == "triton" else forward
        y = fn(z)
        y.square().sum().backward()
        results[backend] = (y.detach(), [p.grad for p in layers.parameters()])
    _close(results["triton"][0], results["reference"][0], "compiled output")
    for i, (g, r) in enumerate(zip(results["triton"][1], results["reference"][1])):
        _close(g, r, f"compiled grad of parameter {i}")


# ----------------------------------------------------------------------------------------------------------
# the mask ledger: this backend's own parameters and packed bits read inside the kernels (the parity of
# pack_bits, union_count and the optimizer steps with the reference: tests/kernels/test_ledger_kernels.py)
# ----------------------------------------------------------------------------------------------------------
BACKEND = TB.TritonBackend()


# [outer, units, inner]: ranges that start and end inside bytes (inner 1, 3, 5, 13, 17), one unit, one
# entry, a DGMa gate (1, units, 1), a transposed-conv layout (in, out, kH * kW)
UNION_LAYOUTS = [(1, 24, 192), (12, 5, 16), (1, 7, 1), (3, 1, 9), (2, 13, 5), (5, 6, 3), (4, 3, 17),
                 (1, 1, 1), (1, 300, 1), (9, 4, 13)]


@pytest.mark.parametrize("layout", UNION_LAYOUTS, ids=["x".join(map(str, layout)) for layout in UNION_LAYOUTS])
@pytest.mark.parametrize("chunks", [2, 7])
def test_union_count_split_over_chunks(layout, chunks):
    # chunks > 1 splits each unit's ranges over programs (the GPU's path, chosen by the kernel's launcher and
    # so not reachable through the backend in the interpreter) and sums the partial counts; one chunk, the
    # default here, is the backend's path in test_ledger_kernels.py
    outer, units, inner = layout
    n = outer * units * inner
    reserved = pack_bits_reference((torch.rand(n) < 0.3).to(DEVICE))
    task = pack_bits_reference((torch.rand(n) < 0.5).to(DEVICE))
    union, counts = bit_kernels.union_count(reserved, task, outer, units, inner, chunks=chunks)
    want_union, want_counts = reference.union_count(reserved, task, outer, units, inner)
    assert torch.equal(union, want_union)
    assert counts.dtype == torch.int64 and torch.equal(counts, want_counts), (counts, want_counts)
    # the counts, written out: task & ~reserved per unit
    new = unpack_bits_reference(task, (n,)) & ~unpack_bits_reference(reserved, (n,))
    assert counts.tolist() == new.view(outer, units, inner).sum(dim=(0, 2)).tolist()


@pytest.fixture
def forbid_unpacking(monkeypatch):
    """Call it to make any unpacking of packed bits in PyTorch fail: packed frozen masks must then reach
    the kernels as they are."""
    import dgm_kernels.bits as bits_module

    def refuse(*args, **kwargs):
        raise AssertionError("packed bits were unpacked in PyTorch instead of being read by the kernel")

    return lambda: monkeypatch.setattr(bits_module, "unpack_bits_reference", refuse)


@pytest.mark.parametrize("s_max", [None, 30.0])
def test_masked_weight_reads_packed_bits_in_the_kernel(s_max, forbid_unpacking):
    w, e = _rand(5, 3, 3, 2), _rand(5, 3, 3, 2, scale=2.0)
    frozen = (torch.rand(5, 3, 3, 2) < 0.4).to(DEVICE)
    _, want = _grads(lambda w, e, b: F.masked_weight(w, e, 2.0, frozen, s_max=s_max, backend=b), "triton", [w, e])
    bits = pack_bits_reference(frozen)
    forbid_unpacking()
    _, got = _grads(lambda w, e, b: F.masked_weight(w, e, 2.0, bits, s_max=s_max, backend=b), "triton", [w, e])
    for g, r in zip(got, want):
        assert torch.equal(g, r)
    assert (got[0][frozen] == 0).all()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_frozen_in", [False, True])
def test_block_unit_grad_reads_packed_bits(transposed, groups, with_frozen_in, forbid_unpacking):
    # 10 output and 18 input units: the bits of a unit vector span two and three bytes
    rows, cols = (18, 10 // groups) if transposed else (10, 18 // groups)
    w = _rand(rows, cols, 2, 2)
    out_c = cols * groups if transposed else rows
    in_c = rows if transposed else cols * groups
    frozen_out = (torch.rand(out_c) < 0.5).to(DEVICE)
    frozen_in = (torch.rand(in_c) < 0.5).to(DEVICE) if with_frozen_in else None
    grads = {}
    for form in ("bool", "packed"):
        if form == "packed":
            forbid_unpacking()
        fo = frozen_out if form == "bool" else pack_bits_reference(frozen_out)
        fi = frozen_in if form == "bool" or frozen_in is None else pack_bits_reference(frozen_in)
        leaf = w.clone().requires_grad_(True)
        BACKEND.block_unit_grad(leaf, fo, fi, transposed, groups).backward(torch.ones_like(w))
        grads[form] = leaf.grad
    block = unit_block_pattern(w.shape, frozen_out, frozen_in, transposed, groups)
    assert block.any() and (~block).any()
    assert torch.equal(grads["packed"], grads["bool"])
    assert torch.equal(grads["packed"], (~block).to(w.dtype)[..., None, None].expand_as(w))


@pytest.mark.parametrize("strategy", ["fused", "unfused"])
@pytest.mark.parametrize("gated", [False, True], ids=["masked", "gated"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_conv_reads_packed_bits_in_the_kernel(strategy, gated, transposed, forbid_unpacking):
    conv_strategy.set_conv_strategy(strategy)
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[4], transposed, gated)  # groups=2
    fn_dense = _conv_fn(transposed, gated, frozen, kwargs, ANNEAL, 3.0, 20.0, True)
    outs, want = _grads(fn_dense, "triton", [x, weight, scores, bias])
    packed = tuple(pack_bits_reference(f) for f in frozen)
    fn_packed = _conv_fn(transposed, gated, packed, kwargs, ANNEAL, 3.0, 20.0, True)
    forbid_unpacking()
    outs_packed, got = _grads(fn_packed, "triton", [x, weight, scores, bias])
    assert torch.equal(outs_packed[0], outs[0])
    for i, (g, r) in enumerate(zip(got, want)):
        assert (g is None) == (r is None) and (g is None or torch.equal(g, r)), f"grad of input {i}"


def test_ledger_ops_opcheck():
    ops = torch.ops.dgm_triton
    flags = (torch.rand(5, 7) < 0.4).to(DEVICE)
    bits = pack_bits_reference(flags)
    r = pack_bits_reference((torch.rand(90) < 0.3).to(DEVICE))
    t = pack_bits_reference((torch.rand(90) < 0.5).to(DEVICE))
    cases = [
        (ops.pack_bits, (flags,)),
        (ops.pack_bits, (flags.t(),)),
        (ops.union_count, (r, t, 3, 5, 6)),
        (ops.adam_step, (_rand(5, 7), _rand(5, 7), _rand(5, 7), _rand(5, 7).abs(), bits, 0.1, 0.9, 0.99, 1e-8, 0.01, 2,
                         False)),
        (ops.adam_step, (_rand(5, 7), _rand(5, 7), _rand(5, 7), _rand(5, 7).abs(), flags, 0.1, 0.9, 0.99, 1e-8, 0.1, 1,
                         True)),
        (ops.sgd_step, (_rand(5, 7), _rand(5, 7), _rand(5, 7), bits, 0.1, 0.9, 0.0, 0.01, True, False)),
        (ops.sgd_step, (_rand(5, 7), _rand(5, 7), None, None, 0.1, 0.0, 0.0, 0.0, False, True)),
        (ops.masked_weight, (_rand(5, 7).requires_grad_(True), _rand(5, 7).requires_grad_(True), bits, 2.0, 0, 10.0)),
        (ops.block_unit_grad, (_rand(4, 2, 3, 3).requires_grad_(True), pack_bits_reference(flags[0, :4]),
                               pack_bits_reference(flags[1, :4]), False, 2)),
        (ops.gated_conv, (_rand(2, 4, 5, 5).requires_grad_(True), _rand(4, 2, 3, 3).requires_grad_(True),
                          _rand(4).requires_grad_(True), pack_bits_reference(flags[0, :4]),
                          pack_bits_reference(flags[1, :4]), _rand(4).requires_grad_(True), 2.0, 0, 10.0, False,
                          [2, 2], [1, 1], [1, 1], 2, [0, 0])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    # the mutations are declared in the schemas (and nothing else is said to be written)
    def written(op):
        return [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]

    assert written(ops.adam_step) == ["param", "exp_avg", "exp_avg_sq"]
    assert written(ops.sgd_step) == ["param", "momentum_buffer"]
    assert written(ops.pack_bits) == written(ops.union_count) == []


def test_masked_optimizers_on_the_triton_backend_leave_frozen_entries_bit_identical():
    # the optimizers of dgm_kernels.optim route through this backend's fused steps
    frozen = (torch.rand(8, 6) < 0.5).to(DEVICE)
    for make in (lambda ps: dgm_kernels.optim.MaskedSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, backend="triton"),
                 lambda ps: dgm_kernels.optim.MaskedAdamW(ps, lr=0.1, weight_decay=0.1, backend="triton")):
        p = torch.nn.Parameter(_rand(8, 6))
        before = p.detach().clone()
        opt = make([p])
        opt.set_frozen(p, frozen)
        assert opt.frozen_of(p).dtype == torch.uint8  # packed by this backend's pack_bits
        for _ in range(3):
            p.grad = _rand(8, 6)
            opt.step()
        assert torch.equal(p.detach()[frozen], before[frozen])
        assert (p.detach()[~frozen] != before[~frozen]).all()


# ----------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------
@needs_gpu
def test_auto_strategy_times_and_caches_on_gpu():
    conv_strategy.clear_conv_choices()
    conv_strategy.set_conv_strategy("auto")
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[0], True, False)
    x.requires_grad_(True)
    F.masked_conv_transpose2d(x, weight, scores, 2.0, *frozen, bias=bias, backend="triton", **kwargs).sum().backward()
    choices = conv_strategy.conv_choices()
    assert {key[0] for key in choices} == {"forward", "backward"}
    assert set(choices.values()) <= {"fused", "unfused"}
    F.masked_conv_transpose2d(x, weight, scores, 2.0, *frozen, bias=bias, backend="triton", **kwargs)
    assert conv_strategy.conv_choices() == choices  # cached, not timed again


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["fused", "unfused"])
@pytest.mark.parametrize("gated", [False, True], ids=["masked", "gated"])
def test_half_precision_error_at_most_twice_plain_pytorch(dtype, strategy, gated):
    conv_strategy.set_conv_strategy(strategy)
    x, weight, scores, frozen, bias, kwargs = _conv_inputs(GEOMETRIES[0], True, gated)
    fn = _conv_fn(True, gated, frozen, kwargs, ANNEAL, 3.0, 20.0, True)
    exact = fn(x, weight, scores, bias, "reference")
    low = [t.to(dtype) for t in (x, weight, scores, bias)]
    err_triton = (fn(*low, "triton").float() - exact).abs().max()
    err_torch = (fn(*low, "reference").float() - exact).abs().max()
    assert err_triton <= 2 * err_torch + 1e-6, (err_triton, err_torch)
