"""Matryoshka classification heads: one linear head per prefix size, all sizes in one fused pass.

MRL (``tied=False``): head ``l`` has its own weight ``W_l`` of shape ``(C, m_l)``.
MRL-E (``tied=True``): one weight ``W`` of shape ``(C, d)``; head ``l`` is ``W[:, :m_l]``.

Both return the logits of every size at once, ``(L, B, C)``. They are computed chunk by chunk
(chunk ``i`` = columns ``[m_{i-1}, m_i)``) by custom autograd Functions, so no size is recomputed
from scratch and no slice goes through autograd:

* tied: ``logits_l = logits_{l-1} + z_i @ W_i^T`` (``addmm`` into a preallocated output); the
  backward pass walks chunks from the largest size down with a running sum of output gradients.
  All sizes cost about one full-size matmul forward and two backward.
* untied: the heads share no weights, so the flops are those of ``L`` separate heads (about
  ``sum(m_l) / d`` times one full-size head, ~2x for a doubling ladder). Each head is one
  ``addmm`` on a strided prefix view into a preallocated output, and the backward pass
  accumulates all input gradients into one buffer: no slicing through autograd, no zero-padded
  per-size gradients. (Grouping the work per chunk, one matmul against every head's columns of
  that chunk, was measured slower on CPU: thin ``K = 8`` products into a wide output.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from matryoshka._validate import check_nesting, positive_int
from matryoshka.nesting import Nesting

__all__ = ["MatryoshkaHead"]

Chunks = tuple[tuple[int, int], ...]


class _TiedPrefixLinear(torch.autograd.Function):
    """``(B, d), (C, d), (C,) -> (L, B, C)``: logits of ``W[:, :m]`` for every size ``m``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: Chunks
    ) -> torch.Tensor:
        ctx.save_for_backward(z, weight)
        ctx.chunks = chunks
        ctx.has_bias = bias is not None
        out = z.new_empty((len(chunks), z.shape[0], weight.shape[0]))  # (L, B, C)
        prev = bias.expand(z.shape[0], -1) if bias is not None else None
        for i, (a, b) in enumerate(chunks):
            if prev is None:
                torch.mm(z[:, a:b], weight[:, a:b].t(), out=out[i])
            else:
                torch.addmm(prev, z[:, a:b], weight[:, a:b].t(), out=out[i])
            prev = out[i]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, weight = ctx.saved_tensors
        chunks: Chunks = ctx.chunks
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        # grad_z is filled transposed, (d, B), so every chunk writes a contiguous row block:
        # narrow column blocks of a (B, d) output are several times slower in BLAS.
        grad_zt = z.new_empty((z.shape[1], z.shape[0])) if need_z else None
        grad_w = torch.empty_like(weight) if need_w else None
        # Chunk i feeds sizes i..L-1, so its gradient is the sum of their output gradients:
        # a running sum from the largest size down.
        run = grad[-1].clone()  # (B, C)
        for i in range(len(chunks) - 1, -1, -1):
            a, b = chunks[i]
            if i < len(chunks) - 1:
                run.add_(grad[i])
            if grad_zt is not None:
                torch.mm(weight[:, a:b].t(), run.t(), out=grad_zt[a:b])  # (w, B)
            if grad_w is not None:
                torch.mm(run.t(), z[:, a:b], out=grad_w[:, a:b])  # (C, w)
        grad_b = run.sum(0) if (ctx.has_bias and need_b) else None
        grad_z = grad_zt.t() if grad_zt is not None else None  # (B, d), a view
        return grad_z, grad_w, grad_b, None


