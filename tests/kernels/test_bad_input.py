"""Bad input gets a ValueError/TypeError naming the argument, the expected and the actual."""
from __future__ import annotations

import re

import pytest
import torch

import dgm_kernels as dk


def conv_args(**overrides):
    args = dict(input=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), scores=torch.randn(4, 3, 3, 3), s=2.0)
    args.update(overrides)
    return args


def convt_args(**overrides):
    args = dict(input=torch.randn(2, 4, 4, 4), weight=torch.randn(4, 2, 4, 4), scores=torch.randn(4, 2, 4, 4), s=2.0)
    args.update(overrides)
    return args


def gated_args(**overrides):
    args = dict(input=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), scores=torch.randn(4), s=2.0)
    args.update(overrides)
    return args


CASES = [
    # (op, kwargs, exception, words that must all appear in the message)
    (dk.masked_conv2d, conv_args(scores=torch.randn(4, 3, 3, 2)), ValueError, ["scores", "(4, 3, 3, 3)", "(4, 3, 3, 2)"]),
    (dk.masked_conv2d, conv_args(input=torch.randn(2, 5, 8, 8)), ValueError, ["input", "3 channels", "got 5"]),
    (dk.masked_conv2d, conv_args(input=torch.randn(8, 8)), ValueError, ["input", "3 or 4", "got 2"]),
    (dk.masked_conv2d, conv_args(weight=torch.randn(4, 3, 3)), ValueError, ["weight", "4", "got 3"]),
    (dk.masked_conv2d, conv_args(input=torch.randn(2, 3, 8, 8, dtype=torch.float64)), TypeError, ["weight", "float64", "float32"]),
    (dk.masked_conv2d, conv_args(scores=torch.randn(4, 3, 3, 3, dtype=torch.float64)), TypeError, ["scores", "float32", "float64"]),
    (dk.masked_conv2d, conv_args(input=torch.randint(0, 3, (2, 3, 8, 8))), TypeError, ["input", "floating", "int64"]),
    (dk.masked_conv2d, conv_args(s=0.0), ValueError, ["s", "> 0", "0.0"]),
    (dk.masked_conv2d, conv_args(s=-1), ValueError, ["s", "> 0", "-1"]),
    (dk.masked_conv2d, conv_args(s=float("inf")), ValueError, ["s", "finite"]),
    (dk.masked_conv2d, conv_args(s="big"), TypeError, ["s", "str"]),
    (dk.masked_conv2d, conv_args(s_max=0.0), ValueError, ["s_max", "> 0"]),
    (dk.masked_conv2d, conv_args(mode="soft"), ValueError, ["mode", "anneal", "ste", "soft"]),
    (dk.masked_conv2d, conv_args(backend="gpu"), ValueError, ["backend", "reference", "'gpu'"]),
    (dk.masked_conv2d, conv_args(frozen=torch.zeros(4, 3, 3, 2, dtype=torch.bool)), ValueError, ["frozen", "(4, 3, 3, 3)", "(4, 3, 3, 2)"]),
    (dk.masked_conv2d, conv_args(frozen=torch.zeros(4, 3, 3, 3)), TypeError, ["frozen", "torch.bool", "float32"]),
    (dk.masked_conv2d, conv_args(bias=torch.randn(5)), ValueError, ["bias", "(4,)", "(5,)"]),
    (dk.masked_conv2d, conv_args(stride=0), ValueError, ["stride", ">= 1", "0"]),
    (dk.masked_conv2d, conv_args(padding=-1), ValueError, ["padding", ">= 0"]),
    (dk.masked_conv2d, conv_args(padding="same"), TypeError, ["padding", "pair of ints"]),
    (dk.masked_conv2d, conv_args(groups=3, weight=torch.randn(4, 1, 3, 3), scores=torch.randn(4, 1, 3, 3)), ValueError,
     ["out_channels=4", "divisible", "groups=3"]),
    (dk.masked_conv2d, conv_args(groups=2), ValueError, ["input", "6 channels", "groups=2", "got 3"]),
    (dk.masked_conv2d, conv_args(input=[1.0]), TypeError, ["input", "torch.Tensor", "list"]),
    (dk.masked_conv_transpose2d, convt_args(input=torch.randn(2, 3, 4, 4)), ValueError, ["input", "4 channels", "got 3"]),
    (dk.masked_conv_transpose2d, convt_args(output_padding=-1), ValueError, ["output_padding", ">= 0"]),
    (dk.gated_conv2d, gated_args(scores=torch.randn(4, 3, 3, 3)), ValueError, ["scores", "(4,)", "(4, 3, 3, 3)"]),
    (dk.gated_conv2d, gated_args(frozen_out=torch.zeros(3, dtype=torch.bool)), ValueError, ["frozen_out", "(4,)", "(3,)"]),
    (dk.gated_conv2d, gated_args(frozen_in=torch.zeros(4, dtype=torch.bool)), ValueError, ["frozen_in", "(3,)", "(4,)"]),
    (dk.gated_conv2d, gated_args(frozen_out=torch.zeros(4, dtype=torch.int64)), TypeError, ["frozen_out", "torch.bool", "int64"]),
    (dk.gated_conv_transpose2d, dict(input=torch.randn(1, 4, 3, 3), weight=torch.randn(4, 2, 4, 4), scores=torch.randn(4), s=1.0),
     ValueError, ["scores", "(2,)", "(4,)"]),
    (dk.masked_linear, dict(input=torch.randn(3, 5), weight=torch.randn(4, 6), scores=torch.randn(4, 6), s=1.0),
     ValueError, ["input", "in_features=6", "(3, 5)"]),
    (dk.masked_weight, dict(weight=torch.randn(4, 6), scores=torch.randn(6, 4), s=1.0), ValueError, ["scores", "(4, 6)", "(6, 4)"]),
    (dk.mask, dict(scores=torch.zeros(3, dtype=torch.int32), s=1.0), TypeError, ["scores", "floating", "int32"]),
    (dk.sparsity_regularizer, dict(masks=torch.rand(3)), TypeError, ["masks", "list", "Tensor"]),
    (dk.sparsity_regularizer, dict(masks=[torch.rand(3)], reserved=[None, None]), ValueError, ["reserved", "1 entries", "2"]),
    (dk.sparsity_regularizer, dict(masks=[torch.rand(3)], reserved=[torch.ones(4, dtype=torch.bool)]), ValueError, ["reserved[0]", "(3,)", "(4,)"]),
    (dk.sparsity_regularizer, dict(masks=[torch.rand(3)], reserved=[torch.ones(3)]), TypeError, ["reserved[0]", "torch.bool", "float32"]),
]


