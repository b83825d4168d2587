"""Post-hoc adaptor: learns nested prefixes on clustered data, saves/loads, reports misuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matryoshka import Nesting
from matryoshka.adaptor import MatryoshkaAdaptor, NotFittedError
from matryoshka.metrics import ndcg_at_k, relevance_from_labels, top_k_indices
from matryoshka.ops import truncate_numpy

NEST = Nesting([4, 8, 32])


pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int = 600, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around 12 random centres, the informative directions spread over all coordinates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    labels = rng.integers(0, 12, size=n)
    x = centres[labels] + 0.6 * rng.normal(size=(n, d))
    return x.astype(np.float32), labels


def retrieval_ndcg(x: np.ndarray, labels: np.ndarray) -> float:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    ranked = top_k_indices(s, 10)
    rel = relevance_from_labels(ranked, labels, labels)
    return ndcg_at_k(rel, np.bincount(labels)[labels] - 1)


def prefix_cosine_error(y: np.ndarray, x: np.ndarray, m: int) -> float:
    """Mean ``|cos(y_i[:m], y_j[:m]) - cos(x_i, x_j)|`` over all pairs: what the adaptor fits."""
    xn = truncate_numpy(x, x.shape[1], normalize=True)
    ym = truncate_numpy(y, m, normalize=True)
    return float(np.abs(ym @ ym.T - xn @ xn.T).mean())


def test_adaptor_beats_truncation_at_small_sizes() -> None:
    x, labels = clustered(300)
    ad = MatryoshkaAdaptor(NEST, hidden=32, epochs=8, batch_size=150, lr=3e-3, progress=False)
    assert ad.fit(x) is ad
    assert len(ad.history_) == 8
    assert ad.history_[-1] < ad.history_[0]
    for m in (4, 8):
        adapted = retrieval_ndcg(ad.transform(x, dim=m), labels)
        truncated = retrieval_ndcg(truncate_numpy(x, m, normalize=True), labels)
        assert adapted > truncated + 0.1, (m, adapted, truncated)
    # Training improves on its starting point, uncentred PCA (computed here independently),
    # on the objective it optimises: prefix cosines close to the full-size ones.
    xn = truncate_numpy(x, x.shape[1], normalize=True)
    pca = xn @ np.linalg.svd(xn.astype(np.float64), full_matrices=False)[2].T
    fitted_err = prefix_cosine_error(ad.transform(x), x, 4)
    pca_err = prefix_cosine_error(pca.astype(np.float32), x, 4)
    assert fitted_err < pca_err - 0.002, (fitted_err, pca_err)
    out = ad.transform(x[:5], dim=8)
    assert out.shape == (5, 8)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_supervised_mode_runs_and_is_seeded() -> None:
    x, _ = clustered(200)
    q, d = x[:50], x[50:100]
    a = MatryoshkaAdaptor(NEST, hidden=16, epochs=2, batch_size=64, progress=False)
    b = MatryoshkaAdaptor(NEST, hidden=16, epochs=2, batch_size=64, progress=False)
    ya = a.fit(x, queries=q, documents=d).transform(x, dim=8)
    yb = b.fit(x, queries=q, documents=d).transform(x, dim=8)
    np.testing.assert_array_equal(ya, yb)


def test_save_load_round_trip(tmp_path: Path) -> None:
    x, _ = clustered(200)
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
