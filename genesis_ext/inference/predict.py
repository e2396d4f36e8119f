"""Segmenting whole CT or MR volumes with a fine-tuned checkpoint: ``load_predictor``, ``predict_volume``,
``predict`` and the ``genesis-ext predict`` verb.

The checkpoint carries everything (its ``ModelRecord``): the network is rebuilt from it, each volume is windowed to
[0, 1] with the record's intensity policy (CT: its HU window; MR: the volume's own body percentiles), resampled to the
record's spacing where it differs by more than 1 %, predicted with ``sliding_window`` (Gaussian-blended windows of the
record's patch), and the probabilities are resampled back to the volume's exact grid before the label map is taken.

``predict`` writes ``<out>/<case>.nii.gz`` (uint8 label map; values from the record's ``labels``, 0 elsewhere) and,
with ``probabilities``, ``<case>_probabilities.nii.gz`` (float32 ``(x, y, z, classes)``, one channel per class in
``labels`` order; no background channel) on each input's own grid: for a NIfTI input, the array in the input file's
axis order with its affine, so that output voxel ``[i, j, k]`` is input voxel ``[i, j, k]``; for DICOM, MetaImage and
NRRD inputs, the volume's LPS+ array with its affine in NIfTI's RAS+ world. Every file is written atomically. Bad
input is refused before anything is written: inputs that do not exist, predictions already in ``out`` (unless
``overwrite``), a checkpoint without a segmentation record, volumes that are not 3-D, a DICOM series whose Modality
tag is not the model's. A volume whose values do not look like the model's modality (an MRI given to a CT model) is
predicted with a warning naming it and its value range.

The module imports without torch, so that the verb's argument parsing stays light; predicting needs it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._cli_options import AMP_MODES, add_device_options, add_overwrite, add_quiet
from .._util import TORCH_MISSING, atomic_write, positive_int, progress_bar
from ..data.intensity import resample
from ..data.io import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    ORIENTATION,
    SITK_SUFFIXES,
    Source,
    Volume,
    VolumeError,
    channel_cases,
    dicom_series,
    dicom_tag_of,
    find_sources,
    label_map_reason,
    load_channels,
    load_volume,
    sitk_module,
)
from ..data.io import (
    _check_3d as _check_3d_shape,
)
from ..data.modality import ModalityWarning, from_dicom_tag, value_warning

if TYPE_CHECKING:  # imported where used: the module imports without torch
    import torch

    from ..models.record import ModelRecord

IMAGE_SUFFIXES = sorted(NIFTI_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True)  # .nii.gz first
SPACING_TOLERANCE = 0.01  # relative spacing difference below which a volume is predicted at its own spacing
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # our patient frame is LPS+, NIfTI's world RAS+
NO_RECORD_FIX = (
    "fine-tune with this version (genesis-ext finetune --task segmentation), or load the weights into your own "
    "network with genesis_ext.models.load_pretrained"
)


class PredictError(ValueError):
    """Input that ``predict`` refuses; nothing was written."""


def _torch():
    try:
        import torch
    except ImportError:
        raise PredictError(f"predicting {TORCH_MISSING}") from None
    return torch


@dataclass
class Predictor:
    """A fine-tuned network in eval mode on ``device``, with the ``record`` it was rebuilt from. ``forward`` maps
    ``(N, C, *patch)`` windows to probabilities, as ``sliding_window`` wants."""

    model: torch.nn.Module
    record: ModelRecord
    device: torch.device
    amp: bool = False  # bf16 autocast

    def forward(self, x):
        torch = _torch()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x[..., 0])[..., None] if self.record.dims == 2 else self.model(x)  # 2-D: (X, Y, 1) windows
        return self.record.probabilities(out.float())


def load_predictor(weights, device="auto", amp="auto") -> Predictor:
    """The network of the fine-tuning checkpoint ``weights``, rebuilt from its model record, loaded strictly, in eval
    mode on ``device`` ("auto": a GPU where torch has CUDA, else the CPU), with bf16 autocast as ``amp`` says ("auto":
    on CUDA; match fine-tuning's ``--amp`` to reproduce its validation exactly). Raises FileNotFoundError for a missing
    file and CheckpointError for a damaged one, one without a model record, or one that is not a segmentation's."""
    _torch()
    from ..models.record import ModelRecord
    from ..models.weights import CheckpointError, load_state, read_checkpoint
    from ..train.distributed import resolve_device

    path = Path(weights)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model_record" not in checkpoint:
        raise CheckpointError(
            f"genesis_ext: {path} has no model record: it was not written by genesis-ext finetune (segmentation); "
            f"{NO_RECORD_FIX}"
        )
    record = ModelRecord.from_dict(checkpoint["model_record"], source=path)
    if record.task != "segmentation":
        raise CheckpointError(f"genesis_ext: {path} is a {record.task} checkpoint; predict segments")
    model = record.build_model()
    mismatch = "its model record does not describe its weights: use the checkpoint as genesis-ext finetune wrote it"
    load_state(model, checkpoint.get("state_dict", checkpoint.get("model")), path, fix=mismatch)
    if record.batchnorm == "batch_stats":
        warnings.warn(
            f"{path} normalises with each batch's statistics (published BatchNorm): its predictions depend on which "
            "windows share a batch (--batch-size); fine-tune with --batchnorm running for predictions that do not",
            stacklevel=2,
        )
    target = resolve_device(device)
    if amp not in AMP_MODES:
        raise PredictError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    bf16 = amp == "bf16" or (amp == "auto" and target.type == "cuda")
    return Predictor(model.eval().to(target), record, target, bf16)


def _needs_resampling(spacing, target) -> bool:
    return target is not None and any(abs(s - t) > SPACING_TOLERANCE * t for s, t in zip(spacing, target))


def resize_linear(data, scale, shape):
    """``data`` ``(C, *grid)`` (a torch tensor) linearly interpolated, per axis and channel, at the voxels of a grid of
    ``shape`` whose voxel size is ``scale`` grid voxels (voxel centres aligned as ``genesis_ext.data.resample`` aligns
    them; edge values held): the inverse of ``resample`` onto EXACTLY ``shape``, which resampling back to the old
    spacing misses where ``resample`` rounded its shape."""
    torch = _torch()
    for axis, (n, s) in enumerate(zip(shape, scale), start=1):
        size = data.shape[axis]
        coord = ((torch.arange(n, dtype=torch.float64) + 0.5) * s - 0.5).clamp(0, size - 1)
        below = coord.floor().long()
        above = (below + 1).clamp(max=size - 1)
        w = (coord - below).float().reshape([n if a == axis else 1 for a in range(data.dim())]).to(data.device)
        below, above = below.to(data.device), above.to(data.device)
        data = data.index_select(axis, below) * (1 - w) + data.index_select(axis, above) * w
    return data


def predict_volume(
    predictor: Predictor, volume, *, overlap=0.5, batch_size=4, mirror=False, progress=False
) -> tuple[np.ndarray, np.ndarray]:
    """``(label_map, probabilities)`` of ``volume`` on its own grid: uint8 ``(x, y, z)`` and float32
    ``(classes, x, y, z)`` (one channel per class of the record's ``labels``, in their order; softmax's background
    channel left out). ``volume``: a :class:`Volume`, or a list of them, one per input channel, on one grid
    (``io.load_channels``); data in the record's input units (HU for CT). ``progress``: a bar over the windows."""
    torch = _torch()
    from .sliding_window import sliding_window, window_boxes

    record = predictor.record
    channels = [volume] if isinstance(volume, Volume) else list(volume)
    if len(channels) != record.in_channels:
        raise PredictError(f"{channels[0].source}: {len(channels)} channel(s), the model takes {record.in_channels}")
    volume = channels[0]
    if _needs_resampling(volume.spacing, record.spacing):
        channels = [resample(c, record.spacing) for c in channels]
    grid = channels[0]
    pixels = np.stack([record.window.resolve(c.data).apply(c.data) for c in channels])  # each channel on its own
    image = torch.from_numpy(pixels).to(predictor.device)
    bar = progress_bar(
        len(window_boxes(grid.shape, record.patch, overlap)),
        Path(volume.source).name or "volume",
        "window",
        enabled=progress,
        leave=False,
    )
    try:
        probs = sliding_window(
            predictor.forward,
            image,
            record.patch,
            overlap=overlap,
            batch_size=batch_size,
            mirror=mirror,
            progress=bar.update,
        )
    finally:
        bar.close()
    if grid is not volume:
        probs = resize_linear(probs, np.divide(volume.spacing, grid.spacing), volume.shape)
    labels = record.label_map(probs)
    return labels.cpu().numpy(), record.class_probabilities(probs).cpu().numpy()


def case_name(source: Source) -> str:
    """The output name of a source: its key (path relative to its input) without the image suffix, folders joined
    by '__', other characters than letters, digits, '.', '_' and '-' replaced by '_'."""
    key = source.key
    suffix = next((s for s in IMAGE_SUFFIXES if key.lower().endswith(s)), "")
    key = key[: len(key) - len(suffix)].replace(os.sep, "__")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_.") or "volume"


def _cases(inputs, channels: int = 1) -> list[tuple[str, Source]]:
    """(case name, source) of every volume of ``inputs`` (for ``channels`` > 1, nnU-Net's channel files grouped into
    cases, ``io.channel_cases``); refuses inputs that do not exist or hold no volume, a case with missing channel
    files, and two volumes that would get the same name."""
    sources, problems = find_sources([str(i) for i in inputs])
    sources, incomplete = channel_cases(sources, channels)
    problems += incomplete
    if problems:
        raise PredictError("; ".join(f"{item}: {reason}" for item, reason in problems))
    cases = [(case_name(s), s) for s in sources if not _found_label_map(s)]
    if not cases:
        raise PredictError(f"{', '.join(map(str, inputs))}: no images to predict, only label maps")
    names: dict[str, str] = {}
    for name, source in cases:
        if name in names:
            raise PredictError(f"{names[name]} and {source.path} would both be written as '{name}'; predict them apart")
        names[name] = source.path
    return cases


def _found_label_map(source: Source) -> bool:
    """A label map found inside a folder (e.g. ``masks/liver.nii.gz`` beside the scan) is skipped, with a warning;
    a file named on its own is always predicted."""
    reason = None if Path(source.path) == Path(source.input) else label_map_reason(source.key)
    if reason:
        warnings.warn(f"{source.path}: skipped, {reason}", stacklevel=3)
    return reason is not None


def _outputs(out: Path, case: str) -> tuple[Path, Path]:
    return out / f"{case}.nii.gz", out / f"{case}_probabilities.nii.gz"


def _refuse_existing(out: Path, cases, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out} is a file, not a folder")
    found = [str(p) for case, _ in cases for p in _outputs(out, case) if p.exists()]
    if found and not overwrite:
        shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise PredictError(f"{out} already holds predictions of these inputs: {shown}; pass overwrite (--overwrite)")


def _is_nifti(path: Path) -> bool:
    """Whether load_volume reads ``path`` with nibabel."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _header_shape(source: Source) -> tuple:
    """The array shape in the file's header (no voxels read): NIfTI, a DICOM series (its slices) or an ITK file."""
    path = Path(source.path)
    if _is_nifti(path):
        import nibabel as nib

        return tuple(nib.load(str(path)).shape)
    reader = sitk_module().ImageFileReader()
    files = [str(path)]
    if path.is_dir():
        series = dicom_series(path)
        files = series[source.series_uid] if source.series_uid else max(series.values(), key=len)
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    size = reader.GetSize()
    return (*size[:2], size[2] * len(files)) if path.is_dir() and len(size) == 3 else tuple(size)


def _check_input(source: Source, channels: int) -> None:
    """Refuses a volume that is not 3-D (or 4-D: 3-D channels), or whose channels are not the model's, from its
    header; a header that does not read is read as load_volume reads it, which names what is wrong."""
    try:
        shape = _header_shape(source)
    except ImportError as err:
        raise VolumeError(source.path, str(err)) from None
    except Exception:  # nibabel, GDCM and ITK raise many types for damaged files; load_volume says which
        load_volume(source.path, series_uid=source.series_uid)
        return
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): 3-D stored as 4-D, as load_volume reads it
        shape = shape[:-1]
    found = len(source.channels) or (shape[3] if len(shape) == 4 and channels > 1 else 1)
    _check_3d_shape(source.path, shape[:3] if len(shape) == 4 and channels > 1 else shape)
    if found != channels:
        raise PredictError(
            f"{source.path}: {found} channel(s), but the model takes {channels}: give a 4-D NIfTI (x, y, z, "
            f"{channels}) or nnU-Net's <case>_0000.nii.gz .. <case>_{channels - 1:04d}.nii.gz files"
        )


