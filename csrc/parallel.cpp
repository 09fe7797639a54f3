#include "rlkern/parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace rlk {
namespace {

thread_local bool in_pool_task = false;

int default_threads() {
  if (const char* env = std::getenv("RLKERN_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

class Pool {
 public:
  explicit Pool(int threads) : size_(threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // Returns false (having done nothing) when another caller holds the pool.
  bool try_run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      fn_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0);
      error_ = nullptr;
      active_ = int(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(m_);
    done_cv_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void drain() {
    in_pool_task = true;
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_);
      if (begin >= n_) break;
      try {
        (*fn_)(begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
    in_pool_task = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(m_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex m_, busy_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex pool_mutex;
std::shared_ptr<Pool> pool;
pid_t pool_pid = 0;
int requested_threads = 0;

std::shared_ptr<Pool> get_pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (requested_threads <= 0) requested_threads = default_threads();
  if (pool && pool_pid != getpid()) {
    // After fork() the workers do not exist in the child; the old pool cannot be
    // joined or destroyed safely there, so it is abandoned.
    new std::shared_ptr<Pool>(pool);
    pool.reset();
  }
  if (!pool || pool->size() != requested_threads) {
    pool = std::make_shared<Pool>(requested_threads);
    pool_pid = getpid();
  }
  return pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (requested_threads <= 0) requested_threads = default_threads();
  return requested_threads;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  requested_threads = n > 0 ? n : default_threads();
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = num_threads();
  if (in_pool_task || threads <= 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance rows of unequal cost without much queueing.
  const int64_t tasks = std::min<int64_t>((n + grain - 1) / grain, int64_t(threads) * 4);
  const int64_t chunk = (n + tasks - 1) / tasks;
  auto p = get_pool();
  if (!p->try_run(n, chunk, fn)) fn(0, n);
}

}  // namespace rlk
