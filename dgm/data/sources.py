"""Where a data set's files come from: finding them in the data directories, verifying their digests,
downloading them from their mirrors, and the cache of decoded arrays keyed by the files' SHA-256.

The per-data-set readers (:mod:`dgm.data.loaders`) are written with these helpers; every place they looked and
every fetch that failed is recorded in :attr:`Request.tried`, so that the final error lists them all.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import fetch
from .errors import ChecksumError, DatasetNotFoundError
from .registry import DatasetInfo, FileSpec
from .transforms import resize_images

__all__ = ["Request", "Loaded", "find_file", "verified_sha256", "try_download", "not_found_error",
           "read_through_cache"]


@dataclass
class Request:
    """One call of :func:`dgm.data.load_dataset`: what to load, where to look, what fetching is allowed."""

    info: DatasetInfo
    split: str
    data_dir: Path
    download: bool
    verify: bool
    timeout: float
    allow_apt: bool | None
    workers: int | None
    cache: bool
    tried: list[str] = field(default_factory=list)

    @property
    def target_dir(self) -> Path:
        """Where fetched files go and where the user is told to put files."""
        return self.data_dir / self.info.subdir

    def candidate_dirs(self) -> list[Path]:
        return [self.target_dir, self.data_dir]


@dataclass
class Loaded:
    """Located (and verified) files; ``read`` parses them into ``(images uint8 NCHW, labels int64)``."""

    source: str
    files: dict[str, str]  # path -> sha256 (or a listing fingerprint for image folders)
    read: Callable[[], tuple[np.ndarray, np.ndarray]]


# Bump when a reader's output for the same input files changes: it invalidates every decoded-array cache entry.
_DECODED_FORMAT_VERSION = 1


# -- decoded-array cache -------------------------------------------------------------------------------------
def _decoded_cache_file(req: Request, loaded: Loaded, image_size: int | None) -> Path:
    """Where the decoded (and resized) arrays of these exact files are kept.

    The key holds the files' SHA-256 (verified just before), the split, the size and the reader version, so a
    changed file can never be served stale arrays. Source directories that are not caches (the shared arrays,
    an ImageNet folder) are never written to: their decoded arrays go to the default cache directory.
    """
    key = hashlib.sha256(json.dumps([_DECODED_FORMAT_VERSION, req.info.name, req.split, image_size,
                                     sorted(loaded.files.values())]).encode()).hexdigest()[:20]
    base = req.target_dir if req.info.downloadable else fetch.default_data_dir() / req.info.subdir
    size = "native" if image_size is None else f"{image_size}px"
    return base / "decoded" / f"{req.split}-{size}-{key}.npz"


def read_through_cache(req: Request, loaded: Loaded, image_size: int | None):
    cache_file = _decoded_cache_file(req, loaded, image_size) if req.cache else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            if (images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int64
                    and labels.shape == (len(images),)):
                return images, labels, cache_file
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache entry is simply rebuilt
    images, labels = loaded.read()
    if image_size is not None and images.shape[-1] != image_size:
        images = resize_images(images, image_size)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.part.npz")
            np.savez(tmp, images=images, labels=labels)  # uncompressed: loads in milliseconds
            os.replace(tmp, cache_file)
        except OSError as exc:
            warnings.warn(f"could not cache the decoded arrays in {cache_file}: {exc}", stacklevel=4)
    return images, labels, None


# -- finding, verifying and downloading files ---------------------------------------------------------------
def find_file(req: Request, filename: str, dirs: list[Path] | None = None) -> Path | None:
    for d in dirs or req.candidate_dirs():
        p = d / filename
        if p.is_file():
            return p
    return None


def verified_sha256(req: Request, path: Path, spec: FileSpec | None) -> str:
    """Verify ``path`` against ``spec`` (when asked and known) and return its SHA-256 for the provenance."""
    expected = spec.digests if (req.verify and spec is not None) else ()
    hint = ("pass verify=False to use a copy that differs from every recorded one, or delete the file to "
            "fetch it again")
    return fetch.verify_file(path, expected, hint=hint)["sha256"]


def try_download(req: Request, spec: FileSpec, dest_dir: Path | None = None) -> Path | None:
    """Try each URL of ``spec``; return the downloaded path or None (failures are recorded in ``req.tried``)."""
    if not req.download:
        return None
    dest = (dest_dir or req.target_dir) / spec.name
    for url in spec.urls:
        try:
            return fetch.download_url(url, dest, spec.digests, timeout=req.timeout)
        except ChecksumError as exc:
            req.tried.append(f"download {url}: {exc}")
        # URLError (HTTPError included), a broken connection, a timeout, an unsupported URL scheme
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            req.tried.append(f"download {url}: {type(exc).__name__}: {exc}")
    return None


def not_found_error(req: Request, what_to_put: str, extra: str = "") -> DatasetNotFoundError:
    lines = [f"{req.info.title}, {req.split} split: no usable files found.",
             f"Put {what_to_put} into {req.target_dir}/ (or pass data_dir=<dir> holding them).{extra}"]
    if not req.download:
        lines.append("Nothing was downloaded because download=False.")
    if req.tried:
        lines.append("Tried:")
        lines.extend(f"  - {t}" for t in req.tried)
    return DatasetNotFoundError("\n".join(lines))
