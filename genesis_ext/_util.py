"""Helpers with one job each, used across the package: atomic file writes, progress bars and lines printed beside
them, the verbs' count arguments, the message for a missing torch and deprecated aliases of renamed names."""

from __future__ import annotations

import argparse
import os
import uuid
import warnings
from pathlib import Path
from typing import IO, Any, Callable

TORCH_MISSING = "needs PyTorch, which is not installed: pip install 'genesis-ext[train]'"


def positive_int(text: str) -> int:
    """argparse type of the verbs' counts and sizes."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def deprecated_aliases(module: str, aliases: dict[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old names for one release: ``aliases`` maps each old name to (its new
    name, a function returning the object), and reading an old name warns with ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, get = aliases[name]
        warnings.warn(f"{module}.{name} is deprecated, use {new}", DeprecationWarning, stacklevel=2)
        return get()

    return __getattr__


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], text: bool = False) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file next to it, fsync it, rename it into place and
    fsync the folder: a crash at any moment leaves the old file or the new one, never a partial file. ``text``: the
    file is opened in text mode (newline="" for csv), else binary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # "x", not mkstemp: mkstemp's files are private (0600) whatever the umask
        with open(tmp, "x", newline="") if text else open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


class _NoBar:
    """The progress bar when bars are off: the same methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, leave: bool = True):
    """A tqdm bar (``update``, ``set_postfix``, ``close``), or one that does nothing when ``enabled`` is false or
    tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return _NoBar()


def print_line(line: str) -> None:
    """print, without breaking a progress bar on the screen (tqdm.write) when tqdm is installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
    else:
        tqdm.write(line)
