// Torch wrappers of the CUDA ledger kernels (ledger_kernels.cu): pack_bits, union_count, masked Adam / SGD
// steps.
// Each wrapper checks its arguments (csrc/op_checks.h, shared with the CPU kernels), makes the inputs
// contiguous, allocates contiguous outputs on the inputs' device and calls a launcher of kernels.cuh on the
// current stream of that device.
#include "../dgm_kernels.h"
#include "../in_place.h"
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

at::Tensor pack_bits_cuda(const at::Tensor& mask) {
  checks::check_pack_bits_args(checks::cuda_op("pack_bits"), mask);
  const at::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor bits = at::empty({checks::packed_bytes(m.numel())}, m.options().dtype(at::kByte));
  if (m.numel() == 0) return bits;
  ck::pack_bits(m.const_data_ptr<bool>(), bits.mutable_data_ptr<uint8_t>(), m.numel(), launch_config());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

std::tuple<at::Tensor, at::Tensor> union_count_cuda(const at::Tensor& reserved_bits, const at::Tensor& task_bits,
                                                    int64_t outer, int64_t units, int64_t inner) {
  const int64_t nbytes =
      checks::check_union_count_args(checks::cuda_op("union_count"), reserved_bits, task_bits, outer, units, inner);
  const at::cuda::CUDAGuard guard(reserved_bits.device());
  const at::Tensor r = reserved_bits.contiguous();
  const at::Tensor t = task_bits.contiguous();
  at::Tensor out = at::empty({nbytes}, r.options());
  at::Tensor counts = at::zeros({units}, r.options().dtype(at::kLong));  // the kernel adds into it
  ck::union_count(r.const_data_ptr<uint8_t>(), t.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(),
                  counts.mutable_data_ptr<int64_t>(), outer, units, inner, launch_config());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, counts};
}

void masked_adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& frozen, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           bool decoupled) {
  checks::check_adam_args(checks::cuda_op("masked_adam_step"), param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1,
                          beta2, eps, weight_decay, step);
  const at::cuda::CUDAGuard guard(param.device());
  InPlace p(param), m(exp_avg), v(exp_avg_sq);
  const at::Tensor g = grad.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  if (param.numel() == 0) return;
  const ck::LaunchConfig cfg = launch_config();
  const ck::AdamArgs args{lr, beta1, beta2, eps, weight_decay, step, decoupled};
  DGM_DISPATCH(param.scalar_type(), "dgm_kernels::masked_adam_step_cuda", [&] {
    ck::adam_step(out_ptr<scalar_t>(p.work), in_ptr<scalar_t>(g), out_ptr<scalar_t>(m.work),
                  out_ptr<scalar_t>(v.work), flags_of(fz), param.numel(), args, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.finish();
  m.finish();
  v.finish();
}

void masked_sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                          const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& frozen,
                          double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool first_step) {
  checks::check_sgd_args(checks::cuda_op("masked_sgd_step"), param, grad, momentum_buffer, frozen, lr, momentum,
                         dampening, weight_decay);
  const bool has_momentum = momentum != 0;
  const at::cuda::CUDAGuard guard(param.device());
  InPlace p(param);
  std::optional<InPlace> b;
  if (has_momentum) b.emplace(*momentum_buffer);
  const at::Tensor g = grad.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  if (param.numel() == 0) return;
  const ck::LaunchConfig cfg = launch_config();
  const ck::SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, first_step};
  DGM_DISPATCH(param.scalar_type(), "dgm_kernels::masked_sgd_step_cuda", [&] {
    ck::sgd_step(out_ptr<scalar_t>(p.work), in_ptr<scalar_t>(g), b ? out_ptr<scalar_t>(b->work) : nullptr,
                 flags_of(fz), param.numel(), args, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.finish();
  if (b) b->finish();
}

}  // namespace dgm_kernels
