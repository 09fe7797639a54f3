// Fused policy, value and preference losses on the CPU.
//
// Each kernel makes one pass over the tokens and writes the loss terms and the gradient
// of the loss with respect to the current-policy inputs at once; the Python
// autograd.Function keeps only those gradient buffers for backward. Threads split the
// batch by sequence; every per-sequence quantity (token count, sequence-level ratio,
// off-policy divergence) is computed inside the same row task. Sums are accumulated in
// float lanes flushed to double every block, per row, and reduced serially in row order,
// so results do not depend on the number of threads.
//
// The policy loss has a scalar token body (token_terms: float64, float16 and row tails)
// and an 8-wide vector body written with GCC/Clang vector extensions (token_step_v:
// float32 and bfloat16 storage), compiled twice and chosen at run time (AVX2+FMA or the
// baseline instruction set). Both mirror the reference in rlkern/reference/losses.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/losses.h"
#include "rlkern/parallel.h"
#include "rlkern/simd.h"
#include "rlkern/simd_io.h"
#include "rlkern/registry.h"

namespace py = pybind11;
using namespace rlk::losses;

// Floating-point exceptions are never inspected here; without this GCC will not turn the
// selects of the token loops into vector blends (it must assume a comparison may trap).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

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
  ptr_t weights = 0;  // per-token policy-term weights, 0 when not given
  ptr_t off_policy_logp = 0;  // behaviour log-probs of the off-policy mask, 0: rollout_logp (or old_logp)
  // float32 weights beside bfloat16/float16 storage: read as float32 where they lie, rather
  // than every log-prob copied to float32 so that all inputs share one storage type.
  bool weights_f32 = false;
  // The gradient buffers are float32 whatever the storage type (with weights_f32: the
  // gradient such a call wrote before, when its inputs were all copied to float32).
  bool grad_f32 = false;
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
  double tis_min = 0.0;  // lower bound of the importance weight (0: none, the weights are >= 0)
  bool has_off = false;
  double off_threshold = 0.0;
  double entropy_coef = 0.0;
  bool has_entropy_select = false;
  double entropy_threshold = 0.0;
  int agg = kTokenMean;
  ptr_t grad_logp = 0;     // [B, T] in the storage type: d loss / d logp, finished
  ptr_t grad_entropy = 0;  // same for the entropies, or 0 when not wanted
  double grad_scale = 1.0;  // 1 / the aggregation's final denominator
  bool scale_by_active = false;  // token-mean: grad_scale = 1 / max(active tokens, 1), counted here
  bool scale_by_rows = false;    // seq-* modes: grad_scale = 1 / max(non-empty sequences, 1), counted here
  // The clip option as given (geo_mean bounds the log-ratio, DPPO the divergence with it).
  double clip_low = 0.2, clip_high = 0.2;
  double sapo_tau_pos = 1.0, sapo_tau_neg = 1.05;
  double vespo_k_pos = 2.0, vespo_lambda_pos = 3.0, vespo_k_neg = 3.0, vespo_lambda_neg = 2.0;
  // Bit k set: the caller reads total k (Stat below). The active-token count and the loss sum
  // are always computed; a total left out comes back 0. The vector bodies skip the
  // accumulators (and the ratio's exp where neither the loss nor a wanted total needs it) of
  // totals nobody reads: an adapter that returns two metrics does not pay for twelve.
  uint32_t want = ~0u;
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
  kObjective,    // objective-specific token sum: VESPO's phi, DPPO's truncated tokens, CISPO's clipped ones
  kObjectiveRow, // sum over sequences of their token mean of kObjective
  kApproxKlClamped,  // token level: sum of -(the clamped log-ratio) (verl's ppo_kl); 0 at sequence level
  kTisOutside,   // token-level TIS: active tokens whose weight the band changes (mask: not inside, NaN too)
  kRolloutKl,    // sum of rollout_logp - old_logp (0 without rollout log-probs)
  kNumStats
};

// Constants of one sequence for the per-token body. Absent bounds are infinite so that the
// body needs no branch on whether an option is set.
template <class A>
struct RowConst {
  A clip_lo, clip_hi, cap, dual, lr_lo, lr_hi, kl_lo, kl_hi, kl_coef, ent_coef, tis_cap, ent_threshold;
  A seq_ratio, seq_dx, seq_tis, row_w, grad_w;
  // Objectives of the scalar body: SAPO temperatures, VESPO's weights for A >= 0 and A < 0
  // (row constants), GMPO's log-ratio bounds and masked-mean advantage, DPPO's bounds.
  A tau_pos, tau_neg, phi_pos, phi_neg, geo_lo, geo_hi, geo_adv, div_lo, div_hi;
  int objective, kl_kind;
  bool has_dual, use_kl, use_ent, kl_corr, tis_token, tis_mask_mode, has_select, drop_negative;
  bool has_weights;  // per-token weights given (read on the EXTRA path)
  bool is_cispo;
  A tis_min;
  uint32_t want = ~0u;  // PolicyParams::want
};

template <class A>
struct TokenTerms {
  A loss, grad, dseq, ratio, kl, dual_hit, tis_out;
};

// 1 where the band [lo, hi] changes the token's importance weight w: in mask mode where w is
// not inside it (a NaN weight too), when truncating where it lies below or above it.
template <class A>
RLK_LOSS_INLINE A tis_outside(A w, A lo, A hi, bool mask_mode) {
  const bool inside = (w >= lo) & (w <= hi);
  const bool beyond = (w < lo) | (w > hi);
  return (mask_mode ? !inside : beyond) ? A(1) : A(0);
}

// The objectives beyond clip/CISPO/REINFORCE at one token (the scalar form: float64,
// float16 and row tails; token_step_obj_v is the vector one). Returns the terms as token_terms, plus the token's clip-fraction flags
// and its objective-specific statistic.
template <class A>
struct ExtraTerms {
  TokenTerms<A> t;
  A low, high, stat;
};

template <class A, int KL, bool SEQ, bool EXTRA>
RLK_LOSS_INLINE ExtraTerms<A> token_terms_obj(const RowConst<A>& c, A lp, A o, A a, A refv, A rolv, A h,
                                              A wv = A(1)) {
  const A zero(0), one(1);
  A r, dx, x = zero;
  if (SEQ) {
    r = c.seq_ratio;
    dx = c.seq_dx;
  } else {
    x = lp - o;
    const A xc = x < c.lr_lo ? c.lr_lo : (x > c.lr_hi ? c.lr_hi : x);
    dx = ((x < c.lr_lo) | (x > c.lr_hi)) ? zero : one;
    x = xc;
    r = exp_(xc);
  }
  ExtraTerms<A> out;
  out.low = (r < c.clip_lo && a < zero) ? one : zero;
  out.high = (r > c.clip_hi && a > zero) ? one : zero;
  out.stat = zero;
  A pg, dr = zero, direct = zero;
  bool uses_ratio = false;
  switch (c.objective) {
    case kSapo: {
      const ValueGrad<A> f = sapo_gate(r, a > zero ? c.tau_pos : c.tau_neg);
      pg = -f.value * a;
      dr = -f.grad * a;
      uses_ratio = true;
      break;
    }
    case kGeoMean: {
      // The loss is the sequence's -mean(A) exp(mean y) on each token; its derivative at
      // token t is the row's -mean(A) R times dy_t/dx_t (see policy_rows_impl's prepass).
      const ValueGrad<A> y = gmpo_log_ratio(x, a, c.geo_lo, c.geo_hi);
      r = c.seq_ratio;
      pg = -c.geo_adv * r;
      direct = pg * y.grad * dx;
      const bool outside = x < c.geo_lo || x > c.geo_hi;
      out.low = (outside && a < zero) ? one : zero;
      out.high = (outside && a > zero) ? one : zero;
      break;
    }
    case kVespo: {
      const A phi = a >= zero ? c.phi_pos : c.phi_neg;
      direct = -phi * a;
      pg = direct * lp;
      out.stat = phi;
      break;
    }
    default: {  // kDppoTv, kDppoKl
      const bool valid = dppo_valid(c.objective == kDppoKl, lp, o, a, c.div_lo, c.div_hi);
      const A w = r > c.cap ? c.cap : r;
      const A v = valid ? one : zero;
      direct = -a * w * v;
      pg = -a * w * lp * v;
      out.low = (!valid && !(a > zero)) ? one : zero;
      out.high = (!valid && a > zero) ? one : zero;
      out.stat = (valid && r > c.cap) ? one : zero;
      break;
    }
  }
  A weight = (c.drop_negative & !(a >= zero)) ? zero : one;
  out.t.tis_out = zero;
  if (EXTRA) {
    weight = (c.has_select & !(h >= c.ent_threshold)) ? zero : weight;
    if (c.tis_token) {
      A wt = exp_(o - rolv);
      out.t.tis_out = tis_outside(wt, c.tis_min, c.tis_cap, c.tis_mask_mode);
      wt = c.tis_mask_mode ? (((wt > c.tis_cap) | (wt < c.tis_min)) ? zero : wt)
                           : (wt > c.tis_cap ? c.tis_cap : (wt < c.tis_min ? c.tis_min : wt));
      weight *= wt;
    }
    weight *= wv;  // the caller's per-token weight (1 when not given)
  }
  weight *= c.seq_tis;
  A l = weight * pg;
  dr *= weight;
  direct *= weight;
  A kl = zero;
  if (KL != 0) {
    const ValueGrad<A> k =
        kl_estimate(c.kl_kind, lp, refv, Bounds<A>{c.kl_lo != -std::numeric_limits<A>::infinity(),
                                                   c.kl_hi != std::numeric_limits<A>::infinity(), c.kl_lo, c.kl_hi});
    kl = k.value;
    if (c.use_kl) {
      l += c.kl_coef * (c.kl_corr ? kl * r : kl);
      direct += c.kl_coef * (c.kl_corr ? k.grad * r : k.grad);
      if (c.kl_corr) {
        dr += c.kl_coef * kl;
        uses_ratio = true;
      }
    }
  }
  if (EXTRA && c.use_ent) l -= c.ent_coef * h;
  out.t.loss = l;
  out.t.grad = SEQ ? direct : (uses_ratio ? direct + dr * r * dx : direct);
  out.t.dseq = SEQ ? dr : zero;
  out.t.ratio = r;
  out.t.kl = kl;
  out.t.dual_hit = zero;
  return out;
}


