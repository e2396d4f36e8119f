"""Inference (genesis_ext.inference, ``genesis-ext predict``) and the ``ModelRecord`` of fine-tuning checkpoints.

``sliding_window`` against direct forwards of a real (tiny, width 0.125) UNet3D; ``predict`` end to end through real
checkpoint files, with a "threshold model" (sigmoid((x - level) * gain): its label map is the input thresholded at
0 HU, voxel by voxel) so that orientation and resampling can be checked exactly; every refused input leaves ``--out``
empty. The real-data test skips where ../shared/data is absent.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from conftest import REPO, SHARED_DICOM  # noqa: E402

from genesis_ext.cli import main as cli_main  # noqa: E402
from genesis_ext.data import Window, load_volume  # noqa: E402
from genesis_ext.data.io import VolumeError  # noqa: E402
from genesis_ext.inference import PredictError, Predictor, load_predictor, predict_volume  # noqa: E402
from genesis_ext.inference.predict import LPS_TO_RAS, predict  # noqa: E402
from genesis_ext.inference.sliding_window import gaussian_importance, sliding_window, window_starts  # noqa: E402
from genesis_ext.models import CheckpointError, ModelRecord, UNet2D, UNet3D  # noqa: E402
from genesis_ext.models.weights import atomic_save, seal  # noqa: E402

ABDOMEN_CT = REPO.parent / "shared" / "data" / "abdomen-ct" / "ct.nii.gz"
PATCH = (16, 16, 16)
THRESHOLD_HU = 0.0  # the threshold model's level: 0.5 of the default window


def make_record(**changes) -> ModelRecord:
    base = dict(
        task="segmentation",
        dims=3,
        in_channels=1,
        width=0.125,
        batchnorm="standard",
        labels={"liver": 1},
        activation="sigmoid",
        patch=PATCH,
        intensity={"kind": "fixed", "lo": -1000.0, "hi": 1000.0},
        spacing=None,
    )
    return ModelRecord(**(base | changes))


def tiny_unet(seed=0, n_class=1, activation="sigmoid") -> UNet3D:
    """A width-0.125 UNet3D with standard BatchNorm in eval mode, its running statistics not the identity."""
    torch.manual_seed(seed)
    net = UNet3D(1, n_class, batchnorm="standard", width=0.125, activation=activation)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def write_checkpoint(path, record: ModelRecord, model=None, **extra) -> Path:
    """A sealed checkpoint as fine-tuning writes it: the state_dict and the model record."""
    model = record.build_model() if model is None else model
    atomic_save(seal({"state_dict": model.state_dict(), "model_record": record.to_dict(), **extra}), path)
    return Path(path)


class Threshold(torch.nn.Module):
    """A network whose output is monotone in its input: sigmoid((x - level) * gain) (softmax records: logits 0 for
    the background, (x - level) * gain for the class). Probability >= 0.5 exactly where x >= level."""

    def __init__(self, record: ModelRecord):
        super().__init__()
        self.softmax = record.activation == "softmax"
        self.level = torch.nn.Parameter(torch.tensor(record.window.apply(THRESHOLD_HU).item()))
        self.gain = 50.0

    def forward(self, x):
        z = (x - self.level) * self.gain
        return torch.cat([torch.zeros_like(z), z], 1) if self.softmax else torch.sigmoid(z)


@pytest.fixture
def threshold_model(monkeypatch):
    """Records build the Threshold network (so its checkpoints hold its one weight, loaded strictly)."""
    monkeypatch.setattr(ModelRecord, "build_model", lambda self: Threshold(self))


def random_hu(rng, shape) -> np.ndarray:
    """Integer HU in [-500, 500], never exactly the threshold."""
    hu = rng.integers(-500, 501, size=shape).astype(np.float32)
    hu[hu == THRESHOLD_HU] = 1.0
    return hu


def write_nifti(path, data, affine) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return Path(path)


def is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ---- Gaussian importance map and window starts


def test_gaussian_importance_is_symmetric_one_at_the_centre_with_sigma_an_eighth_of_the_patch():
    weights = gaussian_importance((8, 12, 16))
    assert weights.shape == (8, 12, 16) and weights.dtype == torch.float32
    for axis in range(3):
        assert torch.equal(weights, weights.flip(axis))
    assert weights.max() == pytest.approx(1.0) and weights.min() > 0
    odd = gaussian_importance((9, 9, 9))
    assert odd[4, 4, 4] == 1.0 and odd.argmax() == 4 * 81 + 4 * 9 + 4
    # patch 8, sigma 1: voxel 0 is 3.5 from the centre, the maximum's voxel 3 is 0.5 from it
    assert gaussian_importance((8, 8, 8))[0, 3, 3].item() == pytest.approx(math.exp(-(3.5**2 - 0.5**2) / 2), rel=1e-6)


@pytest.mark.parametrize(
    "size, patch, overlap, starts",
    [
        (16, 16, 0.5, [0]),  # one patch
        (10, 16, 0.5, [0]),  # smaller than the patch: padded to it
        (33, 16, 0.5, [0, 6, 11, 17]),  # ceil(17 / 8) + 1 = 4 windows, step 17 / 3
        (33, 16, 0.0, [0, 8, 17]),  # ceil(17 / 16) + 1 = 3, step 8.5: 8.5 rounds to even
        (17, 8, 0.75, [0, 2, 4, 5, 7, 9]),  # step 2: ceil(9 / 2) + 1 = 6, step 1.8
        (32, 16, 0.5, [0, 8, 16]),
    ],
)
def test_window_starts_by_hand(size, patch, overlap, starts):
    assert window_starts(size, patch, overlap) == starts


# ---- sliding_window


def test_sliding_window_on_one_patch_equals_a_direct_forward(rng):
    net = tiny_unet()
    image = torch.from_numpy(rng.random((1, *PATCH), dtype=np.float32))
    with torch.no_grad():
        direct = net(image[None])[0]
    assert torch.allclose(sliding_window(net, image, PATCH), direct, atol=1e-6)


def test_sliding_window_of_the_identity_is_the_image(rng):
    """Every window predicts the image itself: the blend must give it back exactly (weights normalised, each window
    put back where it was cut)."""
    image = torch.from_numpy(rng.random((2, 37, 29, 21), dtype=np.float32))
    for batch_size in (1, 3):
        out = sliding_window(lambda x: x, image, PATCH, overlap=0.5, batch_size=batch_size)
        assert torch.allclose(out, image, atol=1e-6)


def test_sliding_window_does_not_depend_on_batch_size(rng):
    net = tiny_unet()
    image = torch.from_numpy(rng.random((1, 40, 24, 20), dtype=np.float32))  # 4 x 3 x 2 windows at overlap 0.5
    results = [sliding_window(net, image, PATCH, overlap=0.5, batch_size=b) for b in (1, 3, 8)]
    assert results[0].shape == (1, 40, 24, 20)
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-6)


def test_sliding_window_pads_a_small_volume_evenly_and_crops_back(rng):
    net = tiny_unet()
    image = torch.from_numpy(rng.random((1, 10, 16, 13), dtype=np.float32))
    padded = torch.zeros((1, *PATCH))
    padded[:, 3:13, :, 1:14] = image  # (16 - 10) // 2 = 3 before along x, (16 - 13) // 2 = 1 along z
    with torch.no_grad():
        expected = net(padded[None])[0][:, 3:13, :, 1:14]
    assert torch.allclose(sliding_window(net, image, PATCH), expected, atol=1e-6)


def test_mirror_of_a_flip_equivariant_forward_changes_nothing(rng):
    image = torch.from_numpy(rng.random((1, 30, 20, 18), dtype=np.float32))
    square = lambda x: x * x  # noqa: E731 - pointwise, so flip-equivariant
    plain = sliding_window(square, image, PATCH)
    assert torch.allclose(sliding_window(square, image, PATCH, mirror=True), plain, atol=1e-6)


def test_mirror_averages_the_eight_flips(rng):
    net = tiny_unet()
    image = torch.from_numpy(rng.random((1, *PATCH), dtype=np.float32))
    flips = [list(c) for n in range(4) for c in itertools.combinations((2, 3, 4), n)]
    with torch.no_grad():
        by_hand = sum(net(image[None].flip(f)).flip(f) for f in flips)[0] / 8
        plain = net(image[None])[0]
    mirrored = sliding_window(net, image, PATCH, mirror=True)
    assert torch.allclose(mirrored, by_hand, atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-3)  # the flips do change a real network's output


def test_sliding_window_refuses_bad_arguments():
    image = torch.zeros((1, 16, 16, 16))
    with pytest.raises(ValueError, match="overlap must be in"):
        sliding_window(lambda x: x, image, PATCH, overlap=1.0)
    with pytest.raises(ValueError, match="3 spatial axes"):
        sliding_window(lambda x: x, image[0], PATCH)


# ---- ModelRecord


def test_record_round_trips_through_its_dict_and_a_checkpoint(tmp_path):
    record = make_record(labels={"liver": 1, "spleen": 2}, activation="softmax", spacing=(1.5, 1.5, 3))
    assert ModelRecord.from_dict(record.to_dict()) == record
    path = write_checkpoint(tmp_path / "seg.pt", record)
    stored = torch.load(path, weights_only=True)["model_record"]
    assert ModelRecord.from_dict(stored, source=path) == record
    assert record.to_dict()["patch"] == [16, 16, 16] and record.n_outputs == 3


def test_record_stores_numpy_values_as_plain_python_ones(tmp_path):
    """A trainer's sizes and labels are often NumPy scalars, which torch.load(weights_only=True) refuses to read."""
    window = {"kind": "fixed", "lo": np.float32(-1000), "hi": np.int64(1000)}
    record = make_record(dims=np.int64(3), patch=np.array([16, 16, 16]), intensity=window,
                         labels={"liver": np.uint8(1)}, width=np.float64(0.125))  # fmt: skip
    assert record == make_record()
    path = write_checkpoint(tmp_path / "seg.pt", record)
    assert ModelRecord.from_dict(torch.load(path, weights_only=True)["model_record"]) == make_record()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation": "relu"}, "field 'activation' must be one of"),
        ({"labels": {"liver": 0}}, "field 'labels'"),
        ({"labels": {"liver": 1, "spleen": 1}}, "field 'labels'"),
        ({"patch": [16, 16, 12]}, "field 'patch'"),
        ({"dims": 2}, "field 'patch' must be \\[X, Y, 1\\]"),
        ({"intensity": {"kind": "fixed", "lo": 100, "hi": -100}}, "field 'intensity'"),
        ({"intensity": {"kind": "histogram"}}, "field 'intensity'"),
        ({"modality": "pet"}, "field 'modality' must be one of \\['ct', 'mr'\\]"),
        ({"spacing": [1, 1]}, "field 'spacing'"),
        ({"batchnorm": "group"}, "field 'batchnorm'"),
        ({"unexpected": 1}, "unknown field\\(s\\) 'unexpected'"),
    ],
)
def test_record_from_dict_names_the_file_and_the_field(change, message):
    with pytest.raises(CheckpointError, match=f"genesis_ext: /runs/best.pt: its model record .*{message}"):
        ModelRecord.from_dict(make_record().to_dict() | change, source="/runs/best.pt")


