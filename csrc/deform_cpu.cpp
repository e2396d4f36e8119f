// CPU kernels: one OpenMP loop over samples; each sample is deformed row by row (rows along the last axis), so the
// inner loops are plain copies, gathers and table lookups. Every per-voxel decision comes from the shared headers.
#include "deform_cpu.h"

#include <algorithm>
#include <vector>

#include "bezier.h"

namespace genesis {

namespace {

// Loops the compiler vectorises get an AVX2 clone, chosen at load time, beside the baseline x86-64 build.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define GENESIS_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GENESIS_VECTOR_CLONES
#endif

struct Scratch {
  std::vector<int32_t> src;       // shuffle: linear input index feeding each voxel
  std::vector<uint64_t> claimed;  // shuffle: one bit per voxel, set once a block owns it
  std::vector<int32_t> block_in;  // shuffle: per local position of a block, its flipped input voxel
  std::vector<int32_t> owned_at, owned_vox, owned_src;  // shuffle: local position, voxel, source of owned voxels
  std::vector<int32_t> order, pi;                       // exact blocks: the shuffle and its inverse
  std::vector<int32_t> walking, walking_at;             // Feistel blocks: values still cycle-walking, and where
  std::vector<float> reversed, shuffled;                // one row
  std::vector<float> blur_in;                           // blur: the lines being blurred, as they were (edges repeated)
  BezierTable table;
};

// Linear index, in the unflipped input, of the voxel that lands at (x, y, z) after the sample's flips.
struct Flipper {
  bool f[3];
  int32_t s[3];
  int64_t operator()(int32_t x, int32_t y, int32_t z) const {
    return (int64_t(flip_coord(f[0], x, s[0])) * s[1] + flip_coord(f[1], y, s[1])) * s[2] + flip_coord(f[2], z, s[2]);
  }
};

// pi of an exact block, s.pi[0 .. n), decoded whole: the shuffle in s.order, pi written as each position becomes
// final (the per-voxel exact_shuffle_source, for all elements at once in O(n)).
void exact_block(ShuffleDigits digits, int32_t n, Scratch& s) {
  int32_t* order = s.order.data();
  int32_t* pi = s.pi.data();
  for (int32_t f = 0; f < n; ++f) order[f] = f;
  for (int32_t k = n - 1; k > 0; --k) {
    const int32_t j = int32_t(digits.next(uint32_t(k + 1)));
    pi[order[j]] = k;
    order[j] = order[k];
  }
  pi[order[0]] = 0;
}

// out[i] = f.once(in[i]) for i < count: the network's one body, in a loop without branches, which the compiler
// vectorises (AVX2 where the CPU has it: eight lanes of 32-bit multiplies).
GENESIS_VECTOR_CLONES void feistel_once(const FeistelShuffle& f, const int32_t* in, int32_t* out, int32_t count) {
  const FeistelShuffle g = f;  // a local copy: its keys stay in registers
  for (int32_t i = 0; i < count; ++i) out[i] = int32_t(g.once(uint32_t(in[i])));
}

// s.owned_src[i] = f(s.owned_at[i]) for i < m, bit for bit FeistelShuffle: the network applied to all at once, then
// again to those still outside [0, n) (cycle-walking), gathered into s.walking; s.walking_at says where they go.
void feistel_block(const FeistelShuffle& f, int32_t m, Scratch& s) {
  int32_t* out = s.owned_src.data();
  int32_t* walking = s.walking.data();
  int32_t* at = s.walking_at.data();
  feistel_once(f, s.owned_at.data(), out, m);
  int32_t left = 0;
  for (int32_t i = 0; i < m; ++i) {  // branch-free compaction: whether a value walks on is random
    at[left] = i;
    left += uint32_t(out[i]) >= f.n;
  }
  while (left > 0) {
    for (int32_t w = 0; w < left; ++w) walking[w] = out[at[w]];
    feistel_once(f, walking, walking, left);
    int32_t still = 0;
    for (int32_t w = 0; w < left; ++w) {
      out[at[w]] = walking[w];
      at[still] = at[w];
      still += uint32_t(walking[w]) >= f.n;
    }
    left = still;
  }
}

// The claim bits of voxels v .. v + len - 1 (len <= 64) as one word, which are then all set: after a block visits a
// row, every voxel of the row is claimed (by it or by a later block). Bit i of the result is voxel v + i's.
uint64_t claim_row(uint64_t* claimed, int32_t v, int32_t len) {
  const int32_t w = v >> 6, shift = v & 63;
  const uint64_t mask = len == 64 ? ~uint64_t(0) : (uint64_t(1) << len) - 1;
  const uint64_t bits = (claimed[w] >> shift) | (shift != 0 ? claimed[w + 1] << (64 - shift) : 0);
  claimed[w] |= mask << shift;
  if (shift != 0) claimed[w + 1] |= mask >> (64 - shift);  // the vector has a spare word at the end
  return bits & mask;
}

// src[v] for every voxel v after local shuffling. Blocks are visited from the last to the first, so the first block
// to claim a voxel is its owner (the last writer of the sequential definition); only owned voxels are permuted.
// Claims are bits (a 160^3 cube's fit in L2, where src would not), read and set a row at a time: whether a voxel is
// owned yet is the loop's most frequent question.
void shuffle_sources(uint64_t seed, uint64_t sample, const DeformConfig& cfg, const Shape& sh, const Flipper& flipped,
                     Scratch& s) {
  const int64_t sy = sh.s[1], sz = sh.s[2];
  const int32_t step = flipped.f[2] ? -1 : 1;  // along a row, the flipped input index moves by one voxel
  int32_t* src = s.src.data();
  for (int32_t x = 0, v = 0; x < sh.s[0]; ++x)  // unowned voxels keep their own (flipped) input
    for (int32_t y = 0; y < sh.s[1]; ++y, v += int32_t(sz)) {
      const int32_t first = int32_t(flipped(x, y, 0));
      for (int32_t z = 0; z < sz; ++z) src[v + z] = first + step * z;
    }
  std::fill(s.claimed.begin(), s.claimed.end(), 0);
  for (int32_t b = cfg.num_blocks - 1; b >= 0; --b) {
    Stream st(seed, sample, BLOCK, uint32_t(b));
    const Box box = shuffle_block(st, cfg, sh);
    const int32_t len = box.size[2];
    int32_t n = 0, m = 0;
    for (int32_t x = box.origin[0]; x < box.origin[0] + box.size[0]; ++x)
      for (int32_t y = box.origin[1]; y < box.origin[1] + box.size[1]; ++y)
        for (int32_t z0 = 0; z0 < len; z0 += 64) {
          const int32_t v = int32_t((x * sy + y) * sz + box.origin[2] + z0), chunk = std::min(len - z0, 64);
          const int32_t first = int32_t(flipped(x, y, box.origin[2] + z0));
          const uint64_t free = ~claim_row(s.claimed.data(), v, chunk);
          for (int32_t z = 0; z < chunk; ++z, ++n) {
            s.block_in[n] = first + step * z;
            s.owned_at[m] = n;  // branch-free: the claimed/unclaimed pattern is random
            s.owned_vox[m] = v + z;
            m += int32_t((free >> z) & 1u);
          }
        }
    if (m == 0) continue;
    if (n <= kExactShuffleMax) {
      exact_block(ShuffleDigits(seed, sample, uint32_t(b)), n, s);
      for (int32_t i = 0; i < m; ++i) src[s.owned_vox[i]] = s.block_in[s.pi[s.owned_at[i]]];
    } else {
      feistel_block(FeistelShuffle(seed, sample, uint32_t(b), n), m, s);
      for (int32_t i = 0; i < m; ++i) src[s.owned_vox[i]] = s.block_in[s.owned_src[i]];
    }
  }
}

// out[t] = sum over k = -r .. r, in that order, of w[|k|] * in[k][t], for t < inner: blur_line's arithmetic for
// `inner` lines at once (in[k]: the lines' values at offset k), vectorised over t.
void blur_taps(float* out, const float* const* in, int64_t inner, const float* w, int r) {
  std::fill(out, out + inner, 0.0f);
  for (int k = -r; k <= r; ++k) {
    const float wk = w[k < 0 ? -k : k];
    const float* src = in[k + r];
    for (int64_t t = 0; t < inner; ++t) out[t] = out[t] + wk * src[t];
  }
}

// The blur of every channel of a written sample along each spatial axis in turn (0, 1, 2), in place. Bit for bit
// blur_line (the CUDA kernels' body), but vectorised: along the last spatial axis each row is copied with its edges
// repeated and blurred at once; along the others, every line of a slab at once (they are contiguous side by side).
void blur_sample(float* out, int64_t channels, const Shape& sh, const SampleParams& p, Scratch& s) {
  const int r = p.blur_radius;
  const float* taps[2 * kMaxBlurRadius + 1];
  for (int64_t c = 0; c < channels; ++c) {
    float* v = out + c * sh.voxels();
    for (int a = 0; a < sh.ndim; ++a) {
      const int32_t n = sh.s[a];
      if (a == sh.ndim - 1) {  // contiguous lines
        for (int64_t row = 0; row < sh.voxels() / n; ++row) {
          float* line = v + row * n;
          for (int32_t i = -r; i < n + r; ++i) s.blur_in[i + r] = line[std::clamp(i, 0, n - 1)];
          for (int k = 0; k <= 2 * r; ++k) taps[k] = s.blur_in.data() + k;
          blur_taps(line, taps, n, p.blur_weights, r);
        }
        continue;
      }
      const int64_t inner = a == 1 ? sh.s[2] : int64_t(sh.s[1]) * sh.s[2];  // the lines side by side
      for (int64_t o = 0; o < (a == 1 ? sh.s[0] : 1); ++o) {
        float* slab = v + o * n * inner;
        std::copy(slab, slab + n * inner, s.blur_in.begin());
        for (int32_t i = 0; i < n; ++i) {
          for (int k = -r; k <= r; ++k) taps[k + r] = s.blur_in.data() + std::clamp(i + k, 0, n - 1) * inner;
          blur_taps(slab + i * inner, taps, inner, p.blur_weights, r);
        }
      }
    }
  }
}

void deform_sample(Op op, const float* in, float* out, float* target, int64_t channels, const Shape& sh, uint64_t seed,
                   uint64_t sample, const DeformConfig& cfg, Scratch& s) {
  const SampleParams p = derive_params(seed, sample, cfg, sh);
  const Plan plan = plan_for(op, p);
  const Flipper flipped{{plan.flip && p.flip[0], plan.flip && p.flip[1], plan.flip && p.flip[2]},
                        {sh.s[0], sh.s[1], sh.s[2]}};
  const int64_t voxels = sh.voxels();
  const int32_t len = sh.s[2];
  if (plan.local) shuffle_sources(seed, sample, cfg, sh, flipped, s);
  if (plan.nonlinear) {
    for (int j = 0; j < 4; ++j) s.table.ctrl[j] = p.ctrl[j];
    s.table.increasing = p.increasing;
    BezierNode left = bezier_node(0, p.ctrl, p.increasing);
    for (int k = 0; k < kBezierCells; ++k) {
      const BezierNode right = bezier_node(k + 1, p.ctrl, p.increasing);
      bezier_cell(s.table, k, left, right);
      left = right;
    }
  }

  // Pass 1, row by row: flip, shuffle and Bézier map; without a blur also the per-voxel deformations and painting
  // (painted voxels are not mapped: the kept ranges between the spans are written first).
  Span spans[kMaxParts + 1];
  for (int32_t x = 0; x < sh.s[0]; ++x)
    for (int32_t y = 0; y < sh.s[1]; ++y) {
      const int64_t row = (int64_t(x) * sh.s[1] + y) * len;
      const int64_t flipped_row = flipped(x, y, 0) - (flipped.f[2] ? len - 1 : 0);  // start of the source row
      const int n_spans = noise_spans(plan.early_paint(), p, x, y, len, spans);
      for (int64_t c = 0; c < channels; ++c) {
        const float* xin = in + c * voxels;
        float* xout = out + c * voxels + row;
        // the flipped source row (the target), and values[z]: the value at z before the Bézier map and painting
        const float* flipped_values = xin + flipped_row;
        if (flipped.f[2]) {
          for (int32_t z = 0; z < len; ++z) s.reversed[z] = xin[flipped_row + len - 1 - z];
          flipped_values = s.reversed.data();
        }
        if (target != nullptr) std::copy(flipped_values, flipped_values + len, target + c * voxels + row);
        const float* values = flipped_values;
        if (plan.local) {
          for (int32_t z = 0; z < len; ++z) s.shuffled[z] = xin[s.src[row + z]];
          values = s.shuffled.data();
        }
        for (int k = 0, z = 0; k <= n_spans; ++k) {
          const int32_t keep_end = k < n_spans ? spans[k].begin : len;
          if (plan.nonlinear)
            for (; z < keep_end; ++z) xout[z] = bezier_apply(s.table, values[z]);
          else
            for (; z < keep_end; ++z) xout[z] = values[z];
          if (k < n_spans) z = spans[k].end;
        }
        if (!plan.blur) finish_row(xout, spans, n_spans, len, true, plan, p, seed, sample, c * voxels + row);
      }
    }
  if (!plan.blur) return;
  // Pass 2: the blur, then the per-voxel deformations and painting.
  blur_sample(out, channels, sh, p, s);
  for (int32_t x = 0; x < sh.s[0]; ++x)
    for (int32_t y = 0; y < sh.s[1]; ++y) {
      const int64_t row = (int64_t(x) * sh.s[1] + y) * len;
      const int n_spans = noise_spans(plan.paint, p, x, y, len, spans);
      for (int64_t c = 0; c < channels; ++c)
        finish_row(out + c * voxels + row, spans, n_spans, len, true, plan, p, seed, sample, c * voxels + row);
    }
}

}  // namespace

void deform_cpu(Op op, const float* in, float* out, float* target, int64_t batch, int64_t channels, const Shape& sh,
                uint64_t seed, uint64_t offset, const DeformConfig& cfg, int num_threads) {
  const int64_t sample_size = channels * sh.voxels();
  int32_t max_block = 1;
  for (int a = 0; a < sh.ndim; ++a) max_block *= std::max(1, sh.s[a] / cfg.block_div);
#pragma omp parallel num_threads(num_threads)
  {
    Scratch s;
    s.src.resize(sh.voxels());
    for (auto* v : {&s.block_in, &s.owned_at, &s.owned_vox, &s.owned_src, &s.walking, &s.walking_at})
      v->resize(max_block);
    s.claimed.resize(size_t(sh.voxels() + 63) / 64 + 1);
    s.order.resize(std::min(max_block, kExactShuffleMax));
    s.pi.resize(std::min(max_block, kExactShuffleMax));
    s.reversed.resize(sh.s[2]);
    s.shuffled.resize(sh.s[2]);
    // The slab of every line side by side, or one contiguous line (along the last spatial axis) with its edges.
    if (may_blur(op, cfg)) s.blur_in.resize(std::max<int64_t>(sh.voxels(), sh.s[sh.ndim - 1] + 2 * kMaxBlurRadius));
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < batch; ++n)
      deform_sample(op, in + n * sample_size, out + n * sample_size,
                    target != nullptr ? target + n * sample_size : nullptr, channels, sh, seed, offset + n, cfg, s);
  }
}

}  // namespace genesis
