#include <pybind11/pybind11.h>

#include <map>
#include <string>

#include "rlkern/memory.h"
#include "rlkern/parallel.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"

#ifndef RLKERN_VERSION
#define RLKERN_VERSION "0.0.0"
#endif

namespace py = pybind11;

#ifdef RLKERN_WITH_CUDA
namespace rlk::cuda {
int device_count();  // csrc/cuda/runtime.cu
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlkern compiled core: CPU kernels, CUDA kernels where nvcc was found, batched MCTS";
  m.attr("__version__") = RLKERN_VERSION;
#ifdef RLKERN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", &rlk::cuda::device_count,
        "CUDA devices visible to the compiled kernels (0 when no driver is present)");
#else
  m.attr("with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
  m.def("num_threads", &rlk::num_threads, "Threads used by the CPU kernels");
  m.def("set_num_threads", &rlk::set_num_threads, py::arg("n"),
        "Set the threads used by the CPU kernels (n <= 0 restores the default)");
  m.def("cpu_isa", [] { return rlk::simd::use_avx2() ? "avx2" : "baseline"; },
        "Which build of the vectorised CPU kernels runs: avx2 (AVX2+FMA) or baseline");
  m.def(
      "advise_huge_pages",
      [](std::uintptr_t address, std::size_t bytes) { rlk::advise_huge_pages(reinterpret_cast<void*>(address), bytes); },
      py::arg("address"), py::arg("bytes"),
      "Ask for transparent huge pages on the 2 MiB pages inside [address, address + bytes) (a hint)");

  std::map<std::string, py::module_> submodules;
  for (const auto& b : rlk::bindings()) {
    auto it = submodules.find(b.submodule);
    if (it == submodules.end()) it = submodules.emplace(b.submodule, m.def_submodule(b.submodule)).first;
    b.fn(it->second);
  }
}
