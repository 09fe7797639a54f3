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

class Forest {
 public:
  Forest(int64_t batch_size, int64_t num_actions, int64_t max_nodes, int64_t max_edges, const Config& config);

  int64_t batch_size() const { return B_; }
  int64_t num_actions() const { return A_; }
  int64_t max_nodes() const { return N_; }
  int64_t max_edges() const { return E_; }
  const Config& config() const { return cfg_; }

  // Sets the number of simulations the Gumbel root schedule (sequential halving) plans for.
  void plan(int num_simulations);
  int planned_simulations() const { return table_sims_; }

  // logits [B,A] f32, value [B] f32, legal [B,A] u8 or null, rows [B] u8 or null (which trees to reset).
  void set_roots(const float* logits, const float* value, const uint8_t* legal, const uint8_t* rows);

  // One simulation per tree with a root. Writes leaves (tree, parent, action, node) into the
  // four [B] int64 outputs and returns their number L; trees whose simulation ended at an
  // existing node (terminal, max_depth, full pool) were backed up already and have no leaf.
  int64_t select(int64_t* tree, int64_t* parent, int64_t* action, int64_t* node);

  // Rows follow the order of the last select(). legal [L,A] u8 or null, terminal [L] u8 or null.
  void expand_backup(int64_t num_leaves, const float* logits, const float* value, const float* reward,
                     const float* discount, const uint8_t* legal, const uint8_t* terminal);

  // expand_backup() for the leaves of the last select(), then select() (both as documented
  // there), in one pass over the trees. Returns the new number of leaves.
  int64_t expand_select(int64_t num_leaves, const float* logits, const float* value, const float* reward,
                        const float* discount, const uint8_t* legal, const uint8_t* terminal, int64_t* tree,
                        int64_t* parent, int64_t* action, int64_t* node);

  // action [B] i64, weights [B,A] f32, visits [B,A] i32, q [B,A] f32, root_value [B] f32.
  void result(float temperature, int64_t* action, float* weights, int32_t* visits, float* q, float* root_value);

  // actions [B] i64 (negative: leave that tree untouched); old_to_new [B,N] i64 out.
  void advance(const int64_t* actions, int64_t* old_to_new);

  // mctx Tree layout. node arrays [B,N], child arrays [B,N,A].
  void export_tree(int32_t* node_visits, float* node_values, float* raw_values, int32_t* parents,
                   int32_t* action_from_parent, uint8_t* terminal, int32_t* children_index,
                   int32_t* children_visits, float* children_values, float* children_rewards,
                   float* children_discounts, float* children_prior_logits) const;

  int64_t num_pending() const { return num_pending_; }
  // Forgets the leaves of the last select(): their simulations never happened (select()
  // changes no statistics for a leaf it returns).
  void discard_pending();
  void num_nodes(int32_t* out) const;
  void has_root(uint8_t* out) const;

 public:
  // One edge: the statistics of its child (updated with the child's own), its prior and
  // its child's id, in one 16-byte record, so a node reads everything selection needs
  // about its children from one contiguous run.
  struct Edge {
    int32_t visits;  // 0: not expanded
    float q;         // reward + discount * value of the child
    float prior;
    int32_t child;   // -1: not expanded
  };
  struct Child {
    int32_t edge;
    int32_t visits;
    float q;
    float prior;
  };

 private:
  struct Completed;  // completed-Q summary of one node (Gumbel)

