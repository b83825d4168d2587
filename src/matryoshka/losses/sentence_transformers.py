"""A drop-in sentence-transformers loss: ``MatryoshkaLoss(MultipleNegativesRankingLoss)``, fused.

:class:`FusedMatryoshkaLoss` takes the arguments of sentence-transformers'
``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale), matryoshka_dims,
matryoshka_weights, n_dims_per_step)`` in one constructor and plugs into
``SentenceTransformerTrainer`` like any sentence-transformers loss::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss

    model = SentenceTransformer("all-MiniLM-L6-v2")
    loss = FusedMatryoshkaLoss(model, [384, 256, 128, 64, 32, 16, 8])
    SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss).train()

What it computes is the same number: for anchors ``a (B, d)``, positives ``p (B, d)`` and
optional hard-negative columns ``n_1 .. n_h (B, d)`` (the dataset's third and later columns),
each dim ``m`` contributes MNRL's in-batch-negatives cross-entropy on the cosine similarities of
the ``m``-prefixes, scaled by ``scale``, against the candidates ``[p; n_1; ..; n_h]``
``(B (1 + h), d)``; the loss is ``sum_m w_m loss_m``. Instead of running MNRL once per dim (one
normalisation, similarity matrix and softmax each, plus their backward), it embeds each column
once and calls :class:`~matryoshka.losses.contrastive.MatryoshkaContrastiveLoss`, which does all
dims in one fused pass.

Large batches: ``mini_batch_size`` turns on gradient caching (GradCache, as sentence-transformers'
``CachedMultipleNegativesRankingLoss`` does, through sentence-transformers' ``CachedLossMixin``): the columns are
embedded in mini-batches without a graph, the fused loss gives the gradients of the embeddings,
and the mini-batches are embedded again with a graph during backward. The loss itself is then
evaluated ``mini_batch_size`` anchors at a time, so its working memory is about
``(len(dims) + 2) x mini_batch_size x B (1 + h)`` floats rather than ``x B``.

Supported: ``similarity_fct=cos_sim``; ``directions=("query_to_doc",)`` (the default, any
``partition_mode``), or ``("query_to_doc", "doc_to_query")`` with ``partition_mode="per_direction"``
(the symmetric loss, the mean of both directions); no ``hardness_mode``; one process (no
``gather_across_devices``). Anything else raises a ``ValueError`` saying so: use
``MatryoshkaLoss(MultipleNegativesRankingLoss(...))`` for those.

Half precision: embeddings in float16/bfloat16 (autocast, ``fp16``/``bf16`` training) are cast to
float32 for the loss, with autocast off inside it; the gradient flows back in the embeddings' dtype.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from matryoshka.losses.contrastive import MatryoshkaContrastiveLoss
from matryoshka.nesting import Nesting

try:
    from sentence_transformers.base.losses.gradcache import CachedLossMixin
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.util import cos_sim
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "matryoshka.losses.sentence_transformers needs sentence-transformers>=6.2: "
        "install it with `pip install 'matryoshka[text]'`."
    ) from e

__all__ = ["FusedMatryoshkaLoss"]

logger = logging.getLogger(__name__)

_FORWARD = ("query_to_doc",)
_SYMMETRIC = ("query_to_doc", "doc_to_query")
_FALLBACK = "use sentence-transformers' MatryoshkaLoss(model, MultipleNegativesRankingLoss(...))"

_MRL_CITATION = """
@inproceedings{kusupati2022matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    booktitle={Advances in Neural Information Processing Systems},
    year={2022},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_dims_fit_model(model: nn.Module, dims: Sequence[int], given: Sequence[int]) -> None:
    """``dims`` must not exceed the model's embedding size; a warning when they stop short."""
    matryoshka_dims = given
    embedding_dim = _embedding_dim(model)
    if embedding_dim is not None:
        if max(dims) > embedding_dim:
            raise ValueError(
                f"matryoshka_dims={list(matryoshka_dims)} contains {max(dims)} but the model's "
                f"embedding dimension is {embedding_dim}: keep every dim <= {embedding_dim}."
            )
        if max(dims) < embedding_dim:
            logger.warning(
                "matryoshka_dims=%s does not include the model's embedding dimension %d: the "
                "coordinates beyond %d are not trained; add %d to train the full embedding.",
                list(matryoshka_dims),
                embedding_dim,
                max(dims),
                embedding_dim,
            )


def _check_mnrl_options(
    n_dims_per_step: int,
    dims: Sequence[int],
    scale: float,
    similarity_fct: Callable[[Tensor, Tensor], Tensor],
    gather_across_devices: bool,
    directions: Sequence[str],
    partition_mode: str,
    hardness_mode: str | None,
    hardness_strength: float,
) -> tuple[str, ...]:
    """The options the fused kernel supports (MNRL's, cosine InfoNCE on one process); the
    directions as a tuple. Anything else is a ``ValueError`` naming it and the way out."""
    if not _is_int(n_dims_per_step) or not (
        n_dims_per_step == -1 or 1 <= n_dims_per_step <= len(dims)
    ):
        raise ValueError(
            f"n_dims_per_step={n_dims_per_step!r} must be -1 (every dim each step) or an int "
            f"in [1, {len(dims)}] (matryoshka_dims has {len(dims)} entries)."
        )
    if not (isinstance(scale, int | float) and not isinstance(scale, bool)) or not (
        0.0 < scale < float("inf")
    ):
        raise ValueError(
            f"scale={scale!r} must be a positive finite float, e.g. 20.0 (temperature 0.05)."
        )
    if similarity_fct is not cos_sim:
        name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
        raise ValueError(
            f"similarity_fct={name} is not supported: the fused loss is cosine-only; leave "
            f"similarity_fct at its default sentence_transformers.util.cos_sim, or {_FALLBACK}."
        )
    if gather_across_devices:
        raise ValueError(
            f"gather_across_devices={gather_across_devices!r} is not supported: the fused loss "
            f"sees one process's batch; set gather_across_devices=False, or {_FALLBACK}."
        )
    dirs = tuple(directions)
    if dirs not in (_FORWARD, _SYMMETRIC, _SYMMETRIC[::-1]):
        raise ValueError(
            f"directions={dirs!r} is not supported: use ('query_to_doc',) or "
            f"('query_to_doc', 'doc_to_query'), or {_FALLBACK}."
        )
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode={partition_mode!r} must be 'joint' or 'per_direction'.")
    symmetric = len(dirs) == 2
    if symmetric and partition_mode != "per_direction":
        raise ValueError(
            f"partition_mode={partition_mode!r} with directions={dirs!r} is not supported: the "
            "fused symmetric loss is the mean of the two directions' losses; set "
            f"partition_mode='per_direction', or {_FALLBACK}."
        )
    if hardness_mode is not None:
        raise ValueError(
            f"hardness_mode={hardness_mode!r} is not supported: set hardness_mode=None, "
            f"or {_FALLBACK}."
        )
    if not (isinstance(hardness_strength, int | float) and hardness_strength >= 0.0):
        raise ValueError(f"hardness_strength={hardness_strength!r} must be a float >= 0.")
    return dirs


def _check_cache_options(mini_batch_size: int | None, mini_batch_num_tokens: int | None) -> None:
    """Gradient-caching options: ``None`` or positive ints, tokens only with a batch size."""
    for name, value in (
        ("mini_batch_size", mini_batch_size),
        ("mini_batch_num_tokens", mini_batch_num_tokens),
    ):
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(
                f"{name}={value!r} must be None (no gradient caching) or a positive int, e.g. 32."
            )
    if mini_batch_num_tokens is not None and mini_batch_size is None:
        raise ValueError(
            f"mini_batch_num_tokens={mini_batch_num_tokens} needs gradient caching: also set "
            "mini_batch_size (e.g. 32), which then bounds the loss's chunks of anchors."
        )


class FusedMatryoshkaLoss(CachedLossMixin, nn.Module):
    """``MatryoshkaLoss(MultipleNegativesRankingLoss)`` in one fused pass over all dims.

    Args:
        model: the ``SentenceTransformer`` being trained (kept as ``self.model``, which the trainer
            swaps for its wrapped model).
        matryoshka_dims: the prefix sizes trained, any order, e.g. ``[384, 256, 128, 64]``; each in
            ``[1, embedding dim]``, no repeats. If the largest is below the model's embedding
            dimension the trailing coordinates are not trained (a warning says so).
        matryoshka_weights: one non-negative weight per entry of ``matryoshka_dims`` (same order);
            all ones if omitted.
        n_dims_per_step: ``-1`` (default) trains every dim each step; ``k`` in ``[1, len(dims)]``
            trains a random ``k`` of them. The draw is ``random.sample(range(len(dims)), k)`` from
            Python's global ``random`` over the dims sorted largest first, exactly as
            sentence-transformers' ``MatryoshkaLoss`` (and its cached variant) draw it, so with
            the same Python RNG state (the trainer's ``seed`` sets it) both train the same dims.
            It consumes no torch RNG, so dropout masks are unaffected by the draw.
        scale: MNRL's ``scale`` (``1 / temperature``); cosine logits are ``scale * cos``.
        similarity_fct: must be ``sentence_transformers.util.cos_sim`` (the default).
        gather_across_devices: must be False.
        directions: ``("query_to_doc",)`` or ``("query_to_doc", "doc_to_query")``.
        partition_mode: ``"joint"`` or ``"per_direction"``; with both directions it must be
            ``"per_direction"``.
        hardness_mode: must be None.
        hardness_strength: ignored when ``hardness_mode`` is None (as in MNRL); must be >= 0.
        mini_batch_size: None (default) for one forward per column; an int turns on gradient
            caching with mini-batches of that many texts (see the module docstring).
        mini_batch_num_tokens: with gradient caching, cap the tokens per mini-batch instead.
        show_progress_bar: with gradient caching, show the mini-batch progress.

    ``forward(sentence_features, labels)``: ``sentence_features`` holds one tokenized column each
    (anchor, positive, then any hard negatives), ``B`` rows each; ``labels`` is ignored. Returns the
    scalar loss. After each call ``last_per_dim`` holds the ``(len(dims),)`` weighted per-dim
    losses, largest dim first like ``matryoshka_dims`` (0 for dims not drawn this step; detached).
    """

    mini_batch_size: int | None  # type: ignore[assignment]

    def __init__(
        self,
        model: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: Sequence[str] = _FORWARD,
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        dims, weights = _check_dims(matryoshka_dims, matryoshka_weights)
        _check_dims_fit_model(model, dims, matryoshka_dims)
        dirs = _check_mnrl_options(
            n_dims_per_step,
            dims,
            scale,
            similarity_fct,
            gather_across_devices,
            directions,
            partition_mode,
            hardness_mode,
            hardness_strength,
        )
        symmetric = len(dirs) == 2
        _check_cache_options(mini_batch_size, mini_batch_num_tokens)
        self.matryoshka_dims: tuple[int, ...] = tuple(m for m, _ in _dims_desc(dims, weights))
        self.matryoshka_weights: tuple[float, ...] = tuple(w for _, w in _dims_desc(dims, weights))
        self.n_dims_per_step = n_dims_per_step
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.gather_across_devices = False
        self.directions = dirs
        self.partition_mode = partition_mode
        self.hardness_mode = None
        self.hardness_strength = float(hardness_strength)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        self.uses_gradient_cache = mini_batch_size is not None
        asc = sorted(zip(dims, weights, strict=True))
        self.fused = MatryoshkaContrastiveLoss(
            Nesting([m for m, _ in asc], [w for _, w in asc]),
            temperature=1.0 / self.scale,
            symmetric=symmetric,
        )
        self.last_per_dim: Tensor | None = None

    @property
    def temperature(self) -> float:
        """``1 / scale``."""
        return 1.0 / self.scale

    def sample_dims(self) -> tuple[bool, ...]:
        """This step's dims as ``(L,)`` flags over the ascending nesting (all True for -1).

        Draws like sentence-transformers' ``MatryoshkaLoss``: ``random.sample`` of positions in the
        largest-first ``matryoshka_dims``, from Python's global ``random``.
        """
        n = len(self.matryoshka_dims)
        if self.n_dims_per_step == -1 or self.n_dims_per_step >= n:
            return (True,) * n
        picked = random.sample(range(n), self.n_dims_per_step)  # positions, largest dim first
        chosen = {n - 1 - j for j in picked}  # the same dims' positions in the ascending nesting
        return tuple(i in chosen for i in range(n))

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        """Columns ``(anchor, positive, *negatives)`` of ``B`` texts each ``->`` scalar loss."""
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                f"got {len(features)} input column(s): FusedMatryoshkaLoss needs (anchor, positive) "
                "pairs or (anchor, positive, negative_1, ...) tuples; give the dataset at least two "
                "text columns (besides any label column)."
            )
        if self.uses_gradient_cache:
            return self.forward_cached(features, labels)
        return self._loss(embed_columns(self.model, features), chunk=None)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """Gradient caching's step 2: the loss from per-column lists of mini-batch embeddings.

        ``reps[c][j]`` is mini-batch ``j`` of column ``c``, ``(b_j, d)``. With ``with_backward``
        the loss is back-propagated to ``reps`` (chunk by chunk) and returned detached.
        """
        columns = [torch.cat(mbs) for mbs in reps]
        return self._loss(columns, chunk=self.mini_batch_size, backward=with_backward)

    def _loss(self, columns: list[Tensor], chunk: int | None, backward: bool = False) -> Tensor:
        """``columns``: anchors ``(B, d)``, positives ``(B, d)``, negatives ``(B, d)`` each.

        ``chunk`` evaluates the (non-symmetric) loss ``chunk`` anchors at a time: rows are
        independent there, and moving an anchor block's own positives to the front of the
        candidates only permutes the softmax's columns. ``backward`` back-propagates each chunk's
        loss as it goes and returns the detached total.
        """
        q = columns[0]
        n_q = q.shape[0]
        for c, col in enumerate(columns[1:], start=1):
            if col.ndim != 2 or col.shape[0] != n_q:
                raise ValueError(
                    f"column {c} has embeddings of shape {tuple(col.shape)} but the anchors are "
                    f"{tuple(q.shape)}: every column needs one text per anchor."
                )
        top = self.fused.nesting.dim
        if q.shape[-1] < top:
            raise ValueError(
                f"the model's embeddings have {q.shape[-1]} dims but matryoshka_dims goes up to "
                f"{top}: keep every dim <= {q.shape[-1]}."
            )
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        q = q[:, :top].to(work)
        k = torch.cat(columns[1:])[:, :top].to(work)  # (B (1 + h), top): positives first
        active = self.sample_dims()
        per = q.new_zeros(len(active))
        total = q.new_zeros(())
        blocks = [(0, n_q)] if chunk is None or self.fused.symmetric else _ranges(n_q, chunk)
        with torch.autocast(device_type=q.device.type, enabled=False):
            for b, e in blocks:
                if (b, e) == (0, n_q):
                    out = self.fused(q, k, active)
                    part, per_part = out.loss, out.per_size
                else:  # this block's positives first; the other candidates in any order
                    order = torch.cat(
                        [torch.arange(b, e), torch.arange(0, b), torch.arange(e, k.shape[0])]
                    ).to(k.device)
                    out = self.fused(q[b:e], k.index_select(0, order), active)
                    frac = (e - b) / n_q
                    part, per_part = out.loss * frac, out.per_size * frac
                if backward:
                    part.backward()
                    part = part.detach()
                total = total + part
                per += per_part
        self.last_per_dim = per.flip(0)
        return total

    def get_config_dict(self) -> dict[str, Any]:
        """The settings the trainer's model card lists."""
        config: dict[str, Any] = {
            "loss": "MultipleNegativesRankingLoss (fused)",
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "n_dims_per_step": self.n_dims_per_step,
            "scale": self.scale,
            "similarity_fct": "cos_sim",
            "directions": self.directions,
            "partition_mode": self.partition_mode,
        }
        if self.uses_gradient_cache:
            config["mini_batch_size"] = self.mini_batch_size
            config["mini_batch_num_tokens"] = self.mini_batch_num_tokens
        return config

    @property
    def citation(self) -> str:
        """BibTeX of Matryoshka Representation Learning, for the model card."""
        return _MRL_CITATION


def _dims_desc(dims: Sequence[int], weights: Sequence[float]) -> list[tuple[int, float]]:
    """``(dim, weight)`` pairs, largest dim first (sentence-transformers' order)."""
    return sorted(zip(dims, weights, strict=True), key=lambda p: p[0], reverse=True)


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(b, min(b + step, n)) for b in range(0, n, step)]


