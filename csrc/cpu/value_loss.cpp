// PPO's clipped value loss on CPU tensors, per token
//   0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2),
// with the gradient written finished: in the storage type of the values and already divided
// by the aggregation's final denominator, so that backward can hand the buffer to autograd
// as it is (no scaling pass, no cast, no second buffer).
//
// float32 and bfloat16 take an 8-lane body (simd.h vectors), compiled twice and chosen at run
// time (AVX2+FMA or the baseline); float64, float16 and the row tails the scalar body, which
// is the same arithmetic. Sums are float lanes flushed to double every 512 tokens per row and
// added in row order, so results do not depend on the thread count. Masked positions are
// selected out before any arithmetic: NaN or inf there reach neither a sum nor a gradient.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
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

namespace rlk::value {
namespace {

using losses::ValueGrad;

// Per-row totals, in this order.
enum : int { kActive = 0, kLoss, kClipped, kValueSum, kK };

struct Args {
  int64_t B, T;
  ptr_t v, vo, R, mask, grad;
  bool has_clip;
  double clip;
  int agg;
  double grad_scale;  // the final denominator's inverse
};

// One token: (loss term, d/dv) before the 0.5 * row weight, and whether the clipped error
// is the larger. NaN bounds give NaN (torch.clamp); a clamping bound passes no gradient
// (selected, not multiplied: vc - R may be infinite there); ties of the two errors split
// the gradient, NaN wins (torch.maximum).
template <class A>
inline ValueGrad<A> token(A v, A vo, A R, bool has_clip, A c, bool& clipped) {
  const A e1 = (v - R) * (v - R), de1 = A(2) * (v - R);
  clipped = false;
  if (!has_clip) return {e1, de1};
  const A lo = vo - c, hi = vo + c;
  const bool nan_bound = !(lo == lo) || !(hi == hi);
  const bool inside = !(v < lo) && !(v > hi);
  const A vc = nan_bound ? lo + hi : (v < lo ? lo : (v > hi ? hi : v));
  const A e2 = (vc - R) * (vc - R);
  const A de2 = nan_bound ? e2 : (inside ? A(2) * (vc - R) : A(0));
  clipped = e2 > e1;
  return losses::max_branch(e1, de1, e2, de2);
}

template <class S>
void row_scalar(const Args& a, int64_t b, int64_t t0, acc_t<S> gw, double* st) {
  using A = acc_t<S>;
  const S* v = as_ptr<const S>(a.v);
  const S* vo = as_ptr<const S>(a.vo);
  const S* R = as_ptr<const S>(a.R);
  const uint8_t* m = as_ptr<const uint8_t>(a.mask);
  S* g = as_ptr<S>(a.grad);
  const A c = A(a.clip);
  for (int64_t i = b * a.T + t0, end = (b + 1) * a.T; i < end; ++i) {
    if (!m[i]) {
      store(g, i, A(0));
      continue;
    }
    bool clipped;
    const A vi = load(v, i);
    const ValueGrad<A> e = token<A>(vi, a.has_clip ? load(vo, i) : A(0), load(R, i), a.has_clip, c, clipped);
    store(g, i, gw * e.grad);
    st[kActive] += 1.0;
    st[kLoss] += double(e.value);
    st[kClipped] += clipped ? 1.0 : 0.0;
    st[kValueSum] += double(vi);
  }
}

#ifdef RLK_SIMD
using simd::load8;
using simd::splat8;
using simd::store8;
using simd::v8f;
using simd::v8i;

// The vector body of one row up to its last full 8 tokens; returns the tokens done.
template <class S, bool CLIP>
inline __attribute__((always_inline)) int64_t row_lanes(const Args& a, int64_t b, float gw, double* st) {
  const S* v = as_ptr<const S>(a.v);
  const S* vo = as_ptr<const S>(a.vo);
  const S* R = as_ptr<const S>(a.R);
  const uint8_t* m = as_ptr<const uint8_t>(a.mask);
  S* g = as_ptr<S>(a.grad);
  const v8f zero = splat8(0.0f), one = splat8(1.0f), two = splat8(2.0f), half = splat8(0.5f);
  const v8f c = splat8(float(a.clip)), gwv = splat8(gw);
  const int64_t base = b * a.T;
  int64_t t = 0;
  while (t + 8 <= a.T) {
    const int64_t stop = std::min<int64_t>(a.T, t + 512);
    v8f n = zero, loss = zero, clipped = zero, vsum = zero;
    for (; t + 8 <= stop; t += 8) {
      const int64_t i = base + t;
      const v8i mm = simd::mask_bytes(m + i);
      const v8f vi = mm ? load8(v, i) : zero, Ri = mm ? load8(R, i) : zero;
      const v8f d1 = vi - Ri;
      v8f e = d1 * d1, de = two * d1;
      if (CLIP) {
        const v8f vold = mm ? load8(vo, i) : zero;
        const v8f lo = vold - c, hi = vold + c;
        const v8i nan_bound = (lo != lo) | (hi != hi);
        const v8i below = vi < lo, above = vi > hi;
        const v8f vc = nan_bound ? lo + hi : (below ? lo : (above ? hi : vi));
        const v8f d2 = vc - Ri;
        const v8f e2 = d2 * d2;
        const v8f de2 = nan_bound ? e2 : ((below | above) ? zero : two * d2);
        const v8i gt = e > e2, lt = e < e2, e2nan = e2 != e2, enan = e != e;
        const v8f ev = gt ? e : (lt | e2nan ? e2 : e);
        const v8f dv = gt ? de : (lt | e2nan ? de2 : (enan ? de : half * (de + de2)));
        clipped += (mm & (e2 > e)) ? one : zero;
        e = ev;
        de = dv;
      }
      store8(g, i, mm ? gwv * de : zero);
      n += mm ? one : zero;
      loss += mm ? e : zero;
      vsum += vi;
    }
    st[kActive] += double(simd::lanes_sum(n));
    st[kLoss] += double(simd::lanes_sum(loss));
    st[kClipped] += double(simd::lanes_sum(clipped));
    st[kValueSum] += double(simd::lanes_sum(vsum));
  }
  return t;
}
#endif

// Row weight of the aggregation (seq-mean-token-mean: 1 / the row's active tokens).
double row_weight(const Args& a, int64_t b) {
  if (a.agg == losses::kSeqMeanTokenSumNorm) return 1.0 / double(a.T);
  if (a.agg != losses::kSeqMeanTokenMean) return 1.0;
  const uint8_t* m = as_ptr<const uint8_t>(a.mask) + b * a.T;
  int64_t n = 0;
  for (int64_t t = 0; t < a.T; ++t) n += m[t] != 0;
  return 1.0 / double(std::max<int64_t>(n, 1));
}

template <class S, bool LANES>
inline __attribute__((always_inline)) void rows_impl(const Args& a, int64_t b0, int64_t b1, double* stats) {
  using A = acc_t<S>;
  for (int64_t b = b0; b < b1; ++b) {
    const double rw = row_weight(a, b);
    const A gw = A(0.5 * rw * a.grad_scale);
    double st[kK] = {0, 0, 0, 0};
    int64_t t = 0;
#ifdef RLK_SIMD
    if constexpr (LANES) {
      t = a.has_clip ? row_lanes<S, true>(a, b, float(gw), st) : row_lanes<S, false>(a, b, float(gw), st);
    }
#endif
    row_scalar<S>(a, b, t, gw, st);
    double* out = stats + b * kK;
    out[kActive] = st[kActive];
    out[kLoss] = 0.5 * rw * st[kLoss];
    out[kClipped] = st[kClipped];
    out[kValueSum] = st[kValueSum];
  }
}

#if defined(RLK_SIMD) && defined(__x86_64__)
#define RLK_VALUE_AVX2 1
template <class S>
__attribute__((target("avx2,fma"))) void rows_avx2(const Args& a, int64_t b0, int64_t b1, double* stats) {
  rows_impl<S, true>(a, b0, b1, stats);
}
#endif

template <class S>
void rows_generic(const Args& a, int64_t b0, int64_t b1, double* stats) {
#ifdef RLK_SIMD
  rows_impl<S, simd::kLanes<S>>(a, b0, b1, stats);
#else
  rows_impl<S, false>(a, b0, b1, stats);
#endif
}

int64_t grain(int64_t T) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(T, 1)); }

