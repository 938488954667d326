// Index arithmetic of the CUDA kernels, in a header of its own so that it compiles for the host too (plain
// g++): the index walks can then be checked without a GPU. The mask math they evaluate is csrc/mask_math.h,
// shared with the CPU kernels; its names are brought into cuda_kernels below.
#pragma once

#include <cstdint>

#include "../mask_math.h"

#if defined(__CUDACC__)
#define DGM_HD __host__ __device__ __forceinline__
#else
#define DGM_HD inline
#endif

namespace dgm_kernels {
namespace cuda_kernels {

using mask_math::flush_tiny;
using mask_math::kAnneal;
using mask_math::kSte;
using mask_math::mask_derivative;
using mask_math::mask_value;

// ---------------------------------------------------------------------------------------------------
// Index arithmetic over a contiguous tensor viewed as [rows, cols, inner].

// a / b; when every index of the launch fits in 32 bits (`small`, the same for all threads, so the
// branch never diverges) the 32-bit division is used: 64-bit division is a long emulated sequence.
DGM_HD int64_t div_index(int64_t a, int64_t b, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b)) : a / b;
}

struct Pos3 {
  int64_t row;  // index along dim 0 (may exceed `rows`: callers never need the bound)
  int64_t col;  // index along dim 1, in [0, cols)
  int64_t k;    // flat index over the trailing dims, in [0, inner)
};

// The position of flat index i (0 <= i < rows * cols * inner).
DGM_HD Pos3 decompose(int64_t i, int64_t cols, int64_t inner, bool small) {
  const int64_t q = div_index(i, inner, small);
  const int64_t row = div_index(q, cols, small);
  return Pos3{row, q - row * cols, i - q * inner};
}

// The position of flat index i + 1, from that of i, without any division.
DGM_HD void advance(Pos3& p, int64_t cols, int64_t inner) {
  if (++p.k == inner) {
    p.k = 0;
    if (++p.col == cols) {
      p.col = 0;
      ++p.row;
    }
  }
}

}  // namespace cuda_kernels
}  // namespace dgm_kernels
