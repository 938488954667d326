"""Numerical soundness: float64 gradcheck, HAT compensation, and accurate gradients at large s (SPEC section 3)."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.backends import resolve
from dgm_kernels.backends.reference import mask_derivative

from helpers import BACKEND_DEVICES, backend_params

ALL = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


def _supports_float64(backend, device):
    return getattr(resolve(backend, torch.device(device)), "supports_float64", True)


@pytest.mark.parametrize("backend,device", ALL)
def test_gradcheck_float64(backend, device):
    if not _supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    opts = dict(dtype=torch.float64, device=device)
    # the interpreter runs a Triton launch in Python: its Jacobians are checked along random directions
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=(backend == "triton" and device == "cpu"))
    x = torch.randn(2, 3, 5, 5, **opts, requires_grad=True)
    w = (torch.randn(4, 3, 3, 3, **opts) * 0.5).requires_grad_(True)
    e = torch.randn(4, 3, 3, 3, **opts).requires_grad_(True)
    b = torch.randn(4, **opts, requires_grad=True)
    # frozen entries get zero gradient by design, unlike the numerical derivative: no freezing here
    f = lambda x, w, e, b: dk.masked_conv2d(x, w, e, 1.7, bias=b, padding=1, stride=2, backend=backend)  # noqa: E731
    assert gradcheck(f, (x, w, e, b))

    wt = (torch.randn(3, 4, 4, 4, **opts) * 0.5).requires_grad_(True)
    et = torch.randn(3, 4, 4, 4, **opts).requires_grad_(True)
    xt = torch.randn(2, 3, 3, 3, **opts, requires_grad=True)
    f = lambda x, w, e: dk.masked_conv_transpose2d(x, w, e, 2.5, stride=2, padding=1, backend=backend)  # noqa: E731
    assert gradcheck(f, (xt, wt, et))

    eg = torch.randn(4, **opts).requires_grad_(True)
    f = lambda x, w, e, b: dk.gated_conv2d(x, w, e, 1.3, bias=b, padding=1, backend=backend)  # noqa: E731
    assert gradcheck(f, (x, w, eg, b))
    et3 = torch.randn(4, **opts).requires_grad_(True)
    f = lambda x, w, e: dk.gated_conv_transpose2d(x, w, e, 0.9, stride=2, padding=1, backend=backend)  # noqa: E731
    assert gradcheck(f, (xt, wt, et3))

    wl = torch.randn(5, 6, **opts, requires_grad=True)
    el = torch.randn(5, 6, **opts, requires_grad=True)
    xl = torch.randn(3, 6, **opts, requires_grad=True)
    f = lambda x, w, e: dk.masked_linear(x, w, e, 3.0, backend=backend)  # noqa: E731
    assert gradcheck(f, (xl, wl, el))

    masks = [torch.rand(4, 3, **opts, requires_grad=True), torch.rand(7, **opts, requires_grad=True)]
    reserved = [torch.rand(4, 3, device=device) < 0.5, None]
    f = lambda a, c: dk.sparsity_regularizer([a, c], reserved, backend=backend)  # noqa: E731
    assert gradcheck(f, tuple(masks))


def _hat_formula(e: torch.Tensor, s: float, s_max: float) -> torch.Tensor:
    """HAT's compensation applied to sigmoid(s e)'s derivative, as SPEC section 3 writes it (float64, small |s e|)."""
    x = s * e
    plain = s * torch.sigmoid(x) * torch.sigmoid(-x)
    return plain * (s_max / s) * (torch.cosh(x.clamp(-50, 50)) + 1) / (torch.cosh(e) + 1)


def test_compensation_matches_hat_formula():
    e = torch.linspace(-3, 3, 601, dtype=torch.float64)
    for s in (0.01, 1.0, 7.0, 16.0):
        torch.testing.assert_close(mask_derivative(e, s, 400.0), _hat_formula(e, s, 400.0), rtol=1e-10, atol=0)


def _dmde_float64_exact(e: torch.Tensor, s: float, s_max: float | None) -> torch.Tensor:
    """dm/de in float64 from exp(-|x|), independent of the library's formula."""
    e = e.double()
    x = s * e
    if s_max is None:
        t = torch.exp(-x.abs())
        return s * t / (1 + t) ** 2
    a = x.abs()
    te = torch.exp(-e.abs())
    sig_prime_e = te / (1 + te) ** 2
    # (cosh(min(a, 50)) + 1) / (cosh(a) + 1) computed via logs to stay finite
    log_num = torch.log(torch.cosh(a.clamp(max=50.0)) + 1)
    log_den = torch.where(a < 700, torch.log(torch.cosh(a.clamp(max=700.0)) + 1), a - math.log(2))
    return s_max * sig_prime_e * torch.exp(log_num - log_den)