def test_record_from_dict_names_a_missing_field():
    d = make_record().to_dict()
    del d["intensity"]
    with pytest.raises(CheckpointError, match="/runs/best.pt: its model record has no field 'intensity'"):
        ModelRecord.from_dict(d, source="/runs/best.pt")


def test_a_record_from_before_modalities_reads_as_its_fixed_ct_window():
    d = {k: v for k, v in make_record().to_dict().items() if k not in ("intensity", "modality")}
    record = ModelRecord.from_dict(d | {"window": [-500, 700]}, source="/runs/old.pt")
    assert record.modality == "ct" and record.window == Window(-500.0, 700.0)
    assert record.intensity == {"kind": "fixed", "lo": -500.0, "hi": 700.0}


def test_record_builds_its_network():
    softmax = make_record(labels={"a": 1, "b": 3}, activation="softmax").build_model()
    assert isinstance(softmax, UNet3D) and softmax.n_class == 3 and softmax.activation == "none"
    flat = make_record(dims=2, patch=(16, 16, 1), batchnorm="batch_stats").build_model()
    assert isinstance(flat, UNet2D) and flat.n_class == 1 and flat.activation == "sigmoid"


def test_softmax_label_map_is_the_argmax_with_the_labels_values():
    record = make_record(labels={"liver": 1, "spleen": 6}, activation="softmax")
    probs = np.array([[0.5, 0.2, 0.3, 0.1], [0.3, 0.7, 0.3, 0.2], [0.2, 0.1, 0.4, 0.7]], np.float32)[:, :, None, None]
    labels = record.label_map(probs)
    assert labels.dtype == np.uint8 and labels.shape == (4, 1, 1)
    assert labels.ravel().tolist() == [0, 1, 6, 6]  # background wins the first voxel though no class is below 0.5
    assert torch.equal(record.label_map(torch.from_numpy(probs)), torch.from_numpy(labels))


