// Scalar math and index arithmetic of the CUDA kernels, in a header of its own so that it compiles for
// the host too (plain g++): the formulas and the index walks can then be checked without a GPU.
// Everything here is dtype-generic over the compute type A (float for float/half/bfloat16 storage,
// double for double). dgm_kernels/reference.py is the spec.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define DGM_HD __host__ __device__ __forceinline__
#else
#define DGM_HD inline
#endif

namespace dgm_kernels {
namespace cuda_kernels {

// Mask modes (dgm_kernels/_modes.py).
constexpr int kAnneal = 0;  // m = sigmoid(s e)
constexpr int kSte = 1;     // m = 1[e >= 0]; the backward still uses sigmoid'

// |s e| beyond which HAT's compensation cosh(clamp(s e, -50, 50)) stops growing (reference.HAT_CLAMP).
constexpr double kHatClamp = 50.0;

// Magnitudes below this are returned as exactly 0: the contract of csrc/dgm_kernels.h forbids subnormal
// outputs. (float16 has its own subnormal range, 6e-8 .. 6.1e-5, far above this threshold; those values
// are kept, as PyTorch's own float16 ops keep them: the GPU handles them at full speed and flushing them
// would cost accuracy. bfloat16 shares float32's exponent range, so it never gets a subnormal.)
constexpr double kTiny = 1e-30;

DGM_HD float exp_(float x) { return expf(x); }
DGM_HD double exp_(double x) { return exp(x); }

// |x| without fabs overloads (which differ between host and device headers); NaN stays NaN.
template <typename A>
DGM_HD A abs_(A x) {
  return x < A(0) ? -x : x;
}

// v, or exactly 0 when |v| < 1e-30 (NaN and infinities pass through unchanged).
template <typename A>
DGM_HD A flush_tiny(A v) {
  return (v < A(kTiny) && v > -A(kTiny)) ? A(0) : v;
}

// sigmoid(x) from t = exp(-|x|), which never overflows: 1 / (1 + t) for x >= 0, t / (1 + t) below.
// NaN takes the second branch and stays NaN.
template <typename A>
DGM_HD A sigmoid(A x) {
  const A t = exp_(-abs_(x));
  const A r = A(1) / (A(1) + t);
  return x >= A(0) ? r : t * r;
}

// sigmoid'(x) = sigmoid(x) * sigmoid(-x) = t / (1 + t)^2 with t = exp(-|x|). Never computed as
// sigmoid(x) * (1 - sigmoid(x)), which cancels to 0 once |x| passes ~17 (float32).
template <typename A>
DGM_HD A sigmoid_grad(A x) {
  const A t = exp_(-abs_(x));
  const A r = A(1) / (A(1) + t);
  return t * r * r;
}

// The forward mask of one score: 1[e >= 0] (ste; NaN gives 0 like the reference's comparison) or
// sigmoid(s e) (anneal). Not flushed: callers flush what they store, so that W * m is not lost when m
// alone would be below the threshold but the product is not.
template <int Mode, typename A>
DGM_HD A mask_value(A e, A s) {
  if (Mode == kSte) return e >= A(0) ? A(1) : A(0);
  return sigmoid(s * e);
}

// dm/de of one score (reference.mask_derivative), not yet flushed (callers flush their product).
//   plain (compensate false): s * sigmoid'(s e)
//   compensated:              s_max * sigmoid'(e) * r(|s e|),
//                             r(a) = exp(c - a) * ((1 + exp(-c)) / (1 + exp(-a)))^2, c = min(a, 50).
// For a <= 50, c = a and r is exactly 1 in floating point ((1 + t) / (1 + t) == 1), so r is evaluated
// only beyond the clamp; a NaN score skips it and propagates through sigmoid'(e). No term overflows:
// every exponent is <= 0.
template <typename A>
DGM_HD A mask_derivative(A e, A s, A s_max, bool compensate) {
  const A x = s * e;
  if (!compensate) return s * sigmoid_grad(x);
  const A a = abs_(x);
  A ratio = A(1);
  if (a > A(kHatClamp)) {
    const A c = A(kHatClamp);
    const A q = (A(1) + exp_(-c)) / (A(1) + exp_(-a));
    ratio = exp_(c - a) * q * q;
  }
  return s_max * sigmoid_grad(e) * ratio;
}

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
