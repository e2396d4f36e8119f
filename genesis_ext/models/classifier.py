"""Models Genesis classification fine-tuning network (Zhou et al., MICCAI 2019, and its published code).

The pre-trained encoder's 512-channel bottleneck → global average pool → Linear(512, 1024) → ReLU →
Linear(1024, n_class). The encoder keeps the published key names (``down_tr64`` …), so
``load_pretrained(GenesisClassifier(n), "Genesis_Chest_CT.pt", encoder_only=True)`` loads the pre-trained encoder
and leaves the head freshly initialised. Unlike the published code it runs only the encoder, not the whole U-Net.
"""

from torch import Tensor, nn

from .unet3d import GenesisEncoder, _check_channels


class GenesisClassifier(GenesisEncoder):
    """Encoder + global average pool + ``dense_1`` Linear(512, 1024) + ReLU + ``dense_2`` Linear(1024, n_class).

    ``forward`` returns logits ``(N, n_class)`` (pair with ``BCEWithLogitsLoss`` or ``CrossEntropyLoss``). Spatial
    sizes must be at least 8 per axis. ``batchnorm`` as in ``UNet3D`` (``"batch_stats"`` by default, as the
    published weights were trained); ``width`` scales the encoder and the head's 1024 units alike.
    """

    def __init__(self, n_class: int, in_channels: int = 1, batchnorm: str = "batch_stats", width: float = 1.0):
        super().__init__(in_channels, batchnorm, width)
        _check_channels("GenesisClassifier", "n_class", n_class)
        self.n_class = n_class
        hidden = max(2, round(1024 * self.width))  # the head scales with the encoder
        self.dense_1 = nn.Linear(self.channels[3], hidden)
        self.dense_2 = nn.Linear(hidden, n_class)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.encode(x).flatten(2).mean(2)  # global average pool over every spatial axis
        return self.dense_2(nn.functional.relu(self.dense_1(pooled)))

    def extra_repr(self) -> str:
        return (
            f"n_class={self.n_class}, in_channels={self.in_channels}, batchnorm={self.batchnorm!r}" + self._width_repr()
        )


class GenesisClassifier2D(GenesisClassifier):
    """``GenesisClassifier`` on the Models Genesis 2D encoder: ``(N, C, H, W)`` batches, H and W at least 8."""

    SPATIAL_DIMS = 2
