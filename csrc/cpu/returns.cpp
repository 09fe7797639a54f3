// CPU kernels for discounted returns, GAE, TD(lambda) and token-level GAE: one reverse
// pass per row, rows spread over the pool. Interleaving a few rows per pass gives the
// core independent dependency chains to overlap (each row alone is a serial chain).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "rlkern/dtype.h"
#include "rlkern/memory.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/returns.h"
#include "rlkern/returns_api.h"

namespace py = pybind11;

namespace rlk::returns {
namespace {

// Rows are processed kLanes at a time, time in tiles of kTile steps: each tile is
// loaded row by row (sequential reads), transposed into [step][lane] buffers, and the
// recurrence then runs across lanes, where the compiler vectorises the independent
// rows. Without the transpose each row is one serial dependency chain of strided loads.
constexpr int kLanes = 8;
constexpr int kTile = 64;

template <class RowFn>
void for_row_groups(int64_t B, int64_t T, RowFn row_fn) {
  const int64_t groups = (B + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, 8192 / (std::max<int64_t>(T, 1) * kLanes));
  parallel_for(groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * kLanes;
      row_fn(b0, int(std::min<int64_t>(kLanes, B - b0)));
    }
  });
}

template <class A>
using Tile = A[kTile][kLanes];

// Loads steps [t0, t0 + n) of rows b0 .. b0 + lanes into tile[step][lane]; missing lanes
// read as `fill` so that the vector loop stays branch-free.
template <class T, class A>
inline void load_tile(const T* src, int64_t b0, int lanes, int64_t T_, int64_t t0, int n, Tile<A>& tile, A fill) {
  for (int l = 0; l < kLanes; ++l) {
    if (l < lanes) {
      const T* row = src + (b0 + l) * T_ + t0;
      for (int j = 0; j < n; ++j) tile[j][l] = load(row, j);
    } else {
      for (int j = 0; j < n; ++j) tile[j][l] = fill;
    }
  }
}

// Flags become 0/1 in the arithmetic type: a vector loop mixing byte and float lanes
// would not vectorise.
template <class A>
inline void load_flags(const uint8_t* src, int64_t b0, int lanes, int64_t T_, int64_t t0, int n, Tile<A>& tile) {
  for (int l = 0; l < kLanes; ++l) {
    if (src && l < lanes) {
      const uint8_t* row = src + (b0 + l) * T_ + t0;
      for (int j = 0; j < n; ++j) tile[j][l] = row[j] != 0 ? A(1) : A(0);
    } else {
      for (int j = 0; j < n; ++j) tile[j][l] = A(0);
    }
  }
}

template <class A>
inline void store_tile(A* dst, int64_t b0, int lanes, int64_t T_, int64_t t0, int n, const Tile<A>& tile) {
  for (int l = 0; l < lanes; ++l) {
    A* row = dst + (b0 + l) * T_ + t0;
    for (int j = 0; j < n; ++j) row[j] = tile[j][l];
  }
}

// Calls body(t0, n) for the tiles of [0, T) from the last to the first.
template <class Body>
inline void for_tiles_backwards(int64_t T_, Body body) {
  for (int64_t end = T_; end > 0; end -= kTile) {
    const int64_t t0 = std::max<int64_t>(0, end - kTile);
    body(t0, int(end - t0));
  }
}

template <class T>
void discounted_impl(const ScanArgs& a) {
  using A = acc_t<T>;
  const T* r = as_ptr<const T>(a.rewards);
  const T* boot = as_ptr<const T>(a.bootstrap);
  const uint8_t* done = as_ptr<const uint8_t>(a.terminated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma);
  const int64_t T_ = a.T;
  advise_huge_pages(out, size_t(a.B * T_) * sizeof(A));
  for_row_groups(a.B, T_, [&](int64_t b0, int lanes) {
    A carry[kLanes];
    for (int l = 0; l < kLanes; ++l) carry[l] = (boot && l < lanes) ? load(boot, b0 + l) : A(0);
    Tile<A> rt, ot;
    Tile<A> dt;
    for_tiles_backwards(T_, [&](int64_t t0, int n) {
      load_tile(r, b0, lanes, T_, t0, n, rt, A(0));
      load_flags(done, b0, lanes, T_, t0, n, dt);
      for (int j = n - 1; j >= 0; --j) {
        for (int l = 0; l < kLanes; ++l) {
          carry[l] = discounted_step(carry[l], rt[j][l], dt[j][l] != A(0), gamma);
          ot[j][l] = carry[l];
        }
      }
      store_tile(out, b0, lanes, T_, t0, n, ot);
    });
  });
}

