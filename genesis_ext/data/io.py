"""Loading CT volumes (NIfTI, DICOM series, MetaImage, NRRD) in one canonical orientation.

Every loader returns a :class:`Volume` whose array is indexed ``(x, y, z)`` in the **LPS+** orientation:
x increases towards the patient's Left, y towards Posterior, z towards Superior (z is the cranio-caudal axis).
LPS+ is the DICOM patient frame and the orientation of most CT files (LUNA16 MetaImage, DICOM axial series),
so they load without any copy-reordering; other files are flipped/permuted to the closest LPS+ axes (oblique
volumes are not resampled: each voxel axis goes to the patient axis it is closest to). Spacing is in mm per axis,
in the same (x, y, z) order. Values are float32, in Hounsfield units for CT (DICOM rescale slope/intercept and
NIfTI scl_slope/scl_inter are applied).

NIfTI is read with nibabel (a core dependency); DICOM series, MetaImage (.mhd/.mha) and NRRD need SimpleITK
(``pip install 'genesis-ext[io]'``). DICOM slices are ordered by their position (GDCM's position sorter), never by
file name.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORIENTATION = ("L", "P", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED = "NIfTI (.nii, .nii.gz), MetaImage (.mhd, .mha), NRRD (.nrrd, .nhdr), a DICOM series directory or .dcm file"
_INSTALL_IO = "pip install 'genesis-ext[io]'"
AFFINE_TOLERANCE = 1e-2  # mm: images that share a voxel grid (channels, an image and its labels) agree within this


class VolumeError(ValueError):
    """A volume that cannot be used, with the file it came from: ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process boundaries
        return type(self), (self.path, self.reason)


@dataclass
class Volume:
    """A 3D scan. ``data``: float32 ``(x, y, z)`` in LPS+ (HU for CT), usually laid out x-fastest in memory (Fortran
    order, as NIfTI and ITK store it; no negative strides); ``spacing``: mm along x, y, z; ``affine``: 4x4 map from
    voxel index (x, y, z) to patient LPS coordinates in mm; ``source``: where it came from; ``modality``: the DICOM
    Modality tag (0008,0060), e.g. 'CT' or 'MR', where the file has one (None for NIfTI, MetaImage, NRRD)."""

    data: np.ndarray
    spacing: tuple
    affine: np.ndarray = field(repr=False)
    source: str = ""
    modality: str | None = None

    @property
    def shape(self) -> tuple:
        return self.data.shape


