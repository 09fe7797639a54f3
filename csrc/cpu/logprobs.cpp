// Token log-probabilities and entropy over large vocabularies (CPU).
//
// Forward: one streaming pass per row (online max, sum of exp and the entropy term,
// see rlkern/logprobs.h) over blocks of the row converted to float in a small stack
// buffer; no [rows, V] float buffer exists. Backward recomputes p_j = exp(z_j - m - log s)
// per row from the logits and the saved per-row logsumexp (as m and log s) and entropy, writing the
// gradient in the logits' own dtype. Rows are split over the thread pool.
//
// Rows are addressed as row(r) = base + (r / inner) * stride0 + (r % inner) * stride1
// with unit stride along the vocabulary, so a [B, T, V] slice such as logits[:, :-1]
// needs no copy. targets[r] == ignore_index marks an ignored row (outputs 0, zero
// gradient); a target outside [0, V) marks a row whose target lives in another shard or
// vocabulary chunk (no one-hot term, log-prob -inf).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/logprobs.h"
#include "rlkern/memory.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"

namespace py = pybind11;

namespace rlk {
namespace {

constexpr int64_t kBlock = 2048;

template <class T>
struct Rows {
  const T* base;
  int64_t stride0, stride1, inner, V;
  const T* row(int64_t r) const { return base + (r / inner) * stride0 + (r % inner) * stride1; }
};

// The vector helpers are always inlined, so the ABI note about 32-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
namespace generic {
#include "logprobs_rows.inc"
}  // namespace generic

// GCC and clang spell "compile this region for AVX2" differently; the wheel is built
// with clang (zig), the source build usually with GCC, and both must get the AVX2 clone.
#if defined(__x86_64__) && defined(__clang__)
#define RLK_HAVE_AVX2_CLONE 1
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
namespace avx2 {
#include "logprobs_rows.inc"
}  // namespace avx2
#pragma clang attribute pop
#elif defined(__x86_64__) && defined(__GNUC__)
#define RLK_HAVE_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "logprobs_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef RLK_HAVE_AVX2_CLONE
  return rlk::simd::use_avx2();
#else
  return false;
#endif
}

// float64 logits compute in float64: plain scalar loops (the tests' precision path).
// cap > 0 soft-caps the logits first: y = cap * tanh(x / cap).
inline double capped(double x, double cap) { return cap > 0.0 ? cap * std::tanh(x / cap) : x; }

void forward_rows_f64(const Rows<double>& rows, int64_t begin, int64_t end, const int64_t* targets,
                      const double* thresholds, double inv_t, int64_t ignore_index, double cap, double* logp,
                      double* row_max, double* log_sum, double* entropy, uint8_t* top1) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = targets[r];
    if (t == ignore_index) {
      logp[r] = row_max[r] = log_sum[r] = 0.0;
      if (entropy) entropy[r] = 0.0;
      if (top1) top1[r] = 0;
      continue;
    }
    const double* x = rows.row(r);
    const double thr = thresholds ? thresholds[r] : -INFINITY;
    SoftmaxStats<double> st = softmax_stats_empty<double>();
    int64_t first_max = -1;
    for (int64_t j = 0; j < rows.V; ++j) {
      // The kept set is a threshold on the raw logits (see threshold_rows).
      const double v = x[j] < thr ? -INFINITY : capped(x[j], cap);
      if (v > st.m) {
        first_max = j;
        st = softmax_stats_rebase(st, v, inv_t);
      }
      const double ref = st.m == -INFINITY ? 0.0 : st.m;
      const double d = (v - ref) * inv_t;
      const double e = std::exp(d);
      st.s += e;
      if (e > 0.0 || std::isnan(e)) st.a += e * d;
    }
    const double log_s = std::log(st.s);
    row_max[r] = st.m;
    log_sum[r] = log_s;
    if (entropy) entropy[r] = log_s - st.a / st.s;
    double lp = -INFINITY;
    if (t >= 0 && t < rows.V && !(x[t] < thr)) {
      volatile double dt = (capped(x[t], cap) - st.m) * inv_t;  // rounded as in the pass above (no fused multiply-subtract)
      lp = dt - log_s;
    }
    logp[r] = lp;
    if (top1) top1[r] = first_max == t && !std::isnan(lp);
  }
}

