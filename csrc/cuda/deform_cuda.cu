// CUDA kernels of every op. Two to six launches per call, on the caller's stream, no host synchronisation, no
// cudaMalloc:
//  1. prepare_kernel (one thread block per sample): the sample's parameters, its Bézier table, the geometry of its
//     shuffle blocks and, per tile of the sample, the list of blocks crossing it; into the caller's scratch buffer;
//  2. deform_kernel (one thread block per tile of a sample): in shared memory, the owner (highest block index) of
//     each voxel of the tile by atomicMax over the blocks crossing it; then one pass over the tile's voxels, each
//     thread computing its voxel's shuffle source from the owner's permutation (shuffle_source: a pure function of
//     the block's stream, so nothing is stored and blocks of any size run), reading the inputs and writing the
//     deformed input and the target;
//  3. blur_kernel, once per spatial axis, where the blur can fire;
//  4. finish_kernel, where a per-voxel deformation (Gaussian noise) or the blur can fire: the per-voxel stages, and
//     painting after a blur.
// All per-sample and per-voxel decisions are the shared __host__ __device__ code the CPU kernels use.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "../bezier.h"
#include "../deform.h"
#include "deform_cuda.h"
#include "gpu_runtime.h"

namespace genesis::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileVoxels = 4096;          // the owner map: 16 KiB of shared memory
constexpr int kMaxBatchPerLaunch = 65535;  // gridDim.y limit

// Shuffle-block geometry kept between the two kernels (int16: 12 bytes per block, L2-resident for large batches).
struct BlockBox {
  int16_t origin[3], size[3];
};

struct Tiles {
  int32_t extent[3], count[3];
  GENESIS_HD int32_t per_sample() const { return count[0] * count[1] * count[2]; }
};

