"""The GPU architectures of the CUDA kernels, tested on the CPU: the parsing of TORCH_CUDA_ARCH_LIST that
setup.py builds with (dgm_kernels/_cuda_archs.py), the decision whether a GPU can run what was built
(cuda_arch_reason) for the GPUs users have, and its use by the ``cuda`` backend and by ``auto``, with the
GPU faked (torch.cuda.is_available, get_device_capability, get_device_name monkeypatched).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from dgm_kernels import _cuda_archs as archs
from dgm_kernels import backends
from dgm_kernels._cuda_archs import cuda_arch_reason, parse_arch_list

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# compute capabilities of the GPUs users have
GPUS = {
    "T4": (7, 5),
    "V100": (7, 0),
    "A100": (8, 0),
    "A10": (8, 6),
    "L4": (8, 9),
    "H100": (9, 0),
    "B200": (10, 0),
    "RTX 5090": (12, 0),
}
DEFAULT = parse_arch_list(None)


# ----------------------------------------------------------------------------------------------------------
# TORCH_CUDA_ARCH_LIST
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, names",
    [
        (None, ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]),
        ("", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]),
        ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
        ("7.5 8.6", ["sm_75", "sm_86"]),
        ("8.0+PTX", ["sm_80", "compute_80"]),
        (" 7.5; 8.0 ;;9.0 ", ["sm_75", "sm_80", "sm_90"]),
        ("8.0;8.0+PTX", ["sm_80", "compute_80"]),
        ("9.0a", ["sm_90a"]),
        ("10.0;12.0+PTX", ["sm_100", "sm_120", "compute_120"]),
        ("Ampere", ["sm_80", "sm_86", "compute_86"]),
        ("Turing;Hopper", ["sm_75", "compute_75", "sm_90", "compute_90"]),
    ],
)
def test_arch_list_forms(value, names):
    assert parse_arch_list(value) == names


def test_native_arch_list_takes_the_visible_gpus():
    assert parse_arch_list("native", native=[(8, 6), (7, 5), (8, 6)]) == ["sm_75", "sm_86", "compute_86"]
    with pytest.raises(archs.ArchListError, match="needs a visible GPU"):
        parse_arch_list("native", native=[])


@pytest.mark.parametrize("value", ["8", "sm_80", "8.0+ptx", "8.10", "Volt", "8.0,9.0"])
def test_bad_arch_lists_are_refused(value):
    with pytest.raises(archs.ArchListError, match="not an architecture"):
        parse_arch_list(value)


def test_gencode_flags():
    assert archs.gencode_flags(parse_arch_list("7.5;9.0a;9.0+PTX")) == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def _setup_functions():
    """setup.py's own _load_cuda_archs and _cuda_targets (running setup.py would build), executed as written."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    wanted = {"_load_cuda_archs", "_cuda_targets"}
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {f.name for f in functions} == wanted
    namespace = {"os": os, "sys": sys, "importlib": importlib, "torch": torch, "ROOT": ROOT, "PREFIX": "[test]"}
    exec(compile(ast.Module(body=functions, type_ignores=[]), "setup.py", "exec"), namespace)
    namespace["cuda_archs"] = namespace["_load_cuda_archs"]()
    return namespace


@pytest.mark.parametrize(
    "value, names",
    [
        (None, DEFAULT),
        ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
        ("7.5 8.6", ["sm_75", "sm_86"]),
        ("8.0+PTX", ["sm_80", "compute_80"]),
    ],
)
def test_setup_py_builds_and_records_the_parsed_list(monkeypatch, value, names):
    setup = _setup_functions()
    if value is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    assert setup["_cuda_targets"]() == names
    assert setup["cuda_archs"].gencode_flags(names) == archs.gencode_flags(names)


def test_setup_py_stops_on_a_bad_arch_list(monkeypatch):
    setup = _setup_functions()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_80")
    with pytest.raises(SystemExit, match="not an architecture"):
        setup["_cuda_targets"]()


