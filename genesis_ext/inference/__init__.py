"""Whole-volume inference. Needs torch.

    from genesis_ext.inference.predict import predict                # checkpoint + CT files -> label maps (NIfTI)
    from genesis_ext.inference.sliding_window import sliding_window  # Gaussian-blended windows of a patch network

``predict`` and ``sliding_window`` are imported from their modules: a package attribute of the same name as a
submodule would be the function or the module depending on import order. The other names are here, imported lazily
so that the verb's argument parser (``inference.predict``) does not import torch."""

from importlib import import_module

_NAMES = {
    "PredictError": "predict",
    "Predictor": "predict",
    "gaussian_importance": "sliding_window",
    "load_predictor": "predict",
    "predict_volume": "predict",
    "window_boxes": "sliding_window",
    "window_starts": "sliding_window",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