def test_sigmoid_label_map_takes_the_largest_class_at_or_above_one_half():
    record = make_record(labels={"liver": 2, "tumour": 5})
    probs = np.array([[0.9, 0.6, 0.4, 0.5], [0.7, 0.8, 0.45, 0.2]], np.float32)[:, :, None, None]
    assert record.label_map(probs).ravel().tolist() == [2, 5, 0, 2]  # overlap: the larger; 0.5 counts


# ---- predict_volume


def test_2d_record_predicts_slice_by_slice(tmp_path, rng):
    record = make_record(dims=2, patch=(16, 16, 1))
    torch.manual_seed(0)
    net = record.build_model().eval()
    hu = rng.uniform(-1000, 1000, size=(16, 16, 3)).astype(np.float32)
    volume = load_volume(write_nifti(tmp_path / "slices.nii.gz", hu, np.diag([-1.0, -1, 1, 1])))  # LPS: as stored
    _, probs = predict_volume(Predictor(net, record, torch.device("cpu")), volume)
    with torch.no_grad():
        window = torch.from_numpy((np.clip(hu, -1000, 1000) + 1000) / 2000).float()
        by_slice = torch.stack([net(window[None, None, :, :, k])[0] for k in range(3)], -1)
    assert np.allclose(probs, by_slice.numpy(), atol=1e-5)


