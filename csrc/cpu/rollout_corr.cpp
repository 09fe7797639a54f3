// verl's rollout correction (rollout_corr_helper.py: IS weights, rejection sampling and the
// off-policy diagnostics) on CPU tensors in one pass over [B, T].
//
// The torch formulation needs some fifty [B, T] passes; every metric verl reports is a
// function of per-row sums, counts, maxima and minima, so this pass writes those per row
// (float64, [B, K]) and the caller finishes the metrics on [B] vectors. It also writes the
// token-level or sequence-level IS weights (float) when asked, and the rejection-masked
// response mask (uint8: active and kept) when a rejection option is set.
//
// Arithmetic is float, as verl's on float32 log-probs (bfloat16 ones are read as float):
// eight tokens per step with GCC/Clang vector extensions, compiled twice (baseline and
// AVX2+FMA, chosen at run time); a row's tail goes through the same body on zero-padded
// copies. Lane sums are flushed to float64 every 512 tokens in a fixed order, so results
// never depend on the thread count. Inactive tokens are selected out (never multiplied by
// 0), so NaN or inf there reach no statistic.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"

namespace py = pybind11;

#if defined(RLK_SIMD)
namespace rlk::rollout_corr {
namespace {

using rlk::simd::v8f;
using rlk::simd::v8i;
#define RLK_RC_INLINE inline __attribute__((always_inline))

constexpr float kSafety = 20.0f;  // verl clamps log-ratios to [-20, 20] before exp
constexpr int kMaxOptions = 11;   // verl's rejection options, each at most once

// Per-row statistics, in this order (the caller reads them by these indices).
enum Row : int {
  kCount = 0,   // active tokens
  kSumLogp,     // sum of the training log-probs
  kSumRollout,  // sum of the rollout log-probs
  kSumLr,       // sum of lr = logp - rollout (unclamped)
  kSumK3,       // sum of exp(lr) - lr - 1 (unclamped)
  kSumRatio2,   // sum of exp(clamp(lr))^2
  kSumW,        // token-level IS: sum of the weights
  kSumW2,       // ... of their squares
  kSumRaw,      // ... of the untruncated ratios exp(clamp(lr))
  kHigh,        // ... tokens with ratio > upper
  kLow,         // ... tokens with ratio < the lower metric threshold
  kMaxW,        // ... largest weight (-inf for a row without tokens)
  kMinW,        // ... smallest weight (+inf for a row without tokens)
  kOob,         // ... IcePop: tokens with ratio outside [lower, upper]
  kRejected,    // rejection: active tokens the final mask drops
  kBase         // first per-option block; each option has kOptionStats entries
};
// Per option: token options sum, max, min, count above hi, count below lo, sum and sum of
// squares of the statistic clamped into [lo, hi], count of active tokens it rejects.
// Sequence options: sum, max, keep (1/0), the row's statistic (as compared, in float).
enum Opt : int { kOSum = 0, kOMax, kOMin, kOHigh, kOLow, kOClampSum, kOClampSq, kONotKeep, kOptionStats };
constexpr int kOKeep = kOMin, kOValue = kOHigh;

enum IsLevel : int { kIsNone = 0, kIsToken = 1, kIsSeq = 2 };
// Option code: aggregation * 3 + (k - 1), aggregation 0 token, 1 seq_sum, 2 seq_mean, 3 seq_max.
enum Agg : int { kToken = 0, kSeqSum = 1, kSeqMean = 2, kSeqMax = 3 };

struct Config {
  int64_t B = 0, T = 0;
  int is_level = kIsNone;
  bool icepop = false;
  float upper = 0, lower = 0, low_metric = 0;
  int n_opt = 0;
  int agg[kMaxOptions] = {}, k[kMaxOptions] = {};
  float lo[kMaxOptions] = {}, hi[kMaxOptions] = {};
  bool any_token_opt = false;
  int64_t K = kBase;
};

RLK_RC_INLINE v8f splat(float x) { return v8f{} + x; }
RLK_RC_INLINE float lane_sum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
RLK_RC_INLINE float lane_max(v8f v) {
  float r = v[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, v[i]);
  return r;
}
RLK_RC_INLINE float lane_min(v8f v) {
  float r = v[0];
  for (int i = 1; i < 8; ++i) r = std::min(r, v[i]);
  return r;
}
RLK_RC_INLINE v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
RLK_RC_INLINE v8f vmin(v8f a, v8f b) { return a < b ? a : b; }

RLK_RC_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
RLK_RC_INLINE v8f load8(const bf16* p) {
  typedef uint16_t vh8 __attribute__((vector_size(16)));
  vh8 h;
  std::memcpy(&h, p, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8i) << 16);
}

// The lanes' running sums of one row between two flushes, and the row's extrema.
struct Lanes {
  v8f n, lp, ro, lr, k3, r2, w, w2, raw, high, low, oob, rej;
  v8f mx, mn;
  v8f o_sum[kMaxOptions], o_mx[kMaxOptions], o_mn[kMaxOptions], o_high[kMaxOptions], o_low[kMaxOptions],
      o_c[kMaxOptions], o_c2[kMaxOptions], o_nk[kMaxOptions];
  void clear_sums(int n_opt) {
    n = lp = ro = lr = k3 = r2 = w = w2 = raw = high = low = oob = rej = v8f{};
    for (int j = 0; j < n_opt; ++j) o_sum[j] = o_high[j] = o_low[j] = o_c[j] = o_c2[j] = o_nk[j] = v8f{};
  }
};

// Eight tokens: their statistics into the lanes; returns the IS weights (0 at inactive
// tokens) and sets *keep to the token options' verdict (all lanes kept without any).
RLK_RC_INLINE v8f step(const Config& c, Lanes& L, v8f lp, v8f ro, v8i m, v8i* keep) {
  const v8f zero = v8f{}, one = splat(1.0f);
  const v8f lr = m ? lp - ro : zero;
  const v8f safe = vmin(vmax(lr, splat(-kSafety)), splat(kSafety));
  const v8f e = rlk::simd::exp8(safe);
  // exp of the unclamped log-ratio, for verl's k3 KL estimate: past +-20 only (rare)
  v8f eu = e;
  const v8i wide = m & ((lr > splat(kSafety)) | (lr < splat(-kSafety)));
  for (int i = 0; i < 8; ++i)
    if (wide[i]) eu[i] = std::exp(lr[i]);
  L.n += m ? one : zero;
  L.lp += m ? lp : zero;
  L.ro += m ? ro : zero;
  L.lr += lr;
  L.k3 += m ? (eu - lr) - 1.0f : zero;
  L.r2 += m ? e * e : zero;
  v8f w = zero;
  if (c.is_level == kIsToken) {
    const v8f raw = m ? e : zero;
    const v8f up = splat(c.upper);
    if (c.icepop) {
      const v8i inside = (raw >= splat(c.lower)) & (raw <= up);
      w = inside ? raw : zero;
      L.oob += (m & ~inside) ? one : zero;
    } else {
      w = vmin(raw, up);
    }
    L.w += w;
    L.w2 += w * w;
    L.raw += raw;
    L.high += raw > up ? one : zero;
    L.low += (m & (raw < splat(c.low_metric))) ? one : zero;
    L.mx = m ? vmax(L.mx, w) : L.mx;
    L.mn = m ? vmin(L.mn, w) : L.mn;
  }
  v8i kept = m | ~m;  // all lanes
  for (int j = 0; j < c.n_opt; ++j) {
    v8f s;
    if (c.k[j] == 1)
      s = -safe;
    else if (c.k[j] == 2)
      s = 0.5f * safe * safe;
    else
      s = (e - 1.0f) - safe;
    L.o_sum[j] += m ? s : zero;
    L.o_mx[j] = m ? vmax(L.o_mx[j], s) : L.o_mx[j];
    if (c.agg[j] != kToken) continue;
    const v8f hi = splat(c.hi[j]), lo = splat(c.lo[j]);
    const bool k1 = c.k[j] == 1;
    const v8i ok = k1 ? ((s <= hi) & (s >= lo)) : (s <= hi);
    kept &= ok;
    L.o_mn[j] = m ? vmin(L.o_mn[j], s) : L.o_mn[j];
    L.o_high[j] += (m & (s > hi)) ? one : zero;
    if (k1) L.o_low[j] += (m & (s < lo)) ? one : zero;
    const v8f cl = vmin(vmax(s, lo), hi);
    L.o_c[j] += m ? cl : zero;
    L.o_c2[j] += m ? cl * cl : zero;
    L.o_nk[j] += (m & ~ok) ? one : zero;
  }
  L.rej += (m & ~kept) ? one : zero;
  *keep = kept;
  return w;
}

RLK_RC_INLINE void flush(const Config& c, const Lanes& L, double* r) {
  r[kCount] += double(lane_sum(L.n));
  r[kSumLogp] += double(lane_sum(L.lp));
  r[kSumRollout] += double(lane_sum(L.ro));
  r[kSumLr] += double(lane_sum(L.lr));
  r[kSumK3] += double(lane_sum(L.k3));
  r[kSumRatio2] += double(lane_sum(L.r2));
  r[kSumW] += double(lane_sum(L.w));
  r[kSumW2] += double(lane_sum(L.w2));
  r[kSumRaw] += double(lane_sum(L.raw));
  r[kHigh] += double(lane_sum(L.high));
  r[kLow] += double(lane_sum(L.low));
  r[kOob] += double(lane_sum(L.oob));
  r[kRejected] += double(lane_sum(L.rej));
  for (int j = 0; j < c.n_opt; ++j) {
    double* o = r + kBase + kOptionStats * j;
    o[kOSum] += double(lane_sum(L.o_sum[j]));
    if (c.agg[j] != kToken) continue;
    o[kOHigh] += double(lane_sum(L.o_high[j]));
    o[kOLow] += double(lane_sum(L.o_low[j]));
    o[kOClampSum] += double(lane_sum(L.o_c[j]));
    o[kOClampSq] += double(lane_sum(L.o_c2[j]));
    o[kONotKeep] += double(lane_sum(L.o_nk[j]));
  }
}

RLK_RC_INLINE bool band(float v, int k, float lo, float hi) { return k == 1 ? (v <= hi && v >= lo) : v <= hi; }

template <class T>
RLK_RC_INLINE void rows_impl(const Config& c, const T* logp, const T* rollout, const uint8_t* mask, float* weights,
                             uint8_t* keep_out, double* rows, int64_t b0, int64_t b1) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t T_ = c.T;
  Lanes L;
  for (int64_t b = b0; b < b1; ++b) {
    const T* lp = logp + b * T_;
    const T* ro = rollout + b * T_;
    const uint8_t* m = mask + b * T_;
    float* w_row = weights ? weights + b * T_ : nullptr;
    uint8_t* k_row = keep_out ? keep_out + b * T_ : nullptr;
    double* r = rows + b * c.K;
    std::fill(r, r + c.K, 0.0);
    L.clear_sums(c.n_opt);
    L.mx = splat(-inf);
    L.mn = splat(inf);
    for (int j = 0; j < c.n_opt; ++j) {
      L.o_mx[j] = splat(-inf);
      L.o_mn[j] = splat(inf);
    }
    const bool token_is = c.is_level == kIsToken;
    auto emit = [&](int64_t t, int64_t len, v8f w, v8i kept, v8i mv) {
      if (w_row && token_is) {
        if (len == 8) {
          std::memcpy(w_row + t, &w, sizeof w);
        } else {
          for (int64_t i = 0; i < len; ++i) w_row[t + i] = w[i];
        }
      }
      if (k_row && c.any_token_opt) {
        const v8i on = mv & kept;
        for (int64_t i = 0; i < len; ++i) k_row[t + i] = on[i] ? 1 : 0;
      }
    };
    int64_t t = 0;
    while (t + 8 <= T_) {
      const int64_t stop = std::min<int64_t>(T_, t + 512);
      for (; t + 8 <= stop; t += 8) {
        const v8i mv = rlk::simd::mask_bytes(m + t);
        v8i kept;
        const v8f w = step(c, L, load8(lp + t), load8(ro + t), mv, &kept);
        emit(t, 8, w, kept, mv);
      }
      flush(c, L, r);
      L.clear_sums(c.n_opt);
    }
    if (t < T_) {  // the tail, zero-padded (padding lanes are inactive)
      const int64_t len = T_ - t;
      float lpb[8] = {}, rob[8] = {};
      uint8_t mb[8] = {};
      for (int64_t i = 0; i < len; ++i) {
        lpb[i] = float(load(lp, t + i));
        rob[i] = float(load(ro, t + i));
        mb[i] = m[t + i];
      }
      const v8i mv = rlk::simd::mask_bytes(mb);
      v8i kept;
      const v8f w = step(c, L, load8(lpb), load8(rob), mv, &kept);
      emit(t, len, w, kept, mv);
      flush(c, L, r);
    }
    r[kMaxW] = double(lane_max(L.mx));
    r[kMinW] = double(lane_min(L.mn));
    // Sequence-level statistics are the row's, once it is complete.
    const float count = float(r[kCount]);
    bool row_keep = true;
    for (int j = 0; j < c.n_opt; ++j) {
      double* o = r + kBase + kOptionStats * j;
      o[kOMax] = double(lane_max(L.o_mx[j]));
      if (c.agg[j] == kToken) {
        o[kOMin] = double(lane_min(L.o_mn[j]));
        continue;
      }
      float v;
      if (c.agg[j] == kSeqSum)
        v = float(o[kOSum]);
      else if (c.agg[j] == kSeqMean)
        v = float(o[kOSum]) / (count + 1e-8f);
      else
        v = count > 0 ? float(o[kOMax]) : 0.0f;  // verl's 0 for a row without tokens
      const bool ok = band(v, c.k[j], c.lo[j], c.hi[j]);
      o[kOKeep] = ok ? 1.0 : 0.0;
      o[kOValue] = double(v);
      row_keep = row_keep && ok;
    }
    if (!row_keep) {
      r[kRejected] = r[kCount];
      if (k_row) std::memset(k_row, 0, size_t(T_));
    } else if (k_row && !c.any_token_opt) {
      for (int64_t i = 0; i < T_; ++i) k_row[i] = m[i] ? 1 : 0;
    }
    if (w_row && c.is_level == kIsSeq) {
      const float stat = float(r[kSumLr]);
      const float raw = std::exp(std::min(std::max(stat, -kSafety), kSafety));
      float wb = c.icepop ? ((raw >= c.lower && raw <= c.upper) ? raw : 0.0f) : std::min(raw, c.upper);
      if (count == 0) wb = 0.0f;
      for (int64_t i = 0; i < T_; ++i) w_row[i] = m[i] ? wb : 0.0f;
    }
  }
}