class _UntiedPrefixLinear(torch.autograd.Function):
    """``(B, d), (L, C), per-size weights -> (L, B, C)``: every size's own head in one Function.

    ``weights[l]`` has shape ``(C, m_l)``. Each head is one ``addmm`` on the strided prefix view
    ``z[:, :m_l]`` straight into its slot of a preallocated output; the backward pass accumulates
    every head's input gradient into one transposed buffer, so no slice goes through autograd and
    no zero-padded per-size gradient is materialised.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        bias: torch.Tensor,
        sizes: tuple[int, ...],
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, *weights)
        ctx.sizes = sizes
        out = z.new_empty((len(sizes), z.shape[0], bias.shape[1]))  # (L, B, C)
        for i, m in enumerate(sizes):
            torch.addmm(bias[i], z[:, :m], weights[i].t(), out=out[i])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, *weights = ctx.saved_tensors
        sizes: tuple[int, ...] = ctx.sizes
        need_z, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_zt = z.new_zeros((z.shape[1], z.shape[0])) if need_z else None  # (d, B)
        grad_ws: list[torch.Tensor | None] = []
        for i, m in enumerate(sizes):
            if grad_zt is not None:
                grad_zt[:m].addmm_(weights[i].t(), grad[i].t())  # (m, B)
            grad_ws.append(grad[i].t() @ z[:, :m] if ctx.needs_input_grad[3 + i] else None)
        grad_b = grad.sum(1) if need_b else None  # (L, C)
        grad_z = grad_zt.t() if grad_zt is not None else None  # (B, d), a view
        return (grad_z, grad_b, None, *grad_ws)


class MatryoshkaHead(nn.Module):
    """A linear classifier for every prefix size of a ``d``-dimensional embedding.

    Args:
        in_features: the embedding size ``d``; must equal ``nesting.dim``.
        num_classes: ``C``.
        nesting: the ladder of prefix sizes.
        tied: ``False`` for MRL (an independent head per size), ``True`` for MRL-E (head ``m``
            is the first ``m`` columns of one weight matrix, with one shared bias).
        bias: learn biases.

    ``forward(z)`` maps ``(B, d)`` to ``(L, B, C)``; the logits of size ``m`` never depend on
    ``z[:, m:]``. Parameters are initialised like ``nn.Linear(m, C)`` for each head.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        nesting: Nesting,
        tied: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_nesting(nesting)
        nesting.check_dim(in_features, "in_features")
        positive_int(num_classes, "num_classes")
        self.in_features = in_features
        self.num_classes = num_classes
        self.nesting = nesting
        self.tied = tied
        n_sizes = len(nesting)
        if tied:
            self.weight = nn.Parameter(torch.empty(num_classes, in_features))
            self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        else:
            self.weights = nn.ParameterList(
                nn.Parameter(torch.empty(num_classes, m)) for m in nesting
            )
            self.bias = nn.Parameter(torch.empty(n_sizes, num_classes)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init for each head: uniform in ``±1/sqrt(fan_in)``."""
        if self.tied:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.weight, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
            return
        for j, (w, m) in enumerate(zip(self.weights, self.nesting, strict=True)):
            bound = 1.0 / math.sqrt(m)
            nn.init.uniform_(w, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias[j], -bound, bound)

    def _check_input(self, z: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.in_features:
            raise ValueError(
                f"z.shape={tuple(z.shape)} but this head expects (batch, {self.in_features}): "
                "pass a 2-D batch of full-size embeddings."
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """All sizes' logits: ``(B, d) -> (L, B, C)``."""
        self._check_input(z)
        if self.tied:
            return _TiedPrefixLinear.apply(z, self.weight, self.bias, self.nesting.chunks)
        bias: torch.Tensor = (
            self.bias if self.bias is not None else z.new_zeros(len(self.nesting), self.num_classes)
        )
        return _UntiedPrefixLinear.apply(z, bias, self.nesting.sizes, *self.weights)

    def weight_for(self, m: int) -> torch.Tensor:
        """The ``(C, m)`` weight of the head for size ``m``."""
        idx = self.nesting.index(m)
        if self.tied:
            return self.weight[:, :m]
        return self.weights[idx]

    def bias_for(self, m: int) -> torch.Tensor | None:
        """The ``(C,)`` bias of the head for size ``m`` (``None`` without biases)."""
        idx = self.nesting.index(m)
        if self.bias is None:
            return None
        return self.bias if self.tied else self.bias[idx]

    def forward_size(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """Logits of one size only: ``(B, >= m) -> (B, C)``; reads only ``z[:, :m]``.

        For deployment (e.g. adaptive classification) where only one size is needed.
        """
        if z.ndim != 2 or z.shape[1] < m:
            raise ValueError(
                f"z.shape={tuple(z.shape)} but size m={m} needs (batch, >= {m}) embeddings."
            )
        return F.linear(z[:, :m], self.weight_for(m), self.bias_for(m))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"nesting={self.nesting!r}, tied={self.tied}"
        )
