// A persistent thread pool for CPU kernels that split independent rows.
#pragma once

#include <cstdint>
#include <functional>

namespace rlk {

// Number of threads parallel_for uses (the caller's thread included). Defaults to
// RLKERN_NUM_THREADS when set, else the machine's hardware concurrency.
int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at least
// `grain` items, so small inputs stay on the calling thread. A call made from inside a
// pool task, or while another thread is using the pool, runs serially on its own
// thread. The first exception thrown by fn is rethrown once all ranges are done.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace rlk
