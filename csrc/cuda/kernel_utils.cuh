// What the CUDA kernel families (mask_kernels.cu, gate_kernels.cu, unit_kernels.cu, ledger_kernels.cu)
// share: launch sizes, storage <-> compute types, 16-byte packs, flag reads and deterministic reductions.
// Device code only, no torch header.
//
// Design
// - Elementwise kernels are grid-stride loops over 16-byte packs (4 floats, 2 doubles, 8 halves) when
//   every pointer of type T is 16-byte aligned, with a scalar loop for the remainder; a misaligned input
//   (a view with a storage offset) runs entirely through the scalar loop of the same kernel, so each op
//   and dtype has one kernel per mode. The mode is a template parameter: no per-element branch on it.
// - gate_backward is one kernel over a 2-D grid (split of batch * inner, channel). Each block reduces its
//   part of a channel with warp shuffles; when a channel is split over several blocks, the last block to
//   finish (a ticket taken with an atomic counter) sums the per-block partials in a fixed order. That
//   is deterministic (float atomics would make grad_e vary from run to run in its last bits) and needs
//   no second kernel. sparsity_terms uses the same scheme over one dimension. How many blocks a reduction
//   is split over depends on the problem size only (kReductionBlocks), not on the GPU: the same results,
//   bit for bit, on every GPU model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels.cuh"

// The element types every kernel is instantiated for, written once: each .cu file expands its own instantiation
// macro over this list (float and double compute in their own type, the 16-bit types in float).
#define DGM_KERNELS_FOR_EACH_TYPE(INSTANTIATE) \
  INSTANTIATE(float)                           \
  INSTANTIATE(double)                          \
  INSTANTIATE(__half)                          \
  INSTANTIATE(__nv_bfloat16)

namespace dgm_kernels {
namespace cuda_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 2048 resident threads per SM on sm_80 and sm_90 (1536 on sm_86 / sm_89, 1024 on sm_75): an elementwise
// grid-stride loop needs no more blocks than fit (more, on the smaller SMs, only queue). Elementwise results
// do not depend on the grid.
constexpr int64_t kBlocksPerSm = 2048 / kThreads;
// The most blocks a cross-block reduction (gate_backward's grad_e, sparsity_terms) is split over. A constant,
// not the SM count times kBlocksPerSm: how a sum is split fixes its rounding, and with a split that depends
// on the problem size only, the results are bitwise the same on every GPU model, not only run to run on one.
// 4096 is at least the former SM-based count on every GPU of the default targets (H100: 132 SMs x 8 = 1056
// resident blocks, B200: 148 x 8), so no problem gets less parallelism than before; it is 3.5 (B200) to 26
// (T4: 40 x 4) waves of resident blocks, so the last, partial wave is a small part of a large reduction. The
// partials it leaves (4096 per reduction at most) are summed by a whole block. Not measured on a GPU yet
// (docs/performance.md).
constexpr int64_t kReductionBlocks = 4096;
// grid.y is limited to 65535; gate_backward loops over the channels beyond it.
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------------------
// Storage type <-> compute type.

template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename Num<T>::acc;

// ---------------------------------------------------------------------------------------------------
// 16-byte packs.

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* __restrict__ p, int64_t i) {
  return *reinterpret_cast<const Pack<T>*>(p + i);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t i, const Pack<T>& pack) {
  *reinterpret_cast<Pack<T>*>(p + i) = pack;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Number of packs processed by the vector loop: all full packs when every pointer is aligned, none
// otherwise (the scalar loop then does everything).
template <typename T>
int64_t packs_for(int64_t n, bool aligned) {
  return aligned ? n / kVec<T> : 0;
}

inline unsigned grid_for(int64_t work, const LaunchConfig& cfg) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(std::max(cfg.sm_count, 1)) * kBlocksPerSm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Blocks of an elementwise launch over n elements of T of which `packs` packs are vectorised.
template <typename T>
unsigned elementwise_grid(int64_t n, int64_t packs, const LaunchConfig& cfg) {
  // the scalar remainder after the packs has fewer than kVec <= kThreads elements: one block covers it
  return grid_for(packs > 0 ? packs : n, cfg);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Flag of entry i: a bool byte, or bit i % 8 of byte i / 8 (packed). `f.packed` and `f.data` are the same
// for every thread: uniform branches.
__device__ __forceinline__ bool flag_at(const Flags& f, int64_t i) {
  return f.packed ? ((f.data[i >> 3] >> (i & 7)) & 1) != 0 : f.data[i] != 0;
}

// ---------------------------------------------------------------------------------------------------
// Reductions.

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (kThreads threads), valid in thread 0. A fixed tree: deterministic. `scratch` has
// kWarps entries; the caller must __syncthreads() before reusing it.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : V(0);
    v = warp_sum(v);
  }
  return v;
}

// Called by every thread of a block after its thread 0 has written the block's partial result to
// global memory: thread 0 takes a ticket from `counter`; true in every thread of the block that
// finished last, whose reads of the other blocks' partials are then ordered after their writes.
__device__ __forceinline__ bool finished_last(unsigned int* counter, unsigned int blocks, bool* flag) {
  if (threadIdx.x == 0) {
    __threadfence();  // publish this block's partial before taking the ticket
    *flag = atomicAdd(counter, 1u) == blocks - 1;
  }
  __syncthreads();
  const bool last = *flag;
  if (last) __threadfence();  // order the reads of the partials after the tickets of all blocks
  return last;
}

}  // namespace cuda_kernels
}  // namespace dgm_kernels
