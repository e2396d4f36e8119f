"""genesis_ext: Models Genesis self-supervised deformations as fused, batched C++/CUDA kernels.

The public names are imported on first use (PEP 562): ``import genesis_ext`` and the ``genesis-ext`` command's
argument parsing load neither torch nor the compiled extension; the first op or ``build_info`` call does (a
``DeformConfig`` needs only numpy).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DeformConfig": "config",
    "GenesisDeform": "transforms",
    "GenesisPair": "transforms",
    "PixelDeformation": "user_deformations",
    "genesis_pair": "ops",
    "sample_params": "ops",
}  # and each single op of config.PAIR_STAGES, from ops (_exports)


def _exports() -> dict:
    """Public name -> module, with the single ops declared in config.PAIR_STAGES (loaded on first use: numpy)."""
    return {**_EXPORTS, **dict.fromkeys(import_module(".config", __name__).SINGLE_OPS, "ops")}


def _core():
    """The extension module, loaded after torch (when installed): then the kernels share torch's OpenMP runtime
    instead of starting a second one."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    return import_module("._C", __name__)


def build_info() -> dict:
    """What this installation was built with: ``with_cuda``, ``cuda_archs``, ``with_openmp``, ``cuda_devices``
    (usable devices now) and ``cuda_unavailable_reason`` (empty when CUDA is usable)."""
    return dict(_core().build_info())


def __getattr__(name):
    if name == "_C":
        value = _core()
    elif name == "__all__":
        value = sorted([*_exports(), "build_info"])
    elif name in (exports := _exports()):
        value = getattr(import_module(f".{exports[name]}", __name__), name)
    else:  # a submodule: genesis_ext.ops, genesis_ext.reference, ...
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_exports()) | {"_C"})
