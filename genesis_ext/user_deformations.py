"""User deformations: a pixel-level deformation written in torch or NumPy, added to the training pair without C++.

    gamma = PixelDeformation("gamma", lambda x, u: x.clamp(min=0) ** (0.5 + u[:, 0].view(-1, 1, 1, 1, 1)),
                        rate=0.5, after="bezier_remap")
    x_deformed, target = genesis_ext.genesis_pair(x, seed=0, deformations=[gamma])

``fn(x, u)`` gets the samples whose gate fired (``x``: (n, C, *spatial), the batch's type, dtype and device) and
their uniforms ``u`` ((n, uniforms) float32 on the same device, multiples of 2**-24 in [0, 1)); it returns the
deformed samples (same shape, dtype and device) and must not modify ``x``. The gate and the uniforms of sample i are
words of the counter-based stream (seed, i, Purpose.USER, crc32(name)) (docs/randomness.md): a pure function of the
seed, the global sample index and the name, so they do not depend on the batch split or the device. Take every
random choice from ``u`` and the result is reproducible too.

Where it runs: after the built-in stage ``after`` (``PAIR_ORDER``), before the next. The fused kernel then runs in
segments (the built-in stages up to the user deformation, the user deformation, the rest), each segment a
``genesis_pair`` with the other stages' rates at 0: the gates and geometry of every built-in stage are functions of
(seed, sample) alone, so with an identity ``fn`` the result equals the fused pair bit for bit. Without user
deformations the fused kernel runs once, as before.

Pixel-level only (Models Genesis: the target is the undeformed, flipped input). The library refuses what it can
tell is spatial: a function whose output on a probe of distinct values is a rearrangement of its input's values
(``torch.flip``, ``roll``, ``rot90``, ``transpose``, a shuffle). It cannot tell an interpolating spatial transform
(a rotation by an angle, an elastic warp) from an intensity change; those break the pair and are the user's to avoid.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .config import PAIR_STAGES, DeformConfig
from .streams import Purpose, sample_words, uniform

__all__ = ["MAX_UNIFORMS", "PAIR_ORDER", "PixelDeformation", "check_deformations", "pair_with"]

MAX_UNIFORMS = 1024

PAIR_ORDER = tuple(PAIR_STAGES)  # the fused pair's built-in stages, in order


@dataclass(frozen=True)
class PixelDeformation:
    """A user pixel-level deformation of the pair (module docstring): ``fn(x, u) -> x'`` applied with probability
    ``rate`` after the built-in stage ``after`` (one of ``PAIR_ORDER``; default: after the Gaussian noise, before
    painting), with ``uniforms`` uniform numbers per sample. ``name`` names its random stream and its errors."""

    name: str
    fn: Callable[[Any, Any], Any]
    rate: float = 1.0
    after: str = "gaussian_noise"
    uniforms: int = 1
    _probed: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"PixelDeformation: name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"PixelDeformation {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"PixelDeformation {self.name!r}: rate must be a number in [0, 1], got {self.rate!r}")
        if self.after not in PAIR_ORDER:
            raise ValueError(
                f"PixelDeformation {self.name!r}: after must be one of {', '.join(PAIR_ORDER)}, got {self.after!r}"
            )
        ok = isinstance(self.uniforms, (int, np.integer)) and not isinstance(self.uniforms, bool)
        if not ok or not 0 <= self.uniforms <= MAX_UNIFORMS:
            raise ValueError(
                f"PixelDeformation {self.name!r}: uniforms must be an integer in [0, {MAX_UNIFORMS}], "
                f"got {self.uniforms!r}"
            )

    @property
    def stream(self) -> int:
        """The major of this deformation's stream: crc32 of its name."""
        return zlib.crc32(self.name.encode())

    def draws(self, seed: int, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Gates (n,) bool and uniforms (n, uniforms) float32 of samples offset .. offset + n - 1."""
        words = sample_words(seed, offset, n, Purpose.USER, self.stream, 1 + self.uniforms)
        return uniform(words[:, 0]) < self.rate, uniform(words[:, 1:]).astype(np.float32)

    def apply(self, x, seed: int, offset: int):
        """x (our own intermediate batch) with this deformation applied, in place, to the samples whose gate fired."""
        gate, u = self.draws(seed, offset, int(x.shape[0]))
        if not gate.any():
            return x
        index = np.nonzero(gate)[0]
        self._probe(x, u[:1])
        if isinstance(x, np.ndarray):
            x[index] = self._call(x[index], u[index])
            return x
        import torch

        index_t = torch.from_numpy(index).to(x.device)
        x.index_copy_(0, index_t, self._call(x.index_select(0, index_t), torch.from_numpy(u[index]).to(x.device)))
        return x

    def _call(self, x, u):
        """fn(x, u), checked: same type, shape, dtype and device, x unmodified."""
        if isinstance(x, np.ndarray):
            x.flags.writeable = False
            try:
                out = self.fn(x, u)
            except ValueError as e:
                if "read-only" in str(e):
                    raise ValueError(f"PixelDeformation {self.name!r}: fn must not modify its input") from e
                raise
        else:
            version = x._version
            out = self.fn(x, u)
            if x._version != version:
                raise ValueError(f"PixelDeformation {self.name!r}: fn must not modify its input (it changed in place)")
        if type(out) is not type(x) or tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
            raise ValueError(
                f"PixelDeformation {self.name!r}: fn must return a {type(x).__name__} of shape "
                f"{tuple(x.shape)} and dtype {x.dtype}, got {_describe(out)}"
            )
        if getattr(out, "device", None) != getattr(x, "device", None):
            raise ValueError(f"PixelDeformation {self.name!r}: fn must return a tensor on {x.device}, got {out.device}")
        return out

    def _probe(self, x, u) -> None:
        """Once per sample shape, dtype and device: refuse a function that only moves voxels (module docstring). The
        probe's values are random, so no intensity map (not even an inversion) rearranges them."""
        key = (tuple(x.shape[1:]), str(x.dtype), str(getattr(x, "device", "cpu")))
        if key in self._probed:
            return
        probe = np.random.default_rng(0).random((1, *key[0]), dtype=np.float32)
        if isinstance(x, np.ndarray):
            probe = probe.astype(x.dtype)
            values = np.asarray(self._call(probe, u), dtype=np.float64)
        else:
            import torch

            probe = torch.from_numpy(probe).to(x.device, x.dtype)
            values = self._call(probe, torch.from_numpy(u).to(x.device)).double().cpu().numpy()
            probe = probe.double().cpu().numpy()
        probe = np.asarray(probe, dtype=np.float64)
        if not np.array_equal(probe, values) and np.array_equal(np.sort(probe, axis=None), np.sort(values, axis=None)):
            raise ValueError(
                f"PixelDeformation {self.name!r}: fn moves voxels (its output is a rearrangement of its "
                "input's values): a spatial-level deformation, which the pair's target cannot follow. "
                "User deformations must be pixel-level (intensity changes)"
            )
        self._probed.add(key)


def _describe(a) -> str:
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    return f"{type(a).__name__}" + (f" of shape {tuple(shape)} and dtype {dtype}" if shape is not None else "")


def check_deformations(deformations: Sequence[PixelDeformation]) -> tuple[PixelDeformation, ...]:
    """The user deformations as a tuple, each a PixelDeformation, names unique (each name is a random stream)."""
    if isinstance(deformations, PixelDeformation):
        deformations = (deformations,)
    deformations = tuple(deformations)
    for d in deformations:
        if not isinstance(d, PixelDeformation):
            raise TypeError(f"genesis_ext: deformations must be PixelDeformation objects, got {type(d).__name__}")
    names = [d.name for d in deformations]
    if len(set(names)) != len(names):
        raise ValueError(f"genesis_ext: user deformation names must be unique (each names a stream), got {names}")
    _check_streams(deformations)
    return deformations


def _check_streams(deformations: tuple[PixelDeformation, ...]) -> None:
    """Distinct names whose CRC-32 collide would share one random stream: the same gates and uniforms."""
    seen: dict[int, str] = {}
    for d in deformations:
        other = seen.setdefault(d.stream, d.name)
        if other != d.name:
            raise ValueError(
                f"genesis_ext: user deformations {other!r} and {d.name!r} have the same CRC-32 ({d.stream}), so "
                "they would draw the same gates and uniforms: rename one of them"
            )


def pair_with(
    x, deformations: tuple[PixelDeformation, ...], pair: Callable, *, seed: int, offset: int, config: DeformConfig
):
    """The training pair of x with user deformations (module docstring): ``pair(x, config) -> (deformed, target)``
    (genesis_pair at this seed and offset) runs the built-in stages in segments, each user deformation between the
    segments, in PAIR_ORDER (user deformations at the same place: in the given order)."""
    order = sorted(deformations, key=lambda d: PAIR_ORDER.index(d.after))
    ends = [PAIR_ORDER.index(d.after) + 1 for d in order] + [len(PAIR_ORDER)]
    deformed = target = None
    start = 0
    for k, end in enumerate(ends):
        stages = PAIR_ORDER[start:end]
        if target is None or any(getattr(config, PAIR_STAGES[s].rate) > 0 for s in stages):
            only = config.replace(**{PAIR_STAGES[s].rate: 0.0 for s in PAIR_ORDER if s not in stages})
            out, first_target = pair(x if target is None else deformed, only)
            deformed, target = out, first_target if target is None else target
        if k < len(order):
            deformed = order[k].apply(deformed, seed, offset)
        start = end
    return deformed, target
