import numpy as np
import pytest
import torch

from matryoshka.evaluation.image import (
    embed,
    knn1_accuracy,
    linear_probe,
    posthoc_reduce,
    retrieval_map,
)


def _clusters(seed, n=120, d=6):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centers = rng.normal(size=(3, d)) * 4
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_knn1_matches_brute_force_loop():
    z, y = _clusters(0)
    db, ydb, q, yq = z[:80], y[:80], z[80:], y[80:]
    hits = 0
    for qi, yi in zip(q, yq, strict=True):
        sims = [float(qi @ d) / (np.linalg.norm(qi) * np.linalg.norm(d)) for d in db]
        hits += ydb[int(np.argmax(sims))] == yi
    assert knn1_accuracy(db, ydb, q, yq) == pytest.approx(hits / len(q))


def test_retrieval_map_matches_naive_definition():
    z, y = _clusters(1, n=30)
    z += np.random.default_rng(5).normal(size=z.shape).astype(np.float32) * 3  # imperfect ranking
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    aps = []
    for i in range(len(z)):
        order = [j for j in np.argsort(-(zn @ zn[i]), kind="stable") if j != i][:10]
        rel = [y[j] == y[i] for j in order]
        n_rel = int((y == y[i]).sum()) - 1
        precisions = [sum(rel[: r + 1]) / (r + 1) for r in range(10) if rel[r]]
        aps.append(sum(precisions) / min(10, n_rel))
    assert retrieval_map(z, y, k=10) == pytest.approx(np.mean(aps))


def test_linear_probe_separates_clusters():
    z, y = _clusters(2)
    assert linear_probe(z[:80], y[:80], z[80:], y[80:]) == 1.0


def test_posthoc_reductions():
    z, _ = _clusters(3, n=200, d=8)
    tr, te = z[:150], z[150:]
    a, _ = posthoc_reduce("truncation", tr, te, 3)
    np.testing.assert_array_equal(a, tr[:, :3])
    a, _ = posthoc_reduce("pca", tr, te, 3)
    # PCA scores: projections of centred data on the top right-singular vectors (up to sign)
    centred = tr - tr.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:3].T
    np.testing.assert_allclose(np.abs(a), np.abs(want), rtol=1e-3, atol=1e-3)
    r1, _ = posthoc_reduce("random-projection", tr, te, 4, seed=1)
    r2, _ = posthoc_reduce("random-projection", tr, te, 4, seed=1)
    assert r1.shape == (150, 4)
    np.testing.assert_array_equal(r1, r2)
    with pytest.raises(
        ValueError, match=r"method='ica' is not one of \['truncation', 'pca', 'random-projection'\]"
    ):
        posthoc_reduce("ica", tr, te, 3)
    with pytest.raises(ValueError, match=r"m=9 must be in \[1, 8\]"):
        posthoc_reduce("pca", tr, te, 9)


def test_embed_batches_like_one_pass():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.randn(23, 3, 4)
    np.testing.assert_allclose(embed(net, x, batch_size=4), net(x).detach().numpy(), rtol=1e-6)
