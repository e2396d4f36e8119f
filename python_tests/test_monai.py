"""genesis_ext.monai in a real MONAI pipeline on the real CT of ../shared/data: LoadImaged -> EnsureChannelFirstd ->
ScaleIntensityRanged -> RandSpatialCropSamplesd -> GenesisPaird -> monai.data.DataLoader (0 and 2 workers); and the
transforms' refusals of what would silently go wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.data.utils import worker_init_fn
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
)

import genesis_ext
from genesis_ext import DeformConfig
from genesis_ext.monai import GenesisPairBatchd, GenesisPaird

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
CTS = sorted(SHARED.glob("*/ct_cropped.nii.gz"))
CONFIG = DeformConfig(gaussian_noise_rate=0.3)


def pipeline(state: int) -> Compose:
    return Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
            RandSpatialCropSamplesd(keys="image", roi_size=(32, 32, 16), num_samples=3, random_size=False),
            GenesisPaird(keys="image", config=CONFIG, seed=42),
        ]
    ).set_random_state(state)


def epochs(generator_seed: int, workers: int, state: int = 7, n_epochs: int = 2) -> list[list[dict]]:
    """Every batch of n_epochs epochs of the pipeline (set_random_state(state)) in a MONAI DataLoader whose
    generator is seeded with generator_seed."""
    loader = DataLoader(
        Dataset([{"image": str(p)} for p in CTS] * 2, transform=pipeline(state)),
        batch_size=3,
        num_workers=workers,
        generator=torch.Generator().manual_seed(generator_seed),
    )
    return [[dict(batch) for batch in loader] for _ in range(n_epochs)]


@pytest.fixture(scope="module")
def runs():
    """Per number of workers: two runs from one loader generator seed (with different set_random_state values, which
    the loader overrides) and one from another generator seed."""
    if len(CTS) < 2:
        pytest.skip(f"the two real CT crops are not in {SHARED}")
    return {workers: (epochs(7, workers), epochs(7, workers, state=99), epochs(8, workers)) for workers in (0, 2)}


def _indices(run):
    return [int(i) for epoch in run for batch in epoch for i in batch["image"].meta["genesis_ext"]["index"]]


def test_pairs_are_models_genesis_pairs_of_the_crops(runs):
    batch = runs[2][0][0][0]
    image, target = batch["image"], batch["image_target"]
    assert isinstance(image, MetaTensor) and image.shape == target.shape and image.shape[1:] == (1, 32, 32, 16)
    assert "filename_or_obj" in image.meta and image.meta["genesis_ext"]["seed"][0] == 42  # metadata kept
    for n in range(image.shape[0]):  # each sample: exactly genesis_pair of its flipped crop at its recorded index
        index = int(image.meta["genesis_ext"]["index"][n])
        xd, tg = genesis_ext.genesis_pair(
            target[n : n + 1].as_tensor(), seed=42, offset=index, config=CONFIG.replace(flip_rate=0.0)
        )
        # the flips are the same with or without flip_rate: every other draw has its own stream
        assert torch.equal(tg[0], target[n].as_tensor()) and torch.equal(xd[0], image[n].as_tensor())
    assert 0.0 <= float(target.min()) <= float(target.max()) <= 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loaders_generator_reproduces_the_pipeline_and_workers_and_epochs_differ(runs, workers):
    """MONAI's DataLoader re-seeds every Randomizable of the dataset from its generator (set_random_state before it
    has no effect): one generator seed gives the same pairs bit for bit, another seed other deformations."""
    a, b, c = runs[workers]
    for epoch_a, epoch_b in zip(a, b):
        for x, y in zip(epoch_a, epoch_b):
            assert torch.equal(x["image"].as_tensor(), y["image"].as_tensor())
            assert torch.equal(x["image_target"].as_tensor(), y["image_target"].as_tensor())
    indices = _indices(a)
    assert len(indices) == 2 * 4 * 3 and len(set(indices)) == len(indices)  # no two samples share a deformation
    assert set(_indices(c)).isdisjoint(indices)


def test_set_random_state_reproduces_a_pipeline_applied_directly():
    """Without MONAI's DataLoader nothing re-seeds the pipeline: its set_random_state fixes crops and deformations."""
    volume = {"image": np.random.default_rng(0).random((1, 48, 40, 24), dtype=np.float32)}

    def run(state):
        crop = RandSpatialCropd(keys="image", roi_size=(32, 32, 16), random_size=False)
        pairs = Compose([crop, GenesisPaird(keys="image", config=CONFIG, seed=5)]).set_random_state(state)
        return [pairs(volume) for _ in range(3)]

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        assert torch.equal(x["image"].as_tensor(), y["image"].as_tensor())
        assert torch.equal(x["image_target"].as_tensor(), y["image_target"].as_tensor())
    index = [[int(x["image"].meta["genesis_ext"]["index"]) for x in run] for run in (a, c)]
    assert len(set(index[0])) == 3 and set(index[0]).isdisjoint(index[1])


