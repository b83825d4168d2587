"""Post-hoc adaptor: learns nested prefixes on clustered data, saves/loads, reports misuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka import Nesting
from matryoshka.evaluation.metrics import ndcg_at_k, relevance_from_labels, top_k_indices
from matryoshka.models.adaptor import MatryoshkaAdaptor, NotFittedError
from matryoshka.ops import truncate_numpy
from tests.helpers import clustered

NEST = Nesting([4, 8, 32])


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 32)`` points around 12 random centres (the informative directions spread over all
    coordinates) and their labels."""
    return clustered(n, 32, seed, n_clusters=12, noise=0.6, return_labels=True)


def retrieval_ndcg(x: np.ndarray, labels: np.ndarray) -> float:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    ranked = top_k_indices(s, 10)
    rel = relevance_from_labels(ranked, labels, labels)
    return ndcg_at_k(rel, np.bincount(labels)[labels] - 1)


def prefix_listwise_kl(y: np.ndarray, x: np.ndarray, m: int, t: float = 0.05) -> float:
    """Mean over rows of ``KL(softmax_j cos(x_i, x_j) / t || softmax_j cos(y_i[:m], y_j[:m]) / t)``
    with ``j != i``: the adaptor's listwise term, over the whole set at once."""

    def log_softmax_rows(c: np.ndarray) -> np.ndarray:
        c = c.astype(np.float64) / t
        np.fill_diagonal(c, -np.inf)
        c = c - c.max(axis=1, keepdims=True)
        return c - np.log(np.exp(c).sum(axis=1, keepdims=True))

    xn = truncate_numpy(x, x.shape[1], normalize=True)
    ym = truncate_numpy(y, m, normalize=True)
    log_p, log_q = log_softmax_rows(xn @ xn.T), log_softmax_rows(ym @ ym.T)
    p = np.exp(log_p)
    np.fill_diagonal(log_p, 0.0)
    np.fill_diagonal(log_q, 0.0)
    return float((p * (log_p - log_q)).sum(axis=1).mean())


def test_adaptor_beats_truncation_at_small_sizes() -> None:
    x, labels = blobs(300)
    ad = MatryoshkaAdaptor(NEST, hidden=32, epochs=8, batch_size=150, lr=3e-3, progress=False)
    assert ad.fit(x) is ad
    assert len(ad.history_) == 8
    assert ad.history_[-1] < ad.history_[0]
    for m in (4, 8):
        adapted = retrieval_ndcg(ad.transform(x, dim=m), labels)
        truncated = retrieval_ndcg(truncate_numpy(x, m, normalize=True), labels)
        assert adapted > truncated + 0.1, (m, adapted, truncated)
    # Training improves on its starting point, uncentred PCA (computed here independently),
    # on the term of its objective that dominates: each row's neighbour distribution.
    xn = truncate_numpy(x, x.shape[1], normalize=True)
    pca = (xn @ np.linalg.svd(xn.astype(np.float64), full_matrices=False)[2].T).astype(np.float32)
    for m in (4, 8):
        fitted_kl = prefix_listwise_kl(ad.transform(x), x, m)
        pca_kl = prefix_listwise_kl(pca, x, m)
        assert fitted_kl < pca_kl - 0.01, (m, fitted_kl, pca_kl)
    out = ad.transform(x[:5], dim=8)
    assert out.shape == (5, 8)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_supervised_mode_runs_and_is_seeded() -> None:
    x, _ = blobs(200)
    q, d = x[:50], x[50:100]
    a = MatryoshkaAdaptor(NEST, hidden=16, epochs=2, batch_size=64, progress=False)
    b = MatryoshkaAdaptor(NEST, hidden=16, epochs=2, batch_size=64, progress=False)
    ya = a.fit(x, queries=q, documents=d).transform(x, dim=8)
    yb = b.fit(x, queries=q, documents=d).transform(x, dim=8)
    np.testing.assert_array_equal(ya, yb)


