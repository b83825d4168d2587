"""Fused Matryoshka contrastive loss: InfoNCE with in-batch negatives at every prefix size.

For queries ``q (B, d)`` and documents ``k (N, d)`` (the first ``B`` rows of ``k`` are the
positives, the rest extra negatives), size ``m`` contributes

    loss_m = mean_i CE( cos(q_i[:m], k_j[:m]) / temperature over j,  target j = i )

and the total is ``sum_m c_m loss_m`` with the nesting's weights. This is exactly
sentence-transformers' ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=1/t),
matryoshka_dims, matryoshka_weights)``; ``symmetric=True`` matches MNRL with
``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`` (the mean of the
query->document and document->query terms; the latter over the ``B`` positives only).

Fused: sentence-transformers runs the base loss once per size (one ``B x N x m`` product, one
normalisation, one softmax and their backward each). Here the prefix dot products are a running
sum over the chunks between consecutive sizes, ``S_l = S_{l-1} + q_c k_c^T`` (``addmm`` into a
preallocated ``(L, B, N)`` buffer), the prefix norms are running sums of squared chunk norms, and
a custom autograd Function walks the chunks back from the largest size with running sums of the
similarity gradients. All sizes cost one full-size ``B x N x d`` product forward and two backward,
plus ``L`` cheap element-wise passes over ``B x N``.

:class:`Matryoshka2dContrastiveLoss` adds the depth axis (prefix of layers x prefix of dims): the
same fused loss on the pooled output of several transformer layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from matryoshka.losses import MatryoshkaLossOutput
from matryoshka.nesting import Nesting
from matryoshka.ops import prefix_norms

__all__ = ["Matryoshka2dContrastiveLoss", "MatryoshkaContrastiveLoss"]

Chunks = tuple[tuple[int, int], ...]


class _FusedPrefixInfoNCE(torch.autograd.Function):
    """``q (B, d), k (N, d) -> (L,)`` weighted per-size InfoNCE losses (only active sizes nonzero).

    ``active[l]`` says whether size ``l`` is computed this step; the chunks are walked up to the
    largest active size. ``weights[l]`` multiplies size ``l``'s loss.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        nesting: Nesting,
        active: tuple[bool, ...],
        weights: tuple[float, ...],
        scale: float,
        symmetric: bool,
    ) -> torch.Tensor:
        n_q, n_k = q.shape[0], k.shape[0]
        top = max(i for i, a in enumerate(active) if a)  # largest active size
        chunks = nesting.chunks[: top + 1]
        qn = prefix_norms(q, nesting)[: top + 1].clamp_min(1e-12)  # (L', B)
        kn = prefix_norms(k, nesting)[: top + 1].clamp_min(1e-12)  # (L', N)
        logits = q.new_empty((top + 1, n_q, n_k))  # (L', B, N): S_l, then scaled to logits
        lse_row = q.new_zeros((top + 1, n_q))  # (L', B) log-sum-exp over documents
        lse_col = q.new_zeros((top + 1, n_q))  # (L', B) over queries (symmetric only)
        losses = q.new_zeros(len(active))  # (L,)
        diag = torch.arange(n_q, device=q.device)
        for i, (a, b) in enumerate(chunks):
            if i == 0:
                torch.mm(q[:, a:b], k[:, a:b].t(), out=logits[0])
            else:
                torch.addmm(logits[i - 1], q[:, a:b], k[:, a:b].t(), out=logits[i])
            if i > 0 and active[i - 1]:  # S_{i-1} is no longer needed unscaled
                losses[i - 1] = _FusedPrefixInfoNCE._finish(i - 1, logits, lse_row, lse_col, qn, kn, scale, symmetric, diag)  # fmt: skip
        losses[top] = _FusedPrefixInfoNCE._finish(top, logits, lse_row, lse_col, qn, kn, scale, symmetric, diag)  # fmt: skip
        losses.mul_(losses.new_tensor(weights))
        ctx.save_for_backward(q, k, qn, kn, logits, lse_row, lse_col)
        ctx.meta = (chunks, active, weights, scale, symmetric)
        return losses

    @staticmethod
    def _finish(
        i: int,
        logits: torch.Tensor,
        lse_row: torch.Tensor,
        lse_col: torch.Tensor,
        qn: torch.Tensor,
        kn: torch.Tensor,
        scale: float,
        symmetric: bool,
        diag: torch.Tensor,
    ) -> torch.Tensor:
        """Scale the prefix dot products ``S_i`` into logits in place; size ``i``'s loss (0-d)."""
        a = logits[i]  # (B, N)
        a.mul_((scale / qn[i])[:, None]).mul_((1.0 / kn[i])[None, :])
        pos = a[diag, diag]  # (B,)
        torch.logsumexp(a, dim=1, out=lse_row[i])
        loss = (lse_row[i] - pos).mean()
        if symmetric:
            torch.logsumexp(a[:, : a.shape[0]], dim=0, out=lse_col[i])
            loss = 0.5 * (loss + (lse_col[i] - pos).mean())
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, qn, kn, logits, lse_row, lse_col = ctx.saved_tensors
        chunks, active, weights, scale, symmetric = ctx.meta
        n_q, n_k = q.shape[0], k.shape[0]
        diag = torch.arange(n_q, device=q.device)
        # Transposed gradient buffers: every chunk writes a contiguous block of rows.
        grad_qt = q.new_zeros((q.shape[1], n_q))  # (d, B)
        grad_kt = k.new_zeros((k.shape[1], n_k))  # (d, N)
        run = q.new_zeros((n_q, n_k))  # running sum over sizes >= l of dL/dS_l
        run_q = q.new_zeros(n_q)  # running sum of the query-norm terms
        run_k = k.new_zeros(n_k)  # running sum of the document-norm terms
        ga = q.new_empty((n_q, n_k))  # scratch
        for i in range(len(chunks) - 1, -1, -1):
            if active[i] and weights[i] != 0.0:
                a = logits[i]  # (B, N)
                # dL/da = coef * (P - Y), P the row softmax (mean with the column one if symmetric)
                coef = grad[i] * (weights[i] / n_q * (0.5 if symmetric else 1.0))  # 0-d
                g = torch.sub(a, lse_row[i][:, None]).exp_()  # (B, N)
                if symmetric:
                    g[:, :n_q].add_(torch.sub(a[:, :n_q], lse_col[i][None, :]).exp_())
                    g[diag, diag] -= 2.0
                else:
                    g[diag, diag] -= 1.0
                # a = scale * S / (|q| |k|): the |q_i| term is -coef * sum_j g_ij a_ij / |q_i|
                torch.mul(g, a, out=ga)
                inv_q, inv_k = 1.0 / qn[i], 1.0 / kn[i]
                run_q.sub_(ga.sum(1) * inv_q.square() * coef)
                run_k.sub_(ga.sum(0) * inv_k.square() * coef)
                g.mul_((inv_q * (scale * coef))[:, None])
                run.addcmul_(g, inv_k[None, :])
            a_, b_ = chunks[i]
            qc, kc = q[:, a_:b_], k[:, a_:b_]
            # dL/dq_c = run @ k_c + run_q * q_c, written transposed: (w, B)
            torch.addmm(qc.t() * run_q, kc.t(), run.t(), out=grad_qt[a_:b_])
            torch.addmm(kc.t() * run_k, qc.t(), run, out=grad_kt[a_:b_])
        need_q, need_k = ctx.needs_input_grad[:2]
        return (
            grad_qt.t() if need_q else None,
            grad_kt.t() if need_k else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_nesting(nesting: Any, cls: str) -> Nesting:
    if not isinstance(nesting, Nesting):
        raise TypeError(
            f"nesting={nesting!r} is a {type(nesting).__name__}: pass a Nesting, "
            f"e.g. {cls}(Nesting.doubling(8, 384))."
        )
    return nesting


class MatryoshkaContrastiveLoss(nn.Module):
    """InfoNCE with in-batch negatives over every prefix size of the nesting, fused.

    Args:
        nesting: the prefix sizes and their weights; ``nesting.dim`` must equal the embedding size.
        temperature: softmax temperature on cosine similarities (sentence-transformers' ``scale``
            is ``1 / temperature``; 0.05 is its default 20).
        symmetric: also the document->query term (mean of both directions).
        n_sizes_per_step: if set, a random subset of this many sizes is trained each call (drawn
            with torch's global RNG), like sentence-transformers' ``n_dims_per_step``. Set
            ``always_full=True`` to always include the largest size on top of the sample.

    ``forward(q, k)`` with ``q (B, d)`` and ``k (N, d)``, ``N >= B``, row ``i`` of ``k`` the
    positive of query ``i`` and rows ``B..N-1`` extra (hard) negatives, returns a
    :class:`~matryoshka.losses.MatryoshkaLossOutput`: the weighted sum (scalar) and ``(L,)``
    weighted per-size values (0 for sizes not sampled this step).
    """

    def __init__(
        self,
        nesting: Nesting,
        temperature: float = 0.05,
        symmetric: bool = False,
        n_sizes_per_step: int | None = None,
        always_full: bool = False,
    ) -> None:
        super().__init__()
        self.nesting = _check_nesting(nesting, "MatryoshkaContrastiveLoss")
        if not (isinstance(temperature, int | float) and 0.0 < temperature < float("inf")):
            raise ValueError(
                f"temperature={temperature!r} must be a positive finite float, e.g. 0.05 "
                "(sentence-transformers' scale=20)."
            )
        if n_sizes_per_step is not None and (
            isinstance(n_sizes_per_step, bool)
            or not isinstance(n_sizes_per_step, int)
            or not 1 <= n_sizes_per_step <= len(nesting)
        ):
            raise ValueError(
                f"n_sizes_per_step={n_sizes_per_step!r} must be None (all sizes) or an int in "
                f"[1, {len(nesting)}] (the nesting has {len(nesting)} sizes)."
            )
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.n_sizes_per_step = n_sizes_per_step
        self.always_full = always_full

    def sample_sizes(self) -> tuple[bool, ...]:
        """Which sizes this step trains: ``(L,)`` flags (all, or a random subset)."""
        n = len(self.nesting)
        if self.n_sizes_per_step is None or self.n_sizes_per_step == n:
            return (True,) * n
        chosen = set(torch.randperm(n)[: self.n_sizes_per_step].tolist())
        if self.always_full:
            chosen.add(n - 1)
        return tuple(i in chosen for i in range(n))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, active: Sequence[bool] | None = None
    ) -> MatryoshkaLossOutput:
        """``q (B, d), k (N >= B, d) -> (scalar, (L,))``; ``active`` overrides the size sampling."""
        d = self.nesting.dim
        if q.ndim != 2 or q.shape[1] != d:
            raise ValueError(
                f"q.shape={tuple(q.shape)} but the nesting's largest size is {d}: "
                f"pass a 2-D batch of full-size query embeddings (batch, {d})."
            )
        if k.ndim != 2 or k.shape[1] != d or k.shape[0] < q.shape[0]:
            raise ValueError(
                f"k.shape={tuple(k.shape)} with q.shape={tuple(q.shape)}: pass documents "
                f"(N, {d}) with N >= {q.shape[0]}, row i the positive of query i, then negatives."
            )
        flags = tuple(bool(x) for x in active) if active is not None else self.sample_sizes()
        if len(flags) != len(self.nesting) or not any(flags):
            raise ValueError(
                f"active={list(flags)} must have one flag per size ({len(self.nesting)}) and at "
                "least one True."
            )
        per_size = _FusedPrefixInfoNCE.apply(
            q, k, self.nesting, flags, self.nesting.weights, 1.0 / self.temperature, self.symmetric
        )
        return MatryoshkaLossOutput(per_size.sum(), per_size.detach())

    def extra_repr(self) -> str:
        return (
            f"nesting={self.nesting!r}, temperature={self.temperature}, "
            f"symmetric={self.symmetric}, n_sizes_per_step={self.n_sizes_per_step}"
        )


