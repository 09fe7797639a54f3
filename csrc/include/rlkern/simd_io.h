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
// The same conversions on 16 lanes, for bodies compiled for AVX-512 (one zmm register).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

RLK_SIMD_INLINE v16f load16(const float* p, int64_t i) {
  v16f v;
  __builtin_memcpy(&v, p + i, sizeof v);
  return v;
}
RLK_SIMD_INLINE v16f load16(const bf16* p, int64_t i) {
  v16h h;
  __builtin_memcpy(&h, p + i, sizeof h);
  return (v16f)(__builtin_convertvector(h, v16i) << 16);
}
RLK_SIMD_INLINE void store16(float* p, int64_t i, v16f v) { __builtin_memcpy(p + i, &v, sizeof v); }
RLK_SIMD_INLINE void store16(bf16* p, int64_t i, v16f v) {
  const v16u u = (v16u)v;
  const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v16u quiet = (u >> 16) | 0x40u;
  const v16u bits = (v == v) ? rounded : quiet;
  const v16h h = __builtin_convertvector(bits, v16h);
  __builtin_memcpy(p + i, &h, sizeof h);
}

// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): a fixed order.
RLK_SIMD_INLINE float lanes_sum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp8 (simd.h) is the matching 8-lane exp.

// Storage types the 8-lane bodies take (their arithmetic type is float).
template <class T>
constexpr bool kLanes = std::is_same<T, float>::value || std::is_same<T, bf16>::value;

}  // namespace rlk::simd
#endif
