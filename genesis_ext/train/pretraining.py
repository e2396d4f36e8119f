"""Models Genesis self-supervised pre-training: restore ``genesis_pair``-deformed cubes with the 3D U-Net (MSE).

    from genesis_ext.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(data=["cubes/"], out="run/"))

The command line is ``genesis-ext pretrain --data CUBES_OR_VOLUMES --out DIR``. What a run does:

* Data: a cube store / ``.npy`` cube arrays (``CubeStoreDataset``) or CT volumes cut on the fly
  (``VolumeCubeDataset``). A fixed, seeded ``val_fraction`` of the cubes (or ``val_data``) is held out.
* An epoch is ``steps_per_epoch`` (default ``N_train // batch_size``) random batches; the order is a permutation
  seeded by ``(seed, epoch)``. Training sample ``p`` of epoch ``e`` has the global index
  ``e * steps_per_epoch * batch_size + p``, and is deformed on the training device by ``genesis_pair`` with
  ``deform_seed`` at that index: the pair depends only on (seed, index), not on the process layout.
* Validation pairs use ``val_seed`` with offsets 0..V*R-1 (V held-out cubes, each ``val_repeats`` = R times): the
  same deformations every epoch. The loss is logged over all pairs and per deformation branch (out-painted,
  in-painted, shuffled, Bézier-only, none: ``BRANCHES``), with the same split of the baselines
  (identity: the deformed input; mean: the targets' mean) in ``baselines.json``: out-painting hides about 2/3 of a
  cube, so its loss has a high floor and dominates the total.
* ``accumulate=K`` splits each batch into K micro-batches (gradients summed, then divided by K). Under torchrun with W
  processes, rank r takes micro-batches r*K .. r*K+K-1 of each global batch, so W processes with K micro-batches
  each compute exactly what one process with ``accumulate=W*K`` computes (BatchNorm statistics are per micro-batch
  in both).
* Checkpoints at every epoch end (``checkpoints/last.pt``) and for the best validation loss (``checkpoints/best.pt``),
  written atomically and sealed with checksums. ``resume`` continues after the last completed epoch; on the CPU with
  the same thread count it reproduces the uninterrupted run's losses exactly. It refuses a checkpoint recorded with
  other data, deformation, validation, seed, batch or model settings, listing each difference (``resume_anyway``
  accepts other data, deformation, validation, seed and batch settings), and one written with another random stream
  version (``genesis_ext.streams.STREAM_VERSION``, recorded in the checkpoints and ``config.json``; none recorded:
  version 1), which would deform the rest of the run differently at the same seeds.
* Logs: ``metrics.csv`` (one row per epoch), TensorBoard under ``tensorboard/``, previews
  ``previews/epoch_XXXX.png`` (mid-Z slices: deformed input | target | restoration) and ``preview.png`` (latest),
  ``curve.png`` (training and validation loss against the steps, with both baselines).
* Collapse (the model outputs a constant, as users of the published SGD lr 1.0 recipe report): after epochs of
  ``collapse_steps`` training steps in all at or above the constant-mean baseline, or at once when the restorations'
  spread (``val_spread``: their standard deviation over the validation voxels, relative to the targets') falls below
  ``COLLAPSE_SPREAD``, rank 0 logs one warning with what to try, ``metrics.csv`` marks the epochs (``collapsed``), the
  title of ``curve.png`` and the final summary say since when. It only warns: the run goes on.
* The training loss is read on the host every ``log_every`` steps and at each epoch end (one GPU sync per read, not
  per step): per-step TensorBoard scalars, the progress bar and the non-finite check. A non-finite loss stops the
  run with :class:`NonFiniteLossError` at that read, before the next checkpoint: the checkpoints on disk (the
  previous epoch's) predate it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._cli_options import AMP_MODES
from .._util import deprecated_aliases
from ..applied import applied
from ..config import DeformConfig
from ..data.cubes import PUBLISHED_CUBE
from ..data.modality import DEFAULT_MODALITY, modality
from ..models import load_pretrained
from ..models.backbones import as_built, backbone, build_backbone, check_backbone, resolve_arch
from ..ops import genesis_pair, sample_params
from ..streams import STREAM_VERSION
from . import distributed
from .logs import preview_image, save_png
from .trainer import NonFiniteLossError, Trainer  # noqa: F401 (NonFiniteLossError: public here)

# Training recipes (--preset): the published settings, and the default (Adam: the published SGD at lr 1.0 is reported
# to collapse to a constant output; see docs/training.md for the measured curves).
RECIPES = {
    "official": dict(
        optimizer="sgd", lr=1.0, momentum=0.9, batch_size=6, lr_step_epochs=40, lr_gamma=0.5, patience=50, epochs=10000
    ),
    "default": dict(
        optimizer="adam",
        lr=1e-3,
        momentum=0.9,
        batch_size=6,
        lr_step_epochs=40,
        lr_gamma=0.5,
        patience=50,
        epochs=10000,
    ),
}
# A restoration whose spread (val_spread) is below this share of the targets' is taken for a constant output: a
# collapsed network's is 0; tiny healthy CPU runs (16^3 cubes, both recipes, widths 1 and 0.25) measured 0.07 to 1.5.
COLLAPSE_SPREAD = 0.01
# PRESETS was this table's name, easily taken for the deformation presets (genesis_ext.config.ABLATIONS)
__getattr__ = deprecated_aliases(__name__, {"PRESETS": ("genesis_ext.train.pretraining.RECIPES", lambda: RECIPES)})


# The deformation branch of a pair, one each, painting first: out-painted, in-painted, else shuffled (local shuffle,
# with or without the Bézier map), else Bézier-only, else none (flips only).
BRANCHES = ("outpaint", "inpaint", "shuffle", "bezier", "none")


def branches(params: dict, seed: int) -> np.ndarray:
    """The branch (``BRANCHES``) of each pair of ``sample_params`` drawn with ``seed``, from its ``Applied`` record."""
    ops = ("outpaint", "inpaint", "local_shuffle", "bezier_remap")
    return np.array([next((b for op, b in zip(ops, BRANCHES) if op in r), "none") for r in applied(params, seed)])


@dataclass
class PretrainConfig:
    """Settings of a pre-training run. ``None`` fields take the value of the ``preset`` recipe (:data:`RECIPES`)."""

    data: Sequence[str | os.PathLike]
    out: str | os.PathLike
    preset: str = "default"
    optimizer: Optional[str] = None  # "sgd" or "adam"
    lr: Optional[float] = None
    momentum: Optional[float] = None  # SGD momentum (Adam: beta1)
    batch_size: Optional[int] = None  # global batch (all processes and micro-batches together)
    epochs: Optional[int] = None  # at most this many epochs
    steps_per_epoch: Optional[int] = None  # default: N_train // batch_size
    lr_step_epochs: Optional[int] = None  # lr *= lr_gamma every this many epochs
    lr_gamma: Optional[float] = None
    patience: Optional[int] = None  # early stop after this many epochs without validation improvement
    val_fraction: float = 0.1
    val_data: Optional[Sequence[str | os.PathLike]] = None
    val_repeats: int = 1  # validation pairs per held-out cube (more pairs: a steadier loss)
    seed: int = 0  # weights init, split and batch order
    deform_seed: int = 1  # training deformations
    val_seed: int = 2  # the fixed validation deformations
    deform: DeformConfig = field(default_factory=DeformConfig)
    device: Optional[str] = None  # default: cuda if available, else cpu
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    compile: bool = False
    arch: str | dict = "unet3d"  # the network: a name or {"name", "kwargs"} (genesis_ext.models.backbones)
    width: float = 1.0  # the U-Net's channel multiplier (1: the published network; e.g. 0.25 to study on a CPU)
    dims: int = 3  # 2: Models Genesis 2D (UNet2D on cubes of one slice, (X, Y, 1), e.g. from extract --dims 2)
    channels_last: Optional[bool] = None  # default: on CUDA
    accumulate: int = 1  # micro-batches per process and step
    workers: int = 0  # DataLoader workers
    threads: Optional[int] = None  # torch.set_num_threads
    preview_every: int = 1  # epochs between PNG previews (0: never)
    log_every: int = 10  # steps between host reads of the loss (one GPU sync each)
    max_minutes: Optional[float] = None  # stop at the first epoch end after this much training time
    collapse_steps: int = 1000  # warn of a collapse after this many steps at or above the mean baseline (0: no check)
    resume: bool | str | os.PathLike = False  # True: OUT/checkpoints/last.pt, or a path
    resume_anyway: bool = False  # resume although the data/deformation/validation/batch settings differ (_RESUME_KEYS)
    init_weights: Optional[str | os.PathLike] = None  # start from these weights (e.g. the published checkpoint)
    cube: Sequence[int] = PUBLISHED_CUBE  # for volume inputs
    per_volume: int = 32  # for volume inputs
    volume_filter: str = "foreground"  # for volume inputs
    modality: Optional[str] = None  # "ct", "mr" (data.modality); None: what the cube stores record, else ct
    progress: bool = True
    tensorboard: bool = True

    def resolved(self) -> "PretrainConfig":
        if self.preset not in RECIPES:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(RECIPES)}")
        changes = {k: v for k, v in RECIPES[self.preset].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **changes)
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
        if cfg.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
        for name in ("batch_size", "epochs", "accumulate", "lr_step_epochs", "patience", "log_every", "val_repeats"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.collapse_steps < 0:
            raise ValueError(f"collapse_steps must be >= 0 (0: no collapse check), got {cfg.collapse_steps}")
        if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {cfg.steps_per_epoch}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise ValueError(f"lr must be a positive number, got {cfg.lr}")
        if cfg.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {cfg.dims!r}")
        cfg.arch = resolve_arch(cfg.arch)
        if cfg.arch["name"] != "unet3d" and cfg.width != 1.0:
            raise ValueError(
                f"width scales the unet3d's channels only; architecture {cfg.arch['name']!r} takes its size in its "
                "kwargs (--arch-kwargs)"
            )
        if cfg.val_data is None and not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
        if cfg.resume_anyway and not cfg.resume:
            raise ValueError("resume_anyway (--resume-anyway) goes with resume (--resume): pass both, or neither")
        return cfg


@dataclass
class PretrainResult:
    epochs: int  # epochs completed (in total, resumed ones included)
    best_val: float
    history: list  # the metrics.csv rows of this call
    baselines: dict  # validation MSE of identity (deformed input) and constant-mean outputs
    stopped: str  # "epochs", "early_stop", "time"
    last_checkpoint: Path
    best_checkpoint: Path
    collapsed_since: Optional[int] = None  # the first epoch of a collapse still on at the end (rank 0), else None


# Settings that must match for --resume to continue the same run; resume_anyway lets them differ.
_RESUME_KEYS = (
    "data",
    "val_data",
    "val_fraction",
    "val_repeats",
    "cube",
    "per_volume",
    "volume_filter",
    "modality",
    "deform",
    "seed",
    "deform_seed",
    "val_seed",
    "batch_size",
    "steps_per_epoch",
)


def _is_cube_source(p: Path) -> bool:
    if p.suffix == ".npy":
        return True
    return p.is_dir() and ((p / "manifest.json").exists() or any(p.glob("*.npy")))


def _dataset(paths, cfg: PretrainConfig):
    from ..data import CubeStoreDataset, VolumeCubeDataset

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("no data given")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist")
    for p in paths:
        if p.is_dir() and not any(f.is_file() for f in p.rglob("*")):
            raise ValueError(
                f"no training data in {p}: the directory is empty (expected a cube store made by "
                "genesis-ext extract, .npy cube arrays or CT volumes)"
            )
    if all(_is_cube_source(p) for p in paths):
        return CubeStoreDataset([str(p) for p in paths])
    try:
        return VolumeCubeDataset(
            [str(p) for p in paths],
            cube=tuple(cfg.cube),
            per_volume=cfg.per_volume,
            filter=cfg.volume_filter,
            window=modality(cfg.modality or DEFAULT_MODALITY).intensity,
            seed=cfg.seed,
        )
    except ValueError as e:
        if "no volumes found" in str(e) or "no image files" in str(e):
            raise ValueError(
                f"no training data in {', '.join(map(str, paths))}: expected a cube store "
                "(genesis-ext extract), .npy cube arrays or CT volumes"
            ) from None
        raise


def data_intensity(datasets, name: Optional[str]) -> dict:
    """``{"modality", "intensity"}`` of the cubes, as their stores record them (ValueError naming the stores when they
    disagree with each other or with ``name``); inputs that record nothing (bare arrays, volumes) are taken to be
    ``name``, else CT, with that modality's intensity policy."""
    recorded = {p: r for ds in datasets for p, r in getattr(getattr(ds, "store", None), "intensity", {}).items()}
    named = {r["modality"] for r in recorded.values()}
    listed = ", ".join(f"{p} ({r['modality']})" for p, r in recorded.items())
    if len(named) > 1:
        raise ValueError(f"the cube stores hold different modalities: {listed}; pre-train on one modality")
    if name is not None and named - {name}:
        raise ValueError(f"--modality {name}, but the cube store records another: {listed}; leave --modality out")
    chosen = name or next(iter(named), DEFAULT_MODALITY)
    windows = [r["intensity"] for r in recorded.values()]
    return {"modality": chosen, "intensity": windows[0] if windows else modality(chosen).intensity.describe()}


