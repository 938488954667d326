"""Microbenchmarks of every dgm_kernels op x backend x phase (pytest-benchmark).

Not collected by the normal test run (``pytest tests``; the file name does not match ``test_*.py``). Run
it with ``python -m benchmarks.report --run [--quick]`` (writes JSON and a Markdown table under
benchmarks/results/) or directly: ``python -m pytest benchmarks/bench_ops.py [--dgm-quick] [-k ...]``.

What is timed, for each case of :mod:`benchmarks.shapes`, device (cpu; cuda when present) and dtype
(float32 on the CPU; float32 and bfloat16 on a GPU):

- backends: every concrete backend of ``dgm_kernels`` that applies to the device (``reference``, ``cpu``
  on CPU tensors; ``reference``, ``cuda``, ``triton`` on CUDA tensors; Triton on CPU tensors would run in
  the interpreter, which is not a benchmark) plus ``compile``: ``torch.compile`` of the reference
  function, compiled once per shape and warmed up. A backend that cannot run here is skipped with its
  reason, which the report lists.
- phases: ``fwd`` (the training forward: grad mode on, the graph for backward is built), ``bwd`` (the
  backward alone: each round's forward runs untimed in pytest-benchmark's setup), ``fwd+bwd``. Gradients
  come from ``torch.autograd.grad`` w.r.t. every input a training step differentiates (scores, weight,
  and the activation unless it is data), so no ``.grad`` accumulates between rounds.
- CUDA work is synchronised inside the timed call (and after the untimed setup), so the time is the
  device's, not the launch's.
"""
from __future__ import annotations

import math
import os
import time
import zlib

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels.backends import BACKEND_NAMES, resolve, unavailable_reason

from benchmarks import shapes

PHASES = ("fwd", "bwd", "fwd+bwd")
COMPILE = "compile"  # the torch.compile(reference) baseline
#: backends that apply to a device type by design; any other concrete backend is tried everywhere
_DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def backends_for(device: str) -> list[str]:
    """The backends benchmarked on ``device``: reference, the device's own, then the compile baseline."""
    concrete = [b for b in BACKEND_NAMES if b != "auto"]
    foreign = {b for d, names in _DEVICE_BACKENDS.items() if d != device for b in names}
    return [b for b in concrete if b not in foreign] + [COMPILE]


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


class Item(str):
    """One benchmark's parameters; a ``str`` (its id) so pytest-benchmark's JSON stores it as plain text."""

    def __new__(cls, case: shapes.Case, device: str, dtype: torch.dtype, backend: str, phase: str):
        dname = str(dtype).removeprefix("torch.")
        self = super().__new__(cls, f"{case.op}-{case.name}-{device}-{dname}-{backend}-{phase.replace('+', '')}")
        self.case, self.device, self.dtype, self.dname, self.backend, self.phase = case, device, dtype, dname, backend, phase
        return self


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--dgm-quick")
    params = []
    # device -> dtype -> case -> backend -> phase: one shape's benchmarks run together, so the compile
    # baseline compiles each shape once (see CompileCache)
    try:
        devices = shapes.parse_devices(metafunc.config.getoption("--dgm-devices"), torch.cuda.is_available())
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    for device in devices:
        for dtype in dtypes_for(device):
            for case in shapes.select(quick=quick, device=device):
                for backend in backends_for(device):
                    for phase in PHASES:
                        item = Item(case, device, dtype, backend, phase)
                        params.append(pytest.param(item, id=str(item)))
    metafunc.parametrize("item", params)


# --- workloads ------------------------------------------------------------------------------------


def _seeded(case: shapes.Case) -> torch.Generator:
    # a fixed seed per case, drawn on the CPU: every backend and device sees the same values
    return torch.Generator().manual_seed(zlib.crc32(case.key.encode()))


def _randn(shape, gen, device, dtype, grad):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)


def _bits(shape, fraction, gen, device):
    return None if fraction is None else (torch.rand(shape, generator=gen) < fraction).to(device)


