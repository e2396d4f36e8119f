"""Fine-tuning Models Genesis on a target task: 3D (or 2D) segmentation or classification.

    genesis-ext finetune --task segmentation --data DIR|CSV|dataset.json --out RUN [--weights W] [--labels A,B]
    genesis-ext finetune --task classification --data labels.csv --out RUN [--weights W]

Segmentation (:class:`SegmentationTrainer`): the data and classes of :mod:`genesis_ext.data.labelled`; images windowed
to [0, 1] (``--window``, CT: [-1000, 1000] HU) and brought to one spacing (the training images' median, or
``--spacing``). The whole U-Net trains on random patches (``--patch``, multiples of 8; ``--fg-fraction`` of them
centred on a foreground voxel) with the loss of ``--loss``: ``dice`` (published: sigmoid, soft Dice; the default for
one class) or ``dice_ce`` (softmax, Dice + cross-entropy as nnU-Net; the default for several). Validation runs the
whole held-out volumes through the sliding window that ``genesis-ext predict`` uses (Gaussian-weighted, overlap
``--overlap``) and reports the Dice of each class and their mean (``val_dice``, which picks ``best.pt``); ``val_loss``
is the soft Dice loss of the whole volumes' probabilities. BatchNorm evaluates with running statistics (``--batchnorm
running``, default) or, as published, with each batch's own (``batch_stats``). ``--label-budget`` keeps a seeded share
of the training cases or axial slabs labelled (the rest is not used). Every checkpoint carries a ``model_record``
(:class:`genesis_ext.models.ModelRecord`): what ``predict`` needs to rebuild the network and its input.

Classification (:class:`ClassificationTrainer`): a ``path,label`` CSV of cubes (``.npy`` in [0, 1], or volumes in HU),
each centre-cropped / zero-padded to ``--patch``; the published head (encoder, global average pool, Linear(512, 1024),
ReLU, Linear(1024, n_class)) with cross-entropy; validation reports the loss, accuracy and ROC AUC (picks ``best.pt``),
split stratified by label.

``--weights``: the published ``Genesis_Chest_CT.pt`` or a checkpoint of ours, read once; from scratch when absent.
Segmentation loads the whole U-Net (with another number of outputs: all but the output layer, said in the log);
classification loads the encoder. Writes ``RUN/log.csv``, ``RUN/last.pt``, ``RUN/best.pt`` and ``RUN/metrics.json``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cubes import published_cube, slice_cube
from ..data.intensity import Window
from ..data.labelled import (
    LabelledDataError,
    apply_budget,
    check_labels,
    load_classification,
    load_seg_case,
    parse_labels,
    sample_patches,
    segmentation_pairs,
    split_indices,
    training_spacing,
)
from ..data.modality import DEFAULT_MODALITY, modality
from ..evaluation.metrics import dice, multiclass_auc
from ..inference.sliding_window import sliding_window
from ..models.backbones import (
    DEFAULT_ARCH,
    BackboneError,
    backbone,
    check_backbone,
    multiples,
    recorded_arch,
    resolve_arch,
)
from ..models.record import ModelRecord
from ..models.weights import load_state, read_weights
from .losses import LOSSES
from .trainer import NonFiniteLossError, Trainer

__all__ = ["FinetuneConfig", "FinetuneError", "NonFiniteLossError", "finetune"]


class FinetuneError(ValueError):
    """Bad options or weights for fine-tuning, with a message for the user (bad data: ``LabelledDataError``)."""


@dataclass
class FinetuneConfig:
    task: str
    data: str
    out: str
    weights: str | None = None
    patch: tuple | None = None  # default: 64 64 32 (2-D: 64 64)
    dims: int = 3  # 2: Models Genesis 2D (UNet2D / GenesisClassifier2D on axial patches)
    arch: str | dict | None = None  # the network (genesis_ext.models.backbones); None: the weights', else unet3d
    width: float | None = None  # the U-Net's channel multiplier; default: the weights', else 1
    labels: str | dict | None = None  # segmentation classes (genesis_ext.data.labelled); None: from the data
    loss: str | None = None  # "dice" (published) or "dice_ce"; None: dice for one class, dice_ce for more
    batchnorm: str = "running"  # "running" (torch's BatchNorm) or "batch_stats" (published)
    spacing: tuple | None = None  # mm the network sees; None: the training images' median spacing
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    patches_per_volume: int = 16  # training patches per training case (or labelled slab) per epoch
    fg_fraction: float = 0.5
    val_fraction: float = 0.2
    val_data: str | None = None  # segmentation: separate validation volumes (a directory, CSV or dataset.json)
    overlap: float = 0.5  # of the validation sliding window
    label_budget: int | float | None = None  # a count (int) or a share (float <= 1) of training cases or slabs
    budget_unit: str = "cases"  # "cases" or "slabs" (axial slabs; unlabelled slices are left out of the loss)
    slab_depth: int | None = None  # slices per slab (default: the patch's depth)
    window: tuple | None = None  # a fixed window [lo, hi] in the images' units; None: the modality's
    modality: str | None = None  # "ct" or "mr" (data.modality); None: the --weights' modality, else ct
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # the Trainer's loop settings (genesis_ext.train.trainer): off by default
    lr_schedule: str | None = (
        None  # "poly" (nnU-Net's), "step" or "constant"; None: step with lr_step_epochs, else poly
    )
    lr_step_epochs: int | None = None
    lr_gamma: float = 0.5
    patience: int | None = None
    max_minutes: float | None = None
    resume: bool | str = False
    resume_anyway: bool = False
    accumulate: int = 1
    amp: str = "off"
    compile: bool = False
    channels_last: bool | None = False
    log_every: int = 10
    tensorboard: bool = False


def finetune(cfg: FinetuneConfig, trainer: type | None = None, log=print) -> dict:
    """Fine-tune as ``cfg`` says; returns the final summary (also written to ``<out>/metrics.json``). ``trainer``: a
    subclass of the task's trainer (:class:`SegmentationTrainer`, :class:`ClassificationTrainer`) that changes a
    stage."""
    _check_config(cfg)
    task_trainer = TRAINERS[cfg.task]
    if trainer is not None and not (isinstance(trainer, type) and issubclass(trainer, task_trainer)):
        raise FinetuneError(f"--trainer {trainer!r} is not a subclass of {task_trainer.__name__} (the {cfg.task} one)")
    run = (trainer or task_trainer)(cfg, log=log)
    history = run.fit()
    summary = {
        "task": cfg.task,
        "epochs": run.epoch,
        "best_epoch": run.best_epoch,
        "final": {k: v for k, v in history[-1].items() if k in run.fields} if history else {},
        "weights": cfg.weights,
        "device": str(run.device),
        "patch": list(run.patch[: cfg.dims]),
        "log": str(run.out / run.csv_name),
        "checkpoint": str(run.last_path),
        "best_checkpoint": str(run.best_path),
        **run.summary_extra(),
    }
    with open(run.out / "metrics.json", "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    return summary


def _check_config(cfg: FinetuneConfig) -> None:
    if cfg.task not in TRAINERS:
        raise FinetuneError(f"--task must be one of {tuple(TRAINERS)}, got {cfg.task!r}")
    if cfg.task != "segmentation":
        for name in ("val_data", "labels", "loss", "label_budget"):
            if getattr(cfg, name) is not None:
                raise FinetuneError(f"--{name.replace('_', '-')} is for segmentation; classification reads its CSV")
    for name in ("epochs", "batch_size", "patches_per_volume", "accumulate"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.fg_fraction <= 1.0:
        raise FinetuneError(f"--fg-fraction must be in [0, 1], got {cfg.fg_fraction}")
    if not 0.0 <= cfg.overlap < 1.0:
        raise FinetuneError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise FinetuneError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise FinetuneError(f"--optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.loss is not None and cfg.loss not in LOSSES:
        raise FinetuneError(f"--loss must be one of {tuple(LOSSES)}, got {cfg.loss!r}")
    if cfg.batchnorm not in BATCHNORM:
        raise FinetuneError(f"--batchnorm must be one of {tuple(BATCHNORM)}, got {cfg.batchnorm!r}")
    if cfg.slab_depth is not None and cfg.slab_depth < 1:
        raise FinetuneError(f"--slab-depth must be >= 1, got {cfg.slab_depth}")
    if cfg.spacing is not None and (len(cfg.spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in cfg.spacing)):
        raise FinetuneError(f"--spacing must be three positive numbers (mm), got {cfg.spacing}")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"genesis_ext: no checkpoint file at {cfg.weights}")
    if cfg.resume_anyway and not cfg.resume:
        raise FinetuneError("resume_anyway goes with resume: pass both, or neither")
    if cfg.lr_schedule not in (None, *LR_SCHEDULES):
        raise FinetuneError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.lr_schedule == "step" and not cfg.lr_step_epochs:
        raise FinetuneError("--lr-schedule step needs --lr-step-epochs")


BATCHNORM = {"running": "standard", "batch_stats": "batch_stats"}  # --batchnorm -> the models' batchnorm mode
LR_SCHEDULES = ("poly", "step", "constant")


def _check_patch(patch, dims: int, arch: dict) -> tuple[int, int, int]:
    """The patch as three sizes: X Y Z (3-D), or X Y 1 (2-D: axial patches of one slice), each a multiple of the
    network's downsampling (the U-Net's: 8)."""
    if patch is None:
        return published_cube(dims)
    patch = tuple(int(p) for p in patch)
    if dims == 2 and len(patch) == 3 and patch[2] == 1:
        patch = patch[:2]
    divisors, multiple = multiples(arch, dims)
    if len(patch) != dims or any(p < d or p % d for p, d in zip(patch, divisors)):
        raise FinetuneError(
            f"--patch must be {dims} sizes with --dims {dims}, each a positive multiple of {multiple} (the "
            f"downsampling of architecture {arch['name']!r}), got {patch}"
        )
    return patch if dims == 3 else slice_cube(patch)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    """Index batches (shuffled when ``rng`` is given); a trailing batch of one joins the batch before it (BatchNorm
    needs more than one sample's statistics)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for k, i in enumerate(starts):
        yield order[i : starts[k + 1] if k + 1 < len(starts) else n]


def _channels(cases) -> int:
    """The image channels all ``cases`` share; FinetuneError naming the first case that differs."""
    first = cases[0]
    for case in cases:
        if len(case.image) != len(first.image):
            raise FinetuneError(
                f"case {case.name} has {len(case.image)} image channel(s), case {first.name} {len(first.image)}: "
                "every case needs the same channels"
            )
    return len(first.image)


class FinetuneTrainer(Trainer):
    """Fine-tuning on the Trainer loop: the data of ``FinetuneConfig``, the starting weights (read once), checkpoints
    ``last.pt`` / ``best.pt`` and ``log.csv`` in the run folder. The task subclasses say what a batch, the loss and
    the validation are."""

    csv_name = "log.csv"
    checkpoint_dir = "."
    metric = "val_loss"  # the validation metric best.pt and early stopping follow (higher is better)
    resume_keys = ("data", "val_data", "seed", "patch", "window", "modality", "batch_size", "patches_per_volume",
                   "fg_fraction", "val_fraction", "overlap", "label_budget", "budget_unit", "slab_depth",
                   "spacing")  # fmt: skip
    state_keys = (*Trainer.state_keys, "lr_schedule", "task", "arch", "dims", "width", "labels", "loss", "batchnorm")

    def __init__(self, cfg: FinetuneConfig, dd=None, log=print):
        try:
            super().__init__(cfg, dd)
        except ValueError as err:  # the device
            raise FinetuneError(str(err)) from None
        self.log = log
        if cfg.dims not in (2, 3):
            raise FinetuneError(f"--dims must be 2 or 3, got {cfg.dims!r}")
        if cfg.width is not None and self.arch["name"] != "unet3d":
            raise FinetuneError(f"--width scales the unet3d's channels only, not architecture {self.arch['name']!r}")
        self.patch = _check_patch(cfg.patch, cfg.dims, self.arch)  # X Y Z, or X Y 1 for 2-D
        self.modality = cfg.modality or self.weights_modality or DEFAULT_MODALITY
        try:
            self.window = modality(self.modality).intensity if cfg.window is None else Window(*cfg.window)
        except (TypeError, ValueError) as err:
            raise FinetuneError(f"--{'window' if cfg.window is not None else 'modality'}: {err}") from None

    @functools.cached_property
    def weights_modality(self) -> str | None:
        """The modality the --weights were trained on, where their checkpoint records it (published weights: no)."""
        if self.initial is None or not isinstance(self.initial[1], dict):
            return None
        record = self.initial[1].get("model_record")
        return record.get("modality") if isinstance(record, dict) else self.initial[1].get("modality")

    @functools.cached_property
    def initial(self) -> tuple[dict, dict] | None:
        """The --weights file's (state_dict, checkpoint), read and verified once."""
        return read_weights(self.cfg.weights) if self.cfg.weights else None

    @functools.cached_property
    def arch(self) -> dict:
        """The network: ``cfg.arch``, else the --weights' (a pre-training checkpoint's ``arch``, a fine-tuned one's
        record), else the published U-Net. A ``cfg.arch`` other than the weights' is refused."""
        try:
            given = None if self.cfg.arch is None else resolve_arch(self.cfg.arch)
        except BackboneError as err:
            raise FinetuneError(f"--arch: {err}") from None
        recorded = self.weights_arch
        if given is not None and recorded is not None and given != recorded:
            raise FinetuneError(
                f"--arch {given['name']} ({given['kwargs']}) is not the network of --weights {self.cfg.weights}: "
                f"{recorded['name']} ({recorded['kwargs']}); leave --arch out to fine-tune the weights' network"
            )
        return given or recorded or resolve_arch(DEFAULT_ARCH)

    @functools.cached_property
    def weights_arch(self) -> dict | None:
        """The architecture the --weights record (none: the published U-Net's, or no weights)."""
        try:
            return recorded_arch(self.initial[1]) if self.initial is not None else None
        except BackboneError as err:
            raise FinetuneError(f"--weights {self.cfg.weights}: its recorded architecture: {err}") from None

    @functools.cached_property
    def width(self) -> float:
        """The network's width: cfg.width, else that of the --weights (its first convolution), else 1."""
        if self.cfg.width is not None:
            return float(self.cfg.width)
        first = self.initial and self.initial[0].get("down_tr64.ops.0.conv1.weight")
        return int(first.shape[0]) / 32 if first is not None else 1.0

    def build_model(self):
        model = self.new_model()
        if self.initial is None:
            self.log("no --weights: training from scratch")
            return model
        state, checkpoint = self.initial
        record = checkpoint.get("model_record") if isinstance(checkpoint, dict) else None
        if isinstance(record, dict) and record.get("task") == "classification" != self.cfg.task:  # no decoder
            raise FinetuneError(
                f"--weights {self.cfg.weights} is a {record.get('task')} checkpoint; this run fine-tunes "
                f"{self.cfg.task} (pass pre-trained weights or a checkpoint of this task)"
            )
        self.load_weights(model, state)
        return model

    def load_weights(self, model, state: dict) -> None:
        raise NotImplementedError

    def build_scheduler(self, optimizer):
        """``cfg.lr_schedule``: "poly", nnU-Net's lr x (1 - epoch / epochs)^0.9, so the last weights settle (the
        default); "step" (``lr_step_epochs``, ``lr_gamma``); "constant"."""
        if self.schedule == "poly":
            epochs = self.cfg.epochs
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - min(e, epochs - 1) / epochs) ** 0.9)
        return super().build_scheduler(optimizer) if self.schedule == "step" else None

    @property
    def schedule(self) -> str:
        return self.cfg.lr_schedule or ("step" if self.cfg.lr_step_epochs else "poly")

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

    def net_input(self, x):
        """A patch batch as the network takes it: 2-D networks drop the single-slice axis."""
        return x if self.cfg.dims == 3 else x[..., 0]

    def score(self, row: dict) -> float:
        """Lower is better: minus the validation metric, or the training loss without validation data."""
        value = row.get(self.metric)
        return -value if value is not None and math.isfinite(value) else row["train_loss"]

    def checkpoint_extra(self, epoch: int) -> dict:
        row = self.history[-1]
        return {
            "task": self.cfg.task,
            "model_record": self.record().to_dict(),
            **{k: float(v) for k, v in row.items() if isinstance(v, float) and math.isfinite(v)},
        }

    def record(self) -> ModelRecord:
        raise NotImplementedError

    def summary_extra(self) -> dict:
        return {}

    def summary(self) -> dict:
        """The settings, with the width as built (``cfg.width`` None: the weights') and the task's extras."""
        return {**super().summary(), "arch": self.arch, "width": self.width, **self.summary_extra()}

    def check_resume(self, state: dict) -> None:
        config = state.get("config", {})
        if "width" in config and config["width"] is None:  # recorded before the width as built was: shapes decide
            state = {**state, "config": {k: v for k, v in config.items() if k != "width"}}
        super().check_resume(state)

    def epoch_line(self, row: dict, improved: bool) -> str:
        shown = [k for k in self.fields if k not in ("step", "lr", "best_val", "bad_epochs")]
        return " ".join(f"{k}={_fmt(row.get(k))}" for k in shown)


