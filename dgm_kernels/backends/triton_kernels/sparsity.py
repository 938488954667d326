"""The two terms of the sparsity regulariser of one layer: sum of m over free entries, number of free entries.

Free = not reserved by an earlier task (everything without ``reserved``). The forward reduces per block
(float32 partial sums, float64 for float64 masks; exact int32 counts) and finishes the few partials in
float64, so the result does not depend on the block size more than float32 rounding allows. The backward
is grad * free.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bool_bytes, compute_dtype, elementwise_block, num_warps_for


@triton.jit
def _sparsity_partial_kernel(
    m_ptr, r_ptr, sum_ptr, count_ptr, n, HAS_R: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    free = ok
    if HAS_R:
        free = ok & (tl.load(r_ptr + offs, mask=ok, other=1) == 0)
    m = tl.load(m_ptr + offs, mask=free, other=0.0).to(ACC)
    tl.store(sum_ptr + pid, tl.sum(m, axis=0))
    tl.store(count_ptr + pid, tl.sum(free.to(tl.int32), axis=0))


@triton.jit
def _sparsity_backward_kernel(g_ptr, r_ptr, out_ptr, n, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr)  # the scalar gradient of the sum
    g = tl.zeros([BLOCK], dtype=g.dtype) + g
    if HAS_R:
        g = tl.where(tl.load(r_ptr + offs, mask=ok, other=1) != 0, 0.0, g)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=ok)


def sparsity_terms(mask: torch.Tensor, reserved: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask over free entries, number of free entries), 0-dim tensors in float32 (float64 for float64
    masks): a float16 sum or count overflows past 65504."""
    m = mask.contiguous()
    n = m.numel()
    acc = compute_dtype(m.dtype)
    out_dtype = torch.float64 if acc == tl.float64 else torch.float32
    if n == 0:
        zero = torch.zeros((), dtype=out_dtype, device=m.device)
        return zero, zero.clone()
    block = elementwise_block(n)
    programs = triton.cdiv(n, block)
    sums = torch.empty(programs, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=m.device)
    counts = torch.empty(programs, dtype=torch.int32, device=m.device)
    r = bool_bytes(reserved)
    _sparsity_partial_kernel[(programs,)](
        m, r if r is not None else m, sums, counts, n, HAS_R=r is not None, ACC=acc, BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return sums.sum(dtype=torch.float64).to(out_dtype), counts.sum().to(out_dtype)


def sparsity_backward(grad_sum: torch.Tensor, reserved: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """grad of the first term with respect to the mask: grad_sum where free, 0 where reserved."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    n = out.numel()
    if n:
        r = bool_bytes(reserved)
        block = elementwise_block(n)
        _sparsity_backward_kernel[(triton.cdiv(n, block),)](
            grad_sum.reshape(1).to(like.dtype), r if r is not None else out, out, n, HAS_R=r is not None,
            BLOCK=block, num_warps=num_warps_for(block),
        )
    return out
