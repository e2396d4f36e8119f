"""Batch extraction: many volumes → one cube store, in parallel over volumes (the engine of ``genesis-ext extract``).

Each volume is loaded, optionally resampled, cut into cubes and written as its own shard by a worker; a volume that
fails (unreadable, not 3D, too small, no cube passes the filter) is skipped with its reason and counted, and never
disturbs what other volumes wrote. Cubes depend only on ``(seed, source key)``, not on the worker that cut them, the
number of workers or the other inputs.

Workers are threads by default: reading (zlib in nibabel, SimpleITK) and the NumPy work release the GIL, so threads
run volumes in parallel and start instantly (measured on a shared 2-core machine, six 512x512x192 MetaImage scans:
2 threads 1.0-2.1x faster than 1, run to run). ``executor="process"`` uses processes started with ``spawn`` (GNU
OpenMP, used by genesis_ext and torch, hangs in forked children), one thread each; each pays ~1.5 s to start
(importing genesis_ext imports torch) and was slower in every measured run (e.g. 3.4-6.2 s vs 1.5-2.3 s for those
six scans), so they only pay off for loaders that hold the GIL. As with any ``spawn`` pool, a script calling
:func:`run_extract` with processes
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from .._util import progress_bar
from .cubes import CUBES_PER_VOLUME, PUBLISHED_CUBE, TooSmallError, cut_cube, extract_cubes, pad_to, thin_axes
from .intensity import resample
from .io import Source, VolumeError, channel_cases, dicom_tag_of, find_sources, label_map_reason, load_channels
from .modality import DEFAULT_MODALITY, ModalityWarning, from_dicom_tag, modality, value_warning
from .store import HASH, StoreWriter, file_digest, published_name, save_npy, save_published

__all__ = ["ExtractSettings", "Summary", "extract_source", "run_extract", "volume_seed"]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ExtractSettings:
    """What to cut from each volume (defaults: the published recipe, with margins scaled to the volume).

    ``modality`` (``data.modality.MODALITIES``; None: the DICOM Modality tag of the inputs, else CT) gives the window
    and the filter where they are None. ``pad``: a volume thinner than the cube along an axis is padded there with
    background (the window's low value, 0 after scaling), evenly on both sides; without it, it is skipped with a
    reason naming the axis. ``channels``: co-registered images per case (a 4-D NIfTI, or nnU-Net's
    ``<case>_0000.nii.gz`` ... files, ``io.channel_cases``); each is windowed on its own, the first chooses the cubes
    and all are cut at the same places into ``(n, channels, X, Y, Z)`` shards."""

    cube: tuple = PUBLISHED_CUBE
    count: int = CUBES_PER_VOLUME
    max_candidates: int | None = None
    filter: object = None
    window: object = None
    margins: object = "auto"
    spacing: tuple | None = None
    seed: int = 0
    modality: str | None = None
    pad: bool = False
    channels: int = 1

    def resolved(self, modality_name: str | None = None) -> "ExtractSettings":
        """These settings with the modality (``modality_name`` where none is set, else CT), window and filter set."""
        chosen = modality(self.modality or modality_name or DEFAULT_MODALITY)
        return replace(
            self,
            modality=chosen.name,
            window=chosen.intensity if self.window is None else self.window,
            filter=chosen.filter if self.filter is None else self.filter,
        )

    def params(self) -> dict:
        """A JSON description (stored in the manifest; a store is only continued with equal parameters)."""
        s = self.resolved()
        return {
            "cube": list(s.cube),
            "count": s.count,
            "max_candidates": s.max_candidates,
            "filter": s.filter.describe(),
            "window": s.window.describe(),
            "margins": s.margins if isinstance(s.margins, str) else list(s.margins),
            "spacing": None if s.spacing is None else [float(v) for v in s.spacing],
            "seed": s.seed,
            "modality": s.modality,
            "pad": s.pad,
            "channels": s.channels,
        }


def volume_seed(seed: int, key: str) -> np.random.SeedSequence:
    """The random stream of one source: a function of the run's seed and the source's key only."""
    return np.random.SeedSequence([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


@dataclass
class Summary:
    """What a run did: ``volumes`` found, ``written`` volumes with cubes, ``kept`` volumes already in the store
    (intact), ``skipped`` ``(source, reason)`` pairs, ``repaired`` what was found wrong in the store (damaged or
    missing shards, extracted again; a wrong manifest count, rewritten), ``cubes`` written this run, ``wall`` seconds,
    ``jobs`` and ``executor``."""

    volumes: int = 0
    written: int = 0
    kept: int = 0
    skipped: list = field(default_factory=list)
    cubes: int = 0
    wall: float = 0.0
    jobs: int = 1
    executor: str = "thread"
    outputs: list = field(default_factory=list)
    excluded: int = 0
    repaired: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    padded: list = field(default_factory=list)

    @property
    def label_maps(self) -> int:
        """Sources skipped because they are label maps (io.label_map_reason)."""
        return sum(reason.startswith("a label map") for _, reason in self.skipped)

    def lines(self) -> list[str]:
        head = (
            f"{self.volumes} volume(s): {self.written} written ({self.cubes} cubes)"
            + (f", {self.kept} already in the store" if self.kept else "")
            + (f", {len(self.repaired)} store problem(s) repaired" if self.repaired else "")
            + f", {len(self.skipped)} skipped"
            + (f" ({self.label_maps} label map(s))" if self.label_maps else "")
            + (f", {self.excluded} excluded by --include/--exclude" if self.excluded else "")
            + f"; {self.wall:.2f} s with {self.jobs} {self.executor} worker(s)"
        )
        return (
            [head]
            + [f"  repaired {problem}" for problem in self.repaired]
            + [f"  skipped {source}: {reason}" for source, reason in self.skipped]
            + [f"  padded {source} with background: {how}" for source, how in self.padded]
            + [f"  warning {message}" for message in self.warnings]
        )


def _init_worker() -> None:
    """One thread per worker: the parallelism is over volumes."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass


def extract_source(source: Source, settings: ExtractSettings, shard: str) -> dict:
    """Load one source, cut its cubes and write them to ``shard`` (atomically). Returns its manifest record, or
    ``{"key", "source", "reason"}`` when it is skipped (with ``"warning"`` when its values do not look like the
    modality). Never raises for a bad volume. ``settings``: resolved."""
    checked = {}
    try:
        if reason := label_map_reason(source.key):
            return {"key": source.key, "source": source.path, "reason": reason}
        volumes = load_channels(source)
        volume = volumes[0]
        if reason := (
            label_map_reason(source.key, volume.data)
            or _modality_mismatch(volume, settings.modality)
            or _channel_mismatch(len(volumes), settings.channels)
        ):
            return {"key": source.key, "source": source.path, "reason": reason}
        if found := [w for v in volumes if (w := value_warning(v, settings.modality))]:
            checked["warning"] = "; ".join(dict.fromkeys(found))  # the channels of a 4-D file share its name
        if settings.spacing is not None:
            volumes = [resample(v, settings.spacing) for v in volumes]
        volume = volumes[0]
        prepared = [_padded(v.data, settings) for v in volumes]  # each channel windowed on its own
        data, window, pads = prepared[0]
        result = extract_cubes(
            data,
            cube=settings.cube,
            count=settings.count,
            max_candidates=settings.max_candidates,
            filter=settings.filter,
            window=window,
            margins=settings.margins,
            rng=np.random.default_rng(volume_seed(settings.seed, source.key)),
        )
        if not len(result.cubes):
            raise ValueError(
                f"no candidate passed the {settings.filter.name} filter "
                f"({result.candidates} candidates, margins {result.margins})"
            )
        digest = save_npy(shard, _all_channels(result, prepared, settings.cube))
    except VolumeError as err:
        return {"key": source.key, "source": source.path, "reason": err.reason}
    except TooSmallError as err:
        hint = "pass --pad (pad=True) to pad it with background, or cut smaller cubes (--cube)"
        return {"key": source.key, "source": source.path, "reason": f"{err}; {hint}", **checked}
    except (ValueError, ImportError, OSError) as err:  # no cube passes, missing SimpleITK, disk errors
        return {"key": source.key, "source": source.path, "reason": str(err) or type(err).__name__, **checked}
    except Exception as err:  # anything else (MemoryError, a library's RuntimeError): this volume only
        return {"key": source.key, "source": source.path, "reason": f"{type(err).__name__}: {err}", **checked}
    return {
        "key": source.key,
        "source": source.path,
        "series_uid": source.series_uid,
        "shard": "",
        "count": len(result.cubes),
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "window": [result.window.lo, result.window.hi],
        **({"windows": [[w.lo, w.hi] for _, w, _ in prepared]} if len(prepared) > 1 else {}),
        "margins": list(result.margins),
        "padded": pads,
        "candidates": result.candidates,
        "origins": result.origins.tolist(),
        "scores": [None if np.isnan(s) else round(float(s), 6) for s in result.scores],
        **checked,
        HASH: digest,
    }


def _channel_mismatch(found: int, channels: int) -> str | None:
    if found == channels:
        return None
    return f"has {found} channel(s), this store takes {channels} (--channels)"


def _all_channels(result, prepared, cube) -> np.ndarray:
    """The cubes of every channel at the origins the first channel's filter chose: (n, C, X, Y, Z), or the first
    channel's (n, X, Y, Z) alone."""
    if len(prepared) == 1:
        return result.cubes
    others = [[cut_cube(data, o, cube, window) for o in result.origins] for data, window, _ in prepared[1:]]
    return np.stack([result.cubes, *(np.stack(c) for c in others)], axis=1)


def _modality_mismatch(volume, name: str) -> str | None:
    """Why a DICOM volume whose Modality tag names another known modality does not belong in this store."""
    tagged = from_dicom_tag(volume.modality)
    if tagged is None or tagged == name:
        return None
    return f"its DICOM Modality is {volume.modality}, this store is {name}: extract it with --modality {tagged}"


def _padded(data: np.ndarray, settings: ExtractSettings):
    """``data`` padded to the cube where it is thinner and ``settings.pad`` allows it (the window resolved before:
    padding must not move a percentile window), its window, and the ``[before, after]`` voxels per axis (or None)."""
    window = settings.window.resolve(data)
    need = [c + e for c, e in zip(settings.cube, settings.filter.extra)]
    if not (settings.pad and thin_axes(data.shape, need)):
        return data, window, None
    data, pads = pad_to(data, need, window.lo)
    return data, window, pads


def _padding(pads) -> str:
    return ", ".join(f"{'xyz'[a]} {b} + {e} voxels" for a, (b, e) in enumerate(pads) if b or e)


def store_modality(sources) -> str | None:
    """The modality the DICOM Modality tag of the first tagged source names (None: no DICOM source tags a modality we
    know)."""
    for s in sources:
        if (name := from_dicom_tag(dicom_tag_of(s, "0008|0060"))) is not None:
            return name
    return None


@contextmanager
def _single_threaded_children():
    """Spawned children read these at start-up (before they can call :func:`_init_worker`)."""
    saved = {var: os.environ.get(var) for var in _THREAD_VARS}
    os.environ.update({var: "1" for var in _THREAD_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _executor(kind: str, jobs: int):
    if kind == "process":
        return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    if kind == "thread":
        return ThreadPoolExecutor(jobs)
    raise ValueError(f"executor must be 'process' or 'thread', not {kind!r}")


def _subset_name(item, k: int) -> str:
    match = re.search(r"subset(\d+)", Path(item).resolve().name)
    return match.group(1) if match else str(k)


def run_extract(
    inputs,
    out,
    settings: ExtractSettings = ExtractSettings(),
    *,
    jobs: int | None = None,
    executor: str = "thread",
    fmt: str = "store",
    progress: bool = True,
    include=(),
    exclude=(),
) -> Summary:
    """Extract cubes from every volume under ``inputs`` (files and directories) into the store ``out``.

    ``include`` / ``exclude``: glob patterns (fnmatch) on each source's key, its path relative to its input: only
    sources matching an ``include`` pattern (all, when there is none) and no ``exclude`` pattern are used. Label
    maps (segmentation masks beside the scans: by folder, name or content, see ``io.label_map_reason``) are skipped
    with their reason and counted (``Summary.label_maps``).

    Every input must exist: a missing one is a FileNotFoundError raised before anything is created or written.
    On an existing store, the shard of every source it already holds is verified (header, rows and checksum: one
    full read) and extracted again when it fails; ``Summary.repaired`` says what was wrong.

    ``jobs``: parallel workers (default: all cores, at most one per volume). ``fmt="published"`` also writes one
    published-layout array per input (``bat_<count>_s_<X>x<Y>x<Z>_<subset>.npy``, subset from a ``subsetN`` input
    name, else the input's position) and points the manifest at those arrays instead of per-volume shards.
    """
    if fmt not in ("store", "published"):
        raise ValueError(f"fmt must be 'store' or 'published', not {fmt!r}")
    start = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:  # before the store is created: a mistyped path must not leave an empty store behind
        raise FileNotFoundError(
            f"input not found: {', '.join(missing)} (no such file or directory); nothing was written to {out}: "
            "correct the path and run again"
        )
    found, problems = find_sources(inputs)
    chosen = [
        s
        for s in found
        if (not include or any(fnmatch(s.key, p) for p in include)) and not any(fnmatch(s.key, p) for p in exclude)
    ]
    sources, incomplete = channel_cases(chosen, settings.channels)
    settings = settings.resolved(store_modality(sources))
    writer = StoreWriter(out, settings.params(), settings.cube)
    summary = Summary(
        executor=executor, volumes=len(sources), skipped=[*problems, *incomplete], excluded=len(found) - len(chosen)
    )
    todo = _to_extract(writer, sources, progress)
    summary.kept = len(sources) - len(todo)
    summary.jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))

    def finish(record: dict) -> None:
        if "warning" in record:
            summary.warnings.append(record["warning"])
            warnings.warn(record["warning"], ModalityWarning, stacklevel=3)
        if "reason" in record:
            writer.skip(record["key"], record["source"], record["reason"])
            summary.skipped.append((record["source"], record["reason"]))
        else:
            record["shard"] = str(writer.shard_path(tags[record["key"]]).relative_to(writer.root))
            writer.add(record)
            summary.written += 1
            summary.cubes += record["count"]
            if record["padded"]:
                summary.padded.append((record["source"], _padding(record["padded"])))

    tags = {s.key: s.tag for s in todo}
    bar = progress_bar(len(todo), "extract", "vol", progress)
    try:
        if summary.jobs == 1 or len(todo) <= 1:
            for s in todo:
                finish(extract_source(s, settings, str(writer.shard_path(s.tag))))
                bar.update(1)
                bar.set_postfix(cubes=summary.cubes, skipped=len(summary.skipped))
        else:
            with _single_threaded_children(), _executor(executor, summary.jobs) as pool:
                pending = {pool.submit(extract_source, s, settings, str(writer.shard_path(s.tag))): s for s in todo}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        s = pending.pop(future)
                        try:
                            record = future.result()
                        except Exception as err:  # a worker died (e.g. killed for memory): skip, keep going
                            record = {"key": s.key, "source": s.path, "reason": f"worker failed: {err!r}"}
                        finish(record)
                        bar.update(1)
                    bar.set_postfix(cubes=summary.cubes, skipped=len(summary.skipped))
    finally:
        bar.close()
        writer.flush()
    summary.repaired = list(writer.repaired)
    if fmt == "published":
        summary.outputs = _write_published(writer, inputs, sources, settings)
    summary.wall = time.perf_counter() - start
    return summary


def _to_extract(writer: StoreWriter, sources, progress: bool) -> list:
    """The sources whose cubes the store does not hold intact (verifying a held shard reads it whole)."""
    held = sum(s.key in writer.records for s in sources)
    bar = progress_bar(held, "verify", "vol", progress and held > 0)
    todo = []
    for s in sources:
        if not writer.done(s.key):
            todo.append(s)
        if s.key in writer.records:
            bar.update(1)
    bar.close()
    return todo


def _write_published(writer: StoreWriter, inputs, sources, settings) -> list[Path]:
    """Concatenate each input's cubes into one published-layout array and point the manifest at it."""
    outputs, retired = [], []
    for k, item in enumerate(inputs):
        records = [writer.records[s.key] for s in sources if s.input == str(item) and s.key in writer.records]
        if not records:
            continue
        cubes = np.concatenate([_read_rows(writer.root, r) for r in records])
        path = save_published(cubes, writer.root / published_name(settings.count, settings.cube, _subset_name(item, k)))
        digest = file_digest(path)
        row = 0
        for r in records:
            if r["shard"] != path.name:
                retired.append(writer.root / r["shard"])
            r.update({"shard": path.name, "first_row": row, HASH: digest})
            row += r["count"]
        outputs.append(path)
    writer.flush()
    for f in retired:  # only once the manifest points at the published arrays
        f.unlink(missing_ok=True)
    return outputs


def _read_rows(root: Path, record: dict) -> np.ndarray:
    rows = np.load(root / record["shard"], mmap_mode="r")
    first = record.get("first_row", 0)
    return np.array(rows[first : first + record["count"]], dtype=np.float32)


__all__ = ["ExtractSettings", "Summary", "extract_source", "run_extract", "volume_seed"]
