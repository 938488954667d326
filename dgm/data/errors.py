"""Exceptions of the data layer.

Every message names the file (or directory) concerned and says what is wrong with it, so that a user can
fix the problem without reading this package's source.
"""
from __future__ import annotations

import os


class DataError(RuntimeError):
    """Base class of every error raised by :mod:`dgm.data`."""


class DataFormatError(DataError, ValueError):
    """A file exists but its content is not what its format promises (bad magic, truncated, wrong keys...)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ChecksumError(DataError):
    """A file's digest matches none of the digests recorded for it."""

    def __init__(self, path: str | os.PathLike, expected: list[tuple[str, str]], actual: dict[str, str],
                 hint: str = ""):
        self.path = os.fspath(path)
        self.expected = list(expected)
        self.actual = dict(actual)
        want = " or ".join(f"{algo} {hexd}" for algo, hexd in self.expected)
        got = ", ".join(f"{algo} {hexd}" for algo, hexd in sorted(self.actual.items()))
        msg = f"{self.path}: checksum mismatch: expected {want}; got {got}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class DatasetNotFoundError(DataError, FileNotFoundError):
    """No usable copy of a dataset's files was found and none could be fetched.

    The message lists where to put which files and what was tried.
    """
