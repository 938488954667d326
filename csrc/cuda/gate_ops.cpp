// Torch wrappers of the CUDA gate kernels (gate_kernels.cu): gate_forward / _backward.
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

at::Tensor gate_forward_cuda(const at::Tensor& y_pre, const at::Tensor& scores, double s, int64_t mode,
                             double s_max) {
  const checks::GateShape shape =
      checks::check_gate_forward_args(checks::cuda_op("gate_forward"), y_pre, scores, s, mode, s_max);
  const at::cuda::CUDAGuard guard(y_pre.device());
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(x.scalar_type(), "dgm_kernels::gate_forward_cuda", [&] {
    ck::gate_forward(in_ptr<scalar_t>(x), in_ptr<scalar_t>(e), out_ptr<scalar_t>(y), shape.batch, shape.channels,
                     shape.inner, s, static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y_pre,
                                                      const at::Tensor& scores, double s, double s_max,
                                                      int64_t mode) {
  const checks::GateShape shape =
      checks::check_gate_backward_args(checks::cuda_op("gate_backward"), grad_y, y_pre, scores, s, s_max, mode);
  const at::cuda::CUDAGuard guard(y_pre.device());
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  // With channels but no element (batch or spatial size 0) the kernel still runs: grad_e = dm/de * 0,
  // which is 0, or NaN for a NaN score, as in the reference.
  if (shape.channels == 0) return {grad_x, grad_e};
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(x.scalar_type(), "dgm_kernels::gate_backward_cuda", [&] {
    using device_t = typename DeviceType<scalar_t>::type;
    const ck::GateBackwardPlan plan = ck::gate_backward_plan<device_t>(shape.batch, shape.channels, shape.inner, cfg);
    at::Tensor workspace;  // the caching allocator makes this cheap; it stays alive until the launch is queued,
                           // and the allocator orders its reuse after the stream's pending work
    if (plan.workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(ck::gate_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(x), in_ptr<scalar_t>(e),
                                     out_ptr<scalar_t>(grad_x), out_ptr<scalar_t>(grad_e), shape.batch,
                                     shape.channels, shape.inner, s, s_max, static_cast<int>(mode), plan,
                                     workspace.defined() ? workspace.mutable_data_ptr() : nullptr, cfg));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_e};
}

}  // namespace dgm_kernels
