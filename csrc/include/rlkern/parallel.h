// A persistent thread pool for CPU kernels that split independent rows.
#pragma once

#include <cstdint>
#include <functional>

namespace rlk {

// Number of threads parallel_for uses (the caller's thread included). Defaults to
// RLKERN_NUM_THREADS when set (a positive integer; capped at max_threads(), anything
// else ignored), else the machine's hardware concurrency. When the system refuses to
// start a thread, the pool runs with those it could start and num_threads() says so.
int num_threads();
// n <= 0 restores the default; n > max_threads() is capped. The pool starts lazily.
void set_num_threads(int n);
// set_num_threads, then starts the pool now; returns the threads actually running.
int start_threads(int n);
// The most threads the pool runs: 4 per hardware thread, at least 8. More only
// oversubscribe the cores (the kernels split rows, not waits on I/O).
int max_threads();

// Which threads run a parallel_for. kShared: the process's OpenMP team (torch's) when one
// is loaded and its thread count is rlkern's, else rlkern's own pool; torch's workers spin
// for a while after each of its ops, and a second pool would compete with them for the
// cores. kOwn: always rlkern's pool, for short calls in a tight loop with no torch op
// between them (the MCTS steps): OpenMP's end-of-region barrier waits for every thread of
// the team, one the OS has not scheduled yet included, where our pool waits only for the
// work.
enum class Team { kShared, kOwn };

// Calls fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at least
// `grain` items, so small inputs stay on the calling thread. A call made from inside a
// pool task, or while another thread is using the pool, runs serially on its own
// thread. The first exception thrown by fn is rethrown once all ranges are done. The
// ranges, and so the results, do not depend on the team.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn,
                  Team team = Team::kShared);

}  // namespace rlk
