// Gaussian noise values: Box–Muller on Philox words, with our own logarithm, sine and cosine in double built from +,
// -, *, / and sqrt only (all correctly rounded, no contraction), so every device gives the same bits; the libraries'
// log/cos/sin are not bit-identical between the CPU and CUDA. Shared by the CPU and CUDA kernels; the numpy twin is
// genesis_ext.reference.gaussian. Accuracy: |error| < 1e-12 before the rounding to float.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"

namespace genesis {

constexpr double kLn2 = 0.6931471805599453;
constexpr double kHalfPi = 1.5707963267948966;
constexpr double kSqrtHalf = 0.7071067811865476;

// log(u) for u in (0, 1]: u = m 2^k with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, by its series to s^17.
GENESIS_HD double log_unit(double u) {
  int k = 0;
  for (; u < kSqrtHalf; --k) u *= 2.0;  // exact; at most 24 times for the 24-bit uniforms used here
  const double s = (u - 1.0) / (u + 1.0), s2 = s * s;
  double p = 1.0 / 17.0;
  for (int j = 15; j >= 1; j -= 2) p = p * s2 + 1.0 / j;
  return 2.0 * s * p + k * kLn2;
}

// sin(a) and cos(a) for a in [0, pi / 2) by their Taylor series to a^17 and a^16 (|error| < 5e-14), in Horner form.
GENESIS_HD double sin_series(double a) {
  const double a2 = a * a;
  double p = 1.0 / 355687428096000.0;  // 1 / 17!
  p = p * a2 - 1.0 / 1307674368000.0;
  p = p * a2 + 1.0 / 6227020800.0;
  p = p * a2 - 1.0 / 39916800.0;
  p = p * a2 + 1.0 / 362880.0;
  p = p * a2 - 1.0 / 5040.0;
  p = p * a2 + 1.0 / 120.0;
  p = p * a2 - 1.0 / 6.0;
  return a * (p * a2 + 1.0);
}
GENESIS_HD double cos_series(double a) {
  const double a2 = a * a;
  double p = 1.0 / 20922789888000.0;  // 1 / 16!
  p = p * a2 - 1.0 / 87178291200.0;
  p = p * a2 + 1.0 / 479001600.0;
  p = p * a2 - 1.0 / 3628800.0;
  p = p * a2 + 1.0 / 40320.0;
  p = p * a2 - 1.0 / 720.0;
  p = p * a2 + 1.0 / 24.0;
  p = p * a2 - 1.0 / 2.0;
  return p * a2 + 1.0;
}

// cos and sin of 2 pi t for t in [0, 1): quadrant q = floor(4t), then the series at a = (4t - q) pi / 2.
GENESIS_HD void cos_sin_turn(double t, double& c, double& s) {
  const int q = int(4.0 * t);
  const double a = (4.0 * t - q) * kHalfPi;
  const double sa = sin_series(a), ca = cos_series(a);
  c = q == 0 ? ca : q == 1 ? -sa : q == 2 ? -ca : sa;
  s = q == 0 ? sa : q == 1 ? ca : q == 2 ? -sa : -ca;
}

// The two standard normal values (r cos θ, r sin θ) of the Box–Muller pair of words (w1, w2):
// r = sqrt(-2 log(1 - uniform(w1))), θ = 2 pi uniform(w2).
GENESIS_HD void box_muller(uint32_t w1, uint32_t w2, float& z_cos, float& z_sin) {
  const double radius = sqrt(-2.0 * log_unit(1.0 - uniform_double(w1)));
  double c, s;
  cos_sin_turn(uniform_double(w2), c, s);
  z_cos = float(radius * c), z_sin = float(radius * s);
}

// The standard normal values of elements 4 block .. 4 block + 3 of a sample (docs/randomness.md, purpose GAUSSIAN):
// Philox block `block` holds two Box–Muller pairs (words 0, 1 and 2, 3); element e takes the cosine (even e) or sine
// (odd e) of the pair of lane e & 3.
GENESIS_HD void gaussian_block(uint64_t seed, uint64_t sample, int64_t block, float z[4]) {
  const U32x4 r = stream_block(seed, sample, GAUSSIAN, uint32_t(block), 0);
  box_muller(r.v[0], r.v[1], z[0], z[1]);
  box_muller(r.v[2], r.v[3], z[2], z[3]);
}
// A voxel value with Gaussian noise of standard deviation sigma added (float arithmetic, no contraction).
GENESIS_HD float add_gaussian(float value, float sigma, float z) { return value + sigma * z; }

// The Gaussian noise deformation (deformations.h GENESIS_GATED): N(0, noise_std^2) added to elements [e0, e1) of a
// sample, dst[0 .. e1 - e0), four values per Philox block.
struct GaussianNoise {
  static constexpr bool kPerVoxel = true;
  template <typename Params>
  GENESIS_HD static void row(float* dst, const Params& p, uint64_t seed, uint64_t sample, int64_t e0, int64_t e1) {
    float z[4];
    for (int64_t e = e0; e < e1;) {
      gaussian_block(seed, sample, e >> 2, z);
      for (int lane = int(e & 3); lane < 4 && e < e1; ++lane, ++e)
        *dst = add_gaussian(*dst, p.noise_std, z[lane]), ++dst;
    }
  }
};

}  // namespace genesis
