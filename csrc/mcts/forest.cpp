// Batched MCTS: see rlkern/mcts.h for the layout and python/rlkern/mcts/forest.py for
// the documented semantics.
//
// This file is compiled once as it is (the Forest of namespace isa_default) and once more
// through forest_avx2.cpp, which defines RLK_MCTS_ISA as isa_avx2 and RLK_MCTS_SECOND_ISA
// and compiles every function below for AVX2. The definitions that do not depend on the
// instruction set (pool memory, the halving sequence, the generator) are in the first only.
#include "rlkern/mcts.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <new>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "rlkern/parallel.h"
#include "rlkern/simd.h"

#ifndef RLK_MCTS_ISA
#define RLK_MCTS_ISA isa_default
#endif

namespace rlk {
namespace mcts {
namespace RLK_MCTS_ISA {  // everything but the shared definitions below

namespace {

constexpr float kEps = 1e-8f;         // mctx qtransforms epsilon
constexpr float kLowLogit = -1e9f;    // mctx seq_halving.score_considered floor
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Nodes with up to this many edges find their children by scanning all their edges, in
// edge order; larger ones keep a list of them, read newest first.
constexpr int32_t kOrderedChildren = 48;
// Trees per lockstep group in select_group: enough other trees' work between requesting a
// tree's next lines and reading them to cover a miss to L3 or DRAM.
constexpr int kGroup = 8;

// The steps of a search are short calls in a tight loop with the caller's network between
// them: they run on rlkern's own pool (rlk::Team::kOwn), whose caller waits for the work
// only, not for every thread of a team.
template <class Fn>
inline void for_range(int64_t n, int64_t grain, Fn&& fn) {
  rlk::parallel_for(n, grain, fn, rlk::Team::kOwn);
}

// exp for float32 within about 2 ulp (Cephes' expf polynomial after reduction by ln 2);
// below -87.3 it returns 0.
inline float fast_exp(float x) {
  const float lo = -87.3f, hi = 88.0f;
  const float keep = x < lo ? 0.f : 1.f;
  x = std::min(std::max(x, lo), hi);
  const float fx = x * 1.44269504088896341f + 0.5f;
  float nf = float(int32_t(fx));
  nf -= fx < nf ? 1.f : 0.f;  // floor
  const int32_t n = int32_t(nf);
  float r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * keep;
}

#if defined(__GNUC__)
// The same on four lanes with GCC/Clang vector extensions (SSE2 on x86-64, NEON on ARM):
// compilers do not vectorise the scalar version because its comparisons may trap.
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

// An unaligned 16-byte vector that may alias any type: one store of a whole record
// (memcpy of a vector into a struct goes through general registers).
typedef float v4f_any __attribute__((vector_size(16), aligned(4), may_alias));

inline v4f splat(float x) { return v4f{x, x, x, x}; }
inline void store4(void* dst, v4f v) { *static_cast<v4f_any*>(dst) = v; }
inline v4f select(v4i mask, v4f a, v4f b) { return (v4f)((mask & (v4i)a) | (~mask & (v4i)b)); }

// a > b ? a : b and a < b ? a : b lane by lane (b when unordered), which SSE's maxps and
// minps compute in one instruction.
inline v4f max_first(v4f a, v4f b) {
#if defined(__SSE2__)
  return _mm_max_ps(a, b);
#else
  return select(a > b, a, b);
#endif
}
inline v4f min_first(v4f a, v4f b) {
#if defined(__SSE2__)
  return _mm_min_ps(a, b);
#else
  return select(a < b, a, b);
#endif
}

inline v4f fast_exp4(v4f x) {
  const v4f lo = splat(-87.3f), hi = splat(88.0f);
  const v4i keep = ~(x < lo);  // as the scalar version: a NaN stays NaN
  x = max_first(lo, x);        // select(x < lo, lo, x)
  x = min_first(hi, x);        // select(x > hi, hi, x)
  const v4f fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v4f nf = __builtin_convertvector(__builtin_convertvector(fx, v4i), v4f);
  nf = nf - (v4f)((fx < nf) & (v4i)splat(1.f));  // floor: minus 1 or minus +0, which leaves nf as it is
  const v4i n = __builtin_convertvector(nf, v4i);
  v4f r = x - nf * splat(0.693359375f);
  r = r + nf * splat(2.12194440e-4f);
  v4f y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.0f);
  const v4f scale = (v4f)((n + 127) << 23);
  return (v4f)((v4i)(y * scale) & keep);
}
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define RLK_MCTS_AVX2 1
// exp_shifted_sum below, eight exponentials per step under AVX2 (no FMA, so every lane
// rounds as fast_exp4's does), summed into the same four-lane accumulator in the same
// order (the low half, then the high half, is elements i..i+3, then i+4..i+7): the same
// bits as the SSE loop. Large rows (the Go-sized action spaces) spend most of an
// expansion here.
RLK_AVX2_REGION_BEGIN
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline v8f fast_exp8(v8f x) {
  const v8f lo = splat8(-87.3f), hi = splat8(88.0f);
  const v8i keep = ~(x < lo);
  x = lo > x ? lo : x;
  x = hi < x ? hi : x;
  const v8f fx = x * splat8(1.44269504088896341f) + splat8(0.5f);
  v8f nf = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);
  nf = nf - (v8f)((fx < nf) & (v8i)splat8(1.f));
  const v8i n = __builtin_convertvector(nf, v8i);
  v8f r = x - nf * splat8(0.693359375f);
  r = r + nf * splat8(2.12194440e-4f);
  v8f y = splat8(1.9875691500e-4f);
  y = y * r + splat8(1.3981999507e-3f);
  y = y * r + splat8(8.3334519073e-3f);
  y = y * r + splat8(4.1665795894e-2f);
  y = y * r + splat8(1.6666665459e-1f);
  y = y * r + splat8(5.0000001201e-1f);
  y = y * r * r + r + splat8(1.0f);
  const v8f scale = (v8f)((n + 127) << 23);
  return (v8f)((v8i)(y * scale) & keep);
}

// Steps of eight over in[0..k8) (k8 a multiple of 8), accumulating into acc as the
// four-lane loop would.
void exp_shifted_avx2(const float* in, float* out, int32_t k8, float shift, v4f* acc_out) {
  v4f acc = *acc_out;
  for (int32_t i = 0; i < k8; i += 8) {
    v8f v;
    std::memcpy(&v, in + i, sizeof(v));
    v = fast_exp8(v - splat8(shift));
    std::memcpy(out + i, &v, sizeof(v));
    acc += v4f{v[0], v[1], v[2], v[3]};
    acc += v4f{v[4], v[5], v[6], v[7]};
  }
  *acc_out = acc;
}

typedef float v8f_any __attribute__((vector_size(32), aligned(4), may_alias));
// Lanes a and b of p, each repeated four times. clang's constant-index shuffle, since the
// stand-in for GCC's __builtin_shuffle (cmake/clang_compat.h) is a plain function that
// cannot take 32-byte vectors inside this AVX2 region (clang rejects the ABI change).
#if defined(__clang__)
#define RLK_PAIR_SPLAT(p, a, b) __builtin_shufflevector(p, p, a, a, a, a, b, b, b, b)
#else
#define RLK_PAIR_SPLAT(p, a, b) __builtin_shuffle(p, v8i{a, a, a, a, b, b, b, b})
#endif

// Edges [0, 8) get the fresh records {0, 0, p[i], -1}, two per 32-byte store.
__attribute__((always_inline)) inline void write_edges8(Forest::Edge* edge, v8f p) {
  const v8f blank = (v8f)(v8i{0, 0, 0, -1, 0, 0, 0, -1});
  const v8i lanes26 = v8i{0, 0, -1, 0, 0, 0, -1, 0};
  *reinterpret_cast<v8f_any*>(edge) = lanes26 ? RLK_PAIR_SPLAT(p, 0, 1) : blank;
  *reinterpret_cast<v8f_any*>(edge + 2) = lanes26 ? RLK_PAIR_SPLAT(p, 2, 3) : blank;
  *reinterpret_cast<v8f_any*>(edge + 4) = lanes26 ? RLK_PAIR_SPLAT(p, 4, 5) : blank;
  *reinterpret_cast<v8f_any*>(edge + 6) = lanes26 ? RLK_PAIR_SPLAT(p, 6, 7) : blank;
}

// legal_softmax's scaling pass over tmp[0..k8) (k8 a multiple of 8): edge i gets the
// record {0, 0, tmp[i] * inv, -1} (two records per 32-byte store), *t adds the priors in
// edge order, and *top / *first get the largest prior and the first edge holding it.
void scale_edges_avx2(const float* tmp, int32_t k8, float inv, Forest::Edge* edge, float* t_io, float* top_out,
                      int32_t* first_out) {
  const v8f vinv = splat8(inv);
  v8f vtop = splat8(kNegInf);
  v8i vfirst = v8i{-1, -1, -1, -1, -1, -1, -1, -1}, vidx = v8i{0, 1, 2, 3, 4, 5, 6, 7};
  float t = *t_io;
  for (int32_t i = 0; i < k8; i += 8, vidx += 8) {
    v8f p;
    std::memcpy(&p, tmp + i, sizeof(p));
    p = p * vinv;
    const v8i up = p > vtop;
    vtop = up ? p : vtop;
    vfirst = up ? vidx : vfirst;
    for (int l = 0; l < 8; ++l) t += p[l];
    write_edges8(edge + i, p);
  }
  float top = kNegInf;
  for (int l = 0; l < 8; ++l) top = std::max(top, vtop[l]);
  int32_t first = -1;
  for (int l = 0; l < 8; ++l)
    if (vfirst[l] >= 0 && vtop[l] == top && (first < 0 || vfirst[l] < first)) first = vfirst[l];
  *t_io = t;
  *top_out = top;
  *first_out = first;
}

// Whether x[0..n8) (n8 a multiple of 8) holds a NaN or +inf: the bit test of
// has_nan_or_pos_inf, eight at a time (after clearing the sign, the bits compare as
// non-negative int32s).
bool nan_or_pos_inf_avx2(const float* x, int64_t n8) {
  const v8i abs_mask = v8i{0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  const v8i inf = v8i{0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000};
  v8i bad = v8i{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n8; i += 8) {
    v8i u;
    std::memcpy(&u, x + i, sizeof(u));
    bad |= ((u & abs_mask) > inf) | (u == inf);
  }
  const v4i b4 = v4i{bad[0], bad[1], bad[2], bad[3]} | v4i{bad[4], bad[5], bad[6], bad[7]};
  return (b4[0] | b4[1] | b4[2] | b4[3]) != 0;
}
RLK_AVX2_REGION_END
#endif

#if defined(RLK_MCTS_AVX2)
// The AVX2 kernels above pay for a call and a CPU check, worth it from 16 (exponentials,
// edges) or 32 (bit tests) elements on in the baseline build. The AVX2 build (which runs
// only where AVX2 is) inlines them and takes them from 8 elements on: a 9-action row is
// then one eight-lane step and a one-element tail.
#if defined(RLK_MCTS_SECOND_ISA)
constexpr int32_t kAvx2MinRow = 8, kAvx2MinBits = 8;
inline bool avx2_here() { return true; }
#else
constexpr int32_t kAvx2MinRow = 16, kAvx2MinBits = 32;
inline bool avx2_here() { return rlk::simd::use_avx2(); }
#endif
#endif

// out[i] = exp(in[i] - shift) for i < k (in may be out); returns the sum.
inline float exp_shifted_sum(const float* in, float* out, int32_t k, float shift) {
  int32_t i = 0;
  float sum = 0.f;
#if defined(__GNUC__)
  v4f acc = splat(0.f);
#if defined(RLK_MCTS_AVX2)
  if (k >= kAvx2MinRow && avx2_here()) {
    i = k & ~7;
    exp_shifted_avx2(in, out, i, shift, &acc);
  }
#endif
  for (; i + 4 <= k; i += 4) {
    v4f v;
    std::memcpy(&v, in + i, sizeof(v));
    v = fast_exp4(v - splat(shift));
    std::memcpy(out + i, &v, sizeof(v));
    acc += v;
  }
  sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#endif
  for (; i < k; ++i) {
    out[i] = fast_exp(in[i] - shift);
    sum += out[i];
  }
  return sum;
}

// The largest of x[0..n). Max is exact, so four lanes give the scalar loop's value;
// only a tie between +0 and -0 may come out with the other sign, which no use of it
// tells apart (x - mx and its exp agree for both).
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float mx = kNegInf;
#if defined(__GNUC__)
  if (n >= 8) {
    v4f acc = splat(kNegInf), acc2 = acc;
    // Two accumulators for long rows, so that one max does not wait for the other.
    for (; i + 8 <= n; i += 8) {
      v4f v, w;
      std::memcpy(&v, x + i, sizeof(v));
      std::memcpy(&w, x + i + 4, sizeof(w));
      acc = max_first(v, acc);
      acc2 = max_first(w, acc2);
    }
    acc = max_first(acc2, acc);
    for (; i + 4 <= n; i += 4) {
      v4f v;
      std::memcpy(&v, x + i, sizeof(v));
      acc = max_first(v, acc);
    }
    mx = std::max(std::max(acc[0], acc[1]), std::max(acc[2], acc[3]));
  }
#endif
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

#if defined(RLK_MCTS_SECOND_ISA)
// legal_softmax (below) for a row without mask of 8 to 16 actions, in the AVX2 build: two
// eight-lane steps, the second partly filled, in place of the eight-, four- and one-lane
// steps of the general code (whose fixed costs made up most of a 9-action expansion). Each
// exponential and prior is the general code's (fast_exp8, fast_exp4 and fast_exp agree
// lane by lane on the finite and -inf inputs that reach here), and the sums add in its
// order: acc holds elements l, l + 4, l + 8, ... for the blocks of four it covers, then the
// rest one by one. So the edges come out the same bits. Returns false, having written
// nothing, for a row whose logits are all -inf (the general code's uniform case).
bool softmax_8_to_16(const float* logits, int32_t k, int32_t* actions, Forest::Edge* edge, int32_t* best,
                     float* total) {
  const int32_t r = k - 8;  // lanes used in the second step, 0..8
  const v8i lane = v8i{0, 1, 2, 3, 4, 5, 6, 7};
  const v8i valid = lane < v8i{r, r, r, r, r, r, r, r};
  v8f x1;
  std::memcpy(&x1, logits, sizeof(x1));
  // A masked load reads nothing past the row; the unused lanes become -inf (exp: 0).
  v8f x2 = (v8f)_mm256_maskload_ps(logits + 8, (__m256i)valid);
  x2 = valid ? x2 : splat8(kNegInf);
  const v8f m8 = x1 > x2 ? x1 : x2;
  float mx = kNegInf;
  for (int l = 0; l < 8; ++l) mx = std::max(mx, m8[l]);
  if (mx == kNegInf) return false;
  std::memcpy(actions, &lane, sizeof(lane));
  _mm256_maskstore_epi32(actions + 8, (__m256i)valid, (__m256i)(lane + 8));
  const v8f e1 = fast_exp8(x1 - splat8(mx)), e2 = fast_exp8(x2 - splat8(mx));
  v4f acc = v4f{e1[0], e1[1], e1[2], e1[3]} + v4f{e1[4], e1[5], e1[6], e1[7]};
  int32_t j = 0;
  if (r >= 4) {
    acc += v4f{e2[0], e2[1], e2[2], e2[3]};
    j = 4;
    if (r == 8) {
      acc += v4f{e2[4], e2[5], e2[6], e2[7]};
      j = 8;
    }
  }
  float sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; j < r; ++j) sum += e2[j];
  const v8f vinv = splat8(1.0f / sum);
  const v8f p1 = e1 * vinv, p2 = e2 * vinv;  // +0 in p2's unused lanes
  float t = 0.f;
  for (int l = 0; l < 8; ++l) t += p1[l];
  for (int l = 0; l < r; ++l) t += p2[l];
  // The first largest prior: every prior is >= +0 and the largest > 0, so the unused
  // lanes' +0 never wins.
  const v8f pm = p1 > p2 ? p1 : p2;
  float top = 0.f;
  for (int l = 0; l < 8; ++l) top = std::max(top, pm[l]);
  const int hit1 = _mm256_movemask_ps((__m256)(p1 == splat8(top)));
  const int hit2 = _mm256_movemask_ps((__m256)(p2 == splat8(top))) & ((1 << r) - 1);
  *best = hit1 ? __builtin_ctz(hit1) : 8 + __builtin_ctz(hit2);
  *total = t;
  write_edges8(edge, p1);
  const v4f blank4 = (v4f)(v4i{0, 0, 0, -1});
  const v4i lane2 = v4i{0, 0, -1, 0};
  for (int l = 0; l < r; ++l) store4(edge + 8 + l, select(lane2, splat(p2[l]), blank4));
  return true;
}
#endif

// Writes the softmax of the legal logits as fresh (unexpanded) edge records, one per
// legal action in action order, and their actions; `best` gets the offset of the first
// largest prior and `total` the sum of the priors (added in edge order). `tmp` holds A
// floats. Legal logits that are all -inf give a uniform distribution (mctx's finfo.min
// masking has the same effect).
int32_t legal_softmax(const float* logits, const uint8_t* legal, int64_t A, const int32_t* iota, int32_t* actions,
                      float* tmp, Forest::Edge* edge, int32_t* best, float* total) {
#if defined(RLK_MCTS_SECOND_ISA)
  if (!legal && A >= 8 && A <= 16 && softmax_8_to_16(logits, int32_t(A), actions, edge, best, total)) return int32_t(A);
#endif
  int32_t k = 0;
  float mx = kNegInf;
  if (legal) {
    for (int64_t a = 0; a < A; ++a) {
      if (!legal[a]) continue;
      actions[k] = int32_t(a);
      tmp[k++] = logits[a];
      mx = std::max(mx, logits[a]);
    }
  } else if (A >= 32) {
    // The actions of an unmasked row are 0..A-1: one copy of iota (which holds them).
    std::memcpy(actions, iota, size_t(A) * sizeof(int32_t));
    mx = max_of(logits, A);
    k = int32_t(A);
  } else {
    int64_t a = 0;
#if defined(__GNUC__)
    v4i ids = v4i{0, 1, 2, 3};
    for (; a + 4 <= A; a += 4, ids += 4) std::memcpy(actions + a, &ids, sizeof(ids));
#endif
    for (; a < A; ++a) actions[a] = int32_t(a);
    mx = max_of(logits, A);
    k = int32_t(A);
  }
  // Without a mask, exponentiate straight from the input: reading back the scalar
  // copies with vector loads would stall on store forwarding.
  const float* src = legal ? tmp : logits;
  *best = -1;
  *total = 0.f;
  if (k == 0) return 0;
  if (mx == kNegInf) {
    for (int32_t i = 0; i < k; ++i) edge[i] = Forest::Edge{0, 0.f, 1.0f / float(k), -1};
    *best = 0;
    *total = float(k) * (1.0f / float(k));
    return k;
  }
  const float inv = 1.0f / exp_shifted_sum(src, tmp, k, mx);
  // Scaling by inv > 0 keeps the order (rounding is monotone), so the largest prior is
  // the largest exp scaled, and the first largest prior is the first scaled exp equal to it.
  float t = 0.f;
  int32_t i = 0;
#if defined(__GNUC__)
  // Eight edges at a time under AVX2, the rest as below; edges [0, i) then hold
  // (top8, first8), which merge with the four-lane results after (all later edges).
  float top8 = kNegInf;
  int32_t first8 = -1;
#if defined(RLK_MCTS_AVX2)
  if (k >= kAvx2MinRow && avx2_here()) {
    i = k & ~7;
    scale_edges_avx2(tmp, i, inv, edge, &t, &top8, &first8);
  }
#endif
  // Four edges at a time: the priors scaled in one multiply, each record written as one
  // 16-byte store, the largest prior and the first edge holding it kept per lane (a
  // strict > keeps a lane's first). t still adds up in edge order.
  v4f vtop = splat(kNegInf);
  v4i vfirst = v4i{-1, -1, -1, -1}, vidx = v4i{i, i + 1, i + 2, i + 3};
  const v4f vinv = splat(inv);
  const v4f blank = (v4f)(v4i{0, 0, 0, -1});  // visits 0, q 0, prior (lane 2), child -1
  const v4i lane2 = v4i{0, 0, -1, 0};
  for (; i + 4 <= k; i += 4) {
    v4f p;
    std::memcpy(&p, tmp + i, sizeof(p));
    p = p * vinv;
    const v4i up = p > vtop;
    vtop = select(up, p, vtop);
    vfirst = (up & vidx) | (~up & vfirst);
    vidx += 4;
    const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
    t += p0;
    t += p1;
    t += p2;
    t += p3;
    const v4f r0 = select(lane2, splat(p0), blank), r1 = select(lane2, splat(p1), blank);
    const v4f r2 = select(lane2, splat(p2), blank), r3 = select(lane2, splat(p3), blank);
    store4(edge + i, r0);
    store4(edge + i + 1, r1);
    store4(edge + i + 2, r2);
    store4(edge + i + 3, r3);
  }
  float top = std::max(std::max(vtop[0], vtop[1]), std::max(vtop[2], vtop[3]));
  int32_t first = -1;
  for (int l = 0; l < 4; ++l)
    if (vfirst[l] >= 0 && vtop[l] == top && (first < 0 || vfirst[l] < first)) first = vfirst[l];
  if (first8 >= 0 && !(top8 < top)) {  // the eight-lane part holds the largest first
    top = top8;
    first = first8;
  }
#else
  float top = kNegInf;
  int32_t first = -1;
#endif
  for (int32_t j = i; j < k; ++j) {
    const float p = tmp[j] * inv;
    if (p > top) {  // a later edge only takes over when strictly larger
      top = p;
      first = j;
    }
    t += p;
    edge[j] = Forest::Edge{0, 0.f, p, -1};
  }
  *best = first;  // the first largest prior
  *total = t;
  return k;
}

// Bit tests, which vectorise (float comparisons may trap, so compilers keep them scalar).
bool has_nan_or_pos_inf(const float* x, int64_t n) {
  uint32_t bad = 0;
  int64_t i = 0;
#if defined(RLK_MCTS_AVX2)
  if (n >= kAvx2MinBits && avx2_here()) {
    i = n & ~int64_t(7);
    if (nan_or_pos_inf_avx2(x, i)) return true;
  }
#endif
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    bad |= ((u & 0x7fffffffu) > 0x7f800000u) | (u == 0x7f800000u);
  }
  return bad != 0;
}

// (mean * n + v) / (n + 1), the running mean of a node's backed-up values. For values
// near the float32 limit, mean * n overflows although the mean itself is representable:
// then the same mean is taken in double.
inline float running_mean(float mean, float n, float v) {
  const float m = (mean * n + v) / (n + 1.f);
  if (std::isfinite(m)) return m;
  return float((double(mean) * double(n) + double(v)) / (double(n) + 1.0));
}

// A tree whose rewards and network values stay within kTame in magnitude and whose
// discounts within [-1, 1] cannot overflow float32 on any path: a backed-up value is at
// most (1 + depth) * kTame with depth < 2^30 nodes. Other trees have each new leaf's path
// replayed before it is accepted.
constexpr float kTame = 1e28f;
inline bool tame(float reward, float discount, float value) {
  return std::fabs(reward) <= kTame && std::fabs(discount) <= 1.f && std::fabs(value) <= kTame;
}

// Whether |x[i]| <= bound for every i (bound > 0 and finite; NaN is not within), as tame()
// tests it, on the bits: the magnitude of a float orders as the integer of its bits. Bound
// FLT_MAX tests finiteness.
bool within(const float* x, int64_t n, float bound) {
  uint32_t limit;
  std::memcpy(&limit, &bound, sizeof(limit));
  uint32_t out = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    out |= (u & 0x7fffffffu) > limit;
  }
  return out == 0;
}

