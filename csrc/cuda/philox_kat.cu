// Device side of the shared generator (the Philox known-answer kernel), and the runtime queries: availability,
// device count, synchronisation.
#include <string>

#include "../philox.h"
#include "deform_cuda.h"
#include "gpu_runtime.h"

namespace genesis::cuda {

namespace {

__global__ void philox_kernel(const uint32_t* ctr, const uint32_t* key, uint32_t* out, int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const U32x4 r =
      philox4x32_10(U32x4{{ctr[4 * j], ctr[4 * j + 1], ctr[4 * j + 2], ctr[4 * j + 3]}}, key[2 * j], key[2 * j + 1]);
  for (int i = 0; i < 4; ++i) out[4 * j + i] = r.v[i];
}

}  // namespace

std::string unavailable_reason() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) return "no CUDA driver is installed";
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string("CUDA driver error: ") + cudaGetErrorString(err);
  if (count == 0) return "no CUDA device is visible";
  return "";
}

int device_count() {
  int count = 0;
  if (unavailable_reason().empty()) cudaGetDeviceCount(&count);
  return count;
}

void philox_known_answers(const uint32_t* ctr, const uint32_t* key, uint32_t* out, int64_t n, int device,
                          uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(device);
  const int threads = 128;
  launch(philox_kernel, unsigned((n + threads - 1) / threads), threads, reinterpret_cast<cudaStream_t>(stream), ctr,
         key, out, n);
  check(cudaGetLastError(), "philox kernel launch");
}

void synchronize(int device) {
  DeviceGuard guard(device);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

}  // namespace genesis::cuda
