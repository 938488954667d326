"""Pixel transforms shared by every data set.

Images are kept as ``uint8`` NCHW (4x smaller than float32, so whole data sets fit on the training device) and
turned into the model's input range only per batch:

- :func:`to_model_range`: ``uint8`` -> ``float32`` in ``[-1, 1]``, ``x / 127.5 - 1``. This is the DGM recipe's
  ``ToTensor()`` (``x / 255``) followed by ``Normalize(0.5, 0.5)``, written as one affine map so 0 -> -1 and
  255 -> 1 exactly (the generator's tanh output lives in the same range).
- :func:`from_model_range`: the inverse, rounding to the nearest ``uint8`` (for sample grids).
- :func:`resize_images`: bilinear resize of a ``uint8`` batch with Pillow, i.e. exactly what the DGM recipe did
  to MNIST (``ToPILImage`` -> ``Resize(32)`` on the 28x28 8-bit image -> 32x32 8-bit image). Pillow's BILINEAR
  samples at pixel centres (``align_corners=False`` in torch terms) and, when shrinking, widens its filter to
  the scale factor (antialiasing). ``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)``
  agrees with it to within one grey level; Pillow is used so that the pixels are the recipe's, bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_model_range", "from_model_range", "resize_images"]


def to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` images -> floating point in ``[-1, 1]`` (``x / 127.5 - 1``), on the images' device."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_model_range: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range: images must be uint8 (0..255), got {images.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"to_model_range: dtype must be a floating point dtype, got {dtype}")
    return images.to(dtype).div_(127.5).sub_(1.0)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Floating point images in ``[-1, 1]`` -> ``uint8`` (values outside are clamped)."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"from_model_range: x must be a floating point torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def resize_images(images, size: int):
    """Bilinear resize of ``uint8 [N, C, H, W]`` images (C = 1 or 3) to ``size x size`` with Pillow.

    Accepts and returns the same type (numpy array or torch tensor). A batch already at ``size`` is returned
    unchanged.
    """
    from PIL import Image

    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"resize_images: size must be a positive int, got {size!r}")
    is_tensor = isinstance(images, torch.Tensor)
    arr = images.detach().cpu().numpy() if is_tensor else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"resize_images: images must be uint8 [N, C, H, W] with C in (1, 3), got "
                         f"{arr.dtype} {list(arr.shape)}")
    if arr.shape[2:] == (size, size):
        return images
    out = np.empty((arr.shape[0], arr.shape[1], size, size), dtype=np.uint8)
    if arr.shape[1] == 1:
        for i in range(arr.shape[0]):
            out[i, 0] = np.asarray(Image.fromarray(arr[i, 0]).resize((size, size), Image.BILINEAR))
    else:
        hwc = arr.transpose(0, 2, 3, 1)
        for i in range(arr.shape[0]):
            img = Image.fromarray(np.ascontiguousarray(hwc[i])).resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(img).transpose(2, 0, 1)
    return torch.from_numpy(out).to(images.device) if is_tensor else out