def test_save_load_round_trip(tmp_path: Path) -> None:
    x, _ = blobs(200)
    ad = MatryoshkaAdaptor(NEST, hidden=16, epochs=1, batch_size=64, progress=False).fit(x)
    path = ad.save(tmp_path / "adaptor")
    assert path.suffix == ".safetensors"
    assert (tmp_path / "adaptor.json").is_file()
    back = MatryoshkaAdaptor.load(tmp_path / "adaptor.json")
    assert back.nesting == NEST
    assert back.get_params() == ad.get_params()
    np.testing.assert_array_equal(back.transform(x, dim=4), ad.transform(x, dim=4))
    assert back.history_ == ad.history_


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="pass a Nesting"):
        MatryoshkaAdaptor([4, 8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden=0 must be a positive int"):
        MatryoshkaAdaptor(NEST, hidden=0)
    with pytest.raises(ValueError, match="top_k=0 must be a positive int"):
        MatryoshkaAdaptor(NEST, top_k=0)
    with pytest.raises(ValueError, match="lr=0 must be positive"):
        MatryoshkaAdaptor(NEST, lr=0)
    with pytest.raises(ValueError, match=r"reg=-1\.0 must be a float >= 0, e\.g\. 0\.5"):
        MatryoshkaAdaptor(NEST, reg=-1.0)
    with pytest.raises(ValueError, match=r"supervised_weight=nan must be a float >= 0"):
        MatryoshkaAdaptor(NEST, supervised_weight=float("nan"))
    with pytest.raises(ValueError, match=r"temperature=0 must be a positive float"):
        MatryoshkaAdaptor(NEST, temperature=0)
    with pytest.raises(ValueError, match=r"listwise_temperature=-1 must be a positive float"):
        MatryoshkaAdaptor(NEST, listwise_temperature=-1)
    with pytest.raises(ValueError, match=r"listwise_weight=-2 must be a float >= 0"):
        MatryoshkaAdaptor(NEST, listwise_weight=-2)
    ad = MatryoshkaAdaptor(NEST, epochs=1, progress=False)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        ad.transform(np.zeros((2, 32)))
    with pytest.raises(ValueError, match=r"embeddings.shape=\(5, 16\).*\(n, 32\)"):
        ad.fit(np.zeros((5, 16)))
    with pytest.raises(ValueError, match="contains NaN or inf"):
        ad.fit(np.full((5, 32), np.nan))
    with pytest.raises(ValueError, match="queries and documents go together"):
        ad.fit(np.ones((5, 32)), queries=np.ones((5, 32)))
    with pytest.raises(FileNotFoundError, match="is missing"):
        MatryoshkaAdaptor.load(tmp_path / "nothing")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not written by MatryoshkaAdaptor\.save"):
        MatryoshkaAdaptor.load(tmp_path / "x")


def test_listwise_term_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 32)).astype(np.float32)
    y = rng.normal(size=(7, 32)).astype(np.float32)
    ad = MatryoshkaAdaptor(NEST, pairwise_weight=0.0, listwise_weight=1.0, progress=False)
    xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    weights = torch.tensor(NEST.weights) / sum(NEST.weights)
    got = ad._similarity_loss(torch.from_numpy(y), xt @ xt.T, weights).item()
    want = sum(w * prefix_listwise_kl(y, x, m) for m, w in zip(NEST, weights.tolist(), strict=True))
    assert got == pytest.approx(want, rel=1e-4)
    # the pairwise term alone, against the mean absolute cosine error of every prefix
    ad = MatryoshkaAdaptor(NEST, pairwise_weight=1.0, listwise_weight=0.0, progress=False)
    got = ad._similarity_loss(torch.from_numpy(y), xt @ xt.T, weights).item()
    xn = truncate_numpy(x, 32, normalize=True)
    want = 0.0
    for m, w in zip(NEST, weights.tolist(), strict=True):
        ym = truncate_numpy(y, m, normalize=True)
        want += w * float(np.abs(ym @ ym.T - xn @ xn.T).mean())
    assert got == pytest.approx(want, rel=1e-4)


def pca_rotation(x: np.ndarray) -> np.ndarray:
    """Uncentred PCA basis of unit rows: ``(d, d)``, columns by decreasing variance."""
    xn = truncate_numpy(x, x.shape[1], normalize=True).astype(np.float64)
    _, _, vt = np.linalg.svd(xn, full_matrices=False)
    return vt.T


def test_orthogonal_adaptor_keeps_full_size_cosines_and_nests_prefixes_beyond_pca(
    tmp_path: Path,
) -> None:
    x, _ = blobs(400)
    ad = MatryoshkaAdaptor(
        NEST, epochs=10, batch_size=200, lr=3e-3, progress=False, orthogonal=True
    ).fit(x)
    y = ad.transform(x, normalize=False)
    xn = truncate_numpy(x, 32, normalize=True)
    # a rotation: every full-size cosine (and norm) is the base model's own
    np.testing.assert_allclose(
        truncate_numpy(y, 32, True) @ truncate_numpy(y, 32, True).T, xn @ xn.T, atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    r = ad.net_.rotation.detach().double().numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(r.T @ r, np.eye(32), atol=1e-5)
    # its prefixes rank neighbours more like the full vectors than PCA's (its starting point)
    pca = xn @ pca_rotation(x)
    for m in (4, 8):
        assert prefix_listwise_kl(y, x, m) < prefix_listwise_kl(pca, x, m)
    # saved and loaded, it maps the same way
    ad.save(tmp_path / "rot")
    back = MatryoshkaAdaptor.load(tmp_path / "rot")
    assert back.orthogonal
    np.testing.assert_array_equal(back.transform(x), ad.transform(x))


def test_orthogonal_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"orthogonal='yes' must be True or False"):
        MatryoshkaAdaptor(NEST, orthogonal="yes")  # type: ignore[arg-type]
