// Masked whitening of a flat buffer (advantage normalisation in PPO-style trainers):
// the masked count and sum, then the masked sum of squared deviations from the mean, both
// accumulated in float64, and finally (x - mean) * rstd (+ mean) at every position.
//
// The sums are taken over fixed chunks and the chunk partials added in chunk order, so a
// result never depends on the thread count. The statistics cross back to Python between
// the passes because a data-parallel caller all-reduces them there.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

namespace py = pybind11;

namespace rlk::whiten {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int kLanes = 8;

// Each chunk's sums go into 8 float64 accumulators, element i of the chunk's 8-aligned
// prefix into accumulator i % 8, the rest in order into a ninth; then ((a0 + a1) + (a2 + a3))
// + ((a4 + a5) + (a6 + a7)) + tail. One association for every instruction set and thread
// count (the vector bodies use no FMA), and 8 independent add chains instead of one.
// Masked positions are selected away, never multiplied by 0, so NaN or inf there never
// reaches a sum.
inline double lanes_total(const double* a, double tail) {
  return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) + tail;
}

template <class T>
inline __attribute__((always_inline)) double tail_sums(const T* x, const uint8_t* m, int64_t i, int64_t i1,
                                                       bool centered, double center, int64_t* count) {
  double tail = 0.0;
  for (; i < i1; ++i) {
    if (!m[i]) continue;
    const double d = double(load(x, i)) - (centered ? center : 0.0);
    ++*count;
    tail += centered ? d * d : d;
  }
  return tail;
}

// The scalar body for every storage type (float64 and float16 always take it).
template <class T>
std::pair<double, double> chunk_sums_scalar(const T* x, const uint8_t* m, int64_t i0, int64_t i1, bool centered,
                                            double center) {
  double acc[kLanes] = {};
  int64_t count = 0, i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const bool on = m[i + j] != 0;
      const double d = double(load(x, i + j)) - (centered ? center : 0.0);
      count += on;
      acc[j] += on ? (centered ? d * d : d) : 0.0;
    }
  }
  const double tail = tail_sums(x, m, i, i1, centered, center, &count);
  return {double(count), lanes_total(acc, tail)};
}

#ifdef RLK_SIMD
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef int32_t v4i __attribute__((vector_size(16)));

// float32 and bfloat16: 8 elements a step, widened exactly to two halves of 4 float64 lanes
// (lanes 0-3 and 4-7 of the scalar body's accumulators).
template <class T>
inline __attribute__((always_inline)) std::pair<double, double> chunk_sums_vec(const T* x, const uint8_t* m,
                                                                               int64_t i0, int64_t i1, bool centered,
                                                                               double center) {
  v4d lo = {}, hi = {};
  simd::v8i on_count = {};
  const v4d c = v4d{} + (centered ? center : 0.0), zero = {};
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    const simd::v8i on = simd::mask_bytes(m + i);
    on_count -= on;
    const simd::v8f v = simd::load8(x, i);
    const v4i on_lo = __builtin_shufflevector(on, on, 0, 1, 2, 3), on_hi = __builtin_shufflevector(on, on, 4, 5, 6, 7);
    const v4d d_lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), v4d) - c;
    const v4d d_hi = __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), v4d) - c;
    const v4l sel_lo = __builtin_convertvector(on_lo, v4l), sel_hi = __builtin_convertvector(on_hi, v4l);
    lo += sel_lo != 0 ? (centered ? d_lo * d_lo : d_lo) : zero;
    hi += sel_hi != 0 ? (centered ? d_hi * d_hi : d_hi) : zero;
  }
  int64_t count = 0;
  for (int j = 0; j < kLanes; ++j) count += on_count[j];
  const double acc[kLanes] = {lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
  const double tail = tail_sums(x, m, i, i1, centered, center, &count);
  return {double(count), lanes_total(acc, tail)};
}
template <class T>
std::pair<double, double> chunk_sums_generic(const T* x, const uint8_t* m, int64_t i0, int64_t i1, bool centered,
                                             double center) {
  return chunk_sums_vec(x, m, i0, i1, centered, center);
}
#if defined(__x86_64__)
template <class T>
__attribute__((target("avx2"))) std::pair<double, double> chunk_sums_avx2(const T* x, const uint8_t* m, int64_t i0,
                                                                          int64_t i1, bool centered, double center) {
  return chunk_sums_vec(x, m, i0, i1, centered, center);
}
#endif
#endif