// Near-cubic tiles of at most kTileVoxels voxels (halving the longest extent), so that few blocks cross tile faces.
Tiles make_tiles(const Shape& sh) {
  Tiles t{};
  for (int a = 0; a < 3; ++a) t.extent[a] = sh.s[a];
  while (int64_t(t.extent[0]) * t.extent[1] * t.extent[2] > kTileVoxels) {
    const int a = t.extent[0] >= t.extent[1] && t.extent[0] >= t.extent[2] ? 0 : (t.extent[1] >= t.extent[2] ? 1 : 2);
    t.extent[a] = (t.extent[a] + 1) / 2;
  }
  for (int a = 0; a < 3; ++a) t.count[a] = (sh.s[a] + t.extent[a] - 1) / t.extent[a];
  return t;
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Most tiles one block can cross: along each axis, a block of up to S / block_div voxels spans at most
// ceil((size - 1) / extent) + 1 tiles.
int32_t max_tiles_per_block(const Shape& sh, const DeformConfig& cfg, const Tiles& tiles) {
  int32_t n = 1;
  for (int a = 0; a < 3; ++a) {
    const int32_t size = a < sh.ndim ? std::max(1, sh.s[a] / cfg.block_div) : 1;
    n *= std::min(tiles.count[a], (size - 1 + tiles.extent[a] - 1) / tiles.extent[a] + 1);
  }
  return n;
}

// Scratch, per sample: parameters; Bézier table; shuffle blocks, and per tile the list of blocks that cross it
// (tile t's block indices are lists[starts[t] .. starts[t + 1]); cursors is working space for building them).
struct ScratchLayout {
  size_t params, tables, boxes, starts, cursors, lists, total;
  int32_t list_capacity;  // per sample
  ScratchLayout(Op op, int64_t batch, const Shape& sh, const DeformConfig& cfg, const Tiles& tiles) {
    const bool shuffle = may_local(op, cfg);
    const int64_t per_sample_tiles = tiles.per_sample();
    list_capacity = shuffle ? cfg.num_blocks * max_tiles_per_block(sh, cfg, tiles) : 0;
    params = 0;
    tables = params + align_up(sizeof(SampleParams) * batch);
    boxes = tables + (may_nonlinear(op, cfg) ? align_up(sizeof(BezierTable) * batch) : 0);
    starts = boxes + (shuffle ? align_up(sizeof(BlockBox) * batch * cfg.num_blocks) : 0);
    cursors = starts + (shuffle ? align_up(sizeof(int32_t) * batch * (per_sample_tiles + 1)) : 0);
    lists = cursors + (shuffle ? align_up(sizeof(int32_t) * batch * per_sample_tiles) : 0);
    total = lists + align_up(sizeof(int32_t) * batch * list_capacity);
  }
};

// Calls f(tile) for every tile the block crosses.
template <typename F>
__device__ void for_each_tile(const BlockBox& b, const Tiles& tiles, F f) {
  int32_t first[3], last[3];
  for (int a = 0; a < 3; ++a) {
    first[a] = b.origin[a] / tiles.extent[a];
    last[a] = (b.origin[a] + b.size[a] - 1) / tiles.extent[a];
  }
  for (int32_t tx = first[0]; tx <= last[0]; ++tx)
    for (int32_t ty = first[1]; ty <= last[1]; ++ty)
      for (int32_t tz = first[2]; tz <= last[2]; ++tz) f((tx * tiles.count[1] + ty) * tiles.count[2] + tz);
}

__global__ void prepare_kernel(Op op, DeformConfig cfg, Shape sh, Tiles tiles, uint64_t seed, uint64_t offset,
                               SampleParams* params, BezierTable* tables, BlockBox* boxes, int32_t* starts,
                               int32_t* cursors, int32_t* lists, int32_t list_capacity) {
  const int64_t n = blockIdx.x;
  __shared__ SampleParams p;
  if (threadIdx.x == 0) {
    p = derive_params(seed, offset + n, cfg, sh);
    params[n] = p;
  }
  __syncthreads();
  const Plan plan = plan_for(op, p);
  if (plan.nonlinear) {
    BezierTable& t = tables[n];
    if (threadIdx.x == 0) {
      for (int j = 0; j < 4; ++j) t.ctrl[j] = p.ctrl[j];
      t.increasing = p.increasing;
    }
    __shared__ BezierNode nodes[kBezierCells + 1];
    for (int k = threadIdx.x; k <= kBezierCells; k += blockDim.x) nodes[k] = bezier_node(k, p.ctrl, p.increasing);
    __syncthreads();  // bezier_cell reads the nodes, ctrl and increasing
    for (int k = threadIdx.x; k < kBezierCells; k += blockDim.x) bezier_cell(t, k, nodes[k], nodes[k + 1]);
  }
  if (!plan.local) return;
  // Shuffle blocks, then bucket them by tile: count per tile, prefix sums, fill. The order inside a tile's list
  // does not matter: owners are a maximum and each block's permutation is a function of its own stream.
  const int32_t n_tiles = tiles.per_sample();
  BlockBox* sample_boxes = boxes + n * cfg.num_blocks;
  int32_t* start = starts + n * (n_tiles + 1);
  int32_t* cursor = cursors + n * n_tiles;
  int32_t* list = lists + n * list_capacity;
  for (int32_t t = threadIdx.x; t < n_tiles; t += blockDim.x) cursor[t] = 0;
  __syncthreads();
  for (int32_t b = threadIdx.x; b < cfg.num_blocks; b += blockDim.x) {
    Stream st(seed, offset + n, BLOCK, uint32_t(b));
    const Box box = shuffle_block(st, cfg, sh);
    BlockBox& out = sample_boxes[b];
    for (int a = 0; a < 3; ++a) out.origin[a] = int16_t(box.origin[a]), out.size[a] = int16_t(box.size[a]);
    for_each_tile(out, tiles, [&](int32_t t) { atomicAdd(&cursor[t], 1); });
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    start[0] = 0;
    for (int32_t t = 0; t < n_tiles; ++t) {
      start[t + 1] = start[t] + cursor[t];
      cursor[t] = start[t];
    }
  }
  __syncthreads();
  for (int32_t b = threadIdx.x; b < cfg.num_blocks; b += blockDim.x)
    for_each_tile(sample_boxes[b], tiles, [&](int32_t t) { list[atomicAdd(&cursor[t], 1)] = b; });
}

__device__ __forceinline__ int64_t flipped_index(const SampleParams& p, bool flip, const Shape& sh, int32_t x,
                                                 int32_t y, int32_t z) {
  return (int64_t(flip_coord(flip && p.flip[0], x, sh.s[0])) * sh.s[1] + flip_coord(flip && p.flip[1], y, sh.s[1])) *
             sh.s[2] +
         flip_coord(flip && p.flip[2], z, sh.s[2]);
}

// The part [from, to) of a block inside the tile [lo, hi) (the block crosses the tile).
__device__ __forceinline__ void clip(const BlockBox& b, const int32_t lo[3], const int32_t hi[3], int32_t from[3],
                                     int32_t to[3]) {
  for (int a = 0; a < 3; ++a) {
    from[a] = max(int32_t(b.origin[a]), lo[a]);
    to[a] = min(int32_t(b.origin[a]) + b.size[a], hi[a]);
  }
}

// Linear index, in the unflipped input, of the shuffle source of tile voxel (x, y, z), owned by block b.
__device__ __forceinline__ int64_t shuffled_index(const SampleParams& p, bool flip, const Shape& sh, uint64_t seed,
                                                  uint64_t sample, int32_t b, const BlockBox& box, int32_t x, int32_t y,
                                                  int32_t z) {
  const int32_t sy = box.size[1], sz = box.size[2];
  const int32_t local = ((x - box.origin[0]) * sy + y - box.origin[1]) * sz + z - box.origin[2];
  const int32_t q = shuffle_source(seed, sample, uint32_t(b), int32_t(box.size[0]) * sy * sz, local);
  return flipped_index(p, flip, sh, box.origin[0] + q / (sy * sz), box.origin[1] + q / sz % sy, box.origin[2] + q % sz);
}

__global__ void __launch_bounds__(kThreads)
    deform_kernel(Op op, DeformConfig cfg, Shape sh, Tiles tiles, uint64_t seed, uint64_t offset, int64_t channels,
                  const SampleParams* params, const BezierTable* tables, const BlockBox* boxes, const int32_t* starts,
                  const int32_t* lists, int32_t list_capacity, const float* in, float* out, float* target) {
  __shared__ SampleParams p;
  __shared__ BezierTable table;
  __shared__ int32_t owner[kTileVoxels];  // highest block index covering each tile voxel, -1 for none
  __shared__ uint32_t noise_bits[kTileVoxels / 32];

  const int64_t n = blockIdx.y;
  const uint64_t sample = offset + n;
  if (threadIdx.x == 0) p = params[n];
  __syncthreads();
  const Plan plan = plan_for(op, p);
  if (plan.nonlinear) {  // copy the table word by word
    const int32_t* src = reinterpret_cast<const int32_t*>(tables + n);
    int32_t* dst = reinterpret_cast<int32_t*>(&table);
    for (int i = threadIdx.x; i < int(sizeof(BezierTable) / 4); i += blockDim.x) dst[i] = src[i];
  }

  int32_t lo[3], hi[3], tile = int32_t(blockIdx.x);
  for (int a = 2; a >= 0; --a) {
    lo[a] = (tile % tiles.count[a]) * tiles.extent[a];
    hi[a] = min(lo[a] + tiles.extent[a], sh.s[a]);
    tile /= tiles.count[a];
  }
  const int32_t ey = hi[1] - lo[1], ez = hi[2] - lo[2];
  const int32_t tile_voxels = (hi[0] - lo[0]) * ey * ez;

  const BlockBox* sample_boxes = boxes + n * cfg.num_blocks;
  if (plan.local) {
    const int32_t* start = starts + n * (tiles.per_sample() + 1) + blockIdx.x;
    const int32_t* crossing = lists + n * list_capacity + start[0];  // the blocks crossing this tile
    const int32_t n_crossing = start[1] - start[0];
    for (int i = threadIdx.x; i < tile_voxels; i += blockDim.x) owner[i] = -1;
    __syncthreads();
    for (int32_t j = threadIdx.x; j < n_crossing; j += blockDim.x) {
      const int32_t b = crossing[j];
      int32_t from[3], to[3];
      clip(sample_boxes[b], lo, hi, from, to);
      for (int32_t x = from[0]; x < to[0]; ++x)
        for (int32_t y = from[1]; y < to[1]; ++y)
          for (int32_t z = from[2]; z < to[2]; ++z)
            atomicMax(&owner[((x - lo[0]) * ey + y - lo[1]) * ez + z - lo[2]], b);
    }
  }
  const Paint paint = plan.early_paint();
  if (paint != NO_PAINT) {  // which tile voxels become noise: one bit each, from each row's noise spans
    for (int i = threadIdx.x; i < kTileVoxels / 32; i += blockDim.x) noise_bits[i] = 0u;
    __syncthreads();
    for (int32_t r = threadIdx.x; r < (hi[0] - lo[0]) * ey; r += blockDim.x) {
      Span spans[kMaxParts + 1];
      const int n_spans = noise_spans(paint, p, lo[0] + r / ey, lo[1] + r % ey, sh.s[2], spans);
      for (int k = 0; k < n_spans; ++k)
        for (int32_t z = max(spans[k].begin, lo[2]); z < min(spans[k].end, hi[2]); ++z) {
          const int32_t i = r * ez + z - lo[2];
          atomicOr(&noise_bits[i >> 5], 1u << (i & 31));
        }
    }
  }
  __syncthreads();

  const int64_t voxels = sh.voxels();
  const float* xin = in + n * channels * voxels;
  float* xout = out + n * channels * voxels;
  float* xtarget = target != nullptr ? target + n * channels * voxels : nullptr;
  for (int i = threadIdx.x; i < tile_voxels; i += blockDim.x) {
    const int32_t x = lo[0] + i / (ey * ez), y = lo[1] + i / ez % ey, z = lo[2] + i % ez;
    const int64_t v = (int64_t(x) * sh.s[1] + y) * sh.s[2] + z;
    const int64_t unshuffled = flipped_index(p, plan.flip, sh, x, y, z);
    const int32_t b = plan.local ? owner[i] : -1;
    const int64_t src =
        b >= 0 ? shuffled_index(p, plan.flip, sh, seed, sample, b, sample_boxes[b], x, y, z) : unshuffled;
    const bool noise = paint != NO_PAINT && ((noise_bits[i >> 5] >> (i & 31)) & 1u);
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t e = c * voxels;
      float value;
      if (noise) {
        value = noise_value(seed, sample, e + v);
      } else {
        value = xin[e + src];
        if (plan.nonlinear) value = bezier_apply(table, value);
      }
      xout[e + v] = value;
      if (xtarget != nullptr) xtarget[e + v] = xin[e + unshuffled];
    }
  }
}

