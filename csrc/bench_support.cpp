// Peak resident memory of the process while a benchmarked call runs. A sampling thread
// in C++ keeps reading /proc/self/statm while the call holds (or has released) the GIL,
// which a Python thread could not do reliably.
#include <pybind11/pybind11.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include "rlkern/registry.h"

namespace py = pybind11;

namespace {

int64_t current_rss_bytes() {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return -1;
  const int got = std::fscanf(f, "%ld %ld", &pages, &resident);
  std::fclose(f);
  if (got != 2) return -1;
  return int64_t(resident) * int64_t(sysconf(_SC_PAGESIZE));
}

class RssSampler {
 public:
  void start(double interval_us) {
    stop();
    running_ = true;
    peak_ = current_rss_bytes();
    thread_ = std::thread([this, interval_us] {
      const auto dt = std::chrono::duration<double, std::micro>(interval_us);
      while (running_.load()) {
        const int64_t rss = current_rss_bytes();
        int64_t p = peak_.load();
        while (rss > p && !peak_.compare_exchange_weak(p, rss)) {
        }
        std::this_thread::sleep_for(dt);
      }
    });
  }
  int64_t stop() {
    if (thread_.joinable()) {
      running_ = false;
      thread_.join();
    }
    const int64_t rss = current_rss_bytes();
    return rss > peak_.load() ? rss : peak_.load();
  }
  ~RssSampler() { stop(); }

 private:
  std::atomic<bool> running_{false};
  std::atomic<int64_t> peak_{0};
  std::thread thread_;
};

void bind(py::module_& m) {
  m.def("current_rss", &current_rss_bytes, "Resident set size of this process in bytes (-1 if unknown)");
  py::class_<RssSampler>(m, "RssSampler")
      .def(py::init<>())
      .def("start", &RssSampler::start, py::arg("interval_us") = 200.0)
      .def("stop", &RssSampler::stop, py::call_guard<py::gil_scoped_release>(),
           "Stop sampling and return the peak resident size seen, in bytes");
}

}  // namespace

RLK_REGISTER_BINDINGS(bench, bind);
