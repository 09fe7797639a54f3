// OpenRLHF's train/rollout importance-sampling correction, gated by the ratio itself, as one
// pass over CPU tensors: the detached per-token coefficient that multiplies the policy loss
// (handed to the fused policy kernel as its weights) and the count of filtered units.
//
// With x = old - rollout per token (pi_train / pi_rollout = exp(x)), the gated statistic is
// exp(x) per token, or per sequence exp(mean of x over its active tokens) (NaN for an empty
// row, as OpenRLHF's 0/0). Mode "mask": the coefficient is exp(x) where the statistic lies in
// [lo, hi] and 0 elsewhere (NaN fails); "clip": the statistic clamped into [lo, hi] (NaN
// stays NaN, as torch.clamp). Filtered units: mask, those not kept; clip, those below or
// above the band; counted over the active tokens, or over all rows at sequence level.
//
// Arithmetic in float (double for float64 storage); exp is losses.h's fast_exp (inf above
// float's exp overflow threshold 88.7228317, 0 below -87, as torch's up to subnormals).
// float32 and bfloat16 take 8 lanes per step (simd.h), compiled for AVX2 where the CPU has
// it. Masked positions are selected out (coefficient 0) before any arithmetic, so NaN or inf
// there reach nothing; the row sums are float64, in a fixed order per row.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/losses.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace py = pybind11;

