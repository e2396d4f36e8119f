"""The test configs (SCRAMBLED, EDGE), the Philox known answers, and the cases on which the CUDA kernels must equal
the CPU kernels bit for bit, shared by test_cuda.py (a real GPU) and test_emulated.py (the same kernels under
HIP-CPU), so the two cannot drift; test_ops.py and test_build.py take their configs from here too. numpy only.

Every comparison is of float32 bit patterns, every NaN as one NaN (payloads are not part of the promise; only the
Bézier map makes new NaNs, from NaN inputs). The Bézier map is bit-identical too: its body is shared.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

import genesis_ext
from genesis_ext import DeformConfig

SINGLE_OPS = genesis_ext.ops.SINGLE_OPS  # declared once, in config.PAIR_STAGES (checked against the core's)
ALL_OPS = SINGLE_OPS + ("genesis_pair",)
OFFICIAL = (64, 64, 32)

# Every field differs from the default (fits (23, 41, 17): blocks 1..4 per axis, holes 3..8 on the 17-axis).
SCRAMBLED = DeformConfig(
    nonlinear_rate=0.3,
    local_rate=0.7,
    paint_rate=0.6,
    inpaint_rate=0.45,
    outpaint_rate=0.55,
    flip_rate=0.8,
    num_blocks=300,
    block_div=4,
    max_holes=7,
    hole_continue=0.8,
    hole_div_min=5,
    hole_div_max=2,
    max_windows=6,
    window_continue=0.7,
    cut_min_num=2,
    cut_max_num=5,
    cut_den=9,
    margin=1,
    max_flips=5,
    gaussian_noise_rate=0.4,
    noise_std_min=0.02,
    noise_std_max=0.3,
    blur_rate=0.35,
    blur_sigma_min=0.3,
    blur_sigma_max=2.5,
)
# Extremes of the size rules: boxes touching the faces, 8 holes / windows, large shuffle blocks.
EDGE = DeformConfig(
    nonlinear_rate=0.5,
    local_rate=0.5,
    paint_rate=0.8,
    inpaint_rate=0.5,
    outpaint_rate=0.5,
    flip_rate=0.9,
    num_blocks=40,
    block_div=2,
    max_holes=8,
    hole_continue=1.0,
    hole_div_min=3,
    hole_div_max=2,
    max_windows=8,
    window_continue=1.0,
    cut_min_num=1,
    cut_max_num=6,
    cut_den=7,
    margin=0,
    max_flips=8,
    gaussian_noise_rate=1.0,
    noise_std_min=0.0,
    noise_std_max=1.0,
    blur_rate=0.5,
    blur_sigma_min=0.1,
    blur_sigma_max=5.0,
)

# (counter, key) -> output of Philox4x32-10: Random123's known-answer vectors, one file for every test that checks them
PHILOX_KAT = [
    tuple(tuple(int(w, 16) for w in v[part]) for part in ("counter", "key", "output"))
    for v in json.loads((Path(__file__).parent / "philox_kat.json").read_text())["vectors"]
]

# Fixed (seed, offset) pairs of every case: small, 32-bit edges (the batch crosses into the counter's high word), and
# the top of both ranges; case_seed_offsets adds random ones.
SEED_OFFSETS = [(0, 0), (1234, 7), (2**63 + 1, 2**32 - 2), (2**64 - 1, 2**63 - 16)]

# (id, batch shape (N, C, *spatial), config). (23, 41, 17) and (17, 9, 5) are not multiples of the CUDA tile extents.
CASES = [
    ("official", (4, 1, *OFFICIAL), DeformConfig.official()),
    ("official-compat", (4, 1, *OFFICIAL), DeformConfig.official(flip_compat=True)),
    ("official-c3", (2, 3, *OFFICIAL), DeformConfig()),
    ("batch1", (1, 1, *OFFICIAL), DeformConfig()),
    ("odd", (3, 1, 23, 41, 17), DeformConfig()),
    ("odd-c3-scrambled", (3, 3, 23, 41, 17), SCRAMBLED),
    ("odd-c3-scrambled-compat", (3, 3, 23, 41, 17), SCRAMBLED.replace(flip_compat=True)),
    # block_div 3: blocks up to 7 x 13 x 5 = 455 voxels, the Feistel permutations (exact up to 128)
    ("odd-c2-edge", (3, 2, 23, 41, 17), EDGE.replace(block_div=3)),
    # block_div 2: blocks up to 11 x 20 x 8 = 1,760 voxels (the kernels of stream version 1 refused more than 1,024)
    ("odd-edge", (2, 1, 23, 41, 17), EDGE),
    ("tiny-c2-edge", (3, 2, 17, 9, 5), EDGE),
    ("2d-c3", (4, 3, 64, 64), DeformConfig()),
    ("2d-scrambled", (4, 1, 41, 23), SCRAMBLED),
    ("2d-edge", (4, 1, 40, 24), EDGE),
]

# (id, shape, config, offset): more samples than one grid row of tiles, with a seed whose batch takes every branch.
BIG_CASES = [
    ("official", (257, 1, *OFFICIAL), DeformConfig(), 0),
    ("official-crosses-2^32", (257, 1, *OFFICIAL), DeformConfig(), 2**32 - 100),
    ("odd-c2-scrambled", (257, 2, 23, 41, 17), SCRAMBLED, 3),
    ("2d-c3", (257, 3, 64, 64), DeformConfig(), 2**40),
]

# (id, shape, config): the published block rule at large cubes, blocks up to 12x12x6 = 864 and 16x16x16 = 4,096
# voxels (the published code's S // 10 sides); the local shuffle fires on every sample.
LARGE_CASES = [
    ("published-128x128x64", (2, 1, 128, 128, 64), DeformConfig(local_rate=1.0)),
    ("published-160^3", (2, 1, 160, 160, 160), DeformConfig(local_rate=1.0)),
]
LARGE_OPS = ("local_shuffle", "genesis_pair")

# More samples than one launch takes (65,535, the grid's y limit): (id, shape, config, offset), for the ops given.
MULTI_LAUNCH_CASE = (
    "65540-samples",
    (65540, 1, 3, 2),
    DeformConfig(local_rate=0.0, paint_rate=0.0, flip_rate=0.9),
    2**40,
)
MULTI_LAUNCH_OPS = ("flip", "genesis_pair")

# (shape, config) of the non-finite cases, each run at NONFINITE_OFFSETS.
NONFINITE_CASES = [((3, 2, 23, 41, 17), SCRAMBLED), ((2, 1, *OFFICIAL), DeformConfig()), ((3, 3, 40, 24), EDGE)]
NONFINITE_OFFSETS = (0, 40, 2**32 - 1)

# A batch of 24 run as uneven chunks (each at its own offset) equals the whole batch: sample n depends only on
# (seed, offset + n), not on the launch it is in.
SPLIT_CHUNKS = (1, 7, 16)


RANDOM_SEED_OFFSETS = 4
N_SEED_OFFSETS = len(SEED_OFFSETS) + RANDOM_SEED_OFFSETS


def case_seed_offsets(op: str, name: str) -> list[tuple[int, int]]:
    """SEED_OFFSETS and random pairs, N_SEED_OFFSETS in all, stable per (op, case) across runs (hash() is salted,
    crc32 is not)."""
    rng = np.random.default_rng(zlib.crc32(f"{op}/{name}".encode()))
    return SEED_OFFSETS + [
        (int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**40))) for _ in range(RANDOM_SEED_OFFSETS)
    ]


def uniform(shape, seed) -> np.ndarray:
    """float32 uniform [0, 1) values (fixed seed)."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def make_input(shape, seed) -> np.ndarray:
    """A float32 batch; with 3 channels they are (x, 2x, -x): exact in float32, only 1/3 of them in [0, 1]."""
    n, c, *spatial = shape
    if c == 3:
        base = uniform((n, 1, *spatial), seed)
        return np.ascontiguousarray(np.concatenate([base, 2 * base, -base], axis=1))
    return uniform(shape, seed)