template <class T>
void gae_impl(const ScanArgs& a) {
  using A = acc_t<T>;
  const T* r = as_ptr<const T>(a.rewards);
  const T* v = as_ptr<const T>(a.values);
  const T* nv = as_ptr<const T>(a.next_values);
  const T* boot = as_ptr<const T>(a.bootstrap);
  const uint8_t* term = as_ptr<const uint8_t>(a.terminated);
  const uint8_t* trunc = as_ptr<const uint8_t>(a.truncated);
  A* adv = as_ptr<A>(a.out0);
  A* ret = as_ptr<A>(a.out1);
  const A gamma = A(a.gamma), gamma_lam = A(a.gamma * a.lam);
  const int64_t T_ = a.T;
  advise_huge_pages(adv, size_t(a.B * T_) * sizeof(A));
  advise_huge_pages(ret, size_t(a.B * T_) * sizeof(A));
  for_row_groups(a.B, T_, [&](int64_t b0, int lanes) {
    A carry[kLanes], next_v[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      carry[l] = A(0);
      next_v[l] = (boot && l < lanes) ? load(boot, b0 + l) : A(0);
    }
    Tile<A> rt, vt, nvt, at, ot;
    Tile<A> mt, ct;
    for_tiles_backwards(T_, [&](int64_t t0, int n) {
      load_tile(r, b0, lanes, T_, t0, n, rt, A(0));
      load_tile(v, b0, lanes, T_, t0, n, vt, A(0));
      load_flags(term, b0, lanes, T_, t0, n, mt);
      load_flags(trunc, b0, lanes, T_, t0, n, ct);
      if (nv) {
        load_tile(nv, b0, lanes, T_, t0, n, nvt, A(0));
      } else {
        // V'_t = V_{t+1}: the tile shifted by one step, the carry filling the last step.
        for (int l = 0; l < kLanes; ++l) nvt[n - 1][l] = next_v[l];
        for (int j = 0; j + 1 < n; ++j)
          for (int l = 0; l < kLanes; ++l) nvt[j][l] = vt[j + 1][l];
        for (int l = 0; l < kLanes; ++l) next_v[l] = vt[0][l];
      }
      for (int j = n - 1; j >= 0; --j) {
        for (int l = 0; l < kLanes; ++l) {
          carry[l] = gae_step(carry[l], rt[j][l], vt[j][l], nvt[j][l], mt[j][l] != A(0), ct[j][l] != A(0), gamma, gamma_lam);
          at[j][l] = carry[l];
          ot[j][l] = carry[l] + vt[j][l];
        }
      }
      store_tile(adv, b0, lanes, T_, t0, n, at);
      store_tile(ret, b0, lanes, T_, t0, n, ot);
    });
  });
}

template <class T>
void lambda_impl(const ScanArgs& a) {
  using A = acc_t<T>;
  const T* r = as_ptr<const T>(a.rewards);
  const T* nv = as_ptr<const T>(a.next_values);
  const uint8_t* term = as_ptr<const uint8_t>(a.terminated);
  const uint8_t* trunc = as_ptr<const uint8_t>(a.truncated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma), lam = A(a.lam);
  const int64_t T_ = a.T;
  advise_huge_pages(out, size_t(a.B * T_) * sizeof(A));
  for_row_groups(a.B, T_, [&](int64_t b0, int lanes) {
    A carry[kLanes];
    for (int l = 0; l < kLanes; ++l) carry[l] = A(0);
    Tile<A> rt, nvt, ot;
    Tile<A> mt, ct;
    for_tiles_backwards(T_, [&](int64_t t0, int n) {
      load_tile(r, b0, lanes, T_, t0, n, rt, A(0));
      load_tile(nv, b0, lanes, T_, t0, n, nvt, A(0));
      load_flags(term, b0, lanes, T_, t0, n, mt);
      load_flags(trunc, b0, lanes, T_, t0, n, ct);
      if (t0 + n == T_)  // the row's last step bootstraps from V' alone
        for (int l = 0; l < kLanes; ++l) ct[n - 1][l] = A(1);
      for (int j = n - 1; j >= 0; --j) {
        for (int l = 0; l < kLanes; ++l) {
          carry[l] = lambda_step(carry[l], rt[j][l], nvt[j][l], mt[j][l] != A(0), ct[j][l] != A(0), gamma, lam);
          ot[j][l] = carry[l];
        }
      }
      store_tile(out, b0, lanes, T_, t0, n, ot);
    });
  });
}

