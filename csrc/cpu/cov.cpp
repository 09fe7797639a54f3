// The covariance selection of verl's Clip-Cov and KL-Cov policy losses on CPU tensors:
// (A - mean A)(lp - mean lp) per token, the means over the active tokens, in the
// arithmetic type of the storage (float for float32/bfloat16/float16, double for float64).
//
// Pass 1 takes per-row masked sums in float64, added in row order afterwards, so the means
// never depend on the thread count. Pass 2 either lists Clip-Cov's candidates (active,
// PPO-unclipped, covariance strictly inside (lb, ub)) in row-major order, or writes KL-Cov's
// covariance with -inf at inactive tokens for the caller's top-k. Masked positions are
// skipped, so NaN or inf there reach neither a sum nor a candidate test.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/losses.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

namespace py = pybind11;

// Floating-point exceptions are never inspected: lets GCC turn the selects into blends.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace rlk::cov {
namespace {

struct Sums {
  double count = 0.0, adv = 0.0, logp = 0.0, abs_lr = 0.0;
};

// Rows per task: a row of 4096 tokens is ~50 us of work, well above the pool's overhead.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(T, 1)); }

// The arithmetic type for advantages stored as TA and log-probs as T: double when either is
// float64, float otherwise (torch's promotion with float32, the type the torch path uses).
template <class TA, class T>
using calc_t = decltype(acc_t<TA>() + acc_t<T>());

// Four interleaved accumulators in a fixed order (so the row's sums stay independent of the
// thread count) break the float64 add chains; inactive tokens are selected out, not
// multiplied by 0, so NaN there never reaches a sum.
template <class TA, class T>
Sums row_sums(const TA* a, int64_t a_step, const T* lp, const T* old, const uint8_t* m, int64_t n, bool with_kl) {
  using C = calc_t<TA, T>;
  double cnt[4] = {0, 0, 0, 0}, sa[4] = {0, 0, 0, 0}, sl[4] = {0, 0, 0, 0}, sd[4] = {0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    for (int j = 0; j < 4; ++j) {
      const bool on = m[t + j] != 0;
      const C l = C(load(lp, t + j));
      cnt[j] += on ? 1.0 : 0.0;
      sa[j] += on ? double(load(a, (t + j) * a_step)) : 0.0;
      sl[j] += on ? double(l) : 0.0;
      if (with_kl) sd[j] += on ? double(std::abs(C(l - C(load(old, t + j))))) : 0.0;
    }
  }
  for (; t < n; ++t) {
    const bool on = m[t] != 0;
    const C l = C(load(lp, t));
    cnt[0] += on ? 1.0 : 0.0;
    sa[0] += on ? double(load(a, t * a_step)) : 0.0;
    sl[0] += on ? double(l) : 0.0;
    if (with_kl) sd[0] += on ? double(std::abs(C(l - C(load(old, t))))) : 0.0;
  }
  Sums s;
  s.count = (cnt[0] + cnt[1]) + (cnt[2] + cnt[3]);
  s.adv = (sa[0] + sa[1]) + (sa[2] + sa[3]);
  s.logp = (sl[0] + sl[1]) + (sl[2] + sl[3]);
  s.abs_lr = (sd[0] + sd[1]) + (sd[2] + sd[3]);
  return s;
}

// Clip-Cov's candidates among tokens [0, n) of a row, written as base + t; returns the count.
// verl compares its tensors with Python scalars, which torch casts to the tensor's type.
template <class TA, class T, class C = calc_t<TA, T>>
int64_t clip_row_scalar(const TA* ar, int64_t a_step, const T* lr, const T* orow, const uint8_t* mr, int64_t n,
                        int64_t base, C mean_a, C mean_lp, C cl, C cu, C lo, C hi, int64_t* dst) {
  int64_t c = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (!mr[t]) continue;
    const C av = C(load(ar, t * a_step));
    const C l = C(load(lr, t));
    const C cov = C(av - mean_a) * C(l - mean_lp);
    if (!(cov < cu && cov > cl)) continue;
    // exp_: the vector body's exp lane for lane (float), std::exp for float64
    const C r = losses::exp_(C(l - C(load(orow, t))));
    const C na = -av;
    const C clamped = std::min(std::max(r, lo), hi);
    // PPO-clipped tokens are no candidates (NaN ratios compare false: kept as verl does).
    if (C(na * clamped) > C(na * r)) continue;
    dst[c++] = base + t;
  }
  return c;
}

