// The Python module dgm_kernels._C. Importing it loads this library, whose static initialisers register the
// dgm_kernels ops (csrc/ops.cpp) and their CPU (csrc/cpu) and, when built, CUDA (csrc/cuda) kernels with the
// dispatcher; the functions below only report how the library was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "cpu/simd_math.h"  // DGM_HAS_TARGET_CLONES
#include "mask_math.h"

namespace {

#ifdef DGM_KERNELS_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

// setup.py passes why the CUDA kernels were left out as a number (strings do not survive every build tool's
// quoting); the sentences live here.
#ifndef DGM_KERNELS_CUDA_SKIP
#define DGM_KERNELS_CUDA_SKIP 0
#endif

py::object cuda_skip_reason() {
  switch (DGM_KERNELS_CUDA_SKIP) {
    case 0:
      if (kCudaBuilt) return py::none();
      return py::str("the CUDA kernels were not compiled (reason not recorded by the build)");
    case 1:
      return py::str("the build was asked to skip them (DGM_KERNELS_CUDA=0)");
    case 2:
      return py::str("torch was not a CUDA build at build time");
    case 3:
      return py::str("nvcc was not found at build time (set CUDA_HOME to the CUDA toolkit)");
    case 4:
      return py::str("nvcc's CUDA major version did not match the one torch was built with");
    case 5:
      return py::str("the source tree had no CUDA sources (csrc/cuda/*.cu)");
    default:
      return py::str("the CUDA kernels were not compiled (unknown reason code " +
                     std::to_string(DGM_KERNELS_CUDA_SKIP) + ")");
  }
}

// The GPU architectures the CUDA kernels were compiled for, as setup.py names them (sm_80: a cubin,
// compute_90: PTX). setup.py passes them as comma-separated identifiers, stringified here.
#define DGM_KERNELS_STRINGIFY_ARGS(...) #__VA_ARGS__
#define DGM_KERNELS_STRINGIFY(...) DGM_KERNELS_STRINGIFY_ARGS(__VA_ARGS__)

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
#if defined(DGM_KERNELS_WITH_CUDA) && defined(DGM_KERNELS_CUDA_ARCHS)
  const std::string list = DGM_KERNELS_STRINGIFY(DGM_KERNELS_CUDA_ARCHS);
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string name = list.substr(start, end - start);
    name.erase(0, name.find_first_not_of(' '));
    name.erase(name.find_last_not_of(' ') + 1);
    if (!name.empty()) archs.push_back(name);
    start = end + 1;
  }
#endif
  return archs;
}

std::string cpu_isa() {
#if DGM_HAS_TARGET_CLONES
  // the same order of preference as the ifunc resolver of target_clones
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "default";
#else
  return "baseline (no run-time dispatch)";
#endif
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgm_kernels._C: compiled CPU (and optionally CUDA) kernels of the dgm_kernels ops "
            "(torch.ops.dgm_kernels.*)";
  // The constants the CPU and CUDA kernels were compiled with, so that Python can check that its own copies
  // (dgm_kernels.reference, the Triton kernels) agree (tests/test_constants.py).
  m.attr("HAT_CLAMP") = dgm_kernels::mask_math::kHatClamp;
  m.attr("TINY") = dgm_kernels::mask_math::kTiny;
  m.def("cuda_built", [] { return kCudaBuilt; },
        "True when the library holds the CUDA kernels (compiled with DGM_KERNELS_WITH_CUDA).");
  m.def("cuda_skip_reason", &cuda_skip_reason,
        "Why the CUDA kernels were left out of this build, or None when they are in it.");
  m.def("cuda_archs", [] { return cuda_archs(); },
        "The GPU architectures the CUDA kernels were built for: sm_XY (a cubin for compute capability X.Y), "
        "compute_XY (PTX, JIT-compiled for newer GPUs); empty without CUDA kernels.");
  m.def("openmp_threads", [] { return at::get_num_threads(); },
        "Threads the CPU kernels split their work over (torch's intra-op pool: torch.set_num_threads).");
  m.def("build_info", [] {
        py::dict info;
        info["cuda"] = kCudaBuilt;
        info["cuda_skip_reason"] = cuda_skip_reason();
        info["cuda_archs"] = cuda_archs();
        info["openmp_version"] = openmp_version();
        info["threads"] = at::get_num_threads();
        info["parallel_backend"] = at::get_parallel_info();
        info["cpu_isa"] = cpu_isa();
        info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                                "." + std::to_string(TORCH_VERSION_PATCH);
#if defined(__VERSION__)
        info["compiler"] = std::string(__VERSION__);
#endif
        return info;
      },
      "How this library was built: CUDA kernels (and why not, or the GPU architectures), OpenMP, the CPU instruction set the kernels "
      "run with, the torch version it was compiled against.");
}
