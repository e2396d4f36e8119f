"""genesis_ext.data cube extraction: the official-lung filter equals the published loop on real CT, the foreground
rule, margins, reproducibility, windows and resampling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_DIR, SHARED_DICOM

from genesis_ext.data import (
    CT_WINDOW,
    Foreground,
    NoFilter,
    OfficialLung,
    PercentileWindow,
    TooSmallError,
    Window,
    extract_cubes,
    load_volume,
    margins_for,
    official_lung_score_loop,
    resample,
)
from genesis_ext.data.cubes import BoxScorer, origin_bounds

SAMPLE, DICOM_DIR = SAMPLE_DIR, SHARED_DICOM
PUBLISHED_THRESHOLD = (-150.0 + 1000.0) / 2000.0  # the published script's HU_thred, in window units


@pytest.fixture(scope="module")
def lung_ct() -> np.ndarray:
    """The real chest CT with lungs (DICOM series), HU (x, y, z)."""
    pytest.importorskip("SimpleITK")
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM series not found at {DICOM_DIR}")
    return load_volume(DICOM_DIR).data


@pytest.fixture(scope="module")
def aorta_ct() -> np.ndarray:
    return load_volume(SAMPLE / "aorta_ct.nii.gz").data


def published_crop(hu: np.ndarray, origin, cube=(64, 64, 32), len_depth=3) -> np.ndarray:
    """The published script's candidate: clip to [-1000, 1000], (v + 1000) / 2000 in float64, Z + 3 slices."""
    x, y, z = origin
    crop = hu[x : x + cube[0], y : y + cube[1], z : z + cube[2] + len_depth].astype(np.float64)
    crop = np.clip(crop, -1000.0, 1000.0)
    return 1.0 * (crop - -1000.0) / (1000.0 - -1000.0)


def test_official_lung_equals_published_loop_on_real_cubes(lung_ct):
    """Candidates of the real lung CT, chosen on both sides of the 15 % line: the vectorised score and decision equal
    the published loop's, exactly."""
    filt, cube = OfficialLung(), (64, 64, 32)
    lo, hi, _ = origin_bounds(lung_ct.shape, cube, filt, "auto")
    hi[2] = min(hi[2], lung_ct.shape[2] - cube[2] - 3)  # the published crop reads 3 extra slices
    origins = np.random.default_rng(11).integers(lo, hi + 1, size=(400, 3))
    sums = BoxScorer(lung_ct, filt, CT_WINDOW, cube, lo, hi).sums(origins)
    n = int(np.prod(cube))
    fraction, keep = filt.fraction(sums, n), filt.keep(sums, n)
    assert keep.any() and not keep.all()
    margin = np.abs(fraction - 0.15)
    picks = (
        list(np.flatnonzero(keep)[np.argsort(margin[keep])[:3]])
        + list(np.flatnonzero(~keep)[np.argsort(margin[~keep])[:2]])
        + [int(np.argmax(fraction))]
    )
    for k in picks:
        score = official_lung_score_loop(published_crop(lung_ct, origins[k]), PUBLISHED_THRESHOLD)
        assert score == sums[k] * 0.5, origins[k]
        assert (score <= 0.15 * n) == keep[k]


def test_official_lung_equals_loop_at_the_threshold(rng):
    """Small cubes of integer HU right around -150 (ties included), many candidates: equal scores and decisions."""
    hu = rng.integers(-153, -147, size=(20, 18, 30)).astype(np.float32)
    hu[rng.random(hu.shape) < 0.82] = -900.0  # so that cube scores fall on both sides of 15 %
    filt, cube = OfficialLung(), (6, 5, 4)
    lo, hi, _ = origin_bounds(hu.shape, cube, filt, margins=0)
    hi[2] -= 2
    origins = rng.integers(lo, hi + 1, size=(300, 3))
    sums = BoxScorer(hu, filt, CT_WINDOW, cube, lo, hi).sums(origins)
    n = int(np.prod(cube))
    keep = filt.keep(sums, n)
    assert 0 < keep.sum() < len(keep)
    for o, s, k in zip(origins, sums, keep):
        score = official_lung_score_loop(published_crop(hu, o, cube), PUBLISHED_THRESHOLD)
        assert score == s * 0.5 and (score <= 0.15 * n) == k


def direct_scores(hu, origins, cube, filt, window=CT_WINDOW) -> np.ndarray:
    """Per-candidate score fractions computed crop by crop (no integral image)."""
    out = []
    for x, y, z in origins:
        c = hu[x : x + cube[0], y : y + cube[1], z : z + cube[2] + 1]
        if isinstance(filt, OfficialLung):
            above = c >= filt.threshold
            score = np.where(above[..., :-1], 1.0, np.where(above[..., 1:], 0.5, 0.0)).sum()
        else:
            score = float((c[..., : cube[2]] > window.level(filt.level)).sum())
        out.append(score / np.prod(cube))
    return np.array(out)


