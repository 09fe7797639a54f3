// Storage types and their conversions to and from the arithmetic type.
// bfloat16 and float16 are loaded into float32 (arithmetic is float32 for every
// floating input but float64, which computes in float64). The conversions are written
// out in integer arithmetic so that host and device produce the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "rlkern/common.h"

namespace rlk {

// Codes shared with python/rlkern/_kernel.py (DTYPE_CODES).
enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

RLK_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RLK_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

RLK_HOST_DEVICE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
RLK_HOST_DEVICE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

RLK_HOST_DEVICE float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal: value = mant * 2^-24, exact in float32.
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, with overflow to inf and gradual underflow.
RLK_HOST_DEVICE uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (au > 0x7f800000u ? 0x200u : 0u));
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504
  if (au < 0x38800000u) {                                  // below the smallest normal
    if (au < 0x33000000u) return sign;                     // rounds to zero
    const uint32_t e = au >> 23;
    const uint32_t m = (au & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24 for this range
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = au - 0x38000000u;  // rebias the exponent from 127 to 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

// load<T>(p, i) gives the arithmetic value; store<T>(p, i, v) writes it back.
template <class T>
struct Storage;
template <>
struct Storage<float> {
  using acc = float;
  RLK_HOST_DEVICE static float load(const float* p, int64_t i) { return p[i]; }
  RLK_HOST_DEVICE static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Storage<double> {
  using acc = double;
  RLK_HOST_DEVICE static double load(const double* p, int64_t i) { return p[i]; }
  RLK_HOST_DEVICE static void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <>
struct Storage<bf16> {
  using acc = float;
  RLK_HOST_DEVICE static float load(const bf16* p, int64_t i) { return bf16_to_float(p[i].bits); }
  RLK_HOST_DEVICE static void store(bf16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }
};
template <>
struct Storage<f16> {
  using acc = float;
  RLK_HOST_DEVICE static float load(const f16* p, int64_t i) { return f16_to_float(p[i].bits); }
  RLK_HOST_DEVICE static void store(f16* p, int64_t i, float v) { p[i].bits = float_to_f16(v); }
};

template <class T>
using acc_t = typename Storage<T>::acc;

template <class T>
RLK_HOST_DEVICE acc_t<T> load(const T* p, int64_t i) {
  return Storage<T>::load(p, i);
}
template <class T>
RLK_HOST_DEVICE void store(T* p, int64_t i, acc_t<T> v) {
  Storage<T>::store(p, i, v);
}

inline DType to_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("rlkern: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

}  // namespace rlk

// Runs the statement list with `T` bound to the storage type of `code`.
#define RLK_DISPATCH_FLOATING(code, T, ...)                 \
  switch (::rlk::to_dtype(code)) {                          \
    case ::rlk::DType::F32: {                               \
      using T = float;                                      \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
    case ::rlk::DType::F64: {                               \
      using T = double;                                     \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
    case ::rlk::DType::BF16: {                              \
      using T = ::rlk::bf16;                                \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
    case ::rlk::DType::F16: {                               \
      using T = ::rlk::f16;                                 \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
  }
