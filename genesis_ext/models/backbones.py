"""Backbones: the networks pre-training restores with and fine-tuning starts from, chosen by name.

An architecture is a plain dict, ``{"name": NAME, "kwargs": {...}}`` of JSON values, which checkpoints and model
records store so that ``predict`` and the exports rebuild the network without being told how.
``build_backbone(arch, in_channels, out_channels, dims)`` builds it; ``BACKBONES`` lists the names:

- ``unet3d`` (the default): the published Models Genesis 3D U-Net (``UNet2D`` in 2-D), kwargs ``width`` and
  ``batchnorm``; the published weights fit it at width 1.
- ``resenc-l``, ``resenc-s``, ``plain-s``: nnU-Net's ``ResidualEncoderUNet`` and ``PlainConvUNet``
  (dynamic-network-architectures). ``resenc-l`` is the ResEnc-L that nnssl pre-trains (Wald et al., "Revisiting MAE
  pre-training for 3D medical image segmentation", CVPR 2025: 6 stages of 32 to 320 features, 102 M parameters);
  the ``-s`` ones are 4-stage networks of 16 to 128 features for a CPU. kwargs replace the constructor's
  (``features_per_stage``, ``n_blocks_per_stage``, ...).
- ``nnunet``: the network of one configuration of an nnU-Net v2 plans file (``arch_from_plans``): kwargs hold the
  configuration's ``architecture`` entry verbatim, which is what makes weights loadable by nnU-Net.
- ``segresnet``: MONAI's ``SegResNet``; kwargs those of its constructor (``init_filters``, ``blocks_down``, ...).
- ``module:factory``: any importable ``factory(in_channels, out_channels, dims, **kwargs) -> nn.Module``. The factory
  may say which state-dict key prefixes are its output layer (``factory.genesis_head``, a tuple; a new task
  re-initialises them) and the multiple each input size must be (``factory.genesis_divisor``, an int).

Every network but ``unet3d`` returns raw outputs; ``sigmoid=True`` adds the sigmoid as a forward hook, so the state
dict stays the one nnU-Net and MONAI load. The head of the dynamic-network-architectures U-Nets without deep
supervision uses only the last of its ``decoder.seg_layers``: the others are frozen (kept in the state dict, which
nnU-Net expects whole; no gradient, which DistributedDataParallel needs).
"""

from __future__ import annotations

import importlib
import json
import math
import pydoc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .unet3d import UNet2D, UNet3D

DEFAULT_ARCH = {"name": "unet3d", "kwargs": {}}
INSTALL = {"nnunet": "pip install 'genesis-ext[nnunet]'", "monai": "pip install 'genesis-ext[monai]'"}


