"""Index backends: every result compared with naive brute force; save/load and its failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matryoshka.retrieval.index import (
    NO_SCORE,
    ExactIndex,
    FaissIndex,
    VectorIndex,
    add_in_chunks,
    import_faiss,
    load_index,
    make_index,
)
from tests.helpers import clustered, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_search(x: np.ndarray, q: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force on unit-normalised size-m prefixes, float64, full sort."""
    xs = x[:, :m].astype(np.float64)
    qs = q[:, :m].astype(np.float64)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    s = qs @ xs.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(
        np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(ids, ref, strict=True)])
    )


X = clustered(3000, 48, seed=0)
Q = clustered(60, 48, seed=1)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
@pytest.mark.parametrize("memory_limit", [256 * 2**20, 4 * 1000])  # one block / many blocks
def test_exact_matches_brute_force(engine: str, memory_limit: int) -> None:
    index = ExactIndex(16, engine=engine, memory_limit=memory_limit)
    index.add(X[:1000]).add(X[1000:])  # ids continue across adds
    scores, ids = index.search(Q, 10)
    ref_s, ref_i = naive_search(X, Q, 16, 10)
    assert ids.dtype == np.int64
    assert scores.dtype == np.float32
    assert recall(ids, ref_i) == 1.0
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first


def test_exact_pads_missing_results_like_faiss() -> None:
    index = make_index("exact", 8).add(X[:3])
    scores, ids = index.search(Q[:2], 5)
    assert ids.shape == (2, 5)
    assert np.all(ids[:, 3:] == -1)
    assert np.all(scores[:, 3:] == NO_SCORE)
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]


def test_raw_inner_product_without_normalize() -> None:
    index = make_index("exact", 48, normalize=False).add(X)
    scores, ids = index.search(Q, 5)
    s = Q.astype(np.float64) @ X.T.astype(np.float64)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :5]
    assert recall(ids, ref) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(s, ref, 1), rtol=1e-4, atol=1e-4)


def test_faiss_flat_is_exact() -> None:
    index = make_index("faiss-flat", 16).add(X)
    scores, ids = index.search(Q, 10)
    ref_s, ref_i = naive_search(X, Q, 16, 10)
    assert recall(ids, ref_i) == 1.0
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_faiss_hnsw_recall_on_clustered_vectors() -> None:
    index = make_index("faiss-hnsw", 32, hnsw_m=16, ef_construction=80, ef_search=64).add(X)
    _, ids = index.search(Q, 10)
    _, ref = naive_search(X, Q, 32, 10)
    assert recall(ids, ref) >= 0.95


def test_faiss_ivf_recall_and_full_probe_is_exact() -> None:
    index = make_index("faiss-ivf", 32, nlist=20, nprobe=8).add(X)
    _, ids = index.search(Q, 10)
    _, ref = naive_search(X, Q, 32, 10)
    assert recall(ids, ref) >= 0.9
    assert isinstance(index, FaissIndex)
    index.nprobe = 20  # every cell visited: exact
    _, ids = index.search(Q, 10)
    assert recall(ids, ref) == 1.0


def test_ivf_needs_enough_training_vectors() -> None:
    with pytest.raises(ValueError, match=r"nlist=50.*add more"):
        make_index("faiss-ivf", 8, nlist=50).add(X[:10])


@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"])
def test_save_load_round_trip(tmp_path: Path, backend: str) -> None:
    params: dict[str, Any] = {"nlist": 16} if backend == "faiss-ivf" else {}
    index = make_index(backend, 24, model_name="minilm", **params).add(X)
    before = index.search(Q, 7)
    path = index.save(tmp_path / "sub" / "idx.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["idx.safetensors"]  # no temp file left
    loaded = load_index(path, model_name="minilm", dim=24, normalize=True)
    assert type(loaded) is type(index)
    assert (loaded.backend, loaded.dim, loaded.ntotal) == (backend, 24, 3000)
    after = loaded.search(Q, 7)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0])
    assert loaded.header() == index.header()


def test_load_rejects_wrong_model_size_and_normalisation(tmp_path: Path) -> None:
    path = make_index("exact", 16, model_name="minilm").add(X).save(tmp_path / "i.st")
    with pytest.raises(ValueError, match=r"model_name='bert'.*built from model 'minilm'"):
        load_index(path, model_name="bert")
    with pytest.raises(ValueError, match=r"dim=32 but .* size m=16.*--dim 32"):
        load_index(path, dim=32)
    with pytest.raises(ValueError, match=r"normalize=False but .* normalize=True"):
        load_index(path, normalize=False)