// The per-token loss and its derivative, written without data-dependent branches so that
// the token loop vectorises. KL: 0 none, 1 k1/k2 (by kl_kind), 2 k3. SEQ: the ratio is the
// row's shared sequence-level ratio; the derivative through it is returned in `dseq` and
// applied to the whole row afterwards. EXTRA: entropy and rollout log-probs are read.
template <class A, int KL, bool SEQ, bool EXTRA>
RLK_LOSS_INLINE TokenTerms<A> token_terms(const RowConst<A>& c, A lp, A o, A a, A refv, A rolv, A h,
                                          A wv = A(1)) {
  const A zero(0), one(1), half(0.5);
  A r, dx;
  if (SEQ) {
    r = c.seq_ratio;
    dx = c.seq_dx;
  } else {
    const A x = lp - o;
    const A xc = x < c.lr_lo ? c.lr_lo : (x > c.lr_hi ? c.lr_hi : x);
    dx = ((x < c.lr_lo) | (x > c.lr_hi)) ? zero : one;
    r = exp_(xc);
  }
  // PPO clip (with ratio cap and dual clip), CISPO, REINFORCE.
  const A r1 = r > c.cap ? c.cap : r;
  const A dr1 = r > c.cap ? zero : one;
  const A rc = r < c.clip_lo ? c.clip_lo : (r > c.clip_hi ? c.clip_hi : r);
  const A drc = ((r < c.clip_lo) | (r > c.clip_hi)) ? zero : one;
  const A u = -a * r1, v = -a * rc, du = -a * dr1, dv = -a * drc;
  // max and min that keep NaN as torch.maximum/minimum do (u alone is NaN when A = 0 and
  // r = inf).
  A s = ((u > v) | (u != u)) ? u : v;
  A ds = u > v ? du : (u < v ? dv : half * (du + dv));
  const bool dual_on = c.has_dual & (a < zero);
  const A bound = -a * c.dual;
  const A s_d = s > bound ? bound : s;
  const A ds_d = s < bound ? ds : (s > bound ? zero : half * ds);
  const A dual_hit = (dual_on & (s > bound)) ? one : zero;
  s = dual_on ? s_d : s;
  ds = dual_on ? ds_d : ds;
  // Selects rather than branches on the objective keep the loop free of control flow.
  const bool is_clip = c.objective == kClip, is_cispo = c.objective == kCispo;
  const A w_direct = is_cispo ? -rc * a : -a;
  A pg = is_clip ? s : w_direct * lp;
  A dr = is_clip ? ds : zero;
  A direct = is_clip ? zero : w_direct;
  // Detached weights: off-policy sequence mask, entropy selection, truncated IS.
  A weight = (c.drop_negative & !(a >= zero)) ? zero : one;
  A tis_out = zero;
  if (EXTRA) {
    weight = (c.has_select & !(h >= c.ent_threshold)) ? zero : weight;
    A wt = exp_(o - rolv);
    tis_out = c.tis_token ? tis_outside(wt, c.tis_min, c.tis_cap, c.tis_mask_mode) : zero;
    wt = c.tis_mask_mode ? (((wt > c.tis_cap) | (wt < c.tis_min)) ? zero : wt)
                         : (wt > c.tis_cap ? c.tis_cap : (wt < c.tis_min ? c.tis_min : wt));
    weight = c.tis_token ? weight * wt : weight;
    weight *= wv;  // the caller's per-token weight (1 when not given)
  }
  weight *= c.seq_tis;
  A l = weight * pg;
  dr *= weight;
  direct *= weight;
  A kl = zero;
  if (KL != 0) {
    const A d = refv - lp;
    A dkl;
    if (KL == 2) {
      const A e = exp_(d);
      kl = e - one - d;
      dkl = one - e;
    } else {
      kl = c.kl_kind == kK1 ? -d : half * d * d;
      dkl = c.kl_kind == kK1 ? one : -d;
    }
    dkl = ((kl < c.kl_lo) | (kl > c.kl_hi)) ? zero : dkl;
    kl = kl < c.kl_lo ? c.kl_lo : (kl > c.kl_hi ? c.kl_hi : kl);
    // Selected rather than multiplied by a zero coefficient: an infinite estimate must not
    // turn the loss into NaN when the KL only feeds the metric.
    l += c.use_kl ? c.kl_coef * (c.kl_corr ? kl * r : kl) : zero;
    direct += c.use_kl ? c.kl_coef * (c.kl_corr ? dkl * r : dkl) : zero;
    dr += (c.use_kl & c.kl_corr) ? c.kl_coef * kl : zero;
  }
  // Selected, not multiplied by a zero coefficient: an infinite entropy that only feeds the
  // metric must not make the loss NaN.
  if (EXTRA) l -= c.use_ent ? c.ent_coef * h : zero;
  TokenTerms<A> out;
  out.loss = l;
  // The ratio's derivative only where the ratio enters the loss: REINFORCE and CISPO never
  // evaluate r into it, so a NaN or infinite r (from old_logp) must not reach their gradient.
  const bool uses_ratio = is_clip | (c.use_kl & c.kl_corr);
  out.grad = SEQ ? direct : (uses_ratio ? direct + dr * r * dx : direct);
  out.dseq = SEQ ? dr : zero;
  out.ratio = r;
  out.kl = kl;
  out.dual_hit = dual_hit;
  out.tis_out = tis_out;
  return out;
}

template <class T>
struct PolicyInputs {
  const T *logp, *old, *ref, *rollout, *ent;
  const T* weights;  // aliases `old` when not given (loaded, then replaced by 1)
  const T* behaviour;  // the off-policy mask's log-probs: off_policy_logp, else `rollout`
  const acc_t<T>* adv;
  const uint8_t* mask;
  T* grad;  // storage type of logp: the gradient is written finished (scale folded in)
  const float* weights32;  // PolicyParams::weights_f32: the weights as float32 (else null)
  float* grad32;           // PolicyParams::grad_f32: the gradient as float32 (else null, `grad` used)
};

// The caller's weight at token i, read in its own type (float32 beside narrower storage).
template <class T>
RLK_LOSS_INLINE acc_t<T> load_weight(const PolicyInputs<T>& in, int64_t i) {
  if (!std::is_same<T, float>::value && in.weights32) return acc_t<T>(in.weights32[i]);
  return load(in.weights, i);
}

// Writes the finished gradient at token i into the gradient buffer's type. (float32 storage
// never has a separate float32 buffer: the test is compiled out.)
template <class T>
RLK_LOSS_INLINE void store_grad(const PolicyInputs<T>& in, int64_t i, acc_t<T> v) {
  if (!std::is_same<T, float>::value && in.grad32)
    in.grad32[i] = float(v);
  else
    store(in.grad, i, v);
}

// Tokens per lane group and per float flush: lanes keep W independent partial sums (so the
// loop vectorises without reassociating a reduction), flushed into double every block.
constexpr int kLanes = 16;
constexpr int kBlock = 256;

template <class A>
struct Lanes {
  A n[kLanes], loss[kLanes], ratio[kLanes], approx[kLanes], kl[kLanes], ent[kLanes], low[kLanes], high[kLanes],
      dual[kLanes], dseq[kLanes], obj[kLanes], approxc[kLanes], tiso[kLanes], rkl[kLanes];
  void clear() {
    for (int j = 0; j < kLanes; ++j)
      n[j] = loss[j] = ratio[j] = approx[j] = kl[j] = ent[j] = low[j] = high[j] = dual[j] = dseq[j] = obj[j] =
          approxc[j] = tiso[j] = rkl[j] = A(0);
  }
};

template <class T, int KL, bool SEQ, bool EXTRA, bool OBJ>
RLK_LOSS_INLINE void token_step(const PolicyInputs<T>& in, const RowConst<acc_t<T>>& c, int64_t i, int64_t ai,
                                  int j, Lanes<acc_t<T>>& L) {
  using A = acc_t<T>;
  const A zero(0);
  const bool m = in.mask[i] != 0;
  // Loads are unconditional and then masked, so masked NaNs never reach the arithmetic.
  A lp = load(in.logp, i), o = load(in.old, i), a = in.adv[ai];
  lp = m ? lp : zero;
  o = m ? o : zero;
  a = m ? a : zero;
  A refv = zero, rolv = zero, h = zero, wv = A(1);
  if (KL != 0) {
    refv = load(in.ref, i);
    refv = m ? refv : zero;
  }
  if (EXTRA) {
    rolv = load(in.rollout, i);
    h = load(in.ent, i);
    rolv = m ? rolv : zero;
    h = m ? h : zero;
    const A w = load_weight(in, i);
    wv = c.has_weights ? (m ? w : zero) : wv;
  }
  if (!SEQ) {
    // The clamped log-ratio again (token_terms computes the same): the compiler shares it.
    const A x = lp - o;
    const A xc = x < c.lr_lo ? c.lr_lo : (x > c.lr_hi ? c.lr_hi : x);
    L.approxc[j] += m ? -xc : zero;
  }
  if (OBJ) {
    const ExtraTerms<A> e = token_terms_obj<A, KL, SEQ, EXTRA>(c, lp, o, a, refv, rolv, h, wv);
    store_grad(in, i, m ? c.grad_w * e.t.grad : zero);
    L.n[j] += m ? A(1) : zero;
    L.loss[j] += m ? c.row_w * e.t.loss : zero;
    L.dseq[j] += m ? c.grad_w * e.t.dseq : zero;
    L.ratio[j] += m ? e.t.ratio : zero;
    L.approx[j] += o - lp;
    L.kl[j] += m ? e.t.kl : zero;
    L.ent[j] += h;
    L.low[j] += m ? e.low : zero;
    L.high[j] += m ? e.high : zero;
    L.obj[j] += m ? e.stat : zero;
    if (EXTRA) {
      L.tiso[j] += m ? e.t.tis_out : zero;
      L.rkl[j] += rolv - o;  // both 0 when masked; rolv is old_logp's value without rollout log-probs
    }
    return;
  }
  const TokenTerms<A> tt = token_terms<A, KL, SEQ, EXTRA>(c, lp, o, a, refv, rolv, h, wv);
  store_grad(in, i, m ? c.grad_w * tt.grad : zero);
  L.n[j] += m ? A(1) : zero;
  L.loss[j] += m ? c.row_w * tt.loss : zero;
  L.dseq[j] += m ? c.grad_w * tt.dseq : zero;
  L.ratio[j] += m ? tt.ratio : zero;
  L.approx[j] += o - lp;
  L.kl[j] += m ? tt.kl : zero;
  L.ent[j] += h;
  L.low[j] += (m & (tt.ratio < c.clip_lo) & (a < zero)) ? A(1) : zero;
  L.high[j] += (m & (tt.ratio > c.clip_hi) & (a > zero)) ? A(1) : zero;
  L.dual[j] += m ? tt.dual_hit : zero;
  // CISPO's clipped tokens, whatever the advantage's sign (a NaN ratio counts, as verl's r != clip(r)).
  L.obj[j] += (m & c.is_cispo & !((tt.ratio >= c.clip_lo) & (tt.ratio <= c.clip_hi))) ? A(1) : zero;
  if (EXTRA) {
    L.tiso[j] += m ? tt.tis_out : zero;
    L.rkl[j] += rolv - o;
  }
}

// ---------------------------------------------------------------------------------------
// Explicit SIMD for float arithmetic (float32 and bfloat16 storage). GCC and Clang vector
// extensions, 8 floats per vector: one AVX2 register where the CPU has it (the row function
// is compiled twice and chosen at run time), two SSE registers otherwise; no intrinsics.
// The body mirrors token_terms line by line; the scalar version handles row tails and the
// other storage types.
#if defined(__GNUC__)
#define RLK_POLICY_SIMD 1
// Vector values only cross always-inline helpers, never a real call boundary, so the ABI
// note about 32-byte vectors without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kVec = 8;

RLK_LOSS_INLINE vf splat(float x) { return vf{} + x; }
RLK_LOSS_INLINE vi mask_of(bool b) { return vi{} + (b ? -1 : 0); }

// simd.h's 8-lane exp (the arithmetic of losses.h's scalar fast_exp, lane for lane).
RLK_LOSS_INLINE vf vexp(vf x) { return rlk::simd::exp8(x); }

