"""Metrics of predictions against references: overlap and surface distance of segmentation masks, ROC AUC of scores.

Segmentation (per class, on boolean masks of one grid):

- :func:`dice`: ``2 |A ∩ B| / (|A| + |B|)``; NaN when both masks are empty (nnU-Net's convention: such cases are
  left out of means, not counted as 1).
- :func:`hd95`: the 95th-percentile symmetric Hausdorff distance between the masks' surfaces, in mm (the voxel
  spacing is applied); defined as MONAI's ``compute_hausdorff_distance(percentile=95)`` defines it: the larger of the
  two directed 95th percentiles. NaN when either mask is empty.
- :func:`per_class_scores`: both, and the voxel counts, for every class of two label maps.

Voxel counts and classification: :func:`dice_iou` (from counts, as fine-tuning's validation reports them),
:func:`roc_auc` and :func:`multiclass_auc`.

numpy only, and scipy (``scipy.ndimage``) for :func:`hd95`; no torch.
"""

from __future__ import annotations

import math

import numpy as np


def dice_iou(tp: float, fp: float, fn: float) -> tuple[float, float]:
    """Dice ``2TP / (2TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)`` from voxel counts; both 1.0 when there is no
    foreground in either the prediction or the truth."""
    denom = tp + fp + fn
    if denom == 0:
        return 1.0, 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / denom


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (True/1 = positive): the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U with average ranks). NaN when
    one class is absent."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def multiclass_auc(probs, labels) -> float:
    """Binary (2 columns): AUC of column 1; more: macro mean of the one-vs-rest AUCs of the classes that have both
    positives and negatives (NaN when none has)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.shape[1] == 2:
        return roc_auc(probs[:, 1], labels == 1)
    aucs = [roc_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _masks(pred_mask, ref_mask) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred_mask, dtype=bool), np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    return pred, ref


def dice(pred_mask, ref_mask) -> float:
    """Dice ``2 |A ∩ B| / (|A| + |B|)`` of two masks of the same shape (any dimension; nonzero = foreground).

    NaN when both masks are empty: the class is absent and correctly predicted absent, which says nothing about
    overlap (nnU-Net's convention; means over cases leave NaNs out). 0.0 when exactly one is empty."""
    pred, ref = _masks(pred_mask, ref_mask)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as err:
        raise ImportError("hd95 needs scipy: pip install 'scipy>=1.9'") from err
    return ndimage


def _joint_box(pred: np.ndarray, ref: np.ndarray) -> tuple:
    """The slices of the bounding box of ``pred | ref``, one voxel wider on each side (within the array)."""
    either = pred | ref
    box = []
    for axis in range(either.ndim):
        hits = np.flatnonzero(either.any(axis=tuple(a for a in range(either.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return tuple(box)


def _surface(mask: np.ndarray, ndimage) -> np.ndarray:
    """Foreground voxels with a 6-connected (face) neighbour in the background or outside the array."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def hd95(pred_mask, ref_mask, spacing) -> float:
    """The 95th-percentile symmetric Hausdorff distance, in mm, between the surfaces of two masks of the same shape.

    ``pred_mask``, ``ref_mask``: arrays of one shape (any dimension; nonzero = foreground); ``spacing``: the voxel
    size in mm along each axis (one number per dimension). A surface voxel is a foreground voxel with a face
    (6-connected in 3-D) neighbour in the background, or on the array's edge. The directed distances from each
    surface voxel of one mask to the nearest surface voxel of the other are Euclidean in mm; the result is the larger
    of the two directed 95th percentiles (linear interpolation), as MONAI's ``compute_hausdorff_distance(...,
    percentile=95)`` defines it. 0.0 for identical masks; NaN when either mask is empty.
    The work is bounded by the masks' joint bounding box (plus one voxel), not the array."""
    pred, ref = _masks(pred_mask, ref_mask)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for masks of {pred.ndim} dimensions")
    if not pred.any() or not ref.any():
        return float("nan")
    ndimage = _ndimage()
    box = _joint_box(pred, ref)
    pred_surface, ref_surface = _surface(pred[box], ndimage), _surface(ref[box], ndimage)
    # distance of every voxel to the nearest surface voxel of the other mask (EDT of the surface's complement)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return float(max(np.percentile(to_ref[pred_surface], 95), np.percentile(to_pred[ref_surface], 95)))


def per_class_scores(pred_labels, ref_labels, labels: dict, spacing) -> dict:
    """Dice, HD95 and voxel counts of every class of two label maps.

    ``pred_labels``, ``ref_labels``: integer label maps of one shape; ``labels``: ``{name: value}``, the class of
    each name being the voxels equal to its value; ``spacing``: mm per axis (for HD95).
    Returns ``{name: {"dice": float, "hd95": float, "ref_voxels": int, "pred_voxels": int}}`` in the order of
    ``labels``; ``dice`` is NaN when the class is in neither map, ``hd95`` when it is missing from either (see
    :func:`dice`, :func:`hd95`)."""
    pred, ref = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    scores = {}
    for name, value in labels.items():
        pred_mask, ref_mask = pred == value, ref == value
        scores[name] = {
            "dice": dice(pred_mask, ref_mask),
            "hd95": hd95(pred_mask, ref_mask, spacing),
            "ref_voxels": int(np.count_nonzero(ref_mask)),
            "pred_voxels": int(np.count_nonzero(pred_mask)),
        }
    return scores
