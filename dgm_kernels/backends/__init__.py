"""Backends of dgm_kernels and the registry that maps a backend name to its implementation.

The contract every backend fulfils is :class:`dgm_kernels.backends.contract.Backend`; the reference backend
(``reference.py`` beside this file) is its complete implementation and the spec of the others.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton", "auto")
ENV_VAR = "DGM_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for where it cannot run; the message says why."""


_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        if name == "reference":
            from .reference import ReferenceBackend

            backend = ReferenceBackend()
        elif name in ("cpu", "cuda"):
            from .compiled import CompiledBackend

            backend = CompiledBackend(name)
        elif name == "triton":
            from .triton_backend import TritonBackend

            backend = TritonBackend()
        else:  # pragma: no cover - guarded by _check_name
            raise KeyError(name)
    except Exception as exc:  # a missing build or library must never break the import of dgm_kernels
        _load_errors[name] = f"the {name!r} backend could not be loaded: {type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def load_backend(name: str):
    """The backend object registered as ``name`` (not ``auto``), whether or not it can run on this machine."""
    _check_name(name)
    if name == "auto":
        raise ValueError("backend must be a concrete backend here, got 'auto' (it picks one per device)")
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(_load_errors[name])
    return backend


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    return name


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (any device of this machine when None), or None."""
    _check_name(name)
    if name == "auto":
        return None
    backend = _load(name)
    if backend is None:
        return _load_errors[name]
    return backend.unavailable_reason(device)


def backend_status() -> dict[str, str | None]:
    """Every concrete backend mapped to None (it can run here) or the reason it cannot."""
    return {name: unavailable_reason(name) for name in BACKEND_NAMES if name != "auto"}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (``auto`` is always among them)."""
    return [name for name, why in backend_status().items() if why is None] + ["auto"]


def _initial_default() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if value not in BACKEND_NAMES:
        raise ValueError(
            f"environment variable {ENV_VAR} must be one of {', '.join(BACKEND_NAMES)}, got {value!r}"
        )
    return value


_default = _initial_default()
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("dgm_kernels_backend", default=None)


def get_backend() -> str:
    """The name of the backend that ops use when called with ``backend=None``."""
    return _current.get() or _default


def _require_runnable(name: str) -> None:
    why = unavailable_reason(name)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {why}")


def set_backend(name: str) -> None:
    """Make ``name`` the default backend of this process."""
    global _default
    _check_name(name)
    _require_runnable(name)
    _default = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` for the ops called inside the ``with`` block (context-local)."""
    _check_name(name)
    _require_runnable(name)
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


def auto_backend_for(device: torch.device) -> str:
    """The backend ``auto`` picks for tensors on ``device``: the fastest that can run there."""
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if unavailable_reason(name, device) is None:
            return name
    return "reference"


def resolve(name: str | None, device: torch.device):
    """The backend object to run on tensors of ``device`` for the requested name (None: current default)."""
    name = get_backend() if name is None else _check_name(name)
    if name == "auto":
        name = auto_backend_for(device)
    why = unavailable_reason(name, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device.type} tensors: {why}")
    return _loaded[name]
