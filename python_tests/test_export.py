"""Exports (genesis_ext.export): pre-trained weights handed to nnU-Net v2, loaded by nnU-Net's own
``load_pretrained_weights`` into the network nnU-Net's own trainer builds from the plans; MONAI bundles loaded and run
by ``monai.bundle``, whose label maps equal ``genesis-ext predict``'s on the same sample CT."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")
pytest.importorskip("nnunetv2")
pytest.importorskip("ignite")
monai_bundle = pytest.importorskip("monai.bundle")

from conftest import tiny_finetune_config, tiny_pretrain_config  # noqa: E402
from test_backbones import tiny_plans  # noqa: E402

from genesis_ext.cli import main as cli_main  # noqa: E402
from genesis_ext.data.io import load_volume  # noqa: E402
from genesis_ext.export.monai_bundle import GAUSSIAN  # noqa: E402
from genesis_ext.inference.sliding_window import gaussian_importance  # noqa: E402
from genesis_ext.models.backbones import arch_from_plans  # noqa: E402
from genesis_ext.train import load_training_state, pretrain  # noqa: E402
from genesis_ext.train.finetuning import finetune  # noqa: E402


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    return tiny_plans(tmp_path_factory.mktemp("nnUNet_preprocessed") / "nnUNetTinyPlans.json")


@pytest.fixture(scope="module")
def pretrained(cubes, plans, tmp_path_factory) -> Path:
    """One pre-training step of the plans' 3d_fullres network (a ResidualEncoderUNet) on the sample CT's cubes."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(tiny_pretrain_config(cubes, out, arch=arch_from_plans(plans), threads=1))
    return out / "checkpoints" / "last.pt"


