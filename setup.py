"""Build of dgm_kernels._C, the compiled kernels of dgm_kernels (metadata: pyproject.toml).

Always: the C++ CPU kernels (csrc/ops.cpp, csrc/module.cpp, csrc/cpu/*.cpp; -O3, OpenMP).
With CUDA: the CUDA kernels (csrc/cuda/*.cu, csrc/cuda/*.cpp) when torch is a CUDA build and nvcc is found.
No GPU is needed to build them.

Environment:
  DGM_KERNELS_CUDA=auto (default) | 0 | 1
      auto: build the CUDA kernels when possible, else say why not and build the CPU kernels only;
      0: never; 1: always, and fail with the reason when it is not possible.
  CUDA_HOME                 the CUDA toolkit (default: found from nvcc on PATH, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST      overrides the default GPU targets "7.5;8.0;8.6;8.9;9.0+PTX" (cubins for T4, A100,
                            A10/RTX 30, L4/RTX 40, H100, plus 9.0 PTX for newer GPUs); torch's syntax:
                            "8.0;9.0+PTX", "7.5 8.6", "Ampere", "native" (dgm_kernels/_cuda_archs.py)
  MAX_JOBS                  parallel compile jobs (ninja)

torch must be installed first, and the build must see it:
  pip install --no-build-isolation .        (or -e . for an editable install)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        "dgm: building dgm_kernels._C needs PyTorch, which could not be imported "
        f"({type(exc).__name__}: {exc}).\n"
        "Install torch first (https://pytorch.org/get-started/locally/), then build against it without "
        "build isolation:\n    pip install --no-build-isolation .\n"
        "(pip's default isolated build environment would not see the torch you installed.)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "dgm_kernels._C"
PREFIX = "[dgm_kernels._C]"

# Why the CUDA kernels are left out; the codes are turned back into sentences by csrc/module.cpp.
SKIP_FORCED_OFF, SKIP_TORCH_CPU, SKIP_NO_NVCC, SKIP_VERSION_MISMATCH, SKIP_NO_SOURCES = 1, 2, 3, 4, 5


def _load_cuda_archs():
    # dgm_kernels/_cuda_archs.py by path: importing the package dgm_kernels would load the library being built.
    path = os.path.join(ROOT, "dgm_kernels", "_cuda_archs.py")
    spec = importlib.util.spec_from_file_location("_dgm_kernels_cuda_archs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The GPU targets: TORCH_CUDA_ARCH_LIST parsed as torch does, default cuda_archs.DEFAULT_ARCH_LIST.
cuda_archs = _load_cuda_archs()


def _cuda_targets() -> list[str]:
    """The architectures to build, as names (sm_80, compute_90): TORCH_CUDA_ARCH_LIST or the default."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    native = None
    if value is not None and value.strip() == "native" and torch.cuda.is_available():
        native = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        return cuda_archs.parse_arch_list(value, native=native)
    except cuda_archs.ArchListError as exc:
        sys.exit(f"{PREFIX} {exc}")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _say(message: str) -> None:
    # pip hides a build's stdout unless -v; stderr of a failing build is always shown
    print(f"{PREFIX} {message}", flush=True)