// ---------------------------------------------------------------------------------------
// Vector bodies (float32 and bfloat16 storage, advantages per token or one per row): the
// sums in float64 lanes, the covariance and the PPO-clip test in float lanes, compiled for
// AVX2 and for baseline x86-64 (SSE pairs) and chosen at run time. Per token they are the
// scalar bodies' arithmetic, so both builds and the scalar tails make the same decisions.
#ifdef RLK_SIMD
#define RLK_COV_INLINE inline __attribute__((always_inline))
using simd::v8f;
using simd::v8i;
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint16_t v4h __attribute__((vector_size(8)));
typedef uint8_t v4b __attribute__((vector_size(4)));
typedef int64_t v4q __attribute__((vector_size(32)));

template <class T>
constexpr bool kVec = simd::kLanes<T>;

RLK_COV_INLINE v4f load4(const float* p) {
  v4f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
RLK_COV_INLINE v4f load4(const bf16* p) {
  v4h h;
  __builtin_memcpy(&h, p, sizeof h);
  return (v4f)(__builtin_convertvector(h, v4i) << 16);
}
// Four flag bytes as float64-lane masks (-1 where nonzero).
RLK_COV_INLINE v4q mask4(const uint8_t* m) {
  v4b b;
  __builtin_memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, v4q) != 0;
}
RLK_COV_INLINE v4d widen(v4f x) { return __builtin_convertvector(x, v4d); }
RLK_COV_INLINE bool any_lane(v8i x) {
  const v4q q = (v4q)x;
  return ((q[0] | q[1]) | (q[2] | q[3])) != 0;
}
// The advantage at tokens t..t+7: per token (a_step 1) or the row's one value (a_step 0).
template <class TA>
RLK_COV_INLINE v8f adv8(const TA* a, int64_t a_step, int64_t t) {
  return a_step ? simd::load8(a, t) : v8f{} + float(load(a, 0));
}
template <class TA>
RLK_COV_INLINE v4f adv4(const TA* a, int64_t a_step, int64_t t) {
  return a_step ? load4(a + t) : v4f{} + float(load(a, 0));
}

// row_sums 8 tokens a step: two sets of four float64 lanes; the tail goes to the scalar body.
template <class TA, class T>
RLK_COV_INLINE Sums row_sums_impl(const TA* a, int64_t a_step, const T* lp, const T* old, const uint8_t* m,
                                  int64_t n, bool with_kl) {
  const v4d zero = v4d{}, one = v4d{} + 1.0;
  v4d cnt[2] = {zero, zero}, sa[2] = {zero, zero}, sl[2] = {zero, zero}, sd[2] = {zero, zero};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int h = 0; h < 2; ++h) {
      const int64_t i = t + 4 * h;
      const v4q on = mask4(m + i);
      const v4f l = load4(lp + i);
      cnt[h] += on ? one : zero;
      sa[h] += on ? widen(adv4(a, a_step, i)) : zero;
      sl[h] += on ? widen(l) : zero;
      if (with_kl) {
        const v4f d = l - load4(old + i);
        sd[h] += on ? widen((v4f)((v4i)d & 0x7fffffff)) : zero;
      }
    }
  }
  const Sums tail = row_sums(a + t * a_step, a_step, lp + t, old + t, m + t, n - t, with_kl);
  auto total = [](const v4d* v) { const v4d x = v[0] + v[1]; return (x[0] + x[1]) + (x[2] + x[3]); };
  Sums s;
  s.count = total(cnt) + tail.count;
  s.adv = total(sa) + tail.adv;
  s.logp = total(sl) + tail.logp;
  s.abs_lr = total(sd) + tail.abs_lr;
  return s;
}