# ---- predict: orientation, resampling, outputs


AFFINES = {
    # file axis 0 points anterior, 1 inferior, 2 right-to-left: permuted and flipped against LPS
    "permuted": np.array([[0, 0, -2.0, 30], [1.5, 0, 0, -10], [0, -1.0, 0, 5], [0, 0, 0, 1]]),
    "flipped": np.diag([1.5, -2.0, -1.0, 1.0]),  # RPI: same axis order as LPS, x and z reversed
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_predict_keeps_the_input_files_voxel_order_and_affine(name, threshold_model, tmp_path, rng):
    hu = random_hu(rng, (20, 26, 23))
    source = write_nifti(tmp_path / "scan.nii.gz", hu, AFFINES[name])
    weights = write_checkpoint(tmp_path / "w.pt", make_record())
    written = predict(weights, [source], tmp_path / "out", probabilities=True, progress=False)
    assert written == [tmp_path / "out" / "scan.nii.gz", tmp_path / "out" / "scan_probabilities.nii.gz"]
    labels, probs = (nib.load(str(p)) for p in written)
    assert np.array_equal(labels.affine, AFFINES[name]) and np.array_equal(probs.affine, AFFINES[name])
    assert labels.get_data_dtype() == np.uint8 and probs.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(labels.dataobj), (hu > THRESHOLD_HU).astype(np.uint8))
    assert probs.shape == (*hu.shape, 1)
    assert np.array_equal(np.asarray(probs.dataobj)[..., 0] >= 0.5, hu > THRESHOLD_HU)