void backward_rows_f64(const Rows<double>& rows, int64_t begin, int64_t end, const int64_t* targets,
                       const double* thresholds, double inv_t, int64_t ignore_index, double cap,
                       const double* row_max, const double* log_sum, const double* entropy, const double* grad_logp,
                       const double* grad_entropy, double* grad) {
  const int64_t V = rows.V;
  for (int64_t r = begin; r < end; ++r) {
    double* out = grad + r * V;
    const int64_t t = targets[r];
    if (t == ignore_index) {
      std::fill(out, out + V, 0.0);
      continue;
    }
    const double* x = rows.row(r);
    const double thr = thresholds ? thresholds[r] : -INFINITY;
    const bool has_target = t >= 0 && t < V;
    double glp = grad_logp ? grad_logp[r] : 0.0;
    if (has_target && x[t] < thr) glp = 0.0;
    const double gent = grad_entropy ? grad_entropy[r] : 0.0;
    const double H = (grad_entropy && entropy) ? entropy[r] : 0.0;
    const bool target_kept = has_target && !(x[t] < thr);
    // 1/T multiplies last, after [j = t] - p_j has cancelled (a large 1/T must not overflow it).
    for (int64_t j = 0; j < V; ++j) {
      double dy = 1.0;
      double y = x[j];
      if (cap > 0.0) {
        const double th = std::tanh(x[j] / cap);
        y = cap * th;
        dy = 1.0 - th * th;
      }
      const double v = x[j] < thr ? -INFINITY : y;
      const double d = (v - row_max[r]) * inv_t - log_sum[r];
      const double p = std::exp(d);
      double g = -glp * p;
      if (gent != 0.0 && p != 0.0) g -= gent * p * (d + H);
      if (target_kept && j == t) g += glp;
      out[j] = g * inv_t * dy;
    }
  }
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

struct RowArgs {
  ptr_t logits;
  int dtype;
  int64_t stride0, stride1, inner, n_rows, V;
};

template <class T>
Rows<T> rows_of(const RowArgs& a) {
  return {as_ptr<const T>(a.logits), a.stride0, a.stride1, std::max<int64_t>(a.inner, 1), a.V};
}

template <class T>
void forward_f32(const RowArgs& a, const int64_t* tg, ptr_t thresholds, float inv_t, int64_t ignore_index, float cap,
                 ptr_t logp, ptr_t row_max, ptr_t log_sum, ptr_t entropy, ptr_t top1) {
  const Rows<T> rows = rows_of<T>(a);
  const bool avx2 = use_avx2();
  // One instantiation per (ISA, cap or not): the uncapped rows run the loop they ran before the option.
  parallel_for(a.n_rows, grain_for(a.V), [&](int64_t b, int64_t e) {
    auto run = [&](auto fn) {
      fn(rows, b, e, tg, as_ptr<const float>(thresholds), inv_t, ignore_index, cap, as_ptr<float>(logp),
         as_ptr<float>(row_max), as_ptr<float>(log_sum), as_ptr<float>(entropy), as_ptr<uint8_t>(top1));
    };
#ifdef RLK_HAVE_AVX2_CLONE
    if (avx2) {
      cap > 0.0f ? run(avx2::forward_rows<T, true>) : run(avx2::forward_rows<T, false>);
      return;
    }
#endif
    cap > 0.0f ? run(generic::forward_rows<T, true>) : run(generic::forward_rows<T, false>);
  });
}

template <class T>
void backward_f32(const RowArgs& a, const int64_t* tg, ptr_t thresholds, float inv_t, int64_t ignore_index, float cap,
                  ptr_t row_max, ptr_t log_sum, ptr_t entropy, ptr_t grad_logp, ptr_t grad_entropy, ptr_t grad) {
  const Rows<T> rows = rows_of<T>(a);
  const bool avx2 = use_avx2();
  parallel_for(a.n_rows, grain_for(a.V), [&](int64_t b, int64_t e) {
    auto run = [&](auto fn) {
      fn(rows, b, e, tg, as_ptr<const float>(thresholds), inv_t, ignore_index, cap, as_ptr<const float>(row_max),
         as_ptr<const float>(log_sum), as_ptr<const float>(entropy), as_ptr<const float>(grad_logp),
         as_ptr<const float>(grad_entropy), as_ptr<T>(grad));
    };
#ifdef RLK_HAVE_AVX2_CLONE
    if (avx2) {
      cap > 0.0f ? run(avx2::backward_rows<T, true>) : run(avx2::backward_rows<T, false>);
      return;
    }
#endif
    cap > 0.0f ? run(generic::backward_rows<T, true>) : run(generic::backward_rows<T, false>);
  });
}

void forward(const RowArgs& a, ptr_t targets, ptr_t thresholds, double inv_t, int64_t ignore_index, double cap,
             ptr_t logp, ptr_t row_max, ptr_t log_sum, ptr_t entropy, ptr_t top1) {
  const int64_t* tg = as_ptr<const int64_t>(targets);
  switch (to_dtype(a.dtype)) {
    case DType::F64: {
      const Rows<double> rows = rows_of<double>(a);
      parallel_for(a.n_rows, grain_for(a.V), [&](int64_t b, int64_t e) {
        forward_rows_f64(rows, b, e, tg, as_ptr<const double>(thresholds), inv_t, ignore_index, cap,
                         as_ptr<double>(logp), as_ptr<double>(row_max), as_ptr<double>(log_sum),
                         as_ptr<double>(entropy), as_ptr<uint8_t>(top1));
      });
      break;
    }
    case DType::F32:
      forward_f32<float>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), logp, row_max, log_sum, entropy,
                         top1);
      break;
    case DType::BF16:
      forward_f32<bf16>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), logp, row_max, log_sum, entropy,
                        top1);
      break;
    case DType::F16:
      forward_f32<f16>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), logp, row_max, log_sum, entropy,
                       top1);
      break;
  }
}

