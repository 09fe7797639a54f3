// CUDA kernels for the return scans: one thread per row walking time backwards, running
// the same step functions as the CPU kernels (rlkern/returns.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rlkern/dtype.h"
#include "rlkern/returns.h"
#include "rlkern/returns_api.h"

namespace rlk::returns {
namespace {

constexpr int kThreads = 128;

template <class T>
__global__ void discounted_kernel(ScanArgs a) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* boot = as_ptr<const T>(a.bootstrap);
  const uint8_t* done = as_ptr<const uint8_t>(a.terminated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma);
  A carry = boot ? load(boot, b) : A(0);
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const int64_t i = b * a.T + t;
    carry = discounted_step(carry, load(r, i), done[i] != 0, gamma);
    out[i] = carry;
  }
}

template <class T>
__global__ void gae_kernel(ScanArgs a) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* v = as_ptr<const T>(a.values);
  const T* nv = as_ptr<const T>(a.next_values);
  const T* boot = as_ptr<const T>(a.bootstrap);
  const uint8_t* term = as_ptr<const uint8_t>(a.terminated);
  const uint8_t* trunc = as_ptr<const uint8_t>(a.truncated);
  A* adv = as_ptr<A>(a.out0);
  A* ret = as_ptr<A>(a.out1);
  const A gamma = A(a.gamma), gamma_lam = A(a.gamma * a.lam);
  A carry = A(0);
  A next_v = boot ? load(boot, b) : A(0);
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const int64_t i = b * a.T + t;
    const A value = load(v, i);
    carry = gae_step(carry, load(r, i), value, nv ? load(nv, i) : next_v, term[i] != 0, trunc && trunc[i] != 0,
                     gamma, gamma_lam);
    next_v = value;
    adv[i] = carry;
    ret[i] = carry + value;
  }
}

template <class T>
__global__ void lambda_kernel(ScanArgs a) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* nv = as_ptr<const T>(a.next_values);
  const uint8_t* term = as_ptr<const uint8_t>(a.terminated);
  const uint8_t* trunc = as_ptr<const uint8_t>(a.truncated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma), lam = A(a.lam);
  A carry = A(0);
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const int64_t i = b * a.T + t;
    const bool cut = t == a.T - 1 || (trunc && trunc[i] != 0);
    carry = lambda_step(carry, load(r, i), load(nv, i), term[i] != 0, cut, gamma, lam);
    out[i] = carry;
  }
}

template <class T>
__global__ void masked_gae_kernel(ScanArgs a) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* v = as_ptr<const T>(a.values);
  const uint8_t* mask = as_ptr<const uint8_t>(a.terminated);
  A* adv = as_ptr<A>(a.out0);
  A* ret = as_ptr<A>(a.out1);
  const A gamma = A(a.gamma), gamma_lam = A(a.gamma * a.lam);
  MaskedGaeCarry<A> carry{A(0), A(0)};
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const int64_t i = b * a.T + t;
    if (mask[i]) {
      masked_gae_step(carry, load(r, i), load(v, i), gamma, gamma_lam);
      adv[i] = carry.advantage;
      ret[i] = carry.advantage + carry.next_value;
    } else {
      adv[i] = A(0);
      ret[i] = A(0);
    }
  }
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("rlkern: ") + name + " launch failed: " + cudaGetErrorString(err));
}


#define RLK_DEFINE_LAUNCH(fn_name, kernel)                                                       \
  void fn_name(const ScanArgs& a, ptr_t stream) {                                                \
    if (a.B == 0 || a.T == 0) return;                                                            \
    const dim3 grid(unsigned((a.B + kThreads - 1) / kThreads));                                  \
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);                                     \
    RLK_DISPATCH_FLOATING(a.dtype, T, (kernel<T><<<grid, kThreads, 0, s>>>(a)));                 \
    check_launch(#fn_name);                                                                      \
  }

}  // namespace

RLK_DEFINE_LAUNCH(discounted_returns_cuda, discounted_kernel)
RLK_DEFINE_LAUNCH(gae_cuda, gae_kernel)
RLK_DEFINE_LAUNCH(lambda_returns_cuda, lambda_kernel)
RLK_DEFINE_LAUNCH(masked_gae_cuda, masked_gae_kernel)

}  // namespace rlk::returns