bool all_set(const uint8_t* flags, int64_t n) {
  uint8_t all = 1;
  for (int64_t i = 0; i < n; ++i) all &= flags[i];
  return all != 0;
}

std::string row_msg(const char* name, int64_t row, const char* what) {
  return std::string(name) + ": row " + std::to_string(row) + " " + what;
}

// 0 when the row is usable, else a message fragment.
// Integer tests on the bits (NaN: exponent all ones and a mantissa; +inf: 0x7f800000)
// vectorise, unlike float comparisons.
const char* check_logits_row(const float* logits, const uint8_t* legal, int64_t A, bool need_legal) {
  uint32_t bad = 0;
  int64_t n = A;
  if (legal) {
    n = 0;
    for (int64_t a = 0; a < A; ++a) {
      uint32_t u;
      std::memcpy(&u, logits + a, sizeof(u));
      const uint32_t on = legal[a] != 0;
      n += on;
      bad |= on & (((u & 0x7fffffffu) > 0x7f800000u) | (u == 0x7f800000u));
    }
  } else {
    bad = has_nan_or_pos_inf(logits, A);
  }
  if (bad) {
    for (int64_t a = 0; a < A; ++a) {
      if (legal && !legal[a]) continue;
      if (std::isnan(logits[a])) return "has a NaN prior logit on a legal action";
    }
    return "has a +inf prior logit on a legal action";
  }
  if (need_legal && n == 0) return "has no legal action";
  return nullptr;
}

}  // namespace

}  // namespace RLK_MCTS_ISA

