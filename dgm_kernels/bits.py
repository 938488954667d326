"""Binary masks stored as bits: the packed form every op accepts for ``frozen`` / ``frozen_out`` / ``frozen_in``.

Layout: a bool tensor of ``n`` entries, flattened in row-major (C) order, becomes a 1-D ``torch.uint8`` tensor
of ``ceil(n / 8)`` bytes; entry ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``; the
padding bits of the last byte are 0. The logical shape travels separately (the ops know it from the weight).

A uint8 tensor passed as ``frozen`` is read as this packed form, a bool tensor as the dense form.

This is the bottom module of the package: pure layout in PyTorch, no backend. The backends' packing kernels are
reached through :func:`dgm_kernels.functional.pack_bits`.
"""
from __future__ import annotations

import torch

from . import _checks


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def _bit_values(device):
    return (1 << torch.arange(8, device=device, dtype=torch.int32)).to(torch.uint8)


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_values(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits_reference(bits: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= int(d)
    flags = (bits[:, None] & _bit_values(bits.device)) != 0
    return flags.reshape(-1)[:numel].reshape(tuple(shape))


def check_packed(name: str, bits: torch.Tensor, shape, device) -> None:
    numel = 1
    for d in shape:
        numel *= int(d)
    _checks.tensor(name, bits, dtype=torch.uint8, device=device, ndim=1)
    if bits.numel() != packed_size(numel):
        raise ValueError(
            f"{name} (packed bits of a mask of shape {tuple(shape)}) must have {packed_size(numel)} bytes, got {bits.numel()}"
        )


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``bits`` packs (PyTorch; the kernels unpack inside the ops)."""
    check_packed("bits", bits, shape, bits.device if isinstance(bits, torch.Tensor) else None)
    return unpack_bits_reference(bits, shape)


def as_dense(frozen: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A frozen argument in either form as a bool tensor (for the reference backend)."""
    if frozen is None or frozen.dtype == torch.bool:
        return frozen
    return unpack_bits_reference(frozen, shape)


def unit_block_pattern(weight_shape, frozen_out, frozen_in, transposed: bool, groups: int) -> torch.Tensor:
    """Bool tensor over the weight's first two dims: True where the weight is frozen (DGMa).

    The entry linking input channel i to output channel o is frozen when both units are frozen
    (``frozen_in=None``: when the output unit is frozen). A conv weight is ``[out, in/groups, ...]``, a
    transposed conv weight ``[in, out/groups, ...]``; column j of row r belongs to global channel
    ``(r // (rows / groups)) * cols + j`` of the other side.
    """
    rows, cols = weight_shape[0], weight_shape[1]
    device = frozen_out.device
    group_of_row = torch.arange(rows, device=device) // (rows // groups)
    col_global = group_of_row[:, None] * cols + torch.arange(cols, device=device)[None, :]
    if transposed:
        out_frozen = frozen_out[col_global]
        return out_frozen if frozen_in is None else out_frozen & frozen_in[:, None]
    out_frozen = frozen_out[:, None].expand(rows, cols)
    return out_frozen if frozen_in is None else out_frozen & frozen_in[col_global]
