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

Each volume record holds ``sha256``, the SHA-256 of its shard file's bytes (hashed right after writing it).
:class:`CubeStore` checks every shard's header, size and rows against the manifest when it opens a store (a stat and
a header read per shard), and the checksum when it first reads a shard in a process (a full read: ~13 ms per 16 MB
shard, about what reading it from disk costs). The writer verifies both for every shard a run would keep and
re-extracts those that fail. Stores written before checksums open with a warning: their shapes and counts are
checked, their bytes cannot be.

The published Models Genesis layout is one float array ``(n, 64, 64, 32)`` in [0, 1] per LUNA16 subset
(``bat_32_s_64x64x32_<subset>.npy``): :func:`load_published` / :func:`save_published` read and write it, and
:class:`CubeStore` opens such files (or a directory of them) as a store without a manifest.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .._util import atomic_write

FORMAT = "genesis-ext cube store"
VERSION = 1
MANIFEST_JSON, MANIFEST_CSV, SHARD_DIR = "manifest.json", "manifest.csv", "cubes"
JOURNAL = "manifest.journal"  # one JSON line per volume finished since manifest.json was last written
HASH = "sha256"  # the record field holding the SHA-256 (hex) of the record's shard file
_CHUNK = 1 << 20
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


class StoreError(ValueError):
    """A cube store whose files do not match its manifest; the message names the files and the fix."""


def repair_hint(root) -> str:
    return (
        f"repair the store by re-running the `genesis-ext extract` command that wrote {root} (same inputs and "
        "options): it re-extracts damaged and missing shards and rewrites the manifest"
    )


