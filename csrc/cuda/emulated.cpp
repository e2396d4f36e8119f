// The CUDA kernels as C++ for HIP-CPU (module _C_emu): the .cu sources themselves, unchanged, in one translation unit.
#include <algorithm>
#include <chrono>
#include <thread>

#include "deform_cuda.cu"
#include "philox_kat.cu"

namespace genesis::cuda {

namespace {

// Thread 0 writes a shared word that every thread then reads, with or without the barrier between: the test that
// the reversed fibre order (HIP_CPU_REVERSE_THREADS=1) exposes a missing __syncthreads().
__global__ void barrier_probe_kernel(int32_t* out, int32_t tag, bool barrier) {
  __shared__ int32_t word;
  if (threadIdx.x == 0) word = tag + int32_t(blockIdx.x);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = word;
}

// The launch-order probe: fill writes tag, increment adds one; in stream order every element ends at tag + 1.
__global__ void fill_kernel(int32_t* out, int32_t tag) { out[blockIdx.x * blockDim.x + threadIdx.x] = tag; }
__global__ void increment_kernel(int32_t* out) { out[blockIdx.x * blockDim.x + threadIdx.x] += 1; }

}  // namespace

int32_t launch_order_probe(int32_t* out, int32_t blocks, int32_t threads, int32_t rounds) {
  int32_t out_of_order = 0;
  for (int32_t r = 0; r < rounds; ++r) {
    launch(fill_kernel, unsigned(blocks), unsigned(threads), cudaStream_t{}, out, r);
    std::this_thread::sleep_for(std::chrono::microseconds(r % 97));  // the host pause that exposed HIP-CPU's race
    launch(increment_kernel, unsigned(blocks), unsigned(threads), cudaStream_t{}, out);
    check(cudaDeviceSynchronize(), "launch order probe");
    out_of_order += std::count_if(out, out + blocks * threads, [r](int32_t v) { return v != r + 1; }) > 0;
  }
  return out_of_order;
}

void barrier_probe(int32_t* out, int32_t blocks, int32_t threads, int32_t tag, bool barrier) {
  launch(barrier_probe_kernel, unsigned(blocks), unsigned(threads), cudaStream_t{}, out, tag, barrier);
  check(cudaGetLastError(), "barrier probe launch");
  check(cudaDeviceSynchronize(), "barrier probe");
}

}  // namespace genesis::cuda
