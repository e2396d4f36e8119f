"""Training: Models Genesis pre-training (:mod:`~genesis_ext.train.pretraining`, ``genesis-ext pretrain``) and
fine-tuning (:mod:`~genesis_ext.train.finetuning`, ``genesis-ext finetune``) on one loop (:mod:`~.trainer`), with the
segmentation losses (:mod:`~.losses`). Needs torch.

Names are imported lazily, so ``genesis_ext.train.cli`` (the argument parser) does not import torch."""

from importlib import import_module

from .._util import deprecated_aliases

_NAMES = {
    "ClassificationTrainer": "finetuning",
    "FinetuneConfig": "finetuning",
    "FinetuneError": "finetuning",
    "SegmentationTrainer": "finetuning",
    "finetune": "finetuning",
    "LOSSES": "losses",
    "RECIPES": "pretraining",
    "NonFiniteLossError": "errors",
    "PretrainTrainer": "pretraining",
    "Trainer": "trainer",
    "PretrainConfig": "pretraining",
    "PretrainResult": "pretraining",
    "pretrain": "pretraining",
    "load_training_state": "checkpoint",
    "read_csv": "logs",
}

__all__ = sorted(_NAMES)


_deprecated = deprecated_aliases(__name__, {"PRESETS": ("genesis_ext.train.RECIPES", lambda: __getattr__("RECIPES"))})


def __getattr__(name):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    return _deprecated(name)