def test_predict_resamples_to_the_records_spacing_and_back_to_the_exact_grid(threshold_model, tmp_path):
    shape = (43, 38, 35)  # at 3 mm (22, 19, 18): rounded up, so resampling back to 1.5 mm gives (44, 38, 36)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    hu = 400 * np.sin(x / 6) * np.cos(y / 7) + 150 * np.cos(z / 5) + 7  # smooth, so 3 mm still resolves it
    source = write_nifti(tmp_path / "fine.nii.gz", hu, np.diag([-1.5, -1.5, 1.5, 1]))
    weights = write_checkpoint(tmp_path / "w.pt", make_record(spacing=(3.0, 3.0, 3.0)))
    (path,) = predict(weights, [source], tmp_path / "out", progress=False)
    labels = np.asarray(nib.load(str(path)).dataobj)
    assert labels.shape == shape
    agreement = (labels == (hu > THRESHOLD_HU)).mean()
    assert agreement >= 0.99, agreement


def test_resampling_is_skipped_within_one_percent(monkeypatch, threshold_model, tmp_path, rng):
    import genesis_ext.inference.predict as module

    monkeypatch.setattr(module, "resample", lambda *a: pytest.fail("resampled within 1 %"))
    hu = random_hu(rng, (16, 16, 16))
    source = write_nifti(tmp_path / "scan.nii.gz", hu, np.diag([1.0, 1.0, 2.0, 1]))
    weights = write_checkpoint(tmp_path / "w.pt", make_record(spacing=(1.005, 0.995, 2.01)))
    (path,) = predict(weights, [source], tmp_path / "out", progress=False)
    assert np.array_equal(np.asarray(nib.load(str(path)).dataobj), hu > THRESHOLD_HU)


def test_predict_writes_metaimage_inputs_in_lps_with_the_ras_affine(threshold_model, tmp_path, rng):
    sitk = pytest.importorskip("SimpleITK")
    hu = random_hu(rng, (18, 20, 22))  # (z, y, x), as SimpleITK arrays are
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # x and z reversed against LPS
    sitk.WriteImage(image, str(tmp_path / "scan.mha"))
    volume = load_volume(tmp_path / "scan.mha")
    weights = write_checkpoint(tmp_path / "w.pt", make_record())
    (path,) = predict(weights, [tmp_path / "scan.mha"], tmp_path / "out", progress=False)
    out = nib.load(str(path))
    assert np.array_equal(np.asarray(out.dataobj), volume.data > THRESHOLD_HU)
    assert np.allclose(out.affine, LPS_TO_RAS @ volume.affine)
    labels = np.asarray(out.dataobj)
    for index in [(0, 0, 0), (3, 4, 5), (21, 19, 17)]:  # SimpleITK's (x, y, z): the same point in the output
        ras = np.array(image.TransformIndexToPhysicalPoint(index)) * [-1, -1, 1]
        voxel = np.round(np.linalg.inv(out.affine) @ [*ras, 1])[:3].astype(int)
        assert labels[tuple(voxel)] == (hu[index[::-1]] > THRESHOLD_HU)


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"{SHARED_DICOM} (shared data) not found")
def test_predict_writes_a_dicom_series_in_lps_with_the_ras_affine(threshold_model, tmp_path):
    pytest.importorskip("SimpleITK")
    volume = load_volume(SHARED_DICOM)  # 512 x 512 x 48: one window of the whole series
    weights = write_checkpoint(tmp_path / "w.pt", make_record(patch=volume.shape))
    (path,) = predict(weights, [SHARED_DICOM], tmp_path / "out", progress=False)
    out = nib.load(str(path))
    assert path.name == f"{SHARED_DICOM.name}.nii.gz" and np.allclose(out.affine, LPS_TO_RAS @ volume.affine)
    decided = volume.data != THRESHOLD_HU  # exactly at the level the model is undecided (0.5)
    assert np.array_equal(np.asarray(out.dataobj)[decided], volume.data[decided] > THRESHOLD_HU)


