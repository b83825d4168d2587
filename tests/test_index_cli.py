"""``mrl index build --kind funnel`` and ``mrl search`` on the saved funnel, against exact numpy search.

The corpus is clustered (``tests.helpers.clustered``), the queries are drawn from the same clusters
and are not corpus rows. With ``k' = N`` every shortlist holds the whole corpus, so the funnel's
answer must be the exact top-k of the rerank matrix's rows, whatever the shortlist engine or code;
with an approximate shortlist the recall against exact search is measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import clustered, run_cli

N, D, M_S, K = 1500, 64, 16, 10
FLAT_BACKENDS = ["exact", "faiss-flat", "binary", "sq8", "rabitq"]  # return every row at k' = N


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A folder with ``x.npy`` ``(N, D)`` and ``q.npy`` ``(25, D)`` (drawn together, split)."""
    folder = tmp_path_factory.mktemp("funnel-cli")
    both = clustered(N + 25, D, seed=11)
    x, q = both[:N], both[N:]
    np.save(folder / "x.npy", x)
    np.save(folder / "q.npy", q)
    return folder, x, q


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The rows a rerank matrix of ``dtype`` stands for, encoded here independently: float16
    rounding, or int8 codes ``rint(x / s)`` with ``s = max|x| / 127`` per row, decoded."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "int8":
        s = np.abs(x).max(axis=1, keepdims=True) / 127.0
        return np.clip(np.rint(x / s), -127, 127) * s
    return x.astype(np.float64)