def _channels_of(ds) -> int:
    """The channels of a dataset's cubes (a store of several channels; volumes and arrays: one)."""
    return int(getattr(getattr(ds, "store", None), "channels", 1))


def _cube_of(ds) -> tuple:
    return tuple(int(c) for c in ds.cube)


def _spatial(cube: tuple, dims: int) -> tuple:
    """The network's spatial shape for cubes of ``cube``: the cube (3-D), or its first two axes when it is one slice
    thick (2-D); checked against the U-Net's and the deformations' size rules."""
    if dims == 2 and (len(cube) != 3 or cube[2] != 1):
        raise ValueError(f"cubes of shape {cube}: --dims 2 trains on cubes of one slice (X, Y, 1): extract --dims 2")
    spatial = tuple(cube[:dims])
    if len(cube) != 3 or any(c % 8 for c in spatial):
        raise ValueError(f"cubes of shape {cube}: the U-Net needs every axis of {spatial} a multiple of 8")
    return spatial


def _check_pairs(spatial: tuple, deform: DeformConfig) -> None:
    """Raises on sizes the config's deformations cannot take."""
    genesis_pair(torch.zeros((1, 1, *spatial)), seed=0, offset=0, config=deform, spatial_dims=len(spatial))


class _Split:
    """Held-out validation items: a fixed, seeded subset (or a separate dataset)."""

    def __init__(self, n: int, cfg: PretrainConfig, separate_val: bool):
        order = np.random.default_rng([cfg.seed, 7]).permutation(n)
        if separate_val:
            self.train, self.val = np.sort(order), None
        else:
            n_val = max(1, int(round(cfg.val_fraction * n)))
            if n - n_val < 1:
                raise ValueError(f"{n} cubes are too few to hold out a validation set")
            self.val, self.train = np.sort(order[:n_val]), np.sort(order[n_val:])