#if !defined(RLK_MCTS_SECOND_ISA)
namespace {
constexpr size_t kHugePage = size_t(1) << 21;

inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

void* pool_allocate(size_t bytes) {
  if (bytes < kHugePage) return ::operator new(bytes, std::align_val_t(64));
  const size_t rounded = (bytes + kHugePage - 1) & ~(kHugePage - 1);
  void* p = ::operator new(rounded, std::align_val_t(kHugePage));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, rounded, MADV_HUGEPAGE);  // advice only: without huge pages the pool works as before
#endif
  return p;
}

void pool_free(void* p, size_t bytes) {
  if (bytes < kHugePage) {
    ::operator delete(p, std::align_val_t(64));
    return;
  }
  ::operator delete(p, std::align_val_t(kHugePage));
}

std::vector<int32_t> considered_visit_sequence(int max_considered, int num_simulations) {
  std::vector<int32_t> seq;
  if (num_simulations <= 0) return seq;
  seq.reserve(size_t(num_simulations));
  if (max_considered <= 1) {
    for (int i = 0; i < num_simulations; ++i) seq.push_back(i);
    return seq;
  }
  // The first round lists every considered action once with 0 visits, so with at least
  // as many actions as simulations the sequence is all zeros. Returning early also keeps
  // the shift and the visits table below small whatever max_considered is.
  if (max_considered >= num_simulations) {
    seq.assign(size_t(num_simulations), 0);
    return seq;
  }
  int log2max = 0;
  while ((int64_t(1) << log2max) < int64_t(max_considered)) ++log2max;
  std::vector<int32_t> visits(size_t(max_considered), 0);
  int considered = max_considered;
  while (int64_t(seq.size()) < int64_t(num_simulations)) {
    const int extra = int(std::max<int64_t>(1, int64_t(num_simulations) / (int64_t(log2max) * considered)));
    for (int r = 0; r < extra; ++r) {
      seq.insert(seq.end(), visits.begin(), visits.begin() + considered);
      for (int i = 0; i < considered; ++i) ++visits[size_t(i)];
    }
    considered = std::max(2, considered / 2);
  }
  seq.resize(size_t(num_simulations));
  return seq;
}

CounterRng::CounterRng(uint64_t seed, uint64_t tree, uint64_t epoch)
    : key(mix64(mix64(seed ^ 0x5851F42D4C957F2Dull) ^ mix64(tree + 0x14057B7EF767814Full) ^
                (epoch * 0xD1342543DE82EF95ull))) {}

uint64_t CounterRng::next_u64() { return mix64(key + 0x9E3779B97F4A7C15ull * ++counter); }

