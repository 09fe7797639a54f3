// Force-included (CMakeLists.txt) when the C++ compiler is clang, which the manylinux
// wheel is built with (zig's clang; tools/build_wheel.sh). Two GCC facilities the
// kernels rely on need a stand-in there:
//
// - GCC's generic vector shuffle, which clang lacks: clang's __builtin_shufflevector
//   takes only constant indices, while some masks here are computed at run time. These
//   give GCC's semantics (each index taken modulo the lane count, or twice it for the
//   two-vector form); with constant masks clang folds the loop into one shuffle.
// - __builtin_cpu_supports, which reads a CPU model table that zig's compiler runtime
//   leaves empty (every feature reads as absent, so the AVX2 kernels would never run).
//   The stand-in asks CPUID directly, including whether the OS saves the YMM registers.
#ifndef RLKERN_CLANG_COMPAT_H
#define RLKERN_CLANG_COMPAT_H
#if defined(__clang__) && defined(__cplusplus)

#if defined(__x86_64__) && !defined(__CUDACC__)
#include <cpuid.h>
#include <cstring>

static inline bool rlkern_compat_cpu_supports(const char* feature) {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  bool ymm = false;
  if (osxsave && avx) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    ymm = (lo & 6u) == 6u;  // XMM and YMM state enabled by the OS
  }
  if (std::strcmp(feature, "fma") == 0) return fma && ymm;
  if (std::strcmp(feature, "avx2") == 0)
    return ymm && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 5));
  return false;  // a feature not asked for so far: the baseline code path
}
#define __builtin_cpu_supports(feature) rlkern_compat_cpu_supports(feature)
#endif

template <class V, class M>
static inline __attribute__((always_inline)) V __builtin_shuffle(V a, M mask) {
  constexpr int n = sizeof(V) / sizeof(a[0]);
  V out;
  for (int i = 0; i < n; ++i) out[i] = a[mask[i] & (n - 1)];
  return out;
}

template <class V, class M>
static inline __attribute__((always_inline)) V __builtin_shuffle(V a, V b, M mask) {
  constexpr int n = sizeof(V) / sizeof(a[0]);
  V out;
  for (int i = 0; i < n; ++i) {
    const int k = mask[i] & (2 * n - 1);
    out[i] = k < n ? a[k] : b[k - n];
  }
  return out;
}

#endif
#endif
