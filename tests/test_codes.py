"""Quantized shortlist backends (binary, binary-hnsw, sq8, sq8-hnsw, rabitq) against independent numpy
computations of the same codes, their save/load round trip, and their funnels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matryoshka.retrieval.codes import (
    BinaryIndex,
    RaBitQIndex,
    SQ8Index,
    make_code_index,
    sign_codes,
    sq8_codes,
)
from matryoshka.retrieval.funnel import FunnelRetriever, recall_vs_reference
from matryoshka.retrieval.index import (
    BACKENDS,
    CODE_BACKENDS,
    NO_SCORE,
    load_index,
    make_index,
)
from tests.helpers import clustered

pytestmark = pytest.mark.usefixtures("one_thread")

D, M = 48, 20  # corpus size, shortlist prefix (not a multiple of 8: padding bits are tested)
CORPUS = clustered(1500, D, seed=0)
QUERIES = clustered(40, D, seed=1)


def unit_prefix(x: np.ndarray, m: int) -> np.ndarray:
    p = x[:, :m].astype(np.float64)
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def check_topk(scores: np.ndarray, ids: np.ndarray, ref: np.ndarray, k: int) -> None:
    """``(scores, ids)`` are a correct top-``k`` of the full score matrix ``ref`` ``(Q, N)``:
    the scores are the ``k`` best (ties allowed in any order) and each id has its score."""
    best = -np.sort(-ref, axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), scores, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_code_backends_are_registered() -> None:
    assert set(CODE_BACKENDS) <= set(BACKENDS)
    for backend in CODE_BACKENDS:
        assert make_index(backend, M).backend == backend


def test_sign_codes_are_little_endian_sign_bits() -> None:
    x = np.array([[1.0, -1.0, 0.0, 2.0, -0.5, 3.0, 1.0, -1.0, 5.0]])
    assert sign_codes(x).tolist() == [[0b01101001, 0b1]]


def test_binary_equals_numpy_hamming() -> None:
    index = make_index("binary", M).add(CORPUS)
    assert isinstance(index, BinaryIndex)
    scores, ids = index.search(QUERIES, 15)
    # independent: sign bits (unpacked, no packing) and matching-bit counts in numpy
    xb = unit_prefix(CORPUS, M) > 0  # (N, m) bool
    qb = unit_prefix(QUERIES, M) > 0
    matching = (qb[:, None, :] == xb[None, :, :]).sum(-1).astype(np.float32)  # (Q, N)
    check_topk(scores, ids, matching, 15)
    assert index.nbytes < CORPUS.shape[0] * M  # ceil(20/8) = 3 bytes a vector, plus a header


def test_binary_hnsw_finds_the_hamming_neighbours() -> None:
    index = make_index("binary-hnsw", M, ef_search=256).add(CORPUS)
    scores, ids = index.search(QUERIES, 10)
    xb, qb = unit_prefix(CORPUS, M) > 0, unit_prefix(QUERIES, M) > 0
    matching = (qb[:, None, :] == xb[None, :, :]).sum(-1).astype(np.float32)
    np.testing.assert_allclose(np.take_along_axis(matching, ids, 1), scores)
    best = -np.sort(-matching, axis=1)[:, :10]
    assert np.mean(scores == best) > 0.95  # approximate, but close on 1500 codes


def test_sq8_equals_numpy_scalar_quantizer() -> None:
    index = make_index("sq8", M).add(CORPUS)
    assert isinstance(index, SQ8Index)
    vmin, vdiff = index.ranges()
    x = unit_prefix(CORPUS, M)
    # the trained range is the per-dimension min / max of the first batch
    np.testing.assert_allclose(vmin, x.min(0), atol=1e-6)
    np.testing.assert_allclose(vdiff, x.max(0) - x.min(0), atol=1e-6)
    codes = sq8_codes(x, vmin, vdiff)
    np.testing.assert_array_equal(codes, index.faiss_index.sa_encode(x))
    decoded = vmin + (codes.astype(np.float32) + 0.5) / 255.0 * vdiff  # (N, m)
    scores, ids = index.search(QUERIES, 15)
    check_topk(scores, ids, unit_prefix(QUERIES, M) @ decoded.T, 15)


def test_sq8_hnsw_searches_the_sq8_codes() -> None:
    """The graph holds the same codes as the flat ``sq8`` scan (same trained ranges): every
    returned score is the decoded dot of :func:`sq8_codes`, and a wide beam finds the flat
    scan's top-10."""
    index = make_index("sq8-hnsw", M, hnsw_m=16, ef_search=256).add(CORPUS)
    assert isinstance(index, SQ8Index)
    assert index.backend == "sq8-hnsw"
    vmin, vdiff = index.ranges()
    x = unit_prefix(CORPUS, M)
    np.testing.assert_allclose(vmin, x.min(0), atol=1e-6)
    np.testing.assert_allclose(vdiff, x.max(0) - x.min(0), atol=1e-6)
    decoded = vmin + (sq8_codes(x, vmin, vdiff).astype(np.float32) + 0.5) / 255.0 * vdiff
    ref = unit_prefix(QUERIES, M) @ decoded.T  # (Q, N), numpy
    scores, ids = index.search(QUERIES, 10)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), scores, rtol=1e-5, atol=1e-5)
    best = np.argsort(-ref, axis=1)[:, :10]
    assert recall_vs_reference(ids, best) > 0.95  # approximate, but close on 1500 codes
    # RAM: one byte a dimension plus the graph's links, far below float32 prefixes + links
    assert index.nbytes < CORPUS.shape[0] * (M + 8 * 16 + 64)


