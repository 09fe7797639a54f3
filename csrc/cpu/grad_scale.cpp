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

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"

namespace py = pybind11;

namespace rlk::grad {
namespace {

// The factor of element i: one per element (`scale`) or one for all (`narrow`).
template <class F>
inline F factor_at(const F* g, int64_t i) { return g[i]; }
inline float factor_at(float s, int64_t) { return s; }

// out[i] = d[i] * factor i, formed in d's arithmetic type and stored as O.
template <class D, class O, class G>
inline void mul_scalar(const D* d, G g, O* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) store(out, i, acc_t<D>(load(d, i)) * factor_at(g, i));
}

#ifdef RLK_SIMD
inline __attribute__((always_inline)) simd::v8f factor8(const float* g, int64_t i) { return simd::load8(g, i); }
inline __attribute__((always_inline)) simd::v8f factor8(float s, int64_t) { return simd::v8f{} + s; }

// 8 lanes a step for float32 and bfloat16 storage (exact widening, one float product, the
// narrowing of simd_io.h); the scalar body finishes the tail.
template <class D, class O, class G>
inline __attribute__((always_inline)) void mul_impl(const D* d, G g, O* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) simd::store8(out, i, simd::load8(d, i) * factor8(g, i));
  mul_scalar(d, g, out, i, i1);
}
#if defined(__x86_64__)
template <class D, class O, class G>
__attribute__((target("avx2,fma"))) void mul_avx2(const D* d, G g, O* out, int64_t i0, int64_t i1) {
  mul_impl(d, g, out, i0, i1);
}
#endif
template <class D, class O, class G>
void mul_generic(const D* d, G g, O* out, int64_t i0, int64_t i1) {
  mul_impl(d, g, out, i0, i1);
}
#endif

// The pass over the threads: the vector body where both storage types have one (AVX2 where
// the CPU has it), the scalar body otherwise.
template <class D, class O, class G>
void mul_pass(int64_t n, const D* d, G g, O* out) {
#ifdef RLK_SIMD
  if constexpr (simd::kLanes<D> && simd::kLanes<O>) {
    auto fn = &mul_generic<D, O, G>;
#if defined(__x86_64__)
    if (simd::use_avx2()) fn = &mul_avx2<D, O, G>;
#endif
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1) { fn(d, g, out, i0, i1); });
    return;
  }
#endif
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { mul_scalar(d, g, out, i0, i1); });
}

void narrow(int64_t n, ptr_t d, float s, int dtype, ptr_t out) {
  if (n < 0) throw std::invalid_argument("grad.narrow: negative size");
  if (n == 0) return;
  switch (static_cast<DType>(dtype)) {
    case DType::BF16: return mul_pass(n, as_ptr<const float>(d), s, as_ptr<bf16>(out));
    case DType::F16: return mul_pass(n, as_ptr<const float>(d), s, as_ptr<f16>(out));
    default: throw std::invalid_argument("grad.narrow: the output must be bfloat16 or float16");
  }
}

// `out` may be `d` itself (in place).
void scale(int64_t n, int dtype, ptr_t d, ptr_t g, ptr_t out) {
  if (n < 0) throw std::invalid_argument("grad.scale: negative size");
  if (n == 0) return;
  RLK_DISPATCH_FLOATING(dtype, T, { mul_pass(n, as_ptr<const T>(d), as_ptr<const acc_t<T>>(g), as_ptr<T>(out)); });
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
