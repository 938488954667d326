// Torch wrappers of the CUDA kernels and their registration for the CUDA dispatch key: check the
// arguments (every message names the op, the argument, what was expected and what was given), make
// inputs contiguous, allocate contiguous outputs on the inputs' device, and call the launchers of
// kernels.cu on the current stream of that device. Compiled by the host compiler: the kernels
// themselves live in kernels.cu. (One translation unit for wrappers and registration: the torch headers
// dominate the build time, and CI builds this on every run.)
#include "../dgm_kernels.h"
#include "device_math.cuh"  // kAnneal, kSte
#include "kernels.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// Not ATen/cuda/CUDAContext.h: it pulls in the cuBLAS and cuSPARSE headers, which a CUDA toolkit
// installed without those libraries lacks; the c10 headers above are all these wrappers need.

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace dgm_kernels {
namespace {

namespace ck = cuda_kernels;

// c10's 16-bit types and CUDA's share their bit layout: the launchers take CUDA's.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(c10::Half) == sizeof(__half) && alignof(c10::Half) == alignof(__half), "Half layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16) && alignof(c10::BFloat16) == alignof(__nv_bfloat16),
              "BFloat16 layout");

template <typename scalar_t>
const typename DeviceType<scalar_t>::type* in_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename DeviceType<scalar_t>::type* out_ptr(at::Tensor& t) {
  return reinterpret_cast<typename DeviceType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

const bool* bool_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<bool>() : nullptr;
}

// Streaming multiprocessors of `device`, queried once per device (the launch configurations need it on
// every call). Racing first calls store the same value.
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};  // zero: not queried yet
  const bool cacheable = device >= 0 && static_cast<size_t>(device) < cache.size();
  if (cacheable) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (cacheable) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Must run after the device guard: the stream is the current one of the current device.
ck::LaunchConfig launch_config() {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  return ck::LaunchConfig{stream.stream(), sm_count(stream.device_index())};
}

// -- argument checks --------------------------------------------------------------------------------

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A floating CUDA tensor (the first of an op: its device and dtype are the reference of the others).
void check_float_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must have dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                  const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
              like.device(), "), got ", t.device());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                      const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                      const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", t.sizes());
}

// Same device, dtype and shape as `like`.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name, const at::Tensor& like) {
  check_device(op, name, t, like_name, like);
  check_same_dtype(op, name, t, like_name, like);
  check_same_shape(op, name, t, like_name, like);
}

void check_bool_on(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                   const at::Tensor& like) {
  check_device(op, name, t, like_name, like);
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must have dtype bool, got ", t.scalar_type());
}

void check_scale(const char* op, double s) {
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": s must be a finite number > 0, got ", s);
}

void check_s_max(const char* op, double s_max) {
  TORCH_CHECK(std::isfinite(s_max), op, ": s_max must be finite (<= 0: no compensation), got ", s_max);
}

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == ck::kAnneal || mode == ck::kSte, op, ": mode must be 0 (anneal) or 1 (ste), got ", mode);
}

int64_t packed_bytes(int64_t numel) { return (numel + 7) / 8; }

// A flag argument (frozen / frozen_out / frozen_in) for the entries of logical shape `shape`: a bool tensor of
// that shape, or its packed bits (1-D uint8 of ceil(numel / 8) bytes, dgm_kernels/bits.py), on the device of
// `like`. `shape_what` names where the shape comes from.
void check_flags(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef shape,
                 const char* shape_what, const char* like_name, const at::Tensor& like) {
  check_device(op, name, t, like_name, like);
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  if (t.scalar_type() == at::kByte) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == packed_bytes(numel), op, ": ", name,
                " given as packed bits (uint8) must be 1-D with ceil(", numel, " / 8) = ", packed_bytes(numel),
                " bytes (", shape_what, " ", shape, "), got shape ", t.sizes());
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor or its packed bits (uint8), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, " (", shape_what, "), got ",
              t.sizes());
}

