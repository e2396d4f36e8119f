// Per-sample parameters and per-voxel decisions of the Models Genesis deformations.
// Shared __host__ __device__ code: the CPU and CUDA kernels differ only in how they loop over samples and voxels.
#pragma once
#include <cstdint>

#include "deformations.h"
#include "philox.h"

namespace genesis {

constexpr int kMaxParts = 8;  // capacity for holes, windows and flips (DeformConfig.MAX_PARTS)

// Rates and size rules (genesis_ext.DeformConfig), with the fields of deformations.h.
struct DeformConfig {
#define GENESIS_DECLARE(type, name) type name;
  GENESIS_CONFIG_FIELDS(GENESIS_DECLARE)
#undef GENESIS_DECLARE
#define GENESIS_COUNT(type, name) +1
  static constexpr int kFields = 0 GENESIS_CONFIG_FIELDS(GENESIS_COUNT);
#undef GENESIS_COUNT

  // From the fields as doubles, in order (DeformConfig.to_vector(); Python has checked every value's range).
  GENESIS_HD static DeformConfig from_vector(const double* v) {
    DeformConfig c{};
    int i = 0;
#define GENESIS_READ(type, name) c.name = type(v[i++]);
    GENESIS_CONFIG_FIELDS(GENESIS_READ)
#undef GENESIS_READ
    return c;
  }
};

// Spatial shape of one sample; 2D samples have ndim 2 and a third axis of length 1.
struct Shape {
  int32_t ndim;
  int32_t s[3];
  GENESIS_HD int64_t voxels() const { return int64_t(s[0]) * s[1] * s[2]; }
};

// An axis-aligned box: origin and size per axis (origin 0, size 1 on the unused third axis of 2D samples).
struct Box {
  int32_t origin[3], size[3];
  GENESIS_HD int32_t volume() const { return size[0] * size[1] * size[2]; }
};

// The per-sample scalars, (type, name), that genesis_ext.sample_params reports by these names besides the gates of
// GENESIS_GATED and the draws of GENESIS_UNIFORM_DRAWS: the painting gate and its kind, the Bézier branch.
#define GENESIS_SAMPLE_SCALARS(X) \
  X(bool, paint)                  \
  X(bool, inpaint)                \
  X(bool, increasing)

// Everything random about one sample except the shuffle blocks (drawn per block) and the noise (drawn per voxel).
struct SampleParams {
#define GENESIS_DECLARE(type, name) type name;
  GENESIS_SAMPLE_SCALARS(GENESIS_DECLARE)
#undef GENESIS_DECLARE
#define GENESIS_DECLARE_GATE(gate, code, op, rate, word, body) bool gate;
  GENESIS_GATED(GENESIS_DECLARE_GATE)
#undef GENESIS_DECLARE_GATE
#define GENESIS_DECLARE_DRAW(name, lo, hi, purpose) float name;
  GENESIS_UNIFORM_DRAWS(GENESIS_DECLARE_DRAW)
#undef GENESIS_DECLARE_DRAW
  bool flip[3];    // net flip parity per spatial axis
  double ctrl[4];  // Bézier x1, y1, x2, y2
  int32_t n_holes, n_windows;
  Box holes[kMaxParts], windows[kMaxParts];
  int32_t blur_radius;  // of the blur, from blur_sigma, and its weights w[0 .. radius]
  float blur_weights[kMaxBlurRadius + 1];
};

// Box k of an in-/out-painting stream (8 words per box): size from `size_word`, origin inside the margin.
// complement: size = S - randint(lo, hi) (out-painting windows) instead of randint(lo, hi) (holes).
GENESIS_HD Box draw_painting_box(Stream& st, int k, const Shape& sh, const int32_t lo[3], const int32_t hi[3],
                                 bool complement, int32_t margin) {
  Box b{{0, 0, 0}, {1, 1, 1}};
  for (int a = 0; a < sh.ndim; ++a) {
    const int32_t r = randint(st.word(8 * k + 1 + a), lo[a], hi[a]);
    b.size[a] = complement ? sh.s[a] - r : r;
    b.origin[a] = randint(st.word(8 * k + 4 + a), margin, sh.s[a] - b.size[a] - margin);
  }
  return b;
}

GENESIS_HD SampleParams derive_params(uint64_t seed, uint64_t sample, const DeformConfig& cfg, const Shape& sh) {
  SampleParams p{};
  Stream gates(seed, sample, GATES, 0);
#define GENESIS_DRAW_GATE(gate_name, code, op, rate, w, body) p.gate_name = gate(gates.word(w), cfg.rate);
  GENESIS_GATED(GENESIS_DRAW_GATE)
#undef GENESIS_DRAW_GATE
  p.paint = gate(gates.word(2), cfg.paint_rate);
  p.inpaint = gate(gates.word(3), cfg.inpaint_rate);
#define GENESIS_DRAW_UNIFORM(name, lo, hi, purpose) \
  p.name = float(cfg.lo + (cfg.hi - cfg.lo) * uniform_double(Stream(seed, sample, purpose, 0).word(0)));
  GENESIS_UNIFORM_DRAWS(GENESIS_DRAW_UNIFORM)
#undef GENESIS_DRAW_UNIFORM
  p.blur_radius = blur_radius(p.blur_sigma);  // radius and weights from the float sigma that sample_params reports
  blur_weights(p.blur_sigma, p.blur_radius, p.blur_weights);

  Stream flips(seed, sample, FLIP, 0);
  for (int k = 0; k < cfg.max_flips && gate(flips.word(2 * k), cfg.flip_rate); ++k) {
    // compat: the published code draws from the axes of (C, X, Y, ...): 0 is the channel, a no-op
    const int32_t axis =
        cfg.flip_compat ? randint(flips.word(2 * k + 1), 0, 2) - 1 : randint(flips.word(2 * k + 1), 0, sh.ndim - 1);
    if (axis >= 0) p.flip[axis] = !p.flip[axis];
  }

  Stream bez(seed, sample, BEZIER, 0);
  for (int j = 0; j < 4; ++j) p.ctrl[j] = uniform_double(bez.word(j));
  p.increasing = gate(bez.word(4), 0.5);

  int32_t lo[3], hi[3];
  for (int a = 0; a < 3; ++a) {
    lo[a] = sh.s[a] / cfg.hole_div_min;
    hi[a] = sh.s[a] / cfg.hole_div_max;
  }
  Stream in(seed, sample, INPAINT, 0);
  while (p.n_holes < cfg.max_holes && gate(in.word(8 * p.n_holes), cfg.hole_continue)) {
    p.holes[p.n_holes] = draw_painting_box(in, p.n_holes, sh, lo, hi, false, cfg.margin);
    ++p.n_holes;
  }

  for (int a = 0; a < 3; ++a) {
    lo[a] = cfg.cut_min_num * sh.s[a] / cfg.cut_den;
    hi[a] = cfg.cut_max_num * sh.s[a] / cfg.cut_den;
  }
  Stream out(seed, sample, OUTPAINT, 0);
  do {
    p.windows[p.n_windows] = draw_painting_box(out, p.n_windows, sh, lo, hi, true, cfg.margin);
    ++p.n_windows;
  } while (p.n_windows < cfg.max_windows && gate(out.word(8 * p.n_windows), cfg.window_continue));
  return p;
}

// Geometry of local-shuffle block b (words 0-5 of its stream; the permutation follows from Philox call 2).
GENESIS_HD Box shuffle_block(Stream& st, const DeformConfig& cfg, const Shape& sh) {
  Box b{{0, 0, 0}, {1, 1, 1}};
  for (int a = 0; a < sh.ndim; ++a) {
    b.size[a] = randint(st.word(a), 1, sh.s[a] / cfg.block_div);
    b.origin[a] = randint(st.word(3 + a), 0, sh.s[a] - b.size[a]);
  }
  return b;
}

// ---- Local-shuffle permutations (docs/randomness.md, stream version 2): the voxel at block-local position p
// receives local position pi(p), a pure function of (seed, sample, block, n, p). Blocks of up to kExactShuffleMax
// voxels are exact; larger ones use a keyed Feistel bijection. Nothing is stored, so there is no size limit.
constexpr int32_t kExactShuffleMax = 128;
constexpr uint32_t kPermutationCall = 2;  // first Philox call of the block's stream that the permutation reads

GENESIS_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return uint64_t((unsigned __int128)a * b >> 64);
#endif
}

