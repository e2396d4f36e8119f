"""``ModelRecord``: what prediction needs to rebuild a fine-tuned network and prepare its input.

Every fine-tuning checkpoint stores one under ``"model_record"`` as a plain dict (``record.to_dict()``), so that
``genesis-ext predict`` needs nothing but the checkpoint: the network (its architecture ``arch``, see
``genesis_ext.models.backbones``; ``dims``, ``in_channels``, ``activation``, the classes in ``labels``; the U-Net's
``width`` and ``batchnorm``) and its input (``patch``, the ``intensity`` policy that maps
a scan to [0, 1] as ``describe()`` writes it, ``spacing``, the ``modality``). Records written before modalities hold a
fixed ``window`` [lo, hi] instead of ``intensity``: they read as that window, CT; records written before
architectures have no ``arch``: they are the published U-Net's.

``ModelRecord.from_dict(d, source=path)`` validates every field and raises ``CheckpointError`` naming the file and the
field that is missing or wrong; constructing a record with a wrong value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from ..data.intensity import Window, intensity_from
from ..data.modality import MODALITIES
from .backbones import DEFAULT_ARCH, BackboneError, as_built, build_backbone, multiples, resolve_arch
from .unet3d import BATCHNORM_MODES
from .weights import CheckpointError

TASKS = ("segmentation", "classification")
ACTIVATIONS = ("sigmoid", "softmax")  # sigmoid: one independent channel per class; softmax: background + classes
LABEL_MAX = 255  # label maps are written as uint8


def _is_int(value) -> bool:  # NumPy's integers too; never bool
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _numbers(name: str, value, count: int) -> tuple:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != count or not all(_is_number(v) for v in value):
        raise ValueError(f"field '{name}' must be {count} finite numbers, got {value!r}")
    return tuple(value)


def _pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _check_labels(labels, task: str) -> dict:
    """Class name -> label value, in channel order: distinct ints, 1..255 for segmentation (0 is background)."""
    low = 1 if task == "segmentation" else 0
    ok = isinstance(labels, dict) and labels and all(isinstance(k, str) and _is_int(v) for k, v in labels.items())
    if not ok or not all(low <= v <= LABEL_MAX for v in labels.values()) or len(set(labels.values())) < len(labels):
        raise ValueError(
            f"field 'labels' must map class names to distinct integer values in {low}..{LABEL_MAX} ({task}), "
            f"got {labels!r}"
        )
    return {name: int(value) for name, value in labels.items()}


def _check_patch(patch, dims: int, arch: dict) -> tuple:
    """X, Y, Z voxels, each spanned axis a multiple of the network's downsampling (8 for the U-Net's three 2x
    poolings); 2-D patches are (X, Y, 1)."""
    patch = _numbers("patch", patch, 3)
    divisors, multiple = multiples(arch, dims)
    spanned = patch[:dims]
    if not all(_is_int(p) and p >= d and p % d == 0 for p, d in zip(spanned, divisors)) or (
        dims == 2 and patch[2] != 1
    ):
        shape = "[X, Y, Z]" if dims == 3 else "[X, Y, 1]"
        raise ValueError(
            f"field 'patch' must be {shape} with {', '.join('XYZ'[:dims])} multiples of "
            f"{multiple} (architecture {arch['name']!r}), got {list(patch)}"
        )
    return tuple(int(p) for p in patch)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"field '{name}' must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelRecord:
    """A fine-tuned network and its input, as stored in its checkpoint (see the module docstring)."""

    task: str
    dims: int
    in_channels: int
    width: float
    batchnorm: str
    labels: dict
    activation: str
    patch: tuple
    intensity: dict
    spacing: tuple | None = None
    modality: str = "ct"
    arch: dict = field(default_factory=lambda: dict(DEFAULT_ARCH))

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here, to plain Python values (torch.load(weights_only))
        _check_choice("task", self.task, TASKS)
        if not _is_int(self.dims) or self.dims not in (2, 3):
            raise ValueError(f"field 'dims' must be 2 or 3, got {self.dims!r}")
        if not _is_int(self.in_channels) or self.in_channels < 1:
            raise ValueError(f"field 'in_channels' must be a positive integer, got {self.in_channels!r}")
        if not _is_number(self.width) or not 0 < self.width <= 64:
            raise ValueError(f"field 'width' must be a number in (0, 64], got {self.width!r}")
        set_(self, "dims", int(self.dims))
        set_(self, "in_channels", int(self.in_channels))
        set_(self, "width", float(self.width))
        _check_choice("batchnorm", self.batchnorm, BATCHNORM_MODES)
        try:
            set_(self, "arch", resolve_arch(self.arch))
        except BackboneError as err:
            raise ValueError(f"field 'arch': {err}") from None
        if self.arch["name"] != "unet3d" and self.width != 1.0:
            name = self.arch["name"]
            raise ValueError(
                f"field 'width' must be 1 for architecture {name!r} (it scales the unet3d's channels only)"
            )
        set_(self, "labels", _check_labels(self.labels, self.task))
        _check_choice("activation", self.activation, ACTIVATIONS)
        set_(self, "patch", _check_patch(self.patch, self.dims, self.arch))
        try:
            set_(self, "intensity", self.window.describe())
        except (ValueError, TypeError) as err:
            raise ValueError(f"field 'intensity': {err}") from None
        _check_choice("modality", self.modality, tuple(MODALITIES))
        if self.spacing is not None:
            spacing = _numbers("spacing", self.spacing, 3)
            if min(spacing) <= 0:
                raise ValueError(f"field 'spacing' must be three positive numbers (mm) or null, got {list(spacing)}")
            set_(self, "spacing", tuple(float(s) for s in spacing))

    @property
    def window(self) -> Window:
        """The intensity policy (a ``Window``, or a ``PercentileWindow`` resolved per volume)."""
        return intensity_from(
            {k: float(v) if _is_number(v) else v for k, v in self.intensity.items()}
            if isinstance(self.intensity, dict)
            else self.intensity
        )

    @property
    def n_outputs(self) -> int:
        """The network's output channels: one per class (sigmoid), or background + one per class (softmax)."""
        return len(self.labels) + (self.activation == "softmax")

    @property
    def network_arch(self) -> dict:
        """``arch`` as ``build_backbone`` takes it: the U-Net's with this record's ``width`` and ``batchnorm``."""
        return as_built(self.arch, width=self.width, batchnorm=self.batchnorm)

    def build_model(self) -> torch.nn.Module:
        """The untrained segmentation network this record describes (the U-Net: ``UNet3D``, or ``UNet2D`` for
        ``dims == 2``): sigmoid records give probabilities, softmax records logits (``probabilities`` applies the
        softmax)."""
        if self.task != "segmentation":
            raise ValueError(f"build_model builds segmentation networks; this record's task is {self.task!r}")
        sigmoid = self.activation == "sigmoid"
        return build_backbone(self.network_arch, self.in_channels, self.n_outputs, self.dims, sigmoid=sigmoid)

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """The network's output ``(N, n_outputs, ...)`` as probabilities: sigmoid networks give them already;
        softmax over the channels of the logits."""
        return torch.softmax(output, dim=1) if self.activation == "softmax" else output

    def label_map(self, probs):
        """``(n_outputs, X, Y, Z)`` probabilities (NumPy or torch) -> uint8 label map of the same kind. Softmax: the
        most probable channel, channel k > 0 giving the k-th class's value. Sigmoid: each voxel whose largest class
        probability is >= 0.5 gets that class's value, the others 0."""
        p = torch.as_tensor(probs)
        values = torch.tensor([0, *self.labels.values()], dtype=torch.uint8, device=p.device)
        if self.activation == "softmax":
            index = p.argmax(0)
        else:
            best, channel = p.max(0)
            index = torch.where(best >= 0.5, channel + 1, 0)
        labels = values[index]
        return labels.cpu().numpy() if isinstance(probs, np.ndarray) else labels

    def class_probabilities(self, probs):
        """The classes' channels of ``(n_outputs, ...)`` probabilities, in ``labels`` order (softmax: without the
        background channel)."""
        return probs[1:] if self.activation == "softmax" else probs

    def to_dict(self) -> dict:
        """Plain values only (lists, not tuples), as ``torch.load(weights_only=True)`` reads them back."""
        d = asdict(self)
        for name in ("patch", "spacing"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d, source="") -> ModelRecord:
        """The record stored in a checkpoint, validated; ``CheckpointError`` naming ``source`` (the file) and the
        field for anything missing, unknown or wrong."""
        where = f"genesis_ext: {source}: its model record" if source else "genesis_ext: model record"
        if not isinstance(d, dict):
            raise CheckpointError(f"{where} is not a dict (got {type(d).__name__})")
        if "window" in d and "intensity" not in d:  # written before modalities: a fixed window, CT
            window = d["window"]
            d = {k: v for k, v in d.items() if k != "window"}
            d["intensity"] = {"kind": "fixed", "lo": window[0], "hi": window[1]} if _pair(window) else window
            d.setdefault("modality", "ct")
        if "arch" not in d:  # written before architectures: the published U-Net
            d = {**d, "arch": DEFAULT_ARCH}
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = [n for n in d if n not in names]
        if missing:
            raise CheckpointError(f"{where} has no field {', '.join(repr(n) for n in missing)}")
        if unknown:  # a field this version does not know could change what the network expects
            raise CheckpointError(
                f"{where} has unknown field(s) {', '.join(repr(n) for n in unknown)}: written by a newer genesis-ext? "
                "Upgrade genesis-ext to use it"
            )
        try:
            return cls(**d)
        except ValueError as err:
            raise CheckpointError(f"{where} is invalid: {err}") from None
