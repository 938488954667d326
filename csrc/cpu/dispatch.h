// Turning run-time switches (mode, compensation, presence of a frozen mask) into template arguments, so that
// the hot loops carry no per-element branch on them and the compiler vectorises each variant.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace dgm_kernels {
namespace cpu {

// Elements per task of at::parallel_for. Smaller tensors run on the calling thread (no fork/join cost):
// the DGM networks' weights are 5k..200k entries, so only the larger ones are split.
constexpr int64_t kGrainTranscendental = 16384;  // loops with exp / division per element
constexpr int64_t kGrainStreaming = 65536;       // loops with a multiply per element

template <typename F>
void with_mode(int64_t mode, F&& f) {
  if (mode == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace cpu
}  // namespace dgm_kernels
