"""Matryoshka losses: one base loss per prefix size, summed with the nesting's weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from matryoshka._validate import check_nesting
from matryoshka.nesting import Nesting

__all__ = ["MatryoshkaLoss", "MatryoshkaLossOutput"]


class MatryoshkaLossOutput(NamedTuple):
    """``loss``: the weighted sum (scalar, differentiable); ``per_size``: ``(L,)`` values, detached."""

    loss: torch.Tensor
    per_size: torch.Tensor


class MatryoshkaLoss(nn.Module):
    """Wrap a per-size loss: ``loss = sum_l c_l * base_loss(logits[l], target)``.

    Args:
        base_loss: any ``(logits (B, C), target) -> scalar`` callable; ``None`` means
            cross-entropy (computed for all sizes in one fused call).
        nesting: the ladder; its weights are the ``c_l``.

    Call it with the ``(L, B, C)`` output of a :class:`~matryoshka.models.heads.MatryoshkaHead` and the
    targets ``(B,)``; it returns a :class:`MatryoshkaLossOutput` ``(loss, per_size)``.
    """

    def __init__(
        self,
        base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        nesting: Nesting | None = None,
    ) -> None:
        super().__init__()
        self.base_loss = base_loss
        self.nesting = check_nesting(nesting, "MatryoshkaLoss(nesting=Nesting([8, 16, 32]))")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> MatryoshkaLossOutput:
        """``(L, B, C), (B,) -> (scalar, (L,))``."""
        n_sizes = len(self.nesting)
        if logits.ndim < 2 or logits.shape[0] != n_sizes:
            raise ValueError(
                f"logits.shape={tuple(logits.shape)} but the nesting has {n_sizes} sizes: "
                f"pass all sizes' logits stacked as (L={n_sizes}, batch, ...), "
                "as MatryoshkaHead returns them."
            )
        if self.base_loss is None:
            # Fused cross-entropy: all sizes in one call on (L*B, C).
            n_classes = logits.shape[-1]
            flat = F.cross_entropy(
                logits.reshape(-1, n_classes),
                target.repeat(n_sizes),
                reduction="none",
            )
            per_size = flat.view(n_sizes, -1).mean(1)  # (L,)
        else:
            per_size = torch.stack([self.base_loss(logits[i], target) for i in range(n_sizes)])
        weights = torch.tensor(self.nesting.weights, dtype=per_size.dtype, device=per_size.device)
        return MatryoshkaLossOutput((weights * per_size).sum(), per_size.detach())