@dataclass(frozen=True)
class Source:
    """One volume to load: a file, or a DICOM directory (optionally one series of it). ``key`` names it stably
    (relative to the input it was found under); it seeds the volume's cubes and names its output."""

    path: str
    key: str
    series_uid: str | None = None
    input: str = ""  # the input (file or directory argument) it was found under
    channels: tuple = ()  # a case of several files, one per channel (channel_cases): their paths, in channel order

    @property
    def tag(self) -> str:
        """A file-name-safe, unique name: the key's readable part plus a hash of the whole key."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", _strip_suffix(self.key).replace(os.sep, "__")).strip("_.")
        return f"{stem[-60:] or 'volume'}-{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES[::-1] + SITK_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _suffix_in(path: Path, suffixes) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def sitk_module():
    """SimpleITK, with its console warnings off, or an ImportError that says how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise ImportError(f"reading DICOM, MetaImage and NRRD needs SimpleITK: {_INSTALL_IO}") from err
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def is_dicom_file(path) -> bool:
    """True for a .dcm/.dicom file or any file with the DICOM preamble ('DICM' at byte 128)."""
    path = Path(path)
    if _suffix_in(path, DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def load_volume(path, *, series_uid: str | None = None, backend: str = "auto") -> Volume:
    """Load a 3D scan as a :class:`Volume` (float32, ``(x, y, z)`` in LPS+, spacing in mm).

    ``path``: a NIfTI file (nibabel), a MetaImage/NRRD file (SimpleITK), a DICOM file (its whole series is read) or
    a directory holding a DICOM series (``series_uid`` picks one when it holds several; by default the one with the
    most slices). ``backend="sitk"`` reads NIfTI with SimpleITK instead (both give the same array).
    Raises :class:`VolumeError` naming the file for anything unreadable, non-3D or empty.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or directory")
    if backend not in ("auto", "nibabel", "sitk"):
        raise ValueError(f"backend must be 'auto', 'nibabel' or 'sitk', not {backend!r}")
    if path.is_dir():
        return _load_dicom(path, series_uid)
    if _suffix_in(path, NIFTI_SUFFIXES) and backend != "sitk":
        return _load_nibabel(path)[0]
    if is_dicom_file(path):
        return _load_dicom(path.parent, series_uid or _series_of(path))
    if _suffix_in(path, NIFTI_SUFFIXES + SITK_SUFFIXES) or backend == "sitk":
        return _load_sitk_file(path)
    try:  # other formats SimpleITK may know; anything else is not an image
        sitk = sitk_module()
    except ImportError:
        raise VolumeError(path, f"not a supported image format; supported: {SUPPORTED}") from None
    if not sitk.ImageFileReader.GetImageIOFromFileName(str(path)):
        raise VolumeError(path, f"not a supported image format; supported: {SUPPORTED}")
    return _load_sitk_file(path)


def _check_3d(path, shape) -> None:
    if len(shape) != 3 or min(shape) < 2:
        raise VolumeError(path, f"is not a 3D volume (shape {tuple(shape)}); need one with at least 2 voxels per axis")


def _load_nibabel(path: Path, channels: bool = False) -> list[Volume]:
    """The volume of a NIfTI file, or with ``channels`` each channel of a 4-D (x, y, z, C) one (the Medical
    Segmentation Decathlon's layout for several co-registered sequences)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    try:
        img = nib.load(str(path))
        shape = img.shape
        while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): a 3D volume stored as 4D
            shape = shape[:-1]
        _check_3d(path, shape[:3] if channels and len(shape) == 4 else shape)
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except VolumeError:
        raise
    except Exception as err:  # nibabel raises many types for truncated or corrupt files (EOFError, zlib.error, ...)
        raise VolumeError(path, f"cannot read as NIfTI ({type(err).__name__}: {err})") from err
    transform, lps = _nifti_lps(path, img.affine, shape[:3])
    data = ornt.apply_orientation(data, transform)  # the first three axes; channels stay last
    stack = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    return [Volume(_positive_strides(d), _spacing(lps), lps, str(path)) for d in stack]


def load_channels(source: Source | str) -> list[Volume]:
    """The channels of one case, each a :class:`Volume` on the same grid: the files of a ``Source`` with
    ``channels``, or each channel of a 4-D NIfTI, or the one volume of any other file. Raises :class:`VolumeError`
    naming the files and shapes when the channels are not on one voxel grid."""
    source = source if isinstance(source, Source) else Source(str(source), Path(source).name)
    if source.channels:
        volumes = [load_volume(p) for p in source.channels]
    elif _suffix_in(Path(source.path), NIFTI_SUFFIXES) and Path(source.path).is_file():
        volumes = _load_nibabel(Path(source.path), channels=True)
    else:
        volumes = [load_volume(source.path, series_uid=source.series_uid)]
    first = volumes[0]
    for c, v in enumerate(volumes[1:], start=1):
        if v.shape != first.shape:
            problem = f"shape {v.shape}, channel 0 ({first.source}) {first.shape}"
        elif not np.allclose(v.affine, first.affine, atol=AFFINE_TOLERANCE):
            problem = f"another voxel-to-patient map (affine) than channel 0 ({first.source}), both {first.shape}"
        else:
            continue
        raise VolumeError(
            v.source,
            f"channel {c} has {problem}: the channels of a case must share one voxel grid (register and resample "
            "them onto one first)",
        )
    return volumes


CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's naming: <case>_0000.nii.gz, <case>_0001...


def channel_cases(sources, channels: int) -> tuple[list[Source], list[tuple[str, str]]]:
    """``sources`` as cases of ``channels`` channels: files named as nnU-Net names them (``<case>_0000.nii.gz`` ...
    ``<case>_{channels - 1:04d}``) become one source per case (key: the case; ``channels``: its files in order);
    any other source is a case by itself (a 4-D NIfTI holds its channels; a DICOM series one). Returns ``(cases,
    problems)``, a problem ``(path, reason)`` for each case whose channel files are not exactly 0 .. channels - 1."""
    by_case, cases, problems = {}, [], []
    for s in sources:
        match = CHANNEL_FILE.match(_strip_suffix(s.key))
        if match and channels > 1:
            by_case.setdefault(match["case"], {})[int(match["channel"])] = s
        else:
            cases.append(s)
    for case, files in by_case.items():
        if sorted(files) != list(range(channels)):
            found = ", ".join(f"{c:04d}" for c in sorted(files))
            problems.append((files[min(files)].path, f"case {case} has the channel files {found}; need 0000 .. "
                             f"{channels - 1:04d}"))  # fmt: skip
            continue
        first = files[0]
        cases.append(Source(first.path, case, None, first.input, tuple(files[c].path for c in range(channels))))
    return sorted(cases, key=lambda s: s.key), problems


def _nifti_lps(path: Path, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """The reorientation of a NIfTI array to ``ORIENTATION`` and the voxel-to-LPS affine after it."""
    from nibabel import orientations as ornt

    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "has an invalid (singular) affine")
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(ORIENTATION))
    ras = affine @ ornt.inv_ornt_aff(transform, shape)
    return transform, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras  # nibabel's world is RAS+, ours LPS+


