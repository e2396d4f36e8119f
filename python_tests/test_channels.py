"""Several co-registered channels per case: which deformation draws the channels share, and the errors for channels
that do not fit together (grids, counts of data, checkpoint and model)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from conftest import REPO  # noqa: E402

from genesis_ext import DeformConfig, genesis_pair  # noqa: E402
from genesis_ext.data import ExtractSettings, VolumeError, run_extract  # noqa: E402
from genesis_ext.data.io import load_channels  # noqa: E402

MR = REPO.parent / "shared" / "data" / "abdomen-mr" / "mr.nii.gz"


def _two_identical_channels(n=16) -> torch.Tensor:
    one = torch.rand(n, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return torch.cat([one, one], 1)


def test_the_channels_of_a_sample_share_the_geometry_and_the_intensity_map():
    """Flips, shuffle blocks and the Bézier map (one curve per sample) are drawn once per sample: two identical
    channels stay identical through everything but the painting and the Gaussian noise."""
    x = _two_identical_channels()
    unpainted = DeformConfig(paint_rate=0.0, local_rate=1.0, nonlinear_rate=1.0, flip_rate=0.5)
    deformed, _ = genesis_pair(x, seed=3, config=unpainted)
    assert not torch.equal(deformed, x) and torch.equal(deformed[:, 0], deformed[:, 1])


@pytest.mark.parametrize("inpaint_rate", [1.0, 0.0])
def test_painting_covers_the_same_boxes_in_every_channel_with_each_its_own_noise(inpaint_rate):
    x = _two_identical_channels()
    base = dict(local_rate=1.0, nonlinear_rate=1.0, flip_rate=0.5)
    unpainted, _ = genesis_pair(x, seed=3, config=DeformConfig(paint_rate=0.0, **base))
    painted, _ = genesis_pair(
        x,
        seed=3,
        config=DeformConfig(paint_rate=1.0, inpaint_rate=inpaint_rate, outpaint_rate=1 - inpaint_rate, **base),
    )
    boxes = painted != unpainted  # the painted voxels (noise equal to the value it replaces: measure zero)
    assert boxes.any() and torch.equal(boxes[:, 0], boxes[:, 1])
    assert (painted[:, 0][boxes[:, 0]] != painted[:, 1][boxes[:, 1]]).float().mean() > 0.99


def _nifti(path, shape, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine), str(path))
    return str(path)


def test_channels_on_different_grids_are_refused_naming_the_files_and_shapes(tmp_path):
    from genesis_ext.data.io import Source

    a, b = _nifti(tmp_path / "c_0000.nii.gz", (8, 8, 6)), _nifti(tmp_path / "c_0001.nii.gz", (8, 8, 5))
    with pytest.raises(VolumeError, match=rf"{b}: channel 1 has shape \(8, 8, 5\), channel 0 \({a}\) \(8, 8, 6\)"):
        load_channels(Source(a, "c", channels=(a, b)))
    c = _nifti(tmp_path / "d_0001.nii.gz", (8, 8, 6), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(VolumeError, match=rf"{c}: channel 1 has another voxel-to-patient map .* \({a}\), both"):
        load_channels(Source(a, "c", channels=(a, c)))


def test_extract_skips_a_case_with_missing_channel_files_or_a_single_channel_file(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    _nifti(data / "case_0000.nii.gz", (40, 40, 20))
    _nifti(data / "alone.nii.gz", (40, 40, 20))
    summary = run_extract(
        [data], tmp_path / "store", ExtractSettings(cube=(16, 16, 16), count=2, channels=2, filter=None), progress=False
    )
    reasons = dict(summary.skipped)
    assert (
        summary.written == 0
        and "case case has the channel files 0000; need 0000 .. 0001" in reasons[str(data / "case_0000.nii.gz")]
    )
    assert reasons[str(data / "alone.nii.gz")] == "has 1 channel(s), this store takes 2 (--channels)"


@pytest.mark.skipif(not MR.is_file(), reason="the shared abdominal MRI is not present")
def test_a_model_refuses_data_with_other_channels(tmp_path):
    """A two-channel fine-tuned model: a one-channel scan and a three-channel 4-D NIfTI are refused before anything
    is written; one-channel weights do not start a two-channel fine-tuning."""
    from genesis_ext.inference import PredictError
    from genesis_ext.inference.predict import predict
    from genesis_ext.models import ModelRecord
    from genesis_ext.models.weights import atomic_save, seal
    from genesis_ext.train.finetuning import FinetuneConfig, FinetuneError, finetune

    mr_window = {"kind": "percentile", "p_lo": 0.5, "p_hi": 99.5, "region": "body"}
    record = ModelRecord("segmentation", 3, 2, 0.125, "standard", {"liver": 1}, "sigmoid", (16, 16, 16), mr_window,
                         modality="mr")  # fmt: skip
    weights = tmp_path / "two.pt"
    atomic_save(seal({"state_dict": record.build_model().state_dict(), "model_record": record.to_dict()}), weights)
    with pytest.raises(PredictError, match=f"{MR}: 1 channel\\(s\\), but the model takes 2"):
        predict(weights, [MR], tmp_path / "out", progress=False)
    three = _nifti(tmp_path / "three.nii.gz", (20, 20, 20, 3))
    with pytest.raises(PredictError, match=f"{three}: 3 channel\\(s\\), but the model takes 2"):
        predict(weights, [three], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    one = ModelRecord(**{**record.to_dict(), "in_channels": 1})
    single = tmp_path / "one.pt"
    atomic_save(seal({"state_dict": one.build_model().state_dict(), "model_record": one.to_dict()}), single)
    image = tmp_path / "image.nii.gz"
    affine = nib.load(str(MR)).affine
    mr = np.asarray(nib.load(str(MR)).dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([mr, mr], -1), affine), str(image))
    nib.save(nib.Nifti1Image(np.ones(mr.shape, np.uint8), affine), str(tmp_path / "label.nii.gz"))
    (tmp_path / "data.csv").write_text("image,label\nimage.nii.gz,label.nii.gz\n")
    config = FinetuneConfig("segmentation", str(tmp_path / "data.csv"), str(tmp_path / "run"), weights=str(single),
                            patch=(16, 16, 16), epochs=1, val_fraction=0.0, width=0.125, progress=False)  # fmt: skip
    with pytest.raises((FinetuneError, ValueError), match="down_tr64.ops.0.conv1.weight"):
        finetune(config, log=lambda *a: None)


def test_every_channel_is_cut_where_the_first_is(tmp_path):
    """Two identical channels in a 4-D NIfTI, under one fixed window: their cubes are identical, wherever the
    first channel's filter put them."""
    from genesis_ext.data import CubeStoreDataset, NoFilter, Window

    data = np.random.default_rng(1).normal(size=(40, 36, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), np.eye(4)), str(tmp_path / "case.nii.gz"))
    settings = ExtractSettings(cube=(16, 16, 8), count=4, channels=2, filter=NoFilter(), window=Window(-2, 2), seed=5)
    assert run_extract([tmp_path / "case.nii.gz"], tmp_path / "store", settings, progress=False).cubes == 4
    cubes = np.stack([c for c in CubeStoreDataset(tmp_path / "store")])
    assert cubes.shape == (4, 2, 16, 16, 8) and np.array_equal(cubes[:, 0], cubes[:, 1])
    assert len({c.tobytes() for c in cubes[:, 0]}) == 4
