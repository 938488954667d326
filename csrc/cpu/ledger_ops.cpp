// CPU kernels of the mask ledger (dgm_kernels/ledger.py, optim.py): packing bool masks into bits, the union
// of two packed masks with the per-unit count of newly reserved entries, and the masked Adam / SGD steps
// that never change a frozen entry. dgm_kernels/reference.py (pack_bits, union_count, adam_step_,
// sgd_step_) is the spec; the bit layout is that of dgm_kernels/bits.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../dgm_kernels.h"
#include "bits.h"
#include "../in_place.h"
#include "../op_checks.h"
#include "dispatch.h"
#include "simd_math.h"

namespace dgm_kernels {

namespace cpu {
namespace {

// Bytes per task of the bit kernels (each byte is 8 entries).
constexpr int64_t kGrainBytes = 65536;
// Elements per task of the optimizer steps (a handful of multiplies, a sqrt and a division per element).
constexpr int64_t kGrainOptimizer = 32768;

// bits[j] = the flags of entries 8j .. 8j + 7, for the bytes [first, last) of which none is the partial last
// byte. Eight flag bytes are read as one word and gathered with one multiply.
void pack_full_bytes(const uint8_t* __restrict__ flags, uint8_t* __restrict__ bits, int64_t first, int64_t last) {
  for (int64_t j = first; j < last; ++j) {
    uint64_t word;
    std::memcpy(&word, flags + 8 * j, 8);
    bits[j] = gather_bits(word);
  }
}

// -- union_count ---------------------------------------------------------------------------------------
//
// The mask has n = outer * units * inner entries; entry i belongs to unit (i / inner) % units. The entries
// of one (outer, unit) pair form a run of `inner` consecutive bits that in general starts and ends inside a
// byte. One pass over the bytes: each byte (or 8-byte word, inside a run) is read once from each input,
// its union written once, and the popcount of task & ~reserved added to the unit of the run it lies in;
// only the bytes that straddle a run boundary are split bit range by bit range.
struct RunCursor {
  int64_t inner;
  int64_t units;
  int64_t left;  // bits left in the current run
  int64_t unit;  // unit of the current run

  RunCursor(int64_t first_bit, int64_t inner_, int64_t units_) : inner(inner_), units(units_) {
    const int64_t run = first_bit / inner;
    left = inner - (first_bit - run * inner);
    unit = run % units;
  }

