// Masked aggregation of a per-token loss [B, T] into a scalar, and its backward: verl's
// agg_loss in one pass over the tokens instead of an eager where / sum / count chain, for
// per-token losses computed outside the fused policy kernel (KL penalties, custom terms).
//
// Forward sums each row's active values (float lanes flushed to double every block, as
// the policy kernel does) and counts its active tokens, one row per task; the totals are
// then added in row order, so the result never depends on the thread count. Masked
// positions are selected away, not multiplied by zero: a NaN or inf there never reaches a
// sum (torch.where's semantics in the eager formula). Backward writes
// grad[b, t] = mask ? g * scale_b : 0 in the loss's storage type.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

namespace py = pybind11;

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace rlk::agg {
namespace {

// The aggregation modes, numbered as the policy kernel's Agg.
enum Mode : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3, kSeqMeanTokenSumNorm = 4 };

constexpr int64_t kFlush = 512;  // tokens per float partial before it is added into double

struct RowSum {
  double sum = 0, count = 0;
};

// Scalar body: float64 and float16 storage, and the tails of the vector body.
template <class T>
RowSum row_sum_scalar(const T* x, const uint8_t* m, int64_t t0, int64_t T_) {
  using A = acc_t<T>;
  RowSum out;
  A part = A(0);
  int64_t n = 0;
  for (int64_t t = t0; t < T_; ++t) {
    const A v = load(x, t);
    part += m[t] ? v : A(0);
    n += m[t] != 0;
    if (((t - t0) & (kFlush - 1)) == kFlush - 1) {
      out.sum += double(part);
      part = A(0);
    }
  }
  out.sum += double(part);
  out.count = double(n);
  return out;
}

#ifdef RLK_SIMD
using simd::v8f;
using simd::v8i;

// 16 tokens a step in two independent float accumulators (float32 and bfloat16 storage).
template <class T>
inline __attribute__((always_inline)) RowSum row_sum_impl(const T* x, const uint8_t* m, int64_t T_) {
  RowSum out;
  const v8f zero = v8f{};
  v8i n = v8i{};
  int64_t t = 0;
  while (t + 16 <= T_) {
    const int64_t stop = std::min<int64_t>(T_, t + kFlush);
    v8f s0 = zero, s1 = zero;
    for (; t + 16 <= stop; t += 16) {
      const v8i m0 = simd::mask_bytes(m + t), m1 = simd::mask_bytes(m + t + 8);
      s0 += m0 ? simd::load8(x, t) : zero;
      s1 += m1 ? simd::load8(x, t + 8) : zero;
      n -= m0 + m1;  // lanes are -1 where active
    }
    out.sum += double(simd::lanes_sum(s0)) + double(simd::lanes_sum(s1));
  }
  const RowSum tail = row_sum_scalar(x, m, t, T_);
  int64_t count = 0;
  for (int k = 0; k < 8; ++k) count += n[k];
  out.sum += tail.sum;
  out.count = double(count) + tail.count;
  return out;
}

template <class T>
inline __attribute__((always_inline)) void fill_row_impl(T* out, const uint8_t* m, int64_t T_, float g) {
  for (int64_t t = simd::fill_masked(out, m, T_, g); t < T_; ++t) store(out, t, m[t] ? g : 0.0f);
}

#if defined(__x86_64__)
#define RLK_AGG_AVX2 1
template <class T>
__attribute__((target("avx2,fma"))) RowSum row_sum_avx2(const T* x, const uint8_t* m, int64_t T_) {
  return row_sum_impl(x, m, T_);
}
template <class T>
__attribute__((target("avx2,fma"))) void fill_row_avx2(T* out, const uint8_t* m, int64_t T_, float g) {
  fill_row_impl(out, m, T_, g);
}
#endif
template <class T>
RowSum row_sum_generic(const T* x, const uint8_t* m, int64_t T_) {
  return row_sum_impl(x, m, T_);
}
template <class T>
void fill_row_generic(T* out, const uint8_t* m, int64_t T_, float g) {
  fill_row_impl(out, m, T_, g);
}
#endif

template <class T>
RowSum row_sum(const T* x, const uint8_t* m, int64_t T_) {
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<T>) {
#ifdef RLK_AGG_AVX2
    if (simd::use_avx2()) return row_sum_avx2(x, m, T_);
#endif
    return row_sum_generic(x, m, T_);
  }
#endif
  return row_sum_scalar(x, m, 0, T_);
}

