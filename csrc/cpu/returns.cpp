// CPU kernels for discounted returns, GAE, TD(lambda) and token-level GAE: one reverse
// pass per row, rows spread over the pool.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "rlkern/dtype.h"
#include "rlkern/memory.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/returns.h"
#include "rlkern/returns_api.h"

namespace py = pybind11;

namespace rlk::returns {
namespace {

// Each task walks kLanes rows backwards side by side: one row alone is a serial
// dependency chain, two interleaved keep the core busy, and more rows than that create
// more concurrent descending streams than the hardware prefetchers follow (measured:
// 2 rows 0.84 ns/element in cache, 4 rows 7 ns). Out of cache, software prefetches
// kAhead steps ahead of the walk keep the streams fed.
constexpr int kLanes = 2;
constexpr int64_t kAhead = 256;
constexpr int64_t kPrefetchEvery = 16;

template <class RowFn>
void for_row_groups(int64_t B, int64_t T, RowFn row_fn) {
  const int64_t groups = (B + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, 8192 / (std::max<int64_t>(T, 1) * kLanes));
  parallel_for(groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * kLanes;
      row_fn(b0, int(std::min<int64_t>(kLanes, B - b0)));
    }
  });
}

// Requests element t - kAhead of each stream of each lane, every kPrefetchEvery steps.
template <class... Ptrs>
inline void prefetch_ahead(int64_t t, int64_t b0, int lanes, int64_t T_, Ptrs... ptrs) {
  if (t % kPrefetchEvery != 0 || t < kAhead) return;
  for (int l = 0; l < lanes; ++l) {
    const int64_t i = (b0 + l) * T_ + t - kAhead;
    ((ptrs ? __builtin_prefetch(ptrs + i, 0, 0) : void()), ...);
  }
}

template <class T>
void discounted_impl(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  advise_huge_pages(s.out0, size_t(s.B * s.T_) * sizeof(A));
  for_row_groups(s.B, s.T_, [&](int64_t b0, int lanes) {
    A carry[kLanes];
    for (int l = 0; l < lanes; ++l) carry[l] = s.bootstrap_of(b0 + l);
    for (int64_t t = s.T_ - 1; t >= 0; --t) {
      prefetch_ahead(t, b0, lanes, s.T_, s.rewards, s.terminated, s.out0);
      for (int l = 0; l < lanes; ++l) {
        const int64_t i = s.at(b0 + l, t);
        s.out0[i] = carry[l] = apply(discounted_coef(s.reward(i), s.is_terminated(i), s.gamma), carry[l]);
      }
    }
  });
}

// The optional inputs are template flags so that the inner loop carries no test for them.
template <class T, bool kNextValues, bool kTruncated>
void gae_impl(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  advise_huge_pages(s.out0, size_t(s.B * s.T_) * sizeof(A));
  advise_huge_pages(s.out1, size_t(s.B * s.T_) * sizeof(A));
  for_row_groups(s.B, s.T_, [&](int64_t b0, int lanes) {
    A carry[kLanes], next_v[kLanes];
    for (int l = 0; l < lanes; ++l) {
      carry[l] = A(0);
      next_v[l] = s.bootstrap_of(b0 + l);
    }
    for (int64_t t = s.T_ - 1; t >= 0; --t) {
      prefetch_ahead(t, b0, lanes, s.T_, s.rewards, s.values, s.next_values, s.terminated, s.truncated, s.out0,
                     s.out1);
      for (int l = 0; l < lanes; ++l) {
        const int64_t i = s.at(b0 + l, t);
        const A value = s.value(i);
        const A next_value = kNextValues ? s.next_value(i) : next_v[l];
        carry[l] = apply(gae_coef(s.reward(i), value, next_value, s.is_terminated(i), kTruncated && s.is_truncated(i),
                                  s.gamma, s.gamma_lam),
                         carry[l]);
        next_v[l] = value;
        s.out0[i] = carry[l];
        s.out1[i] = carry[l] + value;
      }
    }
  });
}

