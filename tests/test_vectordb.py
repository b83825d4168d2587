"""Contract tests of the database funnels (Milvus Lite, PostgreSQL + pgvector) against exact search.

Both engines are real: pgserver's PostgreSQL (with pgvector) in a temp folder on a local socket,
and Milvus Lite on a temp file; each starts once per module and is stopped at the end.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matryoshka.retrieval.funnel import FunnelRetriever, FunnelSpec, recall_vs_reference
from matryoshka.retrieval.index import NO_SCORE, ExactIndex
from matryoshka.retrieval.vectordb import DatabaseFunnel, open_vectordb
from tests.helpers import have, pgserver_url, run_cli

N, D, M_S = 1200, 64, 16

Opener = Callable[..., DatabaseFunnel]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Clustered corpus ``(N, D)`` and held-out queries ``(20, D)`` (HNSW needs structure)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((30, D)).astype(np.float32)
    x = centers[rng.integers(0, 30, N)] + 0.5 * rng.standard_normal((N, D)).astype(np.float32)
    q = centers[rng.integers(0, 30, 20)] + 0.5 * rng.standard_normal((20, D)).astype(np.float32)
    return x, q


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A private temp folder (not under pytest's numbered folders, which concurrent pytest runs
    of the same user prune while a server may still be using them)."""
    path = Path(tempfile.mkdtemp(prefix="mrl-vectordb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_url(scratch: Path) -> Iterator[str]:
    with pgserver_url(scratch / "pg") as url:
        yield url


@pytest.fixture(scope="module")
def milvus_uri(scratch: Path) -> str:
    if not have("pymilvus", "milvus_lite"):
        pytest.skip("pymilvus/milvus-lite not installed: pip install 'matryoshka[milvus]'")
    return str(scratch / "corpus.db")


@pytest.fixture(scope="module", params=["pgvector", "milvus"])
def opener(request: pytest.FixtureRequest) -> Opener:
    """``opener(name, **kwargs)`` opens a store of the parametrised backend."""
    backend = request.param
    uri = request.getfixturevalue("pg_url" if backend == "pgvector" else "milvus_uri")

    def open_(name: str, **kwargs: Any) -> DatabaseFunnel:
        kwargs.setdefault("progress", False)
        return open_vectordb(backend, uri, name, **kwargs)

    return open_


@pytest.fixture(scope="module")
def corpus_store(opener: Opener, data: tuple[np.ndarray, np.ndarray]) -> Iterator[DatabaseFunnel]:
    x, _ = data
    store = opener("corpus", dim=D, shortlist_size=M_S, model_name="test-model", batch_size=500)
    if store.ntotal == 0:
        store.add(x)
    yield store
    store.close()


@pytest.fixture(scope="module")
def exact(data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, q = data
    return ExactIndex(D).add(x).search(q, 10)


# -- the funnel against exact search ------------------------------------------------------------
@pytest.mark.parametrize("rerank", [None, (32, D)])
def test_full_shortlist_is_exact(
    corpus_store: DatabaseFunnel,
    data: tuple[np.ndarray, np.ndarray],
    exact: tuple[np.ndarray, np.ndarray],
    rerank: tuple[int, ...] | None,
) -> None:
    """k' = corpus size: the shortlist holds everything, so the result is the exact top-k."""
    x, q = data
    corpus_store.shortlist_k, corpus_store.rerank = N, rerank
    scores, ids = corpus_store.search(q, 10)
    assert scores.shape == ids.shape == (20, 10)
    assert scores.dtype == np.float32
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, exact[1])
    np.testing.assert_allclose(scores, exact[0], atol=1e-5)
    # the same funnel in memory (FunnelRetriever, exact shortlist) gives the same answer
    fr = FunnelRetriever(M_S, N, rerank).fit(x)
    np.testing.assert_array_equal(fr.search(q, 10)[1], ids)


def test_hnsw_shortlist_recall(
    corpus_store: DatabaseFunnel,
    data: tuple[np.ndarray, np.ndarray],
    exact: tuple[np.ndarray, np.ndarray],
) -> None:
    """A short shortlist through the ANN index: recall@10 measured against exact search."""
    x, q = data
    corpus_store.shortlist_k, corpus_store.rerank = 100, None
    _, ids = corpus_store.search(q, 10)
    recall = recall_vs_reference(ids, exact[1])
    exact_shortlist = recall_vs_reference(
        FunnelRetriever(M_S, 100).fit(x).search(q, 10)[1], exact[1]
    )
    assert recall >= 0.9
    assert recall >= exact_shortlist - 0.05  # the ANN index loses little against a flat shortlist


def test_single_query_and_k_above_count(
    opener: Opener, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    with opener("tiny", dim=D, shortlist_size=M_S) as store:
        store.drop()
    with opener("tiny", dim=D, shortlist_size=M_S) as store:
        scores, ids = store.search(q[0], 5)  # empty store: no results, FAISS conventions
        assert ids.tolist() == [[-1] * 5]
        assert scores[0, 0] == NO_SCORE
        store.add(x[:3])
        scores, ids = store.search(q[0], 5)
        assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
        assert ids[0, 3:].tolist() == [-1, -1]
        store.drop()


def test_store_funnel_is_the_shared_spec(
    corpus_store: DatabaseFunnel,
    data: tuple[np.ndarray, np.ndarray],
    exact: tuple[np.ndarray, np.ndarray],
) -> None:
    """The store's funnel is a FunnelSpec: the same validation and keep rule as FunnelRetriever,
    and an explicit keep that never narrows below N until the last stage is still exact."""
    x, q = data
    try:
        corpus_store.shortlist_k, corpus_store.rerank, corpus_store.keep = N, [32, D], [N]
        assert corpus_store.spec == FunnelSpec(M_S, N, (32, D), (N,)).validate(D)
        fr = FunnelRetriever(M_S, N, (32, D), keep=(N,)).fit(x)
        assert corpus_store.keeps(10) == fr.keeps(10) == (N, N, 10)
        scores, ids = corpus_store.search(q, 10)
        np.testing.assert_array_equal(ids, exact[1])
        np.testing.assert_allclose(scores, exact[0], atol=1e-5)
        corpus_store.keep = (5,)
        with pytest.raises(ValueError, match=r"keep=\[5\] must decrease from shortlist_k=1200"):
            corpus_store.search(q, 10)
        corpus_store.keep = (50, 20)
        with pytest.raises(ValueError, match=r"keep=\[50, 20\] has 2 counts but rerank=\[32, 64\]"):
            corpus_store.search(q, 10)
        corpus_store.keep, corpus_store.shortlist_k = None, 5
        # the store used to clamp here (a funnel widening to (5, 10, 10)); now the funnel's error
        with pytest.raises(ValueError, match=r"k=10 is larger than shortlist_k=5: .*>= k"):
            corpus_store.keeps(10)
    finally:
        corpus_store.shortlist_k, corpus_store.rerank, corpus_store.keep = 100, None, None


# -- upsert, delete, reopen ----------------------------------------------------------------------
def test_upsert_and_delete(opener: Opener, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    store = opener("mutable", dim=D, shortlist_size=M_S)
    store.drop()
    store.close()
    store = opener("mutable", dim=D, shortlist_size=M_S)
    store.shortlist_k = 50
    assert store.add(x[:100]).tolist() == list(range(100))
    assert store.add(x[100:110]).tolist() == list(range(100, 110))  # continues after the largest
    with pytest.raises(ValueError, match=r"already in .* use upsert"):
        store.add(x[:2], ids=[5, 1000])
    # replace item 7 with item 50's vector: a query at x[50] now finds both 7 and 50 on top
    store.upsert(x[50:51], ids=[7])
    _, ids = store.search(x[50], 2)
    assert sorted(ids[0].tolist()) == [7, 50]
    store.upsert(x[200:202], ids=[7, 500])  # one replaced, one new
    assert store.ntotal == 111
    assert store.search(x[201], 1)[1][0, 0] == 500
    assert store.delete([7, 500, 12345]) == 2
    assert store.ntotal == 109
    _, ids = store.search(x[200], 10)
    assert 7 not in ids
    assert 500 not in ids
    assert store.delete([]) == 0
    store.drop()
    store.close()


def test_reopen_gives_same_results(
    opener: Opener, corpus_store: DatabaseFunnel, data: tuple[np.ndarray, np.ndarray]
) -> None:
    _, q = data
    corpus_store.shortlist_k, corpus_store.rerank = 100, (32, D)
    before = corpus_store.search(q, 10)
    with opener("corpus", model_name="test-model", shortlist_k=100, rerank=(32, D)) as again:
        assert (again.dim, again.shortlist_size, again.normalize) == (D, M_S, True)
        assert again.header()["model_name"] == "test-model"
        after = again.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_pgvector_survives_server_restart(
    scratch: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """Stop PostgreSQL, start it again on the same data folder: the same results."""
    if not have("pgserver", "psycopg", "pgvector"):
        pytest.skip("pgserver/psycopg/pgvector not installed: pip install 'matryoshka[pgvector]'")
    import pgserver

    from matryoshka.retrieval.vectordb.pgvector import PgvectorFunnel

    x, q = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(scratch / "restart", cleanup_mode="stop")
    with PgvectorFunnel(server.get_uri(), "r", dim=D, shortlist_size=M_S, progress=False) as s:
        s.add(x[:300])
        before = s.search(q, 5)
    server.cleanup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(scratch / "restart", cleanup_mode="stop")
    try:
        with PgvectorFunnel(server.get_uri(), "r", progress=False) as s:
            after = s.search(q, 5)
    finally:
        server.cleanup()
    np.testing.assert_array_equal(after[1], before[1])


# -- errors --------------------------------------------------------------------------------------
def test_header_mismatches(opener: Opener, corpus_store: DatabaseFunnel) -> None:
    with pytest.raises(ValueError, match=r"model_name='other' but .* holds embeddings of model"):
        opener("corpus", model_name="other")
    with pytest.raises(ValueError, match=r"dim=128 but .* holds vectors of size d=64"):
        opener("corpus", dim=128)
    with pytest.raises(ValueError, match=r"shortlist_size=32 but .* prefixes of size m_s=16"):
        opener("corpus", shortlist_size=32)
    with pytest.raises(ValueError, match=r"normalize=False but .* built with normalize=True"):
        opener("corpus", normalize=False)
    with pytest.raises(ValueError, match="does not exist: pass dim"):
        opener("never_created")


def test_bad_arguments(opener: Opener, corpus_store: DatabaseFunnel) -> None:
    with pytest.raises(ValueError, match=r"vectors.shape=\(2, 48\) but .* size d=64"):
        corpus_store.add(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match=r"queries.shape=\(3, 100\) but .* size d=64"):
        corpus_store.search(np.zeros((3, 100), np.float32), 10)
    with pytest.raises(ValueError, match="NaN or inf"):
        corpus_store.upsert(np.full((1, D), np.nan, np.float32), ids=[0])
    with pytest.raises(ValueError, match="ids has 1 entries but vectors has 2 rows"):
        corpus_store.upsert(np.zeros((2, D), np.float32), ids=[3])
    with pytest.raises(ValueError, match="ids must be >= 0"):
        corpus_store.delete([-1])
    with pytest.raises(ValueError, match="duplicates"):
        corpus_store.upsert(np.zeros((2, D), np.float32), ids=[3, 3])
    corpus_store.shortlist_k = 5
    with pytest.raises(ValueError, match="k=10 is larger than shortlist_k=5"):
        corpus_store.search(np.zeros((1, D), np.float32), 10)
    corpus_store.shortlist_k, corpus_store.rerank = 50, (64, 32)
    with pytest.raises(ValueError, match="strictly increasing sizes"):
        corpus_store.search(np.zeros((1, D), np.float32), 10)
    corpus_store.rerank = None
    with pytest.raises(ValueError, match="shortlist_size=80 is larger than dim=64"):
        opener("fresh", dim=D, shortlist_size=80)
    with pytest.raises(ValueError, match="is not a valid name"):
        opener("bad-name; drop table x", dim=D, shortlist_size=M_S)


def test_unreachable_pgvector() -> None:
    if not have("psycopg", "pgvector"):
        pytest.skip("psycopg/pgvector not installed: pip install 'matryoshka[pgvector]'")
    from matryoshka.retrieval.vectordb.pgvector import PgvectorFunnel

    url = "postgresql://mrl:secret@127.0.0.1:1/db"
    with pytest.raises(ConnectionError, match=r"cannot connect to PostgreSQL at .*mrl:\*\*\*@"):
        PgvectorFunnel(url, "t", dim=D, shortlist_size=M_S, connect_timeout=2)


def test_unreachable_milvus(tmp_path: Path) -> None:
    if not have("pymilvus", "milvus_lite"):
        pytest.skip("pymilvus/milvus-lite not installed: pip install 'matryoshka[milvus]'")
    from matryoshka.retrieval.vectordb.milvus import MilvusFunnel

    with pytest.raises(ConnectionError, match="cannot connect to Milvus at uri='http://127"):
        MilvusFunnel("http://127.0.0.1:1", "t", dim=D, shortlist_size=M_S, timeout=2)
    with pytest.raises(ConnectionError, match=r"cannot connect to Milvus .* existing folder"):
        MilvusFunnel(str(tmp_path / "missing" / "x.db"), "t", dim=D, shortlist_size=M_S)


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("pymilvus", "matryoshka.retrieval.vectordb.milvus"),
        ("psycopg", "matryoshka.retrieval.vectordb.pgvector"),
    ],
)
def test_missing_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    backend = "milvus" if "milvus" in extra else "pgvector"
    with pytest.raises(ImportError, match=rf"pip install 'matryoshka\[{backend}\]'"):
        open_vectordb(backend, "unused", "t", dim=D, shortlist_size=M_S)
    with pytest.raises(ValueError, match="backend='faiss' is not a vector database"):
        open_vectordb("faiss", "unused", "t")


# -- CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pgvector", "milvus"])
def test_cli_build_and_search(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    data: tuple[np.ndarray, np.ndarray],
    exact: tuple[np.ndarray, np.ndarray],
    backend: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = request.getfixturevalue("pg_url" if backend == "pgvector" else "milvus_uri")
    x, q = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    db = ["--backend", backend, "--uri", uri, "--collection", "cli_corpus"]
    build = ["index", "build", str(tmp_path / "x.npy"), "--dim", str(M_S), "--quiet"]
    assert run_cli([*build, *db, "--model-name", "cli-model"]) == 0
    out = tmp_path / "hits.npz"
    search = ["search", "--queries", str(tmp_path / "q.npy"), "--k", "10", "--out", str(out)]
    assert run_cli([*search, *db, "--shortlist-k", str(N), "--rerank", "32", str(D)]) == 0
    np.testing.assert_array_equal(np.load(out)["ids"], exact[1])
    capsys.readouterr()
    assert run_cli([*search, *db, "--model-name", "other"]) == 2
    assert "holds embeddings of model 'cli-model'" in capsys.readouterr().err
    assert run_cli([*build, *db, "--model-name", "cli-model"]) == 2  # the store exists
    err = capsys.readouterr().err
    assert f"already exists; it is complete, with {N} rows" in err
    assert "pass --overwrite to drop it and rebuild" in err
    assert run_cli([*search, "--backend", backend]) == 2
    assert "needs --uri" in capsys.readouterr().err
    with open_vectordb(backend, uri, "cli_corpus") as store:
        store.drop()


# -- the header's model check, without a database ------------------------------------------------
class _HeaderOnly(DatabaseFunnel):
    """Just enough of a backend to run :meth:`DatabaseFunnel._setup` on a stored header."""

    backend = "fake"
    name = "t"

    def __init__(self, stored: dict[str, Any] | None, **kwargs: Any) -> None:
        self._setup(stored, "fake store 't'", hnsw_m=16, ef_construction=64, **kwargs)

    ntotal = 0

    def _next_id(self) -> int:
        return 0

    def _write(self, x: np.ndarray, ids: np.ndarray, upsert: bool) -> None: ...

    def _delete(self, ids: np.ndarray) -> int:
        return 0

    def _search(self, *args: Any) -> None: ...

    def _store_header(self) -> None: ...

    def _present(self, n: int) -> np.ndarray:
        return np.zeros(0, np.int64)

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros((0, 8), np.float32)

    def _write_batch(self, x: np.ndarray, ids: np.ndarray) -> None: ...

    def _finish(self, n: int) -> None: ...

    def close(self) -> None: ...

    def drop(self) -> None: ...


def _stored(model_name: str) -> dict[str, Any]:
    header = _HeaderOnly(None, dim=8, shortlist_size=4, model_name=model_name, normalize=None)
    return header.header()


def test_header_of_another_model_is_refused_unless_allowed() -> None:
    common = {"dim": None, "shortlist_size": None, "normalize": None}
    stored = _stored("minilm")
    with pytest.raises(ValueError, match=r"model_name='bge' but fake store 't' holds .*'minilm'"):
        _HeaderOnly(stored, model_name="bge", **common)
    with pytest.warns(UserWarning, match="Opening it anyway"):
        store = _HeaderOnly(stored, model_name="bge", allow_model_mismatch=True, **common)
    assert store.model_name == "minilm"
    assert _HeaderOnly(stored, model_name="minilm", **common).model_name == "minilm"
    unknown = _stored("unknown")
    assert unknown["model_name"] == "unknown"
    with pytest.raises(ValueError, match=r"does not record its model \(model_name 'unknown'\)"):
        _HeaderOnly(unknown, model_name="bge", **common)
    with pytest.raises(ValueError, match=r"dim=16 but"):  # the size checks stay
        _HeaderOnly(stored, model_name="minilm", **{**common, "dim": 16})
