"""The ops as ``torch.nn.Module`` s, for model code and ``nn.Sequential``: ``GenesisPair`` makes training pairs and
``GenesisDeform`` applies one deformation with a probability. Needs torch.

Both keep the running global sample index, so consecutive batches get fresh deformations, and save it (with the
seed) in their ``state_dict``: a resumed run continues the stream exactly. The index is a one-element int64 buffer
that stays on the CPU whatever device the module is moved to: under ``torch.compile`` it reaches the op as a tensor,
so advancing it recompiles nothing, and reading or advancing it never synchronises with a GPU.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import ops
from .config import DeformConfig
from .streams import Purpose, sample_words, uniform
from .user_deformations import PixelDeformation, check_deformations


class _RunningIndex(nn.Module):
    """seed, config and the running sample index shared by the modules."""

    def __init__(self, config: DeformConfig | None = None, seed: int = 0, spatial_dims: int | None = None):
        super().__init__()
        self.spatial_dims = spatial_dims  # 2 for batches of 2-D images (N, C, H, W); see genesis_ext.ops
        if config is not None and not isinstance(config, DeformConfig):
            raise TypeError(
                f"{type(self).__name__}: config must be a DeformConfig or None, got {type(config).__name__}"
            )
        ops._check_seed(seed, 0)
        self.config = DeformConfig() if config is None else config
        self.seed = int(seed)
        # a tensor, not a Python int: torch.compile would specialise on an int and recompile at every new value
        self.register_buffer("next_index", torch.zeros((), dtype=torch.int64))

    def _start(self, x, offset):
        """The global index of x's first sample: ``offset`` if given (nothing advances), else the running index,
        which a training-mode call then advances by the batch size (eval mode: fixed, e.g. validation pairs)."""
        if offset is not None:
            return offset
        start = self.next_index.clone()
        if self.training:
            self.next_index.add_(x.shape[0])
        return start

    def _apply(self, fn, recurse=True):
        """.to(device), .cuda(), ...: the index stays on the CPU, where the ops read it without a GPU sync."""
        index = self.next_index
        super()._apply(fn, recurse)
        self.next_index = index
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Checkpoints saved while the index was a Python int carry it in the extra state."""
        old = state_dict.get(prefix + "_extra_state", {})
        if "next_index" in old:
            state_dict.setdefault(prefix + "next_index", torch.tensor(old["next_index"], dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def get_extra_state(self) -> dict:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])

    def extra_repr(self) -> str:
        return f"seed={self.seed}, next_index={int(self.next_index)}"


class GenesisPair(_RunningIndex):
    """``x_deformed, target = GenesisPair(config, seed)(x)``: ``genesis_ext.genesis_pair`` on a batch ``x`` on any
    device (``spatial_dims=2`` for batches of 2-D images), sample n at global index ``start + n``
    (``_RunningIndex._start``): in training mode consecutive calls continue the stream; in eval mode every call reuses
    the current index; ``pair(x, offset=k)`` sets it explicitly. No parameters; ``state_dict`` holds the seed and the
    running index. ``deformations``: user pixel-level deformations (``genesis_ext.PixelDeformation``) in the pair."""

    def __init__(
        self,
        config: DeformConfig | None = None,
        seed: int = 0,
        spatial_dims: int | None = None,
        deformations: Sequence[PixelDeformation] = (),
    ):
        super().__init__(config, seed, spatial_dims)
        self.deformations = check_deformations(deformations)

    def forward(self, x: torch.Tensor, offset=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``offset``: an int or a one-element int64 CPU tensor, or None for the running index."""
        return ops.genesis_pair(
            x,
            seed=self.seed,
            offset=self._start(x, offset),
            config=self.config,
            spatial_dims=self.spatial_dims,
            deformations=self.deformations,
        )

    def extra_repr(self) -> str:
        names = ", ".join(d.name for d in self.deformations)
        return super().extra_repr() + (f", deformations=[{names}]" if names else "")


class GenesisDeform(_RunningIndex):
    """One deformation (``op``, any of ``genesis_ext.ops.SINGLE_OPS``) applied to each sample with probability
    ``prob``, e.g. ``GenesisDeform("gaussian_noise", prob=0.3)``; the others pass through unchanged (as new tensors).
    Sample i's coin is a pure function of (seed, i, op), like every other draw, so it does not depend on the batch.
    One class for every op (not one per op): one contract, and a new built-in deformation needs no new class."""

    def __init__(
        self,
        op: str,
        config: DeformConfig | None = None,
        seed: int = 0,
        prob: float = 1.0,
        spatial_dims: int | None = None,
    ):
        super().__init__(config, seed, spatial_dims)
        if op not in ops.SINGLE_OPS:
            raise ValueError(f"GenesisDeform: unknown op {op!r}; choose one of {', '.join(ops.SINGLE_OPS)}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"GenesisDeform: prob must be a number in [0, 1], got {prob!r}")
        self.op, self.prob = op, float(prob)

    def forward(self, x, offset=None):
        """``x``: a torch tensor or a numpy array (the ops' contract); the result has its type."""
        start = self._start(x, offset)
        out = getattr(ops, self.op)(x, seed=self.seed, offset=start, config=self.config, spatial_dims=self.spatial_dims)
        if self.prob == 1.0:
            return out
        coin = uniform(_coins(self.seed, int(start), int(x.shape[0]), zlib.crc32(self.op.encode())))
        keep = (coin >= self.prob).reshape(-1, *([1] * (x.ndim - 1)))
        if isinstance(x, np.ndarray):
            return np.where(keep, x, out)
        return torch.where(torch.from_numpy(keep).to(x.device, non_blocking=True), x, out)

    def extra_repr(self) -> str:
        return f"op={self.op!r}, prob={self.prob}, " + super().extra_repr()


def _coins(seed: int, start: int, n: int, major: int) -> np.ndarray:
    """Word 0 of stream (seed, i, DEFORM_PROB, major) for each global index i = start .. start + n - 1."""
    return sample_words(seed, start, n, Purpose.DEFORM_PROB, major, 1)[:, 0]
