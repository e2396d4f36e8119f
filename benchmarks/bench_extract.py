"""Cube extraction benchmarks: the vectorised official-lung filter vs the published voxel loop, and whole
``genesis-ext extract`` runs, on real CT.

    python benchmarks/bench_extract.py [--loop-candidates 20] [--repeats 3] [--large 6]  # the report (docs/data.md)
    python -m pytest benchmarks/bench_extract.py -q --benchmark-disable       # each benchmark once, as a test

Input: the real 512x512x48 chest-CT DICOM series in ../shared/data (needs SimpleITK; skipped if absent) and the two
bundled NIfTI crops in data/sample. Per-candidate filter time: the published loop on its own float64 crops
(64x64x35, normalised as published) vs the vectorised rule on the same volume, where one integral image serves all
1,600 candidates of the volume (its cost is included, divided over the candidates). Both give the same scores
(asserted). ``--large N`` also times runs over N LUNA16-sized scans (512x512x192, 1.25 mm slices, uncompressed
MetaImage like LUNA16) made from the DICOM series (resampled in z and shifted per scan; ~100 MB each, in a temporary
folder), to compare 1 vs all workers and threads vs processes where loading dominates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from genesis_ext.data import (
    CT_WINDOW,
    ExtractSettings,
    Foreground,
    OfficialLung,
    extract_cubes,
    load_volume,
    official_lung_score_loop,
    run_extract,
)
from genesis_ext.data.cubes import PUBLISHED_CUBE, BoxScorer, origin_bounds
from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO.parent / "shared" / "data" / "lung-pet-ct-dx" / "Lung_Dx-A0001" / "3.000000-5mm-41315"
CANDIDATES = 1600
SEED = 2019


def lung_volume() -> np.ndarray:
    return load_volume(DICOM_DIR).data


def candidates(hu: np.ndarray, n: int = CANDIDATES, seed: int = SEED):
    """n candidate origins inside the auto margins that also leave the published 3 extra slices, and the bounds."""
    lo, hi, _ = origin_bounds(hu.shape, PUBLISHED_CUBE, OfficialLung(), "auto")
    hi[2] = min(hi[2], hu.shape[2] - PUBLISHED_CUBE[2] - 3)
    return np.random.default_rng(seed).integers(lo, hi + 1, size=(n, 3)), lo, hi


def published_normalised(hu: np.ndarray) -> np.ndarray:
    """The published script's per-volume preparation: clip to [-1000, 1000] HU, (v + 1000) / 2000, float64."""
    return (np.clip(hu.astype(np.float64), -1000.0, 1000.0) + 1000.0) / 2000.0


def loop_scores(normalised: np.ndarray, origins) -> np.ndarray:
    """The published per-candidate work: crop 64x64x35, then the voxel loop."""
    out = []
    for x, y, z in origins:
        crop = normalised[x : x + PUBLISHED_CUBE[0], y : y + PUBLISHED_CUBE[1], z : z + PUBLISHED_CUBE[2] + 3]
        out.append(official_lung_score_loop(crop))
    return np.array(out)


def vectorised_scores(hu: np.ndarray, origins, lo, hi) -> np.ndarray:
    """The whole vectorised filter for all candidates: integral image of the reachable region, then 8 lookups each."""
    return BoxScorer(hu, OfficialLung(), CT_WINDOW, PUBLISHED_CUBE, lo, hi).sums(origins) * 0.5


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def filter_report(hu: np.ndarray, loop_n: int, repeats: int) -> dict:
    origins, lo, hi = candidates(hu)
    fast = vectorised_scores(hu, origins, lo, hi)
    normalised = published_normalised(hu)
    picks = origins[:loop_n]
    start = time.perf_counter()
    slow = loop_scores(normalised, picks)
    loop_s = (time.perf_counter() - start) / loop_n
    assert np.array_equal(slow, fast[:loop_n]), "vectorised and loop scores differ"
    vec_s = best_of(lambda: vectorised_scores(hu, origins, lo, hi), repeats) / len(origins)
    scorer = BoxScorer(hu, OfficialLung(), CT_WINDOW, PUBLISHED_CUBE, lo, hi)
    lookup_s = best_of(lambda: scorer.sums(origins), repeats) / len(origins)
    kept = int((fast <= 0.15 * np.prod(PUBLISHED_CUBE)).sum())
    return {
        "loop_ms": loop_s * 1e3,
        "vectorised_us": vec_s * 1e6,
        "lookup_us": lookup_s * 1e6,
        "speedup": loop_s / vec_s,
        "loop_n": loop_n,
        "candidates": len(origins),
        "kept": kept,
    }


