// CUDA kernels of dgm_kernels._C and their host launchers (declared in kernels.cuh). Plain CUDA: no
// torch header, so nvcc compiles this file in seconds. The scalar math lives in device_math.cuh;
// dgm_kernels/reference.py is the spec of every function.
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
//   no second kernel. sparsity_terms uses the same scheme over one dimension.
#include "device_math.cuh"
#include "kernels.cuh"

#include <algorithm>
#include <cstdint>

namespace dgm_kernels {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 2048 resident threads per SM on sm_80 and sm_90: a grid-stride loop needs no more blocks than fit.
constexpr int64_t kBlocksPerSm = 2048 / kThreads;
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

// ---------------------------------------------------------------------------------------------------
// Elementwise kernels.

template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    mask_forward_kernel(const T* __restrict__ scores, T* __restrict__ mask, int64_t n, int64_t packs,
                        acc_t<T> s) {
  using N = Num<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const Pack<T> e = load_pack(scores, p * V);
    Pack<T> m;
#pragma unroll
    for (int k = 0; k < V; ++k) m.v[k] = N::store(flush_tiny(mask_value<Mode>(N::load(e.v[k]), s)));
    store_pack(mask, p * V, m);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    mask[i] = N::store(flush_tiny(mask_value<Mode>(N::load(scores[i]), s)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mask_backward_kernel(const T* __restrict__ grad_m, const T* __restrict__ scores, T* __restrict__ grad_e,
                         int64_t n, int64_t packs, acc_t<T> s, acc_t<T> s_max, bool compensate) {
  using N = Num<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const Pack<T> g = load_pack(grad_m, p * V);
    const Pack<T> e = load_pack(scores, p * V);
    Pack<T> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out.v[k] = N::store(flush_tiny(N::load(g.v[k]) * mask_derivative(N::load(e.v[k]), s, s_max, compensate)));
    }
    store_pack(grad_e, p * V, out);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    grad_e[i] = N::store(flush_tiny(N::load(grad_m[i]) * mask_derivative(N::load(scores[i]), s, s_max, compensate)));
  }
}

template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    masked_weight_forward_kernel(const T* __restrict__ weight, const T* __restrict__ scores, T* __restrict__ out,
                                 int64_t n, int64_t packs, acc_t<T> s) {
  using N = Num<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const Pack<T> w = load_pack(weight, p * V);
    const Pack<T> e = load_pack(scores, p * V);
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = N::store(flush_tiny(N::load(w.v[k]) * mask_value<Mode>(N::load(e.v[k]), s)));
    store_pack(out, p * V, o);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    out[i] = N::store(flush_tiny(N::load(weight[i]) * mask_value<Mode>(N::load(scores[i]), s)));
  }
}

// grad_W and grad_e of one entry. A frozen weight enters the reference as a constant: exactly zero
// gradient, whatever grad and m are (even NaN).
template <int Mode, typename A>
__device__ __forceinline__ void masked_weight_grads(A g, A w, A e, bool frozen, A s, A s_max, bool compensate,
                                                    A& grad_w, A& grad_e) {
  grad_w = frozen ? A(0) : flush_tiny(g * mask_value<Mode>(e, s));
  grad_e = flush_tiny(g * w * mask_derivative(e, s, s_max, compensate));
}

template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    masked_weight_backward_kernel(const T* __restrict__ grad, const T* __restrict__ weight,
                                  const T* __restrict__ scores, Flags frozen,
                                  T* __restrict__ grad_weight, T* __restrict__ grad_scores, int64_t n,
                                  int64_t packs, acc_t<T> s, acc_t<T> s_max, bool compensate) {
  using N = Num<T>;
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = grid_threads();
  for (int64_t p = global_thread(); p < packs; p += stride) {
    const int64_t i0 = p * V;
    const Pack<T> g = load_pack(grad, i0);
    const Pack<T> w = load_pack(weight, i0);
    const Pack<T> e = load_pack(scores, i0);
    Pack<T> gw, ge;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A a, b;
      // `frozen` is the same for all threads: a uniform branch, not a divergent one
      const bool fz = frozen.data != nullptr && flag_at(frozen, i0 + k);
      masked_weight_grads<Mode>(N::load(g.v[k]), N::load(w.v[k]), N::load(e.v[k]), fz, s, s_max, compensate, a, b);
      gw.v[k] = N::store(a);
      ge.v[k] = N::store(b);
    }
    store_pack(grad_weight, i0, gw);
    store_pack(grad_scores, i0, ge);
  }
  for (int64_t i = packs * V + global_thread(); i < n; i += stride) {
    A a, b;
    const bool fz = frozen.data != nullptr && flag_at(frozen, i);
    masked_weight_grads<Mode>(N::load(grad[i]), N::load(weight[i]), N::load(scores[i]), fz, s, s_max, compensate, a, b);
    grad_weight[i] = N::store(a);
    grad_scores[i] = N::store(b);
  }
}

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
      if (finished_last(&counters[c], splits, &last_flag) && threadIdx.x < 32) {
        // the partials in a fixed order: lane l sums l, l + 32, ..., then a fixed shuffle tree
        A total = A(0);
        for (unsigned int k = threadIdx.x; k < splits; k += 32) total += __ldcg(&partials[c * splits + k]);
        total = warp_sum(total);
        if (threadIdx.x == 0) grad_scores[c] = N::store(flush_tiny(mask_derivative(e, s, s_max, compensate) * total));
      }
    }
    __syncthreads();  // scratch and last_flag are reused for the next channel
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
  if (finished_last(counter, gridDim.x, &last_flag) && threadIdx.x < 32) {
    double total = 0.0;
    unsigned long long free_count = 0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += 32) {
      total += __ldcg(&partial_sums[b]);
      free_count += __ldcg(&partial_counts[b]);
    }
    total = warp_sum(total);
    free_count = warp_sum(free_count);
    if (threadIdx.x == 0) write(total, free_count);
  }
}