  void next_run() {
    left = inner;
    if (++unit == units) unit = 0;
  }
};

// Counts of task & ~reserved per unit over the bytes [first, last) (added into counts[0 .. units)), writing
// out[j] = reserved[j] | task[j]. valid_last: mask of the bits of byte nbytes - 1 that are entries.
void union_count_range(const uint8_t* __restrict__ reserved, const uint8_t* __restrict__ task,
                       uint8_t* __restrict__ out, int64_t first, int64_t last, int64_t nbytes, uint8_t valid_last,
                       int64_t inner, int64_t units, int64_t* __restrict__ counts) {
  RunCursor cur(8 * first, inner, units);
  int64_t j = first;
  while (j < last) {
    if (cur.left >= 64 && j + 8 <= last && j + 8 < nbytes) {
      // a whole word inside the current run (and not the partial last byte)
      uint64_t r, t;
      std::memcpy(&r, reserved + j, 8);
      std::memcpy(&t, task + j, 8);
      const uint64_t u = r | t;
      std::memcpy(out + j, &u, 8);
      counts[cur.unit] += __builtin_popcountll(t & ~r);
      cur.left -= 64;
      if (cur.left == 0) cur.next_run();
      j += 8;
      continue;
    }
    const uint8_t valid = j == nbytes - 1 ? valid_last : uint8_t(0xff);
    const uint8_t r = reserved[j] & valid, t = task[j] & valid;
    out[j] = static_cast<uint8_t>(r | t);
    unsigned fresh = static_cast<unsigned>(t & ~r) & valid;
    int bit = 0;  // bits of this byte already attributed to a run
    while (bit < 8) {
      const int take = static_cast<int>(std::min<int64_t>(cur.left, 8 - bit));
      const unsigned part = (fresh >> bit) & ((1u << take) - 1u);
      counts[cur.unit] += __builtin_popcount(part);
      bit += take;
      cur.left -= take;
      if (cur.left == 0) cur.next_run();
    }
    ++j;
  }
}

// -- optimizer steps ---------------------------------------------------------------------------------------
//
// The arithmetic mirrors reference.adam_step_ / sgd_step_ operation by operation in T, with the Python-side
// scalars (1 - beta1, lr / bias1, sqrt(bias2), ...) computed in double and rounded to T once, as PyTorch
// does when a tensor is multiplied by a Python float: float32 results agree to float32 rounding.

template <typename T>
struct AdamScalars {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bias2, eps, step_size, weight_decay, decay_factor;
};

// kDecay: 0 none, 1 L2 (added to the gradient), 2 decoupled (AdamW: the parameter shrinks first).
// Frozen entries (fz[i] != 0) get their own bits back: param, exp_avg and exp_avg_sq are unchanged there.
template <typename T, int kDecay, bool kFrozen>
DGM_SIMD_CLONES void adam_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                                 const uint8_t* __restrict__ fz, int64_t n, AdamScalars<T> c) {
  for (int64_t i = 0; i < n; ++i) {
    const T p0 = p[i], m0 = m[i], v0 = v[i];
    T gi = g[i];
    if (kDecay == 1) gi = gi + c.weight_decay * p0;
    const T mi = m0 * c.beta1 + gi * c.one_minus_beta1;
    const T vi = v0 * c.beta2 + gi * gi * c.one_minus_beta2;
    const T denom = std::sqrt(vi) / c.sqrt_bias2 + c.eps;
    T pi = kDecay == 2 ? p0 * c.decay_factor : p0;
    pi = pi - c.step_size * mi / denom;
    if (kFrozen) {
      p[i] = keep_where(fz[i], p0, pi);
      m[i] = keep_where(fz[i], m0, mi);
      v[i] = keep_where(fz[i], v0, vi);
    } else {
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
    }
  }
}

template <typename T>
struct SgdScalars {
  T lr, momentum, one_minus_dampening, weight_decay;
  bool decay, first, nesterov;
};

// kMomentum false: p -= lr * (g + wd p). Else buf = first ? g : buf * momentum + g * (1 - dampening), and
// p -= lr * (nesterov ? g + momentum * buf : buf). The run-time flags are loop-invariant: the compiler
// unswitches the loop on them.
template <typename T, bool kMomentum, bool kFrozen>
DGM_SIMD_CLONES void sgd_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                                const uint8_t* __restrict__ fz, int64_t n, SgdScalars<T> c) {
  for (int64_t i = 0; i < n; ++i) {
    const T p0 = p[i];
    T gi = g[i];
    if (c.decay) gi = gi + c.weight_decay * p0;
    if (kMomentum) {
      const T b0 = buf[i];
      const T bi = c.first ? gi : b0 * c.momentum + gi * c.one_minus_dampening;
      gi = c.nesterov ? gi + c.momentum * bi : bi;
      buf[i] = kFrozen ? keep_where(fz[i], b0, bi) : bi;
    }
    const T pi = p0 - c.lr * gi;
    p[i] = kFrozen ? keep_where(fz[i], p0, pi) : pi;
  }
}

}  // namespace
}  // namespace cpu

using namespace cpu;

at::Tensor pack_bits_cpu(const at::Tensor& mask) {
  checks::check_pack_bits_args(checks::cpu_op("pack_bits"), mask);
  const at::Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  const int64_t nbytes = checks::packed_bytes(n);
  at::Tensor bits = at::empty({nbytes}, m.options().dtype(at::kByte));
  if (n == 0) return bits;
  const auto* flags = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  uint8_t* out = bits.mutable_data_ptr<uint8_t>();
  const int64_t full = n / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t first, int64_t last) { pack_full_bytes(flags, out, first, last); });
  if (full < nbytes) {  // the partial last byte: its padding bits are 0
    uint8_t byte = 0;
    for (int64_t i = 8 * full; i < n; ++i) byte |= static_cast<uint8_t>((flags[i] != 0) << (i - 8 * full));
    out[full] = byte;
  }
  return bits;
}

