"""Shared fixtures of the genesis_ext test suite.

- ``pytest_report_header`` prints ``genesis_ext.build_info()`` so every test log says what was built.
- Tests marked ``cuda`` are skipped (with the reason the extension gives) unless it was built with CUDA and sees a
  device.
- ``ct_cubes``: real chest-CT cubes (N, 1, 64, 64, 32) in [0, 1], prepared exactly like Models Genesis (HU clipped to
  [-1000, 1000], ``(v + 1000) / 2000``). Looked up in ``data/sample/`` (shipped with the repo), then in
  ``../shared/data/totalsegmentator/``; tests that use it skip when neither holds the NIfTI files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import genesis_ext

REPO = Path(__file__).resolve().parents[1]
CT_DIRS = (REPO / "data" / "sample", REPO.parent / "shared" / "data" / "totalsegmentator")
CUBE = (64, 64, 32)
CUBES_PER_VOLUME = 4


def _cuda_skip_reason() -> str | None:
    info = genesis_ext.build_info()
    if not info["with_cuda"]:
        return "genesis_ext was built without CUDA kernels"
    if info["cuda_devices"] < 1:
        return f"no usable CUDA device: {info['cuda_unavailable_reason'] or 'device count is 0'}"
    return None


def pytest_report_header(config):
    info = genesis_ext.build_info()
    return "genesis_ext build_info: " + ", ".join(f"{k}={v!r}" for k, v in info.items())


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def box_union(spatial, boxes, n) -> np.ndarray:
    """The voxels of ``spatial`` inside the union of the first n boxes ((origin, size) per axis, as sample_params
    reports holes and windows): the tests' own rule, written apart from reference.py's (needs no compiled core)."""
    mask = np.zeros(spatial, dtype=bool)
    for origin, size in np.asarray(boxes)[:n]:
        mask[tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))] = True
    return mask


def tiny_pretrain_config(data, out, **changes):
    """A pre-training config of the tests' tiny size (batches of 2, one step per epoch, one epoch, 20% held out, no
    logs beyond the CSV), with ``changes``."""
    from genesis_ext.train import PretrainConfig

    base = dict(
        data=[data],
        out=out,
        batch_size=2,
        steps_per_epoch=1,
        epochs=1,
        val_fraction=0.2,
        progress=False,
        tensorboard=False,
        preview_every=0,
    )
    return PretrainConfig(**(base | changes))


def tiny_finetune_config(data, out, **changes):
    """A fine-tuning config of the tests' tiny size (segmentation, 16^3 patches, batches of 2, one epoch of two
    patches per volume, half the volumes held out), with ``changes``."""
    from genesis_ext.train.finetuning import FinetuneConfig

    base = dict(
        task="segmentation",
        data=str(data),
        out=str(out),
        patch=(16, 16, 16),
        epochs=1,
        batch_size=2,
        patches_per_volume=2,
        val_fraction=0.5,
        progress=False,
    )
    return FinetuneConfig(**(base | changes))


@pytest.fixture
def rng():
    """A fresh, fixed-seed numpy Generator per test (tests stay independent of their order)."""
    return np.random.default_rng(20190601)


def find_ct_volumes() -> list[Path]:
    """The NIfTI chest-CT volumes of the first data folder that has any (sorted, so cube order is stable)."""
    for folder in CT_DIRS:
        if folder.is_dir():
            files = sorted(folder.rglob("*ct*.nii.gz"))  # the CT scans, not the label masks beside them
            if files:
                return files
    return []


@pytest.fixture(scope="session")
def ct_cubes() -> np.ndarray:
    """float32 (8, 1, 64, 64, 32): 4 cubes from each of the two real CT volumes, at fixed random positions."""
    nib = pytest.importorskip("nibabel")
    files = find_ct_volumes()
    if not files:
        pytest.skip(f"no CT volumes (*.nii.gz) in {' or '.join(str(d) for d in CT_DIRS)}")
    picker = np.random.default_rng(7)
    cubes = []
    for path in files:
        volume = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)
        assert volume.ndim == 3 and all(s >= c for s, c in zip(volume.shape, CUBE)), (path, volume.shape)
        volume = ((np.clip(volume, -1000.0, 1000.0) + 1000.0) / 2000.0).astype(np.float32)
        for _ in range(CUBES_PER_VOLUME):
            o = [int(picker.integers(0, s - c + 1)) for s, c in zip(volume.shape, CUBE)]
            cubes.append(volume[o[0] : o[0] + CUBE[0], o[1] : o[1] + CUBE[1], o[2] : o[2] + CUBE[2]])
    batch = np.ascontiguousarray(np.stack(cubes)[:, None])
    assert batch.dtype == np.float32 and batch.shape[1:] == (1, *CUBE)
    assert 0.0 <= batch.min() and batch.max() <= 1.0 and batch.std() > 0.05  # real anatomy, not a constant
    return batch


# ---- small real-data sets for the training tests (pre-training cubes, segmentation and classification data)
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
SHARED_DICOM = (  # a DICOM series of ../shared/data (48 slices of Lung-PET-CT-Dx)
    Path(__file__).resolve().parents[2] / "shared" / "data" / "lung-pet-ct-dx" / "Lung_Dx-A0001" / "3.000000-5mm-41315"
)
SAMPLE_VOLUMES = sorted(SAMPLE_DIR.glob("*.nii.gz"))
TRAIN_CUBE = (16, 16, 16)  # the smallest the default DeformConfig and the U-Net both accept


@pytest.fixture(scope="module")
def cubes(tmp_path_factory) -> Path:
    """A cube store of two 16x16x16 foreground cubes cut from the sample CT (genesis-ext extract)."""
    if not (SAMPLE_DIR / "pulmonary_ct.nii.gz").exists():
        pytest.skip("data/sample CT not available")
    from genesis_ext.data import ExtractSettings, Foreground, run_extract

    out = tmp_path_factory.mktemp("cubes") / "store"
    settings = ExtractSettings(cube=TRAIN_CUBE, count=10, filter=Foreground(), seed=0)
    summary = run_extract([str(SAMPLE_DIR)], str(out), settings, jobs=1, progress=False)
    assert summary.written == 2
    return out


def _sample_volumes():
    """nibabel and the two sample CT crops, or a skip."""
    nib = pytest.importorskip("nibabel")
    if len(SAMPLE_VOLUMES) < 2:
        pytest.skip("data/sample/*.nii.gz (two CT crops) not found")
    return nib, SAMPLE_VOLUMES


SEG_CROP = (48, 48, 32)  # seg_data's volumes: small, so whole-volume validation takes a few windows


def _lung_crop(hu: np.ndarray) -> tuple[slice, ...]:
    """The SEG_CROP box (x, y on an 8-voxel grid, z central) whose lung share (HU < -400) is nearest 30 %."""
    z = hu.shape[2] // 2 - SEG_CROP[2] // 2
    boxes = [
        (slice(x, x + SEG_CROP[0]), slice(y, y + SEG_CROP[1]), slice(z, z + SEG_CROP[2]))
        for x in range(0, hu.shape[0] - SEG_CROP[0] + 1, 8)
        for y in range(0, hu.shape[1] - SEG_CROP[1] + 1, 8)
    ]
    return min(boxes, key=lambda box: abs(float((hu[box] < -400).mean()) - 0.3))


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    """images/ + labels/ NIfTI pairs: a 48x48x32 crop of each sample CT (its own affine) and its lung mask
    (HU < -400, about 30 % of the crop)."""
    nib, volumes = _sample_volumes()
    root = tmp_path_factory.mktemp("seg")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for f in volumes:
        img = nib.load(str(f))
        box = _lung_crop(np.asarray(img.dataobj))
        crop = img.slicer[box]
        hu = np.asarray(crop.dataobj)
        nib.save(crop, str(root / "images" / f.name))
        nib.save(nib.Nifti1Image((hu < -400).astype(np.uint8), crop.affine), str(root / "labels" / f.name))
    return root


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> Path:
    """A path,label CSV of 16x16x16 cubes (.npy in [0, 1] and NIfTI in HU), label = mean HU < -300."""
    nib, volumes = _sample_volumes()
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    rows = []
    for f in volumes:
        img = nib.load(str(f))
        hu = np.asarray(img.dataobj, dtype=np.float32)
        for i in range(12):
            lo = [int(rng.integers(0, s - 16)) for s in hu.shape]
            cube = hu[lo[0] : lo[0] + 16, lo[1] : lo[1] + 16, lo[2] : lo[2] + 16]
            label = "low" if cube.mean() < -300 else "high"
            name = f"{f.name.split('.')[0]}_{i}"
            if i % 3 == 0:  # some as NIfTI in HU, windowed by the loader
                nib.save(nib.Nifti1Image(cube, img.affine), str(root / f"{name}.nii.gz"))
                rows.append((f"{name}.nii.gz", label))
            else:
                np.save(root / f"{name}.npy", (np.clip(cube, -1000, 1000) + 1000) / 2000)
                rows.append((f"{name}.npy", label))
    labels = [r[1] for r in rows]
    assert labels.count("low") >= 3 and labels.count("high") >= 3, labels
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return root / "labels.csv"