def test_batch_variant_on_collated_batches_resumes():
    x = MetaTensor(torch.rand(4, 1, 32, 32, 16), meta={"filename_or_obj": "batch"})
    t = GenesisPairBatchd(keys="image", config=CONFIG, seed=3)
    first = t({"image": x})
    assert torch.equal(first["image"].as_tensor(), genesis_ext.genesis_pair(x.as_tensor(), seed=3, config=CONFIG)[0])
    state = t.state_dict()
    again = GenesisPairBatchd(keys="image", config=CONFIG, seed=0)
    again.load_state_dict(state)
    assert torch.equal(t({"image": x})["image"].as_tensor(), again({"image": x})["image"].as_tensor())
    assert first["image"].meta["filename_or_obj"] == "batch" and first["image"].meta["genesis_ext"]["first_index"] == 0


def _worker_indices(**loader_args) -> list[int]:
    samples = [{"image": MetaTensor(torch.rand(1, 16, 16, 16))} for _ in range(4)]
    dataset = Dataset(samples, transform=GenesisPaird(keys="image", seed=1).set_random_state(7))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=list_data_collate, **loader_args
    )
    return [int(i) for batch in loader for i in batch["image"].meta["genesis_ext"]["index"]]


def test_a_plain_torch_loader_with_workers_must_seed_them():
    """torch's DataLoader copies the transform's state into every worker: they would all draw the same indices (the
    two workers' batches were identical). Refused, with the fix; with MONAI's worker_init_fn the indices differ."""
    with pytest.raises(RuntimeError, match="every worker would draw the same deformations: use monai.data.DataLoader"):
        _worker_indices()
    indices = _worker_indices(worker_init_fn=worker_init_fn)
    assert len(set(indices)) == 4


def test_every_key_of_a_sample_gets_one_deformation():
    """Co-registered keys (an image and its channels) move together, as GenesisPaird promises: two keys holding the
    same data come out identical, sample after sample (a deformation drawn per key would tell them apart)."""
    x = np.random.default_rng(1).random((1, 32, 32, 16), dtype=np.float32)
    transform = GenesisPaird(keys=("image", "twin"), config=CONFIG, seed=4).set_random_state(3)
    for _ in range(4):
        out = transform({"image": x, "twin": x.copy()})
        assert not np.array_equal(out["image"].numpy(), x)
        assert torch.equal(out["image"], out["twin"]) and torch.equal(out["image_target"], out["twin_target"])


def test_batch_variant_gives_every_key_the_batchs_deformations():
    """GenesisPairBatchd as GenesisPaird: all keys of a batch get samples start .. start + N - 1, and the stream
    advances by N per call, not per key."""
    x = torch.rand(4, 1, 32, 32, 16, generator=torch.Generator().manual_seed(2))
    transform = GenesisPairBatchd(keys=("image", "twin"), config=CONFIG, seed=3)
    for start in (0, 4):
        out = transform({"image": x, "twin": x.clone()})
        want = genesis_ext.genesis_pair(x, seed=3, offset=start, config=CONFIG)
        for key in ("image", "twin"):
            assert torch.equal(out[key], want[0]) and torch.equal(out[key + "_target"], want[1])
    assert int(transform.pair.next_index) == 8


