"""Run logs: a CSV of one row per epoch, TensorBoard scalars (when ``tensorboard`` is installed) and PNG previews
(mid-Z slices of deformed input / target / restoration). Only rank 0 writes."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np

from .._util import atomic_write


class CsvLog:
    """A CSV of one row per epoch with columns ``fields``; on resume, rows after the checkpoint's epoch (written
    before a crash) are dropped."""

    def __init__(self, path: Path, resume_epoch: int | None, fields: tuple[str, ...]):
        self.path, self.fields = path, tuple(fields)
        rows = []
        if resume_epoch is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]

        def write(f):
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

        atomic_write(path, write, text=True)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k) for k in self.fields})
            f.flush()
            os.fsync(f.fileno())


_INTEGERS = ("epoch", "step", "samples", "bad_epochs", "collapsed")  # metrics.csv columns of whole numbers


def read_csv(path) -> list[dict]:
    """The rows of a ``metrics.csv`` with numbers parsed."""
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k in _INTEGERS else float(v)) if v != "" else None for k, v in r.items()}
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


_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def curve_image(
    series: dict, lines: dict, title: str, xlabel: str = "step", ylabel: str = "MSE", y_range: tuple | None = None
) -> np.ndarray | None:
    """An RGB uint8 line plot: ``series`` name -> [(x, y), ...] as solid lines, ``lines`` name -> y as dashed
    horizontal lines (the baselines), a legend and labelled axes. A line far above the curves (over twice their
    highest value, like the identity baseline) is left off the axes and its value given in the legend, so it does
    not flatten them. ``y_range``: fixed (low, high) of the y axis (e.g. (0, 1) for a Dice), else fitted to the data.
    None without Pillow."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return None
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    w, h, left, right, top, bottom = 760, 440, 70, 20, 34, 46
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None and np.isfinite(y)]
    top_of_curves = max((y for _, y in points), default=np.inf)
    shown = {n: y for n, y in lines.items() if y is not None and np.isfinite(y) and y <= 2 * top_of_curves}
    ys = [y for _, y in points] + list(shown.values())
    x_hi = max([x for x, _ in points], default=1) or 1
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi), 1e-6) * 0.05
    y_lo, y_hi = y_range or (y_lo - pad, y_hi + pad)

    def at(x, y):
        return left + (w - left - right) * x / x_hi, top + (h - top - bottom) * (y_hi - y) / (y_hi - y_lo)

    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    _draw_ticks(draw, at, (x_hi, y_lo, y_hi), (left, h - bottom, w), font)
    draw.text((w // 2 - 30, h - 18), xlabel, fill=(0, 0, 0), font=font)
    draw.text((left, 8), f"{title}    ({ylabel})", fill=(0, 0, 0), font=font)
    legend = []
    for k, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        xy = [at(x, y) for x, y in pts if y is not None and np.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        elif xy:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        legend.append((name, colour, False))
    for k, (name, y) in enumerate(lines.items()):
        colour = (120, 120, 120) if k == 0 else (230, 140, 0)
        if name in shown:
            (x0, py), (x1, _) = at(0, y), at(x_hi, y)
            for s in np.arange(x0, x1, 12):
                draw.line([s, py, min(s + 6, x1), py], fill=colour, width=2)
            legend.append((f"{name} {y:.3g}", colour, True))
        else:
            legend.append((f"{name} {y:.3g} (above the chart)", colour, True))
    _draw_legend(draw, legend, w - right - 230, top + 8, font)
    return np.asarray(image)


def _draw_ticks(draw, at, ranges: tuple, frame: tuple, font) -> None:
    """Six ticks with their values on each axis; ``at`` maps data to pixels, ``frame`` is the plot's left and bottom
    edges and the image's width."""
    (x_hi, y_lo, y_hi), (left, bottom, image_width) = ranges, frame
    for k in range(6):
        y = y_lo + (y_hi - y_lo) * k / 5
        _, py = at(0, y)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((4, py - 7), f"{y:.3g}", fill=(0, 0, 0), font=font)
        px, _ = at(x_hi * k / 5, y_lo)
        draw.line([px, bottom, px, bottom + 4], fill=(0, 0, 0))
        label = f"{x_hi * k / 5:.0f}"
        width = draw.textlength(label, font=font)  # centred under its tick, and inside the image at the right end
        draw.text((min(px - width / 2, image_width - width - 2), bottom + 6), label, fill=(0, 0, 0), font=font)


def _draw_legend(draw, legend: list, x: int, y: int, font) -> None:
    """One row per (name, colour, dashed) entry from (x, y) down: a line sample and the name."""
    for k, (name, colour, dashed) in enumerate(legend):
        row = y + 17 * k
        draw.line([x, row + 7, x + 24, row + 7], fill=colour, width=2 if not dashed else 1)
        draw.text((x + 30, row), name, fill=(0, 0, 0), font=font)