def _epoch_positions(train: np.ndarray, seed: int, epoch: int, count: int) -> np.ndarray:
    """The dataset indices of the ``count`` training samples of ``epoch``: seeded permutations, concatenated."""
    chunks, k = [], 0
    while sum(len(c) for c in chunks) < count:
        chunks.append(train[np.random.default_rng([seed, epoch, k]).permutation(len(train))])
        k += 1
    return np.concatenate(chunks)[:count]


def pair_errors(
    batches, seed: int, config: DeformConfig, restore=None, first: Optional[list] = None, spatial_dims: int = 3
) -> dict:
    """Per-pair errors of the pairs made from ``batches`` (cube batches; pair j is deformed with (seed, offset j)).

    Returns float64 arrays over the pairs: ``identity`` (MSE of the deformed input), ``model`` (MSE of
    ``restore(deformed)``, when given), and ``sum`` / ``sumsq`` (sums of the target and of its square), from which
    :func:`mean_baseline` gives the MSE of the targets' mean, and ``out_sum`` / ``out_sumsq`` those of the restoration
    (for :func:`output_spread`). ``first``, when an empty list, receives the first batch's deformed input, target and
    restoration as numpy arrays (the previews). One host read at the end."""
    errors = {"identity": [], "model": [], "sum": [], "sumsq": [], "out_sum": [], "out_sumsq": []}
    offset = 0
    with torch.no_grad():
        for x in batches:
            xd, target = genesis_pair(x, seed=seed, offset=offset, config=config, spatial_dims=spatial_dims)
            t = target.flatten(1).double()
            errors["identity"].append(((xd.flatten(1).double() - t) ** 2).mean(1))
            errors["sum"].append(t.sum(1))
            errors["sumsq"].append((t * t).sum(1))
            if restore is not None:
                restored = restore(xd).float()
                r = restored.flatten(1).double()
                errors["model"].append(((r - t) ** 2).mean(1))
                errors["out_sum"].append(r.sum(1))
                errors["out_sumsq"].append((r * r).sum(1))
                if first is not None and not first:
                    first.extend(a.detach().float().cpu().numpy() for a in (xd, target, restored))
            offset += x.shape[0]
    out = {k: torch.cat(v).cpu().numpy() for k, v in errors.items() if v}
    out["voxels"] = int(target[0].numel())
    return out


