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
normalisation, one softmax and their backward each). Here one custom autograd Function does all
sizes in one pass:

* the prefix dot products are a running sum over the chunks between consecutive sizes,
  ``S_l = S_{l-1} + q_c k_c^T`` (in-place ``addmm_``); the prefix norms and the positive logits
  ``a_ii`` of every size come from one small product with a 0/1 prefix-indicator matrix;
* per size: ``a = S * (scale / |q_i|) * (1 / |k_j|)`` (two broadcast multiplies), one row
  softmax ``P`` (its own max subtraction makes it stable), the loss ``-log P_ii``. Cosine logits
  lie in ``[-scale, scale]``, so while ``2 scale + log N`` is inside the dtype's range (float32:
  scale up to ~40) ``P_ii`` cannot underflow, and the symmetric term's column sums of
  ``exp(a - scale)`` are ``P^T w`` with ``w_i = exp(lse_i - scale)``: one matrix-vector product,
  no second exponential. Beyond that the log-softmax is taken in each direction (slower, exact);
* the gradient is formed in the same pass (the loss is a scalar, so ``dL/da = coef (P - Y)`` is
  known in forward): each size keeps ``P`` scaled by ``scale / |q_i|`` in a ``(sizes, B, N)``
  buffer, plus the row and column sums of ``P * a`` that the norms' gradients need; then the
  chunks are walked back from the largest size with a running sum of ``dL/dS_l`` (one
  ``addcmul_`` per size, the ``1 / |k_j|`` factor folded in) and two products per chunk. The
  per-row terms (the norms' gradients and the ``-Y`` diagonal) are added at the end, spread over
  each size's columns by the indicator.

Only the gradients ``(B + N) x d`` are kept for backward, which scales them by the incoming
gradient; the ``(sizes + 2) x B x N`` working memory lives only inside forward. All sizes cost one
full-size ``B x N x d`` product forward and two in gradients, plus about eight element-wise passes
over ``B x N`` and one softmax per size (measured in ``benchmarks/contrastive.py``).

:class:`Matryoshka2dContrastiveLoss` adds the depth axis (prefix of layers x prefix of dims): the
same fused loss on the pooled output of several transformer layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from matryoshka._validate import check_nesting
from matryoshka.losses.classification import MatryoshkaLossOutput
from matryoshka.nesting import Nesting

__all__ = ["Matryoshka2dContrastiveLoss", "MatryoshkaContrastiveLoss"]


class _FusedPrefixInfoNCE(torch.autograd.Function):
    """``q (B, d), k (N, d) -> (total (), per_size (L,))``: weighted per-size InfoNCE losses.

    ``active[l]`` says whether size ``l`` is computed this step (inactive sizes report 0); the
    chunks are walked up to the largest active size. ``weights[l]`` multiplies size ``l``'s loss.
    ``need_grad = (for q, for k)``: the gradients are computed in forward (see the module
    docstring) only where asked; ``per_size`` is not differentiable, backpropagate ``total``.
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
        need_grad: tuple[bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [i for i, a in enumerate(active) if a and weights[i] != 0.0]
        losses = q.new_zeros(len(active))  # (L,)
        if todo:
            grads = _FusedPrefixInfoNCE._run(
                q, k, nesting, todo, weights, scale, symmetric, need_grad, losses
            )
        else:  # every weight of the active sizes is 0
            grads = (
                torch.zeros_like(q) if need_grad[0] else None,
                torch.zeros_like(k) if need_grad[1] else None,
            )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def _run(
        q: torch.Tensor,
        k: torch.Tensor,
        nesting: Nesting,
        todo: list[int],
        weights: tuple[float, ...],
        scale: float,
        symmetric: bool,
        need_grad: tuple[bool, bool],
        losses: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fill ``losses (L,)``; return ``dtotal/dq (B, d)``, ``dtotal/dk (N, d)`` where asked."""
        n_q, n_k = q.shape[0], k.shape[0]
        need = need_grad[0] or need_grad[1]
        top = todo[-1]
        chunks = nesting.chunks[: top + 1]
        end = chunks[-1][1]
        q_, k_ = q[:, :end], k[:, :end]
        n_y = 2.0 if symmetric else 1.0  # dL/da_l = coef_l (P [+ P_col] - n_y Y)
        # Per-size vectors, (L', B) or (L', N): prefix norms and positive logits in one product.
        ind = _prefix_indicator(nesting.sizes[: top + 1], q.device, q.dtype)  # (L', end)
        inv_qn = torch.mm(ind, q_.square().t()).clamp_min_(1e-24).rsqrt_()  # 1 / |q_i[:m_l]|
        inv_kn = torch.mm(ind, k_.square().t()).clamp_min_(1e-24).rsqrt_()  # 1 / |k_j[:m_l]|
        rows = inv_qn.mul_(scale)[:, :, None]  # (L', B, 1): a_l = S_l * rows[l] * inv_kn[l]
        pos = torch.mm(ind, (q_ * k_[:n_q]).t()).mul_(rows[:, :, 0]).mul_(inv_kn[:, :n_q])
        idx = torch.tensor(todo, device=q.device)
        wts = torch.tensor([weights[i] for i in todo], dtype=q.dtype, device=q.device)  # (T,)
        coef = q.new_zeros(top + 1).index_copy_(0, idx, wts / (n_q * n_y))  # (L',)
        shortcuts = _softmax_needs_no_logs(scale, n_k, q.dtype)
        s_run = q.new_empty((n_q, n_k))  # running prefix dot products S_l
        logits = q.new_empty((n_q, n_k))  # scratch: a_l, then (P [+ P_col]) * a_l
        # P [+ P_col], then rows * that: dL/dS_l but for the factor coef_l / |k_j| and the
        # diagonal (one buffer reused when no gradient is wanted)
        dlds = q.new_empty((len(todo) if need else 1, n_q, n_k))
        slot = {i: j for j, i in enumerate(todo)}
        log_p = q.new_zeros((top + 1, n_q))  # log P_ii = a_ii - (log-sum-exp over documents)
        lse_c = q.new_zeros((top + 1, n_q))  # symmetric: log-sum-exp over queries
        ga_q = q.new_zeros((top + 1, n_q))  # sum_j (P [+ P_col])_ij a_ij
        ga_k = k.new_zeros((top + 1, n_k))  # sum_i (P [+ P_col])_ij a_ij
        widths = [b - a for a, b in chunks]
        # views of the chunks, (B, w), (w, B) and (w, N), and of the per-size rows
        q_c, q_ct, k_ct = q_.split(widths, 1), q_.t().split(widths, 0), k_.t().split(widths, 0)
        rows_l, inv_kn_l, log_p_l = rows.unbind(0), inv_kn.unbind(0), log_p.unbind(0)
        ga_q_l, ga_k_l, dlds_l = ga_q.unbind(0), ga_k.unbind(0), dlds.unbind(0)
        ones = q.new_ones(n_q)
        for i in range(top + 1):
            if i == 0:
                torch.mm(q_c[0], k_ct[0], out=s_run)
            else:
                s_run.addmm_(q_c[i], k_ct[i])
            if i not in slot:
                continue
            torch.mul(s_run, rows_l[i], out=logits).mul_(inv_kn_l[i])  # a = scale cos, (B, N)
            g = dlds_l[slot[i] if need else 0]
            if shortcuts:
                torch.softmax(logits, 1, out=g)
                torch.log(g.diagonal(), out=log_p_l[i])  # never underflows here
                if symmetric:
                    # the column softmax from the row one: exp(a_ij - scale) = P_ij w_i
                    w = torch.sub(pos[i], log_p_l[i]).sub_(scale).exp_()  # exp(lse_i - scale)
                    col = torch.mv(g[:, :n_q].t(), w)  # (B,) sum_i exp(a_ij - scale)
                    if need:  # P + P_col on the in-batch block: P_ij (1 + w_i / col_j)
                        g[:, :n_q].mul_(torch.addr(g.new_ones(()), w, col.reciprocal()))
                    torch.log(col, out=lse_c[i]).add_(scale)
            else:  # scale too large for the shortcuts above: log-softmax in both directions
                torch.log_softmax(logits, 1, out=g)
                log_p_l[i].copy_(g.diagonal())
                if need:
                    g.exp_()
                if symmetric:
                    log_pc = torch.log_softmax(logits[:, :n_q], 0)
                    torch.sub(pos[i], log_pc.diagonal(), out=lse_c[i])
                    if need:
                        g[:, :n_q].add_(log_pc.exp_())
            if need:
                # a = scale S / (|q| |k|): the |q_i| and |k_j| terms need sum_j g a, sum_i g a
                ga = logits.mul_(g)
                torch.sum(ga, 1, out=ga_q_l[i])
                torch.mv(ga.t(), ones, out=ga_k_l[i])  # faster than a sum over dim 0
                g.mul_(rows_l[i])
        per = -log_p.mean(1)  # (L',)
        if symmetric:
            per = 0.5 * (per + (lse_c - pos).mean(1))
        losses.index_copy_(0, idx, per[idx].mul_(wts))
        if not need:
            return None, None
        # the diagonal -n_y Y: sum_j g a loses n_y a_ii; dL/dS_ii gains -n_y coef rows / |k_i|
        ga_q.sub_(pos, alpha=n_y)
        ga_k[:, :n_q].sub_(pos, alpha=n_y)
        diag = torch.mul(rows[:, :, 0], inv_kn[:, :n_q]).mul_(coef[:, None] * -n_y)  # (L', B)
        # d|q_i|/dq = q / |q_i|: size l adds -coef_l (sum_j g a) / |q_i|^2 times q_i[:m_l]
        ga_q.mul_(rows[:, :, 0].square()).mul_(coef[:, None] / -(scale * scale))
        ga_k.mul_(inv_kn.square()).mul_(-coef[:, None])
        inv_kn.mul_(coef[:, None])  # the column factor coef_l / |k_j| of dL/dS_l
        # Walk the chunks back from the largest size with the running sum of dL/dS_l over the
        # sizes >= l; the gradients are written transposed: each chunk is a block of rows.
        grad_qt = q.new_empty((end, n_q)) if need_grad[0] else None  # (end, B)
        grad_kt = k.new_empty((end, n_k)) if need_grad[1] else None  # (end, N)
        run = dlds_l[slot[top]].mul_(inv_kn_l[top])  # the largest size is always computed
        run_t = run.t()
        for i in range(top, -1, -1):
            if i in slot and i < top:
                run.addcmul_(dlds_l[slot[i]], inv_kn_l[i])
            a_, b_ = chunks[i]
            if grad_qt is not None:  # run @ k_c, (w, B)
                torch.mm(k_ct[i], run_t, out=grad_qt[a_:b_])
            if grad_kt is not None:  # run^T @ q_c, (w, N)
                torch.mm(q_ct[i], run, out=grad_kt[a_:b_])
        # The per-row terms of size l act on the first m_l columns: u (L', n) -> u^T @ ind (n, end)
        diag_cols = torch.mm(diag.t(), ind)  # (B, end)
        grad_q = grad_k = None
        if grad_qt is not None:
            grad_q = torch.empty_like(q)
            grad_q[:, :end] = grad_qt.t()
            grad_q[:, :end].addcmul_(q_, torch.mm(ga_q.t(), ind)).addcmul_(k_[:n_q], diag_cols)
            grad_q[:, end:] = 0.0
        if grad_kt is not None:
            grad_k = torch.empty_like(k)
            grad_k[:, :end] = grad_kt.t()
            grad_k[:, :end].addcmul_(k_, torch.mm(ga_k.t(), ind))
            grad_k[:n_q, :end].addcmul_(q_, diag_cols)
            grad_k[:, end:] = 0.0
        return grad_q, grad_k

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor, _grad_per_size: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        grad_q, grad_k = ctx.saved_tensors
        return (
            grad_q * grad if ctx.needs_input_grad[0] else None,
            grad_k * grad if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _softmax_needs_no_logs(scale: float, n_k: int, dtype: torch.dtype) -> bool:
    """Whether the row softmax alone gives the loss and the column softmax exactly.

    Cosine logits lie in ``[-scale, scale]``, so ``P_ii >= exp(-2 scale) / N`` and
    ``exp(a_ij - scale)`` lies in ``[exp(-2 scale), 1]``: with ``2 scale + log N`` well inside the
    dtype's normal range nothing underflows, ``log P_ii`` is the loss and the column sums of
    ``exp(a - scale)`` come from the row softmax. Otherwise (e.g. float32 with scale > ~40) the
    log-softmax is taken in each direction.
    """
    return 2.0 * scale + math.log(n_k) + 4.0 < -math.log(torch.finfo(dtype).tiny)


def _prefix_indicator(
    sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(L, sizes[-1])`` 0/1 matrix, row ``l`` selecting the first ``sizes[l]`` coordinates."""
    d = torch.arange(sizes[-1], device=device)[None, :]
    return (d < torch.tensor(sizes, device=device)[:, None]).to(dtype)


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
    :class:`~matryoshka.losses.classification.MatryoshkaLossOutput`: the weighted sum (scalar, differentiable)
    and ``(L,)`` weighted per-size values (detached; 0 for sizes not sampled this step).

    The gradients are computed during the forward call whenever grad mode is on and ``q`` or
    ``k`` requires grad; evaluate under ``torch.no_grad()`` to skip that work.
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
        self.nesting = check_nesting(nesting, "MatryoshkaContrastiveLoss(Nesting.doubling(8, 384))")
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
        grad_on = torch.is_grad_enabled()
        total, per_size = _FusedPrefixInfoNCE.apply(
            q,
            k,
            self.nesting,
            flags,
            self.nesting.weights,
            1.0 / self.temperature,
            self.symmetric,
            (grad_on and q.requires_grad, grad_on and k.requires_grad),
        )
        return MatryoshkaLossOutput(total, per_size)

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
    :meth:`matryoshka.models.text_encoder.TextEncoder.forward_layers`) and returns ``(scalar, (len(layers), L))``.
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
        check_nesting(nesting, "Matryoshka2dContrastiveLoss(Nesting.doubling(8, 384))")
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
