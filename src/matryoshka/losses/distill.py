"""Matryoshka self-distillation: every prefix of a student keeps the teacher's similarity structure.

The teacher is a frozen encoder (the base model before fine-tuning); its full-size, unit-norm
embeddings ``t (B, d)`` of a batch of texts give the target cosines ``T = t t^T (B, B)``. The
student's embeddings ``s (B, d)`` of the same texts are scored, per prefix size ``m`` of the
nesting (weights from the nesting, normalised to sum to 1):

* pairwise: ``mean_ij |cos(s_i[:m], s_j[:m]) - T_ij|``;
* listwise: ``mean_i KL(p_i || q_i)`` with ``p_i = softmax_j(T_ij / t)`` and ``q_i`` the same over
  the prefix cosines, ``j != i`` (the row itself is masked to ``-4``, below every cosine);
* keep (full size only): ``mean_i (1 - cos(s_i, t_i))``, so the student's full-size output stays
  where the teacher's was and the full size does not drift.

:func:`similarity_distill_loss` is the pairwise + listwise part on any embeddings and target
(the same two objectives :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` fits on frozen
vectors). :class:`MatryoshkaDistillLoss` is the sentence-transformers loss for
``SentenceTransformerTrainer``: the teacher's embeddings come precomputed as the dataset's
``label`` column (as sentence-transformers' ``MSELoss`` distillation takes them), so a step costs
one student forward, no teacher forward. :class:`KeepTeacherLoss` adds that term, weighted, to a
contrastive Matryoshka loss (the supervised fine-tune that should not forget), embedding each
column once for both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from matryoshka.losses.sentence_transformers import _check_cache_options
from matryoshka.nesting import Nesting
from matryoshka.ops import prefix_similarities

try:
    from sentence_transformers.base.losses.gradcache import CachedLossMixin
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "matryoshka.losses.distill needs sentence-transformers>=6.2: install it with "
        "`pip install 'matryoshka[text]'`."
    ) from e

__all__ = ["KeepTeacherLoss", "MatryoshkaDistillLoss", "similarity_distill_loss", "teacher_rows"]

_NO_LABELS = (
    "got no labels: MatryoshkaDistillLoss reads the teacher's full-size embeddings from the "
    "dataset's 'label' column, one list of d floats per row (all columns' embeddings "
    "concatenated, column by column); compute them once with the frozen teacher."
)


def similarity_distill_loss(
    y: Tensor,
    target: Tensor,
    nesting: Nesting,
    weights: Tensor | None = None,
    pairwise_weight: float = 1.0,
    listwise_weight: float = 1.0,
    temperature: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Pairwise + listwise similarity preservation of every prefix of ``y``.

    ``y (B, d)``: the embeddings being trained (any norm: prefixes are compared by cosine);
    ``target (B, B)``: the cosines to keep (the teacher's full-size ones); ``weights (L,)``: one
    per size of ``nesting`` (default: the nesting's, normalised to sum 1). Returns
    ``(loss, per_size)``: the weighted scalar and the ``(L,)`` unweighted per-size terms
    ``pairwise_weight * mean |cos_m - target| + listwise_weight * mean_i KL(p_i || q_i)``.
    """
    if weights is None:
        w = torch.tensor(nesting.weights, dtype=y.dtype, device=y.device)
        weights = w / w.sum()
    sims = prefix_similarities(y, y, nesting)  # (L, B, B) cosines of every prefix
    per = sims.new_zeros(len(nesting))  # (L,)
    if pairwise_weight > 0:
        per = per + pairwise_weight * (sims - target).abs().mean(dim=(1, 2))
    if listwise_weight > 0 and target.shape[0] > 1:
        # Cosines lie in [-1, 1]: -4 / t puts the row itself below every real neighbour.
        eye = torch.eye(target.shape[0], dtype=torch.bool, device=target.device)
        log_p = torch.log_softmax(target.masked_fill(eye, -4.0) / temperature, dim=1)  # (B, B)
        log_q = torch.log_softmax(sims.masked_fill(eye, -4.0) / temperature, dim=2)  # (L, B, B)
        per = per + listwise_weight * (log_p.exp() * (log_p - log_q)).sum(2).mean(1)
    return (weights * per).sum(), per


