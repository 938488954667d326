// CUDA kernels of the per-unit ops: block_unit_grad, sparsity_terms.
// Plain CUDA, no torch header (the launchers' interface: kernels.cuh; the torch wrappers that call them:
// the *_ops.cpp files of this folder). dgm_kernels/reference.py is the spec of every function.
#include "device_math.cuh"
#include "kernel_utils.cuh"
#include "kernels.cuh"

#include <algorithm>
#include <cstdint>

namespace dgm_kernels {
namespace cuda_kernels {
namespace {

// grad_weight [rows, cols, inner] with zeros where both units are frozen (reference.unit_block_pattern).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_unit_grad_kernel(const T* __restrict__ grad, Flags frozen_out, Flags frozen_in, T* __restrict__ out, int64_t n, int64_t packs,
                           int64_t cols, int64_t inner, int64_t rows_per_group, bool transposed, bool small) {
  constexpr int V = kVec<T>;
  const T zero = Num<T>::store(acc_t<T>(0));
  // Whether the entry linking row r and column j is frozen. The row is a unit of this side (output
  // unit, or input unit when transposed); the column is global channel (r / rows_per_group) * cols + j
  // of the other side.
  auto blocked = [&](const Pos3& pos) {
    const int64_t other = div_index(pos.row, rows_per_group, small) * cols + pos.col;
    const int64_t out_unit = transposed ? other : pos.row;
    const int64_t in_unit = transposed ? pos.row : other;
    return flag_at(frozen_out, out_unit) && (frozen_in.data == nullptr || flag_at(frozen_in, in_unit));
  };
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const int64_t i0 = p * V;
    Pos3 pos = decompose(i0, cols, inner, small);
    const Pack<T> g = load_pack(grad, i0);
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = blocked(pos) ? zero : g.v[k];
      advance(pos, cols, inner);
    }
    store_pack(out, i0, o);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    out[i] = blocked(decompose(i, cols, inner, small)) ? zero : grad[i];
  }
}

// ---------------------------------------------------------------------------------------------------
// sparsity_terms: grid-stride partial sums per block (double and uint64), combined by the last block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sparsity_terms_kernel(const T* __restrict__ mask, const bool* __restrict__ reserved, T* __restrict__ out,
                          int64_t n, int64_t packs, double* __restrict__ partial_sums,
                          unsigned long long* __restrict__ partial_counts, unsigned int* __restrict__ counter) {
  using N = Num<T>;
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ double sum_scratch[kWarps];
  __shared__ unsigned long long count_scratch[kWarps];
  __shared__ bool last_flag;
  double sum = 0.0;
  unsigned long long count = 0;
  const int64_t stride = grid_threads();
  // a reserved entry contributes exactly nothing (a select, as the reference's torch.where: even NaN)
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const Pack<T> m = load_pack(mask, p * V);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const bool is_free = reserved == nullptr || !reserved[p * V + k];
      sum += is_free ? static_cast<double>(N::load(m.v[k])) : 0.0;
      count += is_free;
    }
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    const bool is_free = reserved == nullptr || !reserved[i];
    sum += is_free ? static_cast<double>(N::load(mask[i])) : 0.0;
    count += is_free;
  }
  sum = block_sum(sum, sum_scratch);
  count = block_sum(count, count_scratch);
  auto write = [&](double total, unsigned long long free_count) {
    out[0] = N::store(static_cast<A>(total));
    out[1] = N::store(static_cast<A>(free_count));
  };
  if (gridDim.x == 1) {
    if (threadIdx.x == 0) write(sum, count);
    return;
  }
  if (threadIdx.x == 0) {
    partial_sums[blockIdx.x] = sum;
    partial_counts[blockIdx.x] = count;
  }
  if (finished_last(counter, gridDim.x, &last_flag)) {  // uniform over the block
    // the partials in a fixed order: thread t sums t, t + kThreads, ..., then the fixed tree of block_sum
    // (the scratch arrays are free again: finished_last synchronised the block after their last read)
    double total = 0.0;
    unsigned long long free_count = 0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreads) {
      total += __ldcg(&partial_sums[b]);
      free_count += __ldcg(&partial_counts[b]);
    }
    total = block_sum(total, sum_scratch);
    free_count = block_sum(free_count, count_scratch);
    if (threadIdx.x == 0) write(total, free_count);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Launchers.