namespace rlk::isgate {
namespace {

struct Args {
  int64_t B, T;
  ptr_t old_logp, rollout_logp, mask, coef;
  bool seq_level, clip_mode;
  double lo, hi;
};

template <class A>
inline A exp_a(A x) {
  return losses::exp_(x);
}

// The coefficient of one token from its IS weight e = exp(x) and its unit's statistic.
template <class A>
inline A coefficient(A e, A stat, A lo, A hi, bool clip_mode, bool& filtered) {
  if (clip_mode) {
    filtered = stat < lo || stat > hi;
    const A y = stat < lo ? lo : stat;
    return y > hi ? hi : y;
  }
  const bool keep = stat >= lo && stat <= hi;
  filtered = !keep;
  return keep ? e : A(0);
}

// Sum and count of x over a row's active tokens: float lanes (8 per step, float32 and
// bfloat16) flushed to float64 every 512 tokens, then the scalar tail; a fixed order per row.
template <class S, bool LANES>
inline __attribute__((always_inline)) void row_log_ratio(const Args& a, int64_t b, double& sum, int64_t& n) {
  using A = acc_t<S>;
  const S* o = as_ptr<const S>(a.old_logp) + b * a.T;
  const S* r = as_ptr<const S>(a.rollout_logp) + b * a.T;
  const uint8_t* m = as_ptr<const uint8_t>(a.mask) + b * a.T;
  sum = 0.0;
  double count = 0.0;
  int64_t t = 0;
#ifdef RLK_SIMD
  if constexpr (LANES) {
    const simd::v8f zero = simd::splat8(0.0f), one = simd::splat8(1.0f);
    while (t + 8 <= a.T) {
      const int64_t stop = std::min<int64_t>(a.T, t + 512);
      simd::v8f s = zero, c = zero;
      for (; t + 8 <= stop; t += 8) {
        const simd::v8i mm = simd::mask_bytes(m + t);
        s += mm ? simd::load8(o, t) - simd::load8(r, t) : zero;
        c += mm ? one : zero;
      }
      sum += double(simd::lanes_sum(s));
      count += double(simd::lanes_sum(c));
    }
  }
#endif
  for (; t < a.T; ++t) {
    const bool on = m[t] != 0;
    sum += on ? double(A(load(o, t)) - A(load(r, t))) : 0.0;
    count += on ? 1.0 : 0.0;
  }
  n = int64_t(count);
}

// Tokens t0.. of row b (scalar body); returns the filtered active tokens.
template <class S>
inline int64_t row_tail(const Args& a, int64_t b, int64_t t0, acc_t<S> stat_row) {
  using A = acc_t<S>;
  const S* o = as_ptr<const S>(a.old_logp);
  const S* r = as_ptr<const S>(a.rollout_logp);
  const uint8_t* m = as_ptr<const uint8_t>(a.mask);
  A* w = as_ptr<A>(a.coef);
  const A lo = A(a.lo), hi = A(a.hi);
  int64_t filtered_tokens = 0;
  for (int64_t i = b * a.T + t0, end = (b + 1) * a.T; i < end; ++i) {
    if (!m[i]) {
      w[i] = A(0);
      continue;
    }
    const A e = exp_a(A(load(o, i)) - A(load(r, i)));
    bool filtered;
    w[i] = coefficient<A>(e, a.seq_level ? stat_row : e, lo, hi, a.clip_mode, filtered);
    filtered_tokens += filtered;
  }
  return filtered_tokens;
}

#ifdef RLK_SIMD
using simd::load8;
using simd::splat8;
using simd::store8;
using simd::v8f;
using simd::v8i;

// The full 8-token steps of row b; returns the tokens done and adds the filtered active tokens.
template <class S, bool SEQ, bool CLIP>
inline __attribute__((always_inline)) int64_t row_lanes(const Args& a, int64_t b, float stat_row, int64_t& filtered) {
  const S* o = as_ptr<const S>(a.old_logp);
  const S* r = as_ptr<const S>(a.rollout_logp);
  const uint8_t* m = as_ptr<const uint8_t>(a.mask);
  float* w = as_ptr<float>(a.coef);
  const v8f zero = splat8(0.0f), one = splat8(1.0f), lo = splat8(float(a.lo)), hi = splat8(float(a.hi));
  const v8f stat_v = splat8(stat_row);
  v8f count = zero;
  const int64_t base = b * a.T;
  int64_t t = 0;
  for (; t + 8 <= a.T; t += 8) {
    const int64_t i = base + t;
    const v8i mm = simd::mask_bytes(m + i);
    const v8f x = mm ? load8(o, i) - load8(r, i) : zero;
    const v8f e = simd::exp8(x);
    const v8f stat = SEQ ? stat_v : e;
    v8f c;
    v8i out;
    if (CLIP) {
      out = (stat < lo) | (stat > hi);
      const v8f y = stat < lo ? lo : stat;
      c = y > hi ? hi : y;
    } else {
      const v8i keep = (stat >= lo) & (stat <= hi);
      out = ~keep;
      c = keep ? e : zero;
    }
    store8(w, i, mm ? c : zero);
    count += (mm & out) ? one : zero;
  }
  filtered += int64_t(simd::lanes_sum(count));  // at most T / 8 per lane: exact in float
  return t;
}
#endif

template <class S, bool LANES>
inline __attribute__((always_inline)) void rows_impl(const Args& a, int64_t b0, int64_t b1, int64_t* filtered) {
  using A = acc_t<S>;
  for (int64_t b = b0; b < b1; ++b) {
    A stat_row = A(0);
    if (a.seq_level) {
      double sum;
      int64_t n;
      row_log_ratio<S, LANES>(a, b, sum, n);
      // 0 / 0 for an empty row: NaN, which no band keeps
      stat_row = exp_a(A(sum / double(n)));
    }
    int64_t f = 0, t = 0;
#ifdef RLK_SIMD
    if constexpr (LANES) {
      if (a.seq_level)
        t = a.clip_mode ? row_lanes<S, true, true>(a, b, stat_row, f) : row_lanes<S, true, false>(a, b, stat_row, f);
      else
        t = a.clip_mode ? row_lanes<S, false, true>(a, b, stat_row, f) : row_lanes<S, false, false>(a, b, stat_row, f);
    }
#endif
    f += row_tail<S>(a, b, t, stat_row);
    if (a.seq_level) {
      bool out;
      coefficient<A>(A(1), stat_row, A(a.lo), A(a.hi), a.clip_mode, out);
      f = out;
    }
    filtered[b] = f;
  }
}

#if defined(RLK_SIMD) && defined(__x86_64__)
#define RLK_ISGATE_AVX2 1
template <class S>
__attribute__((target("avx2,fma"))) void rows_avx2(const Args& a, int64_t b0, int64_t b1, int64_t* filtered) {
  rows_impl<S, true>(a, b0, b1, filtered);
}
#endif

template <class S>
void rows_generic(const Args& a, int64_t b0, int64_t b1, int64_t* filtered) {
#ifdef RLK_SIMD
  rows_impl<S, simd::kLanes<S>>(a, b0, b1, filtered);
#else
  rows_impl<S, false>(a, b0, b1, filtered);
#endif
}

// Writes the coefficient ([B, T], float; double for float64 storage) and returns the
// filtered units: active tokens at token level, rows (empty ones included) at sequence level.
int64_t is_correction_gate(int64_t B, int64_t T, int dtype, ptr_t old_logp, ptr_t rollout_logp, ptr_t mask,
                           bool seq_level, bool clip_mode, double lo, double hi, ptr_t coef) {
  if (B <= 0 || T <= 0) throw std::invalid_argument("is_correction_gate: empty batch");
  if (clip_mode && seq_level) throw std::invalid_argument("is_correction_gate: clip mode is token-level only");
  const Args a{B, T, old_logp, rollout_logp, mask, coef, seq_level, clip_mode, lo, hi};
  std::vector<int64_t> rows(size_t(B), 0);
  RLK_DISPATCH_FLOATING(dtype, S, {
    auto fn = &rows_generic<S>;
#ifdef RLK_ISGATE_AVX2
    if constexpr (simd::kLanes<S>) {
      if (simd::use_avx2()) fn = &rows_avx2<S>;
    }
#endif
    parallel_for(B, std::max<int64_t>(1, 8192 / T), [&](int64_t b0, int64_t b1) { fn(a, b0, b1, rows.data()); });
  });
  int64_t total = 0;
  for (int64_t f : rows) total += f;
  return total;
}

// The sequence gate alone, for the fused kernel's own importance weights: keep[b] = 1 where
// row b's statistic exp(mean x) lies in [lo, hi]. Returns (filtered rows, sum over the
// active tokens of rollout - old, active tokens): OpenRLHF's is_filter_ratio and vllm_kl.
template <class S, bool LANES>
inline __attribute__((always_inline)) void seq_rows_impl(const Args& a, int64_t b0, int64_t b1, uint8_t* keep,
                                                        double* sums, int64_t* counts) {
  using A = acc_t<S>;
  for (int64_t b = b0; b < b1; ++b) {
    double sum;
    int64_t n;
    row_log_ratio<S, LANES>(a, b, sum, n);
    const A stat = exp_a(A(sum / double(n)));
    keep[b] = stat >= A(a.lo) && stat <= A(a.hi);
    sums[b] = sum;
    counts[b] = n;
  }
}

#ifdef RLK_ISGATE_AVX2
template <class S>
__attribute__((target("avx2,fma"))) void seq_rows_avx2(const Args& a, int64_t b0, int64_t b1, uint8_t* keep,
                                                       double* sums, int64_t* counts) {
  seq_rows_impl<S, true>(a, b0, b1, keep, sums, counts);
}
#endif

template <class S>
void seq_rows_generic(const Args& a, int64_t b0, int64_t b1, uint8_t* keep, double* sums, int64_t* counts) {
#ifdef RLK_SIMD
  seq_rows_impl<S, simd::kLanes<S>>(a, b0, b1, keep, sums, counts);
#else
  seq_rows_impl<S, false>(a, b0, b1, keep, sums, counts);
#endif
}

std::tuple<int64_t, double, int64_t> is_seq_gate(int64_t B, int64_t T, int dtype, ptr_t old_logp, ptr_t rollout_logp,
                                                 ptr_t mask, double lo, double hi, ptr_t keep) {
  if (B <= 0 || T <= 0) throw std::invalid_argument("is_seq_gate: empty batch");
  const Args a{B, T, old_logp, rollout_logp, mask, 0, true, false, lo, hi};
  uint8_t* k = as_ptr<uint8_t>(keep);
  std::vector<double> sums(size_t(B), 0.0);
  std::vector<int64_t> counts(size_t(B), 0);
  RLK_DISPATCH_FLOATING(dtype, S, {
    auto fn = &seq_rows_generic<S>;
#ifdef RLK_ISGATE_AVX2
    if constexpr (simd::kLanes<S>) {
      if (simd::use_avx2()) fn = &seq_rows_avx2<S>;
    }
#endif
    parallel_for(B, std::max<int64_t>(1, 16384 / T),
                 [&](int64_t b0, int64_t b1) { fn(a, b0, b1, k, sums.data(), counts.data()); });
  });
  int64_t filtered = 0, active = 0;
  double sum = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    filtered += k[b] ? 0 : 1;
    sum += sums[size_t(b)];
    active += counts[size_t(b)];
  }
  return {filtered, -sum, active};
}

void bind(py::module_& m) {
  m.def("is_seq_gate", &is_seq_gate, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("old_logp"),
        py::arg("rollout_logp"), py::arg("mask"), py::arg("lo"), py::arg("hi"), py::arg("keep"),
        py::call_guard<py::gil_scoped_release>(),
        "OpenRLHF's sequence-level ratio gate: writes keep [B] (uint8), returns (filtered rows, "
        "sum of rollout - old over the active tokens, active tokens)");
  m.def("is_correction_gate", &is_correction_gate, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("old_logp"),
        py::arg("rollout_logp"), py::arg("mask"), py::arg("seq_level"), py::arg("clip_mode"), py::arg("lo"),
        py::arg("hi"), py::arg("coef"), py::call_guard<py::gil_scoped_release>(),
        "OpenRLHF's ratio-gated IS correction: writes the per-token coefficient, returns the filtered units");
}

}  // namespace
}  // namespace rlk::isgate

RLK_REGISTER_BINDINGS(losses, rlk::isgate::bind);
