"""Loading and saving Models Genesis weights, safely and strictly.

Checkpoint formats read by ``load_pretrained``:
- the published one (``Genesis_Chest_CT.pt``): ``{"state_dict": {"module.<key>": tensor, ...}, "optimizer_state_dict":
  ..., "epoch": ...}``;
- ours, written by ``save_checkpoint``: ``{"state_dict": {"<key>": tensor, ...}, **extra}`` (the same layout without
  the DataParallel prefix);
- nnU-Net v2's (its checkpoints, and ``genesis-ext export --nnunet``'s files): ``{"network_weights": state_dict, ...}``;
- a ``{"model": state_dict}`` dict, or a bare state_dict.
Key prefixes added by wrappers (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``) are removed.

Files are always read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects (whose unpickling could run code). A checkpoint that does not fit the model is an error naming every
missing, unexpected and shape-mismatched key; nothing is loaded then.

Integrity: every checkpoint this package writes (``save_checkpoint``, the training loop's) is sealed with
``seal``: an ``"integrity"`` entry holding the format version (``FORMAT_VERSION``) and the SHA-256 of each tensor
(its path in the file, dtype, shape and bytes). ``read_checkpoint``, the one reader of every load path, checks a
sealed file's tensors against its seal and the CRC-32s of the zip's other records (the pickle: settings, counters,
key names), and refuses NaN/Inf in any file's weights. A file that does not unpickle is reported as damaged, naming
the zip record whose CRC-32 fails (only a pickle with intact CRCs that names a class or function is refused as
unsafe). Files without a seal (the published weights, a plain state_dict) load after the CRC-32 checks of all their
records, where they are zips, and the NaN/Inf check of their weights.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
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
INTEGRITY_KEY = "integrity"  # the seal's entry in a checkpoint of ours
FORMAT_VERSION = 1  # of our checkpoints: 1, sealed with SHA-256 digests (files without a seal predate it)
_TENSOR_RECORD = re.compile(r"/data/\d+$")  # a tensor storage's record in torch.save's zip


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


def _unsafe(e: BaseException) -> bool:
    """torch.load refused a class or function in the pickle: unpickling it could run code."""
    return isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e)


def _zip_damage(path: Path, tensors: bool) -> str | None:
    """Which record of a zip checkpoint fails its CRC-32 check (``tensors`` False: only the pickle and the small
    records, not the tensor storages), or None where all pass or the file is no zip (torch.save's legacy format
    carries no checksums)."""
    if not zipfile.is_zipfile(path):
        return None
    where = "directory"
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                where = f"record {record.filename}"
                if tensors or not _TENSOR_RECORD.search(record.filename):
                    with archive.open(record) as f:
                        while f.read(1 << 24):  # zipfile checks the CRC-32 at the record's end
                            pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"its zip {where} fails its check ({e})"
    return None


def _load(path: Path, map_location: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors: FileNotFoundError, or CheckpointError for a file
    that is damaged (or no checkpoint at all) or would run code when unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"genesis_ext: no checkpoint file at {path}: it does not exist; {PUBLISHED_WEIGHTS}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load fails in many ways on arbitrary bytes (RuntimeError, EOFError, KeyError, ...)
        damage = _zip_damage(path, tensors=True)
        if damage is None and _unsafe(e):  # intact bytes that name a class or function: the file can run code
            raise CheckpointError(
                f"genesis_ext: refused to load {path}: it holds pickled Python objects other than tensors and plain "
                f"containers, which could run arbitrary code when unpickled (read with torch.load(weights_only=True); "
                f"{_reason(e)})"
            ) from e
        damage = damage or "truncated, corrupt or not written by torch.save"
        raise CheckpointError(
            f"genesis_ext: {path} is damaged: it is not a readable PyTorch checkpoint ({damage}; {_reason(e)}); "
            f"nothing was loaded. Use an intact copy of the file; {PUBLISHED_WEIGHTS}"
        ) from e


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in nested mappings, lists and tuples, in order: ``state_dict/down_tr64...``."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}" if path else str(i))


def _digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's name, dtype, shape and bytes (in logical order, whatever its strides or device)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 1:  # one element counts as contiguous whatever its stride, which view(uint8) refuses
        flat = flat.clone(memory_format=torch.contiguous_format)
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _digests(checkpoint: Mapping) -> dict[str, str]:
    """The SHA-256 of each tensor of ``checkpoint`` but its seal, by its path, in order."""
    body = {k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY}
    return {name: _digest(name, tensor) for name, tensor in _tensors(body)}


def seal(checkpoint: Mapping) -> dict:
    """``checkpoint`` (a dict of tensors and plain values) with its integrity entry: ``FORMAT_VERSION`` and the
    SHA-256 of each tensor, which ``read_checkpoint`` checks. Every checkpoint genesis_ext writes goes through here."""
    seal_entry = {"format_version": FORMAT_VERSION, "sha256": _digests(checkpoint)}
    return {**checkpoint, INTEGRITY_KEY: seal_entry}


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"genesis_ext: {path} is damaged: {what} (its bytes changed after it was written: a disk, copy or transfer "
        "error); nothing was loaded. Use an intact copy of the file (a backup, or another checkpoint of the run)"
    )


def _first_mismatch(recorded: Mapping, found: Mapping) -> str | None:
    """The first tensor whose digest differs from the seal's, is missing or is not in the seal."""
    for name, digest in recorded.items():
        if name not in found:
            return f"tensor '{name}' is missing"
        if found[name] != digest:
            return f"tensor '{name}' does not match its SHA-256 checksum"
    extra = [name for name in found if name not in recorded]
    return f"tensor '{extra[0]}' is not in its checksum list" if extra else None


