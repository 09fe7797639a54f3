// Launch signatures of the return kernels, shared by the CPU and CUDA implementations.
// Every tensor is contiguous [B, T] (or [B] for per-row values); flag arrays are uint8
// (0 or 1); an absent optional input is a null pointer. Outputs hold the arithmetic type
// (float, or double for float64 inputs).
#pragma once

#include <cstdint>

#include "rlkern/common.h"

namespace rlk::returns {

struct ScanArgs {
  int dtype;  // DType code of the floating inputs (all share it)
  int64_t B, T;
  ptr_t rewards, values, next_values, bootstrap;  // floating inputs
  ptr_t terminated, truncated;                    // uint8 flags (dones for discounted_returns, mask for masked_gae)
  double gamma, lam;
  ptr_t out0, out1;  // returns or (advantages, returns)
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
