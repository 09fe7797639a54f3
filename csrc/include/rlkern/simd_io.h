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

// Lane-count-generic bodies of the loads and stores: VF/VI/VU the float, int32 and uint32
// vectors of N lanes, VH the uint16 vector of N lanes.
template <class VF, class VI, class VH>
RLK_SIMD_INLINE VF load_bf16(const bf16* p) {
  VH h;
  __builtin_memcpy(&h, p, sizeof h);
  return (VF)(__builtin_convertvector(h, VI) << 16);
}
template <class VF, class VU, class VH>
RLK_SIMD_INLINE void store_bf16(bf16* p, VF v) {
  const VU u = (VU)v;
  const VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VU quiet = (u >> 16) | 0x40u;
  const VU bits = (v == v) ? rounded : quiet;
  const VH h = __builtin_convertvector(bits, VH);
  __builtin_memcpy(p, &h, sizeof h);
}
template <class VF>
RLK_SIMD_INLINE VF load_f32(const float* p) {
  VF v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

RLK_SIMD_INLINE v8f load8(const float* p, int64_t i) { return load_f32<v8f>(p + i); }
RLK_SIMD_INLINE v8f load8(const bf16* p, int64_t i) { return load_bf16<v8f, v8i, v8h>(p + i); }
RLK_SIMD_INLINE void store8(float* p, int64_t i, v8f v) { __builtin_memcpy(p + i, &v, sizeof v); }
RLK_SIMD_INLINE void store8(bf16* p, int64_t i, v8f v) { store_bf16<v8f, v8u, v8h>(p + i, v); }

// The same conversions on 16 lanes, for bodies compiled for AVX-512 (one zmm register).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

RLK_SIMD_INLINE v16f load16(const float* p, int64_t i) { return load_f32<v16f>(p + i); }
RLK_SIMD_INLINE v16f load16(const bf16* p, int64_t i) { return load_bf16<v16f, v16i, v16h>(p + i); }
RLK_SIMD_INLINE void store16(float* p, int64_t i, v16f v) { __builtin_memcpy(p + i, &v, sizeof v); }
RLK_SIMD_INLINE void store16(bf16* p, int64_t i, v16f v) { store_bf16<v16f, v16u, v16h>(p + i, v); }

// out[t] = m[t] ? g : 0 over the longest prefix of [0, n) the vector steps cover; returns its
// length (the caller writes the tail). bfloat16: one rounding of g, then 16 tokens a step as
// 16-bit lanes, 0 or the bits of g.
RLK_SIMD_INLINE int64_t fill_masked(float* out, const uint8_t* m, int64_t n, float g) {
  const v8f gv = v8f{} + g, zero = v8f{};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) store8(out, t, mask_bytes(m + t) ? gv : zero);
  return t;
}
RLK_SIMD_INLINE int64_t fill_masked(bf16* out, const uint8_t* m, int64_t n, float g) {
  typedef int8_t vc16 __attribute__((vector_size(16)));
  typedef int16_t vs16 __attribute__((vector_size(32)));
  const int16_t bits = int16_t(float_to_bf16(g));
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    vc16 mb;
    __builtin_memcpy(&mb, m + t, sizeof mb);
    const vs16 w = __builtin_convertvector(mb != 0, vs16) & bits;
    __builtin_memcpy(out + t, &w, sizeof w);
  }
  return t;
}

// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): a fixed order.
RLK_SIMD_INLINE float lanes_sum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp8 (simd.h) is the matching 8-lane exp.

// Storage types the 8-lane bodies take (their arithmetic type is float).
template <class T>
constexpr bool kLanes = std::is_same<T, float>::value || std::is_same<T, bf16>::value;

}  // namespace rlk::simd
#endif
