// Fused policy, value and preference losses on the CPU.
//
// Each kernel makes one pass over the tokens and writes the loss terms and the gradient
// of the loss with respect to the current-policy inputs at once; the Python
// autograd.Function keeps only those gradient buffers for backward. Threads split the
// batch by sequence; every per-sequence quantity (token count, sequence-level ratio,
// off-policy divergence) is computed inside the same row task. Sums are accumulated in
// double per row and reduced serially in row order, so results do not depend on the
// number of threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/losses.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"

namespace py = pybind11;
using namespace rlk::losses;

namespace rlk {
namespace {

// Rows per task: enough tokens that a task outweighs the pool's dispatch cost.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(T, 1)); }

// ---------------------------------------------------------------------------------------
// policy_loss

struct PolicyParams {
  int64_t B = 0, T = 0;
  int dtype = 0;  // storage type of the floating [B, T] inputs; advantages are in the arithmetic type
  ptr_t logp = 0, old_logp = 0, advantages = 0, mask = 0;
  ptr_t ref_logp = 0, rollout_logp = 0, entropy = 0;  // 0 when not given
  bool adv_per_token = false;
  int objective = kClip;
  bool seq_level = false;
  double clip_lo = 0.8, clip_hi = 1.2;
  bool has_dual = false;
  double dual_clip = 3.0;
  bool has_ratio_cap = false;
  double ratio_cap = 0.0;
  bool has_lr_lo = false, has_lr_hi = false;
  double lr_lo = 0.0, lr_hi = 0.0;
  double kl_coef = 0.0;
  int kl_kind = kK3;
  bool has_kl_lo = false, has_kl_hi = false;
  double kl_lo = 0.0, kl_hi = 0.0;
  bool kl_correction = false;
  bool has_tis = false, tis_seq = false, tis_mask_mode = false;
  double tis_cap = 0.0;
  bool has_off = false;
  double off_threshold = 0.0;
  double entropy_coef = 0.0;
  bool has_entropy_select = false;
  double entropy_threshold = 0.0;
  int agg = kTokenMean;
  ptr_t grad_logp = 0;     // [B, T] in the arithmetic type (float, or double for float64)
  ptr_t grad_entropy = 0;  // same, or 0 when not wanted
};

// Totals returned to Python, in this order.
enum Stat : int {
  kActive = 0,   // active tokens
  kLossSum,      // sum over tokens of row weight * per-token loss (before the global scale)
  kClipLow,      // active tokens with A < 0 and r < 1 - clip_low
  kClipHigh,     // active tokens with A > 0 and r > 1 + clip_high
  kRatioSum,
  kApproxKlSum,  // sum of old_logp - logp
  kKlSum,        // sum of the KL estimate (before coefficient and correction)
  kEntropySum,
  kDualClip,     // active tokens with A < 0 where the dual clip bound is active
  kNumStats
};

template <class T>
void policy_rows(const PolicyParams& p, int64_t row_begin, int64_t row_end, double* stats) {
  using A = acc_t<T>;
  const T* logp = as_ptr<const T>(p.logp);
  const T* old = as_ptr<const T>(p.old_logp);
  const A* adv = as_ptr<const A>(p.advantages);  // advantages arrive in the arithmetic type
  const uint8_t* mask = as_ptr<const uint8_t>(p.mask);
  const T* ref = as_ptr<const T>(p.ref_logp);
  const T* rollout = as_ptr<const T>(p.rollout_logp);
  const T* ent = as_ptr<const T>(p.entropy);
  A* grad = as_ptr<A>(p.grad_logp);
  A* grad_ent = as_ptr<A>(p.grad_entropy);

  const A clip_lo = A(p.clip_lo), clip_hi = A(p.clip_hi), dual = A(p.dual_clip), cap = A(p.ratio_cap);
  Bounds<A> lr_clamp;
  lr_clamp.has_lo = p.has_lr_lo;
  lr_clamp.has_hi = p.has_lr_hi;
  lr_clamp.lo = A(p.lr_lo);
  lr_clamp.hi = A(p.lr_hi);
  Bounds<A> kl_clamp;
  kl_clamp.has_lo = p.has_kl_lo;
  kl_clamp.has_hi = p.has_kl_hi;
  kl_clamp.lo = A(p.kl_lo);
  kl_clamp.hi = A(p.kl_hi);
  const A kl_coef = A(p.kl_coef), ent_coef = A(p.entropy_coef), tis_cap = A(p.tis_cap);
  const A ent_threshold = A(p.entropy_threshold), off_threshold = A(p.off_threshold);
  const bool use_kl = ref != nullptr && p.kl_coef != 0.0;
  const bool need_prepass = p.seq_level || p.has_off || (p.has_tis && p.tis_seq) || p.agg == kSeqMeanTokenMean;
  const int64_t T_ = p.T;

  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t base = b * T_;
    const uint8_t* m = mask + base;
    double* st = stats + b * kNumStats;

    // Per-sequence quantities: token count, mean log-ratio, off-policy divergence and
    // the sequence-level importance weight.
    int64_t n = 0;
    A seq_log_ratio = 0, seq_divergence = 0, seq_log_tis = 0;
    if (need_prepass) {
      A s_lr = 0, s_div = 0, s_tis = 0;
      for (int64_t t = 0; t < T_; ++t) {
        if (!m[t]) continue;
        ++n;
        const A lp = load(logp, base + t), o = load(old, base + t);
        if (p.seq_level) s_lr += lp - o;
        if (p.has_off) s_div += (rollout ? A(load(rollout, base + t)) : o) - lp;
        if (p.has_tis && p.tis_seq) s_tis += o - A(load(rollout, base + t));
      }
      const A n1 = A(std::max<int64_t>(n, 1));
      seq_log_ratio = s_lr / n1;
      seq_divergence = s_div / n1;
      seq_log_tis = s_tis;
    }
    const A row_w = p.agg == kSeqMeanTokenMean ? A(1) / A(std::max<int64_t>(n, 1)) : A(1);
    const bool drop_negative = p.has_off && seq_divergence > off_threshold;

    // Sequence-level ratio: every token shares r = exp(clamp(mean log-ratio)).
    A seq_ratio = 1, seq_dx = 1;
    if (p.seq_level) {
      const ValueGrad<A> x = lr_clamp.apply(seq_log_ratio);
      seq_ratio = exp_(x.value);
      seq_dx = x.grad;
    }
    A seq_tis = 1;
    if (p.has_tis && p.tis_seq) {
      const A w = exp_(seq_log_tis);
      seq_tis = p.tis_mask_mode ? (w > tis_cap ? A(0) : w) : std::min(w, tis_cap);
    }

    // d(row loss)/d(shared ratio), accumulated over the row for the sequence level.
    A d_seq_ratio = 0;
    double loss_sum = 0, ratio_sum = 0, approx_kl = 0, kl_sum = 0, ent_sum = 0;
    int64_t clip_low = 0, clip_high = 0, dual_hits = 0, n_main = 0;
    for (int64_t t = 0; t < T_; ++t) {
      if (!m[t]) {
        grad[base + t] = A(0);
        if (grad_ent) grad_ent[base + t] = A(0);
        continue;
      }
      ++n_main;
      const A lp = load(logp, base + t), o = load(old, base + t);
      const A a = adv[p.adv_per_token ? base + t : b];
      A ratio, dx;
      if (p.seq_level) {
        ratio = seq_ratio;
        dx = seq_dx;
      } else {
        const ValueGrad<A> x = lr_clamp.apply(lp - o);
        ratio = exp_(x.value);
        dx = x.grad;
      }

      // Policy term: value, derivative through the ratio, derivative through logp directly.
      A pg, dpg_dr = 0, dpg_direct = 0;
      if (p.objective == kClip) {
        const ValueGrad<A> s = clipped_surrogate(ratio, a, clip_lo, clip_hi, p.has_ratio_cap, cap, p.has_dual, dual);
        pg = s.value;
        dpg_dr = s.grad;
        if (p.has_dual && a < A(0)) {
          A r1 = (p.has_ratio_cap && ratio > cap) ? cap : ratio;
          A rc = ratio < clip_lo ? clip_lo : (ratio > clip_hi ? clip_hi : ratio);
          const A surrogate = std::max(-a * r1, -a * rc);
          dual_hits += surrogate > -a * dual;
        }
      } else if (p.objective == kCispo) {
        const A w = ratio < clip_lo ? clip_lo : (ratio > clip_hi ? clip_hi : ratio);
        pg = -w * a * lp;
        dpg_direct = -w * a;
      } else {
        pg = -a * lp;
        dpg_direct = -a;
      }
      A weight = 1;
      if (drop_negative && !(a >= A(0))) weight = 0;
      if (p.has_entropy_select && !(A(load(ent, base + t)) >= ent_threshold)) weight = 0;
      if (p.has_tis) {
        if (p.tis_seq) {
          weight *= seq_tis;
        } else {
          const A w = exp_(o - A(load(rollout, base + t)));
          weight *= p.tis_mask_mode ? (w > tis_cap ? A(0) : w) : std::min(w, tis_cap);
        }
      }
      A l = weight * pg;
      dpg_dr *= weight;
      dpg_direct *= weight;

      if (ref) {
        const ValueGrad<A> kl = kl_estimate(p.kl_kind, lp, A(load(ref, base + t)), kl_clamp);
        kl_sum += kl.value;
        if (use_kl) {
          if (p.kl_correction) {
            l += kl_coef * kl.value * ratio;
            dpg_direct += kl_coef * kl.grad * ratio;
            dpg_dr += kl_coef * kl.value;
          } else {
            l += kl_coef * kl.value;
            dpg_direct += kl_coef * kl.grad;
          }
        }
      }
      if (ent) {
        const A h = load(ent, base + t);
        ent_sum += h;
        l -= ent_coef * h;
        if (grad_ent) grad_ent[base + t] = -ent_coef * row_w;
      }

      loss_sum += double(row_w * l);
      if (p.seq_level) {
        grad[base + t] = row_w * dpg_direct;
        d_seq_ratio += row_w * dpg_dr;
      } else {
        grad[base + t] = row_w * (dpg_direct + dpg_dr * ratio * dx);
      }
      ratio_sum += ratio;
      approx_kl += o - lp;
      clip_low += (ratio < clip_lo) && (a < A(0));
      clip_high += (ratio > clip_hi) && (a > A(0));
    }
    if (p.seq_level && n_main > 0) {
      // r = exp(mean_t (lp_t - old_t)): dr/dlp_t = r / n for every active token.
      const A add = d_seq_ratio * seq_ratio * seq_dx / A(n_main);
      if (add != A(0)) {
        for (int64_t t = 0; t < T_; ++t)
          if (m[t]) grad[base + t] += add;
      }
    }
    st[kActive] = double(n_main);
    st[kLossSum] = loss_sum;
    st[kClipLow] = double(clip_low);
    st[kClipHigh] = double(clip_high);
    st[kRatioSum] = ratio_sum;
    st[kApproxKlSum] = approx_kl;
    st[kKlSum] = kl_sum;
    st[kEntropySum] = ent_sum;
    st[kDualClip] = double(dual_hits);
  }
}

std::vector<double> policy_loss_fused(const PolicyParams& p) {
  if (p.B <= 0 || p.T <= 0) throw std::invalid_argument("policy_loss: empty batch");
  std::vector<double> rows(size_t(p.B) * kNumStats, 0.0);
  RLK_DISPATCH_FLOATING(p.dtype, T, parallel_for(p.B, row_grain(p.T), [&](int64_t b0, int64_t b1) {
                          policy_rows<T>(p, b0, b1, rows.data());
                        }));
  std::vector<double> total(kNumStats, 0.0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int k = 0; k < kNumStats; ++k) total[k] += rows[size_t(b) * kNumStats + k];
  return total;
}

// ---------------------------------------------------------------------------------------
// kl_penalty: elementwise estimate and d/d logp.

template <class T>
void kl_range(int kind, const Bounds<acc_t<T>>& clamp, const T* logp, const T* ref, acc_t<T>* out,
              acc_t<T>* grad, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const auto kl = kl_estimate(kind, acc_t<T>(load(logp, i)), acc_t<T>(load(ref, i)), clamp);
    out[i] = kl.value;
    if (grad) grad[i] = kl.grad;
  }
}

