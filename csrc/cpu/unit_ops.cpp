// CPU kernels of the DGMa gradient blocking (block_unit_grad) and of the sparsity regulariser's per-layer
// terms (sparsity_terms).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../dgm_kernels.h"
#include "bits.h"
#include "../op_checks.h"
#include "dispatch.h"
#include "simd_math.h"

namespace dgm_kernels {

namespace cpu {
namespace {

// Sum of mask over the free entries (double) and their count, over one chunk. The kernel is fed fixed-size
// chunks whose partial results are added in chunk order, so the result does not depend on the thread count.
template <typename T, bool kReserved>
DGM_SIMD_CLONES void free_sum_kernel(const T* __restrict__ m, const uint8_t* __restrict__ reserved, int64_t n,
                                     double* sum_out, int64_t* count_out) {
  double sum = 0.0;
  if (!kReserved) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(m[i]);
    *sum_out = sum;
    *count_out = n;
    return;
  }
  int64_t reserved_count = 0;
#pragma omp simd reduction(+ : sum, reserved_count)
  for (int64_t i = 0; i < n; ++i) {
    sum += static_cast<double>(zero_where(reserved[i], m[i]));
    reserved_count += reserved[i] != 0;
  }
  *sum_out = sum;
  *count_out = n - reserved_count;
}

constexpr int64_t kSumChunk = 32768;

}  // namespace
}  // namespace cpu

using namespace cpu;

at::Tensor block_unit_grad_cpu(const at::Tensor& grad_weight, const at::Tensor& frozen_out,
                               const std::optional<at::Tensor>& frozen_in, bool transposed, int64_t groups) {
  const checks::UnitGradShape shape =
      checks::check_block_unit_grad_args(checks::cpu_op("block_unit_grad"), grad_weight, frozen_out, frozen_in,
                                         transposed, groups);
  const int64_t rows = shape.rows;
  const int64_t cols = shape.cols;
  const bool has_in = checks::has_tensor(frozen_in);
  const at::Tensor g = grad_weight.contiguous();
  // bool bytes or packed bits: read per (row, column) pair, once per `inner` elements
  at::Tensor fo_holder, fi_holder;
  const FlagView fo = flag_view(frozen_out, fo_holder);
  const FlagView fi = flag_view(frozen_in, fi_holder);
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return out;
  const int64_t inner = g.numel() / (rows * cols);
  const int64_t rows_per_group = rows / groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dgm_kernels::block_unit_grad", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const int64_t row_len = cols * inner;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainStreaming / std::max<int64_t>(row_len, 1)),
                     [&](int64_t first, int64_t last) {
                       for (int64_t r = first; r < last; ++r) {
                         const int64_t base = (r / rows_per_group) * cols;  // global channel of column 0
                         for (int64_t j = 0; j < cols; ++j) {
                           const bool blocked = transposed ? (fo.at(base + j) && (!has_in || fi.at(r)))
                                                           : (fo.at(r) && (!has_in || fi.at(base + j)));
                           const int64_t offset = (r * cols + j) * inner;
                           if (blocked) {
                             std::fill(op_ + offset, op_ + offset + inner, scalar_t(0));
                           } else {
                             std::memcpy(op_ + offset, gp + offset, sizeof(scalar_t) * inner);
                           }
                         }
                       }
                     });
  });
  return out;
}

at::Tensor sparsity_terms_cpu(const at::Tensor& mask, const std::optional<at::Tensor>& reserved) {
  checks::check_sparsity_terms_args(checks::cpu_op("sparsity_terms"), mask, reserved);
  const at::Tensor m = mask.contiguous();
  const bool has_reserved = checks::has_tensor(reserved);
  const at::Tensor r = has_reserved ? reserved->contiguous() : at::Tensor();
  const int64_t n = m.numel();
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> sums(static_cast<size_t>(chunks), 0.0);
  std::vector<int64_t> counts(static_cast<size_t>(chunks), 0);
  at::Tensor out = at::empty({2}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "dgm_kernels::sparsity_terms", [&] {
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const auto* rp = has_reserved ? reinterpret_cast<const uint8_t*>(r.const_data_ptr<bool>()) : nullptr;
    with_flag(has_reserved, [&](auto kReserved) {
      at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c) {
          const int64_t begin = c * kSumChunk;
          const int64_t len = std::min(kSumChunk, n - begin);
          free_sum_kernel<scalar_t, decltype(kReserved)::value>(mp + begin, rp ? rp + begin : nullptr, len,
                                                                 &sums[c], &counts[c]);
        }
      });
    });
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += sums[c];
      count += counts[c];
    }
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    op_[0] = to_output<scalar_t>(sum);
    op_[1] = static_cast<scalar_t>(count);
  });
  return out;
}

}  // namespace dgm_kernels
