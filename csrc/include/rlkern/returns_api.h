// Launch signatures of the return kernels, shared by the CPU and CUDA implementations.
// Every tensor is contiguous [B, T] (or [B] for per-row values); flag arrays are uint8
// (0 or 1); an absent optional input is a null pointer. Outputs hold the arithmetic type
// (float, or double for float64 inputs).
#pragma once

#include <cstdint>

#include "rlkern/common.h"
#include "rlkern/dtype.h"
#include "rlkern/returns.h"

namespace rlk::returns {

struct ScanArgs {
  int dtype;  // DType code of the floating inputs (all share it)
  int64_t B, T;
  ptr_t rewards, values, next_values, bootstrap;  // floating inputs
  ptr_t terminated, truncated;                    // uint8 flags (dones for discounted_returns, mask for masked_gae)
  double gamma, lam;
  ptr_t out0, out1;  // returns or (advantages, returns)
};

// The arguments of one scan as typed pointers and arithmetic-type scalars, read the same
// way by the CPU and CUDA kernels. T is the storage type of the floating inputs.
template <class T>
struct Scan {
  using A = acc_t<T>;
  const T *rewards, *values, *next_values, *bootstrap;
  const uint8_t *terminated, *truncated;
  A *out0, *out1;
  int64_t B, T_;
  A gamma, lam, gamma_lam;

  RLK_HOST_DEVICE explicit Scan(const ScanArgs& a)
      : rewards(as_ptr<const T>(a.rewards)),
        values(as_ptr<const T>(a.values)),
        next_values(as_ptr<const T>(a.next_values)),
        bootstrap(as_ptr<const T>(a.bootstrap)),
        terminated(as_ptr<const uint8_t>(a.terminated)),
        truncated(as_ptr<const uint8_t>(a.truncated)),
        out0(as_ptr<A>(a.out0)),
        out1(as_ptr<A>(a.out1)),
        B(a.B),
        T_(a.T),
        gamma(coefficient<A>(a.gamma)),
        lam(A(a.lam)),
        gamma_lam(coefficient<A>(a.gamma * a.lam)) {}

  RLK_HOST_DEVICE int64_t at(int64_t b, int64_t t) const { return b * T_ + t; }
  RLK_HOST_DEVICE A reward(int64_t i) const { return load(rewards, i); }
  RLK_HOST_DEVICE A value(int64_t i) const { return load(values, i); }
  RLK_HOST_DEVICE A next_value(int64_t i) const { return load(next_values, i); }
  RLK_HOST_DEVICE bool is_terminated(int64_t i) const { return terminated[i] != 0; }
  RLK_HOST_DEVICE bool is_truncated(int64_t i) const { return truncated && truncated[i] != 0; }
  // masked_gae passes its response mask in the flag slot of `terminated`.
  RLK_HOST_DEVICE bool is_unmasked(int64_t i) const { return terminated[i] != 0; }
  // The value after row b's last step (0 without a bootstrap).
  RLK_HOST_DEVICE A bootstrap_of(int64_t b) const { return bootstrap ? load(bootstrap, b) : A(0); }
};

void discounted_returns_cpu(const ScanArgs& a);
void gae_cpu(const ScanArgs& a);
void lambda_returns_cpu(const ScanArgs& a);
void masked_gae_cpu(const ScanArgs& a);

#ifdef RLKERN_WITH_CUDA
void discounted_returns_cuda(const ScanArgs& a, ptr_t stream);
void gae_cuda(const ScanArgs& a, ptr_t stream);
void lambda_returns_cuda(const ScanArgs& a, ptr_t stream);
void masked_gae_cuda(const ScanArgs& a, ptr_t stream);
#endif

}  // namespace rlk::returns
