"""Cube stores on disk: float32 ``.npy`` arrays ``(n, X, Y, Z)`` plus a manifest, and the published layout.

A store is a directory::

    manifest.json   format, cube size, the extraction parameters, one record per source volume (file, shard, count,
                    shape, spacing, window, origins, filter scores) and the skipped sources with their reasons
    manifest.csv    the same, one row per cube: index, shard, row, source, origin_x/y/z, spacing_x/y/z, window, score
    cubes/*.npy     one float32 array (n, X, Y, Z), values in [0, 1], per source volume ("shards")

Every shard is written to a temporary file and renamed into place (``os.replace``). Each finished volume appends one
line to ``manifest.journal`` (fsync'ed: linear in the number of volumes), and the manifests are written once, at the
end of the run, which folds the journal in; so an interrupted or failing run never leaves a half-written file and
keeps everything finished before it (``read_manifest`` reads manifest.json and the journal, and the next run
continues from both).

The published Models Genesis layout is one float array ``(n, 64, 64, 32)`` in [0, 1] per LUNA16 subset
(``bat_32_s_64x64x32_<subset>.npy``): :func:`load_published` / :func:`save_published` read and write it, and
:class:`CubeStore` opens such files (or a directory of them) as a store without a manifest.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .._util import atomic_write

FORMAT = "genesis-ext cube store"
VERSION = 1
MANIFEST_JSON, MANIFEST_CSV, SHARD_DIR = "manifest.json", "manifest.csv", "cubes"
JOURNAL = "manifest.journal"  # one JSON line per volume finished since manifest.json was last written
CSV_FIELDS = (
    "index",
    "shard",
    "row",
    "source",
    "key",
    "origin_x",
    "origin_y",
    "origin_z",
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "window_lo",
    "window_hi",
    "score",
)


def save_npy(path, array: np.ndarray) -> None:
    """``np.save`` to ``path``, atomically."""
    atomic_write(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def _as_cubes(array: np.ndarray, path) -> np.ndarray:
    """(n, X, Y, Z) from (n, X, Y, Z) or (n, 1, X, Y, Z)."""
    if array.ndim == 5 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 4:
        raise ValueError(f"{path}: expected cubes (n, X, Y, Z), got shape {array.shape}")
    return array


def load_published(path, *, mmap: bool = False) -> np.ndarray:
    """A published-layout cube array ``(n, X, Y, Z)`` (e.g. ``bat_32_s_64x64x32_0.npy``).

    Returns float32 (the published files are float64), or with ``mmap=True`` the memory-mapped array as stored."""
    try:
        array = np.load(str(path), mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    array = _as_cubes(array, path)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected float cubes in [0, 1], got dtype {array.dtype}")
    return array if mmap else array.astype(np.float32, copy=False)


def save_published(cubes: np.ndarray, path, *, dtype=np.float32) -> Path:
    """Write cubes ``(n, X, Y, Z)`` (or ``(n, 1, X, Y, Z)``) with values in [0, 1] as one published-layout array.

    The published script wrote float64; float32 (the default) halves the size and loads the same way
    (``dtype=np.float64`` writes the published dtype)."""
    cubes = _as_cubes(np.asarray(cubes), path)
    if cubes.size and not (np.nanmin(cubes) >= 0.0 and np.nanmax(cubes) <= 1.0):
        raise ValueError(f"{path}: cube values must be in [0, 1] (got {np.nanmin(cubes)} .. {np.nanmax(cubes)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, cubes.astype(dtype, copy=False))
    return path


def published_name(count: int, cube, subset) -> str:
    """The published file name, e.g. ``bat_32_s_64x64x32_0.npy``."""
    return f"bat_{count}_s_{'x'.join(str(c) for c in cube)}_{subset}.npy"


class StoreWriter:
    """Builds a store in ``root``: shards are written by whoever extracts (see :meth:`shard_path`), the writer records
    them with :meth:`add` / :meth:`skip` and keeps both manifests current on disk.

    An existing store in ``root`` made with the same ``params`` is continued: :meth:`done` tells which sources it
    already holds (re-running a command finishes what an interrupted run left). One made with other parameters is an
    error, so nothing already written is overwritten."""

    def __init__(self, root, params: dict, cube):
        self.root = Path(root)
        self.params, self.cube = params, [int(c) for c in cube]
        self.records, self.skipped = {}, {}
        manifest = self.root / MANIFEST_JSON
        if manifest.exists():
            old = read_manifest(self.root)
            if old.get("params") != params or old.get("cube") != self.cube:
                raise ValueError(
                    f"{self.root} already holds a cube store made with other parameters "
                    f"({old.get('params')}); write to another directory"
                )
            self.records = {r["key"]: r for r in old["volumes"]}
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.flush()  # manifest.json from the start (with an interrupted run's journal folded in), journal empty

    def shard_path(self, tag: str) -> Path:
        return self.root / SHARD_DIR / f"{tag}.npy"

    def done(self, key: str) -> bool:
        return key in self.records and (self.root / self.records[key]["shard"]).exists()

    def add(self, record: dict) -> None:
        """Record a written shard: ``record`` holds ``key``, ``source``, ``shard`` (path relative to the root),
        ``count``, ``shape``, ``spacing``, ``window``, ``origins``, ``scores``, ``candidates``."""
        self.skipped.pop(record["key"], None)
        self.records[record["key"]] = record
        self._journal({"volume": record})

    def skip(self, key: str, source: str, reason: str) -> None:
        self.skipped[key] = {"key": key, "source": source, "reason": reason}
        self._journal({"skipped": self.skipped[key]})

    def _journal(self, entry: dict) -> None:
        with open(self.root / JOURNAL, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def manifest(self) -> dict:
        volumes = sorted(self.records.values(), key=lambda r: r["key"])
        return {
            "format": FORMAT,
            "version": VERSION,
            "cube": self.cube,
            "dtype": "float32",
            "orientation": "LPS",
            "params": self.params,
            "count": int(sum(r["count"] for r in volumes)),
            "volumes": volumes,
            "skipped": sorted(self.skipped.values(), key=lambda r: r["key"]),
        }

    def flush(self) -> None:
        """Write manifest.json and manifest.csv (atomically), then empty the journal they now hold."""
        manifest = self.manifest()
        atomic_write(self.root / MANIFEST_JSON, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        rows = manifest_rows(manifest)

        def write_csv(f):
            import io

            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            f.write(text.getvalue().encode())

        atomic_write(self.root / MANIFEST_CSV, write_csv)
        (self.root / JOURNAL).unlink(missing_ok=True)


def manifest_rows(manifest: dict) -> list[dict]:
    """One dict per cube (the CSV rows), in store order."""
    rows = []
    for r in manifest["volumes"]:
        for row, (origin, score) in enumerate(zip(r["origins"], r["scores"]), start=r.get("first_row", 0)):
            rows.append(
                {
                    "index": len(rows),
                    "shard": r["shard"],
                    "row": row,
                    "source": r["source"],
                    "key": r["key"],
                    "origin_x": origin[0],
                    "origin_y": origin[1],
                    "origin_z": origin[2],
                    "spacing_x": r["spacing"][0],
                    "spacing_y": r["spacing"][1],
                    "spacing_z": r["spacing"][2],
                    "window_lo": r["window"][0],
                    "window_hi": r["window"][1],
                    "score": score,
                }
            )
    return rows


def read_manifest(root) -> dict:
    """The manifest.json of the store in ``root``."""
    path = Path(root) / MANIFEST_JSON
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable cube-store manifest ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a genesis-ext cube store manifest")
    return _with_journal(manifest, Path(root) / JOURNAL)


def _with_journal(manifest: dict, journal: Path) -> dict:
    """The manifest with the volumes an unfinished run recorded in its journal (a torn last line is ignored)."""
    if not journal.exists():
        return manifest
    volumes = {r["key"]: r for r in manifest["volumes"]}
    skipped = {r["key"]: r for r in manifest["skipped"]}
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "volume" in entry:
            volumes[entry["volume"]["key"]] = entry["volume"]
            skipped.pop(entry["volume"]["key"], None)
        else:
            skipped[entry["skipped"]["key"]] = entry["skipped"]
    ordered = sorted(volumes.values(), key=lambda r: r["key"])
    count = int(sum(r["count"] for r in ordered))
    return {**manifest, "volumes": ordered, "skipped": sorted(skipped.values(), key=lambda r: r["key"]), "count": count}


class CubeStore:
    """Read access to cubes on disk: a store directory (with manifest.json), a published-layout ``.npy`` file, a
    directory of ``.npy`` arrays (e.g. the published ``bat_*.npy``), or a list of any of these.

    Opening reads only the manifest or the ``.npy`` headers; arrays are memory-mapped on first access, separately
    in each process, so a CubeStore pickles small and is safe to hand to DataLoader workers."""

    max_open = 64  # memory maps kept open at once (each holds a file descriptor)

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.files, self.counts, self.first_rows, self.entries = [], [], [], []
        cube = None
        for p in map(Path, paths):
            for f, n, shape, entry in self._scan(p):
                if cube is not None and shape != cube:
                    raise ValueError(f"{f}: cubes of shape {shape} do not match {cube} from the other files")
                cube = shape
                if n:
                    self.files.append(str(f))
                    self.counts.append(n)
                    self.first_rows.append(int(entry.get("first_row", 0)))
                    self.entries.append(entry)
        if cube is None:
            raise ValueError(f"no cubes in {', '.join(map(str, paths))}")
        self.cube = cube
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._maps = {}

    @staticmethod
    def _scan(p: Path):
        if p.is_dir() and (p / MANIFEST_JSON).exists():
            manifest = read_manifest(p)
            for r in manifest["volumes"]:
                yield p / r["shard"], int(r["count"]), tuple(manifest["cube"]), r
        elif p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise ValueError(f"{p}: no manifest.json and no .npy cube arrays")
            for f in files:
                yield from CubeStore._scan(f)
        else:
            shape = _npy_shape(p)
            if len(shape) == 5 and shape[1] == 1:
                shape = (shape[0],) + shape[2:]
            if len(shape) != 4:
                raise ValueError(f"{p}: expected cubes (n, X, Y, Z), got shape {shape}")
            yield p, shape[0], tuple(shape[1:]), {"source": str(p)}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, row) of cube ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"cube index {index} out of range for {len(self)} cubes")
        index %= len(self)
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - int(self.offsets[k])

    def _array(self, path: str) -> np.ndarray:
        array = self._maps.get(path)
        if array is None:
            if len(self._maps) >= self.max_open:
                self._maps.pop(next(iter(self._maps)))
            array = _as_cubes(np.load(path, mmap_mode="r"), path)
            self._maps[path] = array
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        """Cube ``index`` as a float32 (X, Y, Z) array (a copy)."""
        k, row = self.locate(index)
        return np.array(self._array(self.files[k])[self.first_rows[k] + row], dtype=np.float32)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are opened again, lazily, in each process
        return state


def _npy_shape(path: Path) -> tuple:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (
                np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
            )
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    return tuple(shape)
