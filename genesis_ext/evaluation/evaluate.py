"""Predicted label maps against reference label maps: Dice and HD95 per case and class, a summary, a CSV.

    genesis-ext evaluate --pred PRED --ref REF [--labels liver=1,spleen=2 | liver,spleen] [--out metrics.csv]

``PRED`` and ``REF``: each a label-map file or a directory of them (NIfTI, MetaImage, NRRD, read with
``load_volume``, so both are compared in LPS+ whatever orientation they were stored in). Two files are one case;
otherwise cases are matched by file name without the suffix (``pred/case1.nii.gz`` ↔ ``ref/case1.nii.gz``), and
every reference needs a prediction and every prediction a reference. A prediction must lie on its reference's grid:
the same shape, and voxel centres within 1e-3 mm. Label maps hold whole numbers; 0 is background.

Classes (``labels``): ``{name: value}``; by default every nonzero value found in any reference, named
``label_<value>``. A value outside the classes, in a reference or a prediction, is an error (name it in ``labels``).

Per case and class: Dice, HD95 in mm (at the reference's spacing) and the voxel counts (see
:mod:`genesis_ext.evaluation.metrics`: Dice is NaN when the class is in neither map, HD95 when it is missing from
either). The summary gives, per class, the mean and sample standard deviation over the cases whose score is not NaN,
and how many were NaN; and the mean over classes of the class means. The CSV (written atomically; an existing file
only with ``overwrite``) has one row per case and class: ``case,label,value,dice,hd95_mm,ref_voxels,pred_voxels``.
Bad input raises :class:`EvaluationError` (a ValueError) naming the file(s) and the fix, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .._cli_options import add_labels, add_overwrite, add_quiet
from .._util import atomic_write, progress_bar
from ..data.io import NIFTI_SUFFIXES, SITK_SUFFIXES, Volume, _strip_suffix, _suffix_in, load_volume
from ..data.labelled import check_labels, parse_labels
from .metrics import per_class_scores

LABEL_MAP_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
CSV_COLUMNS = ("case", "label", "value", "dice", "hd95_mm", "ref_voxels", "pred_voxels")
METRICS = ("dice", "hd95_mm")
GRID_TOLERANCE_MM = 1e-3
_ABSENT = {"dice": math.nan, "hd95": math.nan, "ref_voxels": 0, "pred_voxels": 0}  # a class in neither map
_LIST_AT_MOST = 10


class EvaluationError(ValueError):
    """Input that cannot be evaluated (unmatched cases, grids, label values, the output file), with the fix."""


@dataclass
class Evaluation:
    """``rows``: one dict per case and class (the CSV's columns); ``summary``: ``{"cases": n, "classes": {name:
    {"value": v, "dice": stats, "hd95_mm": stats}}, "mean": {"dice": m, "hd95_mm": m}}`` with ``stats`` =
    ``{"mean", "sd", "n", "nan"}``; ``out_csv``: where the CSV went (None: not written)."""

    rows: list
    summary: dict
    out_csv: Path | None = None

    def lines(self) -> list[str]:
        """The summary as a printed table: one line per class, then the mean over classes."""
        lines = [f"{'class':<20} {'value':>5}  {'Dice mean ± sd':>17} {'NaN':>4}  {'HD95 mm mean ± sd':>17} {'NaN':>4}"]
        for name, c in self.summary["classes"].items():
            d, h = c["dice"], c["hd95_mm"]
            dice_text, hd_text = _mean_sd(d, 4), _mean_sd(h, 2)
            lines.append(f"{name:<20} {c['value']:>5}  {dice_text:>17} {d['nan']:>4}  {hd_text:>17} {h['nan']:>4}")
        mean = self.summary["mean"]
        lines.append(
            f"{'mean over classes':<27} {_number(mean['dice'], 4):>17} {'':>4}  {_number(mean['hd95_mm'], 2):>17}"
        )
        lines.append(
            f"{self.summary['cases']} case(s); NaN: Dice when the class is in neither map, HD95 when it is missing "
            "from either (left out of the means)"
        )
        return lines


def _number(x: float, digits: int) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _mean_sd(stats: dict, digits: int) -> str:
    if math.isnan(stats["sd"]):
        return _number(stats["mean"], digits)
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


# ------------------------------------------------------------------------------------------------- inputs, checks
def _label_maps(path: Path) -> dict:
    """``{case: file}`` of a label-map file or of the label maps directly in a directory."""
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or directory")
    if path.is_file():
        return {_strip_suffix(path.name): path}
    found = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith(".") and _suffix_in(f, LABEL_MAP_SUFFIXES):
            case = _strip_suffix(f.name)
            if case in found:
                raise EvaluationError(f"{found[case]} and {f}: two label maps of case {case!r}; keep one")
            found[case] = f
    if not found:
        raise EvaluationError(f"{path}: no label maps found (looked for {', '.join(LABEL_MAP_SUFFIXES)} files)")
    return found


def _listing(paths) -> str:
    shown = ", ".join(str(p) for p in paths[:_LIST_AT_MOST])
    return shown + (f" and {len(paths) - _LIST_AT_MOST} more" if len(paths) > _LIST_AT_MOST else "")


def match_cases(pred, ref) -> dict:
    """``{case: (prediction file, reference file)}``: two files are one case (named after the reference); else
    cases are matched by file name without the suffix, and an unmatched reference or prediction is an error."""
    pred, ref = Path(pred), Path(ref)
    preds, refs = _label_maps(pred), _label_maps(ref)
    if pred.is_file() and ref.is_file():
        return {_strip_suffix(ref.name): (pred, ref)}
    missing = [refs[c] for c in sorted(set(refs) - set(preds))]
    if missing:
        raise EvaluationError(
            f"{pred}: no prediction for {len(missing)} of {len(refs)} reference(s): {_listing(missing)}; "
            "predictions are matched to references by file name without the suffix"
        )
    extra = [preds[c] for c in sorted(set(preds) - set(refs))]
    if extra:
        raise EvaluationError(
            f"{ref}: no reference for {len(extra)} prediction(s): {_listing(extra)}; "
            "remove them from the predictions or add their references"
        )
    return {case: (preds[case], refs[case]) for case in sorted(refs)}


def _read_label_map(path: Path) -> tuple[Volume, np.ndarray]:
    """The volume with int32 data, and the values it holds (sorted); EvaluationError unless all are whole numbers."""
    volume = load_volume(path)
    data = volume.data
    whole = (np.abs(data) < 2**31) & (np.rint(data) == data)  # NaN and inf fail both
    if not whole.all():
        example = data[~whole].flat[0]
        raise EvaluationError(
            f"{path}: is not a label map (it holds values that are not whole numbers, e.g. {example}); evaluate "
            "compares label maps: threshold or argmax the probabilities first"
        )
    labels = data.astype(np.int32)
    return replace(volume, data=labels), np.unique(labels)


def _grid_offset_mm(a: np.ndarray, b: np.ndarray, shape) -> float:
    """How far apart, in mm, the same voxel lies under affines ``a`` and ``b``, at most over the grid (a corner)."""
    corners = np.array([(*c, 1.0) for c in itertools.product(*[(0, n - 1) for n in shape])])
    return float(np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1).max())


def _check_grid(pred: Volume, ref: Volume) -> None:
    if pred.shape == ref.shape:
        offset = _grid_offset_mm(pred.affine, ref.affine, ref.shape)
        if offset <= GRID_TOLERANCE_MM:
            return
        detail = f"same shape {ref.shape}, but voxels lie up to {offset:.3g} mm apart"
    else:
        detail = f"shape {pred.shape} vs {ref.shape}"
    raise EvaluationError(
        f"prediction {pred.source} (shape {pred.shape}) is not on the grid of its reference {ref.source} "
        f"(shape {ref.shape}): {detail}; resample the prediction onto the reference's grid (same shape and affine)"
    )


def _suggest(labels: dict, values) -> str:
    classes = {**labels, **{f"label_{v}": v for v in values}}
    return ",".join(f"{n}={v}" for n, v in classes.items())


def _check_values(path, values, labels: dict) -> None:
    outside = sorted(set(values.tolist()) - {0} - set(labels.values()))
    if outside:
        raise EvaluationError(
            f"{path}: label values {outside} are not among the classes {labels}; pass --labels naming every "
            f"class, e.g. --labels {_suggest(labels, outside)}"
        )


# ----------------------------------------------------------------------------------------------------- evaluation
def _score_case(pred_file: Path, ref_file: Path, labels: dict | None) -> dict:
    """``{value: scores}`` of one case: the classes' values, or (``labels`` None) the nonzero values it holds."""
    ref, ref_values = _read_label_map(ref_file)
    pred, pred_values = _read_label_map(pred_file)
    _check_grid(pred, ref)
    if labels is None:
        values = sorted((set(ref_values.tolist()) | set(pred_values.tolist())) - {0})
    else:
        _check_values(ref_file, ref_values, labels)
        _check_values(pred_file, pred_values, labels)
        values = labels.values()
    return per_class_scores(pred.data, ref.data, {v: v for v in values}, ref.spacing)