// ---------------------------------------------------------------------------------------------------
// The mask ledger.

// pack_bits: each warp packs 32 consecutive entries per iteration with one ballot (lane k's flag becomes bit
// k, i.e. bit k % 8 of byte k / 8: the LSB-first layout); lanes 0..3 write the 4 bytes.
__global__ void __launch_bounds__(kThreads)
    pack_bits_kernel(const bool* __restrict__ mask, uint8_t* __restrict__ bits, int64_t n, int64_t nbytes) {
  const int lane = threadIdx.x & 31;
  const int64_t words = (n + 31) / 32;
  const int64_t warps = grid_threads() / 32;
  // w is the same in every lane of a warp, so the whole warp takes part in each ballot
  for (int64_t w = global_thread() / 32; w < words; w += warps) {
    const int64_t i = w * 32 + lane;
    const bool flag = i < n && mask[i];
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    const int64_t j = w * 4 + lane;
    if (lane < 4 && j < nbytes) bits[j] = static_cast<uint8_t>(ballot >> (8 * lane));
  }
}

// union_count: one byte per thread and iteration; out[j] = r | t, and the popcount of t & ~r goes to the unit
// of the run of `inner` entries the byte lies in (a byte that straddles runs is split bit by bit). With
// kShared the counts gather in a per-block histogram in shared memory (units * 8 bytes), flushed to global
// memory with one atomic per unit and block; else they go to global memory directly. Integer atomics: the
// result does not depend on the order.
template <bool kShared>
__global__ void __launch_bounds__(kThreads)
    union_count_kernel(const uint8_t* __restrict__ reserved, const uint8_t* __restrict__ task,
                       uint8_t* __restrict__ out, unsigned long long* __restrict__ counts, int64_t nbytes,
                       unsigned valid_last, int64_t units, int64_t inner, bool small) {
  extern __shared__ unsigned long long histogram[];
  if (kShared) {
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) histogram[u] = 0;
    __syncthreads();
  }
  auto add = [&](int64_t unit, unsigned long long c) {
    if (kShared) {
      atomicAdd(&histogram[unit], c);
    } else {
      atomicAdd(&counts[unit], c);
    }
  };
  auto unit_of_run = [&](int64_t run) { return run - div_index(run, units, small) * units; };
  const int64_t stride = grid_threads();
  for (int64_t j = global_thread(); j < nbytes; j += stride) {
    const unsigned valid = j == nbytes - 1 ? valid_last : 0xffu;
    const unsigned r = reserved[j] & valid;
    const unsigned t = task[j] & valid;
    out[j] = static_cast<uint8_t>(r | t);
    unsigned fresh = t & ~r & valid;
    if (fresh == 0) continue;
    const int64_t first = 8 * j;
    const int64_t run = div_index(first, inner, small);
    if (first - run * inner + 8 <= inner) {  // the whole byte lies in one run
      add(unit_of_run(run), static_cast<unsigned long long>(__popc(fresh)));
      continue;
    }
    while (fresh != 0) {
      const int bit = __ffs(fresh) - 1;
      fresh &= fresh - 1;
      add(unit_of_run(div_index(first + bit, inner, small)), 1ull);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      if (histogram[u] != 0) atomicAdd(&counts[u], histogram[u]);
    }
  }
}

