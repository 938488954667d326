"""The layers' mask options of issue 16: the mask a forward used, handed back (``return_mask``), HAT's own float
derivative (``derivative="hat"``), HAT's soft cumulative mask in the regulariser (``soft=True``) and in the gradient
blocking (``soft_block_gradients_``).

Each test carries its own small reference, written from HAT's formulas (Serra et al. 2018), not from the library.
Tolerances: float32, relative 2e-4 of the largest magnitude through a matrix product; exact where nothing is summed.
"""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels import nn as dnn

from helpers import backend_params

# the Triton interpreter adds nothing here (the options run the composition, not the fused kernels) but minutes
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params([("cpu", "cpu"), ("cuda", "cuda")])


def _layer(kind, backend, device):
    if kind == "gated-linear":
        layer = dnn.GatedLinear(6, 5, backend=backend)
        x = torch.randn(4, 6)
    elif kind == "gated-conv":
        layer = dnn.GatedConv2d(3, 4, 3, padding=1, backend=backend)
        x = torch.randn(2, 3, 6, 6)
    elif kind == "gated-convT":
        layer = dnn.GatedConvTranspose2d(3, 4, 4, 2, 1, backend=backend)
        x = torch.randn(2, 3, 5, 5)
    elif kind == "masked-linear":
        layer = dnn.MaskedLinear(6, 5, backend=backend)
        x = torch.randn(4, 6)
    elif kind == "masked-conv":
        layer = dnn.MaskedConv2d(3, 4, 3, padding=1, backend=backend)
        x = torch.randn(2, 3, 6, 6)
    else:
        layer = dnn.MaskedConvTranspose2d(3, 4, 4, 2, 1, backend=backend)
        x = torch.randn(2, 3, 5, 5)
    layer = layer.to(device)
    with torch.no_grad():
        layer.scores.normal_(0.0, 0.5)
    # freeze a few entries, so that the composition's blocking is checked too
    if layer.mask_kind == dnn.UNIT:
        fo = torch.zeros(layer.out_width, dtype=torch.bool, device=device)
        fo[::2] = True
        fi = torch.zeros(layer.in_width, dtype=torch.bool, device=device)
        fi[1::2] = True
        layer.set_frozen(fo, fi)
    else:
        frozen = torch.rand(layer.weight.shape, device=device) < 0.4
        layer.set_frozen(frozen)
    return layer, x.to(device)


KINDS = ["gated-linear", "gated-conv", "gated-convT", "masked-linear", "masked-conv", "masked-convT"]