template <class T>
void lambda_impl(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  advise_huge_pages(s.out0, size_t(s.B * s.T_) * sizeof(A));
  for_row_groups(s.B, s.T_, [&](int64_t b0, int lanes) {
    A carry[kLanes];
    for (int l = 0; l < lanes; ++l) carry[l] = A(0);
    for (int64_t t = s.T_ - 1; t >= 0; --t) {
      prefetch_ahead(t, b0, lanes, s.T_, s.rewards, s.next_values, s.terminated, s.truncated, s.out0);
      for (int l = 0; l < lanes; ++l) {
        const int64_t i = s.at(b0 + l, t);
        const bool cut = t == s.T_ - 1 || s.is_truncated(i);
        s.out0[i] = carry[l] =
            apply(lambda_coef(s.reward(i), s.next_value(i), s.is_terminated(i), cut, s.gamma, s.lam, s.gamma_lam),
                  carry[l]);
      }
    }
  });
}

template <class T>
void masked_gae_impl(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  advise_huge_pages(s.out0, size_t(s.B * s.T_) * sizeof(A));
  advise_huge_pages(s.out1, size_t(s.B * s.T_) * sizeof(A));
  for_row_groups(s.B, s.T_, [&](int64_t b0, int lanes) {
    A advantage[kLanes], next_value[kLanes];
    for (int l = 0; l < lanes; ++l) advantage[l] = next_value[l] = A(0);
    for (int64_t t = s.T_ - 1; t >= 0; --t) {
      prefetch_ahead(t, b0, lanes, s.T_, s.rewards, s.values, s.terminated, s.out0, s.out1);
      for (int l = 0; l < lanes; ++l) {
        const int64_t i = s.at(b0 + l, t);
        // Computed on every token and kept where unmasked: masks are irregular, and a
        // branch on them mispredicts. Masked inputs (NaN included) never reach a carry.
        const bool unmasked = s.is_unmasked(i);
        const A value = s.value(i);
        advantage[l] =
            apply(masked_gae_coef(s.reward(i), value, next_value[l], unmasked, s.gamma, s.gamma_lam), advantage[l]);
        next_value[l] = unmasked ? value : next_value[l];
        s.out0[i] = unmasked ? advantage[l] : A(0);
        s.out1[i] = unmasked ? advantage[l] + value : A(0);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// float arithmetic (float32, bfloat16 and float16 inputs): 8 steps at a time.
//
// A row is walked right to left in tiles of 8 steps. The tile's 8 affine maps are built
// with vector arithmetic, then suffix-composed in registers (three shift-and-compose
// rounds, so lane k holds f_k o ... o f_7), and the carry from the tile to the right is
// applied to all 8 at once. Only that last application depends on the previous tile, so
// the serial chain is one multiply-add per 8 steps instead of one per step. Compositions
// keep the rule of returns.h: a lane whose coefficient is 0 never reads what lies beyond
// it. The last 1 to 8 steps of a row run through the scalar step, which also keeps every
// tile's "next step" loads inside the row.
#ifdef RLK_SIMD
#define RLK_SCAN_SIMD 1
using simd::v8f;
using simd::v8i;
#define RLK_SCAN_INLINE inline __attribute__((always_inline))

// Tiles without a cut (no episode end, every token unmasked) share one nonzero
// coefficient c: lane k of the composed map is then (c^(8-k), sum_j c^(j-k) b_j), so the
// products need no work and the sums no selects. Uniform(c) holds the powers, each kept
// at FLT_MIN at least (returns.h: an underflowed power would turn an infinite value
// behind it into 0 * inf = NaN). `tiny` says whether any power needed that, i.e.
// whether the general path's compositions can underflow too.
struct Uniform {
  bool usable;  // c != 0: with c == 0 every lane is its own cut, handled by the general path
  bool tiny;
  float c1, c2, c4;
  v8f tail;  // c^8, c^7, ..., c^1
  explicit Uniform(float c) : usable(c != 0.0f), tiny(false), c1(c), c2(power(c * c)), c4(power(c2 * c2)) {
    float p[8];
    float acc = 1.0f;
    for (int k = 7; k >= 0; --k) p[k] = acc = power(acc * c);
    __builtin_memcpy(&tail, p, sizeof tail);
  }

 private:
  float power(float x) {
    if (c1 == 0.0f || x >= min_normal<float>()) return x;
    tiny = true;
    return min_normal<float>();
  }
};

// The 8 flag bytes at f are all 0 (flags are 0/1 bytes).
RLK_SCAN_INLINE bool none_set(const uint8_t* f) {
  uint64_t q;
  __builtin_memcpy(&q, f, sizeof q);
  return q == 0;
}

// The 8 flag bytes at f as the bits of one byte (lane k -> bit k set where byte k != 0).
RLK_SCAN_INLINE uint32_t flag_bits(const uint8_t* f) {
  uint64_t q;
  __builtin_memcpy(&q, f, sizeof q);
  constexpr uint64_t low7 = 0x7f7f7f7f7f7f7f7full;
  const uint64_t nonzero = (((q & low7) + low7) | q) & ~low7;  // the top bit of each nonzero byte
  return uint32_t(((nonzero >> 7) * 0x0102040810204080ull) >> 56);
}

// A tile of masked_gae is the GAE recurrence over its unmasked steps alone: masked steps
// pass both carries through. kCompact[m] (bit k of m: step k unmasked, n of them) packs
// per lane three fields that turn a mixed tile into an all-unmasked one:
//   bits 0-2  gather: lanes 8-n..7 take the unmasked steps in order (a shuffle index);
//   bits 3-5  expand: step k's lane in that compacted vector, or the lane of the next
//             unmasked step where step k is masked (so lane 0 yields the outgoing carry);
//   bit 31    step k is unmasked (an arithmetic shift by 31 makes the lane mask).
// Shuffles read only the low 3 bits of an index, so gather needs no decoding.
struct CompactTable {
  uint32_t lane[256][8];
  constexpr CompactTable() : lane() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int k = 0; k < 8; ++k) n += (m >> k) & 1;
      int before = 0;  // unmasked steps before step k
      for (int k = 0; k < 8; ++k) {
        const bool kept = (m >> k) & 1;
        if (kept) lane[m][8 - n + before] |= uint32_t(k);
        if (before < n) lane[m][k] |= uint32_t(8 - n + before) << 3;
        if (kept) lane[m][k] |= 0x80000000u, ++before;
      }
    }
  }
};
constexpr CompactTable kCompact{};

// Scans one row: step(t, carry) for the scalar steps at the right end, then tiles from
// the right; tile(t0, carry) builds, composes and applies the maps of steps t0..t0+7,
// writes the outputs and returns the carry into step t0 - 1.
template <class Step, class Tile>
RLK_SCAN_INLINE void scan_row8(int64_t T_, Step step, Tile tile) {
  const int64_t tiles_end = T_ - ((T_ - 1) % 8 + 1);
  for (int64_t t = T_ - 1; t >= tiles_end; --t) step(t);
  for (int64_t t0 = tiles_end - 8; t0 >= 0; t0 -= 8) tile(t0);
}

template <class... Ptrs>
RLK_SCAN_INLINE void prefetch_tile(int64_t i0, int64_t t0, Ptrs... ptrs) {
  // Indexed on the flat position: the walk continues into the previous row. A prefetch
  // never faults, so the first row's requests before the buffer are harmless.
  if (t0 % 16 != 0 || i0 < kAhead) return;
  ((ptrs ? __builtin_prefetch(ptrs + i0 - kAhead, 0, 0) : void()), ...);
}

// The row kernels, compiled twice: for baseline x86-64 and for AVX2, one chosen at run
// time (rlk::simd::use_avx2). GCC and clang spell "compile this region for AVX2"
// differently; the wheel is built with clang (zig), the source build usually with GCC,
// and both get the clone. The region holds every function of the rows, lambdas
// included: a target attribute on an entry point alone leaves clang's lambdas out of
// line, compiled once for the baseline and shared by both clones.
//
// The clone targets AVX2 without FMA so that it gives the same bits as the baseline:
// with FMA available, GCC (-ffp-contract=fast, its default) and clang (contraction
// within an expression, its default) fuse a * b + c into one rounding wherever the
// scans write it, here and in returns.h. Without FMA both clones run the same IEEE
// operations in the same order (tests/test_returns.py compares their bits).
#define RLK_SCAN_REGION_AVX2 0
namespace generic {
#include "returns_rows8.inc"
}  // namespace generic
#undef RLK_SCAN_REGION_AVX2
#define RLK_SCAN_REGION_AVX2 1
#if defined(__x86_64__) && defined(__clang__)
#define RLK_SCAN_AVX2 1
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
namespace avx2 {
#include "returns_rows8.inc"
}  // namespace avx2
#pragma clang attribute pop
#elif defined(__x86_64__)
#define RLK_SCAN_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "returns_rows8.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif
#undef RLK_SCAN_REGION_AVX2

// Which build of the row kernels runs here: "avx2" or "baseline" (no AVX2 clone built,
// a CPU without AVX2 and FMA, or RLKERN_DISABLE_AVX2 set).
bool scans_use_avx2() {
#ifdef RLK_SCAN_AVX2
  return rlk::simd::use_avx2();
#else
  return false;
#endif
}

// Runs a scan's row kernel over all rows, a few thousand steps per task, after the
// huge-page advice on its outputs (out1 is null for the one-output scans).
template <class T>
void scan_rows8(const ScanArgs& a, void (*generic)(const Scan<T>&, int64_t, int64_t),
                void (*avx2)(const Scan<T>&, int64_t, int64_t)) {
  const Scan<T> s(a);
  advise_huge_pages(s.out0, size_t(s.B * s.T_) * sizeof(float));
  advise_huge_pages(s.out1, size_t(s.B * s.T_) * sizeof(float));
  const auto fn = scans_use_avx2() ? avx2 : generic;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(s.T_, 1));
  parallel_for(s.B, grain, [&](int64_t b0, int64_t b1) { fn(s, b0, b1); });
}
#ifdef RLK_SCAN_AVX2
#define RLK_SCAN_PAIR(name, ...) &generic::name<__VA_ARGS__>, &avx2::name<__VA_ARGS__>
#else
#define RLK_SCAN_PAIR(name, ...) &generic::name<__VA_ARGS__>, &generic::name<__VA_ARGS__>
#endif
template <class T>
constexpr bool kScan8 = std::is_same<acc_t<T>, float>::value;
#endif  // RLK_SIMD

// Few long rows leave threads idle in the row-parallel kernels. Then each row is cut
// into chunks scanned in three passes: (1) each chunk's steps composed into one affine
// map, in parallel; (2) per row, the carries entering each chunk, chunk by chunk from
// the right; (3) each chunk rescanned from its carry, in parallel, writing the outputs.
// coef(b, t) gives step t's map of row b, init(b) the carry after the row's last step,
// and emit(b, t, y) stores the result. Neither the choice of this path nor the chunk
// length depends on the thread count, so results are bit-identical for any count.
constexpr int64_t kChunk = 4096;

inline bool use_chunks(int64_t B, int64_t T) { return B < 16 && T >= 4 * kChunk; }

template <class A, class Init, class Coef, class Emit>
void chunked_scan(int64_t B, int64_t T, Init init, Coef coef, Emit emit) {
  const int64_t len = kChunk;
  const int64_t C = (T + len - 1) / len;
  std::vector<Affine<A>> summary(size_t(B * C));
  std::vector<A> carry_in(size_t(B * C));
  parallel_for(B * C, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / C, c = k % C;
      Affine<A> f = identity<A>();
      for (int64_t t = std::min(T, (c + 1) * len) - 1; t >= c * len; --t) f = compose(coef(b, t), f);
      summary[size_t(k)] = f;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    A carry = init(b);
    for (int64_t c = C - 1; c >= 0; --c) {
      carry_in[size_t(b * C + c)] = carry;
      carry = apply(summary[size_t(b * C + c)], carry);
    }
  }
  parallel_for(B * C, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / C, c = k % C;
      A y = carry_in[size_t(k)];
      for (int64_t t = std::min(T, (c + 1) * len) - 1; t >= c * len; --t) {
        y = apply(coef(b, t), y);
        emit(b, t, y);
      }
    }
  });
}