# Candidate origins of the 512x512x48 lung CT, written out from the documented rule (origins in [margin,
# size - cube - extra - margin], auto margins 100/512 of x and y and 30/256 of z, at most a quarter of the room):
# x, y: 512 - 64 - 100 = 348; z: official-lung reads one extra slice, room 48 - 33 = 15, margin min(5, 15 // 4) = 3,
# far side 48 - 33 - 3 = 12; without extra slices room 16, margin 4, far side 48 - 32 - 4 = 12.
LUNG_ORIGINS = {"official-lung": ((100, 100, 3), (348, 348, 12)), "foreground": ((100, 100, 4), (348, 348, 12))}
LUNG_ORIGINS["none"] = LUNG_ORIGINS["foreground"]


@pytest.mark.parametrize("filt", [OfficialLung(), Foreground(), NoFilter()], ids=lambda f: f.name)
def test_extract_keeps_first_passing_candidates(lung_ct, filt):
    """The published candidate loop: draw origins, keep those that pass, in draw order, up to the count."""
    count, cube = 32, (64, 64, 32)
    assert lung_ct.shape == (512, 512, 48)
    got = extract_cubes(lung_ct, count=count, filter=filt, rng=5)
    lo, hi = (np.array(b) for b in LUNG_ORIGINS[filt.name])
    assert got.margins == tuple(lo)
    drawn = np.random.default_rng(5).integers(lo, hi + 1, size=(50 * count, 3))
    if isinstance(filt, NoFilter):
        expect, tried = drawn[:count], count
    else:
        scores = direct_scores(lung_ct, drawn, cube, filt)
        passing = np.flatnonzero(scores <= 0.15 if isinstance(filt, OfficialLung) else scores >= 0.6)
        expect, tried = drawn[passing[:count]], int(passing[count - 1]) + 1
        np.testing.assert_allclose(got.scores, scores[passing[:count]])
    assert len(got.cubes) == count and got.candidates == tried
    np.testing.assert_array_equal(got.origins, expect)
    for cube_values, (x, y, z) in zip(got.cubes, got.origins):
        np.testing.assert_array_equal(cube_values, CT_WINDOW.apply(lung_ct[x : x + 64, y : y + 64, z : z + 32]))
    assert got.cubes.dtype == np.float32 and got.cubes.min() >= 0 and got.cubes.max() <= 1


@pytest.mark.parametrize(
    "filt, shape, cube, margins, lo, hi",
    [  # hi = shape - cube - extra - margin, by hand
        (OfficialLung(), (40, 36, 30), (8, 8, 8), (5, 6, 7), (5, 6, 7), (27, 22, 14)),  # one extra slice in z
        (NoFilter(), (40, 36, 30), (8, 8, 8), (5, 6, 7), (5, 6, 7), (27, 22, 15)),
        (NoFilter(), (80, 80, 40), (16, 16, 8), "auto", (15, 15, 4), (49, 49, 28)),  # 100/512 * 80, 30/256 * 40
    ],
    ids=["official-lung", "none", "auto"],
)
def test_origins_span_exactly_the_room_inside_both_margins(filt, shape, cube, margins, lo, hi):
    """Every origin lies in [margin, size - cube - extra - margin], and many draws reach both ends: the near and the
    far margin are both kept, and no more."""
    air = np.full(shape, -1000.0, np.float32)  # every candidate passes the lung rule
    got = extract_cubes(air, cube=cube, count=2000, max_candidates=2000, filter=filt, margins=margins, rng=0)
    assert len(got.origins) == 2000
    assert tuple(got.origins.min(axis=0)) == lo and tuple(got.origins.max(axis=0)) == hi


def test_reproducible_by_seed(aorta_ct):
    a = extract_cubes(aorta_ct, filter="foreground", rng=123)
    b = extract_cubes(aorta_ct, filter="foreground", rng=np.random.default_rng(123))
    c = extract_cubes(aorta_ct, filter="foreground", rng=124)
    np.testing.assert_array_equal(a.cubes, b.cubes)
    np.testing.assert_array_equal(a.origins, b.origins)
    assert not np.array_equal(a.origins, c.origins)


def test_foreground_rule_on_the_bundled_and_real_ct(aorta_ct, lung_ct):
    """Defaults: voxels above -900 HU (level 0.05 of the CT window), keep at >= 60 %. The cropped sample is inside
    the body and keeps nearly every candidate; the full-field-of-view scan rejects the air around the body."""
    assert Window().level(Foreground().level) == pytest.approx(-900.0)
    sample = extract_cubes(aorta_ct, filter=Foreground(), rng=0)
    assert len(sample.cubes) == 32 and sample.candidates <= 34
    full = extract_cubes(lung_ct, filter=Foreground(), margins=0, count=200, max_candidates=600, rng=0)
    assert 0.3 < len(full.cubes) / 600 < 0.8
    assert (full.scores >= 0.6).all()
    # the sample crops are heart/vessel crops: no "mostly lung" cube in them
    assert len(extract_cubes(aorta_ct, filter="official-lung", rng=0).cubes) == 0