def _grads(layer, x, *, return_mask, mask_weight):
    layer.zero_grad(set_to_none=True)
    result = layer(x, return_mask=return_mask) if return_mask else layer(x)
    if return_mask:
        out, m = result
    else:
        # what a regulariser had to do without the option: compute the mask a second time
        out, m = result, dk.mask(layer.scores, layer.s, mode=layer.mode, s_max=layer.s_max, backend=layer.backend)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum() + mask_weight * m.sum()
    loss.backward()
    return out.detach(), m.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("mode,s_max", [("anneal", None), ("anneal", 400.0), ("ste", 400.0)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_return_mask_hands_back_the_mask_the_forward_used(backend, device, kind, mode, s_max):
    layer, x = _layer(kind, backend, device)
    layer.mode, layer.s, layer.s_max = mode, 3.0, s_max
    out0, m0, grads0 = _grads(layer, x, return_mask=False, mask_weight=0.7)
    out1, m1, grads1 = _grads(layer, x, return_mask=True, mask_weight=0.7)
    scale = max(out0.abs().max().item(), 1e-6)
    torch.testing.assert_close(out1, out0, rtol=2e-4, atol=2e-4 * scale)
    torch.testing.assert_close(m1, m0, rtol=1e-6, atol=1e-7)
    assert m1.shape == layer.mask_shape()
    for name in grads0:
        g0 = grads0[name]
        torch.testing.assert_close(grads1[name], g0, rtol=2e-4, atol=2e-4 * max(g0.abs().max().item(), 1e-6),
                                   msg=lambda msg: f"{name}: {msg}")
    # frozen entries stay exactly without gradient on the composition path too
    if layer.mask_kind == dnn.WEIGHT:
        frozen = layer.frozen_mask()
        assert (grads1["weight"][frozen] == 0).all()
    else:
        fo = dk.unpack_bits(layer.frozen_out, (layer.out_width,))
        assert (grads1["bias"][fo] == 0).all()


def test_return_mask_is_the_very_tensor_of_the_forward():
    """The gate the forward applied and the mask handed back are one autograd node: a gradient that reaches m only
    through the output (no regulariser) arrives at the scores through that m."""
    layer = dnn.GatedLinear(4, 3, input_masked=False, backend="reference")
    with torch.no_grad():
        layer.scores.normal_()
    x = torch.randn(5, 4)
    out, m = layer(x, return_mask=True)
    (grad_m,) = torch.autograd.grad(out.sum(), m)
    pre = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(grad_m, pre.sum(0).detach())


def _hat_reference_grad(e, s, s_max, grad_m):
    """HAT's scores gradient as its code computes it: autograd through sigmoid(s * e), then its compensation."""
    e = e.detach().clone().requires_grad_(True)
    torch.sigmoid(s * e).backward(grad_m)
    g = e.grad
    if s_max is not None:
        num = torch.cosh(torch.clamp(s * e.detach(), -50.0, 50.0)) + 1
        den = torch.cosh(e.detach()) + 1
        g = g * (s_max / s * num / den)
    return g


@pytest.mark.parametrize("s,s_max", [(0.01, 400.0), (3.0, 400.0), (400.0, 400.0), (5.0, None)])
def test_hat_derivative_is_hats_float_formula(s, s_max):
    e = torch.cat([torch.linspace(-6, 6, 301), torch.tensor([0.0, 0.03, 0.05, -0.05])])
    grad_m = torch.rand(e.shape) + 0.5
    leaf = e.clone().requires_grad_(True)
    dk.mask(leaf, s, s_max=s_max, derivative="hat").backward(grad_m)
    want = _hat_reference_grad(e, s, s_max, grad_m)
    torch.testing.assert_close(leaf.grad, want, rtol=2e-6, atol=0.0)
    assert torch.equal(leaf.grad == 0, want == 0), "HAT's zeros are reproduced exactly"
    # the forward is the reference's, bit for bit (a compiled backend's sigmoid may differ in the last bit)
    assert torch.equal(dk.mask(e, s, s_max=s_max, derivative="hat"), dk.mask(e, s, s_max=s_max, backend="reference"))


def test_hat_derivative_rounds_to_zero_where_the_stable_one_does_not():
    """In float32, sigmoid(s e) rounds to 1 from s e ~ 16.6 on: HAT's y (1 - y) is then exactly 0, the library's
    sigmoid(x) sigmoid(-x) is not (measured threshold: 16.64; the issue's '8' is not where it happens)."""
    x = torch.tensor([8.0, 16.0, 16.7, 20.0, 40.0, -20.0, -60.0])
    grads = {}
    for derivative in ("stable", "hat"):
        leaf = x.clone().requires_grad_(True)
        dk.mask(leaf, 1.0, derivative=derivative).sum().backward()
        grads[derivative] = leaf.grad
    assert (grads["stable"] > 0).all()
    hat = grads["hat"]
    assert (hat[:2] > 0).all() and (hat[2:5] == 0).all(), hat
    assert (hat[5:] > 0).all(), "on the negative side y (1 - y) = y lasts until y underflows"
    # and with HAT's compensation at s = s_max = 400, every |e| >= 0.042 gets no gradient at all from HAT's formula
    e = torch.tensor([0.01, 0.05, 1.0, 6.0])
    for derivative, any_zero in (("stable", False), ("hat", True)):
        leaf = e.clone().requires_grad_(True)
        dk.mask(leaf, 400.0, s_max=400.0, derivative=derivative).sum().backward()
        assert bool((leaf.grad[1:] == 0).all()) is any_zero
        assert leaf.grad[0] > 0


def test_hat_derivative_in_ste_mode_and_in_every_op():
    e = torch.randn(7) * 0.01
    leaf = e.clone().requires_grad_(True)
    m = dk.mask(leaf, 50.0, mode="ste", s_max=400.0, derivative="hat")
    assert torch.equal(m, (e >= 0).float())
    m.backward(torch.ones(7))
    torch.testing.assert_close(leaf.grad, _hat_reference_grad(e, 50.0, 400.0, torch.ones(7)), rtol=2e-6, atol=0.0)
    # the layers take it as an attribute, and it travels with the state dict (absent from a default layer's)
    layer = dnn.GatedLinear(3, 7, input_masked=False, backend="reference")
    assert "derivative" not in layer.get_extra_state()
    layer.derivative, layer.s, layer.s_max = "hat", 50.0, 400.0
    with torch.no_grad():
        layer.scores.copy_(e)
    x = torch.randn(2, 3)
    out, m = layer(x, return_mask=True)
    m.sum().backward()
    torch.testing.assert_close(layer.scores.grad, _hat_reference_grad(e, 50.0, 400.0, torch.ones(7)), rtol=2e-6, atol=0.0)
    twin = dnn.GatedLinear(3, 7, input_masked=False, backend="reference")
    twin.load_state_dict(layer.state_dict())
    assert twin.derivative == "hat" and twin.s == 50.0


def test_bad_options_are_refused_with_their_name():
    x, w, e = torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4)
    with pytest.raises(ValueError, match=r"derivative must be one of \('stable', 'hat'\), got 'HAT'"):
        dk.gated_linear(x, w, e, 1.0, derivative="HAT")
    with pytest.raises(ValueError, match="derivative must be one of"):
        dk.mask(e, 1.0, derivative=None)
    with pytest.raises(TypeError, match="return_mask must be a bool, got str"):
        dk.masked_linear(x, w.T.contiguous().T, torch.zeros(4, 3), 1.0, return_mask="yes")
    layer = dnn.GatedLinear(3, 4)
    layer.derivative = "exact"
    with pytest.raises(ValueError, match="derivative must be one of"):
        layer(x)
    state = layer.get_extra_state()
    state["derivative"] = "exact"
    with pytest.raises(ValueError, match="derivative must be one of"):
        layer.set_extra_state(state)


# ---------------------------------------------------------------------------------------------------------
# HAT's soft cumulative mask: the regulariser and the gradient blocking


def test_soft_regulariser_is_hats():
    masks = [torch.rand(6), torch.rand(5, 4)]
    soft = [torch.rand(6), torch.rand(5, 4)]
    # HAT's criterion, written out
    reg = sum((m * (1 - mp)).sum() for m, mp in zip(masks, soft))
    count = sum((1 - mp).sum() for mp in soft)
    torch.testing.assert_close(dk.sparsity_regularizer(masks, soft, soft=True), reg / count)
    # a soft mask of exact 0s and 1s is the binary one
    binary = [torch.rand(6) < 0.5, torch.rand(5, 4) < 0.5]
    torch.testing.assert_close(dk.sparsity_regularizer(masks, [b.float() for b in binary], soft=True),
                               dk.sparsity_regularizer(masks, binary))
    with pytest.raises(TypeError, match=r"reserved\[0\] must be a floating-point tensor"):
        dk.sparsity_regularizer(masks, binary, soft=True)
    with pytest.raises(TypeError, match=r"reserved\[0\] must have dtype torch.bool"):
        dk.sparsity_regularizer(masks, soft)
    with pytest.raises(TypeError, match="soft must be a bool"):
        dk.sparsity_regularizer(masks, soft, soft=1)


def _hat_mask_back(post, pre, weight_shape):
    """HAT's factor on a dense weight's gradient: 1 - min(post expanded over inputs, pre expanded over outputs)."""
    post_e = post.view(-1, 1).expand(weight_shape)
    if pre is None:
        return 1 - post_e
    return 1 - torch.min(post_e, pre.view(1, -1).expand(weight_shape))


def test_soft_block_gradients_is_hats_blocking():
    fc1 = dnn.GatedLinear(4, 6, input_masked=False, backend="reference")
    fc2 = dnn.GatedLinear(6, 5, backend="reference")
    m1, m2 = torch.rand(6), torch.rand(5)
    m1[0], m2[1] = 1.0, 0.0
    x = torch.randn(3, 4)
    fc2(fc1(x)).square().sum().backward()
    before = {n: p.grad.clone() for n, p in [("w1", fc1.weight), ("b1", fc1.bias), ("w2", fc2.weight), ("b2", fc2.bias)]}
    dk.soft_block_gradients_(fc1, m1)
    dk.soft_block_gradients_(fc2, m2, m1)
    assert torch.equal(fc1.weight.grad, before["w1"] * _hat_mask_back(m1, None, fc1.weight.shape))
    assert torch.equal(fc1.bias.grad, before["b1"] * (1 - m1))
    assert torch.equal(fc2.weight.grad, before["w2"] * _hat_mask_back(m2, m1, fc2.weight.shape))
    assert torch.equal(fc2.bias.grad, before["b2"] * (1 - m2))
    assert (fc1.weight.grad[0] == 0).all() and (fc2.bias.grad[1] == before["b2"][1])


def test_soft_block_gradients_on_convolutions_and_after_a_flatten():
    conv = dnn.GatedConv2d(2, 3, 3, padding=1, backend="reference")
    convT = dnn.GatedConvTranspose2d(3, 2, 4, 2, 1, backend="reference")
    fc = dnn.GatedLinear(3 * 4 * 4, 5, backend="reference")
    x = torch.randn(2, 2, 4, 4)
    h = conv(x)
    (convT(h).sum() + fc(h.flatten(1)).sum()).backward()
    m_conv, m_convT, m_fc = torch.rand(3), torch.rand(2), torch.rand(5)
    before = [conv.weight.grad.clone(), convT.weight.grad.clone(), fc.weight.grad.clone()]
    dk.soft_block_gradients_(conv, m_conv, torch.rand(2))
    dk.soft_block_gradients_(convT, m_convT, m_conv)
    dk.soft_block_gradients_(fc, m_fc, m_conv)
    # a transposed weight is [in, out, kH, kW]
    want_T = 1 - torch.min(m_convT.view(1, -1, 1, 1), m_conv.view(-1, 1, 1, 1))
    assert torch.equal(convT.weight.grad, before[1] * want_T)
    # input feature i of the flattened [3, 4, 4] is channel i // 16
    want_fc = _hat_mask_back(m_fc, m_conv.repeat_interleave(16), fc.weight.shape)
    assert torch.equal(fc.weight.grad, before[2] * want_fc)
    with pytest.raises(TypeError, match="layer must be a gated"):
        dk.soft_block_gradients_(dnn.MaskedLinear(2, 2), torch.rand(2))
    with pytest.raises(ValueError, match="out_mask must have 3 entries"):
        dk.soft_block_gradients_(conv, torch.rand(4))
    with pytest.raises(ValueError, match="in_mask must have 48 entries"):
        dk.soft_block_gradients_(fc, m_fc, torch.rand(5))
    with pytest.raises(TypeError, match="out_mask must be a 1-d floating tensor"):
        dk.soft_block_gradients_(conv, torch.ones(3, dtype=torch.bool))