template <class T>
void discounted_chunked(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  chunked_scan<A>(
      s.B, s.T_, [&](int64_t b) { return s.bootstrap_of(b); },
      [&](int64_t b, int64_t t) {
        const int64_t i = s.at(b, t);
        return discounted_coef(s.reward(i), s.is_terminated(i), s.gamma);
      },
      [&](int64_t b, int64_t t, A y) { s.out0[s.at(b, t)] = y; });
}

template <class T>
void gae_chunked(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  auto next_value = [&](int64_t b, int64_t t) -> A {
    if (s.next_values) return s.next_value(s.at(b, t));
    return t + 1 < s.T_ ? s.value(s.at(b, t + 1)) : s.bootstrap_of(b);
  };
  chunked_scan<A>(
      s.B, s.T_, [](int64_t) { return A(0); },
      [&](int64_t b, int64_t t) {
        const int64_t i = s.at(b, t);
        return gae_coef(s.reward(i), s.value(i), next_value(b, t), s.is_terminated(i), s.is_truncated(i), s.gamma,
                        s.gamma_lam);
      },
      [&](int64_t b, int64_t t, A y) {
        const int64_t i = s.at(b, t);
        s.out0[i] = y;
        s.out1[i] = y + s.value(i);
      });
}

template <class T>
void lambda_chunked(const ScanArgs& args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  chunked_scan<A>(
      s.B, s.T_, [](int64_t) { return A(0); },
      [&](int64_t b, int64_t t) {
        const int64_t i = s.at(b, t);
        return lambda_coef(s.reward(i), s.next_value(i), s.is_terminated(i), t == s.T_ - 1 || s.is_truncated(i),
                           s.gamma, s.lam, s.gamma_lam);
      },
      [&](int64_t b, int64_t t, A y) { s.out0[s.at(b, t)] = y; });
}

}  // namespace

