"""Handing pre-trained weights to nnU-Net v2: ``export_nnunet`` (``genesis-ext export --nnunet``).

nnU-Net fine-tunes from a file (``nnUNetv2_train DATASET CONFIGURATION FOLD -p PLANS -pretrained_weights FILE``) that
its ``load_pretrained_weights`` reads: a dict with the network's state under ``"network_weights"``, holding every key
of the network the plans build, with the same shapes, except the segmentation layers (keys containing
``.seg_layers.``), which keep nnU-Net's fresh initialisation. So the whole encoder transfers (``encoder.*`` and its
aliases ``decoder.encoder.*``) and the decoder (``decoder.stages.*``, ``decoder.transpconvs.*``); the output layer,
which pre-training used to restore its input, does not.

The weights must be of the network the plans build: pre-train with ``--plans`` (architecture ``nnunet``), or with a
named ResEnc or PlainConv architecture whose arguments are the plans'. The export checks what nnU-Net will check and
refuses, naming the first key that does not fit and both shapes (nnU-Net's own message prints the whole tensor, and
``python -O`` drops its asserts). It writes CPU tensors (nnU-Net reads the file without ``map_location``), atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from ..models.backbones import arch_from_plans, build_backbone
from ..models.weights import atomic_save, read_weights, seal
from .common import ExportError, check_out, checkpoint_arch, source_of

SEG_LAYERS = ".seg_layers."  # nnU-Net's load_pretrained_weights skips the keys holding this


def _network_of(checkpoint, path) -> tuple[dict, int, int]:
    """(architecture, input channels, dims) of a pre-training or fine-tuning checkpoint of ours."""
    arch = checkpoint_arch(checkpoint, path)
    if arch["name"] == "unet3d":
        raise ExportError(
            f"genesis_ext: {path} holds the published Models Genesis U-Net (unet3d), which no nnU-Net network "
            "matches; pre-train with --plans PLANS.json (the plans nnU-Net fine-tunes with) to export to nnU-Net"
        )
    record = checkpoint.get("model_record")
    source = record if isinstance(record, dict) else checkpoint
    return arch, int(source.get("in_channels", 1)), int(source.get("dims", 3))


def _check_dataset_channels(plans: Path, in_channels: int) -> None:
    """nnU-Net's input channels are its dataset.json's channel_names: where one lies beside the plans, they must be
    the weights' input channels."""
    dataset = plans.parent / "dataset.json"
    if not dataset.is_file():
        return
    try:
        names = json.loads(dataset.read_text()).get("channel_names", {})
    except (OSError, ValueError, AttributeError):
        return  # nnU-Net reads its own dataset.json; the weights are checked against the plans either way
    if len(names) != in_channels:
        raise ExportError(
            f"genesis_ext: {dataset} has {len(names)} channel(s) ({', '.join(map(str, names.values()))}); the weights "
            f"take {in_channels}: pre-train on cubes of the same channels"
        )


def _differing_kwargs(recorded: dict, target: dict) -> str:
    """The plans' architecture arguments that differ from those the weights were trained with, where both are
    nnU-Net plans architectures."""
    if recorded["name"] != "nnunet":
        return ""
    before = recorded["kwargs"]["architecture"].get("arch_kwargs", {})
    after = target["kwargs"]["architecture"].get("arch_kwargs", {})
    names = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = "; ".join(f"{k}: {before.get(k)!r} (weights) vs {after.get(k)!r} (plans)" for k in names[:4])
    return f" The architectures differ in {shown}." if names else ""


def first_misfit(expected: dict, state: dict) -> str | None:
    """The first key nnU-Net's load_pretrained_weights would refuse: missing from ``state`` or of another shape
    (segmentation layers excepted)."""
    for key, tensor in expected.items():
        if SEG_LAYERS in key:
            continue
        if key not in state:
            return f"key {key!r} is missing from the weights (the plans' network has it, shape {tuple(tensor.shape)})"
        if state[key].shape != tensor.shape:
            return (
                f"key {key!r} has shape {tuple(state[key].shape)} in the weights, {tuple(tensor.shape)} in the plans'"
            )
    return None


def export_nnunet(
    weights: str | os.PathLike,
    plans: str | os.PathLike,
    out: str | os.PathLike,
    configuration: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``weights`` (a genesis-ext checkpoint) to ``out`` as nnU-Net v2's ``-pretrained_weights`` file for the
    network of ``configuration`` (default ``3d_fullres``, or ``2d`` for 2-D weights) in ``plans``. Returns what was
    written: the keys nnU-Net loads and those it leaves fresh. ``ExportError`` for anything that does not fit."""
    out, plans = Path(out), Path(plans)
    check_out(out, overwrite)
    state, checkpoint = read_weights(weights)
    arch, in_channels, dims = _network_of(checkpoint, weights)
    configuration = configuration or ("2d" if dims == 2 else "3d_fullres")
    target = arch_from_plans(plans, configuration)
    _check_dataset_channels(plans, in_channels)
    expected = build_backbone(target, in_channels, 1, dims).state_dict()  # nnU-Net sizes its own segmentation head
    misfit = first_misfit(expected, state)
    if misfit:
        raise ExportError(
            f"genesis_ext: {weights} do not fit the network of {plans} (configuration {configuration!r}): {misfit}; "
            f"nothing was written.{_differing_kwargs(arch, target)} Pre-train with --plans {plans} "
            f"--configuration {configuration} for weights nnU-Net can fine-tune"
        )
    network_weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    provenance = {"version": __version__, "source": source_of(weights), "arch": arch, "configuration": configuration}
    atomic_save(seal({"network_weights": network_weights, "genesis_ext": provenance}), out)
    loaded = [k for k in expected if SEG_LAYERS not in k]
    fresh = [k for k in expected if SEG_LAYERS in k]
    return {"out": str(out), "configuration": configuration, "loaded": loaded, "fresh": fresh}
