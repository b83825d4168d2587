"""Matryoshka classification heads: one linear head per prefix size, all sizes in one fused pass.

MRL (``tied=False``): head ``l`` has its own weight ``W_l`` of shape ``(C, m_l)``.
MRL-E (``tied=True``): one weight ``W`` of shape ``(C, d)``; head ``l`` is ``W[:, :m_l]``.

Both return the logits of every size at once, ``(L, B, C)``. They are computed chunk by chunk
(chunk ``i`` = columns ``[m_{i-1}, m_i)``) by custom autograd Functions, so no size is recomputed
from scratch and no slice goes through autograd:

* tied: ``logits_i = logits_{i-1} + z_i @ W_i^T`` (``addmm`` into a preallocated output); the
  backward pass walks chunks from the largest size down with a running sum of output gradients
  ``G_i = sum_{l >= i} grad_l``, then ``dW_i = G_i^T z_i`` and ``dz_i = G_i W_i``. All sizes
  together cost the flops of one full-size ``Linear``, forward and backward.
* untied: the heads share no weights, so the flops are those of ``L`` separate heads (about
  ``sum(m_l) / d`` times one full-size head, ~2x for a doubling ladder). Each head is one
  ``addmm`` on a strided prefix view into a preallocated output, and the backward pass
  accumulates all input gradients into one buffer: no slicing through autograd, no zero-padded
  per-size gradients.

Weights are stored column-major (shape ``(C, m)``, strides ``(1, C)``; values and shapes are
those of ``nn.Linear``'s weight). Then every chunk's columns ``W[:, a:b]`` are one contiguous
block of memory, and the weight gradient of a chunk, written as the row block ``dW^T[a:b]`` of a
``(d, C)`` buffer, is contiguous too and lands in the parameter's own layout, so autograd keeps it
without a copy. With row-major weights the same products write narrow ``(C, w)`` column blocks of
a ``(C, d)`` gradient, measured ~1.25x slower than one full-size weight-gradient matmul (see
``docs/heads.md`` for the profile). The Functions are correct for any layout.
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


def _column_major(rows: int, cols: int) -> torch.Tensor:
    """An uninitialised ``(rows, cols)`` tensor stored column-major (strides ``(1, rows)``).

    It is the transpose of a contiguous ``(cols, rows)`` buffer, so any column block
    ``t[:, a:b]`` is one contiguous ``(b - a, rows)`` block of memory.
    """
    return torch.empty(cols, rows).t()


def _uniform_like_contiguous(t: torch.Tensor, bound: float) -> None:
    """Fill ``t`` in place from ``U(-bound, bound)``, drawing in row-major order."""
    t.copy_(torch.empty(t.shape, dtype=t.dtype, device=t.device).uniform_(-bound, bound))


class _TiedPrefixLinear(torch.autograd.Function):
    """``(B, d), (C, d), (C,) -> (L, B, C)``: logits of ``W[:, :m]`` for every size ``m``.

    ``chunks`` are the ladder's ``[m_{i-1}, m_i)`` ranges, covering ``[0, d)``. Correct for any memory layout of ``W``; fastest when ``W`` is column-major (as
    :class:`MatryoshkaHead` stores it): then ``W^T`` is a contiguous ``(d, C)`` buffer, every
    chunk's weights ``W^T[a:b]`` are a contiguous row block, and the weight gradient is filled
    row block by row block in that same layout, so autograd stores it without a copy.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: Chunks
    ) -> torch.Tensor:
        ctx.save_for_backward(z, weight)
        ctx.chunks = chunks
        ctx.has_bias = bias is not None
        wt = weight.t()  # (d, C)
        out = z.new_empty((len(chunks), z.shape[0], weight.shape[0]))  # (L, B, C)
        prev = bias.expand(z.shape[0], -1) if bias is not None else None
        for i, (a, b) in enumerate(chunks):
            if prev is None:
                torch.mm(z[:, a:b], wt[a:b], out=out[i])
            else:  # logits_i = logits_{i-1} + z_i @ W_i^T
                torch.addmm(prev, z[:, a:b], wt[a:b], out=out[i])
            prev = out[i]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        z, weight = ctx.saved_tensors
        chunks: Chunks = ctx.chunks
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        wt = weight.t()  # (d, C)
        grad_z = z.new_empty(z.shape) if need_z else None  # (B, d), contiguous for the backbone
        grad_w = torch.empty_like(weight) if need_w else None  # (C, d), laid out like weight
        grad_wt = grad_w.t() if grad_w is not None else None  # (d, C) view
        # Chunk i feeds sizes i..L-1, so its gradient is the sum of their output gradients:
        # a running sum from the largest size down (the largest chunk reads grad[-1] as is).
        run = grad[-1]  # (B, C)
        for i in range(len(chunks) - 1, -1, -1):
            a, b = chunks[i]
            if i == len(chunks) - 2:
                run = torch.add(run, grad[i])  # a fresh buffer: grad itself is left alone
            elif i < len(chunks) - 2:
                run.add_(grad[i])
            if grad_z is not None:
                torch.mm(run, wt[a:b].t(), out=grad_z[:, a:b])  # (B, w)
            if grad_wt is not None:
                torch.mm(z[:, a:b].t(), run, out=grad_wt[a:b])  # (w, C)
        grad_b = run.sum(0) if (ctx.has_bias and need_b) else None
        return grad_z, grad_w, grad_b, None