template <class T>
void rows_generic(const Config& c, const T* lp, const T* ro, const uint8_t* m, float* w, uint8_t* k, double* rows,
                  int64_t b0, int64_t b1) {
  rows_impl<T>(c, lp, ro, m, w, k, rows, b0, b1);
}
#if defined(__x86_64__)
template <class T>
__attribute__((target("avx2,fma"))) void rows_avx2(const Config& c, const T* lp, const T* ro, const uint8_t* m,
                                                   float* w, uint8_t* k, double* rows, int64_t b0, int64_t b1) {
  rows_impl<T>(c, lp, ro, m, w, k, rows, b0, b1);
}
#endif

// Rows per task: ~1 us per 100 tokens; 16k tokens per task is well above the pool's overhead.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(T, 1)); }

// dtype: the log-probs' storage code (float32 or bfloat16; both log-prob tensors of it).
// is_level: 0 none, 1 token, 2 sequence; lower <= 0: TIS (truncate at upper), else IcePop.
// options: codes aggregation * 3 + (k - 1) with their (lo, hi) bounds as compared (k1's in
// log space). weights: float [B, T] or 0; keep: uint8 [B, T] or 0; rows: float64 [B, K]
// with K = 15 + 8 * len(options). Returns K.
int64_t rollout_correction_rows(int64_t B, int64_t T_, int dtype, ptr_t logp, ptr_t rollout, ptr_t mask, int is_level,
                                double upper, double lower, double low_metric, const std::vector<int>& codes,
                                const std::vector<double>& lo, const std::vector<double>& hi, ptr_t weights,
                                ptr_t keep, ptr_t rows) {
  Config c;
  c.B = B;
  c.T = T_;
  if (is_level < kIsNone || is_level > kIsSeq) throw std::invalid_argument("rollout_correction_rows: bad is_level");
  c.is_level = is_level;
  c.icepop = lower > 0;
  c.upper = float(upper);
  c.lower = float(lower);
  c.low_metric = float(low_metric);
  if (codes.size() > size_t(kMaxOptions) || lo.size() != codes.size() || hi.size() != codes.size())
    throw std::invalid_argument("rollout_correction_rows: bad rejection options");
  c.n_opt = int(codes.size());
  for (int j = 0; j < c.n_opt; ++j) {
    if (codes[j] < 0 || codes[j] >= 12) throw std::invalid_argument("rollout_correction_rows: bad option code");
    c.agg[j] = codes[j] / 3;
    c.k[j] = codes[j] % 3 + 1;
    c.lo[j] = float(lo[j]);
    c.hi[j] = float(hi[j]);
    c.any_token_opt = c.any_token_opt || c.agg[j] == kToken;
  }
  c.K = kBase + kOptionStats * c.n_opt;
  const uint8_t* m = as_ptr<const uint8_t>(mask);
  float* w = weights ? as_ptr<float>(weights) : nullptr;
  uint8_t* k = keep ? as_ptr<uint8_t>(keep) : nullptr;
  double* r = as_ptr<double>(rows);
  auto run = [&](auto* lp, auto* ro) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(lp)>>;
    auto fn = &rows_generic<T>;
#if defined(__x86_64__)
    if (rlk::simd::use_avx2()) fn = &rows_avx2<T>;
#endif
    parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) { fn(c, lp, ro, m, w, k, r, b0, b1); });
  };
  switch (to_dtype(dtype)) {
    case DType::F32:
      run(as_ptr<const float>(logp), as_ptr<const float>(rollout));
      break;
    case DType::BF16:
      run(as_ptr<const bf16>(logp), as_ptr<const bf16>(rollout));
      break;
    default:
      throw std::invalid_argument("rollout_correction_rows: log-probs must be float32 or bfloat16");
  }
  return c.K;
}

void bind(py::module_& m) {
  m.attr("rollout_correction_row_base") = int(kBase);
  m.attr("rollout_correction_option_stats") = int(kOptionStats);
  m.def("rollout_correction_rows", &rollout_correction_rows, py::arg("B"), py::arg("T"), py::arg("dtype"),
        py::arg("logp"), py::arg("rollout"), py::arg("mask"), py::arg("is_level"), py::arg("upper"), py::arg("lower"),
        py::arg("low_metric"), py::arg("codes"), py::arg("lo"), py::arg("hi"), py::arg("weights"), py::arg("keep"),
        py::arg("rows"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace rlk::rollout_corr

RLK_REGISTER_BINDINGS(losses, rlk::rollout_corr::bind);
#endif