def read_spacing(path) -> tuple:
    """The voxel spacing (mm along x, y, z) ``load_volume`` would give, from the header alone for NIfTI (no voxels
    read); other formats are loaded."""
    path = Path(path)
    if not _suffix_in(path, NIFTI_SUFFIXES):
        return load_volume(path).spacing
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # as _load_nibabel: many types for damaged files
        raise VolumeError(path, f"cannot read as NIfTI ({type(err).__name__}: {err})") from err
    return _spacing(_nifti_lps(path, img.affine, img.shape[:3])[1])


def _positive_strides(data: np.ndarray) -> np.ndarray:
    """``data`` as is (a view) unless a flip gave it a negative stride (which torch.from_numpy rejects): then a copy
    in the nearest memory order."""
    return data if min(data.strides) > 0 else np.array(data, order="K")


def _spacing(affine: np.ndarray) -> tuple:
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _from_sitk(path, image) -> Volume:
    sitk = sitk_module()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; need a scalar image"
        )
    _check_3d(path, image.GetSize())
    image = sitk.DICOMOrient(image, "".join(ORIENTATION))  # ITK's world is LPS: this makes the direction ~identity
    # ITK stores x fastest: convert in memory order, then view as (x, y, z) (a strided transposing copy is ~5x slower)
    data = np.array(sitk.GetArrayViewFromImage(image), dtype=np.float32).transpose(2, 1, 0)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return Volume(data, tuple(float(s) for s in image.GetSpacing()), affine, str(path))


def _load_sitk_file(path: Path) -> Volume:
    try:
        sitk = sitk_module()
    except ImportError as err:
        raise VolumeError(path, str(err)) from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise VolumeError(path, f"cannot read image ({reason})") from err
    return _from_sitk(path, image)


def _dicom_tag(path, tag: str) -> str | None:
    """The value of ``tag`` ('gggg|eeee') in one DICOM file (None if SimpleITK is missing or the tag is absent)."""
    try:
        sitk = sitk_module()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None
    except (ImportError, RuntimeError):
        return None


