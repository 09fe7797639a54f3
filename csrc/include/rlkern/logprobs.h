// Online softmax statistics shared by the log-prob kernels.
//
// For a stream of values z the running state is m = max z, s = sum exp(z - m) and
// a = sum exp(z - m) (z - m). Then logsumexp = m + log s and the entropy of softmax(z)
// is H = log s - a / s. Keeping a relative to m (instead of sum exp(z - m) z) avoids
// cancellation when |z| is large, and merging two states only rescales by exp(m1 - m).
#pragma once

#include <cmath>

#include "rlkern/common.h"

namespace rlk {

template <class A>
struct SoftmaxStats {
  A m;  // running maximum (-inf while empty)
  A s;  // sum of exp(z - m)
  A a;  // sum of exp(z - m) * (z - m)
};

template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_empty() {
  return {-INFINITY, A(0), A(0)};
}

// Rescales a state to a new (larger or equal) maximum. An empty state stays empty:
// (m - m_new) * s would be -inf * 0.
template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_rebase(SoftmaxStats<A> st, A m_new) {
  if (!(st.s > A(0))) return {m_new, st.s, st.a};
  const A shift = st.m - m_new;
  const A f = std::exp(shift);
  return {m_new, st.s * f, f * (st.a + shift * st.s)};
}

template <class A>
RLK_HOST_DEVICE SoftmaxStats<A> softmax_stats_merge(SoftmaxStats<A> x, SoftmaxStats<A> y) {
  const A m = x.m > y.m ? x.m : y.m;
  if (m == A(-INFINITY)) return x;
  x = softmax_stats_rebase(x, m);
  y = softmax_stats_rebase(y, m);
  return {m, x.s + y.s, x.a + y.a};
}

template <class A>
RLK_HOST_DEVICE A softmax_stats_logsumexp(SoftmaxStats<A> st) {
  return st.m + std::log(st.s);
}

template <class A>
RLK_HOST_DEVICE A softmax_stats_entropy(SoftmaxStats<A> st) {
  return std::log(st.s) - st.a / st.s;
}

}  // namespace rlk
