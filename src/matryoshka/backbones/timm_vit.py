"""A timm vision transformer (ViT-B/16 by default) as a backbone, registered as ``vit_b16``.

Needs the optional ``timm`` package; the model is built with ``pretrained=False`` (nothing
downloads) and loaded from a local weights file when one is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from matryoshka.backbones import register_backbone
from matryoshka.backbones.resnet import load_pretrained

__all__ = ["TimmViTBackbone", "vit_b16"]


class TimmViTBackbone(nn.Module):
    """timm ViT feature extractor: ``(B, C, H, W) -> (B, embed_dim)``.

    The class-token feature (``num_features``: 768 for ViT-B) is the embedding when
    ``embed_dim`` equals it, otherwise a linear layer projects it. Any image side that is a
    multiple of the patch size works (position embeddings are interpolated). ``weights``: a local
    file with the timm model's state dict (its ``head.*`` classifier is ignored).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        in_channels: int = 3,
        variant: str = "vit_base_patch16_224",
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(
                "backbone='vit_b16' needs timm: pip install timm (weights come from a local "
                "file; nothing downloads)."
            ) from e
        net = timm.create_model(
            variant, pretrained=False, num_classes=0, in_chans=in_channels, dynamic_img_size=True
        )
        if weights is not None:
            load_pretrained(net, weights, ignore=("head.",), what=f"timm model {variant!r}")
        self.net = net
        self.embed_dim = embed_dim
        width = int(net.num_features)  # type: ignore[arg-type]
        self.proj: nn.Module = nn.Identity() if embed_dim == width else nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``."""
        return self.proj(self.net(x))


@register_backbone("vit_b16")
def vit_b16(
    embed_dim: int = 768,
    in_channels: int = 3,
    variant: str = "vit_base_patch16_224",
    weights: str | Path | None = None,
) -> TimmViTBackbone:
    """timm ViT-B/16 (or another timm ``variant``), random init unless ``weights`` is given."""
    return TimmViTBackbone(embed_dim, in_channels, variant, weights)
