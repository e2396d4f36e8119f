// Gaussian blur: the separable kernel's weights (our own exp in double from +, -, *, / only, so every device gets the
// same bits) and the in-place blur of one line, shared by the CPU and CUDA kernels; the numpy twin is
// genesis_ext.reference.gaussian_blur. Borders repeat the edge voxel.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"

namespace genesis {

constexpr int kMaxBlurRadius = 15;  // ceil(3 sigma) for sigma up to DeformConfig.MAX_BLUR_SIGMA = 5

// exp(-x) for x in [0, 100]: x = n ln2 + r with |r| <= ln2 / 2, exp(-r) by its Taylor series to r^13 (Horner),
// then n exact halvings (the result stays far above the subnormal range).
GENESIS_HD double exp_neg(double x) {
  constexpr double kLn2 = 0.6931471805599453;
  const int n = int(x / kLn2 + 0.5);
  const double t = -(x - n * kLn2);
  double e = 1.0;
  for (int j = 13; j >= 1; --j) e = 1.0 + t * e / j;
  for (int k = 0; k < n; ++k) e *= 0.5;
  return e;
}

// The blur radius for standard deviation sigma: ceil(3 sigma), at least 1, at most kMaxBlurRadius.
GENESIS_HD int blur_radius(double sigma) {
  const int r = int(ceil(3.0 * sigma));
  return r < 1 ? 1 : (r > kMaxBlurRadius ? kMaxBlurRadius : r);
}

// w[k] for k = 0 .. radius: exp(-k^2 / (2 sigma^2)) normalised over -radius .. radius (in double), then as float.
GENESIS_HD void blur_weights(double sigma, int radius, float* w) {
  double d[kMaxBlurRadius + 1];
  const double two_var = 2.0 * sigma * sigma;
  double sum = 1.0;
  d[0] = 1.0;
  for (int k = 1; k <= radius; ++k) {
    d[k] = exp_neg(double(k * k) / two_var);
    sum = sum + 2.0 * d[k];
  }
  for (int k = 0; k <= radius; ++k) w[k] = float(d[k] / sum);
}

// Blurs the n values line[0], line[stride], ... in place: out[i] = sum over k = -r .. r, in that order, of
// w[|k|] * in[clamp(i + k, 0, n - 1)], in float. A ring of the 2r + 1 inputs around i keeps the values already
// overwritten; the next input, at i + r + 1, is still unwritten when it is read.
GENESIS_HD void blur_line(float* line, int64_t stride, int32_t n, const float* w, int r) {
  float ring[2 * kMaxBlurRadius + 1];
  const int m = 2 * r + 1;
  for (int k = -r; k <= r; ++k) ring[k + r] = line[(k < 0 ? 0 : (k >= n ? n - 1 : k)) * stride];
  for (int32_t i = 0; i < n; ++i) {
    float acc = 0.0f;
    for (int k = -r; k <= r; ++k) acc = acc + w[k < 0 ? -k : k] * ring[(i + k + r) % m];
    line[i * stride] = acc;
    const int32_t next = i + r + 1 < n ? i + r + 1 : n - 1;
    if (i + 1 < n) ring[i % m] = line[next * stride];
  }
}

// Line `l` along axis `a` of a (s0, s1, s2) array: its first element and the stride between its elements.
GENESIS_HD int64_t line_start(int a, int64_t l, const int32_t s[3], int64_t& stride) {
  stride = a == 2 ? 1 : (a == 1 ? s[2] : int64_t(s[1]) * s[2]);
  return l / stride * stride * s[a] + l % stride;
}

}  // namespace genesis
