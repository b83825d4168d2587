"""sentence-transformers' ``MatryoshkaLoss(MultipleNegativesRankingLoss)`` on given embeddings.

The reference the fused contrastive loss is checked against (``tests/test_contrastive.py``) and
timed against (``benchmarks/contrastive.py``). Needs sentence-transformers (the text extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FixedEmbeddings(nn.Module):
    """A stand-in sentence-transformers model whose "forward" returns the given embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self) -> int:
        return self.dim

    def _get_untruncated_embedding_dimension(self) -> int:
        """What ``MatryoshkaLoss`` asks its model since sentence-transformers 6.3."""
        return self.dim


def st_matryoshka_mnrl(
    dim: int,
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
) -> nn.Module:
    """``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale), sizes, weights)``.

    ``symmetric=True`` adds MNRL's document->query direction (``partition_mode="per_direction"``,
    the mean of both). Call it with :func:`st_loss`. Raises ``ImportError`` without
    sentence-transformers.
    """
    from sentence_transformers.sentence_transformer.losses import (
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    model = FixedEmbeddings(dim)
    kwargs: dict[str, object] = {}
    if symmetric:
        kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    mnrl = MultipleNegativesRankingLoss(model, scale=scale, **kwargs)  # type: ignore[arg-type]
    loss: nn.Module = MatryoshkaLoss(
        model,  # type: ignore[arg-type]
        mnrl,
        list(sizes),
        None if weights is None else list(weights),
    )
    return loss


def st_loss(loss: nn.Module, q: torch.Tensor, *docs: torch.Tensor) -> torch.Tensor:
    """The loss of queries ``q (B, d)`` against ``docs``: positives ``(B, d)``, then negatives."""
    out: torch.Tensor = loss([{"emb": z} for z in (q, *docs)], None)
    return out
