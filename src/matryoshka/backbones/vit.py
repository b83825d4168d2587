"""A small vision transformer on ``torch.nn`` (nothing to download), registered as ``vit_tiny``.

Images are cut into ``patch_size``-square patches, linearly embedded, prefixed with a learned
class token, given learned position embeddings and passed through pre-norm transformer encoder
blocks; the class token after the last block is normalised and projected to ``embed_dim``.
"""

from __future__ import annotations

import torch
from torch import nn

from matryoshka.backbones import register_backbone

__all__ = ["ViTBackbone", "vit_tiny"]


class ViTBackbone(nn.Module):
    """Vision transformer feature extractor: ``(B, C, H, W) -> (B, embed_dim)``.

    Args:
        embed_dim: output size ``d``.
        in_channels: image channels ``C``.
        image_size: ``H == W``; must be a multiple of ``patch_size``.
        patch_size: side of a patch (``(image_size / patch_size)^2`` tokens plus a class token).
        width: token width inside the transformer.
        depth: number of encoder blocks.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of each block's MLP, relative to ``width``.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 7,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}: "
                "pick a patch size that divides the image side (e.g. 7 or 4 for 28)."
            )
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}.")
        for name, v in (("embed_dim", embed_dim), ("depth", depth), ("width", width)):
            if v < 1:
                raise ValueError(f"{name}={v} must be >= 1.")
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.image_size = image_size
        self.depth = depth
        self.width = width
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                int(width * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + class tokens with positions: ``(B, C, H, W) -> (B, T, width)``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x.shape={tuple(x.shape)} but this ViT expects (batch, {', '.join(map(str, expected))}): "
                "set in_channels and image_size to match the images."
            )
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, P, width)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, width)
        return torch.cat([cls, t], dim=1) + self.pos  # (B, T, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``: the projected class token after the last block."""
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.proj(self.norm(t[:, 0]))  # (B, embed_dim)


@register_backbone("vit_tiny")
def vit_tiny(
    embed_dim: int = 64,
    in_channels: int = 1,
    image_size: int = 28,
    width: int = 64,
    depth: int = 4,
    patch_size: int = 7,
    heads: int = 4,
) -> ViTBackbone:
    """A ~140k-parameter ViT for 28x28 images: 16 patches of 7x7, 4 blocks of width 64."""
    return ViTBackbone(embed_dim, in_channels, image_size, patch_size, width, depth, heads)