// Gaussian blur, one launch per spatial axis (0, 1, 2) where it can fire, on the written output of every sample whose
// plan has it: one thread per line of one channel along the axis, blurred in place (blur_line).
__global__ void __launch_bounds__(kThreads)
    blur_kernel(Op op, Shape sh, int axis, int64_t channels, const SampleParams* params, float* out) {
  const SampleParams& p = params[blockIdx.y];
  const int64_t lines = sh.voxels() / sh.s[axis];
  const int64_t l = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!plan_for(op, p).blur || l >= channels * lines) return;
  int64_t stride;
  const int64_t start = line_start(axis, l % lines, sh.s, stride);
  blur_line(out + (blockIdx.y * channels + l / lines) * sh.voxels() + start, stride, sh.s[axis], p.blur_weights,
            p.blur_radius);
}

// The last stage, a launch only where it can fire: the per-voxel deformations (deform.h finish_row) on the voxels
// painting keeps, and, for blurred samples (painted after the blur, Plan::early_paint), the painting noise. One
// thread per row (x, y). Its own kernel: in deform_kernel's voxel loop the double-precision Box–Muller made ptxas
// spill (benchmarks/cuda_resources.py), and the pair without noise or blur keeps its kernel unchanged.
__global__ void __launch_bounds__(kThreads) finish_kernel(Op op, Shape sh, uint64_t seed, uint64_t offset,
                                                          int64_t channels, const SampleParams* params, float* out) {
  __shared__ SampleParams p;
  const int64_t n = blockIdx.y;
  if (threadIdx.x == 0) p = params[n];
  __syncthreads();
  const Plan plan = plan_for(op, p);
  const bool late_paint = plan.blur && plan.paint != NO_PAINT;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!(plan.per_voxel() || late_paint) || row >= int64_t(sh.s[0]) * sh.s[1]) return;
  Span spans[kMaxParts + 1];
  const int n_spans = noise_spans(plan.paint, p, int32_t(row / sh.s[1]), int32_t(row % sh.s[1]), sh.s[2], spans);
  const int64_t voxels = sh.voxels();
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t e0 = c * voxels + row * sh.s[2];
    finish_row(out + n * channels * voxels + e0, spans, n_spans, sh.s[2], late_paint, plan, p, seed, offset + n, e0);
  }
}