def _check_weight(name: str, value: float, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a float >= 0, e.g. {example}.")
    return float(value)


class MatryoshkaDistillLoss(CachedLossMixin, nn.Module):
    """Self-distillation loss for ``SentenceTransformerTrainer``: prefixes match the teacher.

    Args:
        model: the student ``SentenceTransformer`` (kept as ``self.model``).
        matryoshka_dims: the prefix sizes, any order; the largest is the model's dimension.
        matryoshka_weights: one weight per entry of ``matryoshka_dims`` (default: all ones).
        keep_weight: weight of the full-size keep term ``mean (1 - cos(s, t))``.
        pairwise_weight: weight of the pairwise cosine error.
        listwise_weight: weight of the listwise KL term.
        temperature: softmax temperature of the listwise term.
        mini_batch_size: None (default) for one forward with a graph per column; an int turns on
            gradient caching (GradCache, through sentence-transformers' ``CachedLossMixin``): the
            batch is embedded ``mini_batch_size`` texts at a time without a graph, the loss of the
            whole batch is back-propagated to those embeddings, then each mini-batch is embedded
            again with a graph and its cached gradient pushed through. Memory is that of one
            mini-batch, so the similarity structure can be kept over hundreds of texts per step
            for about 4/3 of the compute per text. The texts are sorted by length first (the loss
            does not depend on their order), so each mini-batch is padded only to its own longest.
        mini_batch_num_tokens: with gradient caching, cap the tokens per mini-batch instead.
        show_progress_bar: with gradient caching, show the mini-batch progress.

    ``forward(sentence_features, labels)``: ``C`` tokenised text columns of ``B`` rows each and
    ``labels (B, C d)``, each row the teacher's embeddings of that row's ``C`` texts,
    concatenated. All ``C B`` texts form one batch whose similarity structure is kept. After each
    call ``last_terms`` holds the detached ``{"per_size": (L,), "keep": ()}`` values.
    """

    def __init__(
        self,
        model: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        keep_weight: float = 1.0,
        pairwise_weight: float = 1.0,
        listwise_weight: float = 1.0,
        temperature: float = 0.05,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__()
        dims = list(matryoshka_dims)
        weights = [1.0] * len(dims) if matryoshka_weights is None else list(matryoshka_weights)
        if len(weights) != len(dims):
            raise ValueError(
                f"matryoshka_weights has {len(weights)} entries but matryoshka_dims "
                f"{len(dims)}: pass one weight per dim, or none."
            )
        asc = sorted(zip(dims, weights, strict=True))
        self.nesting = Nesting([m for m, _ in asc], [w for _, w in asc])  # validates both
        self.model = model
        self.keep_weight = _check_weight("keep_weight", keep_weight, "1.0")
        self.pairwise_weight = _check_weight("pairwise_weight", pairwise_weight, "1.0")
        self.listwise_weight = _check_weight("listwise_weight", listwise_weight, "1.0")
        t = temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(f"temperature={t!r} must be a positive float, e.g. 0.05.")
        self.temperature = float(t)
        _check_cache_options(mini_batch_size, mini_batch_num_tokens)
        self.mini_batch_size = mini_batch_size  # type: ignore[assignment]
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        self.uses_gradient_cache = mini_batch_size is not None
        self.last_terms: dict[str, Tensor] = {}

    def distill_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss of student embeddings ``(n, d)`` against the teacher's ``(n, d)``: scalar."""
        top = self.nesting.dim
        if student.ndim != 2 or student.shape[1] < top or teacher.shape != (student.shape[0], top):
            raise ValueError(
                f"student embeddings {tuple(student.shape)} and teacher labels "
                f"{tuple(teacher.shape)} must be (n, d) and (n, {top}): one teacher embedding of "
                f"{top} floats per text."
            )
        work = torch.float32 if student.dtype in (torch.float16, torch.bfloat16) else student.dtype
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = student[:, :top].to(work)
            t = nn.functional.normalize(teacher.to(work), dim=1)  # (n, d)
            loss, per = similarity_distill_loss(
                s,
                t @ t.T,
                self.nesting,
                pairwise_weight=self.pairwise_weight,
                listwise_weight=self.listwise_weight,
                temperature=self.temperature,
            )
            keep = (1.0 - nn.functional.cosine_similarity(s, t, dim=1)).mean()
        self.last_terms = {"per_size": per.detach(), "keep": keep.detach()}
        return loss + self.keep_weight * keep

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        """``C`` columns of ``B`` texts and ``labels (B, C d)`` ``->`` scalar loss."""
        if labels is None:
            raise ValueError(_NO_LABELS)
        features = list(sentence_features)
        teacher = teacher_rows(labels, len(features))  # (C B, d)
        if self.uses_gradient_cache:
            features, teacher = _by_length(features, teacher)
            return self.forward_cached(features, teacher)
        columns = embed_columns(self.model, features)  # C x (B, d)
        return self.distill_term(torch.cat(columns), teacher)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """Gradient caching's step 2: ``reps[c][j]`` is mini-batch ``j`` of column ``c``,
        ``(b_j, d)``; ``labels (C B, d)`` the teacher's rows in the same order. With
        ``with_backward`` the loss is back-propagated to ``reps`` and returned detached."""
        if labels is None:
            raise ValueError(_NO_LABELS)
        loss = self.distill_term(torch.cat([torch.cat(mbs) for mbs in reps]), labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """The settings the trainer's model card lists."""
        return {
            "loss": "MatryoshkaDistillLoss (prefix similarity structure of a frozen teacher)",
            "matryoshka_dims": list(self.nesting.sizes),
            "matryoshka_weights": list(self.nesting.weights),
            "keep_weight": self.keep_weight,
            "pairwise_weight": self.pairwise_weight,
            "listwise_weight": self.listwise_weight,
            "temperature": self.temperature,
            **(
                {
                    "mini_batch_size": self.mini_batch_size,
                    "mini_batch_num_tokens": self.mini_batch_num_tokens,
                }
                if self.uses_gradient_cache
                else {}
            ),
        }


def _by_length(
    features: list[dict[str, Any]], teacher: Tensor
) -> tuple[list[dict[str, Any]], Tensor]:
    """Each column's texts sorted by token count (longest first), with the teacher's rows
    ``(C B, d)`` permuted to match: contiguous mini-batches then hold texts of similar length and
    are padded only to their own longest. Other values (e.g. a modality name) are kept; inputs
    with a tensor that is not ``(B, ...)`` or without an ``attention_mask`` (e.g. flattened
    inputs) keep their order."""
    masks = [f.get("attention_mask") for f in features]
    b = teacher.shape[0] // max(1, len(features))
    for feat, mask in zip(features, masks, strict=True):
        if not (isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == b):
            return features, teacher
        if any(isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != b) for v in feat.values()):
            return features, teacher
    out, rows = [], []
    for c, (feat, mask) in enumerate(zip(features, masks, strict=True)):
        order = mask.sum(dim=1).argsort(descending=True, stable=True)  # type: ignore[union-attr]
        out.append(
            {
                k: v.index_select(0, order.to(v.device)) if isinstance(v, Tensor) else v
                for k, v in feat.items()
            }
        )
        rows.append(order.to(teacher.device) + c * b)
    return out, teacher.index_select(0, torch.cat(rows))


def teacher_rows(labels: Tensor, n_columns: int) -> Tensor:
    """``labels (B, C d)`` (row ``i``: the teacher's embeddings of its ``C`` texts) ``->``
    ``(C B, d)`` in column-major order, matching ``torch.cat`` of the ``C`` embedded columns."""
    b, width = labels.shape[0], labels.shape[-1]
    if labels.ndim != 2 or width % n_columns:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} for {n_columns} text column(s): each row "
            "must hold the teacher's embeddings of its texts, concatenated (C x d floats)."
        )
    d = width // n_columns
    return labels.reshape(b, n_columns, d).transpose(0, 1).reshape(n_columns * b, d)


