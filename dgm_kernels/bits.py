"""Binary masks stored as bits: the packed form every op accepts for ``frozen`` / ``frozen_out`` / ``frozen_in``.

Layout: a bool tensor of ``n`` entries, flattened in row-major (C) order, becomes a 1-D ``torch.uint8`` tensor
of ``ceil(n / 8)`` bytes; entry ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``; the
padding bits of the last byte are 0. The logical shape travels separately (the ops know it from the weight).

A uint8 tensor passed as ``frozen`` is read as this packed form, a bool tensor as the dense form.
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


def pack_bits(mask: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Pack a bool tensor into bits (see the module docstring for the layout)."""
    from .backends import resolve

    _checks.tensor("mask", mask, dtype=torch.bool)
    impl = resolve(backend, mask.device)
    fn = getattr(impl, "pack_bits", None)
    return fn(mask) if fn is not None else pack_bits_reference(mask)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``bits`` packs (PyTorch; the kernels unpack inside the ops)."""
    check_packed("bits", bits, shape, bits.device if isinstance(bits, torch.Tensor) else None)
    return unpack_bits_reference(bits, shape)


def as_dense(frozen: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A frozen argument in either form as a bool tensor (for the reference backend)."""
    if frozen is None or frozen.dtype == torch.bool:
        return frozen
    return unpack_bits_reference(frozen, shape)
