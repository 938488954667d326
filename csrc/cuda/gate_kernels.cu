// CUDA kernels of the gate ops: gate_forward, gate_backward (one kernel, deterministic reduction).
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

// y_pre viewed as [batch, channels, inner]: the channel of flat index i is (i / inner) % channels.
// Each pack computes it once (two divisions) and walks it forward per element (device_math.cuh).
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const T* __restrict__ y_pre, const T* __restrict__ scores, T* __restrict__ y, int64_t n,
                        int64_t packs, int64_t channels, int64_t inner, acc_t<T> s, bool small) {
  using N = Num<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const int64_t i0 = p * V;
    Pos3 pos = decompose(i0, channels, inner, small);
    const Pack<T> x = load_pack(y_pre, i0);
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = N::store(flush_tiny(N::load(x.v[k]) * mask_value<Mode>(N::load(scores[pos.col]), s)));
      advance(pos, channels, inner);
    }
    store_pack(y, i0, o);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    const int64_t c = decompose(i, channels, inner, small).col;
    y[i] = N::store(flush_tiny(N::load(y_pre[i]) * mask_value<Mode>(N::load(scores[c]), s)));
  }
}

// ---------------------------------------------------------------------------------------------------
// gate_backward: grid (splits, min(channels, 65535)); block (x, y) handles the flat range
// [x * chunk, min((x + 1) * chunk, batch * inner)) of channel y (and of y + gridDim.y, ...). Position p of
// a channel's range is (n, j) = (p / inner, p % inner), at offset (n * channels + c) * inner + j: each
// thread computes (n, j) once and then steps it by kThreads without dividing. Consecutive threads read
// consecutive addresses when inner >= 32 (conv feature maps); for [N, C] inputs (inner == 1) the
// reads stride by C, which the DGM layer sizes keep small.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ y_pre, const T* __restrict__ scores,
                         T* __restrict__ grad_y_pre, T* __restrict__ grad_scores, int64_t channels, int64_t inner,
                         int64_t length, int64_t chunk, acc_t<T> s, acc_t<T> s_max, bool compensate,
                         acc_t<T>* __restrict__ partials, unsigned int* __restrict__ counters) {
  using N = Num<T>;
  using A = acc_t<T>;
  __shared__ A scratch[kWarps];
  __shared__ bool last_flag;
  const unsigned int splits = gridDim.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < length ? begin + chunk : length;
  // the step of (n, j) when p grows by kThreads; dj < inner, so one carry suffices
  const int64_t dn = kThreads / inner;
  const int64_t dj = kThreads - dn * inner;

  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const A e = N::load(scores[c]);
    const A m = mask_value<Mode>(e, s);
    A acc = A(0);
    int64_t p = begin + threadIdx.x;
    if (p < end) {
      int64_t n = p / inner;
      int64_t j = p - n * inner;
      for (; p < end; p += kThreads) {
        const int64_t off = (n * channels + c) * inner + j;
        const A g = N::load(grad_y[off]);
        acc += g * N::load(y_pre[off]);
        grad_y_pre[off] = N::store(flush_tiny(g * m));
        n += dn;
        j += dj;
        if (j >= inner) {
          j -= inner;
          ++n;
        }
      }
    }
    const A block_total = block_sum(acc, scratch);  // valid in thread 0
    if (splits == 1) {
      if (threadIdx.x == 0) grad_scores[c] = N::store(flush_tiny(mask_derivative(e, s, s_max, compensate) * block_total));
    } else {
      if (threadIdx.x == 0) partials[c * splits + blockIdx.x] = block_total;
      if (finished_last(&counters[c], splits, &last_flag)) {  // uniform over the block
        // the partials in a fixed order: thread t sums t, t + kThreads, ..., then the fixed tree of block_sum
        // (scratch is free again: finished_last synchronised the block after block_sum's last read of it)
        A total = A(0);
        for (unsigned int k = threadIdx.x; k < splits; k += kThreads) total += __ldcg(&partials[c * splits + k]);
        total = block_sum(total, scratch);
        if (threadIdx.x == 0) grad_scores[c] = N::store(flush_tiny(mask_derivative(e, s, s_max, compensate) * total));
      }
    }
    __syncthreads();  // scratch and last_flag are reused for the next channel
  }
}

size_t align_up(size_t bytes, size_t alignment) { return (bytes + alignment - 1) / alignment * alignment; }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Launchers.