def case_input(name: str, shape) -> np.ndarray:
    return make_input(shape, seed=zlib.crc32(name.encode()))


def with_special_values(x: np.ndarray, seed) -> np.ndarray:
    """A copy of x with 1/8 of its values NaN, ±Inf, ±0, out of [0, 1], subnormal or huge."""
    special = np.array(
        [np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, -0.5, 1.5, 1e-45, -1e-45, 3e38, -3e38, 1e-30, 0.99999994],
        dtype=np.float32,
    )
    x = x.copy()
    flat = x.reshape(-1)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(flat.size)[: flat.size // 8]
    flat[idx] = special[rng.integers(len(special), size=len(idx))]
    return x


def branch_covering_seed(batch, spatial, config, offset=0, start=1000) -> int:
    """The first seed >= start whose samples offset .. offset+batch-1 take every branch of the pair (local x
    nonlinear x {no paint, in-, out-painting}), so a pair comparison over the batch covers the whole kernel."""
    for seed in range(start, start + 500):
        p = genesis_ext.sample_params(batch, spatial, seed=seed, offset=offset, config=config, with_blocks=False)
        kind = np.where(p["paint"], np.where(p["inpaint"], 1, 2), 0)
        if len(set(zip(p["local"].tolist(), p["nonlinear"].tolist(), kind.tolist()))) == 12:
            return seed
    raise AssertionError(f"no seed in [{start}, {start + 500}) covers every branch with batch {batch}")


def outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def bit_mismatch(got: np.ndarray, want: np.ndarray, what: str) -> str | None:
    """None when got and want have the same shape and float32 bits (NaN where NaN), else what differs and where."""
    if got.dtype != np.float32 or want.dtype != np.float32:
        return f"{what}: dtypes {got.dtype} and {want.dtype}, expected float32"
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    g, w = got.view(np.uint32).copy(), want.view(np.uint32).copy()
    g[np.isnan(got)] = w[np.isnan(want)] = 0x7FC00000
    differ = g != w
    if not differ.any():
        return None
    first = tuple(int(i) for i in np.argwhere(differ)[0])
    both = differ & np.isfinite(got) & np.isfinite(want)
    worst = float(np.abs(got[both].astype(np.float64) - want[both]).max()) if both.any() else float("nan")
    return (
        f"{what}: {int(differ.sum())} of {differ.size} values differ from the CPU kernel; first at {first}: got "
        f"{float(got[first])!r}, CPU {float(want[first])!r}; max finite |diff| {worst:.3g}"
    )


def philox_inputs(n_random: int = 1000, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """uint32 counters (n, 4) and keys (n, 2): the Random123 known-answer inputs, then ``n_random`` random pairs."""
    rng = np.random.default_rng(seed)
    n = len(PHILOX_KAT) + n_random
    ctr = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    for j, (c, k, _) in enumerate(PHILOX_KAT):
        ctr[j], key[j] = c, k
    return ctr, key


def assert_philox_outputs(got: np.ndarray, ctr: np.ndarray, key: np.ndarray) -> None:
    """``got`` (n, 4) holds the known answers first, then the CPU core's outputs for every (counter, key)."""
    for j, (_, _, expected) in enumerate(PHILOX_KAT):
        assert tuple(int(v) for v in got[j]) == expected, j
    want = np.array([genesis_ext._C.philox4x32_10(c.tolist(), k.tolist()) for c, k in zip(ctr, key)], dtype=np.uint32)
    assert np.array_equal(got, want)
