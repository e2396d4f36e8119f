"""Intensity windows (input units → [0, 1]) and optional resampling to a target spacing.

Models Genesis clips CT to [-1000, 1000] HU and scales by ``(v + 1000) / 2000`` (:data:`CT_WINDOW`). Any fixed
window works the same way; for modalities without absolute units (MRI, PET) a :class:`PercentileWindow` is resolved
per volume from its own intensity percentiles: :data:`MR_WINDOW` takes the 0.5th and 99.5th percentiles of the body's
voxels (:func:`body_mask`), so that the air around the patient does not set the window's floor. Every window
describes itself as a dict (``describe``) and :func:`intensity_from` rebuilds it, so a store, a checkpoint and a
prediction apply the same policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import Volume


@dataclass(frozen=True)
class Window:
    """A fixed intensity window ``[lo, hi]`` in input units (HU for CT): values are clipped to it, scaled to [0, 1]."""

    lo: float = -1000.0
    hi: float = 1000.0

    def __post_init__(self):
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"a window needs finite lo < hi, got [{self.lo}, {self.hi}]")

    def resolve(self, data: np.ndarray) -> "Window":
        return self

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``(clip(v, lo, hi) - lo) / (hi - lo)`` as float32: computed in float64 as the published script does, then
        rounded once (so cubes equal the published float64 values rounded to float32)."""
        v = np.clip(np.asarray(data, dtype=np.float64), self.lo, self.hi)
        return ((v - self.lo) / (self.hi - self.lo)).astype(np.float32)

    def level(self, value: float) -> float:
        """The input value at ``value`` (0..1) of the window."""
        return self.lo + value * (self.hi - self.lo)

    def describe(self) -> dict:
        return {"kind": "fixed", "lo": self.lo, "hi": self.hi}


CT_WINDOW = Window(-1000.0, 1000.0)


class IntensityWarning(UserWarning):
    """A batch far outside [0, 1] reached an op that deforms any float values (``genesis_ext.genesis_pair``)."""


UNIT_SLACK = 1.0  # beyond [-1, 2] a sample is not an image scaled to [0, 1] (HU, raw MR signal, z-scores)


def unit_range_problem(data) -> str | None:
    """Why ``data`` (a NumPy array or a CPU tensor) cannot be a Models Genesis sample, whose intensities lie in
    [0, 1] (the Bézier map and the painting values assume it), or None. Says which window to apply."""
    values = np.asarray(data)
    if values.size == 0 or (values.min() >= -UNIT_SLACK and values.max() <= 1.0 + UNIT_SLACK):
        return None
    finite = values[np.isfinite(values)]  # only now: NaN and Inf voxels are the ops' to carry, not a wrong range
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= -UNIT_SLACK and hi <= 1.0 + UNIT_SLACK:
        return None
    if lo < -100.0 or hi > 100.0:
        fix = (
            "CT in Hounsfield units? Window it first: genesis_ext.data.CT_WINDOW.apply(volume) (clip to "
            "[-1000, 1000] HU, scale to [0, 1]), or MONAI's ScaleIntensityRanged(keys, a_min=-1000, a_max=1000, "
            "b_min=0.0, b_max=1.0, clip=True)"
        )
    else:
        fix = (
            "scale it to [0, 1] first (MRI and other modalities without absolute units: "
            "genesis_ext.data.MR_WINDOW.resolve(volume).apply(volume), the body's 0.5-99.5th percentiles, or MONAI's "
            "ScaleIntensityRangePercentilesd(keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True))"
        )
    return f"intensities {lo:g} .. {hi:g} are far outside [0, 1], the range Models Genesis deforms; {fix}"


BACKGROUND_LEVEL = 0.1  # FSL BET's background threshold: 10 % of the 2nd-98th percentile range above the 2nd