__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

// The scalars of reference.adam_step_ / sgd_step_ as PyTorch forms them: computed in double on the host
// (1 - beta1, lr / bias1, sqrt(bias2), 1 - lr * wd) and rounded to the compute type once.
template <typename A>
struct AdamScalars {
  A beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bias2, eps, step_size, weight_decay, decay_factor;
};

template <typename A>
struct SgdScalars {
  A lr, momentum, one_minus_dampening, weight_decay;
  bool decay, first, nesterov;
};

// Adam, operation by operation as reference.adam_step_ (in float for float/half/bfloat16 storage, in
// double for double). kDecay: 0 none, 1 L2 (added to the gradient), 2 decoupled (AdamW). A frozen entry is
// skipped: nothing of it is read past its flag, nothing written.
template <typename T, int kDecay, bool kFrozen>
__global__ void __launch_bounds__(kThreads)
    adam_step_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ exp_avg,
                     T* __restrict__ exp_avg_sq, Flags frozen, int64_t n, AdamScalars<acc_t<T>> c) {
  using N = Num<T>;
  using A = acc_t<T>;
  const int64_t stride = grid_threads();
  for (int64_t i = global_thread(); i < n; i += stride) {
    if (kFrozen && flag_at(frozen, i)) continue;
    const A p0 = N::load(param[i]);
    A g = N::load(grad[i]);
    if (kDecay == 1) g = g + c.weight_decay * p0;
    const A m = N::load(exp_avg[i]) * c.beta1 + g * c.one_minus_beta1;
    const A v = N::load(exp_avg_sq[i]) * c.beta2 + g * g * c.one_minus_beta2;
    const A denom = sqrt_(v) / c.sqrt_bias2 + c.eps;
    A p = kDecay == 2 ? p0 * c.decay_factor : p0;
    p = p - c.step_size * m / denom;
    param[i] = N::store(p);
    exp_avg[i] = N::store(m);
    exp_avg_sq[i] = N::store(v);
  }
}