void discounted_returns_cpu(const ScanArgs& a) {
  RLK_DISPATCH_FLOATING(a.dtype, T, {
    if (use_chunks(a.B, a.T)) discounted_chunked<T>(a);
#ifdef RLK_SCAN_SIMD
    else if constexpr (kScan8<T>) scan_rows8<T>(a, RLK_SCAN_PAIR(discounted_rows8, T));
#endif
    else discounted_impl<T>(a);
  });
}

template <class T, bool kNextValues, bool kTruncated>
void gae_rows(const ScanArgs& a) {
#ifdef RLK_SCAN_SIMD
  if constexpr (kScan8<T>) {
    scan_rows8<T>(a, RLK_SCAN_PAIR(gae_rows8, T, kNextValues, kTruncated));
    return;
  }
#endif
  gae_impl<T, kNextValues, kTruncated>(a);
}

void gae_cpu(const ScanArgs& a) {
  RLK_DISPATCH_FLOATING(a.dtype, T, {
    if (use_chunks(a.B, a.T)) gae_chunked<T>(a);
    else if (a.next_values && a.truncated) gae_rows<T, true, true>(a);
    else if (a.next_values) gae_rows<T, true, false>(a);
    else if (a.truncated) gae_rows<T, false, true>(a);
    else gae_rows<T, false, false>(a);
  });
}
void lambda_returns_cpu(const ScanArgs& a) {
  RLK_DISPATCH_FLOATING(a.dtype, T, {
    if (use_chunks(a.B, a.T)) lambda_chunked<T>(a);
#ifdef RLK_SCAN_SIMD
    else if constexpr (kScan8<T>) scan_rows8<T>(a, RLK_SCAN_PAIR(lambda_rows8, T));
#endif
    else lambda_impl<T>(a);
  });
}
void masked_gae_cpu(const ScanArgs& a) {
  RLK_DISPATCH_FLOATING(a.dtype, T, {
#ifdef RLK_SCAN_SIMD
    if constexpr (kScan8<T>)
      scan_rows8<T>(a, RLK_SCAN_PAIR(masked_gae_rows8, T));
    else
#endif
      masked_gae_impl<T>(a);
  });
}

