"""Floating-point operations of a piece of code: convolutions and matrix products, forward, backward and the double
backward of the gradient penalty, counted with the per-op formulas of ``torch.utils.flop_counter``.

    from benchmarks.flops import count_flops
    total, per_op = count_flops(lambda: step.iteration(x, pos, idx, s, s_max))

Why not ``torch.utils.flop_counter.FlopCounterMode`` itself: its module tracking (forward and backward hooks that
attribute FLOPs to modules) fails inside the gradient penalty's ``torch.autograd.grad(create_graph=True)`` (checked
with torch 2.14.1). The counting here is a plain ``TorchDispatchMode`` that looks every op up in the same formula
table (``flop_registry``: mm, addmm, bmm, baddbmm, convolution and convolution_backward, ...), without modules.
An op's implementation runs with the mode switched off, so an op that calls another (``convolution`` ->
``mkldnn_convolution``) is counted once. Ops outside the table (elementwise, reductions, this library's custom
ops) count zero: the figure is the arithmetic of the matrix products, what a machine's matmul rate bounds.
"""
from __future__ import annotations

from collections import Counter


def count_flops(fn, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` once; return (total FLOPs, {op name: FLOPs}) of its convolutions and matrix
    products (2 per multiply-add)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    per_op: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, f_args=(), f_kwargs=None):
            f_kwargs = f_kwargs or {}
            out = func(*f_args, **f_kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                per_op[str(func._overloadpacket).removeprefix("aten.")] += int(formula(*f_args, **f_kwargs,
                                                                                        out_val=out))
            return out

    with _Count():
        fn(*args, **kwargs)
    return sum(per_op.values()), dict(per_op)


def rate_row(flops: int, seconds: float, matmul_flops_per_s: float | None) -> dict:
    """{"flops", "gflop_per_s", "matmul_fraction"}: achieved FLOP rate of ``flops`` in ``seconds`` and its share of
    the matmul rate measured in the same process (None when not measured)."""
    rate = flops / seconds if seconds > 0 else float("nan")
    return {"flops": int(flops), "gflop_per_s": rate / 1e9,
            "matmul_fraction": rate / matmul_flops_per_s if matmul_flops_per_s else None}
