"""dgm_kernels: fused kernels for mask-based continual learning.

Masked convolutions (per-weight masks, DGMw; per-channel gates, DGMa), straight-through mask
binarisation with HAT gradient compensation, the sparsity regulariser, and the bookkeeping of task
masks as networks grow (:class:`MaskLedger`, masked optimizers in :mod:`dgm_kernels.optim`). Every op has a plain-PyTorch reference that is its spec and
fast backends (``cpu``: C++; ``cuda``: CUDA; ``triton``) chosen with :func:`set_backend`,
:func:`use_backend` or the environment variable ``DGM_KERNELS_BACKEND``.

Importing this package never fails because CUDA, Triton or the compiled extension is missing: see
:func:`backend_status` for what can run here and why not.
"""
from .backends import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from .functional import (
    gated_conv2d,
    gated_conv_transpose2d,
    gated_linear,
    mask,
    masked_conv2d,
    masked_conv_transpose2d,
    masked_linear,
    masked_weight,
    pack_bits,
    sparsity_regularizer,
)
from ._modes import MODES as MODE_CODES  # noqa: E402  (the integer code of each mode, as backends take it)
from . import nn  # noqa: E402  (modules use the functional ops above)
from . import optim  # noqa: E402
from . import schedules  # noqa: E402
from .schedules import clamp_scores_, hat_scale, soft_block_gradients_  # noqa: E402
from .bits import unpack_bits  # noqa: E402
from .ledger import LedgerError, MaskLedger, TaskView, dgma_expansion, dgmw_expansion  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "get_backend",
    "set_backend",
    "use_backend",
    "mask",
    "masked_weight",
    "masked_linear",
    "masked_conv2d",
    "masked_conv_transpose2d",
    "gated_conv2d",
    "gated_conv_transpose2d",
    "gated_linear",
    "sparsity_regularizer",
    "nn",
    "MODE_CODES",
    "optim",
    "schedules",
    "hat_scale",
    "clamp_scores_",
    "soft_block_gradients_",
    "pack_bits",
    "unpack_bits",
    "MaskLedger",
    "LedgerError",
    "TaskView",
    "dgmw_expansion",
    "dgma_expansion",
]
