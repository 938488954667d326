"""Checks shared by several test files: what "frozen means bit-identical" requires of a grown generator, and of
the compiled optimizer steps on every device."""
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


def assert_optimizer_steps_ignore_layout(ops, device):
    """The compiled masked Adam / SGD steps update a non-contiguous parameter in place, with the same result as
    on a contiguous one, and leave its frozen entries as they were (``ops``: ``torch.ops.dgm_kernels``)."""
    from dgm_kernels.backends import reference

    base = torch.randn(6, 5, dtype=torch.float64, device=device)
    frozen = (torch.rand(5, 6) < 0.4).to(device)
    results = []
    for contiguous in (True, False):
        p = base.t().contiguous() if contiguous else base.t()
        grad, m, v = torch.full_like(p, 0.3), torch.zeros_like(p), torch.zeros_like(p)
        assert p.is_contiguous() == contiguous and m.is_contiguous() == contiguous
        ptr = p.data_ptr()
        ops.masked_adam_step(p, grad, m, v, reference.pack_bits(frozen), 1e-2, 0.9, 0.999, 1e-8, 0.0, 1, False)
        buf = torch.zeros_like(p)
        ops.masked_sgd_step(p, grad, buf, frozen, 0.1, 0.9, 0.0, 0.0, False, True)
        assert p.data_ptr() == ptr
        results.append((p.clone(), m.clone(), v.clone(), buf.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[1][0][frozen], base.t()[frozen])