def large_scans(folder: Path, n: int) -> list[Path]:
    """n LUNA16-sized MetaImage scans made from the DICOM series (z resampled to 1.25 mm, x shifted per scan)."""
    import SimpleITK as sitk

    from genesis_ext.data import resample

    volume = load_volume(DICOM_DIR)
    volume = resample(volume, (volume.spacing[0], volume.spacing[1], 1.25))
    hu = np.round(volume.data).astype(np.int16)
    paths = []
    for k in range(n):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.roll(hu, 37 * k, axis=0).transpose(2, 1, 0)))
        image.SetSpacing(volume.spacing)
        paths.append(folder / f"scan{k}.mhd")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def extract_runs(jobs_list, repeats: int, inputs=None) -> list[dict]:
    """Whole ``extract`` runs (official-lung and foreground filters); default inputs: the DICOM series and the two
    NIfTI crops."""
    inputs = inputs or [DICOM_DIR, *(SAMPLE_DIR / f for f in SAMPLE_FILES)]
    rows = []
    for name, settings in (("official-lung", ExtractSettings()), ("foreground", ExtractSettings(filter=Foreground()))):
        for executor in ("thread", "process"):
            for jobs in jobs_list:
                if executor == "process" and jobs == 1:
                    continue  # one worker runs in-process: same as thread
                walls, summary = [], None
                for _ in range(repeats):
                    out = tempfile.mkdtemp(prefix="bench_extract_")
                    try:
                        summary = run_extract(inputs, out, settings, jobs=jobs, executor=executor, progress=False)
                    finally:
                        shutil.rmtree(out)
                    walls.append(summary.wall)
                rows.append(
                    {
                        "filter": name,
                        "executor": executor if jobs > 1 else "in-process",
                        "jobs": jobs,
                        "volumes": summary.volumes,
                        "written": summary.written,
                        "cubes": summary.cubes,
                        "wall_s": min(walls),
                    }
                )
    return rows


