"""MONAI dictionary transforms (``pip install 'genesis-ext[monai]'``; ``import genesis_ext`` never imports MONAI).

- ``GenesisPaird``: per sample, in a ``Compose`` before collation. Each channel-first sample ``(C, X, Y, Z)`` (or
  ``(C, H, W)`` with ``spatial_dims=2``) under ``keys`` becomes its deformed input, and the target goes to
  ``key + target_suffix``. The deformation is ``genesis_pair`` at a sample index drawn from the transform's own ``R``
  (MONAI's ``Randomizable``). All keys of one sample share one deformation (like MONAI's random spatial transforms).
- ``GenesisPairBatchd``: after collation, e.g. on GPU batches ``(N, C, ...)``: a ``GenesisPair`` stream (the running
  sample index, saved with ``state_dict()``/``load_state_dict()``); all keys of a batch share its deformations too.

Reproducing a pipeline: applied directly (``pipeline(item)``, ``Dataset[i]``, a torch DataLoader without workers),
``Compose(...).set_random_state(seed)`` fixes every draw. MONAI's ``DataLoader`` re-seeds every ``Randomizable`` of
its dataset (the crops as well as this transform) from torch's generator, overriding ``set_random_state``: once when
it is built (``num_workers=0``), else in each worker as it starts (every epoch unless ``persistent_workers``), each
worker differently. There the loader's generator fixes the pipeline: ``DataLoader(...,
generator=torch.Generator().manual_seed(seed))``, or torch's global seed (``monai.utils.set_determinism(seed)``) set
before the loader is built and iterated.
A plain torch DataLoader with workers re-seeds nothing: every worker would start from the same state and draw the
same deformations, so ``GenesisPaird`` refuses to run there unless its state was set in that worker (pass
``worker_init_fn=monai.data.utils.worker_init_fn``, as MONAI's DataLoader does).

- ``Intensityd``: a genesis-ext intensity policy (as model records and cube stores describe it, e.g. MR's per-volume
  body percentiles) on channel-first images, each channel mapped to [0, 1] as ``genesis-ext predict`` does; the MONAI
  bundles of ``genesis-ext export`` use it for policies that MONAI's own transforms do not express.

MetaTensors keep their metadata; the applied deformation (seed, sample index, which deformations fired) is recorded
in ``meta["genesis_ext"]``.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from . import ops
from .applied import applied, deformation_names
from .config import DeformConfig
from .data.intensity import intensity_from, unit_range_problem
from .data.io import label_map_reason
from .transforms import GenesisPair
from .user_deformations import check_deformations

_INDEX_LIMIT = 2**62  # sample indices drawn from R: far from the 2**63 offset limit, so a batch never crosses it
_SPATIAL = {2: "H, W", 3: "X, Y, Z"}


def _applied(seed: int, index: int, spatial, config: DeformConfig, deformations) -> dict:
    """What the pair did to one sample (genesis_ext.applied): fixed keys and sizes, so MONAI's collation stacks them."""
    p = ops.sample_params(1, spatial, seed=seed, offset=index, config=config, with_blocks=False)
    return applied(p, seed, deformations)[0].as_dict(deformation_names(deformations))


def _wrap(result: torch.Tensor, like, record: dict | None = None):
    """result as a MetaTensor with like's metadata (and the record, where given), when like is one."""
    if not isinstance(like, MetaTensor):
        return result
    out = MetaTensor(result, meta=copy.deepcopy(like.meta), applied_operations=copy.deepcopy(like.applied_operations))
    if record is not None:
        out.meta["genesis_ext"] = record
    return out


def _as_tensor(value) -> torch.Tensor:
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def _check_arguments(owner: str, keys: tuple, target_suffix, spatial_dims) -> None:
    """Refuse what would silently deform a key twice or write a target over an input."""
    if len(set(keys)) != len(keys):
        raise ValueError(f"{owner}: keys {keys} list a key more than once (it would be deformed twice): list it once")
    if not isinstance(target_suffix, str) or not target_suffix:
        raise ValueError(
            f"{owner}: target_suffix must be a non-empty str, got {target_suffix!r}: the target goes to "
            "key + target_suffix, so '' would overwrite the deformed input with the target"
        )
    for key in keys:
        if key + target_suffix in keys:
            raise ValueError(
                f"{owner}: the target of {key!r} would overwrite the input {key + target_suffix!r}, also one of "
                "the keys: choose another target_suffix"
            )
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"{owner}: spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _check_layout(owner: str, key, shape: tuple, spatial_dims: int, batched: bool) -> None:
    """A channel-first sample (C, *spatial), or a batch (N, C, *spatial); a missing channel axis is named, since an
    (X, Y, Z) volume would otherwise pass as a 2-D image with X channels."""
    lead = "N, C, " if batched else "C, "
    layout = f"({lead}{_SPATIAL[spatial_dims]})"
    if len(shape) == spatial_dims + 1 + batched:
        return
    if len(shape) == spatial_dims + batched:
        add = "x[:, None]" if batched else "x[None], or EnsureChannelFirstd earlier in the pipeline"
        other = "2-D images need spatial_dims=2" if spatial_dims == 3 else "3-D volumes need spatial_dims=3"
        raise ValueError(
            f"{owner}: {key!r} has shape {shape}, with no channel axis: expected {layout} (spatial_dims="
            f"{spatial_dims}; MONAI is channel-first). Add the channel axis ({add}); {other}"
        )
    raise ValueError(f"{owner}: {key!r} must be {layout} (spatial_dims={spatial_dims}), got shape {shape}")


