// CPU kernels of the element-wise mask ops: mask_forward / mask_backward (m = m(e), grad_e) and the DGMw
// masked weight (W * m(e); grad_W and grad_e in one pass). dgm_kernels/reference.py is the spec.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../dgm_kernels.h"
#include "bits.h"
#include "../op_checks.h"
#include "dispatch.h"
#include "simd_math.h"

namespace dgm_kernels {

namespace cpu {
namespace {

// m[i] = m(e[i])
template <typename T, int kMode>
DGM_SIMD_CLONES void mask_forward_kernel(const T* __restrict__ e, T* __restrict__ m, int64_t n, T s) {
  for (int64_t i = 0; i < n; ++i) m[i] = mask_value<T, kMode>(e[i], e[i] * s);
}

// grad_e[i] = grad_m[i] * dm/de(e[i]), computed in double and rounded once
template <typename T, bool kCompensate>
DGM_SIMD_CLONES void mask_backward_kernel(const T* __restrict__ grad_m, const T* __restrict__ e,
                                          T* __restrict__ grad_e, int64_t n, T s_t, double s, double s_max) {
  for (int64_t i = 0; i < n; ++i) {
    const double d = mask_derivative<T, kCompensate>(e[i], e[i] * s_t, s, s_max);
    grad_e[i] = to_output<T>(static_cast<double>(grad_m[i]) * d);
  }
}

// y[i] = W[i] * m(e[i])
template <typename T, int kMode>
DGM_SIMD_CLONES void masked_weight_forward_kernel(const T* __restrict__ w, const T* __restrict__ e,
                                                  T* __restrict__ y, int64_t n, T s) {
  for (int64_t i = 0; i < n; ++i) y[i] = flush_tiny(w[i] * mask_value<T, kMode>(e[i], e[i] * s));
}

// One pass over (grad, W, e, frozen): grad_W = grad * m * !frozen and grad_e = grad * W * dm/de. The mask is
// recomputed with the forward's own function, so grad_W uses bit-for-bit the m of the forward.
template <typename T, int kMode, bool kCompensate, bool kFrozen>
DGM_SIMD_CLONES void masked_weight_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                                   const T* __restrict__ e, const uint8_t* __restrict__ frozen,
                                                   T* __restrict__ grad_w, T* __restrict__ grad_e, int64_t n,
                                                   T s_t, double s, double s_max) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = grad[i];
    const T x = e[i] * s_t;
    const T gw = flush_tiny(g * mask_value<T, kMode>(e[i], x));
    grad_w[i] = kFrozen ? zero_where(frozen[i], gw) : gw;
    const double d = mask_derivative<T, kCompensate>(e[i], x, s, s_max);
    grad_e[i] = to_output<T>(static_cast<double>(g) * static_cast<double>(w[i]) * d);
  }
}

}  // namespace
}  // namespace cpu

using namespace cpu;

at::Tensor mask_forward_cpu(const at::Tensor& scores, double s, int64_t mode, double s_max) {
  checks::check_mask_forward_args(checks::cpu_op("mask_forward"), scores, s, mode, s_max);
  const at::Tensor e = scores.contiguous();
  at::Tensor m = at::empty(e.sizes(), e.options());
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "dgm_kernels::mask_forward", [&] {
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    const auto s_t = static_cast<scalar_t>(s);
    with_mode(mode, [&](auto kMode) {
      at::parallel_for(0, e.numel(), kGrainTranscendental, [&](int64_t begin, int64_t end) {
        mask_forward_kernel<scalar_t, decltype(kMode)::value>(ep + begin, mp + begin, end - begin, s_t);
      });
    });
  });
  return m;
}

at::Tensor mask_backward_cpu(const at::Tensor& grad_m, const at::Tensor& scores, double s, double s_max) {
  checks::check_mask_backward_args(checks::cpu_op("mask_backward"), grad_m, scores, s, s_max);
  const at::Tensor g = grad_m.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "dgm_kernels::mask_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* out = grad_e.mutable_data_ptr<scalar_t>();
    const auto s_t = static_cast<scalar_t>(s);
    with_flag(s_max > 0, [&](auto kCompensate) {
      at::parallel_for(0, e.numel(), kGrainTranscendental, [&](int64_t begin, int64_t end) {
        mask_backward_kernel<scalar_t, decltype(kCompensate)::value>(gp + begin, ep + begin, out + begin, end - begin,
                                                                     s_t, s, s_max);
      });
    });
  });
  return grad_e;
}

at::Tensor masked_weight_forward_cpu(const at::Tensor& weight, const at::Tensor& scores,
                                     const std::optional<at::Tensor>& frozen, double s, int64_t mode, double s_max) {
  checks::check_masked_weight_forward_args(checks::cpu_op("masked_weight_forward"), weight, scores, frozen, s, mode,
                                           s_max);
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor y = at::empty(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dgm_kernels::masked_weight_forward", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const auto s_t = static_cast<scalar_t>(s);
    with_mode(mode, [&](auto kMode) {
      at::parallel_for(0, w.numel(), kGrainTranscendental, [&](int64_t begin, int64_t end) {
        masked_weight_forward_kernel<scalar_t, decltype(kMode)::value>(wp + begin, ep + begin, yp + begin,
                                                                       end - begin, s_t);
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                              const at::Tensor& scores,
                                                              const std::optional<at::Tensor>& frozen, double s,
                                                              double s_max, int64_t mode) {
  checks::check_masked_weight_backward_args(checks::cpu_op("masked_weight_backward"), grad, weight, scores, frozen, s,
                                            s_max, mode);
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor frozen_holder;
  const FlagView fz = flag_view(frozen, frozen_holder);  // bool bytes or packed bits (expanded per chunk)
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  at::Tensor grad_e = at::empty(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dgm_kernels::masked_weight_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    scalar_t* gep = grad_e.mutable_data_ptr<scalar_t>();
    const auto s_t = static_cast<scalar_t>(s);
    with_mode(mode, [&](auto kMode) {
      with_flag(s_max > 0, [&](auto kCompensate) {
        with_flag(fz.present(), [&](auto kFrozen) {
          parallel_with_flags(w.numel(), kGrainTranscendental, fz, [&](int64_t begin, int64_t len, const uint8_t* fp) {
            masked_weight_backward_kernel<scalar_t, decltype(kMode)::value, decltype(kCompensate)::value,
                                          decltype(kFrozen)::value>(gp + begin, wp + begin, ep + begin, fp,
                                                                    gwp + begin, gep + begin, len, s_t, s, s_max);
          });
        });
      });
    });
  });
  return {grad_w, grad_e};
}

}  // namespace dgm_kernels