def _check_seal(checkpoint: Mapping, path: Path) -> None:
    """Raises CheckpointError where a sealed checkpoint's tensors differ from its seal."""
    entry = checkpoint[INTEGRITY_KEY]
    version = entry.get("format_version") if isinstance(entry, Mapping) else None
    recorded = entry.get("sha256") if isinstance(entry, Mapping) else None
    if not isinstance(version, int) or not isinstance(recorded, Mapping):
        raise _damaged(path, f"its '{INTEGRITY_KEY}' entry (format version and checksums) is malformed")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"genesis_ext: {path} has checkpoint format version {version}, newer than this genesis_ext reads "
            f"({FORMAT_VERSION}): upgrade genesis_ext to load it"
        )
    mismatch = _first_mismatch(recorded, _digests(checkpoint))
    if mismatch:
        raise _damaged(path, mismatch)


def _check_finite(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raises CheckpointError naming the weights that hold NaN or Inf. Only the weights: an optimizer's state may
    hold Inf in a healthy run (Adam's exp_avg_sq after a huge gradient, seen under bf16 autocast)."""
    bad = [
        name
        for name, tensor in weights.items()
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise CheckpointError(
            f"genesis_ext: {path}: {len(bad)} tensor(s) hold NaN or Inf values {_listing(bad)}: weights no network can "
            "use (from a run that diverged, or a broken export); nothing was loaded. Use an earlier checkpoint (e.g. "
            "the run's best.pt) or other weights"
        )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The contents of the checkpoint at ``path``, read with ``torch.load(weights_only=True)`` and verified: the zip's
    CRC-32s, a sealed file's (ours) SHA-256 per tensor, and no NaN or Inf in its weights (its state_dict). Every load
    path of genesis_ext reads through here. Raises FileNotFoundError for a missing file and CheckpointError for a
    damaged, refused or non-finite one, or one without a state_dict (naming the file and, where known, the
    tensor)."""
    path = Path(path)
    obj = _load(path, map_location)
    sealed = isinstance(obj, Mapping) and INTEGRITY_KEY in obj
    damage = _zip_damage(path, tensors=not sealed)  # a seal covers the tensors, and names them
    if damage:
        raise _damaged(path, damage)
    if sealed:
        _check_seal(obj, path)
    _check_finite(_state_dict_of(obj, path), path)
    return obj


def read_weights(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, torch.Tensor], Any]:
    """The verified state_dict of the checkpoint at ``path`` (plain key names) and the whole checkpoint, read once
    (:func:`read_checkpoint`'s checks and errors)."""
    checkpoint = read_checkpoint(path, map_location)
    return _state_dict_of(checkpoint, Path(path)), checkpoint


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint, with wrapper prefixes removed."""
    state = obj
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "network_weights", "model"):
            if isinstance(obj.get(entry), Mapping):
                state = obj[entry]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"a dict with keys {_listing(list(obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"genesis_ext: {path} holds no state_dict: expected a mapping of parameter names to "
            f"tensors, or a dict with one under 'state_dict', 'network_weights' or 'model'; found {found}"
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
    state = _state_dict_of(read_checkpoint(path, map_location), path)
    if model is None:
        model = _model_for(state, encoder_only)
    load_state(model, state, path, encoder_only=encoder_only)
    return model


def load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    encoder_only: bool = False,
    fix: str = PUBLISHED_WEIGHTS,
) -> None:
    """Load ``state`` (a state_dict with plain key names, read from ``path``) into ``model``: strictly, or only the
    encoder (``encoder_only``). Raises ``CheckpointError`` listing every missing, unexpected and shape-mismatched key,
    with ``fix`` (what to do about it); nothing is loaded then."""
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
            f"nothing was loaded: " + "; ".join(problems) + hint + f" ({fix})"
        )
    target.load_state_dict(state, strict=not encoder_only)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (``_util.atomic_write``): never a partial file."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{"state_dict": <model's state_dict, plain key names>, **extra}``, sealed (``seal``), to ``path``
    (atomically: a partly written file never replaces a good one). ``extra`` (e.g. ``optimizer_state_dict``,
    ``epoch``) must hold only tensors, numbers, strings and containers of them, so that
    ``torch.load(weights_only=True)`` can read it back."""
    for name in ("state_dict", INTEGRITY_KEY):
        if name in extra:
            raise ValueError(f"genesis_ext.save_checkpoint: '{name}' is the checkpoint's own entry; pass other names")
    atomic_save(seal({"state_dict": _unwrap(model).state_dict(), **extra}), path)
