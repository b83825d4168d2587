"""The funnel's rerank matrix (precomputed prefix norms, float32/float16/int8, memory-mapped) and
the funnel saved as one checked artefact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matryoshka.retrieval.funnel import (
    HEADER_FILE,
    MATRIX_FILE,
    SHORTLIST_FILE,
    FunnelRetriever,
    rerank_candidates,
)
from matryoshka.retrieval.index import make_index
from matryoshka.retrieval.prefixes import RERANK_DTYPES, PrefixMatrix
from tests.helpers import clustered

pytestmark = pytest.mark.usefixtures("one_thread")

D = 64
CORPUS = clustered(1200, D, seed=0)
QUERIES = clustered(30, D, seed=1)
CHAIN = (16, 32, D)
#: max |score - float32 cosine| of each stored dtype (unit-scale clustered data)
TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "int8": 3e-2}


def cosines(x: np.ndarray, q: np.ndarray, m: int) -> np.ndarray:
    """float64 cosines of the size-``m`` prefixes: ``(N, d), (Q, d) -> (Q, N)``."""
    xm, qm = x[:, :m].astype(np.float64), q[:, :m].astype(np.float64)
    xm /= np.linalg.norm(xm, axis=1, keepdims=True)
    qm /= np.linalg.norm(qm, axis=1, keepdims=True)
    return qm @ xm.T


@pytest.mark.parametrize("dtype", RERANK_DTYPES)
def test_factors_are_inverse_prefix_norms_of_the_stored_rows(dtype: str) -> None:
    pm = PrefixMatrix.build(CORPUS, CHAIN, dtype=dtype, step=500)  # chunked build
    assert pm.factors.shape == (CORPUS.shape[0], len(CHAIN))
    assert pm.factors.dtype == np.float32
    assert pm.matrix.dtype == np.dtype(dtype)
    decoded = pm.decode(np.arange(CORPUS.shape[0]))
    np.testing.assert_allclose(decoded, CORPUS, atol=TOLERANCE[dtype] * np.abs(CORPUS).max())
    for j, m in enumerate(CHAIN):
        norms = np.linalg.norm(decoded[:, :m].astype(np.float64), axis=1)
        # the dot products are of the stored rows, so the row scale is part of the factor
        np.testing.assert_allclose(pm.factors[:, j], pm.scale / norms, rtol=1e-5)
    if dtype == "int8":  # per-row scale: the largest |x| of each row maps to 127
        np.testing.assert_array_equal(np.abs(pm.matrix).max(1), 127)
    raw = PrefixMatrix.build(CORPUS, CHAIN, dtype=dtype, normalize=False)
    np.testing.assert_array_equal(raw.factors, np.repeat(raw.scale[:, None], len(CHAIN), 1))


def test_float32_kernel_equals_the_renormalising_kernel() -> None:
    """The precomputed-norm rerank gives today's results: same ids, scores to float rounding."""
    pm = PrefixMatrix.build(CORPUS, CHAIN)
    assert pm.matrix is CORPUS  # a float32 corpus is read as it is, never copied
    cand = np.stack(
        [np.random.default_rng(i).permutation(CORPUS.shape[0])[:300] for i in range(30)]
    )
    keeps = (300, 120, 40, 10)
    ref_s, ref_i = rerank_candidates(QUERIES, cand, CORPUS, CHAIN, keeps, batch_size=7)
    s, i = rerank_candidates(
        QUERIES, cand, pm.matrix, CHAIN, keeps, batch_size=7, factors=pm.factors_for(CHAIN)
    )
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)
    for normalize in (True, False):
        pm = PrefixMatrix.build(CORPUS, (D,), normalize=normalize)
        ref = rerank_candidates(QUERIES, cand, CORPUS, (D,), (300, 10), normalize=normalize)
        got = rerank_candidates(
            QUERIES, cand, CORPUS, (D,), (300, 10), normalize=normalize, factors=pm.factors
        )
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)


def test_direct_dot_kernel_equals_the_gathering_kernel() -> None:
    """float32 rows are scored by FAISS straight from the matrix (no gathered copy); a matrix it
    cannot read directly (a strided view) is gathered instead: same ids, same scores, and ``-1``
    candidates (padding) never come back, in both kernels and in a numpy computation."""
    wide = np.concatenate([CORPUS, CORPUS[:, :8]], axis=1)  # (N, D + 8)
    view = wide[:, :D]  # the same rows, not C-contiguous
    assert not view.flags.c_contiguous
    pm = PrefixMatrix.build(CORPUS, CHAIN)
    rng = np.random.default_rng(3)
    cand = np.stack([rng.permutation(CORPUS.shape[0])[:60] for _ in range(30)])
    cand[:, 50:] = -1  # 10 padded slots per query
    keeps = (60, 25, 12, 5)
    fast = rerank_candidates(QUERIES, cand, CORPUS, CHAIN, keeps, factors=pm.factors)
    slow = rerank_candidates(QUERIES, cand, view, CHAIN, keeps, factors=pm.factors)
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-6)
    assert (fast[1] >= 0).all()
    for q, (row_s, row_i) in enumerate(zip(*fast, strict=True)):
        np.testing.assert_allclose(
            row_s, cosines(CORPUS[row_i], QUERIES[q : q + 1], D)[0], atol=1e-6
        )
        assert set(row_i.tolist()) <= set(cand[q, :50].tolist())