// A binary fraction in [0, 1) of 128 bits, from one Philox call: (w0 w1 w2 w3) / 2^128.
struct Frac128 {
  uint64_t hi, lo;
};

GENESIS_HD Frac128 permutation_fraction(uint64_t seed, uint64_t sample, uint32_t block, uint32_t group) {
  const U32x4 w = stream_block(seed, sample, BLOCK, block, kPermutationCall + group);
  return Frac128{(uint64_t(w.v[0]) << 32) | w.v[1], (uint64_t(w.v[2]) << 32) | w.v[3]};
}

// The digits of Durstenfeld's shuffle, radices n, n-1, ..., 2 in that order, drawn in groups: a group is the
// mixed-radix expansion of floor(u * P) for a fresh fraction u and P the product of its radices (below 2^64), so
// every digit tuple of a group has probability 1/P within a relative 2^-64.
struct ShuffleDigits {
  uint64_t seed, sample;
  uint32_t block, group = 0;
  uint64_t product = 1;
  Frac128 u;
  GENESIS_HD ShuffleDigits(uint64_t seed_, uint64_t sample_, uint32_t block_)
      : seed(seed_), sample(sample_), block(block_), u(permutation_fraction(seed_, sample_, block_, 0)) {}
  // floor(u * m), and u keeps the fraction.
  GENESIS_HD uint32_t next(uint32_t m) {
    if (mulhi64(product, m) != 0) {  // product * m >= 2^64: a new group
      u = permutation_fraction(seed, sample, block, ++group);
      product = 1;
    }
    product *= m;
    const uint64_t carry = mulhi64(u.lo, m), mid = u.hi * m, top = mulhi64(u.hi, m);
    u.lo *= m;
    u.hi = mid + carry;
    return uint32_t(top + (u.hi < mid));
  }
};

