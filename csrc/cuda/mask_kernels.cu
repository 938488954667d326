// CUDA kernels of the mask ops: mask_forward / mask_backward, masked_weight_forward / _backward.
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

// ---------------------------------------------------------------------------------------------------
// Explicit instantiations for the four storage types.

#define DGM_KERNELS_INSTANTIATE(T) \
  template void mask_forward<T>(const T*, T*, int64_t, double, int, const LaunchConfig&);                         \
  template void mask_backward<T>(const T*, const T*, T*, int64_t, double, double, const LaunchConfig&);          \
  template void masked_weight_forward<T>(const T*, const T*, T*, int64_t, double, int, const LaunchConfig&);     \
  template void masked_weight_backward<T>(const T*, const T*, const T*, Flags, T*, T*, int64_t, double,         \
                                          double, int, const LaunchConfig&);

DGM_KERNELS_FOR_EACH_TYPE(DGM_KERNELS_INSTANTIATE)

#undef DGM_KERNELS_INSTANTIATE

}  // namespace cuda_kernels
}  // namespace dgm_kernels
