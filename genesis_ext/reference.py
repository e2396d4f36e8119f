"""Plain-numpy reference ("oracle") of the Models Genesis deformations.

Written from the Models Genesis paper and its published code (semantics) and docs/randomness.md (every random draw,
taken from genesis_ext.streams). Everything here is a pure function of ``(seed, sample index, config)``: the kernels
must reproduce it exactly (the Bézier map within the contract's tolerance). One sample is ``(C, *spatial)`` with 2 or
3 spatial axes. Faithful and readable first; the local shuffle is deliberately the plain sequential loop of the
published code (this is also the CPU baseline).
"""

from __future__ import annotations

import math

import numpy as np

from ._util import deprecated_aliases
from .config import PAIR_STAGES, DeformConfig
from .streams import (  # noqa: F401 (re-exported: the reference replays every draw through them)
    Purpose,
    philox4x32_10,
    randint,
    sample_words,
    stream_blocks,
    uniform,
    word,
    words,
)

# the purposes were module constants here (reference.GATES, ...): now genesis_ext.streams.Purpose
__getattr__ = deprecated_aliases(
    __name__, {p.name: (f"genesis_ext.streams.Purpose.{p.name}", lambda p=p: p) for p in Purpose}
)


def _gate(u32, rate: float) -> bool:
    return bool(uniform(u32) < float(rate))


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample parameters


def _fits(config: DeformConfig, deformation: str, spatial_shape) -> bool:
    return all(config._fits(deformation, int(s)) for s in spatial_shape)


