"""``Trainer``: the one training loop of genesis_ext, shared by pre-training and fine-tuning.

The loop owns what every run needs: the device, bf16 autocast, ``torch.compile``, channels-last, DistributedDataParallel
under torchrun, gradient accumulation, checkpoints and resume, the learning-rate schedule, early stopping, a time
limit, and the logs (a CSV row per epoch, TensorBoard, a progress bar, ``curve.png``). What a task changes is a
method: ``setup`` (data), ``build_model``, ``build_optimizer``, ``build_scheduler``, ``train_batches``,
``make_batch``, ``loss``, ``validate``, ``score``, ``on_epoch_end``. A new loss is a few lines::

    class L1Pretrainer(PretrainTrainer):
        def loss(self, output, target):
            return torch.nn.functional.l1_loss(output.float(), target)

The settings object (``cfg``) is the task's config dataclass; the loop reads these of its fields: ``out``, ``epochs``,
``seed``, ``device``, ``amp``, ``compile``, ``channels_last``, ``accumulate``, ``optimizer``, ``lr``, ``momentum``,
``lr_step_epochs``, ``lr_gamma``, ``patience``, ``max_minutes``, ``resume``, ``resume_anyway``, ``log_every``,
``progress``, ``tensorboard``.

Resume: every checkpoint records the run's settings (``summary``); a resumed run must have the same
``state_keys`` and ``resume_keys``, and refuses with the list of differences otherwise (``resume_anyway`` lets
``resume_keys`` differ, e.g. data that moved). Checkpoints are sealed with checksums and verified on every read.

Determinism: the model is initialised after ``torch.manual_seed(cfg.seed)``, and each epoch's batches are a function of
``(seed, epoch)`` (``train_batches``), so a resumed run continues the uninterrupted run exactly (on the CPU with the
same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from .._util import print_line, progress_bar
from ..models.weights import CheckpointError, atomic_save, load_state, seal
from . import distributed
from .checkpoint import FORMAT, load_training_state
from .errors import NonFiniteLossError
from .logs import CsvLog, TensorBoard, curve_image, read_csv, save_png


def _silent(*args, **kwargs) -> None:
    return None


class Trainer:
    """One training run: ``Trainer(cfg).fit()``. See the module docstring for the stages a subclass overrides."""

    csv_name = "metrics.csv"  # one row per epoch, columns ``fields``
    checkpoint_dir = "checkpoints"  # last.pt (every epoch) and best.pt (best score), under out
    columns: tuple[str, ...] = ()  # the task's own CSV columns (e.g. validation metrics), after val_loss
    # Settings a resumed run must share with its checkpoint. resume_anyway lets resume_keys differ (e.g. data that
    # moved); never state_keys, which the checkpoint's own state fixes: the optimizer's kind, lr and momentum and the
    # schedule (loading its state would silently bring back the recorded ones), the model's shapes.
    resume_keys: tuple[str, ...] = ("seed",)
    state_keys: tuple[str, ...] = ("optimizer", "lr", "momentum", "lr_step_epochs", "lr_gamma")
    path_keys: tuple[str, ...] = ("data", "val_data")  # settings that are paths: compared as absolute paths
    title = "training"  # curve.png's title

    def __init__(self, cfg, dd: Optional[distributed.Dist] = None):
        self.cfg = cfg
        self.dd = dd or distributed.Dist()
        self.device = distributed.resolve_device(cfg.device, self.dd.local_rank)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.channels_last = self.device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)
        self.out = Path(cfg.out)
        self.log = print_line if self.dd.main else _silent
        self.steps = 0  # optimizer steps per epoch: set by setup
        self.history: list[dict] = []

    @property
    def fields(self) -> tuple[str, ...]:
        """The CSV's columns: the loop's and the task's."""
        return ("epoch", "step", "lr", "train_loss", "val_loss", *self.columns, "best_val", "bad_epochs", "seconds")

    # ---- the stages a task defines ----
    def setup(self) -> None:
        """Load the data and set ``self.steps``."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """``cfg.optimizer``: "adam" (betas ``(cfg.momentum, 0.999)``) or "sgd" (momentum ``cfg.momentum``)."""
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum)
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, betas=(self.cfg.momentum, 0.999))

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        """lr times ``cfg.lr_gamma`` every ``cfg.lr_step_epochs`` epochs (none when that is None)."""
        if not self.cfg.lr_step_epochs:
            return None
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.cfg.lr_step_epochs, gamma=self.cfg.lr_gamma)

    def train_batches(self, epoch: int) -> Iterable[list]:
        """Per optimizer step of ``epoch``, this process's micro-batches (whatever ``make_batch`` takes)."""
        raise NotImplementedError

    def make_batch(self, batch, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of one micro-batch, on the device."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, epoch: int) -> dict:
        """Validation metrics after ``epoch`` (1-based), computed on rank 0 with ``self.model``; at least
        ``val_loss`` where there is validation data."""
        return {}

    def score(self, row: dict) -> float:
        """The number that picks best.pt and drives early stopping: lower is better (validation loss)."""
        value = row.get("val_loss")
        return float("nan") if value is None else float(value)

    def on_start(self) -> None:
        """Before the first epoch, after the model and the logs exist (rank 0: e.g. baselines)."""

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        """After the epoch's row is logged and before its checkpoint (rank 0: e.g. previews)."""

    def checkpoint_extra(self, epoch: int) -> dict:
        """More entries of the epoch's checkpoint (plain values)."""
        return {}

    def load_extra(self, state: dict) -> None:
        """On resume, after the checkpoint is loaded: the task's own state back from its ``checkpoint_extra``."""

    def check_resume(self, state: dict) -> None:
        """Refuse a checkpoint that does not belong to this run: one whose recorded ``state_keys`` or (unless
        ``cfg.resume_anyway``) ``resume_keys`` differ from this run's, each difference listed."""
        recorded, now = state.get("config", {}), self.summary()
        fixed = _differences(recorded, now, self.state_keys, self.path_keys)
        free = _differences(recorded, now, self.resume_keys, self.path_keys)
        if fixed or (free and not self.cfg.resume_anyway):
            raise ValueError(_refusal(self.resume_path, fixed, [] if self.cfg.resume_anyway else free))

    def summary(self) -> dict:
        """The settings as plain values, for checkpoints and config.json."""
        return {k: _plain(v) for k, v in vars(self.cfg).items()}

    # ---- the loop ----
    @property
    def last_path(self) -> Path:
        return self.out / self.checkpoint_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / self.checkpoint_dir / "best.pt"

    @property
    def resume_path(self) -> Path:
        """The checkpoint ``cfg.resume`` names: True is ``last_path``."""
        return self.last_path if self.cfg.resume is True else Path(self.cfg.resume)

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` in the run's memory format and precision."""
        if self.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=_channels_last(x.dim()))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return module(x)

    def fit(self) -> list[dict]:
        """Train (or resume) until ``cfg.epochs``, early stopping or the time limit; returns this call's rows.
        ``self.stopped`` says why it stopped: "epochs", "early_stop" or "time"."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.setup()
        self._build()
        self._open_logs()
        self.on_start()
        self.stopped = "early_stop" if self._patience_spent() else "epochs"
        self._t_start = time.perf_counter()
        while self.epoch < self.cfg.epochs and not self._patience_spent():
            if self._run_epoch():
                break
        if self.dd.main and self.tb is not None:
            self.tb.close()
        return self.history

    def _patience_spent(self) -> bool:
        return self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience

    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = self.build_model().to(self.device)
        if self.channels_last:  # the format of the model's convolutions: 4-D weights for 2-D networks
            ranks = {p.dim() for p in self.model.parameters() if p.dim() in (4, 5)}
            if len(ranks) == 1:
                self.model.to(memory_format=_channels_last(ranks.pop()))
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = self.build_scheduler(self.optimizer)
        self.epoch, self.best, self.bad_epochs, self.best_epoch = 0, math.inf, 0, None
        if not self.cfg.resume and self.last_path.exists():
            raise ValueError(
                f"{self.out} already holds a run ({self.last_path}); pass --resume (resume=True) to continue it, "
                "or choose another --out"
            )
        if self.cfg.resume:
            self._load(self.resume_path)
        self.net = self.model
        if self.dd.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.fwd = torch.compile(self.net) if self.cfg.compile else self.net

    def _load(self, path: Path) -> None:
        try:
            state = load_training_state(path)
        except CheckpointError as e:
            if path != self.last_path or not self.best_path.is_file():
                raise
            raise CheckpointError(
                f"{e}. To continue the run from its best checkpoint: --resume {self.best_path}"
            ) from e
        self.check_resume(state)
        fix = "resume with the run's own settings (--width, --dims, ...) or start a new run in another --out"
        load_state(self.model, state["state_dict"], path, fix=fix)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.bad_epochs = int(state["epoch"]), float(state["best_val"]), int(state["bad_epochs"])
        self.best_epoch = state.get("best_epoch")
        self.load_extra(state)

    def _open_logs(self) -> None:
        self.csv = self.tb = None
        if not self.dd.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.summary(), indent=2, default=str))
        resumed = self.epoch if self.cfg.resume else None
        self.csv = CsvLog(self.out / self.csv_name, resumed, self.fields)
        purge = self.epoch * self.steps if self.cfg.resume else None
        self.tb = TensorBoard(self.out / "tensorboard", purge_step=purge, enabled=self.cfg.tensorboard)

    def _run_epoch(self) -> bool:
        """One epoch, its validation, logs and checkpoints; True when the run stops after it."""
        t_epoch = time.perf_counter()
        train_loss = self._train_epoch(self.epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        metrics = self.validate(self.epoch) if self.dd.main else {}
        row = {"epoch": self.epoch, "step": self.epoch * self.steps, "lr": lr, "train_loss": train_loss, **metrics}
        elapsed = time.perf_counter() - self._t_start
        out_of_time = self.cfg.max_minutes is not None and elapsed >= self.cfg.max_minutes * 60
        score, out_of_time = self._agree(self.score(row), out_of_time)
        improved = score < self.best
        self.best, self.bad_epochs = (score, 0) if improved else (self.best, self.bad_epochs + 1)
        self.best_epoch = self.epoch if improved else self.best_epoch
        row.update(best_val=self.best, bad_epochs=self.bad_epochs, seconds=round(time.perf_counter() - t_epoch, 3))
        self.history.append(row)
        if self.dd.main:
            self._log_epoch(row, improved)
        self.dd.barrier()
        if self._patience_spent():
            self.stopped = "early_stop"
        elif out_of_time:
            self.stopped = "time"
        return self._patience_spent() or out_of_time

    def _agree(self, score: float, out_of_time: bool) -> tuple[float, bool]:
        """Rank 0's score and clock, for every rank (they then take the same decisions)."""
        device = self.device if self.device.type == "cuda" else "cpu"
        flags = self.dd.broadcast(torch.tensor([score, float(out_of_time)], dtype=torch.float64, device=device))
        return float(flags[0]), bool(flags[1])

    def _log_epoch(self, row: dict, improved: bool) -> None:
        self.csv.write(row)
        for key, value in row.items():  # train_loss -> train/loss, val_none -> val/none, lr -> lr
            if key.startswith(("train_", "val_", "lr")) and isinstance(value, float):
                self.tb.scalar(key.replace("_", "/", 1), value, row["step"])
        self._save_curve()
        self.on_epoch_end(row["epoch"], row)
        self.tb.flush()
        state = seal(
            {
                "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "epoch": row["epoch"],
                "best_val": self.best,
                "bad_epochs": self.bad_epochs,
                "best_epoch": self.best_epoch,
                "config": self.summary(),
                "format": FORMAT,
                **self.checkpoint_extra(row["epoch"]),
            }
        )
        if improved:
            atomic_save(state, self.best_path)
        atomic_save(state, self.last_path)
        self.log(self.epoch_line(row, improved))

    def epoch_line(self, row: dict, improved: bool) -> str:
        """The line printed after each epoch."""
        shown = [k for k in self.fields if k not in ("epoch", "step", "lr", "best_val", "bad_epochs", "seconds")]
        values = "  ".join(f"{k} {_fmt(row.get(k))}" for k in shown if row.get(k) is not None)
        return f"epoch {row['epoch']}: {values}{'  *' if improved else ''}  ({row['seconds']:.1f} s)"

    def baselines(self) -> dict:
        """Horizontal lines of curve.png, {label: loss} (none by default)."""
        return {}

    def where(self, epoch: int, step: int) -> str:
        """Which samples a step trained on, for the non-finite loss error (e.g. their global indices)."""
        return ""

    def _save_curve(self) -> None:
        """``curve.png``: training and validation loss of every epoch so far (from the CSV, so a resumed run draws
        its whole history) against the steps."""
        rows = read_csv(self.out / self.csv_name)
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in ("train_loss", "val_loss")}
        image = curve_image(series, self.baselines(), self.title)
        if image is not None:
            save_png(image, self.out / "curve.png")

    def _train_epoch(self, epoch: int) -> float:
        """The epoch's optimizer steps; the sample-weighted mean training loss."""
        batches = self.train_batches(epoch)
        bar = progress_bar(self.steps, f"epoch {epoch + 1}", "step", self.dd.main and self.cfg.progress, leave=False)
        reader = _LossReader(self, epoch, bar)
        for step, micro_batches in enumerate(batches):
            self.optimizer.zero_grad(set_to_none=True)
            loss, n = self._step(micro_batches, epoch, step)
            reader.add(step, self.dd.all_reduce_mean(loss), n)
            self.optimizer.step()
            if len(reader.pending) == self.cfg.log_every or step == self.steps - 1:
                reader.read()
            bar.update(1)
        bar.close()
        return reader.total / max(reader.count, 1)

    def _step(self, micro_batches: list, epoch: int, step: int) -> tuple[torch.Tensor, int]:
        """Forward and backward over the step's micro-batches (gradients averaged); the mean loss on the device."""
        total, n = torch.zeros((), device=self.device), 0
        for c, batch in enumerate(micro_batches):
            x, target = self.make_batch(batch, epoch, step)
            sync = self.dd.world == 1 or c == len(micro_batches) - 1
            with self.net.no_sync() if not sync else contextlib.nullcontext():
                loss = self.loss(self.forward(self.fwd, x), target)
                loss.backward()
            total, n = total + loss.detach(), n + x.shape[0]
        if len(micro_batches) > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(len(micro_batches))
            total = total / len(micro_batches)
        return total, n


class _LossReader:
    """The training loss of pending steps, read on the host every ``log_every`` steps (one GPU sync per read): the
    non-finite check, the per-step TensorBoard scalar and the progress bar."""

    def __init__(self, trainer: Trainer, epoch: int, bar):
        self.trainer, self.epoch, self.bar = trainer, epoch, bar
        self.pending: list = []  # (step, loss on the device, samples)
        self.total, self.count = 0.0, 0

    def add(self, step: int, loss: torch.Tensor, n: int) -> None:
        self.pending.append((step, loss, n))

    def read(self) -> None:
        t = self.trainer
        values = torch.stack([loss for _, loss, _ in self.pending]).tolist()
        for (step, _, n), value in zip(self.pending, values):
            if not math.isfinite(value):
                self.bar.close()
                kept = (
                    f"the last good checkpoint is {t.last_path} (epoch {self.epoch})"
                    if t.last_path.exists()
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"non-finite training loss ({value}) at epoch {self.epoch + 1}, step {step + 1}/{t.steps}"
                    f"{t.where(self.epoch, step)}; stopped before the next checkpoint; {kept}. Check the data for "
                    "NaN/Inf, or lower the learning rate."
                )
            self.total, self.count = self.total + value * n, self.count + n
            if t.dd.main:
                t.tb.scalar("train/loss_step", value, self.epoch * t.steps + step)
        self.bar.set_postfix(loss=f"{values[-1]:.5f}")
        self.pending.clear()


def _differences(recorded: dict, now: dict, keys: tuple[str, ...], path_keys: tuple[str, ...]) -> list[tuple]:
    """(field, recorded value, value now) for each of ``keys`` the checkpoint recorded with another value (settings it
    did not record, from an older version, are skipped)."""
    found = []
    for key in keys:
        if key in recorded:
            before, after = recorded[key], now.get(key)
            if key in path_keys:
                before, after = _absolute(before), _absolute(after)
            found += _field_differences(key, before, after)
    return found


def _field_differences(name: str, before, after) -> list[tuple]:
    """The differing values; dicts (e.g. the deformation settings) field by field."""
    if isinstance(before, dict) and isinstance(after, dict):
        shared = [k for k in before if k in after]
        return [d for k in shared for d in _field_differences(f"{name}.{k}", before[k], after[k])]
    return [] if before == after else [(name, before, after)]


def _absolute(paths):
    """A path setting (a path, a list of them or None) with absolute paths: the same files compare equal."""
    if isinstance(paths, list):
        return [os.path.abspath(p) for p in paths]
    return None if paths is None else os.path.abspath(paths)


def _refusal(path: Path, fixed: list[tuple], free: list[tuple]) -> str:
    """Why --resume refuses ``path`` and what to do; ``fixed`` and ``free``: the differing state_keys and
    resume_keys."""
    lines = [f"--resume: {path} was written by a run with other settings; nothing was loaded or written:"]
    lines += [f"  {name}: {before!r} recorded vs {after!r} now" for name, before, after in fixed + free]
    lines.append(
        "Pass the recorded values to continue that run, or start a new run in another --out (from these weights: "
        "--init, or --weights for fine-tuning)."
    )
    if free:
        lines.append(
            f"Or pass --resume-anyway (resume_anyway=True) to continue with the new {', '.join(d[0] for d in free)}: "
            "best.pt and early stopping then compare validation losses across both settings."
        )
    if fixed:
        lines.append(
            f"--resume-anyway cannot change {', '.join(d[0] for d in fixed)}: the checkpoint's own state (model "
            "shapes, optimizer, lr schedule) holds the recorded values."
        )
    return "\n".join(lines)


def _channels_last(rank: int) -> torch.memory_format:
    """The channels-last memory format of tensors of ``rank`` (4: (N, C, H, W), 5: (N, C, X, Y, Z))."""
    return torch.channels_last if rank == 4 else torch.channels_last_3d


def _fmt(v) -> str:
    return f"{v:.5f}" if isinstance(v, float) else str(v)


def _plain(value):
    """Only weights_only-loadable values: dicts, lists, str, numbers, bool, None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
