#pragma once
#include <cstdint>

#include "deform.h"

namespace genesis {

// Deform a contiguous float32 batch (batch, channels, *shape) into `out` (and the flipped input into `target` when
// non-null), sample n using global index offset + n. Inputs are read only.
void deform_cpu(Op op, const float* in, float* out, float* target, int64_t batch, int64_t channels, const Shape& sh,
                uint64_t seed, uint64_t offset, const DeformConfig& cfg, int num_threads);

}  // namespace genesis