template <class T>
auto chunk_sums_fn() {
  auto fn = &chunk_sums_scalar<T>;
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<T>) {
    fn = &chunk_sums_generic<T>;
#if defined(__x86_64__)
    if (simd::use_avx2()) fn = &chunk_sums_avx2<T>;
#endif
  }
#endif
  return fn;
}

// (masked count, masked sum of x) or, with `centered`, (masked count, masked sum of (x - center)^2).
std::pair<double, double> masked_sums(int64_t n, int dtype, ptr_t x, ptr_t mask, bool centered, double center) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(size_t(2 * chunks), 0.0);
  {
    py::gil_scoped_release release;
    RLK_DISPATCH_FLOATING(dtype, T, {
      const T* xs = as_ptr<const T>(x);
      const uint8_t* ms = as_ptr<const uint8_t>(mask);
      const auto chunk_sums = chunk_sums_fn<T>();
      parallel_for(chunks, 4, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const auto s = chunk_sums(xs, ms, c * kChunk, std::min(n, (c + 1) * kChunk), centered, center);
          part[size_t(2 * c)] = s.first;
          part[size_t(2 * c + 1)] = s.second;
        }
      });
    });
  }
  double count = 0.0, sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    count += part[size_t(2 * c)];
    sum += part[size_t(2 * c + 1)];
  }
  return {count, sum};
}

// out = (x - mean) * rstd + (add_back ? mean : 0) in the arithmetic type of T, at every
// position; the vector bodies round each operation as the scalar one does (no FMA).
template <class T>
inline __attribute__((always_inline)) void apply_scalar(const T* x, T* out, int64_t i, int64_t i1, acc_t<T> mu,
                                                        acc_t<T> r, acc_t<T> back) {
  for (; i < i1; ++i) store(out, i, acc_t<T>((load(x, i) - mu) * r + back));
}
#ifdef RLK_SIMD
template <class T>
inline __attribute__((always_inline)) void apply_vec(const T* x, T* out, int64_t i0, int64_t i1, float mu, float r,
                                                     float back) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) simd::store8(out, i, (simd::load8(x, i) - mu) * r + back);
  apply_scalar(x, out, i, i1, mu, r, back);
}
template <class T>
void apply_generic(const T* x, T* out, int64_t i0, int64_t i1, float mu, float r, float back) {
  apply_vec(x, out, i0, i1, mu, r, back);
}
#if defined(__x86_64__)
template <class T>
__attribute__((target("avx2"))) void apply_avx2(const T* x, T* out, int64_t i0, int64_t i1, float mu, float r,
                                                float back) {
  apply_vec(x, out, i0, i1, mu, r, back);
}
#endif
#endif

template <class T>
void apply_pass(int64_t n, const T* xs, T* os, double mean, double rstd, bool add_back) {
  using A = acc_t<T>;
  const A mu = A(mean), r = A(rstd), back = add_back ? A(mean) : A(0);
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<T>) {
    auto fn = &apply_generic<T>;
#if defined(__x86_64__)
    if (simd::use_avx2()) fn = &apply_avx2<T>;
#endif
    parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { fn(xs, os, i0, i1, mu, r, back); });
    return;
  }
#endif
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { apply_scalar(xs, os, i0, i1, mu, r, back); });
}

void apply(int64_t n, int dtype, ptr_t x, ptr_t out, double mean, double rstd, bool add_back) {
  py::gil_scoped_release release;
  RLK_DISPATCH_FLOATING(dtype, T, { apply_pass(n, as_ptr<const T>(x), as_ptr<T>(out), mean, rstd, add_back); });
}

void bind(py::module_& m) {
  m.def("masked_sums", &masked_sums, py::arg("n"), py::arg("dtype"), py::arg("x"), py::arg("mask"),
        py::arg("centered"), py::arg("center"));
  m.def("apply", &apply, py::arg("n"), py::arg("dtype"), py::arg("x"), py::arg("out"), py::arg("mean"),
        py::arg("rstd"), py::arg("add_back"));
}

}  // namespace
}  // namespace rlk::whiten

RLK_REGISTER_BINDINGS(whiten, rlk::whiten::bind);
