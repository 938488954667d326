// In-place updates of the optimizer ops (masked_adam_step / masked_sgd_step), shared by the CPU and CUDA
// implementations.
#pragma once

#include <ATen/core/Tensor.h>

namespace dgm_kernels {

// A tensor an op updates in place: the kernels run on contiguous memory, so a non-contiguous one is updated
// through a contiguous copy that finish() writes back (writing a frozen entry's own bits back changes
// nothing). Parameters and the state created by torch.zeros_like are contiguous in practice.
struct InPlace {
  at::Tensor target, work;
  explicit InPlace(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

}  // namespace dgm_kernels
