"""`DeformConfig`: every rate and size rule of the Models Genesis deformations.

Rates keep the published names (``nonlinear_rate``, ``local_rate``, ``paint_rate``, ``inpaint_rate``,
``outpaint_rate``, ``flip_rate``). Size rules are integer fractions of each axis length, exactly as published
(e.g. block sizes ``randint(1, X // block_div)``), so they generalise to any cube size.
See docs/randomness.md for how each quantity is drawn.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MAX_PARTS = 8  # capacity for holes, windows and flips in the kernels' per-sample parameter record

_RATES = ("nonlinear_rate", "local_rate", "paint_rate", "inpaint_rate", "outpaint_rate", "flip_rate",
          "hole_continue", "window_continue")


@dataclass(frozen=True)
class DeformConfig:
    """Rates and size rules of one Models Genesis training pair (defaults: the published recipe).

    A training pair applies, per sample and in this order: flip (input and target, up to ``max_flips`` times while
    ``U() < flip_rate``), local shuffle (w.p. ``local_rate``), Bézier intensity map (w.p. ``nonlinear_rate``), then
    painting w.p. ``paint_rate``: in-painting w.p. ``inpaint_rate``, else out-painting (``outpaint_rate`` must equal
    ``1 - inpaint_rate``; both names exist because the published config has both).
    """

    nonlinear_rate: float = 0.9
    local_rate: float = 0.5
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    outpaint_rate: float = 0.8
    flip_rate: float = 0.4
    # local shuffle: num_blocks blocks, sizes randint(1, S // block_div) per axis
    num_blocks: int = 10_000
    block_div: int = 10
    # in-painting: up to max_holes holes while U() < hole_continue; size randint(S // hole_div_min, S // hole_div_max)
    max_holes: int = 5
    hole_continue: float = 0.95
    hole_div_min: int = 6
    hole_div_max: int = 3
    # out-painting: 1 window, then up to max_windows - 1 more while U() < window_continue;
    # size S - randint(cut_min_num * S // cut_den, cut_max_num * S // cut_den)
    max_windows: int = 5
    window_continue: float = 0.95
    cut_min_num: int = 3
    cut_max_num: int = 4
    cut_den: int = 7
    # holes and windows keep this many voxels from every face
    margin: int = 3
    max_flips: int = 3
    # True reproduces the published flip axis draw: axis 0 of (C, X, Y, Z) is the channel (a no-op), Z never flips
    flip_compat: bool = False

    def __post_init__(self):
        for name in _RATES:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"DeformConfig.{name} must be a number in [0, 1], got {v!r}")
        if abs(self.inpaint_rate + self.outpaint_rate - 1.0) > 1e-9:
            raise ValueError(
                "DeformConfig: painting is in-painting w.p. inpaint_rate, else out-painting, so outpaint_rate must be "
                f"1 - inpaint_rate; got inpaint_rate={self.inpaint_rate}, outpaint_rate={self.outpaint_rate}")
        positive = ("num_blocks", "block_div", "hole_div_min", "hole_div_max", "cut_den", "cut_max_num")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"DeformConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_holes", "max_windows", "max_flips"):
            if not 0 <= getattr(self, name) <= MAX_PARTS:
                raise ValueError(f"DeformConfig.{name} must be in [0, {MAX_PARTS}], got {getattr(self, name)}")
        if self.max_windows < 1:
            raise ValueError("DeformConfig.max_windows must be >= 1: out-painting always keeps one window")
        if self.hole_div_min < self.hole_div_max:
            raise ValueError("DeformConfig: hole sizes are S // hole_div_min .. S // hole_div_max, "
                             "so hole_div_min must be >= hole_div_max")
        if not 0 <= self.cut_min_num <= self.cut_max_num <= self.cut_den:
            raise ValueError("DeformConfig: need 0 <= cut_min_num <= cut_max_num <= cut_den")
        if self.margin < 0:
            raise ValueError(f"DeformConfig.margin must be >= 0, got {self.margin}")

    @classmethod
    def official(cls, *, flip_compat: bool = False) -> "DeformConfig":
        """The published recipe. ``flip_compat=True`` also reproduces the published flip-axis distribution."""
        return cls(flip_compat=flip_compat)

    def replace(self, **changes) -> "DeformConfig":
        """A copy with some fields changed (validated), e.g. ``cfg.replace(local_rate=0)`` for an ablation."""
        return dataclasses.replace(self, **changes)

    # ---- size rules, shared by the ops' validation and the reference ----
    def min_axis_length(self, deformation: str) -> int:
        """Smallest axis length for which `deformation` ('local', 'inpaint', 'outpaint') is well defined."""
        n = 1
        while not self._fits(deformation, n):
            n += 1
        return n

    def _fits(self, deformation: str, s: int) -> bool:
        if deformation == "local":
            return s // self.block_div >= 1
        if deformation == "inpaint":
            lo, hi = s // self.hole_div_min, s // self.hole_div_max
            return 1 <= lo <= hi and s - hi - 2 * self.margin >= 0
        if deformation == "outpaint":
            lo = (self.cut_min_num * s) // self.cut_den
            hi = (self.cut_max_num * s) // self.cut_den
            return lo <= hi and s - hi >= 1 and s - (s - lo) - 2 * self.margin >= 0
        raise ValueError(f"unknown deformation {deformation!r}")

    def to_vector(self) -> list[float]:
        """Fields in declaration order as floats: the form the C++ core takes (see csrc/deform_config.h)."""
        return [float(getattr(self, f.name)) for f in dataclasses.fields(self)]