// Row constants broadcast once per row.
struct RowConstV {
  vf clip_lo, clip_hi, cap, dual, lr_lo, lr_hi, kl_lo, kl_hi, kl_coef, ent_coef, tis_cap, ent_threshold;
  vf seq_ratio, seq_dx, seq_tis, row_w, grad_w;
  vi has_dual, use_kl, kl_corr, tis_token, tis_mask_mode, has_select, drop_negative, is_clip, is_cispo, kl_k1;
  bool has_lr_clamp, clip_objective, cispo_objective, has_cap, has_dual_clip, drop_negative_row, has_seq_tis, k1,
      has_kl_clamp, use_kl_term, use_ent_term, kl_correction;
  bool has_weights;
  vf tis_min;
  // Totals the caller reads (PolicyParams::want), and whether the token ratio must be
  // evaluated at all: REINFORCE without ratio metrics never needs its exp.
  bool w_ratio, w_low, w_high, w_approx, w_kl, w_ent, w_dual, w_obj, w_approxc, w_tiso, w_rkl, need_ratio, need_old;
  explicit RowConstV(const RowConst<float>& c)
      : clip_lo(splat(c.clip_lo)), clip_hi(splat(c.clip_hi)), cap(splat(c.cap)), dual(splat(c.dual)),
        lr_lo(splat(c.lr_lo)), lr_hi(splat(c.lr_hi)), kl_lo(splat(c.kl_lo)), kl_hi(splat(c.kl_hi)),
        kl_coef(splat(c.kl_coef)), ent_coef(splat(c.ent_coef)), tis_cap(splat(c.tis_cap)),
        ent_threshold(splat(c.ent_threshold)), seq_ratio(splat(c.seq_ratio)), seq_dx(splat(c.seq_dx)),
        seq_tis(splat(c.seq_tis)), row_w(splat(c.row_w)), grad_w(splat(c.grad_w)), has_dual(mask_of(c.has_dual)), use_kl(mask_of(c.use_kl)),
        kl_corr(mask_of(c.kl_corr)), tis_token(mask_of(c.tis_token)), tis_mask_mode(mask_of(c.tis_mask_mode)),
        has_select(mask_of(c.has_select)), drop_negative(mask_of(c.drop_negative)),
        is_clip(mask_of(c.objective == kClip)), is_cispo(mask_of(c.objective == kCispo)),
        kl_k1(mask_of(c.kl_kind == kK1)) {
    const float inf = std::numeric_limits<float>::infinity();
    has_lr_clamp = c.lr_lo != -inf || c.lr_hi != inf;
    clip_objective = c.objective == kClip;
    cispo_objective = c.objective == kCispo;
    has_cap = c.cap != inf;
    has_dual_clip = c.has_dual;
    drop_negative_row = c.drop_negative;
    has_seq_tis = c.seq_tis != 1.0f;
    k1 = c.kl_kind == kK1;
    has_kl_clamp = c.kl_lo != -inf || c.kl_hi != inf;
    use_kl_term = c.use_kl;
    use_ent_term = c.use_ent;
    kl_correction = c.kl_corr;
    has_weights = c.has_weights;
    tis_min = splat(c.tis_min);
    auto wants = [&](int k) { return (c.want >> k & 1u) != 0; };
    w_ratio = wants(kRatioSum);
    w_low = wants(kClipLow);
    w_high = wants(kClipHigh);
    w_approx = wants(kApproxKlSum);
    w_kl = wants(kKlSum);
    w_ent = wants(kEntropySum);
    w_dual = wants(kDualClip) && c.has_dual;
    w_obj = wants(kObjective) || wants(kObjectiveRow);
    w_approxc = wants(kApproxKlClamped);
    w_tiso = wants(kTisOutside);
    w_rkl = wants(kRolloutKl);
    need_ratio = c.objective != kReinforce || (c.use_kl && c.kl_corr) || w_ratio || w_low || w_high;
    need_old = need_ratio || w_approx || w_approxc || w_obj;
  }
};

