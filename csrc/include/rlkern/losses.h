// Per-token math of the policy, value and preference losses, shared by the CPU kernels
// (and usable from CUDA). Each function returns a value together with its derivative so
// that one pass over the tokens yields the loss and the gradient at once.
//
// Derivatives follow torch's autograd conventions exactly, so that the fused kernels and
// the plain-PyTorch reference agree bit for bit in the choice of branch:
//  - max(a, b) / min(a, b): the gradient goes to the larger (smaller) one; on a tie it is
//    split in half between both.
//  - clamp(x, lo, hi): the gradient passes where lo <= x <= hi (bounds included).
#pragma once

#include <cmath>
#include <limits>

#include "rlkern/common.h"
#include "rlkern/dtype.h"

// Hot per-token helpers are forced inline: the token loops are compiled once more for
// AVX2, and an out-of-line call would drop back to the baseline instruction set.
#if defined(__CUDACC__)
#define RLK_LOSS_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RLK_LOSS_INLINE inline __attribute__((always_inline))
#else
#define RLK_LOSS_INLINE inline
#endif

namespace rlk {
namespace losses {

// The first three share the vectorised token body; the others are small per-token (or
// per-sequence) functions below, plugged into the scalar row body.
enum Objective : int {
  kClip = 0,
  kCispo = 1,
  kReinforce = 2,
  kSapo = 3,
  kGeoMean = 4,
  kVespo = 5,
  kDppoTv = 6,
  kDppoKl = 7
};
enum KlKind : int { kK1 = 0, kK2 = 1, kK3 = 2 };
enum Agg : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSum = 3, kSeqMeanTokenSumNorm = 4 };

template <class A>
struct ValueGrad {
  A value;
  A grad;
};

// An optional closed interval; `has_lo`/`has_hi` false means unbounded on that side.
template <class A>
struct Bounds {
  bool has_lo = false, has_hi = false;
  A lo = 0, hi = 0;
  RLK_HOST_DEVICE bool active() const { return has_lo || has_hi; }
  // clamp(x) with d clamp / dx.
  RLK_HOST_DEVICE ValueGrad<A> apply(A x) const {
    if (has_lo && x < lo) return {lo, A(0)};
    if (has_hi && x > hi) return {hi, A(0)};
    return {x, A(1)};
  }
};

// Bit casts for fast_exp, forced inline: dtype.h's are plain inline functions, which GCC
// declined to inline into the large AVX2-compiled row functions (a call per exp).
RLK_LOSS_INLINE float bits_as_float_(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}
RLK_LOSS_INLINE uint32_t float_as_bits_(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// exp in float without a library call or a float-to-int conversion, so that loops using
// it vectorise. Cody-Waite reduction x = k ln2 + r with |r| <= ln2 / 2 (k rounded by the
// 1.5 * 2^23 trick) and Cephes' degree-6 polynomial for exp(r): about 1 ulp. Results
// below exp(-87) (< 1.7e-38) flush to zero; above float's range, inf; NaN stays NaN.
RLK_LOSS_INLINE float fast_exp(float x) {
  const float upper = 88.7228317f, lower = -87.0f;
  float xc = x > upper ? upper : (x < lower ? lower : x);
  xc = x == x ? xc : 0.0f;
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float fk = shifted - 12582912.0f;
  const int32_t k = int32_t(float_as_bits_(shifted) - 0x4B400000u);
  const float r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;
  const float z = r * r;
  float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
              1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
  // 2^k as two normal factors: k reaches 128 near the top of the range.
  const int32_t k1 = k >> 1, k2 = k - k1;
  y = y * bits_as_float_(uint32_t(k1 + 127) << 23) * bits_as_float_(uint32_t(k2 + 127) << 23);
  y = x > upper ? bits_as_float_(0x7f800000u) : y;
  y = x < lower ? 0.0f : y;
  return x == x ? y : x;
}

template <class A>
RLK_LOSS_INLINE A exp_(A x) {
  return std::exp(x);
}
template <>
RLK_LOSS_INLINE float exp_<float>(float x) {
  return fast_exp(x);
}

// KL estimate of the reference to the current policy at one token and d/d logp.
template <class A>
RLK_HOST_DEVICE ValueGrad<A> kl_estimate(int kind, A logp, A ref_logp, const Bounds<A>& clamp) {
  const A d = ref_logp - logp;
  ValueGrad<A> kl;
  if (kind == kK1) {
    kl = {-d, A(1)};
  } else if (kind == kK2) {
    kl = {A(0.5) * d * d, -d};
  } else {
    const A e = exp_(d);
    kl = {e - A(1) - d, A(1) - e};
  }
  if (clamp.active()) {
    const ValueGrad<A> c = clamp.apply(kl.value);
    kl = {c.value, kl.grad * c.grad};
  }
  return kl;
}

// max(a, b) with da, db: the derivative of the result. NaN in either gives NaN (as
// torch.maximum), with the derivative of the NaN side.
template <class A>
RLK_HOST_DEVICE ValueGrad<A> max_branch(A a, A da, A b, A db) {
  if (a > b) return {a, da};
  if (a < b) return {b, db};
  if (!(b == b)) return {b, db};
  if (!(a == a)) return {a, da};
  return {a, A(0.5) * (da + db)};
}

// min(a, b) with da, db, mirroring max_branch (torch.minimum's NaN and tie conventions).
template <class A>
RLK_HOST_DEVICE ValueGrad<A> min_branch(A a, A da, A b, A db) {
  if (a < b) return {a, da};
  if (a > b) return {b, db};
  if (!(b == b)) return {b, db};
  if (!(a == a)) return {a, da};
  return {a, A(0.5) * (da + db)};
}

// log(sigmoid(x)), stable for large |x|.
template <class A>
RLK_HOST_DEVICE A log_sigmoid(A x) {
  return (x < A(0) ? x : A(0)) - std::log1p(std::exp(-std::fabs(x)));
}

template <class A>
RLK_HOST_DEVICE A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}

// ---------------------------------------------------------------------------------------
// Objectives beyond PPO/CISPO/REINFORCE: each is its value and derivative at one token.

// SAPO's soft gate of the ratio, f(r) = sigmoid(tau (r - 1)) 4 / tau, and df/dr =
// 4 s (1 - s): slope 1 at r = 1, decaying smoothly away from it (instead of a hard clip).
template <class A>
RLK_LOSS_INLINE ValueGrad<A> sapo_gate(A r, A tau) {
  // sigmoid from exp(-|z|) (no overflow), with selects and exp_ so that token loops vectorise.
  const A z = tau * (r - A(1));
  const A e = exp_(-std::fabs(z));
  const A s = z >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
  return {s * A(4) / tau, A(4) * s * (A(1) - s)};
}

// GMPO's clipped token log-ratio y = sgn(a) min(sgn(a) x, sgn(a) clamp(x, lo, hi)) and dy/dx:
// the log-ratio is clipped only on the side that would grow the objective.
template <class A>
RLK_LOSS_INLINE ValueGrad<A> gmpo_log_ratio(A x, A a, A lo, A hi) {
  const A s = a > A(0) ? A(1) : (a < A(0) ? A(-1) : (a == a ? A(0) : a));
  const A xc = x < lo ? lo : (x > hi ? hi : x);
  const A dc = (x < lo || x > hi) ? A(0) : A(1);
  const ValueGrad<A> mn = min_branch(s * x, s, s * xc, s * dc);
  return {s * mn.value, s * mn.grad};
}

// VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w) of the sequence's log
// weight (a detached coefficient); non-finite results become 0 as in TRL (nan_to_num).
template <class A>
RLK_HOST_DEVICE A vespo_phi(A log_w, A k, A lambda) {
  const A phi = std::exp(lambda + k * log_w - lambda * std::exp(log_w));
  return (phi == phi && phi != std::numeric_limits<A>::infinity()) ? phi : A(0);
}

// DPPO's trust region: whether a token still takes its policy-gradient term. TV bounds
// p - p_old to [-low, high]; KL bounds the binary KL of (p_old, p) on the side the
// advantage pushes (verl 0.9.1, with its 1e-8 inside the log).
template <class A>
RLK_LOSS_INLINE bool dppo_valid(bool binary_kl, A lp, A old, A a, A low, A high) {
  const A p = exp_(lp), p_old = exp_(old);
  if (!binary_kl) return a > A(0) ? (p - p_old) <= high : (p - p_old) >= -low;
  const A eps = A(1e-8);
  const A bkl = p_old * (old - lp) + (A(1) - p_old) * std::log((A(1) - p_old + eps) / (A(1) - p + eps));
  return a > A(0) ? (bkl <= high || p <= p_old) : (bkl <= low || p >= p_old);
}

}  // namespace losses
}  // namespace rlk
