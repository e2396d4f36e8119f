"""`DeformConfig`: every rate and size rule of the Models Genesis deformations.

Rates keep the published names (``nonlinear_rate``, ``local_rate``, ``paint_rate``, ``inpaint_rate``,
``outpaint_rate``, ``flip_rate``). Size rules are integer fractions of each axis length, exactly as published
(e.g. block sizes ``randint(1, X // block_div)``), so they generalise to any cube size.
See docs/randomness.md for how each quantity is drawn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from ._util import deprecated_aliases

MAX_PARTS = 8  # capacity for holes, windows and flips in the kernels' per-sample parameter record
MAX_AXIS = 32767  # longest spatial axis the kernels take (the CUDA kernels keep block geometry in int16)
MAX_BLOCKS = 1_000_000  # 100x the published num_blocks; bounds the work and the CUDA scratch per sample
# Local shuffling may move each voxel at most this many times on average (num_blocks x mean block volume / voxels).
# Every preset moves a 64x64x32, 32x32x16 or 160^3 cube's voxel at most 2.5 times; their worst shape, the smallest
# 2-D image the shuffle takes (10x10: 10,000 one-voxel blocks), 100 times.
MAX_SHUFFLE_COVERAGE = 256
MIN_BLUR_SIGMA, MAX_BLUR_SIGMA = 0.1, 5.0  # voxels; the blur radius ceil(3 sigma) fits the kernels' 15


def _rate(default: float):
    return field(default=default, metadata={"type": float, "range": (0.0, 1.0)})


def _float(default: float, lo: float, hi: float):
    return field(default=default, metadata={"type": float, "range": (lo, hi)})


def _int(default: int, lo: int, hi: int):
    return field(default=default, metadata={"type": int, "range": (lo, hi)})


def _check_field(f: dataclasses.Field, value):
    """value as f's declared type, or ValueError naming the field and its valid range."""
    kind, (lo, hi) = f.metadata.get("type", bool), f.metadata.get("range", (None, None))
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"DeformConfig.{f.name} must be a bool, got {value!r}")
    if kind is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi
        if ok:
            return int(value)
        raise ValueError(f"DeformConfig.{f.name} must be an integer in [{lo}, {hi}], got {value!r}")
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok and math.isfinite(value) and lo <= value <= hi:
        return float(value)
    raise ValueError(f"DeformConfig.{f.name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class DeformConfig:
    """Rates and size rules of one Models Genesis training pair (defaults: the published recipe).

    A training pair applies, per sample and in this order: flip (input and target, up to ``max_flips`` times while
    ``U() < flip_rate``), local shuffle (w.p. ``local_rate``), Bézier intensity map (w.p. ``nonlinear_rate``),
    Gaussian blur (w.p. ``blur_rate``), Gaussian noise (w.p. ``gaussian_noise_rate``; both 0 in the published
    recipe), then painting w.p. ``paint_rate``:
    in-painting w.p. ``inpaint_rate``, else out-painting (``outpaint_rate`` must equal ``1 - inpaint_rate``; both
    names exist because the published config has both).

    Every field is declared with its type and range and checked on construction (``ValueError`` naming the field):
    rates are finite numbers in [0, 1], counts and divisors integers in their ranges (bools are not numbers here),
    and each deformation's size rule must fit some axis of at most ``MAX_AXIS`` voxels, so no value can make a kernel
    loop for long or overflow an index. The C++ core has the same fields in the same order (csrc/deformations.h,
    checked when genesis_ext is imported).
    """

    nonlinear_rate: float = _rate(0.9)
    local_rate: float = _rate(0.5)
    paint_rate: float = _rate(0.9)
    inpaint_rate: float = _rate(0.2)
    outpaint_rate: float = _rate(0.8)
    flip_rate: float = _rate(0.4)
    # local shuffle: num_blocks blocks, sizes randint(1, S // block_div) per axis
    num_blocks: int = _int(10_000, 1, MAX_BLOCKS)
    block_div: int = _int(10, 1, MAX_AXIS)
    # in-painting: up to max_holes holes while U() < hole_continue; size randint(S // hole_div_min, S // hole_div_max)
    max_holes: int = _int(5, 0, MAX_PARTS)
    hole_continue: float = _rate(0.95)
    hole_div_min: int = _int(6, 1, MAX_AXIS)
    hole_div_max: int = _int(3, 1, MAX_AXIS)
    # out-painting: 1 window, then up to max_windows - 1 more while U() < window_continue;
    # size S - randint(cut_min_num * S // cut_den, cut_max_num * S // cut_den)
    max_windows: int = _int(5, 1, MAX_PARTS)
    window_continue: float = _rate(0.95)
    cut_min_num: int = _int(3, 0, MAX_AXIS)
    cut_max_num: int = _int(4, 1, MAX_AXIS)
    cut_den: int = _int(7, 1, MAX_AXIS)
    # holes and windows keep this many voxels from every face
    margin: int = _int(3, 0, MAX_AXIS)
    max_flips: int = _int(3, 0, MAX_PARTS)
    # True reproduces the published flip axis draw: axis 0 of (C, X, Y, Z) is the channel (a no-op), Z never flips
    flip_compat: bool = False
    # Gaussian noise (not in the published recipe; one of the paper's examples of pixel-level deformations), after the
    # Bézier map and before painting: w.p. gaussian_noise_rate, N(0, std^2) per voxel and channel, std uniform in
    # [noise_std_min, noise_std_max] per sample (intensity units of the [0, 1] cubes)
    gaussian_noise_rate: float = _rate(0.0)
    noise_std_min: float = _rate(0.01)
    noise_std_max: float = _rate(0.1)
    # Gaussian blur (not in the published recipe; the paper's other example), after the Bézier map and before the
    # noise and painting: w.p. blur_rate, separable along each spatial axis, sigma uniform in [blur_sigma_min,
    # blur_sigma_max] voxels per sample, radius ceil(3 sigma), the edge voxel repeated beyond the borders
    blur_rate: float = _rate(0.0)
    blur_sigma_min: float = _float(0.5, MIN_BLUR_SIGMA, MAX_BLUR_SIGMA)
    blur_sigma_max: float = _float(1.5, MIN_BLUR_SIGMA, MAX_BLUR_SIGMA)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_field(f, getattr(self, f.name)))
        if abs(self.inpaint_rate + self.outpaint_rate - 1.0) > 1e-9:
            raise ValueError(
                "DeformConfig: painting is in-painting w.p. inpaint_rate, else out-painting, so outpaint_rate must be "
                f"1 - inpaint_rate; got inpaint_rate={self.inpaint_rate}, outpaint_rate={self.outpaint_rate}"
            )
        for low, high in (("noise_std_min", "noise_std_max"), ("blur_sigma_min", "blur_sigma_max")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"DeformConfig: need {low} <= {high}, got {getattr(self, low)} > {getattr(self, high)}"
                )
        if self.hole_div_min < self.hole_div_max:
            raise ValueError(
                "DeformConfig: hole sizes are S // hole_div_min .. S // hole_div_max, "
                "so hole_div_min must be >= hole_div_max"
            )
        if not self.cut_min_num <= self.cut_max_num <= self.cut_den:
            raise ValueError("DeformConfig: need 0 <= cut_min_num <= cut_max_num <= cut_den")
        for deformation, fields in _RULE_FIELDS.items():
            if not self._fits(deformation, MAX_AXIS):
                raise ValueError(
                    f"DeformConfig: {deformation} fits no axis of up to {MAX_AXIS} voxels with "
                    + ", ".join(f"{n}={getattr(self, n)}" for n in fields)
                )

    @classmethod
    def official(cls, *, flip_compat: bool = False) -> "DeformConfig":
        """The published recipe. ``flip_compat=True`` also reproduces the published flip-axis distribution."""
        return cls(flip_compat=flip_compat)

    @classmethod
    def preset(cls, name: str, **changes) -> "DeformConfig":
        """A named combination of deformations: ``"genesis"`` (the published recipe) or one of the paper's 12 ablation
        combinations of non-linear (NL), local shuffling (LS), out-painting (OP) and in-painting (IP), e.g. ``"NL+LS"``
        or ``"none"`` (flips only: a pure autoencoder). Each deformation present keeps its published probability
        (NL 0.9, LS 0.5, painting 0.9); in- and out-painting are mutually exclusive (IP alone: every painted sample is
        in-painted; both: 0.2 / 0.8 as published). Flips and every size rule stay as published; ``changes`` then
        replace fields, e.g. ``preset("NL+LS", flip_compat=True)``. Names are case-insensitive and in any order."""
        if not isinstance(name, str):  # str(None) is "None", which would select "none": flips only
            raise TypeError(
                f"DeformConfig.preset: name must be a str, one of {', '.join(ABLATIONS)}; got {name!r} "
                "(the published recipe is DeformConfig() or preset('genesis'))"
            )
        key = next((k for k in ABLATIONS if _parts(k) == _parts(name)), None)
        if key is None:
            raise ValueError(f"DeformConfig.preset: unknown preset {name!r}; choose one of {', '.join(ABLATIONS)}")
        nl, ls, op, ip = (d in _parts(key) for d in ("NL", "LS", "OP", "IP"))
        inpaint = 0.2 if (ip and op) else float(ip)
        return cls(
            nonlinear_rate=0.9 * nl,
            local_rate=0.5 * ls,
            paint_rate=0.9 * (ip or op),
            inpaint_rate=inpaint,
            outpaint_rate=1.0 - inpaint,
        ).replace(**changes)

    @staticmethod
    def presets() -> tuple[str, ...]:
        """The names ``preset`` takes: ``"genesis"`` and the 12 ablation combinations."""
        return ABLATIONS

    def replace(self, **changes) -> "DeformConfig":
        """A copy with some fields changed (validated), e.g. ``cfg.replace(local_rate=0)`` for an ablation. Changing
        only one of ``inpaint_rate`` and ``outpaint_rate`` sets the other to its complement."""
        for rate, other in (("inpaint_rate", "outpaint_rate"), ("outpaint_rate", "inpaint_rate")):
            if rate in changes and other not in changes and isinstance(changes[rate], (int, float)):
                changes[other] = 1.0 - changes[rate]
        return dataclasses.replace(self, **changes)

    # ---- size rules, shared by the ops' validation and the reference ----
    def min_axis_length(self, deformation: str) -> int:
        """Smallest axis length for which `deformation` ('local', 'inpaint', 'outpaint') is well defined; every
        longer axis fits too (each rule is monotone in the length)."""
        lo, hi = 1, MAX_AXIS  # bisection: the answer is in [lo, hi] (__post_init__ checked that MAX_AXIS fits)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._fits(deformation, mid) else (mid + 1, hi)
        return lo

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

    def shuffle_coverage(self, spatial) -> float:
        """How many times local shuffling moves each voxel of a sample of shape ``spatial`` on average: num_blocks
        times the mean block volume (sides uniform in 1 .. S // block_div, independent per axis) over the voxels."""
        mean_volume = math.prod([(1 + s // self.block_div) / 2 for s in spatial])  # a list: dynamo traces it
        return self.num_blocks * mean_volume / math.prod(spatial)

    def size_rules(self, op: str) -> tuple[str, ...]:
        """The size rules op needs with this config (min_axis_length): a single op's own; the pair's, those of every
        deformation that can fire."""
        if op in ("inpaint", "outpaint"):
            return (op,)
        if op in PAIR_STAGES:
            return PAIR_STAGES[op].size_rules
        if op != "genesis_pair":
            raise ValueError(f"unknown op {op!r}")
        return tuple(
            rule
            for stage in PAIR_STAGES.values()
            if getattr(self, stage.rate) > 0
            for rule in stage.size_rules
            if rule not in ("inpaint", "outpaint") or getattr(self, f"{rule}_rate") > 0
        )

    def to_vector(self) -> list[float]:
        """Fields in declaration order as floats: the form the C++ core takes (csrc/deformations.h)."""
        return [float(getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class Stage:
    """One stage of the training pair, declared once for the Python layer (with its fields in DeformConfig):

    - ``rate``: the DeformConfig field that gates it in the pair;
    - ``gate``: its gate's key in ``sample_params`` (flip: None, it draws per-axis flips instead);
    - ``size_rules``: the size rules (``DeformConfig.min_axis_length``) it needs;
    - ``ops``: its single ops, ``genesis_ext.<name>``, with their docstrings (painting: ``inpaint`` and
      ``outpaint``, whose size rules have their names and count where their rate is above 0);
    - ``choose``: for a stage of two ops, the ``sample_params`` key that picks the first where it is set (else the
      second), read by ``genesis_ext.applied``.

    genesis_ext.ops makes the single ops from ``ops``, and checks them against the compiled core's op list
    (csrc/deformations.h); the reference pair, the user deformations' positions and the tests follow PAIR_STAGES."""

    rate: str
    gate: str | None
    size_rules: tuple[str, ...]
    ops: dict[str, str]
    choose: str | None = None


# The pair's stages in its order (csrc/deformations.h GENESIS_GATED between flip and painting).
PAIR_STAGES = {
    "flip": Stage(
        "flip_rate",
        None,
        (),
        {
            "flip": """The Models Genesis random flip: up to ``max_flips`` flips while ``U() < flip_rate``, each along
    a random spatial axis (``flip_compat``: the published axis draw). Some samples are returned unflipped."""
        },
    ),
    "local_shuffle": Stage(
        "local_rate",
        "local",
        ("local",),
        {
            "local_shuffle": """Models Genesis local pixel shuffling, applied to every sample.

    ``config.num_blocks`` random blocks (sizes ``randint(1, S // block_div)`` per axis) are each filled with a
    uniformly random permutation of the original voxels inside them; where blocks overlap the later block wins (so
    overlapping blocks can duplicate some input values and drop others, exactly as in the published code)."""
        },
    ),
    "bezier_remap": Stage(
        "nonlinear_rate",
        "nonlinear",
        (),
        {
            "bezier_remap": """Models Genesis non-linear intensity transform, applied to every sample.

    Each sample gets its own random cubic Bézier map f (control points and increasing/decreasing branch from its
    parameters, see ``sample_params``): ``out = f(x)``. Values outside [0, 1] are clamped to the ends, NaN stays NaN.
    Within 1e-5 of the exact float64 map (solved cells where the table would not be accurate)."""
        },
    ),
    "gaussian_blur": Stage(
        "blur_rate",
        "blur",
        (),
        {
            "gaussian_blur": """Gaussian blur, applied to every sample: each channel convolved along each spatial axis
    in turn with a normalised Gaussian of standard deviation sigma, uniform in [``blur_sigma_min``,
    ``blur_sigma_max``] voxels per sample, truncated at radius ``ceil(3 sigma)`` (at most 15), the edge voxel repeated
    beyond the borders. float32 sums in a fixed order with weights from our own float64 exp: bit-identical on every
    device. A NaN or ±Inf voxel makes the voxels within the radius along each axis non-finite. The other pixel-level
    deformation the Models Genesis paper names as an extension (off in the published recipe: ``blur_rate`` 0)."""
        },
    ),
    "gaussian_noise": Stage(
        "gaussian_noise_rate",
        "gaussian",
        (),
        {
            "gaussian_noise": """Gaussian noise, applied to every sample: ``out = x + std * z`` in float32, z standard
    normal, independent per voxel and channel (Box–Muller on the sample's Philox stream, bit-identical on every
    device), std uniform in [``noise_std_min``, ``noise_std_max``] per sample. Values are not clipped; NaN and ±Inf
    stay as they are. One of the pixel-level deformations the Models Genesis paper names as extensions (off in the
    published recipe: ``gaussian_noise_rate`` 0)."""
        },
    ),
    "painting": Stage(
        "paint_rate",
        "paint",
        ("inpaint", "outpaint"),
        {
            "inpaint": """Models Genesis in-painting, applied to every sample: up to ``max_holes`` inner boxes become
    uniform noise in [0, 1) (independent per voxel and channel); the rest is unchanged.""",
            "outpaint": """Models Genesis out-painting, applied to every sample: everything outside 1 to
    ``max_windows`` inner windows becomes uniform noise in [0, 1) (independent per voxel and channel); the windows keep
    their content.""",
        },
        choose="inpaint",
    ),
}
SINGLE_OPS = tuple(name for stage in PAIR_STAGES.values() for name in stage.ops)  # genesis_ext.<name>, pair order

# The fields each size rule reads (named in the error when a rule can never fit).
_RULE_FIELDS = {
    "local": ("block_div",),
    "inpaint": ("hole_div_min", "hole_div_max", "margin"),
    "outpaint": ("cut_min_num", "cut_max_num", "cut_den", "margin"),
}

# DeformConfig.preset: the published recipe and the paper's ablation combinations (Zhou et al., MICCAI 2019).
ABLATIONS = (
    "genesis",
    "none",
    "NL",
    "LS",
    "OP",
    "IP",
    "NL+LS",
    "NL+OP",
    "NL+IP",
    "LS+OP",
    "LS+IP",
    "NL+LS+OP",
    "NL+LS+IP",
)
# PRESETS was this table's name, easily taken for the training recipes (genesis_ext.train.pretraining.RECIPES)
__getattr__ = deprecated_aliases(__name__, {"PRESETS": ("genesis_ext.config.ABLATIONS", lambda: ABLATIONS)})


def _parts(name) -> frozenset:
    """The deformations a preset name combines: {"NL", "LS", "OP", "IP"} for "genesis", {} for "none"."""
    name = str(name).strip()
    special = {"genesis": frozenset({"NL", "LS", "OP", "IP"}), "none": frozenset()}
    return special.get(name.lower(), frozenset(part.strip().upper() for part in name.split("+")))
