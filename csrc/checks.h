// Argument checks of the compiled ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations.
// dgm_kernels' Python layer validates before it dispatches, but the ops are public (torch.ops.dgm_kernels.*),
// so each kernel checks again; every message names the op and the device whose kernels ran it, the argument,
// what was expected and what was given: "dgm_kernels::mask_forward (CPU): s must be ...".
//
// The first tensor of an op fixes the device and the dtype; every other tensor must be on that same device
// (not just the same device type: a CUDA kernel launches on one GPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "mask_math.h"

namespace dgm_kernels {
namespace checks {

// The op being checked and the device its kernels run on.
struct Op {
  const char* name;  // the schema name, e.g. "mask_forward"
  c10::DeviceType device;
};

constexpr Op cpu_op(const char* name) { return Op{name, c10::DeviceType::CPU}; }
constexpr Op cuda_op(const char* name) { return Op{name, c10::DeviceType::CUDA}; }

inline const char* device_name(c10::DeviceType device) { return device == c10::DeviceType::CPU ? "CPU" : "CUDA"; }

// The prefix of every message (TORCH_CHECK streams its arguments, and only when the check fails).
inline std::ostream& operator<<(std::ostream& out, const Op& op) {
  return out << "dgm_kernels::" << op.name << " (" << device_name(op.device) << "): ";
}

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline int64_t packed_bytes(int64_t numel) { return (numel + 7) / 8; }

// A tensor on the op's device type (the first tensor of an op; the others are checked against it).
inline void check_tensor(const Op& op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device().type() == op.device, op, name, " must be a ", device_name(op.device),
              " tensor, got a tensor on ", t.device(), " (these kernels only run on ", device_name(op.device),
              " tensors)");
}

inline void check_same_device(const Op& op, const char* name, const at::Tensor& t, const char* like_name,
                              const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == like.device(), op, name, " must be on the device of ", like_name, " (", like.device(),
              "), got ", t.device());
}

// The dtypes the arithmetic kernels compute in: the CPU kernels only float32/float64 (the Python layer runs
// 16-bit CPU tensors through float32), the CUDA kernels also float16/bfloat16 (accumulating in float32).
inline bool is_kernel_float(const Op& op, at::ScalarType t) {
  if (t == at::kFloat || t == at::kDouble) return true;
  return op.device == c10::DeviceType::CUDA && (t == at::kHalf || t == at::kBFloat16);
}

inline const char* kernel_floats(const Op& op) {
  return op.device == c10::DeviceType::CUDA ? "float32, float64, float16 or bfloat16" : "float32 or float64";
}

// The first tensor of an arithmetic op.
inline void check_float(const Op& op, const char* name, const at::Tensor& t) {
  check_tensor(op, name, t);
  TORCH_CHECK(is_kernel_float(op, t.scalar_type()), op, name, " must be ", kernel_floats(op), ", got ",
              t.scalar_type(), " (the ", device_name(op.device),
              " kernels compute in these dtypes; convert the tensors first)");
}

// The first tensor of an op that only moves or zeroes values (block_unit_grad): any of the four float dtypes
// on either device.
inline void check_any_float(const Op& op, const char* name, const at::Tensor& t) {
  check_tensor(op, name, t);
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op, name,
              " must be float32, float64, float16 or bfloat16, got ", d);
}

inline void check_same_dtype(const Op& op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const Op& op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.sizes().equals(like.sizes()), op, name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", t.sizes());
}

// The device, dtype and shape of `like` (a second operand, an optimizer state).
inline void check_like(const Op& op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  check_same_device(op, name, t, like_name, like);
  check_same_dtype(op, name, t, like_name, like);
  check_same_shape(op, name, t, like_name, like);
}

// An optional bool tensor (sparsity_terms' reserved) with the device and shape of `like`.
inline void check_optional_bool_like(const Op& op, const char* name, const std::optional<at::Tensor>& t,
                                     const char* like_name, const at::Tensor& like) {
  if (!has_tensor(t)) return;
  check_same_device(op, name, *t, like_name, like);
  TORCH_CHECK(t->scalar_type() == at::kBool, op, name, " must be a bool tensor, got ", t->scalar_type());
  check_same_shape(op, name, *t, like_name, like);
}

// A flag argument (frozen / frozen_out / frozen_in) for the entries of logical shape `shape`, on the device
// of `like`: a bool tensor of that shape, or the same flags packed as bits (dgm_kernels/bits.py: 1-D uint8 of
// ceil(numel / 8) bytes). `shape_what` says where the shape comes from, for the messages.
inline void check_flags(const Op& op, const char* name, const at::Tensor& t, c10::IntArrayRef shape,
                        const std::string& shape_what, const char* like_name, const at::Tensor& like) {
  check_same_device(op, name, t, like_name, like);
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  if (t.scalar_type() == at::kByte) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == packed_bytes(numel), op, name,
                " given as packed bits (uint8) must be 1-D with ceil(", numel, " / 8) = ", packed_bytes(numel),
                " bytes (", shape_what, " ", shape, "), got shape ", t.sizes());
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kBool, op, name, " must be a bool tensor or its packed bits (uint8), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), op, name, " must have shape ", shape, " (", shape_what, "), got ",
              t.sizes());
}

// An optional per-entry flag argument (frozen) for the entries of `like`.
inline void check_optional_flags_like(const Op& op, const char* name, const std::optional<at::Tensor>& t,
                                      const char* like_name, const at::Tensor& like) {
  if (!has_tensor(t)) return;
  check_flags(op, name, *t, like.sizes(), std::string("the shape of ") + like_name, like_name, like);
}

inline void check_finite(const Op& op, const char* name, double value) {
  TORCH_CHECK(std::isfinite(value), op, name, " must be finite, got ", value);
}

// -- the scalars of the mask ops ------------------------------------------------------------------------------

inline void check_scale(const Op& op, double s) {
  TORCH_CHECK(std::isfinite(s) && s > 0, op, "s must be a finite number > 0, got ", s);
}

inline void check_s_max(const Op& op, double s_max) {
  TORCH_CHECK(std::isfinite(s_max), op, "s_max must be finite (> 0: HAT compensation, <= 0: none), got ", s_max);
}

inline void check_mode(const Op& op, int64_t mode) {
  TORCH_CHECK(mode == mask_math::kAnneal || mode == mask_math::kSte, op,
              "mode must be 0 (anneal) or 1 (ste), got ", mode);
}

inline void check_mask_scalars(const Op& op, double s, int64_t mode, double s_max) {
  check_scale(op, s);
  check_mode(op, mode);
  check_s_max(op, s_max);
}

}  // namespace checks
}  // namespace dgm_kernels