def _found_labels(scores: dict, cases: dict, ref) -> dict:
    """``{label_<v>: v}`` for the values in any reference; EvaluationError for a prediction holding another."""
    in_refs = sorted({v for case in scores.values() for v, s in case.items() if s["ref_voxels"]})
    labels = {f"label_{v}": v for v in in_refs}
    for case, by_value in scores.items():
        extra = [v for v, s in by_value.items() if s["pred_voxels"] and v not in in_refs]
        if extra:
            _check_values(cases[case][0], np.array(extra), labels)
    if not labels:
        raise EvaluationError(f"{ref}: the references hold only background (0); pass --labels to name the classes")
    return labels


def _rows(scores: dict, labels: dict) -> list:
    rows = []
    for case, by_value in scores.items():
        for name, value in labels.items():
            s = by_value.get(value, _ABSENT)
            rows.append(
                dict(zip(CSV_COLUMNS, (case, name, value, s["dice"], s["hd95"], s["ref_voxels"], s["pred_voxels"])))
            )
    return rows


def _stats(values) -> dict:
    """Mean and sample sd of the non-NaN values (NaN when there are none, sd when fewer than two), their count and
    the count of NaNs."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return {
        "mean": float(kept.mean()) if kept.size else math.nan,
        "sd": float(kept.std(ddof=1)) if kept.size > 1 else math.nan,
        "n": int(kept.size),
        "nan": int(values.size - kept.size),
    }


def _summary(rows: list, labels: dict, n_cases: int) -> dict:
    classes = {
        name: {"value": value, **{m: _stats([r[m] for r in rows if r["label"] == name]) for m in METRICS}}
        for name, value in labels.items()
    }
    mean = {m: _stats([c[m]["mean"] for c in classes.values()])["mean"] for m in METRICS}
    return {"cases": n_cases, "classes": classes, "mean": mean}


def _check_out(out_csv, overwrite: bool) -> Path | None:
    if out_csv is None:
        return None
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise EvaluationError(f"{out_csv}: is a directory; name the CSV file to write")
    if out_csv.exists() and not overwrite:
        raise EvaluationError(f"{out_csv}: exists; pass overwrite=True (--overwrite) to replace it")
    return out_csv


def _write_csv(path: Path, rows: list) -> None:
    def write(f):
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, text=True)


def evaluate_predictions(pred, ref, labels=None, out_csv=None, overwrite=False, *, progress=False) -> Evaluation:
    """Score predicted label maps against references (see the module docstring for the contract).

    ``pred``, ``ref``: a label-map file each, or a directory each; ``labels``: ``{name: value}`` or None (every
    nonzero value in the references); ``out_csv``: where to write the per-case CSV (None: nowhere); ``overwrite``:
    replace an existing ``out_csv``; ``progress``: a progress bar over the cases.
    Raises :class:`EvaluationError` (or :class:`~genesis_ext.data.VolumeError` for an unreadable file) before
    writing anything."""
    labels = None if labels is None else check_labels(labels)
    out_csv = _check_out(out_csv, overwrite)
    cases = match_cases(pred, ref)
    scores = {}
    bar = progress_bar(len(cases), "evaluate", "case", enabled=progress)
    try:
        for case, (pred_file, ref_file) in cases.items():
            scores[case] = _score_case(pred_file, ref_file, labels)
            bar.update()
    finally:
        bar.close()
    if labels is None:
        labels = _found_labels(scores, cases, ref)
    rows = _rows(scores, labels)
    if out_csv is not None:
        _write_csv(out_csv, rows)
    return Evaluation(rows, _summary(rows, labels, len(cases)), out_csv)


# ------------------------------------------------------------------------------------------------------------ verb
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pred", required=True, help="predicted label map, or a directory of them (matched by file name to --ref)"
    )
    p.add_argument("--ref", required=True, help="reference label map, or a directory of them")
    add_labels(p, "every nonzero value in the references, named label_<value>")
    p.add_argument("--out", default=None, help="write the per-case, per-class scores to this CSV")
    add_overwrite(p)
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    try:
        labels = parse_labels(args.labels) if args.labels else None
        result = evaluate_predictions(args.pred, args.ref, labels, args.out, args.overwrite, progress=args.progress)
    except (ValueError, OSError, ImportError) as err:
        print(f"genesis-ext evaluate: {err}", file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    if result.out_csv is not None:
        print(f"wrote {result.out_csv}")
    return 0
