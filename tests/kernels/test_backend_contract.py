"""The backend contract (dgm_kernels.backends.contract): every registered backend implements all of it."""
from __future__ import annotations

import inspect

import pytest

from dgm_kernels.backends import BACKEND_NAMES, load_backend
from dgm_kernels.backends.contract import Backend, required_ops

CONCRETE = [n for n in BACKEND_NAMES if n != "auto"]


def _parameters(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", CONCRETE)
def test_every_backend_implements_the_whole_contract(name):
    backend = load_backend(name)  # the object loads on any machine; whether it can run is another question
    assert isinstance(backend, Backend)
    assert backend.name == name
    for op in required_ops() + ["masked_conv", "gated_conv", "conv"]:
        impl = getattr(type(backend), op)
        assert not getattr(impl, "__isabstractmethod__", False), f"{name} does not implement {op}"
        assert _parameters(getattr(backend, op)) == _parameters(getattr(Backend, op)), (
            f"{name}.{op} must take the contract's arguments {_parameters(getattr(Backend, op))}"
        )


def test_the_reference_is_complete_and_the_contract_lists_every_op():
    # the contract names the ops that the functional layer, the ledger and the optimizers call
    assert set(required_ops()) == {"unavailable_reason", "mask", "masked_weight", "channel_gate", "block_unit_grad",
                                   "sparsity_terms", "pack_bits", "union_count", "adam_step_", "sgd_step_"}
    ref = load_backend("reference")
    assert ref.unavailable_reason() is None


def test_load_backend_refuses_auto_and_unknown_names():
    with pytest.raises(ValueError, match="concrete backend"):
        load_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_backend("nope")
