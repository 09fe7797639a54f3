// Definitions shared by every rlkern kernel, read by both the host compiler and nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RLK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RLK_HOST_DEVICE inline
#endif

namespace rlk {

// Pointers cross the Python boundary as integers: the core never links libtorch, so a
// tensor reaches C++ as (data_ptr, dtype code, sizes) validated on the Python side.
using ptr_t = std::uintptr_t;

template <class T>
RLK_HOST_DEVICE T* as_ptr(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace rlk
