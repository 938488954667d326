// Torch wrappers of the CUDA mask kernels (mask_kernels.cu): mask_forward / _backward, masked_weight_forward /
// _backward.
// Each wrapper checks its arguments (csrc/op_checks.h, shared with the CPU kernels), makes the inputs
// contiguous, allocates contiguous outputs on the inputs' device and calls a launcher of kernels.cuh on the
// current stream of that device.
#include "../dgm_kernels.h"
#include "../op_checks.h"
#include "kernels.cuh"
#include "torch_glue.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dgm_kernels {

using namespace cuda_glue;

at::Tensor mask_forward_cuda(const at::Tensor& scores, double s, int64_t mode, double s_max) {
  checks::check_mask_forward_args(checks::cuda_op("mask_forward"), scores, s, mode, s_max);
  const at::cuda::CUDAGuard guard(scores.device());
  const at::Tensor e = scores.contiguous();
  at::Tensor m = at::empty(e.sizes(), e.options());
  if (e.numel() == 0) return m;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(e.scalar_type(), "dgm_kernels::mask_forward_cuda", [&] {
    ck::mask_forward(in_ptr<scalar_t>(e), out_ptr<scalar_t>(m), e.numel(), s, static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return m;
}

at::Tensor mask_backward_cuda(const at::Tensor& grad_m, const at::Tensor& scores, double s, double s_max) {
  checks::check_mask_backward_args(checks::cuda_op("mask_backward"), grad_m, scores, s, s_max);
  const at::cuda::CUDAGuard guard(scores.device());
  const at::Tensor g = grad_m.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  if (e.numel() == 0) return grad_e;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(e.scalar_type(), "dgm_kernels::mask_backward_cuda", [&] {
    ck::mask_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(e), out_ptr<scalar_t>(grad_e), e.numel(), s, s_max, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_e;
}

at::Tensor masked_weight_forward_cuda(const at::Tensor& weight, const at::Tensor& scores,
                                      const std::optional<at::Tensor>& frozen, double s, int64_t mode,
                                      double s_max) {
  checks::check_masked_weight_forward_args(checks::cuda_op("masked_weight_forward"), weight, scores, frozen, s, mode,
                                           s_max);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return out;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(w.scalar_type(), "dgm_kernels::masked_weight_forward_cuda", [&] {
    ck::masked_weight_forward(in_ptr<scalar_t>(w), in_ptr<scalar_t>(e), out_ptr<scalar_t>(out), w.numel(), s,
                              static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                               const at::Tensor& scores,
                                                               const std::optional<at::Tensor>& frozen, double s,
                                                               double s_max, int64_t mode) {
  checks::check_masked_weight_backward_args(checks::cuda_op("masked_weight_backward"), grad, weight, scores, frozen, s,
                                            s_max, mode);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  at::Tensor grad_e = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return {grad_w, grad_e};
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(w.scalar_type(), "dgm_kernels::masked_weight_backward_cuda", [&] {
    ck::masked_weight_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(w), in_ptr<scalar_t>(e), flags_of(fz),
                               out_ptr<scalar_t>(grad_w), out_ptr<scalar_t>(grad_e), w.numel(), s, s_max,
                               static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_e};
}

}  // namespace dgm_kernels
