// Scaling of a saved derivative by the incoming gradient, for the backward of the
// elementwise ops whose forward wrote d out / d x (kl_penalty): out[i] = d[i] * g[i], with
// d in the storage type of the op's input and g in its arithmetic type (float32 for
// float32/bfloat16/float16 storage, float64 for float64), the product formed in the
// arithmetic type and written back in the storage type. That is torch's `d.mul_(g)` (or
// `(d * g).to(d.dtype)`) to the bit: the product is one rounding in the arithmetic type,
// the narrowing one round to nearest even (a NaN stays a quiet NaN; its payload may differ),
// but in one pass instead of an eager op with a dtype conversion per element.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

namespace py = pybind11;

namespace rlk::grad {
namespace {

template <class T>
inline void scale_scalar(const T* d, const acc_t<T>* g, T* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) store(out, i, acc_t<T>(load(d, i)) * g[i]);
}

#ifdef RLK_SIMD
// 8 lanes a step for float32 and bfloat16 storage (exact widening, one float product, the
// narrowing of simd_io.h); the scalar body finishes the tail.
template <class T>
inline __attribute__((always_inline)) void scale_impl(const T* d, const float* g, T* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const simd::v8f gv = simd::load8(g, i);
    simd::store8(out, i, simd::load8(d, i) * gv);
  }
  scale_scalar(d, g, out, i, i1);
}
#if defined(__x86_64__)
template <class T>
__attribute__((target("avx2,fma"))) void scale_avx2(const T* d, const float* g, T* out, int64_t i0, int64_t i1) {
  scale_impl(d, g, out, i0, i1);
}
#endif
template <class T>
void scale_generic(const T* d, const float* g, T* out, int64_t i0, int64_t i1) {
  scale_impl(d, g, out, i0, i1);
}
#endif

template <class T>
void scale_typed(int64_t n, const T* d, const acc_t<T>* g, T* out) {
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<T>) {
    auto fn = &scale_generic<T>;
#if defined(__x86_64__)
    if (simd::use_avx2()) fn = &scale_avx2<T>;
#endif
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1) { fn(d, g, out, i0, i1); });
    return;
  }
#endif
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { scale_scalar(d, g, out, i0, i1); });
}

// `out` may be `d` itself (in place).
void scale(int64_t n, int dtype, ptr_t d, ptr_t g, ptr_t out) {
  if (n < 0) throw std::invalid_argument("grad.scale: negative size");
  if (n == 0) return;
  RLK_DISPATCH_FLOATING(dtype, T, { scale_typed<T>(n, as_ptr<const T>(d), as_ptr<const acc_t<T>>(g), as_ptr<T>(out)); });
}

void bind(py::module_& m) {
  m.def("scale", &scale, py::arg("n"), py::arg("dtype"), py::arg("d"), py::arg("g"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>(),
        "out[i] = d[i] * g[i]: d and out in the storage type `dtype`, g in its arithmetic type (in place when "
        "out is d)");
}

}  // namespace
}  // namespace rlk::grad

RLK_REGISTER_BINDINGS(grad, rlk::grad::bind);
