"""The Models Genesis 3D U-Net (Zhou et al., MICCAI 2019, and its published code), with the published state-dict key
names, and its 2-D twin (Models Genesis 2D: the same design with 2-D convolutions, ``UNet2D``).

Layout (channels per 3x3x3 conv; every conv is followed by BatchNorm3d and ReLU, an ``LUConv``):

    down_tr64   in→32→64     skip 64     max-pool 2
    down_tr128  64→64→128    skip 128    max-pool 2
    down_tr256  128→128→256  skip 256    max-pool 2
    down_tr512  256→256→512  bottleneck
    up_tr256    up 512→512, cat [up, skip256] = 768 → 256 → 256
    up_tr128    up 256→256, cat [up, skip128] = 384 → 128 → 128
    up_tr64     up 128→128, cat [up, skip64]  = 192 → 64 → 64
    out_tr      1x1x1 conv 64 → n_class, sigmoid

19,073,665 parameters and 106 state-dict entries for ``in_channels=1, n_class=1``. The module names are those of the
published checkpoint, so ``Genesis_Chest_CT.pt`` loads strictly (``genesis_ext.models.load_pretrained``).

``UNet2D`` / ``GenesisEncoder2D`` are the same layers in 2-D (3x3 convolutions, 2x2 pooling, the same key names), for
``(N, C, H, W)`` batches.

Written to be ``torch.jit.script``-, ``torch.compile``- and ``torch.export``-able: no Python-only constructs in any
``forward``, the input checks included.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCHNORM_MODES = ("batch_stats", "standard")
# the output layer's activation: sigmoid probabilities (published) or logits ("none": softmax segmentation, whose loss
# and inference apply the softmax themselves)
ACTIVATIONS = ("sigmoid", "none")


class _BatchStats:
    """Normalises with the current batch's statistics in training AND eval mode.

    This is how the published Models Genesis network behaves and how its weights were trained. The running
    statistics are still updated on every call (with torch's momentum semantics, ``momentum=None`` meaning a
    cumulative average), so a checkpoint stays loadable into a standard BatchNorm, but they are never used.
    A batch must therefore hold more than one value per channel, in eval mode too.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


class BatchStatsBatchNorm3d(_BatchStats, nn.BatchNorm3d):
    """BatchNorm3d with batch statistics in training and eval mode (the published behaviour, ``_BatchStats``)."""


class BatchStatsBatchNorm2d(_BatchStats, nn.BatchNorm2d):
    """BatchNorm2d with batch statistics in training and eval mode (``UNet2D``)."""


# The layers of each spatial dimensionality: convolution, transposed convolution, pooling, BatchNorm (standard and
# with batch statistics).
_LAYERS = {
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d, BatchStatsBatchNorm3d),
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d, BatchStatsBatchNorm2d),
}


def _norm(batchnorm: str, channels: int, dims: int) -> nn.Module:
    return _LAYERS[dims][4 if batchnorm == "batch_stats" else 3](channels)


def _check_batchnorm(owner: str, batchnorm: str) -> None:
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(
            f"genesis_ext.{owner}: batchnorm must be one of {BATCHNORM_MODES} ('batch_stats' is the "
            f"published behaviour, needed for the published weights), got {batchnorm!r}"
        )


def _check_channels(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"genesis_ext.{owner}: {name} must be a positive int, got {value!r}")


def _level_channels(owner: str, width) -> Tuple[int, int, int, int]:
    """The channels of the four levels, (64, 128, 256, 512) x ``width``, each even and at least 2."""
    ok = isinstance(width, (int, float)) and not isinstance(width, bool) and 0 < width <= 64
    if not ok or width != width:
        raise ValueError(f"genesis_ext.{owner}: width must be a number in (0, 64], got {width!r}")
    return tuple(max(2, 2 * round(c * width / 2)) for c in (64, 128, 256, 512))


