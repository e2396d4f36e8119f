"""What the exports share: their error, the checkpoint's architecture, the refusal to overwrite, the provenance of
the weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..models.backbones import BackboneError, recorded_arch


class ExportError(ValueError):
    """Weights or a destination an export refuses, with what to do instead."""


def checkpoint_arch(checkpoint, path) -> dict:
    """The architecture a genesis-ext checkpoint records; ExportError for one that records none or a bad one."""
    try:
        arch = recorded_arch(checkpoint)
    except BackboneError as err:
        raise ExportError(f"genesis_ext: {path}: its recorded architecture: {err}") from None
    if arch is None:
        raise ExportError(
            f"genesis_ext: {path} records no architecture: export a checkpoint of genesis-ext pretrain or finetune"
        )
    return arch


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ExportError(f"genesis_ext: {out} exists; pass --overwrite (overwrite=True) to replace it")


def source_of(weights: str | os.PathLike) -> dict:
    """The weights file's name and SHA-256: which checkpoint an export came from."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"file": Path(weights).name, "sha256": digest.hexdigest()}
