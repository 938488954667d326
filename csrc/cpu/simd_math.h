// Branch-free scalar math for the CPU kernels, written so that GCC/Clang vectorise the loops that call it.
// The mask formulas themselves (sigmoid, sigmoid', HAT's compensation, the constants) are those of
// csrc/mask_math.h, shared with the CUDA kernels; this header supplies what the CPU needs beyond them: an
// exponential that vectorises, and the clamps that keep every intermediate out of the subnormal range.
//
// Why not std::exp: libm's exp is an opaque call, so a loop calling it stays scalar unless the whole
// translation unit is built with -ffast-math, and -ffast-math is not acceptable here: it links code that
// sets flush-to-zero for the whole process, which changes the results of every other op (SPEC section 8
// measured a run going from 89.1 to 34.5 accuracy because of exactly that). The functions below use only
// +, *, /, comparisons and integer bit manipulation, so every loop over them vectorises.
//
// Subnormals: every function clamps its argument so that no intermediate is subnormal, and the kernels
// return exactly 0 for any result below kTiny (1e-30) in magnitude. Subnormal arithmetic costs ~100x on
// most CPUs, and sigmoid(s e) with s up to 1e5 produces them all the time otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../mask_math.h"

// Compile the hot loops for several instruction sets and pick one when the library is loaded (GNU ifunc):
// the wheel stays portable (baseline x86-64) yet uses AVX2 / AVX-512 where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(DGM_KERNELS_NO_TARGET_CLONES)
#define DGM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DGM_HAS_TARGET_CLONES 1
#else
#define DGM_SIMD_CLONES
#define DGM_HAS_TARGET_CLONES 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DGM_INLINE inline __attribute__((always_inline))
#else
#define DGM_INLINE inline
#endif

namespace dgm_kernels {
namespace cpu {

using mask_math::flush_tiny;  // a compare and a blend: vectorises
using mask_math::kTiny;

// e^x for x <= 0 in float, relative error ~2 ulp. Arguments below -87 are clamped (e^-87 ~ 1.6e-38 is the
// last normal float); callers only use results that large when they matter.
DGM_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 shifter: afterwards the low mantissa bits of t hold n
  constexpr float kShifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + kShifter;
  const float n = t - kShifter;
  // Cody-Waite reduction: ln2 split so that n * kLn2Hi is exact for |n| < 2^15
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // e^r on |r| <= ln2/2 by its Taylor series to degree 7 (truncation < 6e-9)
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n, n in [-126, 0]: a normal float
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// e^x for x <= 0 in double. kDegree 13 gives full double accuracy (~1 ulp); 7 gives ~1e-8 relative, enough
// for a result that is rounded to float afterwards. Arguments below -700 are clamped.
template <int kDegree = 13>
DGM_INLINE double exp_nonpos(double x) {
  static_assert(kDegree == 7 || kDegree == 13, "exp_nonpos<double>: degree 7 or 13");
  x = x < -700.0 ? -700.0 : x;
  constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634074 + kShifter;
  const double n = t - kShifter;
  double r = x - n * 6.93147180369123816490e-01;  // ln2 high part: trailing zero bits, n * hi exact
  r = r - n * 1.90821492927058770002e-10;         // ln2 low part
  double p;
  if (kDegree == 13) {
    p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
  } else {
    p = 1.0 / 5040.0;
  }
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - INT64_C(0x4338000000000000) + 1023) << 52;  // 2^n, n in [-1010, 0]
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The degree of the double exp needed for results that end up in T.
template <typename T>
struct AccExp;
template <>
struct AccExp<float> {
  static constexpr int kDegree = 7;
};
template <>
struct AccExp<double> {
  static constexpr int kDegree = 13;
};

// sigmoid(x) in T, from e^-|x| (never 1 - sigmoid: no cancellation), flushed below kTiny. |x| is clamped at
// 80, where sigmoid(-x) ~ 1.8e-35 is already flushed, so e^-|x| is never subnormal.
template <typename T>
DGM_INLINE T sigmoid_flushed(T x) {
  T a = std::fabs(x);
  a = a > T(80) ? T(80) : a;
  return flush_tiny(mask_math::sigmoid_from_exp(x, exp_nonpos(-a)));
}

// The forward mask m(e) in T. x = s * e must be computed in T by the caller, exactly as the reference does
// (scores * s in the scores' dtype), so both see the same rounding of s e.
template <typename T, int kMode>
DGM_INLINE T mask_value(T e, T x) {
  if (kMode == mask_math::kSte) return e >= T(0) ? T(1) : T(0);  // ste: 1[e >= 0] (NaN -> 0, as the reference)
  return sigmoid_flushed(x);
}

// sigmoid'(y) = sigmoid(y) sigmoid(-y) = u / (1 + u)^2 with u = e^-|y|, in double (the caller's result is
// rounded to T once). |y| is clamped at 300: beyond, the true value is < 1e-130, which every caller flushes,
// and the clamp keeps the products below from reaching double's subnormal range.
template <typename T>
DGM_INLINE double sigmoid_prime(double y) {
  double a = std::fabs(y);
  a = a > 300.0 ? 300.0 : a;
  return mask_math::sigmoid_grad_from_exp(exp_nonpos<AccExp<T>::kDegree>(-a));
}

// dm/de in double (the formulas: csrc/mask_math.h):
//   plain (kCompensate false): s * sigmoid'(s e)
//   HAT (kCompensate true):   s_max * sigmoid'(e) * exp(min(C - |s e|, 0))
// The exponent is clamped at -300 besides: a smaller factor would only push the product into double's
// subnormal range, and every caller flushes it anyway. x is s * e as computed in T (see mask_value).
template <typename T, bool kCompensate>
DGM_INLINE double mask_derivative(T e, T x, double s, double s_max) {
  if (!kCompensate) return s * sigmoid_prime<T>(static_cast<double>(x));
  double excess = mask_math::hat_log_ratio(static_cast<double>(x));
  excess = excess < -300.0 ? -300.0 : excess;
  return s_max * sigmoid_prime<T>(static_cast<double>(e)) * exp_nonpos<AccExp<T>::kDegree>(excess);
}

// v where flag == 0, else +0. Done on the bits (an AND with an all-ones or all-zeros mask) because a
// select between float lanes on a byte-sized condition loaded from memory defeats GCC's vectoriser; the
// flag is read as a byte (a bool tensor's storage), any non-zero byte meaning "set".
template <typename T>
struct SameSizeInt;
template <>
struct SameSizeInt<float> {
  using type = int32_t;
};
template <>
struct SameSizeInt<double> {
  using type = int64_t;
};

template <typename T>
DGM_INLINE T zero_where(uint8_t flag, T v) {
  using I = typename SameSizeInt<T>::type;
  I bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= -static_cast<I>(flag == 0);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// keep where flag != 0, else v: a blend on the bits (see zero_where), so the kept value is bit-identical
// (NaN payloads and signed zeros included) and the loop still vectorises.
template <typename T>
DGM_INLINE T keep_where(uint8_t flag, T keep, T v) {
  using I = typename SameSizeInt<T>::type;
  I k, b;
  std::memcpy(&k, &keep, sizeof k);
  std::memcpy(&b, &v, sizeof b);
  const I sel = -static_cast<I>(flag != 0);  // all ones where flagged
  b = (k & sel) | (b & ~sel);
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// v (double) rounded to T, with every result below kTiny returned as 0.
template <typename T>
DGM_INLINE T to_output(double v) {
  return static_cast<T>(flush_tiny(v));
}

}  // namespace cpu
}  // namespace dgm_kernels
