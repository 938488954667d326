// The argument contract of each compiled op (csrc/dgm_kernels.h), checked in one function per op that both
// the CPU and the CUDA implementation call first, so that the two devices accept exactly the same arguments
// and word their refusals the same way. The checks themselves are csrc/checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "checks.h"

namespace dgm_kernels {
namespace checks {

// -- masks ----------------------------------------------------------------------------------------------------

inline void check_mask_forward_args(const Op& op, const at::Tensor& scores, double s, int64_t mode, double s_max) {
  check_float(op, "scores", scores);
  check_mask_scalars(op, s, mode, s_max);
}

inline void check_mask_backward_args(const Op& op, const at::Tensor& grad_m, const at::Tensor& scores, double s,
                                     double s_max) {
  check_float(op, "scores", scores);
  check_like(op, "grad_m", grad_m, "scores", scores);
  check_scale(op, s);
  check_s_max(op, s_max);
}

// frozen is unused by the forward, but a wrong one is a caller's bug worth reporting at once.
inline void check_masked_weight_forward_args(const Op& op, const at::Tensor& weight, const at::Tensor& scores,
                                             const std::optional<at::Tensor>& frozen, double s, int64_t mode,
                                             double s_max) {
  check_float(op, "weight", weight);
  check_like(op, "scores", scores, "weight", weight);
  check_optional_flags_like(op, "frozen", frozen, "weight", weight);
  check_mask_scalars(op, s, mode, s_max);
}

inline void check_masked_weight_backward_args(const Op& op, const at::Tensor& grad, const at::Tensor& weight,
                                              const at::Tensor& scores, const std::optional<at::Tensor>& frozen,
                                              double s, double s_max, int64_t mode) {
  check_float(op, "weight", weight);
  check_like(op, "grad", grad, "weight", weight);
  check_like(op, "scores", scores, "weight", weight);
  check_optional_flags_like(op, "frozen", frozen, "weight", weight);
  check_mask_scalars(op, s, mode, s_max);
}

// -- gates ----------------------------------------------------------------------------------------------------

// y_pre viewed as [batch, channels, inner].
struct GateShape {
  int64_t batch, channels, inner;
};

inline GateShape check_gate_forward_args(const Op& op, const at::Tensor& y_pre, const at::Tensor& scores, double s,
                                         int64_t mode, double s_max) {
  check_float(op, "y_pre", y_pre);
  check_same_device(op, "scores", scores, "y_pre", y_pre);
  check_same_dtype(op, "scores", scores, "y_pre", y_pre);
  TORCH_CHECK(y_pre.dim() >= 2, op, "y_pre must have at least 2 dimensions [N, C, ...], got ", y_pre.sizes());
  const int64_t channels = y_pre.size(1);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == channels, op, "scores must have shape [", channels,
              "] (one score per channel, dim 1 of y_pre ", y_pre.sizes(), "), got ", scores.sizes());
  check_mask_scalars(op, s, mode, s_max);
  int64_t inner = 1;
  for (int64_t d = 2; d < y_pre.dim(); ++d) inner *= y_pre.size(d);
  return GateShape{y_pre.size(0), channels, inner};
}

inline GateShape check_gate_backward_args(const Op& op, const at::Tensor& grad_y, const at::Tensor& y_pre,
                                          const at::Tensor& scores, double s, double s_max, int64_t mode) {
  const GateShape shape = check_gate_forward_args(op, y_pre, scores, s, mode, s_max);
  check_like(op, "grad_y", grad_y, "y_pre", y_pre);
  return shape;
}

// -- units ----------------------------------------------------------------------------------------------------

// grad_weight viewed as [rows, cols, inner], and the unit counts of its two sides.
struct UnitGradShape {
  int64_t rows, cols, inner;
  int64_t out_units, in_units;
};

// Layout: [out, in/groups, ...] or, transposed, [in, out/groups, ...]; frozen_out / frozen_in hold one flag per
// output / input channel.
inline UnitGradShape check_block_unit_grad_args(const Op& op, const at::Tensor& grad_weight,
                                                const at::Tensor& frozen_out,
                                                const std::optional<at::Tensor>& frozen_in, bool transposed,
                                                int64_t groups) {
  check_any_float(op, "grad_weight", grad_weight);
  TORCH_CHECK(grad_weight.dim() >= 2, op,
              "grad_weight must have at least 2 dimensions (a linear or convolution weight), got ",
              grad_weight.sizes());
  TORCH_CHECK(groups >= 1, op, "groups must be >= 1, got ", groups);
  const int64_t rows = grad_weight.size(0);
  const int64_t cols = grad_weight.size(1);
  TORCH_CHECK(rows % groups == 0, op, "grad_weight.size(0) (", rows, ") must be divisible by groups (", groups, ")");
  int64_t inner = 1;
  for (int64_t d = 2; d < grad_weight.dim(); ++d) inner *= grad_weight.size(d);
  const int64_t out_units = transposed ? cols * groups : rows;
  const int64_t in_units = transposed ? rows : cols * groups;
  check_flags(op, "frozen_out", frozen_out, {out_units},
              transposed ? "out_channels = grad_weight.size(1) * groups for a transposed weight"
                         : "out_channels = grad_weight.size(0)",
              "grad_weight", grad_weight);
  if (has_tensor(frozen_in)) {
    check_flags(op, "frozen_in", *frozen_in, {in_units},
                transposed ? "in_channels = grad_weight.size(0) for a transposed weight"
                           : "in_channels = grad_weight.size(1) * groups",
                "grad_weight", grad_weight);
  }
  return UnitGradShape{rows, cols, inner, out_units, in_units};
}

inline void check_sparsity_terms_args(const Op& op, const at::Tensor& mask, const std::optional<at::Tensor>& reserved) {
  check_float(op, "mask", mask);
  check_optional_bool_like(op, "reserved", reserved, "mask", mask);
}

// -- the mask ledger ------------------------------------------------------------------------------------------

inline void check_pack_bits_args(const Op& op, const at::Tensor& mask) {
  check_tensor(op, "mask", mask);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, "mask must be a bool tensor, got ", mask.scalar_type());
}

