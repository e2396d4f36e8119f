"""genesis_ext: Models Genesis self-supervised deformations as fused, batched C++/CUDA kernels."""
try:  # load torch's libgomp first, so the kernels share torch's OpenMP runtime instead of starting a second one
    import torch  # noqa: F401
except ImportError:
    pass

from . import _C
from .config import DeformConfig
from .ops import (bezier_remap, flip, gaussian_noise, genesis_pair, inpaint, local_shuffle, outpaint,
                  sample_params)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation was built with: ``with_cuda``, ``cuda_archs``, ``with_openmp``, ``cuda_devices``
    (usable devices now) and ``cuda_unavailable_reason`` (empty when CUDA is usable)."""
    return dict(_C.build_info())


__all__ = ["DeformConfig", "bezier_remap", "build_info", "flip", "gaussian_noise", "genesis_pair", "inpaint",
           "local_shuffle", "outpaint", "sample_params"]
