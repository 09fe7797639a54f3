// 8-lane loads and stores of float32 and bfloat16 storage for the kernels written with
// simd.h's vector types (arithmetic in float). Lane for lane the same conversions as
// dtype.h's scalar load/store: bfloat16 widens exactly, and narrows with round to nearest
// even, NaN kept a quiet NaN.
#pragma once

#include <cstdint>
#include <type_traits>

#include "rlkern/dtype.h"
#include "rlkern/simd.h"

#ifdef RLK_SIMD
namespace rlk::simd {

#define RLK_SIMD_INLINE inline __attribute__((always_inline))

typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

RLK_SIMD_INLINE v8f splat8(float x) { return v8f{} + x; }

RLK_SIMD_INLINE v8f load8(const float* p, int64_t i) {
  v8f v;
  __builtin_memcpy(&v, p + i, sizeof v);
  return v;
}
RLK_SIMD_INLINE v8f load8(const bf16* p, int64_t i) {
  v8h h;
  __builtin_memcpy(&h, p + i, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8i) << 16);
}
RLK_SIMD_INLINE void store8(float* p, int64_t i, v8f v) { __builtin_memcpy(p + i, &v, sizeof v); }
RLK_SIMD_INLINE void store8(bf16* p, int64_t i, v8f v) {
  const v8u u = (v8u)v;
  const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v8u quiet = (u >> 16) | 0x40u;
  const v8u bits = (v == v) ? rounded : quiet;
  const v8h h = __builtin_convertvector(bits, v8h);
  __builtin_memcpy(p + i, &h, sizeof h);
}
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): a fixed order.
RLK_SIMD_INLINE float lanes_sum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp lane for lane as losses.h's fast_exp (Cody-Waite reduction, Cephes' degree-6
// polynomial, about 1 ulp): below -87 it flushes to 0, above float's range inf, NaN stays.
RLK_SIMD_INLINE v8f exp8(v8f x) {
  const v8f upper = splat8(88.7228317f), lower = splat8(-87.0f), zero = splat8(0.0f);
  v8f xc = x > upper ? upper : (x < lower ? lower : x);
  xc = x == x ? xc : zero;
  const v8f shifted = xc * 1.44269504088896341f + 12582912.0f;
  const v8f fk = shifted - 12582912.0f;
  const v8i k = (v8i)shifted - 0x4B400000;
  const v8f r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;
  const v8f z = r * r;
  v8f y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
            1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
  const v8i k1 = k >> 1, k2 = k - k1;
  y = y * (v8f)((k1 + 127) << 23) * (v8f)((k2 + 127) << 23);
  y = x > upper ? splat8(__builtin_inff()) : y;
  y = x < lower ? zero : y;
  return x == x ? y : x;
}

// Storage types the 8-lane bodies take (their arithmetic type is float).
template <class T>
constexpr bool kLanes = std::is_same<T, float>::value || std::is_same<T, bf16>::value;

}  // namespace rlk::simd
#endif