// Clip-Cov's candidates of one row (see clip_candidates), 8 tokens a step; returns the count.
template <class TA, class T>
RLK_COV_INLINE int64_t clip_row_impl(const TA* ar, int64_t a_step, const T* lr, const T* orow, const uint8_t* mr,
                                     int64_t T_, int64_t base, float mean_a, float mean_lp, float cl, float cu,
                                     float lo, float hi, int64_t* dst) {
  const v8f ma = v8f{} + mean_a, ml = v8f{} + mean_lp, vcl = v8f{} + cl, vcu = v8f{} + cu;
  const v8f vlo = v8f{} + lo, vhi = v8f{} + hi;
  int64_t c = 0, t = 0;
  for (; t + 8 <= T_; t += 8) {
    const v8f av = adv8(ar, a_step, t), l = simd::load8(lr, t);
    const v8f cov = (av - ma) * (l - ml);
    v8i cand = simd::mask_bytes(mr + t) & (cov < vcu) & (cov > vcl);
    if (!any_lane(cand)) continue;
    const v8f r = simd::exp8(l - simd::load8(orow, t));
    const v8f na = -av;
    v8f clamped = r < vlo ? vlo : r;
    clamped = clamped > vhi ? vhi : clamped;
    cand &= ~((na * clamped) > (na * r));
    // branch-free compaction: candidates are scattered (~15% of tokens on typical data)
    for (int j = 0; j < 8; ++j) {
      dst[c] = base + t + j;
      c += cand[j] & 1;
    }
  }
  return c + clip_row_scalar(ar + t * a_step, a_step, lr + t, orow + t, mr + t, T_ - t, base + t, mean_a, mean_lp,
                             cl, cu, lo, hi, dst + c);
}

// KL-Cov: the covariances of `len` tokens (-inf where inactive) into vals, and per group of
// 8 whether any lane is above thr or NaN (the only groups the caller's scan must visit).
template <class TA, class T>
RLK_COV_INLINE void cov_chunk_impl(const TA* ar, int64_t a_step, const T* lr, const uint8_t* mr, int64_t len,
                                   float mean_a, float mean_lp, float thr, float* vals, uint8_t* hot) {
  const v8f ma = v8f{} + mean_a, ml = v8f{} + mean_lp, ninf = v8f{} - __builtin_inff(), vthr = v8f{} + thr;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const v8f cov = (adv8(ar, a_step, j) - ma) * (simd::load8(lr, j) - ml);
    const v8f v = simd::mask_bytes(mr + j) ? cov : ninf;
    simd::store8(vals, j, v);
    hot[j / 8] = any_lane((v > vthr) | (v != v));
  }
  for (; j < len; ++j) vals[j] = mr[j] ? float((float(load(ar, j * a_step)) - mean_a) * (float(load(lr, j)) - mean_lp))
                                       : -__builtin_inff();
  if (len % 8) hot[len / 8] = 1;
}