@pytest.mark.parametrize("dtype", RERANK_DTYPES)
def test_funnel_rerank_from_a_mapped_matrix(tmp_path: Path, dtype: str) -> None:
    """k' = N through a memory-mapped matrix of each dtype: float32 is exact search; float16 and
    int8 score every returned row within the stated tolerance of its float32 cosine and keep
    nearly all of the exact top-10."""
    path = tmp_path / "corpus.npy"
    np.save(path, CORPUS)
    n = CORPUS.shape[0]
    ref_s, ref_i = make_index("exact", D).add(CORPUS).search(QUERIES, 10)
    fr = FunnelRetriever(8, n, CHAIN, keep=(n, n), rerank_dtype=dtype, rerank_path=None)
    if dtype != "float32":
        fr.rerank_path = tmp_path / f"rerank.{dtype}.npy"
    fr.fit(path)
    assert isinstance(fr.prefixes_.matrix, np.memmap)
    assert fr.mapped_bytes == n * D * np.dtype(dtype).itemsize
    assert fr.nbytes == fr.index_.nbytes + fr.prefixes_.nbytes
    scores, ids = fr.search(QUERIES, 10)
    true = np.take_along_axis(cosines(CORPUS, QUERIES, D), ids, 1)
    np.testing.assert_allclose(scores, true, atol=TOLERANCE[dtype])
    if dtype == "float32":
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    else:
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_i, strict=True)])
        assert overlap >= 0.9
    assert fr.rerank_bytes_per_query(10) == n * sum(CHAIN) * np.dtype(dtype).itemsize


def test_funnel_reuses_a_prefix_matrix_and_checks_it() -> None:
    pm = PrefixMatrix.build(CORPUS, (16, 32, D))
    fr = FunnelRetriever(8, 100, (32, D), prefixes=pm).fit(CORPUS)
    assert fr.prefixes_ is pm
    ref = FunnelRetriever(8, 100, (32, D)).fit(CORPUS).search(QUERIES, 10)
    np.testing.assert_array_equal(fr.search(QUERIES, 10)[1], ref[1])
    with pytest.raises(ValueError, match=r"rerank size 48 has no precomputed factors"):
        FunnelRetriever(8, 100, (48,), prefixes=pm).fit(CORPUS)
    with pytest.raises(ValueError, match=r"prefixes holds a \(1200, 64\) matrix but the corpus"):
        FunnelRetriever(8, 100, prefixes=pm).fit(CORPUS[:100])
    with pytest.raises(ValueError, match=r"prefixes.normalize=True but normalize=False"):
        FunnelRetriever(8, 100, prefixes=pm, normalize=False).fit(CORPUS)