def _on_input_grid(array: np.ndarray, source: Source, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (LPS+ ``(x, y, z, ...)``, on ``volume``'s grid) and its NIfTI affine, on the input's own grid: a
    NIfTI input's axis order and affine (undoing load_volume's reorientation), else LPS+ with the RAS+ affine."""
    path = Path(source.path)
    if not _is_nifti(path):
        return array, LPS_TO_RAS @ volume.affine
    import nibabel as nib
    from nibabel import orientations as ornt

    affine = nib.load(str(path)).affine
    back = ornt.ornt_transform(ornt.axcodes2ornt(ORIENTATION), ornt.io_orientation(affine))
    return ornt.apply_orientation(array, back), affine


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)

    def write(f) -> None:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as gz:  # nibabel's own .nii.gz level
            image.to_file_map({"image": nib.FileHolder(fileobj=gz)})

    return atomic_write(path, write)


def predict(
    weights,
    inputs,
    out,
    *,
    overlap=0.5,
    batch_size=4,
    mirror=False,
    probabilities=False,
    device="auto",
    amp="auto",
    overwrite=False,
    progress=True,
) -> list[Path]:
    """Segment every volume of ``inputs`` (NIfTI, MetaImage, NRRD files, DICOM series directories, or folders searched
    for them) with the checkpoint ``weights``; write the label maps (and with ``probabilities`` the class
    probabilities) into ``out`` as the module docstring says. Returns the files written, in order. Raises
    PredictError, CheckpointError or VolumeError (all ValueErrors), before writing anything, for the bad input the
    module docstring lists."""
    out = Path(out)
    predictor = load_predictor(weights, device, amp)
    record = predictor.record
    cases = _cases(inputs, record.in_channels)
    _refuse_existing(out, cases, overwrite)
    for _, source in cases:
        _check_input(source, record.in_channels)
        _check_modality(source, record.modality)
    written = []
    for case, source in cases:
        channels = load_channels(source)
        for warning in filter(None, (value_warning(c, record.modality) for c in channels)):
            warnings.warn(f"{warning} (the model was fine-tuned on {record.modality})", ModalityWarning, 2)
        labels, probs = predict_volume(
            predictor, channels, overlap=overlap, batch_size=batch_size, mirror=mirror, progress=progress
        )
        volume = channels[0]
        label_path, probs_path = _outputs(out, case)
        written.append(_write_nifti(label_path, *_on_input_grid(labels, source, volume)))
        if probabilities:
            written.append(_write_nifti(probs_path, *_on_input_grid(np.moveaxis(probs, 0, -1), source, volume)))
    return written


def _check_modality(source: Source, name: str) -> None:
    """Refuses a DICOM series whose Modality tag names another modality than the model's."""
    tag = dicom_tag_of(source, "0008|0060")
    if from_dicom_tag(tag) not in (None, name):
        raise PredictError(f"{source.path}: its DICOM Modality is {tag}; this model was fine-tuned on {name} images")


def _overlap(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``genesis-ext predict``."""
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="volumes to segment: .nii, .nii.gz, .mhd, .mha, .nrrd files, DICOM series directories, or folders "
        "searched recursively",
    )
    p.add_argument("--weights", required=True, help="a segmentation checkpoint of genesis-ext finetune (e.g. best.pt)")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: <case>.nii.gz label maps (uint8) on each input's own grid",
    )
    p.add_argument(
        "--overlap", type=_overlap, default=0.5, help="overlap of neighbouring windows, in [0, 1) (default 0.5)"
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument(
        "--mirror",
        action="store_true",
        help="also average over the flips of every axis the patch spans (test-time augmentation; 8x the work in 3-D)",
    )
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <case>_probabilities.nii.gz: float32 (x, y, z, classes), one channel per class",
    )
    add_device_options(p)
    add_overwrite(p)
    add_quiet(p)


def run(args) -> int:
    """The ``genesis-ext predict`` verb: exit status 0, or 2 (with the reason on stderr) for bad input."""
    try:
        written = predict(
            args.weights,
            args.inputs,
            args.out,
            overlap=args.overlap,
            batch_size=args.batch_size,
            mirror=args.mirror,
            probabilities=args.probabilities,
            device=args.device,
            amp=args.amp,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    except (ValueError, OSError) as err:
        print(f"genesis-ext predict: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
