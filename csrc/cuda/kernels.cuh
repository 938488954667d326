// Host launchers of the CUDA kernels of dgm_kernels._C, implemented in one .cu file per op family (as
// csrc/cpu splits its ops): mask_kernels.cu, gate_kernels.cu, unit_kernels.cu, ledger_kernels.cu.
//
// This header and the .cu files need no torch header: nvcc compiles them in seconds, and the torch wrappers
// (the *_ops.cpp files, compiled by the host compiler) check arguments, allocate outputs and call these
// launchers with raw pointers to contiguous memory and the stream to run on.
//
// Common rules
// - T is float, double, __half or __nv_bfloat16 (explicit instantiations at the end of each .cu); the
//   math runs in float for the 16-bit types and for float, in double for double.
// - Pointers point to contiguous memory of the stated number of elements; bool pointers are
//   1-byte bools; an optional bool pointer may be null (absent).
// - Nothing is launched when there is no element; every launch goes to `cfg.stream`. A launcher does not
//   check for launch errors: the caller runs C10_CUDA_KERNEL_LAUNCH_CHECK() right after it (the error
//   of a failed launch stays pending in the CUDA runtime until then).
// - s > 0; s_max <= 0 means "no HAT compensation"; mode is kAnneal (0) or kSte (1) of csrc/mask_math.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dgm_kernels {
namespace cuda_kernels {

// Per-entry flags (frozen / frozen_out / frozen_in): one bool byte per entry, or packed bits (entry i is bit
// i % 8, least significant first, of byte i / 8; dgm_kernels/bits.py). data null: absent (nothing flagged).
struct Flags {
  const uint8_t* data;
  bool packed;
};

struct LaunchConfig {
  cudaStream_t stream;
  int sm_count;  // streaming multiprocessors of the current device: sizes the grids
};

// m = mask(e), n elements.
template <typename T>
void mask_forward(const T* scores, T* mask, int64_t n, double s, int mode, const LaunchConfig& cfg);

// grad_e = grad_m * dm/de.
template <typename T>
void mask_backward(const T* grad_m, const T* scores, T* grad_e, int64_t n, double s, double s_max,
                   const LaunchConfig& cfg);

// out = W * mask(e).
template <typename T>
void masked_weight_forward(const T* weight, const T* scores, T* out, int64_t n, double s, int mode,
                           const LaunchConfig& cfg);

// One pass: grad_W = grad * mask(e) * !frozen, grad_e = grad * W * dm/de. frozen may be absent.
template <typename T>
void masked_weight_backward(const T* grad, const T* weight, const T* scores, Flags frozen,
                            T* grad_weight, T* grad_scores, int64_t n, double s, double s_max, int mode,
                            const LaunchConfig& cfg);

// y = y_pre * mask(e[c]) for y_pre viewed as [batch, channels, inner] (inner = product of the dims after
// the channel dim, 1 for [N, C]); scores has `channels` elements.
template <typename T>
void gate_forward(const T* y_pre, const T* scores, T* y, int64_t batch, int64_t channels, int64_t inner,
                  double s, int mode, const LaunchConfig& cfg);

// How gate_backward splits its work: `splits` blocks per channel, and the bytes of device workspace it
// needs (0 when splits == 1: each channel is then reduced by one block, nothing crosses blocks).
struct GateBackwardPlan {
  int64_t splits;
  size_t workspace_bytes;
};

template <typename T>
GateBackwardPlan gate_backward_plan(int64_t batch, int64_t channels, int64_t inner, const LaunchConfig& cfg);

// One kernel: grad_y_pre = grad_y * mask(e[c]) and grad_e[c] = dm/de[c] * sum over batch and inner of
// grad_y * y_pre. `workspace` holds plan.workspace_bytes bytes (null when 0); its contents need no
// initialisation. Launches work (and writes grad_e) even when batch * inner == 0. Returns the error of
// the asynchronous memset of the workspace's counters, if any.
template <typename T>
cudaError_t gate_backward(const T* grad_y, const T* y_pre, const T* scores, T* grad_y_pre, T* grad_scores,
                          int64_t batch, int64_t channels, int64_t inner, double s, double s_max, int mode,
                          const GateBackwardPlan& plan, void* workspace, const LaunchConfig& cfg);

// out = grad_weight with zeros where both units are frozen (frozen_in null: where the output unit is).
// grad_weight is [rows, cols, inner]: [out, in/groups, ...] or, transposed, [in, out/groups, ...]; column j
// of row r belongs to global channel (r / (rows / groups)) * cols + j of the other side.
template <typename T>
void block_unit_grad(const T* grad_weight, Flags frozen_out, Flags frozen_in, T* out, int64_t rows,
                     int64_t cols, int64_t inner, bool transposed, int64_t groups, const LaunchConfig& cfg);

struct SparsityTermsPlan {
  int64_t blocks;
  size_t workspace_bytes;  // 0 when blocks == 1
};

SparsityTermsPlan sparsity_terms_plan(int64_t n, size_t element_size, const LaunchConfig& cfg);

// out[0] = sum of mask over free entries, out[1] = number of free entries (free = !reserved; everything
// when reserved is null), accumulated in double and uint64, converted to T at the end. n > 0.
template <typename T>
cudaError_t sparsity_terms(const T* mask, const bool* reserved, T* out, int64_t n, const SparsityTermsPlan& plan,
                           void* workspace, const LaunchConfig& cfg);

// -- the mask ledger ------------------------------------------------------------------------------------

// bits[ceil(n / 8)] = mask[n] packed (padding bits 0). n > 0.
void pack_bits(const bool* mask, uint8_t* bits, int64_t n, const LaunchConfig& cfg);

// out[j] = reserved[j] | task[j] over the nbytes = ceil(outer * units * inner / 8) bytes (padding bits
// cleared), and counts[u] += number of entries of unit u (entry i: unit (i / inner) % units) set in
// task & ~reserved. counts (units int64) must be zeroed by the caller. One pass over the bytes.
void union_count(const uint8_t* reserved, const uint8_t* task, uint8_t* out, int64_t* counts, int64_t outer,
                 int64_t units, int64_t inner, const LaunchConfig& cfg);

// reference.adam_step_ in place on n entries; frozen entries are not written at all.
struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
  bool decoupled;
};
template <typename T>
void adam_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, Flags frozen, int64_t n, const AdamArgs& args,
               const LaunchConfig& cfg);

// reference.sgd_step_ in place on n entries; momentum_buffer is null when momentum == 0; frozen entries are
// not written at all.
struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};
template <typename T>
void sgd_step(T* param, const T* grad, T* momentum_buffer, Flags frozen, int64_t n, const SgdArgs& args,
              const LaunchConfig& cfg);

}  // namespace cuda_kernels
}  // namespace dgm_kernels