// SGD as reference.sgd_step_: buf = first ? g : buf * momentum + g * (1 - dampening); the step is
// nesterov ? g + momentum * buf : buf. Frozen entries are skipped.
template <typename T, bool kMomentum, bool kFrozen>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ momentum_buffer,
                    Flags frozen, int64_t n, SgdScalars<acc_t<T>> c) {
  using N = Num<T>;
  using A = acc_t<T>;
  const int64_t stride = grid_threads();
  for (int64_t i = global_thread(); i < n; i += stride) {
    if (kFrozen && flag_at(frozen, i)) continue;
    const A p0 = N::load(param[i]);
    A g = N::load(grad[i]);
    if (c.decay) g = g + c.weight_decay * p0;
    if (kMomentum) {
      const A b = c.first ? g : N::load(momentum_buffer[i]) * c.momentum + g * c.one_minus_dampening;
      momentum_buffer[i] = N::store(b);
      g = c.nesterov ? g + c.momentum * b : b;
    }
    param[i] = N::store(p0 - c.lr * g);
  }
}

size_t align_up(size_t bytes, size_t alignment) { return (bytes + alignment - 1) / alignment * alignment; }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Launchers.

template <typename T>
void mask_forward(const T* scores, T* mask, int64_t n, double s, int mode, const LaunchConfig& cfg) {
  if (n <= 0) return;
  const int64_t packs = packs_for<T>(n, aligned16(scores) && aligned16(mask));
  const unsigned blocks = elementwise_grid<T>(n, packs, cfg);
  if (mode == kSte) {
    mask_forward_kernel<T, kSte><<<blocks, kThreads, 0, cfg.stream>>>(scores, mask, n, packs, acc_t<T>(s));
  } else {
    mask_forward_kernel<T, kAnneal><<<blocks, kThreads, 0, cfg.stream>>>(scores, mask, n, packs, acc_t<T>(s));
  }
}

template <typename T>
void mask_backward(const T* grad_m, const T* scores, T* grad_e, int64_t n, double s, double s_max,
                   const LaunchConfig& cfg) {
  if (n <= 0) return;
  const int64_t packs = packs_for<T>(n, aligned16(grad_m) && aligned16(scores) && aligned16(grad_e));
  mask_backward_kernel<T><<<elementwise_grid<T>(n, packs, cfg), kThreads, 0, cfg.stream>>>(
      grad_m, scores, grad_e, n, packs, acc_t<T>(s), acc_t<T>(s_max), s_max > 0);
}

template <typename T>
void masked_weight_forward(const T* weight, const T* scores, T* out, int64_t n, double s, int mode,
                           const LaunchConfig& cfg) {
  if (n <= 0) return;
  const int64_t packs = packs_for<T>(n, aligned16(weight) && aligned16(scores) && aligned16(out));
  const unsigned blocks = elementwise_grid<T>(n, packs, cfg);
  if (mode == kSte) {
    masked_weight_forward_kernel<T, kSte><<<blocks, kThreads, 0, cfg.stream>>>(weight, scores, out, n, packs, acc_t<T>(s));
  } else {
    masked_weight_forward_kernel<T, kAnneal><<<blocks, kThreads, 0, cfg.stream>>>(weight, scores, out, n, packs, acc_t<T>(s));
  }
}