def dicom_tag_of(source: "Source", tag: str) -> str | None:
    """The value of ``tag`` in the first file of a DICOM source (None for other formats or without the tag)."""
    path = Path(source.path)
    if path.is_dir():
        files = dicom_series(path).get(source.series_uid) if source.series_uid else None
        files = files or next(iter(dicom_series(path).values()), [])
        return _dicom_tag(files[0], tag) if files else None
    return _dicom_tag(path, tag) if is_dicom_file(path) else None


def _series_of(path: Path) -> str | None:
    """The SeriesInstanceUID of one DICOM file."""
    return _dicom_tag(path, "0020|000e")


def dicom_series_ids(directory) -> list:
    """The series instance UIDs of the DICOM series directly in ``directory`` (one directory scan)."""
    return list(sitk_module().ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))


def dicom_series(directory) -> dict:
    """``{series_uid: [file, ...]}`` of the DICOM series directly in ``directory``, files sorted by slice position."""
    reader = sitk_module().ImageSeriesReader
    return {uid: list(reader.GetGDCMSeriesFileNames(str(directory), uid)) for uid in dicom_series_ids(directory)}


def _load_dicom(directory: Path, series_uid: str | None) -> Volume:
    try:
        sitk = sitk_module()
    except ImportError as err:
        raise VolumeError(directory, str(err)) from None
    series = dicom_series(directory)
    if not series:
        raise VolumeError(directory, "no DICOM series found in this directory")
    if series_uid is None:
        series_uid = max(series, key=lambda uid: len(series[uid]))
        if len(series) > 1:
            warnings.warn(
                f"{directory}: {len(series)} DICOM series; reading {series_uid} ({len(series[series_uid])} "
                "files), pass series_uid to choose",
                stacklevel=3,
            )
    elif series_uid not in series:
        raise VolumeError(directory, f"no DICOM series {series_uid} here (found: {', '.join(series)})")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_uid])
    try:
        image = reader.Execute()  # GDCM applies RescaleSlope/RescaleIntercept: values come back in HU
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise VolumeError(directory, f"cannot read DICOM series {series_uid} ({reason})") from err
    volume = _from_sitk(directory, image)
    volume.modality = _dicom_tag(series[series_uid][0], "0008|0060")
    return volume


def find_sources(inputs) -> tuple[list[Source], list[tuple[str, str]]]:
    """The volumes named by ``inputs`` (files and directories, searched recursively, following symlinked folders,
    each real folder once), sorted and deduplicated.

    Image files are found by suffix (NIfTI, MetaImage, NRRD); DICOM files by suffix or by their preamble, grouped into
    one source per series and directory. A source's key is its path relative to the directory it was found in (a file
    named directly: its name; a DICOM directory named directly: its name), so the same file gets the same key (and
    cubes) whether it is named or found; two sources with the same key both get their absolute paths as keys. Other
    files met while walking a directory (READMEs, .raw payloads of .mhd headers, ...) are ignored. A file named
    explicitly is always a source, so that a non-image fails with its reason.
    Returns ``(sources, problems)``; ``problems`` lists ``(input, reason)`` for inputs that hold nothing usable.
    """
    sources: dict = {}
    problems = []

    def add(path: Path, key: str, uid=None):
        s = Source(str(path), key, uid, str(item))
        sources.setdefault((s.path, uid), s)

    def add_dicom_dir(directory: Path, key: str) -> int:
        try:
            uids = dicom_series_ids(directory)
        except ImportError:
            uids = []  # loading will fail with the install hint
        if len(uids) <= 1:
            add(directory, key)
            return 1
        for uid in sorted(uids):
            add(directory, f"{key}#{uid}", uid)
        return len(uids)

    for item in inputs:
        item = Path(item)
        if not item.exists():
            problems.append((str(item), "no such file or directory"))
        elif item.is_file():
            if is_dicom_file(item) and not _suffix_in(item, NIFTI_SUFFIXES + SITK_SUFFIXES):
                add_dicom_dir(item.parent, item.resolve().parent.name)
            else:
                add(item, item.name)
        else:
            found = 0
            base = item.resolve()
            walked = {_dir_id(base)}
            for root, dirs, files in os.walk(base, followlinks=True):  # symlinked sub-folders hold sources too
                root = Path(root)
                dirs[:] = [d for d in sorted(dirs) if _enter(root / d, base, walked)]
                has_dicom = False
                for name in sorted(files):
                    f = root / name
                    if _suffix_in(f, NIFTI_SUFFIXES + SITK_SUFFIXES):
                        add(f, str(f.relative_to(base)))
                        found += 1
                    elif not has_dicom and is_dicom_file(f):
                        has_dicom = True
                if has_dicom:
                    found += add_dicom_dir(root, str(root.relative_to(base)) if root != base else base.name)
            if not found:
                problems.append((str(item), f"no image files or DICOM series found (looked for {SUPPORTED})"))
    result, seen = [], set()
    for s in sorted(sources.values(), key=lambda s: (s.key, s.path)):
        if s.key in seen:  # same name under two inputs: the absolute path keeps keys (seeds, output names) distinct
            s = Source(
                s.path,
                str(Path(s.path).resolve()) + (f"#{s.series_uid}" if s.series_uid else ""),
                s.series_uid,
                s.input,
            )
        seen.add(s.key)
        result.append(s)
    return result, problems


