// The CPU kernels of the dgm_kernels ops (schemas: csrc/ops.cpp; fake kernels and autograd formulas:
// dgm_kernels/backends/compiled.py).
#include <torch/library.h>

#include "../dgm_kernels.h"

TORCH_LIBRARY_IMPL(dgm_kernels, CPU, m) {
  m.impl("mask_forward", &dgm_kernels::mask_forward_cpu);
  m.impl("mask_backward", &dgm_kernels::mask_backward_cpu);
  m.impl("masked_weight_forward", &dgm_kernels::masked_weight_forward_cpu);
  m.impl("masked_weight_backward", &dgm_kernels::masked_weight_backward_cpu);
  m.impl("gate_forward", &dgm_kernels::gate_forward_cpu);
  m.impl("gate_backward", &dgm_kernels::gate_backward_cpu);
  m.impl("block_unit_grad", &dgm_kernels::block_unit_grad_cpu);
  m.impl("sparsity_terms", &dgm_kernels::sparsity_terms_cpu);
  m.impl("pack_bits", &dgm_kernels::pack_bits_cpu);
  m.impl("union_count", &dgm_kernels::union_count_cpu);
  m.impl("masked_adam_step", &dgm_kernels::masked_adam_step_cpu);
  m.impl("masked_sgd_step", &dgm_kernels::masked_sgd_step_cpu);
  m.impl("conv2d_weight_grad", &dgm_kernels::conv2d_weight_grad_cpu);
  m.impl("conv2d_input_grad", &dgm_kernels::conv2d_input_grad_cpu);
}