def foreground_study(n: int = 2000) -> None:
    """How well "fraction above a threshold" tells body cubes from air cubes on the full-field DICOM scan: truth = at
    least half of the cube inside the body (largest > -500 HU component, holes filled per slice; needs SciPy)."""
    from scipy import ndimage

    hu = lung_volume()
    mask = hu > -500
    labels, _ = ndimage.label(mask)
    mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    body = np.stack([ndimage.binary_fill_holes(mask[..., k]) for k in range(hu.shape[2])], axis=-1)
    origins = np.random.default_rng(0).integers(0, np.asarray(hu.shape) - PUBLISHED_CUBE + 1, size=(n, 3))
    crops = [tuple(slice(o, o + c) for o, c in zip(origin, PUBLISHED_CUBE)) for origin in origins]
    truth = np.array([body[c].mean() >= 0.5 for c in crops])
    print(f"\nforeground rule on {n} random cubes of the DICOM scan ({truth.mean():.1%} are mostly body):")
    print(
        "| threshold HU | min fraction | kept | agrees | false keeps | false rejects |\n|---:|---:|---:|---:|---:|---:|"
    )
    for threshold in (-950, -900, -800, -500):
        above = np.array([(hu[c] > threshold).mean() for c in crops])
        for fraction in (0.5, 0.6, 0.7):
            keep = above >= fraction
            print(
                f"| {threshold} | {fraction} | {keep.mean():.1%} | {(keep == truth).mean():.1%} | "
                f"{(keep & ~truth).mean():.1%} | {(~keep & truth).mean():.1%} |"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop-candidates", type=int, default=20, help="candidates timed with the published loop")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for the fast paths")
    p.add_argument("--large", type=int, default=0, help="also time runs over this many LUNA16-sized scans")
    p.add_argument(
        "--foreground-study",
        action="store_true",
        help="also score foreground-rule thresholds against a body mask (needs SciPy)",
    )
    args = p.parse_args(argv)
    if not DICOM_DIR.is_dir():
        print(f"real DICOM series not found at {DICOM_DIR}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    hu = lung_volume()
    load_s = time.perf_counter() - start
    print(f"DICOM series {hu.shape} loaded in {load_s:.2f} s; {os.cpu_count()} cores")
    r = filter_report(hu, args.loop_candidates, args.repeats)
    print(
        f"official-lung filter per candidate: published loop {r['loop_ms']:.1f} ms (mean of {r['loop_n']}), "
        f"vectorised {r['vectorised_us']:.1f} us (integral image + lookups, {r['candidates']} candidates; "
        f"lookups alone {r['lookup_us']:.2f} us) -> {r['speedup']:.0f}x; scores equal; "
        f"{r['kept']}/{r['candidates']} candidates pass"
    )
    t = best_of(lambda: extract_cubes(hu, rng=SEED), args.repeats)
    got = extract_cubes(hu, rng=SEED)
    print(
        f"extract_cubes on the DICOM volume (official-lung, 32 cubes): {t * 1e3:.1f} ms, {got.candidates} candidates "
        f"tried; the published loop would spend about {got.candidates * r['loop_ms'] / 1e3:.1f} s filtering them"
    )
    jobs = sorted({1, os.cpu_count() or 1})
    table("the DICOM series and the two NIfTI crops", extract_runs(jobs, args.repeats))
    if args.large:
        with tempfile.TemporaryDirectory(prefix="bench_extract_large_") as folder:
            large_scans(Path(folder), args.large)
            table(f"{args.large} LUNA16-sized scans (512x512x192 MetaImage)", extract_runs(jobs, 1, [Path(folder)]))
    if args.foreground_study:
        foreground_study()
    return 0


def table(title: str, rows) -> None:
    print(f"\nextract runs on {title} (best of the repeats):")
    print("| filter | workers | volumes | written | cubes | wall s |\n|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['filter']} | {row['jobs']} {row['executor']} | {row['volumes']} | {row['written']} | "
            f"{row['cubes']} | {row['wall_s']:.2f} |"
        )


# ---- pytest-benchmark (python -m pytest benchmarks/bench_extract.py) ----------------------------------------------
try:
    import pytest
except ImportError:  # the report above runs without pytest
    pytest = None

if pytest is not None:

    def describe(benchmark, op: str, impl: str, batch: int) -> None:
        """The extra_info benchmarks/summarize.py reads: time per item = mean / batch (items: candidates, volumes)."""
        benchmark.extra_info.update(op=op, impl=impl, batch=batch, threads=1)

    @pytest.fixture(scope="module")
    def hu():
        pytest.importorskip("SimpleITK")
        if not DICOM_DIR.is_dir():
            pytest.skip(f"real DICOM series not found at {DICOM_DIR}")
        return lung_volume()

    @pytest.mark.benchmark(group="extract-filter")
    def test_filter_vectorised(benchmark, hu):
        origins, lo, hi = candidates(hu)
        describe(benchmark, "official_lung_filter", "vectorised", len(origins))
        scores = benchmark(vectorised_scores, hu, origins, lo, hi)
        np.testing.assert_array_equal(scores[:2], loop_scores(published_normalised(hu), origins[:2]))

    @pytest.mark.benchmark(group="extract-filter")
    def test_filter_published_loop(benchmark, hu):
        origins, lo, hi = candidates(hu, n=2)
        describe(benchmark, "official_lung_filter", "reference", len(origins))
        normalised = published_normalised(hu)
        scores = benchmark.pedantic(loop_scores, args=(normalised, origins), rounds=1, iterations=1)
        np.testing.assert_array_equal(scores, vectorised_scores(hu, origins, lo, hi))

    @pytest.mark.benchmark(group="extract-volume")
    def test_extract_cubes_dicom(benchmark, hu):
        describe(benchmark, "extract_cubes_dicom", "vectorised", 1)
        got = benchmark(extract_cubes, hu, rng=SEED)
        assert len(got.cubes) == 32 and (got.scores <= 0.15).all()

    @pytest.mark.benchmark(group="extract-run")
    def test_extract_run_threads(benchmark, hu, tmp_path):
        inputs = [DICOM_DIR, SAMPLE_DIR]
        describe(benchmark, "extract_run_3_volumes", "threads", 3)
        runs = iter(range(1000))

        def run():
            return run_extract(
                inputs,
                tmp_path / f"store{next(runs)}",
                ExtractSettings(filter=Foreground()),
                executor="thread",
                progress=False,
            )

        summary = benchmark.pedantic(run, rounds=1, iterations=1)
        assert summary.written == 3 and summary.cubes == 96


if __name__ == "__main__":
    sys.exit(main())