def test_softmax_probabilities_hold_the_classes_only(tmp_path, rng):
    record = make_record(labels={"liver": 1, "spleen": 2}, activation="softmax")
    weights = write_checkpoint(tmp_path / "w.pt", record, tiny_unet(n_class=3, activation="none"))
    source = write_nifti(tmp_path / "scan.nii.gz", random_hu(rng, (20, 16, 18)), np.diag([1.0, 1, 1, 1]))
    labels_path, probs_path = predict(weights, [source], tmp_path / "out", probabilities=True, progress=False)
    labels = np.asarray(nib.load(str(labels_path)).dataobj)
    probs = np.asarray(nib.load(str(probs_path)).dataobj)
    assert probs.shape == (20, 16, 18, 2) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.sum(-1).max() <= 1 + 1e-6  # background dropped: the classes sum below 1
    background = 1 - probs.sum(-1)
    expected = np.array([0, 1, 2], np.uint8)[np.argmax(np.concatenate([background[..., None], probs], -1), -1)]
    assert np.array_equal(labels, expected)


def test_overwrite_replaces_earlier_predictions(threshold_model, tmp_path, rng):
    source = write_nifti(tmp_path / "scan.nii.gz", random_hu(rng, (16, 16, 16)), np.eye(4))
    weights = write_checkpoint(tmp_path / "w.pt", make_record())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scan.nii.gz").write_bytes(b"stale")
    (path,) = predict(weights, [source], tmp_path / "out", overwrite=True, progress=False)
    assert nib.load(str(path)).shape == (16, 16, 16)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.nii.gz"]  # no temporary file left


# ---- refused input: the message, and nothing written


@pytest.fixture
def case(tmp_path, rng):
    """A NIfTI scan, a segmentation checkpoint of a tiny UNet3D, and the output folder's path."""
    source = write_nifti(tmp_path / "scan.nii.gz", random_hu(rng, (16, 16, 16)), np.eye(4))
    return source, write_checkpoint(tmp_path / "w.pt", make_record()), tmp_path / "out"