def test_load_detects_corruption(tmp_path: Path) -> None:
    path = make_index("exact", 16).add(X).save(tmp_path / "i.st")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # flip bits in the vector payload
    bad = tmp_path / "flipped.st"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checksum mismatch in 'vectors'.*corrupted"):
        load_index(bad)


def test_load_detects_truncation_and_garbage(tmp_path: Path) -> None:
    path = make_index("faiss-hnsw", 16).add(X).save(tmp_path / "i.st")
    cut = tmp_path / "cut.st"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"not a valid matryoshka index file.*truncated"):
        load_index(cut)
    junk = tmp_path / "junk.st"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"not a valid matryoshka index file"):
        load_index(junk)


def test_load_rejects_other_safetensors_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ValueError, match=r"no matryoshka index header"):
        load_index(other)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_index(tmp_path / "missing.st")


def test_user_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"backend='annoy' is not known"):
        make_index("annoy", 8)
    with pytest.raises(ValueError, match=r"dim=0 must be a positive int"):
        make_index("exact", 0)
    with pytest.raises(ValueError, match=r"engine='jax'"):
        ExactIndex(8, engine="jax")
    with pytest.raises(ValueError, match=r"kind='lsh'"):
        FaissIndex(8, kind="lsh")
    with pytest.raises(ValueError, match=r"model_name=''"):
        ExactIndex(8, model_name="")
    index = make_index("exact", 16)
    with pytest.raises(ValueError, match=r"index is empty \(ntotal=0\)"):
        index.search(Q, 3)
    index.add(X)
    with pytest.raises(ValueError, match=r"queries.shape=\(60, 8\).*at least 16"):
        index.search(Q[:, :8], 3)
    with pytest.raises(ValueError, match=r"vectors.shape=\(2, 3, 4\)"):
        index.add(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"k=0 must be a positive int"):
        index.search(Q, 0)


def test_missing_faiss_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'matryoshka\[faiss\]'"):
        import_faiss()
    with pytest.raises(ImportError, match=r"matryoshka\[faiss\]"):
        make_index("faiss-hnsw", 8)
    assert isinstance(make_index("exact", 8), VectorIndex)  # exact needs no faiss


def test_single_vector_query_and_empty_batch() -> None:
    index = make_index("exact", 16).add(X)
    _, i1 = index.search(Q[0], 4)
    _, i2 = index.search(Q[:1], 4)
    np.testing.assert_array_equal(i1, i2)
    s0, i0 = index.search(np.zeros((0, 48), np.float32), 4)
    assert s0.shape == i0.shape == (0, 4)


