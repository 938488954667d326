// The CUDA kernels of the dgm_kernels ops, registered for the CUDA dispatch key (schemas: csrc/ops.cpp;
// fake kernels and autograd formulas: dgm_kernels/backends/compiled.py).
#include <torch/library.h>

#include "../dgm_kernels.h"

TORCH_LIBRARY_IMPL(dgm_kernels, CUDA, m) {
  m.impl("mask_forward", TORCH_FN(dgm_kernels::mask_forward_cuda));
  m.impl("mask_backward", TORCH_FN(dgm_kernels::mask_backward_cuda));
  m.impl("masked_weight_forward", TORCH_FN(dgm_kernels::masked_weight_forward_cuda));
  m.impl("masked_weight_backward", TORCH_FN(dgm_kernels::masked_weight_backward_cuda));
  m.impl("gate_forward", TORCH_FN(dgm_kernels::gate_forward_cuda));
  m.impl("gate_backward", TORCH_FN(dgm_kernels::gate_backward_cuda));
  m.impl("block_unit_grad", TORCH_FN(dgm_kernels::block_unit_grad_cuda));
  m.impl("sparsity_terms", TORCH_FN(dgm_kernels::sparsity_terms_cuda));
  m.impl("pack_bits", TORCH_FN(dgm_kernels::pack_bits_cuda));
  m.impl("union_count", TORCH_FN(dgm_kernels::union_count_cuda));
  m.impl("masked_adam_step", TORCH_FN(dgm_kernels::masked_adam_step_cuda));
  m.impl("masked_sgd_step", TORCH_FN(dgm_kernels::masked_sgd_step_cuda));
  m.impl("conv2d_weight_grad", TORCH_FN(dgm_kernels::conv2d_weight_grad_cuda));
  m.impl("conv2d_input_grad", TORCH_FN(dgm_kernels::conv2d_input_grad_cuda));
}