def test_refuses_existing_predictions_naming_them(case):
    source, weights, out = case
    out.mkdir()
    (out / "scan_probabilities.nii.gz").write_bytes(b"old")
    with pytest.raises(PredictError, match=r"already holds predictions .*scan_probabilities\.nii\.gz.*overwrite"):
        predict(weights, [source], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["scan_probabilities.nii.gz"]


def test_label_maps_found_in_a_folder_are_skipped_with_a_warning(case, tmp_path):
    """A folder like the shared abdominal CT's (the scan, and masks/ beside it): the masks are not segmented; named
    on its own, a mask is predicted like any volume; a folder that holds label maps only is refused."""
    source, weights, out = case
    folder = tmp_path / "study"
    (folder / "masks").mkdir(parents=True)
    (folder / "scan.nii.gz").write_bytes(source.read_bytes())
    write_nifti(folder / "masks" / "liver.nii.gz", np.zeros((16, 16, 16), np.uint8), np.eye(4))
    with pytest.warns(UserWarning, match=r"liver.nii.gz: skipped, a label map \(in a folder named 'masks'\)"):
        written = predict(weights, [folder], out, progress=False)
    assert [p.name for p in written] == ["scan.nii.gz"]
    assert [p.name for p in predict(weights, [folder / "masks" / "liver.nii.gz"], out, progress=False)] == [
        "liver.nii.gz"
    ]
    (folder / "scan.nii.gz").unlink()
    with pytest.raises(PredictError, match="no images to predict, only label maps"), pytest.warns(UserWarning):
        predict(weights, [folder], tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()


def test_refuses_inputs_that_do_not_exist(case):
    source, weights, out = case
    with pytest.raises(PredictError, match="missing.nii.gz: no such file or directory"):
        predict(weights, [source, source.parent / "missing.nii.gz"], out, progress=False)
    assert is_empty(out)


def test_refuses_a_classification_checkpoint(case, tmp_path):
    source, _, out = case
    weights = write_checkpoint(tmp_path / "cls.pt", make_record(task="classification", labels={"low": 0, "high": 1}),
                               UNet3D(width=0.125))  # fmt: skip
    with pytest.raises(CheckpointError, match="cls.pt is a classification checkpoint; predict segments"):
        predict(weights, [source], out, progress=False)
    assert is_empty(out)


def test_refuses_a_checkpoint_without_a_record(case, tmp_path):
    source, _, out = case
    weights = tmp_path / "plain.pt"
    atomic_save(seal({"state_dict": UNet3D(width=0.125).state_dict()}), weights)
    with pytest.raises(
        CheckpointError, match="plain.pt has no model record: it was not written by genesis-ext finetune"
    ):
        predict(weights, [source], out, progress=False)
    assert is_empty(out)


def test_refuses_a_damaged_checkpoint(case):
    source, weights, out = case
    weights.write_bytes(weights.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="is damaged"):
        predict(weights, [source], out, progress=False)
    assert is_empty(out)


def test_refuses_weights_that_do_not_fit_the_record(case, tmp_path):
    source, _, out = case
    weights = write_checkpoint(tmp_path / "wide.pt", make_record(), UNet3D(width=0.25))
    with pytest.raises(
        CheckpointError, match="does not fit the UNet3D.*its model record does not describe its weights"
    ):
        predict(weights, [source], out, progress=False)
    assert is_empty(out)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1), (16, 16, 16, 2)])
def test_refuses_a_volume_that_is_not_3d_before_predicting_the_others(case, shape):
    source, weights, out = case
    flat = write_nifti(source.parent / "zz_flat.nii.gz", np.zeros(shape, np.float32), np.eye(4))  # after scan
    with pytest.raises(VolumeError, match=re.escape(f"zz_flat.nii.gz: is not a 3D volume (shape {shape})")):
        predict(weights, [source, flat], out, progress=False)
    assert is_empty(out)


def test_refuses_two_inputs_that_would_get_one_name(case, rng):
    source, weights, out = case
    other = write_nifti(source.parent / "sc an.nii.gz", random_hu(rng, (16, 16, 16)), np.eye(4))
    twin = write_nifti(source.parent / "sc_an.nii.gz", random_hu(rng, (16, 16, 16)), np.eye(4))
    with pytest.raises(PredictError, match="would both be written as 'sc_an'"):
        predict(weights, [other, twin], out, progress=False)
    assert is_empty(out)


def test_refuses_an_out_that_is_a_file(case):
    source, weights, out = case
    out.write_text("not a folder")
    with pytest.raises(PredictError, match="is a file, not a folder"):
        predict(weights, [source], out, progress=False)


def test_load_predictor_reads_the_record_and_the_weights(case):
    _, weights, _ = case
    predictor = load_predictor(weights, device="cpu")
    assert predictor.record == make_record() and not predictor.model.training and not predictor.amp
    saved = torch.load(weights, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in predictor.model.state_dict().items())


# ---- the verb


def test_verb_prints_each_written_file(case, capsys):
    source, weights, out = case
    code = cli_main(["predict", "--weights", str(weights), str(source), "--out", str(out), "--probabilities",
                     "--quiet", "--overlap", "0.25", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / 'scan.nii.gz'}",
        f"wrote {out / 'scan_probabilities.nii.gz'}",
    ]