// The launchers' view of a contiguous flag tensor (absent: data null).
ck::Flags flags_of(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return ck::Flags{nullptr, false};
  if (t->scalar_type() == at::kByte) return ck::Flags{t->const_data_ptr<uint8_t>(), true};
  return ck::Flags{reinterpret_cast<const uint8_t*>(t->const_data_ptr<bool>()), false};
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Sizes of y_pre viewed as [batch, channels, inner].
struct GateShape {
  int64_t batch, channels, inner;
};

GateShape gate_shape(const char* op, const at::Tensor& y_pre, const at::Tensor& scores) {
  TORCH_CHECK(y_pre.dim() >= 2, op, ": y_pre must have at least 2 dimensions ([N, C, ...]), got shape ",
              y_pre.sizes());
  const int64_t channels = y_pre.size(1);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == channels, op, ": scores must have shape [", channels,
              "] (one score per channel of y_pre, shape ", y_pre.sizes(), "), got ", scores.sizes());
  int64_t inner = 1;
  for (int64_t d = 2; d < y_pre.dim(); ++d) inner *= y_pre.size(d);
  return GateShape{y_pre.size(0), channels, inner};
}

#define DGM_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// -- ops ----------------------------------------------------------------------------------------------

at::Tensor mask_forward_cuda(const at::Tensor& scores, double s, int64_t mode, double s_max) {
  constexpr const char* op = "dgm_kernels::mask_forward";
  check_float_cuda(op, "scores", scores);
  check_scale(op, s);
  check_mode(op, mode);
  check_s_max(op, s_max);
  const at::cuda::CUDAGuard guard(scores.device());
  const at::Tensor e = scores.contiguous();
  at::Tensor m = at::empty(e.sizes(), e.options());
  if (e.numel() == 0) return m;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(e.scalar_type(), "dgm_kernels::mask_forward_cuda", [&] {
    ck::mask_forward(in_ptr<scalar_t>(e), out_ptr<scalar_t>(m), e.numel(), s, static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return m;
}

at::Tensor mask_backward_cuda(const at::Tensor& grad_m, const at::Tensor& scores, double s, double s_max) {
  constexpr const char* op = "dgm_kernels::mask_backward";
  check_float_cuda(op, "scores", scores);
  check_like(op, "grad_m", grad_m, "scores", scores);
  check_scale(op, s);
  check_s_max(op, s_max);
  const at::cuda::CUDAGuard guard(scores.device());
  const at::Tensor g = grad_m.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  if (e.numel() == 0) return grad_e;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(e.scalar_type(), "dgm_kernels::mask_backward_cuda", [&] {
    ck::mask_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(e), out_ptr<scalar_t>(grad_e), e.numel(), s, s_max, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_e;
}

at::Tensor masked_weight_forward_cuda(const at::Tensor& weight, const at::Tensor& scores,
                                      const std::optional<at::Tensor>& frozen, double s, int64_t mode,
                                      double s_max) {
  constexpr const char* op = "dgm_kernels::masked_weight_forward";
  check_float_cuda(op, "weight", weight);
  check_like(op, "scores", scores, "weight", weight);
  if (frozen.has_value()) {  // unused by the forward, but a wrong one is a caller's bug worth reporting now
    check_flags(op, "frozen", *frozen, weight.sizes(), "of weight", "weight", weight);
  }
  check_scale(op, s);
  check_mode(op, mode);
  check_s_max(op, s_max);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return out;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(w.scalar_type(), "dgm_kernels::masked_weight_forward_cuda", [&] {
    ck::masked_weight_forward(in_ptr<scalar_t>(w), in_ptr<scalar_t>(e), out_ptr<scalar_t>(out), w.numel(), s,
                              static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                               const at::Tensor& scores,
                                                               const std::optional<at::Tensor>& frozen, double s,
                                                               double s_max, int64_t mode) {
  constexpr const char* op = "dgm_kernels::masked_weight_backward";
  check_float_cuda(op, "weight", weight);
  check_like(op, "grad", grad, "weight", weight);
  check_like(op, "scores", scores, "weight", weight);
  if (frozen.has_value()) check_flags(op, "frozen", *frozen, weight.sizes(), "of weight", "weight", weight);
  check_scale(op, s);
  check_s_max(op, s_max);
  check_mode(op, mode);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor e = scores.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  at::Tensor grad_e = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return {grad_w, grad_e};
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(w.scalar_type(), "dgm_kernels::masked_weight_backward_cuda", [&] {
    ck::masked_weight_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(w), in_ptr<scalar_t>(e), flags_of(fz),
                               out_ptr<scalar_t>(grad_w), out_ptr<scalar_t>(grad_e), w.numel(), s, s_max,
                               static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_e};
}

at::Tensor gate_forward_cuda(const at::Tensor& y_pre, const at::Tensor& scores, double s, int64_t mode,
                             double s_max) {
  constexpr const char* op = "dgm_kernels::gate_forward";
  check_float_cuda(op, "y_pre", y_pre);
  check_device(op, "scores", scores, "y_pre", y_pre);
  check_same_dtype(op, "scores", scores, "y_pre", y_pre);
  const GateShape shape = gate_shape(op, y_pre, scores);
  check_scale(op, s);
  check_mode(op, mode);
  check_s_max(op, s_max);
  const at::cuda::CUDAGuard guard(y_pre.device());
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(x.scalar_type(), "dgm_kernels::gate_forward_cuda", [&] {
    ck::gate_forward(in_ptr<scalar_t>(x), in_ptr<scalar_t>(e), out_ptr<scalar_t>(y), shape.batch, shape.channels,
                     shape.inner, s, static_cast<int>(mode), cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y_pre,
                                                      const at::Tensor& scores, double s, double s_max,
                                                      int64_t mode) {
  constexpr const char* op = "dgm_kernels::gate_backward";
  check_float_cuda(op, "y_pre", y_pre);
  check_like(op, "grad_y", grad_y, "y_pre", y_pre);
  check_device(op, "scores", scores, "y_pre", y_pre);
  check_same_dtype(op, "scores", scores, "y_pre", y_pre);
  const GateShape shape = gate_shape(op, y_pre, scores);
  check_scale(op, s);
  check_s_max(op, s_max);
  check_mode(op, mode);
  const at::cuda::CUDAGuard guard(y_pre.device());
  const at::Tensor g = grad_y.contiguous();
  const at::Tensor x = y_pre.contiguous();
  const at::Tensor e = scores.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  // With channels but no element (batch or spatial size 0) the kernel still runs: grad_e = dm/de * 0,
  // which is 0, or NaN for a NaN score, as in the reference.
  if (shape.channels == 0) return {grad_x, grad_e};
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(x.scalar_type(), "dgm_kernels::gate_backward_cuda", [&] {
    using device_t = typename DeviceType<scalar_t>::type;
    const ck::GateBackwardPlan plan = ck::gate_backward_plan<device_t>(shape.batch, shape.channels, shape.inner, cfg);
    at::Tensor workspace;  // the caching allocator makes this cheap; it stays alive until the launch is queued,
                           // and the allocator orders its reuse after the stream's pending work
    if (plan.workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(ck::gate_backward(in_ptr<scalar_t>(g), in_ptr<scalar_t>(x), in_ptr<scalar_t>(e),
                                     out_ptr<scalar_t>(grad_x), out_ptr<scalar_t>(grad_e), shape.batch,
                                     shape.channels, shape.inner, s, s_max, static_cast<int>(mode), plan,
                                     workspace.defined() ? workspace.mutable_data_ptr() : nullptr, cfg));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_e};
}

at::Tensor block_unit_grad_cuda(const at::Tensor& grad_weight, const at::Tensor& frozen_out,
                                const std::optional<at::Tensor>& frozen_in, bool transposed, int64_t groups) {
  constexpr const char* op = "dgm_kernels::block_unit_grad";
  check_float_cuda(op, "grad_weight", grad_weight);
  TORCH_CHECK(grad_weight.dim() >= 2, op, ": grad_weight must have at least 2 dimensions, got shape ",
              grad_weight.sizes());
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t rows = grad_weight.size(0);
  const int64_t cols = grad_weight.size(1);
  TORCH_CHECK(rows % groups == 0, op, ": grad_weight.shape[0] (", rows, ") must be divisible by groups (", groups,
              ")");
  int64_t inner = 1;
  for (int64_t d = 2; d < grad_weight.dim(); ++d) inner *= grad_weight.size(d);
  // rows are units of this side (outputs; inputs when transposed), columns * groups those of the other
  const int64_t out_units = transposed ? cols * groups : rows;
  const int64_t in_units = transposed ? rows : cols * groups;
  const char* layout = transposed ? "[in, out/groups, ...]" : "[out, in/groups, ...]";
  // bool [units] or packed bits [ceil(units / 8)]
  const std::string out_what = std::string("output units of a weight of shape ") + c10::str(grad_weight.sizes()) +
                               ", layout " + layout + ", groups=" + std::to_string(groups);
  const std::string in_what = std::string("input units of a weight of shape ") + c10::str(grad_weight.sizes()) +
                              ", layout " + layout + ", groups=" + std::to_string(groups);
  check_flags(op, "frozen_out", frozen_out, {out_units}, out_what.c_str(), "grad_weight", grad_weight);
  if (frozen_in.has_value()) {
    check_flags(op, "frozen_in", *frozen_in, {in_units}, in_what.c_str(), "grad_weight", grad_weight);
  }
  const at::cuda::CUDAGuard guard(grad_weight.device());
  const at::Tensor g = grad_weight.contiguous();
  const at::Tensor fo = frozen_out.contiguous();
  const std::optional<at::Tensor> fi = contiguous_or_none(frozen_in);
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return out;
  const ck::LaunchConfig cfg = launch_config();
  DGM_DISPATCH(g.scalar_type(), "dgm_kernels::block_unit_grad_cuda", [&] {
    ck::block_unit_grad(in_ptr<scalar_t>(g), flags_of(fo), flags_of(fi), out_ptr<scalar_t>(out), rows,
                        cols, inner, transposed, groups, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparsity_terms_cuda(const at::Tensor& mask, const std::optional<at::Tensor>& reserved) {
  constexpr const char* op = "dgm_kernels::sparsity_terms";
  check_float_cuda(op, "mask", mask);
  if (reserved.has_value()) {
    check_bool_on(op, "reserved", *reserved, "mask", mask);
    check_same_shape(op, "reserved", *reserved, "mask", mask);
  }
  const at::cuda::CUDAGuard guard(mask.device());
  if (mask.numel() == 0) return at::zeros({2}, mask.options());  // nothing free, nothing summed
  const at::Tensor m = mask.contiguous();
  const std::optional<at::Tensor> r = contiguous_or_none(reserved);
  at::Tensor out = at::empty({2}, m.options());
  const ck::LaunchConfig cfg = launch_config();
  const ck::SparsityTermsPlan plan = ck::sparsity_terms_plan(m.numel(), m.element_size(), cfg);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, m.options().dtype(at::kByte));
  }
  DGM_DISPATCH(m.scalar_type(), "dgm_kernels::sparsity_terms_cuda", [&] {
    C10_CUDA_CHECK(ck::sparsity_terms(in_ptr<scalar_t>(m), bool_ptr(r), out_ptr<scalar_t>(out), m.numel(), plan,
                                      workspace.defined() ? workspace.mutable_data_ptr() : nullptr, cfg));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// -- the mask ledger ----------------------------------------------------------------------------------

at::Tensor pack_bits_cuda(const at::Tensor& mask) {
  constexpr const char* op = "dgm_kernels::pack_bits";
  TORCH_CHECK(mask.defined() && mask.is_cuda(), op, ": mask must be a CUDA tensor, got ",
              mask.defined() ? c10::str(mask.device()) : std::string("an undefined tensor"));
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  const at::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor bits = at::empty({packed_bytes(m.numel())}, m.options().dtype(at::kByte));
  if (m.numel() == 0) return bits;
  ck::pack_bits(m.const_data_ptr<bool>(), bits.mutable_data_ptr<uint8_t>(), m.numel(), launch_config());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

std::tuple<at::Tensor, at::Tensor> union_count_cuda(const at::Tensor& reserved_bits, const at::Tensor& task_bits,
                                                    int64_t outer, int64_t units, int64_t inner) {
  constexpr const char* op = "dgm_kernels::union_count";
  TORCH_CHECK(outer >= 1 && units >= 1 && inner >= 1, op, ": outer, units and inner must be >= 1, got outer=",
              outer, ", units=", units, ", inner=", inner);
  const int64_t n = outer * units * inner;
  const int64_t nbytes = packed_bytes(n);
  TORCH_CHECK(reserved_bits.defined() && reserved_bits.is_cuda(), op, ": reserved_bits must be a CUDA tensor");
  check_device(op, "task_bits", task_bits, "reserved_bits", reserved_bits);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"reserved_bits", &reserved_bits},
                                std::pair<const char*, const at::Tensor*>{"task_bits", &task_bits}}) {
    TORCH_CHECK(t->scalar_type() == at::kByte, op, ": ", name, " must be packed bits (uint8), got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == nbytes, op, ": ", name, " must have shape [", nbytes, "] (ceil(", n,
                " / 8) bytes for outer * units * inner = ", outer, " * ", units, " * ", inner, " entries), got ",
                t->sizes());
  }
  const at::cuda::CUDAGuard guard(reserved_bits.device());
  const at::Tensor r = reserved_bits.contiguous();
  const at::Tensor t = task_bits.contiguous();
  at::Tensor out = at::empty({nbytes}, r.options());
  at::Tensor counts = at::zeros({units}, r.options().dtype(at::kLong));  // the kernel adds into it
  ck::union_count(r.const_data_ptr<uint8_t>(), t.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(),
                  counts.mutable_data_ptr<int64_t>(), outer, units, inner, launch_config());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, counts};
}

namespace {

// An optimizer tensor updated in place: the kernels need contiguous memory, so a non-contiguous one is
// updated through a contiguous copy written back afterwards (a frozen entry's own bits go back unchanged).
struct InPlace {
  at::Tensor target, work;
  explicit InPlace(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK(std::isfinite(value), op, ": ", name, " must be finite, got ", value);
}

}  // namespace

void masked_adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& frozen, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           bool decoupled) {
  constexpr const char* op = "dgm_kernels::masked_adam_step";
  check_float_cuda(op, "param", param);
  check_like(op, "grad", grad, "param", param);
  check_like(op, "exp_avg", exp_avg, "param", param);
  check_like(op, "exp_avg_sq", exp_avg_sq, "param", param);
  if (frozen.has_value()) check_flags(op, "frozen", *frozen, param.sizes(), "of param", "param", param);
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count of this update), got ", step);
  check_finite(op, "lr", lr);
  check_finite(op, "eps", eps);
  check_finite(op, "weight_decay", weight_decay);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op,
              ": beta1 and beta2 must be in [0, 1), got beta1=", beta1, ", beta2=", beta2);
  const at::cuda::CUDAGuard guard(param.device());
  InPlace p(param), m(exp_avg), v(exp_avg_sq);
  const at::Tensor g = grad.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  if (param.numel() == 0) return;
  const ck::LaunchConfig cfg = launch_config();
  const ck::AdamArgs args{lr, beta1, beta2, eps, weight_decay, step, decoupled};
  DGM_DISPATCH(param.scalar_type(), "dgm_kernels::masked_adam_step_cuda", [&] {
    ck::adam_step(out_ptr<scalar_t>(p.work), in_ptr<scalar_t>(g), out_ptr<scalar_t>(m.work),
                  out_ptr<scalar_t>(v.work), flags_of(fz), param.numel(), args, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.finish();
  m.finish();
  v.finish();
}

void masked_sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                          const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& frozen,
                          double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool first_step) {
  constexpr const char* op = "dgm_kernels::masked_sgd_step";
  check_float_cuda(op, "param", param);
  check_like(op, "grad", grad, "param", param);
  const bool has_momentum = momentum != 0;
  TORCH_CHECK(!has_momentum || momentum_buffer.has_value(), op,
              ": momentum_buffer must be a tensor when momentum != 0 (momentum=", momentum, "), got None");
  if (has_momentum) check_like(op, "momentum_buffer", *momentum_buffer, "param", param);
  if (frozen.has_value()) check_flags(op, "frozen", *frozen, param.sizes(), "of param", "param", param);
  check_finite(op, "lr", lr);
  check_finite(op, "momentum", momentum);
  check_finite(op, "dampening", dampening);
  check_finite(op, "weight_decay", weight_decay);
  const at::cuda::CUDAGuard guard(param.device());
  InPlace p(param);
  std::optional<InPlace> b;
  if (has_momentum) b.emplace(*momentum_buffer);
  const at::Tensor g = grad.contiguous();
  const std::optional<at::Tensor> fz = contiguous_or_none(frozen);
  if (param.numel() == 0) return;
  const ck::LaunchConfig cfg = launch_config();
  const ck::SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, first_step};
  DGM_DISPATCH(param.scalar_type(), "dgm_kernels::masked_sgd_step_cuda", [&] {
    ck::sgd_step(out_ptr<scalar_t>(p.work), in_ptr<scalar_t>(g), b ? out_ptr<scalar_t>(b->work) : nullptr,
                 flags_of(fz), param.numel(), args, cfg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.finish();
  if (b) b->finish();
}

}  // namespace dgm_kernels

// Schemas: csrc/ops.cpp; fake kernels and autograd formulas: dgm_kernels/backends/compiled.py.
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
}
