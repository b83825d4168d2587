"""Adaptive classification (cascade) and funnel retrieval, each checked against exact computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from matryoshka import MatryoshkaHead, Nesting
from matryoshka.cascade import (
    AdaptiveClassifier,
    cascade_curve,
    cascade_stages,
    confidence_scores,
    fit_thresholds,
    head_flops,
)
from matryoshka.retrieval.funnel import (
    FunnelRetriever,
    FunnelSpec,
    check_chain,
    open_corpus,
    recall_vs_reference,
    rerank_candidates,
)
from matryoshka.retrieval.index import NO_SCORE, VectorIndex, make_index
from matryoshka.retrieval.tuner import FunnelTuner

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Funnel retrieval


def nested_corpus(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered vectors whose variance decays along the axes, like a Matryoshka/PCA embedding:
    short prefixes carry most of the signal."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1.0 + np.arange(d))  # (d,)
    centres = rng.standard_normal((60, d)) * scale
    x = centres[rng.integers(0, 60, n)] + 0.3 * rng.standard_normal((n, d)) * scale
    return x.astype(np.float32)


D = 64
CORPUS = nested_corpus(4000, D, seed=0)
QUERIES = nested_corpus(80, D, seed=1)


def exact_full(k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return make_index("exact", D).add(CORPUS).search(QUERIES, k)


def test_funnel_with_whole_corpus_shortlist_equals_exact(tmp_path: Path) -> None:
    path = tmp_path / "corpus.npy"
    np.save(path, CORPUS)
    ref_s, ref_i = exact_full()
    fr = FunnelRetriever(8, CORPUS.shape[0]).fit(path)  # k' = N: the shortlist is everything
    assert isinstance(fr.corpus_, np.memmap)  # reranks read the memory-mapped file
    scores, ids = fr.search(QUERIES, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # a chain whose stages never narrow below the corpus size is exact too
    fr = FunnelRetriever(8, CORPUS.shape[0], (16, D), keep=(CORPUS.shape[0],)).fit(CORPUS)
    np.testing.assert_array_equal(fr.search(QUERIES, 10)[1], ref_i)


def test_funnel_rerank_scores_are_exact_prefix_cosines() -> None:
    fr = FunnelRetriever(8, 50, (32,)).fit(CORPUS)
    scores, ids = fr.search(QUERIES, 5)
    q = QUERIES[:, :32] / np.linalg.norm(QUERIES[:, :32], axis=1, keepdims=True)
    x = CORPUS[ids, :32] / np.linalg.norm(CORPUS[ids, :32], axis=2, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qkm,qm->qk", x, q), atol=1e-5)


def test_funnel_recall_on_nested_vectors() -> None:
    _, ref_i = exact_full()
    _, ids = FunnelRetriever(16, 200, (32, D)).fit(CORPUS).search(QUERIES, 10)
    assert recall_vs_reference(ids, ref_i) >= 0.95
    # HNSW shortlist, compared with the same exact reference
    fr = FunnelRetriever(16, 200, backend="faiss-hnsw", index_params={"ef_search": 256})
    _, ids = fr.fit(CORPUS).search(QUERIES, 10)
    assert recall_vs_reference(ids, ref_i) >= 0.95


def test_funnel_shortlist_recall_grows_with_k_prime() -> None:
    _, ref_i = exact_full()
    recalls = [
        recall_vs_reference(FunnelRetriever(4, kp).fit(CORPUS).search(QUERIES, 10)[1], ref_i)
        for kp in (10, 100, 1000)
    ]
    assert recalls[0] < recalls[1] <= recalls[2]
    assert recalls[2] >= 0.95


def test_funnel_reuses_a_prebuilt_index_and_checks_it() -> None:
    index = make_index("exact", 16).add(CORPUS)
    a = FunnelRetriever(16, 100, index=index).fit(CORPUS).search(QUERIES, 10)
    b = FunnelRetriever(16, 100).fit(CORPUS).search(QUERIES, 10)
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"index holds prefixes of size 16 but shortlist_size=8"):
        FunnelRetriever(8, 100, index=index).fit(CORPUS)
    with pytest.raises(ValueError, match=r"index has 4000 vectors but the corpus has 100"):
        FunnelRetriever(16, 100, index=index).fit(CORPUS[:100])
    with pytest.raises(ValueError, match=r"index.normalize=True but normalize=False"):
        FunnelRetriever(16, 100, index=index, normalize=False).fit(CORPUS)


def test_funnel_handles_short_shortlists() -> None:
    # 5 corpus vectors, k = 3, k' = 8: the index pads with -1, the funnel must not return them
    fr = FunnelRetriever(8, 8).fit(CORPUS[:5])
    _, ids = fr.search(QUERIES[:3], 3)
    assert np.all(ids >= 0)
    ref = make_index("exact", D).add(CORPUS[:5]).search(QUERIES[:3], 3)[1]
    np.testing.assert_array_equal(ids, ref)


def test_funnel_bytes_and_keep_counts() -> None:
    fr = FunnelRetriever(8, 200, (16, 64)).fit(CORPUS)
    assert fr.keeps(10) == (200, round(200 * (10 / 200) ** 0.5), 10)
    assert fr.rerank_bytes_per_query(10) == 4 * (200 * 16 + fr.keeps(10)[1] * 64)


def test_funnel_errors() -> None:
    fr = FunnelRetriever(8, 20)
    with pytest.raises(RuntimeError, match=r"not fitted yet: call fit\(corpus\)"):
        fr.search(QUERIES, 5)
    fr.fit(CORPUS)
    with pytest.raises(ValueError, match=r"k=30 is larger than shortlist_k=20"):
        fr.search(QUERIES, 30)
    with pytest.raises(ValueError, match=r"queries.shape=\(80, 32\): pass \(Q, 64\)"):
        fr.search(QUERIES[:, :32], 5)
    with pytest.raises(ValueError, match=r"shortlist_size=100 must be an int in \[1, 64\]"):
        FunnelRetriever(100, 20).fit(CORPUS)
    with pytest.raises(ValueError, match=r"rerank=\[32, 16\] must be strictly increasing"):
        FunnelRetriever(8, 20, (32, 16)).fit(CORPUS)
    with pytest.raises(ValueError, match=r"keep=\[5, 4\] has 2 counts but rerank=\[16, 64\]"):
        FunnelRetriever(8, 20, (16, 64), keep=(5, 4)).fit(CORPUS)
    with pytest.raises(ValueError, match=r"keep=\[50\] must decrease from shortlist_k=20"):
        FunnelRetriever(8, 20, (16, 64), keep=(50,)).fit(CORPUS).search(QUERIES, 5)
    with pytest.raises(FileNotFoundError, match=r"corpus='nowhere.npy' does not exist"):
        open_corpus("nowhere.npy")
    with pytest.raises(ValueError, match=r"corpus.shape=\(0, 4\)"):
        open_corpus(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match=r"ids has 2 queries but reference has 3"):
        recall_vs_reference(np.zeros((2, 3)), np.zeros((3, 3)))


def test_spec_validate_gives_the_canonical_funnel() -> None:
    spec = FunnelSpec(np.int64(8), 200, [16, 64], [50]).validate(D)  # type: ignore[arg-type]
    assert spec == FunnelSpec(8, 200, (16, 64), (50,))
    assert type(spec.shortlist_size) is int
    assert spec.validate(D) == spec  # validating twice changes nothing
    assert FunnelSpec(8, 200).validate(D).rerank == (D,)  # None: one stage at the full size
    assert hash(spec) == hash(FunnelSpec(8, 200, (16, 64), (50,)))  # frozen: a cache key


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FunnelSpec(0, 20), r"shortlist_size=0 must be an int in \[1, 64\] \(the corpus dim"),
        (FunnelSpec(True, 20), r"shortlist_size=True must be an int in \[1, 64\]"),
        (FunnelSpec(8, 0), r"shortlist_k=0 must be a positive int"),
        (FunnelSpec(8, 20, ()), r"rerank=\(\) is empty: give a non-empty chain .* e.g. \(64,\)"),
        (
            FunnelSpec(8, 20, (16, 16)),
            r"rerank=\[16, 16\] must be strictly increasing sizes in \[1, 64\]",
        ),
        (
            FunnelSpec(8, 20, (16, 65)),
            r"rerank=\[16, 65\] must be strictly .* e.g. \(64,\) or \(32, 64\)",
        ),
        (
            FunnelSpec(8, 20, ("a",)),  # type: ignore[arg-type]
            r"rerank=\('a',\) must be a sequence of int sizes",
        ),
        (FunnelSpec(8, 20, None, (5,)), r"keep=\[5\] has 1 counts but rerank=\(d,\) has 1 stages"),
        (
            FunnelSpec(8, 20, (16, 64), ("x",)),  # type: ignore[arg-type]
            r"keep=\('x',\) must be a sequence of int counts",
        ),
    ],
)
def test_spec_validation_errors_name_parameter_value_and_fix(
    spec: FunnelSpec, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        spec.validate(D)


def test_spec_keeps_is_the_strict_keep_rule() -> None:
    spec = FunnelSpec(8, 200, (16, 32, 64)).validate(D)
    geometric = tuple(round(200 * (10 / 200) ** (i / 3)) for i in (1, 2))
    assert spec.keeps(10) == (200, *geometric, 10)
    assert spec.keeps(200) == (200, 200, 200, 200)  # k = k': nothing to narrow
    assert FunnelSpec(8, 200, (16, 64), (40,)).keeps(10) == (200, 40, 10)
    assert FunnelSpec(8, 200, (16, 64), (40,)).rerank_bytes_per_query(10) == 4 * (
        200 * 16 + 40 * 64
    )
    with pytest.raises(
        ValueError, match=r"k=201 is larger than shortlist_k=200: .* set shortlist_k >= k"
    ):
        spec.keeps(201)  # never clamped to a widening funnel
    with pytest.raises(ValueError, match=r"k=0 must be a positive int"):
        spec.keeps(0)
    with pytest.raises(
        ValueError, match=r"keep=\[5\] must decrease from shortlist_k=200 down to k=10"
    ):
        FunnelSpec(8, 200, (16, 64), (5,)).keeps(10)  # below k
    with pytest.raises(
        ValueError, match=r"keep=\[50, 60\] must decrease .* the funnel only narrows"
    ):
        FunnelSpec(8, 200, (16, 32, 64), (50, 60)).keeps(10)  # widening between stages
    with pytest.raises(
        ValueError, match=r"rerank=None is not resolved yet: call spec.validate\(dim\)"
    ):
        FunnelSpec(8, 200).rerank_bytes_per_query(10)


def test_check_chain_min_size_for_stricter_callers() -> None:
    assert check_chain([32, 64], D, min_size=16) == (32, 64)
    with pytest.raises(
        ValueError, match=r"rerank_sizes=\[8, 64\] must be strictly increasing sizes in \[16, 64\]"
    ):
        check_chain([8, 64], D, "rerank_sizes", min_size=16)


def test_rerank_kernel_over_every_row_equals_exact_search() -> None:
    """k' = N candidates (in shuffled order, padded with -1) reranked at the full size."""
    ref_s, ref_i = exact_full()
    rng = np.random.default_rng(0)
    cand = np.stack([rng.permutation(CORPUS.shape[0]) for _ in range(QUERIES.shape[0])])
    cand = np.concatenate([cand, np.full((QUERIES.shape[0], 3), -1)], axis=1)  # (Q, N + 3)
    c = cand.shape[1]
    scores, ids = rerank_candidates(QUERIES, cand, CORPUS, (16, D), (c, c, 10), batch_size=7)
    assert scores.dtype == np.float32
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # fewer candidates than k: FAISS padding
    few = np.array([[3, -1, 5]])
    scores, ids = rerank_candidates(QUERIES[:1], few, CORPUS, (D,), (3, 4))
    assert sorted(ids[0, :2].tolist()) == [3, 5]
    assert ids[0, 2:].tolist() == [-1, -1]
    assert np.all(scores[0, 2:] == NO_SCORE)
    with pytest.raises(
        ValueError, match=r"keeps=\[3\] has 1 counts but rerank=\[64\] has 1 stages"
    ):
        rerank_candidates(QUERIES[:1], few, CORPUS, (D,), (3,))


