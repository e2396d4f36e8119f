// Host-side interface of the CUDA library (compiled by nvcc into its own static library).
#pragma once
#include <cstdint>
#include <string>

namespace genesis::cuda {

// Empty string when a CUDA driver and at least one device are usable, else why not.
std::string unavailable_reason();
int device_count();

// Philox4x32-10 on the device: out[4*j .. 4*j+3] = philox(ctr[4*j ..], key[2*j ..]) for j < n.
// Pointers are device pointers; runs on `stream` (a cudaStream_t as an integer), never synchronises the host.
void philox_known_answers(const uint32_t* ctr, const uint32_t* key, uint32_t* out, int64_t n, int device,
                          uintptr_t stream);

}  // namespace genesis::cuda