double CounterRng::uniform_open() { return (double(next_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

double CounterRng::normal() {
  const double u1 = uniform_open(), u2 = uniform_open();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

double CounterRng::gamma(double alpha) {
  if (alpha < 1.0) {
    const double u = uniform_open();
    return gamma(alpha + 1.0) * std::pow(u, 1.0 / alpha);
  }
  // Marsaglia and Tsang (2000).
  const double d = alpha - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
  for (int tries = 0; tries < 1000; ++tries) {
    const double x = normal();
    double v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    const double u = uniform_open();
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v;
  }
  return d;
}

double CounterRng::gumbel() { return -std::log(-std::log(uniform_open())); }

// The first n entries of a buffer, for range-for.
#endif  // !RLK_MCTS_SECOND_ISA

namespace RLK_MCTS_ISA {

struct Span {
  Forest::Child* p;
  int32_t n;
  Forest::Child* begin() const { return p; }
  Forest::Child* end() const { return p + n; }
};

struct Forest::Completed {
  float lo = 0.f, hi = 0.f, scale = 0.f;
  float mul = 0.f, add = 0.f;  // sigma(q) = mul * q + add
  // When mul * q could overflow (values near the float32 limit with a small spread, or a
  // spread that itself overflows), sigma is evaluated as (q/2 - lo/2) * cmul instead,
  // which is bounded by scale. Ordinary values never take this branch, so their results
  // are unchanged bit for bit.
  // Without rescaling, sigma(q) = scale * q can exceed float32 for huge values: it then
  // saturates at +-FLT_MAX instead of becoming inf (and NaN in the softmax).
  bool centered = false, saturate = false;
  float cmul = 0.f;
  float sigma_missing = 0.f;  // sigma of the completed value of unvisited or illegal actions
  int32_t sum_visits = 0;
  int32_t count = 0;  // expanded children, written to the front of the caller's buffer
  int32_t best_unvisited_edge = -1;  // highest prior among unvisited legal children
  float best_unvisited_prior = kNegInf;
  float unvisited_prior_sum = 0.f;
  float sigma(float q) const {
    if (centered) return (q * 0.5f - lo * 0.5f) * cmul;
    if (saturate) return std::min(std::max(mul * q, -FLT_MAX), FLT_MAX);
    return mul * q + add;
  }
};

Forest::Forest(int64_t batch_size, int64_t num_actions, int64_t max_nodes, int64_t max_edges, const Config& config)
    : B_(batch_size), A_(num_actions), N_(max_nodes), E_(max_edges), cfg_(config) {
  if (B_ <= 0) throw std::invalid_argument("batch_size must be > 0, got " + std::to_string(B_));
  if (A_ <= 0 || A_ > (1 << 30)) throw std::invalid_argument("num_actions must be > 0, got " + std::to_string(A_));
  if (N_ < 1 || N_ > (int64_t(1) << 30))
    throw std::invalid_argument("max_nodes must be >= 1, got " + std::to_string(N_));
  // Every option enters float32 arithmetic on each selection: a non-finite one would make
  // all scores NaN.
  const std::pair<const char*, float> floats[] = {
      {"c1", cfg_.c1}, {"c2", cfg_.c2}, {"dirichlet_alpha", cfg_.dirichlet_alpha},
      {"dirichlet_fraction", cfg_.dirichlet_fraction}, {"gumbel_scale", cfg_.gumbel_scale},
      {"maxvisit_init", cfg_.maxvisit_init}, {"value_scale", cfg_.value_scale}, {"temperature", cfg_.temperature}};
  for (const auto& f : floats)
    if (!std::isfinite(f.second))
      throw std::invalid_argument(std::string(f.first) + " must be finite in float32, got " + std::to_string(f.second));
  if (!(cfg_.c2 > 0.f)) throw std::invalid_argument("c2 must be > 0");
  if (!(cfg_.dirichlet_alpha > 0.f)) throw std::invalid_argument("dirichlet_alpha must be > 0");
  if (cfg_.max_considered_actions < 1) throw std::invalid_argument("max_considered_actions must be >= 1");
  if (E_ <= 0) E_ = N_ * A_;
  if (E_ < A_ || E_ > (int64_t(1) << 31) - 1)
    throw std::invalid_argument("max_edges must be in [num_actions, 2^31), got " + std::to_string(E_));
  const size_t nodes = size_t(B_ * N_), edges = size_t(B_ * E_);
  Node blank{};
  blank.discount = 1.f;
  blank.parent = blank.action = blank.slot = blank.best_unexp = blank.in_edge = -1;
  nodes_.assign(nodes, blank);
  edge_action_.assign(edges, -1);
  edges_.assign(edges, Edge{0, 0.f, 0.f, -1});
  kids_.assign(edges, -1);
  used_nodes_.assign(size_t(B_), 0);
  used_edges_.assign(size_t(B_), 0);
  has_root_.assign(size_t(B_), 0);
  tame_.assign(size_t(B_), 1);
  root_score_.assign(size_t(B_ * A_), 0.f);
  root_log_prior_.assign(size_t(B_ * A_), 0.f);
  root_open_score_.assign(size_t(B_ * A_), kNegInf);
  root_visits_.assign(size_t(B_ * A_), 0);
  root_sims_.assign(size_t(B_), 0);
  root_best_.assign(size_t(B_), -1);
  pend_parent_.assign(size_t(B_), -1);
  pend_edge_.assign(size_t(B_), -1);
  pend_tree_.assign(size_t(B_), -1);
  pend_row_.assign(size_t(B_), -1);
  pend_action_.assign(size_t(B_), -1);
  iota_.resize(size_t(A_));
  for (int64_t a = 0; a < A_; ++a) iota_[size_t(a)] = int32_t(a);
  path_.assign(size_t(B_) * kPathCap, PathStep{0, 0});
  path_len_.assign(size_t(B_), 0);
}

void Forest::for_trees(int64_t grain, const std::function<void(int64_t, int64_t)>& fn) const {
  const int threads = cfg_.num_threads;
  if (threads == 1) {
    fn(0, B_);
    return;
  }
  if (threads > 1) grain = std::max<int64_t>(grain, (B_ + threads - 1) / threads);
  for_range(B_, grain, fn);
}

int64_t Forest::step_grain(int64_t n, int64_t min_grain) const {
  const int threads = cfg_.num_threads > 0 ? cfg_.num_threads : rlk::num_threads();
  if (threads <= 1) return std::max<int64_t>(n, 1);
  return std::max(min_grain, (n + threads - 1) / threads);
}

void Forest::plan(int num_simulations) {
  if (num_simulations < 0) throw std::invalid_argument("num_simulations must be >= 0");
  // The root never considers more actions than it has, so rows past A are never read:
  // building them would cost O(m * (m + num_simulations)) for a huge max_considered_actions.
  const int m = int(std::min<int64_t>(std::max(0, cfg_.max_considered_actions), A_));
  table_.assign(size_t(m + 1) * size_t(num_simulations), 0);
  for (int i = 0; i <= m; ++i) {
    const auto seq = considered_visit_sequence(i, num_simulations);
    std::copy(seq.begin(), seq.end(), table_.begin() + size_t(i) * size_t(num_simulations));
  }
  table_sims_ = num_simulations;
  std::fill(root_visits_.begin(), root_visits_.end(), 0);
  std::fill(root_sims_.begin(), root_sims_.end(), 0);
}

void Forest::recompute_best_unexpanded(int64_t b, int32_t x) {
  const size_t xi = size_t(b * N_ + x);
  const int64_t eb = b * E_ + nodes_[xi].first_edge;
  const int32_t ne = nodes_[xi].num_edges;
  int32_t best = -1;
  float top = kNegInf, mass = 0.f;
  for (int32_t k = 0; k < ne; ++k) {
    if (edges_[size_t(eb + k)].child >= 0) continue;
    const float p = edges_[size_t(eb + k)].prior;
    mass += p;
    if (p > top) {
      top = p;
      best = k;
    }
  }
  nodes_[xi].best_unexp = best;
  nodes_[xi].unexp_prior = mass;
}

void Forest::recompute_root_best(int64_t b) {
  const int64_t eb = b * E_ + nodes_[size_t(b * N_)].first_edge;
  const int32_t ne = nodes_[size_t(b * N_)].num_edges;
  const float* score = &root_score_[size_t(b * A_)];
  int32_t best = -1;
  float top = kNegInf;
#if defined(__GNUC__)
  // The first largest score among the unexpanded edges, from root_open_score_ (-inf on
  // expanded edges) four lanes at a time: each lane keeps its first largest (strict >),
  // then the smallest edge among the lanes holding the overall largest wins. That is the
  // loop below whenever some unexpanded score is above -inf; otherwise (every edge
  // expanded, or -inf scores from an overflowing gumbel_scale) the loop decides.
  {
    const float* open = &root_open_score_[size_t(b * A_)];
    v4f vtop = splat(kNegInf);
    v4i vfirst = v4i{-1, -1, -1, -1}, vidx = v4i{0, 1, 2, 3};
    int32_t k = 0;
    for (; k + 4 <= ne; k += 4, vidx += 4) {
      v4f v;
      std::memcpy(&v, open + k, sizeof(v));
      const v4i up = v > vtop;
      vtop = max_first(v, vtop);
      vfirst = (up & vidx) | (~up & vfirst);
    }
    top = std::max(std::max(vtop[0], vtop[1]), std::max(vtop[2], vtop[3]));
    for (int l = 0; l < 4; ++l)
      if (vfirst[l] >= 0 && vtop[l] == top && (best < 0 || vfirst[l] < best)) best = vfirst[l];
    for (; k < ne; ++k)
      if (open[k] > top) {
        top = open[k];
        best = k;
      }
    if (top > kNegInf) {
      root_best_[size_t(b)] = best;
      return;
    }
    best = -1;
    top = kNegInf;
  }
#endif
  for (int32_t k = 0; k < ne; ++k) {
    if (edges_[size_t(eb + k)].child >= 0) continue;
    if (best < 0 || score[k] > top) {
      top = score[k];
      best = k;
    }
  }
  root_best_[size_t(b)] = best;
}

int32_t Forest::fill_edges(int64_t b, int32_t fe, const float* logits, const uint8_t* legal, float* scratch,
                           int32_t* best, float* total) {
  const int64_t eb = b * E_ + fe;
  return legal_softmax(logits, legal, A_, iota_.data(), &edge_action_[size_t(eb)], scratch, &edges_[size_t(eb)], best,
                       total);
}

void Forest::prepare_root_noise(int64_t b, CounterRng& rng) {
  const int64_t nb = b * N_, eb = b * E_;
  const int32_t fe = nodes_[nb].first_edge, ne = nodes_[nb].num_edges;
  Edge* edge = &edges_[size_t(eb + fe)];
  if (cfg_.algorithm == Algorithm::kPuct && cfg_.dirichlet_fraction > 0.f) {
    // Noise over the legal actions only: mctx draws it over all actions and then masks,
    // which wastes part of the noise mass on illegal moves.
    std::vector<double> g(static_cast<size_t>(ne));
    double total = 0.0;
    for (int32_t k = 0; k < ne; ++k) total += (g[size_t(k)] = rng.gamma(cfg_.dirichlet_alpha));
    const float f = cfg_.dirichlet_fraction;
    for (int32_t k = 0; k < ne; ++k) {
      const double noise = total > 0.0 ? g[size_t(k)] / total : 1.0 / ne;
      edge[k].prior = float((1.0 - f) * edge[k].prior + f * noise);
    }
  }
  float* score = &root_score_[size_t(b * A_)];
  for (int32_t k = 0; k < ne; ++k) {
    float g = 0.f;
    if (cfg_.algorithm == Algorithm::kGumbel && cfg_.gumbel_scale != 0.f) g = cfg_.gumbel_scale * float(rng.gumbel());
    const float log_prior = std::log(std::max(edge[k].prior, FLT_MIN));
    root_log_prior_[size_t(b * A_ + k)] = log_prior;
    score[k] = g + log_prior;
    root_open_score_[size_t(b * A_ + k)] = edge[k].child < 0 ? score[k] : kNegInf;
  }
  std::fill(root_visits_.begin() + b * A_, root_visits_.begin() + (b + 1) * A_, 0);
  root_sims_[size_t(b)] = 0;
  recompute_best_unexpanded(b, 0);
  recompute_root_best(b);
}

void Forest::init_root(int64_t b, const float* logits, float value, const uint8_t* legal, float* scratch,
                       CounterRng& rng) {
  const int64_t nb = b * N_;
  int32_t best;
  float total;
  const int32_t k = fill_edges(b, 0, logits, legal, scratch, &best, &total);
  nodes_[nb].parent = -1;
  nodes_[nb].in_edge = -1;
  nodes_[nb].action = -1;
  nodes_[nb].slot = -1;
  nodes_[nb].num_kids = 0;
  nodes_[nb].first_edge = 0;
  nodes_[nb].num_edges = k;
  nodes_[nb].visits = 1;
  nodes_[nb].value = nodes_[nb].raw_value = value;
  nodes_[nb].reward = 0.f;
  nodes_[nb].discount = 1.f;
  nodes_[nb].terminal = 0;
  used_nodes_[b] = 1;
  used_edges_[b] = k;
  has_root_[b] = 1;
  tame_[b] = 1;
  pend_parent_[b] = -1;
  prepare_root_noise(b, rng);
}

void Forest::set_roots(const float* logits, const float* value, const uint8_t* legal, const uint8_t* rows) {
  for (int64_t b = 0; b < B_; ++b) {
    if (rows && !rows[b]) continue;
    if (!std::isfinite(value[b])) throw std::invalid_argument(row_msg("value", b, "is not finite"));
    const char* bad = check_logits_row(logits + b * A_, legal ? legal + b * A_ : nullptr, A_, true);
    if (bad) throw std::invalid_argument(row_msg(legal ? "prior_logits/legal_mask" : "prior_logits", b, bad));
  }
  const uint64_t epoch = ++epoch_;
  num_pending_ = 0;
  for_trees(16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(A_));
    for (int64_t b = begin; b < end; ++b) {
      if (rows && !rows[b]) continue;
      CounterRng rng(cfg_.seed, uint64_t(b), epoch);
      init_root(b, logits + b * A_, value[b], legal ? legal + b * A_ : nullptr, scratch.data(), rng);
    }
  });
}


// Calls fn(k, true) for the edge offset k of every expanded child of node x, from the
// kids list: in edge order for small nodes (up to kOrderedChildren edges), newest first
// for large ones. Small nodes used to scan all their edges instead, adding +0 for the
// unexpanded ones; visiting only the expanded ones in the same order gives the same sums
// bit for bit, in num_kids steps instead of num_edges.
template <typename Fn>
inline void for_each_child(const Forest::Edge* rec, int32_t ne, const int32_t* kids, int32_t count, Fn&& fn) {
  (void)rec;
  if (ne <= kOrderedChildren) {
    for (int32_t j = 0; j < count; ++j) fn(kids[j], true);
  } else {
    for (int32_t j = count - 1; j >= 0; --j) fn(kids[j], true);
  }
}

void Forest::link_child(int64_t b, int32_t x, int32_t slot) {
  const size_t xi = size_t(b * N_ + x);
  int32_t* kids = &kids_[size_t(b * E_ + nodes_[xi].first_edge)];
  int32_t j = nodes_[xi].num_kids;
  // Small nodes keep the list sorted by edge offset (see for_each_child): an insertion
  // into at most kOrderedChildren entries.
  if (nodes_[xi].num_edges <= kOrderedChildren)
    for (; j > 0 && kids[j - 1] > slot; --j) kids[j] = kids[j - 1];
  kids[j] = slot;
  ++nodes_[xi].num_kids;
}

// Inlined into its callers: the summary then stays in registers instead of going through
// memory, and the call's fixed cost was a sizeable part of scoring a small node.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void Forest::completed(int64_t b, int32_t x, std::vector<Child>& buf, Completed& out) const {
  const int64_t nb = b * N_;
  const size_t xi = size_t(nb + x);
  const int32_t ne = nodes_[xi].num_edges;
  const int64_t eb = b * E_ + nodes_[xi].first_edge;
  const Edge* rec = edges_.data() + eb;
  int32_t sum_n = 0, max_n = 0;
  float sum_p = 0.f, sum_pq = 0.f;
  float q_lo = std::numeric_limits<float>::infinity(), q_hi = -q_lo;
  Child* out_child = buf.data();
  int32_t count = 0;
  // Adding +0 for an unexpanded edge leaves a sum as it was, bit for bit (a sum that
  // starts at +0 is never -0), so the scan of a small node gives the list's results.
  for_each_child(rec, ne, kids_.data() + eb, nodes_[xi].num_kids, [&](int32_t k, bool on) {
    const int32_t n = rec[k].visits;
    const float q = rec[k].q;
    const float p = rec[k].prior;
    out_child[count] = {k, n, q, p};
    count += on;
    sum_n += n;
    max_n = std::max(max_n, n);
    const float pf = std::max(p, FLT_MIN);
    sum_p += on ? pf : 0.f;
    sum_pq += on ? pf * q : 0.f;
    q_lo = on ? std::min(q_lo, q) : q_lo;
    q_hi = on ? std::max(q_hi, q) : q_hi;
  });
  out.count = count;
  out.best_unvisited_edge = nodes_[xi].best_unexp;
  out.best_unvisited_prior = out.best_unvisited_edge >= 0 ? rec[out.best_unvisited_edge].prior : kNegInf;
  out.unvisited_prior_sum = nodes_[xi].unexp_prior;
  const float raw = nodes_[xi].raw_value;
  float v = raw;
  if (cfg_.use_mixed_value && count > 0) {
    v = (raw + float(sum_n) * (sum_pq / sum_p)) / float(sum_n + 1);
    if (!std::isfinite(v)) {  // values near the float32 limit: sum_n * mean overflowed
      double spq = 0.0, sp = 0.0;
      for (const Child& ch : Span{buf.data(), count}) {
        const double pf = std::max(ch.prior, FLT_MIN);
        sp += pf;
        spq += pf * double(ch.q);
      }
      v = float((double(raw) + double(sum_n) * (spq / sp)) / double(sum_n + 1));
    }
  }
  // Unvisited and illegal actions are completed by v. It goes first into the min and max
  // (ties keep the earlier operand), as a loop starting from v would.
  const bool missing = count < ne || ne < A_;
  const float lo = missing ? std::min(v, q_lo) : q_lo;
  const float hi = missing ? std::max(v, q_hi) : q_hi;
  out.lo = lo;
  out.hi = hi;
  out.scale = (cfg_.maxvisit_init + float(max_n)) * cfg_.value_scale;
  if (cfg_.rescale_values) {
    out.mul = out.scale / std::max(hi - lo, kEps);
    out.add = -lo * out.mul;
    const float big = std::max(std::fabs(lo), std::fabs(hi));
    if (!(out.mul * big <= 0.25f * FLT_MAX) || !(hi - lo <= FLT_MAX)) {
      out.centered = true;
      out.cmul = out.scale / std::max(hi * 0.5f - lo * 0.5f, 0.5f * kEps);
    }
  } else {
    out.mul = out.scale;
    out.add = 0.f;
    out.saturate = !(out.mul * std::max(std::fabs(lo), std::fabs(hi)) <= FLT_MAX);
  }
  out.sum_visits = sum_n;
  out.sigma_missing = out.sigma(v);
}

int32_t Forest::puct_edge(int64_t b, int32_t x, std::vector<Child>& buf) const {
  const int64_t nb = b * N_;
  const size_t xi = size_t(nb + x);
  const int32_t fe = nodes_[xi].first_edge;
  const int64_t eb = b * E_ + fe;
  const Edge* rec = edges_.data() + eb;
  const Node& node = nodes_[xi];
  const float n_node = float(node.visits);
  float pb_c = cfg_.c1 + std::log((n_node + cfg_.c2 + 1.f) / cfg_.c2);
  if (!std::isfinite(pb_c)) pb_c = float(double(cfg_.c1) + std::log((double(n_node) + cfg_.c2 + 1.0) / cfg_.c2));
  const float coef = std::sqrt(n_node) * pb_c;
  float lo = node.value, hi = lo;
  Child* out_child = buf.data();
  int32_t count = 0;
  for_each_child(rec, node.num_edges, kids_.data() + eb, node.num_kids, [&](int32_t k, bool on) {
    const float q = rec[k].q;
    lo = on ? std::min(lo, q) : lo;
    hi = on ? std::max(hi, q) : hi;
    out_child[count] = {k, rec[k].visits, q, rec[k].prior};
    count += on;
  });
  // Unvisited children are completed by the minimum, i.e. 0 after normalisation, so only
  // the one with the largest prior can win.
  // A spread that overflows float32 is normalised in halves (multiplying by 1 otherwise
  // leaves every score as it was, bit for bit).
  const float half = hi - lo <= FLT_MAX ? 1.f : 0.5f;
  const float inv_denom = 1.0f / std::max(hi * half - lo * half, kEps);
  int32_t best = node.best_unexp;
  float best_score = best >= 0 ? coef * rec[best].prior : kNegInf;
  for (int32_t i = 0; i < count; ++i) {
    const Child& ch = out_child[i];
    const float s = (ch.q * half - lo * half) * inv_denom + coef * ch.prior / float(ch.visits + 1);
    if (s > best_score || (s == best_score && ch.edge < best)) {
      best_score = s;
      best = ch.edge;
    }
  }
  return fe + best;
}

int32_t Forest::gumbel_interior_edge(int64_t b, int32_t x, std::vector<Child>& buf) const {
  const int32_t fe = nodes_[size_t(b * N_ + x)].first_edge;
  Completed cq;
  completed(b, x, buf, cq);
  // argmax softmax(logits + sigma(completedQ)) - n / (1 + sum n), evaluated without
  // exponentiating every action: unvisited children share one completed value, so only
  // the largest prior among them can win.
  float m = cq.best_unvisited_edge >= 0 ? cq.sigma_missing : kNegInf;
  for (Child& ch : Span{buf.data(), cq.count}) {
    ch.q = cq.sigma(ch.q);  // q is reused for sigma, then for the unnormalised weight
    m = std::max(m, ch.q);
  }
  float w_missing, z;
#if defined(__GNUC__)
  {
    // The exponentials four at a time (fast_exp4 gives fast_exp's values), the missing
    // value's in the first lane of the first group; z still adds up in child order.
    Child* ch = buf.data();
    const int32_t n = cq.count;
    v4f v = splat(m);  // unused lanes: exp(0)
    v[0] = cq.sigma_missing;
    int32_t i = 0;
    for (int l = 1; l < 4 && i + l - 1 < n; ++l) v[l] = ch[i + l - 1].q;
    v4f w = fast_exp4(v - splat(m));
    w_missing = cq.best_unvisited_edge >= 0 ? w[0] : 0.f;
    z = cq.unvisited_prior_sum * w_missing;
    for (int l = 1; l < 4 && i < n; ++l, ++i) {
      ch[i].q = ch[i].prior * w[l];
      z += ch[i].q;
    }
    for (; i < n; i += 4) {
      v = splat(m);
      for (int l = 0; l < 4 && i + l < n; ++l) v[l] = ch[i + l].q;
      w = fast_exp4(v - splat(m));
      for (int l = 0; l < 4 && i + l < n; ++l) {
        ch[i + l].q = ch[i + l].prior * w[l];
        z += ch[i + l].q;
      }
    }
  }
#else
  w_missing = cq.best_unvisited_edge >= 0 ? fast_exp(cq.sigma_missing - m) : 0.f;
  z = cq.unvisited_prior_sum * w_missing;
  for (Child& ch : Span{buf.data(), cq.count}) {
    ch.q = ch.prior * fast_exp(ch.q - m);
    z += ch.q;
  }
#endif
  if (!(z > 0.f)) z = 1.f;  // every prior underflowed to 0
  const float inv_z = 1.0f / z, inv_n = 1.0f / float(1 + cq.sum_visits);
  int32_t best = cq.best_unvisited_edge;
  float best_score = best >= 0 ? cq.best_unvisited_prior * w_missing * inv_z : kNegInf;
  for (const Child& ch : Span{buf.data(), cq.count}) {
    const float s = ch.q * inv_z - float(ch.visits) * inv_n;
    if (s > best_score || (s == best_score && ch.edge < best)) {
      best_score = s;
      best = ch.edge;
    }
  }
  return fe + best;
}

int32_t Forest::gumbel_root_edge(int64_t b, std::vector<Child>& buf) const {
  const int32_t fe = nodes_[size_t(b * N_)].first_edge, ne = nodes_[size_t(b * N_)].num_edges;
  const int32_t sim = root_sims_[size_t(b)];
  // Past the planned number of simulations the root falls back to the interior rule.
  if (sim >= table_sims_) return gumbel_interior_edge(b, 0, buf);
  const int32_t considered = std::min<int32_t>(cfg_.max_considered_actions, ne);
  const int32_t target = table_[size_t(considered) * size_t(table_sims_) + size_t(sim)];
  const float* score = &root_score_[size_t(b * A_)];
  const int32_t* search_visits = &root_visits_[size_t(b * A_)];
  const int32_t unexp = root_best_[size_t(b)];
  {
    // The candidates are the children with `target` visits in this search, and for
    // target 0 the best unexpanded edge. A lone candidate wins whatever its score (the
    // loop below takes the first candidate outright), so the completed Q-values, the
    // costly part, are only needed when there are several: as in the first round of
    // sequential halving (only unexpanded edges) and at the end of every round.
    const size_t xi = size_t(b * N_);
#if defined(RLK_MCTS_SECOND_ISA)
    // With target > 0 the candidates are exactly the edges with `target` visits in this
    // search (an unexpanded edge has none), which for up to 16 edges two eight-lane
    // compares of the visit counts find, in place of walking the children list.
    if (target > 0 && ne <= 16) {
      const v8i lane = v8i{0, 1, 2, 3, 4, 5, 6, 7}, vt = v8i{target, target, target, target, target, target, target, target};
      const v8i lo = lane < v8i{ne, ne, ne, ne, ne, ne, ne, ne};
      const v8i hi = lane + 8 < v8i{ne, ne, ne, ne, ne, ne, ne, ne};
      const v8i n0 = (v8i)_mm256_maskload_epi32(search_visits, (__m256i)lo);
      const v8i n1 = (v8i)_mm256_maskload_epi32(search_visits + 8, (__m256i)hi);
      const uint32_t hits = uint32_t(_mm256_movemask_ps((__m256)((n0 == vt) & lo))) |
                            uint32_t(_mm256_movemask_ps((__m256)((n1 == vt) & hi))) << 8;
      if (hits != 0 && (hits & (hits - 1)) == 0) return fe + __builtin_ctz(hits);
      goto several;  // several candidates are scored below; none falls back as there
    }
#endif
    const int32_t* kids = kids_.data() + b * E_ + nodes_[xi].first_edge;
    int32_t candidates = target == 0 && unexp >= 0, lone = unexp;
    for (int32_t j = 0, nk = nodes_[xi].num_kids; j < nk && candidates < 2; ++j) {
      const bool on = search_visits[kids[j]] == target;
      candidates += on;
      lone = on ? kids[j] : lone;
    }
    if (candidates == 1) return fe + lone;
  }
#if defined(RLK_MCTS_SECOND_ISA)
several:
#endif
  Completed cq;
  completed(b, 0, buf, cq);
  // Unexpanded edges have no visits in this search and share sigma(completed value).
  int32_t best = -1;
  float best_score = kNegInf;
  if (target == 0 && unexp >= 0) {
    best = unexp;
    best_score = std::max(kLowLogit, score[unexp] + cq.sigma_missing);
  }
  for (const Child& ch : Span{buf.data(), cq.count}) {
    if (search_visits[ch.edge] != target) continue;
    const float s = std::max(kLowLogit, score[ch.edge] + cq.sigma(ch.q));
    if (best < 0 || s > best_score || (s == best_score && ch.edge < best)) {
      best_score = s;
      best = ch.edge;
    }
  }
  if (best < 0) return gumbel_interior_edge(b, 0, buf);  // cannot happen with a consistent table
  return fe + best;
}

int32_t Forest::select_edge(int64_t b, int32_t x, int depth, std::vector<Child>& buf) const {
  const size_t xi = size_t(b * N_ + x);
  const int32_t e = score_edge(b, x, depth, buf), fe = nodes_[xi].first_edge;
  // Selection is total: when no score compares (all NaN, which finite inputs should not
  // produce but absurd options can), the node's first edge, its lowest legal action, is
  // taken rather than an edge outside its slice.
  return e >= fe && e < fe + nodes_[xi].num_edges ? e : fe;
}

int32_t Forest::score_edge(int64_t b, int32_t x, int depth, std::vector<Child>& buf) const {
  // A node without expanded children (often the last one on the path) takes its
  // highest-prior edge under PUCT and the Gumbel interior rule alike, since all its
  // actions share one completed value: no need to look at its edges.
  if (depth > 0 || cfg_.algorithm == Algorithm::kPuct) {
    const size_t xi = size_t(b * N_ + x);
    if (nodes_[xi].num_kids == 0 && nodes_[xi].best_unexp >= 0) return nodes_[xi].first_edge + nodes_[xi].best_unexp;
  }
  if (cfg_.algorithm == Algorithm::kPuct) return puct_edge(b, x, buf);
  return depth == 0 ? gumbel_root_edge(b, buf) : gumbel_interior_edge(b, x, buf);
}

void Forest::sync_edge(int64_t b, int32_t x) {
  const size_t xi = size_t(b * N_ + x);
  const int32_t e = nodes_[xi].in_edge;
  if (e < 0) return;  // a root
  const Node& s = nodes_[xi];
  Edge& edge = edges_[size_t(b * E_ + e)];
  edge.visits = s.visits;
  edge.q = s.reward + s.discount * s.value;
}

void Forest::backup(int64_t b, int32_t x, float leaf_value) {
  const int64_t nb = b * N_;
  float v = leaf_value;
  for (int32_t p = nodes_[size_t(nb + x)].parent; p >= 0; x = p, p = nodes_[size_t(nb + x)].parent) {
    v = nodes_[size_t(nb + x)].reward + nodes_[size_t(nb + x)].discount * v;
    const size_t pi = size_t(nb + p);
    nodes_[pi].value = running_mean(nodes_[pi].value, float(nodes_[pi].visits), v);
    nodes_[pi].visits += 1;
    sync_edge(b, p);
    if (p == 0) {
      root_visits_[size_t(b * A_ + nodes_[size_t(nb + x)].slot)] += 1;
      root_sims_[size_t(b)] += 1;
    }
  }
}

void Forest::revisit(int64_t b, int32_t x) {
  const size_t xi = size_t(b * N_ + x);
  const float v = nodes_[xi].terminal ? 0.f : nodes_[xi].raw_value;
  nodes_[xi].value = running_mean(nodes_[xi].value, float(nodes_[xi].visits), v);
  nodes_[xi].visits += 1;
  sync_edge(b, x);
  backup(b, x, v);
}

bool Forest::descend(int64_t b, int32_t& x, int32_t& depth, std::vector<Child>& buf) {
  const int64_t nb = b * N_, eb = b * E_;
  const int32_t e = select_edge(b, x, depth, buf);
  if (depth < kPathCap) path_[size_t(b) * kPathCap + size_t(depth)] = {x, e};
  const int32_t c = edges_[size_t(eb + e)].child;
  ++depth;
  if (c < 0) {
    if (used_nodes_[b] >= N_ || used_edges_[b] + A_ > E_) {
      revisit(b, x);  // pool full: the simulation ends at x
    } else {
      pend_parent_[b] = x;
      pend_edge_[b] = e;
      pend_action_[b] = edge_action_[size_t(eb + e)];
      path_len_[b] = std::min<int32_t>(depth, kPathCap);
    }
    return false;
  }
  if (nodes_[size_t(nb + c)].terminal || (cfg_.max_depth > 0 && depth >= cfg_.max_depth)) {
    revisit(b, c);
    return false;
  }
  x = c;
  return true;
}

// Trees are independent, so descending several in lockstep gives what descending them one
// after the other gives, bit for bit. What it changes is the memory: a step touches every
// tree once, so a forest larger than the core's cache (256 trees of 9 actions, 50
// simulations: ~4 MB) pays a cache miss for each node, edge block and child list on the
// path, one after the other. In lockstep, the node a tree moves to is requested while the
// other trees of the group take their step, its edges and children list when the round
// reaches it again, and they are in cache by the time the tree is scored.
void Forest::select_group(int64_t begin, int64_t end, std::vector<Child>& buf) {
  int64_t live[kGroup];
  int32_t at[kGroup], depth[kGroup];
  int n = 0;
  for (int64_t b = begin; b < end; ++b) {
    pend_parent_[b] = -1;
    if (!has_root_[b]) continue;
    prefetch_tree(b);
    live[n] = b;
    at[n] = 0;
    depth[n] = 0;
    ++n;
  }
  // The roots' lines were requested above; deeper nodes' edges are requested once the
  // node's own line (requested at the end of the round before) tells where they are.
  for (bool root = true; n > 0; root = false) {
    if (!root && n > 1)
      for (int t = 0; t < n; ++t) prefetch_node(live[t], at[t]);
    int m = 0;
    for (int t = 0; t < n; ++t) {
      const int64_t b = live[t];
      int32_t x = at[t], d = depth[t];
      if (!descend(b, x, d, buf)) continue;
#if defined(__GNUC__)
      __builtin_prefetch(&nodes_[size_t(b * N_ + x)]);
#endif
      live[m] = b;
      at[m] = x;
      depth[m] = d;
      ++m;
    }
    n = m;
  }
}

#if defined(__GNUC__)
// Requests every cache line of [p, p + bytes) (for writing when `write`).
template <bool write = false>
inline void prefetch_span(const void* p, size_t bytes) {
  const uintptr_t first = uintptr_t(p) & ~uintptr_t(63), last = uintptr_t(p) + bytes;
  for (uintptr_t line = first; line < last; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line), write);
}
#endif

void Forest::prefetch_tree(int64_t b) const {
#if defined(__GNUC__)
  // The lines tree b's selection starts with: its root, the root's edges and children
  // list, and the Gumbel root schedule (the root is always the pool's first node and owns
  // the first edges).
  const int64_t nb = b * N_, eb = b * E_;
  __builtin_prefetch(&nodes_[size_t(nb)]);
  prefetch_span(&edges_[size_t(eb)], size_t(std::min<int64_t>(A_, kOrderedChildren)) * sizeof(Edge));
  if (cfg_.algorithm == Algorithm::kGumbel) {
    __builtin_prefetch(&root_visits_[size_t(b * A_)]);
    __builtin_prefetch(&root_score_[size_t(b * A_)]);
  }
  __builtin_prefetch(&kids_[size_t(eb)]);
#else
  (void)b;
#endif
}

void Forest::prefetch_node(int64_t b, int32_t x) const {
#if defined(__GNUC__)
  // What score_edge reads at node x (whose own line was requested a round earlier): its
  // edge records (all of them for a node scored by scanning its children's edges, only
  // the highest-prior unexpanded one for a node without expanded children) and its list
  // of expanded children.
  const Node& node = nodes_[size_t(b * N_ + x)];
  const int64_t eb = b * E_ + node.first_edge;
  if (node.num_kids == 0) {
    if (node.best_unexp >= 0) __builtin_prefetch(&edges_[size_t(eb + node.best_unexp)]);
    return;
  }
  __builtin_prefetch(&kids_[size_t(eb)]);
  const int32_t ne = node.num_edges;
  if (ne <= kOrderedChildren) {
    prefetch_span(&edges_[size_t(eb)], size_t(ne) * sizeof(Edge));
  } else if (node.best_unexp >= 0) {
    __builtin_prefetch(&edges_[size_t(eb + node.best_unexp)]);
  }
#else
  (void)b;
  (void)x;
#endif
}

void Forest::prefetch_expansion(int64_t b) const {
#if defined(__GNUC__)
  // What expand_row reads and writes for tree b's pending leaf: the parent and its edge,
  // the new node, its block of edge records and actions (written), and every node and
  // incoming edge of the path, which the backup updates.
  const int32_t x = pend_parent_[size_t(b)];
  if (x < 0) return;
  const int64_t nb = b * N_, eb = b * E_;
  __builtin_prefetch(&nodes_[size_t(nb + x)], 1);
  __builtin_prefetch(&edges_[size_t(eb + pend_edge_[size_t(b)])], 1);
  __builtin_prefetch(&nodes_[size_t(nb + used_nodes_[size_t(b)])], 1);
  const int64_t fe = eb + used_edges_[size_t(b)];
  prefetch_span<true>(&edges_[size_t(fe)], size_t(std::min<int64_t>(A_, kOrderedChildren)) * sizeof(Edge));
  __builtin_prefetch(&edge_action_[size_t(fe)], 1);
  const PathStep* path = &path_[size_t(b) * kPathCap];
  for (int32_t i = 0, n = path_len_[size_t(b)]; i < n; ++i) {
    __builtin_prefetch(&nodes_[size_t(nb + path[i].node)], 1);
    __builtin_prefetch(&edges_[size_t(eb + path[i].edge)], 1);
  }
#else
  (void)b;
#endif
}

void Forest::check_can_select() const {
  if (cfg_.algorithm == Algorithm::kGumbel && table_sims_ == 0)
    throw std::runtime_error("Gumbel search needs a simulation budget: call plan(num_simulations) first");
}

int64_t Forest::collect_leaves(int64_t* tree, int64_t* parent, int64_t* action, int64_t* node) {
  int64_t L = 0;
  for (int64_t b = 0; b < B_; ++b) {
    if (pend_parent_[b] < 0) continue;
    pend_tree_[L] = int32_t(b);
    pend_row_[b] = int32_t(L);
    tree[L] = b;
    parent[L] = pend_parent_[b];
    action[L] = pend_action_[b];
    node[L] = used_nodes_[b];
    ++L;
  }
  num_pending_ = L;
  return L;
}

int64_t Forest::select(int64_t* tree, int64_t* parent, int64_t* action, int64_t* node) {
  if (num_pending_ > 0)
    throw std::runtime_error("select() called twice without expand_backup() for the pending leaves");
  check_can_select();
  for_range(B_, step_grain(B_, std::max<int64_t>(4, 512 / A_)), [&](int64_t begin, int64_t end) {
    std::vector<Child> buf(static_cast<size_t>(A_));
    for (int64_t g = begin; g < end; g += kGroup) select_group(g, std::min(end, g + kGroup), buf);
  });
  return collect_leaves(tree, parent, action, node);
}

bool Forest::path_overflows(int64_t i, const float* value, const float* reward, const float* discount,
                            const uint8_t* terminal) const {
  const int64_t b = pend_tree_[size_t(i)];
  const float leaf = terminal && terminal[i] ? 0.f : value[i];
  if (tame_[size_t(b)] && tame(reward[i], discount[i], leaf)) return false;
  // Replays backup(): the edge into the new node, then every edge up to the root.
  float v = reward[i] + discount[i] * leaf;
  if (!std::isfinite(v)) return true;
  const int64_t nb = b * N_;
  for (int32_t x = pend_parent_[size_t(b)], p = nodes_[size_t(nb + x)].parent; p >= 0; x = p, p = nodes_[size_t(nb + x)].parent) {
    v = nodes_[size_t(nb + x)].reward + nodes_[size_t(nb + x)].discount * v;
    if (!std::isfinite(v)) return true;
  }
  return false;
}

void Forest::check_rows(int64_t L, const float* logits, const float* value, const float* reward,
                        const float* discount, const uint8_t* legal, const uint8_t* terminal) const {
  if (L != num_pending_)
    throw std::invalid_argument("expand_backup got " + std::to_string(L) + " rows but the last select() returned " +
                                std::to_string(num_pending_) + " leaves");
  // Every row is checked before any tree changes, so a bad row leaves the forest as it was.
  const int64_t grain = std::max<int64_t>(4, 2048 / A_);
  auto row_problem = [&](int64_t i) -> const char* {
    if (!std::isfinite(value[i]) || !std::isfinite(reward[i]) || !std::isfinite(discount[i])) return "";
    if (path_overflows(i, value, reward, discount, terminal)) return "";
    if (terminal && terminal[i]) return nullptr;
    return check_logits_row(logits + i * A_, legal ? legal + i * A_ : nullptr, A_, true);
  };
  bool any_bad = false;
  if (!legal && !terminal && L * A_ <= (int64_t(1) << 16)) {
    // Every row needs every check: one branch-free pass over the whole block (the serial
    // part of a step, so it should be short); the loop below names the first bad row.
    // Tame rows are finite; only when some row is not are the rows tested for finiteness
    // (|x| <= FLT_MAX). path_overflows is false for a tame row of a tame tree, so when every
    // row and every tree is tame the call per row is skipped.
    const bool rows_tame = within(value, L, kTame) && within(reward, L, kTame) && within(discount, L, 1.f);
    any_bad = (!rows_tame && !(within(value, L, FLT_MAX) && within(reward, L, FLT_MAX) &&
                               within(discount, L, FLT_MAX))) ||
              has_nan_or_pos_inf(logits, L * A_);
    const bool all_tame = rows_tame && all_set(tame_.data(), B_);
    for (int64_t i = 0; i < L && !any_bad && !all_tame; ++i)
      any_bad = path_overflows(i, value, reward, discount, terminal);
  } else if (cfg_.num_threads == 1 || L * A_ <= (int64_t(1) << 14)) {
    // Small inputs: checking them here costs less than a round trip through the pool.
    for (int64_t i = 0; i < L && !any_bad; ++i) any_bad = row_problem(i) != nullptr;
  } else {
    std::atomic<bool> bad{false};
    for_range(L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (row_problem(i)) {
          bad.store(true, std::memory_order_relaxed);
          break;
        }
    });
    any_bad = bad.load();
  }
  for (int64_t i = 0; any_bad && i < L; ++i) {  // the first bad row, with its message
    const char* bad = row_problem(i);
    if (!bad) continue;
    if (!std::isfinite(value[i])) throw std::invalid_argument(row_msg("value", i, "is not finite"));
    if (!std::isfinite(reward[i])) throw std::invalid_argument(row_msg("reward", i, "is not finite"));
    if (!std::isfinite(discount[i])) throw std::invalid_argument(row_msg("discount", i, "is not finite"));
    if (path_overflows(i, value, reward, discount, terminal))
      throw std::invalid_argument(row_msg("reward + discount * value", i,
                                          "overflows float32 when backed up to the root (value, reward and "
                                          "discount must keep every return finite)"));
    std::string what = bad;
    if (legal && what == "has no legal action") what += " and is not marked terminal";
    throw std::invalid_argument(row_msg(legal ? "prior_logits/legal_mask" : "prior_logits", i, what.c_str()));
  }
}