def test_funnel_is_an_index() -> None:
    """A fitted funnel answers like a VectorIndex: dim, ntotal, normalize, search(q, k)."""
    index = make_index("exact", D).add(CORPUS)
    fr = FunnelRetriever.from_spec(FunnelSpec(8, CORPUS.shape[0], (16, D))).fit(CORPUS)
    assert fr.spec_ == FunnelSpec(8, CORPUS.shape[0], (16, D)).validate(D)
    answers = []
    for searcher in (index, fr):
        assert (searcher.dim, searcher.ntotal, searcher.normalize) == (D, 4000, True)
        answers.append(searcher.search(QUERIES[0], 10))  # one (d,) query -> (1, k)
    assert answers[0][1].shape == answers[1][1].shape == (1, 10)
    np.testing.assert_array_equal(answers[0][1], answers[1][1])
    assert isinstance(index, VectorIndex)
    with pytest.raises(RuntimeError, match=r"not fitted yet"):
        _ = FunnelRetriever(8, 20).dim


def test_recall_vs_reference_counts_overlap() -> None:
    ids = np.array([[1, 2, 3], [4, -1, -1]])
    ref = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_vs_reference(ids, ref) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_tuner_meets_the_target_with_the_fastest_measured_config() -> None:
    tuner = FunnelTuner(0.95, 10, shortlist_sizes=(8, 16), shortlist_ks=(20, 100, 400), repeats=1)
    tuner.fit(CORPUS, QUERIES)
    assert tuner.target_met_
    assert tuner.best_recall_ >= 0.95
    met = [r for r in tuner.results_ if r["recall"] >= 0.95]
    assert tuner.best_qps_ == max(r["qps"] for r in met)
    # the returned retriever really reaches the recall it reported
    _, ref_i = exact_full()
    _, ids = tuner.best_.search(QUERIES, 10)
    assert recall_vs_reference(ids, ref_i) == pytest.approx(tuner.best_recall_)
    assert tuner.best_spec_ == tuner.best_.spec_
    assert list(tuner.best_spec_.rerank or ()) == tuner.best_params_["rerank"]


