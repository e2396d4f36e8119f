// Host-side interface of the CUDA library (compiled by nvcc into its own static library).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "../deform.h"

namespace genesis::cuda {

// Empty string when a CUDA driver and at least one device are usable, else why not.
std::string unavailable_reason();
int device_count();
// Waits for all work queued on `device` (the emulated module's tests read results on the host right after a call).
void synchronize(int device);

// Philox4x32-10 on the device: out[4*j .. 4*j+3] = philox(ctr[4*j ..], key[2*j ..]) for j < n.
// Pointers are device pointers; runs on `stream` (a cudaStream_t as an integer), never synchronises the host.
void philox_known_answers(const uint32_t* ctr, const uint32_t* key, uint32_t* out, int64_t n, int device,
                          uintptr_t stream);

// Bytes of device scratch deform_cuda needs for this call (per-sample parameters, Bézier tables, block geometry).
size_t scratch_bytes(Op op, int64_t batch, const Shape& sh, const DeformConfig& cfg);

// The CUDA twin of deform_cpu: same arguments and results, bit for bit. All pointers are device pointers on
// `device`; `scratch` holds at least scratch_bytes(...) bytes. Kernels are queued on `stream` (a cudaStream_t as an
// integer); the host is never synchronised and nothing is allocated.
void deform_cuda(Op op, const float* in, float* out, float* target, int64_t batch, int64_t channels, const Shape& sh,
                 uint64_t seed, uint64_t offset, const DeformConfig& cfg, void* scratch, size_t scratch_size,
                 int device, uintptr_t stream);

#ifdef GENESIS_HIP_CPU
// Emulation only (csrc/cuda/emulated.cpp): out[b * threads + t] = tag + b, written by thread 0 of block b and read
// by thread t, with or without a barrier between (host memory; waits for the kernel).
void barrier_probe(int32_t* out, int32_t blocks, int32_t threads, int32_t tag, bool barrier);
// Emulation only: `rounds` times, a fill kernel then an increment kernel on the same stream with a host pause between;
// returns how many rounds ended out of stream order (host memory of blocks * threads elements).
int32_t launch_order_probe(int32_t* out, int32_t blocks, int32_t threads, int32_t rounds);
#endif

}  // namespace genesis::cuda