@pytest.mark.parametrize("op,kwargs,exc,words", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_named(op, kwargs, exc, words):
    kwargs = dict(kwargs)
    positional = [kwargs.pop(k) for k in ("input", "weight", "scores", "s") if k in kwargs and op is not dk.sparsity_regularizer]
    with pytest.raises(exc) as info:
        op(*positional, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_device_mismatch_is_named():
    meta = torch.randn(4, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match=re.escape("weight must be on device cpu, got meta")):
        dk.masked_conv2d(torch.randn(2, 3, 8, 8), meta, meta, 1.0)


def test_unknown_backend_everywhere():
    for call in (dk.set_backend, lambda n: dk.use_backend(n).__enter__()):
        with pytest.raises(ValueError, match="backend must be one of"):
            call("fast")


def test_unavailable_backend_says_why(monkeypatch):
    status = dk.backend_status()
    missing = [name for name, why in status.items() if why is not None]
    if not torch.cuda.is_available():
        assert "cuda" in missing  # no GPU here: the cuda backend must report itself unavailable
    for name in missing:
        with pytest.raises(dk.BackendUnavailableError) as info:
            dk.set_backend(name)
        assert name in str(info.value) and status[name] in str(info.value)
    assert dk.get_backend() in ("auto", "reference", "cpu", "cuda", "triton")


def test_cuda_backend_on_cpu_tensors_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the message checked here is for machines without one")
    with pytest.raises(dk.BackendUnavailableError, match="backend 'cuda' cannot run on cpu tensors"):
        dk.mask(torch.randn(3), 1.0, backend="cuda")


def test_pack_bits_refuses_non_bool_masks_before_any_backend():
    # validated once in Python: the backends' pack_bits kernels take the checked bool tensor
    for backend in ("reference", "cpu"):
        with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
            dk.pack_bits(torch.zeros(8, dtype=torch.uint8), backend=backend)
