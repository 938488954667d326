// CPU kernels of the DGMa channel gate: y = y_pre * m(e)[c] over channel dim 1 of y_pre ([N, C, ...]), and its
// backward, which reduces sum(grad_y * y_pre) per channel and writes grad_y_pre in the same pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../dgm_kernels.h"
#include "../op_checks.h"
#include "dispatch.h"
#include "simd_math.h"

namespace dgm_kernels {

namespace cpu {
namespace {

// The data is a sequence of planes (one per (n, c), `inner` contiguous elements each); plane p has
// channel p % channels. Each task takes whole planes, so every channel's factor is a loop constant.

template <typename T>
DGM_SIMD_CLONES void gate_forward_planes(const T* __restrict__ y_pre, const T* __restrict__ m, T* __restrict__ y,
                                         int64_t channels, int64_t inner, int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const T mc = m[p % channels];
    const T* in = y_pre + p * inner;
    T* out = y + p * inner;
    for (int64_t i = 0; i < inner; ++i) out[i] = flush_tiny(in[i] * mc);
  }
}

// partial[p] = sum over plane p of grad_y * y_pre (double), grad_y_pre = grad_y * m[c]: one read of each input.
template <typename T>
DGM_SIMD_CLONES void gate_backward_planes(const T* __restrict__ grad_y, const T* __restrict__ y_pre,
                                          const T* __restrict__ m, T* __restrict__ grad_y_pre,
                                          double* __restrict__ partial, int64_t channels, int64_t inner,
                                          int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const T mc = m[p % channels];
    const T* g = grad_y + p * inner;
    const T* y = y_pre + p * inner;
    T* out = grad_y_pre + p * inner;
    double acc = 0.0;
    // the reduction may be reordered into vector lanes: that is what `omp simd reduction` permits (the
    // order is fixed per build and CPU, so results are reproducible run to run)
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < inner; ++i) {
      acc += static_cast<double>(g[i]) * static_cast<double>(y[i]);
      out[i] = flush_tiny(g[i] * mc);
    }
    partial[p] = acc;
  }
}

// the per-channel mask in T (the forward's own function) and, for the backward, dm/de in double
template <typename T>
std::vector<T> channel_mask(const T* e, int64_t channels, double s, int64_t mode) {
  std::vector<T> m(static_cast<size_t>(channels));
  const auto s_t = static_cast<T>(s);
  for (int64_t c = 0; c < channels; ++c) {
    m[c] = mode == 1 ? mask_value<T, 1>(e[c], e[c] * s_t) : mask_value<T, 0>(e[c], e[c] * s_t);
  }
  return m;
}

int64_t plane_grain(int64_t inner) { return std::max<int64_t>(1, kGrainStreaming / std::max<int64_t>(inner, 1)); }

}  // namespace
}  // namespace cpu

using namespace cpu;

at::Tensor gate_forward_cpu(const at::Tensor& y_pre, const at::Tensor& scores, double s, int64_t mode, double s_max) {
  checks::check_gate_forward_args(checks::cpu_op("gate_forward"), y_pre, scores, s, mode, s_max);
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t channels = x.size(1);
  const int64_t planes = x.size(0) * channels;
  if (x.numel() == 0) return y;
  const int64_t inner = x.numel() / planes;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dgm_kernels::gate_forward", [&] {
    const std::vector<scalar_t> m = channel_mask(e.const_data_ptr<scalar_t>(), channels, s, mode);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(inner), [&](int64_t first, int64_t last) {
      gate_forward_planes<scalar_t>(xp, m.data(), yp, channels, inner, first, last);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y_pre,
                                                     const at::Tensor& scores, double s, double s_max, int64_t mode) {
  checks::check_gate_backward_args(checks::cpu_op("gate_backward"), grad_y, y_pre, scores, s, s_max, mode);
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_y_pre = at::empty(x.sizes(), x.options());
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  const int64_t channels = x.size(1);
  const int64_t batch = x.size(0);
  const int64_t planes = batch * channels;
  const int64_t inner = planes == 0 ? 0 : x.numel() / planes;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dgm_kernels::gate_backward", [&] {
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const std::vector<scalar_t> m = channel_mask(ep, channels, s, mode);
    std::vector<double> partial(static_cast<size_t>(planes), 0.0);
    if (inner > 0) {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* out = grad_y_pre.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, planes, plane_grain(inner), [&](int64_t first, int64_t last) {
        gate_backward_planes<scalar_t>(gp, xp, m.data(), out, partial.data(), channels, inner, first, last);
      });
    }
    // per channel: sum the plane sums in batch order (deterministic whatever the thread count), times dm/de
    const auto s_t = static_cast<scalar_t>(s);
    scalar_t* gep = grad_e.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      double total = 0.0;
      for (int64_t n = 0; n < batch; ++n) total += partial[n * channels + c];
      const double d = s_max > 0 ? mask_derivative<scalar_t, true>(ep[c], ep[c] * s_t, s, s_max)
                                 : mask_derivative<scalar_t, false>(ep[c], ep[c] * s_t, s, s_max);
      gep[c] = to_output<scalar_t>(total * d);
    }
  });
  return {grad_y_pre, grad_e};
}

}  // namespace dgm_kernels
