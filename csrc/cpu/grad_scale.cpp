// Scaling of a saved derivative by the incoming gradient, for the backward of the
// elementwise ops whose forward wrote d out / d x (kl_penalty): out[i] = d[i] * g[i], with
// d in the storage type of the op's input and g in its arithmetic type (float32 for
// float32/bfloat16/float16 storage, float64 for float64), the product formed in the
// arithmetic type and written back in the storage type. That is torch's `d.mul_(g)` (or
// `(d * g).to(d.dtype)`) to the bit: the product is one rounding in the arithmetic type,
// the narrowing one round to nearest even (a NaN stays a quiet NaN; its payload may differ),
// but in one pass instead of an eager op with a dtype conversion per element.
//
// `narrow` is the other half of such a backward: a derivative the forward kept in float32
// beside narrower inputs (mixed-dtype policy losses), scaled by the loss's float32 incoming
// gradient and narrowed to the input's bfloat16/float16: out[i] = narrow(d[i] * s). That is
// torch's `d.mul_(s).to(dtype)` to the bit (one float32 rounding, one round to nearest even),
// in one pass over the threads instead of a single-threaded multiply and copy.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

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

template <class T>
inline void narrow_scalar(const float* d, float s, T* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) store(out, i, d[i] * s);
}

#ifdef RLK_SIMD
inline __attribute__((always_inline)) void narrow_impl(const float* d, float s, bf16* out, int64_t i0, int64_t i1) {
  const simd::v8f sv = simd::v8f{} + s;
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) simd::store8(out, i, simd::load8(d, i) * sv);
  narrow_scalar(d, s, out, i, i1);
}
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void narrow_avx2(const float* d, float s, bf16* out, int64_t i0, int64_t i1) {
  narrow_impl(d, s, out, i0, i1);
}
#endif
void narrow_generic(const float* d, float s, bf16* out, int64_t i0, int64_t i1) { narrow_impl(d, s, out, i0, i1); }
#endif

template <class T>
void narrow_typed(int64_t n, const float* d, float s, T* out) {
#ifdef RLK_SIMD
  if constexpr (std::is_same<T, bf16>::value) {
    auto fn = &narrow_generic;
#if defined(__x86_64__)
    if (simd::use_avx2()) fn = &narrow_avx2;
#endif
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1) { fn(d, s, out, i0, i1); });
    return;
  }
#endif
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { narrow_scalar(d, s, out, i0, i1); });
}

void narrow(int64_t n, ptr_t d, float s, int dtype, ptr_t out) {
  if (n < 0) throw std::invalid_argument("grad.narrow: negative size");
  if (n == 0) return;
  switch (static_cast<DType>(dtype)) {
    case DType::BF16: return narrow_typed(n, as_ptr<const float>(d), s, as_ptr<bf16>(out));
    case DType::F16: return narrow_typed(n, as_ptr<const float>(d), s, as_ptr<f16>(out));
    default: throw std::invalid_argument("grad.narrow: the output must be bfloat16 or float16");
  }
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
  m.def("narrow", &narrow, py::arg("n"), py::arg("d"), py::arg("s"), py::arg("dtype"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>(),
        "out[i] = d[i] * s: d float32, s a float32 factor, out in the narrower storage type `dtype` "
        "(bfloat16 or float16), rounded once to nearest even");
}

}  // namespace
}  // namespace rlk::grad

RLK_REGISTER_BINDINGS(grad, rlk::grad::bind);
