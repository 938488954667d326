"""The cpu backend's convolution of a 1-channel input (dgm_kernels/backends/thin_conv.py): the two gradient
kernels against their spec (aten::convolution_backward), the first and second derivatives of the convolution
(what the WGAN-GP penalty differentiates) against F.conv2d's, op registration (opcheck), the kernels' argument
checks, and the drop-in layer dgm_kernels.nn.Conv2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dgm_kernels as dk

try:
    from dgm_kernels.backends import thin_conv
except ImportError as exc:  # the extension is optional: the reference backend works without it
    pytest.skip(f"dgm_kernels._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
                allow_module_level=True)

ops = torch.ops.dgm_kernels

# (batch, in channels, out channels, height, width, kernel, stride, padding)
GEOMETRIES = [
    (4, 1, 16, 32, 32, (5, 5), (2, 2), (2, 2)),  # the MNIST critic's first layer
    (3, 3, 8, 32, 32, (5, 5), (2, 2), (2, 2)),  # the CIFAR/SVHN critic's first layer
    (2, 3, 5, 32, 32, (3, 3), (1, 1), (1, 1)),  # the ResNet stem
    (2, 2, 4, 9, 7, (3, 2), (2, 1), (0, 1)),  # odd sizes, non-square kernel, stride and padding
    (1, 4, 3, 5, 6, (5, 5), (3, 3), (2, 2)),
    (2, 1, 2, 4, 4, (4, 4), (1, 1), (0, 0)),  # the kernel covers the whole input
]


def _case(geometry, dtype, seed=0):
    B, C, O, H, W, k, s, p = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=g)
    w = torch.randn(O, C, *k, dtype=dtype, generator=g)
    b = torch.randn(O, dtype=dtype, generator=g)
    y = F.conv2d(x, w, b, s, p)
    go = torch.randn(y.shape, dtype=dtype, generator=g)
    return x, w, b, go, s, p


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradient_kernels_match_aten(geometry, dtype):
    x, w, b, go, s, p = _case(geometry, dtype)
    gx, gw, _ = torch.ops.aten.convolution_backward(go, x, w, [w.shape[0]], list(s), list(p), [1, 1], False, [0, 0],
                                                    1, [True, True, False])
    torch.testing.assert_close(ops.conv2d_input_grad(go, w, s, p, x.shape[2:]), gx, **_tol(dtype))
    torch.testing.assert_close(ops.conv2d_weight_grad(go, x, w.shape[2:], s, p), gw, **_tol(dtype))


def test_gradient_kernels_read_any_layout():
    x, w, b, go, s, p = _case(GEOMETRIES[1], torch.float64)
    gx = ops.conv2d_input_grad(go, w, s, p, x.shape[2:])
    gw = ops.conv2d_weight_grad(go, x, w.shape[2:], s, p)
    cl = dict(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.conv2d_input_grad(go.contiguous(**cl), w.contiguous(**cl), s, p, x.shape[2:]), gx)
    torch.testing.assert_close(ops.conv2d_weight_grad(go.contiguous(**cl), x.contiguous(**cl), w.shape[2:], s, p), gw)
    wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype)
    wide[..., ::2] = x
    torch.testing.assert_close(ops.conv2d_weight_grad(go, wide[..., ::2], w.shape[2:], s, p), gw)


@pytest.mark.parametrize("geometry", [GEOMETRIES[3], GEOMETRIES[4]])
def test_first_and_second_derivatives(geometry):
    x, w, b, go, s, p = _case(geometry, torch.float64)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.autograd.gradcheck(lambda *a: thin_conv.thin_conv2d(*a, s, p), (x, w, b))
    torch.autograd.gradgradcheck(lambda *a: thin_conv.thin_conv2d(*a, s, p), (x, w, b))


def _penalty(conv, x, w, b, s, p):
    """A WGAN-GP style loss: the norm of the input gradient, differentiated again."""
    x = x.detach().requires_grad_()
    y = conv(x, w, b, s, p)
    g, = torch.autograd.grad(F.leaky_relu(y, 0.2).square().sum(), x, create_graph=True)
    loss = (g.flatten(1).norm(dim=1) - 1).square().mean() + y.mean()
    return torch.autograd.grad(loss, (w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gradient_penalty_matches_f_conv2d(dtype):
    x, w, b, _, s, p = _case(GEOMETRIES[0], dtype)
    w, b = w.requires_grad_(), b.requires_grad_()
    want = _penalty(F.conv2d, x, w, b, s, p)
    got = _penalty(thin_conv.thin_conv2d, x, w, b, s, p)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **_tol(dtype))


@pytest.mark.parametrize("name", ["conv2d_input_grad", "conv2d_weight_grad"])
def test_opcheck(name):
    x, w, b, go, s, p = _case(GEOMETRIES[3], torch.float32)
    args = (go, w, list(s), list(p), list(x.shape[2:])) if name == "conv2d_input_grad" else \
        (go, x, list(w.shape[2:]), list(s), list(p))
    torch.library.opcheck(getattr(ops, name), args, test_utils=("test_schema", "test_faketensor"))


def test_kernels_name_the_bad_argument():
    x, w, b, go, s, p = _case(GEOMETRIES[0], torch.float32)
    with pytest.raises(RuntimeError, match=r"conv2d_input_grad \(CPU\): grad_out must be 16x16 .* got 15x16"):
        ops.conv2d_input_grad(go[:, :, 1:], w, s, p, x.shape[2:])
    with pytest.raises(RuntimeError, match=r"conv2d_weight_grad \(CPU\): input must have the dtype of grad_out"):
        ops.conv2d_weight_grad(go, x.double(), w.shape[2:], s, p)
    with pytest.raises(RuntimeError, match=r"conv2d_input_grad \(CPU\): stride must be >= 1, got \[0, 2\]"):
        ops.conv2d_input_grad(go, w, [0, 2], p, x.shape[2:])
    with pytest.raises(RuntimeError, match=r"weight must have grad_out's 16 output channels"):
        ops.conv2d_input_grad(go, w[:8], s, p, x.shape[2:])
    with pytest.raises(RuntimeError, match=r"input must have the batch size of grad_out \(4\), got 2"):
        ops.conv2d_weight_grad(go, x[:2], w.shape[2:], s, p)


def test_functional_conv2d_takes_the_kernels_for_thin_inputs_only(monkeypatch):
    calls = []
    real = thin_conv.thin_conv2d
    monkeypatch.setattr(thin_conv, "thin_conv2d", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    for channels in (1, 2, 3, thin_conv.THIN_INPUT_CHANNELS + 1):
        x = torch.randn(2, channels, 12, 12)
        w = torch.randn(6, channels, 5, 5)
        for backend in ("reference", "cpu"):
            torch.testing.assert_close(dk.functional.conv2d(x, w, None, 2, 2, backend=backend),
                                       F.conv2d(x, w, None, 2, 2))
    assert calls == [c for c in (1, 2, 3, thin_conv.THIN_INPUT_CHANNELS + 1) if c <= thin_conv.THIN_INPUT_CHANNELS]
    assert calls  # the MNIST critic's first layer takes them
    # unbatched input, groups and dilation: F.conv2d's semantics
    x, w = torch.randn(3, 12, 12), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(dk.functional.conv2d(x, w, padding=1, backend="cpu"), F.conv2d(x, w, padding=1))
    w2 = torch.randn(6, 1, 3, 3)
    torch.testing.assert_close(dk.functional.conv2d(x, w2, groups=3, dilation=2, backend="cpu"),
                               F.conv2d(x, w2, groups=3, dilation=2))
    with pytest.raises(ValueError, match=r"input must have 3 channels .* got 2"):
        dk.functional.conv2d(torch.randn(1, 2, 8, 8), torch.randn(4, 3, 3, 3))


def test_nn_conv2d_is_a_drop_in_torch_conv2d():
    torch.manual_seed(3)
    ours = dk.nn.Conv2d(1, 8, 5, 2, 2)
    torch.manual_seed(3)
    theirs = torch.nn.Conv2d(1, 8, 5, 2, 2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for a, e in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, e)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    with dk.use_backend("cpu"):
        y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    reflect = dk.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
    torch.testing.assert_close(reflect(x), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), reflect.weight,
                                                    reflect.bias))


# (batch, in channels, out channels, height, width, kernel, stride, padding, output padding)
TRANSPOSED = [
    (4, 16, 1, 16, 16, (4, 4), (2, 2), (1, 1), (0, 0)),  # the MNIST DCGAN generator's last layer
    (2, 8, 3, 16, 16, (4, 4), (2, 2), (1, 1), (0, 0)),  # an RGB generator's last layer
    (2, 5, 2, 7, 6, (5, 3), (2, 3), (2, 0), (1, 2)),  # odd sizes, output padding
]


@pytest.mark.parametrize("geometry", TRANSPOSED)
def test_transposed_convolution_to_few_channels(geometry):
    B, C, O, H, W, k, s, p, op = geometry
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(C, O, *k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(O, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(thin_conv.thin_conv_transpose2d(x, w, b, s, p, op), F.conv_transpose2d(x, w, b, s, p, op))
    small = tuple(t.detach()[:1, :, :5, :5].clone().requires_grad_() if t is x else t for t in (x, w, b))
    if geometry is TRANSPOSED[2]:
        torch.autograd.gradcheck(lambda *a: thin_conv.thin_conv_transpose2d(*a, s, p, op), small)
        torch.autograd.gradgradcheck(lambda *a: thin_conv.thin_conv_transpose2d(*a, s, p, op), small)
    # the cpu backend's masked transposed convolution takes this path, with the reference's values and gradients
    scores = torch.randn(w.shape, dtype=w.dtype, generator=g, requires_grad=True)
    outs = {}
    for backend in ("reference", "cpu"):
        y = dk.functional.masked_conv_transpose2d(x, w, scores, 2.0, bias=b, stride=s, padding=p, output_padding=op,
                                                  backend=backend)
        outs[backend] = (y, *torch.autograd.grad(y.square().sum(), (x, w, scores, b)))
    for a, e in zip(outs["cpu"], outs["reference"]):
        torch.testing.assert_close(a, e)


def test_nn_conv_transpose2d_is_a_drop_in_torch_conv_transpose2d():
    torch.manual_seed(4)
    ours = dk.nn.ConvTranspose2d(16, 1, 4, 2, 1, bias=False)
    torch.manual_seed(4)
    theirs = torch.nn.ConvTranspose2d(16, 1, 4, 2, 1, bias=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert torch.equal(ours.weight, theirs.weight)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    for backend in ("reference", "cpu"):
        ours.backend = backend
        y = ours(x)
        torch.testing.assert_close(y, theirs(x))
        torch.testing.assert_close(torch.autograd.grad(y.square().sum(), ours.weight)[0],
                                   torch.autograd.grad(theirs(x).square().sum(), theirs.weight)[0])
    # output_size picks the output padding: torch's own forward
    assert ours(x, output_size=[17, 17]).shape[-2:] == (17, 17)
    with pytest.raises(ValueError, match=r"input must have 16 channels .* got 3"):
        dk.functional.conv_transpose2d(torch.randn(1, 3, 4, 4), ours.weight)


def _cuda_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is visible on this machine)"
    from dgm_kernels import _C

    return None if _C.cuda_built() else f"dgm_kernels._C was built without CUDA: {_C.cuda_skip_reason()}"


@pytest.mark.skipif(_cuda_reason() is not None, reason=str(_cuda_reason()))
@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_gradient_ops_on_cuda_match_the_cpu_kernels(geometry):
    # on CUDA the two ops are their spec (cuDNN's backward); the same arguments give the same gradients
    x, w, b, go, s, p = _case(geometry, torch.float64)
    cx, cw, cgo = (t.cuda() for t in (x, w, go))
    torch.testing.assert_close(ops.conv2d_input_grad(cgo, cw, s, p, x.shape[2:]).cpu(),
                               ops.conv2d_input_grad(go, w, s, p, x.shape[2:]))
    torch.testing.assert_close(ops.conv2d_weight_grad(cgo, cx, w.shape[2:], s, p).cpu(),
                               ops.conv2d_weight_grad(go, x, w.shape[2:], s, p))
    with pytest.raises(RuntimeError, match=r"conv2d_input_grad \(CUDA\): grad_out must be"):
        ops.conv2d_input_grad(cgo[:, :, 1:], cw, s, p, x.shape[2:])
