// Helpers for the CPU kernels' explicit SIMD, written with GCC/Clang vector extensions
// (8 floats per vector) so that one source compiles to AVX2 inside functions marked
// target("avx2,fma") and to SSE pairs elsewhere.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace rlk::simd {
// Whether kernels compiled twice (baseline x86-64 and target("avx2,fma")) may take the
// AVX2 build on this CPU. RLKERN_DISABLE_AVX2 (any value) forces the baseline build,
// which the tests use to check it. Read once per process.
inline bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && std::getenv("RLKERN_DISABLE_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}
// Whether bodies compiled a third time, for AVX-512 (F, VL, BW, DQ: 16-lane vectors), may
// take that build: never where the AVX2 build is refused. RLKERN_DISABLE_AVX512 (any value)
// keeps the AVX2 build, which the tests use to compare the two.
inline bool use_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
  static const bool ok = use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                         std::getenv("RLKERN_DISABLE_AVX512") == nullptr;
  return ok;
#else
  return false;
#endif
}
}  // namespace rlk::simd

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
// Brackets code whose functions are compiled for AVX2 without FMA (so that every float
// operation rounds as under SSE), with GCC and clang alike: a file that compiles a body
// for two instruction sets puts the second copy between them.
#if defined(__clang__)
#define RLK_AVX2_REGION_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx2\"))), apply_to = function)")
#define RLK_AVX2_REGION_END _Pragma("clang attribute pop")
#else
#define RLK_AVX2_REGION_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2\")")
#define RLK_AVX2_REGION_END _Pragma("GCC pop_options")
#endif
#endif

#if defined(__GNUC__) && !defined(__CUDACC__)
#define RLK_SIMD 1
// 32-byte vectors only cross always-inline helpers, never a real call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rlk::simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int64_t v4q __attribute__((vector_size(32)));

// Eight flag bytes (0 or nonzero) to lane masks (-1 where nonzero). GCC lowers a
// byte -> int32 __builtin_convertvector to eight scalar inserts, and a vector built from
// two 32-bit words goes through the stack (a store-forwarding stall); a broadcast of the
// 8 bytes, a lane permute and per-lane shifts stay in registers (vpbroadcastq, vpermd,
// vpsllvd under AVX2).
inline __attribute__((always_inline)) v8i mask_bytes(const uint8_t* p) {
  int64_t q;
  __builtin_memcpy(&q, p, sizeof q);
  const v8i w = __builtin_shuffle((v8i)(v4q{} + q), v8i{0, 0, 0, 0, 1, 1, 1, 1});
  return ((w << v8i{24, 16, 8, 0, 24, 16, 8, 0}) & int32_t(0xff000000u)) != 0;
}

// exp of each lane of a float vector VF (VI: the int32 vector of its size) by Cephes' range
// reduction and degree-6 polynomial (~1 ulp): +inf above ~88.72, 0 below -87, NaN stays
// NaN. Always inline, so a caller compiled with target("avx2,fma") (or AVX-512) gets it in
// that instruction set.
template <class VF, class VI>
inline __attribute__((always_inline)) VF exp_lanes(VF x) {
  const VF upper = VF{} + 88.7228317f, lower = VF{} + -87.0f, zero = VF{};
  VF xc = x > upper ? upper : (x < lower ? lower : x);
  xc = x == x ? xc : zero;
  const VF shifted = xc * 1.44269504088896341f + 12582912.0f;
  const VF fk = shifted - 12582912.0f;
  const VI k = (VI)shifted - 0x4B400000;
  const VF r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;
  const VF z = r * r;
  VF y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
           1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
  const VI k1 = k >> 1, k2 = k - k1;
  y = y * (VF)((k1 + 127) << 23) * (VF)((k2 + 127) << 23);
  y = x > upper ? VF{} + __builtin_inff() : y;
  y = x < lower ? zero : y;
  return x == x ? y : x;
}
// Eight lanes: the exp of the 8-lane kernels.
inline __attribute__((always_inline)) v8f exp8(v8f x) { return exp_lanes<v8f, v8i>(x); }

}  // namespace rlk::simd

#endif
