// Batched Monte-Carlo tree search: a Forest of B independent trees searched in lockstep.
//
// Every tree lives in preallocated struct-of-arrays pools addressed by int32 indices.
// A node is created when its edge is first expanded (node id = expansion order, root 0);
// it owns one contiguous slice of edges, one per legal action, in increasing action
// order. Per-child statistics (visits, value, the reward and discount of the incoming
// edge) live on the child node; an edge only holds its action, prior and child id.
//
// Semantics follow mctx (google-deepmind/mctx) muzero_policy and gumbel_muzero_policy;
// the deliberate differences are listed in python/rlkern/mcts/forest.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace rlk {
namespace mcts {

enum class Algorithm : int { kPuct = 0, kGumbel = 1 };

// Memory for the Forest's node and edge pools: blocks of 2 MiB and more are aligned to
// 2 MiB and, on Linux, offered to the kernel for transparent huge pages (where it runs
// them in madvise mode). A step touches a few scattered lines in every tree of the pool,
// which for 256 trees of 362 actions spans about 110 MB, tens of thousands of 4 KiB
// pages: with huge pages that search ran about 20% faster.
void* pool_allocate(size_t bytes);
void pool_free(void* p, size_t bytes);

template <typename T>
struct PoolAllocator {
  using value_type = T;
  PoolAllocator() = default;
  template <typename U>
  PoolAllocator(const PoolAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(pool_allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { pool_free(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const PoolAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const PoolAllocator<U>&) const { return false; }
};
template <typename T>
using PoolVector = std::vector<T, PoolAllocator<T>>;

struct Config {
  Algorithm algorithm = Algorithm::kPuct;
  float c1 = 1.25f;
  float c2 = 19652.0f;
  float dirichlet_alpha = 0.3f;
  float dirichlet_fraction = 0.25f;
  int max_considered_actions = 16;
  float gumbel_scale = 1.0f;
  float maxvisit_init = 50.0f;
  float value_scale = 0.1f;
  bool rescale_values = true;
  bool use_mixed_value = true;
  float temperature = 1.0f;
  int max_depth = 0;  // <= 0: unlimited
  uint64_t seed = 0;
  int num_threads = 0;  // <= 0: the global pool size
};

// mctx seq_halving.get_sequence_of_considered_visits(m, n).
std::vector<int32_t> considered_visit_sequence(int max_considered, int num_simulations);

// A counter-based generator: the stream of draws is a pure function of
// (seed, tree, epoch, draw index), so results never depend on thread scheduling.
struct CounterRng {
  uint64_t key;
  uint64_t counter = 0;
  CounterRng(uint64_t seed, uint64_t tree, uint64_t epoch);
  uint64_t next_u64();
  double uniform_open();  // in (0, 1)
  double normal();
  double gamma(double alpha);  // Gamma(alpha, 1)
  double gumbel();
};

// On x86-64 the Forest is compiled twice, from the same source: for any x86-64 CPU
// (forest.cpp, namespace isa_default) and for AVX2 machines (forest_avx2.cpp, namespace
// isa_avx2). AVX2's three-operand encoding and blends do the same work in about 10% fewer
// instructions, and without FMA every operation rounds as it does under SSE, so the two
// give the same results bit for bit. The Python wrapper picks one at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && !defined(_MSC_VER)
#define RLK_MCTS_HAS_AVX2 1
#else
#define RLK_MCTS_HAS_AVX2 0
#endif

namespace isa_default {
#include "rlkern/mcts_forest.inc"
}  // namespace isa_default
#if RLK_MCTS_HAS_AVX2
namespace isa_avx2 {
#include "rlkern/mcts_forest.inc"
}  // namespace isa_avx2
#endif

}  // namespace mcts
}  // namespace rlk
