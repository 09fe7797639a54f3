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
__global__ void discounted_kernel(ScanArgs args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  RowTile rt;
  if (!warp_row(s.B, rt)) return;
  A carry = s.bootstrap_of(rt.row);
  RLK_FOR_TILES(s.T_, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = s.at(rt.row, t);
    const Affine<A> f = valid ? discounted_coef(s.reward(i), s.is_terminated(i), s.gamma) : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) s.out0[i] = y;
    carry = __shfl_sync(kFull, y, 0);
  }
}

template <class T, bool kNextValues>
__global__ void gae_kernel(ScanArgs args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  RowTile rt;
  if (!warp_row(s.B, rt)) return;
  A carry = A(0);
  A value_after_tile = s.bootstrap_of(rt.row);  // V_{t0 + 32}
  RLK_FOR_TILES(s.T_, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = s.at(rt.row, t);
    const A value = valid ? s.value(i) : A(0);
    A next_value;
    if (kNextValues) {
      next_value = valid ? s.next_value(i) : A(0);
    } else {
      next_value = __shfl_down_sync(kFull, value, 1);
      if (rt.lane == kWarp - 1) next_value = value_after_tile;
    }
    const Affine<A> f = valid ? gae_coef(s.reward(i), value, next_value, s.is_terminated(i), s.is_truncated(i),
                                         s.gamma, s.gamma_lam)
                              : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) {
      s.out0[i] = y;
      s.out1[i] = y + value;
    }
    carry = __shfl_sync(kFull, y, 0);
    value_after_tile = __shfl_sync(kFull, value, 0);
  }
}

template <class T>
__global__ void lambda_kernel(ScanArgs args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  RowTile rt;
  if (!warp_row(s.B, rt)) return;
  A carry = A(0);
  RLK_FOR_TILES(s.T_, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = s.at(rt.row, t);
    const bool cut = valid && (t == s.T_ - 1 || s.is_truncated(i));
    const Affine<A> f =
        valid ? lambda_coef(s.reward(i), s.next_value(i), s.is_terminated(i), cut, s.gamma, s.lam, s.gamma_lam)
              : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) s.out0[i] = y;
    carry = __shfl_sync(kFull, y, 0);
  }
}

template <class T>
__global__ void masked_gae_kernel(ScanArgs args) {
  using A = acc_t<T>;
  const Scan<T> s(args);
  RowTile rt;
  if (!warp_row(s.B, rt)) return;
  A carry = A(0);
  A next_value_after_tile = A(0);  // value of the first unmasked token right of the tile
  RLK_FOR_TILES(s.T_, t0) {
    const int64_t t = t0 + rt.lane;
    const bool valid = t >= 0;
    const int64_t i = s.at(rt.row, t);
    const bool unmasked = valid && s.is_unmasked(i);
    const A value = valid ? s.value(i) : A(0);
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
    const A after_first = __shfl_down_sync(kFull, first, 1);
    if (rt.lane == kWarp - 1) after_has = false;
    const A next_value = after_has ? after_first : next_value_after_tile;
    const Affine<A> f =
        valid ? masked_gae_coef(s.reward(i), value, next_value, unmasked, s.gamma, s.gamma_lam) : identity<A>();
    const A y = apply(suffix_compose(f, rt.lane), carry);
    if (valid) {
      s.out0[i] = unmasked ? y : A(0);
      s.out1[i] = unmasked ? y + value : A(0);
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
