"""Loading and saving Models Genesis weights, safely and strictly.

Checkpoint formats read by ``load_pretrained``:
- the published one (``Genesis_Chest_CT.pt``): ``{"state_dict": {"module.<key>": tensor, ...}, "optimizer_state_dict":
  ..., "epoch": ...}``;
- ours, written by ``save_checkpoint``: ``{"state_dict": {"<key>": tensor, ...}, **extra}`` (the same layout without
  the DataParallel prefix);
- a ``{"model": state_dict}`` dict, or a bare state_dict.
Key prefixes added by wrappers (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``) are removed.

Files are always read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects (whose unpickling could run code). A checkpoint that does not fit the model is an error naming every
missing, unexpected and shape-mismatched key; nothing is loaded then.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import atomic_write
from .unet3d import GenesisEncoder, GenesisEncoder2D, UNet2D, UNet3D

# Where the published weights come from (the authors distribute them; this package does not ship them).
PUBLISHED_WEIGHTS = (
    "the published Models Genesis weights (Genesis_Chest_CT.pt) come from the authors: request them with the form "
    "linked under 'Download the pre-trained Models Genesis' in https://github.com/MrGiovanni/ModelsGenesis/blob/master/"
    "pytorch/README.md (the authors' later SuPreM repository links the file directly: "
    "https://www.dropbox.com/s/lh5kuyjxwjsxjpl/Genesis_Chest_CT.pt)"
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ENCODER_PREFIX = "down_tr"
_LIST_LIMIT = 12  # keys listed per kind of mismatch; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is refused, or does not fit the model."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has the plain key names: inside DataParallel/DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (torch's weights_only message is long and suggests unsafe loading)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    line = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else "")
    return f"{type(e).__name__}: {line.split('. ')[0][:300]}"


def _read(path: Path, map_location: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors: FileNotFoundError, or CheckpointError for a file
    that is corrupt or would run code when unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"genesis_ext: no checkpoint file at {path}: it does not exist; {PUBLISHED_WEIGHTS}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load fails in many ways on arbitrary bytes (RuntimeError, EOFError, KeyError, ...)
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # a class or function: the file can run code
            raise CheckpointError(
                f"genesis_ext: refused to load {path}: it holds pickled Python objects other than tensors and plain "
                f"containers, which could run arbitrary code when unpickled (read with torch.load(weights_only=True); "
                f"{_reason(e)})"
            ) from e
        raise CheckpointError(
            f"genesis_ext: {path} is not a readable PyTorch checkpoint (unreadable: corrupt, "
            f"truncated or not written by torch.save): {_reason(e)}; {PUBLISHED_WEIGHTS}"
        ) from e


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint, with wrapper prefixes removed."""
    state = obj
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                state = obj[entry]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"a dict with keys {_listing(list(obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"genesis_ext: {path} holds no state_dict: expected a mapping of parameter names to "
            f"tensors, or a dict with one under 'state_dict' or 'model'; found {found}"
        )
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _strip_prefixes(str(key))
        if name in stripped:
            raise CheckpointError(f"genesis_ext: {path} holds '{name}' twice (with and without a wrapper prefix)")
        stripped[name] = value
    return stripped


def _listing(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_LIST_LIMIT])
    return f"[{shown}{f', ... and {len(keys) - _LIST_LIMIT} more' if len(keys) > _LIST_LIMIT else ''}]"


def _mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_listing(unexpected)}")
    if shapes:
        more = f", ... and {len(shapes) - _LIST_LIMIT} more" if len(shapes) > _LIST_LIMIT else ""
        problems.append(f"{len(shapes)} shape mismatch(es) [{'; '.join(shapes[:_LIST_LIMIT])}{more}]")
    return problems


def _model_for(state: Mapping[str, torch.Tensor], encoder_only: bool) -> nn.Module:
    """The model a checkpoint describes, its channel counts and width read off the first and last conv weights (the
    first conv has 32 output channels at width 1)."""
    first = state.get("down_tr64.ops.0.conv1.weight")
    known = first is not None and first.dim() in (4, 5)  # 4: the 2-D network's (out, in, 3, 3)
    in_channels = int(first.shape[1]) if known else 1
    width = int(first.shape[0]) / 32 if known else 1.0
    two_d = known and first.dim() == 4
    if encoder_only:
        return (GenesisEncoder2D if two_d else GenesisEncoder)(in_channels, width=width)
    last = state.get("out_tr.final_conv.weight")
    n_class = int(last.shape[0]) if last is not None and last.dim() in (4, 5) else 1
    return (UNet2D if two_d else UNet3D)(in_channels, n_class, width=width)


def load_pretrained(
    model: nn.Module | None, path: str | os.PathLike, *, encoder_only: bool = False, map_location: Any = "cpu"
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` and return it.

    ``model`` may be any module with the published key names (``UNet3D``, ``GenesisClassifier``, ``GenesisEncoder``),
    also wrapped in DataParallel/DDP or ``torch.compile``. ``None`` builds one from the checkpoint's shapes:
    ``UNet3D(in_channels, n_class)``, or ``GenesisEncoder(in_channels)`` when ``encoder_only`` (published
    ``batch_stats`` BatchNorm in both).

    ``encoder_only=True`` loads only the encoder (``down_tr*`` keys; the checkpoint's other keys are ignored and the
    model's other parameters keep their values): the start of classification fine-tuning. Otherwise the load is
    strict. Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` (a ``ValueError``) for an
    unreadable, refused or mismatching one; a mismatch lists every missing, unexpected and shape-mismatched key.
    """
    path = Path(path)
    state = _state_dict_of(_read(path, map_location), path)
    if model is None:
        model = _model_for(state, encoder_only)
    target = _unwrap(model)
    expected = target.state_dict()
    if encoder_only:
        expected = {k: v for k, v in expected.items() if k.startswith(ENCODER_PREFIX)}
        if not expected:
            raise CheckpointError(
                f"genesis_ext: encoder_only: {type(target).__name__} has no encoder parameters "
                f"('{ENCODER_PREFIX}*' keys)"
            )
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    problems = _mismatches(state, expected)
    if problems:
        part = "encoder of " if encoder_only else ""
        config = f"({target.extra_repr()})" if target.extra_repr() else ""
        width = getattr(target, "width", 1.0)
        hint = f"; a network of width {width:g} has other shapes than the published one (width 1)" if width != 1 else ""
        raise CheckpointError(
            f"genesis_ext: checkpoint {path} does not fit the {part}{type(target).__name__}{config}; "
            f"nothing was loaded: " + "; ".join(problems) + hint + f" ({PUBLISHED_WEIGHTS})"
        )
    target.load_state_dict(state, strict=not encoder_only)
    return model


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (``_util.atomic_write``): never a partial file."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{"state_dict": <model's state_dict, plain key names>, **extra}`` to ``path`` (atomically: a partly
    written file never replaces a good one). ``extra`` (e.g. ``optimizer_state_dict``, ``epoch``) must hold only
    tensors, numbers, strings and containers of them, so that ``torch.load(weights_only=True)`` can read it back."""
    if "state_dict" in extra:
        raise ValueError("genesis_ext.save_checkpoint: 'state_dict' is the model's entry; pass other names in extra")
    atomic_save({"state_dict": _unwrap(model).state_dict(), **extra}, path)