class _UntiedPrefixLinear(torch.autograd.Function):
    """``(B, d), (L, C), per-size weights -> (L, B, C)``: every size's own head in one Function.

    ``weights[l]`` has shape ``(C, m_l)`` (fastest column-major, as :class:`MatryoshkaHead`
    stores them, so ``weights[l]^T`` is a contiguous ``(m_l, C)`` buffer). Each head is one
    ``addmm`` on the strided prefix view ``z[:, :m_l]`` straight into its slot of a preallocated
    output. The backward pass accumulates every head's input gradient into one contiguous
    ``(B, d)`` buffer, largest head first (its product initialises the buffer, so no zero fill),
    and fills each weight gradient in its weight's layout: no slice goes through autograd and no
    zero-padded per-size gradient is materialised.
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
        grad_z = None
        if need_z:
            # The largest head spans all of z (as in MatryoshkaHead): its product initialises
            # grad_z, the others add into their prefix columns.
            spans = sizes[-1] == z.shape[1]
            grad_z = torch.mm(grad[-1], weights[-1]) if spans else z.new_zeros(z.shape)  # (B, d)
            for i in range(len(sizes) - 1 if spans else len(sizes)):
                grad_z[:, : sizes[i]].addmm_(grad[i], weights[i])  # (B, m_i)
        grad_ws: list[torch.Tensor | None] = [None] * len(sizes)
        for i, m in enumerate(sizes):
            if ctx.needs_input_grad[3 + i]:
                gw = torch.empty_like(weights[i])  # (C, m), laid out like the weight
                torch.mm(z[:, :m].t(), grad[i], out=gw.t())  # (m, C)
                grad_ws[i] = gw
        grad_b = grad.sum(1) if need_b else None  # (L, C)
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
    ``z[:, m:]``. Parameters are initialised like ``nn.Linear(m, C)`` for each head; weights are
    stored column-major (strides ``(1, C)``), which keeps every chunk of the fused pass
    contiguous (see the module docstring).
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
            self.weight = nn.Parameter(_column_major(num_classes, in_features))
            self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        else:
            self.weights = nn.ParameterList(
                nn.Parameter(_column_major(num_classes, m)) for m in nesting
            )
            self.bias = nn.Parameter(torch.empty(n_sizes, num_classes)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init for each head: uniform in ``±1/sqrt(fan_in)``.

        Values are drawn in row-major order, as for a contiguous weight, so a seed gives the
        same parameters whatever the storage layout.
        """
        if self.tied:
            bound = 1.0 / math.sqrt(self.in_features)
            _uniform_like_contiguous(self.weight, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
            return
        for j, (w, m) in enumerate(zip(self.weights, self.nesting, strict=True)):
            bound = 1.0 / math.sqrt(m)
            _uniform_like_contiguous(w, bound)
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