struct LanesV {
  vf n, loss, ratio, approx, kl, ent, low, high, dual, dseq, obj, approxc, tiso, rkl;
  void clear() {
    n = loss = ratio = approx = kl = ent = low = high = dual = dseq = obj = approxc = tiso = rkl = splat(0.0f);
  }
  float sum(vf v) const { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
};

// Storage loads and stores: simd_io.h's (bfloat16 widened exactly, narrowed to nearest even).
RLK_LOSS_INLINE vf vload(const float* p, int64_t i) { return rlk::simd::load8(p, i); }
RLK_LOSS_INLINE vf vload(const bf16* p, int64_t i) { return rlk::simd::load8(p, i); }
RLK_LOSS_INLINE void vstore(float* p, int64_t i, vf v) { rlk::simd::store8(p, i, v); }
RLK_LOSS_INLINE void vstore(bf16* p, int64_t i, vf v) { rlk::simd::store8(p, i, v); }

RLK_LOSS_INLINE vi load_mask(const uint8_t* mp) { return rlk::simd::mask_bytes(mp); }

// load_weight and store_grad of 8 tokens.
template <class T>
RLK_LOSS_INLINE vf vload_weight(const PolicyInputs<T>& in, int64_t i) {
  if (!std::is_same<T, float>::value && in.weights32) return vload(in.weights32, i);
  return vload(in.weights, i);
}
template <class T>
RLK_LOSS_INLINE void vstore_grad(const PolicyInputs<T>& in, int64_t i, vf v) {
  if (!std::is_same<T, float>::value && in.grad32)
    vstore(in.grad32, i, v);
  else
    vstore(in.grad, i, v);
}
// Whether none of the kVec mask bytes at mp is set.
RLK_LOSS_INLINE bool none_active(const uint8_t* mp) {
  uint64_t q;
  __builtin_memcpy(&q, mp, sizeof q);
  return q == 0;
}
RLK_LOSS_INLINE float lane_sum(vf v) { return rlk::simd::lanes_sum(v); }
// Storage types with a vector path (the arithmetic type must be float).
template <class T>
constexpr bool kSimd = std::is_same<T, float>::value || std::is_same<T, bf16>::value;

// Sums of one row for the sequence-level prepass when only the token count, the log-ratio
// and the log-probs are needed (no rollout, off-policy or sequence-TIS terms): 16 tokens
// per step in two independent accumulator sets, flushed to double every 512 tokens.
struct RowSums {
  double n = 0, lr = 0, lp = 0;
  int64_t done = 0;  // tokens covered; the caller finishes the tail
};
template <class T>
RLK_LOSS_INLINE RowSums row_sums_v(const T* logp, const T* old, const uint8_t* m, int64_t T_) {
  RowSums out;
  const vf zero = splat(0.0f), one = splat(1.0f);
  int64_t t = 0;
  while (t + 16 <= T_) {
    const int64_t stop = std::min<int64_t>(T_, t + 512);
    vf n0 = zero, n1 = zero, lr0 = zero, lr1 = zero, lp0 = zero, lp1 = zero;
    for (; t + 16 <= stop; t += 16) {
      const vi m0 = load_mask(m + t), m1 = load_mask(m + t + 8);
      const vf a0 = m0 ? vload(logp, t) : zero, a1 = m1 ? vload(logp, t + 8) : zero;
      const vf o0 = m0 ? vload(old, t) : zero, o1 = m1 ? vload(old, t + 8) : zero;
      n0 += m0 ? one : zero;
      n1 += m1 ? one : zero;
      lr0 += a0 - o0;
      lr1 += a1 - o1;
      lp0 += a0;
      lp1 += a1;
    }
    out.n += double(lane_sum(n0 + n1));
    out.lr += double(lane_sum(lr0)) + double(lane_sum(lr1));
    out.lp += double(lane_sum(lp0)) + double(lane_sum(lp1));
  }
  out.done = t;
  return out;
}

// One vector step's inputs, masked positions zeroed (masked NaNs never reach the arithmetic).
struct TokenV {
  vi m;
  vf lp, o, a, refv, rolv, h;
};

template <class T, int KL, bool EXTRA, bool LEAN = false>
RLK_LOSS_INLINE TokenV load_token_v(const PolicyInputs<T>& in, int64_t i, int64_t ai, bool adv_per_token,
                                    bool need_old = true) {
  const vf zero = splat(0.0f);
  TokenV t;
  t.m = load_mask(in.mask + i);
  t.lp = t.m ? vload(in.logp, i) : zero;
  // REINFORCE without ratio or log-ratio metric never reads the old log-probs: a stream less.
  t.o = need_old ? (t.m ? vload(in.old, i) : zero) : zero;
  t.a = t.m ? (adv_per_token ? vload(in.adv, ai) : splat(in.adv[ai])) : zero;
  t.refv = t.rolv = t.h = zero;
  if (KL != 0) t.refv = t.m ? vload(in.ref, i) : zero;
  if (EXTRA && !LEAN) {  // the lean profile has neither (its EXTRA only brings the weights)
    t.rolv = t.m ? vload(in.rollout, i) : zero;
    t.h = t.m ? vload(in.ent, i) : zero;
  }
  return t;
}

// What every vector body does after its policy term (pg, its ratio derivative dr and its
// direct logp derivative): drop the row's negative advantages, multiply by the token weights
// (entropy selection, truncated IS, the caller's weights) and the sequence IS weight, then add
// the KL term (kl_t) and the entropy bonus into the loss l. The scalar form is the tail of
// token_terms / token_terms_obj. Returns whether the KL term reads the ratio
// (kl_is_correction), so that the caller adds dr's chain through it.
template <class T, int KL, bool EXTRA, bool LEAN = false>
RLK_LOSS_INLINE bool finish_terms_v(const PolicyInputs<T>& in, const RowConstV& c, int64_t i, const TokenV& t,
                                    vf r, vf& pg, vf& dr, vf& direct, vf& l, vf& kl, LanesV& L) {
  const vf zero = splat(0.0f), one = splat(1.0f), half = splat(0.5f);
  if (LEAN && c.has_weights) {
    // The lean profile (see policy_lean): the caller's weights are the only token factor.
    const vf w = t.m ? vload_weight(in, i) : zero;
    pg *= w;
    direct *= w;
  }
  if (!LEAN && c.drop_negative_row) {
    const vf keep = (t.a >= zero) ? one : zero;
    pg *= keep;
    dr *= keep;
    direct *= keep;
  }
  if (EXTRA && !LEAN) {
    vf weight = (c.has_select & ~(t.h >= c.ent_threshold)) ? zero : one;
    if (c.tis_token[0]) {
      vf wt = vexp(t.o - t.rolv);
      // counted here (tis_outside's rule) so that the raw weight need not outlive this block
      if (c.w_tiso) {
        const vi beyond =
            c.tis_mask_mode ? ~((wt >= c.tis_min) & (wt <= c.tis_cap)) : ((wt < c.tis_min) | (wt > c.tis_cap));
        L.tiso += (t.m & beyond) ? one : zero;
      }
      wt = c.tis_mask_mode ? (((wt > c.tis_cap) | (wt < c.tis_min)) ? zero : wt)
                           : (wt > c.tis_cap ? c.tis_cap : (wt < c.tis_min ? c.tis_min : wt));
      weight *= wt;
    }
    if (c.has_weights) weight *= t.m ? vload_weight(in, i) : zero;  // the caller's per-token weights
    pg *= weight;
    dr *= weight;
    direct *= weight;
    if (c.w_rkl) L.rkl += t.rolv - t.o;  // both 0 when masked
  }
  if (!LEAN && c.has_seq_tis) {
    pg *= c.seq_tis;
    dr *= c.seq_tis;
    direct *= c.seq_tis;
  }
  l = pg;
  kl = zero;
  bool kl_uses_ratio = false;
  if (KL != 0) {
    const vf d = t.refv - t.lp;
    vf dkl;
    if (KL == 2) {
      const vf e = vexp(d);
      kl = e - one - d;
      dkl = one - e;
    } else if (c.k1) {
      kl = -d;
      dkl = one;
    } else {
      kl = half * d * d;
      dkl = -d;
    }
    if (c.has_kl_clamp) {
      dkl = ((kl < c.kl_lo) | (kl > c.kl_hi)) ? zero : dkl;
      kl = kl < c.kl_lo ? c.kl_lo : (kl > c.kl_hi ? c.kl_hi : kl);
    }
    if (c.use_kl_term) {
      if (!LEAN && c.kl_correction) {
        l += c.kl_coef * (kl * r);
        direct += c.kl_coef * (dkl * r);
        dr += c.kl_coef * kl;
        kl_uses_ratio = true;
      } else {
        l += c.kl_coef * kl;
        direct += c.kl_coef * dkl;
      }
    }
  }
  if (EXTRA && !LEAN && c.use_ent_term) l -= c.ent_coef * t.h;
  return kl_uses_ratio;
}

// LEAN: the row is in policy_lean's profile (REINFORCE or CISPO at token level, no KL,
// entropy, rollout or sequence terms, only the totals that profile can read): every branch on
// an option it excludes is compiled out, which leaves the few live accumulators and row
// constants in registers (the full body keeps them on the stack).
template <class T, int KL, bool SEQ, bool EXTRA, bool LEAN = false>
RLK_LOSS_INLINE void token_step_v(const PolicyInputs<T>& in, const RowConstV& c, int64_t i, int64_t ai,
                                    bool adv_per_token, LanesV& L) {
  // Options are constant over the row: plain branches on them are perfectly predicted and
  // skip the vector work of options that are off.
  const vf zero = splat(0.0f), one = splat(1.0f), half = splat(0.5f);
  const TokenV t = load_token_v<T, KL, EXTRA, LEAN>(in, i, ai, adv_per_token, !LEAN || c.need_old);
  const vi m = t.m;
  const vf lp = t.lp, o = t.o, a = t.a;
  vf r, dx, xc = zero;
  if (SEQ) {
    r = c.seq_ratio;
    dx = c.seq_dx;
  } else {
    const vf x = lp - o;
    xc = x;
    dx = one;
    if (c.has_lr_clamp) {
      xc = x < c.lr_lo ? c.lr_lo : (x > c.lr_hi ? c.lr_hi : x);
      dx = ((x < c.lr_lo) | (x > c.lr_hi)) ? zero : one;
    }
    // REINFORCE whose caller reads no ratio metric never looks at r (its loss and gradient
    // are -A logp's): the exp, the body's dearest part, is skipped.
    r = c.need_ratio ? vexp(xc) : zero;
  }
  vf pg, dr, direct;
  vf dual_hit = zero;
  if (!LEAN && c.clip_objective) {
    const vf rc = r < c.clip_lo ? c.clip_lo : (r > c.clip_hi ? c.clip_hi : r);
    const vf drc = ((r < c.clip_lo) | (r > c.clip_hi)) ? zero : one;
    vf u = -a * r, du = -a;
    if (c.has_cap) {
      u = r > c.cap ? -a * c.cap : u;
      du = r > c.cap ? zero : du;
    }
    const vf v = -a * rc, dv = -a * drc;
    vf s = ((u > v) | (u != u)) ? u : v;  // NaN-keeping max and min, as in token_terms
    vf ds = u > v ? du : (u < v ? dv : half * (du + dv));
    if (c.has_dual_clip) {
      const vi dual_on = a < zero;
      const vf bound = -a * c.dual;
      const vf s_d = s > bound ? bound : s;
      const vf ds_d = s < bound ? ds : (s > bound ? zero : half * ds);
      dual_hit = (dual_on & (s > bound)) ? one : zero;
      s = dual_on ? s_d : s;
      ds = dual_on ? ds_d : ds;
    }
    pg = s;
    dr = ds;
    direct = zero;
  } else {
    direct = -a;
    if (c.cispo_objective) direct *= r < c.clip_lo ? c.clip_lo : (r > c.clip_hi ? c.clip_hi : r);
    pg = direct * lp;
    dr = zero;
  }
  vf l, kl;
  const bool kl_uses_ratio = finish_terms_v<T, KL, EXTRA, LEAN>(in, c, i, t, r, pg, dr, direct, l, kl, L);
  // As in token_terms: the ratio's derivative only where the ratio enters the loss.
  const vf g = (SEQ || LEAN) ? direct : ((c.clip_objective || kl_uses_ratio) ? direct + dr * r * dx : direct);
  vstore_grad(in, i, m ? c.grad_w * g : zero);
  L.n += m ? one : zero;
  L.loss += m ? c.row_w * l : zero;
  if (SEQ) L.dseq += m ? c.grad_w * dr : zero;
  // The totals' accumulators, each only where the caller reads it (row-constant branches).
  if (!LEAN && c.w_ratio) L.ratio += m ? r : zero;
  if (c.w_approx) L.approx += o - lp;
  if (KL != 0 && c.w_kl) L.kl += m ? kl : zero;
  if (EXTRA && !LEAN && c.w_ent) L.ent += t.h;
  if (!LEAN && c.w_low) L.low += (m & (r < c.clip_lo) & (a < zero)) ? one : zero;
  if (!LEAN && c.w_high) L.high += (m & (r > c.clip_hi) & (a > zero)) ? one : zero;
  if (!LEAN && c.w_dual) L.dual += m ? dual_hit : zero;
  // A masked token's zero log-ratio may clamp to a non-zero bound: masked, not just summed.
  if (!SEQ && c.w_approxc) L.approxc += m ? -xc : zero;
  if (c.cispo_objective && c.w_obj) L.obj += (m & ~((r >= c.clip_lo) & (r <= c.clip_hi))) ? one : zero;
}

RLK_LOSS_INLINE vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

// Natural log in float (Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-8
// polynomial in m - 1; about 1 ulp), without a library call so that it stays in vector
// registers. Subnormals are scaled up first; log(0) = -inf, log(inf) = inf, log(x < 0) and
// log(NaN) = NaN, as std::log.
RLK_LOSS_INLINE vf vlog(vf x) {
  const vf zero = splat(0.0f), one = splat(1.0f);
  const vi sub = x < std::numeric_limits<float>::min();
  const vf xs = sub ? x * 8388608.0f : x;  // 2^23
  const vi bits = (vi)xs;
  vi e = ((bits >> 23) & 0xff) - 126 - (sub & 23);
  vf mnt = (vf)((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const vi low = mnt < 0.707106781186547524f;
  e += low;  // -1 where the mantissa is doubled
  mnt = (mnt - one) + (low ? mnt : zero);
  const vf z = mnt * mnt;
  vf y = ((((((((7.0376836292e-2f * mnt - 1.1514610310e-1f) * mnt + 1.1676998740e-1f) * mnt - 1.2420140846e-1f) *
                   mnt + 1.4249322787e-1f) * mnt - 1.6668057665e-1f) * mnt + 2.0000714765e-1f) * mnt -
              2.4999993993e-1f) * mnt + 3.3333331174e-1f) * mnt * z;
  const vf fe = __builtin_convertvector(e, vf);
  y += fe * -2.12194440e-4f;
  y -= 0.5f * z;
  vf r = (mnt + y) + fe * 0.693359375f;
  r = x == zero ? splat(-std::numeric_limits<float>::infinity()) : r;
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  return ((x < zero) | (x != x)) ? splat(std::numeric_limits<float>::quiet_NaN()) : r;
}

// The objectives' row constants (SAPO, GMPO, VESPO, DPPO), broadcast once per row.
struct ObjConstV {
  vf tau_pos, tau_neg, phi_pos, phi_neg, geo_lo, geo_hi, geo_adv, div_lo, div_hi;
  int objective;
  explicit ObjConstV(const RowConst<float>& c)
      : tau_pos(splat(c.tau_pos)), tau_neg(splat(c.tau_neg)), phi_pos(splat(c.phi_pos)), phi_neg(splat(c.phi_neg)),
        geo_lo(splat(c.geo_lo)), geo_hi(splat(c.geo_hi)), geo_adv(splat(c.geo_adv)), div_lo(splat(c.div_lo)),
        div_hi(splat(c.div_hi)), objective(c.objective) {}
};

// GMPO's clipped log-ratio and its derivative (gmpo_log_ratio in losses.h, with min_branch's
// NaN and tie rules), 8 tokens at once.
RLK_LOSS_INLINE void gmpo_log_ratio_v(vf x, vf a, vf lo, vf hi, vf& y, vf& dy) {
  const vf zero = splat(0.0f), one = splat(1.0f);
  const vf s = a > zero ? one : (a < zero ? -one : (a == a ? zero : a));
  const vf xc = x < lo ? lo : (x > hi ? hi : x);
  const vf dc = ((x < lo) | (x > hi)) ? zero : one;
  const vf u = s * x, du = s, v = s * xc, dv = s * dc;
  const vf mn = u < v ? u : (u > v ? v : (v != v ? v : u));
  const vf dmn = u < v ? du : (u > v ? dv : (v != v ? dv : (u != u ? du : 0.5f * (du + dv))));
  y = s * mn;
  dy = s * dmn;
}

// The vector form of token_terms_obj (SAPO, GMPO, VESPO, DPPO-TV/KL) with token_step's
// accumulation; the scalar token_step<..., OBJ = true> handles row tails and float64/float16.
template <class T, int KL, bool SEQ, bool EXTRA>
RLK_LOSS_INLINE void token_step_obj_v(const PolicyInputs<T>& in, const RowConstV& c, const ObjConstV& q, int64_t i,
                                        int64_t ai, bool adv_per_token, LanesV& L) {
  const vf zero = splat(0.0f), one = splat(1.0f);
  const TokenV t = load_token_v<T, KL, EXTRA>(in, i, ai, adv_per_token);
  const vi m = t.m;
  const vf lp = t.lp, o = t.o, a = t.a;
  vf r, dx, x = zero;
  if (SEQ) {
    r = c.seq_ratio;
    dx = c.seq_dx;
  } else {
    x = lp - o;
    if (c.has_lr_clamp) {
      const vf xc = x < c.lr_lo ? c.lr_lo : (x > c.lr_hi ? c.lr_hi : x);
      dx = ((x < c.lr_lo) | (x > c.lr_hi)) ? zero : one;
      x = xc;
    } else {
      dx = one;
    }
    r = vexp(x);
  }
  vf low = ((r < c.clip_lo) & (a < zero)) ? one : zero;
  vf high = ((r > c.clip_hi) & (a > zero)) ? one : zero;
  vf stat = zero, pg, dr = zero, direct = zero;
  bool uses_ratio = false;
  switch (q.objective) {
    case kSapo: {
      const vf tau = a > zero ? q.tau_pos : q.tau_neg;
      const vf z = tau * (r - one);
      const vf e = vexp(-vabs(z));
      const vf s = (z >= zero ? one : e) / (one + e);
      pg = -(s * 4.0f / tau) * a;
      dr = -(4.0f * s * (one - s)) * a;
      uses_ratio = true;
      break;
    }
    case kGeoMean: {
      vf y, dy;
      gmpo_log_ratio_v(x, a, q.geo_lo, q.geo_hi, y, dy);
      r = c.seq_ratio;
      pg = -q.geo_adv * r;
      direct = pg * dy * dx;
      const vi outside = (x < q.geo_lo) | (x > q.geo_hi);
      low = (outside & (a < zero)) ? one : zero;
      high = (outside & (a > zero)) ? one : zero;
      break;
    }
    case kVespo: {
      const vf phi = a >= zero ? q.phi_pos : q.phi_neg;
      direct = -phi * a;
      pg = direct * lp;
      stat = phi;
      break;
    }
    default: {  // kDppoTv, kDppoKl: dppo_valid in losses.h
      const vf p = vexp(lp), p_old = vexp(o);
      const vi pos = a > zero;
      vi valid;
      if (q.objective == kDppoKl) {
        const float eps = 1e-8f;
        const vf bkl = p_old * (o - lp) + (one - p_old) * vlog((one - p_old + eps) / (one - p + eps));
        valid = pos ? ((bkl <= q.div_hi) | (p <= p_old)) : ((bkl <= q.div_lo) | (p >= p_old));
      } else {
        valid = pos ? ((p - p_old) <= q.div_hi) : ((p - p_old) >= -q.div_lo);
      }
      const vf w = r > c.cap ? c.cap : r;
      const vf v = valid ? one : zero;
      direct = -a * w * v;
      pg = -a * w * lp * v;
      low = (~valid & ~pos) ? one : zero;
      high = (~valid & pos) ? one : zero;
      stat = (valid & (r > c.cap)) ? one : zero;
      break;
    }
  }
  vf l, kl;
  uses_ratio |= finish_terms_v<T, KL, EXTRA>(in, c, i, t, r, pg, dr, direct, l, kl, L);
  const vf g = SEQ ? direct : (uses_ratio ? direct + dr * r * dx : direct);
  vstore_grad(in, i, m ? c.grad_w * g : zero);
  L.n += m ? one : zero;
  L.loss += m ? c.row_w * l : zero;
  if (SEQ) L.dseq += m ? c.grad_w * dr : zero;
  if (c.w_ratio) L.ratio += m ? r : zero;
  if (c.w_approx) L.approx += o - lp;
  if (KL != 0 && c.w_kl) L.kl += m ? kl : zero;
  if (EXTRA && c.w_ent) L.ent += t.h;
  if (c.w_low) L.low += m ? low : zero;
  if (c.w_high) L.high += m ? high : zero;
  if (c.w_obj) L.obj += m ? stat : zero;
  if (!SEQ && c.w_approxc) L.approxc += m ? -x : zero;  // x is the clamped log-ratio here
}
#endif

// g[t] = m[t] ? v : 0 over one row, in the gradient buffer's type G.
template <class G>
RLK_LOSS_INLINE void fill_row(G* g, const uint8_t* m, int64_t n, acc_t<G> v) {
  int64_t t = 0;
#ifdef RLK_POLICY_SIMD
  if constexpr (kSimd<G>) t = rlk::simd::fill_masked(g, m, n, float(v));
#endif
  for (; t < n; ++t) store(g, t, m[t] ? v : acc_t<G>(0));
}

// g[t] += add at the active tokens of one row (the sequence ratio's share of the gradient).
template <class G>
RLK_LOSS_INLINE void add_row(G* g, const uint8_t* m, int64_t n, acc_t<G> add) {
  int64_t t = 0;
#ifdef RLK_POLICY_SIMD
  if constexpr (kSimd<G>) {
    for (; t + kVec <= n; t += kVec) {
      const vi mm = load_mask(m + t);
      const vf cur = vload(g, t);
      vstore(g, t, mm ? cur + add : cur);
    }
  }
#endif
  for (; t < n; ++t)
    if (m[t]) store(g, t, acc_t<G>(load(g, t)) + add);
}

template <class T, int KL, bool SEQ, bool EXTRA, bool OBJ, bool LEAN = false>
RLK_LOSS_INLINE void policy_rows_impl(const PolicyParams& p, int64_t row_begin, int64_t row_end, double* stats) {
  using A = acc_t<T>;
  const A inf = std::numeric_limits<A>::infinity();
  PolicyInputs<T> in;
  in.logp = as_ptr<const T>(p.logp);
  in.old = as_ptr<const T>(p.old_logp);
  in.ref = as_ptr<const T>(p.ref_logp);
  // Without rollout log-probs the behaviour policy (for the off-policy mask) is the old one.
  in.rollout = p.rollout_logp ? as_ptr<const T>(p.rollout_logp) : in.old;
  in.ent = p.entropy ? as_ptr<const T>(p.entropy) : in.old;
  in.weights = p.weights ? as_ptr<const T>(p.weights) : in.old;
  in.behaviour = p.off_policy_logp ? as_ptr<const T>(p.off_policy_logp) : in.rollout;
  in.adv = as_ptr<const A>(p.advantages);
  in.mask = as_ptr<const uint8_t>(p.mask);
  in.grad = as_ptr<T>(p.grad_logp);
  in.weights32 = p.weights_f32 && p.weights ? as_ptr<const float>(p.weights) : nullptr;
  in.grad32 = p.grad_f32 ? as_ptr<float>(p.grad_logp) : nullptr;
  T* grad_ent = p.grad_f32 ? nullptr : as_ptr<T>(p.grad_entropy);
  float* grad_ent32 = p.grad_f32 ? as_ptr<float>(p.grad_entropy) : nullptr;

  RowConst<A> c;
  c.clip_lo = A(p.clip_lo);
  c.clip_hi = A(p.clip_hi);
  c.cap = p.has_ratio_cap ? A(p.ratio_cap) : inf;
  c.has_dual = p.has_dual;
  c.dual = p.has_dual ? A(p.dual_clip) : A(0);
  c.lr_lo = p.has_lr_lo ? A(p.lr_lo) : -inf;
  c.lr_hi = p.has_lr_hi ? A(p.lr_hi) : inf;
  c.kl_lo = p.has_kl_lo ? A(p.kl_lo) : -inf;
  c.kl_hi = p.has_kl_hi ? A(p.kl_hi) : inf;
  c.kl_coef = A(p.kl_coef);
  c.kl_kind = p.kl_kind;
  c.kl_corr = p.kl_correction;
  c.use_kl = p.kl_coef != 0.0;
  c.ent_coef = p.entropy ? A(p.entropy_coef) : A(0);
  c.use_ent = p.entropy && p.entropy_coef != 0.0;
  c.has_select = p.has_entropy_select;
  c.ent_threshold = A(p.entropy_threshold);
  c.tis_cap = A(p.tis_cap);
  c.tis_min = A(p.tis_min);
  c.tis_token = p.has_tis && !p.tis_seq;
  c.tis_mask_mode = p.tis_mask_mode;
  c.has_weights = p.weights != 0;
  c.want = p.want;
  c.objective = p.objective;
  c.is_cispo = p.objective == kCispo;
  c.tau_pos = A(p.sapo_tau_pos);
  c.tau_neg = A(p.sapo_tau_neg);
  c.geo_lo = A(-p.clip_low);
  c.geo_hi = A(p.clip_high);
  c.div_lo = A(p.clip_low);
  c.div_hi = A(p.clip_high);
  c.phi_pos = c.phi_neg = c.geo_adv = A(0);
  // set per row where they apply (the prepass); defined here for the rows that read none
  c.seq_ratio = c.seq_dx = c.seq_tis = A(0);
  // VESPO folds the importance weights against the rollout into its sequence weight.
  const bool vespo_tis = p.objective == kVespo && p.has_tis;
  if (vespo_tis) c.tis_token = false;
  const A off_threshold = A(p.off_threshold);
  const Bounds<A> lr_clamp{p.has_lr_lo, p.has_lr_hi, A(p.lr_lo), A(p.lr_hi)};
  const bool tis_seq = p.has_tis && p.tis_seq;
  const bool need_prepass = SEQ || p.has_off || tis_seq || p.agg == kSeqMeanTokenMean;
  const int64_t T_ = p.T;

  Lanes<A> L;
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t base = b * T_;
    const uint8_t* m = in.mask + base;
    const int64_t adv_base = p.adv_per_token ? base : b;
    const int64_t adv_step = p.adv_per_token ? 1 : 0;

    // Per-sequence quantities: token count, mean log-ratio, off-policy divergence and the
    // sequence-level log importance weight.
    A n_row = 0, s_lr = 0, s_div = 0, s_tis = 0;
    double sum_lp = 0, sum_lr = 0;
    // Both prepasses end alike: the per-sequence quantities from their double sums;
    // returns the token count floored at 1.
    auto finish_prepass = [&](double dn, double dlr, double ddiv, double dtis, double dlp) {
      n_row = A(dn);
      const double n1 = std::max(dn, 1.0);
      s_lr = A(dlr / n1);
      s_div = A(ddiv / n1);
      s_tis = A(dtis);
      sum_lp = dlp;
      sum_lr = dlr;
      return n1;
    };
    if (OBJ && (p.objective == kGeoMean || p.objective == kVespo)) {
      // GMPO's and VESPO's prepass: the sums of the legacy prepass plus GMPO's clipped
      // log-ratios and advantages and VESPO's log sequence weight. (SAPO and DPPO need only
      // the legacy prepass's sums.)
      double dn = 0, dlr = 0, ddiv = 0, dtis = 0, dlp = 0, dgeo = 0, dadv = 0, dves = 0, dves_tis = 0;
      const double vlo = std::log(1e-8), vhi = 20.0;
      int64_t t = 0;
#ifdef RLK_POLICY_SIMD
      if constexpr (kSimd<T>) {
        // float lanes flushed to double every block; VESPO's importance weights against the
        // rollout stay in the scalar loop below.
        if (!vespo_tis) {
          const vf zero = splat(0.0f), one = splat(1.0f), lim = splat(20.0f);
          const vf glo = splat(c.geo_lo), ghi = splat(c.geo_hi);
          const vf llo = splat(p.has_lr_lo ? A(p.lr_lo) : -inf), lhi = splat(p.has_lr_hi ? A(p.lr_hi) : inf);
          const bool geo = p.objective == kGeoMean;
          while (t + kVec <= T_) {
            const int64_t stop = std::min<int64_t>(T_, t + kBlock);
            vf vn = zero, vlr = zero, vdiv = zero, vtis = zero, vlp = zero, vgeo = zero, vadv = zero, vves = zero;
            for (; t + kVec <= stop; t += kVec) {
              const vi mm = load_mask(m + t);
              const vf lp = mm ? vload(in.logp, base + t) : zero;
              const vf o = mm ? vload(in.old, base + t) : zero;
              const vf ro = EXTRA ? (mm ? vload(in.rollout, base + t) : zero) : o;
              const vf bh = EXTRA ? (mm ? vload(in.behaviour, base + t) : zero) : o;
              vn += mm ? one : zero;
              vlr += lp - o;
              vdiv += bh - lp;
              vtis += o - ro;
              vlp += lp;
              const vf x = lp - o;
              if (geo) {
                vf a = p.adv_per_token ? vload(in.adv, adv_base + t) : splat(in.adv[adv_base]);
                a = mm ? a : zero;
                const vf xc = x < llo ? llo : (x > lhi ? lhi : x);
                vf y, dy;
                gmpo_log_ratio_v(xc, a, glo, ghi, y, dy);
                vgeo += mm ? y : zero;
                vadv += a;
              } else {
                vves += x < -lim ? -lim : (x > lim ? lim : x);
              }
            }
            dn += lane_sum(vn);
            dlr += lane_sum(vlr);
            ddiv += lane_sum(vdiv);
            dtis += lane_sum(vtis);
            dlp += lane_sum(vlp);
            dgeo += lane_sum(vgeo);
            dadv += lane_sum(vadv);
            dves += lane_sum(vves);
          }
        }
      }
#endif
      for (; t < T_; ++t) {
        if (!m[t]) continue;
        const A lp = load(in.logp, base + t), o = load(in.old, base + t), ro = load(in.rollout, base + t);
        const A a = in.adv[adv_base + t * adv_step];
        dn += 1;
        dlr += double(lp - o);
        ddiv += double(A(load(in.behaviour, base + t)) - lp);
        dtis += double(o - ro);
        dlp += double(lp);
        if (p.objective == kGeoMean) {
          const A x = lr_clamp.apply(lp - o).value;
          dgeo += double(gmpo_log_ratio(x, a, c.geo_lo, c.geo_hi).value);
          dadv += double(a);
        } else if (p.objective == kVespo) {
          const A x = lp - o;
          dves += double(x < A(-20) ? A(-20) : (x > A(20) ? A(20) : x));
          if (vespo_tis) {
            A w = std::exp(o - ro);
            w = p.tis_mask_mode ? ((w > c.tis_cap || w < c.tis_min) ? A(0) : w)
                                : (w > c.tis_cap ? c.tis_cap : (w < c.tis_min ? c.tis_min : w));
            const double lw = double(std::log(w));
            dves_tis += lw < vlo ? vlo : (lw > vhi ? vhi : lw);
          }
        }
      }
      const double n1 = finish_prepass(dn, dlr, ddiv, dtis, dlp);
      if (p.objective == kGeoMean) {
        c.geo_adv = A(dadv / n1);
        c.seq_ratio = std::exp(A(dgeo / n1));
      } else if (p.objective == kVespo) {
        double lw = dves + dves_tis;
        lw = lw < vlo ? vlo : (lw > vhi ? vhi : lw);
        c.phi_pos = vespo_phi(A(lw), A(p.vespo_k_pos), std::max(A(p.vespo_lambda_pos), A(1e-4)));
        c.phi_neg = vespo_phi(A(lw), A(p.vespo_k_neg), std::max(A(p.vespo_lambda_neg), A(1e-4)));
      }
    } else if (need_prepass && !SEQ && !p.has_off && !tis_seq) {
      // seq-mean-token-mean at token level needs only the row's token count (its row weight):
      // a pass over the mask, not over the log-probs.
      int64_t n = 0;
      for (int64_t t = 0; t < T_; ++t) n += m[t] != 0;
      finish_prepass(double(n), 0.0, 0.0, 0.0, 0.0);
    } else if (need_prepass) {
      A ln[kLanes] = {}, llr[kLanes] = {}, ldiv[kLanes] = {}, ltis[kLanes] = {};
      double dn = 0, dlr = 0, ddiv = 0, dtis = 0, dlp = 0;
      int64_t start = 0;
#ifdef RLK_POLICY_SIMD
      if constexpr (kSimd<T>) {
        if (!EXTRA && !p.has_off && !tis_seq) {
          const RowSums rs = row_sums_v(in.logp + base, in.old + base, m, T_);
          dn = rs.n;
          dlr = rs.lr;
          dlp = rs.lp;
          ddiv = -rs.lr;  // the behaviour policy is the old one here
          start = rs.done;
        }
      }
#endif
      for (int64_t t0 = start; t0 < T_; t0 += kBlock) {
        const int64_t t1 = std::min<int64_t>(T_, t0 + kBlock);
        int64_t t = t0;
#ifdef RLK_POLICY_SIMD
        if constexpr (kSimd<T>) {
          const vf zero = splat(0.0f), one = splat(1.0f);
          vf vn = zero, vlr = zero, vdiv = zero, vtis = zero, vlp = zero;
          for (; t + kVec <= t1; t += kVec) {
            const vi mm = load_mask(m + t);
            const vf lp = mm ? vload(in.logp, base + t) : zero;
            const vf o = mm ? vload(in.old, base + t) : zero;
            const vf ro = EXTRA ? (mm ? vload(in.rollout, base + t) : zero) : o;
            const vf bh = EXTRA ? (mm ? vload(in.behaviour, base + t) : zero) : o;
            vn += mm ? one : zero;
            vlr += lp - o;
            vdiv += bh - lp;
            vtis += o - ro;
            vlp += lp;
          }
          dn += lane_sum(vn);
          dlr += lane_sum(vlr);
          ddiv += lane_sum(vdiv);
          dtis += lane_sum(vtis);
          dlp += lane_sum(vlp);
        }
#endif
        for (; t < t1; ++t) {
          const int j = int(t % kLanes);
          const bool mm = m[t] != 0;
          A lp = load(in.logp, base + t), o = load(in.old, base + t), ro = load(in.rollout, base + t);
          lp = mm ? lp : A(0);
          o = mm ? o : A(0);
          ro = mm ? ro : A(0);
          const A bh = mm ? A(load(in.behaviour, base + t)) : A(0);
          ln[j] += mm ? A(1) : A(0);
          llr[j] += lp - o;
          ldiv[j] += bh - lp;
          ltis[j] += o - ro;
          dlp += lp;
        }
        for (int j = 0; j < kLanes; ++j) {
          dn += ln[j];
          dlr += llr[j];
          ddiv += ldiv[j];
          dtis += ltis[j];
          ln[j] = llr[j] = ldiv[j] = ltis[j] = A(0);
        }
      }
      finish_prepass(dn, dlr, ddiv, dtis, dlp);
    }
    // seq-mean-token-sum-norm divides each sequence's token sum by the padded length T.
    c.row_w = p.agg == kSeqMeanTokenMean ? A(1) / std::max(n_row, A(1))
                                         : (p.agg == kSeqMeanTokenSumNorm ? A(1) / A(T_) : A(1));
    c.grad_w = c.row_w * A(p.grad_scale);
    c.drop_negative = p.has_off && s_div > off_threshold;
    if (!(OBJ && p.objective == kGeoMean)) c.seq_ratio = A(1);
    c.seq_dx = A(1);
    if (SEQ) {
      const ValueGrad<A> x = lr_clamp.apply(s_lr);
      c.seq_ratio = exp_(x.value);
      c.seq_dx = x.grad;
    }
    c.seq_tis = A(1);
    if (tis_seq) {
      const A w = exp_(s_tis);
      c.seq_tis = p.tis_mask_mode ? ((w > c.tis_cap || w < c.tis_min) ? A(0) : w)
                                  : (w > c.tis_cap ? c.tis_cap : (w < c.tis_min ? c.tis_min : w));
    }

    double acc[kNumStats] = {};
    double dseq = 0;

    // Sequence level with one advantage per sequence and nothing per token (no KL, entropy
    // or rollout terms): every active token of the row shares the same loss slope and
    // gradient, so one scalar evaluation and a single write pass replace the token loop.
    if (SEQ && KL == 0 && !EXTRA && !OBJ && !p.adv_per_token) {
      const A a = n_row > A(0) ? in.adv[b] : A(0);
      const TokenTerms<A> tt = token_terms<A, 0, true, false>(c, A(0), A(0), a, A(0), A(0), A(0));
      const double n = double(n_row);
      acc[kActive] = n;
      // Per-token loss = tt.loss + slope * logp, the slope being the direct gradient.
      acc[kLossSum] = double(c.row_w) * (n * double(tt.loss) + double(tt.grad) * sum_lp);
      acc[kClipLow] = (tt.ratio < c.clip_lo && a < A(0)) ? n : 0.0;
      acc[kClipHigh] = (tt.ratio > c.clip_hi && a > A(0)) ? n : 0.0;
      acc[kRatioSum] = n * double(tt.ratio);
      acc[kApproxKlSum] = -sum_lr;
      acc[kDualClip] = n * double(tt.dual_hit);
      acc[kObjective] = (c.is_cispo && !(tt.ratio >= c.clip_lo && tt.ratio <= c.clip_hi)) ? n : 0.0;
      acc[kObjectiveRow] = n > 0 ? acc[kObjective] / n : 0.0;
      const A gval = c.grad_w * (p.objective == kClip ? tt.grad + tt.dseq * c.seq_ratio * c.seq_dx : tt.grad);
      if (!std::is_same<T, float>::value && in.grad32)
        fill_row(in.grad32 + base, m, T_, float(gval));
      else
        fill_row(in.grad + base, m, T_, gval);
      for (int k = 0; k < kNumStats; ++k) stats[b * kNumStats + k] = acc[k];
      continue;
    }
    for (int64_t t0 = 0; t0 < T_; t0 += kBlock) {
      const int64_t t1 = std::min<int64_t>(T_, t0 + kBlock);
      L.clear();
      int64_t t = t0;
#ifdef RLK_POLICY_SIMD
      if constexpr (kSimd<T> && !OBJ) {
        const RowConstV cv(c);
        LanesV V;
        V.clear();
        for (; t + kVec <= t1; t += kVec) {
          // Padding after a sequence's end is masked in runs: such a step adds nothing to
          // any total (its inputs read as 0) and its gradient is 0.
          if (none_active(m + t)) {
            vstore_grad(in, base + t, splat(0.0f));
            continue;
          }
          token_step_v<T, KL, SEQ, EXTRA, LEAN>(in, cv, base + t, adv_base + t * adv_step, p.adv_per_token, V);
        }
        acc[kActive] += V.sum(V.n);
        acc[kLossSum] += V.sum(V.loss);
        acc[kClipLow] += V.sum(V.low);
        acc[kClipHigh] += V.sum(V.high);
        acc[kRatioSum] += V.sum(V.ratio);
        acc[kApproxKlSum] += V.sum(V.approx);
        acc[kKlSum] += V.sum(V.kl);
        acc[kEntropySum] += V.sum(V.ent);
        acc[kDualClip] += V.sum(V.dual);
        acc[kObjective] += V.sum(V.obj);
        acc[kApproxKlClamped] += V.sum(V.approxc);
        acc[kTisOutside] += V.sum(V.tiso);
        acc[kRolloutKl] += V.sum(V.rkl);
        dseq += V.sum(V.dseq);
      }
      if constexpr (kSimd<T> && OBJ) {
        const RowConstV cv(c);
        const ObjConstV qv(c);
        LanesV V;
        V.clear();
        for (; t + kVec <= t1; t += kVec) {
          if (none_active(m + t)) {
            vstore_grad(in, base + t, splat(0.0f));
            continue;
          }
          token_step_obj_v<T, KL, SEQ, EXTRA>(in, cv, qv, base + t, adv_base + t * adv_step, p.adv_per_token, V);
        }
        acc[kActive] += V.sum(V.n);
        acc[kLossSum] += V.sum(V.loss);
        acc[kClipLow] += V.sum(V.low);
        acc[kClipHigh] += V.sum(V.high);
        acc[kRatioSum] += V.sum(V.ratio);
        acc[kApproxKlSum] += V.sum(V.approx);
        acc[kKlSum] += V.sum(V.kl);
        acc[kEntropySum] += V.sum(V.ent);
        acc[kObjective] += V.sum(V.obj);
        acc[kApproxKlClamped] += V.sum(V.approxc);
        acc[kTisOutside] += V.sum(V.tiso);
        acc[kRolloutKl] += V.sum(V.rkl);
        dseq += V.sum(V.dseq);
      }
#endif
      for (; t + kLanes <= t1; t += kLanes) {
        for (int j = 0; j < kLanes; ++j)
          token_step<T, KL, SEQ, EXTRA, OBJ>(in, c, base + t + j, adv_base + (t + j) * adv_step, j, L);
      }
      for (; t < t1; ++t) token_step<T, KL, SEQ, EXTRA, OBJ>(in, c, base + t, adv_base + t * adv_step, 0, L);
      for (int j = 0; j < kLanes; ++j) {
        acc[kActive] += L.n[j];
        acc[kLossSum] += L.loss[j];
        acc[kClipLow] += L.low[j];
        acc[kClipHigh] += L.high[j];
        acc[kRatioSum] += L.ratio[j];
        acc[kApproxKlSum] += L.approx[j];
        acc[kKlSum] += L.kl[j];
        acc[kEntropySum] += L.ent[j];
        acc[kDualClip] += L.dual[j];
        acc[kObjective] += L.obj[j];
        acc[kApproxKlClamped] += L.approxc[j];
        acc[kTisOutside] += L.tiso[j];
        acc[kRolloutKl] += L.rkl[j];
        dseq += L.dseq[j];
      }
    }
    acc[kObjectiveRow] = acc[kObjective] / std::max(acc[kActive], 1.0);
    if (SEQ && acc[kActive] > 0 &&
        (p.objective == kClip || p.objective == kSapo || (p.kl_coef != 0.0 && p.kl_correction && KL != 0))) {
      // r = exp(mean_t (lp_t - old_t)): dr/dlp_t = r / n for every active token.
      const A add = A(dseq) * c.seq_ratio * c.seq_dx / A(acc[kActive]);
      if (!std::is_same<T, float>::value && in.grad32)
        add_row(in.grad32 + base, m, T_, float(add));
      else
        add_row(in.grad + base, m, T_, add);
    }
    if (grad_ent32) {
      fill_row(grad_ent32 + base, m, T_, float(-A(p.entropy_coef) * c.grad_w));
    } else if (grad_ent) {
      fill_row(grad_ent + base, m, T_, -A(p.entropy_coef) * c.grad_w);
    }
    for (int k = 0; k < kNumStats; ++k) stats[b * kNumStats + k] = acc[k];
  }
}

// GCC and clang (the zig-built wheel) both take the target attribute on this one function:
// every helper of the row body is always_inline and inlines into it, so the whole body is
// compiled for AVX2+FMA; only libm calls of the scalar tails stay generic.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RLK_POLICY_AVX2 1
template <class T, int KL, bool SEQ, bool EXTRA, bool OBJ, bool LEAN = false>
__attribute__((target("avx2,fma"))) void policy_rows_avx2(const PolicyParams& p, int64_t b0, int64_t b1,
                                                          double* stats) {
  policy_rows_impl<T, KL, SEQ, EXTRA, OBJ, LEAN>(p, b0, b1, stats);
}
#endif

template <class T, int KL, bool SEQ, bool EXTRA, bool OBJ, bool LEAN = false>
void policy_rows_generic(const PolicyParams& p, int64_t b0, int64_t b1, double* stats) {
  policy_rows_impl<T, KL, SEQ, EXTRA, OBJ, LEAN>(p, b0, b1, stats);
}

// Whether the rows fit the lean profile of the vector body (token_step_v's LEAN): REINFORCE
// or CISPO at token level without entropy, rollout, off-policy or importance-weight terms
// (the caller's weights allowed; a k1/k2 KL term allowed without the ratio correction: DRO),
// reading no total beyond the active count, the loss, approx_kl, approx_kl_clamped, the KL
// and CISPO's clipped tokens.
bool policy_lean(const PolicyParams& p) {
  const uint32_t allowed = (1u << kActive) | (1u << kLossSum) | (1u << kApproxKlSum) | (1u << kApproxKlClamped) |
                           (1u << kObjective) | (1u << kObjectiveRow) | (1u << kKlSum);
  return (p.objective == kReinforce || p.objective == kCispo) && !p.seq_level &&
         (p.ref_logp == 0 || (p.kl_kind != kK3 && !p.kl_correction)) &&
         p.entropy == 0 && p.rollout_logp == 0 && p.off_policy_logp == 0 && !p.has_tis && !p.has_off &&
         !p.has_entropy_select && (p.want & ~allowed) == 0;
}

template <class T, int KL, bool SEQ, bool EXTRA>
void run_policy_rows(const PolicyParams& p, double* rows) {
  // The objectives beyond clip/CISPO/REINFORCE have their own row body (token_step_obj_v),
  // compiled for AVX2 too.
  const bool obj = p.objective > kReinforce;
  auto fn = obj ? &policy_rows_generic<T, KL, SEQ, EXTRA, true> : &policy_rows_generic<T, KL, SEQ, EXTRA, false>;
#ifdef RLK_POLICY_AVX2
  if (std::is_same<T, float>::value || std::is_same<T, bf16>::value) {
    if (rlk::simd::use_avx2())
      fn = obj ? &policy_rows_avx2<T, KL, SEQ, EXTRA, true> : &policy_rows_avx2<T, KL, SEQ, EXTRA, false>;
  }
#endif
  parallel_for(p.B, row_grain(p.T), [&](int64_t b0, int64_t b1) { fn(p, b0, b1, rows); });
}

template <class T, int KL>
void run_policy_kl(const PolicyParams& p, double* rows) {
  const bool extra = p.entropy != 0 || p.rollout_logp != 0 || p.weights != 0 || p.off_policy_logp != 0;
  if (p.seq_level) {
    extra ? run_policy_rows<T, KL, true, true>(p, rows) : run_policy_rows<T, KL, true, false>(p, rows);
  } else {
    extra ? run_policy_rows<T, KL, false, true>(p, rows) : run_policy_rows<T, KL, false, false>(p, rows);
  }
}

// The lean rows where the storage type has the vector body (float32, bfloat16); the other
// types run the full rows, whose scalar body is the same arithmetic.
template <class T, int KL>
void run_policy_lean(const PolicyParams& p, double* rows) {
#ifdef RLK_POLICY_SIMD
  if constexpr (kSimd<T>) {
    // EXTRA (the weights) for the scalar row tails, which read the weights on that path only.
    const bool w = p.weights != 0;
    auto fn = w ? &policy_rows_generic<T, KL, false, true, false, true>
                : &policy_rows_generic<T, KL, false, false, false, true>;
#ifdef RLK_POLICY_AVX2
    if (rlk::simd::use_avx2())
      fn = w ? &policy_rows_avx2<T, KL, false, true, false, true> : &policy_rows_avx2<T, KL, false, false, false, true>;
#endif
    parallel_for(p.B, row_grain(p.T), [&](int64_t b0, int64_t b1) { fn(p, b0, b1, rows); });
    return;
  }
#endif
  run_policy_kl<T, KL>(p, rows);
}

// Active tokens of a 0/1 byte mask (a byte sum the compiler vectorises).
int64_t count_active(const uint8_t* m, int64_t n) {
  std::vector<int64_t> parts(size_t((n + 65535) / 65536), 0);
  parallel_for(int64_t(parts.size()), 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* q = m + c * 65536;
      const int64_t len = std::min<int64_t>(65536, n - c * 65536);
      uint32_t acc = 0;
      for (int64_t i = 0; i < len; ++i) acc += q[i] != 0;
      parts[size_t(c)] = acc;
    }
  });
  int64_t total = 0;
  for (int64_t v : parts) total += v;
  return total;
}