namespace {

// Group-relative advantages over contiguous groups of `size` rewards.
// estimator 0 = grpo (r - group mean), 1 = rloo (r - mean of the others);
// scale 0 = none, 1 = group std, 2 = the given batch std (unbiased std throughout).
// A zero spread gives zero advantages; a group of one has no spread (std taken as 1).
// Sums, spreads and the division run in double whatever the input: float32 rewards near
// 1e38 would overflow a float sum (NaN advantages) where the float64 result is finite
// and representable. Only the result is rounded to the output type.
template <class T>
void group_advantages_impl(int64_t groups, int64_t size, ptr_t rewards, int estimator, int scale, double eps,
                           double batch_std, ptr_t out_ptr) {
  using Out = acc_t<T>;
  const T* r = as_ptr<const T>(rewards);
  Out* out = as_ptr<Out>(out_ptr);
  parallel_for(groups, std::max<int64_t>(1, 4096 / std::max<int64_t>(size, 1)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t base = g * size;
      double sum = 0;
      bool all_equal = true;
      const double first = double(load(r, base));
      for (int64_t j = 0; j < size; ++j) {
        const double x = double(load(r, base + j));
        sum += x;
        all_equal = all_equal && x == first;
      }
      if (all_equal) {  // exactly zero, whatever the rounding of the mean
        for (int64_t j = 0; j < size; ++j) out[base + j] = Out(0);
        continue;
      }
      const double mean = sum / double(size);
      double sq = 0;
      for (int64_t j = 0; j < size; ++j) {
        const double d = double(load(r, base + j)) - mean;
        sq += d * d;
      }
      double denom = 1;
      if (scale == 1) denom = (size > 1 ? std::sqrt(sq / double(size - 1)) : 1.0) + eps;
      if (scale == 2) denom = batch_std + eps;
      const double centre_scale = estimator == 1 ? double(size) / double(size - 1) : 1.0;
      for (int64_t j = 0; j < size; ++j) {
        const double centred = (double(load(r, base + j)) - mean) * centre_scale;
        out[base + j] = centred == 0.0 ? Out(0) : Out(centred / denom);
      }
    }
  });
}

