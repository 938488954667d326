// The mask math of dgm_kernels, written once for the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: scalar
// functions that compile as __host__ __device__ under nvcc and as plain inline functions under the host
// compiler. dgm_kernels/reference.py is the spec (mask, mask_derivative, HAT_CLAMP).
//
// The formulas
//   forward:  m(e) = sigmoid(s e) (anneal) or 1[e >= 0] (ste)
//   backward, plain:        dm/de = s * sigmoid'(s e)
//   backward, compensated:  dm/de = s_max * sigmoid'(e) * r(|s e|)   (HAT, s_max > 0)
//             r(a) = (cosh(min(a, C)) + 1) / (cosh(a) + 1) = exp(c - a) ((1 + exp(-c)) / (1 + exp(-a)))^2,
//             c = min(a, C), C = kHatClamp.
//   For a <= C, r is exactly 1. For a > C the squared factor differs from 1 by < 2 exp(-C) ~ 4e-22, which is
//   below the rounding of float and double alike (1 + 4e-22 rounds to 1), so r = exp(min(C - a, 0)) in both
//   types: that is the form computed here (hat_log_ratio).
//   sigmoid'(x) = sigmoid(x) sigmoid(-x) = t / (1 + t)^2 with t = exp(-|x|); never sigmoid(x) (1 - sigmoid(x)),
//   which cancels to 0 once |x| passes ~17 in float32 and would kill the gradient of every decided score.
//
// The exponential is a parameter of the building blocks (sigmoid_from_exp, sigmoid_grad_from_exp): the CUDA
// kernels pass the hardware exp (sigmoid, sigmoid_grad below), while the CPU kernels pass their own
// branch-free exp (csrc/cpu/simd_math.h), because libm's exp is an opaque call that keeps every loop around it
// scalar. Everything else about the formula is shared.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DGM_HOST_DEVICE __host__ __device__
#define DGM_MATH_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define DGM_HOST_DEVICE
// always_inline: the CPU kernels only vectorise when these calls disappear into their loops
#define DGM_MATH_INLINE inline __attribute__((always_inline))
#else
#define DGM_HOST_DEVICE
#define DGM_MATH_INLINE inline
#endif

// The qualifiers of every function of this header.
#define DGM_MATH_FN DGM_HOST_DEVICE DGM_MATH_INLINE

namespace dgm_kernels {
namespace mask_math {

// Mask modes (dgm_kernels/_modes.py).
constexpr int kAnneal = 0;  // m = sigmoid(s e)
constexpr int kSte = 1;     // m = 1[e >= 0]; the backward still uses sigmoid'

// |s e| beyond which HAT's compensation cosh(clamp(s e, -C, C)) stops growing (reference.HAT_CLAMP). Exposed
// to Python as dgm_kernels._C.HAT_CLAMP so that tests/test_constants.py can compare it with the Python and
// Triton values.
constexpr double kHatClamp = 50.0;

// Magnitudes below this are returned as exactly 0: no kernel may output a subnormal number (csrc/dgm_kernels.h;
// subnormal arithmetic costs ~100x on CPUs).
constexpr double kTiny = 1e-30;

// Overloads rather than std:: functions: the host and device headers declare different std:: sets, while the
// C functions exist in both.
DGM_MATH_FN float exp_of(float x) { return expf(x); }
DGM_MATH_FN double exp_of(double x) { return exp(x); }
DGM_MATH_FN float abs_of(float x) { return fabsf(x); }
DGM_MATH_FN double abs_of(double x) { return fabs(x); }

// v, or exactly +0 when |v| < kTiny. NaN compares false and is kept, and so are the infinities.
template <typename A>
DGM_MATH_FN A flush_tiny(A v) {
  return abs_of(v) < A(kTiny) ? A(0) : v;
}

// sigmoid(x) given t = exp(-|x|) (never overflows): 1 / (1 + t) for x >= 0, t / (1 + t) below; never
// 1 - sigmoid(-x), which cancels. NaN fails x >= 0 and stays NaN through t.
template <typename A>
DGM_MATH_FN A sigmoid_from_exp(A x, A t) {
  const A r = A(1) / (A(1) + t);
  return x >= A(0) ? r : t * r;
}

// sigmoid'(x) = t / (1 + t)^2 given t = exp(-|x|).
template <typename A>
DGM_MATH_FN A sigmoid_grad_from_exp(A t) {
  const A r = A(1) / (A(1) + t);
  return t * r * r;
}

// log r(|x|) = min(C - |x|, 0) for x = s e: HAT's compensation ratio is exp of this (see the top of the file).
// <= 0, so its exp never overflows; NaN stays NaN.
template <typename A>
DGM_MATH_FN A hat_log_ratio(A x) {
  const A excess = A(kHatClamp) - abs_of(x);
  return excess > A(0) ? A(0) : excess;
}

// The same functions with the C library's exp (the CUDA kernels' form).
template <typename A>
DGM_MATH_FN A sigmoid(A x) {
  return sigmoid_from_exp(x, exp_of(-abs_of(x)));
}

template <typename A>
DGM_MATH_FN A sigmoid_grad(A x) {
  return sigmoid_grad_from_exp(exp_of(-abs_of(x)));
}

// The forward mask of one score. Not flushed: callers flush what they store, so that W * m is kept when m
// alone would be below kTiny but the product is not.
template <int Mode, typename A>
DGM_MATH_FN A mask_value(A e, A s) {
  if (Mode == kSte) return e >= A(0) ? A(1) : A(0);  // NaN gives 0, like the reference's comparison
  return sigmoid(s * e);
}

// dm/de of one score (reference.mask_derivative), not yet flushed (callers flush their product). r is
// evaluated only beyond the clamp, where it differs from 1; a NaN score skips it and propagates through
// sigmoid'(e).
template <typename A>
DGM_MATH_FN A mask_derivative(A e, A s, A s_max, bool compensate) {
  const A x = s * e;
  if (!compensate) return s * sigmoid_grad(x);
  const A ratio = abs_of(x) > A(kHatClamp) ? exp_of(hat_log_ratio(x)) : A(1);
  return s_max * sigmoid_grad(e) * ratio;
}

}  // namespace mask_math
}  // namespace dgm_kernels