def test_add_in_chunks_equals_one_add(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # the chunks are read from the map
    chunked = add_in_chunks(make_index("exact", 16), mapped, step=700, progress=True)
    assert isinstance(chunked, ExactIndex)
    assert chunked.ntotal == 3000
    one = ExactIndex(16)
    one.add(X)
    np.testing.assert_array_equal(chunked.vectors, one.vectors)


def test_add_in_chunks_trains_ivf_on_a_full_first_chunk() -> None:
    # a 10-row step would train IVF on 10 vectors (< nlist): the step is raised to nlist
    index = add_in_chunks(make_index("faiss-ivf", 8, nlist=50), X, step=10)
    assert index.ntotal == 3000
    with pytest.raises(ValueError, match=r"step=0 must be a positive int"):
        add_in_chunks(make_index("exact", 8), X, step=0)


def test_cli_build_and_search_match_the_library(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "q.npy", Q)
    idx = tmp_path / "x.index"
    argv = ["index", "build", str(tmp_path / "x.npy"), "--dim", "16", "--model-name", "toy"]
    assert run_cli([*argv, "--out", str(idx), "--quiet"]) == 0
    out = tmp_path / "hits.npz"
    assert run_cli(["search", "--index", str(idx), "--queries", str(tmp_path / "q.npy"),
                 "--k", "5", "--out", str(out), "--model-name", "toy"]) == 0  # fmt: skip
    hits = np.load(out)
    _, ref = naive_search(X, Q, 16, 5)
    np.testing.assert_array_equal(hits["ids"], ref)
    # funnel through the CLI: k' = N reranked at the full size equals exact full-size search
    assert run_cli(["search", "--index", str(idx), "--queries", str(tmp_path / "q.npy"), "--k", "5",
                 "--funnel-corpus", str(tmp_path / "x.npy"), "--shortlist-k", "3000",
                 "--out", str(out)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(out)["ids"], naive_search(X, Q, 48, 5)[1])


def test_cli_errors_exit_2_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["index", "build", str(tmp_path / "none.npy")]) == 2
    assert "embeddings=" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", X)
    idx = tmp_path / "x.index"
    assert run_cli(["index", "build", str(tmp_path / "x.npy"), "--model-name", "a", "--out", str(idx),
                 "--quiet"]) == 0  # fmt: skip
    assert run_cli(["search", "--index", str(idx), "--model-name", "b"]) == 2
    assert "built from model 'a'" in capsys.readouterr().err
    assert run_cli(["search", "--index", str(idx)]) == 2
    assert "pass --queries Q.npy (batch) or --interactive" in capsys.readouterr().err


def test_load_index_model_override_warns(tmp_path: Path) -> None:
    path = make_index("exact", 8, model_name="a").add(X[:50]).save(tmp_path / "a.index")
    with pytest.raises(ValueError, match=r"allow_model_mismatch=True"):
        load_index(path, model_name="b")
    with pytest.warns(UserWarning, match=r"built from model 'a'.*Loading it anyway"):
        index = load_index(path, model_name="b", allow_model_mismatch=True)
    assert index.model_name == "a"
    unknown = make_index("exact", 8).add(X[:50]).save(tmp_path / "u.index")
    with pytest.raises(ValueError, match=r"does not record its model \(model_name 'unknown'\)"):
        load_index(unknown, model_name="b")
    with pytest.warns(UserWarning, match="anyway"), pytest.raises(ValueError, match="dim=16 but"):
        load_index(path, model_name="b", dim=16, allow_model_mismatch=True)  # size still checked


def test_cli_search_checks_model_and_dimension(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mrl search` exits 2 naming both models (from --model-name or the queries' sidecar) or
    both sizes; an index of model 'unknown' is refused; --allow-model-mismatch goes on."""
    import json

    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "q.npy", Q)
    idx, unknown = tmp_path / "x.index", tmp_path / "u.index"
    build = ["index", "build", str(tmp_path / "x.npy"), "--dim", "16", "--quiet"]
    assert run_cli([*build, "--model-name", "toy", "--out", str(idx)]) == 0
    assert run_cli([*build, "--out", str(unknown)]) == 0
    capsys.readouterr()
    search = ["search", "--queries", str(tmp_path / "q.npy"), "--k", "3"]
    assert run_cli([*search, "--index", str(idx), "--model-name", "other"]) == 2
    err = capsys.readouterr().err
    assert "built from model 'toy'" in err
    assert "'other'" in err
    assert "--allow-model-mismatch" in err
    (tmp_path / "q.json").write_text(json.dumps({"model": "sidecar-model", "adaptor": None}))
    assert run_cli([*search, "--index", str(idx)]) == 2  # the sidecar names the queries' model
    assert "come from 'sidecar-model'" in capsys.readouterr().err
    assert run_cli([*search, "--index", str(idx), "--allow-model-mismatch"]) == 0
    assert "warning:" in capsys.readouterr().err
    (tmp_path / "q.json").unlink()
    assert run_cli([*search, "--index", str(unknown)]) == 2
    assert "does not record its model" in capsys.readouterr().err
    assert run_cli([*search, "--index", str(unknown), "--allow-model-mismatch"]) == 0
    capsys.readouterr()
    np.save(tmp_path / "q8.npy", Q[:, :8])
    short = ["search", "--queries", str(tmp_path / "q8.npy"), "--index", str(idx)]
    assert run_cli(short) == 2
    err = capsys.readouterr().err
    assert "dimension 8" in err
    assert "m=16" in err
    funnel = ["--funnel-corpus", str(tmp_path / "x.npy"), "--shortlist-k", "50"]
    np.save(tmp_path / "q24.npy", Q[:, :24])
    assert run_cli(["search", "--queries", str(tmp_path / "q24.npy"), "--index", str(idx),
                    *funnel]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "dimension 24" in err
    assert f"{X.shape[1]}-d" in err


def test_index_build_takes_the_model_from_the_embeddings_sidecar(tmp_path: Path) -> None:
    x = clustered(300, 16, seed=5)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.json").write_text(json.dumps({"model": "mini-lm", "adaptor": None}))
    idx = tmp_path / "x.index"
    assert (
        run_cli(["index", "build", str(tmp_path / "x.npy"), "--out", str(idx), "--no-progress"])
        == 0
    )
    assert load_index(idx).model_name == "mini-lm"
    np.save(tmp_path / "q.npy", x[:4])
    (tmp_path / "q.json").write_text(json.dumps({"model": "mini-lm", "adaptor": None}))
    hits = tmp_path / "hits.npz"
    assert (
        run_cli(
            [
                "search",
                "--index",
                str(idx),
                "--queries",
                str(tmp_path / "q.npy"),
                "--out",
                str(hits),
            ]
        )
        == 0
    )
    assert (np.load(hits)["ids"][:, 0] == np.arange(4)).all()
