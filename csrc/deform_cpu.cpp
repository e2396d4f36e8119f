// CPU kernels: one loop over samples (OpenMP), each sample deformed in one pass over its voxels.
// Every per-voxel decision comes from the shared headers; this file only loops.
#include "deform_cpu.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include "bezier.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace genesis {

// src[p] = flipped-frame source of voxel p after local shuffling, as a linear index into the unflipped sample.
// Blocks are visited from the last to the first: the first block to claim a voxel is its owner (last writer wins).
static void shuffle_sources(uint64_t seed, uint64_t sample, const DeformConfig& cfg, const Shape& sh,
                            const int32_t* flipped, std::vector<int32_t>& src, std::vector<int32_t>& perm) {
  const int64_t sy = sh.s[1], sz = sh.s[2];
  std::fill(src.begin(), src.end(), -1);
  for (int32_t b = cfg.num_blocks - 1; b >= 0; --b) {
    Stream st(seed, sample, BLOCK, uint32_t(b));
    const Box box = shuffle_block(st, cfg, sh);
    bool permuted = false;
    int32_t p = 0;
    for (int32_t x = 0; x < box.size[0]; ++x)
      for (int32_t y = 0; y < box.size[1]; ++y)
        for (int32_t z = 0; z < box.size[2]; ++z, ++p) {
          const int64_t v = ((box.origin[0] + x) * sy + box.origin[1] + y) * sz + box.origin[2] + z;
          if (src[v] >= 0) continue;
          if (!permuted) {
            block_permutation(st, perm.data(), box.volume());
            permuted = true;
          }
          const int32_t q = perm[p];
          const int32_t qx = q / (box.size[1] * box.size[2]), qy = q / box.size[2] % box.size[1], qz = q % box.size[2];
          src[v] = flipped[((box.origin[0] + qx) * sy + box.origin[1] + qy) * sz + box.origin[2] + qz];
        }
  }
  for (std::size_t v = 0; v < src.size(); ++v)
    if (src[v] < 0) src[v] = flipped[v];
}

static void deform_sample(Op op, const float* in, float* out, float* target, int64_t channels, const Shape& sh,
                          uint64_t seed, uint64_t sample, const DeformConfig& cfg, std::vector<int32_t>& flipped,
                          std::vector<int32_t>& src, std::vector<int32_t>& perm, BezierTable& table) {
  const SampleParams p = derive_params(seed, sample, cfg, sh);
  const Plan plan = plan_for(op, p);
  const int64_t voxels = sh.voxels();

  // flipped[v]: the input voxel that lands at v after the flips (identity when the plan has no flip)
  int64_t v = 0;
  for (int32_t x = 0; x < sh.s[0]; ++x)
    for (int32_t y = 0; y < sh.s[1]; ++y)
      for (int32_t z = 0; z < sh.s[2]; ++z, ++v) {
        const bool f = plan.flip;
        flipped[v] = int32_t((int64_t(flip_coord(f && p.flip[0], x, sh.s[0])) * sh.s[1] +
                              flip_coord(f && p.flip[1], y, sh.s[1])) * sh.s[2] +
                             flip_coord(f && p.flip[2], z, sh.s[2]));
      }
  if (plan.local) shuffle_sources(seed, sample, cfg, sh, flipped.data(), src, perm);
  const int32_t* source = plan.local ? src.data() : flipped.data();
  if (plan.nonlinear) {
    for (int j = 0; j < 4; ++j) table.ctrl[j] = p.ctrl[j];
    table.increasing = p.increasing;
    for (int k = 0; k < kBezierCells; ++k) bezier_cell(table, k);
  }

  for (int64_t c = 0; c < channels; ++c) {
    const float* xin = in + c * voxels;
    float* xout = out + c * voxels;
    if (target != nullptr)
      for (int64_t w = 0; w < voxels; ++w) target[c * voxels + w] = xin[flipped[w]];
    int64_t w = 0;
    for (int32_t x = 0; x < sh.s[0]; ++x)
      for (int32_t y = 0; y < sh.s[1]; ++y)
        for (int32_t z = 0; z < sh.s[2]; ++z, ++w) {
          if (painted(plan, p, x, y, z)) {
            xout[w] = noise_value(seed, sample, c * voxels + w);
          } else {
            const float value = xin[source[w]];
            xout[w] = plan.nonlinear ? bezier_apply(table, value) : value;
          }
        }
  }
}

void deform_cpu(Op op, const float* in, float* out, float* target, int64_t batch, int64_t channels,
                const Shape& sh, uint64_t seed, uint64_t offset, const DeformConfig& cfg, int num_threads) {
  const int64_t sample_size = channels * sh.voxels();
  const int32_t max_block = (sh.s[0] / cfg.block_div) * (sh.ndim > 1 ? sh.s[1] / cfg.block_div : 1) *
                            (sh.ndim > 2 ? sh.s[2] / cfg.block_div : 1);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int32_t> flipped(sh.voxels()), src(sh.voxels()), perm(max_block > 0 ? max_block : 1);
    BezierTable table;
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < batch; ++n)
      deform_sample(op, in + n * sample_size, out + n * sample_size,
                    target != nullptr ? target + n * sample_size : nullptr, channels, sh, seed, offset + n, cfg,
                    flipped, src, perm, table);
  }
}

}  // namespace genesis
