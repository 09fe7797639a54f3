// CUDA kernels for the return scans. One warp per row walks the row backwards in tiles
// of 32 steps, lane k holding step t0 + k, so loads and stores are coalesced. Inside a
// tile each lane builds its step's affine map (rlkern/returns.h), a suffix scan over
// the lanes (5 shuffle rounds) composes each lane's map with those of the later steps,
// and applying the result to the carry from the tile on the right gives every output of
// the tile at once. Many warps per SM keep enough loads in flight for the bandwidth.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rlkern/dtype.h"
#include "rlkern/returns.h"
#include "rlkern/returns_api.h"

namespace rlk::returns {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

template <class A>
__device__ __forceinline__ Affine<A> shfl_down(Affine<A> f, int offset) {
  return Affine<A>{__shfl_down_sync(kFull, f.a, offset), __shfl_down_sync(kFull, f.b, offset)};
}

// Inclusive suffix scan: lane k ends with f_k o f_{k+1} o ... o f_31.
template <class A>
__device__ __forceinline__ Affine<A> suffix_compose(Affine<A> f, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const Affine<A> later = shfl_down(f, offset);
    if (lane + offset < kWarp) f = compose(f, later);
  }
  return f;
}

struct RowTile {
  int64_t row;
  int lane;
};

__device__ __forceinline__ bool warp_row(int64_t B, RowTile& rt) {
  rt.row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  rt.lane = threadIdx.x % kWarp;
  return rt.row < B;  // uniform across the warp
}

// Tiles end at T, T - 32, ...; the first tile may start before 0 (its low lanes idle
// with identity maps, which sit before every valid step and change nothing).
#define RLK_FOR_TILES(T_, t0) for (int64_t t0 = (T_) - kWarp; t0 > -kWarp; t0 -= kWarp)

template <class T>
__global__ void discounted_kernel(ScanArgs a) {
  using A = acc_t<T>;
  RowTile rt;
  if (!warp_row(a.B, rt)) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* boot = as_ptr<const T>(a.bootstrap);
  const uint8_t* done = as_ptr<const uint8_t>(a.terminated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma);
  A carry = boot ? load(boot, rt.row) : A(0);
  RLK_FOR_TILES(a.T, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = rt.row * a.T + t;
    Affine<A> f = valid ? discounted_coef(load(r, i), done[i] != 0, gamma) : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) out[i] = y;
    carry = __shfl_sync(kFull, y, 0);
  }
}

template <class T, bool kNextValues>
__global__ void gae_kernel(ScanArgs a) {
  using A = acc_t<T>;
  RowTile rt;
  if (!warp_row(a.B, rt)) return;
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
  A value_after_tile = boot ? load(boot, rt.row) : A(0);  // V_{t0 + 32}
  RLK_FOR_TILES(a.T, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = rt.row * a.T + t;
    const A value = valid ? load(v, i) : A(0);
    A next_value;
    if (kNextValues) {
      next_value = valid ? load(nv, i) : A(0);
    } else {
      next_value = __shfl_down_sync(kFull, value, 1);
      if (rt.lane == kWarp - 1) next_value = value_after_tile;
    }
    const Affine<A> f = valid ? gae_coef(load(r, i), value, next_value, term[i] != 0, trunc && trunc[i] != 0, gamma,
                                         gamma_lam)
                              : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) {
      adv[i] = y;
      ret[i] = y + value;
    }
    carry = __shfl_sync(kFull, y, 0);
    value_after_tile = __shfl_sync(kFull, value, 0);
  }
}

template <class T>
__global__ void lambda_kernel(ScanArgs a) {
  using A = acc_t<T>;
  RowTile rt;
  if (!warp_row(a.B, rt)) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* nv = as_ptr<const T>(a.next_values);
  const uint8_t* term = as_ptr<const uint8_t>(a.terminated);
  const uint8_t* trunc = as_ptr<const uint8_t>(a.truncated);
  A* out = as_ptr<A>(a.out0);
  const A gamma = A(a.gamma), lam = A(a.lam);
  A carry = A(0);
  RLK_FOR_TILES(a.T, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = rt.row * a.T + t;
    const bool cut = valid && (t == a.T - 1 || (trunc && trunc[i] != 0));
    const Affine<A> f = valid ? lambda_coef(load(r, i), load(nv, i), term[i] != 0, cut, gamma, lam) : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) out[i] = y;
    carry = __shfl_sync(kFull, y, 0);
  }
}

