// Argument checks of the CPU kernels. The Python layer (dgm_kernels.functional) validates first, but the ops
// are public (torch.ops.dgm_kernels.*), so each kernel checks again and names the op, the argument, what
// it expected and what it got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
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

// A bool vector of `length` entries (one per unit).
inline void check_unit_vector(const char* op, const char* name, const at::Tensor& t, int64_t length,
                              const char* what) {
  check_on_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kBool, "dgm_kernels::", op, " (CPU): ", name, " must be a bool tensor, got ",
              t.scalar_type());
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
