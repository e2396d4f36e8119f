"""Run logs: a CSV of one row per epoch, TensorBoard scalars (when ``tensorboard`` is installed) and PNG previews
(mid-Z slices of deformed input / target / restoration). Only rank 0 writes."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np

from .._util import atomic_write

# val_<branch>: the validation MSE of the pairs of one painting branch (none, in-painting, out-painting)
CSV_FIELDS = (
    "epoch",
    "step",
    "samples",
    "lr",
    "train_loss",
    "val_loss",
    "val_none",
    "val_inpaint",
    "val_outpaint",
    "best_val",
    "bad_epochs",
    "seconds",
)


class CsvLog:
    """``metrics.csv``; on resume, rows after the checkpoint's epoch (written before a crash) are dropped."""

    def __init__(self, path: Path, resume_epoch: int | None):
        self.path = path
        rows = []
        if resume_epoch is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]

        def write(f):
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

        atomic_write(path, write, text=True)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
            f.flush()
            os.fsync(f.fileno())


def read_csv(path) -> list[dict]:
    """The rows of a ``metrics.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        return [
            {
                k: (float(v) if k not in ("epoch", "step", "samples", "bad_epochs") else int(v)) if v != "" else None
                for k, v in r.items()
            }
            for r in csv.DictReader(f)
        ]


class TensorBoard:
    def __init__(self, logdir: Path, purge_step: int | None, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn(
                "tensorboard is not installed (pip install 'genesis-ext[train]'): no TensorBoard logs", stacklevel=2
            )
            return
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png_array: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, png_array, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def preview_image(
    deformed: np.ndarray, target: np.ndarray, restored: np.ndarray, rows: int = 4, scale: int = 3
) -> np.ndarray:
    """An RGB uint8 image: one row per sample, its mid-Z slice as deformed input | target | restoration."""
    n = min(rows, deformed.shape[0])
    mid = deformed.shape[-1] // 2
    gap = 2
    tiles = []
    for i in range(n):
        parts = [np.clip(np.nan_to_num(a[i, 0, :, :, mid].T), 0, 1) for a in (deformed, target, restored)]
        h = parts[0].shape[0]
        sep = np.ones((h, gap), dtype=np.float32)
        tiles.append(np.concatenate([parts[0], sep, parts[1], sep, parts[2]], axis=1))
        tiles.append(np.ones((gap, tiles[-1].shape[1]), dtype=np.float32))
    img = np.concatenate(tiles[:-1], axis=0)
    img = np.kron(img, np.ones((scale, scale), dtype=np.float32))
    img = (img * 255 + 0.5).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def save_png(image: np.ndarray, path: Path) -> bool:
    try:
        from PIL import Image
    except ImportError:
        warnings.warn("Pillow is not installed: no PNG previews", stacklevel=2)
        return False
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
    return True