def make_inputs(case: shapes.Case, device: str, dtype: torch.dtype):
    """(args of the op's function, the inputs to differentiate, the output gradient)."""
    gen = _seeded(case)
    t = case.tensors
    if case.op == "mask":
        e = _randn(t["scores"], gen, device, dtype, True)
        args, diff = (e,), (e,)
    elif case.op == "masked_weight":
        w = _randn(t["weight"], gen, device, dtype, True)
        e = _randn(t["weight"], gen, device, dtype, True)
        args, diff = (w, e, _bits(t["weight"], case.frozen, gen, device)), (w, e)
    elif case.op == "channel_gate":
        y = _randn(t["activation"], gen, device, dtype, True)
        e = _randn((t["activation"][1],), gen, device, dtype, True)
        args, diff = (y, e), (y, e)
    elif case.op in ("masked_conv2d", "masked_conv_transpose2d", "masked_linear"):
        x = _randn(t["input"], gen, device, dtype, case.input_grad)
        w = (_randn(t["weight"], gen, device, dtype, False) * 0.1).requires_grad_(True)
        e = _randn(t["weight"], gen, device, dtype, True)
        args = (x, w, e, _bits(t["weight"], case.frozen, gen, device))
        diff = ((x,) if case.input_grad else ()) + (w, e)
    elif case.op in ("gated_conv2d", "gated_conv_transpose2d"):
        transposed = case.op == "gated_conv_transpose2d"
        cout = t["weight"][1] if transposed else t["weight"][0]
        cin = t["weight"][0] if transposed else t["weight"][1]
        x = _randn(t["input"], gen, device, dtype, case.input_grad)
        w = (_randn(t["weight"], gen, device, dtype, False) * 0.1).requires_grad_(True)
        e = _randn((cout,), gen, device, dtype, True)
        f_out, f_in = case.frozen_units or (None, None)
        args = (x, w, e, _bits((cout,), f_out, gen, device), _bits((cin,), f_in, gen, device))
        diff = ((x,) if case.input_grad else ()) + (w, e)
    elif case.op == "sparsity_regularizer":
        masks = tuple(torch.rand(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
                      for s in t["masks"])
        reserved = tuple(_bits(s, case.frozen, gen, device) for s in t["masks"])
        args, diff = masks + reserved, masks
    else:
        raise ValueError(f"case.op must be one of {', '.join(shapes.OPS)}, got {case.op!r}")
    grad_out = torch.randn(case.out_shape, generator=gen).to(device=device, dtype=dtype)
    return args, diff, grad_out


def make_function(case: shapes.Case, backend: str, device: str):
    """The op of ``case`` as a function of tensors only (so torch.compile can take it), run by ``backend``."""
    mode, s, s_max, geo = case.mode, shapes.S, shapes.S_MAX, case.geometry
    op = case.op
    if op == "mask":
        return lambda e: dk.mask(e, s, mode=mode, s_max=s_max, backend=backend)
    if op == "masked_weight":
        return lambda w, e, frozen: dk.masked_weight(w, e, s, frozen, mode=mode, s_max=s_max, backend=backend)
    if op == "channel_gate":
        # the backend's primitive on a precomputed activation: the gate alone, no convolution around it
        impl, code = resolve(backend, torch.device(device)), dk.MODE_CODES[mode]
        return lambda y, e: impl.channel_gate(y, e, s, code, s_max)
    if op == "masked_linear":
        return lambda x, w, e, frozen: dk.masked_linear(x, w, e, s, frozen, mode=mode, s_max=s_max, backend=backend)
    if op in ("masked_conv2d", "masked_conv_transpose2d"):
        conv = getattr(dk, op)
        return lambda x, w, e, frozen: conv(x, w, e, s, frozen, mode=mode, s_max=s_max, backend=backend, **geo)
    if op in ("gated_conv2d", "gated_conv_transpose2d"):
        conv = getattr(dk, op)
        return lambda x, w, e, f_out, f_in: conv(
            x, w, e, s, f_out, f_in, mode=mode, s_max=s_max, backend=backend, **geo
        )
    if op == "sparsity_regularizer":
        n = len(case.tensors["masks"])
        return lambda *t: dk.sparsity_regularizer(list(t[:n]), list(t[n:]), backend=backend)
    raise ValueError(f"case.op must be one of {', '.join(shapes.OPS)}, got {op!r}")


# --- timing ---------------------------------------------------------------------------------------


def _synchronizer(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _phase_callables(phase, fn, args, diff, grad_out, sync):
    """(target, setup) for pytest-benchmark's pedantic mode; setup is None where none is needed."""

    def forward():
        out = fn(*args)
        sync()
        return out

    def backward(out):
        torch.autograd.grad(out, diff, grad_out, allow_unused=True)
        sync()

    def setup():
        return (forward(),), {}

    def forward_backward():
        out = fn(*args)
        torch.autograd.grad(out, diff, grad_out, allow_unused=True)
        sync()

    if phase == "fwd":
        return forward, None
    if phase == "bwd":
        return backward, setup
    if phase == "fwd+bwd":
        return forward_backward, None
    raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")


def _one_call(target, setup) -> float:
    a, kw = setup() if setup is not None else ((), {})
    start = time.perf_counter()
    target(*a, **kw)
    return time.perf_counter() - start


def calibrated_pedantic(benchmark, target, setup, timing):
    """Warm up, estimate one call's time, then time enough rounds to fill the budget.

    pytest-benchmark's automatic calibration cannot run a setup before each call; pedantic mode can but
    takes explicit rounds, so this picks them the same way for every phase: rounds = budget / call time,
    within [min_rounds, max_rounds]. Without a setup, calls shorter than ``min_round_s`` are repeated
    inside a round (with a setup, pytest-benchmark allows one call per round).
    """
    for _ in range(timing.warmup):
        _one_call(target, setup)
    per_call = sorted(_one_call(target, setup) for _ in range(3))[1]
    per_call = max(per_call, 1e-7)
    iterations = 1 if setup is not None else max(1, math.ceil(timing.min_round_s / per_call))
    rounds = int(min(timing.max_rounds, max(timing.min_rounds, timing.budget_s / (per_call * iterations))))
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=0)


def test_op(benchmark, item, timing, compile_cache, record_skip):
    case, device, dtype, dname, backend, phase = item.case, item.device, item.dtype, item.dname, item.backend, item.phase
    fields = dict(op=case.op, case=case.name, device=device, dtype=dname, backend=backend, phase=phase)
    if device == "cuda" and not torch.cuda.is_available():
        record_skip("needs a CUDA GPU", **fields)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        record_skip("TRITON_INTERPRET=1 is set: the Triton interpreter is not a benchmark", **fields)
    if backend != COMPILE:
        why = unavailable_reason(backend, torch.device(device))
        if why is not None:
            record_skip(why, **fields)

    args, diff, grad_out = make_inputs(case, device, dtype)
    sync = _synchronizer(device)
    extra = dict(fields, shape=case.describe(), source=case.source, mode=case.mode)
    if backend == COMPILE:

        def warm_up(compiled):
            for _ in range(2):
                out = compiled(*args)
                torch.autograd.grad(out, diff, grad_out, allow_unused=True)
            sync()

        fn, error = compile_cache.get(
            (case.key, device, dname), lambda: make_function(case, "reference", device), warm_up
        )
        if error is not None:
            record_skip(error, **fields)
    else:
        fn = make_function(case, backend, device)

    target, setup = _phase_callables(phase, fn, args, diff, grad_out, sync)
    benchmark.group = f"{case.key} {device}/{dname} {phase}"
    benchmark.extra_info.update(extra)
    calibrated_pedantic(benchmark, target, setup, timing)