def _check_dims(
    matryoshka_dims: Sequence[int], matryoshka_weights: Sequence[float] | None
) -> tuple[list[int], list[float]]:
    """Validated ``(dims, weights)`` in the order given."""
    try:
        dims = list(matryoshka_dims)
    except TypeError:
        dims = []
    if not dims or any(not _is_int(m) or m < 1 for m in dims):
        raise ValueError(
            f"matryoshka_dims={matryoshka_dims!r} must be a non-empty list of positive ints, "
            "e.g. [384, 256, 128, 64]."
        )
    if len(set(dims)) != len(dims):
        repeated = sorted({m for m in dims if dims.count(m) > 1})
        raise ValueError(
            f"matryoshka_dims={dims} repeats {repeated}: list each dim once (to weight one dim "
            "more, raise its entry in matryoshka_weights)."
        )
    if matryoshka_weights is None:
        return dims, [1.0] * len(dims)
    weights = list(matryoshka_weights)
    if len(weights) != len(dims):
        raise ValueError(
            f"matryoshka_weights={weights} has {len(weights)} entries but matryoshka_dims={dims} "
            f"has {len(dims)}: give one weight per dim, in the same order, or omit it for all ones."
        )
    try:
        as_float = [float(w) for w in weights]
    except (TypeError, ValueError):
        as_float = [float("nan")]
    if any(not 0.0 <= w < float("inf") for w in as_float) or sum(as_float) <= 0.0:
        raise ValueError(
            f"matryoshka_weights={weights} must be finite floats >= 0 with a positive sum, "
            "e.g. [1, 1, 1, 1]."
        )
    return dims, as_float


def _embedding_dim(model: nn.Module) -> int | None:
    """The model's embedding dimension where it says (sentence-transformers >= 6 spelling)."""
    get = getattr(model, "get_embedding_dimension", None)
    dim = get() if callable(get) else None
    return dim if _is_int(dim) else None