def rabitq_estimates(x: np.ndarray, q: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """1-bit RaBitQ inner-product estimates ``(Q, N)`` for float queries, in numpy: with
    ``r = x - c``, ``xbar = (2·[r > 0] - 1) / sqrt(m)`` and ``o = r / |r|``,
    ``<x, q> ~ |r| <xbar, q - c> / <xbar, o> + <r, c> + <q, c>``."""
    x, q, c = x.astype(np.float64), q.astype(np.float64), centre.astype(np.float64)
    r = x - c
    xbar = (2.0 * (r > 0) - 1.0) / np.sqrt(x.shape[1])
    norm = np.linalg.norm(r, axis=1)
    xo = (xbar * r).sum(1) / norm
    return (q - c) @ xbar.T * (norm / xo) + r @ c + (q @ c)[:, None]


def test_rabitq_equals_numpy_estimator() -> None:
    """RaBitQ (unrotated, float queries): the code bits are the signs of ``x - centroid`` and the
    scores are the RaBitQ estimates of :func:`rabitq_estimates`; the rotated default ranks well
    enough for a shortlist."""
    index = make_index("rabitq", M, rotate=False, qb=0).add(CORPUS)
    assert isinstance(index, RaBitQIndex)
    x = unit_prefix(CORPUS, M)
    raw = index.faiss_index
    centre = np.array([raw.center.at(i) for i in range(M)], np.float32)
    np.testing.assert_allclose(centre, x.mean(0), atol=1e-5)
    codes = raw.sa_encode(x)  # (N, code_size): sign bits first, then float factors
    np.testing.assert_array_equal(codes[:, : (M + 7) // 8], sign_codes(x - centre))
    scores, ids = index.search(QUERIES, 15)
    check_topk(scores, ids, rabitq_estimates(x, unit_prefix(QUERIES, M), centre), 15)
    _, exact = make_index("exact", M).add(CORPUS).search(QUERIES, 10)
    rotated = make_index("rabitq", M).add(CORPUS)  # rotate=True, qb=8 (the defaults)
    # top-100 of 1500 by 20-bit codes holds most of the exact top-10 (chance: 100/1500 = 0.07)
    assert recall_vs_reference(rotated.search(QUERIES, 100)[1], exact) > 0.6


@pytest.mark.parametrize("backend", CODE_BACKENDS)
def test_save_load_round_trip(tmp_path: Path, backend: str) -> None:
    index = make_index(backend, M, model_name="m").add(CORPUS)
    path = index.save(tmp_path / f"{backend}.index")
    again = load_index(path, model_name="m", dim=M)
    assert type(again) is type(index)
    assert again.params() == index.params()
    for a, b in zip(index.search(QUERIES, 10), again.search(QUERIES, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"dim=8 but the index .* holds prefixes of size m=20"):
        load_index(path, dim=8)


@pytest.mark.parametrize("backend", CODE_BACKENDS)
def test_fewer_vectors_than_k_are_padded(backend: str) -> None:
    index = make_index(backend, M).add(CORPUS[:30])
    scores, ids = index.search(QUERIES[:2], 40)
    assert (ids[:, 30:] == -1).all()
    assert (scores[:, 30:] == NO_SCORE).all()
    assert sorted(ids[0, :30].tolist()) == list(range(30))


@pytest.mark.parametrize("backend", CODE_BACKENDS)
def test_funnel_with_whole_corpus_shortlist_equals_exact(tmp_path: Path, backend: str) -> None:
    """k' = N: whatever the shortlist codes, the rerank sees every row and is exact."""
    n = 400
    path = tmp_path / "corpus.npy"
    np.save(path, CORPUS[:n])
    ref_s, ref_i = make_index("exact", D).add(CORPUS[:n]).search(QUERIES, 10)
    params = {"ef_search": 2 * n} if backend.endswith("-hnsw") else {}
    fr = FunnelRetriever(M, n, backend=backend, index_params=params).fit(path)
    scores, ids = fr.search(QUERIES, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_user_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"backend='sq8' takes no parameters but got \['qb'\]"):
        make_index("sq8", M, qb=4)
    with pytest.raises(ValueError, match=r"qb=9 must be an int in \[0, 8\]"):
        make_index("rabitq", M, qb=9)
    with pytest.raises(ValueError, match=r"kind='ivf' is not a binary index kind"):
        BinaryIndex(M, kind="ivf")
    with pytest.raises(ValueError, match=r"ef_search=0 must be a positive int"):
        make_index("binary-hnsw", M, ef_search=0)
    with pytest.raises(ValueError, match=r"backend='pq' is not a quantized backend"):
        make_code_index("pq", M)
    with pytest.raises(RuntimeError, match=r"not trained yet: add vectors first"):
        SQ8Index(M).ranges()
    with pytest.raises(ValueError, match=r"kind='ivf' is not a sq8 index kind"):
        SQ8Index(M, kind="ivf")
    with pytest.raises(ValueError, match=r"hnsw_m=0 must be a positive int"):
        make_index("sq8-hnsw", M, hnsw_m=0)