void Forest::expand_row(int64_t i, int64_t b, const float* logits, const float* value, const float* reward,
                        const float* discount, const uint8_t* legal, const uint8_t* terminal, float* scratch) {
  const int64_t nb = b * N_, eb = b * E_;
  const int32_t x = pend_parent_[b], e = pend_edge_[b];
  const int32_t id = used_nodes_[b]++;
  const size_t ni = size_t(nb + id);
  edges_[size_t(eb + e)].child = id;
  const size_t xi = size_t(nb + x);
  const int32_t slot = e - nodes_[xi].first_edge;
  nodes_[ni].slot = slot;
  nodes_[ni].in_edge = e;
  link_child(b, x, slot);
  nodes_[ni].num_kids = 0;
  nodes_[xi].unexp_prior -= edges_[size_t(eb + e)].prior;
  if (nodes_[xi].best_unexp == slot) recompute_best_unexpanded(b, x);
  if (x == 0) {
    root_open_score_[size_t(b * A_ + slot)] = kNegInf;
    if (root_best_[size_t(b)] == slot) recompute_root_best(b);
  }
  nodes_[ni].parent = x;
  nodes_[ni].action = edge_action_[size_t(eb + e)];
  nodes_[ni].reward = reward[i];
  nodes_[ni].discount = discount[i];
  if (!tame(reward[i], discount[i], value[i])) tame_[b] = 0;
  nodes_[ni].visits = 1;
  const bool term = terminal && terminal[i];
  nodes_[ni].terminal = term ? 1 : 0;
  nodes_[ni].first_edge = used_edges_[b];
  if (term) {
    nodes_[ni].num_edges = 0;
    nodes_[ni].best_unexp = -1;
    nodes_[ni].unexp_prior = 0.f;
    nodes_[ni].value = nodes_[ni].raw_value = 0.f;
  } else {
    const int32_t fe = used_edges_[b];
    const int32_t k = fill_edges(b, fe, logits + i * A_, legal ? legal + i * A_ : nullptr, scratch, &nodes_[ni].best_unexp,
                                 &nodes_[ni].unexp_prior);
    nodes_[ni].num_edges = k;
    used_edges_[b] = fe + k;
    nodes_[ni].value = nodes_[ni].raw_value = value[i];
  }
  pend_parent_[b] = -1;
  sync_edge(b, id);
  backup(b, id, nodes_[ni].value);
}