template <typename T>
void masked_weight_backward(const T* grad, const T* weight, const T* scores, Flags frozen, T* grad_weight,
                            T* grad_scores, int64_t n, double s, double s_max, int mode, const LaunchConfig& cfg) {
  if (n <= 0) return;
  const bool aligned =
      aligned16(grad) && aligned16(weight) && aligned16(scores) && aligned16(grad_weight) && aligned16(grad_scores);
  const int64_t packs = packs_for<T>(n, aligned);
  const unsigned blocks = elementwise_grid<T>(n, packs, cfg);
  const acc_t<T> s_a(s), s_max_a(s_max);
  if (mode == kSte) {
    masked_weight_backward_kernel<T, kSte><<<blocks, kThreads, 0, cfg.stream>>>(
        grad, weight, scores, frozen, grad_weight, grad_scores, n, packs, s_a, s_max_a, s_max > 0);
  } else {
    masked_weight_backward_kernel<T, kAnneal><<<blocks, kThreads, 0, cfg.stream>>>(
        grad, weight, scores, frozen, grad_weight, grad_scores, n, packs, s_a, s_max_a, s_max > 0);
  }
}

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
GateBackwardPlan gate_backward_plan(int64_t batch, int64_t channels, int64_t inner, const LaunchConfig& cfg) {
  const int64_t length = batch * inner;  // elements reduced per channel
  if (channels <= 0) return GateBackwardPlan{1, 0};
  // Enough blocks to fill the GPU, but at least ~8 elements per thread in each block: below that the
  // cross-block combination costs more than it saves.
  const int64_t target = static_cast<int64_t>(std::max(cfg.sm_count, 1)) * kBlocksPerSm;
  const int64_t wanted = (target + channels - 1) / channels;
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

SparsityTermsPlan sparsity_terms_plan(int64_t n, size_t element_size, const LaunchConfig& cfg) {
  const int64_t vec = static_cast<int64_t>(16 / element_size);
  // at least ~16 packs per thread before a second block is worth its partial
  const int64_t useful = std::max<int64_t>(1, (n / vec + kThreads * 16 - 1) / (kThreads * 16));
  const int64_t blocks = std::min<int64_t>(useful, grid_for(n / vec, cfg));
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

void pack_bits(const bool* mask, uint8_t* bits, int64_t n, const LaunchConfig& cfg) {
  if (n <= 0) return;
  const int64_t words = (n + 31) / 32;
  pack_bits_kernel<<<grid_for(words * 32, cfg), kThreads, 0, cfg.stream>>>(mask, bits, n, (n + 7) / 8);
}

// Units whose counts fit a block's shared-memory histogram (8 bytes each: 32 KiB).
constexpr int64_t kSharedUnits = 4096;

void union_count(const uint8_t* reserved, const uint8_t* task, uint8_t* out, int64_t* counts, int64_t outer,
                 int64_t units, int64_t inner, const LaunchConfig& cfg) {
  const int64_t n = outer * units * inner;
  if (n <= 0) return;
  const int64_t nbytes = (n + 7) / 8;
  const unsigned valid_last = (1u << static_cast<unsigned>(n - 8 * (nbytes - 1))) - 1u;
  const bool small = n <= static_cast<int64_t>(UINT32_MAX);
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "int64 counts updated as unsigned long long");
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  const unsigned blocks = grid_for(nbytes, cfg);
  if (units <= kSharedUnits) {
    const size_t shared = static_cast<size_t>(units) * sizeof(unsigned long long);
    union_count_kernel<true><<<blocks, kThreads, shared, cfg.stream>>>(reserved, task, out, c, nbytes, valid_last,
                                                                       units, inner, small);
  } else {
    union_count_kernel<false><<<blocks, kThreads, 0, cfg.stream>>>(reserved, task, out, c, nbytes, valid_last, units,
                                                                   inner, small);
  }
}

template <typename T>
void adam_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, Flags frozen, int64_t n, const AdamArgs& a,
               const LaunchConfig& cfg) {
  if (n <= 0) return;
  using A = acc_t<T>;
  const double bias1 = 1.0 - pow(a.beta1, static_cast<double>(a.step));
  const double bias2 = 1.0 - pow(a.beta2, static_cast<double>(a.step));
  const AdamScalars<A> c{A(a.beta1), A(1.0 - a.beta1), A(a.beta2), A(1.0 - a.beta2), A(sqrt(bias2)), A(a.eps),
                         A(a.lr / bias1), A(a.weight_decay), A(1.0 - a.lr * a.weight_decay)};
  const int decay = a.weight_decay == 0 ? 0 : (a.decoupled ? 2 : 1);
  const unsigned blocks = grid_for(n, cfg);
  const bool has_frozen = frozen.data != nullptr;
#define DGM_ADAM_LAUNCH(DECAY, FROZEN)                                                                           \
  adam_step_kernel<T, DECAY, FROZEN><<<blocks, kThreads, 0, cfg.stream>>>(param, grad, exp_avg, exp_avg_sq, frozen, \
                                                                          n, c)
  if (decay == 0) {
    if (has_frozen) DGM_ADAM_LAUNCH(0, true); else DGM_ADAM_LAUNCH(0, false);
  } else if (decay == 1) {
    if (has_frozen) DGM_ADAM_LAUNCH(1, true); else DGM_ADAM_LAUNCH(1, false);
  } else {
    if (has_frozen) DGM_ADAM_LAUNCH(2, true); else DGM_ADAM_LAUNCH(2, false);
  }
#undef DGM_ADAM_LAUNCH
}