#if defined(__x86_64__)
#define RLK_COV_AVX2 1
template <class TA, class T>
__attribute__((target("avx2,fma"))) Sums row_sums_avx2(const TA* a, int64_t a_step, const T* lp, const T* old,
                                                       const uint8_t* m, int64_t n, bool with_kl) {
  return row_sums_impl(a, a_step, lp, old, m, n, with_kl);
}
template <class TA, class T>
__attribute__((target("avx2,fma"))) int64_t clip_row_avx2(const TA* ar, int64_t a_step, const T* lr, const T* orow,
                                                          const uint8_t* mr, int64_t T_, int64_t base, float mean_a,
                                                          float mean_lp, float cl, float cu, float lo, float hi,
                                                          int64_t* dst) {
  return clip_row_impl(ar, a_step, lr, orow, mr, T_, base, mean_a, mean_lp, cl, cu, lo, hi, dst);
}
template <class TA, class T>
__attribute__((target("avx2,fma"))) void cov_chunk_avx2(const TA* ar, int64_t a_step, const T* lr, const uint8_t* mr,
                                                        int64_t len, float mean_a, float mean_lp, float thr,
                                                        float* vals, uint8_t* hot) {
  cov_chunk_impl(ar, a_step, lr, mr, len, mean_a, mean_lp, thr, vals, hot);
}
#endif
template <class TA, class T>
Sums row_sums_generic(const TA* a, int64_t a_step, const T* lp, const T* old, const uint8_t* m, int64_t n,
                      bool with_kl) {
  return row_sums_impl(a, a_step, lp, old, m, n, with_kl);
}
template <class TA, class T>
int64_t clip_row_generic(const TA* ar, int64_t a_step, const T* lr, const T* orow, const uint8_t* mr, int64_t T_,
                         int64_t base, float mean_a, float mean_lp, float cl, float cu, float lo, float hi,
                         int64_t* dst) {
  return clip_row_impl(ar, a_step, lr, orow, mr, T_, base, mean_a, mean_lp, cl, cu, lo, hi, dst);
}
template <class TA, class T>
void cov_chunk_generic(const TA* ar, int64_t a_step, const T* lr, const uint8_t* mr, int64_t len, float mean_a,
                       float mean_lp, float thr, float* vals, uint8_t* hot) {
  cov_chunk_impl(ar, a_step, lr, mr, len, mean_a, mean_lp, thr, vals, hot);
}
#endif

// Whether the vector bodies take these storage types and this advantage layout.
template <class TA, class T>
Sums row_sums_any(const TA* a, int64_t a_step, const T* lp, const T* old, const uint8_t* m, int64_t n, bool with_kl) {
#ifdef RLK_SIMD
  if constexpr (kVec<TA> && kVec<T>) {
    if (a_step == 0 || a_step == 1) {
#ifdef RLK_COV_AVX2
      if (simd::use_avx2()) return row_sums_avx2(a, a_step, lp, old, m, n, with_kl);
#endif
      return row_sums_generic(a, a_step, lp, old, m, n, with_kl);
    }
  }
#endif
  return row_sums(a, a_step, lp, old, m, n, with_kl);
}

// The vector chunk of kl_topk where the types allow it; false: the caller computes it.
template <class TA, class T, class C>
bool cov_chunk(const TA* ar, int64_t a_step, const T* lr, const uint8_t* mr, int64_t len, C mean_a, C mean_lp, C thr,
               C* vals, uint8_t* hot) {
#ifdef RLK_SIMD
  if constexpr (kVec<TA> && kVec<T>) {
    if (a_step == 0 || a_step == 1) {
#ifdef RLK_COV_AVX2
      if (simd::use_avx2()) {
        cov_chunk_avx2(ar, a_step, lr, mr, len, mean_a, mean_lp, thr, vals, hot);
        return true;
      }
#endif
      cov_chunk_generic(ar, a_step, lr, mr, len, mean_a, mean_lp, thr, vals, hot);
      return true;
    }
  }
#endif
  return false;
}

template <class TA, class T, class C = calc_t<TA, T>>
int64_t clip_row(const TA* ar, int64_t a_step, const T* lr, const T* orow, const uint8_t* mr, int64_t T_,
                 int64_t base, C mean_a, C mean_lp, C cl, C cu, C lo, C hi, int64_t* dst) {
#ifdef RLK_SIMD
  if constexpr (kVec<TA> && kVec<T>) {
    if (a_step == 0 || a_step == 1) {
#ifdef RLK_COV_AVX2
      if (simd::use_avx2())
        return clip_row_avx2(ar, a_step, lr, orow, mr, T_, base, mean_a, mean_lp, cl, cu, lo, hi, dst);
#endif
      return clip_row_generic(ar, a_step, lr, orow, mr, T_, base, mean_a, mean_lp, cl, cu, lo, hi, dst);
    }
  }
#endif
  return clip_row_scalar(ar, a_step, lr, orow, mr, T_, base, mean_a, mean_lp, cl, cu, lo, hi, dst);
}

