"""MONAI dictionary transforms (``pip install 'genesis-ext[monai]'``; ``import genesis_ext`` never imports MONAI).

- ``GenesisPaird``: per sample, in a ``Compose`` before collation. Each channel-first sample ``(C, X, Y, Z)`` or
  ``(C, H, W)`` under ``keys`` becomes its deformed input, and the target goes to ``key + target_suffix``. The
  deformation is ``genesis_pair`` at a sample index drawn from the transform's own ``R`` (MONAI's ``Randomizable``),
  so ``Compose(...).set_random_state(seed)`` reproduces a pipeline and MONAI's DataLoader worker seeding makes each
  worker draw its own. All keys of one sample share the deformation (like MONAI's random spatial transforms).
- ``GenesisPairBatchd``: after collation, e.g. on GPU batches ``(N, C, ...)``: a ``GenesisPair`` stream (the running
  sample index, saved with ``state_dict()``/``load_state_dict()``).

MetaTensors keep their metadata; the applied deformation (seed, sample index, which deformations fired) is recorded
in ``meta["genesis_ext"]``.
"""

from __future__ import annotations

import copy

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from . import ops
from .config import DeformConfig
from .deformation import check_deformations
from .transforms import GenesisPair

_INDEX_LIMIT = 2**62  # sample indices drawn from R: far from the 2**63 offset limit, so a batch never crosses it


def _applied(seed: int, index: int, spatial, config: DeformConfig) -> dict:
    """What the pair did to one sample: fixed keys and sizes, so MONAI's collation stacks them."""
    p = ops.sample_params(1, spatial, seed=seed, offset=index, config=config, with_blocks=False)
    painted = bool(p["paint"][0])
    return {
        "seed": seed,
        "index": index,
        "nonlinear": bool(p["nonlinear"][0]),
        "local": bool(p["local"][0]),
        "gaussian": bool(p["gaussian"][0]),
        "inpaint": painted and bool(p["inpaint"][0]),
        "outpaint": painted and not p["inpaint"][0],
        "flip": p["flip"][0].tolist(),
    }


def _wrap(result: torch.Tensor, like, record: dict):
    """result as a MetaTensor with like's metadata and the record, when like is one."""
    if not isinstance(like, MetaTensor):
        return result
    out = MetaTensor(result, meta=copy.deepcopy(like.meta), applied_operations=copy.deepcopy(like.applied_operations))
    out.meta["genesis_ext"] = record
    return out


class GenesisPaird(Randomizable, MapTransform):
    """Models Genesis training pairs for channel-first samples in a dict (see the module docstring)."""

    def __init__(
        self,
        keys,
        config: DeformConfig | None = None,
        seed: int = 0,
        target_suffix: str = "_target",
        allow_missing_keys: bool = False,
        deformations=(),
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        ops._check_seed(seed, 0)
        self.config = DeformConfig() if config is None else config
        self.deformations = check_deformations(deformations)
        self.seed, self.target_suffix = int(seed), target_suffix
        self.index = 0

    def randomize(self, data=None) -> None:
        self.index = int(self.R.randint(0, _INDEX_LIMIT, dtype="int64"))

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            sample = d[key]
            if sample.ndim not in (3, 4):
                raise ValueError(
                    f"GenesisPaird: {key!r} must be a channel-first sample (C, X, Y, Z) or (C, H, W), "
                    f"got shape {tuple(sample.shape)}"
                )
            x = sample.as_tensor() if isinstance(sample, MetaTensor) else torch.as_tensor(sample)
            deformed, target = ops.genesis_pair(
                x[None],
                seed=self.seed,
                offset=self.index,
                config=self.config,
                spatial_dims=x.ndim - 1,
                deformations=self.deformations,
            )
            record = _applied(self.seed, self.index, tuple(x.shape[1:]), self.config)
            d[key], d[key + self.target_suffix] = _wrap(deformed[0], sample, record), _wrap(target[0], sample, record)
        return d


class GenesisPairBatchd(MapTransform):
    """Models Genesis training pairs for collated batches ``(N, C, ...)`` in a dict, on any device: sample n of a
    batch gets the running index + n (``GenesisPair``); ``state_dict`` / ``load_state_dict`` resume the stream."""

    def __init__(
        self,
        keys,
        config: DeformConfig | None = None,
        seed: int = 0,
        target_suffix: str = "_target",
        allow_missing_keys: bool = False,
        deformations=(),
    ):
        super().__init__(keys, allow_missing_keys)
        self.pair = GenesisPair(config, seed, deformations=deformations)
        self.target_suffix = target_suffix

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            batch = d[key]
            x = batch.as_tensor() if isinstance(batch, MetaTensor) else batch
            start = self.pair._start(x, None)  # a collated batch: its layout is known
            deformed, target = ops.genesis_pair(
                x,
                seed=self.pair.seed,
                offset=start,
                config=self.pair.config,
                spatial_dims=x.ndim - 2,
                deformations=self.pair.deformations,
            )
            record = {"seed": self.pair.seed, "first_index": start}
            d[key], d[key + self.target_suffix] = _wrap(deformed, batch, record), _wrap(target, batch, record)
        return d

    def state_dict(self) -> dict:
        return self.pair.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pair.load_state_dict(state)