def test_prefix_and_kernel_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rerank_dtype='bfloat16' is not supported: use one of"):
        FunnelRetriever(8, 20, rerank_dtype="bfloat16").fit(CORPUS)
    path = tmp_path / "c.npy"
    np.save(path, CORPUS)
    with pytest.raises(ValueError, match=r"is the corpus file itself: give another path"):
        FunnelRetriever(8, 20, rerank_dtype="int8", rerank_path=path).fit(path)
    pm = PrefixMatrix.build(CORPUS, (D,))
    with pytest.raises(ValueError, match=r"factors.shape=\(1200, 1\) but .* has 2 stages"):
        rerank_candidates(
            QUERIES, np.zeros((30, 5), np.int64), CORPUS, (32, D), (5, 5, 3), factors=pm.factors
        )


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize(
    ("backend", "dtype"), [("exact", "float32"), ("binary", "int8"), ("sq8", "float16")]
)
def test_save_load_round_trip(tmp_path: Path, backend: str, dtype: str) -> None:
    fr = FunnelRetriever(
        16, 200, CHAIN, keep=(100, 40), backend=backend, rerank_dtype=dtype, model_name="mini"
    ).fit(CORPUS)
    folder = fr.save(tmp_path / "funnel")
    assert {p.name for p in folder.iterdir()} == {HEADER_FILE, SHORTLIST_FILE, MATRIX_FILE}
    again = FunnelRetriever.load(folder, model_name="mini")
    assert again.spec_ == fr.spec_
    assert again.prefixes_.dtype == dtype
    assert isinstance(again.prefixes_.matrix, np.memmap)
    np.testing.assert_array_equal(again.prefixes_.factors, fr.prefixes_.factors)
    for a, b in zip(fr.search(QUERIES, 10), again.search(QUERIES, 10), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_with_params_reuses_the_index_and_matrix(dtype: str) -> None:
    """A fitted funnel with another k', chain and beam: the same shortlist graph and rerank
    matrix (nothing rebuilt), the original untouched; k' = N with a beam as wide is exact."""
    n = CORPUS.shape[0]
    fr = FunnelRetriever(
        16, 20, (32, D), backend="sq8-hnsw", rerank_dtype=dtype, progress=False
    ).fit(CORPUS)
    wide = fr.with_params(shortlist_k=n, rerank=(D,), ef_search=2 * n)
    assert wide.prefixes_ is fr.prefixes_
    assert getattr(wide.index_, "faiss_index") is getattr(fr.index_, "faiss_index")  # noqa: B009
    assert (fr.spec_.shortlist_k, fr.chain_) == (20, (32, D))
    assert getattr(fr.index_, "ef_search") != 2 * n  # noqa: B009
    stored = fr.prefixes_.decode(np.arange(n))
    ref = np.argsort(-cosines(stored, QUERIES, D), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(wide.search(QUERIES, 10)[1], ref)
    same = fr.with_params()
    np.testing.assert_array_equal(same.search(QUERIES, 10)[1], fr.search(QUERIES, 10)[1])
    with pytest.raises(ValueError, match=r"rerank size 48 has no precomputed factors"):
        fr.with_params(rerank=(48, D))
    exact = FunnelRetriever(16, 20, progress=False).fit(CORPUS)
    with pytest.raises(ValueError, match=r"ef_search=64 applies to a graph shortlist .* 'exact'"):
        exact.with_params(ef_search=64)


def test_save_references_a_mapped_corpus_unless_copied(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.npy"
    np.save(corpus, CORPUS)
    fr = FunnelRetriever(8, 100).fit(corpus)
    folder = fr.save(tmp_path / "ref")
    assert not (folder / MATRIX_FILE).exists()  # referenced, not copied
    again = FunnelRetriever.load(folder)
    assert isinstance(again.prefixes_.matrix, np.memmap)
    assert Path(str(again.prefixes_.matrix.filename)).resolve() == corpus.resolve()
    np.testing.assert_array_equal(again.search(QUERIES, 10)[1], fr.search(QUERIES, 10)[1])
    copied = fr.save(tmp_path / "copy", copy_matrix=True)
    assert (copied / MATRIX_FILE).read_bytes() == corpus.read_bytes()
    # the referenced corpus changes: the checksum catches it, naming the file
    np.save(corpus, CORPUS[::-1])
    with pytest.raises(ValueError, match=rf"{corpus.name} does not match its checksum"):
        FunnelRetriever.load(folder)
    FunnelRetriever.load(copied)  # the copy is unaffected


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    fr = FunnelRetriever(8, 100, rerank_dtype="float16", model_name="mini").fit(CORPUS)
    folder = fr.save(tmp_path / "f")
    with pytest.raises(ValueError, match=r"model_name='other' but the funnel .* model 'mini'"):
        FunnelRetriever.load(folder, model_name="other")
    with pytest.raises(FileNotFoundError, match=r"funnel.safetensors does not exist"):
        FunnelRetriever.load(tmp_path / "nowhere")
    # a flipped byte in the matrix: found by its checksum, or only its size when not verified
    matrix = folder / MATRIX_FILE
    data = bytearray(matrix.read_bytes())
    data[-5] ^= 0xFF
    matrix.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rerank.npy does not match its checksum"):
        FunnelRetriever.load(folder)
    FunnelRetriever.load(folder, verify_matrix=False)
    matrix.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=r"rerank.npy has \d+ bytes but the funnel header says"):
        FunnelRetriever.load(folder, verify_matrix=False)
    matrix.unlink()
    with pytest.raises(FileNotFoundError, match=r"rerank.npy is missing"):
        FunnelRetriever.load(folder)
    # the shortlist index and the header itself
    folder = fr.save(tmp_path / "g")
    shortlist = folder / SHORTLIST_FILE
    blob = bytearray(shortlist.read_bytes())
    blob[-3] ^= 0xFF
    shortlist.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"shortlist.index does not match its checksum"):
        FunnelRetriever.load(folder)
    other = FunnelRetriever(8, 100, model_name="mini").fit(CORPUS[:500]).save(tmp_path / "h")
    (folder / SHORTLIST_FILE).write_bytes((other / SHORTLIST_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"shortlist.index (has|does not)"):
        FunnelRetriever.load(folder)
    head = folder / HEADER_FILE
    head.write_bytes(head.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"funnel.safetensors is not a valid funnel header"):
        FunnelRetriever.load(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file: a funnel is saved as a folder"):
        fr.save(tmp_path / "file")


def test_save_rejects_two_models() -> None:
    index = make_index("exact", 8, model_name="a").add(CORPUS)
    fr = FunnelRetriever(8, 50, index=index, model_name="b").fit(CORPUS)
    with pytest.raises(ValueError, match=r"model_name='b' but the shortlist index was built"):
        fr.save("/nonexistent-never-written")
