"""Backbones (genesis_ext.models.backbones): every named network builds, takes and gives the shapes it should, is
checked before a run starts, and goes through pre-training, fine-tuning and predict on the sample CT; the nnU-Net
plans' network is the one nnU-Net itself builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from conftest import tiny_finetune_config, tiny_pretrain_config  # noqa: E402

from genesis_ext._cli_options import ARCH_NAMES  # noqa: E402
from genesis_ext.cli import main as cli_main  # noqa: E402
from genesis_ext.models.backbones import (  # noqa: E402
    BACKBONES,
    BackboneError,
    arch_from_plans,
    build_backbone,
    check_backbone,
    resolve_arch,
)
from genesis_ext.train import load_training_state, pretrain  # noqa: E402
from genesis_ext.train.finetuning import FinetuneError, finetune  # noqa: E402

SMALL = ("unet3d", "resenc-s", "plain-s", "segresnet")


def tiny_plans(path: Path, cls: str = "ResidualEncoderUNet", features=(8, 16, 32, 32)) -> Path:
    """An nnU-Net v2 plans file as nnUNetv2_plan_and_preprocess writes one, with two small 3-D configurations:
    3d_fullres (``cls``, 4 stages of ``features``) and 3d_plain (PlainConvUNet), and its dataset.json beside it."""

    def architecture(name: str, blocks: dict) -> dict:
        return {
            "network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": {
                "n_stages": 4,
                "features_per_stage": list(features),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * 4,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                **blocks,
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },  # fmt: skip
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }

    def configuration(arch: dict) -> dict:
        return {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": [32, 32, 32], "median_image_size_in_voxels": [64, 64, 64],
                "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "batch_dice": False, "architecture": arch}  # fmt: skip

    residual = {"n_blocks_per_stage": [1, 2, 2, 2], "n_conv_per_stage_decoder": [1, 1, 1]}
    plain = {"n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2]}
    plans = {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetTinyPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": configuration(architecture(cls, residual if cls == "ResidualEncoderUNet" else plain)),
            "3d_plain": configuration(architecture("PlainConvUNet", plain)),
            "3d_lowres": {"inherits_from": "3d_fullres", "batch_size": 4},
        },
        "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 3000.0, "mean": 0.0, "median": 0.0,
            "min": -1024.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "std": 500.0}},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plans, indent=2))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumour": 2},
               "numTraining": 2, "file_ending": ".nii.gz"}  # fmt: skip
    (path.parent / "dataset.json").write_text(json.dumps(dataset))
    return path


def test_the_cli_lists_every_backbone():
    assert ARCH_NAMES == tuple(BACKBONES)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dims", [3, 2])
def test_each_backbone_maps_its_input_channels_to_its_outputs_at_the_input_size(name, dims):
    torch.manual_seed(0)
    x = torch.rand(2, 2, *(32, 16, 24)[:dims])
    network = build_backbone(name, 2, 3, dims).eval()
    squashed = build_backbone(name, 2, 3, dims, sigmoid=True).eval()
    squashed.load_state_dict(network.state_dict())  # the sigmoid adds no weights
    with torch.no_grad():
        raw = network(x)
        assert raw.shape == (2, 3, *x.shape[2:])
        assert torch.allclose(squashed(x), torch.sigmoid(raw), atol=1e-6)
    check_backbone(name, 2, 3, dims, x.shape[2:])  # the meta-device check agrees


def test_resenc_l_is_nnssls_network():
    """102,348,965 parameters with one input and one output channel: nnssl's ResEnc-L (get_res_enc_l), built on the
    meta device."""
    with torch.device("meta"):
        network = build_backbone("resenc-l", 1, 1, 3)
    assert sum(p.numel() for p in network.parameters()) == 102_348_965
    check_backbone("resenc-l", 1, 1, 3, (64, 64, 32))  # the published cube: a 2x2x1 bottleneck
    with pytest.raises(BackboneError, match=r"multiples of 32x32x32 .* Z = 48 \(use 32 or 64\)"):
        check_backbone("resenc-l", 1, 1, 3, (64, 64, 48))


def test_unused_deep_supervision_heads_take_no_gradient():
    """Every parameter that asks for a gradient gets one from a backward pass, which DistributedDataParallel needs
    (dynamic-network-architectures U-Nets without deep supervision use only their last seg_layer)."""
    for name in ("resenc-s", "plain-s"):
        network = build_backbone(name, 1, 1, 3)
        network(torch.rand(2, 1, 16, 16, 16)).sum().backward()
        idle = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
        assert idle == [], name
        frozen = {n for n, p in network.named_parameters() if not p.requires_grad}
        assert frozen and all(".seg_layers." in n and ".seg_layers.2." not in n for n in frozen), frozen


def test_bad_architectures_are_refused_with_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="unknown architecture 'resnet'; known: unet3d, resenc-l.*module:factory"):
        resolve_arch("resnet")
    with pytest.raises(BackboneError, match="kwargs must be a dict of JSON values"):
        resolve_arch({"name": "resenc-s", "kwargs": {"norm": torch.nn.BatchNorm3d}})
    with pytest.raises(BackboneError, match="needs a plans file"):
        resolve_arch("nnunet")
    with pytest.raises(BackboneError, match="ResidualEncoderUNet refused its arguments.*unexpected keyword.*wings"):
        build_backbone({"name": "resenc-s", "kwargs": {"wings": 2}}, 1, 1, 3)
    with pytest.raises(BackboneError, match=r"multiples of 8x8x8.*Y = 20 \(use 16 or 24\)"):
        check_backbone("resenc-s", 1, 1, 3, (16, 20, 16))
    monkeypatch.setitem(__import__("sys").modules, "dynamic_network_architectures.architectures.unet", None)
    with pytest.raises(BackboneError, match=r"pip install 'genesis-ext\[nnunet\]'"):
        build_backbone("plain-s", 1, 1, 3)
    monkeypatch.setitem(__import__("sys").modules, "monai.networks.nets", None)
    with pytest.raises(BackboneError, match=r"needs the 'monai' package .* pip install 'genesis-ext\[monai\]'"):
        build_backbone("segresnet", 1, 1, 3)


FACTORIES = """
import torch

