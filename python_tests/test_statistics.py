"""Distributions of the deformations against figures measured on the published Models Genesis code and against
the exact probabilities the recipe implies.

Probabilities are checked within 4 binomial standard deviations (false alarm ~6e-5 per check; the seeds are fixed, so
a pass is reproducible). Figures the spec gives as measured means get a band that this test justifies next to it.
Run with ``-s`` to see the measured values.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import genesis_ext
from genesis_ext import DeformConfig

N_PARAMS = 5000
CUBE = (64, 64, 32)


def within_4_sigma(count, n, p, what):
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4 * sigma + 1e-9, f"{what}: {count}/{n} = {count / n:.4f}, expected {p:.4f}"


def union_fraction(spatial, boxes, n):
    mask = np.zeros(spatial, dtype=bool)
    for origin, size in boxes[:n]:
        mask[tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))] = True
    return mask


@pytest.fixture(scope="module")
def params():
    return genesis_ext.sample_params(N_PARAMS, CUBE, seed=1906, offset=0, with_blocks=False)


# ---------------------------------------------------------------------------------------------------------------------
# Gates and branches (spec §1, §2)


def test_gate_rates(params):
    n = N_PARAMS
    within_4_sigma(params["nonlinear"].sum(), n, 0.9, "non-linear gate")
    within_4_sigma(params["local"].sum(), n, 0.5, "local-shuffle gate")
    within_4_sigma(params["paint"].sum(), n, 0.9, "paint gate")
    within_4_sigma(params["inpaint"].sum(), n, 0.2, "in-painting choice")
    within_4_sigma(params["increasing"].sum(), n, 0.5, "increasing Bézier branch")
    # the gates are independent draws
    within_4_sigma((params["local"] & params["nonlinear"]).sum(), n, 0.45, "local and non-linear")


def test_branch_probabilities(params):
    """Per sample: no painting 0.10, in-painting 0.18, out-painting 0.72; pure autoencoder 0.005 (spec §2)."""
    n, p = N_PARAMS, params
    within_4_sigma((~p["paint"]).sum(), n, 0.10, "no painting")
    within_4_sigma((p["paint"] & p["inpaint"]).sum(), n, 0.18, "in-painting")
    within_4_sigma((p["paint"] & ~p["inpaint"]).sum(), n, 0.72, "out-painting")
    within_4_sigma((~p["paint"] & ~p["local"] & ~p["nonlinear"]).sum(), n, 0.005, "pure autoencoder")


def test_bezier_control_points_are_uniform(params):
    ctrl = params["bezier"]
    assert ((ctrl >= 0) & (ctrl < 1)).all()
    for j in range(4):
        counts = np.histogram(ctrl[:, j], bins=10, range=(0, 1))[0]
        for b, c in enumerate(counts):
            within_4_sigma(c, N_PARAMS, 0.1, f"control value {j} in bin {b}")
    assert abs(np.corrcoef(ctrl.T)[np.triu_indices(4, 1)]).max() < 4 / np.sqrt(N_PARAMS)


def _flip_parity_distribution(ndim, compat, rate=0.4, max_flips=3):
    """Exact distribution of the net flip parity vector: flips k = 1, 2, ... continue w.p. `rate` (at most
    max_flips); each flips a uniform spatial axis, or compat: a uniform axis of (C, X, Y), C being a no-op."""
    axes = [None, 0, 1] if compat else list(range(ndim))
    dist = {}
    for k in range(max_flips + 1):
        p_k = rate**k * (1 - rate if k < max_flips else 1.0)
        for seq in itertools.product(axes, repeat=k):
            parity = [False] * ndim
            for a in seq:
                if a is not None:
                    parity[a] = not parity[a]
            key = tuple(parity)
            dist[key] = dist.get(key, 0.0) + p_k / len(axes) ** k
    return dist


@pytest.mark.parametrize("spatial", [CUBE, (64, 64)], ids=["3d", "2d"])
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_flip_parity_distribution(spatial, compat):
    config = DeformConfig.official(flip_compat=compat)
    flips = genesis_ext.sample_params(N_PARAMS, spatial, seed=77, config=config, with_blocks=False)["flip"]
    expected = _flip_parity_distribution(len(spatial), compat)
    assert abs(sum(expected.values()) - 1) < 1e-12
    observed = {}
    for row in map(tuple, flips.tolist()):
        observed[row] = observed.get(row, 0) + 1
    assert set(observed) <= set(expected)
    for key, p in expected.items():
        within_4_sigma(observed.get(key, 0), N_PARAMS, p, f"flip parity {key}")
    if compat and len(spatial) == 3:
        assert not flips[:, 2].any()  # the published draw never flips Z
    else:
        assert flips[:, -1].any()
    # P(no net flip): no flip at all, or two flips on the same axis, or compat no-op draws
    assert observed[(False,) * len(spatial)] > 0.6 * N_PARAMS


def test_single_flip_op_follows_the_parity(rng):
    """The flip op applies exactly the drawn parity (also checked voxel-wise against the oracle in test_ops)."""
    x = rng.random((512, 1, 4, 5, 6), dtype=np.float32)
    out = genesis_ext.flip(x, seed=3)
    parity = genesis_ext.sample_params(512, (4, 5, 6), seed=3, with_blocks=False)["flip"]
    for n in range(512):
        axes = tuple(1 + a for a in range(3) if parity[n, a])
        assert np.array_equal(out[n], np.flip(x[n], axes) if axes else x[n])
    assert len({tuple(r) for r in parity.tolist()}) == 8


# ---------------------------------------------------------------------------------------------------------------------
# Painting geometry (spec §1.3, §1.4)


def test_hole_and_window_counts(params):
    n = N_PARAMS
    holes, windows = np.bincount(params["n_holes"], minlength=6), np.bincount(params["n_windows"], minlength=6)
    assert len(holes) == 6 and len(windows) == 6 and windows[0] == 0
    for k in range(6):  # k holes w.p. 0.95^k 0.05 (k < 5), 5 holes w.p. 0.95^5
        within_4_sigma(holes[k], n, 0.95**k * (0.05 if k < 5 else 1.0), f"{k} holes")
    for k in range(1, 6):  # 1 window, then up to 4 more while U() < 0.95
        within_4_sigma(windows[k], n, 0.95 ** (k - 1) * (0.05 if k < 5 else 1.0), f"{k} windows")
    print(
        f"\nmean holes {params['n_holes'].mean():.3f} (spec ~4.3), mean windows {params['n_windows'].mean():.3f} "
        f"(spec ~4.52)"
    )
    assert abs(params["n_holes"].mean() - 4.30) < 0.05 and abs(params["n_windows"].mean() - 4.52) < 0.05


def test_hole_and_window_geometry(params):
    """Sizes per axis: holes S//6 .. S//3 (64: 10..21, 32: 5..10), windows S - (3S//7 .. 4S//7) (64: 28..37,
    32: 14..19); every box keeps a 3-voxel margin from every face. Every size in range occurs."""
    S = np.array(CUBE)
    for key, count, lo, hi in (
        ("holes", "n_holes", S // 6, S // 3),
        ("windows", "n_windows", S - 4 * S // 7, S - 3 * S // 7),
    ):
        used = np.arange(params[key].shape[1])[None, :] < params[count][:, None]
        boxes = params[key][used]  # (boxes, 2, 3)
        origin, size = boxes[:, 0], boxes[:, 1]
        assert (size >= lo).all() and (size <= hi).all(), key
        assert (origin >= 3).all() and (origin + size <= S - 3).all(), key
        for a in range(3):
            assert set(np.unique(size[:, a])) == set(range(lo[a], hi[a] + 1)), (key, a)
        assert not params[key][~used].any()  # unused slots are zero


def test_inpainted_and_kept_fractions(params):
    """Spec: mean 5.6% of voxels in-painted (max ~10%); out-painting keeps mean 31.5% (min 9%, max 43%).
    Our draws follow the spec's size rules, so the means must agree closely: +-0.3 and +-1 percentage points
    (about 10 and 15 standard errors here), which still catches an off-by-one in any size or origin range
    (e.g. hole sizes 10..20 instead of 10..21 lower the mean by ~0.7 points)."""
    inpainted = np.array([union_fraction(CUBE, h, k).mean() for h, k in zip(params["holes"], params["n_holes"])])
    kept = np.array([union_fraction(CUBE, w, k).mean() for w, k in zip(params["windows"], params["n_windows"])])
    print(
        f"\nin-painted fraction: mean {inpainted.mean():.4f} (spec 0.056), max {inpainted.max():.4f}; "
        f"out-painting kept fraction: mean {kept.mean():.4f} (spec 0.315), min {kept.min():.4f}, "
        f"max {kept.max():.4f}"
    )
    assert abs(inpainted.mean() - 0.056) < 0.003
    assert abs(kept.mean() - 0.315) < 0.010
    # hard bounds: 5 holes of at most 21x21x10; one window of at least 28x28x14, inside the 3-voxel shell
    assert inpainted.max() <= 5 * 21 * 21 * 10 / 131072 and 0.08 < inpainted.max() < 0.13
    assert 28 * 28 * 14 / 131072 <= kept.min() < 0.12 and 0.40 < kept.max() <= 58 * 58 * 26 / 131072


@pytest.mark.parametrize("op", ("inpaint", "outpaint"))
def test_kernel_paints_exactly_the_boxes(op, rng):
    """On noise input, the changed voxels of a batch are exactly the painted geometry (every channel)."""
    n = 24
    x = rng.random((n, 2, *CUBE), dtype=np.float32)
    out = getattr(genesis_ext, op)(x, seed=1906, offset=0)
    p = genesis_ext.sample_params(n, CUBE, seed=1906, offset=0, with_blocks=False)
    fractions = []
    for i in range(n):
        if op == "inpaint":
            mask = union_fraction(CUBE, p["holes"][i], p["n_holes"][i])
        else:
            mask = ~union_fraction(CUBE, p["windows"][i], p["n_windows"][i])
        changed = out[i] != x[i]
        assert np.array_equal(changed[0], mask) and np.array_equal(changed[1], mask)
        fractions.append(mask.mean())
    print(f"\n{op}: kernel-painted fraction over {n} cubes: mean {np.mean(fractions):.4f}")


# ---------------------------------------------------------------------------------------------------------------------
# Local shuffling (spec §1.2)


def _coverage(blocks, spatial):
    counts = np.zeros(spatial, dtype=np.int32)
    for origin, size in blocks:
        counts[tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))] += 1
    return counts


def test_block_geometry_and_coverage():
    """Block sizes 1..S//10 (64: 1..6, 32: 1..3), inside the cube; mean volume 24.5 (exactly 3.5 * 3.5 * 2);
    ~82% of voxels in >= 1 block and ~55% in >= 2 (spec, measured on the reference)."""
    p = genesis_ext.sample_params(6, CUBE, seed=4, offset=0)
    blocks = p["blocks"].reshape(-1, 2, 3)
    origin, size = blocks[:, 0], blocks[:, 1]
    S = np.array(CUBE)
    assert (size >= 1).all() and (size <= S // 10).all() and (origin >= 0).all() and (origin + size <= S).all()
    for a in range(3):
        assert set(np.unique(size[:, a])) == set(range(1, S[a] // 10 + 1))
    volume = size.prod(axis=1)
    sem = volume.std() / np.sqrt(len(volume))
    assert abs(volume.mean() - 24.5) < 4 * sem, volume.mean()
    cover = np.stack([_coverage(b, CUBE) for b in p["blocks"]])
    once, twice = (cover >= 1).mean(), (cover >= 2).mean()
    print(f"\nblocks: mean volume {volume.mean():.2f}; voxels in >= 1 block {once:.3f}, >= 2 blocks {twice:.3f}")
    assert abs(once - 0.82) < 0.01 and abs(twice - 0.55) < 0.015


def _changed_fraction_and_coverage(x, seed):
    out = genesis_ext.local_shuffle(x, seed=seed)
    p = genesis_ext.sample_params(x.shape[0], x.shape[2:], seed=seed, offset=0)
    changed = (out != x).any(axis=1)
    for i in range(x.shape[0]):  # exact: a voxel outside every block keeps its value
        covered = _coverage(p["blocks"][i], x.shape[2:]) > 0
        assert not (changed[i] & ~covered).any()
    return changed.reshape(x.shape[0], -1).mean(axis=1)


def test_shuffle_changed_fraction_on_noise(rng):
    """Spec: about 78-79% of voxel values change (distinct values, so a voxel changes iff its source differs)."""
    fractions = _changed_fraction_and_coverage(rng.random((12, 1, *CUBE), dtype=np.float32), seed=21)
    print(
        f"\nlocal shuffle, noise cubes: changed fraction mean {fractions.mean():.4f}, "
        f"range {fractions.min():.4f} .. {fractions.max():.4f}"
    )
    assert 0.775 <= fractions.mean() <= 0.795 and fractions.min() > 0.76 and fractions.max() < 0.81


def test_shuffle_changes_as_many_voxels_as_uniform_permutations_do():
    """Fidelity to the published deformation: a voxel owned by a block of n voxels keeps its own value with
    probability 1/n under a uniform permutation, so the geometry alone gives the expected changed fraction (about
    0.786 at 64x64x32, the published code's figure). On 20 noise cubes the kernel's count must be within 4.5
    standard deviations of it (fixed points of a uniform permutation are nearly uncorrelated: Cov = 1/(n^2 (n-1)))."""
    x = np.random.default_rng(5).random((20, 1, *CUBE), dtype=np.float32)
    changed = (genesis_ext.local_shuffle(x, seed=33) != x).sum()
    p = genesis_ext.sample_params(len(x), CUBE, seed=33, offset=0)
    expected = variance = 0.0
    for blocks in p["blocks"]:
        keep = np.ones(CUBE)  # 1/n of each voxel's owner (the last block covering it), 1 where none: unchanged
        for origin, size in blocks:
            keep[tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))] = 1 / size.prod()
        expected += (1 - keep).sum()
        variance += (keep * (1 - keep)).sum()
    print(f"\nchanged fraction {changed / x.size:.5f}, uniform permutations {expected / x.size:.5f}")
    assert abs(changed - expected) < 4.5 * np.sqrt(variance), (changed, expected, np.sqrt(variance))


def test_shuffle_changed_fraction_on_ct(ct_cubes):
    """On real CT a moved voxel keeps its value when its source has the same HU (quantised to 1/2000, and clipped
    air/bone saturate at 0 and 1), so fewer voxels change than on noise, but not many fewer: neighbouring CT voxels
    rarely share an exact HU value outside saturated regions. Band: at least 60% (the cubes contain some air and
    homogeneous tissue) and at most the noise figure's upper end."""
    fractions = _changed_fraction_and_coverage(ct_cubes, seed=21)
    noise = _changed_fraction_and_coverage(np.random.default_rng(0).random(ct_cubes.shape, dtype=np.float32), 21)
    print(
        f"\nlocal shuffle, {len(ct_cubes)} CT cubes: changed fraction mean {fractions.mean():.4f}, "
        f"range {fractions.min():.4f} .. {fractions.max():.4f} (same blocks on noise: {noise.mean():.4f})"
    )
    assert 0.60 <= fractions.mean() <= 0.795
    assert (fractions <= noise + 1e-9).all()  # same blocks and permutations: equal values can only hide changes


def test_pair_on_ct_stays_in_unit_range(ct_cubes):
    """CT cubes are in [0, 1]; flips and shuffles move values, the Bézier map sends [0, 1] into [0, 1] (within its
    tolerance), painting noise is in [0, 1)."""
    xd, tg = genesis_ext.genesis_pair(ct_cubes, seed=8)
    assert xd.min() >= -1e-5 and xd.max() <= 1 + 1e-5
    assert np.array_equal(np.sort(tg, axis=None), np.sort(ct_cubes, axis=None))  # the target is a flip
    assert (np.abs(xd - tg).reshape(len(ct_cubes), -1).max(axis=1) > 0).mean() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian noise (not in the published recipe; a pixel-level deformation the paper names)


def test_gaussian_noise_values_are_standard_normal():
    """With std fixed at 1, gaussian_noise on zeros returns the kernel's normal values themselves: mean 0, variance
    1, the normal CDF at 9 quantiles (within 4 binomial sigma), the cosine and sine of a Box–Muller pair uncorrelated,
    and independent across channels and samples."""
    n_samples, shape = 8, (2, 64, 64, 32)
    config = DeformConfig(noise_std_min=1.0, noise_std_max=1.0)
    z = genesis_ext.gaussian_noise(np.zeros((n_samples, *shape), np.float32), seed=77, config=config)
    v = z.astype(np.float64).reshape(-1)
    n = v.size
    assert abs(v.mean()) <= 4 / np.sqrt(n) and abs(v.var() - 1) <= 4 * np.sqrt(2 / n), (v.mean(), v.var())
    from math import erf, sqrt

    for q in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):
        within_4_sigma(int((v <= q).sum()), n, 0.5 * (1 + erf(q / sqrt(2))), f"P(z <= {q})")
    pairs = v.reshape(-1, 2)  # elements 2k, 2k+1: cosine and sine of one pair
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) <= 4 / np.sqrt(len(pairs))
    assert abs(np.corrcoef(z[:, 0].reshape(-1), z[:, 1].reshape(-1))[0, 1]) <= 4 / np.sqrt(n / 2)
    assert abs(np.corrcoef(z[0].reshape(-1), z[1].reshape(-1))[0, 1]) <= 4 / np.sqrt(n / n_samples)


