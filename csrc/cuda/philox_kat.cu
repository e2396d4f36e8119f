// Device side of the shared generator: known-answer kernel, and a device instantiation of every shared header so
// that nvcc checks all __host__ __device__ code even before the deformation kernels use it.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../bezier.h"
#include "../deform.h"
#include "deform_cuda.h"

namespace genesis::cuda {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("genesis_ext CUDA: ") + what + ": " +
                                                   cudaGetErrorString(err));
}

__global__ void philox_kernel(const uint32_t* ctr, const uint32_t* key, uint32_t* out, int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const U32x4 r = philox4x32_10(U32x4{{ctr[4 * j], ctr[4 * j + 1], ctr[4 * j + 2], ctr[4 * j + 3]}}, key[2 * j],
                                key[2 * j + 1]);
  for (int i = 0; i < 4; ++i) out[4 * j + i] = r.v[i];
}

// Not launched (hence the suppressed 'never referenced' warning): instantiates the per-sample and per-voxel shared code for the device compiler.
#pragma nv_diag_suppress 177
__global__ void shared_code_kernel(const double* cfg_vec, int64_t batch, Shape sh, uint64_t seed, uint64_t offset,
                                   SampleParams* params, float* values) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= batch) return;
  const DeformConfig cfg = DeformConfig::from_vector(cfg_vec);
  const SampleParams p = derive_params(seed, offset + n, cfg, sh);
  params[n] = p;
  Stream st(seed, offset + n, BLOCK, 0);
  const Box b = shuffle_block(st, cfg, sh);
  int32_t perm[8];
  block_permutation(seed, offset + n, 0, perm, b.volume() < 8 ? b.volume() : 8);
  BezierTable t;
  for (int j = 0; j < 4; ++j) t.ctrl[j] = p.ctrl[j];
  t.increasing = p.increasing;
  bezier_cell(t, 0);
  const Plan plan = plan_for(PAIR, p);
  Span spans[kMaxParts + 1];
  values[n] = noise_spans(plan, p, 0, 0, sh.s[2], spans) > 0 ? noise_value(seed, offset + n, perm[0])
                                                             : bezier_apply(t, values[n]);
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
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(device), "cudaSetDevice");
  const int threads = 128;
  philox_kernel<<<unsigned((n + threads - 1) / threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      ctr, key, out, n);
  const cudaError_t launched = cudaGetLastError();
  check(cudaSetDevice(previous), "cudaSetDevice");  // leave the caller's current device as it was
  check(launched, "philox kernel launch");
}

}  // namespace genesis::cuda
