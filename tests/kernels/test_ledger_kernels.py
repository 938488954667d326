"""Parity of the ledger's kernels on every backend: bit packing, union + popcount, masked optimizer steps.

The backend contract (tests/kernels/test_backend_contract.py) makes every backend implement ``pack_bits``, ``union_count``,
``adam_step_`` and ``sgd_step_``; here the bit kernels must agree exactly with the reference, the optimizer steps
to float32 rounding, and frozen entries must stay bit-identical.
"""
from __future__ import annotations

import pytest
import torch

from dgm_kernels.backends import reference
from dgm_kernels.backends import resolve
from dgm_kernels.bits import pack_bits_reference, unpack_bits_reference

from helpers import backend_params

BACKENDS = backend_params()


def _impl(backend, device):
    return resolve(backend, torch.device(device))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (24, 12, 4, 4), (3, 5, 7), (1000, 3)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pack_bits_exact(backend, device, shape):
    mask = torch.rand(shape, device=device) < 0.37
    got = _impl(backend, device).pack_bits(mask)
    want = pack_bits_reference(mask)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(unpack_bits_reference(got, shape), mask)
    strided = torch.rand(shape + (2,), device=device)[..., 0] < 0.5  # non-contiguous input
    assert torch.equal(_impl(backend, device).pack_bits(strided), pack_bits_reference(strided.contiguous()))


@pytest.mark.parametrize("layout", [(1, 24, 192), (12, 5, 16), (1, 7, 1), (3, 1, 9), (2, 13, 5)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_union_count_exact(backend, device, layout):
    outer, units, inner = layout
    n = outer * units * inner
    reserved = pack_bits_reference(torch.rand(n, device=device) < 0.3)
    task = pack_bits_reference(torch.rand(n, device=device) < 0.5)
    got_bits, got_counts = _impl(backend, device).union_count(reserved, task, outer, units, inner)
    want_bits, want_counts = reference.union_count(reserved, task, outer, units, inner)
    assert torch.equal(got_bits, want_bits)
    assert got_counts.dtype == torch.int64 and torch.equal(got_counts, want_counts)


def _opt_state(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(shape, generator=g).to(device)  # noqa: E731
    return make(), make(), make().abs(), make().abs()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 0.01), (True, 0.1)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adam_step(backend, device, decoupled, weight_decay, packed):
    shape = (37, 11)
    frozen = torch.rand(shape, device=device) < 0.4
    given = pack_bits_reference(frozen) if packed else frozen
    results = []
    for impl in (_impl(backend, device), reference):
        p, grad, m, v = _opt_state(shape, device, 5)
        p0 = p.clone()
        for step in (1, 2, 3):
            impl.adam_step_(p, grad * step, m, v, given, 1e-2, 0.5, 0.999, 1e-8, weight_decay, step, decoupled)
        assert torch.equal(p[frozen], p0[frozen]), "frozen entries must stay bit-identical"
        results.append((p, m, v))
    for got, want, what in zip(results[0], results[1], ("param", "exp_avg", "exp_avg_sq")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay", [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.01), (0.9, 0.1, False, 0.0), (0.9, 0.0, True, 0.01)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_step(backend, device, momentum, dampening, nesterov, weight_decay, packed):
    shape = (5, 3, 4, 4)
    frozen = torch.rand(shape, device=device) < 0.4
    given = pack_bits_reference(frozen) if packed else frozen
    results = []
    for impl in (_impl(backend, device), reference):
        p, grad, buf, _ = _opt_state(shape, device, 9)
        buf = buf if momentum else None
        p0 = p.clone()
        for step in range(3):
            impl.sgd_step_(p, grad + step, buf, given, 0.1, momentum, dampening, weight_decay, nesterov, step == 0)
        assert torch.equal(p[frozen], p0[frozen]), "frozen entries must stay bit-identical"
        results.append((p, buf))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    if momentum:
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
