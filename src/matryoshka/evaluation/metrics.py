"""Ranking and classification metrics, on NumPy arrays, shared by every evaluator.

Ranking metrics take ``rel``: a ``(Q, k)`` boolean matrix, ``rel[q, i]`` true when the item at
rank ``i`` (0-based) of query ``q`` is relevant, and ``n_relevant``: ``(Q,)``, how many relevant
items exist for each query in the whole corpus (for recall, AP and the ideal DCG). Each returns
the mean over queries; queries with no relevant item count as 0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "average_precision_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "relevance_from_labels",
    "top_k_indices",
]


def _check(rel: np.ndarray, n_relevant: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rel = np.asarray(rel, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"rel.shape={rel.shape}: pass a (queries, k) boolean matrix.")
    if n_relevant is None:
        n_rel = rel.sum(1)
    else:
        n_rel = np.asarray(n_relevant, dtype=np.int64)
        if n_rel.shape != (rel.shape[0],):
            raise ValueError(
                f"n_relevant.shape={n_rel.shape} but rel has {rel.shape[0]} queries: "
                "give one count per query."
            )
    return rel, n_rel


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray) -> float:
    """mAP@k: mean over queries of ``sum_i P@i * rel_i / min(k, R)`` (R = ``n_relevant``)."""
    rel, n_rel = _check(rel, n_relevant)
    k = rel.shape[1]
    hits = np.cumsum(rel, axis=1)  # (Q, k)
    precision = hits / np.arange(1, k + 1)
    denom = np.minimum(n_rel, k).astype(np.float64)
    ap = np.where(denom > 0, (precision * rel).sum(1) / np.maximum(denom, 1), 0.0)
    return float(ap.mean())


def ndcg_at_k(rel: np.ndarray, n_relevant: np.ndarray) -> float:
    """nDCG@k with binary gains: ``DCG = sum_i rel_i / log2(i + 2)`` over the ideal ranking's DCG."""
    rel, n_rel = _check(rel, n_relevant)
    k = rel.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    dcg = (rel * discounts).sum(1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discounts)])
    idcg = ideal_cum[np.minimum(n_rel, k)]
    return float(np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0).mean())


def recall_at_k(rel: np.ndarray, n_relevant: np.ndarray) -> float:
    """Recall@k: relevant items in the top k over all relevant items."""
    rel, n_rel = _check(rel, n_relevant)
    return float(np.where(n_rel > 0, rel.sum(1) / np.maximum(n_rel, 1), 0.0).mean())


def mrr_at_k(rel: np.ndarray) -> float:
    """MRR@k: mean of ``1 / rank`` of the first relevant item in the top k (0 if none)."""
    rel, _ = _check(rel)
    first = rel.argmax(1)
    found = rel[np.arange(rel.shape[0]), first]
    return float(np.where(found, 1.0 / (first + 1), 0.0).mean())


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, best first: ``(Q, N) -> (Q, k)``.

    Ties are broken by the lower index, so results are deterministic. A full stable sort per row:
    meant for evaluation-sized candidate sets; large corpora go through :mod:`matryoshka.retrieval.index`.
    """
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be in [1, {scores.shape[1]}] (the number of candidates).")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def relevance_from_labels(
    ranked: np.ndarray, query_labels: np.ndarray, corpus_labels: np.ndarray
) -> np.ndarray:
    """Same-label relevance of ranked results: ``(Q, k)`` ids -> ``(Q, k)`` bool."""
    return corpus_labels[ranked] == query_labels[:, None]


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Top-1 accuracy in ``[0, 1]``."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred.shape={pred.shape} != target.shape={target.shape}.")
    return float((pred == target).mean())