std::tuple<at::Tensor, at::Tensor> union_count_cpu(const at::Tensor& reserved_bits, const at::Tensor& task_bits,
                                                   int64_t outer, int64_t units, int64_t inner) {
  const int64_t nbytes =
      checks::check_union_count_args(checks::cpu_op("union_count"), reserved_bits, task_bits, outer, units, inner);
  const int64_t n = outer * units * inner;
  const at::Tensor r = reserved_bits.contiguous();
  const at::Tensor t = task_bits.contiguous();
  at::Tensor out = at::empty({nbytes}, r.options());
  at::Tensor counts = at::zeros({units}, r.options().dtype(at::kLong));
  const uint8_t* rp = r.const_data_ptr<uint8_t>();
  const uint8_t* tp = t.const_data_ptr<uint8_t>();
  uint8_t* op_ = out.mutable_data_ptr<uint8_t>();
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  const int bits_in_last = static_cast<int>(n - 8 * (nbytes - 1));
  const auto valid_last = static_cast<uint8_t>((1u << bits_in_last) - 1u);
  // Fixed chunks of whole words, each with its own counts (integers: the sum does not depend on the
  // order); most masks fit one chunk and run on the calling thread.
  const int64_t chunks = (nbytes + kGrainBytes - 1) / kGrainBytes;
  if (chunks == 1) {
    union_count_range(rp, tp, op_, 0, nbytes, nbytes, valid_last, inner, units, cp);
    return {out, counts};
  }
  std::vector<int64_t> partial(static_cast<size_t>(chunks * units), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kGrainBytes;
      union_count_range(rp, tp, op_, begin, std::min(nbytes, begin + kGrainBytes), nbytes, valid_last, inner,
                        units, partial.data() + c * units);
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t u = 0; u < units; ++u) cp[u] += partial[c * units + u];
  }
  return {out, counts};
}

void masked_adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& frozen, double lr,
                          double beta1, double beta2, double eps, double weight_decay, int64_t step,
                          bool decoupled) {
  checks::check_adam_args(checks::cpu_op("masked_adam_step"), param, grad, exp_avg, exp_avg_sq, frozen, lr, beta1,
                          beta2, eps, weight_decay, step);
  InPlace p(param), m(exp_avg), v(exp_avg_sq);
  const at::Tensor g = grad.contiguous();
  at::Tensor frozen_holder;
  const FlagView fz = flag_view(frozen, frozen_holder);
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const int decay = weight_decay == 0 ? 0 : (decoupled ? 2 : 1);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "dgm_kernels::masked_adam_step", [&] {
    using T = scalar_t;
    const AdamScalars<T> c{T(beta1), T(1.0 - beta1), T(beta2), T(1.0 - beta2), T(std::sqrt(bias2)), T(eps),
                           T(lr / bias1), T(weight_decay), T(1.0 - lr * weight_decay)};
    T* pp = p.work.mutable_data_ptr<T>();
    T* mp = m.work.mutable_data_ptr<T>();
    T* vp = v.work.mutable_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    auto run = [&](auto kDecay) {
      with_flag(fz.present(), [&](auto kFrozen) {
        parallel_with_flags(p.work.numel(), kGrainOptimizer, fz, [&](int64_t b, int64_t len, const uint8_t* fp) {
          adam_kernel<T, decltype(kDecay)::value, decltype(kFrozen)::value>(pp + b, gp + b, mp + b, vp + b, fp, len,
                                                                           c);
        });
      });
    };
    if (decay == 0) run(std::integral_constant<int, 0>{});
    else if (decay == 1) run(std::integral_constant<int, 1>{});
    else run(std::integral_constant<int, 2>{});
  });
  p.finish();
  m.finish();
  v.finish();
}

void masked_sgd_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& frozen,
                         double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                         bool first_step) {
  checks::check_sgd_args(checks::cpu_op("masked_sgd_step"), param, grad, momentum_buffer, frozen, lr, momentum,
                         dampening, weight_decay);
  const bool has_momentum = momentum != 0;
  InPlace p(param);
  std::optional<InPlace> b;
  if (has_momentum) b.emplace(*momentum_buffer);
  const at::Tensor g = grad.contiguous();
  at::Tensor frozen_holder;
  const FlagView fz = flag_view(frozen, frozen_holder);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "dgm_kernels::masked_sgd_step", [&] {
    using T = scalar_t;
    const SgdScalars<T> c{T(lr), T(momentum), T(1.0 - dampening), T(weight_decay), weight_decay != 0, first_step,
                          nesterov};
    T* pp = p.work.mutable_data_ptr<T>();
    T* bp = has_momentum ? b->work.mutable_data_ptr<T>() : nullptr;
    const T* gp = g.const_data_ptr<T>();
    with_flag(has_momentum, [&](auto kMomentum) {
      with_flag(fz.present(), [&](auto kFrozen) {
        parallel_with_flags(p.work.numel(), kGrainOptimizer, fz, [&](int64_t s, int64_t len, const uint8_t* fp) {
          sgd_kernel<T, decltype(kMomentum)::value, decltype(kFrozen)::value>(pp + s, gp + s, bp ? bp + s : nullptr,
                                                                             fp, len, c);
        });
      });
    });
  });
  p.finish();
  if (b) b->finish();
}

}  // namespace dgm_kernels
