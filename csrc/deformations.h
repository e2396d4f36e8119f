// The deformations of the C++ core, declared once: the DeformConfig fields, the gated deformations of the pair and
// the per-sample values drawn for them. deform.h generates from these lists the config struct and its reader, the
// per-sample parameters, the op list (exported as _C.OPS), Plan and plan_for, the gate and parameter draws, and the
// late per-voxel stage both kernels call. A new per-voxel deformation is its body header (included here), its fields
// and one row of GENESIS_GATED; nothing in the kernels' loops changes.
#pragma once

#include "blur.h"
#include "gaussian.h"

// The DeformConfig fields: (C++ type, name), in the order of genesis_ext.DeformConfig, whose fields are checked
// against this list (exported as _C.CONFIG_FIELDS) when genesis_ext is imported. Python declares each field's default
// and valid range (genesis_ext/config.py); the kernels receive the fields as one vector of doubles in this order.
#define GENESIS_CONFIG_FIELDS(X) \
  X(double, nonlinear_rate)      \
  X(double, local_rate)          \
  X(double, paint_rate)          \
  X(double, inpaint_rate)        \
  X(double, outpaint_rate)       \
  X(double, flip_rate)           \
  X(int32_t, num_blocks)         \
  X(int32_t, block_div)          \
  X(int32_t, max_holes)          \
  X(double, hole_continue)       \
  X(int32_t, hole_div_min)       \
  X(int32_t, hole_div_max)       \
  X(int32_t, max_windows)        \
  X(double, window_continue)     \
  X(int32_t, cut_min_num)        \
  X(int32_t, cut_max_num)        \
  X(int32_t, cut_den)            \
  X(int32_t, margin)             \
  X(int32_t, max_flips)          \
  X(bool, flip_compat)           \
  X(double, gaussian_noise_rate) \
  X(double, noise_std_min)       \
  X(double, noise_std_max)       \
  X(double, blur_rate)           \
  X(double, blur_sigma_min)      \
  X(double, blur_sigma_max)

// The gated deformations between the flip and the painting, in the pair's order (flip and painting are drawn apart:
// several flips per sample; in- or out-painting). Columns:
//   gate  - its gate in SampleParams and its flag in Plan (sample_params reports it by this name);
//   code  - its single op's code, and op: that op's Python name (genesis_ext.<op>);
//   rate  - the config field that gates it in the pair; word: its gate's word of the sample's GATES stream;
//   body  - for a deformation of each value alone, a struct with kPerVoxel = true and a template <typename Params>
//           GENESIS_HD static void row(float* dst, const Params& p, uint64_t seed, uint64_t sample, int64_t e0,
//           int64_t e1) that applies it to elements [e0, e1) of a sample (dst[0 .. e1 - e0)); both kernels call it
//           after every other stage but painting, in the table's order (GaussianNoise is the example). KernelPass
//           for one the kernels apply in their own passes (it moves or mixes voxels, or uses a table).
#define GENESIS_GATED(X)                                               \
  X(local, SHUFFLE_OP, local_shuffle, local_rate, 1, KernelPass)       \
  X(nonlinear, BEZIER_OP, bezier_remap, nonlinear_rate, 0, KernelPass) \
  X(blur, BLUR_OP, gaussian_blur, blur_rate, 5, KernelPass)            \
  X(gaussian, GAUSSIAN_OP, gaussian_noise, gaussian_noise_rate, 4, GaussianNoise)

// Per-sample values drawn uniformly in [lo, hi] (config fields) from word 0 of their own stream (docs/randomness.md
// purpose), reported by sample_params under their names: (name, lo, hi, purpose).
#define GENESIS_UNIFORM_DRAWS(X)                        \
  X(noise_std, noise_std_min, noise_std_max, NOISE_STD) \
  X(blur_sigma, blur_sigma_min, blur_sigma_max, BLUR_SIGMA)
