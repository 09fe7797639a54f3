// Online softmax statistics shared by the log-prob kernels.
//
// The distribution is softmax(z) with z = x * scale (scale = 1 / temperature). For a
// stream of raw values x the running state is m = max x, s = sum exp(d) and
// a = sum exp(d) d with d = (x - m) * scale <= 0. Then logsumexp(z) = m * scale + log s
// and the entropy of softmax(z) is H = log s - a / s. The maximum is kept in raw units
// and the scale applied to differences only, so a tiny temperature or a huge logit never
// overflows z to +inf (d only ever overflows towards -inf, where exp gives 0). Keeping a
// relative to m (instead of sum exp(d) z) avoids cancellation when |z| is large, and
// merging two states only rescales by exp((m1 - m) * scale).
#pragma once

#include <cmath>

#include "rlkern/common.h"

namespace rlk {

template <class A>
struct SoftmaxStats {
  A m;  // running maximum of the raw values (-inf while empty)
  A s;  // sum of exp((x - m) * scale)
  A a;  // sum of exp(d) * d, d = (x - m) * scale
};

template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_empty() {
  return {-INFINITY, A(0), A(0)};
}

// Rescales a state to a new (larger or equal) maximum. An empty state stays empty:
// shift * s would be -inf * 0. When the old mass underflows (f = 0) its entropy term
// goes too: shift * s may have overflowed to -inf (a tiny temperature), and f * -inf is NaN.
template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_rebase(SoftmaxStats<A> st, A m_new, A scale) {
  if (!(st.s > A(0))) return {m_new, st.s, st.a};
  const A shift = (st.m - m_new) * scale;
  const A f = std::exp(shift);
  return {m_new, st.s * f, f > A(0) ? f * (st.a + shift * st.s) : A(0)};
}

template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_merge(SoftmaxStats<A> x, SoftmaxStats<A> y, A scale) {
  const A m = x.m > y.m ? x.m : y.m;
  if (m == A(-INFINITY)) return x;
  x = softmax_stats_rebase(x, m, scale);
  y = softmax_stats_rebase(y, m, scale);
  return {m, x.s + y.s, x.a + y.a};
}

template <class A>
RLK_HOST_DEVICE A softmax_stats_entropy(SoftmaxStats<A> st) {
  return std::log(st.s) - st.a / st.s;
}

}  // namespace rlk