def test_tuner_keeps_its_old_import_path() -> None:
    from matryoshka.retrieval import funnel

    assert funnel.FunnelTuner is FunnelTuner
    with pytest.raises(AttributeError, match=r"has no attribute 'FunnelTunr'"):
        _ = funnel.FunnelTunr


def test_tuner_warns_when_target_is_out_of_reach() -> None:
    tuner = FunnelTuner(1.0, 10, shortlist_sizes=(1,), shortlist_ks=(10,), repeats=1)
    with pytest.warns(UserWarning, match=r"no configuration reached target_recall=1.0"):
        tuner.fit(CORPUS, QUERIES)
    assert not tuner.target_met_


def test_tuner_recall_carries_over_to_disjoint_queries() -> None:
    """The recall reported on the tuning queries holds on a second, disjoint set of queries."""
    tune_q, check_q = nested_corpus(600, D, seed=2), nested_corpus(600, D, seed=3)
    tuner = FunnelTuner(
        0.9, 10, shortlist_sizes=(8, 16), shortlist_ks=(20, 50, 100, 200), repeats=1
    )
    tuner.fit(CORPUS, tune_q, validation_queries=check_q)
    assert tuner.target_met_
    assert tuner.validation_recall_ is not None
    # independent check of the validation recall: exact search by numpy, then overlap counting
    c = CORPUS / np.linalg.norm(CORPUS, axis=1, keepdims=True)
    q = check_q / np.linalg.norm(check_q, axis=1, keepdims=True)
    ref = np.argsort(-(q @ c.T), axis=1)[:, :10]
    _, ids = tuner.best_.search(check_q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref, strict=True)])
    assert tuner.validation_recall_ == pytest.approx(overlap)
    assert abs(tuner.validation_recall_ - tuner.best_recall_) <= 0.01


