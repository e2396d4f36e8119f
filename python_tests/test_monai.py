"""genesis_ext.monai in a real MONAI pipeline on the real CT of ../shared/data: LoadImaged -> EnsureChannelFirstd ->
ScaleIntensityRanged -> RandSpatialCropSamplesd -> GenesisPaird -> monai.data.DataLoader(num_workers=2)."""

from __future__ import annotations

from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropSamplesd, ScaleIntensityRanged

import genesis_ext
from genesis_ext import DeformConfig
from genesis_ext.monai import GenesisPairBatchd, GenesisPaird

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
CTS = sorted(SHARED.glob("*/ct_cropped.nii.gz"))
CONFIG = DeformConfig(gaussian_noise_rate=0.3)


def pipeline(seed: int) -> Compose:
    return Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
            RandSpatialCropSamplesd(keys="image", roi_size=(32, 32, 16), num_samples=3, random_size=False),
            GenesisPaird(keys="image", config=CONFIG, seed=42),
        ]
    ).set_random_state(seed)


def epochs(seed: int, n_epochs: int = 2) -> list[list[dict]]:
    """Every batch of n_epochs epochs of the pipeline in a 2-worker MONAI DataLoader, its global seed set."""
    monai.utils.set_determinism(seed=seed)
    loader = DataLoader(
        Dataset([{"image": str(p)} for p in CTS] * 2, transform=pipeline(seed)), batch_size=3, num_workers=2
    )
    return [[{k: v for k, v in batch.items()} for batch in loader] for _ in range(n_epochs)]


@pytest.fixture(scope="module")
def runs():
    if len(CTS) < 2:
        pytest.skip(f"the two real CT crops are not in {SHARED}")
    return epochs(7), epochs(7), epochs(8)


def _indices(run):
    return [int(i) for epoch in run for batch in epoch for i in batch["image"].meta["genesis_ext"]["index"]]


def test_pairs_are_models_genesis_pairs_of_the_crops(runs):
    batch = runs[0][0][0]
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


def test_reproducible_from_one_seed_and_distinct_across_workers_and_epochs(runs):
    a, b, c = runs
    for epoch_a, epoch_b in zip(a, b):  # same seed: the same pairs, bit for bit
        for x, y in zip(epoch_a, epoch_b):
            assert torch.equal(x["image"].as_tensor(), y["image"].as_tensor())
            assert torch.equal(x["image_target"].as_tensor(), y["image_target"].as_tensor())
    indices = _indices(a)
    assert len(indices) == 2 * 4 * 3 and len(set(indices)) == len(indices)  # no two samples share a deformation
    assert set(_indices(c)).isdisjoint(indices)  # another seed: other deformations


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


def test_refuses_batched_or_flat_inputs():
    with pytest.raises(ValueError, match=r"must be a channel-first sample \(C, X, Y, Z\) or \(C, H, W\), got shape"):
        GenesisPaird(keys="image")({"image": torch.rand(2, 1, 16, 16, 16)})


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
