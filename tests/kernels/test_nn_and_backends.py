"""dgm_kernels.nn layers and the backend selection API."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels import nn as dnn


def _layers():
    return [
        (dnn.MaskedLinear(6, 4), torch.nn.Linear(6, 4), torch.randn(3, 6)),
        (dnn.MaskedConv2d(3, 5, 3, stride=2, padding=1), torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)),
        (dnn.MaskedConvTranspose2d(4, 3, 4, 2, 1, bias=False), torch.nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False),
         torch.randn(2, 4, 4, 4)),
        (dnn.GatedConv2d(3, 5, 3, padding=1, input_masked=False), torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6)),
        (dnn.GatedConvTranspose2d(4, 6, 4, 2, 1, groups=2), torch.nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2),
         torch.randn(1, 4, 3, 3)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_open_mask_is_the_plain_layer(index):
    """With the straight-through mode and scores >= 0 (init 0) the mask is all ones: the layer is torch's."""
    layer, plain, x = _layers()[index]
    layer.mode = "ste"
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(layer(x[0]), plain(x[0]))  # unbatched input, like torch


@pytest.mark.parametrize("index", range(5))
def test_state_dict_round_trips(index):
    layer, _, x = _layers()[index]
    with torch.no_grad():
        layer.scores.normal_()
    layer.s, layer.s_max, layer.mode = 37.5, 400.0, "ste"
    for name, buf in layer.named_buffers():
        buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    blob = io.BytesIO()
    torch.save(layer.state_dict(), blob)
    blob.seek(0)
    fresh = _layers()[index][0]
    fresh.load_state_dict(torch.load(blob, weights_only=True))
    assert (fresh.s, fresh.s_max, fresh.mode) == (37.5, 400.0, "ste")
    for (n1, t1), (n2, t2) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        if isinstance(t1, torch.Tensor):
            assert n1 == n2 and torch.equal(t1, t2)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_bad_extra_state_is_rejected():
    layer = dnn.MaskedLinear(3, 2)
    state = layer.state_dict()
    state["_extra_state"] = {"s": -1.0, "s_max": None, "mode": "anneal"}
    with pytest.raises(ValueError, match="s must be a finite number > 0"):
        layer.load_state_dict(state)


def test_frozen_buffer_blocks_the_gradient():
    layer = dnn.MaskedConv2d(2, 3, 3)
    frozen = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    frozen[0] = True
    layer.set_frozen(frozen)
    assert torch.equal(layer.frozen_mask(), frozen) and layer.frozen.numel() == 7  # 54 bits in 7 bytes
    layer.s = 5.0
    layer(torch.randn(2, 2, 5, 5)).square().sum().backward()
    assert (layer.weight.grad[0] == 0).all() and (layer.weight.grad[1:] != 0).any()
    assert (layer.scores.grad[0] != 0).any(), "scores of the current task stay trainable"

    gated = dnn.GatedConv2d(2, 3, 3)
    gated.set_frozen(torch.tensor([False, True, False]), torch.tensor([True, False]))
    gated(torch.randn(2, 2, 5, 5)).square().sum().backward()
    assert (gated.weight.grad[1, 0] == 0).all()
    assert (gated.weight.grad[1, 1] != 0).any() and (gated.weight.grad[0, 0] != 0).any()
    assert gated.bias.grad[1] == 0


def test_current_mask_follows_s():
    layer = dnn.MaskedLinear(4, 2)
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([[-1.0, 2.0, 0.5, -0.1]] * 2))
    layer.s = 1000.0
    assert torch.equal(layer.current_mask(), (layer.scores >= 0).float())


def test_use_backend_is_scoped_and_set_backend_is_global():
    before = dk.get_backend()
    with dk.use_backend("reference"):
        assert dk.get_backend() == "reference"
    assert dk.get_backend() == before
    dk.set_backend("reference")
    try:
        assert dk.get_backend() == "reference"
    finally:
        dk.set_backend(before)
    assert "reference" in dk.available_backends() and "auto" in dk.available_backends()


def test_environment_variable_selects_the_backend():
    code = "import dgm_kernels; print(dgm_kernels.get_backend())"
    env = dict(os.environ, DGM_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DGM_KERNELS_BACKEND"] = "warp-drive"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DGM_KERNELS_BACKEND" in bad.stderr and "warp-drive" in bad.stderr


def test_auto_picks_a_backend_that_runs_here():
    from dgm_kernels.backends import auto_backend_for, unavailable_reason

    name = auto_backend_for(torch.device("cpu"))
    assert name in ("cpu", "reference")
    assert unavailable_reason(name, torch.device("cpu")) is None
    if unavailable_reason("cpu", torch.device("cpu")) is None:
        assert name == "cpu", "auto must prefer the compiled kernels on the CPU when they are built"


def test_compile_fullgraph_with_an_annealed_scale():
    """s changes every batch in DGM: torch.compile(fullgraph=True) must not break the graph on it."""
    backend = "cpu" if dk.backend_status()["cpu"] is None else "reference"
    model = torch.nn.Sequential(
        dnn.MaskedConvTranspose2d(8, 6, 4, 1, 0, backend=backend), torch.nn.ReLU(),
        dnn.GatedConvTranspose2d(6, 3, 4, 2, 1, backend=backend),
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 8, 1, 1)
    for s in (1.0, 2.5):
        for layer in (model[0], model[2]):
            layer.s = s
        torch.testing.assert_close(compiled(z), model(z))