template <typename T>
void sgd_step(T* param, const T* grad, T* momentum_buffer, Flags frozen, int64_t n, const SgdArgs& a,
              const LaunchConfig& cfg) {
  if (n <= 0) return;
  using A = acc_t<T>;
  const SgdScalars<A> c{A(a.lr), A(a.momentum), A(1.0 - a.dampening), A(a.weight_decay), a.weight_decay != 0,
                        a.first_step, a.nesterov};
  const unsigned blocks = grid_for(n, cfg);
  const bool has_frozen = frozen.data != nullptr;
  if (a.momentum != 0) {
    if (has_frozen) {
      sgd_step_kernel<T, true, true><<<blocks, kThreads, 0, cfg.stream>>>(param, grad, momentum_buffer, frozen, n, c);
    } else {
      sgd_step_kernel<T, true, false><<<blocks, kThreads, 0, cfg.stream>>>(param, grad, momentum_buffer, frozen, n, c);
    }
  } else if (has_frozen) {
    sgd_step_kernel<T, false, true><<<blocks, kThreads, 0, cfg.stream>>>(param, grad, nullptr, frozen, n, c);
  } else {
    sgd_step_kernel<T, false, false><<<blocks, kThreads, 0, cfg.stream>>>(param, grad, nullptr, frozen, n, c);
  }
}

// ---------------------------------------------------------------------------------------------------
// Explicit instantiations for the four storage types.

#define DGM_KERNELS_INSTANTIATE(T)                                                                                 \
  template void mask_forward<T>(const T*, T*, int64_t, double, int, const LaunchConfig&);                         \
  template void mask_backward<T>(const T*, const T*, T*, int64_t, double, double, const LaunchConfig&);          \
  template void masked_weight_forward<T>(const T*, const T*, T*, int64_t, double, int, const LaunchConfig&);     \
  template void masked_weight_backward<T>(const T*, const T*, const T*, Flags, T*, T*, int64_t, double,         \
                                          double, int, const LaunchConfig&);                                      \
  template void gate_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, double, int,                  \
                                const LaunchConfig&);                                                             \
  template GateBackwardPlan gate_backward_plan<T>(int64_t, int64_t, int64_t, const LaunchConfig&);               \
  template cudaError_t gate_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, double, \
                                        double, int, const GateBackwardPlan&, void*, const LaunchConfig&);       \
  template void block_unit_grad<T>(const T*, Flags, Flags, T*, int64_t, int64_t, int64_t, bool,                 \
                                   int64_t, const LaunchConfig&);                                                 \
  template cudaError_t sparsity_terms<T>(const T*, const bool*, T*, int64_t, const SparsityTermsPlan&, void*,    \
                                         const LaunchConfig&);                                                    \
  template void adam_step<T>(T*, const T*, T*, T*, Flags, int64_t, const AdamArgs&, const LaunchConfig&);        \
  template void sgd_step<T>(T*, const T*, T*, Flags, int64_t, const SgdArgs&, const LaunchConfig&);

DGM_KERNELS_INSTANTIATE(float)
DGM_KERNELS_INSTANTIATE(double)
DGM_KERNELS_INSTANTIATE(__half)
DGM_KERNELS_INSTANTIATE(__nv_bfloat16)

#undef DGM_KERNELS_INSTANTIATE

}  // namespace cuda_kernels
}  // namespace dgm_kernels
