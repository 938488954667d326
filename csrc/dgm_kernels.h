// dgm_kernels._C: the compiled kernels' contract, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// implementations. The schemas live in csrc/ops.cpp; dgm_kernels/reference.py is the spec of every
// function here (forward values and gradients).
//
// Conventions
// - mode: 0 = anneal (m = sigmoid(s * e)), 1 = ste (m = 1[e >= 0]; the backward still uses sigmoid').
// - s > 0 is the annealing scale. s_max <= 0 means "no HAT compensation"; s_max > 0 compensates:
//     plain:       dm/de = s * sig(s e) * sig(-s e)
//     compensated: dm/de = s_max * sig(e) * sig(-e) * exp(c - a) * ((1 + exp(-c)) / (1 + exp(-a)))^2,
//                  a = |s e|, c = min(a, 50)
//   (never sig(x) * (1 - sig(x)): it cancels to 0 for |x| > ~17 in float32).
// - No kernel produces subnormal numbers (they cost ~100x on CPUs): a value whose magnitude would fall
//   below 1e-30 may be returned as exactly 0.
// - Inputs may be non-contiguous; outputs are contiguous, with the dtype and device of the input.
//   CPU: float32 and float64. CUDA: float32, float64, float16, bfloat16 (accumulate in float32).
// - frozen / frozen_out / frozen_in are bool tensors of the logical shape, or the same flags packed as bits
//   (dgm_kernels/bits.py): a 1-D uint8 tensor of ceil(n / 8) bytes, entry i being bit i % 8 (least
//   significant first) of byte i / 8, in row-major order. The dtype tells which form was given; the padding
//   bits of the last byte are never read. reserved (sparsity_terms) is a bool tensor.
// - Ledger ops: pack_bits / union_count work on such packed bits; masked_adam_step / masked_sgd_step update
//   param and the optimizer state in place (reference.adam_step_ / sgd_step_), and never change an entry
//   that is frozen: param, exp_avg, exp_avg_sq and momentum_buffer keep its bits exactly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace dgm_kernels {

#define DGM_KERNELS_DECLARE(DEV)                                                                          \
  /* m(e); s_max is unused by the forward (it is an input so the autograd formula can read it) */         \
  at::Tensor mask_forward_##DEV(const at::Tensor& scores, double s, int64_t mode, double s_max);          \
  /* grad_e = grad_m * dm/de */                                                                            \
  at::Tensor mask_backward_##DEV(const at::Tensor& grad_m, const at::Tensor& scores, double s, double s_max); \
  /* W * m(e); e has W's shape; frozen and s_max are unused by the forward (read by the autograd formula) */ \
  at::Tensor masked_weight_forward_##DEV(const at::Tensor& weight, const at::Tensor& scores,               \
                                         const std::optional<at::Tensor>& frozen, double s, int64_t mode,  \
                                         double s_max);                                                    \
  /* one pass: grad_W = grad * m * !frozen, grad_e = grad * W * dm/de */                                   \
  std::tuple<at::Tensor, at::Tensor> masked_weight_backward_##DEV(                                         \
      const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores,                         \
      const std::optional<at::Tensor>& frozen, double s, double s_max, int64_t mode);                     \
  /* y = y_pre * m(e)[c], channel dim 1 of y_pre ([N, C, ...]), e of shape [C] */                          \
  at::Tensor gate_forward_##DEV(const at::Tensor& y_pre, const at::Tensor& scores, double s, int64_t mode, \
                                double s_max);                                                            \
  /* grad_y_pre = grad_y * m[c]; grad_e[c] = dm/de[c] * sum over all but dim 1 of grad_y * y_pre */       \
  std::tuple<at::Tensor, at::Tensor> gate_backward_##DEV(const at::Tensor& grad_y, const at::Tensor& y_pre, \
                                                         const at::Tensor& scores, double s, double s_max, \
                                                         int64_t mode);                                    \
  /* grad_weight with zeros where the output unit and the input unit are both frozen (frozen_in absent:  \
     where the output unit is frozen). Layout: [out, in/groups, ...] or, transposed, [in, out/groups, ...];\
     column j of row r belongs to global channel (r / (rows / groups)) * cols + j of the other side. */   \
  at::Tensor block_unit_grad_##DEV(const at::Tensor& grad_weight, const at::Tensor& frozen_out,           \
                                   const std::optional<at::Tensor>& frozen_in, bool transposed,           \
                                   int64_t groups);                                                        \
  /* [sum of mask over free entries, number of free entries] in mask's dtype (accumulated in double);     \
     free = !reserved, everything when reserved is absent */                                              \
  at::Tensor sparsity_terms_##DEV(const at::Tensor& mask, const std::optional<at::Tensor>& reserved);       \
  /* bool mask (any shape) -> uint8 [ceil(numel / 8)] packed bits, row-major */                            \
  at::Tensor pack_bits_##DEV(const at::Tensor& mask);                                                      \
  /* (reserved | task, count of task & ~reserved per unit as int64[units]) for packed masks of            \
     outer * units * inner entries viewed as [outer, units, inner]; one pass over the bytes */            \
  std::tuple<at::Tensor, at::Tensor> union_count_##DEV(const at::Tensor& reserved_bits,                    \
                                                       const at::Tensor& task_bits, int64_t outer,         \
                                                       int64_t units, int64_t inner);                      \
  /* one Adam (decoupled: AdamW) step in place (reference.adam_step_); frozen entries untouched */         \
  void masked_adam_step_##DEV(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,  \
                              const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& frozen,       \
                              double lr, double beta1, double beta2, double eps, double weight_decay,      \
                              int64_t step, bool decoupled);                                               \
  /* one SGD step in place (reference.sgd_step_); momentum_buffer may be absent when momentum == 0 */      \
  void masked_sgd_step_##DEV(const at::Tensor& param, const at::Tensor& grad,                              \
                             const std::optional<at::Tensor>& momentum_buffer,                             \
                             const std::optional<at::Tensor>& frozen, double lr, double momentum,          \
                             double dampening, double weight_decay, bool nesterov, bool first_step);

DGM_KERNELS_DECLARE(cpu)
DGM_KERNELS_DECLARE(cuda)

#undef DGM_KERNELS_DECLARE

// The two gradients of a plain 2-D convolution (groups 1, dilation 1). Spec: aten::convolution_backward.
// CPU (csrc/cpu/conv_ops.cpp): one batched GEMM plus im2col/col2im, fast where the input has one channel.
// CUDA (csrc/cuda/conv_ops.cpp): the spec itself (cuDNN).
#define DGM_KERNELS_DECLARE_CONV_GRADS(DEV)                                                                     \
  at::Tensor conv2d_weight_grad_##DEV(const at::Tensor& grad_out, const at::Tensor& input,                       \
                                      c10::IntArrayRef kernel_size, c10::IntArrayRef stride,                      \
                                      c10::IntArrayRef padding);                                                  \
  at::Tensor conv2d_input_grad_##DEV(const at::Tensor& grad_out, const at::Tensor& weight, c10::IntArrayRef stride, \
                                     c10::IntArrayRef padding, c10::IntArrayRef input_size);

DGM_KERNELS_DECLARE_CONV_GRADS(cpu)
DGM_KERNELS_DECLARE_CONV_GRADS(cuda)

#undef DGM_KERNELS_DECLARE_CONV_GRADS

}  // namespace dgm_kernels
