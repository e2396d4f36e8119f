"""Fine-tuning Models Genesis on a target task: 3D segmentation or classification (shared/spec/models_genesis.md §4-5).

    genesis-ext finetune --task segmentation   --data DIR_OR_CSV --out RUN [--weights Genesis_Chest_CT.pt]
    genesis-ext finetune --task classification --data labels.csv --out RUN [--weights Genesis_Chest_CT.pt]

Segmentation data: a directory with ``images/`` and ``labels/`` holding volumes (NIfTI, or anything ``load_volume``
reads) matched by file name (``images/case1.nii.gz`` ↔ ``labels/case1.nii.gz``), or a CSV with an ``image,label``
header (paths relative to the CSV). Images are windowed (CT: [-1000, 1000] HU → [0, 1]); a label voxel is foreground
where its value is > 0.5 (``n_class`` 1), or channel ``k`` is ``label == k + 1`` (``n_class`` > 1). The whole U-Net
is trained on random patches (``--patch``, multiples of 8; half of them centred on a foreground voxel) with the soft
Dice loss ``1 - (2 Σ y p + 1) / (Σ y + Σ p + 1)`` on the sigmoid output; validation reports the Dice loss and the
Dice and IoU at threshold 0.5 over a fixed, seeded set of patches from the held-out volumes.

Classification data: a CSV with a ``path,label`` header. ``path`` (relative to the CSV) is a cube: a ``.npy`` array
already in [0, 1] (as ``genesis-ext extract`` and the published cubes are) or a volume file (HU, windowed here);
each is centre-cropped / zero-padded to ``--patch``. Labels are any strings; ``n_class`` is the number of distinct
labels (>= 2). The network is the published head (encoder → global average pool → Linear(512, 1024) → ReLU →
Linear(1024, n_class)) trained with cross-entropy; validation reports the loss, accuracy and ROC AUC (binary: of the
class sorted second; more classes: the macro average of one-vs-rest AUCs), split stratified by label.

``--weights``: published ``Genesis_Chest_CT.pt`` or a checkpoint of ours (``save_checkpoint``); from scratch when
absent. Segmentation loads the whole U-Net (a checkpoint with another ``n_class`` loads all but ``out_tr``, with a
note); classification loads the encoder only. Optimiser: Adam (default, lr 1e-3) or SGD (momentum 0.9).
Writes ``RUN/log.csv`` (one row per epoch), ``RUN/last.pt`` and ``RUN/best.pt`` (``save_checkpoint`` format, best by
validation Dice or AUC) and ``RUN/metrics.json``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import DEFAULT_PATCH, TASKS, TORCH_MISSING

try:  # training needs torch; the module imports without it (genesis-ext finetune then says how to install it)
    import torch
    import torch.nn.functional as F

    from .trainer import NonFiniteLossError, Trainer
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    F = None
    Trainer = object  # nothing trains without torch: run_finetune says how to install it
    NonFiniteLossError = RuntimeError

_IMAGE_DIR, _LABEL_DIR = "images", "labels"
_MAX_FG_CENTRES = 200_000


class FinetuneError(ValueError):
    """Bad input to fine-tuning (data, options or weights), with a message for the user."""


# --------------------------------------------------------------------------------------------------- losses, metrics
def dice_loss(pred, target, smooth: float = 1.0):
    """Soft Dice loss ``1 - (2 Σ y p + smooth) / (Σ y + Σ p + smooth)``, sums over the whole batch (all voxels and
    channels at once, as published). ``pred``: probabilities (the sigmoid output); ``target``: 0/1, same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"dice_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    inter = (pred * target).sum()
    return 1.0 - (2.0 * inter + smooth) / (target.sum() + pred.sum() + smooth)