class KeepTeacherLoss(nn.Module):
    """A contrastive Matryoshka loss plus ``weight`` x a :class:`MatryoshkaDistillLoss` term.

    ``contrastive`` is a :class:`~matryoshka.losses.sentence_transformers.FusedMatryoshkaLoss`
    without gradient caching; ``distill`` the distillation term on the same texts. ``forward``
    embeds each column once, hands them to both, and returns ``contrastive + weight * distill``;
    ``labels (B, C d)`` are the teacher's embeddings of every column (as for
    :class:`MatryoshkaDistillLoss`). Fine-tuning on narrow pairs then keeps the teacher's general
    similarity structure (and its full-size output) instead of forgetting it.
    """

    def __init__(self, contrastive: Any, distill: MatryoshkaDistillLoss, weight: float) -> None:
        super().__init__()
        if getattr(contrastive, "uses_gradient_cache", False):
            raise ValueError(
                "contrastive uses gradient caching (mini_batch_size): KeepTeacherLoss embeds "
                "each column once with a graph; build the contrastive loss without "
                "mini_batch_size."
            )
        self.weight = _check_weight("weight", weight, "0.5")
        self.model = contrastive.model
        self.contrastive = contrastive
        self.distill = distill

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        """``C`` columns (anchor, positive, ...) and ``labels (B, C d)`` ``->`` scalar loss."""
        if labels is None:
            raise ValueError(_NO_LABELS)
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                f"got {len(features)} input column(s): KeepTeacherLoss needs (anchor, positive"
                "[, negative...]) columns besides the label column."
            )
        columns = embed_columns(self.model, features)  # C x (B, d)
        loss = self.contrastive.calculate_loss([[c] for c in columns])
        term = self.distill.distill_term(torch.cat(columns), teacher_rows(labels, len(columns)))
        return loss + self.weight * term

    def get_config_dict(self) -> dict[str, Any]:
        """The settings the trainer's model card lists."""
        return {
            **self.contrastive.get_config_dict(),
            "distill_weight": self.weight,
            "distill": self.distill.get_config_dict(),
        }

    @property
    def citation(self) -> str:
        """BibTeX of Matryoshka Representation Learning, for the model card."""
        return str(self.contrastive.citation)
