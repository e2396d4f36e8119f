// The DeformConfig fields, once: (C++ type, name), in the order of genesis_ext.DeformConfig, whose fields are checked
// against this list (exported as _C.CONFIG_FIELDS) when genesis_ext is imported. Python declares each field's default
// and valid range (genesis_ext/config.py); the kernels receive the fields as one vector of doubles in this order.
#pragma once

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
