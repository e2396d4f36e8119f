"""Shared fixtures of the genesis_ext test suite.

- ``pytest_report_header`` prints ``genesis_ext.build_info()`` so every test log says what was built.
- Tests marked ``cuda`` are skipped (with the reason the extension gives) unless it was built with CUDA and sees a
  device.
- ``ct_cubes``: real chest-CT cubes (N, 1, 64, 64, 32) in [0, 1], prepared exactly like Models Genesis (HU clipped to
  [-1000, 1000], ``(v + 1000) / 2000``). Looked up in ``data/sample/`` (shipped with the repo), then in
  ``../shared/data/totalsegmentator/``; tests that use it skip when neither holds the NIfTI files.
"""

from __future__ import annotations

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