def mean_baseline(errors: dict) -> np.ndarray:
    """Per-pair MSE of returning the mean of all the targets in ``errors`` (from :func:`pair_errors`)."""
    n = errors["voxels"]
    mean = errors["sum"].sum() / (n * len(errors["sum"]))
    return (errors["sumsq"] - 2 * mean * errors["sum"]) / n + mean * mean


def output_spread(errors: dict) -> float:
    """The standard deviation of the restorations over all voxels of the pairs in ``errors`` (from :func:`pair_errors`
    with ``restore``), relative to the targets': 0 for a constant output; nan when the targets are constant."""
    n = errors["voxels"] * len(errors["sum"])

    def std(total: np.ndarray, squares: np.ndarray) -> float:
        return math.sqrt(max(squares.sum() / n - (total.sum() / n) ** 2, 0.0))

    target = std(errors["sum"], errors["sumsq"])
    return std(errors["out_sum"], errors["out_sumsq"]) / target if target > 0 else math.nan


def _loader(dataset, batches: list, workers: int, pin: bool):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin)


def pretrain(config: PretrainConfig, trainer: Optional[type] = None) -> PretrainResult:
    """Run (or resume) pre-training; see the module docstring. Rank 0 of a torchrun job logs and checkpoints.
    ``trainer``: a subclass of :class:`PretrainTrainer` that changes a stage (the loss, the optimizer, ...)."""
    if trainer is not None and not (isinstance(trainer, type) and issubclass(trainer, PretrainTrainer)):
        raise ValueError(f"trainer {trainer!r} is not a subclass of PretrainTrainer")
    cfg = config.resolved()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dd = distributed.setup(cfg.device)
    try:
        trainer = (trainer or PretrainTrainer)(cfg, dd)
        history = trainer.fit()
        if dd.main:
            trainer.log(
                f"stopped ({trainer.stopped}) after epoch {trainer.epoch}; best validation loss {trainer.best:.5f} "
                f"(identity {trainer.base['identity']:.5f}, mean {trainer.base['mean']:.5f}); checkpoints in "
                f"{trainer.last_path.parent}"
                + (f"; COLLAPSED since epoch {trainer.collapsed_since}" if trainer.collapsed_since else "")
            )
        return PretrainResult(
            epochs=trainer.epoch,
            best_val=trainer.best,
            history=history,
            baselines=trainer.base or {},
            stopped=trainer.stopped,
            last_checkpoint=trainer.last_path,
            best_checkpoint=trainer.best_path,
            collapsed_since=trainer.collapsed_since,
        )
    finally:
        dd.close()


