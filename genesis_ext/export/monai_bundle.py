"""Writing a genesis-ext network as a MONAI bundle: ``export_bundle`` (``genesis-ext export --monai-bundle DIR``).

The bundle (MONAI's layout, loaded and run by ``monai.bundle``):

- ``models/model.pt``: the bare network's state dict (CPU tensors; ``monai.bundle.load`` reads it with
  ``weights_only=True``);
- ``configs/inference.json``: ``network_def`` (MONAI's ``SegResNet`` for that architecture, else
  ``genesis_ext.models.backbones.build_backbone``, so those bundles need genesis-ext where they run), the
  preprocessing, ``SlidingWindowInferer`` and an evaluator that writes one file per image of ``dataset_dir`` to
  ``output_dir``;
- ``configs/metadata.json``, ``docs/README.md``.

A fine-tuned segmentation checkpoint gives a segmentation bundle that does what ``genesis-ext predict`` does: the
image in LPS orientation, at the record's spacing, windowed as the record says; the windows of the record's patch
blended with nnU-Net's Gaussian weights (``genesis_ext.inference.sliding_window.gaussian_importance``, written into
the config as an expression) after the softmax or sigmoid; the probabilities brought back to the image's grid; the
label map (uint8, the record's label values) written on it. Its label maps equal ``predict``'s where MONAI places the
windows as predict does: along each axis the image is no longer than the patch, or its excess over the patch is a
multiple of MONAI's step (``int(patch * (1 - overlap))``); elsewhere MONAI steps from the start and shifts the last
window back, predict spreads them evenly, and the blends differ slightly.

A pre-training checkpoint gives a restoration bundle (``out_channels`` = input channels, writing the restored image):
for a new task, load its network with another head, the MONAI way::

    monai.bundle.load(name, bundle_dir=..., workflow_type="inference", net_override={"out_channels": 3})

which keeps every weight but the output layer's (whose shape changed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.cubes import PUBLISHED_CUBE
from ..data.intensity import CT_WINDOW
from ..inference.sliding_window import SIGMA_SCALE
from ..models.backbones import as_built, backbone
from ..models.record import ModelRecord
from ..models.weights import read_weights
from .common import ExportError, check_out, checkpoint_arch, source_of

# nnU-Net's Gaussian window weights as genesis-ext predict computes them (gaussian_importance), as a config
# expression of the patch: test_export checks that the two agree bit for bit.
GAUSSIAN = (
    "$(lambda w: w.clamp_min(float(w[w > 0].min())))((lambda p: (p / p.max()).float())(torch.exp(-0.5 * sum("
    "((torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / (n * " + repr(SIGMA_SCALE) + ")).reshape("
    "[-1 if i == j else 1 for j in range(len(@patch))]) ** 2 for i, n in enumerate(@patch)))))"
)


@dataclass(frozen=True)
class _Network:
    """What a bundle needs of a checkpoint: the network, and the input it was trained on."""

    arch: dict
    record: ModelRecord | None  # a fine-tuned segmentation's; None for a pre-training checkpoint
    in_channels: int
    dims: int
    patch: list  # spanned axes only
    intensity: dict  # the intensity policy's description (genesis_ext.data.intensity)
    modality: str
    spacing: list | None


def _network_of(checkpoint, path) -> _Network:
    arch = checkpoint_arch(checkpoint, path)
    if "model_record" in checkpoint:
        r = ModelRecord.from_dict(checkpoint["model_record"], source=path)
        if r.task != "segmentation":
            raise ExportError(f"genesis_ext: {path} is a {r.task} checkpoint; bundles are written for segmentation")
        spacing = None if r.spacing is None else list(r.spacing)
        return _Network(r.network_arch, r, r.in_channels, r.dims, list(r.patch[: r.dims]), r.intensity, r.modality,
                        spacing)  # fmt: skip
    dims, config = int(checkpoint.get("dims", 3)), checkpoint.get("config", {})
    cube = config.get("cube") or PUBLISHED_CUBE
    arch = as_built(arch, width=float(config.get("width", 1.0)))  # pre-training's U-Net: its width, default BatchNorm
    intensity = checkpoint.get("intensity") or CT_WINDOW.describe()  # recorded since modalities; before: CT
    return _Network(arch, None, int(checkpoint.get("in_channels", 1)), dims, [int(c) for c in cube[:dims]], intensity,
                    checkpoint.get("modality", "ct"), None)  # fmt: skip


def network_def(arch: dict, in_channels: int, out_channels: int, dims: int) -> dict:
    """The bundle's ``network_def``: the network with raw outputs (the activation is the ``network``'s)."""
    if arch["name"] == "segresnet":
        return {
            "_target_": "SegResNet",
            "spatial_dims": dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            **arch["kwargs"],
        }
    return {
        "_target_": "genesis_ext.models.backbones.build_backbone",
        "arch": arch,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "dims": dims,
    }


def _preprocessing(net: _Network) -> list:
    """Load, channel first, LPS, the record's spacing and the intensity policy the network was trained with."""
    steps = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"},
    ]
    if net.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": net.spacing, "mode": "bilinear"})
    if net.intensity.get("kind") == "fixed":
        lo, hi = float(net.intensity["lo"]), float(net.intensity["hi"])
        steps.append(
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": lo,
                "a_max": hi,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        )
    else:  # per-volume percentiles of the body: genesis-ext's own rule
        steps.append({"_target_": "genesis_ext.monai.Intensityd", "keys": "image", "intensity": net.intensity})
    steps.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return steps