// Returns (active count, sum of A, sum of lp, sum of |lp - old|) over the active tokens.
template <class TA, class T>
Sums total_sums(int64_t B, int64_t T_, const TA* a, int64_t a_row, int64_t a_step, const T* lp, const T* old,
                const uint8_t* m, bool with_kl) {
  std::vector<Sums> part(static_cast<size_t>(B));
  parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      part[size_t(b)] = row_sums_any(a + b * a_row, a_step, lp + b * T_, old + b * T_, m + b * T_, T_, with_kl);
  });
  Sums s;
  for (const Sums& p : part) {
    s.count += p.count;
    s.adv += p.adv;
    s.logp += p.logp;
    s.abs_lr += p.abs_lr;
  }
  return s;
}

template <class TA, class T>
std::tuple<int64_t, int64_t, double> clip_candidates(int64_t B, int64_t T_, ptr_t adv, int64_t a_row, int64_t a_step,
                                                     ptr_t logp, ptr_t old_logp, ptr_t mask, double lb, double ub,
                                                     double low, double high, ptr_t out) {
  using C = calc_t<TA, T>;
  const TA* a = as_ptr<const TA>(adv);
  const T* lp = as_ptr<const T>(logp);
  const T* old = as_ptr<const T>(old_logp);
  const uint8_t* m = as_ptr<const uint8_t>(mask);
  int64_t* idx = as_ptr<int64_t>(out);
  const Sums s = total_sums(B, T_, a, a_row, a_step, lp, old, m, false);
  const double n = std::max(s.count, 1.0);
  const C mean_a = C(s.adv / n), mean_lp = C(s.logp / n);
  const C cl = C(lb), cu = C(ub), lo = C(1.0 - low), hi = C(1.0 + high);
  std::vector<int64_t> count(size_t(B), 0);
  // Each row first lists its candidates in its own T slots of `out`; the rows are then
  // packed in row order (a destination never lies past its own source, so no row is
  // overwritten before it moves).
  parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const TA* ar = a + b * a_row;
      const T* lr = lp + b * T_;
      const T* orow = old + b * T_;
      const uint8_t* mr = m + b * T_;
      int64_t* dst = idx + b * T_;
      count[size_t(b)] = clip_row(ar, a_step, lr, orow, mr, T_, b * T_, mean_a, mean_lp, cl, cu, lo, hi, dst);
    }
  });
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = count[size_t(b)];
    if (c && total != b * T_) std::memmove(idx + total, idx + b * T_, size_t(c) * sizeof(int64_t));
    total += c;
  }
  return {int64_t(s.count), total, 0.0};
}

template <class TA, class T>
std::tuple<int64_t, int64_t, double> kl_covariance(int64_t B, int64_t T_, ptr_t adv, int64_t a_row, int64_t a_step,
                                                   ptr_t logp, ptr_t old_logp, ptr_t mask, ptr_t out) {
  using C = calc_t<TA, T>;
  const TA* a = as_ptr<const TA>(adv);
  const T* lp = as_ptr<const T>(logp);
  const T* old = as_ptr<const T>(old_logp);
  const uint8_t* m = as_ptr<const uint8_t>(mask);
  C* cov = as_ptr<C>(out);
  const Sums s = total_sums(B, T_, a, a_row, a_step, lp, old, m, true);
  const double n = std::max(s.count, 1.0);
  const C mean_a = C(s.adv / n), mean_lp = C(s.logp / n);
  const C ninf = -std::numeric_limits<C>::infinity();
  parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const TA* ar = a + b * a_row;
      const T* lr = lp + b * T_;
      const uint8_t* mr = m + b * T_;
      C* dst = cov + b * T_;
      for (int64_t t = 0; t < T_; ++t)
        dst[t] = mr[t] ? C(C(C(load(ar, t * a_step)) - mean_a) * C(C(load(lr, t)) - mean_lp)) : ninf;
    }
  });
  return {int64_t(s.count), 0, s.abs_lr / n};
}

