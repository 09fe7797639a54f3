#include "rlkern/parallel.h"

#include <pybind11/pybind11.h>
#include <unistd.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

#include <algorithm>
#include <cerrno>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "rlkern/registry.h"

namespace rlk {
namespace {

thread_local bool in_pool_task = false;

int hardware_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(std::min<unsigned>(hw, 1u << 16));
}

// RLKERN_NUM_THREADS: a positive decimal integer (surrounding blanks allowed). Larger
// than max_threads() is capped; anything else (empty, negative, zero, not a number,
// out of range) falls back to the hardware count. rlkern._info warns about both at import.
// Returns 0 for a fallback, else the value capped to `cap`.
int parse_env_threads(const char* env, int cap) {
  if (env == nullptr) return 0;
  errno = 0;
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  if (end == env) return 0;
  while (*end == ' ' || *end == '\t' || *end == '\n') ++end;
  if (*end != '\0' || n <= 0) return 0;
  if (errno == ERANGE || n > cap) return cap;
  return int(n);
}

int default_threads() {
  const int n = parse_env_threads(std::getenv("RLKERN_NUM_THREADS"), max_threads());
  return n > 0 ? n : hardware_threads();
}

// Spins for a while before sleeping. Batched MCTS and the loss kernels call the pool
// every few tens of microseconds; waking a thread sleeping on a condition variable costs
// about as much as that whole step on a small VM, so a worker that has just finished keeps
// polling for the next task for spin_ns before it blocks.
int64_t default_spin_ns() {
  if (const char* env = std::getenv("RLKERN_SPIN_US")) {
    const long us = std::atol(env);
    if (us >= 0) return int64_t(us) * 1000;
  }
  return 200 * 1000;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Polls `ready` until it returns true or spin_ns pass; true when it became ready.
template <class Ready>
bool spin_until(Ready ready, int64_t spin_ns) {
  if (spin_ns <= 0) return ready();
  const int64_t deadline = now_ns() + spin_ns;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 255) == 0) {
      if (now_ns() > deadline) return ready();
      // Hands the core over when another thread (torch's, or the caller's) wants it.
      std::this_thread::yield();
    }
  }
}