class Matryoshka2dContrastiveLoss(nn.Module):
    """Prefix of layers x prefix of dims: the fused Matryoshka InfoNCE on several layers' outputs.

    Args:
        nesting: the dimension ladder.
        layers: which layers (0-based indices into the stacked layer outputs) are trained;
            the last one listed is the full model and is trained every step.
        layer_weights: one weight per entry of ``layers`` (all ones if omitted).
        n_layers_per_step: if set, each step trains the last layer plus a random sample of this
            many of the other listed layers (like sentence-transformers' ``AdaptiveLayerLoss``,
            without its KL term).
        temperature, symmetric, n_sizes_per_step: as in :class:`MatryoshkaContrastiveLoss`.

    ``forward(q_layers, k_layers)`` takes ``(n_layers, B, d)`` and ``(n_layers, N, d)`` (e.g.
    :meth:`matryoshka.text.TextEncoder.forward_layers`) and returns ``(scalar, (len(layers), L))``.
    """

    def __init__(
        self,
        nesting: Nesting,
        layers: Sequence[int],
        layer_weights: Sequence[float] | None = None,
        n_layers_per_step: int | None = None,
        temperature: float = 0.05,
        symmetric: bool = False,
        n_sizes_per_step: int | None = None,
    ) -> None:
        super().__init__()
        _check_nesting(nesting, "Matryoshka2dContrastiveLoss")
        layers = list(layers)
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
            raise ValueError(f"layers={layers!r} must be a non-empty list of layer indices.")
        if layers != sorted(set(layers)):
            raise ValueError(
                f"layers={layers} must increase without repeats; use {sorted(set(layers))}."
            )
        weights = (
            [1.0] * len(layers) if layer_weights is None else [float(w) for w in layer_weights]
        )
        if len(weights) != len(layers) or any(not w >= 0 for w in weights):
            raise ValueError(
                f"layer_weights={layer_weights!r} must be {len(layers)} non-negative floats, "
                f"one per entry of layers={layers}."
            )
        if n_layers_per_step is not None and not 0 <= n_layers_per_step < len(layers):
            raise ValueError(
                f"n_layers_per_step={n_layers_per_step!r} must be None (all layers) or an int in "
                f"[0, {len(layers) - 1}] (the number of layers besides the last)."
            )
        self.layers = layers
        self.layer_weights = weights
        self.n_layers_per_step = n_layers_per_step
        self.dim_loss = MatryoshkaContrastiveLoss(nesting, temperature, symmetric, n_sizes_per_step)

    def forward(self, q_layers: torch.Tensor, k_layers: torch.Tensor) -> MatryoshkaLossOutput:
        """``(n_layers, B, d), (n_layers, N, d) -> (scalar, (len(layers), L))``."""
        if q_layers.ndim != 3 or k_layers.ndim != 3 or q_layers.shape[0] != k_layers.shape[0]:
            raise ValueError(
                f"q_layers.shape={tuple(q_layers.shape)}, k_layers.shape={tuple(k_layers.shape)}: "
                "pass (n_layers, batch, d) stacks with the same number of layers."
            )
        if self.layers[-1] >= q_layers.shape[0] or self.layers[0] < -q_layers.shape[0]:
            raise ValueError(
                f"layers={self.layers} but only {q_layers.shape[0]} layer outputs were given."
            )
        chosen = list(range(len(self.layers)))
        if self.n_layers_per_step is not None:
            others = torch.randperm(len(self.layers) - 1)[: self.n_layers_per_step].tolist()
            chosen = [*sorted(others), len(self.layers) - 1]
        per = q_layers.new_zeros((len(self.layers), len(self.dim_loss.nesting)))
        total = q_layers.new_zeros(())
        for j in chosen:
            layer = self.layers[j]
            out = self.dim_loss(q_layers[layer], k_layers[layer])
            total = total + self.layer_weights[j] * out.loss
            per[j] = self.layer_weights[j] * out.per_size
        return MatryoshkaLossOutput(total, per)