void Forest::expand_backup(int64_t L, const float* logits, const float* value, const float* reward,
                           const float* discount, const uint8_t* legal, const uint8_t* terminal) {
  check_rows(L, logits, value, reward, discount, legal, terminal);
  for_range(L, step_grain(L, std::max<int64_t>(4, 512 / A_)), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(A_));
    for (int64_t i = begin; i < end; ++i)
      expand_row(i, pend_tree_[size_t(i)], logits, value, reward, discount, legal, terminal, scratch.data());
  });
  num_pending_ = 0;
}

int64_t Forest::expand_select(int64_t L, const float* logits, const float* value, const float* reward,
                              const float* discount, const uint8_t* legal, const uint8_t* terminal, int64_t* tree,
                              int64_t* parent, int64_t* action, int64_t* node) {
  check_can_select();
  check_rows(L, logits, value, reward, discount, legal, terminal);
  // Trees are independent, so expanding tree b's leaf and then running its next
  // simulation, tree by tree, gives what expand_backup() then select() give: one pass
  // over the pool instead of two, with each tree still in cache from its backup.
  for_range(B_, step_grain(B_, std::max<int64_t>(4, 512 / A_)), [&](int64_t begin, int64_t end) {
    std::vector<Child> buf(static_cast<size_t>(A_));
    std::vector<float> scratch(static_cast<size_t>(A_));
    for (int64_t g = begin; g < end; g += kGroup) {
      const int64_t g_end = std::min(end, g + kGroup);
      for (int64_t b = g; b < g_end; ++b) prefetch_expansion(b);
      for (int64_t b = g; b < g_end; ++b)
        if (pend_parent_[b] >= 0)
          expand_row(pend_row_[size_t(b)], b, logits, value, reward, discount, legal, terminal, scratch.data());
      select_group(g, g_end, buf);
    }
  });
  num_pending_ = 0;
  return collect_leaves(tree, parent, action, node);
}