// g as the storage type sees it: float for float32/bfloat16 (one rounding to bfloat16 in
// the store), the arithmetic type otherwise.
template <class T>
void fill_row(T* out, const uint8_t* m, int64_t T_, double g) {
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<T>) {
#ifdef RLK_AGG_AVX2
    if (simd::use_avx2()) return fill_row_avx2(out, m, T_, float(g));
#endif
    return fill_row_generic(out, m, T_, float(g));
  }
#endif
  using A = acc_t<T>;
  for (int64_t t = 0; t < T_; ++t) store(out, t, m[t] ? A(g) : A(0));
}

int64_t row_grain(int64_t T_) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T_, 1)); }

void check_mode(int mode) {
  if (mode < kTokenMean || mode > kSeqMeanTokenSumNorm) throw std::invalid_argument("masked_agg: unknown mode code");
}

// (loss, denominator). ``norm`` replaces the final denominator when finite (verl's global
// batch arguments); NaN keeps the local one: the active token count (token-mean), 1
// (token-sum), the non-empty sequences (seq-mean-*), times T for seq-mean-token-sum-norm.
// ``counts`` (double[B], or 0) receives each row's active token count, which backward
// needs for seq-mean-token-mean.
std::pair<double, double> forward(int64_t B, int64_t T_, int dtype, ptr_t x, ptr_t mask, int mode, double norm,
                                  ptr_t counts) {
  check_mode(mode);
  std::vector<double> rows(size_t(2 * B), 0.0);
  {
    py::gil_scoped_release release;
    const uint8_t* ms = as_ptr<const uint8_t>(mask);
    RLK_DISPATCH_FLOATING(dtype, S, {
      const S* xs = as_ptr<const S>(x);
      parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const RowSum r = row_sum(xs + b * T_, ms + b * T_, T_);
          rows[size_t(2 * b)] = r.sum;
          rows[size_t(2 * b + 1)] = r.count;
        }
      });
    });
  }
  double* cnt = counts ? as_ptr<double>(counts) : nullptr;
  double total = 0, active = 0, nonempty = 0, seq = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double s = rows[size_t(2 * b)], n = rows[size_t(2 * b + 1)];
    if (cnt) cnt[b] = n;
    total += s;
    active += n;
    if (n > 0) {
      nonempty += 1;
      seq += mode == kSeqMeanTokenMean ? s / n : s;
    }
  }
  const bool given = std::isfinite(norm);
  double denom;
  switch (mode) {
    case kTokenMean: denom = given ? norm : std::max(active, 1.0); break;
    case kTokenSum: denom = given ? norm : 1.0; break;
    case kSeqMeanTokenSumNorm: denom = given ? norm : std::max(nonempty, 1.0) * double(T_); break;
    default: denom = given ? norm : std::max(nonempty, 1.0);
  }
  const double value = (mode == kTokenMean || mode == kTokenSum) ? total : seq;
  return {value / denom, denom};
}

// grad[b, t] = mask ? g / denom (/ counts[b] for seq-mean-token-mean) : 0.
void backward(int64_t B, int64_t T_, int dtype, ptr_t mask, int mode, double denom, ptr_t counts, double g,
              ptr_t out) {
  check_mode(mode);
  if (mode == kSeqMeanTokenMean && !counts) throw std::invalid_argument("masked_agg: seq-mean-token-mean needs counts");
  py::gil_scoped_release release;
  const uint8_t* ms = as_ptr<const uint8_t>(mask);
  const double* cnt = counts ? as_ptr<const double>(counts) : nullptr;
  RLK_DISPATCH_FLOATING(dtype, S, {
    S* os = as_ptr<S>(out);
    parallel_for(B, row_grain(T_), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // an empty row has no active position: its scale is never written
        const double row = mode == kSeqMeanTokenMean ? std::max(cnt[b], 1.0) * denom : denom;
        fill_row(os + b * T_, ms + b * T_, T_, g / row);
      }
    });
  });
}

void bind(py::module_& m) {
  m.def("forward", &forward, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("x"), py::arg("mask"),
        py::arg("mode"), py::arg("norm"), py::arg("counts"));
  m.def("backward", &backward, py::arg("B"), py::arg("T"), py::arg("dtype"), py::arg("mask"), py::arg("mode"),
        py::arg("denom"), py::arg("counts"), py::arg("g"), py::arg("out"));
}

}  // namespace
}  // namespace rlk::agg

RLK_REGISTER_BINDINGS(agg, rlk::agg::bind);
