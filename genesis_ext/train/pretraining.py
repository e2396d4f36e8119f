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
  same deformations every epoch. The loss is logged over
  all pairs and per painting branch (none / in-painting / out-painting), with the same split of the baselines
  (identity: the deformed input; mean: the targets' mean) in ``baselines.json``: out-painting hides about 2/3 of a
  cube, so its loss has a high floor and dominates the total.
* ``accumulate=K`` splits each batch into K micro-batches (gradients summed, then divided by K). Under torchrun with W
  processes, rank r takes micro-batches r*K .. r*K+K-1 of each global batch, so W processes with K micro-batches
  each compute exactly what one process with ``accumulate=W*K`` computes (BatchNorm statistics are per micro-batch
  in both).
* Checkpoints at every epoch end (``checkpoints/last.pt``) and for the best validation loss (``checkpoints/best.pt``),
  written atomically. ``resume`` continues after the last completed epoch; on the CPU with the same thread count it
  reproduces the uninterrupted run's losses exactly.
* Logs: ``metrics.csv`` (one row per epoch), TensorBoard under ``tensorboard/``, previews
  ``previews/epoch_XXXX.png`` (mid-Z slices: deformed input | target | restoration) and ``preview.png`` (latest),
  ``curve.png`` (training and validation loss against the steps, with both baselines).
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._util import print_line, progress_bar
from ..config import DeformConfig
from ..models import UNet3D, load_pretrained
from ..models.weights import atomic_save
from ..ops import genesis_pair, sample_params
from . import distributed
from .checkpoint import FORMAT, load_training_state
from .logs import CsvLog, TensorBoard, curve_image, preview_image, read_csv, save_png

# Presets: the published settings, and the default (Adam: the published SGD at lr 1.0 is reported to collapse to a
# constant output; see README "Pre-training" for the measured curves).
PRESETS = {
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


# The painting branch of a pair: none, in-painting or out-painting (``sample_params`` ``paint`` / ``inpaint``).
BRANCHES = ("none", "inpaint", "outpaint")


def _branches(params: dict) -> np.ndarray:
    return np.where(~params["paint"], "none", np.where(params["inpaint"], "inpaint", "outpaint"))


def _save_curve(out: Path, base: dict) -> None:
    """``curve.png``: training and validation loss of every epoch so far (metrics.csv, so a resumed run draws its
    whole history) against the steps, with the identity and constant-mean baselines."""
    rows = read_csv(out / "metrics.csv")
    series = {key: [(r["step"], r[key]) for r in rows] for key in ("train_loss", "val_loss")}
    image = curve_image(series, {"identity": base["identity"], "constant mean": base["mean"]}, "pre-training")
    if image is not None:
        save_png(image, out / "curve.png")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


@dataclass
class PretrainConfig:
    """Settings of a pre-training run. ``None`` fields take the preset's value (see :data:`PRESETS`)."""

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
    width: float = 1.0  # the U-Net's channel multiplier (1: the published network; e.g. 0.25 to study on a CPU)
    channels_last: Optional[bool] = None  # default: on CUDA
    accumulate: int = 1  # micro-batches per process and step
    workers: int = 0  # DataLoader workers
    threads: Optional[int] = None  # torch.set_num_threads
    preview_every: int = 1  # epochs between PNG previews (0: never)
    log_every: int = 10  # steps between host reads of the loss (one GPU sync each)
    max_minutes: Optional[float] = None  # stop at the first epoch end after this much training time
    resume: bool | str | os.PathLike = False  # True: OUT/checkpoints/last.pt, or a path
    init_weights: Optional[str | os.PathLike] = None  # start from these weights (e.g. the published checkpoint)
    cube: Sequence[int] = (64, 64, 32)  # for volume inputs
    per_volume: int = 32  # for volume inputs
    volume_filter: str = "foreground"  # for volume inputs
    progress: bool = True
    tensorboard: bool = True

    def resolved(self) -> "PretrainConfig":
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        changes = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **changes)
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
        if cfg.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {cfg.amp!r}")
        for name in ("batch_size", "epochs", "accumulate", "lr_step_epochs", "patience", "log_every", "val_repeats"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {cfg.steps_per_epoch}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise ValueError(f"lr must be a positive number, got {cfg.lr}")
        if cfg.val_data is None and not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
        return cfg

    def summary(self) -> dict:
        """The settings as plain values (stored in checkpoints and ``config.json``)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, DeformConfig):
                v = dataclasses.asdict(v)
            elif isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif isinstance(v, (list, tuple)):
                v = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
            d[f.name] = v
        return d


@dataclass
class PretrainResult:
    epochs: int  # epochs completed (in total, resumed ones included)
    best_val: float
    history: list  # the metrics.csv rows of this call
    baselines: dict  # validation MSE of identity (deformed input) and constant-mean outputs
    stopped: str  # "epochs", "early_stop", "time"
    last_checkpoint: Path
    best_checkpoint: Path


# Training state that must match for --resume to continue the same run.
_RESUME_KEYS = (
    "batch_size",
    "seed",
    "deform_seed",
    "val_seed",
    "optimizer",
    "steps_per_epoch",
    "val_fraction",
    "val_repeats",
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
            seed=cfg.seed,
        )
    except ValueError as e:
        if "no volumes found" in str(e) or "no image files" in str(e):
            raise ValueError(
                f"no training data in {', '.join(map(str, paths))}: expected a cube store "
                "(genesis-ext extract), .npy cube arrays or CT volumes"
            ) from None
        raise


def _cube_of(ds) -> tuple:
    return tuple(int(c) for c in ds.cube)


def _check_cube(cube: tuple, deform: DeformConfig) -> None:
    if len(cube) != 3 or any(c % 8 for c in cube):
        raise ValueError(f"cubes of shape {cube}: the 3D U-Net needs every axis a multiple of 8")
    genesis_pair(torch.zeros((1, 1, *cube)), seed=0, offset=0, config=deform)  # raises on sizes the config can't do


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


def pair_errors(batches, seed: int, config: DeformConfig, restore=None, first: Optional[list] = None) -> dict:
    """Per-pair errors of the pairs made from ``batches`` (cube batches; pair j is deformed with (seed, offset j)).

    Returns float64 arrays over the pairs: ``identity`` (MSE of the deformed input), ``model`` (MSE of
    ``restore(deformed)``, when given), and ``sum`` / ``sumsq`` (sums of the target and of its square), from which
    :func:`mean_baseline` gives the MSE of the targets' mean. ``first``, when an empty list, receives the first
    batch's deformed input, target and restoration as numpy arrays (the previews). One host read at the end."""
    errors = {"identity": [], "model": [], "sum": [], "sumsq": []}
    offset = 0
    with torch.no_grad():
        for x in batches:
            xd, target = genesis_pair(x, seed=seed, offset=offset, config=config)
            t = target.flatten(1).double()
            errors["identity"].append(((xd.flatten(1).double() - t) ** 2).mean(1))
            errors["sum"].append(t.sum(1))
            errors["sumsq"].append((t * t).sum(1))
            if restore is not None:
                restored = restore(xd).float()
                errors["model"].append(((restored.flatten(1).double() - t) ** 2).mean(1))
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


def _loader(dataset, batches: list, workers: int, pin: bool):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) pre-training; see the module docstring. Rank 0 of a torchrun job logs and checkpoints."""
    cfg = config.resolved()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dd = distributed.setup(cfg.device)
    try:
        return _pretrain(cfg, dd)
    finally:
        dd.close()


def _pretrain(cfg: PretrainConfig, dd: distributed.Dist) -> PretrainResult:
    device = distributed.resolve_device(cfg.device, dd.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    # ---- data ----
    dataset = _dataset(cfg.data, cfg)
    val_dataset = _dataset(cfg.val_data, cfg) if cfg.val_data is not None else dataset
    cube = _cube_of(dataset)
    if _cube_of(val_dataset) != cube:
        raise ValueError(f"validation cubes {_cube_of(val_dataset)} differ from training cubes {cube}")
    _check_cube(cube, cfg.deform)
    split = _Split(len(dataset), cfg, cfg.val_data is not None)
    val_items = split.val if split.val is not None else np.arange(len(val_dataset))
    from ..data import VolumeCubeDataset

    if isinstance(val_dataset, VolumeCubeDataset):
        if val_dataset is dataset:  # volumes: a frozen copy for validation, the training one moves on each epoch
            import copy

            val_dataset = copy.copy(dataset)
            val_dataset._cache = type(dataset._cache)()
        val_dataset.set_epoch(0)
    n_train, B = len(split.train), int(cfg.batch_size)
    if B > n_train:
        raise ValueError(
            f"batch size {B} is larger than the {n_train} training cubes "
            f"({len(dataset)} cubes, {len(dataset) - n_train} held out for validation)"
        )
    parts = dd.world * cfg.accumulate
    if B % parts:
        raise ValueError(f"batch size {B} must be divisible by processes x accumulate = {dd.world} x {cfg.accumulate}")
    micro = B // parts
    steps = int(cfg.steps_per_epoch or n_train // B)
    cfg = dataclasses.replace(cfg, steps_per_epoch=steps)
    samples_per_epoch = steps * B

    # ---- model, optimiser, schedule ----
    torch.manual_seed(cfg.seed)
    model = UNet3D(width=cfg.width)
    if cfg.init_weights is not None:
        load_pretrained(model, cfg.init_weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)

    start_epoch, best_val, bad_epochs = 0, math.inf, 0
    resume_path = None
    if not cfg.resume and last_path.exists():
        raise ValueError(
            f"{out} already holds a run ({last_path}); pass --resume (resume=True) to continue it, or "
            "choose another --out"
        )
    if cfg.resume:
        resume_path = last_path if cfg.resume is True else Path(cfg.resume)
        state = load_training_state(resume_path)
        stored = state.get("config", {})
        diff = [
            f"{k}: {stored.get(k)!r} -> {getattr(cfg, k)!r}"
            for k in _RESUME_KEYS
            if k in stored and stored[k] != getattr(cfg, k)
        ]
        if diff:
            raise ValueError(f"--resume: the settings differ from the checkpoint's ({'; '.join(diff)})")
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_val, bad_epochs = int(state["epoch"]), float(state["best_val"]), int(state["bad_epochs"])
        if int(state["sample_offset"]) != start_epoch * samples_per_epoch:
            raise ValueError("--resume: the checkpoint's sample offset does not match its epoch and batch settings")

    net = model
    if dd.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    fwd = torch.compile(net) if cfg.compile else net

    # ---- logs (rank 0) ----
    csv_log = tb = None
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.summary(), indent=2, default=str))
        csv_log = CsvLog(out / "metrics.csv", start_epoch if cfg.resume else None)
        tb = TensorBoard(
            out / "tensorboard", purge_step=start_epoch * steps if cfg.resume else None, enabled=cfg.tensorboard
        )

    def to_device(x):
        return x.to(device, non_blocking=True)

    def run_model(m, xd):
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            return m(xd)

    # ---- validation: fixed pairs, computed on rank 0 with the bare model ----
    # each held-out cube val_repeats times, each time with its own deformation (pair j has offset j)
    val_batches = [list(map(int, val_items[i : i + B])) for i in range(0, len(val_items), B)] * cfg.val_repeats

    # the painting branch of each validation pair: outpainting hides ~2/3 of a cube, so its loss has a large floor
    branch = _branches(
        sample_params(len(val_items) * cfg.val_repeats, cube, seed=cfg.val_seed, config=cfg.deform, with_blocks=False)
    )

    def by_branch(per_sample: np.ndarray, prefix: str) -> dict:
        return {
            f"{prefix}_{b}": float(per_sample[branch == b].mean()) if (branch == b).any() else None for b in BRANCHES
        }

    def validate(first: Optional[list]):
        """Validation MSE: over all pairs, and per painting branch (``val_none``, ``val_inpaint``, ...)."""
        model.eval()
        loader = _loader(val_dataset, val_batches, cfg.workers, device.type == "cuda")
        mse = pair_errors(
            (to_device(b) for b in loader), cfg.val_seed, cfg.deform, lambda xd: run_model(model, xd), first
        )["model"]
        model.train()
        return float(mse.mean()), by_branch(mse, "val")

    def baselines() -> dict:
        """Validation MSE of returning the deformed input (identity) and of returning the targets' mean (mean)."""
        errors = pair_errors(
            (b.float() for b in _loader(val_dataset, val_batches, cfg.workers, False)), cfg.val_seed, cfg.deform
        )
        ident, const = errors["identity"], mean_baseline(errors)
        return {
            "identity": float(ident.mean()),
            "mean": float(const.mean()),
            "target_mean": float(errors["sum"].sum() / (errors["voxels"] * len(ident))),
            **by_branch(ident, "identity"),
            **by_branch(const, "mean"),
        }

    base = None
    if dd.main:
        base = baselines()
        (out / "baselines.json").write_text(json.dumps(base, indent=2))

    history, stopped = [], "epochs"
    t_start = time.perf_counter()
    model.train()
    epoch = start_epoch
    log = print_line if dd.main else (lambda *a, **k: None)
    if dd.main:
        log(
            f"pre-training: {n_train} training / {len(val_items)} validation cubes (x{cfg.val_repeats} deformations) "
            f"{'x'.join(map(str, cube))}, "
            f"batch {B} ({dd.world} process(es) x {cfg.accumulate} micro-batch(es) of {micro}), {steps} steps/epoch, "
            f"{cfg.optimizer} lr {cfg.lr}, device {device}{', bf16' if use_amp else ''}"
            + (f"; resumed after epoch {start_epoch}" if cfg.resume else "")
        )
        counts = ", ".join(f"{int((branch == b).sum())} {b}" for b in BRANCHES)
        log(
            f"validation pairs: {counts}; baselines (MSE): identity {base['identity']:.5f}, constant mean "
            f"{base['mean']:.5f} ("
            + ", ".join(f"{b} {base['mean_' + b]:.5f}" for b in BRANCHES if base["mean_" + b] is not None)
            + ")"
        )

    if start_epoch >= cfg.epochs:
        stopped = "epochs"
    elif bad_epochs >= cfg.patience:
        stopped = "early_stop"
    while epoch < cfg.epochs and bad_epochs < cfg.patience:
        t_epoch = time.perf_counter()
        if hasattr(dataset, "set_epoch") and dataset is not val_dataset:
            dataset.set_epoch(epoch)
        positions = _epoch_positions(split.train, cfg.seed, epoch, samples_per_epoch)
        base_offset = epoch * samples_per_epoch
        # this rank's micro-batches: global batch s, micro-batch (rank * accumulate + c)
        mine = []
        for s in range(steps):
            for c in range(cfg.accumulate):
                start = s * B + (dd.rank * cfg.accumulate + c) * micro
                mine.append((start, list(map(int, positions[start : start + micro]))))
        loader = _loader(dataset, [m[1] for m in mine], cfg.workers, device.type == "cuda")
        it = iter(loader)
        bar = progress_bar(steps, f"epoch {epoch + 1}", "step", dd.main and cfg.progress, leave=False)
        loss_total, pending = 0.0, []  # pending: (step, loss on the device) not yet read on the host

        def read_losses():
            """One host sync for the pending steps: the non-finite check, step logs and the progress bar."""
            nonlocal loss_total
            values = torch.stack([loss for _, loss in pending]).tolist()
            for (s, _), value in zip(pending, values):
                if not math.isfinite(value):
                    bar.close()
                    where = (
                        f"epoch {epoch + 1}, step {s + 1}/{steps} (global samples {base_offset + s * B}.."
                        f"{base_offset + (s + 1) * B - 1})"
                    )
                    kept = (
                        f"the last good checkpoint is {last_path} (epoch {epoch})"
                        if last_path.exists()
                        else "no checkpoint was written yet"
                    )
                    raise NonFiniteLossError(
                        f"non-finite training loss ({value}) at {where}; stopped before the next checkpoint; {kept}. "
                        f"Check the data for NaN/Inf, or lower the learning rate (e.g. --preset default)."
                    )
                loss_total += value
                if dd.main:
                    tb.scalar("train/loss_step", value, epoch * steps + s)
            bar.set_postfix(loss=f"{values[-1]:.5f}")
            pending.clear()

        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            local = torch.zeros((), device=device)
            for c in range(cfg.accumulate):
                start = mine[s * cfg.accumulate + c][0]
                x = to_device(next(it))
                xd, target = genesis_pair(x, seed=cfg.deform_seed, offset=base_offset + start, config=cfg.deform)
                last = c == cfg.accumulate - 1
                ctx = net.no_sync() if dd.world > 1 and not last else _nullcontext()
                with ctx:
                    restored = run_model(fwd, xd)
                    loss = F.mse_loss(restored.float(), target)
                    loss.backward()
                local = local + loss.detach()
            if cfg.accumulate > 1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(cfg.accumulate)
            pending.append((s, dd.all_reduce_mean(local / cfg.accumulate if cfg.accumulate > 1 else local)))
            opt.step()
            if len(pending) == cfg.log_every or s == steps - 1:
                read_losses()
            bar.update(1)
        bar.close()
        train_loss = loss_total / steps
        lr_now = opt.param_groups[0]["lr"]
        sched.step()
        epoch += 1

        # validation, early stopping and checkpoints: rank 0 decides, everyone follows
        first = [] if (cfg.preview_every and epoch % cfg.preview_every == 0) else None
        val, val_parts = validate(first) if dd.main else (0.0, {})
        elapsed = time.perf_counter() - t_start
        out_of_time = cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
        flags = dd.broadcast(
            torch.tensor(
                [val, float(out_of_time)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu"
            )
        )
        val, out_of_time = float(flags[0]), bool(flags[1])
        improved = val < best_val
        if improved:
            best_val, bad_epochs = val, 0
        else:
            bad_epochs += 1
        row = dict(
            epoch=epoch,
            step=epoch * steps,
            samples=epoch * samples_per_epoch,
            lr=lr_now,
            train_loss=train_loss,
            val_loss=val,
            **val_parts,
            best_val=best_val,
            bad_epochs=bad_epochs,
            seconds=round(time.perf_counter() - t_epoch, 3),
        )
        history.append(row)
        if dd.main:
            csv_log.write(row)
            tb.scalar("train/loss", train_loss, epoch * steps)
            tb.scalar("val/loss", val, epoch * steps)
            for name, value in val_parts.items():
                if value is not None:
                    tb.scalar(f"val/{name[4:]}", value, epoch * steps)
            tb.scalar("lr", lr_now, epoch * steps)
            _save_curve(out, base)
            if first:
                img = preview_image(*first)
                save_png(img, out / "previews" / f"epoch_{epoch:04d}.png")
                save_png(img, out / "preview.png")
                tb.image("val/preview", img, epoch * steps)
            tb.flush()
            state = {
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "sample_offset": epoch * samples_per_epoch,
                "best_val": best_val,
                "bad_epochs": bad_epochs,
                "val_loss": val,
                "config": _plain(cfg.summary()),
                "format": FORMAT,
            }
            if improved:
                atomic_save(state, best_path)
            atomic_save(state, last_path)
            parts = ", ".join(f"{b} {val_parts['val_' + b]:.5f}" for b in BRANCHES if val_parts["val_" + b] is not None)
            log(
                f"epoch {epoch}: train {train_loss:.5f}  val {val:.5f} ({parts})  best {best_val:.5f}"
                f"{'  *' if improved else ''}  ({row['seconds']:.1f} s)"
            )
        dd.barrier()
        if bad_epochs >= cfg.patience:
            stopped = "early_stop"
            break
        if out_of_time:
            stopped = "time"
            break
    if dd.main:
        tb.close()
        log(
            f"stopped ({stopped}) after epoch {epoch}; best validation loss {best_val:.5f} "
            f"(identity {base['identity']:.5f}, mean {base['mean']:.5f}); checkpoints in {ckpt_dir}"
        )
    return PretrainResult(
        epochs=epoch,
        best_val=best_val,
        history=history,
        baselines=base or {},
        stopped=stopped,
        last_checkpoint=last_path,
        best_checkpoint=best_path,
    )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _plain(value):
    """Only weights_only-loadable values: dicts, lists, str, numbers, bool, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