def _exact(x: np.ndarray, q: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` in float64 numpy: scores and ids, both ``(Q, k)``."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ xn.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def _build(folder: Path, out: Path, *flags: str) -> int:
    argv = ["index", "build", str(folder / "x.npy"), "--kind", "funnel", "--dim", str(M_S)]
    return run_cli([*argv, "--model-name", "toy", "--out", str(out), "--no-progress", *flags])


def _search(folder: Path, index: Path, *flags: str) -> tuple[int, dict[str, np.ndarray]]:
    hits = folder / "hits.npz"
    hits.unlink(missing_ok=True)
    argv = ["search", "--index", str(index), "--queries", str(folder / "q.npy"), "--k", str(K)]
    code = run_cli([*argv, "--model-name", "toy", "--out", str(hits), *flags])
    return code, (dict(np.load(hits)) if code == 0 else {})


@pytest.mark.parametrize("backend", FLAT_BACKENDS)
def test_full_shortlist_is_exact_for_every_engine(
    data: tuple[Path, np.ndarray, np.ndarray], backend: str
) -> None:
    """Build -> save -> ``mrl search`` loads it: at ``k' = N`` the exact float32 top-10."""
    folder, x, q = data
    out = folder / f"{backend}.funnel"
    flags = ["--backend", backend, "--shortlist-k", str(N), "--rerank", "32", str(D)]
    assert _build(folder, out, *flags) == 0
    assert (out / "funnel.safetensors").is_file()
    code, hits = _search(folder, out)
    assert code == 0
    scores, ids = _exact(x, q)
    np.testing.assert_array_equal(hits["ids"], ids)
    np.testing.assert_allclose(hits["scores"], scores, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_rerank_dtype_scores_the_stored_rows(
    data: tuple[Path, np.ndarray, np.ndarray], dtype: str
) -> None:
    """A float16 / int8 rerank matrix inside the folder: the exact top-10 of the stored rows."""
    folder, x, q = data
    out = folder / f"{dtype}.funnel"
    flags = ["--backend", "binary", "--shortlist-k", str(N), "--rerank-dtype", dtype]
    assert _build(folder, out, *flags) == 0
    matrix = np.load(out / "rerank.npy", mmap_mode="r")
    assert (matrix.shape, str(matrix.dtype)) == ((N, D), dtype)
    code, hits = _search(folder, out)
    assert code == 0
    scores, ids = _exact(_stored(x, dtype), q)
    np.testing.assert_array_equal(hits["ids"], ids)
    np.testing.assert_allclose(hits["scores"], scores, atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, _exact(x, q)[1], strict=True)])
    assert recall >= 0.95  # and the rounded rows keep the float32 neighbours


@pytest.mark.parametrize("backend", ["faiss-hnsw", "binary-hnsw", "sq8", "sq8-hnsw"])
def test_short_shortlist_recall(data: tuple[Path, np.ndarray, np.ndarray], backend: str) -> None:
    """A real funnel: k' = 150 of N through the engine, rerank 32 -> 64; recall@10 vs exact."""
    folder, x, q = data
    out = folder / f"short-{backend}.funnel"
    flags = ["--backend", backend, "--shortlist-k", "150", "--rerank", "32", str(D)]
    assert _build(folder, out, *flags, "--keep", "40") == 0
    code, hits = _search(folder, out)
    assert code == 0
    recall = np.mean(
        [len(set(a) & set(b)) / K for a, b in zip(hits["ids"], _exact(x, q)[1], strict=True)]
    )
    assert recall >= 0.9


def test_float32_matrix_is_referenced_or_copied(
    data: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """By default the float32 rerank matrix is the corpus file (memory-mapped, checksummed);
    ``--copy-matrix`` makes the folder self-contained."""
    folder, x, q = data
    corpus = tmp_path / "x.npy"
    corpus.write_bytes((folder / "x.npy").read_bytes())
    (tmp_path / "q.npy").write_bytes((folder / "q.npy").read_bytes())
    argv = ["index", "build", str(corpus), "--kind", "funnel", "--dim", str(M_S)]
    argv += ["--model-name", "toy", "--shortlist-k", str(N), "--no-progress"]
    assert run_cli([*argv, "--out", str(tmp_path / "ref.funnel")]) == 0
    out = capsys.readouterr().out
    assert f"{4 * D} B/vector memory-mapped (float32 rerank matrix)" in out
    assert run_cli([*argv, "--out", str(tmp_path / "copy.funnel"), "--copy-matrix"]) == 0
    assert not (tmp_path / "ref.funnel" / "rerank.npy").exists()
    assert (tmp_path / "copy.funnel" / "rerank.npy").is_file()
    corpus.unlink()
    capsys.readouterr()
    assert _search(tmp_path, tmp_path / "ref.funnel")[0] == 2
    assert f"{corpus} is missing" in capsys.readouterr().err
    code, hits = _search(tmp_path, tmp_path / "copy.funnel")
    assert code == 0
    np.testing.assert_array_equal(hits["ids"], _exact(x, q)[1])


@pytest.mark.parametrize("backend", ["binary", "sq8-hnsw"])
def test_search_changes_k_and_beam_of_a_saved_funnel(
    data: tuple[Path, np.ndarray, np.ndarray], backend: str
) -> None:
    """``mrl search --shortlist-k / --ef-search`` on a saved funnel: nothing is rebuilt, and
    with k' = N (and a beam as wide) every row is reranked, so the answer is exact."""
    folder, x, q = data
    out = folder / f"narrow-{backend}.funnel"
    assert _build(folder, out, "--backend", backend, "--shortlist-k", "20") == 0
    wide = ["--shortlist-k", str(N)]
    if backend == "sq8-hnsw":
        wide += ["--ef-search", str(2 * N)]
    code, hits = _search(folder, out, *wide)
    assert code == 0
    np.testing.assert_array_equal(hits["ids"], _exact(x, q)[1])


def test_search_checks_model_and_dimension_of_a_funnel(
    data: tuple[Path, np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, q = data
    out = folder / "checks.funnel"
    assert _build(folder, out, "--backend", "binary", "--shortlist-k", "100") == 0
    capsys.readouterr()
    argv = ["search", "--index", str(out), "--queries", str(folder / "q.npy")]
    assert run_cli([*argv, "--model-name", "other"]) == 2
    assert "was built from model 'toy' but the queries come from 'other'" in capsys.readouterr().err
    np.save(folder / "q16.npy", q[:, :M_S])
    short = ["search", "--index", str(out), "--queries", str(folder / "q16.npy")]
    assert run_cli([*short, "--model-name", "toy"]) == 2
    err = capsys.readouterr().err
    assert "the queries have dimension 16 but the funnel's corpus holds 64-d vectors" in err
    assert run_cli([*argv, "--model-name", "toy", "--funnel-corpus", str(folder / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "is a funnel over its own rerank matrix: drop --funnel-corpus" in err
    assert run_cli([*argv, "--model-name", "toy", "--ef-search", "64"]) == 2
    assert "ef_search=64 applies to a graph shortlist" in capsys.readouterr().err
    assert run_cli([*argv, "--model-name", "toy", "--rerank", "32", str(D)]) == 2
    assert "rerank size 32 has no precomputed factors" in capsys.readouterr().err
    # unknown model: refused unless --allow-model-mismatch, as for index files
    unknown = folder / "unknown.funnel"
    argv_u = ["index", "build", str(folder / "x.npy"), "--kind", "funnel", "--no-progress"]
    assert run_cli([*argv_u, "--out", str(unknown), "--shortlist-k", "50"]) == 0
    capsys.readouterr()
    assert run_cli(["search", "--index", str(unknown), "--queries", str(folder / "q.npy")]) == 2
    assert "does not record its model" in capsys.readouterr().err
    search_u = ["search", "--index", str(unknown), "--queries", str(folder / "q.npy")]
    assert run_cli([*search_u, "--allow-model-mismatch", "--out", str(folder / "u.npz")]) == 0


def test_corrupted_funnel_is_refused(
    data: tuple[Path, np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, _ = data
    out = folder / "corrupt.funnel"
    assert _build(folder, out, "--shortlist-k", "100", "--rerank-dtype", "int8") == 0
    matrix = out / "rerank.npy"
    raw = bytearray(matrix.read_bytes())
    raw[-1] ^= 0xFF
    matrix.write_bytes(bytes(raw))
    capsys.readouterr()
    assert _search(folder, out)[0] == 2
    assert "does not match its checksum in the funnel header" in capsys.readouterr().err


def test_funnel_flag_errors(
    data: tuple[Path, np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _, _ = data
    x_npy = str(folder / "x.npy")
    index_out = str(folder / "plain.index")
    assert run_cli(["index", "build", x_npy, "--rerank-dtype", "int8", "--out", index_out]) == 2
    assert "--rerank-dtype applies to a funnel: pass --kind funnel" in capsys.readouterr().err
    assert not Path(index_out).exists()
    db = ["--backend", "milvus", "--uri", str(folder / "db.db")]
    assert run_cli(["index", "build", x_npy, "--kind", "funnel", *db]) == 2
    assert "--kind funnel saves a funnel artefact" in capsys.readouterr().err
    (folder / "a-file").write_text("x")
    assert _build(folder, folder / "a-file") == 2
    assert "is a file: a funnel is saved as a folder" in capsys.readouterr().err
    assert (
        _build(folder, folder / "bad.funnel", "--shortlist-k", "100", "--rerank", "64", "32") == 2
    )
    assert "must be strictly increasing sizes" in capsys.readouterr().err


def test_index_kind_and_search_time_funnel_unchanged(
    data: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """``--kind index`` (the default) still writes one index file, and ``mrl search
    --funnel-corpus`` still builds a funnel at search time (k' default 200)."""
    folder, x, q = data
    idx = folder / "x16.index"
    argv = ["index", "build", str(folder / "x.npy"), "--dim", str(M_S), "--model-name", "toy"]
    assert run_cli([*argv, "--out", str(idx), "--no-progress"]) == 0
    assert idx.is_file()
    code, hits = _search(folder, idx, "--funnel-corpus", str(folder / "x.npy"))
    assert code == 0
    recall = np.mean(
        [len(set(a) & set(b)) / K for a, b in zip(hits["ids"], _exact(x, q)[1], strict=True)]
    )
    assert recall >= 0.9
