"""The GPU architectures of the CUDA kernels: what the build targets, and whether a GPU can run what was built.

Pure Python, no import of torch or of the rest of dgm_kernels: ``setup.py`` loads this file by path to turn
``TORCH_CUDA_ARCH_LIST`` (or the default list) into nvcc ``-gencode`` flags and into the names it records in
the extension (``dgm_kernels._C.cuda_archs()``); the ``cuda`` backend asks :func:`cuda_arch_reason` whether
the device's compute capability is covered by those names (``backends/compiled.py``).

Names: ``sm_XY`` is a cubin (machine code, SASS) for compute capability X.Y, ``compute_XY`` PTX for it; an
``a`` suffix (``sm_90a``) is architecture-specific, an ``f`` suffix (``sm_100f``) family-specific.

The rules (CUDA C++ Programming Guide, "Binary Compatibility" and "PTX Compatibility"):
- a cubin for X.Y runs on a GPU of capability X.Z with Z >= Y (same major, equal or higher minor): sm_80
  runs on an A10 (8.6), never on a T4 (7.5) nor on an H100 (9.0);
- ``sm_XYa`` runs on X.Y only; ``sm_XYf`` on the family, taken here as X.Z with Z >= Y;
- PTX for X.Y is JIT-compiled by the driver for any GPU of capability >= X.Y (the first launch of each
  kernel then compiles it; the driver caches the result); ``compute_XYa`` / ``compute_XYf`` PTX follow the
  rules of their cubins.
"""
from __future__ import annotations

import re

# The default targets: T4 / RTX 20 (7.5), A100 / A30 (8.0), A10 / A40 / RTX 30 (8.6), L4 / L40 / RTX 40
# (8.9) and H100 / H200 (9.0) as cubins, plus 9.0 PTX that the driver JIT-compiles for newer GPUs
# (B200 10.0, RTX 50 12.0, ...). CUDA 13's nvcc compiles nothing below 7.5 (V100 is 7.0): such a GPU
# needs a torch and an nvcc of CUDA 12 and TORCH_CUDA_ARCH_LIST=7.0.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

# The named architectures of torch.utils.cpp_extension (same expansion), combined names first.
NAMED_ARCHES = (
    ("Kepler+Tesla", "3.7"),
    ("Kepler", "3.5+PTX"),
    ("Maxwell+Tegra", "5.3"),
    ("Maxwell", "5.0;5.2+PTX"),
    ("Pascal", "6.0;6.1+PTX"),
    ("Volta+Tegra", "7.2"),
    ("Volta", "7.0+PTX"),
    ("Turing", "7.5+PTX"),
    ("Ampere+Tegra", "8.7"),
    ("Ampere", "8.0;8.6+PTX"),
    ("Ada", "8.9+PTX"),
    ("Hopper", "9.0+PTX"),
    ("Blackwell+Tegra", "11.0"),
    ("Blackwell", "10.0;10.3;12.0;12.1+PTX"),
    ("Rubin", "10.7+PTX"),
)

_ENTRY = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")
_NAME = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


class ArchListError(ValueError):
    """TORCH_CUDA_ARCH_LIST holds something that is not an architecture."""


def parse_arch_list(value: str | None, native: list[tuple[int, int]] | None = None) -> list[str]:
    """The targets of ``value`` (a ``TORCH_CUDA_ARCH_LIST``; None or empty: :data:`DEFAULT_ARCH_LIST`) as
    names, in order, without duplicates: ``"8.0;9.0+PTX"`` -> ``["sm_80", "sm_90", "compute_90"]``.

    Accepted as torch.utils.cpp_extension does: entries ``X.Y``, ``X.Ya`` or ``X.Yf``, each optionally
    ``+PTX``, separated by ``;`` or spaces; torch's named architectures (``Ampere``, ``Hopper+PTX`` ...);
    ``native``: the capabilities in ``native`` (the GPUs the build machine sees), PTX for the newest.
    """
    value = (value or "").strip() or DEFAULT_ARCH_LIST
    if value == "native":
        if not native:
            raise ArchListError("TORCH_CUDA_ARCH_LIST=native needs a visible GPU; name the architectures instead")
        caps = sorted(set(native))
        value = ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    value = value.replace(" ", ";")
    for named, expansion in NAMED_ARCHES:
        value = value.replace(named, expansion)
    names: list[str] = []
    for entry in value.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise ArchListError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not an architecture: use X.Y, X.Ya or X.Yf, optionally "
                "with +PTX (e.g. '8.0;9.0+PTX'), separated by ';' or spaces"
            )
        major, minor, suffix, ptx = match.groups()
        num = f"{int(major)}{minor}{suffix}"
        wanted = [f"sm_{num}"] + ([f"compute_{num}"] if ptx else [])
        names += [name for name in wanted if name not in names]
    if not names:
        raise ArchListError(f"TORCH_CUDA_ARCH_LIST={value!r} names no architecture")
    return names


def gencode_flags(names: list[str]) -> list[str]:
    """nvcc flags that build ``names``: ``sm_80`` -> ``-gencode=arch=compute_80,code=sm_80``, ``compute_90``
    -> ``-gencode=arch=compute_90,code=compute_90`` (PTX)."""
    flags = []
    for name in names:
        kind, num = name.split("_", 1)
        flags.append(f"-gencode=arch=compute_{num},code={kind}_{num}")
    return flags


def _parse_name(name: str) -> tuple[str, int, int, str]:
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"not a CUDA architecture name: {name!r} (expected sm_XY or compute_XY)")
    kind, major, minor, suffix = match.groups()
    return kind, int(major), int(minor), suffix


def runs_on(name: str, capability: tuple[int, int]) -> bool:
    """Whether the cubin or PTX ``name`` (``sm_80``, ``compute_90`` ...) runs on a GPU of ``capability``."""
    kind, major, minor, suffix = _parse_name(name)
    cap = (int(capability[0]), int(capability[1]))
    if suffix == "a":
        return cap == (major, minor)
    if kind == "sm" or suffix == "f":
        return cap[0] == major and cap[1] >= minor
    return cap >= (major, minor)  # plain PTX: JIT-compiled for any equal or newer GPU


def cuda_arch_reason(capability: tuple[int, int], built: list[str], device_name: str | None = None) -> str | None:
    """None when a GPU of ``capability`` (major, minor) can run kernels built for ``built`` (names as
    :func:`parse_arch_list` returns them), else why not and how to rebuild for it.

    An empty ``built`` means "not recorded" (a library built before the list was recorded): None.
    """
    if not built or any(runs_on(name, capability) for name in built):
        return None
    major, minor = int(capability[0]), int(capability[1])
    gpu = f"{device_name} (compute capability {major}.{minor})" if device_name else f"this GPU (compute capability {major}.{minor})"
    reason = (
        f"{gpu} cannot run the CUDA kernels of dgm_kernels._C, which were built for {', '.join(built)}: a cubin "
        "(sm_XY) runs only on its own major version at an equal or higher minor, PTX (compute_XY) only on an equal "
        f"or newer GPU; rebuild for it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (or add it to the list) "
        "DGM_KERNELS_CUDA=1 pip install --no-build-isolation ."
    )
    if (major, minor) < (7, 5):
        reason += (
            f" (CUDA 13's nvcc cannot compile for capabilities below 7.5: {major}.{minor} needs a torch built with "
            "CUDA 12 and the nvcc of CUDA 12)"
        )
    return reason


__all__ = [
    "DEFAULT_ARCH_LIST",
    "ArchListError",
    "parse_arch_list",
    "gencode_flags",
    "runs_on",
    "cuda_arch_reason",
]
