// Philox4x32-10 counter-based generator and the stream every random quantity is drawn from.
// Shared by the CPU and CUDA kernels: the derivation is documented in docs/randomness.md.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GENESIS_HD __host__ __device__ __forceinline__
#else
#define GENESIS_HD inline
#endif

namespace genesis {

struct U32x4 {
  uint32_t v[4];
};

GENESIS_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

GENESIS_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, ctr.v[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, ctr.v[2], hi1, lo1);
    ctr = U32x4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// Purposes of docs/randomness.md: one stream family per kind of random quantity (name, value), exported to Python
// as _C.PURPOSES and checked against genesis_ext.streams.Purpose at import. DEFORM_PROB and USER are drawn in Python
// (GenesisDeform's coin, the user deformations); NOISE_STD and BLUR_SIGMA by GENESIS_UNIFORM_DRAWS.
#define GENESIS_PURPOSES(X) \
  X(GATES, 1)               \
  X(FLIP, 2)                \
  X(BEZIER, 3)              \
  X(BLOCK, 4)               \
  X(INPAINT, 5)             \
  X(OUTPAINT, 6)            \
  X(NOISE, 7)               \
  X(NOISE_STD, 8)           \
  X(GAUSSIAN, 9)            \
  X(DEFORM_PROB, 10)        \
  X(BLUR_SIGMA, 11)         \
  X(USER, 12)

// The version of the rules that turn (seed, sample) into deformations (docs/randomness.md, "Stream versions"),
// exported as _C.STREAM_VERSION and checked against genesis_ext.streams.STREAM_VERSION at import.
constexpr int kStreamVersion = 2;

#define GENESIS_PURPOSE_VALUE(name, value) name = value,
enum Purpose : uint32_t { GENESIS_PURPOSES(GENESIS_PURPOSE_VALUE) };
#undef GENESIS_PURPOSE_VALUE

// Philox counter block number `call` of stream (seed, sample, purpose, major): words 4*call .. 4*call+3.
GENESIS_HD U32x4 stream_block(uint64_t seed, uint64_t sample, uint32_t purpose, uint32_t major, uint32_t call) {
  const U32x4 ctr{{static_cast<uint32_t>(sample), static_cast<uint32_t>(sample >> 32), purpose | (call << 8), major}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Sequential reader of one stream that computes each Philox block once for four consecutive words.
struct Stream {
  uint64_t seed, sample;
  uint32_t purpose, major;
  uint32_t cached_call = 0xFFFFFFFFu;
  U32x4 cached{};

  GENESIS_HD Stream(uint64_t seed_, uint64_t sample_, uint32_t purpose_, uint32_t major_)
      : seed(seed_), sample(sample_), purpose(purpose_), major(major_) {}

  GENESIS_HD uint32_t word(uint32_t w) {
    if (w >> 2 != cached_call) {
      cached_call = w >> 2;
      cached = stream_block(seed, sample, purpose, major, cached_call);
    }
    return cached.v[w & 3];
  }
};

// (u >> 8) * 2^-24: exact in float and double, identical on every device.
GENESIS_HD float uniform_float(uint32_t u) { return static_cast<float>(u >> 8) * 5.9604644775390625e-8f; }
GENESIS_HD double uniform_double(uint32_t u) { return static_cast<double>(u >> 8) * 5.9604644775390625e-8; }

// Uniform integer in [a, b] (inclusive) by multiply-shift; bias <= (b - a + 1) / 2^32 per outcome.
GENESIS_HD int32_t randint(uint32_t u, int32_t a, int32_t b) {
  const uint64_t range = static_cast<uint64_t>(static_cast<int64_t>(b) - a + 1);
  return a + static_cast<int32_t>((static_cast<uint64_t>(u) * range) >> 32);
}

GENESIS_HD bool gate(uint32_t u, double rate) { return uniform_double(u) < rate; }

}  // namespace genesis