void kl_penalty_fused(int64_t n, int dtype, ptr_t logp, ptr_t ref, int kind, bool has_lo, double lo, bool has_hi,
                      double hi, ptr_t out, ptr_t grad) {
  RLK_DISPATCH_FLOATING(dtype, T, {
    using A = acc_t<T>;
    Bounds<A> clamp;
    clamp.has_lo = has_lo;
    clamp.has_hi = has_hi;
    clamp.lo = A(lo);
    clamp.hi = A(hi);
    parallel_for(n, 16384, [&](int64_t i0, int64_t i1) {
      kl_range<T>(kind, clamp, as_ptr<const T>(logp), as_ptr<const T>(ref), as_ptr<A>(out),
                  grad ? as_ptr<A>(grad) : nullptr, i0, i1);
    });
  });
}

// ---------------------------------------------------------------------------------------
// value_loss: per token 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).
// Returns {active tokens, row-weighted loss sum, clipped tokens, sum of v}.

std::vector<double> value_loss_fused(int64_t B, int64_t T, int dtype, ptr_t values, ptr_t old_values, ptr_t returns,
                                     ptr_t mask, bool has_clip, double clip, int agg, ptr_t grad_values) {
  if (B <= 0 || T <= 0) throw std::invalid_argument("value_loss: empty batch");
  constexpr int K = 4;
  std::vector<double> rows(size_t(B) * K, 0.0);
  RLK_DISPATCH_FLOATING(dtype, S, {
    using A = acc_t<S>;
    const S* v = as_ptr<const S>(values);
    const S* vo = as_ptr<const S>(old_values);
    const S* R = as_ptr<const S>(returns);
    const uint8_t* m = as_ptr<const uint8_t>(mask);
    A* g = as_ptr<A>(grad_values);
    const A c = A(clip);
    parallel_for(B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t base = b * T;
        int64_t n = 0;
        if (agg == kSeqMeanTokenMean)
          for (int64_t t = 0; t < T; ++t) n += m[base + t] != 0;
        const A row_w = agg == kSeqMeanTokenMean ? A(1) / A(std::max<int64_t>(n, 1)) : A(1);
        double loss = 0, vsum = 0;
        int64_t active = 0, clipped = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = base + t;
          if (!m[i]) {
            g[i] = A(0);
            continue;
          }
          ++active;
          const A vi = load(v, i), Ri = load(R, i);
          const A e1 = (vi - Ri) * (vi - Ri), de1 = A(2) * (vi - Ri);
          ValueGrad<A> e{e1, de1};
          if (has_clip) {
            const A vold = load(vo, i);
            Bounds<A> range;
            range.has_lo = range.has_hi = true;
            range.lo = vold - c;
            range.hi = vold + c;
            const ValueGrad<A> vc = range.apply(vi);
            const A e2 = (vc.value - Ri) * (vc.value - Ri), de2 = A(2) * (vc.value - Ri) * vc.grad;
            clipped += e2 > e1;
            e = max_branch(e1, de1, e2, de2);
          }
          loss += double(A(0.5) * row_w * e.value);
          g[i] = A(0.5) * row_w * e.grad;
          vsum += vi;
        }
        double* st = rows.data() + b * K;
        st[0] = double(active);
        st[1] = loss;
        st[2] = double(clipped);
        st[3] = vsum;
      }
    });
  });
  std::vector<double> total(K, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int k = 0; k < K; ++k) total[k] += rows[size_t(b) * K + k];
  return total;
}

