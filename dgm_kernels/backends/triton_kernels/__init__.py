"""Triton kernels of the ``triton`` backend, one module per op family (Liger-Kernel style).

- ``_common``: the mask math as device functions (sigmoid, dm/de with HAT compensation, flushing of tiny
  values) and the launch helpers every family shares (block sizes, scalar splitting, dtype checks);
- ``mask``: m(e), W * m(e) and their one-pass backward;
- ``gate``: the per-channel gate, the gate's reduction over batch and space, and the per-unit gradient
  blocking of DGMa weights;
- ``sparsity``: the terms of the sparsity regulariser;
- ``conv``: the implicit-GEMM convolution that applies a mask while it loads the weight;
- ``bits``: the mask ledger's bit packing and its union + per-unit popcount;
- ``optim``: the fused masked Adam/AdamW and SGD updates that never write a frozen entry.

Frozen masks are read either as one byte per entry or as packed bits (``_common.frozen_at``).

Importing this package defines the kernels, so ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests)
must be set before the import; :data:`_common.INTERPRETED` records which kind was defined.
"""