// Pointers into the scratch buffer for samples first .. of one launch.
struct ScratchPointers {
  SampleParams* params;
  BezierTable* tables;
  BlockBox* boxes;
  int32_t *starts, *cursors, *lists;
  ScratchPointers(void* scratch, const ScratchLayout& l, int64_t first, const DeformConfig& cfg, int32_t n_tiles) {
    char* base = static_cast<char*>(scratch);
    params = reinterpret_cast<SampleParams*>(base + l.params) + first;
    tables = reinterpret_cast<BezierTable*>(base + l.tables) + first;
    boxes = reinterpret_cast<BlockBox*>(base + l.boxes) + first * cfg.num_blocks;
    starts = reinterpret_cast<int32_t*>(base + l.starts) + first * (n_tiles + 1);
    cursors = reinterpret_cast<int32_t*>(base + l.cursors) + first * n_tiles;
    lists = reinterpret_cast<int32_t*>(base + l.lists) + first * l.list_capacity;
  }
};

}  // namespace

size_t scratch_bytes(Op op, int64_t batch, const Shape& sh, const DeformConfig& cfg) {
  return ScratchLayout(op, batch, sh, cfg, make_tiles(sh)).total;
}

void deform_cuda(Op op, const float* in, float* out, float* target, int64_t batch, int64_t channels, const Shape& sh,
                 uint64_t seed, uint64_t offset, const DeformConfig& cfg, void* scratch, size_t scratch_size,
                 int device, uintptr_t stream_handle) {
  const std::string reason = unavailable_reason();
  if (!reason.empty()) throw std::runtime_error("genesis_ext CUDA: " + reason);
  const Tiles tiles = make_tiles(sh);
  const ScratchLayout layout(op, batch, sh, cfg, tiles);
  if (scratch_size < layout.total) throw std::invalid_argument("genesis_ext CUDA: scratch buffer too small");
  for (int a = 0; a < 3; ++a)
    if (sh.s[a] > 32767) throw std::invalid_argument("genesis_ext CUDA: spatial axes longer than 32767 voxels");
  if (batch <= 0) return;
  DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t sample_size = channels * sh.voxels();
  for (int64_t first = 0; first < batch; first += kMaxBatchPerLaunch) {
    const int64_t count = std::min<int64_t>(kMaxBatchPerLaunch, batch - first);
    const ScratchPointers s(scratch, layout, first, cfg, tiles.per_sample());
    launch(prepare_kernel, unsigned(count), kThreads, stream, op, cfg, sh, tiles, seed, offset + first, s.params,
           s.tables, s.boxes, s.starts, s.cursors, s.lists, layout.list_capacity);
    check(cudaGetLastError(), "prepare kernel launch");
    const dim3 grid(unsigned(tiles.per_sample()), unsigned(count));
    const float* x = in + first * sample_size;
    float* y = out + first * sample_size;
    float* t = target != nullptr ? target + first * sample_size : nullptr;
    launch(deform_kernel, grid, kThreads, stream, op, cfg, sh, tiles, seed, offset + first, channels, s.params,
           s.tables, s.boxes, s.starts, s.lists, layout.list_capacity, x, y, t);
    check(cudaGetLastError(), "deform kernel launch");
    if (may_blur(op, cfg))
      for (int a = 0; a < sh.ndim; ++a) {
        const int64_t lines = channels * (sh.voxels() / sh.s[a]);
        launch(blur_kernel, dim3(unsigned((lines + kThreads - 1) / kThreads), unsigned(count)), kThreads, stream, op,
               sh, a, channels, s.params, y);
        check(cudaGetLastError(), "blur kernel launch");
      }
    if (may_per_voxel(op, cfg) || may_blur(op, cfg)) {
      const int64_t rows = int64_t(sh.s[0]) * sh.s[1];
      launch(finish_kernel, dim3(unsigned((rows + kThreads - 1) / kThreads), unsigned(count)), kThreads, stream, op, sh,
             seed, offset + first, channels, s.params, y);
      check(cudaGetLastError(), "finish kernel launch");
    }
  }
}

}  // namespace genesis::cuda