// ---------------------------------------------------------------------------------------
// dpo_loss: per pair z = (c - rc) - (r - rr); loss_i by type; writes d loss_i / d z and the
// implicit rewards. Returns {sum of loss_i, sum of reward margins, pairs with chosen reward >
// rejected reward}.

std::vector<double> dpo_loss_fused(int64_t B, int dtype, ptr_t chosen, ptr_t rejected, ptr_t ref_chosen,
                                   ptr_t ref_rejected, double beta, int loss_type, double label_smoothing,
                                   ptr_t grad_z, ptr_t chosen_rewards, ptr_t rejected_rewards) {
  double loss = 0, margin = 0, correct = 0;
  RLK_DISPATCH_FLOATING(dtype, S, {
    using A = acc_t<S>;
    const S* c = as_ptr<const S>(chosen);
    const S* r = as_ptr<const S>(rejected);
    const S* rc = as_ptr<const S>(ref_chosen);
    const S* rr = as_ptr<const S>(ref_rejected);
    A* g = as_ptr<A>(grad_z);
    A* cr = as_ptr<A>(chosen_rewards);
    A* rjr = as_ptr<A>(rejected_rewards);
    const A b_ = A(beta), ls = A(label_smoothing);
    for (int64_t i = 0; i < B; ++i) {
      const A dc = A(load(c, i)) - A(load(rc, i));
      const A dr = A(load(r, i)) - A(load(rr, i));
      const A z = dc - dr;
      A li, gi;
      if (loss_type == 0) {
        const A x = b_ * z;
        li = -(A(1) - ls) * log_sigmoid(x) - ls * log_sigmoid(-x);
        gi = -(A(1) - ls) * b_ * sigmoid(-x) + ls * b_ * sigmoid(x);
      } else if (loss_type == 1) {
        const A u = z - A(1) / (A(2) * b_);
        li = u * u;
        gi = A(2) * u;
      } else {
        const A u = A(1) - b_ * z;
        li = u > A(0) ? u : A(0);
        gi = u > A(0) ? -b_ : A(0);
      }
      g[i] = gi;
      cr[i] = b_ * dc;
      rjr[i] = b_ * dr;
      loss += li;
      margin += cr[i] - rjr[i];
      correct += cr[i] > rjr[i];
    }
  });
  return {loss, margin, correct};
}