def save_npy(path, array: np.ndarray) -> str:
    """``np.save`` to ``path``, atomically. Returns the SHA-256 (hex) of the file's bytes."""
    atomic_write(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
    return file_digest(path)  # from the page cache: faster than hashing np.save's chunked copies on the way


def file_digest(path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _as_cubes(array: np.ndarray, path) -> np.ndarray:
    """(n, X, Y, Z) from (n, X, Y, Z) or (n, 1, X, Y, Z); (n, C, X, Y, Z) as it is for C > 1 channels."""
    if array.ndim == 5 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (4, 5):
        raise ValueError(f"{path}: expected cubes (n, X, Y, Z) or (n, C, X, Y, Z), got shape {array.shape}")
    return array


# what a store written before these parameters existed was made with (so that extract continues it)
LEGACY_PARAMS = {"modality": "ct", "pad": False, "channels": 1}


def item_shape(manifest: dict) -> tuple:
    """The shape of one cube of a store: (X, Y, Z), or (C, X, Y, Z) for C > 1 channels."""
    channels = int(manifest.get("params", {}).get("channels", LEGACY_PARAMS["channels"]))
    return (channels, *manifest["cube"]) if channels > 1 else tuple(manifest["cube"])


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
    already holds intact (re-running a command finishes what an interrupted run left and redoes damaged shards; what
    was found wrong is listed in ``repaired``). One made with other parameters is an error, so nothing already
    written is overwritten."""

    def __init__(self, root, params: dict, cube):
        self.root = Path(root)
        self.params, self.cube = params, [int(c) for c in cube]
        self.item = item_shape({"params": params, "cube": self.cube})
        self.records, self.skipped, self.repaired = {}, {}, []
        manifest = self.root / MANIFEST_JSON
        if manifest.exists():
            old = read_manifest(self.root)
            if {**LEGACY_PARAMS, **old.get("params", {})} != params or old.get("cube") != self.cube:
                raise ValueError(
                    f"{self.root} already holds a cube store made with other parameters "
                    f"({old.get('params')}); write to another directory"
                )
            self.records = {r["key"]: r for r in old["volumes"]}
            if problem := count_problem(manifest, old):
                self.repaired.append(f"{problem} (rewritten)")
        self._shards = by_shard(self.records.values())  # the shards as found, each with the records that use it
        self._verdicts = {}  # shard -> what is wrong with it (None: intact), checked once
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.flush()  # manifest.json from the start (with an interrupted run's journal folded in), journal empty

    def shard_path(self, tag: str) -> Path:
        return self.root / SHARD_DIR / f"{tag}.npy"

    def done(self, key: str) -> bool:
        """Whether the store holds ``key``'s cubes intact: its shard exists, holds the rows the manifest says and
        the bytes its checksum says (a shard without a checksum cannot be trusted, so it is redone too)."""
        record = self.records.get(key)
        return record is not None and self._verdict(record["shard"]) is None

    def _verdict(self, shard: str) -> str | None:
        if shard not in self._verdicts:
            path, records = self.root / shard, self._shards[shard]
            problem = layout_problem(path, records, self.item) or digest_problem(path, records[0].get(HASH))
            self._verdicts[shard] = problem
            if problem:
                self.repaired.append(f"{problem} (re-extracted)")
        return self._verdicts[shard]

    def add(self, record: dict) -> None:
        """Record a written shard: ``record`` holds ``key``, ``source``, ``shard`` (path relative to the root),
        ``count``, ``shape``, ``spacing``, ``window``, ``origins``, ``scores``, ``candidates``."""
        self.skipped.pop(record["key"], None)
        self.records[record["key"]] = record
        self._journal({"volume": record})

    def skip(self, key: str, source: str, reason: str) -> None:
        self.records.pop(key, None)  # a damaged volume that could not be redone leaves the store
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
            volumes.pop(entry["skipped"]["key"], None)
    ordered = sorted(volumes.values(), key=lambda r: r["key"])
    count = int(sum(r["count"] for r in ordered))
    return {**manifest, "volumes": ordered, "skipped": sorted(skipped.values(), key=lambda r: r["key"]), "count": count}


def store_intensity(manifest: dict) -> dict:
    """``{"modality", "intensity"}`` of a store: what its cubes are (stores from before modalities: CT, whose window
    the manifest records)."""
    params = manifest.get("params", {})
    return {"modality": params.get("modality", LEGACY_PARAMS["modality"]), "intensity": params.get("window")}


def by_shard(records) -> dict:
    """``{shard: [records that use it]}``: a per-volume shard has one record, a published-layout array one per
    volume it holds."""
    shards = {}
    for r in records:
        shards.setdefault(r["shard"], []).append(r)
    return shards


def count_problem(path, manifest: dict) -> str | None:
    """What is wrong with the manifest's total ``count`` (None: it is the sum of its volumes' counts)."""
    total = sum(int(r["count"]) for r in manifest["volumes"])
    if manifest.get("count") != total:
        return f"{path}: count is {manifest.get('count')}, but its volumes hold {total} cubes"
    return None


def npy_layout(path) -> tuple:
    """``(shape, dtype)`` of an ``.npy`` file from its header; a file whose size is not what the header needs
    (truncated or extended) is an error, like an unreadable one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            need = f.tell() + int(np.prod(shape)) * dtype.itemsize
        size = os.path.getsize(path)
    except (OSError, ValueError, TypeError) as err:  # TypeError: a damaged dtype in the header
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    if size != need:
        raise ValueError(
            f"{path}: {size} bytes, but its header's {tuple(shape)} {dtype} array needs {need} (truncated or extended)"
        )
    return tuple(shape), dtype


def layout_problem(path: Path, records, cube, dtype="float32") -> str | None:
    """What is wrong with the shard ``path`` against the manifest ``records`` that use it (None: nothing): missing,
    unreadable, truncated, not exactly their rows of ``cube`` cubes (``item_shape``) in ``dtype``, or given two
    checksums."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        shape, found = npy_layout(path)
    except ValueError as err:
        return str(err)
    spans = sorted((int(r.get("first_row", 0)), int(r["count"])) for r in records)
    want = (sum(n for _, n in spans), *(int(c) for c in cube))
    if shape != want:
        return f"{path}: holds cubes {shape}, but the manifest says {want}"
    if [row for row, _ in spans] != list(itertools.accumulate((n for _, n in spans[:-1]), initial=0)):
        return f"{path}: its manifest records (first_row, count) {spans} do not cover its rows once each"
    if found != np.dtype(dtype):
        return f"{path}: holds {found} cubes, but the manifest says {dtype}"
    if len({r.get(HASH) for r in records}) > 1:
        return f"{path}: its manifest records give it different checksums"
    return None


def digest_problem(path, want: str | None) -> str | None:
    """What is wrong with the bytes of ``path`` against the manifest's checksum ``want`` (None: they match)."""
    if want is None:
        return f"{path}: no checksum in the manifest (written before genesis-ext kept them), so it cannot be trusted"
    got = file_digest(path)
    if got != want:
        return f"{path}: damaged (its SHA-256 is {got[:16]}..., the manifest says {want[:16]}...)"
    return None


def check_store(root: Path, manifest: dict) -> None:
    """Raise :class:`StoreError` listing every mismatch between the store's files and its manifest that headers show
    (the total count; each shard's existence, size, shape, rows and dtype); warn when shards have no checksum."""
    problems = [count_problem(root / MANIFEST_JSON, manifest)]
    for shard, records in by_shard(manifest["volumes"]).items():
        problems.append(layout_problem(root / shard, records, item_shape(manifest), manifest.get("dtype", "float32")))
    problems = [p for p in problems if p]
    if problems:
        more = [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
        raise StoreError(
            f"damaged cube store {root}: its files do not match its manifest:\n  "
            + "\n  ".join(problems[:10] + more)
            + f"\n{repair_hint(root)}"
        )
    unchecked = sum(HASH not in r for r in manifest["volumes"])
    if unchecked:
        warnings.warn(
            f"{root}: {unchecked} of its {len(manifest['volumes'])} volumes have no shard checksum (a store written "
            "before genesis-ext kept them): shapes and counts were checked, the bytes cannot be; re-running the "
            "`genesis-ext extract` command that wrote it re-extracts them with checksums",
            stacklevel=4,
        )


class CubeStore:
    """Read access to cubes on disk: a store directory (with manifest.json), a published-layout ``.npy`` file, a
    directory of ``.npy`` arrays (e.g. the published ``bat_*.npy``), or a list of any of these.

    Opening reads the manifest and the ``.npy`` headers, and checks each file's size, shape and dtype against them
    (:class:`StoreError` or ValueError naming the file and the fix). Arrays are memory-mapped on first access,
    separately in each process, so a CubeStore pickles small and is safe to hand to DataLoader workers; a shard with
    a checksum in the manifest is verified before its first read in each process."""

    max_open = 64  # memory maps kept open at once (each holds a file descriptor)

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.files, self.counts, self.first_rows, self.entries = [], [], [], []
        self.digests = {}  # shard file -> (its SHA-256 in the manifest, the store), verified on first read
        self.intensity = {}  # input -> the modality and window of its manifest (stores only; bare arrays say nothing)
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
                    if HASH in entry:
                        self.digests[str(f)] = (entry[HASH], str(p))
        if cube is None:
            raise ValueError(f"no cubes in {', '.join(map(str, paths))}")
        self.cube, self.channels = cube[-3:], cube[0] if len(cube) == 4 else 1
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._maps, self._verified = {}, set()

    def _scan(self, p: Path):
        if p.is_dir() and (p / MANIFEST_JSON).exists():
            manifest = read_manifest(p)
            check_store(p, manifest)
            self.intensity[str(p)] = store_intensity(manifest)
            for r in manifest["volumes"]:
                yield p / r["shard"], int(r["count"]), item_shape(manifest), r
        elif p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise ValueError(f"{p}: no manifest.json and no .npy cube arrays")
            for f in files:
                yield from self._scan(f)
        else:
            try:
                shape, dtype = npy_layout(p)
            except ValueError as err:
                raise ValueError(f"{err}; replace it with an intact copy or leave it out") from err
            if len(shape) == 5 and shape[1] == 1:
                shape = (shape[0],) + shape[2:]
            if len(shape) not in (4, 5):
                raise ValueError(f"{p}: expected cubes (n, X, Y, Z) or (n, C, X, Y, Z), got shape {shape}")
            if not np.issubdtype(dtype, np.floating):
                raise ValueError(f"{p}: expected float cubes in [0, 1], got dtype {dtype}")
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
            self._verify(path)
            if len(self._maps) >= self.max_open:
                self._maps.pop(next(iter(self._maps)))
            array = _as_cubes(np.load(path, mmap_mode="r"), path)
            self._maps[path] = array
        return array

    def _verify(self, path: str) -> None:
        """Check a shard's bytes against its checksum, once per process (a full read of the file)."""
        if path in self._verified or path not in self.digests:
            return
        want, root = self.digests[path]
        if problem := digest_problem(path, want):
            raise StoreError(f"{problem}; it is a shard of the cube store {root}: {repair_hint(root)}")
        self._verified.add(path)

    def __getitem__(self, index: int) -> np.ndarray:
        """Cube ``index`` as a float32 (X, Y, Z) array, or (C, X, Y, Z) for C > 1 channels (a copy)."""
        k, row = self.locate(index)
        return np.array(self._array(self.files[k])[self.first_rows[k] + row], dtype=np.float32)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"], state["_verified"] = {}, set()  # memory maps are opened and verified again in each process
        return state