def two_channels(in_channels, out_channels, dims, **kwargs):
    return torch.nn.Conv3d(in_channels, 2, 1)  # ignores out_channels

def flat(in_channels, out_channels, dims, **kwargs):
    return torch.nn.Sequential(torch.nn.Conv3d(in_channels, out_channels, 1), torch.nn.Flatten(2))

def halving(in_channels, out_channels, dims, **kwargs):
    return torch.nn.Conv3d(in_channels, out_channels, 2, stride=2)

def good(in_channels, out_channels, dims, width=4):
    return torch.nn.Sequential(torch.nn.Conv3d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(width, out_channels, 1))
good.genesis_head = ("2.",)
"""


def test_a_factory_is_checked_against_the_input_and_outputs(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackboneError, match=r"returned \[2, 2, 16, 16, 8\] .* expected \[2, 3, 16, 16, 8\]"):
        check_backbone("my_nets:two_channels", 1, 3, 3, (16, 16, 8))
    with pytest.raises(BackboneError, match=r"returned \[2, 3, 2048\]"):
        check_backbone("my_nets:flat", 1, 3, 3, (16, 16, 8))
    with pytest.raises(BackboneError, match=r"returned \[2, 3, 8, 8, 4\]"):
        check_backbone("my_nets:halving", 1, 3, 3, (16, 16, 8))
    with pytest.raises(BackboneError, match="cannot import the factory"):
        check_backbone("my_nets:missing", 1, 3, 3, (16, 16, 8))
    check_backbone({"name": "my_nets:good", "kwargs": {"width": 2}}, 1, 3, 3, (16, 16, 8))


def test_the_plans_network_is_the_one_nnunet_builds(tmp_path):
    """Our network of a plans configuration has nnU-Net's own (nnUNetTrainer.build_network_architecture) keys and
    shapes, and inherits_from is resolved as nnU-Net's PlansManager resolves it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = tiny_plans(tmp_path / "plans.json")
    manager = PlansManager(str(plans))
    for configuration in ("3d_fullres", "3d_plain", "3d_lowres"):
        theirs = nnUNetTrainer.build_network_architecture(
            manager, manager.get_configuration(configuration), 1, 3, False
        ).state_dict()
        ours = build_backbone(arch_from_plans(plans, configuration), 1, 3, 3).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, configuration
    with pytest.raises(BackboneError, match="has no configuration '2d' .*3d_fullres, 3d_plain, 3d_lowres"):
        arch_from_plans(plans, "2d")
    bad = json.loads(plans.read_text())
    bad["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    with pytest.raises(BackboneError, match="'os.system' is not a class under 'dynamic_network_architectures.'"):
        build_backbone(arch_from_plans(bad, "3d_fullres"), 1, 1, 3)
    with pytest.raises(BackboneError, match="not a 2-D convolution"):
        build_backbone(arch_from_plans(plans), 1, 1, 2)


def test_pretrain_finetune_and_predict_a_residual_encoder_unet(cubes, seg_data, tmp_path, capsys):
    """resenc-s through the workflow: the pre-training checkpoint records it, fine-tuning takes it from the weights
    (all but the restoration head), the record rebuilds it for predict; another --arch is refused."""
    pretrain(tiny_pretrain_config(cubes, tmp_path / "pre", arch="resenc-s", threads=1))
    state = load_training_state(tmp_path / "pre" / "checkpoints" / "last.pt")
    assert state["arch"] == {"name": "resenc-s", "kwargs": {}} and state["dims"] == 3
    weights = tmp_path / "pre" / "checkpoints" / "last.pt"
    cfg = tiny_finetune_config(seg_data, tmp_path / "seg", weights=str(weights), loss="dice_ce")  # 2 outputs
    summary = finetune(cfg, log=print)
    log = capsys.readouterr().out
    assert "except its output layer" in log and "decoder.seg_layers freshly initialised" in log
    record = load_training_state(tmp_path / "seg" / "last.pt")["model_record"]
    assert record["arch"] == {"name": "resenc-s", "kwargs": {}}
    tuned = load_training_state(tmp_path / "seg" / "last.pt")["state_dict"]
    pre = state["state_dict"]
    assert summary["epochs"] == 1 and set(tuned) == set(pre)
    image = sorted((seg_data / "images").glob("*.nii.gz"))[0]
    assert cli_main(["predict", "--weights", str(tmp_path / "seg" / "last.pt"), str(image), "--out",
                     str(tmp_path / "pred"), "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "pred" / image.name).exists()
    with pytest.raises(FinetuneError, match="--arch plain-s .* is not the network of --weights .*resenc-s"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "seg2", weights=str(weights), arch="plain-s"))
    with pytest.raises(FinetuneError, match="classification fine-tunes the published U-Net's encoder"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "cls", task="classification", weights=str(weights)))


def test_resume_refuses_another_architecture(cubes, tmp_path):
    pretrain(tiny_pretrain_config(cubes, tmp_path / "run", arch="plain-s", threads=1))
    with pytest.raises(ValueError, match="arch.name: 'plain-s' recorded vs 'resenc-s' now"):
        pretrain(tiny_pretrain_config(cubes, tmp_path / "run", arch="resenc-s", threads=1, resume=True, epochs=2))


def test_width_is_the_unet3ds_only(cubes, tmp_path, capsys):
    with pytest.raises(ValueError, match="width scales the unet3d's channels only"):
        pretrain(tiny_pretrain_config(cubes, tmp_path / "run", arch="segresnet", width=0.5))
    assert cli_main(["pretrain", "--data", str(cubes), "--out", str(tmp_path / "r"), "--arch-kwargs", "{}"]) == 2
    assert "--arch-kwargs goes with --arch" in capsys.readouterr().err
    assert cli_main(["pretrain", "--data", str(cubes), "--out", str(tmp_path / "r"), "--arch", "plain-s",
                     "--arch-kwargs", "[1]"]) == 2  # fmt: skip
    assert "--arch-kwargs must be a JSON object" in capsys.readouterr().err
    assert cli_main(["pretrain", "--data", str(cubes), "--out", str(tmp_path / "r"), "--configuration", "2d"]) == 2
    assert "pass --plans too" in capsys.readouterr().err
    assert not np.any([p.exists() for p in (tmp_path / "r").glob("*")])
