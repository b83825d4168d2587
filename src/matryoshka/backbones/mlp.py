"""A multilayer perceptron on flattened inputs."""

from __future__ import annotations

import torch
from torch import nn

from matryoshka.backbones import register_backbone

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten -> ``depth`` x (Linear, ReLU) of width ``hidden`` -> Linear to ``embed_dim``.

    ``(B, *input_shape) -> (B, embed_dim)``.
    """

    def __init__(self, in_features: int, embed_dim: int = 128, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.embed_dim = embed_dim
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, embed_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, embed_dim)``."""
        return self.net(x)


@register_backbone("mlp")
def mlp(embed_dim: int = 128, in_channels: int = 1, image_size: int = 28, width: int = 256) -> MLP:
    """An MLP over ``in_channels x image_size x image_size`` images; ``width`` hidden units."""
    return MLP(in_channels * image_size * image_size, embed_dim, width)
