// Schemas of the dgm_kernels custom ops. Implementations register per dispatch key in
// csrc/cpu/register.cpp (CPU) and csrc/cuda/register.cpp (CUDA); fake kernels and autograd formulas are
// registered from Python (dgm_kernels/backends/compiled.py).
#include <torch/library.h>

TORCH_LIBRARY(dgm_kernels, m) {
  m.def("mask_forward(Tensor scores, float s, int mode, float s_max) -> Tensor");
  m.def("mask_backward(Tensor grad_m, Tensor scores, float s, float s_max) -> Tensor");
  m.def("masked_weight_forward(Tensor weight, Tensor scores, Tensor? frozen, float s, int mode, float s_max) -> Tensor");
  m.def(
      "masked_weight_backward(Tensor grad, Tensor weight, Tensor scores, Tensor? frozen, float s, float s_max, "
      "int mode) -> (Tensor, Tensor)");
  m.def("gate_forward(Tensor y_pre, Tensor scores, float s, int mode, float s_max) -> Tensor");
  m.def(
      "gate_backward(Tensor grad_y, Tensor y_pre, Tensor scores, float s, float s_max, int mode) -> (Tensor, "
      "Tensor)");
  m.def(
      "block_unit_grad(Tensor grad_weight, Tensor frozen_out, Tensor? frozen_in, bool transposed, int groups) -> "
      "Tensor");
  m.def("sparsity_terms(Tensor mask, Tensor? reserved) -> Tensor");
  // the two gradients of a plain convolution (groups 1, dilation 1): CPU kernels fast for 1-channel inputs
  // (csrc/cpu/conv_ops.cpp); on CUDA their spec, aten::convolution_backward (csrc/cuda/conv_ops.cpp)
  m.def("conv2d_weight_grad(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def("conv2d_input_grad(Tensor grad_out, Tensor weight, int[2] stride, int[2] padding, int[2] input_size) -> Tensor");
  // the mask ledger's kernels (dgm_kernels/bits.py, ledger.py, optim.py)
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("union_count(Tensor reserved_bits, Tensor task_bits, int outer, int units, int inner) -> (Tensor, Tensor)");
  // in place: the (a!) annotations tell the dispatcher, functionalization and torch.compile what is mutated
  m.def(
      "masked_adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? frozen, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, bool decoupled) -> ()");
  m.def(
      "masked_sgd_step(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor? frozen, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool first_step) -> ()");
}
