"""Labelled data for fine-tuning: segmentation cases (an image and its classes) and classification cubes.

Segmentation data (``--data``) is one of:

- a directory with ``images/`` and ``labels/``, matched by file name without suffix (``images/case1.nii.gz`` with
  ``labels/case1.nii.gz``); a label is a label map, or a folder ``labels/case1/`` of binary masks named by class
  (``liver.nii.gz``, ``spleen.nii.gz``);
- a CSV: header ``image,label`` (label maps), or ``image`` and one column per class holding that class's binary mask
  (``image,liver,spleen``); paths are relative to the CSV;
- a MONAI / Medical Segmentation Decathlon ``dataset.json``: ``"training": [{"image": ..., "label": ...}]`` (paths
  relative to the file) and ``"labels"``, as the Decathlon writes them (``{"0": "background", "1": "liver"}``) or as
  nnU-Net v2 does (``{"background": 0, "liver": 1}``).

The classes (``labels``, ``--labels``): ``"liver,spleen"`` (label maps: values 1 and 2; masks: those masks),
``"liver=1,spleen=6"`` (label-map values), or None: a dataset.json's labels, the mask names, else one class,
"foreground", where the label is > 0.5 (the published binary task). A label map with a value outside its classes is
refused, and so are masks that overlap. A case's target is a class-index map: 0 background, k the k-th class.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .intensity import resample, resample_nearest
from .io import AFFINE_TOLERANCE, Source, Volume, VolumeError, _strip_suffix, load_channels, load_volume, read_spacing
from .modality import ModalityWarning, value_warning

FOREGROUND = {"foreground": 1}  # the published binary task: label > 0.5
IGNORE = 255  # target value of unlabelled voxels (outside a label budget): no loss there
_MAX_FG_CENTRES = 200_000  # patch centres kept per case: bounded memory on large volumes


class LabelledDataError(ValueError):
    """Labelled data that cannot be used as it is, with a message naming the file and the fix."""


# ------------------------------------------------------------------------------------------------------- classes
def parse_labels(text: str | None) -> dict[str, int] | None:
    """``"liver,spleen"`` -> {liver: 1, spleen: 2}; ``"liver=1,spleen=6"`` -> those values (all named or none);
    None stays None."""
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",")]
    named = ["=" in item for item in items]
    if any(named) and not all(named):
        raise LabelledDataError(f"--labels {text}: give every class as name=value, or only names (values 1, 2, ...)")
    pairs = [item.split("=", 1) for item in items] if all(named) else [(n, k) for k, n in enumerate(items, 1)]
    try:
        labels = [(name.strip(), int(value)) for name, value in pairs]
    except ValueError:
        raise LabelledDataError(f"--labels {text}: values must be whole numbers (name=value)") from None
    if len({name for name, _ in labels}) != len(labels):
        raise LabelledDataError(f"--labels {text}: a class name appears twice")
    return check_labels(dict(labels))


def check_labels(labels: dict) -> dict[str, int]:
    """``labels`` as {name: value}: non-empty names, distinct whole-number values 1..255 (0 is background; label
    maps are written as uint8); LabelledDataError otherwise."""
    labels = dict(labels)
    bad = [(n, v) for n, v in labels.items() if not (isinstance(n, str) and n) or not _is_class_value(v)]
    if not labels or bad:
        raise LabelledDataError(f"labels {labels}: need one or more name=value classes, values whole numbers 1..255")
    if len(set(labels.values())) != len(labels):
        raise LabelledDataError(f"labels {labels}: two classes share a value")
    return {n: int(v) for n, v in labels.items()}


def _is_class_value(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= 255


@dataclass(frozen=True)
class LabelledPair:
    """One case's files: its image (a file, a 4-D NIfTI of several channels, or a tuple of files, one per channel),
    and a label map or one binary mask per class."""

    name: str
    image: Path | tuple
    labels: Path | dict  # a label map, or {class name: mask path}


def segmentation_pairs(data, labels: dict | None = None) -> tuple[list[LabelledPair], dict[str, int]]:
    """The cases of ``data`` (a directory, CSV or dataset.json; see the module docstring) and their classes."""
    data = Path(data)
    if not data.exists():
        raise LabelledDataError(f"--data {data}: no such file or directory")
    if data.is_dir():
        pairs = _directory_pairs(data)
    elif data.suffix.lower() == ".json":
        pairs, labels = _dataset_json_pairs(data, labels)
    else:
        pairs = _csv_pairs(data)
    if not pairs:
        raise LabelledDataError(f"--data {data}: no image/label pairs found (empty data)")
    for pair in pairs:
        for path in (*image_files(pair), *(pair.labels.values() if isinstance(pair.labels, dict) else [pair.labels])):
            if not path.exists():
                raise LabelledDataError(f"{data}: {path} does not exist")
    return pairs, _classes(pairs, labels, data)


def image_files(pair: LabelledPair) -> tuple:
    """The image file(s) of a case, one per channel file."""
    return pair.image if isinstance(pair.image, tuple) else (pair.image,)


def _classes(pairs: list[LabelledPair], labels: dict | None, data: Path) -> dict[str, int]:
    """The classes: given (with masks, their values name the output's labels), or the masks' names (values 1, 2,
    ... in their order: a folder's sorted names, a CSV's columns), or the published binary foreground."""
    masks = [list(p.labels) for p in pairs if isinstance(p.labels, dict)]
    if not masks:
        return labels or dict(FOREGROUND)
    if len(masks) != len(pairs):
        raise LabelledDataError(f"--data {data}: mixes label maps and folders of masks; use one kind")
    names = labels and list(labels)
    for pair in pairs:
        missing = sorted(set(names or masks[0]) - set(pair.labels))
        if missing:
            raise LabelledDataError(f"--data {data}: case {pair.name} has no mask for {missing}")
    return dict(labels) if labels else {n: k for k, n in enumerate(masks[0], start=1)}


def _directory_pairs(data: Path) -> list[LabelledPair]:
    img_dir, lab_dir = data / "images", data / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise LabelledDataError(
            f"--data {data}: expected sub-directories 'images/' and 'labels/' with volumes matched by file name "
            "(or a CSV with an image,label header, or a dataset.json)"
        )
    images = {_strip_suffix(p.name): p for p in sorted(img_dir.iterdir()) if not p.name.startswith(".")}
    labels = {_strip_suffix(p.name): p for p in sorted(lab_dir.iterdir()) if not p.name.startswith(".")}
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        raise LabelledDataError(
            f"--data {data}: {len(unmatched)} image(s)/label(s) without a partner: {unmatched[:10]}"
        )
    return [LabelledPair(k, images[k], _masks_in(labels[k]) if labels[k].is_dir() else labels[k]) for k in images]


def _masks_in(folder: Path) -> dict[str, Path]:
    return {_strip_suffix(p.name): p for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _csv_pairs(data: Path) -> list[LabelledPair]:
    rows, header = read_table(data, ("image",))
    classes = [c for c in header if c != "image"]
    if not classes:
        raise LabelledDataError(f"{data}: a CSV needs an 'image' column and a 'label' column (or one per class)")
    for i, row in enumerate(rows, start=2):
        for c in classes:
            if not row.get(c):
                raise LabelledDataError(f"{data}: line {i} has an empty '{c}'")

    def labels_of(row):
        if classes == ["label"]:
            return data.parent / row["label"]
        return {c: data.parent / row[c] for c in classes}

    return [LabelledPair(_strip_suffix(Path(r["image"]).name), data.parent / r["image"], labels_of(r)) for r in rows]


def _dataset_json_pairs(data: Path, labels: dict | None) -> tuple[list[LabelledPair], dict | None]:
    try:
        spec = json.loads(data.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelledDataError(f"{data}: cannot read as JSON ({err})") from err
    entries = spec.get("training") if isinstance(spec, dict) else None
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and _is_image_entry(e.get("image")) and isinstance(e.get("label"), str) for e in entries
    )
    if not ok:
        raise LabelledDataError(
            f'{data}: a dataset.json needs "training": [{{"image": PATH, "label": PATH}}, ...] (one image file, or a '
            "list of one file per channel as MONAI's LoadImaged reads it, and one label map per case)"
        )
    pairs = [
        LabelledPair(_case_name(e["image"]), _json_image(data, e["image"]), data.parent / e["label"]) for e in entries
    ]
    return pairs, labels or _json_labels(spec.get("labels"), data)


def _is_image_entry(image) -> bool:
    return isinstance(image, str) or (isinstance(image, list) and image and all(isinstance(p, str) for p in image))


def _case_name(image) -> str:
    return _strip_suffix(Path(image if isinstance(image, str) else image[0]).name)


def _json_image(data: Path, image) -> Path | tuple:
    return data.parent / image if isinstance(image, str) else tuple(data.parent / p for p in image)


def _json_labels(found, data: Path) -> dict[str, int] | None:
    """A dataset.json's classes without background: Decathlon {"1": "liver"} or nnU-Net v2 {"liver": 1}."""
    if found is None:
        return None
    try:
        pairs = [(v, int(k)) if str(k).isdigit() else (k, int(v)) for k, v in found.items()]
    except (AttributeError, TypeError, ValueError):
        raise LabelledDataError(f'{data}: "labels" must map values to names (or names to values)') from None
    classes = [(str(name), value) for name, value in sorted(pairs, key=lambda p: p[1]) if value != 0]
    if not classes:  # background only: the published binary task
        return None
    try:
        if len({name for name, _ in classes}) != len(classes):
            raise LabelledDataError(f"labels {found}: a class name appears twice")
        return check_labels(dict(classes))
    except LabelledDataError as err:
        raise LabelledDataError(f'{data}: its "labels": {err}') from None


def read_table(path: Path, columns: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """The rows of a CSV with a header naming at least ``columns`` (empty rows dropped) and its header."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not set(columns) <= set(header):
                raise LabelledDataError(
                    f"{path}: a CSV with a header naming the columns {', '.join(columns)} is needed; found {header}"
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LabelledDataError(f"{path}: cannot read as CSV ({err})") from err
    rows = [r for r in rows if any(r.values())]
    for i, r in enumerate(rows, start=2):
        for c in columns:
            if not r.get(c):
                raise LabelledDataError(f"{path}: line {i} has an empty '{c}'")
    return rows, header


# --------------------------------------------------------------------------------------------------------- cases
@dataclass
class SegCase:
    """One segmentation case on the network's grid: ``image`` (C, x, y, z) float32 in [0, 1], C the channels;
    ``target`` (x, y, z) uint8
    class indices (0 background, k the k-th class, ``IGNORE`` unlabelled); ``spacing`` in mm; ``fg``: (n, 3) int32
    labelled foreground voxels, patch centres (at most ``_MAX_FG_CENTRES``, evenly spaced); ``labelled_z``: the
    axial slices that hold labels (None: all of them)."""

    name: str
    image: np.ndarray
    target: np.ndarray
    spacing: tuple
    fg: np.ndarray
    labelled_z: np.ndarray | None = None

    def keep_slices(self, z: np.ndarray) -> "SegCase":
        """The case with labels only on the axial slices ``z``: the others become ``IGNORE`` (the image stays whole,
        so patches keep their context)."""
        target = np.full_like(self.target, IGNORE)
        target[..., z] = self.target[..., z]
        return replace(self, target=target, fg=_centres(target), labelled_z=np.sort(np.asarray(z, dtype=np.int64)))


def load_seg_case(pair: LabelledPair, classes: dict[str, int], window, spacing=None, modality=None) -> SegCase:
    """``pair`` read, checked and brought to the network's input: the image windowed to [0, 1], the labels to class
    indices; both resampled to ``spacing`` (mm; image linear, labels nearest) when it differs from theirs by > 1 %.
    ``modality``: a ``ModalityWarning`` when the image's values do not look like it."""
    channels = _load_channels(pair)
    image = channels[0]  # the labels' grid is checked against it; the others share it (io.load_channels)
    for channel in channels if modality is not None else ():
        if warning := value_warning(channel, modality):
            warnings.warn(warning, ModalityWarning, stacklevel=2)
    if isinstance(pair.labels, dict):
        target = _masks_target(image, {c: pair.labels[c] for c in classes}, pair.image)
    else:
        target = _map_target(image, pair.labels, classes, pair.image)
    if spacing is not None and not np.allclose(image.spacing, spacing, rtol=0.01):
        target = resample_nearest(Volume(target, image.spacing, image.affine), spacing).data
        channels = [resample(c, spacing) for c in channels]
    pixels = np.stack([window.resolve(c.data).apply(c.data) for c in channels])  # each channel windowed on its own
    return SegCase(pair.name, pixels, target, tuple(channels[0].spacing), _centres(target))


def _load_channels(pair: LabelledPair) -> list[Volume]:
    files = image_files(pair)
    source = Source(str(files[0]), pair.name, channels=tuple(map(str, files)) if len(files) > 1 else ())
    try:
        return load_channels(source)
    except VolumeError as err:
        raise LabelledDataError(str(err)) from err


def _load(path: Path) -> Volume:
    try:
        return load_volume(path)
    except VolumeError as err:
        raise LabelledDataError(str(err)) from err


def _same_grid(image: Volume, label: Volume, image_path: Path, label_path: Path) -> None:
    if label.shape != image.shape:
        raise LabelledDataError(
            f"{label_path}: label shape {label.shape} differs from its image {image_path} shape {image.shape}; "
            "a label must be on its image's voxel grid"
        )
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE):
        raise LabelledDataError(
            f"{label_path}: its voxel-to-patient map (affine) differs from that of its image {image_path} (both "
            f"{image.shape}); a label must be on its image's grid: check that it belongs to this image, or resample it"
        )
    if not np.all(np.isfinite(label.data)):
        raise LabelledDataError(f"{label_path}: the label holds non-finite values")


def _map_target(image: Volume, path: Path, classes: dict[str, int], image_path: Path) -> np.ndarray:
    label = _load(path)
    _same_grid(image, label, image_path, path)
    if classes == FOREGROUND:
        return (label.data > 0.5).astype(np.uint8)
    values = np.rint(label.data)
    if not np.array_equal(values, label.data):
        raise LabelledDataError(f"{path}: is not a label map (it holds values that are not whole numbers)")
    found = np.unique(values.astype(np.int64))
    outside = sorted(set(found.tolist()) - {0, *classes.values()})
    if outside:
        raise LabelledDataError(
            f"{path}: holds label values {outside[:20]} outside the classes {classes}; list them in --labels "
            "(NAME=VALUE), or set them to 0 in the file"
        )
    lookup = np.zeros(int(found.max()) + 1, dtype=np.uint8)
    for k, value in enumerate(classes.values(), start=1):
        if value < lookup.size:
            lookup[value] = k
    return lookup[values.astype(np.int64)]


def _masks_target(image: Volume, masks: dict[str, Path], image_path: Path) -> np.ndarray:
    target = np.zeros(image.shape, dtype=np.uint8)
    for k, (name, path) in enumerate(masks.items(), start=1):
        mask = _load(path)
        _same_grid(image, mask, image_path, path)
        inside = mask.data > 0.5
        overlap = int(np.count_nonzero(inside & (target > 0)))
        if overlap:
            other = list(masks)[int(np.bincount(target[inside & (target > 0)]).argmax()) - 1]  # the most overlapped
            raise LabelledDataError(
                f"{path}: the mask of {name!r} overlaps that of {other!r} at {overlap} voxels; classes must be "
                "disjoint (one label per voxel)"
            )
        target[inside] = k
    return target


def _centres(target: np.ndarray) -> np.ndarray:
    flat = np.flatnonzero((target > 0) & (target != IGNORE))
    if flat.size > _MAX_FG_CENTRES:
        flat = flat[np.linspace(0, flat.size - 1, _MAX_FG_CENTRES).astype(np.int64)]
    return np.stack(np.unravel_index(flat, target.shape), axis=1).astype(np.int32)


def training_spacing(pairs: list[LabelledPair]) -> tuple:
    """The median spacing of the images (nnU-Net's choice of a target spacing), from their headers where the format
    allows (NIfTI: no voxels read)."""
    try:
        spacings = np.array([read_spacing(image_files(p)[0]) for p in pairs], dtype=np.float64)
    except VolumeError as err:
        raise LabelledDataError(str(err)) from err
    return tuple(float(s) for s in np.median(spacings, axis=0))


def sample_patches(case: SegCase, patch, count: int, rng: np.random.Generator, fg_fraction: float = 0.5):
    """``count`` random (image (C, *patch) float32, target (*patch) uint8) pairs from ``case``; a patch is centred on
    a random labelled foreground voxel with probability ``fg_fraction``, else placed at random (with a label budget:
    centred on a labelled slice along z). A case smaller than the patch is zero-padded (image 0 is the window's low
    end; target background)."""
    image, target = _pad_to(case.image, (len(case.image), *patch)), _pad_to(case.target, patch)
    shape, p = np.array(target.shape), np.array(patch)
    xs, ys = [], []
    for _ in range(count):
        if len(case.fg) and rng.random() < fg_fraction:
            lo = np.clip(case.fg[rng.integers(len(case.fg))] - p // 2, 0, shape - p)
        else:
            lo = np.array([rng.integers(0, s - q + 1) for s, q in zip(shape, p)])
            if case.labelled_z is not None:
                z = case.labelled_z[rng.integers(len(case.labelled_z))]
                lo[2] = np.clip(z - p[2] // 2, 0, shape[2] - p[2])
        sl = tuple(slice(a, a + q) for a, q in zip(lo, p))
        xs.append(image[(slice(None), *sl)])
        ys.append(target[sl])
    return np.stack(xs).astype(np.float32), np.stack(ys)


def _pad_to(arr: np.ndarray, shape) -> np.ndarray:
    pads = [(0, max(0, s - a)) for a, s in zip(arr.shape, shape)]
    return np.pad(arr, pads) if any(p[1] for p in pads) else arr


# ------------------------------------------------------------------------------------------------------- budgets
BUDGET_UNITS = ("cases", "slabs")


def apply_budget(cases: list[SegCase], budget, unit: str, depth: int, rng: np.random.Generator) -> list[SegCase]:
    """The training ``cases`` with labels only where a label budget allows: ``budget`` a count (an int >= 1) or a
    share (a float in (0, 1]), of whole cases (``unit`` "cases": the others are left out) or of axial slabs ``depth``
    slices thick (``unit`` "slabs": every case cut into slabs, the last taking the case's remainder; the slices of the
    slabs not chosen become ``IGNORE``, the image stays whole, and cases without a chosen slab are left out). A seeded
    choice, at least one item."""
    if unit not in BUDGET_UNITS:
        raise LabelledDataError(f"--budget-unit must be one of {BUDGET_UNITS}, got {unit!r}")
    if unit == "cases":
        chosen = rng.choice(len(cases), size=_budget_count(budget, len(cases), unit), replace=False)
        return [cases[i] for i in sorted(chosen.tolist())]
    items = [(i, lo, hi) for i, c in enumerate(cases) for lo, hi in _slabs(c.image.shape[-1], depth)]
    chosen = rng.choice(len(items), size=_budget_count(budget, len(items), unit), replace=False)
    kept: dict[int, list[int]] = {}
    for i, lo, hi in (items[k] for k in sorted(chosen.tolist())):
        kept.setdefault(i, []).extend(range(lo, hi))
    return [cases[i] if len(z) == cases[i].image.shape[-1] else cases[i].keep_slices(np.array(z)) for i, z in
            kept.items()]  # fmt: skip


def _slabs(total: int, depth: int) -> list[tuple[int, int]]:
    starts = list(range(0, max(total - depth, 0) + 1, depth))
    return [(s, s + depth if k < len(starts) - 1 else total) for k, s in enumerate(starts)]


def parse_budget(text: str) -> int | float:
    """``--label-budget``: a whole number is a count ("1", "3"); a decimal or a percentage is a share ("0.25",
    "25%", "1.0": all)."""
    text = str(text).strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else int(text) if text.isdigit() else float(text)
    except ValueError:
        raise LabelledDataError(f"--label-budget {text!r}: give a count (2) or a share (0.25 or 25%)") from None


def _budget_count(budget: int | float, total: int, unit: str) -> int:
    """How many of ``total`` items a budget keeps: an int is a count, a float a share (rounded, at least one)."""
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        if not 1 <= budget <= total:
            raise LabelledDataError(f"--label-budget {budget}: the training data has {total} {unit}; give 1 to {total}")
        return int(budget)
    if not (isinstance(budget, float) and 0 < budget <= 1):
        raise LabelledDataError(f"--label-budget must be a count (2) or a share in (0, 1] (0.25 or 25%), got {budget}")
    return max(1, round(budget * total))


# -------------------------------------------------------------------------------------------------------- splits
def split_indices(n: int, val_fraction: float, rng: np.random.Generator, strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)``; stratified by ``strata`` when given (each stratum of >= 2 items
    gives round(fraction x size), at least 1, to validation). ``val_fraction`` 0: no validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise LabelledDataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    val = []
    for g in groups:
        g = rng.permutation(g)
        if len(g) >= 2:
            val.extend(g[: max(1, int(round(val_fraction * len(g))))].tolist())
    val = np.array(sorted(val), dtype=np.int64)
    train = np.setdiff1d(np.arange(n), val)
    if len(val) == 0 or len(train) == 0:
        raise LabelledDataError(
            f"cannot split {n} item(s) into training and validation with --val-fraction {val_fraction}: need at "
            "least 2 (or pass --val-data, or --val-fraction 0 for no validation)"
        )
    return train, val


# ------------------------------------------------------------------------------------------------ classification
def load_classification(data, patch, window) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cubes ``(n, 1, *patch)`` in [0, 1], integer labels and the sorted class names, from a ``path,label`` CSV:
    ``.npy`` cubes already in [0, 1], or volume files (windowed here); each centre-cropped / zero-padded to
    ``patch``."""
    data = Path(data)
    if not data.exists():
        raise LabelledDataError(f"--data {data}: no such file or directory")
    if data.is_dir():
        raise LabelledDataError(f"--data {data}: classification needs a CSV file with a path,label header")
    rows, _ = read_table(data, ("path", "label"))
    if not rows:
        raise LabelledDataError(f"--data {data}: no rows (empty data)")
    classes = sorted({r["label"] for r in rows}, key=_class_order)
    if len(classes) < 2:
        raise LabelledDataError(f"--data {data}: classification needs at least 2 distinct labels, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    cubes = [_fit_cube(_read_cube(data.parent / r["path"], data, window), patch)[None] for r in rows]
    return np.stack(cubes), np.array([index[r["label"]] for r in rows], dtype=np.int64), classes


def _class_order(label: str):
    try:
        return (False, float(label), label)
    except ValueError:
        return (True, 0.0, label)


def _read_cube(path: Path, table: Path, window) -> np.ndarray:
    if not path.exists():
        raise LabelledDataError(f"{table}: {path} does not exist")
    if not path.name.lower().endswith(".npy"):
        volume = _load(path)
        return window.resolve(volume.data).apply(volume.data)
    try:
        arr = np.squeeze(np.asarray(np.load(path, allow_pickle=False), dtype=np.float32))
    except Exception as err:
        raise LabelledDataError(f"{path}: cannot read as .npy ({type(err).__name__}: {err})") from err
    if arr.ndim != 3:
        raise LabelledDataError(f"{path}: a cube must be 3D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise LabelledDataError(
            f"{path}: .npy cubes must already be windowed to [0, 1] (as genesis-ext extract writes them); found "
            f"values in [{arr.min()}, {arr.max()}]. Store HU as NIfTI instead, which is windowed here"
        )
    return arr


def _fit_cube(arr: np.ndarray, patch) -> np.ndarray:
    """Centre-crop / zero-pad a 3D array to ``patch``."""
    out = np.zeros(patch, dtype=np.float32)
    src, dst = [], []
    for a, q in zip(arr.shape, patch):
        s, d = max(0, (a - q) // 2), max(0, (q - a) // 2)
        n = min(a, q)
        src.append(slice(s, s + n))
        dst.append(slice(d, d + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


__all__ = [
    "BUDGET_UNITS",
    "FOREGROUND",
    "IGNORE",
    "LabelledDataError",
    "LabelledPair",
    "SegCase",
    "apply_budget",
    "parse_budget",
    "check_labels",
    "load_classification",
    "load_seg_case",
    "parse_labels",
    "read_table",
    "sample_patches",
    "segmentation_pairs",
    "split_indices",
    "training_spacing",
]