def _nnunet_network(plans: Path, configuration: str = "3d_fullres"):
    """The network nnU-Net's trainer builds for the plans: 1 input channel, the dataset's 3 heads, deep
    supervision on (as nnU-Net trains)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(plans))
    return nnUNetTrainer.build_network_architecture(manager, manager.get_configuration(configuration), 1, 3, True)


def test_nnunet_loads_the_export_into_its_own_network(pretrained, plans, tmp_path, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    out = tmp_path / "genesis_pretrained.pth"
    assert cli_main(["export", "--weights", str(pretrained), "--nnunet", str(plans), "--out", str(out)]) == 0
    assert "nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -pretrained_weights" in capsys.readouterr().out
    network = _nnunet_network(plans)
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    load_pretrained_weights(network, str(out))
    ours = load_training_state(pretrained)["state_dict"]
    loaded = {k: v for k, v in network.state_dict().items()}
    heads = [k for k in loaded if ".seg_layers." in k]
    assert len(heads) == 6 and all(torch.equal(loaded[k], fresh[k]) for k in heads)  # nnU-Net's own heads
    body = [k for k in loaded if k not in heads]
    assert len(body) == 294 and all(torch.equal(loaded[k], ours[k]) for k in body)  # encoder and decoder
    assert any(not torch.equal(loaded[k], fresh[k]) for k in body)


def test_nnunet_export_refuses_plans_of_another_network(pretrained, plans, tmp_path, capsys):
    """The export names the first key nnU-Net would refuse, with both shapes, and writes nothing; nnU-Net's own
    loader refuses the same weights."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    out = tmp_path / "plain.pth"
    args = ["export", "--weights", str(pretrained), "--nnunet", str(plans), "--configuration", "3d_plain"]
    assert cli_main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "key 'encoder.stages.0.0.convs.0.conv.weight' is missing from the weights" in err
    assert "n_conv_per_stage_decoder: [1, 1, 1] (weights) vs [2, 2, 2] (plans)" in err and not out.exists()
    wider = tiny_plans(tmp_path / "wider" / "plans.json", features=(8, 16, 32, 64))
    assert cli_main(["export", "--weights", str(pretrained), "--nnunet", str(wider), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has shape (32, 32, 3, 3, 3) in the weights, (64, 32, 3, 3, 3) in the plans'" in err
    forced = tmp_path / "forced.pth"
    torch.save({"network_weights": load_training_state(pretrained)["state_dict"]}, forced)
    with pytest.raises(AssertionError):
        load_pretrained_weights(_nnunet_network(wider), str(forced))


def test_nnunet_export_refuses_what_it_cannot_hand_over(pretrained, plans, cubes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "w.pth"
    out.write_bytes(b"keep")
    args = ["export", "--weights", str(pretrained), "--nnunet", str(plans), "--out", str(out)]
    assert cli_main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep"
    assert cli_main([*args, "--overwrite"]) == 0 and out.stat().st_size > 1000
    pretrain(tiny_pretrain_config(cubes, tmp_path / "unet", width=0.25, threads=1))
    unet = tmp_path / "unet" / "checkpoints" / "last.pt"
    assert cli_main(["export", "--weights", str(unet), "--nnunet", str(plans), "--out", str(tmp_path / "u.pth")]) == 2
    assert "published Models Genesis U-Net (unet3d), which no nnU-Net network matches" in capsys.readouterr().err
    assert cli_main(["export", "--weights", str(pretrained), "--nnunet", str(plans)]) == 2
    assert "--nnunet needs --out FILE" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "dynamic_network_architectures", None)
    assert cli_main([*args, "--overwrite"]) == 2
    assert "pip install 'genesis-ext[nnunet]'" in capsys.readouterr().err


@pytest.mark.parametrize("patch", [(32, 32, 16), (20, 33, 8), (64, 64)])
def test_the_bundles_window_weights_are_predicts(patch):
    parser = monai_bundle.ConfigParser({"imports": ["$import torch"], "patch": list(patch), "gaussian": GAUSSIAN})
    assert torch.equal(parser.get_parsed_content("gaussian"), gaussian_importance(patch))


def _segmentation_run(seg_data, out: Path, **changes) -> tuple[Path, Path]:
    """A fine-tuning run at the first sample image's own spacing (so predict does not resample it), and that image."""
    image = sorted((seg_data / "images").glob("*.nii.gz"))[0]
    spacing = tuple(load_volume(image).spacing)
    finetune(tiny_finetune_config(seg_data, out, spacing=spacing, **changes))
    return out / "last.pt", image


@pytest.mark.parametrize(
    "arch, loss", [("segresnet", "dice_ce"), ({"name": "unet3d", "kwargs": {}}, "dice")], ids=["segresnet", "unet3d"]
)
def test_a_segmentation_bundle_runs_in_monai_and_equals_predict(seg_data, tmp_path, arch, loss):
    """The bundle, run by monai.bundle (SupervisedEvaluator, SlidingWindowInferer), writes predict's label map
    (a 48x48x32 image, 16^3 windows at overlap 0.5: MONAI places them as predict does); monai.bundle.load rebuilds
    the network with the checkpoint's weights; the config has every property MONAI requires."""
    # the published BatchNorm (batch statistics, so the same windows must share a batch) learns a map of both values
    more = {"width": 0.25, "batchnorm": "batch_stats"} if arch != "segresnet" else {}
    ckpt, image = _segmentation_run(seg_data, tmp_path / "seg", arch=arch, loss=loss, **more)
    bundle = tmp_path / "bundles" / "lung"
    assert cli_main(["export", "--weights", str(ckpt), "--monai-bundle", str(bundle)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    (images / image.name).symlink_to(image)
    monai_bundle.run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(images),
        output_dir=str(tmp_path / "monai"),
        logging_file=False,
    )
    assert cli_main(["predict", "--weights", str(ckpt), str(image), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    case = image.name.removesuffix(".nii.gz")
    theirs = np.asarray(nib.load(str(tmp_path / "monai" / f"{case}_seg.nii.gz")).dataobj)
    ours = np.asarray(nib.load(str(tmp_path / "pred" / image.name)).dataobj)
    assert theirs.dtype == ours.dtype == np.uint8 and theirs.shape == ours.shape
    assert 0.05 < (ours == 1).mean() < 0.95  # a real segmentation, not all one value
    np.testing.assert_array_equal(theirs, ours)
    network = monai_bundle.load(name="lung", bundle_dir=str(bundle.parent), workflow_type="inference")
    state = load_training_state(ckpt)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())
    workflow = monai_bundle.create_workflow(
        config_file=str(bundle / "configs" / "inference.json"), workflow_type="inference", bundle_root=str(bundle)
    )
    assert workflow.check_properties() == []


def test_a_pretrained_bundle_takes_a_new_head_the_monai_way(cubes, tmp_path, capsys):
    """net_override={"out_channels": 3} keeps every pre-trained weight but the output layer's."""
    pretrain(tiny_pretrain_config(cubes, tmp_path / "pre", arch="segresnet", threads=1))
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    bundle = tmp_path / "bundles" / "genesis"
    assert cli_main(["export", "--weights", str(ckpt), "--monai-bundle", str(bundle)]) == 0
    network = monai_bundle.load(
        name="genesis", bundle_dir=str(bundle.parent), workflow_type="inference", net_override={"out_channels": 3}
    )
    state = load_training_state(ckpt)["state_dict"]
    kept = [k for k, v in network.state_dict().items() if v.shape == state[k].shape and torch.equal(v, state[k])]
    assert sorted(set(network.state_dict()) - set(kept)) == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]
    assert cli_main(["export", "--weights", str(ckpt), "--monai-bundle", str(bundle)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--weights", str(ckpt), "--monai-bundle", str(bundle), "--overwrite"]) == 0
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["genesis"]  # no staging folder left


def test_a_pretrained_unet_bundle_holds_the_checkpoints_width(cubes, tmp_path):
    """A width-0.25 U-Net's restoration bundle: monai.bundle.load builds that width and takes every weight."""
    pretrain(tiny_pretrain_config(cubes, tmp_path / "pre", width=0.25, threads=1))
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    assert cli_main(["export", "--weights", str(ckpt), "--monai-bundle", str(tmp_path / "bundles" / "unet")]) == 0
    network = monai_bundle.load(name="unet", bundle_dir=str(tmp_path / "bundles"), workflow_type="inference")
    state = load_training_state(ckpt)["state_dict"]
    assert network.width == 0.25 and all(torch.equal(v, state[k]) for k, v in network.state_dict().items())
