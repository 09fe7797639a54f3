#include <cuda_runtime.h>

namespace rlk::cuda {

// Probing never throws: a wheel built with CUDA must import where no driver exists.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace rlk::cuda
