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

namespace py = pybind11;

namespace rlk::whiten {
namespace {

constexpr int64_t kChunk = 1 << 14;

// Masked positions are skipped, not multiplied by 0, so NaN or inf there never reaches a sum.
template <class T>
std::pair<double, double> chunk_sums(const T* x, const uint8_t* m, int64_t i0, int64_t i1, bool centered,
                                     double center) {
  double count = 0.0, sum = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    if (!m[i]) continue;
    const double v = double(load(x, i));
    count += 1.0;
    if (centered) {
      const double d = v - center;
      sum += d * d;
    } else {
      sum += v;
    }
  }
  return {count, sum};
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

// out = (x - mean) * rstd + (add_back ? mean : 0) in the arithmetic type of T, at every position.
void apply(int64_t n, int dtype, ptr_t x, ptr_t out, double mean, double rstd, bool add_back) {
  py::gil_scoped_release release;
  RLK_DISPATCH_FLOATING(dtype, T, {
    using A = acc_t<T>;
    const T* xs = as_ptr<const T>(x);
    T* os = as_ptr<T>(out);
    const A mu = A(mean), r = A(rstd), back = add_back ? A(mean) : A(0);
    parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) store(os, i, A((load(xs, i) - mu) * r + back));
    });
  });
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
