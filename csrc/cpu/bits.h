// Packed flag arrays (dgm_kernels/bits.py) in the CPU kernels: bit i of byte i / 8, least significant bit
// first. The kernels that read per-entry flags (frozen) are written for one byte per flag; a packed operand
// is expanded chunk by chunk into a small stack buffer (a few KiB, in L1), so the hot loops stay the same
// vectorised byte loops whichever form the caller gave, and no full-size bool tensor is ever allocated.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "simd_math.h"

namespace dgm_kernels {
namespace cpu {

// Per-entry flags as the kernels see them: data == nullptr means "absent" (nothing is flagged).
struct FlagView {
  const uint8_t* data = nullptr;
  bool packed = false;

  bool present() const { return data != nullptr; }
  // Flag of entry i (for the scalar loops over unit vectors).
  bool at(int64_t i) const {
    return packed ? ((data[i >> 3] >> (i & 7)) & 1) != 0 : data[i] != 0;
  }
};

// The view of a checked flag argument (csrc/op_checks.h) the kernels read; absent (nullopt or an undefined
// tensor): the empty view. `holder` keeps the contiguous tensor alive while the view is used.
inline FlagView flag_view(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value() || !t->defined()) return FlagView{};
  holder = t->contiguous();
  if (holder.scalar_type() == at::kByte) return FlagView{holder.const_data_ptr<uint8_t>(), true};
  return FlagView{reinterpret_cast<const uint8_t*>(holder.const_data_ptr<bool>()), false};
}

// Entries per expanded chunk (a multiple of 8).
constexpr int64_t kFlagChunk = 4096;

// The 8 bits of `byte` spread to the least significant bit of 8 bytes, byte k of the (little-endian) word
// holding bit k: keep bit k in byte k of 8 copies, then turn each non-zero byte into 1 (adding 0x7f to a byte
// that is 0 or a single bit 2^k sets its top bit exactly when it is non-zero, without carrying into the next).
DGM_INLINE uint64_t spread_bits(uint8_t byte) {
  const uint64_t kept = (static_cast<uint64_t>(byte) * UINT64_C(0x0101010101010101)) & UINT64_C(0x8040201008040201);
  return ((kept + UINT64_C(0x7f7f7f7f7f7f7f7f)) >> 7) & UINT64_C(0x0101010101010101);
}

// The inverse: the least significant bits of 8 bytes (each 0 or 1) gathered into one byte, byte k -> bit k.
// The multiplier moves bit 8k to bit 56 + k; no two partial products overlap, so nothing carries.
DGM_INLINE uint8_t gather_bits(uint64_t bytes) {
  return static_cast<uint8_t>(((bytes & UINT64_C(0x0101010101010101)) * UINT64_C(0x0102040810204080)) >> 56);
}

// out[k] = flag of entry begin + k (0 or 1), k < len; begin need not be a multiple of 8.
inline void unpack_range(const uint8_t* bits, int64_t begin, int64_t len, uint8_t* out) {
  int64_t k = 0;
  for (; k < len && ((begin + k) & 7) != 0; ++k) out[k] = (bits[(begin + k) >> 3] >> ((begin + k) & 7)) & 1;
  const uint8_t* src = bits + ((begin + k) >> 3);
  for (; k + 8 <= len; k += 8) {
    const uint64_t word = spread_bits(*src++);
    std::memcpy(out + k, &word, 8);
  }
  for (; k < len; ++k) out[k] = (bits[(begin + k) >> 3] >> ((begin + k) & 7)) & 1;
}

// at::parallel_for over [0, n) that hands `body(begin, len, flags)` its flags as one byte per entry
// (flags == nullptr when `frozen` is absent): dense flags are passed through, packed ones expanded in
// chunks of kFlagChunk entries.
template <typename F>
void parallel_with_flags(int64_t n, int64_t grain, const FlagView& frozen, const F& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (!frozen.present()) {
      body(begin, end - begin, static_cast<const uint8_t*>(nullptr));
      return;
    }
    if (!frozen.packed) {
      body(begin, end - begin, frozen.data + begin);
      return;
    }
    alignas(64) uint8_t buffer[kFlagChunk];
    for (int64_t b = begin; b < end; b += kFlagChunk) {
      const int64_t len = std::min(kFlagChunk, end - b);
      unpack_range(frozen.data, b, len, buffer);
      body(b, len, static_cast<const uint8_t*>(buffer));
    }
  });
}

}  // namespace cpu
}  // namespace dgm_kernels
