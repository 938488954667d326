"""Parity of every op x backend with the reference backend: forward and every gradient.

The suite iterates over the backend registry (tests/helpers.py BACKEND_DEVICES), so a new backend is
tested without new tests. Inputs are fresh random tensors for every case (never zeros); each comparison is
float32 against the reference run on the same float32 inputs.

Tolerances (float32): relative 2e-4 of the largest magnitude of the expected tensor for the convolutions
(different summation orders), 1e-5 for the elementwise ops, exact for anything frozen.
"""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.bits import pack_bits_reference
from dgm_kernels.bits import unit_block_pattern

from helpers import backend_params

BACKENDS = backend_params()

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
CONV2D_CASES = {
    "batch1-odd": (1, 3, 7, 5, 4, 3, 1, 1, 1, 1),
    "1x1": (2, 4, 6, 6, 6, 1, 1, 0, 1, 1),
    "k4s2p1": (2, 3, 9, 9, 5, 4, 2, 1, 1, 1),
    "dilation-groups": (2, 4, 9, 7, 6, 3, 1, 2, 2, 2),
    "disc-k5s2p2": (3, 2, 16, 16, 8, 5, 2, 2, 1, 1),
}
# (N, C_in, H, W, C_out, k, stride, padding, output_padding, dilation, groups)
CONVT_CASES = {
    "dgm-1x1-to-4x4": (2, 8, 1, 1, 6, 4, 1, 0, 0, 1, 1),
    "1x1-stride3": (3, 5, 1, 1, 7, 3, 3, 0, 0, 1, 1),  # stride is irrelevant on a 1x1 input (GEMM path)
    "dgm-k4s2p1": (1, 6, 4, 4, 3, 4, 2, 1, 0, 1, 1),
    "outpad-groups": (2, 4, 5, 3, 6, 3, 2, 1, 1, 1, 2),
    "dilation": (2, 3, 4, 4, 2, 3, 1, 0, 0, 2, 1),
    "1x1": (1, 5, 3, 3, 4, 1, 1, 0, 0, 1, 1),
}
SCHEDULES = {
    "anneal": dict(mode="anneal", s_max=None),
    "anneal-hat": dict(mode="anneal", s_max=400.0),
    "ste": dict(mode="ste", s_max=None),
    "ste-hat": dict(mode="ste", s_max=400.0),
}
VARIANTS = {
    "plain": dict(frozen=False, bias=False, strided=False, packed=False),
    "full": dict(frozen=True, bias=True, strided=True, packed=False),
    "packed": dict(frozen=True, bias=False, strided=False, packed=True),  # frozen given as bits (dgm_kernels.bits)
}


def assert_close(actual, expected, rel, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out with a stride: a slice of a twice-as-wide tensor."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def run(op, backend, tensors: dict, grad_out_seed: int, **kwargs):
    """Run op with fresh leaves; return the output and the gradient of every float leaf."""
    leaves, args = {}, {}
    for name, t in tensors.items():
        if t is None or not t.dtype.is_floating_point:
            leaves[name] = args[name] = t
            continue
        leaves[name] = t.detach().contiguous().clone().requires_grad_(True)
        # a strided input stays strided: the op sees a non-contiguous view, the gradient reaches the leaf
        args[name] = leaves[name] if t.is_contiguous() else non_contiguous(leaves[name])
    out = op(**args, **kwargs, backend=backend)
    g = torch.Generator(device="cpu").manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    out.backward(grad_out)
    grads = {n: t.grad for n, t in leaves.items() if t is not None and t.dtype.is_floating_point}
    return out.detach(), grads


def compare(op, backend, device, tensors, rel, **kwargs):
    tensors = {k: (None if v is None else v.to(device)) for k, v in tensors.items()}
    ref_out, ref_grads = run(op, "reference", tensors, 7, **kwargs)
    out, grads = run(op, backend, tensors, 7, **kwargs)
    assert_close(out, ref_out, rel, "forward")
    for name, g in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], g, rel, f"grad of {name}")
    return grads


