"""Map-style datasets of training cubes, for ``torch.utils.data.DataLoader`` (any ``num_workers``) and
``DistributedSampler``. Items are float32 NumPy arrays ``(C, X, Y, Z)`` in [0, 1] (C = 1); the DataLoader's default
collate stacks them into a ``(N, 1, X, Y, Z)`` torch tensor, the input of ``genesis_ext.genesis_pair``.

Both datasets are small to pickle: nothing heavy is opened in ``__init__``. :class:`CubeStoreDataset` memory-maps the
store's arrays on first access inside each worker; :class:`VolumeCubeDataset` loads volumes on first access inside
each worker and keeps the last few.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict

import numpy as np

from .cubes import (
    CANDIDATES_PER_CUBE,
    CUBES_PER_VOLUME,
    PUBLISHED_CUBE,
    BoxScorer,
    NoFilter,
    OfficialLung,
    cut_cube,
    make_filter,
    origin_bounds,
)
from .intensity import CT_WINDOW, resample
from .io import Source, find_sources, label_map_reason, load_volume
from .store import CubeStore


class _Transformed:
    """The transform hook of the datasets: ``transform(item, index)`` with the item's global index ``epoch * len +
    i`` (a function of one argument gets the item alone), so a deformation can take its sample index from it, e.g.
    ``lambda cube, index: genesis_ext.genesis_pair(cube[None], seed=0, offset=index)``: distinct in every epoch,
    identical in every worker and run. ``set_epoch`` moves to the next epoch's indices."""

    epoch = 0

    def _set_transform(self, transform) -> None:
        self.transform = transform
        self._with_index = transform is not None and _takes_two_arguments(transform)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _transformed(self, item, index: int):
        if self.transform is None:
            return item
        return self.transform(item, self.epoch * len(self) + index) if self._with_index else self.transform(item)


def _refuse_label_map(source: Source, data=None) -> None:
    """A label map among the inputs would give flat cubes of its values: refused, as ``genesis-ext extract`` skips
    it (io.label_map_reason)."""
    if reason := label_map_reason(source.key, data):
        raise ValueError(f"{source.path}: {reason}; pass the images only (their masks are for fine-tuning)")


def _takes_two_arguments(fn) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): the one-argument call
        return False


class CubeStoreDataset(_Transformed):
    """The cubes of a store written by ``genesis-ext extract``, a published-layout array, or a directory of them
    (anything :class:`~genesis_ext.data.store.CubeStore` opens). ``dataset[i]`` → float32 ``(C, X, Y, Z)`` (C = 1 but
    for a store of several channels).
    ``transform``: applied to each item with its global index (``_Transformed``)."""

    def __init__(self, path, transform=None):
        self.store = CubeStore(path)
        self._set_transform(transform)

    @property
    def cube(self) -> tuple:
        return self.store.cube

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> np.ndarray:
        cube = self.store[int(index)]
        return self._transformed(cube[None] if cube.ndim == 3 else cube, int(index))


class VolumeCubeDataset(_Transformed):
    """Cubes cut on the fly from volumes (files or directories, as ``genesis-ext extract`` takes them).

    ``len = volumes x per_volume``; item ``i`` comes from volume ``i // per_volume``, at the first position the filter
    accepts among up to ``max_candidates`` random draws of a generator seeded by ``(seed, epoch, i)``: the same item is
    the same cube in every worker and process, and :meth:`set_epoch` draws new cubes (``transform``: applied to each
    item with its global index, ``_Transformed``). If no candidate passes, the
    best-scoring one is used (with a warning once per volume). Each worker keeps its ``cache_size`` most recently used
    volumes in memory, so ordered or volume-grouped sampling is fast; for large, shuffled collections extract a cube
    store first and use :class:`CubeStoreDataset`.
    """

    def __init__(
        self,
        inputs,
        *,
        cube=PUBLISHED_CUBE,
        per_volume: int = CUBES_PER_VOLUME,
        filter=None,
        window=CT_WINDOW,
        margins="auto",
        spacing=None,
        max_candidates: int = CANDIDATES_PER_CUBE,
        seed: int = 0,
        cache_size: int = 2,
        transform=None,
    ):
        if isinstance(inputs, (str, bytes)) or not hasattr(inputs, "__iter__"):
            inputs = [inputs]
        self.sources, problems = find_sources(inputs)
        if problems:
            raise ValueError("; ".join(f"{item}: {reason}" for item, reason in problems))
        if not self.sources:
            raise ValueError("no volumes found")
        for source in self.sources:  # by path here; by content when a volume is first loaded
            _refuse_label_map(source)
        self.cube = tuple(int(c) for c in cube)
        self.per_volume, self.max_candidates, self.seed = int(per_volume), int(max_candidates), int(seed)
        self.filter = OfficialLung() if filter is None else make_filter(filter) if isinstance(filter, str) else filter
        self.window, self.margins, self.spacing = window, margins, spacing
        self.cache_size = max(1, int(cache_size))
        self._set_transform(transform)
        self._cache = OrderedDict()
        self._warned = set()

    def __len__(self) -> int:
        return len(self.sources) * self.per_volume

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # volumes are loaded again, lazily, in each worker
        return state

    def _prepared(self, k: int):
        entry = self._cache.get(k)
        if entry is None:
            source: Source = self.sources[k]
            volume = load_volume(source.path, series_uid=source.series_uid)
            _refuse_label_map(source, volume.data)
            if self.spacing is not None:
                volume = resample(volume, self.spacing)
            lo, hi, _ = origin_bounds(volume.shape, self.cube, self.filter, self.margins)
            window = self.window.resolve(volume.data)
            scorer = (
                None
                if isinstance(self.filter, NoFilter)
                else BoxScorer(volume.data, self.filter, window, self.cube, lo, hi)
            )
            entry = (volume.data, window, lo, hi, scorer)
            while len(self._cache) >= self.cache_size:
                self._cache.popitem(last=False)
            self._cache[k] = entry
        else:
            self._cache.move_to_end(k)
        return entry

    def position(self, index: int) -> tuple[int, np.ndarray]:
        """(volume number, cube origin) of item ``index`` in the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        k = index // self.per_volume
        data, window, lo, hi, scorer = self._prepared(k)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        origins = rng.integers(lo, hi + 1, size=(self.max_candidates, 3))
        if scorer is None:
            return k, origins[0]
        sums = scorer.sums(origins)
        n = int(np.prod(self.cube))
        passing = np.flatnonzero(self.filter.keep(sums, n))
        if len(passing):
            return k, origins[passing[0]]
        if k not in self._warned:
            self._warned.add(k)
            warnings.warn(
                f"{self.sources[k].path}: no candidate passed the {self.filter.name} filter in "
                f"{self.max_candidates} draws; using the best-scoring one",
                stacklevel=3,
            )
        ranking = self.filter.fraction(sums, n)
        best = np.argmin(ranking) if isinstance(self.filter, OfficialLung) else np.argmax(ranking)
        return k, origins[best]

    def __getitem__(self, index: int) -> np.ndarray:
        k, o = self.position(int(index))
        data, window = self._prepared(k)[:2]
        return self._transformed(cut_cube(data, o, self.cube, window)[None], int(index))
