"""The random streams of docs/randomness.md, declared once: Philox4x32-10, the stream of ``(seed, sample index,
purpose, major)``, its words' conversions to numbers, and the purpose of every stream family.

Every random quantity of the package is a word of one stream, so it is a pure function of the seed and the global
sample index, whatever the batch split or device. ``Purpose`` mirrors the compiled core's table (csrc/philox.h
``GENESIS_PURPOSES``); ``genesis_ext.ops`` checks the two at import. The kernels, the NumPy reference, the user
deformations (``Purpose.USER``) and ``GenesisDeform``'s coin (``Purpose.DEFORM_PROB``) all draw from here.

``STREAM_VERSION`` numbers the rules that turn these words into deformations; it changes when the same seed and
index give other deformations. ``sample_params`` and pre-training checkpoints record it, and ``--resume`` refuses a
run written with another version.
"""

from __future__ import annotations

import enum

import numpy as np

# The version of the random streams (docs/randomness.md, "Stream versions"): which deformation a seed and a sample
# index give. A change that moves any drawn quantity gets a new version.
#   1: every release before versions were recorded. Block b's local-shuffle permutation is a Fisher-Yates shuffle
#      drawn from BLOCK words 6, 7, ...; the CUDA kernels held it in a per-thread array of at most 1,024 voxels.
#   2: the permutation uses Philox calls 2, 3, ... of BLOCK stream b (words 6 and 7 unused): exact Durstenfeld digits
#      drawn in groups for blocks of up to 128 voxels, an 8-round Feistel network cycle-walked onto the block beyond;
#      each voxel traces its own source, so the CUDA kernels take blocks of any size.
STREAM_VERSION = 2


class Purpose(enum.IntEnum):
    """One stream family per kind of random quantity (docs/randomness.md); the counter's third word holds it."""

    GATES = 1  # the per-sample gates of the pair's stages
    FLIP = 2
    BEZIER = 3
    BLOCK = 4  # one stream per shuffle block (major = block index)
    INPAINT = 5
    OUTPAINT = 6
    NOISE = 7  # painting's uniform noise (major = element // 4)
    NOISE_STD = 8  # the Gaussian noise's standard deviation
    GAUSSIAN = 9  # the Gaussian noise's normal values
    DEFORM_PROB = 10  # GenesisDeform's coin (major = crc32 of the op's name)
    BLUR_SIGMA = 11
    USER = 12  # a user deformation's gate and uniforms (major = crc32 of its name)


_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(ctr, key):
    """Philox4x32-10 (Salmon et al., SC'11): uint32 counters ``(..., 4)`` and keys ``(..., 2)`` (broadcastable)
    -> uint32 ``(..., 4)``. Vectorised with exact 64-bit products."""
    ctr = np.asarray(ctr, dtype=np.uint32).astype(np.uint64)
    key = np.asarray(key, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3]
    k0, k1 = key[..., 0], key[..., 1]
    for rnd in range(10):
        if rnd > 0:  # the key is bumped between rounds
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0  # (hi0, lo0)
        p1 = _M1 * c2  # (hi1, lo1)
        c0, c1, c2, c3 = (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def check_seed_index(seed: int, index: int) -> None:
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= int(index) < 2**63:
        raise ValueError(f"sample index must be in [0, 2**63), got {index}")


def stream_blocks(seed: int, index: int, purpose: int, major, call):
    """Philox blocks of streams (seed, index, purpose, major): call c holds words 4c .. 4c+3. Shape (..., 4)."""
    check_seed_index(seed, index)
    seed, index = int(seed), int(index)
    major = np.asarray(major, dtype=np.uint64)
    call = np.asarray(call, dtype=np.uint64)
    if np.any(call >= 2**24) or np.any(major >= 2**32):
        raise ValueError("word index must be < 2**26 and major < 2**32")
    major, call = np.broadcast_arrays(major, call)
    ctr = np.empty(major.shape + (4,), dtype=np.uint64)
    ctr[..., 0] = index & 0xFFFFFFFF
    ctr[..., 1] = index >> 32
    ctr[..., 2] = np.uint64(purpose) | (call << np.uint64(8))
    ctr[..., 3] = major
    return philox4x32_10(ctr, [seed & 0xFFFFFFFF, seed >> 32])


def sample_words(seed: int, offset: int, n: int, purpose: int, major: int, n_words: int) -> np.ndarray:
    """Words 0 .. n_words-1 of the streams (seed, i, purpose, major) of samples i = offset .. offset + n - 1:
    (n, n_words) uint32, one vectorised Philox call."""
    check_seed_index(seed, offset)
    check_seed_index(seed, int(offset) + max(int(n) - 1, 0))
    index = np.arange(int(n), dtype=np.uint64) + np.uint64(int(offset))
    n_calls = (int(n_words) + 3) // 4
    ctr = np.empty((int(n), n_calls, 4), dtype=np.uint64)
    ctr[..., 0] = (index & _MASK32)[:, None]
    ctr[..., 1] = (index >> _SHIFT32)[:, None]
    ctr[..., 2] = np.uint64(purpose) | (np.arange(n_calls, dtype=np.uint64) << np.uint64(8))
    ctr[..., 3] = np.uint64(major)
    blocks = philox4x32_10(ctr, [int(seed) & 0xFFFFFFFF, int(seed) >> 32])
    return blocks.reshape(int(n), 4 * n_calls)[:, : int(n_words)]


def word(seed: int, index: int, purpose: int, major, w):
    """Word ``w`` of stream ``(seed, index, purpose, major)``: ``philox4x32_10(ctr, key)[w & 3]`` with
    ``key = (seed mod 2^32, seed >> 32)`` and ``ctr = (index mod 2^32, index >> 32, purpose | (w >> 2) << 8, major)``.
    Vectorised over ``major`` and ``w`` (broadcast); returns uint32."""
    major = np.asarray(major, dtype=np.uint64)
    w = np.asarray(w, dtype=np.uint64)
    major, w = np.broadcast_arrays(major, w)
    block = stream_blocks(seed, index, purpose, major, w >> np.uint64(2))
    return np.take_along_axis(block, (w & np.uint64(3)).astype(np.intp)[..., None], axis=-1)[..., 0][()]


def words(seed: int, index: int, purpose: int, major, n_words: int):
    """Words 0 .. n_words-1 of the streams ``major`` (array): shape ``major.shape + (n_words,)``, uint32."""
    major = np.asarray(major, dtype=np.uint64)
    n_calls = (n_words + 3) // 4
    blocks = stream_blocks(seed, index, purpose, major[..., None], np.arange(n_calls, dtype=np.uint64))
    return blocks.reshape(major.shape + (4 * n_calls,))[..., :n_words]


def uniform(u32):
    """``(u32 >> 8) * 2^-24`` as float64: a value in [0, 1), exact in float32 and float64."""
    return (np.asarray(u32, dtype=np.uint32) >> np.uint32(8)).astype(np.float64) * 2.0**-24


def randint(u32, a, b):
    """Integer in [a, b] (inclusive): ``a + ((u32 * (b - a + 1)) >> 32)`` with a 64-bit product. Returns int64."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    span = b - a + 1
    if np.any(span < 1) or np.any(span > 2**32):
        raise ValueError(f"randint needs 1 <= b - a + 1 <= 2**32, got a={a}, b={b}")
    u = np.asarray(u32, dtype=np.uint32).astype(np.uint64)
    return (a + ((u * span.astype(np.uint64)) >> _SHIFT32).astype(np.int64))[()]
