"""Cube stores, the published layout, batch extraction and the ``genesis-ext extract`` command."""

from __future__ import annotations

import csv
import json
import pickle
import re
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
    np.save(tmp_path / "labels.npy", (cubes > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="labels.npy: expected float cubes in \\[0, 1\\], got dtype uint8"):
        CubeStore(tmp_path / "labels.npy")
    (tmp_path / "cut.npy").write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"cut.npy: .* \(truncated or extended\); replace it with an intact copy"):
        CubeStore(tmp_path / "cut.npy")
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
    assert (
        "thinner than the cube" in reasons[str(bad / "small.nii.gz")] and "--pad" in reasons[str(bad / "small.nii.gz")]
    )
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
    from genesis_ext.data import extraction
    from genesis_ext.data.store import JOURNAL, StoreWriter

    out = tmp_path / "store"
    complete = run_extract([inputs], tmp_path / "complete", FOREGROUND, jobs=1, progress=False)
    real_extract = extraction.extract_source
    calls = []

    def killed_after_one(source, settings, path):
        if calls:
            raise KeyboardInterrupt  # the run dies while extracting the second volume
        calls.append(source)
        return real_extract(source, settings, path)

    monkeypatch.setattr(extraction, "extract_source", killed_after_one)
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
    from genesis_ext.data import extraction

    real = extraction.extract_cubes

    def flaky(data, **kw):
        if data.shape == (120, 126, 164):  # the aorta crop
            raise MemoryError("pretend")
        return real(data, **kw)

    monkeypatch.setattr(extraction, "extract_cubes", flaky)
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


# ---- damaged stores: caught at open or first read, with the file and the fix; repaired by re-running extract


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(inputs, store): the two bundled CT crops and the store extracted from them (2 shards of 8 cubes); tests damage
    copies of the store."""
    root = tmp_path_factory.mktemp("pristine")
    folder = root / "in"
    folder.mkdir()
    for name in ("pulmonary_ct.nii.gz", "aorta_ct.nii.gz"):
        shutil.copy(SAMPLE / name, folder / name)
    run_extract([folder], root / "store", FOREGROUND, jobs=1, progress=False)
    return folder, root / "store"


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A copy of the pristine store, to damage."""
    return Path(shutil.copytree(pristine[1], tmp_path / "store"))


def first_shard(store: Path) -> Path:
    return store / read_manifest(store)["volumes"][0]["shard"]


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def truncate(store):
    shard = first_shard(store)
    shard.write_bytes(shard.read_bytes()[:-1000])


def reshape(store):
    shard = first_shard(store)
    cubes = np.load(shard)
    np.save(shard, cubes.reshape(len(cubes) * 2, 64, 64, 16))


def count_by(delta):
    def edit(manifest):
        manifest["volumes"][0]["count"] += delta
        manifest["count"] += delta  # the total stays consistent: only the shard tells

    return lambda store: edit_manifest(store, edit)


def retype(store):
    shard = first_shard(store)
    np.save(shard, np.load(shard).astype(np.float64))


def remove(store):
    first_shard(store).unlink()


def flip_one_bit(store):
    shard = first_shard(store)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


DAMAGE_AT_OPEN = {  # what the error says after the shard's path
    "truncated": (
        truncate,
        r"4193432 bytes, but its header's \(8, 64, 64, 32\) float32 array needs 4194432 \(truncated",
    ),
    "reshaped": (reshape, r"holds cubes \(16, 64, 64, 16\), but the manifest says \(8, 64, 64, 32\)"),
    "count+5": (count_by(5), r"holds cubes \(8, 64, 64, 32\), but the manifest says \(13, 64, 64, 32\)"),
    "count-5": (count_by(-5), r"holds cubes \(8, 64, 64, 32\), but the manifest says \(3, 64, 64, 32\)"),
    "missing": (remove, r"missing\n"),
    "float64": (retype, r"holds float64 cubes, but the manifest says float32"),
}


def assert_names_shard_store_and_fix(message: str, store: Path) -> None:
    assert str(first_shard(store)) in message and f"cube store {store}" in message, message
    assert "re-running the `genesis-ext extract` command" in message, message


@pytest.mark.parametrize("damage", DAMAGE_AT_OPEN, ids=str)
def test_damaged_shard_fails_at_open(store, damage):
    """A truncated, reshaped, retyped or missing shard, or a volume's count edited by +5 or -5 (never an IndexError or
    dropped cubes mid-epoch): opening the store fails, naming the shard, the store and the fix."""
    from genesis_ext.data.store import StoreError

    apply, what = DAMAGE_AT_OPEN[damage]
    apply(store)
    with pytest.raises(StoreError, match=re.escape(f"{first_shard(store)}: ") + what) as info:
        CubeStore(store)
    assert_names_shard_store_and_fix(str(info.value), store)


