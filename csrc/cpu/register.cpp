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
}
