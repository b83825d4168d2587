"""A small convolutional feature extractor for 28x28 / 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from matryoshka.backbones import register_backbone

__all__ = ["SmallCNN"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv stages (``width``, 2·``width``, 4·``width`` channels, each halving the
    resolution) -> global average pool -> linear projection to ``embed_dim``.

    ``(B, in_channels, H, W) -> (B, embed_dim)``.
    """

    def __init__(self, embed_dim: int = 128, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim={embed_dim} must be >= 1.")
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            _block(in_channels, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``."""
        return self.proj(self.features(x))


@register_backbone("cnn")
def cnn(embed_dim: int = 128, in_channels: int = 1, width: int = 32) -> SmallCNN:
    """The default small CNN (~100k parameters at width 32)."""
    return SmallCNN(embed_dim, in_channels, width)


@register_backbone("cnn_tiny")
def cnn_tiny(embed_dim: int = 16, in_channels: int = 1, width: int = 4) -> SmallCNN:
    """A tiny CNN for tests."""
    return SmallCNN(embed_dim, in_channels, width)
