"""A Matryoshka classifier: any feature extractor + a :class:`MatryoshkaHead`."""

from __future__ import annotations

import torch
from torch import nn

from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.ops import truncate

__all__ = ["MatryoshkaClassifier", "backbone_dim"]


def backbone_dim(backbone: nn.Module, nesting: Nesting) -> int:
    """The embedding size ``d`` a backbone declares (``backbone.embed_dim``), checked against the
    nesting's largest size."""
    embed_dim = getattr(backbone, "embed_dim", None)
    if embed_dim is None:
        raise ValueError(
            f"backbone={type(backbone).__name__} has no embed_dim attribute: set "
            "backbone.embed_dim to the size of its output (B, d)."
        )
    nesting.check_dim(int(embed_dim), "backbone.embed_dim")
    return int(embed_dim)


class MatryoshkaClassifier(nn.Module):
    """``backbone`` (``(B, ...) -> (B, d)``) followed by a head for every size of ``nesting``.

    ``forward(x) -> (L, B, C)`` logits; ``embed(x, m)`` the (optionally truncated) embedding.
    A fixed-feature (FF) baseline of size ``m`` is the same class with ``Nesting([m])``.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, nesting: Nesting, tied: bool = False
    ) -> None:
        super().__init__()
        embed_dim = backbone_dim(backbone, nesting)
        self.backbone = backbone
        self.nesting = nesting
        self.head = MatryoshkaHead(embed_dim, num_classes, nesting, tied=tied)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, d)``."""
        return self.backbone(x)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (L, B, C)``."""
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (L, B, C)``."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, m: int | None = None, normalize: bool = False) -> torch.Tensor:
        """Embeddings ``(B, m)`` (``m = d`` if omitted), in eval mode, without gradients."""
        z = self.backbone(x)
        return truncate(z, m if m is not None else z.shape[-1], normalize=normalize)