// Returns the byte count of both packed masks.
inline int64_t check_union_count_args(const Op& op, const at::Tensor& reserved_bits, const at::Tensor& task_bits,
                                      int64_t outer, int64_t units, int64_t inner) {
  TORCH_CHECK(outer >= 1 && units >= 1 && inner >= 1, op, "outer, units and inner must be >= 1, got outer=", outer,
              ", units=", units, ", inner=", inner);
  const int64_t n = outer * units * inner;
  const int64_t nbytes = packed_bytes(n);
  check_tensor(op, "reserved_bits", reserved_bits);
  check_same_device(op, "task_bits", task_bits, "reserved_bits", reserved_bits);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"reserved_bits", &reserved_bits},
                                std::pair<const char*, const at::Tensor*>{"task_bits", &task_bits}}) {
    TORCH_CHECK(t->scalar_type() == at::kByte, op, name, " must be packed bits (uint8), got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == nbytes, op, name, " must have shape [", nbytes, "] (ceil(", n,
                " / 8) bytes for outer * units * inner = ", outer, " * ", units, " * ", inner, " entries), got ",
                t->sizes());
  }
  return nbytes;
}

// -- optimizers -----------------------------------------------------------------------------------------------

inline void check_adam_args(const Op& op, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& frozen, double lr,
                            double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_float(op, "param", param);
  check_like(op, "grad", grad, "param", param);
  check_like(op, "exp_avg", exp_avg, "param", param);
  check_like(op, "exp_avg_sq", exp_avg_sq, "param", param);
  check_optional_flags_like(op, "frozen", frozen, "param", param);
  TORCH_CHECK(step >= 1, op, "step must be >= 1 (the count of this update), got ", step);
  check_finite(op, "lr", lr);
  check_finite(op, "eps", eps);
  check_finite(op, "weight_decay", weight_decay);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op,
              "beta1 and beta2 must be in [0, 1), got beta1=", beta1, ", beta2=", beta2);
}

// momentum_buffer is required (and checked) only when momentum != 0.
inline void check_sgd_args(const Op& op, const at::Tensor& param, const at::Tensor& grad,
                           const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& frozen,
                           double lr, double momentum, double dampening, double weight_decay) {
  check_float(op, "param", param);
  check_like(op, "grad", grad, "param", param);
  const bool has_momentum = momentum != 0;
  TORCH_CHECK(!has_momentum || has_tensor(momentum_buffer), op,
              "momentum_buffer must be a tensor when momentum != 0 (momentum=", momentum, "), got None");
  if (has_momentum) check_like(op, "momentum_buffer", *momentum_buffer, "param", param);
  check_optional_flags_like(op, "frozen", frozen, "param", param);
  check_finite(op, "lr", lr);
  check_finite(op, "momentum", momentum);
  check_finite(op, "dampening", dampening);
  check_finite(op, "weight_decay", weight_decay);
}

