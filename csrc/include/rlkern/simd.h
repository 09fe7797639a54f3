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
}  // namespace rlk::simd

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

// exp of eight floats (Cephes' range reduction and degree-6 polynomial, ~1 ulp): +inf
// above ~88.72, 0 below -87, NaN stays NaN. Always inline, so a caller compiled with
// target("avx2,fma") gets it in AVX2.
inline __attribute__((always_inline)) v8f exp8(v8f x) {
  const v8f upper = v8f{} + 88.7228317f, lower = v8f{} + -87.0f, zero = v8f{};
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
  y = x > upper ? v8f{} + __builtin_inff() : y;
  y = x < lower ? zero : y;
  return x == x ? y : x;
}

}  // namespace rlk::simd

#endif