// Exact blocks: pi is the inverse of the shuffle the digits drive (step k = n-1 .. 1 swaps positions k and j, the
// digit of radix k + 1), i.e. pi(e) = the final position of element e. One element traced forward: positions >= k
// are final after step k, so the trace stops as soon as the element moves up.
GENESIS_HD int32_t exact_shuffle_source(ShuffleDigits d, int32_t n, int32_t e) {
  int32_t pos = e;
  for (int32_t k = n - 1; k > 0; --k) {
    const int32_t j = int32_t(d.next(uint32_t(k + 1)));
    if (pos == k)
      pos = j;
    else if (pos == j)
      return k;
  }
  return pos;
}

// murmur3's 32-bit finalizer: the Feistel round function.
GENESIS_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Larger blocks: an 8-round Feistel network on the k = bit_width(n - 1) bits of a position (L the high floor(k/2)
// bits, R the rest), cycle-walked onto [0, n) (Mitchell et al., ACM TOPC 2022). 8 rounds pass the uniformity tests
// from k = 8 on (python_tests/test_permutations.py); smaller domains need more, hence the exact blocks.
struct FeistelShuffle {
  static constexpr int kRounds = 8;
  uint32_t key[kRounds];
  uint32_t n;
  int low_bits;  // width of R
  uint32_t high_mask, low_mask;
  GENESIS_HD FeistelShuffle(uint64_t seed, uint64_t sample, uint32_t block, int32_t n_) : n(uint32_t(n_)) {
    const U32x4 w = stream_block(seed, sample, BLOCK, block, kPermutationCall);
    for (int r = 0; r < kRounds; ++r) key[r] = w.v[r & 3] + uint32_t(r >> 2) * 0x9E3779B9u;  // a Weyl step
    int k = 0;
    while ((uint32_t(1) << k) < n) ++k;
    low_bits = k - k / 2;
    high_mask = (1u << (k / 2)) - 1u;
    low_mask = (1u << low_bits) - 1u;
  }
  // Round r's function of the other half: even rounds map R onto L's bits, odd rounds L onto R's.
  GENESIS_HD uint32_t round(int r, uint32_t half) const {
    return fmix32(half ^ key[r]) & (r & 1 ? low_mask : high_mask);
  }
  GENESIS_HD uint32_t once(uint32_t x) const {
    uint32_t high = x >> low_bits, low = x & low_mask;
    for (int r = 0; r < kRounds; r += 2) {
      high ^= round(r, low);
      low ^= round(r + 1, high);
    }
    return (high << low_bits) | low;
  }
  GENESIS_HD int32_t operator()(int32_t p) const {
    uint32_t x = uint32_t(p);
    do x = once(x);
    while (x >= n);
    return int32_t(x);
  }
};

// pi(p) of block `block` (n voxels): the one definition, evaluated per voxel by the CUDA kernels.
GENESIS_HD int32_t shuffle_source(uint64_t seed, uint64_t sample, uint32_t block, int32_t n, int32_t p) {
  if (n <= kExactShuffleMax) return exact_shuffle_source(ShuffleDigits(seed, sample, block), n, p);
  return FeistelShuffle(seed, sample, block, n)(p);
}

// The ops: the fused pair, one single op per gated deformation, flip and the two paintings (exported as _C.OPS), as
// rows of GENESIS_GATED's shape whose second and third columns are the code and the Python name.
#define GENESIS_OPS(X)               \
  X(-, PAIR, genesis_pair, -, -, -)  \
  GENESIS_GATED(X)                   \
  X(-, FLIP_OP, flip, -, -, -)       \
  X(-, INPAINT_OP, inpaint, -, -, -) \
  X(-, OUTPAINT_OP, outpaint, -, -, -)
#define GENESIS_OP_CODE(gate, code, ...) code,
enum Op : int32_t { GENESIS_OPS(GENESIS_OP_CODE) };
#undef GENESIS_OP_CODE
enum Paint : int32_t { NO_PAINT = 0, IN_PAINT = 1, OUT_PAINT = 2 };

// The body of a gated deformation the kernels apply in their own passes (deformations.h): no per-voxel stage.
struct KernelPass {
  static constexpr bool kPerVoxel = false;
  template <typename Params>
  GENESIS_HD static void row(float*, const Params&, uint64_t, uint64_t, int64_t, int64_t) {}
};

// Which deformations a sample gets, in the pair's order: flip, the gated deformations (GENESIS_GATED), painting.
// The blur reads neighbours, so a blurred sample is written in two passes: everything up to the blur, the blur, then
// the per-voxel stages and painting (Plan::early_paint).
struct Plan {
  bool flip;
#define GENESIS_PLAN_FLAG(gate, code, op, rate, word, body) bool gate;
  GENESIS_GATED(GENESIS_PLAN_FLAG)
#undef GENESIS_PLAN_FLAG
  Paint paint;
  GENESIS_HD Paint early_paint() const { return blur ? NO_PAINT : paint; }
  // Whether a per-voxel deformation (a body with kPerVoxel) applies: the kernels' late stage.
  GENESIS_HD bool per_voxel() const {
    bool any = false;
#define GENESIS_ANY_PER_VOXEL(gate_name, code, op, rate, word, body) any = any || (body::kPerVoxel && gate_name);
    GENESIS_GATED(GENESIS_ANY_PER_VOXEL)
#undef GENESIS_ANY_PER_VOXEL
    return any;
  }
};

// The fused pair follows the sample's gates; a single op applies its deformation to every sample.
GENESIS_HD Plan plan_for(Op op, const SampleParams& p) {
  Plan plan{};
  plan.flip = op == PAIR || op == FLIP_OP;
#define GENESIS_PLAN_GATE(gate, code, op_name, rate, word, body) plan.gate = op == PAIR ? p.gate : op == code;
  GENESIS_GATED(GENESIS_PLAN_GATE)
#undef GENESIS_PLAN_GATE
  plan.paint = op == PAIR ? (p.paint ? (p.inpaint ? IN_PAINT : OUT_PAINT) : NO_PAINT)
                          : (op == INPAINT_OP    ? IN_PAINT
                             : op == OUTPAINT_OP ? OUT_PAINT
                                                 : NO_PAINT);
  return plan;
}

// Whether a call of op with cfg can apply a gated deformation to any sample (may_local, may_blur, ...): the CPU loop
// then keeps the buffers it needs, CUDA launches its kernels.
#define GENESIS_MAY(gate, code, op_name, rate, word, body) \
  inline bool may_##gate(Op op, const DeformConfig& cfg) { return op == code || (op == PAIR && cfg.rate > 0); }
GENESIS_GATED(GENESIS_MAY)
#undef GENESIS_MAY
// Whether any per-voxel deformation can apply: the kernels' late stage.
inline bool may_per_voxel(Op op, const DeformConfig& cfg) {
  bool any = false;
#define GENESIS_MAY_PER_VOXEL(gate, code, op_name, rate, word, body) \
  any = any || (body::kPerVoxel && may_##gate(op, cfg));
  GENESIS_GATED(GENESIS_MAY_PER_VOXEL)
#undef GENESIS_MAY_PER_VOXEL
  return any;
}

// A half-open range [begin, end) along the last spatial axis.
struct Span {
  int32_t begin, end;
};

// The spans of row (x, y, .) that this painting turns into noise, sorted and disjoint; returns their count
// (at most kMaxParts + 1). The one definition of which voxels painting replaces, for both kernels. In-painting: the
// union of the holes crossing the row; out-painting: its complement with respect to the windows crossing the row.
GENESIS_HD int noise_spans(Paint paint, const SampleParams& p, int32_t x, int32_t y, int32_t len, Span* out) {
  if (paint == NO_PAINT) return 0;
  const bool in = paint == IN_PAINT;
  const Box* boxes = in ? p.holes : p.windows;
  const int count = in ? p.n_holes : p.n_windows;
  Span cover[kMaxParts];  // z-ranges of the boxes crossing the row, sorted by begin (insertion sort)
  int n = 0;
  for (int k = 0; k < count; ++k) {
    const Box& b = boxes[k];
    if (unsigned(x - b.origin[0]) >= unsigned(b.size[0]) || unsigned(y - b.origin[1]) >= unsigned(b.size[1])) continue;
    int j = n++;
    for (; j > 0 && cover[j - 1].begin > b.origin[2]; --j) cover[j] = cover[j - 1];
    cover[j] = Span{b.origin[2], b.origin[2] + b.size[2]};
  }
  int m = 0;  // merge overlapping and touching ranges
  for (int k = 0; k < n; ++k) {
    if (m > 0 && cover[k].begin <= cover[m - 1].end) {
      if (cover[k].end > cover[m - 1].end) cover[m - 1].end = cover[k].end;
    } else {
      cover[m++] = cover[k];
    }
  }
  if (in) {
    for (int k = 0; k < m; ++k) out[k] = cover[k];
    return m;
  }
  int spans = 0, z = 0;
  for (int k = 0; k < m; ++k) {
    if (cover[k].begin > z) out[spans++] = Span{z, cover[k].begin};
    z = cover[k].end;
  }
  if (z < len) out[spans++] = Span{z, len};
  return spans;
}

// Noise of element e = c * voxels + spatial index of a sample (docs/randomness.md, purpose NOISE): lane e & 3 of
// the Philox block of elements e & ~3 .. e | 3.
GENESIS_HD U32x4 noise_block(uint64_t seed, uint64_t sample, int64_t e) {
  return stream_block(seed, sample, NOISE, uint32_t(e >> 2), 0);
}
GENESIS_HD float noise_value(uint64_t seed, uint64_t sample, int64_t e) {
  return uniform_float(noise_block(seed, sample, e).v[e & 3]);
}

// Uniform noise for elements [e0, e1) of a sample, dst[0 .. e1 - e0), four per Philox block.
GENESIS_HD void fill_noise(float* dst, uint64_t seed, uint64_t sample, int64_t e0, int64_t e1) {
  for (int64_t e = e0; e < e1;) {
    const U32x4 r = noise_block(seed, sample, e);
    for (int lane = int(e & 3); lane < 4 && e < e1; ++lane, ++e) *dst++ = uniform_float(r.v[lane]);
  }
}

// The per-voxel deformations of the plan (GENESIS_GATED rows with kPerVoxel) on elements [e0, e1) of a sample, in
// the table's order.
GENESIS_HD void per_voxel_stages(const Plan& plan, const SampleParams& p, uint64_t seed, uint64_t sample, float* dst,
                                 int64_t e0, int64_t e1) {
#define GENESIS_PER_VOXEL(gate, code, op, rate, word, body) \
  if (body::kPerVoxel && plan.gate) body::row(dst, p, seed, sample, e0, e1);
  GENESIS_GATED(GENESIS_PER_VOXEL)
#undef GENESIS_PER_VOXEL
}

// The last stage of the pair on one row of one channel, row[0 .. len), whose first element is e0 of the sample: the
// per-voxel deformations on the voxels painting keeps, and, if paint, uniform noise on the painted spans. Shared by
// the CPU loop and CUDA's finish_kernel.
GENESIS_HD void finish_row(float* row, const Span* spans, int n_spans, int32_t len, bool paint, const Plan& plan,
                           const SampleParams& p, uint64_t seed, uint64_t sample, int64_t e0) {
  int32_t z = 0;
  for (int k = 0; k <= n_spans; ++k) {  // the kept range before span k, then the span itself
    const int32_t keep_end = k < n_spans ? spans[k].begin : len;
    per_voxel_stages(plan, p, seed, sample, row + z, e0 + z, e0 + keep_end);
    if (k < n_spans) {
      if (paint) fill_noise(row + spans[k].begin, seed, sample, e0 + spans[k].begin, e0 + spans[k].end);
      z = spans[k].end;
    }
  }
}

// Coordinate of the flipped sample's voxel x along an axis of length s.
GENESIS_HD int32_t flip_coord(bool flip, int32_t x, int32_t s) { return flip ? s - 1 - x : x; }

}  // namespace genesis