def test_tuner_chooses_among_backends_within_a_ram_budget() -> None:
    grid: dict[str, Any] = dict(shortlist_sizes=(8, 16), shortlist_ks=(20, 100, 400), repeats=1)
    both = FunnelTuner(0.9, 10, backends=("exact", "binary"), **grid).fit(CORPUS, QUERIES)
    assert {r["backend"] for r in both.results_} == {"exact", "binary"}
    # the budget lies between the two backends' footprints: only binary shortlists qualify
    binary_ram = max(r["ram_bytes_per_vector"] for r in both.results_ if r["backend"] == "binary")
    exact_ram = min(r["ram_bytes_per_vector"] for r in both.results_ if r["backend"] == "exact")
    assert binary_ram < exact_ram
    tight = FunnelTuner(
        0.5, 10, backends=("exact", "binary"), max_ram_bytes_per_vector=binary_ram, **grid
    ).fit(CORPUS, QUERIES)
    assert tight.best_params_["backend"] == "binary"
    assert tight.best_.nbytes / CORPUS.shape[0] <= binary_ram
    assert all(r.get("over_budget") for r in tight.results_ if r["backend"] == "exact")
    with pytest.raises(ValueError, match=r"max_ram_bytes_per_vector=1.0 is below every measured"):
        FunnelTuner(0.5, 10, max_ram_bytes_per_vector=1.0, **grid).fit(CORPUS, QUERIES)