template <class T>
void masked_gae_impl(const ScanArgs& a) {
  using A = acc_t<T>;
  const T* r = as_ptr<const T>(a.rewards);
  const T* v = as_ptr<const T>(a.values);
  const uint8_t* mask = as_ptr<const uint8_t>(a.terminated);
  A* adv = as_ptr<A>(a.out0);
  A* ret = as_ptr<A>(a.out1);
  const A gamma = A(a.gamma), gamma_lam = A(a.gamma * a.lam);
  const int64_t T_ = a.T;
  advise_huge_pages(adv, size_t(a.B * T_) * sizeof(A));
  advise_huge_pages(ret, size_t(a.B * T_) * sizeof(A));
  for_row_groups(a.B, T_, [&](int64_t b0, int lanes) {
    MaskedGaeCarry<A> carry[kLanes];
    for (int l = 0; l < kLanes; ++l) carry[l] = {A(0), A(0)};
    Tile<A> rt, vt, at, ot;
    Tile<A> mt;
    for_tiles_backwards(T_, [&](int64_t t0, int n) {
      load_tile(r, b0, lanes, T_, t0, n, rt, A(0));
      load_tile(v, b0, lanes, T_, t0, n, vt, A(0));
      load_flags(mask, b0, lanes, T_, t0, n, mt);
      for (int j = n - 1; j >= 0; --j) {
        for (int l = 0; l < kLanes; ++l) {
          // Both branches are computed and one is kept, so masked inputs (NaN included)
          // never reach the carry and the loop has no data-dependent branch.
          MaskedGaeCarry<A> next = carry[l];
          masked_gae_step(next, rt[j][l], vt[j][l], gamma, gamma_lam);
          const bool m = mt[j][l] != A(0);
          carry[l].advantage = m ? next.advantage : carry[l].advantage;
          carry[l].next_value = m ? next.next_value : carry[l].next_value;
          at[j][l] = m ? next.advantage : A(0);
          ot[j][l] = m ? next.advantage + next.next_value : A(0);
        }
      }
      store_tile(adv, b0, lanes, T_, t0, n, at);
      store_tile(ret, b0, lanes, T_, t0, n, ot);
    });
  });
}

}  // namespace

void discounted_returns_cpu(const ScanArgs& a) { RLK_DISPATCH_FLOATING(a.dtype, T, discounted_impl<T>(a)); }
void gae_cpu(const ScanArgs& a) { RLK_DISPATCH_FLOATING(a.dtype, T, gae_impl<T>(a)); }
void lambda_returns_cpu(const ScanArgs& a) { RLK_DISPATCH_FLOATING(a.dtype, T, lambda_impl<T>(a)); }
void masked_gae_cpu(const ScanArgs& a) { RLK_DISPATCH_FLOATING(a.dtype, T, masked_gae_impl<T>(a)); }

