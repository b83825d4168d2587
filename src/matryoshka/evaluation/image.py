"""Per-dimension evaluation and post-hoc baselines (the MRL paper's protocol at every size).

Metrics at size ``m`` on embeddings ``z: (N, d)``:

* ``linear_probe``: top-1 of a logistic regression fit on the training embeddings' first ``m``
  coordinates (for methods without trained heads);
* ``knn1_accuracy``: top-1 of the nearest training neighbour by cosine similarity;
* ``retrieval_map``: mAP@k with same-class relevance, every test item a query against the other
  test items (the query itself excluded).

Post-hoc baselines reduce one full-size embedding to ``m`` dimensions: ``truncation`` (its first
``m`` coordinates), ``pca`` (top-``m`` principal components fit on the training split) and
``random-projection`` (a seeded Gaussian matrix). None of them retrains the backbone.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from matryoshka.evaluation.metrics import (
    accuracy,
    average_precision_at_k,
    relevance_from_labels,
    top_k_indices,
)
from matryoshka.ops import truncate_numpy

__all__ = [
    "POSTHOC",
    "embed",
    "knn1_accuracy",
    "linear_probe",
    "posthoc_reduce",
    "retrieval_map",
]

POSTHOC = ("truncation", "pca", "random-projection")


@torch.no_grad()
def embed(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Full-size embeddings of ``x`` in eval mode: ``(N, ...) -> (N, d)`` float32.

    ``model`` is a :class:`~matryoshka.models.classifier.MatryoshkaClassifier` (its ``forward_features``) or
    any feature extractor.
    """
    model.eval()
    fn = getattr(model, "forward_features", model)
    device = next(model.parameters()).device
    outs = [
        fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs).numpy()


def linear_probe(
    z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> float:
    """Top-1 of a multinomial logistic regression on standardised features: ``(N, m)`` each."""
    scaler = StandardScaler().fit(z_train)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny m is expected and harmless
        clf.fit(scaler.transform(z_train), y_train)
    return accuracy(clf.predict(scaler.transform(z_test)), y_test)


def knn1_accuracy(
    z_db: np.ndarray, y_db: np.ndarray, z_query: np.ndarray, y_query: np.ndarray
) -> float:
    """Top-1 of the cosine nearest neighbour in ``z_db`` for each query: ``(N, m), (Q, m)``."""
    db = truncate_numpy(z_db, z_db.shape[1], normalize=True)
    q = truncate_numpy(z_query, z_query.shape[1], normalize=True)
    nearest = (q @ db.T).argmax(1)
    return accuracy(y_db[nearest], y_query)


def retrieval_map(z: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """mAP@k, same label = relevant, each item a query against all others: ``(N, m), (N,)``."""
    zn = truncate_numpy(z, z.shape[1], normalize=True)
    scores = zn @ zn.T
    np.fill_diagonal(scores, -np.inf)  # the query is not its own result
    ranked = top_k_indices(scores, k)
    rel = relevance_from_labels(ranked, y, y)
    n_relevant = np.bincount(y, minlength=int(y.max()) + 1)[y] - 1
    return average_precision_at_k(rel, n_relevant)


def posthoc_reduce(
    method: str, z_train: np.ndarray, z_test: np.ndarray, m: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Reduce full-size embeddings to ``m`` dims: ``(N, d), (Q, d) -> (N, m), (Q, m)``.

    The reduction is fit on ``z_train`` only.
    """
    d = z_train.shape[1]
    if not 1 <= m <= d:
        raise ValueError(f"m={m} must be in [1, {d}] (the embedding size).")
    if method == "truncation":
        return truncate_numpy(z_train, m), truncate_numpy(z_test, m)
    if method == "pca":
        pca = PCA(n_components=m, random_state=seed).fit(z_train)
        return pca.transform(z_train).astype(np.float32), pca.transform(z_test).astype(np.float32)
    if method == "random-projection":
        proj = np.random.default_rng(seed).normal(size=(d, m)).astype(np.float32) / np.sqrt(m)
        return z_train @ proj, z_test @ proj
    raise ValueError(f"method={method!r} is not one of {list(POSTHOC)}.")
