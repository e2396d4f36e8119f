// The GPU runtime the kernels are written against. With nvcc: CUDA. With GENESIS_HIP_CPU (g++, the emulated module
// genesis_ext._C_emu that the tests run): HIP-CPU, which executes the same kernels on the host, each GPU thread a
// fibre (docs/emulation.md). The .cu files use only the CUDA names below, and launch kernels only through launch().
#pragma once
#include <stdexcept>
#include <string>
#include <utility>

#ifdef GENESIS_HIP_CPU
#include <hip/hip_runtime.h>

#include <algorithm>

using cudaError_t = hipError_t;
using cudaStream_t = hipStream_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
inline const char* cudaGetErrorString(cudaError_t e) { return hipGetErrorString(e); }
inline cudaError_t cudaGetLastError() { return hipGetLastError(); }
inline cudaError_t cudaGetDevice(int* d) { return hipGetDevice(d); }
inline cudaError_t cudaSetDevice(int d) { return hipSetDevice(d); }
inline cudaError_t cudaGetDeviceCount(int* n) { return hipGetDeviceCount(n); }
inline cudaError_t cudaDeviceSynchronize() { return hipDeviceSynchronize(); }
// HIP-CPU has no driver and reports version 0: the host is the device, so there always is one.
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 1;
  return cudaSuccess;
}

namespace genesis::cuda {
using std::max;  // CUDA's built-in device min/max on integers
using std::min;
}  // namespace genesis::cuda
#else
#include <cuda_runtime.h>
#endif

namespace genesis::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("genesis_ext CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the scope and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// kernel<<<grid, block, 0, stream>>>(args...), for both back ends (HIP-CPU has no triple-chevron launch).
// HIP-CPU does not keep a stream's order: Runtime::wait_all_streams_ drains the null stream from two threads at once,
// so a kernel queued while the previous one runs can run beside it (measured: 852 of 3,000 fill-then-increment pairs
// out of order). Under HIP-CPU, launch() therefore waits for each kernel, which gives CUDA's stream order.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#ifdef GENESIS_HIP_CPU
  hipLaunchKernelGGL(kernel, grid, block, 0, stream, Params(std::forward<Args>(args))...);
  check(hipStreamSynchronize(stream), "HIP-CPU stream");
#else
  // clang-format off: in a .h file clang-format takes CUDA's <<< >>> for C++ and would split it
  kernel<<<grid, block, 0, stream>>>(Params(std::forward<Args>(args))...);
  // clang-format on
#endif
}

}  // namespace genesis::cuda