int64_t dtype_size(int dtype) {
  switch (to_dtype(dtype)) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    default: return 2;
  }
}

void backward(const RowArgs& a, ptr_t targets, ptr_t thresholds, double inv_t, int64_t ignore_index, double cap,
              ptr_t row_max, ptr_t log_sum, ptr_t entropy, ptr_t grad_logp, ptr_t grad_entropy, ptr_t grad) {
  // A fresh logits-sized buffer: huge pages cut its first-touch faults 512-fold.
  advise_huge_pages(as_ptr<void>(grad), size_t(a.n_rows * a.V * dtype_size(a.dtype)));
  const int64_t* tg = as_ptr<const int64_t>(targets);
  switch (to_dtype(a.dtype)) {
    case DType::F64: {
      const Rows<double> rows = rows_of<double>(a);
      parallel_for(a.n_rows, grain_for(a.V), [&](int64_t b, int64_t e) {
        backward_rows_f64(rows, b, e, tg, as_ptr<const double>(thresholds), inv_t, ignore_index, cap,
                          as_ptr<const double>(row_max), as_ptr<const double>(log_sum),
                          as_ptr<const double>(entropy), as_ptr<const double>(grad_logp),
                          as_ptr<const double>(grad_entropy), as_ptr<double>(grad));
      });
      break;
    }
    case DType::F32:
      backward_f32<float>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), row_max, log_sum, entropy,
                          grad_logp, grad_entropy, grad);
      break;
    case DType::BF16:
      backward_f32<bf16>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), row_max, log_sum, entropy,
                         grad_logp, grad_entropy, grad);
      break;
    case DType::F16:
      backward_f32<f16>(a, tg, thresholds, float(inv_t), ignore_index, float(cap), row_max, log_sum, entropy,
                        grad_logp, grad_entropy, grad);
      break;
  }
}