// Sequences of a [B, T] byte mask with at least one active token (a row stops at its first).
int64_t count_nonempty_rows(const uint8_t* m, int64_t B, int64_t T) {
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* q = m + b * T;
    for (int64_t t = 0; t < T; ++t) {
      if (q[t]) {
        ++rows;
        break;
      }
    }
  }
  return rows;
}

std::vector<double> policy_loss_fused(const PolicyParams& params) {
  if (params.B <= 0 || params.T <= 0) throw std::invalid_argument("policy_loss: empty batch");
  PolicyParams p = params;
  if (p.scale_by_active)
    p.grad_scale = 1.0 / double(std::max<int64_t>(count_active(as_ptr<const uint8_t>(p.mask), p.B * p.T), 1));
  if (p.scale_by_rows)
    p.grad_scale = 1.0 / double(std::max<int64_t>(count_nonempty_rows(as_ptr<const uint8_t>(p.mask), p.B, p.T), 1));
  std::vector<double> rows(size_t(p.B) * kNumStats, 0.0);
  // KL terms are computed only when they enter the loss or a metric (ref_logp given).
  const int kl = p.ref_logp == 0 ? 0 : (p.kl_kind == kK3 ? 2 : 1);
  const bool lean = kl != 2 && policy_lean(p);
  RLK_DISPATCH_FLOATING(p.dtype, T, {
    if (lean && kl == 0)
      run_policy_lean<T, 0>(p, rows.data());
    else if (lean)
      run_policy_lean<T, 1>(p, rows.data());
    else if (kl == 0)
      run_policy_kl<T, 0>(p, rows.data());
    else if (kl == 1)
      run_policy_kl<T, 1>(p, rows.data());
    else
      run_policy_kl<T, 2>(p, rows.data());
  });
  // The totals, then the number of non-empty sequences (the seq-* modes' denominator).
  std::vector<double> total(kNumStats + 1, 0.0);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int k = 0; k < kNumStats; ++k) total[k] += rows[size_t(b) * kNumStats + k];
    total[kNumStats] += rows[size_t(b) * kNumStats + kActive] > 0 ? 1.0 : 0.0;
  }
  // Totals not asked for are partial (the scalar tails still add to them): reported as 0.
  for (int k = 0; k < kNumStats; ++k)
    if (k != kActive && k != kLossSum && !(p.want >> k & 1u)) total[k] = 0.0;
  return total;
}