class SegmentationTrainer(FinetuneTrainer):
    """The whole U-Net on random patches, the loss of ``cfg.loss``; whole-volume validation, Dice per class."""

    metric = "val_dice"

    def setup(self) -> None:
        cfg = self.cfg
        try:
            labels = parse_labels(cfg.labels) if isinstance(cfg.labels, str) else cfg.labels
            pairs, self.classes = segmentation_pairs(cfg.data, None if labels is None else check_labels(labels))
            if cfg.val_data is None:
                train_idx, val_idx = split_indices(len(pairs), cfg.val_fraction, np.random.default_rng(cfg.seed))
                train_pairs, val_pairs = [pairs[i] for i in train_idx], [pairs[i] for i in val_idx]
            else:
                train_pairs, val_pairs = pairs, segmentation_pairs(cfg.val_data, self.classes)[0]
            self.spacing = tuple(cfg.spacing) if cfg.spacing else training_spacing(train_pairs)
            load = functools.partial(
                load_seg_case, classes=self.classes, window=self.window, spacing=self.spacing, modality=self.modality
            )
            cases = [load(p) for p in train_pairs]
            self.val_cases = [load(p) for p in val_pairs]
            if cfg.label_budget is not None:
                rng = np.random.default_rng([cfg.seed, 4])
                cases = apply_budget(cases, cfg.label_budget, cfg.budget_unit, cfg.slab_depth or self.patch[2], rng)
        except LabelledDataError as err:
            raise FinetuneError(str(err)) from None
        self.train_cases = cases
        self.channels = _channels(cases + self.val_cases)
        self.loss_fn = LOSSES[cfg.loss or ("dice" if len(self.classes) == 1 else "dice_ce")]
        self.columns = ("val_dice", *(f"val_dice_{name}" for name in self.classes))
        n_train = len(cases) * cfg.patches_per_volume
        labelled = sum(c.image.shape[-1] if c.labelled_z is None else len(c.labelled_z) for c in cases)
        self.log(
            f"segmentation of {list(self.classes)} ({self.loss_fn.name} loss) at {self.spacing} mm: {len(cases)} "
            f"training case(s), {labelled} labelled slice(s) ({n_train} patches of {self.patch} per epoch), "
            f"{len(self.val_cases)} whole validation volume(s)"
        )
        self._set_steps(n_train, "patches per epoch; lower it or raise --patches-per-volume")
        record = self.record()
        try:
            check_backbone(record.network_arch, self.channels, record.n_outputs, cfg.dims, self.patch)
        except BackboneError as err:
            raise FinetuneError(str(err)) from None

    def new_model(self):
        return self.record().build_model()

    def record(self) -> ModelRecord:
        return ModelRecord(
            task="segmentation",
            dims=self.cfg.dims,
            in_channels=self.channels,
            width=self.width,
            batchnorm=BATCHNORM[self.cfg.batchnorm],
            labels=dict(self.classes),
            activation=self.loss_fn.activation,
            patch=list(self.patch),
            intensity=self.window.describe(),
            spacing=list(self.spacing),
            modality=self.modality,
            arch=self.arch,
        )

    def load_weights(self, model, state: dict) -> None:
        own, prefixes = model.state_dict(), backbone(self.arch).head
        head = [k for k in own if k.startswith(prefixes)]
        if all(k in state and state[k].shape == own[k].shape for k in head):
            load_state(model, state, self.cfg.weights, fix=_WEIGHTS_FIX)
            self.log(
                f"loaded {self.cfg.weights} (whole {'U-Net' if self.arch['name'] == 'unet3d' else self.arch['name']})"
            )
            return
        body = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        load_state(model, {**body, **{k: own[k] for k in head}}, self.cfg.weights, fix=_WEIGHTS_FIX)
        self.log(
            f"loaded {self.cfg.weights} except its output layer (this task has {self.record().n_outputs} outputs); "
            f"{', '.join(p.rstrip('.') for p in prefixes)} freshly initialised"
        )

    def epoch_data(self, rng):
        cfg = self.cfg
        xs, ys = zip(*(sample_patches(c, self.patch, cfg.patches_per_volume, rng, cfg.fg_fraction)
                       for c in self.train_cases))  # fmt: skip
        x, y = np.concatenate(xs), np.concatenate(ys)
        return (x, y) if cfg.dims == 3 else (x[..., 0], y[..., 0])

    def loss(self, output, target):
        return self.loss_fn(output, target)

    @torch.no_grad()
    def predict_probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Whole-volume class probabilities (classes, x, y, z) of a normalised image (channels, x, y, z), by the sliding
        window of predict."""

        record = self.record()

        def forward(x):
            out = self.forward(self.model, self.net_input(x)).float()
            return record.probabilities(out if self.cfg.dims == 3 else out[..., None])

        volume = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        return sliding_window(forward, volume, self.patch, overlap=self.cfg.overlap, batch_size=self.cfg.batch_size)

    def validate(self, epoch: int) -> dict:
        """Each held-out volume through the sliding window in eval mode: the Dice of each class (NaN where neither the
        prediction nor the reference has it; left out of the means) and their mean, averaged over the volumes."""
        if not self.val_cases:
            return {}
        record = self.record()
        self.model.eval()
        scores, losses = [], []
        for case in self.val_cases:
            probs = self.predict_probabilities(case.image).cpu()  # one copy to the host per volume
            target = torch.from_numpy(case.target.astype(np.int64))
            losses.append(float(self.loss_fn.soft_dice(probs[None], target[None])))
            predicted = record.label_map(probs.numpy())
            values = list(self.classes.values())
            scores.append([dice(predicted == v, case.target == k) for k, v in enumerate(values, start=1)])
        self.model.train()
        per_class = [_nanmean(column) for column in zip(*scores)]
        row = {"val_loss": float(np.mean(losses)), "val_dice": _nanmean(per_class)}
        return row | {f"val_dice_{name}": float(d) for name, d in zip(self.classes, per_class)}

    def summary_extra(self) -> dict:
        return {"labels": dict(self.classes), "spacing": list(self.spacing)}


class ClassificationTrainer(FinetuneTrainer):
    """The published head on the pre-trained encoder, cross-entropy; accuracy and ROC AUC."""

    columns = ("val_accuracy", "val_auc")
    metric = "val_auc"
    state_keys = (*FinetuneTrainer.state_keys, "classes")  # the same names in the same order: the head's outputs

    def setup(self) -> None:
        cfg = self.cfg
        if self.arch["name"] != "unet3d":
            raise FinetuneError(
                f"classification fine-tunes the published U-Net's encoder (architecture unet3d); architecture "
                f"{self.arch['name']!r} is for segmentation"
            )
        try:
            self.cubes, self.labels, self.classes = load_classification(cfg.data, self.patch, self.window)
            self.train_idx, val_idx = split_indices(
                len(self.cubes), cfg.val_fraction, np.random.default_rng(cfg.seed), strata=self.labels
            )
        except LabelledDataError as err:
            raise FinetuneError(str(err)) from None
        self.cubes = self.cubes if cfg.dims == 3 else self.cubes[..., 0]
        self.val_x, self.val_y = (self.cubes[val_idx], self.labels[val_idx]) if len(val_idx) else (None, None)
        self.log(
            f"classification: {len(self.classes)} classes {self.classes}; {len(self.train_idx)} training cube(s), "
            f"{len(val_idx)} validation cube(s) of {self.patch}"
        )
        self._set_steps(len(self.train_idx), "samples")

    def new_model(self):
        from ..models import GenesisClassifier, GenesisClassifier2D

        cls = GenesisClassifier2D if self.cfg.dims == 2 else GenesisClassifier
        return cls(len(self.classes), batchnorm=BATCHNORM[self.cfg.batchnorm], width=self.width)

    def record(self) -> ModelRecord:
        return ModelRecord(
            task="classification",
            dims=self.cfg.dims,
            in_channels=1,
            width=self.width,
            batchnorm=BATCHNORM[self.cfg.batchnorm],
            labels={name: k for k, name in enumerate(self.classes, start=1)},
            activation="softmax",
            patch=list(self.patch),
            intensity=self.window.describe(),
            spacing=None,
            modality=self.modality,
        )

    def load_weights(self, model, state: dict) -> None:
        load_state(model, state, self.cfg.weights, encoder_only=True, fix=_WEIGHTS_FIX)
        self.log(f"loaded the encoder of {self.cfg.weights}; the classification head is freshly initialised")

    def epoch_data(self, rng):
        return self.cubes[self.train_idx], self.labels[self.train_idx]

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """Cross-entropy, accuracy and ROC AUC (binary: of the class sorted second; more: the macro mean of one-vs-rest
        AUCs) of the held-out cubes, in eval mode."""
        if self.val_x is None:
            return {}
        self.model.eval()
        probs, ce = [], 0.0
        for b in _batches(len(self.val_x), self.cfg.batch_size, None):
            out = self.forward(self.model, torch.from_numpy(self.val_x[b]).to(self.device)).float()
            ce += float(F.cross_entropy(out, torch.from_numpy(self.val_y[b]).to(self.device), reduction="sum"))
            probs.append(torch.softmax(out, dim=1).cpu().numpy())
        self.model.train()
        p = np.concatenate(probs)
        return {
            "val_loss": ce / len(self.val_x),
            "val_accuracy": float(np.mean(p.argmax(1) == self.val_y)),
            "val_auc": multiclass_auc(p, self.val_y),
        }

    def checkpoint_extra(self, epoch: int) -> dict:
        return {**super().checkpoint_extra(epoch), "classes": list(self.classes)}

    def summary_extra(self) -> dict:
        return {"classes": list(self.classes)}


TRAINERS = {"segmentation": SegmentationTrainer, "classification": ClassificationTrainer}  # --task
_WEIGHTS_FIX = "pass weights of this network: the same --dims, input channels and --width, or none"


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _json_default(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)
