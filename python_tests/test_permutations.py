"""The local shuffle's block permutations (docs/randomness.md, stream version 2) against the uniform law.

`_C.shuffle_sources` evaluates `shuffle_source`, the per-voxel body the CUDA kernels run (the CPU loop equals it on
every kernel case: test_emulated.py). Blocks of up to 128 voxels are exact by construction (every digit tuple within
2^-64 of uniform), blocks beyond use an 8-round Feistel network, which is not exactly uniform: these tests state how
close it is. Each statistic has an exact law for uniform permutations; the seed is fixed, so a pass is reproducible.
Tolerance: a p-value above 1e-4 (chi-square tests), or 4.5 standard errors (moment tests): about 1e-5 false alarms
per check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from genesis_ext import _C

SEED, SAMPLE = 0x5EED2025, 7
P_MIN, Z_MAX = 1e-4, 4.5


def permutations(n: int, blocks: int, first: int = 0) -> np.ndarray:
    """pi of blocks first .. first+blocks-1, each of n voxels: (blocks, n), row b maps position p to its source."""
    return _C.shuffle_sources(SEED, SAMPLE, list(range(first, first + blocks)), n)


def assert_bijections(pi: np.ndarray) -> None:
    assert (np.sort(pi, axis=1) == np.arange(pi.shape[1])).all(), "a block's sources are not a permutation"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_every_arrangement_of_small_blocks_is_equally_likely(n):
    """All n! permutations over 200,000 blocks: Pearson's chi-square on n! - 1 degrees of freedom."""
    pi = permutations(n, 200_000)
    assert_bijections(pi)
    code = pi @ (n ** np.arange(n))  # base-n number of each permutation
    counts = np.unique(code, return_counts=True)[1]
    assert len(counts) == math.factorial(n), f"n={n}: only {len(counts)} of {math.factorial(n)} permutations occur"
    p = stats.chisquare(counts).pvalue
    print(f"\nn={n}: chi-square p {p:.3g}")
    assert p > P_MIN, f"n={n}: permutation frequencies are not uniform (p = {p:.2e})"


def moment_zscores(pi: np.ndarray) -> dict[str, float]:
    """z-scores of the fixed points' mean and variance and of the Spearman footrule's mean and variance, against
    their laws for uniform permutations of n (fixed points: mean 1, variance 1, fourth central moment 4 from n >= 4;
    footrule sum |pi(p) - p|: mean (n^2 - 1) / 3, variance (n + 1)(2n^2 + 7) / 45, near normal for large n)."""
    blocks, n = pi.shape
    fixed = (pi == np.arange(n)).sum(axis=1).astype(np.float64)
    foot = np.abs(pi - np.arange(n)).sum(axis=1).astype(np.float64)
    foot_mean, foot_var = (n * n - 1) / 3, (n + 1) * (2 * n * n + 7) / 45
    return {
        "fixed mean": (fixed.mean() - 1) / math.sqrt(1 / blocks),
        "fixed variance": (fixed.var() - 1) / math.sqrt(3 / blocks),
        "footrule mean": (foot.mean() - foot_mean) / math.sqrt(foot_var / blocks),
        "footrule variance": (foot.var() / foot_var - 1) / math.sqrt(2 / blocks),
    }


def position_pvalue(pi: np.ndarray) -> float:
    """Where each position's source lands: the n x n counts of (p, pi(p)). For uniform permutations the sum of
    (count - B/n)^2 / (B/n) times (n - 1) / n is chi-square with (n - 1)^2 degrees of freedom."""
    blocks, n = pi.shape
    counts = np.zeros((n, n))
    np.add.at(counts, (np.broadcast_to(np.arange(n), pi.shape), pi), 1)
    expected = blocks / n
    statistic = ((counts - expected) ** 2 / expected).sum() * (n - 1) / n
    return float(stats.chi2.sf(statistic, (n - 1) ** 2))


# (n, blocks): exact sizes around the group boundaries (20! < 2^64 < 21!) up to the largest exact block, then
# Feistel blocks from the smallest (129: 8 bits) to the published rule's largest at 160^3 (16x16x16 = 4,096).
EXACT = [(7, 200_000), (12, 100_000), (20, 100_000), (21, 100_000), (27, 50_000), (64, 20_000), (108, 20_000),
         (128, 20_000)]  # fmt: skip
FEISTEL = [(129, 100_000), (256, 100_000), (864, 20_000), (4096, 5_000)]


@pytest.mark.parametrize("n, blocks", EXACT + FEISTEL, ids=[f"n{n}" for n, _ in EXACT + FEISTEL])
def test_larger_blocks_match_the_uniform_law(n, blocks):
    pi = permutations(n, blocks)
    assert_bijections(pi)
    z = moment_zscores(pi)
    p = position_pvalue(pi) if n <= 256 else None
    print(f"\nn={n}: " + ", ".join(f"{k} z {v:+.2f}" for k, v in z.items()) + (f", positions p {p:.3g}" if p else ""))
    assert all(abs(v) < Z_MAX for v in z.values()), f"n={n}: {z}"
    assert p is None or p > P_MIN, f"n={n}: positions p = {p:.2e}"


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 130, 255, 256, 257, 1000, 4095, 4096, 4097])
def test_every_block_size_gives_a_permutation(n):
    assert_bijections(permutations(n, 50))


def test_blocks_and_samples_are_independent():
    """Different blocks, and the same block of another sample, get different permutations (n = 50: exact; 300:
    Feistel); the same (seed, sample, block) always the same."""
    for n in (50, 300):
        a = permutations(n, 100)
        assert len({row.tobytes() for row in a}) == 100
        other = _C.shuffle_sources(SEED, SAMPLE + 1, list(range(100)), n)
        assert not (other == a).all(axis=1).any()
        assert np.array_equal(permutations(n, 100), a)