def derive_params(seed: int, index: int, spatial_shape, config: DeformConfig | None = None) -> dict:
    """Every random parameter of sample ``index`` (docs/randomness.md), for a sample of ``spatial_shape`` (2 or 3 axes).

    Keys: gates 'nonlinear', 'local', 'paint', 'inpaint', 'gaussian', 'blur' (bool); 'noise_std' and 'blur_sigma'
    float32 (the Gaussian noise's standard deviation, the blur's sigma); 'flip' bool (ndim,) net flip parity per spatial
    axis; 'bezier' float64 (x1, y1, x2, y2) and 'increasing'; 'n_holes' and 'holes' int32 (max_holes, 2, ndim) ([k, 0]
    origin, [k, 1] size, unused slots 0); 'n_windows' and 'windows' int32 (max_windows, 2, ndim); 'blocks' int32
    (num_blocks, 2, ndim). A deformation whose size rules do not fit ``spatial_shape`` raises ValueError if its rate can
    fire, and otherwise gets no geometry (0 boxes / 0 blocks).
    """
    config = DeformConfig() if config is None else config
    shape = tuple(int(s) for s in spatial_shape)
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must have 2 or 3 positive axes, got {spatial_shape}")
    p: dict = {}

    g = words(seed, index, Purpose.GATES, 0, 6)
    p["nonlinear"] = _gate(g[0], config.nonlinear_rate)
    p["local"] = _gate(g[1], config.local_rate)
    p["paint"] = _gate(g[2], config.paint_rate)
    p["inpaint"] = _gate(g[3], config.inpaint_rate)
    p["gaussian"] = _gate(g[4], config.gaussian_noise_rate)
    u = uniform(word(seed, index, Purpose.NOISE_STD, 0, 0))
    p["noise_std"] = np.float32(config.noise_std_min + (config.noise_std_max - config.noise_std_min) * u)
    p["blur"] = _gate(g[5], config.blur_rate)
    u = uniform(word(seed, index, Purpose.BLUR_SIGMA, 0, 0))
    p["blur_sigma"] = np.float32(config.blur_sigma_min + (config.blur_sigma_max - config.blur_sigma_min) * u)

    f = words(seed, index, Purpose.FLIP, 0, 2 * max(config.max_flips, 1))
    flip = np.zeros(ndim, dtype=bool)
    for k in range(config.max_flips):
        if not _gate(f[2 * k], config.flip_rate):
            break
        if config.flip_compat:  # the published draw over (C, X, Y): 0 is the channel axis, a no-op
            axis = int(randint(f[2 * k + 1], 0, 2)) - 1
        else:
            axis = int(randint(f[2 * k + 1], 0, ndim - 1))
        if axis >= 0:
            flip[axis] = not flip[axis]
    p["flip"] = flip

    b = words(seed, index, Purpose.BEZIER, 0, 5)
    p["bezier"] = uniform(b[:4])
    p["increasing"] = _gate(b[4], 0.5)

    p["n_holes"], p["holes"] = 0, np.zeros((config.max_holes, 2, ndim), dtype=np.int32)
    if _fits(config, "inpaint", shape):
        p["n_holes"], p["holes"] = _painting_boxes(
            seed,
            index,
            Purpose.INPAINT,
            shape,
            config.max_holes,
            config.hole_continue,
            first_always=False,
            lo=[s // config.hole_div_min for s in shape],
            hi=[s // config.hole_div_max for s in shape],
            complement=False,
            margin=config.margin,
        )
    elif config.paint_rate > 0 and config.inpaint_rate > 0:
        raise ValueError(f"in-painting needs every axis >= {config.min_axis_length('inpaint')}, got {shape}")

    p["n_windows"], p["windows"] = 0, np.zeros((config.max_windows, 2, ndim), dtype=np.int32)
    if _fits(config, "outpaint", shape):
        p["n_windows"], p["windows"] = _painting_boxes(
            seed,
            index,
            Purpose.OUTPAINT,
            shape,
            config.max_windows,
            config.window_continue,
            first_always=True,
            lo=[(config.cut_min_num * s) // config.cut_den for s in shape],
            hi=[(config.cut_max_num * s) // config.cut_den for s in shape],
            complement=True,
            margin=config.margin,
        )
    elif config.paint_rate > 0 and config.outpaint_rate > 0:
        raise ValueError(f"out-painting needs every axis >= {config.min_axis_length('outpaint')}, got {shape}")

    p["blocks"] = np.zeros((0, 2, ndim), dtype=np.int32)
    if _fits(config, "local", shape):
        p["blocks"] = _shuffle_blocks(seed, index, shape, config.num_blocks, config.block_div)
    elif config.local_rate > 0:
        raise ValueError(f"local shuffling needs every axis >= {config.min_axis_length('local')}, got {shape}")
    return p


def _painting_boxes(seed, index, purpose, shape, count, rate, first_always, lo, hi, complement, margin):
    """Holes (size ``randint(lo, hi)``) or windows (size ``S - randint(lo, hi)``): box k uses words 8k (continue:
    ``uniform < rate``, else stop; skipped for k = 0 if ``first_always``), 8k+1+a (size) and 8k+4+a (origin
    ``randint(margin, S - size - margin)``) of stream (purpose, major 0). Returns (n, int32 (count, 2, ndim))."""
    boxes = np.zeros((count, 2, len(shape)), dtype=np.int32)
    w = words(seed, index, purpose, 0, 8 * max(count, 1))
    n = 0
    while n < count and ((first_always and n == 0) or _gate(w[8 * n], rate)):
        for a, s in enumerate(shape):
            r = int(randint(w[8 * n + 1 + a], lo[a], hi[a]))
            size = s - r if complement else r
            boxes[n, 0, a] = randint(w[8 * n + 4 + a], margin, s - size - margin)
            boxes[n, 1, a] = size
        n += 1
    return n, boxes


def _shuffle_blocks(seed, index, shape, num_blocks, block_div):
    """Geometry of all local-shuffle blocks at once: block b uses words a (size ``randint(1, S // block_div)``) and
    3+a (origin ``randint(0, S - size)``) of stream (BLOCK, major b). Returns int32 (num_blocks, 2, ndim)."""
    w = words(seed, index, Purpose.BLOCK, np.arange(num_blocks), 6)
    blocks = np.empty((num_blocks, 2, len(shape)), dtype=np.int32)
    for a, s in enumerate(shape):
        size = randint(w[:, a], 1, s // block_div)
        blocks[:, 0, a] = randint(w[:, 3 + a], 0, s - size)
        blocks[:, 1, a] = size
    return blocks


_EXACT_MAX = 128  # blocks of at most this many voxels get an exact Fisher–Yates; larger ones the Feistel network
_U64_MAX = np.uint64(2**64 - 1)
_LIMB = np.uint64(0xFFFFFFFF)
_WEYL = np.uint32(0x9E3779B9)


def _fraction_limbs(seed, index, majors, calls):
    """The 128-bit fraction of Philox call ``calls`` of streams (BLOCK, ``majors``): four 32-bit limbs, most
    significant first, each in a uint64 array (so that a limb times a radix <= 128, plus a carry, stays exact)."""
    w = stream_blocks(seed, index, Purpose.BLOCK, majors, calls).astype(np.uint64)
    return [w[:, 0], w[:, 1], w[:, 2], w[:, 3]]


def _exact_permutations(seed, index, majors, n):
    """pi of blocks ``majors`` of n <= 128 voxels (the exact case of ``block_permutations``): int64 (len, max n),
    row r's first n[r] entries are its pi, the rest the identity."""
    n_max = int(n.max())
    order = np.tile(np.arange(n_max, dtype=np.int64), (len(n), 1))
    c = np.zeros(len(n), dtype=np.uint64)  # the group: Philox call 2 + c
    u = _fraction_limbs(seed, index, majors, 2)  # the group's fraction, what its digits have left
    prod = np.ones(len(n), dtype=np.uint64)  # the product of the group's radices so far
    for t in range(n_max - 1):  # digit t of every block at once: radix m = n - t, swap position k = m - 1
        r = np.nonzero(n - t >= 2)[0]
        m = (n[r] - t).astype(np.uint64)
        new = r[prod[r] > _U64_MAX // m]  # prod * m >= 2^64: this radix starts the next group
        if len(new):
            c[new] += np.uint64(1)
            for limb, fresh in zip(u, _fraction_limbs(seed, index, majors[new], np.uint64(2) + c[new])):
                limb[new] = fresh
            prod[new] = 1
        prod[r] *= m
        carry = np.zeros(len(r), dtype=np.uint64)  # u * m, from the least significant limb up
        for limb in reversed(u):
            v = limb[r] * m + carry
            limb[r] = v & _LIMB
            carry = v >> np.uint64(32)
        j = carry.astype(np.int64)  # the integer part of u * m: the digit, in [0, m)
        k = n[r] - 1 - t
        order_k, order_j = order[r, k], order[r, j]
        order[r, k] = order_j
        order[r, j] = order_k
    pi = np.empty_like(order)  # the inverse: pi[order[f]] = f
    np.put_along_axis(pi, order, np.arange(n_max, dtype=np.int64)[None, :], axis=1)
    return pi


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 arrays (products mod 2^32)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _feistel_permutations(seed, index, majors, n, k):
    """pi of blocks ``majors`` of n > 128 voxels, all with bit_width(n - 1) = k (the Feistel case of
    ``block_permutations``): the concatenation of their pi's, int64."""
    la = k // 2
    lb = k - la
    ma, mb, shift = np.uint32(2**la - 1), np.uint32(2**lb - 1), np.uint32(lb)
    w = stream_blocks(seed, index, Purpose.BLOCK, majors, 2)
    keys = [w[:, r & 3] + _WEYL * np.uint32(r >> 2) for r in range(8)]  # mod 2^32
    owner = np.repeat(np.arange(len(n)), n)
    x = (np.arange(len(owner)) - np.repeat(np.cumsum(n) - n, n)).astype(np.uint32)  # p, then once(p), ...
    walking = np.arange(len(x))
    while len(walking):  # x = once(x) until x < n
        block = owner[walking]
        y = x[walking]
        left, right = y >> shift, y & mb
        for r in (0, 2, 4, 6):
            left ^= _fmix32(right ^ keys[r][block]) & ma
            right ^= _fmix32(left ^ keys[r + 1][block]) & mb
        x[walking] = (left << shift) | right
        walking = walking[x[walking] >= n[owner[walking]]]
    return x.astype(np.int64)


def block_permutations(seed: int, index: int, blocks) -> list:
    """The permutation pi of every block (docs/randomness.md, "Local-shuffle permutations"): the voxel at block-local
    position p (C order) receives local position pi(p). Block b of n voxels draws from Philox calls 2, 3, … of
    stream (seed, index, BLOCK, major b) (words 0-5 are its geometry, 6 and 7 unused).

    - n <= 128, exact: Durstenfeld with digits in groups. A group's fraction is u = (w0 w1 w2 w3 of call 2 + c) / 2^128.
      Starting with c = 0, prod = 1, for radix m = n, n-1, …, 2: if prod * m >= 2^64, the next group (c += 1, its u,
      prod = 1); then prod *= m, digit = floor(u * m), u = frac(u * m), exactly. From order = identity, for
      k = n-1 … 1 swap order[k] and order[digit of radix k + 1]; pi is the inverse of order: pi[order[f]] = f.
    - n > 128, a Feistel network of 8 rounds, cycle-walked, in uint32: k = bit_width(n - 1), L the high la = k // 2
      bits, R the low lb = k - la; key[r] = w[r & 3] + (r >> 2) * 0x9E3779B9 from call 2; round pair r = 0, 2, 4, 6:
      L ^= fmix32(R ^ key[r]) & (2^la - 1), R ^= fmix32(L ^ key[r+1]) & (2^lb - 1). pi(p) applies it to p until the
      value is < n.

    Returns a list of int64 arrays. Vectorised: the exact case steps all blocks' digits side by side, the Feistel case
    runs every position of the blocks of one k at once."""
    blocks = np.asarray(blocks)
    n = np.prod(blocks[:, 1, :].astype(np.int64), axis=1)
    perms = [None] * len(n)
    exact = np.nonzero(n <= _EXACT_MAX)[0]
    if len(exact):
        pi = _exact_permutations(seed, index, exact, n[exact])
        for row, b in enumerate(exact):
            perms[b] = pi[row, : n[b]]
    width = np.zeros(len(n), dtype=np.int64)  # bit_width(n - 1) of the large blocks
    width[n > _EXACT_MAX] = [int(v - 1).bit_length() for v in n[n > _EXACT_MAX]]
    for k in np.unique(width[width > 0]):
        large = np.nonzero(width == k)[0]
        flat = _feistel_permutations(seed, index, large, n[large], int(k))
        for b, part in zip(large, np.split(flat, np.cumsum(n[large])[:-1])):
            perms[b] = part
    return perms


def noise(seed: int, index: int, shape) -> np.ndarray:
    """Painting noise of one sample of ``shape`` = (C, *spatial): element e (C-order flat index, in output coordinates)
    is ``uniform(word(seed, index, NOISE, e >> 2, e & 3))``. float32 in [0, 1)."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape))
    blocks = stream_blocks(
        seed, index, Purpose.NOISE, np.arange((size + 3) // 4), 0
    )  # word w of major m is element 4m + w
    return uniform(blocks.reshape(-1)[:size]).astype(np.float32).reshape(shape)


def _log_unit(u):
    """log(u) for u in (0, 1], float64: the operations of csrc/gaussian.h, in the same order."""
    m, k = np.frexp(u)  # u = m 2^k, m in [1/2, 1); then m in [sqrt(1/2), sqrt(2))
    low = m < 0.7071067811865476
    m, k = np.where(low, 2.0 * m, m), np.where(low, k - 1, k)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = np.full_like(s, 1.0 / 17.0)
    for j in range(15, 0, -2):
        p = p * s2 + 1.0 / j
    return 2.0 * s * p + k * 0.6931471805599453


def _series(a, inverse_factorials):
    """sum_j c_j a^(2j) in the Horner order of csrc/gaussian.h (highest term first)."""
    a2 = a * a
    p = np.full_like(a, inverse_factorials[-1])
    for c in inverse_factorials[-2::-1]:
        p = p * a2 + c
    return p


_SIN = [
    1.0,
    -1.0 / 6.0,
    1.0 / 120.0,
    -1.0 / 5040.0,
    1.0 / 362880.0,
    -1.0 / 39916800.0,
    1.0 / 6227020800.0,
    -1.0 / 1307674368000.0,
    1.0 / 355687428096000.0,
]
_COS = [
    1.0,
    -1.0 / 2.0,
    1.0 / 24.0,
    -1.0 / 720.0,
    1.0 / 40320.0,
    -1.0 / 3628800.0,
    1.0 / 479001600.0,
    -1.0 / 87178291200.0,
    1.0 / 20922789888000.0,
]


def gaussian(seed: int, index: int, shape) -> np.ndarray:
    """Standard normal values of one sample of ``shape`` = (C, *spatial) (docs/randomness.md, purpose GAUSSIAN): element
    e takes Philox block e >> 2 of the stream, whose words (0, 1) and (2, 3) are two Box–Muller pairs (u1, u2):
    ``sqrt(-2 log(1 - uniform(u1))) * (cos, sin)(2 pi uniform(u2))``, cosine for even e, sine for odd e. float32,
    computed with the kernels' own logarithm and series in float64, so the bits match."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape))
    e = np.arange(size, dtype=np.int64)
    blocks = stream_blocks(seed, index, Purpose.GAUSSIAN, e >> 2, 0)
    pair = (e & 2).astype(np.intp)
    u1 = uniform(np.take_along_axis(blocks, pair[:, None], axis=1)[:, 0])
    u2 = uniform(np.take_along_axis(blocks, pair[:, None] + 1, axis=1)[:, 0])
    radius = np.sqrt(-2.0 * _log_unit(1.0 - u1))
    q = (4.0 * u2).astype(np.int64)
    a = (4.0 * u2 - q) * 1.5707963267948966
    sa, ca = a * _series(a, _SIN), _series(a, _COS)
    cos = np.choose(q, [ca, -sa, -ca, sa])
    sin = np.choose(q, [sa, ca, -sa, -ca])
    return (radius * np.where(e & 1, sin, cos)).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Deformations of one sample (C, *spatial)


def gaussian_noise(x, std, z) -> np.ndarray:
    """x + std * z in float32 (z: ``gaussian(seed, index, x.shape)``)."""
    return (np.asarray(x, dtype=np.float32) + np.float32(std) * np.asarray(z, dtype=np.float32)).astype(np.float32)


def _exp_neg(x: float) -> float:
    """exp(-x) for x in [0, 100]: the operations of csrc/blur.h, in the same order (Python floats are doubles)."""
    n = int(x / 0.6931471805599453 + 0.5)
    t = -(x - n * 0.6931471805599453)
    e = 1.0
    for j in range(13, 0, -1):
        e = 1.0 + t * e / j
    return math.ldexp(e, -n)  # exact: n halvings, far from the subnormal range


def blur_weights(sigma) -> np.ndarray:
    """float32 weights w[0 .. radius] of the blur of standard deviation ``sigma`` (float32, as sample_params gives
    it): exp(-k^2 / (2 sigma^2)) normalised over -radius .. radius in float64, radius = ceil(3 sigma) in [1, 15]."""
    sigma = float(np.float32(sigma))
    radius = min(max(math.ceil(3.0 * sigma), 1), 15)
    two_var = 2.0 * sigma * sigma
    d, total = [1.0], 1.0
    for k in range(1, radius + 1):
        d.append(_exp_neg(float(k * k) / two_var))
        total = total + 2.0 * d[k]
    return np.array([v / total for v in d], dtype=np.float64).astype(np.float32)


def gaussian_blur(x, sigma, dtype=np.float32) -> np.ndarray:
    """Blur of x (C, *spatial) along each spatial axis in turn: out[i] = sum over k = -r .. r, in that order, of
    w[|k|] * x[clamp(i + k)] (``blur_weights(sigma)``). In float32 this is the kernels' arithmetic, bit for bit; with
    ``dtype=np.float64`` it is the float64 reference the float32 result is compared with."""
    w = blur_weights(sigma).astype(dtype)
    r = len(w) - 1
    out = np.asarray(x, dtype=dtype)
    for axis in range(1, out.ndim):
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k in range(-r, r + 1):
            acc = acc + w[abs(k)] * np.take(out, np.clip(np.arange(n) + k, 0, n - 1), axis=axis)
        out = acc
    return out


def _bernstein(s, p1, p2):
    """One coordinate of the cubic Bézier with P0 = 0, P3 = 1: 3(1-s)^2 s p1 + 3(1-s) s^2 p2 + s^3 (exact at 0, 1)."""
    t = 1.0 - s
    return 3.0 * t * t * s * p1 + 3.0 * t * s * s * p2 + s * s * s


def _solve_bx(v, x1, x2):
    """s in [0, 1] with Bx(s) = v for v in (0, 1), to full double precision.

    Bx(s) = ((a s + b) s + c) s is non-decreasing (control values in [0, 1]) with at most isolated flat points.
    1. Bisection brackets the root at the 1025 levels u_j = j / 1024: Bx(A_j) <= u_j <= Bx(B_j).
    2. A value v in [u_j, u_j+1) has its root in [A_j, B_j+1]; linear interpolation there is the first guess.
    3. Safeguarded Newton (Numerical Recipes' rtsafe: a bisection step whenever Newton would leave the bracket or
       fails to halve the step) until f(s) is at rounding level or the step is below one ulp of s (2^-104 absolute
       for s < 2^-52). Converged values leave the working arrays."""
    a, b, c = 1.0 + 3.0 * x1 - 3.0 * x2, 3.0 * x2 - 6.0 * x1, 3.0 * x1

    def bx(s):
        return ((a * s + b) * s + c) * s

    levels = 1024
    u = np.arange(levels + 1) / levels
    lo_u, hi_u = np.zeros_like(u), np.ones_like(u)
    for _ in range(20):  # the brackets stay valid at any depth; depth only sharpens the first guess
        mid = 0.5 * (lo_u + hi_u)
        below = bx(mid) <= u
        lo_u, hi_u = np.where(below, mid, lo_u), np.where(below, hi_u, mid)

    j = np.minimum((v * levels).astype(np.intp), levels - 1)
    lo, hi = lo_u[j], hi_u[j + 1]
    s = lo + (v - u[j]) * levels * (hi - lo)
    result = np.empty_like(v)
    idx = np.arange(v.size)
    dx = hi - lo
    dx_old = dx.copy()
    eps = 2.0**-52
    for _ in range(200):
        f = bx(s) - v
        df = (3.0 * a * s + 2.0 * b) * s + c
        rounding = 4.0 * eps * (((abs(a) * s + abs(b)) * s + c) * s + v)  # |f| below this is indistinguishable from 0
        np.copyto(lo, s, where=f < 0)
        np.copyto(hi, s, where=f > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = f / df
        s_newton = s - newton
        use_newton = (df > 0) & (s_newton >= lo) & (s_newton <= hi) & (np.abs(2.0 * f) <= np.abs(dx_old * df))
        dx_old = dx
        dx = np.where(use_newton, newton, s - 0.5 * (lo + hi))
        at_root = np.abs(f) <= rounding
        dx[at_root] = 0.0
        s -= dx
        # Newton's error after a step dx is |f''| dx^2 / (2 |f'|); accept once it is below a quarter ulp of s
        tiny = np.maximum(s, eps)
        done = at_root | (np.abs(dx) <= eps * tiny)
        done |= use_newton & (np.abs(6.0 * a * s + 2.0 * b) * dx * dx <= 0.5 * eps * df * tiny)
        if done.all():
            result[idx] = s
            return result
        if done.any():
            result[idx[done]] = s[done]
            keep = ~done
            idx, v, s, lo, hi, dx, dx_old = idx[keep], v[keep], s[keep], lo[keep], hi[keep], dx[keep], dx_old[keep]
    result[idx] = s
    return result


def bezier_map(v, ctrl, increasing: bool) -> np.ndarray:
    """Exact non-linear intensity map of spec §1.1, float64: s solves Bx(s) = v (v clamped to [0, 1]); the result is
    By(s) if ``increasing`` else By(1 - s). ``ctrl`` = (x1, y1, x2, y2) in [0, 1]; NaN stays NaN.

    For v > 1/2 the mirrored curve is solved instead: 1 - Bx(1 - t) is the same kind of curve with control values
    (1 - x2, 1 - x1), so t = 1 - s solves it for 1 - v (exact), keeping full precision where Bx flattens at s = 1.
    Near an interior flat point of Bx (x1 -> 1, x2 -> 0) the problem itself is ill-conditioned in float64."""
    x1, y1, x2, y2 = (float(c) for c in ctrl)
    v = np.asarray(v, dtype=np.float64)
    flat = v.reshape(-1)
    s = np.full(flat.shape, np.nan)  # the root, and t = 1 - s computed without cancellation
    t = np.full(flat.shape, np.nan)
    s[flat <= 0.0], t[flat <= 0.0] = 0.0, 1.0
    s[flat >= 1.0], t[flat >= 1.0] = 1.0, 0.0
    lower = np.nonzero((flat > 0.0) & (flat <= 0.5))[0]
    s[lower] = _solve_bx(flat[lower], x1, x2)
    t[lower] = 1.0 - s[lower]
    upper = np.nonzero((flat > 0.5) & (flat < 1.0))[0]
    t[upper] = _solve_bx(1.0 - flat[upper], 1.0 - x2, 1.0 - x1)
    s[upper] = 1.0 - t[upper]
    out = _bernstein(s if increasing else t, y1, y2)
    return out.reshape(v.shape)


def _spatial_slices(box) -> tuple:
    return (slice(None),) + tuple(slice(int(o), int(o) + int(n)) for o, n in zip(box[0], box[1]))


def local_shuffle(x, blocks, perms) -> np.ndarray:
    """Local pixel shuffling: for b = 0, 1, …, block b (origin ``blocks[b, 0]``, size ``blocks[b, 1]``) is filled with
    the ORIGINAL x's voxels of that block, permuted: local position p (C order in the block) receives local position
    ``perms[b][p]``. Later blocks overwrite earlier ones; all channels move together."""
    x = np.asarray(x)
    out = x.copy()
    channels = x.shape[0]
    for box, perm in zip(blocks, perms):
        window = _spatial_slices(box)
        original = x[window].reshape(channels, -1)
        out[window] = original[:, perm].reshape(x[window].shape)
    return out


def _union_mask(spatial_shape, boxes, n) -> np.ndarray:
    mask = np.zeros(spatial_shape, dtype=bool)
    for box in boxes[:n]:
        mask[_spatial_slices(box)[1:]] = True
    return mask


def inpaint(x, holes, n_holes: int, noise) -> np.ndarray:
    """In-painting: voxels inside the union of the first ``n_holes`` holes take the noise value (per channel)."""
    x = np.asarray(x)
    mask = _union_mask(x.shape[1:], holes, n_holes)
    return np.where(mask, noise, x).astype(x.dtype)


def outpaint(x, windows, n_windows: int, noise) -> np.ndarray:
    """Out-painting: voxels outside the union of the first ``n_windows`` windows take the noise value."""
    x = np.asarray(x)
    mask = _union_mask(x.shape[1:], windows, n_windows)
    return np.where(mask, x, noise).astype(x.dtype)


def flip(x, parity) -> np.ndarray:
    """Flip the spatial axes of x (C, *spatial) whose ``parity`` is True (a new array)."""
    x = np.asarray(x)
    axes = tuple(1 + a for a, f in enumerate(parity) if f)
    return np.flip(x, axis=axes).copy() if axes else x.copy()


# The reference of each single op on one sample x (C, *spatial) with global index i and parameters p (derive_params,
# or genesis_ext.sample_params of that sample): the deformation applied unconditionally. The Bézier map is the exact
# float64 map; the others are float32.
_SINGLE_OPS = {
    "bezier_remap": lambda x, seed, i, p: bezier_map(x, p["bezier"], p["increasing"]),
    "local_shuffle": lambda x, seed, i, p: local_shuffle(x, p["blocks"], block_permutations(seed, i, p["blocks"])),
    "inpaint": lambda x, seed, i, p: inpaint(x, p["holes"], p["n_holes"], noise(seed, i, x.shape)),
    "outpaint": lambda x, seed, i, p: outpaint(x, p["windows"], p["n_windows"], noise(seed, i, x.shape)),
    "flip": lambda x, seed, i, p: flip(x, p["flip"]),
    "gaussian_noise": lambda x, seed, i, p: gaussian_noise(x, p["noise_std"], gaussian(seed, i, x.shape)),
    "gaussian_blur": lambda x, seed, i, p: gaussian_blur(x, p["blur_sigma"]),
}


def single_op(op: str, x, seed: int, index: int, params: dict) -> np.ndarray:
    """The reference of ``genesis_ext.<op>`` on one sample ``x`` (C, *spatial) with global index ``index`` and its
    parameters ``params`` (``derive_params(seed, index, ...)``). float32, except the Bézier map: the exact float64 map
    (the kernels promise it within 1e-5)."""
    if op not in _SINGLE_OPS:
        raise ValueError(f"unknown op {op!r}; single ops: {', '.join(_SINGLE_OPS)}")
    return _SINGLE_OPS[op](np.asarray(x, dtype=np.float32), seed, index, params)


def genesis_pair(x, seed: int, index: int, config: DeformConfig | None = None, params: dict | None = None):
    """One Models Genesis training pair of sample x (C, *spatial) with global index ``index``.

    Returns float32 (x_deformed, target): target = flip(x); x_deformed = flip → local shuffle (if 'local') → Bézier map
    (if 'nonlinear') → Gaussian blur (if 'blur') → Gaussian noise (if 'gaussian') → in-painting or out-painting (if
    'paint', by 'inpaint') with ``noise(seed, index, x.shape)``, which is not intensity-transformed. ``params`` defaults
    to ``derive_params(seed, index, x.shape[1:], config)``."""
    config = DeformConfig() if config is None else config
    x = np.asarray(x, dtype=np.float32)
    p = derive_params(seed, index, x.shape[1:], config) if params is None else params
    target = flip(x, p["flip"])
    out = target
    for stage, declared in PAIR_STAGES.items():  # after the flip, each stage whose gate fired, in order
        if declared.gate is not None and p[declared.gate]:
            op = ("inpaint" if p["inpaint"] else "outpaint") if stage == "painting" else stage
            out = _SINGLE_OPS[op](out, seed, index, p).astype(np.float32)
    if out is target:  # no deformation fired: the input is the (flipped) target itself
        out = target.copy()
    return out, target


def genesis_pair_batch(x, seed: int, offset: int = 0, config: DeformConfig | None = None):
    """Training pairs of a batch x (N, C, *spatial): sample n has global index ``offset + n``. Returns stacked float32
    (x_deformed, target). The CPU baseline of the benchmarks."""
    x = np.asarray(x, dtype=np.float32)
    pairs = [genesis_pair(x[n], seed, offset + n, config) for n in range(x.shape[0])]
    return (
        np.stack([p[0] for p in pairs]) if pairs else np.empty_like(x),
        np.stack([p[1] for p in pairs]) if pairs else np.empty_like(x),
    )