def _strided(data: np.ndarray, max_samples: int) -> np.ndarray:
    """At most about ``max_samples`` finite values of ``data`` at a fixed stride (deterministic)."""
    flat = np.asarray(data).reshape(-1)
    flat = flat[:: max(1, flat.size // max_samples)]
    return flat[np.isfinite(flat)]


def _enclosed(mask: np.ndarray, axis: int) -> np.ndarray:
    """Voxels with a ``mask`` voxel at or before them and at or after them along ``axis``."""
    before = np.logical_or.accumulate(mask, axis=axis)
    after = np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)
    return before & after


def body_mask(data: np.ndarray, max_samples: int = 1 << 22) -> np.ndarray:
    """The body in a (x, y, z) volume without absolute units: voxels above the background threshold
    ``p2 + 0.1 (p98 - p2)`` (Smith's BET, Hum Brain Mapp 2002), and every voxel enclosed by such voxels along both x and
    y of its slice, so that dark organs inside the body (the spleen and kidneys on a T1 out-of-phase image) stay in."""
    p2, p98 = np.percentile(_strided(data, max_samples), [2, 98])
    bright = np.asarray(data) > p2 + BACKGROUND_LEVEL * (p98 - p2)
    return _enclosed(bright, 0) & _enclosed(bright, 1)


REGIONS = ("all", "body")


@dataclass(frozen=True)
class PercentileWindow:
    """A window from each volume's own ``p_lo``-th and ``p_hi``-th intensity percentiles (for non-CT modalities), over
    all voxels or over the ``body`` (:func:`body_mask`). Percentiles are estimated on at most ``max_samples`` voxels
    taken at a fixed stride (deterministic)."""

    p_lo: float = 0.5
    p_hi: float = 99.5
    region: str = "all"
    max_samples: int = 1 << 22

    def __post_init__(self):
        if not 0.0 <= self.p_lo < self.p_hi <= 100.0:
            raise ValueError(f"percentiles need 0 <= p_lo < p_hi <= 100, got {self.p_lo}, {self.p_hi}")
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {self.region!r}")

    def resolve(self, data: np.ndarray) -> Window:
        data = np.asarray(data)
        values = data[body_mask(data, self.max_samples)] if self.region == "body" else data
        lo, hi = (float(v) for v in np.percentile(_strided(values, self.max_samples), [self.p_lo, self.p_hi]))
        if not hi > lo:
            raise ValueError(
                f"the {self.p_lo}-{self.p_hi} percentile window is empty ({lo} .. {hi}): a constant volume?"
            )
        return Window(lo, hi)

    def describe(self) -> dict:
        return {"kind": "percentile", "p_lo": self.p_lo, "p_hi": self.p_hi, "region": self.region}


MR_WINDOW = PercentileWindow(0.5, 99.5, region="body")


def intensity_from(description) -> Window | PercentileWindow:
    """The window a ``describe()`` dict names (as stores and checkpoints record it); ValueError for anything else."""
    d = dict(description) if isinstance(description, dict) else {}
    kind = d.pop("kind", None)
    try:
        return {"fixed": Window, "percentile": PercentileWindow}[kind](**d)
    except (KeyError, TypeError):
        raise ValueError(
            f"an intensity policy is {{'kind': 'fixed', 'lo', 'hi'}} or {{'kind': 'percentile', 'p_lo', 'p_hi', "
            f"'region'}}, got {description!r}"
        ) from None


def _grid(volume: Volume, spacing):
    """The target spacing, the scale (old / new spacing) and, per axis, the old-grid coordinate of each new voxel
    centre (centre-aligned: new voxel j sits at old coordinate (j + 0.5) / scale - 0.5; voxel centres keep the same
    extent)."""
    target = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if target.shape != (3,) or not np.all(target > 0):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
    scale = np.asarray(volume.spacing, dtype=np.float64) / target
    shape = np.maximum(1, np.round(np.asarray(volume.shape) * scale).astype(int))
    coords = [(np.arange(int(n)) + 0.5) / s - 0.5 for n, s in zip(shape, scale)]
    return target, scale, coords


def _moved(volume: Volume, data: np.ndarray, target, scale, coords) -> Volume:
    """``data`` on the new grid, with the affine that keeps voxel -> patient positions correct."""
    offsets = np.array([c[0] for c in coords])
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ offsets + volume.affine[:3, 3]
    affine[:3, :3] = volume.affine[:3, :3] / scale
    return Volume(np.ascontiguousarray(data), tuple(float(s) for s in target), affine, volume.source)


def resample(volume: Volume, spacing) -> Volume:
    """``volume`` linearly resampled to ``spacing`` (mm per axis, (x, y, z)); voxel centres keep the same extent.

    Separable linear interpolation (trilinear), float32, edge values held. The affine is updated so voxel → patient
    positions stay correct. Published Models Genesis does not resample (it uses native spacing)."""
    target, scale, coords = _grid(volume, spacing)
    data = volume.data
    for axis, coord in enumerate(coords):
        n_old = data.shape[axis]
        coord = np.clip(coord, 0.0, n_old - 1)
        i0 = np.floor(coord).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_old - 1)
        bshape = [1, 1, 1]
        bshape[axis] = len(coord)
        w = (coord - i0).astype(np.float32).reshape(bshape)
        data = np.take(data, i0, axis=axis) * (1.0 - w) + np.take(data, i1, axis=axis) * w
    return _moved(volume, data.astype(np.float32), target, scale, coords)


def resample_nearest(volume: Volume, spacing) -> Volume:
    """``volume`` resampled to ``spacing`` by nearest neighbour, on the same grid as :func:`resample` gives: for label
    maps, whose values must stay labels. Keeps the dtype."""
    target, scale, coords = _grid(volume, spacing)
    data = volume.data
    for axis, coord in enumerate(coords):
        data = np.take(data, np.clip(np.rint(coord), 0, data.shape[axis] - 1).astype(np.intp), axis=axis)
    return _moved(volume, data, target, scale, coords)