class LUConv(nn.Module):
    """Conv3d(k=3, padding=1, bias) → BatchNorm3d → ReLU (2-D: Conv2d, BatchNorm2d); children ``conv1`` and ``bn1``
    as published."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: str, dims: int = 3):
        super().__init__()
        self.conv1 = _LAYERS[dims][0](in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = _norm(batchnorm, out_channels, dims)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConvs, ``in → out/2 → out`` (``ops.0``, ``ops.1``). Pooling is the caller's: it has no weights."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: str, dims: int = 3):
        super().__init__()
        self.ops = nn.Sequential(
            LUConv(in_channels, out_channels // 2, batchnorm, dims),
            LUConv(out_channels // 2, out_channels, batchnorm, dims),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


class UpTransition(nn.Module):
    """ConvTranspose3d(k=2, s=2) keeping the channels, concatenation [upsampled, skip], two LUConvs to ``out``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, batchnorm: str, dims: int = 3):
        super().__init__()
        self.up_conv = _LAYERS[dims][1](in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(
            LUConv(in_channels + skip_channels, out_channels, batchnorm, dims),
            LUConv(out_channels, out_channels, batchnorm, dims),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class OutputTransition(nn.Module):
    """1x1x1 convolution to ``n_class`` channels (``final_conv``); the sigmoid is applied by ``UNet3D``."""

    def __init__(self, in_channels: int, n_class: int, dims: int = 3):
        super().__init__()
        self.final_conv = _LAYERS[dims][0](in_channels, n_class, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(x)


def _nearest_valid(size: int) -> str:
    below = size // 8 * 8
    if below < 8:
        return "8"
    return f"{below} or {below + 8}"


def _check_input(owner: str, x: Tensor, in_channels: int, divisible: bool, dims: int) -> None:
    """Shape checks on Python ints only, so they are TorchScript-compatible and constant under tracing/export.

    Three 2x poolings: every spatial size must be at least 8, and divisible by 8 where the decoder concatenates the
    skips (``divisible``). Literal 8s: TorchScript cannot read module-level constants."""
    axes = [(2, "X"), (3, "Y"), (4, "Z")] if dims == 3 else [(2, "H"), (3, "W")]
    if x.dim() != dims + 2:
        layout = "5D batch (N, C, X, Y, Z)" if dims == 3 else "4D batch (N, C, H, W)"
        raise ValueError(f"genesis_ext.{owner}: expected a {layout}, got shape {list(x.shape)}")
    if x.size(1) != in_channels:
        raise ValueError(f"genesis_ext.{owner}: expected {in_channels} input channel(s), got shape {list(x.shape)}")
    bad: List[str] = []
    for axis, name in axes:
        size = x.size(axis)
        if size < 8 or (divisible and size % 8 != 0):
            bad.append(f"{name} = {size} (use {_nearest_valid(size)})")
    if len(bad) > 0:
        rule = "divisible by 8" if divisible else "at least 8"
        raise ValueError(
            f"genesis_ext.{owner}: spatial sizes must be {rule} (three 2x poolings), got shape "
            f"{list(x.shape)}: {'; '.join(bad)}"
        )


class GenesisEncoder(nn.Module):
    """The contracting half of the Models Genesis U-Net: ``down_tr64`` … ``down_tr512``, published key names.

    ``forward(x)`` returns the bottleneck (512 channels at the default width; spatial size / 8, floored). Any spatial
    size of at least 8 works here; ``UNet3D`` additionally needs sizes divisible by 8. ``width`` multiplies every
    level's channels (0.25: 16, 32, 64, 128): a network small enough to study on a CPU. The key names stay the
    published ones (``down_tr64`` …); only the default width, 1, fits the published weights.
    """

    SPATIAL_DIMS = 3  # 2: the Models Genesis 2D layers (GenesisEncoder2D, UNet2D)

    def __init__(self, in_channels: int = 1, batchnorm: str = "batch_stats", width: float = 1.0):
        super().__init__()
        owner = type(self).__name__
        _check_channels(owner, "in_channels", in_channels)
        _check_batchnorm(owner, batchnorm)
        c = _level_channels(owner, width)
        self.in_channels = in_channels
        self.batchnorm = batchnorm
        self.width = float(width)
        self.channels = c
        self._owner = owner  # error messages name the class the user built
        self.spatial_dims = d = int(self.SPATIAL_DIMS)
        self.pool = _LAYERS[d][2](2)
        self.down_tr64 = DownTransition(in_channels, c[0], batchnorm, d)
        self.down_tr128 = DownTransition(c[0], c[1], batchnorm, d)
        self.down_tr256 = DownTransition(c[1], c[2], batchnorm, d)
        self.down_tr512 = DownTransition(c[2], c[3], batchnorm, d)

    def _encode_with_skips(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(skip64, skip128, skip256, bottleneck512): each level's output before its pooling."""
        skip64 = self.down_tr64(x)
        skip128 = self.down_tr128(self.pool(skip64))
        skip256 = self.down_tr256(self.pool(skip128))
        return skip64, skip128, skip256, self.down_tr512(self.pool(skip256))

    @torch.jit.export
    def encode(self, x: Tensor) -> Tensor:
        """The bottleneck ``(N, channels[3], X/8, Y/8, Z/8)`` (512 channels at the default width)."""
        _check_input(self._owner, x, self.in_channels, False, self.spatial_dims)
        return self._encode_with_skips(x)[3]

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def _width_repr(self) -> str:
        return "" if self.width == 1.0 else f", width={self.width:g}"

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, batchnorm={self.batchnorm!r}" + self._width_repr()


class UNet3D(GenesisEncoder):
    """Models Genesis 3D U-Net; ``forward`` returns sigmoid probabilities ``(N, n_class, X, Y, Z)``, like the published
    model (its regression target for pre-training and its output for segmentation fine-tuning), or with
    ``activation="none"`` the logits (softmax segmentation).

    ``batchnorm="batch_stats"`` (default) is the published behaviour, which the published weights need: batch
    statistics in training and eval mode (see ``BatchStatsBatchNorm3d``). ``"standard"`` is torch's BatchNorm3d (running
    statistics in eval mode). Both have the same state-dict keys. Spatial sizes must be divisible by 8.
    ``encode(x)`` returns the bottleneck. ``width`` scales every level's channels (``GenesisEncoder``); only the
    default, 1, is the published network.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_class: int = 1,
        batchnorm: str = "batch_stats",
        width: float = 1.0,
        activation: str = "sigmoid",
    ):
        super().__init__(in_channels, batchnorm, width)
        _check_channels("UNet3D", "n_class", n_class)
        if activation not in ACTIVATIONS:
            raise ValueError(f"genesis_ext.{self._owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.n_class = n_class
        self.activation = activation
        c, d = self.channels, self.spatial_dims
        self.up_tr256 = UpTransition(c[3], c[2], c[2], batchnorm, d)
        self.up_tr128 = UpTransition(c[2], c[1], c[1], batchnorm, d)
        self.up_tr64 = UpTransition(c[1], c[0], c[0], batchnorm, d)
        self.out_tr = OutputTransition(c[0], n_class, d)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self._owner, x, self.in_channels, True, self.spatial_dims)
        skip64, skip128, skip256, out = self._encode_with_skips(x)
        out = self.up_tr256(out, skip256)
        out = self.up_tr128(out, skip128)
        out = self.out_tr(self.up_tr64(out, skip64))
        return torch.sigmoid(out) if self.activation == "sigmoid" else out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_class={self.n_class}, batchnorm={self.batchnorm!r}"
            + ("" if self.activation == "sigmoid" else f", activation={self.activation!r}")
            + self._width_repr()
        )


class GenesisEncoder2D(GenesisEncoder):
    """The contracting half of the Models Genesis 2D U-Net: ``GenesisEncoder``'s layers in 2-D, on ``(N, C, H, W)``."""

    SPATIAL_DIMS = 2


class UNet2D(UNet3D):
    """Models Genesis 2D: ``UNet3D``'s design with 2-D convolutions (3x3, 2x2 pooling and up-sampling, 1x1 output),
    the same depth, widths and key names, on ``(N, C, H, W)`` batches; sigmoid probabilities ``(N, n_class, H, W)``.
    H and W must be divisible by 8. There are no published 2-D weights: pre-train it with ``genesis-ext pretrain
    --dims 2``."""

    SPATIAL_DIMS = 2