// KL-Cov's top-k without the [B, T] covariance array and without a sort of every token: each
// task keeps its k + 1 largest (covariance, index) pairs, these are merged,
// and the k largest are the selection when the k-th value is strictly above the (k + 1)-th
// (or k is the active count): then the set is the same for every top-k algorithm, verl's
// torch.topk included, and every thread count. A tie at that boundary, or a NaN covariance,
// returns ok = false and the caller runs torch.topk on the covariance instead.
struct Cand {
  double v;
  int64_t i;
};

template <class TA, class T>
std::tuple<int64_t, int64_t, double> kl_topk(int64_t B, int64_t T_, ptr_t adv, int64_t a_row, int64_t a_step,
                                             ptr_t logp, ptr_t old_logp, ptr_t mask, double ratio, ptr_t out) {
  using C = calc_t<TA, T>;
  const TA* a = as_ptr<const TA>(adv);
  const T* lp = as_ptr<const T>(logp);
  const T* old = as_ptr<const T>(old_logp);
  const uint8_t* m = as_ptr<const uint8_t>(mask);
  int64_t* idx = as_ptr<int64_t>(out);
  const Sums s = total_sums(B, T_, a, a_row, a_step, lp, old, m, true);
  const int64_t n_active = int64_t(s.count);
  if (n_active == 0) return {0, 0, 0.0};
  const int64_t k = std::max<int64_t>(1, int64_t(double(n_active) * ratio));  // Python's int(n * ratio)
  if (k > n_active) return {n_active, 0, s.abs_lr / s.count};  // torch.topk raises, as in verl
  const size_t cap = size_t(std::min(k + 1, n_active));
  const double n = s.count;
  const C mean_a = C(s.adv / n), mean_lp = C(s.logp / n);
  // Few tasks: each ends with up to cap kept pairs to merge. The selection is the same for
  // any split (see above), so the split may follow the thread count.
  const int64_t tasks = std::min<int64_t>(B, 4 * int64_t(std::max(1, num_threads())));
  const int64_t grain = (B + tasks - 1) / tasks;
  // descending value, ascending index among equal values
  auto before = [](const Cand& x, const Cand& y) { return x.v > y.v || (x.v == y.v && x.i < y.i); };
  std::vector<std::vector<Cand>> kept(static_cast<size_t>(tasks));
  std::vector<uint8_t> saw_nan(static_cast<size_t>(tasks), 0);
  parallel_for(tasks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Tokens above the running threshold are appended; a full buffer keeps its cap largest
      // (nth_element, amortised O(1) per append) and raises the threshold to the smallest
      // kept. A token equal to the threshold changes no value of the top cap, so the kept
      // values are always the task's cap largest (of those above -inf).
      std::vector<Cand>& buf = kept[size_t(c)];
      buf.reserve(4 * cap);
      double thr = -std::numeric_limits<double>::infinity();
      auto compact = [&]() {
        std::nth_element(buf.begin(), buf.begin() + std::ptrdiff_t(cap) - 1, buf.end(), before);
        buf.resize(cap);
        thr = buf[cap - 1].v;
      };
      // 256 covariances at a time into a small array (-inf at inactive tokens), with a flag
      // per 8 tokens for those above the threshold at the chunk's start (it only rises), then
      // a scan of the flagged groups that mostly only compares.
      constexpr int64_t kChunk = 256;
      C vals[kChunk];
      uint8_t hot[kChunk / 8];
      const C ninf = -std::numeric_limits<C>::infinity();
      const int64_t b_end = std::min(B, (c + 1) * grain);
      for (int64_t b = c * grain; b < b_end; ++b) {
        const TA* ar = a + b * a_row;
        const T* lr = lp + b * T_;
        const uint8_t* mr = m + b * T_;
        for (int64_t t0 = 0; t0 < T_; t0 += kChunk) {
          const int64_t len = std::min(kChunk, T_ - t0);
          if (!cov_chunk(ar + t0 * a_step, a_step, lr + t0, mr + t0, len, mean_a, mean_lp, C(thr), vals, hot)) {
            for (int64_t j = 0; j < len; ++j) {
              const C cov = C(C(C(load(ar, (t0 + j) * a_step)) - mean_a) * C(C(load(lr, t0 + j)) - mean_lp));
              vals[j] = mr[t0 + j] ? cov : ninf;
            }
            std::memset(hot, 1, sizeof hot);
          }
          for (int64_t j = 0; j < len; ++j) {
            if (!hot[j / 8]) {
              j |= 7;  // the group's last token: the loop's ++j moves to the next group
              continue;
            }
            const C v = vals[j];
            if (v <= thr) continue;  // below the kept values, or inactive
            if (v != v) {
              saw_nan[size_t(c)] = 1;
              continue;
            }
            buf.push_back({double(v), b * T_ + t0 + j});
            if (buf.size() == 4 * cap) compact();
          }
        }
      }
      if (buf.size() > cap) compact();
    }
  });
  std::vector<Cand> all;
  for (size_t c = 0; c < kept.size(); ++c) {
    if (saw_nan[c]) return {n_active, 0, s.abs_lr / n};
    all.insert(all.end(), kept[c].begin(), kept[c].end());
  }
  // Fewer than cap kept (active covariances of -inf, never appended): no clear boundary.
  if (all.size() < cap) return {n_active, 0, s.abs_lr / n};
  const size_t keep = cap;
  std::nth_element(all.begin(), all.begin() + std::ptrdiff_t(keep) - 1, all.end(), before);
  std::sort(all.begin(), all.begin() + std::ptrdiff_t(keep), before);
  if (int64_t(keep) > k && !(all[size_t(k) - 1].v > all[size_t(k)].v)) return {n_active, 0, s.abs_lr / n};
  for (int64_t j = 0; j < k; ++j) idx[j] = all[size_t(j)].i;
  return {n_active, k, s.abs_lr / n};
}