// bradley_terry_loss: loss_i = -log sigmoid(c - r - margin); writes d loss_i / d c.
// Returns {sum of loss_i, sum of c - r, pairs with c > r}.
std::vector<double> bradley_terry_fused(int64_t B, int dtype, ptr_t chosen, ptr_t rejected, ptr_t margin,
                                        double margin_scalar, ptr_t grad_chosen) {
  double loss = 0, diff_sum = 0, correct = 0;
  RLK_DISPATCH_FLOATING(dtype, S, {
    using A = acc_t<S>;
    const S* c = as_ptr<const S>(chosen);
    const S* r = as_ptr<const S>(rejected);
    const S* mg = as_ptr<const S>(margin);
    A* g = as_ptr<A>(grad_chosen);
    for (int64_t i = 0; i < B; ++i) {
      const A d = A(load(c, i)) - A(load(r, i));
      const A x = d - (mg ? A(load(mg, i)) : A(margin_scalar));
      loss += -log_sigmoid(x);
      g[i] = -sigmoid(-x);
      diff_sum += d;
      correct += d > A(0);
    }
  });
  return {loss, diff_sum, correct};
}

void bind(py::module_& m) {
  py::class_<PolicyParams>(m, "PolicyParams")
      .def(py::init<>())
      .def_readwrite("B", &PolicyParams::B)
      .def_readwrite("T", &PolicyParams::T)
      .def_readwrite("dtype", &PolicyParams::dtype)
      .def_readwrite("logp", &PolicyParams::logp)
      .def_readwrite("old_logp", &PolicyParams::old_logp)
      .def_readwrite("advantages", &PolicyParams::advantages)
      .def_readwrite("mask", &PolicyParams::mask)
      .def_readwrite("ref_logp", &PolicyParams::ref_logp)
      .def_readwrite("rollout_logp", &PolicyParams::rollout_logp)
      .def_readwrite("entropy", &PolicyParams::entropy)
      .def_readwrite("adv_per_token", &PolicyParams::adv_per_token)
      .def_readwrite("objective", &PolicyParams::objective)
      .def_readwrite("seq_level", &PolicyParams::seq_level)
      .def_readwrite("clip_lo", &PolicyParams::clip_lo)
      .def_readwrite("clip_hi", &PolicyParams::clip_hi)
      .def_readwrite("has_dual", &PolicyParams::has_dual)
      .def_readwrite("dual_clip", &PolicyParams::dual_clip)
      .def_readwrite("has_ratio_cap", &PolicyParams::has_ratio_cap)
      .def_readwrite("ratio_cap", &PolicyParams::ratio_cap)
      .def_readwrite("has_lr_lo", &PolicyParams::has_lr_lo)
      .def_readwrite("has_lr_hi", &PolicyParams::has_lr_hi)
      .def_readwrite("lr_lo", &PolicyParams::lr_lo)
      .def_readwrite("lr_hi", &PolicyParams::lr_hi)
      .def_readwrite("kl_coef", &PolicyParams::kl_coef)
      .def_readwrite("kl_kind", &PolicyParams::kl_kind)
      .def_readwrite("has_kl_lo", &PolicyParams::has_kl_lo)
      .def_readwrite("has_kl_hi", &PolicyParams::has_kl_hi)
      .def_readwrite("kl_lo", &PolicyParams::kl_lo)
      .def_readwrite("kl_hi", &PolicyParams::kl_hi)
      .def_readwrite("kl_correction", &PolicyParams::kl_correction)
      .def_readwrite("has_tis", &PolicyParams::has_tis)
      .def_readwrite("tis_seq", &PolicyParams::tis_seq)
      .def_readwrite("tis_mask_mode", &PolicyParams::tis_mask_mode)
      .def_readwrite("tis_cap", &PolicyParams::tis_cap)
      .def_readwrite("has_off", &PolicyParams::has_off)
      .def_readwrite("off_threshold", &PolicyParams::off_threshold)
      .def_readwrite("entropy_coef", &PolicyParams::entropy_coef)
      .def_readwrite("has_entropy_select", &PolicyParams::has_entropy_select)
      .def_readwrite("entropy_threshold", &PolicyParams::entropy_threshold)
      .def_readwrite("agg", &PolicyParams::agg)
      .def_readwrite("grad_logp", &PolicyParams::grad_logp)
      .def_readwrite("grad_entropy", &PolicyParams::grad_entropy);
  m.attr("NUM_POLICY_STATS") = int(kNumStats);
  m.def("policy_loss", &policy_loss_fused, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Fused policy loss: writes d(row-weighted loss sum)/d logp (and entropy) and returns the totals "
        "[active, loss_sum, clip_low, clip_high, ratio_sum, approx_kl_sum, kl_sum, entropy_sum, dual_clip]");
  m.def("kl_penalty", &kl_penalty_fused, py::call_guard<py::gil_scoped_release>());
  m.def("value_loss", &value_loss_fused, py::call_guard<py::gil_scoped_release>());
  m.def("dpo_loss", &dpo_loss_fused, py::call_guard<py::gil_scoped_release>());
  m.def("bradley_terry_loss", &bradley_terry_fused, py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace rlk

RLK_REGISTER_BINDINGS(losses, rlk::bind);