// Returns {active tokens, row-weighted loss sum, clipped tokens, sum of active values,
// non-empty rows}. ``grad_scale`` <= 0: 1 / the aggregation's own denominator (active tokens
// for token-mean, non-empty rows for the seq-* modes, 1 for token-sum), counted here first.
std::vector<double> value_loss_scaled(int64_t B, int64_t T, int dtype, ptr_t values, ptr_t old_values, ptr_t returns,
                                      ptr_t mask, bool has_clip, double clip, int agg, ptr_t grad_values,
                                      double grad_scale) {
  if (B <= 0 || T <= 0) throw std::invalid_argument("value_loss: empty batch");
  Args a{B, T, values, old_values ? old_values : values, returns, mask, grad_values, has_clip, clip, agg, grad_scale};
  if (!(grad_scale > 0)) {
    const uint8_t* m = as_ptr<const uint8_t>(mask);
    int64_t count = 0;
    if (agg == losses::kTokenMean) {
      for (int64_t i = 0; i < B * T; ++i) count += m[i] != 0;
    } else if (agg != losses::kTokenSum) {
      for (int64_t b = 0; b < B; ++b)
        count += std::any_of(m + b * T, m + (b + 1) * T, [](uint8_t x) { return x != 0; }) ? 1 : 0;
    }
    a.grad_scale = agg == losses::kTokenSum ? 1.0 : 1.0 / double(std::max<int64_t>(count, 1));
  }
  std::vector<double> rows(size_t(B) * kK, 0.0);
  RLK_DISPATCH_FLOATING(dtype, S, {
    auto fn = &rows_generic<S>;
#ifdef RLK_VALUE_AVX2
    if constexpr (simd::kLanes<S>) {
      if (simd::use_avx2()) fn = &rows_avx2<S>;
    }
#endif
    parallel_for(B, grain(T), [&](int64_t b0, int64_t b1) { fn(a, b0, b1, rows.data()); });
  });
  std::vector<double> total(kK + 1, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int k = 0; k < kK; ++k) total[k] += rows[size_t(b) * kK + k];
    total[kK] += rows[size_t(b) * kK + kActive] > 0 ? 1.0 : 0.0;
  }
  return total;
}

void bind(py::module_& m) {
  m.def("value_loss_scaled", &value_loss_scaled, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("values"),
        py::arg("old_values"), py::arg("returns"), py::arg("mask"), py::arg("has_clip"), py::arg("clip"),
        py::arg("agg"), py::arg("grad_values"), py::arg("grad_scale"), py::call_guard<py::gil_scoped_release>(),
        "Fused value loss: writes d loss / d values (storage dtype, final scale applied) and returns "
        "[active, row-weighted loss sum, clipped, value sum, non-empty rows]");
}

}  // namespace
}  // namespace rlk::value

RLK_REGISTER_BINDINGS(losses, rlk::value::bind);
