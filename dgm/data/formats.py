"""Readers of the standard on-disk formats of the image data sets DGM is evaluated on.

Every reader takes explicit paths, validates the file's structure and returns numpy arrays:
images as ``uint8`` in NCHW order and labels as ``int64``. Problems raise :class:`DataFormatError` naming the
file and what is wrong. No reader touches the network or knows about caches: see :mod:`dgm.data.fetch`.

Formats:
- IDX (MNIST, Fashion-MNIST): a 4-byte magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then
  the row-major payload (big-endian for multi-byte types); optionally gzip-compressed.
- ``mnist.pkl.gz`` (deeplearning.net): a gzip'ed pickle of ``(train, valid, test)``, each ``(images, labels)``
  with images float32 ``[N, 784]`` in ``[0, 1]`` (pixel / 256) and integer labels.
- SVHN cropped digits: MATLAB v5 ``.mat`` with ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` in 1..10,
  where 10 stands for the digit 0.
- CIFAR-10 python batches: pickled dicts with ``data`` uint8 ``[N, 3072]`` (channel-major RGB planes) and
  ``labels`` (a list of ints); keys are bytes in the original Python 2 pickles.
- The project's shared CIFAR-10 arrays: ``np.savez_compressed`` files with ``x`` uint8 NHWC and ``y`` uint8.
- An image folder ``root/<class>/<image>`` (ImageNet layout), decoded with Pillow, resized (shorter side)
  and centre-cropped.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import DataFormatError

__all__ = [
    "read_bytes",
    "read_idx",
    "read_idx_images_labels",
    "read_mnist_pickle",
    "read_svhn_mat",
    "read_cifar10_batches",
    "read_cifar10_npz",
    "list_image_folder",
    "read_image_folder",
    "load_image",
    "IMAGE_EXTENSIONS",
]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> numpy dtype (big-endian for the multi-byte types, as the format prescribes).
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------------------------------------
# bytes, gzip and restricted unpickling
# ----------------------------------------------------------------------------------------------------------
def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file whole, transparently decompressing it when it is gzip'ed.

    The gzip magic decides, not the file name; a name ending in ``.gz`` whose content is not gzip is an
    error (it usually means an HTML error page or a half-written download was saved under that name).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DataFormatError(path, f"cannot be read: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataFormatError(path, f"truncated or corrupt gzip stream ({exc})") from exc
    if path.suffix == ".gz":
        raise DataFormatError(
            path, f"is not a gzip file (starts with {raw[:8]!r}, expected the gzip magic {_GZIP_MAGIC!r}); "
                  "it may be an interrupted download or an HTML error page: delete it and fetch it again")
    return raw


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dicts, lists and tuples, and nothing else.

    Data set pickles come from the internet; a plain ``pickle.load`` would run any code such a file names.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes through it
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _unpickle(path: Path, data: bytes, encoding: str):
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as exc:
        raise DataFormatError(path, f"is not a valid pickle of numpy arrays ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally ``.gz``) into a numpy array."""
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(path, f"too short for an IDX header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataFormatError(
            path, f"bad IDX magic number 0x{data[:4].hex()}: expected 0x0000TTNN with type TT in "
                  f"{{{', '.join(f'{t:02x}' for t in _IDX_TYPES)}}} (e.g. 0x00000803 for images, "
                  "0x00000801 for labels)")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    if ndim == 0:
        raise DataFormatError(path, "IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(path, f"truncated IDX header: {ndim} dimensions need {header} bytes, "
                                    f"the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        what = "truncated IDX payload" if payload < expected else "trailing bytes after the IDX payload"
        raise DataFormatError(path, f"{what}: dimensions {shape} of {dtype.name} need {expected} bytes, "
                                    f"found {payload}")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)
    # Native byte order and a writable copy: torch.from_numpy rejects read-only and non-native buffers.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx_images_labels(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                           num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file (``uint8 [N, H, W]``) and its IDX label file (``uint8 [N]``).

    Returns images ``uint8 [N, 1, H, W]`` and labels ``int64 [N]``.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(images_path, f"expected an IDX image file of uint8 [N, H, W] (magic 0x00000803), "
                                           f"found {images.dtype.name} {list(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(labels_path, f"expected an IDX label file of uint8 [N] (magic 0x00000801), "
                                           f"found {labels.dtype.name} {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataFormatError(labels_path, f"holds {len(labels)} labels but {os.fspath(images_path)} holds "
                                           f"{len(images)} images")
    _check_labels(labels_path, labels, num_classes)
    return images[:, None], labels.astype(np.int64)