def dice_iou(tp: float, fp: float, fn: float) -> tuple[float, float]:
    """Dice ``2TP / (2TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)`` from voxel counts; both 1.0 when there is no
    foreground in either the prediction or the truth."""
    denom = tp + fp + fn
    if denom == 0:
        return 1.0, 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / denom


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (True/1 = positive): the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U with average ranks). NaN when
    one class is absent."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def multiclass_auc(probs, labels) -> float:
    """Binary (2 columns): AUC of column 1; more: macro mean of the one-vs-rest AUCs of the classes that have both
    positives and negatives (NaN when none has)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.shape[1] == 2:
        return roc_auc(probs[:, 1], labels == 1)
    aucs = [roc_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


# ------------------------------------------------------------------------------------------------------------ data
def _check_patch(patch, dims: int = 3) -> tuple[int, int, int]:
    """The patch as three sizes: X Y Z (3-D), or X Y 1 (2-D: axial patches of one slice)."""
    if patch is None:
        return DEFAULT_PATCH if dims == 3 else (*DEFAULT_PATCH[:2], 1)
    patch = tuple(int(p) for p in patch)
    if dims == 2 and len(patch) == 3 and patch[2] == 1:
        patch = patch[:2]
    if len(patch) != dims or any(p < 8 or p % 8 for p in patch):
        raise FinetuneError(
            f"--patch must be {dims} sizes with --dims {dims}, each a positive multiple of 8 (the U-Net pools three "
            f"times), got {patch}"
        )
    return patch if dims == 3 else (*patch, 1)


def _strip(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not set(columns) <= set(header):
                raise FinetuneError(
                    f"{path}: a CSV with a header naming the columns {', '.join(columns)} is needed; "
                    f"found header {header}"
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise FinetuneError(f"{path}: cannot read as CSV ({err})") from err
    rows = [r for r in rows if any(r.values())]
    for i, r in enumerate(rows, start=2):
        for c in columns:
            if not r.get(c):
                raise FinetuneError(f"{path}: line {i} has an empty '{c}'")
    return rows


def segmentation_pairs(data) -> list[tuple[Path, Path]]:
    """``(image, label)`` paths: from a directory with ``images/`` and ``labels/`` (matched by name without the
    suffix) or from a CSV with an ``image,label`` header (paths relative to the CSV)."""
    data = Path(data)
    if not data.exists():
        raise FinetuneError(f"--data {data}: no such file or directory")
    if data.is_file():
        rows = _read_csv(data, ("image", "label"))
        pairs = [(data.parent / r["image"], data.parent / r["label"]) for r in rows]
        for image, label in pairs:
            for p in (image, label):
                if not p.exists():
                    raise FinetuneError(f"{data}: {p} does not exist")
    else:
        img_dir, lab_dir = data / _IMAGE_DIR, data / _LABEL_DIR
        if not img_dir.is_dir() or not lab_dir.is_dir():
            raise FinetuneError(
                f"--data {data}: expected sub-directories '{_IMAGE_DIR}/' and '{_LABEL_DIR}/' with "
                f"volumes matched by file name (or a CSV with an image,label header)"
            )
        images = {_strip(p.name): p for p in sorted(img_dir.iterdir()) if not p.name.startswith(".")}
        labels = {_strip(p.name): p for p in sorted(lab_dir.iterdir()) if not p.name.startswith(".")}
        unmatched = sorted(set(images) ^ set(labels))
        if unmatched:
            raise FinetuneError(
                f"--data {data}: {len(unmatched)} image(s)/label(s) without a partner: {unmatched[:10]}"
            )
        pairs = [(images[k], labels[k]) for k in sorted(images)]
    if not pairs:
        raise FinetuneError(f"--data {data}: no image/label pairs found (empty data)")
    return pairs


@dataclass
class SegCase:
    name: str
    image: np.ndarray  # (x, y, z) float32 in [0, 1]
    label: np.ndarray  # (n_class, x, y, z) uint8
    fg: np.ndarray  # (k, 3) int32 coordinates of foreground voxels (any channel; at most _MAX_FG_CENTRES)


def load_seg_case(image_path: Path, label_path: Path, n_class: int, window) -> SegCase:
    from ..data import load_volume

    img, lab = load_volume(image_path), load_volume(label_path)
    if img.shape != lab.shape:
        raise FinetuneError(
            f"{label_path}: label shape {lab.shape} differs from its image {image_path} shape {img.shape}"
        )
    if not np.all(np.isfinite(lab.data)):
        raise FinetuneError(f"{label_path}: label holds non-finite values")
    if not np.allclose(img.affine, lab.affine, atol=1e-2):
        warnings.warn(
            f"{label_path}: its voxel-to-patient affine differs from that of {image_path}; the label is "
            f"used voxel by voxel (same shape), check that it belongs to this image",
            stacklevel=2,
        )
    image = window.resolve(img.data).apply(img.data)
    if n_class == 1:
        label = (lab.data > 0.5)[None]
    else:
        values = np.rint(lab.data).astype(np.int64)
        label = np.stack([values == k + 1 for k in range(n_class)])
    flat = np.flatnonzero(label.any(axis=0))
    if flat.size > _MAX_FG_CENTRES:  # patch centres: an evenly spaced subset keeps memory bounded on large volumes
        flat = flat[np.linspace(0, flat.size - 1, _MAX_FG_CENTRES).astype(np.int64)]
    fg = np.stack(np.unravel_index(flat, label.shape[1:]), axis=1).astype(np.int32)
    return SegCase(_strip(image_path.name), image, label.astype(np.uint8), fg)


def _pad_to(arr: np.ndarray, shape, axis0: int) -> np.ndarray:
    """Zero-pad the last three axes of ``arr`` to at least ``shape``."""
    pads = [(0, 0)] * axis0 + [(0, max(0, s - a)) for a, s in zip(arr.shape[axis0:], shape)]
    return np.pad(arr, pads) if any(p[1] for p in pads) else arr


def sample_patches(case: SegCase, patch, count: int, rng: np.random.Generator, fg_fraction: float = 0.5):
    """``count`` random ``patch``-sized (image (1, *patch), label (n_class, *patch)) pairs from one case; a patch is
    centred on a random foreground voxel with probability ``fg_fraction``. Volumes smaller than the patch are zero-
    padded (image 0 = the window's low end, label background)."""
    image = _pad_to(case.image, patch, 0)
    label = _pad_to(case.label, patch, 1)
    shape = np.array(image.shape)
    p = np.array(patch)
    xs, ys = [], []
    for _ in range(count):
        if len(case.fg) and rng.random() < fg_fraction:
            centre = case.fg[rng.integers(len(case.fg))]
            lo = np.clip(centre - p // 2, 0, shape - p)
        else:
            lo = np.array([rng.integers(0, s - q + 1) for s, q in zip(shape, p)])
        sl = tuple(slice(a, a + q) for a, q in zip(lo, p))
        xs.append(image[sl][None])
        ys.append(label[(slice(None),) + sl])
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32)


def _fit_cube(arr: np.ndarray, patch) -> np.ndarray:
    """Centre-crop / zero-pad a 3D array to ``patch``."""
    out = np.zeros(patch, dtype=np.float32)
    src, dst = [], []
    for a, q in zip(arr.shape, patch):
        if a >= q:
            s = (a - q) // 2
            src.append(slice(s, s + q))
            dst.append(slice(0, q))
        else:
            d = (q - a) // 2
            src.append(slice(0, a))
            dst.append(slice(d, d + a))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def load_classification(data, patch, window) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cubes ``(n, 1, *patch)`` in [0, 1], integer labels and the sorted class names, from a ``path,label`` CSV."""
    from ..data import VolumeError, load_volume

    data = Path(data)
    if not data.exists():
        raise FinetuneError(f"--data {data}: no such file or directory")
    if data.is_dir():
        raise FinetuneError(f"--data {data}: classification needs a CSV file with a path,label header, not a directory")
    rows = _read_csv(data, ("path", "label"))
    if not rows:
        raise FinetuneError(f"--data {data}: no rows (empty data)")
    classes = sorted({r["label"] for r in rows}, key=lambda c: (not _is_number(c), float(c) if _is_number(c) else 0, c))
    if len(classes) < 2:
        raise FinetuneError(f"--data {data}: classification needs at least 2 distinct labels, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    cubes, labels = [], []
    for r in rows:
        path = data.parent / r["path"]
        if not path.exists():
            raise FinetuneError(f"{data}: {path} does not exist")
        if path.name.lower().endswith(".npy"):
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as err:
                raise FinetuneError(f"{path}: cannot read as .npy ({type(err).__name__}: {err})") from err
            arr = np.squeeze(np.asarray(arr, dtype=np.float32))
            if arr.ndim != 3:
                raise FinetuneError(f"{path}: a cube must be 3D, got shape {arr.shape}")
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                raise FinetuneError(
                    f"{path}: .npy cubes must already be windowed to [0, 1] (as genesis-ext extract "
                    f"writes them); found values in [{arr.min()}, {arr.max()}]. Store HU as NIfTI "
                    f"instead, which is windowed here"
                )
        else:
            try:
                vol = load_volume(path)
            except VolumeError as err:
                raise FinetuneError(str(err)) from err
            arr = window.resolve(vol.data).apply(vol.data)
        cubes.append(_fit_cube(arr, patch)[None])
        labels.append(index[r["label"]])
    return np.stack(cubes), np.array(labels, dtype=np.int64), classes


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def split_indices(n: int, val_fraction: float, rng: np.random.Generator, strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)``; stratified by ``strata`` when given (each stratum of >= 2 items
    gives round(fraction x size), at least 1, to validation). ``val_fraction`` 0: no validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise FinetuneError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    val = []
    for g in groups:
        g = rng.permutation(g)
        if len(g) >= 2:
            val.extend(g[: max(1, int(round(val_fraction * len(g))))].tolist())
    val = np.array(sorted(val), dtype=np.int64)
    train = np.setdiff1d(np.arange(n), val)
    if len(val) == 0 or len(train) == 0:
        raise FinetuneError(
            f"cannot split {n} item(s) into training and validation with --val-fraction "
            f"{val_fraction}: need at least 2 (or pass --val-fraction 0 for no validation)"
        )
    return train, val


# --------------------------------------------------------------------------------------------------------- weights
def load_weights(model, path, task: str, log=print):
    """Load ``path`` into ``model`` (``load_pretrained``'s errors for missing, corrupt or mismatching files).
    Segmentation: the whole U-Net; a U-Net checkpoint with another ``n_class`` loads all but ``out_tr``.
    Classification: the encoder only."""
    from ..models import CheckpointError, UNet3D, load_pretrained

    if task == "classification":
        load_pretrained(model, path, encoder_only=True)
        log(f"loaded the encoder of {path}; the classification head is freshly initialised")
        return model
    try:
        load_pretrained(model, path)
        log(f"loaded {path} (whole U-Net)")
        return model
    except CheckpointError as err:
        first = err
    try:  # another n_class? the checkpoint's own U-Net, then everything but the output layer
        ref = load_pretrained(None, path)
    except CheckpointError:
        raise first from None
    if not isinstance(ref, UNet3D) or ref.in_channels != model.in_channels or ref.n_class == model.n_class:
        raise first
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("out_tr.")}
    model.load_state_dict(state, strict=False)
    log(
        f"loaded {path} except its output layer: the checkpoint has n_class={ref.n_class}, this task "
        f"n_class={model.n_class}; out_tr is freshly initialised"
    )
    return model


# -------------------------------------------------------------------------------------------------------- training
@dataclass
class FinetuneConfig:
    task: str
    data: str
    out: str
    weights: str | None = None
    patch: tuple | None = None  # default: 64 64 32 (2-D: 64 64)
    dims: int = 3  # 2: Models Genesis 2D (UNet2D / GenesisClassifier2D on axial patches)
    width: float | None = None  # the network's channel multiplier; default: the weights' (load_pretrained), else 1
    n_class: int = 1  # segmentation only; classification counts its labels
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    patches_per_volume: int = 16  # training patches per training volume per epoch
    val_patches_per_volume: int = 16
    fg_fraction: float = 0.5
    val_fraction: float = 0.2
    val_data: str | None = None  # segmentation: separate validation volumes (a directory or CSV like data)
    threshold: float = 0.5
    window: tuple = (-1000.0, 1000.0)
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # the Trainer's loop settings (genesis_ext.train.trainer): off by default
    lr_step_epochs: int | None = None  # lr *= lr_gamma every this many epochs
    lr_gamma: float = 0.5
    patience: int | None = None  # early stop after this many epochs without a better validation score
    max_minutes: float | None = None
    resume: bool | str = False
    resume_anyway: bool = False  # resume although the data, patch or validation settings differ (resume_keys)
    accumulate: int = 1
    amp: str = "off"
    compile: bool = False
    channels_last: bool | None = False
    log_every: int = 10
    tensorboard: bool = False


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    """Index batches (shuffled when ``rng`` is given); a trailing batch of one joins the batch before it (the published
    BatchNorm uses batch statistics, which one small sample may not have)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for k, i in enumerate(starts):
        yield order[i : starts[k + 1] if k + 1 < len(starts) else n]


def _check_config(cfg: FinetuneConfig) -> None:
    if cfg.task not in TASKS:
        raise FinetuneError(f"--task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.val_data is not None and cfg.task != "segmentation":
        raise FinetuneError("--val-data: separate validation data is for segmentation; classification splits its CSV")
    for name in ("epochs", "batch_size", "patches_per_volume", "val_patches_per_volume", "n_class", "accumulate"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.fg_fraction <= 1.0:
        raise FinetuneError(f"--fg-fraction must be in [0, 1], got {cfg.fg_fraction}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise FinetuneError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise FinetuneError(f"--optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"genesis_ext: no checkpoint file at {cfg.weights}")
    if cfg.resume_anyway and not cfg.resume:
        raise FinetuneError("resume_anyway goes with resume: pass both, or neither")


def run_finetune(cfg: FinetuneConfig, log=print, trainer: type | None = None) -> dict:
    """Fine-tune as ``cfg`` says; returns the final summary (also written to ``<out>/metrics.json``). ``trainer``: a
    subclass of the task's trainer (:class:`SegmentationTrainer`, :class:`ClassificationTrainer`) that changes a
    stage."""
    if torch is None:
        raise FinetuneError(f"fine-tuning {TORCH_MISSING}")
    _check_config(cfg)
    default = SegmentationTrainer if cfg.task == "segmentation" else ClassificationTrainer
    trainer = (trainer or default)(cfg, log=log)
    history = trainer.fit()
    summary = {
        "task": cfg.task,
        "epochs": trainer.epoch,
        "best_epoch": trainer.best_epoch,
        "final": {k: v for k, v in history[-1].items() if k in trainer.fields} if history else {},
        "weights": cfg.weights,
        "device": str(trainer.device),
        "patch": list(trainer.patch[: cfg.dims]),
        "log": str(trainer.out / trainer.csv_name),
        "checkpoint": str(trainer.last_path),
        "best_checkpoint": str(trainer.best_path),
        **trainer.summary_extra(),
    }
    with open(trainer.out / "metrics.json", "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    return summary


class FinetuneTrainer(Trainer):
    """Fine-tuning on the Trainer loop: the data of ``FinetuneConfig``, the published weights or ours
    (``load_weights``), checkpoints ``last.pt`` / ``best.pt`` and ``log.csv`` in the run folder. The task subclasses
    say what a batch, the loss and the validation metrics are."""

    csv_name = "log.csv"
    checkpoint_dir = "."
    metric = "val_loss"  # the validation metric best.pt and early stopping follow (higher is better)
    resume_keys = (
        "data",
        "val_data",
        "seed",
        "patch",
        "window",
        "batch_size",
        "patches_per_volume",
        "val_patches_per_volume",
        "fg_fraction",
        "val_fraction",
        "threshold",
    )
    # the loop's and the network's (without torch, Trainer is a bare object and nothing trains)
    state_keys = (*Trainer.state_keys, "task", "dims", "width", "n_class") if torch is not None else ()

    def __init__(self, cfg: FinetuneConfig, dd=None, log=print):
        try:
            super().__init__(cfg, dd)
        except ValueError as err:  # the device
            raise FinetuneError(str(err)) from None
        self.log = log
        if cfg.dims not in (2, 3):
            raise FinetuneError(f"--dims must be 2 or 3, got {cfg.dims!r}")
        self.patch = _check_patch(cfg.patch, cfg.dims)  # X Y Z, or X Y 1 for 2-D
        try:
            from ..data import Window

            self.window = Window(*cfg.window)
        except ValueError as err:
            raise FinetuneError(f"--window: {err}") from None

    @functools.cached_property
    def width(self) -> float:
        """The network's width: cfg.width, else that of the --weights checkpoint, else 1 (the published network)."""
        if self.cfg.width is not None:
            return float(self.cfg.width)
        if self.cfg.weights:
            from ..models import CheckpointError, load_pretrained

            try:
                return float(getattr(load_pretrained(None, self.cfg.weights), "width", 1.0))
            except CheckpointError:
                return 1.0  # load_weights reports what is wrong with the file
        return 1.0

    def build_model(self):
        model = self.new_model()
        if self.cfg.weights:
            load_weights(model, self.cfg.weights, self.cfg.task, self.log)
        else:
            self.log("no --weights: training from scratch")
        return model

    def new_model(self):
        raise NotImplementedError

    def _set_steps(self, n_train: int, unit: str) -> None:
        if self.cfg.batch_size > n_train:
            raise FinetuneError(f"--batch-size {self.cfg.batch_size} is larger than the {n_train} training {unit}")
        self.steps = len(list(_batches(n_train, self.cfg.batch_size, None)))

    def train_batches(self, epoch: int):
        x, y = self.epoch_data(np.random.default_rng([self.cfg.seed, 2, epoch]))
        rng = np.random.default_rng([self.cfg.seed, 3, epoch])
        for b in _batches(len(x), self.cfg.batch_size, rng):
            yield [(x[part], y[part]) for part in np.array_split(b, min(self.cfg.accumulate, len(b)))]

    def epoch_data(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's training inputs and targets."""
        raise NotImplementedError

    def make_batch(self, batch, epoch: int, step: int):
        x, y = batch
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def net_arrays(self, x: np.ndarray, y: np.ndarray):
        """Inputs (and voxel targets) as the network takes them: 2-D drops the patches' single-slice axis."""
        if self.cfg.dims == 3 or x is None:
            return x, y
        return x[..., 0], y[..., 0] if y.ndim == x.ndim else y

    def validate(self, epoch: int) -> dict:
        return evaluate(
            self.model, self.cfg.task, self.val_x, self.val_y, self.cfg.batch_size, self.device, self.cfg.threshold
        )

    def score(self, row: dict) -> float:
        """Lower is better: minus the validation metric, or the training loss without validation data."""
        value = row.get(self.metric)
        return -value if value is not None and math.isfinite(value) else row["train_loss"]

    def checkpoint_extra(self, epoch: int) -> dict:
        row = self.history[-1]
        return {
            "task": self.cfg.task,
            **{k: float(v) for k, v in row.items() if isinstance(v, float) and math.isfinite(v)},
        }

    def summary_extra(self) -> dict:
        return {}

    def summary(self) -> dict:
        """The settings, with the network's width as built (``cfg.width`` None: the weights') and the task's
        extras (classification: the class names)."""
        return {**super().summary(), "width": self.width, **self.summary_extra()}

    def check_resume(self, state: dict) -> None:
        config = state.get("config", {})
        if "width" in config and config["width"] is None:  # recorded before the width as built was: shapes decide
            state = {**state, "config": {k: v for k, v in config.items() if k != "width"}}
        super().check_resume(state)

    def epoch_line(self, row: dict, improved: bool) -> str:
        shown = [k for k in self.fields if k not in ("step", "lr", "best_val", "bad_epochs")]
        return " ".join(f"{k}={_fmt(row.get(k))}" for k in shown)


class SegmentationTrainer(FinetuneTrainer):
    """The whole U-Net on random patches (half centred on foreground), soft Dice loss; Dice and IoU."""

    columns = ("val_dice", "val_iou")
    metric = "val_dice"

    def setup(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        cases = [load_seg_case(i, lab, cfg.n_class, self.window) for i, lab in segmentation_pairs(cfg.data)]
        if cfg.val_data is None:
            train_idx, val_idx = split_indices(len(cases), cfg.val_fraction, rng)
            val_cases = [cases[i] for i in val_idx]
        else:  # a separate validation set: every case of data trains
            train_idx = np.arange(len(cases))
            val_cases = [load_seg_case(i, lab, cfg.n_class, self.window) for i, lab in segmentation_pairs(cfg.val_data)]
        self.train_cases = [cases[i] for i in train_idx]
        val_rng = np.random.default_rng([cfg.seed, 1])
        val = [sample_patches(c, self.patch, cfg.val_patches_per_volume, val_rng, cfg.fg_fraction) for c in val_cases]
        self.val_x, self.val_y = self.net_arrays(
            np.concatenate([x for x, _ in val]) if val else None, np.concatenate([y for _, y in val]) if val else None
        )
        n_train = len(self.train_cases) * cfg.patches_per_volume
        self.log(
            f"segmentation: {len(self.train_cases)} training volume(s) ({n_train} patches of {self.patch} per epoch), "
            f"{len(val_cases)} validation volume(s) ({0 if self.val_x is None else len(self.val_x)} fixed patches)"
        )
        self._set_steps(n_train, "patches per epoch; lower it or raise --patches-per-volume")

    def new_model(self):
        from ..models import UNet2D, UNet3D

        return (UNet2D if self.cfg.dims == 2 else UNet3D)(1, self.cfg.n_class, width=self.width)

    def epoch_data(self, rng):
        cfg = self.cfg
        xs, ys = zip(
            *(sample_patches(c, self.patch, cfg.patches_per_volume, rng, cfg.fg_fraction) for c in self.train_cases)
        )
        return self.net_arrays(np.concatenate(xs), np.concatenate(ys))

    def loss(self, output, target):
        return dice_loss(output, target)


class ClassificationTrainer(FinetuneTrainer):
    """The published head on the pre-trained encoder, cross-entropy; accuracy and ROC AUC."""

    columns = ("val_accuracy", "val_auc")
    metric = "val_auc"
    state_keys = (*FinetuneTrainer.state_keys, "classes")  # the same names in the same order: the head's outputs

    def setup(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        self.cubes, self.labels, self.classes = load_classification(cfg.data, self.patch, self.window)
        self.train_idx, val_idx = split_indices(len(self.cubes), cfg.val_fraction, rng, strata=self.labels)
        self.cubes = self.net_arrays(self.cubes, self.labels)[0]
        self.val_x, self.val_y = (self.cubes[val_idx], self.labels[val_idx]) if len(val_idx) else (None, None)
        self.log(
            f"classification: {len(self.classes)} classes {self.classes}; {len(self.train_idx)} training cube(s), "
            f"{len(val_idx)} validation cube(s) of {self.patch}"
        )
        self._set_steps(len(self.train_idx), "samples")

    def new_model(self):
        from ..models import GenesisClassifier, GenesisClassifier2D

        return (GenesisClassifier2D if self.cfg.dims == 2 else GenesisClassifier)(len(self.classes), width=self.width)

    def epoch_data(self, rng):
        return self.cubes[self.train_idx], self.labels[self.train_idx]

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    def checkpoint_extra(self, epoch: int) -> dict:
        return {**super().checkpoint_extra(epoch), "classes": list(self.classes)}

    def summary_extra(self) -> dict:
        return {"classes": list(self.classes)}


def _json_default(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


@torch.no_grad() if torch is not None else (lambda f: f)
def evaluate(model, task: str, x, y, batch_size: int, device, threshold: float = 0.5) -> dict:
    """Validation metrics: segmentation ``val_loss`` (soft Dice over all patches), ``val_dice``, ``val_iou``
    (threshold ``threshold``, voxel counts pooled over all patches); classification ``val_loss`` (cross-entropy),
    ``val_accuracy``, ``val_auc``. Empty dict without validation data."""
    if x is None or len(x) == 0:
        return {}
    model.eval()  # the published BatchNorm still uses batch statistics here
    tp = fp = fn = 0.0
    inter = psum = ysum = 0.0
    probs, ce = [], 0.0
    for b in _batches(len(x), batch_size, None):
        xb = torch.from_numpy(x[b]).to(device)
        yb = torch.from_numpy(y[b]).to(device)
        pred = model(xb)
        if task == "segmentation":
            inter += float((pred * yb).sum())
            psum += float(pred.sum())
            ysum += float(yb.sum())
            hard = pred >= threshold
            truth = yb > 0.5
            tp += float((hard & truth).sum())
            fp += float((hard & ~truth).sum())
            fn += float((~hard & truth).sum())
        else:
            ce += float(F.cross_entropy(pred, yb, reduction="sum"))
            probs.append(torch.softmax(pred.float(), dim=1).cpu().numpy())
    model.train()
    if task == "segmentation":
        dice, iou = dice_iou(tp, fp, fn)
        return {"val_loss": 1.0 - (2.0 * inter + 1.0) / (ysum + psum + 1.0), "val_dice": dice, "val_iou": iou}
    p = np.concatenate(probs)
    return {"val_loss": ce / len(x), "val_accuracy": float(np.mean(p.argmax(1) == y)), "val_auc": multiclass_auc(p, y)}


# ------------------------------------------------------------------------------------------------------ command line
def run(args) -> int:
    """The ``genesis-ext finetune`` verb."""
    cfg = FinetuneConfig(
        task=args.task,
        data=args.data,
        out=args.out,
        weights=args.weights,
        patch=None if args.patch is None else tuple(args.patch),
        dims=args.dims,
        n_class=args.n_class,
        width=args.width,
        val_data=args.val_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        patches_per_volume=args.patches_per_volume,
        val_patches_per_volume=args.val_patches_per_volume,
        fg_fraction=args.fg_fraction,
        val_fraction=args.val_fraction,
        window=tuple(args.window),
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
    )
    try:
        summary = run_finetune(cfg)
    except (
        FinetuneError,
        FileNotFoundError,
        ValueError,
        NonFiniteLossError,
    ) as err:  # CheckpointError, VolumeError: ValueErrors
        print(f"genesis-ext finetune: {err}", file=sys.stderr)
        return 2
    final = summary["final"]
    metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in final.items() if k.startswith("val_"))
    print(f"finished {summary['epochs']} epoch(s): {metrics or 'no validation data'}")
    print(f"log: {summary['log']}")
    print(f"checkpoints: {summary['checkpoint']}, {summary['best_checkpoint']} (epoch {summary['best_epoch']})")
    return 0