// ---------------------------------------------------------------------------------------
// kl_penalty: elementwise estimate and d/d logp.
//
// One instantiation per estimator, per clamp bound and per gradient request, so that the
// token loop has no branch and vectorises: 8 floats per step for float32 and bfloat16 (vexp,
// the exp of the policy bodies, which is fast_exp lane for lane), compiled twice and chosen
// at run time like the policy rows; the scalar body (float64, float16, tails) is the same
// arithmetic. The clamp passes the gradient where lo <= kl <= hi and
// multiplies it by 0 elsewhere (NaN included), as the reference's autograd does: torch.clamp
// selects 0 and the estimator's derivative then multiplies it, so an infinite or NaN
// derivative under the clamp stays NaN (k2 at d = inf), a finite one becomes 0.
// An optional upper bound on d = ref - logp (OpenRLHF clamps its k3 log-ratio so that exp
// cannot overflow: lp - ref >= -10) replaces d by the bound with a zero derivative.

struct KlBounds {
  double lo, hi, d_hi;  // absent bounds are infinite (a comparison with them never holds)
};

template <class A, int KIND, bool CLAMP, bool DHI>
RLK_LOSS_INLINE ValueGrad<A> kl_token(A lp, A rf, A lo, A hi, A d_hi) {
  A d = rf - lp;
  bool d_cut = false;
  if (DHI) {
    d_cut = !(d <= d_hi);  // NaN included: torch.clamp passes no gradient there either
    d = d > d_hi ? d_hi : d;
  }
  ValueGrad<A> kl;
  if (KIND == kK1) {
    kl = {-d, A(1)};
  } else if (KIND == kK2) {
    kl = {A(0.5) * d * d, -d};
  } else {
    const A e = exp_(d);
    kl = {e - A(1) - d, A(1) - e};
  }
  if (CLAMP) {
    const bool pass = kl.value >= lo && kl.value <= hi;
    kl.value = kl.value < lo ? lo : (kl.value > hi ? hi : kl.value);
    if (!pass) kl.grad = kl.grad * A(0);
  }
  if (DHI && d_cut) kl.grad = A(0);
  return kl;
}

