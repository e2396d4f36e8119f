"""Whole-volume prediction from a patch-sized network: overlapping windows blended with a Gaussian weight (nnU-Net's
scheme).

``sliding_window(forward, image, patch)`` runs ``forward`` on windows of ``patch`` voxels whose starts are spread evenly
over each axis (``window_starts``: the fewest windows whose step is at most ``patch * (1 - overlap)``) and averages the
overlapping predictions, each weighted by ``gaussian_importance(patch)`` (sigma = patch / 8 per axis, 1 at the centre):
a voxel's prediction leans on the windows that saw it near their centre, where a network has the most context. Axes
shorter than the patch are padded (then cropped back). With ``mirror`` it also averages over the flips of every axis
the patch spans (test-time augmentation). The result does not depend on ``batch_size``: the windows are blended in one
fixed order whatever batches they ran in.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

SIGMA_SCALE = 1 / 8  # nnU-Net's Gaussian sigma, as a fraction of the patch


def gaussian_importance(patch, device=None) -> torch.Tensor:
    """float32 ``patch``-shaped weights: a Gaussian with sigma = patch / 8 per axis, centred on the patch's centre
    ((n - 1) / 2, so the map is symmetric), 1 at its maximum; no zeros (nnU-Net replaces them with the smallest
    positive value, so every voxel of a window counts)."""
    axes = []
    for n in patch:
        distance = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (distance / (n * SIGMA_SCALE)) ** 2))
    weights = math.prod(a.reshape([-1 if i == j else 1 for j in range(len(patch))]) for i, a in enumerate(axes))
    weights = (weights / weights.max()).float()
    weights = weights.clamp_min(weights[weights > 0].min())
    return weights.to(device)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """The start of each window along an axis of ``size`` voxels (nnU-Net's rule): the fewest windows
    (``ceil((size - patch) / step) + 1`` with step = ``patch * (1 - overlap)``) spread evenly from 0 to
    ``size - patch``, rounded; ``[0]`` when the axis is no longer than the patch (it is padded to it)."""
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    step = (size - patch) / (count - 1)
    return [round(step * i) for i in range(count)]


def window_boxes(shape, patch, overlap: float) -> list[tuple[int, ...]]:
    """The start of every window of a volume of ``shape`` (spatial), in the order they are run and blended."""
    return list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(shape, patch))))


def _check(image: torch.Tensor, patch, overlap: float, batch_size: int) -> None:
    if image.dim() != len(patch) + 1:
        raise ValueError(
            f"sliding_window: image must be (C, *spatial) with {len(patch)} spatial axes, got {list(image.shape)}"
        )
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding_window: overlap must be in [0, 1), got {overlap}")
    if batch_size < 1 or any(p < 1 for p in patch):
        raise ValueError(f"sliding_window: batch_size and patch sizes must be >= 1, got {batch_size}, {list(patch)}")


def _pad(image: torch.Tensor, patch, value: float) -> tuple[torch.Tensor, tuple]:
    """``image`` padded evenly on both sides to at least ``patch`` along each spatial axis, and the slices that crop
    the padded result back."""
    before = [max(0, p - s) // 2 for s, p in zip(image.shape[1:], patch)]
    after = [max(0, p - s) - b for s, p, b in zip(image.shape[1:], patch, before)]
    pads = [n for b, a in zip(before[::-1], after[::-1]) for n in (b, a)]  # F.pad: last axis first
    crop = (slice(None), *(slice(b, b + s) for b, s in zip(before, image.shape[1:])))
    return torch.nn.functional.pad(image, pads, value=value), crop


def _mirrored(forward: Callable, batch: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """The mean of ``forward`` over every flip of ``axes`` (each prediction flipped back)."""
    total = None
    flips = [list(c) for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
    for flip in flips:
        out = forward(batch.flip(flip) if flip else batch).float()
        out = out.flip(flip) if flip else out
        total = out if total is None else total + out
    return total / len(flips)


def sliding_window(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    mirror: bool = False,
    pad_value: float = 0.0,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """``forward``'s prediction for the whole of ``image``: float32 ``(C_out, *spatial)`` on ``image``'s device.

    ``image``: ``(C, *spatial)``, normalised, on the device ``forward`` wants. ``forward(x)``: ``(N, C, *patch)`` ->
    ``(N, C_out, *patch)`` probabilities (averaging logits would be another model). ``overlap``: in [0, 1). ``mirror``:
    also average over the flips of the axes the patch spans (more than one voxel; 2^d forwards per window).
    ``pad_value``: what axes shorter than the patch are padded with (the window's low end is 0). ``progress``: called
    with the number of windows each batch ran (e.g. a progress bar's ``update``)."""
    patch = tuple(int(p) for p in patch)
    _check(image, patch, overlap, batch_size)
    padded, crop = _pad(image, patch, pad_value)
    boxes = window_boxes(padded.shape[1:], patch, overlap)
    weight = gaussian_importance(patch, image.device)
    flip_axes = [2 + i for i, p in enumerate(patch) if p > 1]
    total = weights = None
    with torch.no_grad():
        for first in range(0, len(boxes), batch_size):
            chunk = boxes[first : first + batch_size]
            windows = [(slice(None), *(slice(o, o + p) for o, p in zip(box, patch))) for box in chunk]
            batch = torch.stack([padded[w] for w in windows])
            out = _mirrored(forward, batch, flip_axes) if mirror else forward(batch).float()
            if total is None:
                total = torch.zeros((out.shape[1], *padded.shape[1:]), dtype=torch.float32, device=image.device)
                weights = torch.zeros(padded.shape[1:], dtype=torch.float32, device=image.device)
            for w, o in zip(windows, out):
                total[w] += o * weight
                weights[w[1:]] += weight
            if progress is not None:
                progress(len(chunk))
    return (total / weights)[crop]
