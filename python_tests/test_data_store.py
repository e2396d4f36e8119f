"""Cube stores, the published layout, batch extraction and the ``genesis-ext extract`` command."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_DIR, SHARED_DICOM

from genesis_ext import cli
from genesis_ext.data import (
    CT_WINDOW,
    CubeStore,
    ExtractSettings,
    Foreground,
    load_published,
    load_volume,
    read_manifest,
    run_extract,
    save_published,
)

SAMPLE, DICOM_DIR = SAMPLE_DIR, SHARED_DICOM
REPO = SAMPLE_DIR.parents[1]
FOREGROUND = ExtractSettings(filter=Foreground(), count=8)


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder with the two bundled CT crops and a README (ignored)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("pulmonary_ct.nii.gz", "aorta_ct.nii.gz"):
        shutil.copy(SAMPLE / name, folder / name)
    (folder / "README.md").write_text("two CT crops\n")
    return folder


def test_published_layout_round_trip(tmp_path, rng):
    cubes = rng.random((5, 64, 64, 32), dtype=np.float32)
    path = save_published(cubes, tmp_path / "bat_32_s_64x64x32_0.npy")
    back = load_published(path)
    assert back.dtype == np.float32 and back.shape == (5, 64, 64, 32)
    np.testing.assert_array_equal(back, cubes)
    # the published script's own dtype (float64) and a channel axis load the same way
    save_published(cubes[:, None].astype(np.float64), tmp_path / "f64.npy", dtype=np.float64)
    assert np.load(tmp_path / "f64.npy").dtype == np.float64
    np.testing.assert_array_equal(load_published(tmp_path / "f64.npy"), cubes)
    assert load_published(tmp_path / "f64.npy", mmap=True).dtype == np.float64
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_published(cubes * 2, tmp_path / "bad.npy")
    np.save(tmp_path / "flat.npy", cubes[0])
    with pytest.raises(ValueError, match="expected cubes"):
        load_published(tmp_path / "flat.npy")
    store = CubeStore([path, tmp_path / "f64.npy"])
    assert len(store) == 10 and store.cube == (64, 64, 32)
    np.testing.assert_array_equal(store[7], cubes[2])


def test_store_manifest_round_trip(inputs, tmp_path):
    """Every cube equals the window of its source volume at the manifest's origin; JSON and CSV agree."""
    out = tmp_path / "store"
    summary = run_extract([inputs], out, FOREGROUND, jobs=1, progress=False)
    assert (summary.volumes, summary.written, summary.cubes, summary.skipped) == (2, 2, 16, [])
    manifest = read_manifest(out)
    assert manifest["count"] == 16 and manifest["cube"] == [64, 64, 32] and manifest["orientation"] == "LPS"
    assert manifest["params"]["filter"] == {"name": "foreground", "level": 0.05, "min_fraction": 0.6}
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    store = CubeStore(out)
    assert len(store) == 16
    volumes = {}
    for i, row in enumerate(rows):
        assert int(row["index"]) == i
        source = row["source"]
        if source not in volumes:
            volumes[source] = load_volume(source)
            assert [float(row[f"spacing_{a}"]) for a in "xyz"] == list(volumes[source].spacing)
        x, y, z = (int(row[f"origin_{a}"]) for a in "xyz")
        expect = CT_WINDOW.apply(volumes[source].data[x : x + 64, y : y + 64, z : z + 32])
        np.testing.assert_array_equal(store[i], expect)
        np.testing.assert_array_equal(np.load(out / row["shard"], mmap_mode="r")[int(row["row"])], expect)
        assert float(row["score"]) >= 0.6 and (float(row["window_lo"]), float(row["window_hi"])) == (-1000, 1000)
    assert sorted(volumes) == sorted(str(p) for p in inputs.glob("*.nii.gz"))


def test_results_independent_of_workers_and_inputs(inputs, tmp_path):
    """Cubes depend on (seed, source) only: one worker vs a thread pool, a folder vs its files named one by one."""
    run_extract([inputs], tmp_path / "a", FOREGROUND, jobs=1, progress=False)
    run_extract(
        [inputs / "aorta_ct.nii.gz", inputs / "pulmonary_ct.nii.gz"],
        tmp_path / "b",
        FOREGROUND,
        jobs=2,
        executor="thread",
        progress=False,
    )
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    by_source = {r["source"]: r for r in b["volumes"]}
    for r in a["volumes"]:
        assert r["origins"] == by_source[r["source"]]["origins"]
    other = run_extract(
        [inputs / "aorta_ct.nii.gz"],
        tmp_path / "c",
        ExtractSettings(filter=Foreground(), count=8, seed=1),
        jobs=1,
        progress=False,
    )
    assert other.written == 1
    other_origins = read_manifest(tmp_path / "c")["volumes"][0]["origins"]
    assert other_origins != by_source[str(inputs / "aorta_ct.nii.gz")]["origins"]