template <class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
RLK_LOSS_INLINE void kl_range_scalar(const T* logp, const T* ref, acc_t<T>* out, T* grad, const KlBounds& b,
                                     int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  for (int64_t i = i0; i < i1; ++i) {
    const ValueGrad<A> kl = kl_token<A, KIND, CLAMP, DHI>(load(logp, i), load(ref, i), A(b.lo), A(b.hi), A(b.d_hi));
    out[i] = kl.value;
    if (GRAD) store(grad, i, kl.grad);
  }
}

#ifdef RLK_POLICY_SIMD
// The lane width of a kl_penalty body: 8 lanes (AVX2 and baseline builds) or 16 (AVX-512).
struct KlLanes8 {
  using F = vf;
  using I = vi;
  static constexpr int kWidth = 8;
  template <class T>
  static RLK_LOSS_INLINE F load(const T* p, int64_t i) { return rlk::simd::load8(p, i); }
  template <class T>
  static RLK_LOSS_INLINE void store(T* p, int64_t i, F v) { rlk::simd::store8(p, i, v); }
};
struct KlLanes16 {
  using F = rlk::simd::v16f;
  using I = rlk::simd::v16i;
  static constexpr int kWidth = 16;
  template <class T>
  static RLK_LOSS_INLINE F load(const T* p, int64_t i) { return rlk::simd::load16(p, i); }
  template <class T>
  static RLK_LOSS_INLINE void store(T* p, int64_t i, F v) { rlk::simd::store16(p, i, v); }
};

