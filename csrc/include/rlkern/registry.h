// Each kernel family registers its bindings from its own source file, so adding a
// family never edits bindings.cpp: a static Registrar adds a function that fills a
// submodule of rlkern._C.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace rlk {

using BindFn = void (*)(pybind11::module_&);

struct Binding {
  const char* submodule;
  BindFn fn;
};

inline std::vector<Binding>& bindings() {
  static std::vector<Binding> all;
  return all;
}

struct Registrar {
  Registrar(const char* submodule, BindFn fn) { bindings().push_back({submodule, fn}); }
};

}  // namespace rlk

#define RLK_CONCAT_INNER(a, b) a##b
#define RLK_CONCAT(a, b) RLK_CONCAT_INNER(a, b)
// RLK_REGISTER_BINDINGS(returns, fn) adds fn's definitions to rlkern._C.returns.
#define RLK_REGISTER_BINDINGS(submodule, fn) \
  static ::rlk::Registrar RLK_CONCAT(rlk_registrar_, __LINE__)(#submodule, fn)