def _dir_id(path: Path) -> tuple:
    """The folder's identity (device, inode), whatever links lead to it."""
    st = path.stat()
    return st.st_dev, st.st_ino


def _enter(path: Path, base: Path, walked: set) -> bool:
    """Whether the walk of ``base`` goes into its sub-folder ``path``: each real folder once (a link back up the
    tree would loop, two links to one folder would give its volumes twice), and a symlinked folder only when it leads
    out of ``base`` (one inside is walked under its own name, so its sources keep their keys)."""
    try:
        if path.is_symlink() and path.resolve(strict=True).is_relative_to(base):
            return False
        key = _dir_id(path)
    except (OSError, RuntimeError):  # unreadable, dangling, or a loop of links
        return False
    if key in walked:
        return False
    walked.add(key)
    return True


# Label maps beside the scans (Decathlon's labelsTr/, TotalSegmentator's masks): by folder, by name, by content.
_LABEL_FOLDERS = frozenset({"labelstr", "labelsts", "labels", "label", "masks", "mask", "segmentations", "seg", "segs"})
_LABEL_WORDS = ("seg", "mask", "label")
LABEL_MAX_VALUES = 256  # a label map has at most this many distinct integer values; CT has thousands
_LABEL_SAMPLE = 1 << 20  # voxels looked at by the content test


def label_map_reason(key: str, data: np.ndarray | None = None) -> str | None:
    """Why the source with this key (its path relative to its input) is a label map, not an image, or None.

    By path: a folder named like ``labelsTr``, ``labels``, ``masks`` or ``segmentations``, or a file or series name
    containing ``seg``, ``mask`` or ``label``. By content (when ``data`` is given): integer values only, and 2 to
    LABEL_MAX_VALUES distinct ones among up to 2**20 evenly spaced voxels (a CT scan has hundreds at least)."""
    parts = [p.lower() for p in Path(key.split("#")[0]).parts]
    folder = next((p for p in parts[:-1] if p in _LABEL_FOLDERS), None)
    if folder:
        return f"a label map (in a folder named {folder!r}), not an image"
    word = next((w for w in _LABEL_WORDS if parts and w in parts[-1]), None)
    if word:
        return f"a label map (its name contains {word!r}), not an image"
    if data is None:
        return None
    sample = np.asarray(data).flat[:: max(1, data.size // _LABEL_SAMPLE)]
    if not np.array_equal(sample, np.round(sample)):
        return None
    values = np.unique(sample)
    if 2 <= len(values) <= LABEL_MAX_VALUES:  # one value is a blank volume: extraction says what is wrong with it
        return (
            f"a label map ({len(values)} distinct integer values, at most {LABEL_MAX_VALUES} in a label map), "
            "not an image"
        )
    return None