def _label_map(record: ModelRecord) -> list:
    """Probabilities -> the record's label values, as ``ModelRecord.label_map``: softmax the most probable channel,
    sigmoid the most probable class where its probability is at least 0.5."""
    if record.activation == "softmax":
        index = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    else:
        index = {
            "_target_": "Lambdad",
            "keys": "pred",
            "func": "$lambda p: torch.where(p.max(0, keepdim=True).values >= 0.5, p.argmax(0, keepdim=True) + 1, 0)",
        }
    values = [0, *record.labels.values()]
    return [
        index,
        {
            "_target_": "MapLabelValued",
            "keys": "pred",
            "orig_labels": list(range(len(values))),
            "target_labels": values,
            "dtype": "$numpy.uint8",
        },
    ]


def inference_config(net: _Network) -> dict:
    """configs/inference.json."""
    record = net.record
    out_channels = record.n_outputs if record is not None else net.in_channels
    if record is None:  # restoration: as pre-trained (the published U-Net with its sigmoid, others raw)
        activation = "torch.nn.Sigmoid()" if backbone(net.arch).own_sigmoid else "torch.nn.Identity()"
    else:
        activation = "torch.nn.Softmax(dim=1)" if record.activation == "softmax" else "torch.nn.Sigmoid()"
    segment = record is not None
    post = [
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
        *(_label_map(record) if segment else []),
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg" if segment else "restored",
            "output_dtype": "$numpy.uint8" if segment else "$numpy.float32",
            "separate_folder": False,
            "resample": False,
        },
    ]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "data",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "patch": net.patch,
        "overlap": 0.5,
        "sw_batch_size": 4,
        "network_def": network_def(net.arch, net.in_channels, out_channels, net.dims),
        "network": f"$torch.nn.Sequential(@network_def, {activation}).to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(net)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": "@patch",
            "sw_batch_size": "@sw_batch_size",
            "overlap": "@overlap",
            "mode": "gaussian",
            "sigma_scale": SIGMA_SCALE,
            "cache_roi_weight_map": True,
        },
        "gaussian": GAUSSIAN,
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network_def"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        # nnU-Net's Gaussian (genesis-ext predict's) instead of MONAI's, whose floor of 1e-3 weighs window edges more
        "initialize": [
            "$monai.utils.set_determinism(seed=0)",
            "$setattr(@inferer, 'roi_weight_map', @gaussian[None, None])",
        ],
        "run": ["$@evaluator.run()"],
    }


def metadata(net: _Network, source: dict) -> dict:
    """configs/metadata.json: what MONAI requires (versions) and what the network takes and gives."""
    import monai

    record, arch = net.record, net.arch
    if record is not None:
        names = ["background", *record.labels] if record.activation == "softmax" else list(record.labels)
        outputs = {
            "type": "probabilities",
            "format": "segmentation",
            "num_channels": record.n_outputs,
            "spatial_shape": net.patch,
            "dtype": "float32",
            "value_range": [0, 1],
            "channel_def": dict(enumerate(names)),
        }
        task = f"segmentation of {', '.join(record.labels)} (genesis-ext fine-tuned {arch['name']})"
    else:
        outputs = {
            "type": "image",
            "format": "magnitude",
            "num_channels": net.in_channels,
            "spatial_shape": net.patch,
            "dtype": "float32",
            "value_range": [0, 1],
        }
        task = f"Models Genesis restoration (genesis-ext pre-trained {arch['name']}): a starting point for fine-tuning"
    packages = {"genesis-ext": __version__} if arch["name"] != "segresnet" else {}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "written by genesis-ext export --monai-bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": packages,
        "name": f"genesis_ext_{arch['name']}",
        "task": task,
        "description": f"exported from {source['file']} (sha256 {source['sha256']})",
        "authors": "genesis-ext export",
        "copyright": "the owners of the weights' training data and of the fine-tuning run",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": net.modality.upper(),
                    "num_channels": net.in_channels,
                    "spatial_shape": net.patch,
                    "dtype": "float32",
                    "value_range": [0, 1],
                }
            },
            "outputs": {"pred": outputs},
        },
    }


def _readme(meta: dict, segment: bool) -> str:
    run = "python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES --output_dir OUT"
    head = "monai.bundle.load(NAME, bundle_dir=PARENT, workflow_type='inference', net_override={'out_channels': N})"
    return (
        f"# {meta['name']}\n\n{meta['task']}.\n\n{meta['description']}.\n\n"
        f"Run it on every NIfTI image of a folder (from this folder; `monai.bundle run` needs `fire`, the evaluator "
        f"`pytorch-ignite`):\n\n    {run}\n\n"
        + (
            "It writes `<image>_seg.nii.gz` label maps on each image's grid, as `genesis-ext predict` does.\n"
            if segment
            else f"For a new task, take the network with another output layer:\n\n    {head}\n"
        )
    )


def export_bundle(weights: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the network of ``weights`` (a genesis-ext checkpoint) as the MONAI bundle ``out`` (a new folder, or
    replaced with ``overwrite``), atomically: written beside it, then moved into place."""
    out = Path(out)
    check_out(out, overwrite)
    state, checkpoint = read_weights(weights)
    net = _network_of(checkpoint, weights)
    if net.in_channels != 1:
        raise ExportError(
            f"genesis_ext: {weights} takes {net.in_channels} channels; bundles are written for single-channel images"
        )
    meta = metadata(net, source_of(weights))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        config = inference_config(net)
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(_readme(meta, net.record is not None))
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, staging / "models" / "model.pt")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    task = "segmentation" if net.record is not None else "restoration"
    run = f"cd {out} && python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES"
    return {"dir": str(out), "task": task, "run": run}