template <typename T>
void block_unit_grad(const T* grad_weight, Flags frozen_out, Flags frozen_in, T* out, int64_t rows,
                     int64_t cols, int64_t inner, bool transposed, int64_t groups, const LaunchConfig& cfg) {
  const int64_t n = rows * cols * inner;
  if (n <= 0) return;
  const int64_t packs = packs_for<T>(n, aligned16(grad_weight) && aligned16(out));
  const bool small = n <= static_cast<int64_t>(UINT32_MAX);
  block_unit_grad_kernel<T><<<elementwise_grid<T>(n, packs, cfg), kThreads, 0, cfg.stream>>>(
      grad_weight, frozen_out, frozen_in, out, n, packs, cols, inner, rows / groups, transposed, small);
}

SparsityTermsPlan sparsity_terms_plan(int64_t n, size_t element_size, const LaunchConfig& /*cfg*/) {
  const int64_t vec = static_cast<int64_t>(16 / element_size);
  // at least ~16 packs per thread before a second block is worth its partial, and at most kReductionBlocks
  // blocks: the grid (which elements each thread sums, hence the rounding) depends on n only, never on the
  // device's SM count, so the sum is the same on every GPU model (kernel_utils.cuh, kReductionBlocks)
  const int64_t useful = std::max<int64_t>(1, (n / vec + kThreads * 16 - 1) / (kThreads * 16));
  const int64_t blocks = std::min<int64_t>(useful, kReductionBlocks);
  if (blocks <= 1) return SparsityTermsPlan{1, 0};
  return SparsityTermsPlan{blocks, static_cast<size_t>(blocks) * (sizeof(double) + sizeof(unsigned long long)) +
                                       sizeof(unsigned int)};
}

template <typename T>
cudaError_t sparsity_terms(const T* mask, const bool* reserved, T* out, int64_t n, const SparsityTermsPlan& plan,
                           void* workspace, const LaunchConfig& cfg) {
  if (n <= 0) return cudaSuccess;
  const int64_t packs = packs_for<T>(n, aligned16(mask));
  double* partial_sums = nullptr;
  unsigned long long* partial_counts = nullptr;
  unsigned int* counter = nullptr;
  if (plan.blocks > 1) {
    // doubles and uint64 first (8-byte aligned from the allocation), the 4-byte counter last
    partial_sums = static_cast<double*>(workspace);
    partial_counts = reinterpret_cast<unsigned long long*>(partial_sums + plan.blocks);
    counter = reinterpret_cast<unsigned int*>(partial_counts + plan.blocks);
    const cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(unsigned int), cfg.stream);
    if (err != cudaSuccess) return err;
  }
  sparsity_terms_kernel<T><<<static_cast<unsigned>(plan.blocks), kThreads, 0, cfg.stream>>>(
      mask, reserved, out, n, packs, partial_sums, partial_counts, counter);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Explicit instantiations for the four storage types.

#define DGM_KERNELS_INSTANTIATE(T) \
  template void block_unit_grad<T>(const T*, Flags, Flags, T*, int64_t, int64_t, int64_t, bool,                 \
                                   int64_t, const LaunchConfig&);                                                 \
  template cudaError_t sparsity_terms<T>(const T*, const bool*, T*, int64_t, const SparsityTermsPlan&, void*,    \
                                         const LaunchConfig&);

DGM_KERNELS_FOR_EACH_TYPE(DGM_KERNELS_INSTANTIATE)

#undef DGM_KERNELS_INSTANTIATE

}  // namespace cuda_kernels
}  // namespace dgm_kernels
