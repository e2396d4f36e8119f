"""The Models Genesis networks (3D U-Net, its 2-D twin, encoder, classifier), the other backbones by name
(``backbones``: nnU-Net's and MONAI's networks) and their weights. Needs torch."""

from .backbones import BACKBONES, BackboneError, build_backbone, check_backbone
from .classifier import GenesisClassifier, GenesisClassifier2D
from .record import ModelRecord
from .unet3d import (
    BATCHNORM_MODES,
    BatchStatsBatchNorm2d,
    BatchStatsBatchNorm3d,
    GenesisEncoder,
    GenesisEncoder2D,
    UNet2D,
    UNet3D,
)
from .weights import CheckpointError, load_pretrained, save_checkpoint

__all__ = [
    "BACKBONES",
    "BATCHNORM_MODES",
    "BackboneError",
    "BatchStatsBatchNorm2d",
    "BatchStatsBatchNorm3d",
    "CheckpointError",
    "GenesisClassifier",
    "GenesisClassifier2D",
    "GenesisEncoder",
    "GenesisEncoder2D",
    "ModelRecord",
    "UNet2D",
    "UNet3D",
    "build_backbone",
    "check_backbone",
    "load_pretrained",
    "save_checkpoint",
]