namespace {

// Group-relative advantages over contiguous groups of `size` rewards.
// estimator 0 = grpo (r - group mean), 1 = rloo (r - mean of the others);
// scale 0 = none, 1 = group std, 2 = the given batch std (unbiased std throughout).
// A zero spread gives zero advantages; a group of one has no spread (std taken as 1).
template <class T>
void group_advantages_impl(int64_t groups, int64_t size, ptr_t rewards, int estimator, int scale, double eps,
                           double batch_std, ptr_t out_ptr) {
  using A = acc_t<T>;
  const T* r = as_ptr<const T>(rewards);
  A* out = as_ptr<A>(out_ptr);
  parallel_for(groups, std::max<int64_t>(1, 4096 / std::max<int64_t>(size, 1)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t base = g * size;
      A sum = 0;
      bool all_equal = true;
      const A first = load(r, base);
      for (int64_t j = 0; j < size; ++j) {
        const A x = load(r, base + j);
        sum += x;
        all_equal = all_equal && x == first;
      }
      if (all_equal) {  // exactly zero, whatever the rounding of the mean
        for (int64_t j = 0; j < size; ++j) out[base + j] = A(0);
        continue;
      }
      const A mean = sum / A(size);
      A sq = 0;
      for (int64_t j = 0; j < size; ++j) {
        const A d = load(r, base + j) - mean;
        sq += d * d;
      }
      A denom = 1;
      if (scale == 1) denom = (size > 1 ? std::sqrt(sq / A(size - 1)) : A(1)) + A(eps);
      if (scale == 2) denom = A(batch_std) + A(eps);
      const A centre_scale = estimator == 1 ? A(size) / A(size - 1) : A(1);
      for (int64_t j = 0; j < size; ++j) {
        const A centred = (load(r, base + j) - mean) * centre_scale;
        out[base + j] = centred == A(0) ? A(0) : centred / denom;
      }
    }
  });
}

ScanArgs scan_args(int dtype, int64_t B, int64_t T, ptr_t rewards, ptr_t values, ptr_t next_values, ptr_t bootstrap,
                   ptr_t terminated, ptr_t truncated, double gamma, double lam, ptr_t out0, ptr_t out1) {
  to_dtype(dtype);
  if (B < 0 || T < 0) throw std::invalid_argument("rlkern: negative sizes");
  return ScanArgs{dtype, B, T, rewards, values, next_values, bootstrap, terminated, truncated, gamma, lam, out0, out1};
}

void bind(py::module_& m) {
  using py::arg;
#define RLK_SCAN_BINDING(name, fn)                                                                               \
  m.def(                                                                                                         \
      name,                                                                                                      \
      [](int dtype, int64_t B, int64_t T, ptr_t rewards, ptr_t values, ptr_t next_values, ptr_t bootstrap,      \
         ptr_t terminated, ptr_t truncated, double gamma, double lam, ptr_t out0, ptr_t out1, ptr_t stream) {   \
        const ScanArgs a = scan_args(dtype, B, T, rewards, values, next_values, bootstrap, terminated, truncated, \
                                     gamma, lam, out0, out1);                                                    \
        py::gil_scoped_release nogil;                                                                            \
        fn;                                                                                                      \
      },                                                                                                         \
      arg("dtype"), arg("B"), arg("T"), arg("rewards"), arg("values"), arg("next_values"), arg("bootstrap"),     \
      arg("terminated"), arg("truncated"), arg("gamma"), arg("lam"), arg("out0"), arg("out1"), arg("stream") = 0)
  RLK_SCAN_BINDING("discounted_returns", discounted_returns_cpu(a));
  RLK_SCAN_BINDING("gae", gae_cpu(a));
  RLK_SCAN_BINDING("lambda_returns", lambda_returns_cpu(a));
  RLK_SCAN_BINDING("masked_gae", masked_gae_cpu(a));
#ifdef RLKERN_WITH_CUDA
  RLK_SCAN_BINDING("discounted_returns_cuda", discounted_returns_cuda(a, stream));
  RLK_SCAN_BINDING("gae_cuda", gae_cuda(a, stream));
  RLK_SCAN_BINDING("lambda_returns_cuda", lambda_returns_cuda(a, stream));
  RLK_SCAN_BINDING("masked_gae_cuda", masked_gae_cuda(a, stream));
#endif
#undef RLK_SCAN_BINDING
  m.def(
      "group_advantages",
      [](int dtype, int64_t groups, int64_t size, ptr_t rewards, int estimator, int scale, double eps,
         double batch_std, ptr_t out) {
        to_dtype(dtype);
        py::gil_scoped_release nogil;
        RLK_DISPATCH_FLOATING(dtype, T,
                              group_advantages_impl<T>(groups, size, rewards, estimator, scale, eps, batch_std, out));
      },
      arg("dtype"), arg("groups"), arg("size"), arg("rewards"), arg("estimator"), arg("scale"), arg("eps"),
      arg("batch_std"), arg("out"));
}

}  // namespace
}  // namespace rlk::returns

RLK_REGISTER_BINDINGS(returns, rlk::returns::bind);
