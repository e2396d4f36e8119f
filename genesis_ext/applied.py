"""What each sample of a training pair got: one typed record per sample, read off the declared stage list
(``config.PAIR_STAGES``) and the user deformations, for every reader (the MONAI record, the demo's captions,
pre-training's per-branch validation), so that a new stage can never be left out of one of them.

    params = genesis_ext.sample_params(n, spatial, seed=seed, offset=offset, config=config, with_blocks=False)
    records = applied(params, seed, deformations)   # records[k].fired: ("flip", "bezier_remap", ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import PAIR_STAGES
from .user_deformations import PixelDeformation


@dataclass(frozen=True)
class Applied:
    """What sample ``index`` of a pair drawn with ``seed`` got.

    ``fired``: the deformations that changed it, in the pair's order: the single ops' names (``genesis_ext.<name>``;
    painting as ``inpaint`` or ``outpaint``) and the user deformations' names. ``flip``: the net flip per spatial
    axis. ``drawn``: what the fired ones drew, where they draw something (the Bézier branch, the noise's standard
    deviation, the blur's sigma, the number of holes or windows)."""

    seed: int
    index: int
    fired: tuple[str, ...]
    flip: tuple[bool, ...]
    drawn: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.fired

    def caption(self) -> str:
        """``flip X, bezier_remap (increasing), inpaint (3 holes)``; ``none`` for an untouched sample."""
        parts = [f"{name} ({self.drawn[name]})" if name in self.drawn else name for name in self.fired]
        return ", ".join(parts) or "none"

    def as_dict(self, names: Sequence[str]) -> dict:
        """Fixed keys, so that MONAI's collation stacks the records of a batch: ``seed``, ``index``, ``flip`` (one
        bool per axis) and one bool per deformation of ``names`` (``deformation_names``)."""
        return {"seed": self.seed, "index": self.index, "flip": list(self.flip), **{n: n in self.fired for n in names}}


def deformation_names(deformations: Sequence[PixelDeformation] = ()) -> tuple[str, ...]:
    """Every name ``Applied.fired`` can hold with these user deformations, in the pair's order."""
    names = []
    for stage_name, stage in PAIR_STAGES.items():
        names += [op for op in stage.ops if op != "flip"]
        names += [d.name for d in deformations if d.after == stage_name]
    return tuple(names)


def applied(params: dict, seed: int, deformations: Sequence[PixelDeformation] = ()) -> list[Applied]:
    """The record of each sample of ``params`` (``sample_params`` of one call: consecutive indices) of a pair drawn
    with ``seed`` and these user deformations."""
    index = np.asarray(params["index"], dtype=np.int64)
    fired = {stage: _fired(params, stage) for stage in PAIR_STAGES}
    user = {d.name: d.draws(seed, int(index[0]), len(index))[0] for d in deformations}
    records = []
    for n, i in enumerate(index):
        names = []
        for stage_name, stage in PAIR_STAGES.items():
            op = fired[stage_name][n]
            names += [op] if op else []
            names += [d.name for d in deformations if d.after == stage_name and user[d.name][n]]
        drawn = {op: _DRAWN[op](params, n) for op in names if op in _DRAWN}
        records.append(Applied(int(seed), int(i), tuple(names), tuple(bool(f) for f in params["flip"][n]), drawn))
    return records


def _fired(params: dict, stage_name: str) -> list[str | None]:
    """Per sample, the op of this stage that fired, or None. A stage without a gate (flip) fires where its own draw
    is set; one with two ops (painting) picks the first where its ``choose`` key is set, else the second."""
    stage = PAIR_STAGES[stage_name]
    ops = list(stage.ops)
    if stage.gate is None:
        gate = np.asarray(params[stage_name]).reshape(len(params["index"]), -1).any(axis=1)
    else:
        gate = np.asarray(params[stage.gate], dtype=bool)
    first = np.asarray(params[stage.choose], dtype=bool) if stage.choose else np.ones_like(gate)
    return [(ops[0] if f else ops[-1]) if g else None for g, f in zip(gate, first)]


def _flip_axes(params: dict, n: int) -> str:
    axes = "XYZ" if len(params["flip"][n]) == 3 else "HW"
    return "".join(a for a, f in zip(axes, params["flip"][n]) if f)


# What a fired op drew, for captions (an op missing here is named without details).
_DRAWN = {
    "flip": _flip_axes,
    "bezier_remap": lambda p, n: "increasing" if p["increasing"][n] else "decreasing",
    "gaussian_blur": lambda p, n: f"sigma {float(p['blur_sigma'][n]):.2f}",
    "gaussian_noise": lambda p, n: f"std {float(p['noise_std'][n]):.3f}",
    "inpaint": lambda p, n: f"{int(p['n_holes'][n])} holes",
    "outpaint": lambda p, n: f"{int(p['n_windows'][n])} windows",
}