def _check_labels(path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(path, f"labels must lie in [0, {num_classes - 1}], found the range "
                                    f"[{labels.min()}, {labels.max()}]")


# ----------------------------------------------------------------------------------------------------------
# mnist.pkl.gz
# ----------------------------------------------------------------------------------------------------------
def read_mnist_pickle(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read deeplearning.net's ``mnist.pkl.gz``: ``{"train", "valid", "test"} -> (uint8 [N,1,28,28], int64)``.

    The file stores pixels as float32 ``p / 256`` (so the brightest value is 255/256); they are converted back
    to the exact uint8 ``p``. A copy scaled by 1/255 instead is also recognised. Anything else is an error,
    because a silent rescale would change every image.
    """
    path = Path(path)
    obj = _unpickle(path, read_bytes(path), encoding="latin1")  # the original is a Python 2 pickle
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DataFormatError(path, f"expected a pickled (train, valid, test) tuple, found {_describe(obj)}")
    out = {}
    for name, part in zip(("train", "valid", "test"), obj):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise DataFormatError(path, f"the {name} entry must be an (images, labels) pair, found {_describe(part)}")
        x, y = (np.asarray(a) for a in part)
        if x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f":
            raise DataFormatError(path, f"{name} images must be float [N, 784], found {x.dtype.name} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise DataFormatError(path, f"{name} labels must be integers [{len(x)}], found {y.dtype.name} "
                                        f"{list(y.shape)}")
        _check_labels(path, y, 10)
        out[name] = (_unit_float_to_uint8(path, name, x).reshape(-1, 1, 28, 28), y.astype(np.int64))
    return out


def _unit_float_to_uint8(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x.astype(np.uint8)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataFormatError(path, f"{name} pixels must lie in [0, 1], found [{lo}, {hi}]")
    # float32 arithmetic is enough (p / 256 times 256 is exact, p / 255 times 255 lands within a few ulps of p),
    # and blocks of rows keep the temporaries in cache: 50,000 x 784 pixels in one go cost seconds.
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint8)
    block = 4096
    for scale, tol in ((np.float32(256.0), 0.0), (np.float32(255.0), 1e-3)):
        for start in range(0, len(x), block):
            v = x[start:start + block] * scale
            r = np.rint(v)
            if float(np.abs(v - r).max()) > tol or float(r.max()) > 255.0:
                break
            out[start:start + block] = r
        else:
            return out
    raise DataFormatError(path, f"{name} pixels are not multiples of 1/256 (nor of 1/255): not an 8-bit "
                                "image set, refusing to guess its scale")


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    if isinstance(obj, np.ndarray):
        return f"an array {obj.dtype.name} {list(obj.shape)}"
    return f"a {type(obj).__name__}"


# ----------------------------------------------------------------------------------------------------------
# SVHN .mat
# ----------------------------------------------------------------------------------------------------------
def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read SVHN's ``train_32x32.mat`` / ``test_32x32.mat``: images ``uint8 [N,3,32,32]``, labels ``int64``.

    SVHN labels the digit 0 as 10; it is mapped to 0 so that labels are the digits themselves.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(os.fspath(path), variable_names=("X", "y"))
    except NotImplementedError as exc:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise DataFormatError(path, f"is a MATLAB v7.3 file, expected MATLAB v5 as published by SVHN ({exc})") from exc
    except (ValueError, TypeError, OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(path, f"is not a readable MATLAB .mat file ({exc})") from exc
    for key in ("X", "y"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataFormatError(path, f"has no variable {key!r} (found {found}); an SVHN file holds X "
                                        "[32, 32, 3, N] and y [N, 1]")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise DataFormatError(path, f"X must be uint8 [H, W, 3, N], found {x.dtype.name} {list(x.shape)}")
    y = y.reshape(-1)
    if len(y) != x.shape[3] or y.dtype.kind not in "iuf":
        raise DataFormatError(path, f"y must hold {x.shape[3]} numeric labels, found {y.dtype.name} {list(y.shape)}")
    if y.dtype.kind == "f" and not np.array_equal(y, np.rint(y)):
        raise DataFormatError(path, "y holds non-integer labels")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DataFormatError(path, f"labels must lie in 1..10 (10 meaning digit 0), found [{y.min()}, {y.max()}]")
    y[y == 10] = 0
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # [H, W, C, N] -> [N, C, H, W]
    return images, y


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches and the project's shared npz arrays
# ----------------------------------------------------------------------------------------------------------
def read_cifar10_batches(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR-10 python batches: images ``uint8 [N,3,32,32]``, labels ``int64 [N]``."""
    xs, ys = [], []
    for p in paths:
        p = Path(p)
        obj = _unpickle(p, read_bytes(p), encoding="bytes")
        if not isinstance(obj, dict):
            raise DataFormatError(p, f"expected a pickled dict with 'data' and 'labels', found {_describe(obj)}")
        d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
        missing = [k for k in ("data", "labels") if k not in d]
        if missing:
            raise DataFormatError(p, f"the pickled dict has no {missing} (keys: {sorted(map(str, d))}); a CIFAR-10 "
                                     "batch holds 'data' uint8 [N, 3072] and 'labels'")
        x, y = np.asarray(d["data"]), np.asarray(d["labels"])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataFormatError(p, f"'data' must be uint8 [N, 3072], found {x.dtype.name} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x) or (y.size and y.dtype.kind not in "iu"):
            raise DataFormatError(p, f"'labels' must be {len(x)} integers, found {y.dtype.name} {list(y.shape)}")
        _check_labels(p, y, 10)
        xs.append(x.reshape(-1, 3, 32, 32))  # rows are the R, G, B planes of 32x32, i.e. already CHW
        ys.append(y.astype(np.int64))
    if not xs:
        raise ValueError("read_cifar10_batches: paths is empty, expected at least one batch file")
    return np.concatenate(xs), np.concatenate(ys)


def read_cifar10_npz(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Read the project's shared CIFAR-10 arrays (``x`` uint8 NHWC, ``y`` uint8) and concatenate them."""
    xs, ys = [], []
    for p in paths:
        p = Path(p)
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise DataFormatError(p, f"has no array {missing} (arrays: {z.files})")
                x, y = z["x"], z["y"]
        except DataFormatError:
            raise
        except (ValueError, OSError, EOFError, zlib.error, KeyError) as exc:
            raise DataFormatError(p, f"is not a readable .npz archive ({exc})") from exc
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise DataFormatError(p, f"'x' must be uint8 [N, H, W, 3], found {x.dtype.name} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise DataFormatError(p, f"'y' must be {len(x)} integers, found {y.dtype.name} {list(y.shape)}")
        _check_labels(p, y, 10)
        xs.append(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        ys.append(y.astype(np.int64))
    if not xs:
        raise ValueError("read_cifar10_npz: paths is empty, expected at least one .npz file")
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------------------------------------
# image folders (ImageNet layout)
# ----------------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is installed in the project's environment
        raise ImportError("reading image folders needs Pillow: run `python -m pip install pillow`") from exc
    return Image


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode one image to RGB, resize its shorter side to ``size`` and centre-crop ``size x size``.

    Same geometry as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image (the DGM recipe):
    the longer side becomes ``int(size * long / short)``, resampling is Pillow's BILINEAR (which low-pass
    filters when shrinking), and the crop offset is ``round((dim - size) / 2)``. Returns ``uint8 [3, size, size]``.
    """
    Image = _pil()
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w <= h:
                ow, oh = size, int(size * h / w)
            else:
                ow, oh = int(size * w / h), size
            if (ow, oh) != (w, h):
                im = im.resize((ow, oh), Image.BILINEAR)
            top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DataFormatError(path, f"cannot be decoded as an image ({exc})") from exc
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def list_image_folder(root: str | os.PathLike, classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """List ``root/<class>/**/<image>`` for the given class folders, in class order then sorted path order.

    Returns the paths and their labels (the index of the class in ``classes``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(root, "is not a directory")
    paths, labels = [], []
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataFormatError(root, f"lacks the class folder(s) {shown}: expected {root}/<class>/<images> "
                                    f"for each of the {len(classes)} classes")
    for label, cls in enumerate(classes):
        found = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not found:
            raise DataFormatError(root / cls, f"holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64)


def read_image_folder(root: str | os.PathLike, classes: Sequence[str], size: int = 32,
                      workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an ImageNet-style folder: images ``uint8 [N, 3, size, size]``, labels = index into ``classes``.

    Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing); the result does not
    depend on the number of workers.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"read_image_folder: size must be a positive int, got {size!r}")
    paths, labels = list_image_folder(root, classes)
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 64:
        images = [load_image(p, size) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            images = list(pool.map(lambda p: load_image(p, size), paths, chunksize=64))
    return np.stack(images), labels