template <class L, class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
RLK_LOSS_INLINE void kl_range_impl(const T* logp, const T* ref, float* out, T* grad, const KlBounds& b,
                                   int64_t i0, int64_t i1) {
  using vf = typename L::F;
  using vi = typename L::I;
  const vf zero = vf{}, one = vf{} + 1.0f, half = vf{} + 0.5f;
  const vf lo = vf{} + float(b.lo), hi = vf{} + float(b.hi), d_hi = vf{} + float(b.d_hi);
  int64_t i = i0;
  for (; i + L::kWidth <= i1; i += L::kWidth) {
    const vf d0 = L::load(ref, i) - L::load(logp, i);
    const vf d = DHI ? (d0 > d_hi ? d_hi : d0) : d0;
    vf v, g;
    if (KIND == kK1) {
      v = -d;
      g = one;
    } else if (KIND == kK2) {
      v = half * d * d;
      g = -d;
    } else {
      const vf e = rlk::simd::exp_lanes<vf, vi>(d);
      v = e - one - d;
      g = one - e;
    }
    // Each test selects on its own comparison: GCC scalarises an AND of two 16-lane
    // comparisons kept as an int vector (AVX-512 compares yield mask registers).
    if (CLAMP) {
      g = v >= lo ? g : g * zero;
      g = v <= hi ? g : g * zero;
      v = v < lo ? lo : (v > hi ? hi : v);
    }
    L::store(out, i, v);
    if (GRAD) L::store(grad, i, DHI ? (d0 <= d_hi ? g : zero) : g);  // NaN d: zero, as the clamp
  }
  kl_range_scalar<T, KIND, CLAMP, DHI, GRAD>(logp, ref, out, grad, b, i, i1);
}

#ifdef RLK_POLICY_AVX2
template <class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
__attribute__((target("avx2,fma"))) void kl_range_avx2(const T* logp, const T* ref, float* out, T* grad,
                                                       const KlBounds& b, int64_t i0, int64_t i1) {
  kl_range_impl<KlLanes8, T, KIND, CLAMP, DHI, GRAD>(logp, ref, out, grad, b, i0, i1);
}
// 16 lanes a step: the estimate is elementwise, so the lane width changes no result (the
// exp is exp_lanes' arithmetic at any width); twice the throughput where the body is bound
// by k3's exp.
template <class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"))) void kl_range_avx512(
    const T* logp, const T* ref, float* out, T* grad, const KlBounds& b, int64_t i0, int64_t i1) {
  kl_range_impl<KlLanes16, T, KIND, CLAMP, DHI, GRAD>(logp, ref, out, grad, b, i0, i1);
}
#endif

template <class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
void kl_range_generic(const T* logp, const T* ref, float* out, T* grad, const KlBounds& b, int64_t i0,
                      int64_t i1) {
  kl_range_impl<KlLanes8, T, KIND, CLAMP, DHI, GRAD>(logp, ref, out, grad, b, i0, i1);
}
#endif

template <class T, int KIND, bool CLAMP, bool DHI, bool GRAD>
void run_kl(int64_t n, ptr_t logp, ptr_t ref, ptr_t out, ptr_t grad, const KlBounds& b) {
  using A = acc_t<T>;
  const T* lp = as_ptr<const T>(logp);
  const T* rf = as_ptr<const T>(ref);
  A* o = as_ptr<A>(out);
  T* g = GRAD ? as_ptr<T>(grad) : nullptr;
#ifdef RLK_POLICY_SIMD
  if constexpr (kSimd<T>) {
    auto fn = &kl_range_generic<T, KIND, CLAMP, DHI, GRAD>;
#ifdef RLK_POLICY_AVX2
    if (rlk::simd::use_avx2()) fn = &kl_range_avx2<T, KIND, CLAMP, DHI, GRAD>;
    // k3 only: its exp makes it compute-bound; k1/k2 are bound by memory, and GCC 12
    // scalarises their constant-derivative selects at 16 lanes.
    if constexpr (KIND == kK3) {
      if (rlk::simd::use_avx512()) fn = &kl_range_avx512<T, KIND, CLAMP, DHI, GRAD>;
    }
#endif
    parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) { fn(lp, rf, o, g, b, i0, i1); });
    return;
  }
#endif
  parallel_for(n, 1 << 14, [&](int64_t i0, int64_t i1) {
    kl_range_scalar<T, KIND, CLAMP, DHI, GRAD>(lp, rf, o, g, b, i0, i1);
  });
}

template <class T, int KIND, bool DHI>
void run_kl_flags(int64_t n, ptr_t logp, ptr_t ref, ptr_t out, ptr_t grad, const KlBounds& b, bool clamp) {
  if (clamp)
    grad ? run_kl<T, KIND, true, DHI, true>(n, logp, ref, out, grad, b)
         : run_kl<T, KIND, true, DHI, false>(n, logp, ref, out, grad, b);
  else
    grad ? run_kl<T, KIND, false, DHI, true>(n, logp, ref, out, grad, b)
         : run_kl<T, KIND, false, DHI, false>(n, logp, ref, out, grad, b);
}

// ``out`` is in the arithmetic type, ``grad`` in the storage type (as the policy kernel's
// gradients: backward hands it to autograd without a cast). ``d_hi``: an upper bound on
// ref - logp applied before the estimate (inf: none). Only k3 takes one (exp(d) is what
// overflows); k1 and k2 reject it.
void kl_penalty_fused(int64_t n, int dtype, ptr_t logp, ptr_t ref, int kind, bool has_lo, double lo, bool has_hi,
                      double hi, ptr_t out, ptr_t grad, double d_hi) {
  if (kind < kK1 || kind > kK3) throw std::invalid_argument("kl_penalty: unknown estimator code");
  const double inf = std::numeric_limits<double>::infinity();
  const bool cut = d_hi != inf;
  if (cut && kind != kK3) throw std::invalid_argument("kl_penalty: d_hi is implemented for k3 only");
  if (n <= 0) return;
  const KlBounds b{has_lo ? lo : -inf, has_hi ? hi : inf, d_hi};
  const bool clamp = has_lo || has_hi;
  RLK_DISPATCH_FLOATING(dtype, T, {
    if (kind == kK1)
      run_kl_flags<T, kK1, false>(n, logp, ref, out, grad, b, clamp);
    else if (kind == kK2)
      run_kl_flags<T, kK2, false>(n, logp, ref, out, grad, b, clamp);
    else if (cut)
      run_kl_flags<T, kK3, true>(n, logp, ref, out, grad, b, clamp);
    else
      run_kl_flags<T, kK3, false>(n, logp, ref, out, grad, b, clamp);
  });
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
        li = u < A(0) ? A(0) : u;  // relu that keeps NaN, as torch.relu
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
      // One C++ copy instead of some forty attribute writes from Python: callers keep a
      // template per configuration and fill only the per-call fields of a copy.
      .def("copy", [](const PolicyParams& p) { return p; })
      .def_readwrite("B", &PolicyParams::B)
      .def_readwrite("T", &PolicyParams::T)
      .def_readwrite("dtype", &PolicyParams::dtype)
      .def_readwrite("logp", &PolicyParams::logp)
      .def_readwrite("old_logp", &PolicyParams::old_logp)
      .def_readwrite("advantages", &PolicyParams::advantages)
      .def_readwrite("mask", &PolicyParams::mask)
      .def_readwrite("ref_logp", &PolicyParams::ref_logp)
      .def_readwrite("rollout_logp", &PolicyParams::rollout_logp)
      .def_readwrite("weights", &PolicyParams::weights)
      .def_readwrite("off_policy_logp", &PolicyParams::off_policy_logp)
      .def_readwrite("weights_f32", &PolicyParams::weights_f32)
      .def_readwrite("grad_f32", &PolicyParams::grad_f32)
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
      .def_readwrite("tis_min", &PolicyParams::tis_min)
      .def_readwrite("has_off", &PolicyParams::has_off)
      .def_readwrite("off_threshold", &PolicyParams::off_threshold)
      .def_readwrite("entropy_coef", &PolicyParams::entropy_coef)
      .def_readwrite("has_entropy_select", &PolicyParams::has_entropy_select)
      .def_readwrite("entropy_threshold", &PolicyParams::entropy_threshold)
      .def_readwrite("agg", &PolicyParams::agg)
      .def_readwrite("grad_logp", &PolicyParams::grad_logp)
      .def_readwrite("grad_entropy", &PolicyParams::grad_entropy)
      .def_readwrite("grad_scale", &PolicyParams::grad_scale)
      .def_readwrite("scale_by_active", &PolicyParams::scale_by_active)
      .def_readwrite("scale_by_rows", &PolicyParams::scale_by_rows)
      .def_readwrite("clip_low", &PolicyParams::clip_low)
      .def_readwrite("clip_high", &PolicyParams::clip_high)
      .def_readwrite("sapo_tau_pos", &PolicyParams::sapo_tau_pos)
      .def_readwrite("sapo_tau_neg", &PolicyParams::sapo_tau_neg)
      .def_readwrite("vespo_k_pos", &PolicyParams::vespo_k_pos)
      .def_readwrite("vespo_lambda_pos", &PolicyParams::vespo_lambda_pos)
      .def_readwrite("vespo_k_neg", &PolicyParams::vespo_k_neg)
      .def_readwrite("vespo_lambda_neg", &PolicyParams::vespo_lambda_neg)
      .def_readwrite("want", &PolicyParams::want);
  m.attr("NUM_POLICY_STATS") = int(kNumStats);
  m.def("policy_loss", &policy_loss_fused, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Fused policy loss: writes d(row-weighted loss sum)/d logp (and entropy) and returns the totals "
        "[active, loss_sum, clip_low, clip_high, ratio_sum, approx_kl_sum, kl_sum, entropy_sum, dual_clip, "
        "objective_sum, objective_row_sum, approx_kl_clamped_sum, tis_outside, rollout_kl_sum, non-empty rows]");
  m.def("kl_penalty", &kl_penalty_fused, py::arg("n"), py::arg("dtype"), py::arg("logp"), py::arg("ref"),
        py::arg("kind"), py::arg("has_lo"), py::arg("lo"), py::arg("has_hi"), py::arg("hi"), py::arg("out"),
        py::arg("grad"), py::arg("d_hi") = std::numeric_limits<double>::infinity(),
        py::call_guard<py::gil_scoped_release>());
  m.def("dpo_loss", &dpo_loss_fused, py::call_guard<py::gil_scoped_release>());
  m.def("bradley_terry_loss", &bradley_terry_fused, py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace rlk

RLK_REGISTER_BINDINGS(losses, rlk::bind);
