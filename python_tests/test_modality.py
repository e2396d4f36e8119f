"""Modalities on real data: the MR window and body, the per-volume policies a store records, DICOM's Modality tag,
volumes given under the wrong modality, and volumes thinner than the cube."""

from __future__ import annotations

import json
import locale
import warnings

import numpy as np
import pytest
from conftest import REPO, SHARED_DICOM

from genesis_ext.data import (
    MR_WINDOW,
    ExtractSettings,
    Foreground,
    ModalityWarning,
    PercentileWindow,
    body_mask,
    load_volume,
    run_extract,
)
from genesis_ext.data.cubes import pad_to

MR_DIR = REPO.parent / "shared" / "data" / "abdomen-mr"
MR = MR_DIR / "mr.nii.gz"
CT = REPO.parent / "shared" / "data" / "abdomen-ct" / "ct.nii.gz"
pytestmark = pytest.mark.skipif(not MR.is_file(), reason="the shared abdominal MRI is not present")
SMALL = dict(cube=(32, 32, 16), count=2)


@pytest.fixture(scope="module")
def mr():
    return load_volume(MR)


def write_dicom_series(volume, folder, modality: str):
    """``volume`` as an int16 DICOM series, one file per slice, with the given Modality tag. GDCM's writer sets the
    process's locale to C (text files then open as ASCII, which breaks torch's inductor later in the session): it is
    put back."""
    sitk = pytest.importorskip("SimpleITK")
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(sitk, volume, folder, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(sitk, volume, folder, modality: str):
    folder.mkdir()
    image = sitk.GetImageFromArray(np.round(volume.data).astype(np.int16).transpose(2, 1, 0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sx, sy, sz = volume.spacing
    for k in range(image.GetDepth()):
        tags = {"0008|0060": modality, "0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{k * sz}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{sy}\\{sx}",
                "0018|0050": str(sz)}  # fmt: skip
        slice_ = image[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def test_the_body_holds_every_labelled_organ_and_no_corner_of_air(mr):
    """The label map's 24 structures include organs darker than the background threshold (the spleen's median is 24,
    the threshold 62): the body must hold them all, the air in the slices' corners none of it."""
    labels = load_volume(MR_DIR / "labels.nii.gz").data
    body = body_mask(mr.data)
    assert body[labels > 0].mean() == 1.0
    assert not body[:8, :8].any() and not body[-8:, -8:].any()
    assert 0.7 < body.mean() < 0.85  # 78.6 % measured


def test_the_mr_window_does_not_move_with_the_air_around_the_patient(mr):
    """The same scan with three times as much air around it: the body's percentiles stay, all voxels' do not."""
    roomy = np.zeros((mr.shape[0] * 2, mr.shape[1] * 2, mr.shape[2]), np.float32)
    roomy[: mr.shape[0], : mr.shape[1]] = mr.data
    assert MR_WINDOW.resolve(roomy) == MR_WINDOW.resolve(mr.data)
    everything = PercentileWindow(0.5, 99.5)
    assert everything.resolve(roomy).hi < everything.resolve(mr.data).hi - 50


def test_an_mri_given_as_ct_and_a_ct_given_as_mr_are_named_with_their_values(tmp_path):
    for name, source, given, says in (("mr", MR, "ct", "do not look like Hounsfield units"),
                                      ("ct", CT, "mr", "look like CT in Hounsfield units")):  # fmt: skip
        with pytest.warns(ModalityWarning, match=f"{source}: given as {given}, but its values .* {says}"):
            summary = run_extract(
                [source], tmp_path / name, ExtractSettings(**SMALL, modality=given, filter=None), progress=False
            )
        assert len(summary.warnings) == 1 and f"warning {source}" in "\n".join(summary.lines())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityWarning)  # each under its own modality: no warning
        run_extract([MR], tmp_path / "mr-ok", ExtractSettings(**SMALL, modality="mr"), progress=False)
        run_extract([CT], tmp_path / "ct-ok", ExtractSettings(**SMALL, modality="ct", filter=None), progress=False)


def test_the_dicom_modality_tag_chooses_the_store_and_refuses_the_other_modality(mr, tmp_path):
    series = write_dicom_series(mr, tmp_path / "mr-series", "MR")
    assert load_volume(series).modality == "MR"
    summary = run_extract([series], tmp_path / "auto", ExtractSettings(**SMALL), progress=False)
    params = json.loads((tmp_path / "auto" / "manifest.json").read_text())["params"]
    assert summary.written == 1 and params["modality"] == "mr" and params["filter"]["name"] == "body"
    assert params["window"] == MR_WINDOW.describe()
    mixed = ExtractSettings(**SMALL, modality="mr")
    summary = run_extract([series, SHARED_DICOM], tmp_path / "mixed", mixed, progress=False)
    assert summary.written == 1
    ((source, reason),) = summary.skipped
    assert source == str(SHARED_DICOM) and reason.startswith("its DICOM Modality is CT, this store is mr")


def test_a_thin_volume_is_refused_naming_the_axis_or_padded_with_background(mr, tmp_path):
    cube = (32, 32, 32)  # the scan has 20 slices
    refused = run_extract(
        [MR], tmp_path / "refused", ExtractSettings(cube=cube, count=2, modality="mr"), progress=False
    )
    ((_, reason),) = refused.skipped
    assert "z has 20 voxels, the cube needs 32" in reason and "--pad" in reason and refused.written == 0
    padded = run_extract(
        [MR], tmp_path / "padded", ExtractSettings(cube=cube, count=2, modality="mr", pad=True), progress=False
    )
    assert padded.padded == [(str(MR), "z 6 + 6 voxels")]
    record = json.loads((tmp_path / "padded" / "manifest.json").read_text())["volumes"][0]
    cubes = np.load(tmp_path / "padded" / record["shard"])
    assert record["padded"] == [[0, 0], [0, 0], [6, 6]] and record["window"] == [-4.0, 702.0]
    assert (cubes[..., :6] == 0).all() and (cubes[..., -6:] == 0).all()  # the window's low value: 0 after scaling
    assert (cubes[..., 6:-6].max(axis=(1, 2)) > 0).all()


def test_pad_to_pads_evenly_the_odd_voxel_after():
    data = np.ones((4, 3, 2), np.float32)
    padded, pads = pad_to(data, (4, 6, 5), value=-1.0)
    assert padded.shape == (4, 6, 5) and pads == [[0, 0], [1, 2], [1, 2]]
    assert (padded[:, 1:4, 1:3] == 1).all() and (padded == -1).sum() == padded.size - data.size


def test_pretraining_reads_the_modality_its_stores_record_and_refuses_a_mix(tmp_path):
    pytest.importorskip("torch")
    from genesis_ext.data import CubeStoreDataset
    from genesis_ext.train.pretraining import data_intensity

    run_extract([MR], tmp_path / "mr", ExtractSettings(**SMALL, modality="mr"), progress=False)
    run_extract([CT], tmp_path / "ct", ExtractSettings(**SMALL, filter=Foreground()), progress=False)
    mr_cubes, ct_cubes = CubeStoreDataset(tmp_path / "mr"), CubeStoreDataset(tmp_path / "ct")
    assert data_intensity([mr_cubes], None) == {"modality": "mr", "intensity": MR_WINDOW.describe()}
    assert data_intensity([ct_cubes], "ct")["intensity"] == {"kind": "fixed", "lo": -1000.0, "hi": 1000.0}
    with pytest.raises(
        ValueError, match=f"--modality ct, but the cube store records another: {tmp_path / 'mr'} \\(mr\\)"
    ):
        data_intensity([mr_cubes], "ct")
    with pytest.raises(ValueError, match="the cube stores hold different modalities: .*\\(mr\\), .*\\(ct\\)"):
        data_intensity([mr_cubes, ct_cubes], None)
