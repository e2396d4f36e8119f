"""Training checkpoints: written atomically (temp file, fsync, rename), read back with ``weights_only=True``.

A checkpoint is ``{"state_dict": <model weights, plain key names>, "optimizer": ..., "scheduler": ..., "epoch":
<epochs completed>, "sample_offset": <global index of the next training sample>, "best_val": ..., "bad_epochs": ...,
"config": {...}, "format": FORMAT}``: ``genesis_ext.models.load_pretrained`` loads its weights directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..models import CheckpointError
from ..models.weights import _read

FORMAT = "genesis_ext.pretrain/1"


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a training checkpoint written by :func:`atomic_save` in :func:`genesis_ext.train.pretraining.pretrain`.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for an unreadable one or one that is not a
    pre-training checkpoint (e.g. bare published weights, which can start a run through ``init_weights`` instead)."""
    path = Path(path)
    state = _read(path, "cpu")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a genesis_ext pre-training checkpoint (no "
            f"format={FORMAT!r} entry); to start from its weights, use init_weights / --init"
        )
    missing = [
        k
        for k in ("state_dict", "optimizer", "scheduler", "epoch", "sample_offset", "best_val", "bad_epochs")
        if k not in state
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