class PretrainTrainer(Trainer):
    """Models Genesis pre-training on the Trainer loop: the U-Net restores ``genesis_pair``-deformed cubes (MSE).
    Override ``loss`` (or any stage) in a subclass and pass the class to :func:`pretrain` (``trainer=``)."""

    # the validation MSE of the pairs of one deformation branch, the training samples seen so far, the restorations'
    # spread (output_spread) and 1 while the run counts as collapsed
    columns = (*(f"val_{b}" for b in BRANCHES), "samples", "val_spread", "collapsed")
    resume_keys = _RESUME_KEYS
    state_keys = (*Trainer.state_keys, "arch", "width", "dims")

    @property
    def title(self) -> str:
        """curve.png's title: the best validation loss against the constant-mean baseline, so far, and a collapse."""
        if not self.base or not math.isfinite(self.best):
            return "pre-training"
        ratio = self.best / self.base["mean"]
        where = "below" if ratio < 1 else "above"
        collapsed = f"COLLAPSED since epoch {self.collapsed_since}; " if self.collapsed_since else ""
        return f"pre-training: {collapsed}best validation {ratio:.2f}x the constant-mean baseline ({where})"

    def setup(self) -> None:
        cfg = self.cfg
        self.dataset = _dataset(cfg.data, cfg)
        self.val_dataset = _dataset(cfg.val_data, cfg) if cfg.val_data is not None else self.dataset
        self.cube = _cube_of(self.dataset)
        if _cube_of(self.val_dataset) != self.cube:
            raise ValueError(f"validation cubes {_cube_of(self.val_dataset)} differ from training cubes {self.cube}")
        self.spatial = _spatial(self.cube, cfg.dims)  # the network's input (2-D: the cube's single slice)
        _check_pairs(self.spatial, cfg.deform)
        self.split = _Split(len(self.dataset), cfg, cfg.val_data is not None)
        self.val_items = self.split.val if self.split.val is not None else np.arange(len(self.val_dataset))
        self.intensity = data_intensity([self.dataset, self.val_dataset], cfg.modality)
        self.channels = _channels_of(self.dataset)
        if _channels_of(self.val_dataset) != self.channels:
            raise ValueError(
                f"validation cubes have {_channels_of(self.val_dataset)} channel(s), training cubes {self.channels}"
            )
        check_backbone(self.network_arch, self.channels, self.channels, cfg.dims, self.spatial)
        self._freeze_val_volumes()
        n_train, B = len(self.split.train), int(cfg.batch_size)
        if B > n_train:
            raise ValueError(
                f"batch size {B} is larger than the {n_train} training cubes "
                f"({len(self.dataset)} cubes, {len(self.dataset) - n_train} held out for validation)"
            )
        parts = self.dd.world * cfg.accumulate
        if B % parts:
            raise ValueError(
                f"batch size {B} must be divisible by processes x accumulate = {self.dd.world} x {cfg.accumulate}"
            )
        self.micro = B // parts
        self.steps = int(cfg.steps_per_epoch or n_train // B)
        self.cfg = dataclasses.replace(cfg, steps_per_epoch=self.steps)
        self.samples_per_epoch = self.steps * B
        # each held-out cube val_repeats times, each time with its own deformation (pair j has offset j)
        items = self.val_items
        self.val_batches = [list(map(int, items[i : i + B])) for i in range(0, len(items), B)] * cfg.val_repeats
        # the branch of each validation pair: out-painting hides ~2/3 of a cube, so its loss has a large floor
        n_val = len(items) * cfg.val_repeats
        params = sample_params(n_val, self.spatial, seed=cfg.val_seed, config=cfg.deform, with_blocks=False)
        self.branch = branches(params, cfg.val_seed)
        self.base, self._first = None, None
        self.stuck_since = self.collapsed_since = None  # _watch_collapse's state (rank 0)

    def _freeze_val_volumes(self) -> None:
        """Volumes: validation cuts from a frozen copy of the dataset; the training one moves on each epoch."""
        from ..data import VolumeCubeDataset

        if isinstance(self.val_dataset, VolumeCubeDataset):
            if self.val_dataset is self.dataset:
                import copy

                self.val_dataset = copy.copy(self.dataset)
                self.val_dataset._cache = type(self.dataset._cache)()
            self.val_dataset.set_epoch(0)

    @property
    def network_arch(self) -> dict:
        """The architecture as ``build_backbone`` takes it (the U-Net's with ``cfg.width``)."""
        return as_built(self.cfg.arch, width=self.cfg.width)

    def build_model(self) -> torch.nn.Module:
        # restores every channel; the published U-Net with its sigmoid, other networks with raw outputs (as nnssl's
        # Models Genesis trainer)
        arch = self.network_arch
        model = build_backbone(arch, self.channels, self.channels, self.cfg.dims, sigmoid=backbone(arch).own_sigmoid)
        if self.cfg.init_weights is not None:
            load_pretrained(model, self.cfg.init_weights)
        return model

    def train_batches(self, epoch: int):
        cfg, B = self.cfg, int(self.cfg.batch_size)
        if hasattr(self.dataset, "set_epoch") and self.dataset is not self.val_dataset:
            self.dataset.set_epoch(epoch)
        positions = _epoch_positions(self.split.train, cfg.seed, epoch, self.samples_per_epoch)
        # this rank's micro-batches: global batch s, micro-batch (rank * accumulate + c)
        starts = [
            s * B + (self.dd.rank * cfg.accumulate + c) * self.micro
            for s in range(self.steps)
            for c in range(cfg.accumulate)
        ]
        items = [list(map(int, positions[start : start + self.micro])) for start in starts]
        it = iter(_loader(self.dataset, items, cfg.workers, self.device.type == "cuda"))
        for s in range(self.steps):
            yield [(starts[s * cfg.accumulate + c], next(it)) for c in range(cfg.accumulate)]

    def _cubes(self, x: torch.Tensor, device=None) -> torch.Tensor:
        """A batch of cubes as the network takes it (2-D: the slice of each (X, Y, 1) cube), on ``device`` (default:
        the training device)."""
        x = x.to(self.device if device is None else device, non_blocking=True)
        return x[..., 0] if self.cfg.dims == 2 else x

    def make_batch(self, batch, epoch: int, step: int):
        start, x = batch
        offset = epoch * self.samples_per_epoch + start
        return genesis_pair(
            self._cubes(x), seed=self.cfg.deform_seed, offset=offset, config=self.cfg.deform, spatial_dims=self.cfg.dims
        )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.float(), target)

    def where(self, epoch: int, step: int) -> str:
        first = epoch * self.samples_per_epoch + step * int(self.cfg.batch_size)
        return f" (global samples {first}..{first + int(self.cfg.batch_size) - 1})"

    def _by_branch(self, per_sample: np.ndarray, prefix: str) -> dict:
        return {
            f"{prefix}_{b}": float(per_sample[self.branch == b].mean()) if (self.branch == b).any() else None
            for b in BRANCHES
        }

    def validate(self, epoch: int) -> dict:
        """Validation MSE on the fixed pairs: over all pairs and per deformation branch (``val_outpaint``, ...); the
        restorations' spread (``val_spread``) and whether the run has collapsed (``collapsed``, 0 or 1)."""
        every = self.cfg.preview_every
        self._first = [] if (every and epoch % every == 0) else None
        self.model.eval()
        loader = _loader(self.val_dataset, self.val_batches, self.cfg.workers, self.device.type == "cuda")
        restore = lambda xd: self.forward(self.model, xd)  # noqa: E731
        pairs = (self._cubes(b) for b in loader)
        errors = pair_errors(pairs, self.cfg.val_seed, self.cfg.deform, restore, self._first, self.cfg.dims)
        self.model.train()
        mse, spread = errors["model"], output_spread(errors)
        loss = float(mse.mean())
        return {
            "samples": epoch * self.samples_per_epoch,
            "val_loss": loss,
            **self._by_branch(mse, "val"),
            "val_spread": spread,
            "collapsed": int(self._watch_collapse(epoch, loss, spread)),
        }

    def _watch_collapse(self, epoch: int, loss: float, spread: float) -> bool:
        """Whether the run counts as collapsed after ``epoch``: its validation loss has stayed at or above the
        constant-mean baseline for epochs of ``cfg.collapse_steps`` steps in all, or its output is constant
        (``COLLAPSE_SPREAD``).
        It stays so until both recover; the start and the end are logged once each. Only a warning: rank 0 alone
        validates, so nothing the ranks decide may depend on it."""
        if not self.cfg.collapse_steps:
            return False
        constant = spread < COLLAPSE_SPREAD
        stuck = constant or loss >= self.base["mean"]
        self.stuck_since = (self.stuck_since or epoch) if stuck else None
        was = self.collapsed_since
        long = stuck and (epoch - self.stuck_since + 1) * self.steps >= self.cfg.collapse_steps
        self.collapsed_since = self.stuck_since if stuck and (constant or long or was) else None
        if self.collapsed_since and not was:
            self.log(_collapse_warning(self.collapsed_since, loss, self.base["mean"], spread))
        elif was and not self.collapsed_since:
            self.log(
                f"collapse over at epoch {epoch}: validation loss {loss:.5f} below the constant-mean baseline "
                f"{self.base['mean']:.5f}, output spread {spread:.3f}"
            )
        return self.collapsed_since is not None

    def _baselines(self) -> dict:
        """Validation MSE of returning the deformed input (identity) and of returning the targets' mean (mean)."""
        loader = _loader(self.val_dataset, self.val_batches, self.cfg.workers, False)
        cubes = (self._cubes(b.float(), "cpu") for b in loader)
        errors = pair_errors(cubes, self.cfg.val_seed, self.cfg.deform, spatial_dims=self.cfg.dims)
        ident, const = errors["identity"], mean_baseline(errors)
        return {
            "identity": float(ident.mean()),
            "mean": float(const.mean()),
            "target_mean": float(errors["sum"].sum() / (errors["voxels"] * len(ident))),
            **self._by_branch(ident, "identity"),
            **self._by_branch(const, "mean"),
            "pairs": {b: int((self.branch == b).sum()) for b in BRANCHES},
        }

    def baselines(self) -> dict:
        return {"identity": self.base["identity"], "constant mean": self.base["mean"]}

    def on_start(self) -> None:
        if not self.dd.main:
            return
        cfg, base = self.cfg, self._baselines()
        self.base = base
        (self.out / "baselines.json").write_text(json.dumps(base, indent=2))
        self.log(
            f"pre-training: {len(self.split.train)} training / {len(self.val_items)} validation cubes "
            f"(x{cfg.val_repeats} deformations) {'x'.join(map(str, self.cube))}, batch {cfg.batch_size} "
            f"({self.dd.world} process(es) x {cfg.accumulate} micro-batch(es) of {self.micro}), {self.steps} "
            f"steps/epoch, {cfg.optimizer} lr {cfg.lr}, device {self.device}{', bf16' if self.amp else ''}"
            + (f"; resumed after epoch {self.epoch}" if cfg.resume else "")
        )
        counts = ", ".join(f"{int((self.branch == b).sum())} {b}" for b in BRANCHES)
        self.log(
            f"validation pairs: {counts}; baselines (MSE): identity {base['identity']:.5f}, constant mean "
            f"{base['mean']:.5f} ("
            + ", ".join(f"{b} {base['mean_' + b]:.5f}" for b in BRANCHES if base["mean_" + b] is not None)
            + ")"
        )

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if self._first:
            img = preview_image(*(a[..., None] if self.cfg.dims == 2 else a for a in self._first))  # 2-D: one slice
            save_png(img, self.out / "previews" / f"epoch_{epoch:04d}.png")
            save_png(img, self.out / "preview.png")
            self.tb.image("val/preview", img, row["step"])

    def summary(self) -> dict:
        """The settings, and the random stream version the run's pairs are drawn with (config.json, checkpoints)."""
        return {**super().summary(), "stream_version": STREAM_VERSION}

    def checkpoint_extra(self, epoch: int) -> dict:
        collapse = {"stuck_since": self.stuck_since, "collapsed_since": self.collapsed_since}
        return {
            **self.intensity,
            "in_channels": self.channels,
            "arch": self.cfg.arch,  # with the config's width and dims, what fine-tuning rebuilds
            "dims": self.cfg.dims,
            "stream_version": STREAM_VERSION,  # check_resume refuses a checkpoint of another version
            "sample_offset": epoch * self.samples_per_epoch,
            "val_loss": self.history[-1].get("val_loss"),
            "collapse": collapse,
        }

    def load_extra(self, state: dict) -> None:
        collapse = state.get("collapse", {})  # none in checkpoints of earlier versions
        self.stuck_since, self.collapsed_since = collapse.get("stuck_since"), collapse.get("collapsed_since")

    def check_resume(self, state: dict) -> None:
        _check_stream_version(state, self.resume_path)
        super().check_resume(state)
        offset = int(state.get("sample_offset", -1))
        if not self.cfg.resume_anyway and offset != int(state["epoch"]) * self.samples_per_epoch:
            raise ValueError(
                f"--resume: {self.resume_path} says its next training sample is {offset}, not epoch {state['epoch']} x "
                f"{self.samples_per_epoch} samples per epoch: another batch size or --steps-per-epoch than its run's; "
                "pass those, or --resume-anyway"
            )

    def epoch_line(self, row: dict, improved: bool) -> str:
        parts = ", ".join(f"{b} {row['val_' + b]:.5f}" for b in BRANCHES if row.get("val_" + b) is not None)
        return (
            f"epoch {row['epoch']}: train {row['train_loss']:.5f}  val {row['val_loss']:.5f} ({parts})  "
            f"best {row['best_val']:.5f}{'  *' if improved else ''}  ({row['seconds']:.1f} s)"
        )