def scores_like(shape):
    # spread over both signs, a few near the decision boundary, none exactly zero
    e = torch.randn(shape) * 0.7
    e.view(-1)[::7] *= 1e-3
    return e


# ---------------------------------------------------------------------------------------------------------
# convolutions, per-weight masks (DGMw)


def _masked_conv_inputs(transposed, case, variant):
    if transposed:
        n, cin, h, w, cout, k, stride, pad, outpad, dil, groups = case
        weight_shape = (cin, cout // groups, k, k)
        geo = dict(stride=stride, padding=pad, output_padding=outpad, dilation=dil, groups=groups)
    else:
        n, cin, h, w, cout, k, stride, pad, dil, groups = case
        weight_shape = (cout, cin // groups, k, k)
        geo = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = torch.randn(n, cin, h, w)
    if variant["strided"]:
        x = non_contiguous(x)
    tensors = dict(input=x, weight=torch.randn(weight_shape) * 0.3, scores=scores_like(weight_shape))
    return tensors, geo, cout


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("transposed,case", [(False, c) for c in CONV2D_CASES] + [(True, c) for c in CONVT_CASES])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_conv(backend, device, transposed, case, schedule, variant):
    v = VARIANTS[variant]
    tensors, geo, cout = _masked_conv_inputs(transposed, (CONVT_CASES if transposed else CONV2D_CASES)[case], v)
    frozen = torch.rand(tensors["weight"].shape) < 0.4 if v["frozen"] else None
    tensors["frozen"] = pack_bits_reference(frozen) if v["packed"] else frozen
    tensors["bias"] = torch.randn(cout) if v["bias"] else None
    op = dk.masked_conv_transpose2d if transposed else dk.masked_conv2d
    grads = compare(op, backend, device, tensors, 2e-4, s=3.0, **geo, **SCHEDULES[schedule])
    if frozen is not None:
        assert (grads["weight"][frozen.to(device)] == 0).all(), "frozen weights must get exactly zero gradient"


# ---------------------------------------------------------------------------------------------------------
# convolutions, channel gates (DGMa)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("transposed,case", [(False, c) for c in CONV2D_CASES] + [(True, c) for c in CONVT_CASES])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gated_conv(backend, device, transposed, case, schedule, variant):
    v = VARIANTS[variant]
    tensors, geo, cout = _masked_conv_inputs(transposed, (CONVT_CASES if transposed else CONV2D_CASES)[case], v)
    tensors["scores"] = scores_like((cout,))
    cin = tensors["input"].shape[1]
    if v["frozen"]:
        tensors["frozen_out"] = torch.rand(cout) < 0.5
        tensors["frozen_in"] = torch.rand(cin) < 0.5
        # at least one frozen link (unit 0 on both sides) and one free output unit
        tensors["frozen_out"][0] = tensors["frozen_in"][0] = True
        tensors["frozen_out"][-1] = False
    tensors["bias"] = torch.randn(cout) if v["bias"] else None
    dense_out, dense_in = tensors.get("frozen_out"), tensors.get("frozen_in")
    if v["packed"]:
        tensors["frozen_out"], tensors["frozen_in"] = pack_bits_reference(dense_out), pack_bits_reference(dense_in)
    op = dk.gated_conv_transpose2d if transposed else dk.gated_conv2d
    grads = compare(op, backend, device, tensors, 2e-4, s=3.0, **geo, **SCHEDULES[schedule])
    if v["frozen"]:
        block = unit_block_pattern(
            tensors["weight"].shape, dense_out.to(device), dense_in.to(device), transposed, geo["groups"]
        )
        assert block.any()
        assert (grads["weight"][block] == 0).all(), "weights between frozen units must get exactly zero gradient"
        if grads.get("bias") is not None:
            assert (grads["bias"][dense_out.to(device)] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gated_conv_unmasked_input(backend, device):
    """frozen_in=None (first layer): every weight of a frozen output unit is frozen."""
    tensors = dict(
        input=torch.randn(2, 3, 6, 6), weight=torch.randn(5, 3, 3, 3), scores=scores_like((5,)),
        frozen_out=torch.tensor([True, False, True, False, False]), bias=torch.randn(5),
    )
    grads = compare(dk.gated_conv2d, backend, device, tensors, 2e-4, s=2.0, padding=1)
    assert (grads["weight"][tensors["frozen_out"].to(device)] == 0).all()
    assert (grads["weight"][~tensors["frozen_out"].to(device)] != 0).any()


# ---------------------------------------------------------------------------------------------------------
# elementwise ops and the regulariser


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(1,), (7,), (24, 12, 4, 4), (3, 5, 1, 1), (1000,)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_and_masked_weight(backend, device, shape, schedule):
    e = scores_like(shape)
    compare(dk.mask, backend, device, dict(scores=e), 1e-5, s=5.0, **SCHEDULES[schedule])
    frozen = torch.rand(shape) < 0.3
    for given in (frozen, pack_bits_reference(frozen)):
        tensors = dict(weight=torch.randn(shape), scores=e, frozen=given)
        grads = compare(dk.masked_weight, backend, device, tensors, 1e-5, s=5.0, **SCHEDULES[schedule])
        assert (grads["weight"][frozen.to(device)] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_non_contiguous_scores(backend, device):
    e = non_contiguous(scores_like((6, 10)))
    compare(dk.mask, backend, device, dict(scores=e), 1e-5, s=2.0, s_max=50.0)
    w = non_contiguous(torch.randn(6, 10))
    compare(dk.masked_weight, backend, device, dict(weight=w, scores=e), 1e-5, s=2.0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(1, 4), (3, 24, 4, 4), (2, 7, 5, 3), (64, 6)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_channel_gate_primitive(backend, device, shape, schedule):
    from dgm_kernels.backends import resolve

    sched = SCHEDULES[schedule]
    mode = {"anneal": 0, "ste": 1}[sched["mode"]]
    impl = resolve(backend, torch.device(device))
    ref = resolve("reference", torch.device(device))
    y_pre = torch.randn(shape, device=device)
    e = scores_like((shape[1],)).to(device)

    def gate(fn):
        a, b = y_pre.clone().requires_grad_(True), e.clone().requires_grad_(True)
        out = fn(a, b, 4.0, mode, sched["s_max"])
        out.backward(torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device))
        return out.detach(), a.grad, b.grad

    for got, want, what in zip(gate(impl.channel_gate), gate(ref.channel_gate), ("y", "grad y_pre", "grad scores")):
        assert_close(got, want, 1e-5, what)


@pytest.mark.parametrize("with_reserved", [False, True])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sparsity_regularizer(backend, device, with_reserved):
    shapes = [(24, 12, 4, 4), (12,), (5, 3)]
    masks = [torch.rand(s) for s in shapes]
    reserved = [torch.rand(s) < 0.5 for s in shapes] if with_reserved else None
    if with_reserved:
        reserved[1] = None  # a layer with nothing reserved yet

    def run_reg(name):
        ms = [m.to(device).requires_grad_(True) for m in masks]
        rs = None if reserved is None else [None if r is None else r.to(device) for r in reserved]
        value = dk.sparsity_regularizer(ms, rs, backend=name)
        value.backward()
        return value.detach(), [m.grad for m in ms]

    ref_value, ref_grads = run_reg("reference")
    value, grads = run_reg(backend)
    assert_close(value, ref_value, 1e-5, "R")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, 1e-5, "grad of a mask")
    # the formula itself, written out (SPEC section 3)
    free = [torch.ones(s, dtype=torch.bool) if reserved is None or reserved[i] is None else ~reserved[i]
            for i, s in enumerate(shapes)]
    expected = sum((m * f).sum() for m, f in zip(masks, free)) / sum(f.sum() for f in free)
    assert abs(ref_value.item() - expected.item()) < 1e-6
