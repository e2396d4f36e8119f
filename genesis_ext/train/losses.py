"""Segmentation losses: one declaration each, naming the output activation the network needs.

- ``dice`` (published Models Genesis): sigmoid outputs, one channel per class, the soft Dice loss
  ``1 - (2 Σ y p + 1) / (Σ y + Σ p + 1)`` over the whole batch and every channel at once.
- ``dice_ce`` (nnU-Net's default): softmax over background and the classes, cross-entropy plus the soft Dice loss of
  the foreground classes, each class's Dice over the whole batch ("batch Dice", smooth 1e-5) and averaged.

A loss takes the network's output and the target as class indices ``(N, *spatial)`` (0 background, k the k-th
class, ``IGNORE`` unlabelled: left out of the loss) and returns a scalar (the record of a trained model,
``genesis_ext.models.ModelRecord``, turns its outputs into probabilities). A new loss is one entry of :data:`LOSSES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.labelled import IGNORE


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 Σ y p + smooth) / (Σ y + Σ p + smooth)``, sums over the whole batch (all voxels and
    channels at once, as published). ``pred``: probabilities; ``target``: 0/1, same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"dice_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    inter = (pred * target).sum()
    return 1.0 - (2.0 * inter + smooth) / (target.sum() + pred.sum() + smooth)


def one_hot(target: torch.Tensor, channels: int, background: bool) -> torch.Tensor:
    """Class indices ``(N, *spatial)`` -> float one-hot ``(N, C, *spatial)``: the classes 1..C (``background``
    False) or 0..C-1 (True)."""
    first = 0 if background else 1
    classes = torch.arange(first, first + channels, device=target.device).view(1, -1, *([1] * (target.dim() - 1)))
    return (target.unsqueeze(1).long() == classes).float()


def _labelled(target: torch.Tensor) -> torch.Tensor:
    """(N, 1, *spatial) float: 1 where the target holds a label, 0 where it is IGNORE."""
    return (target != IGNORE).unsqueeze(1).float()


def _published_dice(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mask = _labelled(target)
    return dice_loss(output.float() * mask, one_hot(target, output.shape[1], background=False))


def foreground_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean over foreground classes of each class's soft Dice over the whole batch; ``probs`` (N, 1 + K, ...)
    softmax probabilities, background first."""
    y = one_hot(target, probs.shape[1] - 1, background=False)
    p = probs[:, 1:] * _labelled(target)
    dims = (0, *range(2, p.dim()))
    dice = (2.0 * (p * y).sum(dims) + smooth) / (p.sum(dims) + y.sum(dims) + smooth)
    return 1.0 - dice.mean()


def _dice_ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits, target = output.float(), target.long()
    labelled = (target != IGNORE).sum().clamp_min(1)  # the mean over labelled voxels (none: 0, not NaN)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / labelled
    return ce + foreground_dice_loss(torch.softmax(logits, dim=1), target)


@dataclass(frozen=True)
class SegmentationLoss:
    """A loss and what it needs of the network: ``activation`` "sigmoid" (outputs = the classes, probabilities) or
    "softmax" (outputs = background + the classes, logits). ``soft_dice``: its Dice term on probabilities (the
    validation loss of whole volumes)."""

    name: str
    activation: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    soft_dice: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def outputs(self, n_classes: int) -> int:
        return n_classes + (self.activation == "softmax")

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)


LOSSES = {
    "dice": SegmentationLoss("dice", "sigmoid", _published_dice, _published_dice),
    "dice_ce": SegmentationLoss("dice_ce", "softmax", _dice_ce, foreground_dice_loss),
}