def test_bad_volumes_are_skipped_and_nothing_written_is_lost(inputs, tmp_path):
    out = tmp_path / "store"
    run_extract([inputs], out, FOREGROUND, jobs=1, progress=False)
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "cubes").iterdir()}
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (SAMPLE / "pulmonary_ct.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (bad / "notes.txt").write_text("hello")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((50, 50, 50), np.int16), np.eye(4)), bad / "small.nii.gz")
    nib.save(nib.Nifti1Image(np.full((80, 80, 40), -1000, np.int16), np.eye(4)), bad / "air.nii.gz")
    (tmp_path / "empty").mkdir()
    summary = run_extract(
        [
            inputs,
            bad / "truncated.nii.gz",
            bad / "notes.txt",
            bad / "small.nii.gz",
            bad / "air.nii.gz",
            tmp_path / "empty",
        ],
        out,
        FOREGROUND,
        jobs=2,
        executor="thread",
        progress=False,
    )
    assert (summary.volumes, summary.written, summary.kept, summary.cubes) == (6, 0, 2, 0)
    reasons = dict(summary.skipped)
    assert "cannot read as NIfTI" in reasons[str(bad / "truncated.nii.gz")]
    assert "not a supported image format" in reasons[str(bad / "notes.txt")]
    assert "smaller than the cube" in reasons[str(bad / "small.nii.gz")]
    assert "no candidate passed the foreground filter" in reasons[str(bad / "air.nii.gz")]
    assert "no image files" in reasons[str(tmp_path / "empty")]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cubes").iterdir()} == shards
    manifest = read_manifest(out)
    assert manifest["count"] == 16 and len(manifest["skipped"]) == 4
    assert not [p for p in out.rglob("*.tmp")]
    with pytest.raises(ValueError, match="other parameters"):
        run_extract([inputs], out, ExtractSettings(filter=Foreground(), count=9), progress=False)


def test_an_interrupted_run_keeps_its_volumes_in_the_journal(inputs, tmp_path, monkeypatch):
    """Each finished volume appends one journal line (the manifests are written once, at the end): a run killed after
    its first volume leaves a store whose manifest, CubeStore and next run all see that volume."""
    from genesis_ext.data import batch
    from genesis_ext.data.store import JOURNAL, StoreWriter

    out = tmp_path / "store"
    complete = run_extract([inputs], tmp_path / "complete", FOREGROUND, jobs=1, progress=False)
    real_extract = batch.extract_source
    calls = []

    def killed_after_one(source, settings, path):
        if calls:
            raise KeyboardInterrupt  # the run dies while extracting the second volume
        calls.append(source)
        return real_extract(source, settings, path)

    monkeypatch.setattr(batch, "extract_source", killed_after_one)
    real_flush = StoreWriter.flush
    writers = []
    # killed: after the writer's first (empty) manifest, no manifest write happens any more
    monkeypatch.setattr(
        StoreWriter, "flush", lambda self: writers.append(self) or (len(writers) == 1 and real_flush(self))
    )
    with pytest.raises(KeyboardInterrupt):
        run_extract([inputs], out, FOREGROUND, jobs=1, progress=False)
    journal = (out / JOURNAL).read_text().splitlines()
    assert len(journal) == 1  # one line for the finished volume, nothing rewritten per volume
    (out / JOURNAL).write_text("\n".join(journal) + '\n{"volume": {"key": "torn')  # a line cut short by the kill
    manifest = read_manifest(out)
    assert len(manifest["volumes"]) == 1 and manifest["count"] == manifest["volumes"][0]["count"] > 0
    assert len(CubeStore(out)) == manifest["count"]
    monkeypatch.undo()
    summary = run_extract([inputs], out, FOREGROUND, jobs=1, progress=False)  # the next run finishes the rest
    assert summary.kept == 1 and summary.written == complete.written - 1
    assert not (out / JOURNAL).exists()
    assert read_manifest(out)["count"] == complete.cubes


def test_unexpected_errors_skip_one_volume(inputs, tmp_path, monkeypatch):
    from genesis_ext.data import batch

    real = batch.extract_cubes

    def flaky(data, **kw):
        if data.shape == (120, 126, 164):  # the aorta crop
            raise MemoryError("pretend")
        return real(data, **kw)

    monkeypatch.setattr(batch, "extract_cubes", flaky)
    summary = run_extract([inputs], tmp_path / "s", FOREGROUND, jobs=2, progress=False)
    assert summary.written == 1 and summary.skipped == [(str(inputs / "aorta_ct.nii.gz"), "MemoryError: pretend")]


def test_published_format(inputs, tmp_path):
    subset = tmp_path / "subset3"
    shutil.copytree(inputs, subset)
    out = tmp_path / "cubes"
    summary = run_extract(
        [subset, inputs / "aorta_ct.nii.gz"], out, FOREGROUND, jobs=1, fmt="published", progress=False
    )
    assert [p.name for p in summary.outputs] == ["bat_8_s_64x64x32_3.npy", "bat_8_s_64x64x32_1.npy"]
    first = load_published(out / "bat_8_s_64x64x32_3.npy")
    assert first.shape == (16, 64, 64, 32) and 0 <= first.min() and first.max() <= 1
    assert not list((out / "cubes").iterdir())  # per-volume shards folded into the published arrays
    store = CubeStore(out)
    assert len(store) == 24
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i in (0, 9, 20):
        np.testing.assert_array_equal(store[i], load_published(out / rows[i]["shard"])[int(rows[i]["row"])])


def test_cli_extract(inputs, tmp_path, capsys):
    out = tmp_path / "store"
    code = cli.main(
        [
            "extract",
            str(inputs),
            "--out",
            str(out),
            "--filter",
            "foreground",
            "--per-volume",
            "4",
            "--cube",
            "48",
            "48",
            "24",
            "--window",
            "-1000",
            "1000",
            "--margins",
            "0",
            "0",
            "0",
            "--executor",
            "thread",
            "--quiet",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "2 volume(s): 2 written (8 cubes)" in text
    manifest = read_manifest(out)
    assert manifest["cube"] == [48, 48, 24] and manifest["params"]["margins"] == [0, 0, 0]
    assert all(r["margins"] == [0, 0, 0] for r in manifest["volumes"])
    # every input bad: exit status 1, reasons printed
    (tmp_path / "x.txt").write_text("x")
    assert cli.main(["extract", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o2"), "--quiet"]) == 1
    assert "not a supported image format" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["extract", str(inputs), "--out", str(tmp_path / "o3"), "--margins", "1", "2"])


def test_cli_all_cores_on_real_ct(tmp_path):
    """The installed entry point's module, as a subprocess, with spawned worker processes, on the real DICOM series
    and the bundled NIfTI crops: the official filter keeps lung cubes only from the lung scan."""
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM series not found at {DICOM_DIR}")
    pytest.importorskip("SimpleITK")
    out = tmp_path / "store"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "genesis_ext.cli",
            "extract",
            str(DICOM_DIR),
            str(SAMPLE),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--executor",
            "process",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "3 volume(s): 1 written (32 cubes)" in run.stdout and "2 process worker(s)" in run.stdout
    assert run.stdout.count("no candidate passed the official-lung filter") == 2
    manifest = json.loads((out / "manifest.json").read_text())
    (volume,) = manifest["volumes"]
    assert volume["shape"] == [512, 512, 48] and volume["margins"] == [100, 100, 3]
    assert max(volume["scores"]) <= 0.15
    # same cubes as in-process, single-threaded
    same = run_extract([DICOM_DIR], tmp_path / "again", ExtractSettings(), jobs=1, progress=False)
    assert same.cubes == 32
    np.testing.assert_array_equal(
        np.load(out / volume["shard"]),
        np.load(tmp_path / "again" / read_manifest(tmp_path / "again")["volumes"][0]["shard"]),
    )


def test_cli_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "extract" in capsys.readouterr().out


def test_label_map_reason_by_folder_name_and_content():
    from genesis_ext.data.io import label_map_reason

    assert "folder named 'labelstr'" in label_map_reason("Task09/labelsTr/spleen_1.nii.gz")
    assert "'seg'" in label_map_reason("case_001_seg.nii.gz")
    assert "'mask'" in label_map_reason("LiverMask.nrrd")
    assert label_map_reason("imagesTr/spleen_1.nii.gz") is None  # by path alone: undecided
    masks = np.random.default_rng(0).integers(0, 3, size=(40, 40, 20)).astype(np.float64)
    assert "3 distinct integer values" in label_map_reason("organs.nii.gz", masks)
    ct = load_volume(SAMPLE / "pulmonary_ct.nii.gz").data  # integer HU too, but thousands of values
    assert label_map_reason("pulmonary_ct.nii.gz", ct) is None
    assert label_map_reason("scaled.nii.gz", masks + 0.5) is None  # not integer-valued: an image


def test_extract_skips_the_real_label_masks_beside_the_scans(tmp_path):
    """../shared/data/totalsegmentator holds two CT crops and, beside them, a binary mask of each (named aorta and
    pulmonary_artery: found by content). Zero cubes come from the masks; --include/--exclude select sources."""
    folder = REPO.parent / "shared" / "data" / "totalsegmentator"
    if not (folder / "aorta_report" / "aorta.nii.gz").is_file():
        pytest.skip(f"the real label masks are not in {folder}")
    settings = ExtractSettings(filter=Foreground(), count=4)
    summary = run_extract([folder], tmp_path / "s", settings, progress=False)
    assert (summary.volumes, summary.written, summary.label_maps) == (4, 2, 2)
    assert sorted(Path(s).name for s, _ in summary.skipped) == ["aorta.nii.gz", "pulmonary_artery.nii.gz"]
    assert {r["key"] for r in read_manifest(tmp_path / "s")["volumes"]} == {
        "aorta_report/ct_cropped.nii.gz",
        "pulmonary_report/ct_cropped.nii.gz",
    }
    assert "2 skipped (2 label map(s))" in summary.lines()[0]
    summary = run_extract(
        [folder], tmp_path / "t", settings, progress=False, include=["pulmonary_report/*"], exclude=["*artery*"]
    )
    assert (summary.volumes, summary.written, summary.excluded, summary.label_maps) == (1, 1, 3, 0)
