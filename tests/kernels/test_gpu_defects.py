"""The GPU defects of issue 11 that a CPU can show: every Triton op guards its tensors' device, the fused
convolution's int32 and grid limits, the gate reduction's split, mixed dtypes under autocast. Their GPU halves
are in tests/kernels/test_gpu_plan.py."""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.backends import triton_backend  # noqa: F401  (registers the dgm_triton ops)
from dgm_kernels.backends.triton_kernels import conv as conv_kernels
from dgm_kernels.backends.triton_kernels import conv_strategy, gate
from dgm_kernels.backends.triton_kernels.ops_common import NAMESPACE, REGISTERED, on_tensor_device

from helpers import backend_params

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params(
    [("cpu", "cpu"), ("triton", "cpu")])


def test_every_triton_op_runs_on_its_tensors_device():
    # a Triton launch uses the current CUDA device: each op's CUDA kernel must make its tensors' device current
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACE + "::")}
    assert names and names == REGISTERED, f"ops registered without the device guard: {sorted(names - REGISTERED)}"
    calls = []
    guarded = on_tensor_device(lambda *a: calls.append(a) or "ran")
    assert guarded(torch.zeros(2), 3) == "ran" and len(calls) == 1  # CPU tensors: called as it is


def _meta(shape, stride=None):
    t = torch.empty(2**33, device="meta")
    return t.as_strided(shape, stride) if stride else t[: torch.Size(shape).numel()].view(shape)


def test_fused_conv_guards_the_largest_offset_not_the_element_count():
    geo = dict(scatter=False, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    w = _meta((4, 3, 3, 3))
    small = _meta((2, 3, 8, 8))
    assert conv_kernels.unlaunchable_reason(small, w, 2 * 4 * 64, **geo) is None
    # 2 x 3 x 8 x 8 elements, but a batch stride of 2**31: int32 offsets would wrap
    spread = _meta((2, 3, 8, 8), (2**31, 64, 8, 1))
    assert spread.numel() < 2**31
    why = conv_kernels.unlaunchable_reason(spread, w, 2 * 4 * 64, **geo)
    assert why is not None and "beyond int32" in why
    assert not conv_strategy.fusable(spread, w, 2 * 4 * 64, geo)
    previous = conv_strategy.get_conv_strategy()
    conv_strategy.set_conv_strategy("fused")
    try:  # even a forced "fused" strategy leaves such a call to ATen
        assert conv_strategy.choose(("k",), spread, w, 512, lambda: None, lambda: None, geo) == "unfused"
        assert conv_strategy.choose(("k",), small, w, 512, lambda: None, lambda: None, geo) == "fused"
    finally:
        conv_strategy.set_conv_strategy(previous)


def test_fused_conv_guards_the_grid_limit():
    # a depthwise transposed convolution with stride 4: groups x 16 phases programs in grid dimension 2
    x = _meta((1, 8192, 2, 2))
    w = _meta((8192, 1, 4, 4))
    geo = dict(scatter=True, stride=(4, 4), padding=(0, 0), dilation=(1, 1), groups=8192)
    why = conv_kernels.unlaunchable_reason(x, w, 8192 * 64, **geo)
    assert why is not None and "grid dimension 2" in why
    assert conv_kernels.unlaunchable_reason(x, w, 8192 * 64, **{**geo, "stride": (1, 1), "scatter": False}) is None


def test_gate_reduction_split_depends_on_the_size_only():
    # the split fixes the order of the sum of grad_e: it must not depend on the GPU's SM count
    import inspect

    source = inspect.getsource(gate.gate_backward)
    assert "device_programs" not in source and "multi_processor_count" not in source
    assert gate.GATE_SLICE_BLOCKS >= 1


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes_under_autocast_follow_the_reference(backend, device, transposed):
    """Under CPU autocast the convolution runs in bfloat16 while the scores stay float32: the gate's output has
    the promoted dtype on every backend (the reference's y * m), and the backward reaches every input."""
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(3, 4, 3, 3) if transposed else torch.randn(4, 3, 3, 3)
    e = torch.randn(4)
    op = dk.gated_conv_transpose2d if transposed else dk.gated_conv2d
    outs = {}
    for name in ("reference", backend):
        xs, ws, es = (t.clone().requires_grad_(True) for t in (x, w, e))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = op(xs, ws, es, 2.0, padding=1, backend=name)
        y.float().square().sum().backward()
        outs[name] = (y, xs.grad, ws.grad, es.grad)
    ref, got = outs["reference"], outs[backend]
    assert ref[0].dtype == torch.float32 and got[0].dtype == ref[0].dtype
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-2)
    for g, r in zip(got[1:], ref[1:]):
        assert g is not None and g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)
    # the masked (DGMw) convolution keeps ATen's autocast dtype on every backend
    ws = torch.randn_like(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked = (dk.masked_conv_transpose2d if transposed else dk.masked_conv2d)
        assert masked(x, ws, torch.randn_like(ws), 2.0, padding=1, backend=backend).dtype == \
            masked(x, ws, torch.randn_like(ws), 2.0, padding=1, backend="reference").dtype


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fake_kernels_give_the_real_dtype_under_autocast(backend, device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, e = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = dk.gated_conv2d(x, w, e, 2.0, padding=1, backend=backend)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fw, fe = (mode.from_tensor(t) for t in (x, w, e))
            fake = dk.gated_conv2d(fx, fw, fe, 2.0, padding=1, backend=backend)
    assert fake.dtype == real.dtype and fake.shape == real.shape