@pytest.mark.parametrize("s_max", [None, 1e4])
@pytest.mark.parametrize("s", [1.0, 100.0, 1e4, 1e5])
@pytest.mark.parametrize("backend,device", ALL)
def test_large_scale_gradients_are_finite_and_accurate(backend, device, s, s_max):
    """Scores far from 0 at large s: no NaN/inf, no cancellation to 0 (float32 vs a float64 oracle)."""
    e = torch.cat([torch.linspace(-2, 2, 257), torch.tensor([1e-6, -1e-6, 3e-5, -3e-5, 1e-3, -1e-3, 8.0, -8.0])])
    e = e.to(device)
    leaf = e.clone().requires_grad_(True)
    m = dk.mask(leaf, s, s_max=s_max, backend=backend)
    m.backward(torch.ones_like(m))
    got = leaf.grad.double().cpu()
    want = _dmde_float64_exact(e.cpu(), s, s_max)
    assert torch.isfinite(got).all()
    # float32 rounding of s*e moves exp(-|s e|) by about |s e| * 6e-8 relative; values below 1e-30 may be 0
    rel = 1e-5 + (s * e.abs().cpu().double()).clamp(max=200) * 1.2e-7
    err = (got - want).abs()
    ok = (err <= rel * want.abs()) | (want.abs() < 1e-30) & (got.abs() < 1e-29)
    assert ok.all(), f"worst: e={e.cpu()[~ok][:3]}, got={got[~ok][:3]}, want={want[~ok][:3]}"
    # decided scores keep a gradient where float64 has one in the float32 range (the naive formula gives 0)
    alive = want > 1e-28
    assert (got[alive] > 0).all()


def test_reference_has_no_cancellation_where_autograd_sigmoid_has():
    e = torch.tensor([20.0, -25.0, 30.0])  # s e far beyond 17 in float32
    leaf = e.clone().requires_grad_(True)
    dk.mask(leaf, 1.0, backend="reference").sum().backward()
    naive = e.clone().requires_grad_(True)
    torch.sigmoid(naive).sum().backward()  # y * (1 - y): cancels
    assert naive.grad[0] == 0 and naive.grad[2] == 0
    assert (leaf.grad > 0).all()
    torch.testing.assert_close(leaf.grad.double(), _dmde_float64_exact(e, 1.0, None), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", ALL)
def test_ste_forward_is_the_hard_mask(backend, device):
    e = torch.tensor([-2.0, -1e-7, 0.0, 1e-7, 3.0], device=device)
    m = dk.mask(e, 1e4, mode="ste", backend=backend)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    m = dk.mask(e, 1e4, mode="anneal", backend=backend)
    assert ((m >= 0.5) == (e >= 0)).all()


@pytest.mark.parametrize("backend,device", backend_params([p for p in BACKEND_DEVICES if p[0] != "reference"]))
def test_no_subnormal_masks(backend, device):
    """sigmoid(s e) underflows into subnormals at large s: masks and gradients must not carry them."""
    e = torch.linspace(-1, 1, 1001, device=device)
    leaf = e.clone().requires_grad_(True)
    m = dk.mask(leaf, 1e4, backend=backend)
    m.backward(torch.ones_like(m))
    tiny = torch.finfo(torch.float32).tiny
    for t in (m, leaf.grad):
        assert not ((t != 0) & (t.abs() < tiny)).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", ALL)
def test_low_precision_regulariser_accumulates_in_float32(backend, device, dtype):
    """70000 free entries: a sum and a count kept in float16 overflow past 65504 (R came out 0 or NaN)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("triton in half precision needs a CUDA GPU (the interpreter runs float32 and float64 only)")
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(70000, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    reserved = (torch.rand(70000, generator=gen) < 0.1).to(device)
    r = dk.sparsity_regularizer([m], backend=backend)
    assert r.dtype == torch.float32
    expect = m.detach().double().mean()
    assert abs(r.item() - expect.item()) < 1e-4, (r.item(), expect.item())
    r.backward()
    assert m.grad.dtype == dtype
    torch.testing.assert_close(m.grad.float(), torch.full((70000,), 1 / 70000), rtol=1e-2, atol=0)
    r2 = dk.sparsity_regularizer([m.detach()], [reserved], backend=backend)
    free = ~reserved
    expect2 = m.detach().double()[free].sum() / free.sum()
    assert r2.dtype == torch.float32 and abs(r2.item() - expect2.item()) < 1e-4
