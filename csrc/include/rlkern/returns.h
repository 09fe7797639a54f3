// The return and advantage recurrences, one reverse step at a time. Both the CPU
// kernels (csrc/cpu/returns.cpp) and the CUDA kernels (csrc/cuda/returns.cu) run exactly
// these functions, so the CPU tests check the CUDA arithmetic too.
//
// Episode flags are applied with selects, not multiplications: a value behind a
// boundary (NaN included) never reaches the result.
//
// A is the arithmetic type, S the scalar parameter type and F the flag type. The GPU and
// the scalar reference use (float or double, same, bool); the CPU kernels pass GCC/Clang
// vector types (one lane per row) with integer-vector masks, for which `?:`, `|` and
// scalar-times-vector are defined element-wise.
#pragma once

#include "rlkern/common.h"

namespace rlk::returns {

// G_t = r_t + gamma * (1 - done_t) * G_{t+1}
template <class A, class S, class F>
RLK_HOST_DEVICE A discounted_step(A next_return, A reward, F done, S gamma) {
  return done ? reward : reward + gamma * next_return;
}

// delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t
// A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, done = terminated | truncated
template <class A, class S, class F>
RLK_HOST_DEVICE A gae_step(A next_advantage, A reward, A value, A next_value, F terminated, F truncated, S gamma,
                           S gamma_lam) {
  const A delta = terminated ? reward - value : reward + gamma * next_value - value;
  return (terminated | truncated) ? delta : delta + gamma_lam * next_advantage;
}

// TD(lambda): G_t = r_t + gamma * (1 - terminated_t) * ((1 - c_t) V'_t + c_t G_{t+1}),
// c_t = lambda unless the episode (or the row) stops after step t, where c_t = 0.
template <class A, class S, class F>
RLK_HOST_DEVICE A lambda_step(A next_return, A reward, A next_value, F terminated, F cut, S gamma, S lam) {
  const A blended = cut ? next_value : (S(1) - lam) * next_value + lam * next_return;
  return terminated ? reward : reward + gamma * blended;
}

// Token-level GAE over a response mask: masked tokens are skipped, so the recurrence
// links each unmasked token to the next unmasked one; after the last one V' = 0.
template <class A>
struct MaskedGaeCarry {
  A next_value;
  A advantage;
};

template <class A, class S>
RLK_HOST_DEVICE void masked_gae_step(MaskedGaeCarry<A>& carry, A reward, A value, S gamma, S gamma_lam) {
  const A delta = reward + gamma * carry.next_value - value;
  carry.advantage = delta + gamma_lam * carry.advantage;
  carry.next_value = value;
}

}  // namespace rlk::returns
