"""The bundled sample CT (data/sample in a source checkout: two small chest CT crops) and the fixed inputs that the
demo and the benchmarks cut from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cubes import PUBLISHED_CUBE
from .intensity import CT_WINDOW
from .io import load_volume

__all__ = ["SAMPLE_DIR", "SAMPLE_FILES", "load_ct", "random_cubes"]

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_FILES = ("pulmonary_ct.nii.gz", "aorta_ct.nii.gz")


def load_ct(path: Path) -> np.ndarray:
    """A 3D CT volume (x, y, z in LPS+, see ``genesis_ext.data.load_volume``) clipped to [-1000, 1000] HU and scaled
    to [0, 1], float32. With :func:`random_cubes`, the fixed inputs of the benchmarks."""
    return CT_WINDOW.apply(load_volume(path).data)


def random_cubes(volumes: list[np.ndarray], count: int, rng: np.random.Generator, size=PUBLISHED_CUBE):
    """``count`` cubes of ``size``, each from a uniformly chosen volume at a uniformly random position inside it
    (no filter, no margins). Returns the batch (count, 1, *size) float32 and a list of (volume index, origin)."""
    for v in volumes:
        if any(s < c for s, c in zip(v.shape, size)):
            raise ValueError(f"a volume of shape {v.shape} is smaller than the {size} cube")
    batch = np.empty((count, 1, *size), dtype=np.float32)
    where = []
    for n in range(count):
        k = int(rng.integers(len(volumes)))
        origin = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(volumes[k].shape, size))
        batch[n, 0] = volumes[k][tuple(slice(o, o + c) for o, c in zip(origin, size))]
        where.append((k, origin))
    return batch, where
