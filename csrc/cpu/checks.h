// Argument checks of the CPU kernels. The Python layer (dgm_kernels.functional) validates first, but the ops
// are public (torch.ops.dgm_kernels.*), so each kernel checks again and names the op, the argument, what
// it expected and what it got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "bits.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace dgm_kernels {
namespace cpu {

inline std::string shape_string(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// A tensor argument that must live on the CPU.
inline void check_on_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "dgm_kernels::", op, " (CPU): ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "dgm_kernels::", op, " (CPU): ", name, " must be a CPU tensor, got a tensor on ",
              t.device(), " (the CPU kernels only run on CPU tensors)");
}

// A floating-point CPU tensor the arithmetic kernels support.
inline void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  check_on_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "dgm_kernels::", op, " (CPU): ",
              name, " must be float32 or float64, got ", t.scalar_type(),
              " (the CPU kernels compute in float32/float64; convert the tensors first)");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dgm_kernels::", op, " (CPU): ", name,
              " must have the dtype of ", like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.sizes().equals(like.sizes()), "dgm_kernels::", op, " (CPU): ", name, " must have the shape of ",
              like_name, " ", shape_string(like.sizes()), ", got ", shape_string(t.sizes()));
}

// An optional bool tensor (frozen / reserved) with the shape of `like`.
inline void check_optional_bool_like(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                     const char* like_name, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return;
  check_on_cpu(op, name, *t);
  TORCH_CHECK(t->scalar_type() == at::kBool, "dgm_kernels::", op, " (CPU): ", name, " must be a bool tensor, got ",
              t->scalar_type());
  check_same_shape(op, name, *t, like_name, like);
}

inline int64_t packed_bytes(int64_t numel) { return (numel + 7) / 8; }

// A flag argument (frozen / frozen_out / frozen_in) for `numel` entries of logical shape `shape`: a bool
// tensor of that shape, or its packed bits (1-D uint8, ceil(numel / 8) bytes). `shape_what` says where the
// shape comes from, for the messages.
inline void check_flags(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef shape,
                        const char* shape_what) {
  check_on_cpu(op, name, t);
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  if (t.scalar_type() == at::kByte) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == packed_bytes(numel), "dgm_kernels::", op, " (CPU): ", name,
                " given as packed bits (uint8) must be 1-D with ceil(", numel, " / 8) = ", packed_bytes(numel),
                " bytes (", shape_what, " ", shape_string(shape), "), got shape ", shape_string(t.sizes()));
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kBool, "dgm_kernels::", op, " (CPU): ", name,
              " must be a bool tensor or its packed bits (uint8), got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "dgm_kernels::", op, " (CPU): ", name, " must have the shape of ",
              shape_what, " ", shape_string(shape), ", got ", shape_string(t.sizes()));
}

// An optional per-entry flag argument with the shape of `like`.
inline void check_optional_flags_like(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                      const char* like_name, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return;
  check_flags(op, name, *t, like.sizes(), like_name);
}

// The contiguous form of a checked flag argument and the view the kernels read (absent: nullptr). `holder`
// keeps the contiguous tensor alive while the view is used.
inline FlagView flag_view(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return FlagView{};
  holder = t->contiguous();
  if (holder.scalar_type() == at::kByte) return FlagView{holder.const_data_ptr<uint8_t>(), true};
  return FlagView{reinterpret_cast<const uint8_t*>(holder.const_data_ptr<bool>()), false};
}

// A flag vector of `length` entries (one per unit): bool [length] or its packed bits (uint8 [ceil(length / 8)]).
inline void check_unit_vector(const char* op, const char* name, const at::Tensor& t, int64_t length,
                              const char* what) {
  check_on_cpu(op, name, t);
  if (t.scalar_type() == at::kByte) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == packed_bytes(length), "dgm_kernels::", op, " (CPU): ", name,
                " given as packed bits (uint8) must have shape [", packed_bytes(length), "] (ceil(", length,
                " / 8) bytes; ", what, "), got ", shape_string(t.sizes()));
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kBool, "dgm_kernels::", op, " (CPU): ", name,
              " must be a bool tensor or its packed bits (uint8), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, "dgm_kernels::", op, " (CPU): ", name, " must have shape [",
              length, "] (", what, "), got ", shape_string(t.sizes()));
}

inline void check_scale(const char* op, double s) {
  TORCH_CHECK(std::isfinite(s) && s > 0, "dgm_kernels::", op, " (CPU): s must be a finite number > 0, got ", s);
}

inline void check_s_max(const char* op, double s_max) {
  TORCH_CHECK(std::isfinite(s_max), "dgm_kernels::", op,
              " (CPU): s_max must be finite (> 0: HAT compensation, <= 0: none), got ", s_max);
}

inline void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "dgm_kernels::", op, " (CPU): mode must be 0 (anneal) or 1 (ste), got ",
              mode);
}

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace cpu
}  // namespace dgm_kernels
