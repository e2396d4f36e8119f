"""Imaging modalities: how a volume's values become the [0, 1] intensities Models Genesis deforms.

A :class:`Modality` declares, once, everything that depends on what the scanner measures: its intensity policy, the
extraction filter that suits it, what its values look like (a volume given under the wrong modality is warned about,
naming the file and its value range) and its DICOM ``Modality`` tag (0008,0060). A new modality is one entry in
:data:`MODALITIES`.

- ``ct``: values are Hounsfield units, clipped to [-1000, 1000] HU and scaled (the published recipe); the published
  lung filter.
- ``mr``: values have no absolute unit, so each volume is windowed on its own: clipped to the 0.5th and 99.5th
  percentiles of its body's voxels and scaled to [0, 1] (:data:`intensity.MR_WINDOW`). Percentiles, not the minimum
  and maximum that the published code's authors suggest, because one hot voxel (a vessel's inflow, a coil's
  near-field) would otherwise squeeze the whole image into a few grey levels; the body's voxels, not all of them,
  because the air around the patient would set the floor. Cubes are kept when they lie mostly inside the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cubes import Body, OfficialLung
from .intensity import CT_WINDOW, MR_WINDOW

AIR_HU = -500.0  # CT in HU has air (about -1000 HU) in almost every scan; its 1st percentile is far below this


class ModalityWarning(UserWarning):
    """A volume whose values do not look like the modality it was given as (e.g. an MRI given as CT)."""


def _low(data: np.ndarray) -> tuple[float, float, float]:
    finite = np.asarray(data)[np.isfinite(data)]
    if not finite.size:
        return 0.0, 0.0, 0.0
    return float(finite.min()), float(np.percentile(finite[:: max(1, finite.size >> 20)], 1)), float(finite.max())


def _not_hu(data: np.ndarray) -> str | None:
    lo, p1, hi = _low(data)
    if p1 <= AIR_HU:
        return None
    return (
        f"its values ({lo:g} .. {hi:g}, 1st percentile {p1:g}) do not look like Hounsfield units: CT in HU has air "
        "near -1000. An MRI? Use --modality mr. A CT without its rescale slope and intercept? Convert it to HU. (A "
        "crop without any air reads so too: then nothing is wrong)"
    )


def _hu_like(data: np.ndarray) -> str | None:
    lo, p1, hi = _low(data)
    if p1 > AIR_HU * 1.6:  # MR signal is rarely negative; HU air is -1000
        return None
    return f"its values ({lo:g} .. {hi:g}, 1st percentile {p1:g}) look like CT in Hounsfield units: use --modality ct"


@dataclass(frozen=True)
class Modality:
    """One modality: ``intensity`` (a window or percentile window), the extraction ``filter`` it suits, ``problem``
    (why a volume's values do not look like this modality, or None) and its DICOM ``Modality`` tag values."""

    name: str
    intensity: object
    filter: object
    problem: Callable[[np.ndarray], str | None]
    dicom: tuple[str, ...]


MODALITIES = {
    "ct": Modality("ct", CT_WINDOW, OfficialLung(), _not_hu, ("CT",)),
    "mr": Modality("mr", MR_WINDOW, Body(), _hu_like, ("MR",)),
}
DEFAULT_MODALITY = "ct"


def modality(name: str) -> Modality:
    """The modality called ``name``; ValueError listing the known ones."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; choose one of {', '.join(MODALITIES)}") from None


def from_dicom_tag(tag: str | None) -> str | None:
    """The modality whose DICOM ``Modality`` tag is ``tag`` ('CT', 'MR'), or None (no tag, or one we do not know)."""
    tag = (tag or "").strip().upper()
    return next((m.name for m in MODALITIES.values() if tag in m.dicom), None)


def value_warning(volume, name: str) -> str | None:
    """A warning naming ``volume``'s source and value range when its values do not look like modality ``name``."""
    problem = modality(name).problem(volume.data)
    return None if problem is None else f"{volume.source}: given as {name}, but {problem}"