void Forest::discard_pending() {
  for (int64_t i = 0; i < num_pending_; ++i) pend_parent_[size_t(pend_tree_[size_t(i)])] = -1;
  num_pending_ = 0;
}

void Forest::result(float temperature, int64_t* action, float* weights, int32_t* visits, float* q,
                    float* root_value) {
  const uint64_t epoch = ++epoch_;
  for_trees(16, [&](int64_t begin, int64_t end) {
    std::vector<Child> buf(static_cast<size_t>(A_));
    for (int64_t b = begin; b < end; ++b) {
      float* w = weights + b * A_;
      int32_t* n_out = visits + b * A_;
      float* q_out = q + b * A_;
      std::fill(w, w + A_, 0.f);
      std::fill(n_out, n_out + A_, 0);
      std::fill(q_out, q_out + A_, 0.f);
      action[b] = -1;
      root_value[b] = 0.f;
      if (!has_root_[b]) continue;
      const int64_t nb = b * N_, eb = b * E_;
      const int32_t fe = nodes_[nb].first_edge, ne = nodes_[nb].num_edges;
      const Edge* edge = &edges_[size_t(eb + fe)];
      const int32_t* acts = &edge_action_[size_t(eb + fe)];
      root_value[b] = nodes_[size_t(nb)].value;
      int64_t total = 0;
      for (int32_t k = 0; k < ne; ++k) {
        const int32_t c = edge[k].child;
        if (c < 0) continue;
        const size_t ci = size_t(nb + c);
        n_out[acts[k]] = nodes_[ci].visits;
        q_out[acts[k]] = nodes_[ci].reward + nodes_[ci].discount * nodes_[ci].value;
        total += nodes_[ci].visits;
      }
      CounterRng rng(cfg_.seed, uint64_t(b), epoch);
      if (cfg_.algorithm == Algorithm::kPuct) {
        for (int32_t k = 0; k < ne; ++k)
          w[acts[k]] = total > 0 ? float(double(n_out[acts[k]]) / double(total)) : edge[k].prior;
        if (temperature <= 0.f) {
          int32_t best = 0;
          for (int32_t k = 1; k < ne; ++k)
            if (w[acts[k]] > w[acts[best]]) best = k;
          action[b] = acts[best];
        } else {
          // softmax(log(w) / T), restricted to actions with positive weight.
          double wmax = 0.0;
          for (int32_t k = 0; k < ne; ++k) wmax = std::max(wmax, double(w[acts[k]]));
          double sum = 0.0;
          std::vector<double> p(static_cast<size_t>(ne));
          for (int32_t k = 0; k < ne; ++k) {
            const double wk = w[acts[k]];
            p[size_t(k)] = wk > 0.0 ? std::exp((std::log(wk) - std::log(wmax)) / double(temperature)) : 0.0;
            sum += p[size_t(k)];
          }
          double u = rng.uniform_open() * sum;
          int32_t pick = -1;
          for (int32_t k = 0; k < ne; ++k) {
            if (p[size_t(k)] <= 0.0) continue;
            pick = k;
            u -= p[size_t(k)];
            if (u <= 0.0) break;
          }
          action[b] = acts[pick < 0 ? 0 : pick];
        }
      } else {
        Completed cq;
        completed(b, 0, buf, cq);
        const float* score = &root_score_[size_t(b * A_)];
        int32_t considered = 0;
        const int32_t* search_visits = &root_visits_[size_t(b * A_)];
        for (int32_t k = 0; k < ne; ++k) considered = std::max(considered, search_visits[k]);
        std::vector<float> sig(static_cast<size_t>(ne), cq.sigma_missing);
        for (const Child& ch : Span{buf.data(), cq.count}) sig[size_t(ch.edge)] = cq.sigma(ch.q);
        // improved policy softmax(logits + sigma(completedQ)) over the legal actions
        std::vector<float> improved(static_cast<size_t>(ne));
        const float* log_prior = &root_log_prior_[size_t(b * A_)];
        float mx = kNegInf;
        int32_t best = -1;
        float best_score = kNegInf;
        for (int32_t k = 0; k < ne; ++k) {
          const float s = sig[size_t(k)];
          improved[size_t(k)] = log_prior[k] + s;
          mx = std::max(mx, improved[size_t(k)]);
          if (search_visits[k] == considered) {
            const float sc = std::max(kLowLogit, score[k] + s);
            if (sc > best_score) {
              best_score = sc;
              best = k;
            }
          }
        }
        // Each exponential once (they were taken twice, for the sum and for the weight).
        std::vector<double> ex(static_cast<size_t>(ne));
        double sum = 0.0;
        for (int32_t k = 0; k < ne; ++k) sum += (ex[size_t(k)] = std::exp(double(improved[size_t(k)] - mx)));
        for (int32_t k = 0; k < ne; ++k) w[acts[k]] = float(ex[size_t(k)] / sum);
        action[b] = acts[best < 0 ? 0 : best];
      }
    }
  });
}