// GSPO's test of the advantages (verl's GRPO advantages are one value broadcast over each
// sequence): one pass that stops at a row's first differing active token (NaN differs from
// everything), writing each row's value (0 for a row without active tokens).
template <class TA>
bool row_constant_impl(int64_t B, int64_t T_, ptr_t adv, int64_t a_row, int64_t a_step, ptr_t mask, ptr_t out) {
  const TA* a = as_ptr<const TA>(adv);
  const uint8_t* m = as_ptr<const uint8_t>(mask);
  double* values = as_ptr<double>(out);
  std::vector<uint8_t> ok(static_cast<size_t>(B), 1);
  parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const TA* ar = a + b * a_row;
      const uint8_t* mr = m + b * T_;
      bool seen = false, same = true;
      acc_t<TA> first = 0;
      for (int64_t t = 0; t < T_ && same; ++t) {
        if (!mr[t]) continue;
        const acc_t<TA> x = load(ar, t * a_step);
        if (!seen) {
          first = x;
          seen = true;
          same = x == x;
        } else {
          same = x == first;
        }
      }
      ok[size_t(b)] = same ? 1 : 0;
      values[b] = seen ? double(first) : 0.0;
    }
  });
  return std::all_of(ok.begin(), ok.end(), [](uint8_t x) { return x != 0; });
}

bool row_constant(int64_t B, int64_t T_, int adv_dtype, ptr_t adv, int64_t a_row, int64_t a_step, ptr_t mask,
                  ptr_t out) {
  bool r = false;
  RLK_DISPATCH_FLOATING(adv_dtype, TA, { r = row_constant_impl<TA>(B, T_, adv, a_row, a_step, mask, out); });
  return r;
}

