import numpy as np
import pytest

from matryoshka.evaluation.metrics import (
    accuracy,
    average_precision_at_k,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    relevance_from_labels,
    top_k_indices,
)


def test_ranking_metrics_by_hand():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    n_rel = np.array([3, 2, 1])
    # AP: q0 (1/1 + 2/3) / min(4, 3); q1 0; q2 (1/2) / 1
    assert average_precision_at_k(rel, n_rel) == pytest.approx(((1 + 2 / 3) / 3 + 0 + 0.5) / 3)
    # nDCG: q0 (1 + 1/log2(4)) / (1 + 1/log2(3) + 1/log2(4)); q2 (1/log2(3)) / 1
    q0 = (1 + 0.5) / (1 + 1 / np.log2(3) + 0.5)
    assert ndcg_at_k(rel, n_rel) == pytest.approx((q0 + 0 + 1 / np.log2(3)) / 3)
    assert recall_at_k(rel, n_rel) == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert mrr_at_k(rel) == pytest.approx((1 + 0 + 0.5) / 3)


def test_top_k_indices_matches_argsort_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(6, 20)).astype(np.float32)  # many ties
    got = top_k_indices(scores, 7)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got, want)


def test_relevance_and_accuracy():
    ranked = np.array([[2, 0], [1, 2]])
    rel = relevance_from_labels(ranked, np.array([0, 1]), np.array([0, 1, 0]))
    np.testing.assert_array_equal(rel, [[True, True], [True, False]])
    assert accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"rel.shape=\(3,\): pass a \(queries, k\) boolean matrix"):
        mrr_at_k(np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match=r"n_relevant.shape=\(2,\) but rel has 3 queries"):
        recall_at_k(np.zeros((3, 2), dtype=bool), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, 4\]"):
        top_k_indices(np.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match=r"pred.shape=\(2,\) != target.shape=\(3,\)"):
        accuracy(np.zeros(2), np.zeros(3))