template <class T>
__global__ void masked_gae_kernel(ScanArgs a) {
  using A = acc_t<T>;
  RowTile rt;
  if (!warp_row(a.B, rt)) return;
  const T* r = as_ptr<const T>(a.rewards);
  const T* v = as_ptr<const T>(a.values);
  const uint8_t* mask = as_ptr<const uint8_t>(a.terminated);
  A* adv = as_ptr<A>(a.out0);
  A* ret = as_ptr<A>(a.out1);
  const A gamma = A(a.gamma), gamma_lam = A(a.gamma * a.lam);
  A carry = A(0);
  A next_value_after_tile = A(0);  // value of the first unmasked token right of the tile
  RLK_FOR_TILES(a.T, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = rt.row * a.T + t;
    const bool unmasked = valid && mask[i] != 0;
    const A value = valid ? load(v, i) : A(0);
    // The value of the first unmasked token at or after each lane: a suffix scan that
    // keeps the leftmost unmasked entry.
    bool has = unmasked;
    A first = value;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset <<= 1) {
      const bool later_has = __shfl_down_sync(kFull, has, offset);
      const A later_first = __shfl_down_sync(kFull, first, offset);
      if (rt.lane + offset < kWarp && !has) {
        has = later_has;
        first = later_first;
      }
    }
    // Strictly after this lane: the next lane's result, or what lies right of the tile.
    bool after_has = __shfl_down_sync(kFull, has, 1);
    A after_first = __shfl_down_sync(kFull, first, 1);
    if (rt.lane == kWarp - 1) after_has = false;
    const A next_value = after_has ? after_first : next_value_after_tile;
    const Affine<A> f = valid ? masked_gae_coef(load(r, i), value, next_value, unmasked, gamma, gamma_lam)
                              : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) {
      adv[i] = unmasked ? y : A(0);
      ret[i] = unmasked ? y + value : A(0);
    }
    carry = __shfl_sync(kFull, y, 0);
    const bool tile_has = __shfl_sync(kFull, has, 0);
    const A tile_first = __shfl_sync(kFull, first, 0);
    next_value_after_tile = tile_has ? tile_first : next_value_after_tile;
  }
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rlkern: ") + name + " launch failed: " + cudaGetErrorString(err));
}

dim3 grid_for(int64_t B) { return dim3(unsigned((B + kWarpsPerBlock - 1) / kWarpsPerBlock)); }

}  // namespace

void discounted_returns_cuda(const ScanArgs& a, ptr_t stream) {
  if (a.B == 0 || a.T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  RLK_DISPATCH_FLOATING(a.dtype, T, (discounted_kernel<T><<<grid_for(a.B), kWarp * kWarpsPerBlock, 0, s>>>(a)));
  check_launch("discounted_returns");
}

void gae_cuda(const ScanArgs& a, ptr_t stream) {
  if (a.B == 0 || a.T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  RLK_DISPATCH_FLOATING(a.dtype, T, {
    if (a.next_values)
      gae_kernel<T, true><<<grid_for(a.B), kWarp * kWarpsPerBlock, 0, s>>>(a);
    else
      gae_kernel<T, false><<<grid_for(a.B), kWarp * kWarpsPerBlock, 0, s>>>(a);
  });
  check_launch("gae");
}

void lambda_returns_cuda(const ScanArgs& a, ptr_t stream) {
  if (a.B == 0 || a.T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  RLK_DISPATCH_FLOATING(a.dtype, T, (lambda_kernel<T><<<grid_for(a.B), kWarp * kWarpsPerBlock, 0, s>>>(a)));
  check_launch("lambda_returns");
}

void masked_gae_cuda(const ScanArgs& a, ptr_t stream) {
  if (a.B == 0 || a.T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  RLK_DISPATCH_FLOATING(a.dtype, T, (masked_gae_kernel<T><<<grid_for(a.B), kWarp * kWarpsPerBlock, 0, s>>>(a)));
  check_launch("masked_gae");
}

}  // namespace rlk::returns
