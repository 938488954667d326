"""Checks shared by the pipeline tests: what "frozen means bit-identical" requires of a grown generator."""
from __future__ import annotations

import torch


def snapshot_old_task(G):
    """Every masked layer's weight and reserved mask, before the next task trains."""
    return {n: (layer.weight.detach().clone(), G.ledger.reserved_mask(n).clone()) for n, layer in G.masked_layers()}


def assert_old_task_unchanged(G, z, y, images0, weights0, method):
    """Task 0 generates the same images; reserved weights (DGMw) never moved; free weights kept training."""
    assert torch.equal(G(z, y, task=0), images0), "task 0 must generate bit-identical images after task 1"
    moved = False
    for name, layer in G.masked_layers():
        old, reserved = weights0[name]
        now = layer.weight.detach()[tuple(slice(0, d) for d in old.shape)]
        if method == "dgmw":
            assert torch.equal(now[reserved], old[reserved]), f"{name}: a reserved weight moved"
        moved |= not torch.equal(now, old)
    assert moved, "the free weights must keep training"
