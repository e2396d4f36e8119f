"""Real CT in, training cubes out: volume loading, intensity windows, cube extraction, cube stores and datasets.

    from genesis_ext.data import load_volume, extract_cubes, CubeStoreDataset

    volume = load_volume("scan.nii.gz")          # float32 (x, y, z) in LPS+, HU; volume.spacing in mm
    cubes = extract_cubes(volume.data, rng=0)    # published recipe: 64x64x32, [-1000, 1000] HU -> [0, 1], lung filter
    cubes.cubes                                  # (n, 64, 64, 32) float32

The command line ``genesis-ext extract`` runs the same pipeline over many volumes into a cube store.
"""

from .._util import deprecated_aliases
from .cubes import (
    PUBLISHED_CUBE,
    Body,
    Cubes,
    Foreground,
    NoFilter,
    OfficialLung,
    TooSmallError,
    extract_cubes,
    make_filter,
    margins_for,
    official_lung_score_loop,
    published_cube,
)
from .datasets import CubeStoreDataset, VolumeCubeDataset
from .extraction import ExtractSettings, Summary, run_extract
from .intensity import CT_WINDOW, MR_WINDOW, PercentileWindow, Window, body_mask, resample
from .io import ORIENTATION, Source, Volume, VolumeError, find_sources, load_volume
from .modality import MODALITIES, Modality, ModalityWarning
from .store import CubeStore, StoreError, load_published, read_manifest, save_published

__getattr__ = deprecated_aliases(__name__, {"CUBE": ("genesis_ext.data.PUBLISHED_CUBE", lambda: PUBLISHED_CUBE)})

__all__ = [
    "Body",
    "CT_WINDOW",
    "MODALITIES",
    "MR_WINDOW",
    "Modality",
    "ModalityWarning",
    "CubeStore",
    "CubeStoreDataset",
    "Cubes",
    "ExtractSettings",
    "Foreground",
    "NoFilter",
    "ORIENTATION",
    "OfficialLung",
    "PUBLISHED_CUBE",
    "PercentileWindow",
    "Source",
    "StoreError",
    "Summary",
    "TooSmallError",
    "Volume",
    "VolumeCubeDataset",
    "VolumeError",
    "Window",
    "body_mask",
    "extract_cubes",
    "find_sources",
    "load_published",
    "load_volume",
    "make_filter",
    "margins_for",
    "official_lung_score_loop",
    "published_cube",
    "read_manifest",
    "resample",
    "run_extract",
    "save_published",
]