template <typename T>
void gate_forward(const T* y_pre, const T* scores, T* y, int64_t batch, int64_t channels, int64_t inner, double s,
                  int mode, const LaunchConfig& cfg) {
  const int64_t n = batch * channels * inner;
  if (n <= 0) return;
  const int64_t packs = packs_for<T>(n, aligned16(y_pre) && aligned16(y));
  const unsigned blocks = elementwise_grid<T>(n, packs, cfg);
  const bool small = n <= static_cast<int64_t>(UINT32_MAX);
  if (mode == kSte) {
    gate_forward_kernel<T, kSte><<<blocks, kThreads, 0, cfg.stream>>>(y_pre, scores, y, n, packs, channels, inner,
                                                                      acc_t<T>(s), small);
  } else {
    gate_forward_kernel<T, kAnneal><<<blocks, kThreads, 0, cfg.stream>>>(y_pre, scores, y, n, packs, channels,
                                                                         inner, acc_t<T>(s), small);
  }
}

template <typename T>
GateBackwardPlan gate_backward_plan(int64_t batch, int64_t channels, int64_t inner, const LaunchConfig& /*cfg*/) {
  const int64_t length = batch * inner;  // elements reduced per channel
  if (channels <= 0) return GateBackwardPlan{1, 0};
  // About kReductionBlocks blocks in all, but at least ~8 elements per thread in each block: below that the
  // cross-block combination costs more than it saves. Both bounds depend on the problem size only, never on
  // the device (cfg.sm_count is not used): the split, hence the rounding of grad_e, is the same on every GPU
  // model (kernel_utils.cuh, kReductionBlocks).
  const int64_t wanted = (kReductionBlocks + channels - 1) / channels;
  const int64_t useful = std::max<int64_t>(1, (length + kThreads * 8 - 1) / (kThreads * 8));
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, useful));
  if (splits == 1) return GateBackwardPlan{1, 0};
  const size_t partial_bytes = align_up(static_cast<size_t>(channels * splits) * sizeof(acc_t<T>), 16);
  return GateBackwardPlan{splits, partial_bytes + static_cast<size_t>(channels) * sizeof(unsigned int)};
}

template <typename T>
cudaError_t gate_backward(const T* grad_y, const T* y_pre, const T* scores, T* grad_y_pre, T* grad_scores,
                          int64_t batch, int64_t channels, int64_t inner, double s, double s_max, int mode,
                          const GateBackwardPlan& plan, void* workspace, const LaunchConfig& cfg) {
  if (channels <= 0) return cudaSuccess;
  const int64_t length = batch * inner;  // 0 when there is no element: the loops then run zero times
  // inner == 0 only without elements; 1 keeps the kernel's division by it defined
  if (inner <= 0) inner = 1;
  const int64_t splits = plan.splits;
  const int64_t chunk = (length + splits - 1) / splits;
  acc_t<T>* partials = nullptr;
  unsigned int* counters = nullptr;
  if (splits > 1) {
    partials = static_cast<acc_t<T>*>(workspace);
    counters = reinterpret_cast<unsigned int*>(
        static_cast<char*>(workspace) + align_up(static_cast<size_t>(channels * splits) * sizeof(acc_t<T>), 16));
    const cudaError_t err = cudaMemsetAsync(counters, 0, static_cast<size_t>(channels) * sizeof(unsigned int), cfg.stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(std::min(channels, kMaxGridY)));
  const acc_t<T> s_a(s), s_max_a(s_max);
  if (mode == kSte) {
    gate_backward_kernel<T, kSte><<<grid, kThreads, 0, cfg.stream>>>(grad_y, y_pre, scores, grad_y_pre, grad_scores,
                                                                     channels, inner, length, chunk, s_a, s_max_a,
                                                                     s_max > 0, partials, counters);
  } else {
    gate_backward_kernel<T, kAnneal><<<grid, kThreads, 0, cfg.stream>>>(grad_y, y_pre, scores, grad_y_pre,
                                                                        grad_scores, channels, inner, length, chunk,
                                                                        s_a, s_max_a, s_max > 0, partials, counters);
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Explicit instantiations for the four storage types.

#define DGM_KERNELS_INSTANTIATE(T) \
  template void gate_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, double, int,                  \
                                const LaunchConfig&);                                                             \
  template GateBackwardPlan gate_backward_plan<T>(int64_t, int64_t, int64_t, const LaunchConfig&);               \
  template cudaError_t gate_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, double, \
                                        double, int, const GateBackwardPlan&, void*, const LaunchConfig&);

DGM_KERNELS_FOR_EACH_TYPE(DGM_KERNELS_INSTANTIATE)

#undef DGM_KERNELS_INSTANTIATE

}  // namespace cuda_kernels
}  // namespace dgm_kernels