// -- the two gradients of a plain convolution --------------------------------------------------------------

struct ConvGeometry {
  int64_t B, C, H, W, O, KH, KW, Ho, Wo, sh, sw, ph, pw;
  int64_t L() const { return Ho * Wo; }
  int64_t ckk() const { return C * KH * KW; }
};

inline std::pair<int64_t, int64_t> check_pair(const Op& op, const char* name, c10::IntArrayRef v, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, op, name, " must have 2 values (height, width), got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, op, name, " must be >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

// grad_out [B, O, Ho, Wo]: its spatial size must be the one the input size, kernel, stride and padding give.
inline ConvGeometry check_conv_grad_geometry(const Op& op, const at::Tensor& grad_out, int64_t C, int64_t H,
                                             int64_t W, int64_t KH, int64_t KW, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding) {
  check_float(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.dim() == 4, op, "grad_out must be 4-D [batch, out_channels, height, width], got shape ",
              grad_out.sizes());
  auto [sh, sw] = check_pair(op, "stride", stride, 1);
  auto [ph, pw] = check_pair(op, "padding", padding, 0);
  TORCH_CHECK(H + 2 * ph >= KH && W + 2 * pw >= KW, op, "the kernel (", KH, "x", KW,
              ") must fit in the padded input (", H + 2 * ph, "x", W + 2 * pw, ")");
  const int64_t Ho = (H + 2 * ph - KH) / sh + 1, Wo = (W + 2 * pw - KW) / sw + 1;
  TORCH_CHECK(grad_out.size(2) == Ho && grad_out.size(3) == Wo, op, "grad_out must be ", Ho, "x", Wo,
              " (the output of a ", H, "x", W, " input, kernel ", KH, "x", KW, ", stride ", stride, ", padding ",
              padding, "), got ", grad_out.size(2), "x", grad_out.size(3));
  return ConvGeometry{grad_out.size(0), C, H, W, grad_out.size(1), KH, KW, Ho, Wo, sh, sw, ph, pw};
}

inline ConvGeometry check_conv2d_weight_grad_args(const Op& op, const at::Tensor& grad_out, const at::Tensor& input,
                                                  c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                                  c10::IntArrayRef padding) {
  auto [KH, KW] = check_pair(op, "kernel_size", kernel_size, 1);
  check_float(op, "input", input);
  TORCH_CHECK(input.dim() == 4, op, "input must be 4-D [batch, channels, height, width], got shape ", input.sizes());
  const ConvGeometry g =
      check_conv_grad_geometry(op, grad_out, input.size(1), input.size(2), input.size(3), KH, KW, stride, padding);
  check_same_device(op, "input", input, "grad_out", grad_out);
  check_same_dtype(op, "input", input, "grad_out", grad_out);
  TORCH_CHECK(input.size(0) == g.B, op, "input must have the batch size of grad_out (", g.B, "), got ", input.size(0));
  return g;
}

inline ConvGeometry check_conv2d_input_grad_args(const Op& op, const at::Tensor& grad_out, const at::Tensor& weight,
                                                 c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                 c10::IntArrayRef input_size) {
  check_float(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 4, op, "weight must be 4-D [out_channels, in_channels, kH, kW], got shape ",
              weight.sizes());
  auto [H, W] = check_pair(op, "input_size", input_size, 1);
  const ConvGeometry g = check_conv_grad_geometry(op, grad_out, weight.size(1), H, W, weight.size(2), weight.size(3),
                                                  stride, padding);
  check_same_device(op, "weight", weight, "grad_out", grad_out);
  check_same_dtype(op, "weight", weight, "grad_out", grad_out);
  TORCH_CHECK(weight.size(0) == g.O, op, "weight must have grad_out's ", g.O, " output channels, got shape ",
              weight.sizes());
  return g;
}

}  // namespace checks
}  // namespace dgm_kernels
