"""genesis_ext.data loading: real DICOM and NIfTI CT, canonical LPS+ orientation, spacing, HU, and bad input.

Real data: the bundled crops in data/sample (always) and the DICOM series in ../shared/data (skipped if absent).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from genesis_ext.data import ORIENTATION, VolumeError, find_sources, load_volume

nib = pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED = REPO.parent / "shared" / "data"
DICOM_DIR = SHARED / "lung-pet-ct-dx" / "Lung_Dx-A0001" / "3.000000-5mm-41315"
NIFTI = {"pulmonary_ct.nii.gz": ((122, 102, 112), -1064, 3343), "aorta_ct.nii.gz": ((120, 126, 164), -1078, 3343)}


def needs_dicom():
    pytest.importorskip("SimpleITK")
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM series not found at {DICOM_DIR}")


@pytest.fixture(scope="module")
def dicom():
    needs_dicom()
    return load_volume(DICOM_DIR)


@pytest.fixture(scope="module")
def pulmonary():
    return load_volume(SAMPLE / "pulmonary_ct.nii.gz")


@pytest.mark.parametrize("name", sorted(NIFTI))
def test_nifti_sample_loads_in_hu(name):
    shape, lo, hi = NIFTI[name]
    v = load_volume(SAMPLE / name)
    assert v.data.dtype == np.float32 and v.data.flags.f_contiguous  # x fastest, as stored: no copy
    assert v.shape == shape and v.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert (v.data.min(), v.data.max()) == (lo, hi)
    # these files are stored LPS+ already: the array is the file's array, untouched
    raw = nib.load(str(SAMPLE / name))
    assert nib.aff2axcodes(raw.affine) == ORIENTATION
    np.testing.assert_array_equal(v.data, raw.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(v.affine, np.diag([-1, -1, 1, 1]) @ raw.affine)


def test_dicom_series_loads_in_hu(dicom):
    assert dicom.shape == (512, 512, 48) and dicom.data.dtype == np.float32
    assert dicom.spacing == pytest.approx((0.841796875, 0.841796875, 5.0))
    # stored 0 .. ~2400 with RescaleIntercept -1024: the rescale is applied
    assert (dicom.data.min(), dicom.data.max()) == (-1024.0, 1373.0)
    assert 0.5 < np.mean(dicom.data < -900) < 0.65  # about 57 % air outside the body and in the lungs
    # LPS+: z goes up (superior); the first slice is the most inferior one, at z = -399 mm
    assert dicom.affine[2, 2] == pytest.approx(5.0) and dicom.affine[2, 3] == pytest.approx(-399.0)
    np.testing.assert_allclose(dicom.affine[:3, :3], np.diag(dicom.spacing))


def test_dicom_slices_ordered_by_position_not_name(dicom, tmp_path):
    """Copy the slices under scrambled names (name order != position order): same volume, and each slice is the file
    at that position (read one by one, sorted by ImagePositionPatient z)."""
    import SimpleITK as sitk

    files = sorted(DICOM_DIR.glob("*.dcm"))
    order = np.random.default_rng(3).permutation(len(files))
    for new_name, k in enumerate(order):
        shutil.copy(files[k], tmp_path / f"{new_name:03d}.dcm")
    copy = load_volume(tmp_path)
    np.testing.assert_array_equal(copy.data, dicom.data)
    z = [sitk.ReadImage(str(f)).GetOrigin()[2] for f in files]
    first, last = files[int(np.argmin(z))], files[int(np.argmax(z))]
    for f, k in ((first, 0), (last, -1)):
        one = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0].T  # (x, y)
        np.testing.assert_array_equal(dicom.data[:, :, k], one)
    # a single .dcm file stands for its series
    np.testing.assert_array_equal(load_volume(tmp_path / "000.dcm").data, dicom.data)


AXCODES = [("R", "A", "S"), ("L", "A", "I"), ("S", "R", "P"), ("A", "I", "L"), ("I", "L", "A")]


@pytest.mark.parametrize("axcodes", AXCODES, ids=["".join(a) for a in AXCODES])
def test_orientation_canonical_whatever_the_file(pulmonary, tmp_path, axcodes):
    """An anisotropic LPS+ volume re-oriented and saved with nibabel loads back as the same (x, y, z) LPS+ array,
    with the spacing of each patient axis in the same order."""
    from nibabel import orientations as ornt

    base_affine = np.diag([-1.0, -2.0, 3.0, 1.0])  # RAS world: x towards L (1 mm), y towards P (2 mm), z S (3 mm)
    base = nib.Nifti1Image(pulmonary.data.astype(np.int16), base_affine)
    transform = ornt.ornt_transform(ornt.io_orientation(base_affine), ornt.axcodes2ornt(axcodes))
    other = base.as_reoriented(transform)
    assert nib.aff2axcodes(other.affine) == axcodes
    nib.save(other, tmp_path / "reoriented.nii.gz")
    v = load_volume(tmp_path / "reoriented.nii.gz")
    np.testing.assert_array_equal(v.data, pulmonary.data)
    assert min(v.data.strides) > 0
    assert v.spacing == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_allclose(v.affine, np.diag([-1, -1, 1, 1]) @ base_affine, atol=1e-6)
    # SimpleITK reads the same file to the same array (both paths use LPS+)
    pytest.importorskip("SimpleITK")
    s = load_volume(tmp_path / "reoriented.nii.gz", backend="sitk")
    np.testing.assert_array_equal(s.data, pulmonary.data)
    assert s.spacing == pytest.approx(v.spacing)
    np.testing.assert_allclose(s.affine, v.affine, atol=1e-4)


def test_metaimage_and_nrrd_any_direction(pulmonary, tmp_path):
    """A volume written by SimpleITK with flipped axes (RAS-like direction) as .mhd and .nrrd loads back LPS+."""
    sitk = pytest.importorskip("SimpleITK")
    flipped = pulmonary.data[::-1, ::-1, :]  # (x towards R, y towards A, z S)
    image = sitk.GetImageFromArray(np.ascontiguousarray(flipped.transpose(2, 1, 0)).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    for suffix in (".mhd", ".nrrd"):
        sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
        v = load_volume(tmp_path / f"scan{suffix}")
        np.testing.assert_array_equal(v.data, pulmonary.data)
        assert v.spacing == pytest.approx((0.7, 0.8, 2.5))
        np.testing.assert_allclose(v.affine[:3, :3], np.diag([0.7, 0.8, 2.5]), atol=1e-9)


def test_4d_singleton_is_3d(pulmonary, tmp_path):
    img = nib.Nifti1Image(pulmonary.data[..., None], np.diag([-1.5, -1.5, 1.5, 1.0]))
    nib.save(img, tmp_path / "v4.nii")
    np.testing.assert_array_equal(load_volume(tmp_path / "v4.nii").data, pulmonary.data)


def _expect(path, *words):
    with pytest.raises(VolumeError) as info:
        load_volume(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    for w in words:
        assert w in info.value.reason, info.value.reason
    return info.value


def test_bad_inputs_name_the_file(tmp_path):
    good = (SAMPLE / "pulmonary_ct.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    _expect(tmp_path / "truncated.nii.gz", "cannot read as NIfTI")
    raw = gzip.decompress(good)
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) // 3])  # header fine, data cut
    _expect(tmp_path / "short.nii", "cannot read as NIfTI")
    (tmp_path / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    _expect(tmp_path / "garbage.nii.gz", "cannot read as NIfTI")
    (tmp_path / "notes.txt").write_text("not an image\n")
    _expect(tmp_path / "notes.txt", "not a supported image format")
    _expect(tmp_path / "missing.nii.gz", "no such file")
    nib.save(nib.Nifti1Image(np.zeros((40, 30), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    _expect(tmp_path / "flat.nii.gz", "not a 3D volume", "(40, 30)")
    nib.save(nib.Nifti1Image(np.zeros((40, 30, 1), np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
    _expect(tmp_path / "slice.nii.gz", "not a 3D volume")


def test_bad_inputs_through_simpleitk(tmp_path):
    pytest.importorskip("SimpleITK")
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no DICOM here")
    _expect(empty, "no DICOM series")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "photo.png")
    _expect(tmp_path / "photo.png", "not a 3D volume")
    (tmp_path / "broken.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementDataFile = nope.raw\n")
    _expect(tmp_path / "broken.mhd", "cannot read image")
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 50)
    with pytest.raises(VolumeError):
        load_volume(tmp_path / "fake.dcm")


def test_find_sources_walks_directories(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(SAMPLE / "pulmonary_ct.nii.gz", tmp_path / "a" / "b" / "p.nii.gz")
    shutil.copy(SAMPLE / "aorta_ct.nii.gz", tmp_path / "a" / "p.nii.gz")
    (tmp_path / "a" / "LICENSE").write_text("text")
    (tmp_path / "empty").mkdir()
    sources, problems = find_sources([tmp_path / "a", tmp_path / "empty", tmp_path / "nope"])
    assert [s.key for s in sources] == ["b/p.nii.gz", "p.nii.gz"]
    assert len({s.tag for s in sources}) == 2
    assert [p for p, _ in problems] == [str(tmp_path / "empty"), str(tmp_path / "nope")]
    # the same name under two inputs: keys stay distinct
    sources, _ = find_sources([tmp_path / "a" / "b" / "p.nii.gz", tmp_path / "a" / "p.nii.gz"])
    assert len({s.key for s in sources}) == 2


def test_find_sources_follows_symlinked_folders_once(tmp_path):
    """A symlinked sub-folder (scans kept on another disk) is searched; links that loop back up the tree, or lead to
    a folder walked already, are not followed again (no endless walk, no volume twice)."""
    elsewhere = tmp_path / "elsewhere" / "scans"
    elsewhere.mkdir(parents=True)
    shutil.copy(SAMPLE / "aorta_ct.nii.gz", elsewhere / "a.nii.gz")
    (elsewhere / "up").symlink_to(tmp_path / "elsewhere")  # a loop outside the input
    root = tmp_path / "in"
    (root / "real").mkdir(parents=True)
    shutil.copy(SAMPLE / "pulmonary_ct.nii.gz", root / "real" / "p.nii.gz")
    (root / "linked").symlink_to(elsewhere)
    (root / "linked_twice").symlink_to(elsewhere)
    (root / "alias").symlink_to(root / "real")  # inside the input: walked under its own name only
    (root / "real" / "loop").symlink_to(root)
    sources, problems = find_sources([root])
    assert [s.key for s in sources] == ["linked/a.nii.gz", "real/p.nii.gz"] and not problems


def _image_tree(root: Path) -> list[str]:
    """What discovery should find under ``root``, listed by a plain walk: every NIfTI/MetaImage/NRRD file, and each
    folder holding .dcm files as one source (data added to the folder changes the list, never the rule)."""
    keys = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.name.endswith((".nii", ".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr"))
    }
    keys |= {p.parent.relative_to(root).as_posix() for p in root.rglob("*.dcm")}
    return sorted(keys)


def test_find_sources_real_data_tree():
    needs_dicom()
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    sources, problems = find_sources([SHARED])
    assert not problems
    # Every image source, label masks included (extraction, not discovery, decides what is CT); each DICOM series as
    # one source per folder; READMEs and LICENSEs ignored. The tree may grow: what must hold is the rule.
    expected = _image_tree(SHARED)
    assert "lung-pet-ct-dx/Lung_Dx-A0001/3.000000-5mm-41315" in expected  # the walk sees the series we rely on
    assert sorted(s.key for s in sources) == expected


def test_without_simpleitk_the_message_says_how_to_install(monkeypatch, tmp_path, pulmonary):
    import sys

    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK -> ImportError
    (tmp_path / "scan.mhd").write_text("ObjectType = Image\n")
    _expect(tmp_path / "scan.mhd", "pip install 'genesis-ext[io]'")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"\0" * 128 + b"DICM")
    _expect(tmp_path / "series", "pip install 'genesis-ext[io]'")
    (tmp_path / "notes.txt").write_text("x")
    _expect(tmp_path / "notes.txt", "not a supported image format")
    np.testing.assert_array_equal(load_volume(SAMPLE / "pulmonary_ct.nii.gz").data, pulmonary.data)  # nibabel only
