"""ResNet-18 from torchvision with its stem adapted to small images; nothing downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from matryoshka.backbones import register_backbone

__all__ = ["ResNetBackbone", "load_weights_file"]


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (loaded with
    ``weights_only=True``: no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r} does not exist: pass a local weights file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights={str(path)!r} does not hold a state dict.")
    return state


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18 as a feature extractor: ``(B, C, H, W) -> (B, embed_dim)``.

    ``small_input=True`` replaces the 7x7/2 stem and max-pool with a 3x3/1 convolution, the usual
    adaptation for 28x28-32x32 images. The pooled 512-d feature is the embedding when
    ``embed_dim == 512``; otherwise a linear layer projects it. ``weights`` loads a local file
    (ImageNet weights from torchvision, say); tensors whose shapes differ (the adapted stem, the
    classifier) are skipped.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        in_channels: int = 3,
        small_input: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if small_input or in_channels != 3:
            stride, kernel = (1, 3) if small_input else (2, 7)
            net.conv1 = nn.Conv2d(
                in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False
            )
        if small_input:
            net.maxpool = nn.Identity()  # type: ignore[assignment]
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.skipped_weights: list[str] = []
        if weights is not None:
            state = load_weights_file(weights)
            own = net.state_dict()
            usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            self.skipped_weights = sorted(set(state) - set(usable))
            net.load_state_dict(usable, strict=False)
        self.net = net
        self.embed_dim = embed_dim
        self.proj: nn.Module = nn.Identity() if embed_dim == 512 else nn.Linear(512, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``."""
        return self.proj(self.net(x))


@register_backbone("resnet18")
def resnet18_small(
    embed_dim: int = 512,
    in_channels: int = 3,
    small_input: bool = True,
    weights: str | Path | None = None,
) -> ResNetBackbone:
    """ResNet-18, small-image stem by default, random init unless ``weights`` is a local file."""
    return ResNetBackbone(embed_dim, in_channels, small_input, weights)
