// CUDA kernels of the mask ledger: pack_bits, union_count, and the masked Adam / SGD steps.
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

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Launchers.

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

#define DGM_KERNELS_INSTANTIATE(T) \
  template void adam_step<T>(T*, const T*, T*, T*, Flags, int64_t, const AdamArgs&, const LaunchConfig&);        \
  template void sgd_step<T>(T*, const T*, T*, Flags, int64_t, const SgdArgs&, const LaunchConfig&);

DGM_KERNELS_FOR_EACH_TYPE(DGM_KERNELS_INSTANTIATE)

#undef DGM_KERNELS_INSTANTIATE

}  // namespace cuda_kernels
}  // namespace dgm_kernels
