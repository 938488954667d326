"""Triton kernels of the ``triton`` backend and their custom ops, one pair of modules per op family
(Liger-Kernel style): ``<family>.py`` holds the kernels and their launchers, ``<family>_ops.py`` the torch
custom ops (fake kernels, autograd) over them and the family's entry points of the backend contract.

- ``_common``: the mask math as device functions (sigmoid, dm/de with HAT compensation, flushing of tiny
  values) and the launch helpers every family shares (block sizes, scalar splitting, dtype checks);
- ``ops_common``: the custom-op namespace and the placeholders for gradients nobody asked for;
- ``mask`` / ``mask_ops``: m(e), W * m(e) and their one-pass backward;
- ``gate`` / ``gate_ops``: the per-channel gate, the gate's reduction over batch and space, and the per-unit
  gradient blocking of DGMa weights;
- ``sparsity`` / ``sparsity_ops``: the terms of the sparsity regulariser;
- ``conv`` / ``conv_ops``: the implicit-GEMM convolution that applies a mask while it loads the weight, and
  the masked / gated convolution ops built on it or on ATen's convolution;
- ``conv_strategy``: the per-shape choice between those two convolution paths (``set_conv_strategy``);
- ``bits`` / ``bits_ops``: the mask ledger's bit packing and its union + per-unit popcount;
- ``optim`` / ``optim_ops``: the fused masked Adam/AdamW and SGD updates that never write a frozen entry.

Frozen masks are read either as one byte per entry or as packed bits (``_common.frozen_at``).

Importing this package defines the kernels, so ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests)
must be set before the import; :data:`_common.INTERPRETED` records which kind was defined. The ``*_ops``
modules register their ops when imported (``dgm_kernels.backends.triton_backend`` imports them all).
"""