class BackboneError(ValueError):
    """An architecture that cannot be built, or does not fit its input."""


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture, and what a new task replaces in it."""

    build: Callable[..., nn.Module]  # (in_channels, out_channels, dims, **kwargs) -> a network
    head: tuple  # state-dict key prefixes of the output layer
    divisor: Callable[[dict, int], tuple]  # (kwargs, dims) -> per spatial axis, the multiple an input size must be
    own_sigmoid: bool = False  # build takes activation="sigmoid" (unet3d's published output layer)


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackboneError(
            f"genesis_ext: this architecture needs the '{module.split('.')[0]}' package ({err}); install it with "
            f"{INSTALL[extra]}"
        ) from None


def _unet3d(in_channels: int, out_channels: int, dims: int, **kwargs):
    return (UNet3D if dims == 3 else UNet2D)(in_channels, out_channels, **{"activation": "none", **kwargs})


# The dynamic-network-architectures presets: (class, its kwargs but the ops, which follow the dimensionality)
_DNA_PRESETS = {
    "resenc-l": (
        "ResidualEncoderUNet",
        dict(
            n_stages=6,
            features_per_stage=[32, 64, 128, 256, 320, 320],
            n_blocks_per_stage=[1, 3, 4, 6, 6, 6],
            n_conv_per_stage_decoder=[1, 1, 1, 1, 1],
        ),
    ),
    "resenc-s": (
        "ResidualEncoderUNet",
        dict(
            n_stages=4,
            features_per_stage=[16, 32, 64, 128],
            n_blocks_per_stage=[1, 2, 2, 2],
            n_conv_per_stage_decoder=[1, 1, 1],
        ),
    ),
    "plain-s": (
        "PlainConvUNet",
        dict(
            n_stages=4,
            features_per_stage=[16, 32, 64, 128],
            n_conv_per_stage=[2, 2, 2, 2],
            n_conv_per_stage_decoder=[2, 2, 2],
        ),
    ),
}


def _dna_kwargs(preset: str, dims: int, kwargs: dict) -> dict:
    """The preset's constructor kwargs, nnU-Net's defaults for the rest (3x3x3 kernels, stride 2 from the second
    stage, conv bias, affine InstanceNorm, LeakyReLU), ``kwargs`` replacing any of them."""
    merged = {**_DNA_PRESETS[preset][1], **kwargs}
    n = merged["n_stages"]
    merged.setdefault("kernel_sizes", [[3] * dims] * n)
    merged.setdefault("strides", [[1] * dims] + [[2] * dims] * (n - 1))
    merged.setdefault("conv_bias", True)
    merged.setdefault("norm_op_kwargs", {"eps": 1e-5, "affine": True})
    merged.setdefault("nonlin_kwargs", {"inplace": True})
    return merged


def _dna_network(cls, in_channels: int, out_channels: int, kwargs: dict, what: str) -> nn.Module:
    try:
        network = cls(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError) as err:
        raise BackboneError(f"genesis_ext: {what}: {cls.__name__} refused its arguments: {err}") from None
    network.apply(network.initialize)  # nnU-Net's initialisation (He, and zeroed last norms in residual blocks)
    for layer in network.decoder.seg_layers[:-1]:  # unused without deep supervision
        layer.requires_grad_(False)
    return network


def _dna_ops(dims: int) -> dict:
    return dict(
        conv_op=nn.Conv3d if dims == 3 else nn.Conv2d,
        norm_op=nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d,
        nonlin=nn.LeakyReLU,
    )


def _preset_builder(preset: str):
    def build(in_channels: int, out_channels: int, dims: int, **kwargs):
        unet = _import("dynamic_network_architectures.architectures.unet", "nnunet")
        cls = getattr(unet, _DNA_PRESETS[preset][0])
        merged = {**_dna_kwargs(preset, dims, kwargs), **_dna_ops(dims)}
        return _dna_network(cls, in_channels, out_channels, merged, f"architecture '{preset}'")

    return build


def _strides_divisor(strides, dims: int) -> tuple:
    """Per axis, the product of the stages' strides (an int stride applies to every axis)."""
    per_stage = [[s] * dims if isinstance(s, int) else list(s) for s in strides]
    return tuple(math.prod(stage[a] for stage in per_stage) for a in range(dims))


def _locate(name: str, prefix: str, what: str):
    """The object ``name`` names, which must lie under ``prefix``: a record or plans file names code, and only
    these modules' classes may be built from it."""
    found = pydoc.locate(name) if isinstance(name, str) and name.startswith(prefix) else None
    if found is None:
        raise BackboneError(f"genesis_ext: {what} {name!r} is not a class under '{prefix}'")
    return found


def _nnunet(in_channels: int, out_channels: int, dims: int, architecture: dict, **_provenance):
    _import("dynamic_network_architectures", "nnunet")
    what = "the nnU-Net plans' architecture"
    cls = _locate(architecture["network_class_name"], "dynamic_network_architectures.", f"{what}: network class")
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], "torch.nn.", f"{what}: {key}")
    conv_dims = {nn.Conv3d: 3, nn.Conv2d: 2}.get(kwargs.get("conv_op"))
    if conv_dims != dims:
        raise BackboneError(
            f"genesis_ext: {what} uses {architecture['arch_kwargs'].get('conv_op')}, not a {dims}-D convolution: "
            f"choose a {dims}-D configuration (e.g. 3d_fullres for 3-D) or --dims {conv_dims}"
        )
    return _dna_network(cls, in_channels, out_channels, kwargs, what)