def test_tuner_sets_a_graph_beam_per_shortlist_k() -> None:
    """A graph shortlist is measured with efSearch = k' (its cost knob); the chosen funnel keeps
    its own beam although one graph serves every k', so it reproduces the recall it reported."""
    grid: dict[str, Any] = dict(shortlist_sizes=(16,), shortlist_ks=(10, 20, 100), repeats=1)
    tuner = FunnelTuner(0.95, 10, backends=("sq8-hnsw",), **grid).fit(CORPUS, QUERIES)
    assert [r["ef_search"] for r in tuner.results_] == [r["shortlist_k"] for r in tuner.results_]
    assert len(tuner.results_) >= 2  # k' grew, and the graph's beam with it
    assert getattr(tuner.best_.index_, "ef_search") == tuner.best_params_["shortlist_k"]  # noqa: B009
    _, ref_i = exact_full()
    _, ids = tuner.best_.search(QUERIES, 10)
    assert recall_vs_reference(ids, ref_i) == pytest.approx(tuner.best_recall_)
    fixed = FunnelTuner(
        0.95, 10, backends=("sq8-hnsw",), index_params={"ef_search": 300}, **grid
    ).fit(CORPUS, QUERIES)
    assert {r["ef_search"] for r in fixed.results_} == {300}
    flat = FunnelTuner(0.95, 10, backends=("binary",), **grid).fit(CORPUS, QUERIES)
    assert all("ef_search" not in r for r in flat.results_)  # a scan has no beam


def test_tuner_errors() -> None:
    with pytest.raises(ValueError, match=r"target_recall=1.5 must be in \(0, 1\]"):
        FunnelTuner(1.5).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"shortlist_ks=\[5, 50\] .* each >= k=10"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,), shortlist_ks=(5, 50)).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"shortlist_sizes=\[128\] must be non-empty sizes"):
        FunnelTuner(0.9, 10, shortlist_sizes=(128,)).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"queries.shape=\(80, 8\)"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,)).fit(CORPUS, QUERIES[:, :8])
    with pytest.raises(ValueError, match=r"rerank=\[32, 16\] must be strictly increasing"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,), chains=[(32, 16)]).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"shortlist_ks=\[5000\] exceed the corpus size 4000"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,), shortlist_ks=(5000,)).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"backends=\['exakt'\] must be non-empty .* one of"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,), backends=("exakt",)).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"max_ram_bytes_per_vector=0 must be > 0"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,), max_ram_bytes_per_vector=0).fit(CORPUS, QUERIES)
    with pytest.raises(ValueError, match=r"validation_queries.shape=\(80, 8\)"):
        FunnelTuner(0.9, 10, shortlist_sizes=(8,)).fit(CORPUS, QUERIES, QUERIES[:, :8])


