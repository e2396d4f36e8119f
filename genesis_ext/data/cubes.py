"""Random training cubes from a volume: candidate positions inside scaled margins, a filter, seeded and reproducible.

The published Models Genesis script draws up to 1,600 random 64x64x32 candidate crops per scan and keeps the first
32 that pass its lung filter, testing each candidate in a pure-Python voxel loop (~0.12 s per candidate). Here a
filter is a per-voxel score plus a threshold on the score's sum over the cube: the scores are summed over every
candidate at once from one integral image (summed-area table) of the volume, so a candidate costs 8 lookups.

Filters (all thresholds are on the input volume, in HU for CT; the window only shapes the output):

- :class:`OfficialLung` (``official-lung``), the published rule exactly: a voxel scores 1 if it is >= -150 HU, 0.5 if
  it is below but the voxel in the next slice (z + 1) is >= -150 HU, else 0; keep the cube if the score sum is at most
  15 % of its voxel count ("mostly lung"). :func:`official_lung_score_loop` is the published loop, kept as the oracle.
- :class:`Foreground` (``foreground``), for other organs and modalities: keep the cube if at least ``min_fraction``
  (0.6) of its voxels are above the window level ``level`` (0.05, which is -900 HU in the default [-1000, 1000]
  window: outside-body air is about -1000 HU, lung parenchyma mostly above -900 HU; for a percentile window it is 5 %
  of the robust range above the low percentile).
- :class:`Body` (``body``), for modalities without absolute units (MR): keep the cube if at least ``min_fraction``
  (0.6) of its voxels lie inside the body (:func:`intensity.body_mask`, on the region candidates can reach), dark
  organs included: no threshold in input units.
- :class:`NoFilter` (``none``): every candidate is kept.

Candidate origins are uniform over ``[margin, size - cube - extra - margin]`` per axis, ``extra`` being the slices
a filter reads beyond the cube (official-lung: the one slice after it). The published script crops Z + 3 slices (and
its range also leaves out the last origin) although its rule reads only Z + 1: that changes where candidates may
fall by a few slices, never how a candidate is judged.

Margins (:func:`margins_for`): the published 100/100/30-voxel margins assume 512x512 slices and scans with hundreds
of slices. ``"auto"`` scales them to the volume: 100/512 of the x and y lengths and 30/256 of the z length, but never
more than a quarter of the room the cube has to move along that axis (so both margins together leave at least half
of the positions), so a 512x512xZ scan keeps the published 100-voxel x/y margins and small or already-cropped volumes
still yield cubes. Explicit voxel margins (e.g. ``(100, 100, 30)``) are used as given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._util import deprecated_aliases
from .intensity import CT_WINDOW, Window, body_mask
from .io import label_map_reason

PUBLISHED_CUBE = (64, 64, 32)  # X Y Z voxels: the cube of the published script and weights
CUBES_PER_VOLUME = 32
CANDIDATES_PER_CUBE = 50  # the published script tries at most 50 x 32 = 1600 candidates per scan
PUBLISHED_MARGINS = (100, 100, 30)
MARGIN_FRACTIONS = (100 / 512, 100 / 512, 30 / 256)
__getattr__ = deprecated_aliases(__name__, {"CUBE": ("genesis_ext.data.cubes.PUBLISHED_CUBE", lambda: PUBLISHED_CUBE)})


def slice_cube(patch) -> tuple:
    """The cube that holds a 2-D axial patch (X, Y) of Models Genesis 2D: one slice thick, (X, Y, 1), as
    ``extract --dims 2`` stores it and 2-D training reads it."""
    return (*patch, 1)


def published_cube(dims: int = 3) -> tuple:
    """The published cube for ``dims`` (3 or 2) spatial axes: (64, 64, 32), or its axial patch as a cube of one slice,
    (64, 64, 1)."""
    return PUBLISHED_CUBE if dims == 3 else slice_cube(PUBLISHED_CUBE[:2])


class TooSmallError(ValueError):
    """The volume has no room for one cube (with the filter's extra slices and the margins)."""


@dataclass(frozen=True)
class OfficialLung:
    """The published "mostly lung" rule (see the module docstring). ``threshold`` in input units (HU)."""

    threshold: float = -150.0
    max_fraction: float = 0.15
    name = "official-lung"
    extra = (0, 0, 1)  # the rule reads the slice after the cube

    def voxel_scores(self, data: np.ndarray, window: Window) -> np.ndarray:
        """Scores in half units (2, 1 or 0) for ``data`` (X, Y, Z + 1) → (X, Y, Z), uint8."""
        above = data >= self.threshold
        here, nxt = above[..., :-1], above[..., 1:]
        return (here.astype(np.uint8) << 1) | (nxt & ~here).astype(np.uint8)

    def fraction(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        return sums * 0.5 / n_voxels

    def keep(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        # the published test: reject if sum(score) > max_fraction * n (score sums are exact in half units)
        return ~(sums * 0.5 > self.max_fraction * n_voxels)

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "max_fraction": self.max_fraction}


@dataclass(frozen=True)
class Foreground:
    """Keep a cube if at least ``min_fraction`` of its voxels are above the window level ``level`` (0..1)."""

    level: float = 0.05
    min_fraction: float = 0.6
    name = "foreground"
    extra = (0, 0, 0)

    def voxel_scores(self, data: np.ndarray, window: Window) -> np.ndarray:
        return (data > window.level(self.level)).view(np.uint8)

    def fraction(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        return sums / n_voxels

    def keep(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        return sums >= self.min_fraction * n_voxels

    def describe(self) -> dict:
        return {"name": self.name, "level": self.level, "min_fraction": self.min_fraction}


@dataclass(frozen=True)
class Body:
    """Keep a cube if at least ``min_fraction`` of its voxels are inside the body (:func:`intensity.body_mask`)."""

    min_fraction: float = 0.6
    name = "body"
    extra = (0, 0, 0)

    def voxel_scores(self, data: np.ndarray, window: Window) -> np.ndarray:
        return body_mask(data).view(np.uint8)

    def fraction(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        return sums / n_voxels

    def keep(self, sums: np.ndarray, n_voxels: int) -> np.ndarray:
        return sums >= self.min_fraction * n_voxels

    def describe(self) -> dict:
        return {"name": self.name, "min_fraction": self.min_fraction}


@dataclass(frozen=True)
class NoFilter:
    """Keep every candidate."""

    name = "none"
    extra = (0, 0, 0)

    def describe(self) -> dict:
        return {"name": self.name}


FILTERS = {"official-lung": OfficialLung, "foreground": Foreground, "body": Body, "none": NoFilter}


def make_filter(name: str, **params):
    """A filter by its name (``official-lung``, ``foreground``, ``body``, ``none``) with optional parameters."""
    try:
        return FILTERS[name](**params)
    except KeyError:
        raise ValueError(f"unknown filter {name!r}; choose one of {', '.join(FILTERS)}") from None


def thin_axes(shape, need) -> list[int]:
    """The axes along which ``shape`` is shorter than ``need``."""
    return [a for a in range(3) if shape[a] < need[a]]


def pad_to(data: np.ndarray, need, value: float) -> tuple[np.ndarray, list]:
    """``data`` padded with ``value`` to at least ``need`` voxels per axis, evenly on both sides (the odd voxel
    after), and the ``[before, after]`` voxels added per axis."""
    pads = [[(n - s) // 2, n - s - (n - s) // 2] if s < n else [0, 0] for s, n in zip(data.shape, need)]
    return np.pad(data, pads, constant_values=value), pads


def margins_for(shape, cube=PUBLISHED_CUBE, margins="auto", extra=(0, 0, 0)) -> tuple:
    """Border margins in voxels per axis (see the module docstring). Raises :class:`TooSmallError` when the volume
    has no room for a cube of ``cube`` (+ ``extra`` slices the filter reads)."""
    need = [c + e for c, e in zip(cube, extra)]
    room = [s - n for s, n in zip(shape, need)]
    if min(room) < 0:
        thin = ", ".join(f"{'xyz'[a]} has {shape[a]} voxels, the cube needs {need[a]}" for a in thin_axes(shape, need))
        raise TooSmallError(
            f"volume {tuple(shape)} is thinner than the cube {tuple(cube)}"
            + (f" plus {tuple(extra)} voxels the filter reads" if any(extra) else "")
            + f": {thin}"
        )
    if isinstance(margins, str):
        if margins != "auto":
            raise ValueError(f"margins must be 'auto' or three voxel counts, not {margins!r}")
        return tuple(min(int(f * s), r // 4) for f, s, r in zip(MARGIN_FRACTIONS, shape, room))
    margins = tuple(int(m) for m in np.broadcast_to(margins, 3))
    if any(m < 0 for m in margins):
        raise ValueError(f"margins must be >= 0, got {margins}")
    if any(2 * m > r for m, r in zip(margins, room)):
        raise TooSmallError(f"volume {tuple(shape)} has no room for the cube {tuple(cube)} inside margins {margins}")
    return margins


@dataclass
class Cubes:
    """Cubes cut from one volume: ``cubes`` float32 (n, X, Y, Z) in [0, 1]; ``origins`` int (n, 3) voxel index of
    each cube's first corner; ``scores`` the filter's fraction per cube (NaN without a filter); ``candidates`` how many
    candidates were tested; ``window`` the resolved window; ``margins`` the margins used."""

    cubes: np.ndarray
    origins: np.ndarray
    scores: np.ndarray
    candidates: int
    window: Window
    margins: tuple


class BoxScorer:
    """Sums a filter's per-voxel score over cube-sized boxes of one volume, via an integral image of the region that
    candidates can reach. ``sums(origins)`` → the score sum of each box with that origin."""

    def __init__(self, data: np.ndarray, filt, window: Window, cube, lo, hi):
        ext = [c + e for c, e in zip(cube, filt.extra)]
        region = tuple(slice(a, b + n) for a, b, n in zip(lo, hi, ext))
        score = filt.voxel_scores(data[region], window)
        # int32 may wrap for huge regions, but box sums are exact modulo 2^32 and every box sum is < 2^31
        integral = np.zeros(tuple(s + 1 for s in score.shape), dtype=np.int32)
        np.cumsum(score, axis=0, dtype=np.int32, out=integral[1:, 1:, 1:])
        np.cumsum(integral[1:, 1:, 1:], axis=1, out=integral[1:, 1:, 1:])
        np.cumsum(integral[1:, 1:, 1:], axis=2, out=integral[1:, 1:, 1:])
        self.integral, self.lo, self.cube = integral, np.asarray(lo), np.asarray(cube)

    def sums(self, origins: np.ndarray) -> np.ndarray:
        a = np.asarray(origins) - self.lo
        b = a + self.cube
        t = self.integral
        with np.errstate(over="ignore"):
            total = (
                t[b[:, 0], b[:, 1], b[:, 2]]
                - t[a[:, 0], b[:, 1], b[:, 2]]
                - t[b[:, 0], a[:, 1], b[:, 2]]
                - t[b[:, 0], b[:, 1], a[:, 2]]
                + t[a[:, 0], a[:, 1], b[:, 2]]
                + t[a[:, 0], b[:, 1], a[:, 2]]
                + t[b[:, 0], a[:, 1], a[:, 2]]
                - t[a[:, 0], a[:, 1], a[:, 2]]
            )
        return total.astype(np.int64)


def origin_bounds(shape, cube=PUBLISHED_CUBE, filt=None, margins="auto"):
    """Inclusive ``(lo, hi)`` arrays of candidate origins, and the margins used."""
    extra = getattr(filt, "extra", (0, 0, 0))
    m = margins_for(shape, cube, margins, extra)
    lo = np.asarray(m)
    hi = np.asarray(shape) - np.asarray(cube) - np.asarray(extra) - lo
    return lo, hi, m


def cut_cube(data: np.ndarray, origin, cube, window: Window) -> np.ndarray:
    """The cube of size ``cube`` at ``origin`` of ``data``, windowed to [0, 1] (float32)."""
    return window.apply(data[tuple(slice(int(o), int(o) + int(c)) for o, c in zip(origin, cube))])


def extract_cubes(
    data: np.ndarray,
    *,
    cube=PUBLISHED_CUBE,
    count: int = CUBES_PER_VOLUME,
    max_candidates: int | None = None,
    filter=None,
    window=CT_WINDOW,
    margins="auto",
    rng=0,
) -> Cubes:
    """Up to ``count`` cubes of size ``cube`` from ``data`` (a (x, y, z) volume in input units, e.g. HU).

    Like the published script: draw up to ``max_candidates`` (default 50 x ``count``) uniformly random origins inside
    the margins, keep those the filter accepts, in draw order, until ``count`` are kept. The cubes are windowed to
    [0, 1]. ``filter``: an :class:`OfficialLung` (default), :class:`Foreground` or :class:`NoFilter`, or a filter name.
    ``rng``: a seed or a ``numpy.random.Generator`` (same seed, same cubes). Fewer than ``count`` cubes (possibly none)
    come back when too few candidates pass. Raises :class:`TooSmallError` when no cube fits, ValueError for a label
    map (a few integer values: its cubes would be flat, ``io.label_map_reason``).
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume (x, y, z), got shape {data.shape}")
    if reason := label_map_reason("", data):
        raise ValueError(f"this volume is {reason}: pass the scan, not its segmentation")
    cube = tuple(int(c) for c in cube)
    if len(cube) != 3 or min(cube) < 1:
        raise ValueError(f"cube must be three positive sizes, got {cube}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    filt = OfficialLung() if filter is None else make_filter(filter) if isinstance(filter, str) else filter
    max_candidates = CANDIDATES_PER_CUBE * count if max_candidates is None else int(max_candidates)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    lo, hi, used_margins = origin_bounds(data.shape, cube, filt, margins)
    window = window.resolve(data)

    origins = rng.integers(lo, hi + 1, size=(max_candidates, 3))
    if isinstance(filt, NoFilter):
        tried = min(count, max_candidates)
        kept, scores = np.arange(tried), np.full(max_candidates, np.nan)
    else:
        sums = BoxScorer(data, filt, window, cube, lo, hi).sums(origins)
        n = int(np.prod(cube))
        passing = np.flatnonzero(filt.keep(sums, n))
        kept = passing[:count]
        tried = int(kept[-1]) + 1 if len(kept) == count else max_candidates
        scores = filt.fraction(sums, n)
    origins = origins[kept]
    out = np.empty((len(kept), *cube), dtype=np.float32)
    for i, o in enumerate(origins):
        out[i] = cut_cube(data, o, cube, window)
    return Cubes(out, origins.astype(np.int64), np.asarray(scores[kept], dtype=np.float64), tried, window, used_margins)


def official_lung_score_loop(crop: np.ndarray, threshold: float = (-150.0 + 1000.0) / 2000.0, len_depth: int = 3):
    """The published filter as its voxel loop (the oracle for the vectorised rule; ~0.1 s per 64x64x32 crop).

    ``crop``: a windowed [0, 1] crop (X, Y, Z + k), k >= 1 (the published script crops Z + 3 slices); the cube is its
    first Z = ``crop.shape[2] - len_depth`` slices. For each cube voxel, look at it and the next ``len_depth - 1``
    slices; the first depth k at or above the threshold gives the voxel the score ``1 - k / (len_depth - 1)``; none
    gives 0. Returns the score sum; the published script keeps the crop if the sum is <= 0.15 x the voxel count.
    """
    rows, cols, deps = crop.shape[0], crop.shape[1], crop.shape[2] - len_depth
    total = 0.0
    for d in range(deps):
        for i in range(rows):
            for j in range(cols):
                depth = len_depth - 1
                for k in range(len_depth):
                    if crop[i, j, d + k] >= threshold:
                        depth = k
                        break
                total += 1.0 - depth / (len_depth - 1)
    return total