ScanArgs scan_args(int dtype, int64_t B, int64_t T, ptr_t rewards, ptr_t values, ptr_t next_values, ptr_t bootstrap,
                   ptr_t terminated, ptr_t truncated, double gamma, double lam, ptr_t out0, ptr_t out1) {
  to_dtype(dtype);
  if (B < 0 || T < 0) throw std::invalid_argument("rlkern: negative sizes");
  return ScanArgs{dtype, B, T, rewards, values, next_values, bootstrap, terminated, truncated, gamma, lam, out0, out1};
}

void bind(py::module_& m) {
  using py::arg;
#define RLK_SCAN_BINDING(name, fn)                                                                               \
  m.def(                                                                                                         \
      name,                                                                                                      \
      [](int dtype, int64_t B, int64_t T, ptr_t rewards, ptr_t values, ptr_t next_values, ptr_t bootstrap,      \
         ptr_t terminated, ptr_t truncated, double gamma, double lam, ptr_t out0, ptr_t out1, ptr_t stream) {   \
        const ScanArgs a = scan_args(dtype, B, T, rewards, values, next_values, bootstrap, terminated, truncated, \
                                     gamma, lam, out0, out1);                                                    \
        py::gil_scoped_release nogil;                                                                            \
        fn;                                                                                                      \
      },                                                                                                         \
      arg("dtype"), arg("B"), arg("T"), arg("rewards"), arg("values"), arg("next_values"), arg("bootstrap"),     \
      arg("terminated"), arg("truncated"), arg("gamma"), arg("lam"), arg("out0"), arg("out1"), arg("stream") = 0)
  RLK_SCAN_BINDING("discounted_returns", discounted_returns_cpu(a));
  RLK_SCAN_BINDING("gae", gae_cpu(a));
  RLK_SCAN_BINDING("lambda_returns", lambda_returns_cpu(a));
  RLK_SCAN_BINDING("masked_gae", masked_gae_cpu(a));
  m.def(
      "isa",
      [] {
#ifdef RLK_SCAN_SIMD
        return scans_use_avx2() ? "avx2" : "baseline";
#else
        return "baseline";
#endif
      },
      "Which build of the float scans' row kernels runs here: avx2 or baseline");
#ifdef RLKERN_WITH_CUDA
  RLK_SCAN_BINDING("discounted_returns_cuda", discounted_returns_cuda(a, stream));
  RLK_SCAN_BINDING("gae_cuda", gae_cuda(a, stream));
  RLK_SCAN_BINDING("lambda_returns_cuda", lambda_returns_cuda(a, stream));
  RLK_SCAN_BINDING("masked_gae_cuda", masked_gae_cuda(a, stream));
#endif
#undef RLK_SCAN_BINDING
  m.def(
      "group_advantages",
      [](int dtype, int64_t groups, int64_t size, ptr_t rewards, int estimator, int scale, double eps,
         double batch_std, ptr_t out) {
        to_dtype(dtype);
        py::gil_scoped_release nogil;
        RLK_DISPATCH_FLOATING(dtype, T,
                              group_advantages_impl<T>(groups, size, rewards, estimator, scale, eps, batch_std, out));
      },
      arg("dtype"), arg("groups"), arg("size"), arg("rewards"), arg("estimator"), arg("scale"), arg("eps"),
      arg("batch_std"), arg("out"));
}

}  // namespace
}  // namespace rlk::returns

RLK_REGISTER_BINDINGS(returns, rlk::returns::bind);
