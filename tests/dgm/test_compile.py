"""``config.compile`` (``dgm train --compile``): the GAN iteration with its forwards under torch.compile
(dgm.steps.CompiledForwards) computes what the eager iteration computes, and compiles once per task, not per batch.

CPU only, with the smallest networks (compiling is the slow part: Inductor generates C++ for every graph).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import dgm_kernels as dk
from dgm.checkpoint import new_generator
from dgm.data import synthetic_tasks, to_model_range
from dgm.plasticity import scale_at
from dgm.presets import make_config
from dgm.steps import prepare_task

pytest.importorskip("dgm_kernels._C", reason="the cpu backend (dgm_kernels._C) is not built")

BATCHES = 6  # of 8 images: the first 3 compile, the last 3 must not


def _config(compile_: bool):
    # the interleaved schedule puts a classifier step into the iteration, so that the classifier's compiled
    # forward is covered too
    return make_config("synthetic", "dgmw", "quick", backend="cpu", threads=1, ngf=2, nz=16, batch_size=8,
                       critic_widths=[4, 4, 4], classifier_widths=[4, 4, 4], classifier_schedule="interleaved",
                       classifier_shift=0, num_tasks=2, max_train_per_class=8, max_test_per_class=2,
                       epochs=1, compile=compile_)


def _run(compile_: bool):
    """Losses of BATCHES iterations of task 0 from the same initial state, and the number of graphs compiled
    after each iteration."""
    config = _config(compile_)
    tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=8, max_test_per_class=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with dk.use_backend("cpu"):
            torch.manual_seed(1)
            G = new_generator(config, 10, torch.device("cpu"))
            G.set_backend("cpu")
            step, _, _ = prepare_task(config, 0, tasks, G, None, None, G.mask_sizes(), "cpu")
            real = tasks[0].train
            losses, graphs = [], []
            for i in range(BATCHES):
                idx = torch.arange(8)
                # s changes every batch, as in training (schedule 'task' over a long task)
                s, s_max = scale_at("task", config.s_max, 0, 1, i + 1, 50)
                out = step.iteration(to_model_range(real.images[idx]), real.positions[idx], idx, s, s_max)
                losses.append([out[k] for k in ("c", "d", "gp", "w", "g", "reg")])
                graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch.set_num_threads(threads)
    return torch.tensor(losses, dtype=torch.float64), graphs, G


def test_compiled_iteration_matches_eager_and_compiles_once_per_task():
    eager, _, g_eager = _run(False)
    counters.clear()
    compiled, graphs, g_compiled = _run(True)
    # Inductor fuses and reorders float32 sums: not bitwise, but the same losses to float rounding
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert graphs[0] > 0, "nothing was compiled"
    # a new s every batch: no new graph after the first batches (the backward graph of the generator step comes
    # with the first one; nothing may follow from a new value of s)
    assert graphs[BATCHES // 2 - 1] == graphs[-1], f"graphs compiled after each batch: {graphs}"
    # the layers hold their floats again outside the compiled calls
    for (_, a), (_, b) in zip(g_eager.masked_layers(), g_compiled.masked_layers()):
        assert type(b.s) is float and b.s == a.s and b.s_max == a.s_max