def test_verb_reports_bad_input_with_exit_status_2(case, capsys):
    source, weights, out = case
    code = cli_main(["predict", "--weights", str(weights), str(source) + ".missing", "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("genesis-ext predict: ") and "no such file or directory" in err
    assert is_empty(out)


def test_verb_without_torch_says_what_to_install(case):
    source, weights, out = case
    argv = ["predict", "--weights", str(weights), str(source), "--out", str(out)]
    code = (
        "import sys\nsys.modules['torch'] = None  # as if torch were not installed\n"
        f"from genesis_ext.cli import main\nsys.exit(main({argv!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "genesis-ext predict: predicting needs PyTorch, which is not installed" in run.stderr
    assert "Traceback" not in run.stderr and is_empty(out)


# ---- real data


@pytest.mark.skipif(not ABDOMEN_CT.exists(), reason=f"{ABDOMEN_CT} (shared data) not found")
def test_predict_on_real_abdominal_ct(tmp_path):
    # predicted at 6 mm (one 64^3 window: fast) and resampled back to the scan's 3 mm grid
    record = make_record(labels={"liver": 1, "spleen": 2}, activation="softmax", patch=(64, 64, 64), spacing=(6, 6, 6))
    weights = write_checkpoint(tmp_path / "w.pt", record, tiny_unet(n_class=3, activation="none"))
    (path,) = predict(weights, [ABDOMEN_CT], tmp_path / "out", progress=False)
    source, out = nib.load(str(ABDOMEN_CT)), nib.load(str(path))
    assert out.shape == source.shape and np.array_equal(out.affine, source.affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}


# ---- on a GPU (skipped without one)


@pytest.mark.cuda
def test_predict_on_cuda_agrees_with_the_cpu(tmp_path, rng):
    """The same checkpoint on CUDA (bf16 autocast) and on the CPU (float32): the label maps agree on all but a few
    voxels near the decision boundary, and the probabilities within bf16's precision."""
    from genesis_ext.data.io import Volume

    record = make_record(labels={"liver": 1, "spleen": 2}, activation="softmax")
    weights = write_checkpoint(tmp_path / "w.pt", record, tiny_unet(n_class=3, activation="none"))
    volume = Volume(random_hu(rng, (40, 36, 24)), (1.0, 1.0, 1.0), np.eye(4))
    cpu = predict_volume(load_predictor(weights, "cpu"), volume)
    gpu = predict_volume(load_predictor(weights, "cuda"), volume)
    assert np.mean(cpu[0] == gpu[0]) > 0.99
    assert np.abs(cpu[1] - gpu[1]).max() < 0.05


def test_amp_is_bf16_on_cuda_by_default_and_as_asked(case):
    """auto: bf16 only on CUDA (so a CPU prediction is float32, as fine-tuning's validation is by default); bf16 and
    off as asked; anything else refused."""
    _, weights, _ = case
    assert [load_predictor(weights, "cpu", amp).amp for amp in ("auto", "bf16", "off")] == [False, True, False]
    with pytest.raises(PredictError, match="amp must be one of"):
        load_predictor(weights, "cpu", "fp8")


def test_a_batch_statistics_checkpoint_is_predicted_with_a_warning(tmp_path):
    """The published BatchNorm normalises each batch of windows with its own statistics: said, not hidden."""
    weights = write_checkpoint(tmp_path / "w.pt", make_record(batchnorm="batch_stats"))
    with pytest.warns(UserWarning, match="depend on which windows share a batch"):
        load_predictor(weights, "cpu")


def test_refuses_a_dicom_series_of_another_modality_than_the_models(tmp_path):
    pytest.importorskip("SimpleITK")
    mr_window = {"kind": "percentile", "p_lo": 0.5, "p_hi": 99.5, "region": "body"}
    weights = write_checkpoint(tmp_path / "w.pt", make_record(intensity=mr_window, modality="mr"))
    refusal = f"{SHARED_DICOM}: its DICOM Modality is CT; this model was fine-tuned on mr"
    with pytest.raises(PredictError, match=refusal):
        predict(weights, [SHARED_DICOM], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
