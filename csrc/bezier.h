// The Models Genesis non-linear intensity map f(v) = By(Bx^-1(v)) (increasing) or By(1 - Bx^-1(v)) (decreasing),
// evaluated per voxel from a per-sample table of cubic Hermite cells. A cell whose Hermite fit is not within
// kBezierTol of the exact map at its check points (near a vertical tangent, where Bx' ~ 0) is marked `exact`
// and its voxels solve the cubic in double instead. Shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "philox.h"

namespace genesis {

constexpr int kBezierCells = 256;
constexpr double kBezierTol = 1e-6;

// Cubic Bézier coordinate with end points 0 and 1 and inner control values p1, p2, and its derivative.
GENESIS_HD double bezier(double s, double p1, double p2) {
  const double t = 1.0 - s;
  return 3.0 * t * t * s * p1 + 3.0 * t * s * s * p2 + s * s * s;
}
GENESIS_HD double bezier_slope(double s, double p1, double p2) {
  const double t = 1.0 - s;
  return 3.0 * t * t * p1 + 6.0 * t * s * (p2 - p1) + 3.0 * s * s * (1.0 - p2);
}

// s in [0, 1] with bezier(s, x1, x2) = v: Newton steps kept inside a shrinking bracket, bisection when a step
// leaves it. bezier(., x1, x2) is non-decreasing for x1, x2 in [0, 1], so the bracket always holds the root.
GENESIS_HD double bezier_inverse(double v, double x1, double x2) {
  if (!(v > 0.0)) return 0.0;
  if (!(v < 1.0)) return 1.0;
  double lo = 0.0, hi = 1.0, s = v;
  for (int it = 0; it < 200; ++it) {
    const double g = bezier(s, x1, x2) - v;
    if (g == 0.0) return s;
    if (g < 0.0)
      lo = s;
    else
      hi = s;
    const double dg = bezier_slope(s, x1, x2);
    double next = dg > 0.0 ? s - g / dg : lo;
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (next == s || next <= lo || next >= hi) return next;
    s = next;
  }
  return s;
}

// The exact map in double (v already clamped to [0, 1]).
GENESIS_HD double bezier_map_exact(double v, const double ctrl[4], bool increasing) {
  const double s = bezier_inverse(v, ctrl[0], ctrl[2]);
  return bezier(increasing ? s : 1.0 - s, ctrl[1], ctrl[3]);
}

struct BezierTable {
  float coef[kBezierCells][4];  // f(v) = c0 + u (c1 + u (c2 + u c3)), u in [0, 1] across the cell
  bool exact[kBezierCells];
  double ctrl[4];
  bool increasing;
};

// The map at node v = k / kBezierCells: its value f and h * f' (h the cell width); `ok` is false where f' is
// unbounded (Bx' = 0).
struct BezierNode {
  double f, hd;
  bool ok;
};

GENESIS_HD BezierNode bezier_node(int k, const double ctrl[4], bool increasing) {
  const double v = double(k) / kBezierCells;
  const double s = bezier_inverse(v, ctrl[0], ctrl[2]);
  const double sy = increasing ? s : 1.0 - s;
  const double dx = bezier_slope(s, ctrl[0], ctrl[2]);
  const double dy = bezier_slope(sy, ctrl[1], ctrl[3]);
  const bool ok = dx > 1e-12;
  return BezierNode{bezier(sy, ctrl[1], ctrl[3]), ok ? (increasing ? dy : -dy) / dx / kBezierCells : 0.0, ok};
}

GENESIS_HD float hermite_eval(const float c[4], float u) { return c[0] + u * (c[1] + u * (c[2] + u * c[3])); }

// Cell k of the table from its nodes k and k + 1: Hermite coefficients, then a check against the exact map at
// the cell's quarter points (the Hermite error of a smooth map peaks mid-cell).
GENESIS_HD void bezier_cell(BezierTable& t, int k, const BezierNode& n0, const BezierNode& n1) {
  float* c = t.coef[k];
  c[0] = float(n0.f);
  c[1] = float(n0.hd);
  c[2] = float(3.0 * (n1.f - n0.f) - 2.0 * n0.hd - n1.hd);
  c[3] = float(2.0 * (n0.f - n1.f) + n0.hd + n1.hd);
  bool exact = !(n0.ok && n1.ok);
  for (int q = 1; q < 4 && !exact; ++q) {
    const float u = 0.25f * float(q);
    const double v = (double(k) + u) / kBezierCells;
    const double err = double(hermite_eval(c, u)) - bezier_map_exact(v, t.ctrl, t.increasing);
    exact = !(err < kBezierTol && err > -kBezierTol);
  }
  t.exact[k] = exact;
}

// f(v) for one voxel. NaN stays NaN; values outside [0, 1] (and +-Inf) take the end values, as np.interp does.
GENESIS_HD float bezier_apply(const BezierTable& t, float v) {
  if (v != v) return v;
  const float c = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
  const float x = c * float(kBezierCells);
  int k = int(x);
  if (k > kBezierCells - 1) k = kBezierCells - 1;
  if (t.exact[k]) return float(bezier_map_exact(double(c), t.ctrl, t.increasing));
  return hermite_eval(t.coef[k], x - float(k));
}

}  // namespace genesis