@pytest.mark.parametrize(
    "gate, rate, value, low, high",
    [("gaussian", "gaussian_noise_rate", "noise_std", 0.05, 0.25), ("blur", "blur_rate", "blur_sigma", 0.5, 2.5)],
)
def test_gate_and_parameter_distribution_of_noise_and_blur(gate, rate, value, low, high):
    """Gate frequency 0.3 and the parameter uniform in [low, high] (each quarter of the range holds a quarter of the
    samples); off in the published recipe."""
    config = DeformConfig(**{rate: 0.3, f"{value}_min": low, f"{value}_max": high})
    p = genesis_ext.sample_params(N_PARAMS, CUBE, seed=5, config=config, with_blocks=False)
    within_4_sigma(int(p[gate].sum()), N_PARAMS, 0.3, f"{gate} gate")
    v = p[value].astype(np.float64)
    assert v.min() >= low and v.max() <= high
    quarter = (high - low) / 4
    for k in range(4):
        inside = (v >= low + quarter * k) & (v < low + quarter * (k + 1))
        within_4_sigma(int(inside.sum()), N_PARAMS, 0.25, f"{value} bin {k}")
    off = genesis_ext.sample_params(2000, CUBE, seed=5, config=DeformConfig(), with_blocks=False)
    assert not off[gate].any()  # the published recipe has none


def test_gaussian_blur_keeps_the_mean_and_lowers_the_variance_of_real_ct(ct_cubes):
    """On real CT cubes: a blur is a weighted mean (weights sum to 1), so the cube mean stays (up to the edges) and
    the voxel-to-voxel differences shrink."""
    x = ct_cubes
    out = genesis_ext.gaussian_blur(
        x, seed=3, config=DeformConfig(blur_sigma_min=1.0, blur_sigma_max=2.0), spatial_dims=3
    )
    assert np.allclose(out.mean(axis=(1, 2, 3, 4)), x.mean(axis=(1, 2, 3, 4)), atol=0.02)
    assert np.abs(np.diff(out, axis=-1)).mean() < 0.6 * np.abs(np.diff(x, axis=-1)).mean()
