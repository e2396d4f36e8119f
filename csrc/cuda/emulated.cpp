// The CUDA kernels as C++ for HIP-CPU (module _C_emu): the .cu sources themselves, unchanged, in one translation unit.
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

}  // namespace

void barrier_probe(int32_t* out, int32_t blocks, int32_t threads, int32_t tag, bool barrier) {
  launch(barrier_probe_kernel, unsigned(blocks), unsigned(threads), cudaStream_t{}, out, tag, barrier);
  check(cudaGetLastError(), "barrier probe launch");
  check(cudaDeviceSynchronize(), "barrier probe");
}

}  // namespace genesis::cuda