def test_manifest_total_count_edited_fails_at_open(store):
    from genesis_ext.data.store import StoreError

    edit_manifest(store, lambda m: m.update(count=m["count"] + 5))
    with pytest.raises(StoreError, match=r"manifest.json: count is 21, but its volumes hold 16 cubes"):
        CubeStore(store)


def test_flipped_bit_fails_at_first_read_of_that_shard(store, monkeypatch):
    """One flipped bit: the header is fine, so the store opens; the shard's checksum fails before its first cube is
    read, the other shard reads, and each shard is hashed once per process, not at every item."""
    from genesis_ext.data import store as store_module
    from genesis_ext.data.store import StoreError

    intact = CubeStore(store)
    intact.max_open = 1  # every other read re-opens a shard: still hashed once
    hashed = []
    real = store_module.file_digest
    monkeypatch.setattr(store_module, "file_digest", lambda path: hashed.append(path) or real(path))
    for i in range(8):
        intact[i], intact[8 + i]
    assert sorted(hashed) == sorted(intact.files)
    pickle.loads(pickle.dumps(intact))[0]  # as in a DataLoader worker: another process verifies for itself
    assert len(hashed) == 3
    flip_one_bit(store)
    damaged = CubeStore(store)
    first, second = damaged.offsets[0], damaged.offsets[1]
    damaged[second]  # the other shard
    with pytest.raises(StoreError, match="damaged") as info:
        damaged[first]
    assert_names_shard_store_and_fix(str(info.value), store)


@pytest.mark.parametrize("damage", [*DAMAGE_AT_OPEN, "flipped bit"], ids=str)
def test_extract_again_repairs_the_store(pristine, store, damage):
    """Re-running extract with the same arguments verifies every shard it would keep, extracts the damaged one
    again (the same cubes: they depend on seed and source only) and says so."""
    folder, original = pristine
    (DAMAGE_AT_OPEN[damage][0] if damage in DAMAGE_AT_OPEN else flip_one_bit)(store)
    shard = first_shard(store)
    summary = run_extract([folder], store, FOREGROUND, jobs=1, progress=False)
    assert (summary.written, summary.kept) == (1, 1)
    assert len(summary.repaired) == 1 and str(shard) in summary.repaired[0]
    assert f"repaired {shard}" in "\n".join(summary.lines())
    repaired, expected = CubeStore(store), CubeStore(original)
    assert len(repaired) == len(expected) == 16
    for i in range(16):
        np.testing.assert_array_equal(repaired[i], expected[i])
    assert read_manifest(store)["count"] == 16
    assert not [p for p in store.rglob("*.tmp")]


def test_a_damaged_volume_that_cannot_be_redone_leaves_the_store(pristine, store, tmp_path, monkeypatch):
    """Its source is now unreadable: the volume is skipped with its reason and its record dropped, from the manifest
    and from the journal of a run killed before writing it, so the store opens with the other volume's cubes instead
    of pointing at a damaged shard."""
    from genesis_ext.data.store import StoreWriter

    folder = Path(shutil.copytree(pristine[0], tmp_path / "in"))  # same keys, so the same store continues
    scan = folder / "aorta_ct.nii.gz"
    scan.write_bytes(scan.read_bytes()[:1000])
    killed = Path(shutil.copytree(store, tmp_path / "killed"))
    for damaged in (store, killed):
        truncate(damaged)  # the aorta shard
    summary = run_extract([folder], store, FOREGROUND, jobs=1, progress=False)
    assert summary.kept == 1 and "cannot read as NIfTI" in dict(summary.skipped)[str(scan)]
    assert [r["key"] for r in read_manifest(store)["volumes"]] == ["pulmonary_ct.nii.gz"]
    assert len(CubeStore(store)) == 8
    real_flush, flushes = StoreWriter.flush, []
    monkeypatch.setattr(
        StoreWriter, "flush", lambda self: flushes.append(1) or (len(flushes) == 1 and real_flush(self))
    )
    run_extract([folder], killed, FOREGROUND, jobs=1, progress=False)  # no manifest written after the first
    assert [r["key"] for r in read_manifest(killed)["volumes"]] == ["pulmonary_ct.nii.gz"]  # the journal's word


def test_extract_again_rewrites_a_wrong_total_count(pristine, store):
    edit_manifest(store, lambda m: m.update(count=m["count"] - 5))
    summary = run_extract([pristine[0]], store, FOREGROUND, jobs=1, progress=False)
    assert (summary.written, summary.kept) == (0, 2)
    assert summary.repaired == [f"{store / 'manifest.json'}: count is 11, but its volumes hold 16 cubes (rewritten)"]
    assert read_manifest(store)["count"] == len(CubeStore(store)) == 16


