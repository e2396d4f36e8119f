"""Training datasets: cube store (memory-mapped) and on-the-fly volumes, with DataLoader workers and
DistributedSampler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from genesis_ext.data import (
    CubeStoreDataset,
    ExtractSettings,
    Foreground,
    VolumeCubeDataset,
    run_extract,
    save_published,
)

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    run_extract([SAMPLE], out, ExtractSettings(filter=Foreground(), count=6), jobs=1, progress=False)
    return out


def all_items(dataset) -> np.ndarray:
    return np.stack([dataset[i] for i in range(len(dataset))])


def test_cube_store_dataset_items(store):
    ds = CubeStoreDataset(store)
    assert len(ds) == 12 and ds.cube == (64, 64, 32)
    item = ds[3]
    assert item.shape == (1, 64, 64, 32) and item.dtype == np.float32 and 0 <= item.min() and item.max() <= 1
    assert ds.store._maps  # opened on first access ...
    state = pickle.dumps(ds)
    assert len(state) < 20_000 and not pickle.loads(state).store._maps  # ... and never pickled


def test_cube_store_dataset_in_worker_processes(store):
    """Spawned workers (the strictest start method: everything is pickled) return the same cubes, in order."""
    ds = CubeStoreDataset(store)
    expect = all_items(ds)
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(5, 1, 64, 64, 32)] * 2 + [(2, 1, 64, 64, 32)]
    assert batches[0].dtype == torch.float32
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expect)


def genesis_pair_transform(cube, index):
    """docs/usage.md recipe: each cube's training pair at its global index (epoch * len + i), made in the worker."""
    import genesis_ext

    deformed, target = genesis_ext.genesis_pair(torch.from_numpy(cube)[None], seed=7, offset=index)
    return deformed[0], target[0]


def test_transform_gets_the_global_index_in_dataloader_workers(store):
    """The pair made in 2 spawned workers equals the pair of the whole epoch made at once, and the next epoch gets
    new indices (new deformations of the same cubes)."""
    import genesis_ext

    ds = CubeStoreDataset(store, transform=genesis_pair_transform)
    cubes = torch.from_numpy(all_items(CubeStoreDataset(store)))
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="spawn")
        deformed, target = (torch.cat(parts) for parts in zip(*loader))
        want = genesis_ext.genesis_pair(cubes, seed=7, offset=epoch * len(ds))
        assert torch.equal(deformed, want[0]) and torch.equal(target, want[1])
    assert not torch.equal(deformed, genesis_ext.genesis_pair(cubes, seed=7, offset=0)[0])
    plain = CubeStoreDataset(store, transform=lambda cube: cube * 2)  # one argument: the item alone
    assert np.array_equal(plain[1], 2 * CubeStoreDataset(store)[1])


def test_distributed_sampler_splits_the_store(store):
    ds = CubeStoreDataset(store)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2)
        seen.append(torch.cat(list(loader)).numpy())
    assert len(seen[0]) == len(seen[1]) == 6
    flat = np.concatenate(seen).reshape(12, -1)
    assert len({row.tobytes() for row in flat}) == 12  # every cube once, across both ranks


def test_published_arrays_load_directly(tmp_path, rng):
    cubes = rng.random((7, 64, 64, 32)).astype(np.float64)  # the published dtype
    save_published(cubes[:4], tmp_path / "bat_32_s_64x64x32_0.npy", dtype=np.float64)
    save_published(cubes[4:], tmp_path / "bat_32_s_64x64x32_1.npy", dtype=np.float64)
    ds = CubeStoreDataset(tmp_path)
    assert len(ds) == 7 and ds[6].dtype == np.float32
    np.testing.assert_array_equal(all_items(ds)[:, 0], cubes.astype(np.float32))
    single = CubeStoreDataset(tmp_path / "bat_32_s_64x64x32_1.npy")
    np.testing.assert_array_equal(single[0][0], cubes[4].astype(np.float32))


def test_volume_dataset_reproducible_and_picklable():
    ds = VolumeCubeDataset(SAMPLE, filter="foreground", per_volume=4, seed=3)
    assert len(ds) == 8
    first = all_items(ds)
    assert first.shape == (8, 1, 64, 64, 32) and first.dtype == np.float32
    again = VolumeCubeDataset(SAMPLE, filter="foreground", per_volume=4, seed=3)
    np.testing.assert_array_equal(all_items(again), first)
    k, origin = ds.position(5)
    assert k == 1 and Path(ds.sources[k].path).name == "pulmonary_ct.nii.gz"
    assert len(pickle.dumps(ds)) < 20_000  # volumes are not pickled
    ds.set_epoch(1)
    assert not np.array_equal(all_items(ds), first)
    # forked workers (the Linux default) see the same items
    ds.set_epoch(0)
    loaded = torch.cat(list(DataLoader(ds, batch_size=4, num_workers=2))).numpy()
    np.testing.assert_array_equal(loaded, first)


def test_volume_dataset_items_pass_the_filter():
    ds = VolumeCubeDataset(SAMPLE / "aorta_ct.nii.gz", filter=Foreground(min_fraction=0.9), per_volume=6)
    for i in range(len(ds)):
        k, (x, y, z) = ds.position(i)
        data = ds._prepared(k)[0]
        assert (data[x : x + 64, y : y + 64, z : z + 32] > -900).mean() >= 0.9


def test_volume_dataset_falls_back_with_a_warning():
    ds = VolumeCubeDataset(SAMPLE / "aorta_ct.nii.gz", filter="official-lung", per_volume=2, max_candidates=20)
    with pytest.warns(UserWarning, match="no candidate passed the official-lung filter"):
        item = ds[0]
    assert item.shape == (1, 64, 64, 32)


def test_volume_dataset_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        VolumeCubeDataset(tmp_path)


def test_volume_dataset_refuses_label_maps(tmp_path):
    """A mask among the inputs would give flat cubes of 0 and 1: refused by its folder or name at construction, and
    by its content (a few integer values) on first load, as `genesis-ext extract` skips it."""
    nib = pytest.importorskip("nibabel")
    with pytest.raises(ValueError, match="a label map \\(in a folder named 'masks'\\)"):
        VolumeCubeDataset(_mask_tree(tmp_path, nib))
    organs = np.zeros((70, 70, 40), dtype=np.uint8)
    organs[10:50, 10:50, 5:30] = 1
    organs[30:60, 20:40, 10:20] = 2
    nib.save(nib.Nifti1Image(organs, np.eye(4)), tmp_path / "abdomen.nii.gz")
    ds = VolumeCubeDataset(tmp_path / "abdomen.nii.gz", filter="none", per_volume=1)
    with pytest.raises(ValueError, match="abdomen.nii.gz: a label map \\(3 distinct integer values"):
        ds[0]


def _mask_tree(root: Path, nib) -> Path:
    """root/case/masks/liver.nii.gz: a binary mask where the dataset organises by folder."""
    (root / "case" / "masks").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.uint8), np.eye(4)), root / "case" / "masks" / "liver.nii.gz")
    return root / "case"