// The top-k / top-p kept set of each row as a threshold on the raw logits (kept iff
// logit >= threshold; -inf keeps everything). Top-k keeps ties with the k-th largest;
// top-p (after top-k) keeps a tie group when the mass of strictly larger logits is
// below top_p. A row holding NaN or +inf gets -inf (keep all) so its NaN reaches every output.
// With cap > 0 the set is that of the capped logits y = cap tanh(x / cap) (ties where tanh
// saturates included), returned as the smallest raw logit whose y is kept: the cap is
// monotone, so this raw threshold selects exactly that set, and the row kernels compare raw
// logits with it; their float32 tanh may round y differently from this double one without
// moving a token across the boundary.
template <class T, class A>
void threshold_rows(const Rows<T>& rows, int64_t begin, int64_t end, double inv_t, int64_t top_k, double top_p,
                    double cap, A* out) {
  const int64_t V = rows.V;
  std::vector<double> buf(V);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = rows.row(r);
    bool undefined = false;
    for (int64_t j = 0; j < V; ++j) {
      buf[j] = capped(double(load(x, j)), cap);
      undefined |= std::isnan(buf[j]) || buf[j] == INFINITY;
    }
    double thr = -INFINITY;
    if (undefined) {
      out[r] = A(thr);
      continue;
    }
    int64_t count = V;
    if (top_k > 0 && top_k < V) {
      std::nth_element(buf.begin(), buf.begin() + (top_k - 1), buf.end(), std::greater<double>());
      thr = buf[top_k - 1];
      count = std::partition(buf.begin(), buf.end(), [thr](double v) { return v >= thr; }) - buf.begin();
    }
    if (top_p < 1.0 && count > 0) {
      std::sort(buf.begin(), buf.begin() + count, std::greater<double>());
      const double xmax = buf[0];
      if (xmax != -INFINITY) {
        // Differences from the maximum before the 1/T factor: x / T alone may overflow.
        double total = 0.0;
        for (int64_t j = 0; j < count; ++j) total += std::exp((buf[j] - xmax) * inv_t);
        double above = 0.0;
        double thr_p = buf[0];
        for (int64_t j = 0; j < count;) {
          if (!(above < top_p * total)) break;
          const double u = buf[j];
          thr_p = u;
          for (; j < count && buf[j] == u; ++j) above += std::exp((buf[j] - xmax) * inv_t);
        }
        thr = std::max(thr, thr_p);
      }
    }
    if (cap > 0.0 && thr > -INFINITY) {
      double raw = INFINITY;
      for (int64_t j = 0; j < V; ++j) {
        const double v = double(load(x, j));
        if (v < raw && capped(v, cap) >= thr) raw = v;
      }
      thr = raw;
    }
    out[r] = A(thr);
  }
}

void threshold(const RowArgs& a, double inv_t, int64_t top_k, double top_p, double cap, ptr_t out) {
  RLK_DISPATCH_FLOATING(a.dtype, T, {
    using A = acc_t<T>;
    const Rows<T> rows = rows_of<T>(a);
    parallel_for(a.n_rows, std::max<int64_t>(1, grain_for(a.V) / 4), [&](int64_t b, int64_t e) {
      threshold_rows<T, A>(rows, b, e, inv_t, top_k, top_p, cap, as_ptr<A>(out));
    });
  });
}

void bind(py::module_& m) {
  using py::arg;
  m.def(
      "forward",
      [](ptr_t logits, int dtype, int64_t stride0, int64_t stride1, int64_t inner, int64_t n_rows, int64_t V,
         ptr_t targets, ptr_t thresholds, double inv_t, int64_t ignore_index, double softcap, ptr_t logp,
         ptr_t row_max, ptr_t log_sum, ptr_t entropy, ptr_t top1) {
        forward({logits, dtype, stride0, stride1, inner, n_rows, V}, targets, thresholds, inv_t, ignore_index, softcap,
                logp, row_max, log_sum, entropy, top1);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Per-row log-prob of the target, max and log-sum-exp-relative-to-max of z = y * inv_t with y the logits "
      "(soft-capped, softcap * tanh(logits / softcap), when softcap > 0), (entropy != 0) the entropy of softmax(z) "
      "and (top1 != 0, uint8) whether the target is the row's first largest y");
  m.def(
      "backward",
      [](ptr_t logits, int dtype, int64_t stride0, int64_t stride1, int64_t inner, int64_t n_rows, int64_t V,
         ptr_t targets, ptr_t thresholds, double inv_t, int64_t ignore_index, double softcap, ptr_t row_max,
         ptr_t log_sum, ptr_t entropy, ptr_t grad_logp, ptr_t grad_entropy, ptr_t grad) {
        backward({logits, dtype, stride0, stride1, inner, n_rows, V}, targets, thresholds, inv_t, ignore_index,
                 softcap, row_max, log_sum, entropy, grad_logp, grad_entropy, grad);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Gradient of the logits (contiguous [n_rows, V], logits' dtype) from the log-prob and entropy gradients");
  m.def(
      "threshold",
      [](ptr_t logits, int dtype, int64_t stride0, int64_t stride1, int64_t inner, int64_t n_rows, int64_t V,
         double inv_t, int64_t top_k, double top_p, double softcap, ptr_t out) {
        threshold({logits, dtype, stride0, stride1, inner, n_rows, V}, inv_t, top_k, top_p, softcap, out);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Per-row top-k/top-p threshold on the raw logits (the kept set of the soft-capped logits when softcap > 0)");
}

}  // namespace
}  // namespace rlk

RLK_REGISTER_BINDINGS(logprobs, rlk::bind);