def _check_stream_version(state: dict, path: Path) -> None:
    """Refuse to resume a checkpoint whose pairs were drawn with another random stream version (none recorded:
    version 1), even with resume_anyway: no setting brings the other version's deformations back."""
    recorded = state.get("stream_version", 1)
    if recorded == STREAM_VERSION:
        return
    if "stream_version" in state:
        written = f"was written with random stream version {recorded}"
    else:
        written = (
            f"records no random stream version: it was written before versions were recorded, with version {recorded}"
        )
    raise ValueError(
        f"--resume: {path} {written}; this genesis_ext draws stream version {STREAM_VERSION} (docs/randomness.md, "
        '"Stream versions"): the same seeds would give the rest of the run other deformations and other '
        "validation pairs. Nothing was loaded or written, and --resume-anyway cannot change this. Start a new run in "
        f"another --out (from these weights: --init {path}), or continue this run with the genesis_ext release that "
        f"wrote it (stream version {recorded})."
    )


def _collapse_warning(since: int, loss: float, mean: float, spread: float) -> str:
    """The line that says a run has collapsed, and what to try."""
    return (
        f"WARNING: collapse since epoch {since}: validation loss {loss:.5f} vs the constant-mean baseline {mean:.5f}, "
        f"output spread {spread:.3f} of the targets' (constant below {COLLAPSE_SPREAD}). "
        "Training goes on. Try a lower learning rate (--preset default, Adam lr 1e-3, instead of official's SGD lr "
        "1.0, or --lr), another --preset, or data without mostly empty or constant cubes (genesis-ext extract "
        "--filter official-lung or foreground; check the store)"
    )
