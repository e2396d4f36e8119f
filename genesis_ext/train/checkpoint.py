"""Training checkpoints: written atomically (temp file, fsync, rename), read back with ``weights_only=True``.

A checkpoint of a ``Trainer`` run is ``{"state_dict": <model weights, plain key names>, "optimizer": ...,
"scheduler": ..., "epoch": <epochs completed>, "best_val": ..., "bad_epochs": ..., "best_epoch": ..., "config":
{...}, "format": FORMAT, ...}`` plus the task's entries (pre-training: ``sample_offset``, the global index of the next
training sample; fine-tuning: ``task`` and the epoch's metrics), sealed with its checksums
(``genesis_ext.models.weights.seal``) and verified on every read (``read_checkpoint``).
``genesis_ext.models.load_pretrained`` loads its weights directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..models import CheckpointError
from ..models.weights import read_checkpoint

FORMAT = "genesis_ext.train/1"
_FORMATS = (FORMAT, "genesis_ext.pretrain/1")  # the earlier name, written by pre-training runs before the Trainer


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (``checkpoints/last.pt`` of a pre-training run, ``last.pt`` of a fine-tuning run).

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a damaged or non-finite one
    (``read_checkpoint``) or one that is not a training checkpoint (e.g. bare published weights, which can start a run
    through ``init_weights`` instead)."""
    path = Path(path)
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") not in _FORMATS:
        raise CheckpointError(
            f"checkpoint {path} is not a genesis_ext training checkpoint (no format={FORMAT!r} entry); to start "
            "from its weights, use init_weights / --init (pre-training) or --weights (fine-tuning)"
        )
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch", "best_val", "bad_epochs") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
