// The return and advantage recurrences, shared by the CPU kernels (csrc/cpu/returns.cpp)
// and the CUDA kernels (csrc/cuda/returns.cu), so the CPU tests check the CUDA
// arithmetic too.
//
// Every scan here is a first-order linear recurrence run backwards in time,
//   y_t = b_t + a_t * y_{t+1},
// whose step is the affine map (a_t, b_t) built from the inputs at t. Applying maps one
// after the other is the sequential scan; composing them first (the composition is
// associative) lets a chunk of steps be summarised by one map, which is how the CUDA
// kernels scan 32 steps at once across a warp and the CPU splits long rows over threads.
//
// a_t == 0 marks a cut (an episode boundary, or a zero discount gamma or gamma * lam):
// the value behind it is then never read, not multiplied by zero, so a NaN beyond an
// episode boundary never reaches the result.
//
// A nonzero coefficient must therefore never become 0 by rounding: a product of many
// discounts (a chunk of 4096 steps at gamma * lam = 0.5, 8 steps at 1e-6) underflows, and
// would be taken for a cut (a NaN stops propagating) or multiply an infinite carry into
// 0 * inf = NaN. Step by step, the reference keeps multiplying by a positive discount, so
// an infinite or NaN carry stays infinite or NaN however far it travels. Products of
// coefficients are therefore held at the smallest normal number at least (keep_nonzero):
// that keeps non-finite carries non-finite, and changes a finite result by at most
// min_normal times the carry, which is itself one of the outputs. Normal, not subnormal,
// so that flush-to-zero modes (CUDA's -ftz, x86 DAZ) cannot read it as 0 either.
#pragma once

#include <limits>

#include "rlkern/common.h"

namespace rlk::returns {

template <class A>
RLK_HOST_DEVICE A min_normal() {
  return std::numeric_limits<A>::min();
}

// x >= 0 is a product of nonzero coefficients: never below the smallest normal number.
template <class A>
RLK_HOST_DEVICE A keep_nonzero(A x) {
  return x < min_normal<A>() ? min_normal<A>() : x;
}

// A coefficient given in double (gamma, or gamma * lam) in the arithmetic type: 0 stays
// 0 (a cut), any other value stays nonzero however small.
template <class A>
RLK_HOST_DEVICE A coefficient(double c) {
  return c == 0.0 ? A(0) : keep_nonzero(A(c));
}

template <class A>
struct Affine {
  A a, b;
};

template <class A>
RLK_HOST_DEVICE Affine<A> identity() {
  return Affine<A>{A(1), A(0)};
}

// y_t = f(y_{t+1})
template <class A>
RLK_HOST_DEVICE A apply(Affine<A> f, A next) {
  return f.a == A(0) ? f.b : f.b + f.a * next;
}

// The map of two consecutive steps: first (in time) f, then g, i.e. y_t = f(g(y_{t+2})).
// The coefficient is 0 exactly where f or g holds a cut.
template <class A>
RLK_HOST_DEVICE Affine<A> compose(Affine<A> f, Affine<A> g) {
  if (f.a == A(0)) return f;
  return Affine<A>{g.a == A(0) ? A(0) : keep_nonzero(f.a * g.a), f.b + f.a * g.b};
}

// G_t = r_t + gamma * (1 - done_t) * G_{t+1}
template <class A>
RLK_HOST_DEVICE Affine<A> discounted_coef(A reward, bool done, A gamma) {
  return Affine<A>{done ? A(0) : gamma, reward};
}

// delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t
// A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, done = terminated | truncated
template <class A>
RLK_HOST_DEVICE Affine<A> gae_coef(A reward, A value, A next_value, bool terminated, bool truncated, A gamma,
                                   A gamma_lam) {
  const A delta = terminated ? reward - value : reward + gamma * next_value - value;
  return Affine<A>{(terminated || truncated) ? A(0) : gamma_lam, delta};
}

// TD(lambda): G_t = r_t + gamma * (1 - terminated_t) * ((1 - c_t) V'_t + c_t G_{t+1}),
// c_t = lambda unless the episode (or the row) stops after step t, where c_t = 0.
// gamma_lam is gamma * lam as coefficient() gives it (nonzero unless the product is 0).
template <class A>
RLK_HOST_DEVICE Affine<A> lambda_coef(A reward, A next_value, bool terminated, bool cut, A gamma, A lam,
                                      A gamma_lam) {
  if (terminated) return Affine<A>{A(0), reward};
  if (cut) return Affine<A>{A(0), reward + gamma * next_value};
  return Affine<A>{gamma_lam, reward + gamma * (A(1) - lam) * next_value};
}

// Token-level GAE over a response mask: masked tokens are skipped (identity maps), and
// each unmasked token bootstraps from the value of the next unmasked one (0 after the
// last): delta_t = r_t + gamma * V_next(t) - V_t, A_t = delta_t + gamma * lam * A_next(t).
template <class A>
RLK_HOST_DEVICE Affine<A> masked_gae_coef(A reward, A value, A next_unmasked_value, bool unmasked, A gamma,
                                          A gamma_lam) {
  return unmasked ? Affine<A>{gamma_lam, reward + gamma * next_unmasked_value - value} : identity<A>();
}

}  // namespace rlk::returns