# ---------------------------------------------------------------------------------------------
# Adaptive classification


@pytest.fixture(scope="module")
def digits_head() -> tuple[MatryoshkaHead, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A MatryoshkaHead on sklearn digits (64 features, PCA-rotated so prefixes are nested)."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / 16.0
    _, _, vt = np.linalg.svd(x[:1000], full_matrices=False)
    z = (x @ vt.T).astype(np.float32)  # (1797, 64), dims ordered by variance
    torch.manual_seed(0)
    head = MatryoshkaHead(64, 10, Nesting([2, 4, 8, 16, 64]))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    zt, yt = torch.from_numpy(z[:1000]), torch.from_numpy(y[:1000])
    for _ in range(150):
        opt.zero_grad()
        logits = head(zt)  # (L, B, C)
        loss = sum(torch.nn.functional.cross_entropy(logits[i], yt) for i in range(logits.shape[0]))
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    return head, z[1000:1400], y[1000:1400], z[1400:], y[1400:]


def test_cascade_predict_matches_naive_per_input_loop(digits_head: Any) -> None:
    head, zv, yv, zt, _ = digits_head
    clf = AdaptiveClassifier(head, head.nesting, tolerance=0.01).fit(zv, yv)
    pred, dims = clf.predict(zt, return_dims=True)
    with torch.no_grad():
        logits = head(torch.from_numpy(zt)).numpy()  # (L, B, C)
    for b in range(zt.shape[0]):  # naive: walk the ladder input by input
        for i, m in enumerate(head.nesting):
            p = np.exp(logits[i, b] - logits[i, b].max())
            if p.max() / p.sum() >= clf.thresholds_[i] or i == len(head.nesting) - 1:
                assert (pred[b], dims[b]) == (logits[i, b].argmax(), m)
                break
    np.testing.assert_array_equal(clf.predict(torch.from_numpy(zt)), pred)


def test_cascade_reaches_target_at_lower_expected_dim(digits_head: Any) -> None:
    head, zv, yv, zt, yt = digits_head
    clf = AdaptiveClassifier(head, head.nesting, tolerance=0.01).fit(zv, yv)
    assert clf.val_accuracy_ >= clf.target_accuracy_ == pytest.approx(clf.full_accuracy_ - 0.01)
    assert clf.val_expected_dim_ < 64 / 2  # most inputs are decided by short prefixes
    report = clf.evaluate(zt, yt)
    with torch.no_grad():
        full = (head.forward_size(torch.from_numpy(zt), 64).argmax(-1).numpy() == yt).mean()
    # thresholds fitted on 400 validation inputs generalise to within a few points of full size
    assert report["accuracy"] >= full - 0.05
    assert report["expected_dim"] < 32
    assert sum(report["fraction_per_size"].values()) == pytest.approx(1.0)
    assert clf.score(zt, yt) == report["accuracy"]


def test_cascade_extremes(digits_head: Any) -> None:
    head, zv, yv, zt, _ = digits_head
    everyone_first = AdaptiveClassifier(head, head.nesting, target_accuracy=0.0).fit(zv, yv)
    assert everyone_first.val_expected_dim_ == 2  # every validation input stops at the first size
    assert set(everyone_first.predict(zv, return_dims=True)[1].tolist()) == {2}
    nobody_early = AdaptiveClassifier(head, head.nesting, target_accuracy=1.0).fit(zv, yv)
    assert set(nobody_early.predict(zt, return_dims=True)[1].tolist()) == {64}


def test_cascade_only_evaluates_undecided_inputs(digits_head: Any) -> None:
    head, zv, yv, zt, _ = digits_head
    calls: list[tuple[int, int]] = []

    def logits_fn(x: np.ndarray, m: int) -> torch.Tensor:
        calls.append((x.shape[0], m))
        return head.forward_size(torch.from_numpy(x), m)

    clf = AdaptiveClassifier(logits_fn, head.nesting, tolerance=0.01, confidence="margin")
    clf.fit(zv, yv)
    calls.clear()
    _, dims = clf.predict(zt, return_dims=True)
    sizes = list(head.nesting)
    for rows, m in calls:  # each stage sees exactly the inputs not decided by smaller sizes
        assert rows == int((dims >= m).sum())
    assert [m for _, m in calls] == sizes[: len(calls)]


def test_fit_thresholds_is_exact_per_stage() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random((3, 200))
    correct = rng.random((3, 200)) < np.array([[0.6], [0.8], [0.9]])
    target = 0.85
    thr = fit_thresholds(conf, correct, target)
    stages = cascade_stages(conf, thr)
    assert correct[stages, np.arange(200)].mean() >= target
    # stage 0 accepts as many inputs as possible: one more (the next confidence) breaks the target
    if np.isfinite(thr[0]):
        lower = conf[0][conf[0] < thr[0]].max()
        stages2 = cascade_stages(conf, np.array([lower, np.inf, -np.inf]))
        assert correct[stages2, np.arange(200)].mean() < target


def test_confidences_and_flops() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(confidence_scores(logits, "max_softmax"), [0.7, 0.4], atol=1e-6)
    np.testing.assert_allclose(confidence_scores(logits, "margin"), [0.5, 0.05], atol=1e-6)
    n = Nesting([8, 16, 32])
    np.testing.assert_array_equal(head_flops(n, 10, tied=True), [160, 320, 640])
    np.testing.assert_array_equal(head_flops(n, 10, tied=False), [160, 480, 1120])


def test_cascade_curve(digits_head: Any) -> None:
    head, zv, yv, _, _ = digits_head
    with torch.no_grad():
        logits = head(torch.from_numpy(zv)).numpy()
    curve = cascade_curve(logits, yv, head.nesting, targets=[0.5, 0.9])
    assert [p["size"] for p in curve["fixed"]] == [2, 4, 8, 16, 64]
    assert len(curve["cascade"]) == 2
    lo, hi = curve["cascade"]
    assert lo["expected_dim"] <= hi["expected_dim"]
    assert lo["flops"] <= hi["flops"]
    with pytest.raises(ValueError, match=r"logits.shape=\(5, 400\) must be \(L=5, B=400, C\)"):
        cascade_curve(logits[:, :, 0], yv, head.nesting)
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must be in \(0, 1\)"):
        cascade_curve(logits, yv, head.nesting, val_fraction=1.0)


def test_classifier_errors(digits_head: Any) -> None:
    head, zv, yv, _, _ = digits_head
    with pytest.raises(RuntimeError, match=r"not fitted yet: call fit\(x_val, y_val\)"):
        AdaptiveClassifier(head, head.nesting).predict(zv)
    with pytest.raises(ValueError, match=r"y has 3 labels but x has 400 inputs"):
        AdaptiveClassifier(head, head.nesting).fit(zv, yv[:3])
    with pytest.raises(ValueError, match=r"confidence='entropy' is not known"):
        AdaptiveClassifier(head, head.nesting, confidence="entropy").fit(zv, yv)
    with pytest.raises(ValueError, match=r"differs from the head's.*pass nesting=model.nesting"):
        AdaptiveClassifier(head, Nesting([4, 64])).fit(zv, yv)
    with pytest.raises(
        TypeError, match=r"nesting=\[2, 64\] is a list: pass a Nesting, e.g. Nesting\(\[2, 64\]\)"
    ):
        AdaptiveClassifier(head, [2, 64]).fit(zv, yv)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"target_accuracy=2.0 must be in \[0, 1\]"):
        AdaptiveClassifier(head, head.nesting, target_accuracy=2.0).fit(zv, yv)
    with pytest.raises(ValueError, match=r"confidence='x' is not known"):
        confidence_scores(np.zeros((2, 3)), "x")


def test_a_memory_mapped_corpus_stays_mapped(tmp_path: Path) -> None:
    path = tmp_path / "corpus.npy"
    np.save(path, CORPUS)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(open_corpus(mapped), np.memmap)
    fr = FunnelRetriever(8, 50, progress=False).fit(mapped)
    # the full-size rerank matrix is read from the file, not held in memory
    assert fr.mapped_bytes == CORPUS.nbytes
    assert fr.nbytes < CORPUS.nbytes