void Forest::advance(const int64_t* actions, int64_t* old_to_new) {
  if (num_pending_ > 0) throw std::runtime_error("advance() called between select() and expand_backup()");
  std::vector<int32_t> chosen(size_t(B_), -1);  // root edge offset per tree
  for (int64_t b = 0; b < B_; ++b) {
    const int64_t a = actions[b];
    if (a < 0) continue;
    if (a >= A_)
      throw std::invalid_argument("actions: row " + std::to_string(b) + " has action " + std::to_string(a) +
                                  " outside [0, num_actions)");
    if (!has_root_[b])
      throw std::invalid_argument("actions: row " + std::to_string(b) + " names a tree without a root");
    const int64_t nb = b * N_, eb = b * E_;
    const int32_t fe = nodes_[nb].first_edge, ne = nodes_[nb].num_edges;
    for (int32_t k = 0; k < ne; ++k)
      if (edge_action_[size_t(eb + fe + k)] == a) chosen[size_t(b)] = k;
    if (chosen[size_t(b)] < 0)
      throw std::invalid_argument("actions: row " + std::to_string(b) + " has action " + std::to_string(a) +
                                  ", which is not legal at the root");
  }
  const uint64_t epoch = ++epoch_;
  for_trees(4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* o2n = old_to_new + b * N_;
      const int64_t nb = b * N_, eb = b * E_;
      const int32_t used = used_nodes_[b];
      if (actions[b] < 0) {
        for (int64_t i = 0; i < N_; ++i) o2n[i] = i < used ? i : -1;
        continue;
      }
      std::fill(o2n, o2n + N_, -1);
      const int32_t c = edges_[size_t(eb + nodes_[nb].first_edge + chosen[size_t(b)])].child;
      if (c < 0 || nodes_[size_t(nb + c)].terminal) {
        // Nothing to keep: the tree waits for set_roots() on this row.
        has_root_[b] = 0;
        used_nodes_[b] = used_edges_[b] = 0;
        continue;
      }
      // Children always have larger ids than their parent, so one pass in id order marks
      // the subtree, and moving kept nodes (and their edge slices, allocated in the same
      // order) to smaller positions in increasing order never overwrites unread data.
      int32_t kept = 0;
      o2n[c] = kept++;
      for (int32_t i = c + 1; i < used; ++i)
        if (o2n[nodes_[size_t(nb + i)].parent] >= 0) o2n[i] = kept++;
      int32_t next_edge = 0;
      for (int32_t i = c; i < used; ++i) {
        if (o2n[i] < 0) continue;
        const size_t src = size_t(nb + i), dst = size_t(nb + o2n[i]);
        const int32_t fe = nodes_[src].first_edge, ne = nodes_[src].num_edges;
        nodes_[dst].parent = i == c ? -1 : int32_t(o2n[nodes_[src].parent]);
        nodes_[dst].action = i == c ? -1 : nodes_[src].action;
        nodes_[dst].visits = nodes_[src].visits;
        nodes_[dst].value = nodes_[src].value;
        nodes_[dst].raw_value = nodes_[src].raw_value;
        nodes_[dst].reward = i == c ? 0.f : nodes_[src].reward;
        nodes_[dst].discount = i == c ? 1.f : nodes_[src].discount;
        nodes_[dst].terminal = nodes_[src].terminal;
        nodes_[dst].num_edges = ne;
        nodes_[dst].first_edge = next_edge;
        nodes_[dst].slot = i == c ? -1 : nodes_[src].slot;
        // A kept node's parent was kept before it (smaller id), so its new edges are known.
        nodes_[dst].in_edge = i == c ? -1 : nodes_[size_t(nb + nodes_[dst].parent)].first_edge + nodes_[dst].slot;
        nodes_[dst].best_unexp = nodes_[src].best_unexp;
        nodes_[dst].unexp_prior = nodes_[src].unexp_prior;
        nodes_[dst].num_kids = 0;
        for (int32_t k = 0; k < ne; ++k) {
          const size_t es = size_t(eb + fe + k), ed = size_t(eb + next_edge + k);
          edge_action_[ed] = edge_action_[es];
          Edge moved = edges_[es];
          moved.child = moved.child >= 0 ? int32_t(o2n[moved.child]) : -1;
          edges_[ed] = moved;
        }
        next_edge += ne;
      }
      used_nodes_[b] = kept;
      used_edges_[b] = next_edge;
      for (int32_t j = 1; j < kept; ++j) link_child(b, nodes_[size_t(nb + j)].parent, nodes_[size_t(nb + j)].slot);  // as expansion built them
      CounterRng rng(cfg_.seed, uint64_t(b), epoch);
      prepare_root_noise(b, rng);
    }
  });
}

void Forest::export_tree(int32_t* node_visits, float* node_values, float* raw_values, int32_t* parents,
                         int32_t* action_from_parent, uint8_t* terminal, int32_t* children_index,
                         int32_t* children_visits, float* children_values, float* children_rewards,
                         float* children_discounts, float* children_prior_logits) const {
  const float lowest = std::numeric_limits<float>::lowest();
  for_trees(4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t nb = b * N_, eb = b * E_;
      for (int64_t x = 0; x < N_; ++x) {
        const int64_t o = nb + x;
        const int64_t oa = o * A_;
        std::fill(children_index + oa, children_index + oa + A_, -1);
        std::fill(children_visits + oa, children_visits + oa + A_, 0);
        std::fill(children_values + oa, children_values + oa + A_, 0.f);
        std::fill(children_rewards + oa, children_rewards + oa + A_, 0.f);
        std::fill(children_discounts + oa, children_discounts + oa + A_, 0.f);
        std::fill(children_prior_logits + oa, children_prior_logits + oa + A_, 0.f);
        if (x >= used_nodes_[b]) {
          node_visits[o] = 0;
          node_values[o] = raw_values[o] = 0.f;
          parents[o] = action_from_parent[o] = -1;
          terminal[o] = 0;
          continue;
        }
        node_visits[o] = nodes_[size_t(o)].visits;
        node_values[o] = nodes_[size_t(o)].value;
        raw_values[o] = nodes_[size_t(o)].raw_value;
        parents[o] = nodes_[size_t(o)].parent;
        action_from_parent[o] = nodes_[size_t(o)].action;
        terminal[o] = nodes_[size_t(o)].terminal;
        const int32_t fe = nodes_[size_t(o)].first_edge, ne = nodes_[size_t(o)].num_edges;
        if (ne > 0) std::fill(children_prior_logits + oa, children_prior_logits + oa + A_, lowest);
        for (int32_t k = 0; k < ne; ++k) {
          const size_t e = size_t(eb + fe + k);
          const int64_t a = edge_action_[e];
          children_prior_logits[oa + a] = std::log(std::max(edges_[e].prior, FLT_MIN));
          const int32_t c = edges_[e].child;
          if (c < 0) continue;
          const size_t ci = size_t(nb + c);
          children_index[oa + a] = c;
          children_visits[oa + a] = nodes_[ci].visits;
          children_values[oa + a] = nodes_[ci].value;
          children_rewards[oa + a] = nodes_[ci].reward;
          children_discounts[oa + a] = nodes_[ci].discount;
        }
      }
    }
  });
}

void Forest::num_nodes(int32_t* out) const { std::copy(used_nodes_.begin(), used_nodes_.end(), out); }
void Forest::has_root(uint8_t* out) const { std::copy(has_root_.begin(), has_root_.end(), out); }

}  // namespace RLK_MCTS_ISA
}  // namespace mcts
}  // namespace rlk