  // Selection for trees [begin, end) (at most kGroup of them), descending in lockstep: one
  // level of every tree per round, with the memory the next round reads requested a round
  // ahead (see select_group in forest.cpp).
  void select_group(int64_t begin, int64_t end, std::vector<Child>& buf);
  // One level of tree b's selection at node x, `depth` edges below the root: true (x moved to
  // the selected child, depth increased) while the descent goes on.
  bool descend(int64_t b, int32_t& x, int32_t& depth, std::vector<Child>& buf);
  void prefetch_tree(int64_t b) const;
  void prefetch_node(int64_t b, int32_t x) const;
  void prefetch_expansion(int64_t b) const;
  void check_can_select() const;
  int64_t collect_leaves(int64_t* tree, int64_t* parent, int64_t* action, int64_t* node);
  // Throws, naming the first bad row, when a row of an expansion breaks the NaN policy.
  void check_rows(int64_t L, const float* logits, const float* value, const float* reward, const float* discount,
                  const uint8_t* legal, const uint8_t* terminal) const;
  // scratch: A floats of the calling thread's.
  void expand_row(int64_t i, int64_t b, const float* logits, const float* value, const float* reward,
                  const float* discount, const uint8_t* legal, const uint8_t* terminal, float* scratch);
  void init_root(int64_t b, const float* logits, float value, const uint8_t* legal, float* scratch, CounterRng& rng);
  void prepare_root_noise(int64_t b, CounterRng& rng);
  // Writes the legal actions and their softmax priors as fresh (unexpanded) edges of tree b
  // from offset fe; returns their number (best and total: see legal_softmax). scratch: A
  // floats of the calling thread's.
  int32_t fill_edges(int64_t b, int32_t fe, const float* logits, const uint8_t* legal, float* scratch, int32_t* best,
                     float* total);
  int32_t select_edge(int64_t b, int32_t x, int depth, std::vector<Child>& buf) const;
  int32_t score_edge(int64_t b, int32_t x, int depth, std::vector<Child>& buf) const;
  // Whether backing up pending row i would make a value non-finite anywhere on its path.
  bool path_overflows(int64_t i, const float* value, const float* reward, const float* discount,
                      const uint8_t* terminal) const;
  int32_t puct_edge(int64_t b, int32_t x, std::vector<Child>& buf) const;
  int32_t gumbel_root_edge(int64_t b, std::vector<Child>& buf) const;
  int32_t gumbel_interior_edge(int64_t b, int32_t x, std::vector<Child>& buf) const;
  void completed(int64_t b, int32_t x, std::vector<Child>& buf, Completed& out) const;
  void backup(int64_t b, int32_t x, float leaf_value);
  void revisit(int64_t b, int32_t x);
  void for_trees(int64_t grain, const std::function<void(int64_t, int64_t)>& fn) const;
  // Rows per chunk for a per-simulation kernel over n rows: at least min_grain, and one
  // chunk per thread. The caller claims the first chunk, so a tree tends to stay on the
  // same core from step to step and its nodes in that core's cache (finer chunks, claimed
  // in varying order, measured slower); a late thread's chunk goes to whoever is free.
  int64_t step_grain(int64_t n, int64_t min_grain) const;
  void link_child(int64_t b, int32_t x, int32_t slot);  // records x's new child on edge offset slot
  void sync_edge(int64_t b, int32_t x);  // copies x's statistics to its incoming edge
  void recompute_best_unexpanded(int64_t b, int32_t x);
  void recompute_root_best(int64_t b);

  int64_t B_, A_, N_, E_;
  Config cfg_;

  // Node pool [B*N]. Everything a simulation reads or writes at a node sits in one
  // 64-byte record (one cache line): with one array per field, a step over a large
  // forest paid a cache miss per field per node.
  // slot is the node's edge offset in its parent's slice, in_edge the offset of its
  // incoming edge in the tree's edge pool. Selection reads the expanded children of a
  // node through kids_: in edge order for a node with up to 48 edges, newest first for
  // larger ones. best_unexp caches the offset of the highest-prior
  // unexpanded edge (-1: none) and unexp_prior the prior mass of the unexpanded edges.
  struct alignas(64) Node {
    int32_t visits;
    float value;     // mean of the backed-up returns, from this node's mover's view
    float reward;    // of the edge into this node
    float discount;  // of the edge into this node
    float raw_value;
    float unexp_prior;
    int32_t parent, action, first_edge, num_edges, slot, num_kids, best_unexp, in_edge;
    uint8_t terminal;
  };
  PoolVector<Node> nodes_;
  // Edge pools [B*E].
  PoolVector<Edge> edges_;
  PoolVector<int32_t> edge_action_;
  // kids_[first_edge + j], j < num_kids: the edge offsets of the expanded children of a
  // node, sorted for a node with up to 48 edges, in expansion order for larger ones.
  PoolVector<int32_t> kids_;
  // Per tree.
  std::vector<int32_t> used_nodes_, used_edges_;
  std::vector<uint8_t> has_root_;
  std::vector<uint8_t> tame_;               // [B], see kTame in forest.cpp
  std::vector<float> root_score_;           // [B*A] gumbel + log prior, aligned with the root's edges
  std::vector<float> root_log_prior_;       // [B*A] log max(prior, FLT_MIN) of the root's edges (for result())
  std::vector<float> root_open_score_;      // [B*A] root_score_ on unexpanded root edges, -inf on expanded ones
  std::vector<int32_t> root_visits_;        // [B*A], root child visits in the current search
  std::vector<int32_t> root_sims_;          // [B], simulations through a root child in this search
  std::vector<int32_t> root_best_;          // [B], unexpanded root edge with the highest score
  // Pending expansions from the last select().
  std::vector<int32_t> pend_parent_, pend_edge_, pend_tree_;
  std::vector<int32_t> pend_row_;  // [B], the leaf row of a tree with a pending leaf
  std::vector<int32_t> pend_action_;  // [B], the action of the pending leaf's edge
  std::vector<int32_t> iota_;         // [A]: 0, 1, 2, ..., the actions of an unmasked row
  // The nodes and chosen edge offsets of each tree's last selection, root first, up to
  // kPathCap levels: the expansion requests them ahead of its backup.
  static constexpr int kPathCap = 12;
  struct PathStep {
    int32_t node, edge;  // the node and the offset of the edge selected there
  };
  std::vector<PathStep> path_;         // [B * kPathCap]
  std::vector<int32_t> path_len_;      // [B]
  int64_t num_pending_ = 0;
  // Sequential halving table [(m+1) * table_sims_].
  std::vector<int32_t> table_;
  int table_sims_ = 0;
  uint64_t epoch_ = 0;
};

}  // namespace mcts
}  // namespace rlk