def _segresnet(in_channels: int, out_channels: int, dims: int, **kwargs):
    nets = _import("monai.networks.nets", "monai")
    try:
        return nets.SegResNet(spatial_dims=dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    except (TypeError, ValueError) as err:
        raise BackboneError(f"genesis_ext: architecture 'segresnet': SegResNet refused its arguments: {err}") from None


def _segresnet_divisor(kwargs: dict, dims: int) -> tuple:
    return (2 ** (len(kwargs.get("blocks_down", (1, 2, 2, 4))) - 1),) * dims


def _factory(name: str):
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise BackboneError(f"genesis_ext: architecture {name!r}: cannot import the factory ({err})") from None
    if not callable(factory):
        raise BackboneError(f"genesis_ext: architecture {name!r}: {attr} is not callable")
    return factory


BACKBONES = {
    "unet3d": Backbone(_unet3d, ("out_tr.",), lambda kwargs, dims: (8,) * dims, own_sigmoid=True),
    **{
        name: Backbone(
            _preset_builder(name),
            ("decoder.seg_layers.",),
            lambda kwargs, dims, name=name: _strides_divisor(_dna_kwargs(name, dims, kwargs)["strides"], dims),
        )
        for name in _DNA_PRESETS
    },
    "nnunet": Backbone(
        _nnunet,
        ("decoder.seg_layers.",),
        lambda kwargs, dims: _strides_divisor(kwargs["architecture"]["arch_kwargs"]["strides"], dims),
    ),
    "segresnet": Backbone(_segresnet, ("conv_final.2.",), _segresnet_divisor),
}


def _plain(value) -> bool:
    """JSON values only: what a checkpoint may hold and torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _plain_copy(value):
    return json.loads(json.dumps(value))


def resolve_arch(arch) -> dict:
    """``arch`` (a name, or ``{"name", "kwargs"}``) as the dict records store, checked: a known name or
    ``module:factory``, kwargs of JSON values. Raises ``BackboneError`` listing the known names."""
    if arch is None:
        arch = DEFAULT_ARCH
    if isinstance(arch, str):
        arch = {"name": arch, "kwargs": {}}
    if not isinstance(arch, dict) or set(arch) - {"name", "kwargs"} or not isinstance(arch.get("name"), str):
        raise BackboneError(
            f"genesis_ext: an architecture is a name or {{'name': ..., 'kwargs': {{...}}}}, got {arch!r}"
        )
    name, kwargs = arch["name"], arch.get("kwargs", {})
    if name not in BACKBONES and ":" not in name:
        raise BackboneError(
            f"genesis_ext: unknown architecture {name!r}; known: {', '.join(BACKBONES)}, or module:factory (a "
            "function (in_channels, out_channels, dims, **kwargs) -> nn.Module)"
        )
    if not isinstance(kwargs, dict) or not _plain(kwargs):
        raise BackboneError(f"genesis_ext: architecture {name!r}: kwargs must be a dict of JSON values, got {kwargs!r}")
    if name == "nnunet" and not isinstance(kwargs.get("architecture"), dict):
        raise BackboneError("genesis_ext: architecture 'nnunet' needs a plans file (--plans PLANS.json)")
    return {"name": name, "kwargs": _plain_copy(kwargs)}


def backbone(arch: dict) -> Backbone:
    """The ``Backbone`` of a resolved architecture (a factory's from its ``genesis_head``/``genesis_divisor``)."""
    name = arch["name"]
    if name in BACKBONES:
        return BACKBONES[name]
    factory = _factory(name)
    divisor = int(getattr(factory, "genesis_divisor", 1))
    return Backbone(factory, tuple(getattr(factory, "genesis_head", ())), lambda kwargs, dims: (divisor,) * dims)


def as_built(arch: dict, **unet3d) -> dict:
    """``arch`` as ``build_backbone`` takes it: the published U-Net's with its options ``unet3d`` (``width``,
    ``batchnorm``, which records and configs keep apart from ``arch``), any other network's as it is."""
    return {"name": "unet3d", "kwargs": {**arch["kwargs"], **unet3d}} if arch["name"] == "unet3d" else arch


def recorded_arch(checkpoint) -> dict | None:
    """The architecture a checkpoint of ours records: a fine-tuned one's ``model_record`` (none there: the published
    U-Net, recorded before architectures were), a pre-training one's ``arch``; None for other files."""
    if not isinstance(checkpoint, dict):
        return None
    record = checkpoint.get("model_record")
    arch = record.get("arch", DEFAULT_ARCH) if isinstance(record, dict) else checkpoint.get("arch")
    return None if arch is None else resolve_arch(arch)


def _sigmoid_output(module, args, output):
    return torch.sigmoid(output)


def build_backbone(arch, in_channels: int, out_channels: int, dims: int, sigmoid: bool = False) -> nn.Module:
    """The network ``arch`` names, ``in_channels`` -> ``out_channels`` in ``dims`` spatial dimensions, freshly
    initialised; with ``sigmoid`` its output passes through a sigmoid (``unet3d``: its published output layer)."""
    arch = resolve_arch(arch)
    spec = backbone(arch)
    kwargs = {**arch["kwargs"], "activation": "sigmoid"} if sigmoid and spec.own_sigmoid else arch["kwargs"]
    network = spec.build(in_channels, out_channels, dims, **kwargs)
    if not isinstance(network, nn.Module):
        raise BackboneError(
            f"genesis_ext: architecture {arch['name']!r} built a {type(network).__name__}, not a module"
        )
    if sigmoid and not spec.own_sigmoid:
        network.register_forward_hook(_sigmoid_output)
    return network


def multiples(arch: dict, dims: int) -> tuple[tuple, str]:
    """Per spatial axis, the multiple an input size of ``arch`` must be, and those in words ("8", or "32x32x16")."""
    divisors = backbone(arch).divisor(arch["kwargs"], dims)
    return divisors, str(divisors[0]) if len(set(divisors)) == 1 else "x".join(map(str, divisors))


def _nearest(size: int, divisor: int) -> str:
    below = size // divisor * divisor
    return f"{divisor}" if below < divisor else f"{below} or {below + divisor}"


def check_backbone(arch, in_channels: int, out_channels: int, dims: int, spatial) -> None:
    """That ``arch`` takes ``(N, in_channels, *spatial)`` batches and returns ``(N, out_channels, *spatial)``: the
    sizes against its divisors, then a forward pass on the meta device (no memory, no compute). ``BackboneError``
    naming the axis or the shapes otherwise."""
    arch = resolve_arch(arch)
    spatial = tuple(int(s) for s in spatial)[:dims]
    divisors = backbone(arch).divisor(arch["kwargs"], dims)
    bad = [f"{'XYZ'[a]} = {s} (use {_nearest(s, d)})" for a, (s, d) in enumerate(zip(spatial, divisors)) if s % d]
    if bad:
        raise BackboneError(
            f"genesis_ext: architecture {arch['name']!r} needs input sizes that are multiples of "
            f"{'x'.join(map(str, divisors))} (its downsampling); got {'x'.join(map(str, spatial))}: {'; '.join(bad)}"
        )
    with torch.device("meta"):
        network = build_backbone(arch, in_channels, out_channels, dims)
        try:
            output = network(torch.empty(2, in_channels, *spatial))
        except Exception as err:  # a factory's network may fail in any way on the wrong input
            raise BackboneError(
                f"genesis_ext: architecture {arch['name']!r} cannot take a batch of shape "
                f"{[2, in_channels, *spatial]}: {type(err).__name__}: {err}"
            ) from None
    expected = (2, out_channels, *spatial)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise BackboneError(
            f"genesis_ext: architecture {arch['name']!r} returned {got} for a batch of shape "
            f"{[2, in_channels, *spatial]}; expected {list(expected)} ({out_channels} output channel(s), the input's "
            f"{dims}-D size)"
        )


def arch_from_plans(plans, configuration: str = "3d_fullres") -> dict:
    """The ``nnunet`` architecture of ``configuration`` in an nnU-Net v2 plans file (``nnUNetPlans.json``, as
    ``nnUNetv2_plan_and_preprocess`` writes it) or dict: its ``architecture`` entry (``inherits_from`` resolved)."""
    source = str(plans) if not isinstance(plans, dict) else "the plans"
    if not isinstance(plans, dict):
        try:
            plans = json.loads(Path(plans).read_text())
        except (OSError, ValueError) as err:
            raise BackboneError(f"genesis_ext: cannot read the nnU-Net plans {source}: {err}") from None
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configurations, dict) or configuration not in configurations:
        known = ", ".join(configurations) if isinstance(configurations, dict) else "none"
        raise BackboneError(
            f"genesis_ext: {source} has no configuration {configuration!r} (its configurations: {known})"
        )
    merged, seen = {}, []
    name = configuration
    while name is not None:  # a configuration's own entries win over those it inherits
        if name in seen or name not in configurations:
            raise BackboneError(
                f"genesis_ext: {source}: configuration {name!r} inherits from a missing or circular one"
            )
        seen.append(name)
        merged = {**configurations[name], **merged}
        name = configurations[name].get("inherits_from")
    architecture = merged.get("architecture")
    if not isinstance(architecture, dict) or not {"network_class_name", "arch_kwargs"} <= set(architecture):
        raise BackboneError(
            f"genesis_ext: {source}: configuration {configuration!r} has no 'architecture' entry with "
            "'network_class_name' and 'arch_kwargs' (plans written by nnU-Net v2.4 or later have one)"
        )
    kwargs = {"plans_name": plans.get("plans_name"), "configuration": configuration, "architecture": architecture}
    return resolve_arch({"name": "nnunet", "kwargs": kwargs})