def test_the_arch_module_loads_without_torch():
    # setup.py loads it by path before anything is built: it must import nothing of torch or dgm_kernels
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {os.path.join(ROOT, 'dgm_kernels', '_cuda_archs.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m; spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules and 'dgm_kernels' not in sys.modules, sorted(sys.modules)\n"
        "print(m.parse_arch_list(None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(DEFAULT)


# ----------------------------------------------------------------------------------------------------------
# which GPU runs what was built
# ----------------------------------------------------------------------------------------------------------
def _runnable(arch_list):
    built = parse_arch_list(arch_list)
    return {gpu for gpu, cap in GPUS.items() if cuda_arch_reason(cap, built) is None}


def test_default_list_covers_every_gpu_but_volta():
    # B200 and RTX 50 by JIT-compiling the 9.0 PTX; V100 (7.0) is below what CUDA 13 compiles
    assert _runnable(None) == set(GPUS) - {"V100"}
    # and each of T4, A100, A10, L4, H100 has its own cubin (no JIT at the first launch)
    for gpu in ("T4", "A100", "A10", "L4", "H100"):
        major, minor = GPUS[gpu]
        assert f"sm_{major}{minor}" in DEFAULT


@pytest.mark.parametrize(
    "arch_list, runnable",
    [
        # the former default: T4 failed with "no kernel image is available"
        ("8.0;9.0+PTX", {"A100", "A10", "L4", "H100", "B200", "RTX 5090"}),
        # cubins run on their own major at an equal or higher minor only
        ("8.0;9.0", {"A100", "A10", "L4", "H100"}),
        ("8.6", {"A10", "L4"}),
        ("7.5", {"T4"}),
        # PTX runs on every equal or newer GPU
        ("8.0+PTX", {"A100", "A10", "L4", "H100", "B200", "RTX 5090"}),
        ("7.5+PTX", set(GPUS) - {"V100"}),
        ("7.0", {"V100", "T4"}),  # 7.0 cubins run on 7.5 too
        # architecture-specific: its own capability only, PTX included
        ("9.0a", {"H100"}),
        ("9.0a+PTX", {"H100"}),
        ("10.0;12.0", {"B200", "RTX 5090"}),
    ],
)
def test_custom_lists(arch_list, runnable):
    assert _runnable(arch_list) == runnable


def test_the_reason_names_the_gpu_the_list_and_the_fix():
    why = cuda_arch_reason((7, 5), parse_arch_list("8.0;9.0+PTX"), "GPU 0 (Tesla T4)")
    assert "GPU 0 (Tesla T4) (compute capability 7.5)" in why
    assert "sm_80, sm_90, compute_90" in why
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in why and "DGM_KERNELS_CUDA=1" in why
    assert "CUDA 12" not in why
    volta = cuda_arch_reason((7, 0), DEFAULT, "Tesla V100-SXM2-16GB")
    assert "compute capability 7.0" in volta and "CUDA 13's nvcc cannot compile" in volta and "CUDA 12" in volta
    # a library that did not record its list turns no GPU down
    assert cuda_arch_reason((7, 0), []) is None


# ----------------------------------------------------------------------------------------------------------
# the cuda backend and auto, on faked GPUs
# ----------------------------------------------------------------------------------------------------------
try:
    from dgm_kernels.backends import compiled
except ImportError as exc:  # the extension is optional; the tests above need none of it
    compiled, _NOT_BUILT = None, f"dgm_kernels._C is not built ({exc})"
else:
    _NOT_BUILT = ""
needs_compiled = pytest.mark.skipif(compiled is None, reason=_NOT_BUILT)


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus(["H100", "V100"], built=[...]): those GPUs as cuda:0, cuda:1, and a library built with CUDA
    kernels for ``built``. Returns a fresh CompiledBackend("cuda") registered as the ``cuda`` backend."""

    def install(gpus, built=DEFAULT, triton_runs=False):
        caps = [GPUS[g] for g in gpus]
        stub = types.SimpleNamespace(cuda_built=lambda: True, cuda_skip_reason=lambda: None, cuda_archs=lambda: list(built))
        monkeypatch.setattr(compiled, "_C", stub)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[0 if i is None else i])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"NVIDIA {gpus[0 if i is None else i]}")
        backend = compiled.CompiledBackend("cuda")
        monkeypatch.setitem(backends._loaded, "cuda", backend)
        triton = types.SimpleNamespace(unavailable_reason=lambda device=None: None if triton_runs else "no triton (test)")
        monkeypatch.setitem(backends._loaded, "triton", triton)
        return backend

    return install


@needs_compiled
def test_cuda_backend_turns_down_a_gpu_it_was_not_built_for(fake_gpus):
    backend = fake_gpus(["T4"], built=parse_arch_list("8.0;9.0+PTX"))
    why = backend.unavailable_reason(torch.device("cuda:0"))
    assert "GPU 0 (NVIDIA T4) (compute capability 7.5)" in why and "sm_80, sm_90, compute_90" in why
    assert backend.unavailable_reason(torch.device("cuda")) == why  # no index: the current device
    assert backend.unavailable_reason() == why
    assert backends.backend_status()["cuda"] == why
    assert "cuda" not in backends.available_backends()


@needs_compiled
@pytest.mark.parametrize("gpu", sorted(set(GPUS) - {"V100"}))
def test_cuda_backend_runs_on_the_default_targets(fake_gpus, gpu):
    backend = fake_gpus([gpu])
    assert backend.unavailable_reason(torch.device("cuda:0")) is None
    assert backends.auto_backend_for(torch.device("cuda:0")) == "cuda"


@needs_compiled
def test_auto_decides_per_device(fake_gpus):
    fake_gpus(["H100", "V100"])
    assert backends.auto_backend_for(torch.device("cuda:0")) == "cuda"
    assert backends.auto_backend_for(torch.device("cuda:1")) == "reference"
    fake_gpus(["H100", "V100"], triton_runs=True)
    assert backends.auto_backend_for(torch.device("cuda:1")) == "triton"
    # one GPU that runs the kernels is enough for "cuda can run on this machine"
    assert backends.backend_status()["cuda"] is None
    with pytest.raises(backends.BackendUnavailableError, match=r"cuda tensors: GPU 1 \(NVIDIA V100\) \(compute capability 7.0\)"):
        backends.resolve("cuda", torch.device("cuda:1"))
    assert backends.resolve("auto", torch.device("cuda:1")) is backends._loaded["triton"]


@needs_compiled
def test_the_answer_is_kept_per_device(fake_gpus, monkeypatch):
    backend = fake_gpus(["T4"], built=["sm_80"])
    assert backend.unavailable_reason(torch.device("cuda:0")) is not None
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: calls.append(i) or (8, 0))
    assert backend.unavailable_reason(torch.device("cuda:0")) is not None  # cached: resolve asks on every op
    assert calls == []
