"""The Models Genesis networks (3D U-Net, encoder, classifier) and their weights. Needs torch."""

from .classifier import GenesisClassifier
from .unet3d import BATCHNORM_MODES, BatchStatsBatchNorm3d, GenesisEncoder, UNet3D
from .weights import CheckpointError, load_pretrained, save_checkpoint

__all__ = [
    "BATCHNORM_MODES",
    "BatchStatsBatchNorm3d",
    "CheckpointError",
    "GenesisClassifier",
    "GenesisEncoder",
    "UNet3D",
    "load_pretrained",
    "save_checkpoint",
]
