// What the torch wrappers of the CUDA kernels (the *_ops.cpp files of this folder) share: the pointers the
// launchers of kernels.cuh take, the launch configuration of the current device and stream, and the dtype
// dispatch. Compiled by the host compiler.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

// Not ATen/cuda/CUDAContext.h: it pulls in the cuBLAS and cuSPARSE headers, which a CUDA toolkit
// installed without those libraries lacks; the c10 headers above are all these wrappers need.

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "kernels.cuh"

namespace dgm_kernels {
namespace cuda_glue {

namespace ck = cuda_kernels;

// c10's 16-bit types and CUDA's share their bit layout: the launchers take CUDA's.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(c10::Half) == sizeof(__half) && alignof(c10::Half) == alignof(__half), "Half layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16) && alignof(c10::BFloat16) == alignof(__nv_bfloat16),
              "BFloat16 layout");

template <typename scalar_t>
const typename DeviceType<scalar_t>::type* in_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename DeviceType<scalar_t>::type* out_ptr(at::Tensor& t) {
  return reinterpret_cast<typename DeviceType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

inline const bool* bool_ptr(const std::optional<at::Tensor>& t) {
  return checks::has_tensor(t) ? t->const_data_ptr<bool>() : nullptr;
}

// Streaming multiprocessors of `device`, queried once per device (the launch configurations need it on
// every call). Racing first calls store the same value.
inline int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};  // zero: not queried yet
  const bool cacheable = device >= 0 && static_cast<size_t>(device) < cache.size();
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (cacheable) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Must run after the device guard: the stream is the current one of the current device.
inline ck::LaunchConfig launch_config() {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  return ck::LaunchConfig{stream.stream(), sm_count(stream.device_index())};
}

// The launchers' view of a contiguous flag tensor (absent: data null).
inline ck::Flags flags_of(const std::optional<at::Tensor>& t) {
  if (!checks::has_tensor(t)) return ck::Flags{nullptr, false};
  if (t->scalar_type() == at::kByte) return ck::Flags{t->const_data_ptr<uint8_t>(), true};
  return ck::Flags{reinterpret_cast<const uint8_t*>(t->const_data_ptr<bool>()), false};
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!checks::has_tensor(t)) return std::nullopt;
  return t->contiguous();
}

#define DGM_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda_glue
}  // namespace dgm_kernels