def test_margins_scale_with_the_volume():
    assert margins_for((512, 512, 300)) == (100, 100, 35)
    assert margins_for((512, 512, 48), extra=(0, 0, 1)) == (100, 100, 3)  # z: at most a quarter of the 15-slice room
    assert margins_for((122, 102, 112)) == (14, 9, 13)
    assert margins_for((64, 64, 32)) == (0, 0, 0)
    assert margins_for((512, 512, 300), margins=(100, 100, 30)) == (100, 100, 30)
    with pytest.raises(TooSmallError, match="no room"):
        margins_for((512, 512, 48), margins=(100, 100, 30), extra=(0, 0, 1))
    with pytest.raises(
        TooSmallError, match=r"thinner than the cube \(64, 64, 32\): z has 31 voxels, the cube needs 32"
    ):
        margins_for((100, 100, 31))
    with pytest.raises(TooSmallError, match="filter reads"):
        extract_cubes(np.zeros((64, 64, 32), np.float32), filter="official-lung")


def test_any_cube_size_and_count(aorta_ct):
    got = extract_cubes(aorta_ct, cube=(32, 48, 16), count=5, filter="none", rng=1)
    assert got.cubes.shape == (5, 32, 48, 16) and got.candidates == 5 and np.isnan(got.scores).all()


def test_windows():
    hu = np.arange(-1200, 1201, dtype=np.float32)
    published = (np.clip(hu.astype(np.float64), -1000, 1000) + 1000) / 2000
    np.testing.assert_array_equal(CT_WINDOW.apply(hu), published.astype(np.float32))
    soft = Window(-160, 240).apply(hu)
    assert soft.min() == 0 and soft.max() == 1 and soft[hu == 40][0] == pytest.approx(0.5)
    w = PercentileWindow(1, 99).resolve(hu)
    assert w.lo == pytest.approx(np.percentile(hu, 1)) and w.hi == pytest.approx(np.percentile(hu, 99))
    with pytest.raises(ValueError):
        Window(10, 10)
    with pytest.raises(ValueError):
        PercentileWindow(50, 10)
    with pytest.raises(ValueError, match="constant"):
        PercentileWindow().resolve(np.zeros((4, 4, 4)))


def test_percentile_window_extraction_for_other_modalities(rng):
    """An MRI-like volume (arbitrary units, zero background): percentile window and foreground rule."""
    mr = np.zeros((96, 96, 48), np.float32)
    mr[20:80, 15:85, 5:45] = rng.normal(600, 80, size=(60, 70, 40))
    got = extract_cubes(mr, cube=(32, 32, 16), filter=Foreground(), window=PercentileWindow(0.5, 99.5), rng=0)
    assert len(got.cubes) == 32 and (got.scores >= 0.6).all()
    assert got.window.lo == 0 and got.window.hi > 600


def test_resample(aorta_ct):
    from genesis_ext.data import Volume

    v = Volume(aorta_ct, (1.5, 1.5, 1.5), np.diag([1.5, 1.5, 1.5, 1.0]), "aorta")
    same = resample(v, (1.5, 1.5, 1.5))
    np.testing.assert_allclose(same.data, v.data, atol=1e-3)
    coarse = resample(v, (3.0, 3.0, 1.5))
    assert coarse.shape == (60, 63, 164) and coarse.spacing == (3.0, 3.0, 1.5)
    # new voxel (0, 0, 0) sits between old voxels 0 and 1 along x and y: at 0.75 mm
    np.testing.assert_allclose(coarse.affine[:3, 3], [0.75, 0.75, 0.0])
    np.testing.assert_allclose(coarse.data[10, 10, 7], v.data[20:22, 20:22, 7].mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        resample(v, (1.0, 0.0, 1.0))


LIVER_MASK = SHARED_DICOM.parents[2] / "abdomen-ct" / "masks" / "liver.nii.gz"  # a real organ mask, float64 {0, 1}


def test_extract_cubes_refuses_a_label_map(aorta_ct):
    """A segmentation passed as a volume would give flat cubes of 0 and 0.5: refused, as `genesis-ext extract`
    skips it. The real liver mask of the abdominal CT when it is there, else a synthetic two-organ map."""
    if LIVER_MASK.exists():
        mask = load_volume(LIVER_MASK).data
    else:
        mask = np.zeros((80, 80, 40))
        mask[20:60, 20:60, 5:30], mask[30:50, 10:30, 10:20] = 1, 2
    with pytest.raises(ValueError, match="label map .* pass the scan, not its segmentation"):
        extract_cubes(mask, filter="none", count=2, rng=0)
    assert len(extract_cubes(aorta_ct, filter="none", count=2, rng=0).cubes) == 2  # the scan itself passes