@pytest.mark.parametrize("transform", [GenesisPaird, GenesisPairBatchd])
def test_refuses_keys_and_suffixes_that_would_overwrite_or_deform_twice(transform):
    with pytest.raises(ValueError, match="target_suffix must be a non-empty str, got '': .*overwrite the deformed"):
        transform(keys="image", target_suffix="")
    with pytest.raises(ValueError, match=r"keys \('image', 'label', 'image'\) list a key more than once"):
        transform(keys=("image", "label", "image"))
    with pytest.raises(ValueError, match="the target of 'image' would overwrite the input 'image_target'"):
        transform(keys=("image", "image_target"))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        transform(keys="image", spatial_dims=4)


def test_refuses_volumes_without_a_channel_axis_and_batches_in_the_per_sample_transform():
    volume = torch.rand(32, 32, 16)  # (X, Y, Z): once taken for a 2-D image with 32 channels
    with pytest.raises(
        ValueError,
        match=r"'image' has shape \(32, 32, 16\), with no channel axis: expected \(C, X, Y, Z\) \(spatial_dims=3; "
        r"MONAI is channel-first\)\. Add the channel axis \(x\[None\], or EnsureChannelFirstd",
    ):
        GenesisPaird(keys="image")({"image": volume})
    out = GenesisPaird(keys="image", spatial_dims=2)({"image": volume})  # said so: 32 channels of (32, 16) images
    assert out["image"].shape == volume.shape
    with pytest.raises(ValueError, match=r"'image' has shape \(2, 32, 32, 16\), with no channel axis: expected "):
        GenesisPairBatchd(keys="image")({"image": volume[None].expand(2, -1, -1, -1)})
    with pytest.raises(ValueError, match=r"'image' must be \(C, X, Y, Z\) \(spatial_dims=3\), got shape \(2, 1, "):
        GenesisPaird(keys="image")({"image": torch.rand(2, 1, 16, 16, 16)})
    with pytest.raises(ValueError, match="share one deformation, so they need the same shape"):
        GenesisPaird(keys=("image", "label"))({"image": torch.rand(1, 16, 16, 16), "label": torch.rand(1, 16, 16, 20)})


def test_plain_torch_dataloader_recipe():
    """The same transform without MONAI's loader: a torch DataLoader over dicts of numpy samples."""
    samples = [{"image": np.random.default_rng(k).random((1, 32, 32, 16), dtype=np.float32)} for k in range(6)]
    transform = GenesisPaird(keys="image", seed=5)
    transform.set_random_state(11)
    loader = torch.utils.data.DataLoader([transform(s) for s in samples], batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["image_target"].shape == (3, 1, 32, 32, 16)


def test_genesis_ext_itself_does_not_import_monai():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, genesis_ext\n"
        "genesis_ext.genesis_pair(np.zeros((1, 1, 32, 32, 16), np.float32), seed=0)\n"
        "print('monai' in sys.modules)\n"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


ABDOMEN = SHARED.parent / "abdomen-ct"


@pytest.mark.parametrize("transform", [GenesisPaird, GenesisPairBatchd])
def test_refuses_unwindowed_ct_and_label_maps_on_the_host(transform):
    """The real abdominal CT in HU (no ScaleIntensityRanged) and its liver mask listed as an image key: useless pairs
    before (the deformed input clamped to [0, 1], flat mask cubes); now errors naming the key and the fix."""
    if not (ABDOMEN / "ct.nii.gz").exists():
        pytest.skip(f"{ABDOMEN} not present")
    load = Compose([LoadImaged(keys=["image", "liver"]), EnsureChannelFirstd(keys=["image", "liver"])])
    case = load({"image": str(ABDOMEN / "ct.nii.gz"), "liver": str(ABDOMEN / "masks" / "liver.nii.gz")})
    crop = (slice(None), slice(50, 82), slice(40, 72), slice(80, 96))  # through the liver
    hu, liver = case["image"][crop], case["liver"][crop]
    batched = transform is GenesisPairBatchd
    if batched:
        hu, liver = hu[None], liver[None]
    with pytest.raises(ValueError, match="'image'.*far outside \\[0, 1\\].*ScaleIntensityRanged"):
        transform(keys="image", config=CONFIG)({"image": hu})
    with pytest.raises(ValueError, match="'liver' is a label map .*list only image keys"):
        transform(keys="liver", config=CONFIG)({"liver": liver})
    windowed = ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True)
    transform(keys="image", config=CONFIG)(windowed({"image": hu}))  # the same crop, windowed, passes