// dtype: the log-probs' storage code, adv_dtype: the advantages'. Clip-Cov: writes the
// candidates' flat indices to out[0 : n_cand] (out holds B*T int64); returns
// (active count, n_cand, 0).
std::tuple<int64_t, int64_t, double> clip_cov_candidates(int64_t B, int64_t T_, int dtype, int adv_dtype, ptr_t adv,
                                                         int64_t a_row, int64_t a_step, ptr_t logp, ptr_t old_logp,
                                                         ptr_t mask, double lb, double ub, double low, double high,
                                                         ptr_t out) {
  std::tuple<int64_t, int64_t, double> r;
  RLK_DISPATCH_FLOATING(adv_dtype, TA, {
    RLK_DISPATCH_FLOATING(dtype, T, {
      r = clip_candidates<TA, T>(B, T_, adv, a_row, a_step, logp, old_logp, mask, lb, ub, low, high, out);
    });
  });
  return r;
}

// KL-Cov: writes the covariance (float, or double where an input is float64; -inf at
// inactive tokens) to out; returns (active count, 0, mean |lp - old| over the active tokens).
std::tuple<int64_t, int64_t, double> kl_cov_covariance(int64_t B, int64_t T_, int dtype, int adv_dtype, ptr_t adv,
                                                       int64_t a_row, int64_t a_step, ptr_t logp, ptr_t old_logp,
                                                       ptr_t mask, ptr_t out) {
  std::tuple<int64_t, int64_t, double> r;
  RLK_DISPATCH_FLOATING(adv_dtype, TA, {
    RLK_DISPATCH_FLOATING(dtype, T, {
      r = kl_covariance<TA, T>(B, T_, adv, a_row, a_step, logp, old_logp, mask, out);
    });
  });
  return r;
}

// KL-Cov's selection (see kl_topk): writes the flat indices of the k = max(1, int(n * ratio))
// largest covariances to out[0 : k] (out holds at least k int64), largest first; returns
// (active count n, k, mean |lp - old| over the active tokens), or (n, 0, mean) where the
// caller must select with torch.topk (a tie at the k-th value, or NaN), or (0, 0, 0).
std::tuple<int64_t, int64_t, double> kl_cov_topk(int64_t B, int64_t T_, int dtype, int adv_dtype, ptr_t adv,
                                                 int64_t a_row, int64_t a_step, ptr_t logp, ptr_t old_logp, ptr_t mask,
                                                 double ratio, ptr_t out) {
  std::tuple<int64_t, int64_t, double> r;
  RLK_DISPATCH_FLOATING(adv_dtype, TA, {
    RLK_DISPATCH_FLOATING(dtype, T, {
      r = kl_topk<TA, T>(B, T_, adv, a_row, a_step, logp, old_logp, mask, ratio, out);
    });
  });
  return r;
}

void bind(py::module_& m) {
  m.def("row_constant", &row_constant, py::arg("B"), py::arg("T"), py::arg("adv_dtype"), py::arg("adv"),
        py::arg("adv_row_stride"), py::arg("adv_col_stride"), py::arg("mask"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("kl_cov_topk", &kl_cov_topk, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("adv_dtype"),
        py::arg("adv"), py::arg("adv_row_stride"), py::arg("adv_col_stride"), py::arg("logp"), py::arg("old_logp"),
        py::arg("mask"), py::arg("ratio"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("clip_cov_candidates", &clip_cov_candidates, py::arg("B"), py::arg("T"), py::arg("dtype"),
        py::arg("adv_dtype"), py::arg("adv"), py::arg("adv_row_stride"), py::arg("adv_col_stride"), py::arg("logp"),
        py::arg("old_logp"), py::arg("mask"), py::arg("lb"), py::arg("ub"), py::arg("clip_low"),
        py::arg("clip_high"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("kl_cov_covariance", &kl_cov_covariance, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("adv_dtype"),
        py::arg("adv"), py::arg("adv_row_stride"), py::arg("adv_col_stride"), py::arg("logp"), py::arg("old_logp"),
        py::arg("mask"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace rlk::cov

RLK_REGISTER_BINDINGS(losses, rlk::cov::bind);