def _cuda_mode() -> str:
    value = os.environ.get("DGM_KERNELS_CUDA", "auto").strip().lower() or "auto"
    aliases = {"auto": "auto", "0": "0", "off": "0", "false": "0", "no": "0", "1": "1", "on": "1", "true": "1", "yes": "1"}
    if value not in aliases:
        sys.exit(f"{PREFIX} DGM_KERNELS_CUDA must be auto, 0 or 1, got {value!r}")
    return aliases[value]


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _cuda_decision(cuda_sources):
    """(build_cuda, skip_code, message) for the environment we are building in."""
    mode = _cuda_mode()
    torch_desc = f"torch {torch.__version__}"
    if mode == "0":
        return False, SKIP_FORCED_OFF, "building CPU kernels only: DGM_KERNELS_CUDA=0"
    problem = None
    code = 0
    if not cuda_sources:
        problem, code = "csrc/cuda/ has no CUDA sources (*.cu)", SKIP_NO_SOURCES
    elif torch.version.cuda is None:
        problem, code = f"{torch_desc} is not a CUDA build", SKIP_TORCH_CPU
    else:
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
        if nvcc is None or not os.path.exists(nvcc):
            where = f"CUDA_HOME={cuda_home}" if cuda_home else "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda"
            problem, code = f"nvcc was not found ({where}); set CUDA_HOME to the CUDA toolkit", SKIP_NO_NVCC
        else:
            nvcc_version = _nvcc_version(nvcc)
            torch_major = torch.version.cuda.split(".")[0]
            if nvcc_version is not None and nvcc_version.split(".")[0] != torch_major:
                problem, code = (
                    f"nvcc {nvcc_version} ({nvcc}) does not match the CUDA {torch.version.cuda} that {torch_desc} "
                    "was built with (the major versions must agree)",
                    SKIP_VERSION_MISMATCH,
                )
            else:
                return True, 0, (
                    f"building CPU + CUDA kernels: {torch_desc} (CUDA {torch.version.cuda}), "
                    f"nvcc {nvcc_version or '(version unknown)'} at {nvcc}"
                )
    if mode == "1":
        sys.exit(f"{PREFIX} DGM_KERNELS_CUDA=1 asks for the CUDA kernels, but {problem}.")
    return False, code, f"building CPU kernels only: {problem}"


def _extensions():
    cpu_sources = _rel(
        [os.path.join(ROOT, "csrc", "ops.cpp"), os.path.join(ROOT, "csrc", "module.cpp")]
        + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_cpp_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    build_cuda, skip_code, message = _cuda_decision(cuda_sources)
    _say(message)
    jobs = os.environ.get("MAX_JOBS")
    _say(f"compile jobs: {'MAX_JOBS=' + jobs if jobs else 'ninja default (set MAX_JOBS to limit)'}")

    cxx_flags = [
        "-O3",
        "-fopenmp",  # at::parallel_for is OpenMP-based in torch's builds: without it the kernels run serially
        # lets the compiler if-convert (hence vectorise) branch-free selects; changes no result
        "-fno-trapping-math",
        "-fno-math-errno",
        "-Wall",
        "-Wno-unknown-pragmas",
    ]
    define_macros = []
    if build_cuda:
        define_macros.append(("DGM_KERNELS_WITH_CUDA", None))
    else:
        define_macros.append(("DGM_KERNELS_CUDA_SKIP", str(skip_code)))
    extra_link_args = ["-fopenmp"]

    if build_cuda:
        targets = _cuda_targets()
        source = "TORCH_CUDA_ARCH_LIST=" + os.environ["TORCH_CUDA_ARCH_LIST"] if os.environ.get("TORCH_CUDA_ARCH_LIST") else "default"
        _say(f"CUDA targets ({source}): {', '.join(targets)}; recorded in dgm_kernels._C.cuda_archs()")
        # Always our own -gencode flags, so that what is built is exactly what is recorded: an explicit -gencode
        # stops torch from adding arch flags of its own.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-fno-trapping-math"]
        nvcc_flags += cuda_archs.gencode_flags(targets)
        # For csrc/module.cpp only (a C++ file: nvcc would split a -D value at its commas), as identifiers that
        # it stringifies (a quoted string does not survive every build tool's quoting).
        cxx_flags = cxx_flags + ["-DDGM_KERNELS_CUDA_ARCHS=" + ",".join(targets)]
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            cpu_sources + cuda_cpp_sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            EXT_NAME,
            cpu_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    return [ext]


def _torchvision_requirement() -> str:
    """The torchvision release built for the installed torch (2.x pairs with 0.(x + 15): 2.14 with 0.29), so that
    installing the avalanche extra never replaces torch."""
    match = re.match(r"2\.(\d+)", torch.__version__)
    return f"torchvision==0.{int(match.group(1)) + 15}.*" if match else "torchvision"


EXTRAS = {
    "triton": ["triton"],  # the `triton` backend; CUDA builds of torch on Linux usually ship it already
    "test": ["pytest", "pytest-benchmark", "pytest-xdist"],  # xdist: scripts/test.sh runs the suite on 2 workers
    # dgm.avalanche and `dgm compare`: Avalanche's strategies and benchmarks
    "avalanche": ["avalanche-lib==0.6.0", _torchvision_requirement()],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    extras_require=EXTRAS,
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