def _check_values(owner: str, key, x: torch.Tensor) -> None:
    """A host sample must be an image in [0, 1], not a label map or unwindowed HU (its pairs would be useless); a GPU
    batch is not scanned, which would wait for the device."""
    if x.device.type != "cpu":
        return
    values = x.detach().float().numpy()
    if problem := label_map_reason("", values):
        raise ValueError(f"{owner}: {key!r} is {problem}: list only image keys (masks are for fine-tuning)")
    if problem := unit_range_problem(values):
        raise ValueError(f"{owner}: {key!r}: {problem}")


def _shared_shape(owner: str, shapes: dict) -> tuple:
    """The shape every key has: one deformation fits all keys only when they share it."""
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"{owner}: the keys of one sample share one deformation, so they need the same shape (channels "
            f"aside), got {shapes}"
        )
    return next(iter(shapes.values()))


class GenesisPaird(Randomizable, MapTransform):
    """Models Genesis training pairs for channel-first samples in a dict (see the module docstring).
    ``spatial_dims``: 3 for ``(C, X, Y, Z)`` samples (default), 2 for ``(C, H, W)``."""

    def __init__(
        self,
        keys,
        config: DeformConfig | None = None,
        seed: int = 0,
        target_suffix: str = "_target",
        allow_missing_keys: bool = False,
        deformations=(),
        spatial_dims: int = 3,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        _check_arguments("GenesisPaird", self.keys, target_suffix, spatial_dims)
        ops._check_seed(seed, 0)
        self.config = DeformConfig() if config is None else config
        self.deformations = check_deformations(deformations)
        self.seed, self.target_suffix, self.spatial_dims = int(seed), target_suffix, spatial_dims
        self.index = 0
        self._state_pid = os.getpid()

    def set_random_state(self, seed=None, state=None) -> GenesisPaird:
        super().set_random_state(seed, state)
        self._state_pid = os.getpid()  # a DataLoader worker must set its own (MONAI's worker_init_fn does)
        return self

    def randomize(self, data=None) -> None:
        if self._state_pid != os.getpid() and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "GenesisPaird: in a DataLoader worker with the random state copied from the main process, every "
                "worker would draw the same deformations: use monai.data.DataLoader, or pass "
                "worker_init_fn=monai.data.utils.worker_init_fn to the torch DataLoader"
            )
        self.index = int(self.R.randint(0, _INDEX_LIMIT, dtype="int64"))

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize()  # once per sample: every key gets this index, hence the same deformation
        samples = {key: _as_tensor(d[key]) for key in self.key_iterator(d)}
        for key, x in samples.items():
            _check_layout("GenesisPaird", key, tuple(x.shape), self.spatial_dims, batched=False)
            _check_values("GenesisPaird", key, x)
        if not samples:
            return d
        spatial = _shared_shape("GenesisPaird", {key: tuple(x.shape[1:]) for key, x in samples.items()})
        record = _applied(self.seed, self.index, spatial, self.config, self.deformations)
        for key, x in samples.items():
            deformed, target = ops.genesis_pair(
                x[None],
                seed=self.seed,
                offset=self.index,
                config=self.config,
                spatial_dims=self.spatial_dims,
                deformations=self.deformations,
            )
            d[key] = _wrap(deformed[0], data[key], record)
            d[key + self.target_suffix] = _wrap(target[0], data[key], record)
        return d


class GenesisPairBatchd(MapTransform):
    """Models Genesis training pairs for collated batches ``(N, C, ...)`` in a dict, on any device: sample n of a
    batch gets the running index + n (``GenesisPair``), the same for every key; ``state_dict`` / ``load_state_dict``
    resume the stream. ``spatial_dims``: 3 for ``(N, C, X, Y, Z)`` batches (default), 2 for ``(N, C, H, W)``."""

    def __init__(
        self,
        keys,
        config: DeformConfig | None = None,
        seed: int = 0,
        target_suffix: str = "_target",
        allow_missing_keys: bool = False,
        deformations=(),
        spatial_dims: int = 3,
    ):
        super().__init__(keys, allow_missing_keys)
        _check_arguments("GenesisPairBatchd", self.keys, target_suffix, spatial_dims)
        self.pair = GenesisPair(config, seed, spatial_dims=spatial_dims, deformations=deformations)
        self.target_suffix = target_suffix

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        batches = {key: _as_tensor(d[key]) for key in self.key_iterator(d)}
        for key, x in batches.items():
            _check_layout("GenesisPairBatchd", key, tuple(x.shape), self.pair.spatial_dims, batched=True)
            _check_values("GenesisPairBatchd", key, x)
        if not batches:
            return d
        _shared_shape("GenesisPairBatchd", {key: (x.shape[0], *x.shape[2:]) for key, x in batches.items()})
        start = self.pair._start(next(iter(batches.values())), None)  # once per call: one deformation per sample
        record = {"seed": self.pair.seed, "first_index": int(start)}
        for key, x in batches.items():
            deformed, target = self.pair(x, offset=start)
            d[key], d[key + self.target_suffix] = _wrap(deformed, data[key], record), _wrap(target, data[key], record)
        return d

    def state_dict(self) -> dict:
        return self.pair.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pair.load_state_dict(state)


class Intensityd(MapTransform):
    """``intensity`` (a policy's description, ``{"kind": "fixed", ...}`` or ``{"kind": "percentile", ...}``) applied
    to each channel of ``(C, *spatial)`` images under ``keys``: float32 in [0, 1], metadata kept. Not invertible
    (``Invertd`` passes over it)."""

    def __init__(self, keys, intensity: dict, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.policy = intensity_from(intensity)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = _as_tensor(d[key]).detach().cpu().numpy()
            mapped = torch.from_numpy(np.stack([self.policy.resolve(c).apply(c) for c in image]))
            d[key] = _wrap(mapped, d[key])
        return d