def test_shard_checksums_are_the_sha256_of_the_files(pristine):
    import hashlib

    for r in read_manifest(pristine[1])["volumes"]:
        assert r["sha256"] == hashlib.sha256((pristine[1] / r["shard"]).read_bytes()).hexdigest()


def test_store_without_checksums_opens_and_is_redone_by_extract(pristine, store):
    """A store written before checksums: opens with a warning that says its bytes cannot be checked, its shapes and
    counts still are; extract re-extracts its shards (it cannot trust them) and adds the checksums."""
    from genesis_ext.data.store import StoreError

    edit_manifest(store, lambda m: [r.pop("sha256") for r in m["volumes"]])
    with pytest.warns(UserWarning, match="2 of its 2 volumes have no shard checksum"):
        old = CubeStore(store)
    np.testing.assert_array_equal(old[3], CubeStore(pristine[1])[3])
    summary = run_extract([pristine[0]], store, FOREGROUND, jobs=1, progress=False)
    assert summary.written == 2 and all("no checksum" in line for line in summary.repaired)
    assert all("sha256" in r for r in read_manifest(store)["volumes"])
    edit_manifest(store, lambda m: [r.pop("sha256") for r in m["volumes"]])
    truncate(store)
    with pytest.raises(StoreError, match="truncated"):
        CubeStore(store)


def test_published_format_arrays_are_verified_and_repaired(pristine, tmp_path):
    """--format published: every volume record of an array carries the array's checksum; a damaged array is caught
    at first read and rebuilt by the next run."""
    from genesis_ext.data.store import StoreError

    folder = pristine[0]
    out = tmp_path / "published"
    run_extract([folder], out, FOREGROUND, jobs=1, fmt="published", progress=False)
    flip_one_bit(out)
    with pytest.raises(StoreError, match="damaged"):
        CubeStore(out)[0]
    summary = run_extract([folder], out, FOREGROUND, jobs=1, fmt="published", progress=False)
    assert summary.written == 2 and len(summary.repaired) == 1
    repaired, expected = CubeStore(out), CubeStore(pristine[1])
    for i in range(16):
        np.testing.assert_array_equal(repaired[i], expected[i])


def test_published_format_manifest_edits_fail_at_open(pristine, tmp_path):
    """The volumes of a published-layout array must cover its rows once each and agree on its checksum."""
    from genesis_ext.data.store import StoreError

    out = tmp_path / "published"
    run_extract([pristine[0]], out, FOREGROUND, jobs=1, fmt="published", progress=False)
    pristine_manifest = (out / "manifest.json").read_text()
    edit_manifest(out, lambda m: m["volumes"][1].update(first_row=3))
    with pytest.raises(StoreError, match=r"bat_8_s_64x64x32_0.npy: its manifest records .* do not cover its rows"):
        CubeStore(out)
    (out / "manifest.json").write_text(pristine_manifest)
    edit_manifest(out, lambda m: m["volumes"][1].update(sha256="0" * 64))
    with pytest.raises(StoreError, match=r"bat_8_s_64x64x32_0.npy: its manifest records give it different checksums"):
        CubeStore(out)


def test_missing_input_writes_nothing(inputs, tmp_path, capsys):
    """A mistyped input fails before anything is created: no empty store, no touched files in an existing one."""
    out = tmp_path / "new"
    with pytest.raises(FileNotFoundError, match=f"input not found: {tmp_path / 'nope'}"):
        run_extract([inputs, tmp_path / "nope"], out, FOREGROUND, jobs=1, progress=False)
    assert not out.exists()
    assert cli.main(["extract", str(tmp_path / "nope"), "--out", str(out), "--quiet"]) == 2
    assert f"input not found: {tmp_path / 'nope'}" in capsys.readouterr().err and not out.exists()
    existing = tmp_path / "existing"
    run_extract([inputs], existing, FOREGROUND, jobs=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in existing.rglob("*")}
    with pytest.raises(FileNotFoundError):
        run_extract([inputs, tmp_path / "nope"], existing, FOREGROUND, jobs=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in existing.rglob("*")} == before


def test_a_store_from_before_modalities_and_channels_is_continued(tmp_path):
    """Stores written before the modality, pad and channels parameters existed are CT, unpadded, one channel: the
    same extract command continues them."""
    out = tmp_path / "store"
    volume = sorted(SAMPLE.glob("*.nii.gz"))[0]
    run_extract([volume], out, FOREGROUND, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {manifest["params"].pop(k) for k in ("modality", "pad", "channels")} == {"ct", False, 1}
    (out / "manifest.json").write_text(json.dumps(manifest))
    summary = run_extract([volume], out, FOREGROUND, progress=False)
    assert (summary.kept, summary.written) == (1, 0)
    with pytest.raises(ValueError, match="made with other parameters"):
        run_extract([volume], out, ExtractSettings(filter=Foreground(), count=8, modality="mr"), progress=False)
