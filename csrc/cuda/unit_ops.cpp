// Torch wrappers of the CUDA per-unit kernels (unit_kernels.cu): block_unit_grad, sparsity_terms.
// Each wrapper checks its arguments (csrc/op_checks.h, shared with the CPU kernels), makes the inputs
// contiguous, allocates contiguous outputs on the inputs' device and calls a launcher of kernels.cuh on the
// current stream of that device.
#include "../dgm_kernels.h"
#include "../op_checks.h"
#include "kernels.cuh"
#include "torch_glue.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dgm_kernels {

using namespace cuda_glue;

at::Tensor block_unit_grad_cuda(const at::Tensor& grad_weight, const at::Tensor& frozen_out,
                                const std::optional<at::Tensor>& frozen_in, bool transposed, int64_t groups) {
  const checks::UnitGradShape shape = checks::check_block_unit_grad_args(
      checks::cuda_op("block_unit_grad"), grad_weight, frozen_out, frozen_in, transposed, groups);
  const at::cuda::CUDAGuard guard(grad_weight.device());
  const at::Tensor g = grad_weight.contiguous();
  const at::Tensor fo = frozen_out.contiguous();
  const std::optional<at::Tensor> fi = contiguous_or_none(frozen_in);
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return out;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(g.scalar_type(), "dgm_kernels::block_unit_grad_cuda", [&] {
    ck::block_unit_grad(in_ptr<scalar_t>(g), flags_of(fo), flags_of(fi), out_ptr<scalar_t>(out), shape.rows,
                        shape.cols, shape.inner, transposed, groups, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparsity_terms_cuda(const at::Tensor& mask, const std::optional<at::Tensor>& reserved) {
  checks::check_sparsity_terms_args(checks::cuda_op("sparsity_terms"), mask, reserved);
  const at::cuda::CUDAGuard guard(mask.device());
  if (mask.numel() == 0) return at::zeros({2}, mask.options());  // nothing free, nothing summed
  const at::Tensor m = mask.contiguous();
  const std::optional<at::Tensor> r = contiguous_or_none(reserved);
  at::Tensor out = at::empty({2}, m.options());
  const ck::LaunchConfig cfg = launch_config();
  const ck::SparsityTermsPlan plan = ck::sparsity_terms_plan(m.numel(), m.element_size(), cfg);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, m.options().dtype(at::kByte));
  }
  DGM_DISPATCH(m.scalar_type(), "dgm_kernels::sparsity_terms_cuda", [&] {
    C10_CUDA_CHECK(ck::sparsity_terms(in_ptr<scalar_t>(m), bool_ptr(r), out_ptr<scalar_t>(out), m.numel(), plan,
                                      workspace.defined() ? workspace.mutable_data_ptr() : nullptr, cfg));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dgm_kernels