// A task is split into chunks that threads claim one at a time. The caller waits for its
// chunks to be done, never for the workers themselves: a worker the OS has not scheduled
// yet (the machine is busy) simply finds nothing left to claim, instead of holding the
// caller until it runs.
class Pool {
 public:
  // Starts up to threads - 1 workers. When the system refuses one (thread or memory
  // limits), the pool keeps those it has and size() says how many: a constructor that
  // threw would destroy the condition variables under the waiting workers (a hang in
  // pthread_cond_destroy) or joinable threads (std::terminate).
  explicit Pool(int threads) : spin_ns_(default_spin_ns()) {
    try {
      workers_.reserve(size_t(std::max(threads - 1, 0)));
      for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {
    }
    size_ = int(workers_.size()) + 1;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // Returns false (having done nothing) when another caller holds the pool.
  bool try_run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    chunk = std::max(chunk, (n + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = (n + chunk - 1) / chunk;
    fn_.store(&fn, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    chunk_.store(chunk, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    // Publishes the task: a thread whose claim succeeds reads the fields written above.
    claim_.store((++task_ << 32) | (uint64_t(chunks) << 16), std::memory_order_release);
    // seq_cst pairs with the sleepers_ increment in worker_loop: either the worker sees
    // the new generation before it sleeps, or this thread sees it asleep and wakes it.
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(m_);
      cv_.notify_all();
    }
    run_chunks();
    auto finished = [&] { return done_.load(std::memory_order_acquire) == chunks; };
    if (!spin_until(finished, spin_ns_)) {
      std::unique_lock<std::mutex> lock(m_);
      done_cv_.wait(lock, finished);
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  // Claims and runs chunks of the current task until none is left. claim_ packs the task
  // id (bits 32-63), its number of chunks (16-31) and the next chunk to claim (0-15), so
  // one compare-and-swap checks that the task is still the one seen and has a chunk left:
  // a thread with a stale view fails its claim instead of running a chunk of another
  // task. The other fields are read only after a successful claim, and the caller does
  // not start its next task before every claimed chunk is done.
  void run_chunks() {
    uint64_t c = claim_.load(std::memory_order_acquire);
    const uint64_t id = c >> 32;
    for (;;) {
      const int64_t next = int64_t(c & 0xffffu), chunks = int64_t((c >> 16) & 0xffffu);
      if ((c >> 32) != id || next >= chunks) return;
      if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t chunk = chunk_.load(std::memory_order_relaxed);
      const int64_t begin = next * chunk;
      in_pool_task = true;
      try {
        (*fn_.load(std::memory_order_relaxed))(begin, std::min(n_.load(std::memory_order_relaxed), begin + chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
      }
      in_pool_task = false;
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(m_);
        done_cv_.notify_one();
        return;
      }
      c = claim_.load(std::memory_order_acquire);
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      auto ready = [&] { return stop_.load() || generation_.load() != seen; };
      if (!spin_until(ready, spin_ns_)) {
        std::unique_lock<std::mutex> lock(m_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, ready);
        sleepers_.fetch_sub(1);
      }
      if (stop_.load()) return;
      seen = generation_.load();
      run_chunks();
    }
  }

  int size_ = 1;
  const int64_t spin_ns_;
  std::vector<std::thread> workers_;
  std::mutex m_, busy_;
  std::condition_variable cv_, done_cv_;
  static constexpr int64_t kMaxChunks = 0xffff;
  // The current task, written by the caller before it publishes claim_ (atomics because a
  // late thread may still be loading claim_ while the next task is being written).
  std::atomic<const std::function<void(int64_t, int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0}, chunk_{1};
  uint64_t task_ = 0;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::exception_ptr error_;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

// ---- torch's OpenMP runtime as the pool ------------------------------------------------
//
// torch's CPU ops run on an OpenMP team whose workers keep spinning for a while after each
// op. A second pool of our own then competes with them for the same cores: on 2 cores, a
// loss kernel right after a torch reduction ran 1.7x slower than with OMP_WAIT_POLICY=PASSIVE.
// When the process has an OpenMP runtime loaded (torch's libgomp, found among the loaded
// objects, never loaded by us) and rlkern uses as many threads as it, the kernels run on
// that team instead: its spinning workers take our chunks at once. Anything else (no
// OpenMP, different thread counts, a forked child, RLKERN_POOL=own) keeps our own pool.

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpGetMaxThreads = int (*)();

struct OpenMp {
  GompParallel parallel = nullptr;
  OmpGetMaxThreads max_threads = nullptr;
  std::string library;
  void* handle = nullptr;
};

// The process that loaded this module: a child forked after import keeps our own pool
// (an OpenMP team inherited through fork() is not usable there).
const pid_t load_pid = getpid();

#if defined(__linux__)
int find_openmp(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const std::string path(name);
  const std::string base = path.substr(path.find_last_of('/') + 1);
  if (base.rfind("libgomp", 0) != 0 && base.rfind("libomp", 0) != 0 && base.rfind("libiomp5", 0) != 0) return 0;
  // RTLD_NOLOAD: a handle to the copy already loaded, or nothing; never a new copy
  void* handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  auto* found = static_cast<OpenMp*>(data);
  OpenMp r;
  r.parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  r.max_threads = reinterpret_cast<OmpGetMaxThreads>(dlsym(handle, "omp_get_max_threads"));
  // torch's own copy wins over another package's (several can be loaded at once)
  const bool torchs = path.find("torch") != std::string::npos;
  if (r.parallel == nullptr || r.max_threads == nullptr || (found->parallel != nullptr && !torchs)) {
    dlclose(handle);
    return 0;
  }
  if (found->parallel != nullptr) dlclose(found->handle);
  r.library = path;
  r.handle = handle;  // stays open: the runtime must outlive our calls
  *found = r;
  return torchs ? 1 : 0;
}
#endif

bool own_pool_forced() {
  const char* env = std::getenv("RLKERN_POOL");
  return env != nullptr && std::string(env) == "own";
}

// Looked up once, at the first parallel call (rlkern imports torch before any kernel runs).
const OpenMp& openmp() {
  static const OpenMp found = [] {
    OpenMp r;
#if defined(__linux__)
    if (!own_pool_forced()) dl_iterate_phdr(find_openmp, &r);
#endif
    return r;
  }();
  return found;
}

struct OmpTask {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::mutex m;
  std::exception_ptr error;
};

// Runs on every thread of the OpenMP team (the caller is one of them): claims chunks
// until none is left, so a worker the OS has not scheduled simply finds nothing to do.
void omp_body(void* data) {
  auto* task = static_cast<OmpTask*>(data);
  const bool outer = in_pool_task;
  in_pool_task = true;
  for (int64_t c; (c = task->next.fetch_add(1, std::memory_order_relaxed)) < task->chunks;) {
    const int64_t begin = c * task->chunk;
    try {
      (*task->fn)(begin, std::min(task->n, begin + task->chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(task->m);
      if (!task->error) task->error = std::current_exception();
    }
  }
  in_pool_task = outer;
}

// Whether this call can go to the OpenMP team: one is loaded, we are in the process that
// imported us, and the calling thread's OpenMP thread count is ours (so the team has the
// threads already, or torch would start them as well).
bool use_openmp(int threads) {
  const OpenMp& omp = openmp();
  return omp.parallel != nullptr && getpid() == load_pid && omp.max_threads() == threads;
}

std::mutex pool_mutex;
std::shared_ptr<Pool> pool;
pid_t pool_pid = 0;
int requested_threads = 0;

// With pool_mutex held. A pool that could not start every thread asked for lowers the
// count to what it has, so that the next call does not try again (and fail again).
std::shared_ptr<Pool> get_pool_locked() {
  if (requested_threads <= 0) requested_threads = default_threads();
  if (pool && pool_pid != getpid()) {
    // After fork() the workers do not exist in the child; the old pool cannot be
    // joined or destroyed safely there, so it is abandoned.
    new std::shared_ptr<Pool>(pool);
    pool.reset();
  }
  if (!pool || pool->size() != requested_threads) {
    pool.reset();  // the old workers end before new ones start: never both sets at once
    try {
      pool = std::make_shared<Pool>(requested_threads);
    } catch (...) {  // not even the pool object: run on the calling thread alone
      requested_threads = 1;
      return nullptr;
    }
    pool_pid = getpid();
    requested_threads = pool->size();
  }
  return pool;
}

std::shared_ptr<Pool> get_pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return get_pool_locked();
}

void bind(pybind11::module_& m) {
  m.def("max_threads", &max_threads);
  m.def("hardware_threads", &hardware_threads);
  m.def(
      "env_threads", [](const std::string& value) { return parse_env_threads(value.c_str(), max_threads()); },
      pybind11::arg("value"));
  m.def("start", &start_threads, pybind11::arg("n"));
  m.def(
      "backend",
      [] {
        return use_openmp(num_threads()) ? "openmp (" + openmp().library + ")" : std::string("rlkern");
      },
      "The pool the next parallel kernel call from this thread runs on: the process's OpenMP team (torch's) "
      "when one is loaded and its thread count is rlkern's, else rlkern's own.");
}

}  // namespace

int max_threads() { return std::max(4 * hardware_threads(), 8); }

int num_threads() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (requested_threads <= 0) requested_threads = default_threads();
  return requested_threads;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  requested_threads = n > 0 ? std::min(n, max_threads()) : default_threads();
}

int start_threads(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  requested_threads = n > 0 ? std::min(n, max_threads()) : default_threads();
  if (requested_threads > 1) get_pool_locked();
  return requested_threads;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn, Team team) {
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
  if (team == Team::kShared && use_openmp(threads)) {
    OmpTask task;
    task.fn = &fn;
    task.n = n;
    task.chunk = chunk;
    task.chunks = (n + chunk - 1) / chunk;
    openmp().parallel(omp_body, &task, unsigned(threads), 0);
    if (task.error) std::rethrow_exception(task.error);
    return;
  }
  auto p = get_pool();
  if (!p || !p->try_run(n, chunk, fn)) fn(0, n);
}

}  // namespace rlk

RLK_REGISTER_BINDINGS(threads, rlk::bind);
