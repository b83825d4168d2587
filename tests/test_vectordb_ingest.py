"""Crash-safe builds of the database funnels: a real ``kill -9`` of ``mrl index build`` mid-ingest.

Each test starts ``mrl index build --backend milvus|pgvector`` as a subprocess with small batches,
watches its progress bar on stderr, and sends SIGKILL once the first rows are written. Then, on
the real engines (Milvus Lite on a temp file, pgserver's PostgreSQL on a local socket): searching
is refused with the row counts and the commands that finish the build; a plain re-run is refused;
``--resume`` (the printed command) completes it with exactly the corpus's rows and the same
search results as an uninterrupted build; ``--overwrite`` rebuilds it. Faster library-level tests
cover the checks of a resume without a subprocess.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from matryoshka.retrieval.vectordb import (
    DatabaseFunnel,
    IncompleteStoreError,
    StoreExistsError,
    open_vectordb,
)
from tests.helpers import clustered, have, pgserver_url, run_cli

N, D, M_S, BATCH = 3000, 64, 16, 10
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A private temp folder (pytest's numbered folders are pruned by concurrent runs)."""
    path = Path(tempfile.mkdtemp(prefix="mrl-ingest-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def files(scratch: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """``x.npy`` ``(N, D)`` clustered corpus and ``q.npy`` ``(20, D)`` queries from the same
    clusters (drawn together, then split)."""
    both = clustered(N + 20, D, seed=3)
    x, q = both[:N], both[N:]
    np.save(scratch / "x.npy", x)
    np.save(scratch / "q.npy", q)
    return scratch / "x.npy", scratch / "q.npy", x, q


@pytest.fixture(scope="module")
def pg_url(scratch: Path) -> Iterator[str]:
    with pgserver_url(scratch / "pg") as url:
        yield url


@pytest.fixture(scope="module", params=["pgvector", "milvus"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "milvus" and not have("pymilvus", "milvus_lite"):
        pytest.skip("pymilvus/milvus-lite not installed: pip install 'matryoshka[milvus]'")
    return str(request.param)


@pytest.fixture(scope="module")
def uri_of(request: pytest.FixtureRequest, backend: str, scratch: Path) -> Callable[[str], str]:
    """``uri_of(collection)``: the module's PostgreSQL for every table, or one Milvus Lite file
    per collection (a Milvus Lite file is held by one process, and pymilvus keeps it open until
    the process exits, so each killed subprocess gets a file this process has not opened)."""
    if backend == "pgvector":
        url = str(request.getfixturevalue("pg_url"))
        return lambda collection: url
    return lambda collection: str(scratch / f"{backend}-{collection}.db")


def _db(backend: str, uri: str, collection: str) -> list[str]:
    return ["--backend", backend, "--uri", uri, "--collection", collection]


def _build(x_npy: Path, backend: str, uri: str, collection: str) -> list[str]:
    flags = ["--dim", str(M_S), "--model-name", "ingest-model"]
    return ["index", "build", str(x_npy), *flags, *_db(backend, uri, collection)]


def _kill_mid_build(argv: list[str]) -> int:
    """Run ``mrl ARGV`` in a subprocess and SIGKILL it once its progress bar shows rows written
    but not all; the rows it showed last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    cmd = [sys.executable, "-m", "matryoshka.cli", *argv, "--batch-size", str(BATCH)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert proc.stderr is not None
    seen, text = 0, ""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
            if not chunk:
                break  # the build ended before we saw rows: reported below
            text += chunk
            shown = [int(n) for n in re.findall(rf"\| *(\d+)/{N} \[", text)]
            if shown and 0 < shown[-1] < N:
                seen = shown[-1]
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and not seen:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert seen, f"the build was not caught mid-ingest (exit {proc.returncode}):\n{text[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.fixture(scope="module")
def reference(
    files: tuple[Path, Path, np.ndarray, np.ndarray], backend: str, uri_of: Callable[[str], str]
) -> np.ndarray:
    """An uninterrupted build's ids ``(Q, 10)`` through the HNSW index (``k' = 200``)."""
    x_npy, q_npy, x, q = files
    uri = uri_of("reference")
    assert run_cli([*_build(x_npy, backend, uri, "reference"), "--no-progress"]) == 0
    ids = _search(q_npy, backend, uri, "reference", "200")
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(ids, _exact_top10(x, q), strict=True)]
    )
    assert recall >= 0.9  # a real shortlist through the index, not noise
    return ids


def _search(q_npy: Path, backend: str, uri: str, collection: str, shortlist_k: str) -> np.ndarray:
    out = Path(tempfile.mkdtemp(prefix="mrl-hits-")) / "hits.npz"
    argv = ["search", "--queries", str(q_npy), "--k", "10", "--out", str(out)]
    argv += ["--model-name", "ingest-model", "--shortlist-k", shortlist_k]
    assert run_cli([*argv, *_db(backend, uri, collection)]) == 0
    ids = np.load(out)["ids"]
    shutil.rmtree(out.parent)
    return ids


def _exact_top10(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Independent exact cosine top-10 in numpy: ``(Q, 10)`` ids."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :10]


def _has_ann_index(store: DatabaseFunnel) -> bool:
    """Whether the store's table/collection has its HNSW index, asked of the database itself."""
    if store.backend == "pgvector":
        rows = store._conn.execute(  # type: ignore[attr-defined]
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s", (store.name,)
        ).fetchall()
        return any("hnsw" in r[0] for r in rows)
    return "short_prefix" in store._client.list_indexes(store.name)  # type: ignore[attr-defined]


# -- the kill tests ------------------------------------------------------------------------------
def test_killed_build_is_refused_then_resumed(
    files: tuple[Path, Path, np.ndarray, np.ndarray],
    backend: str,
    uri_of: Callable[[str], str],
    reference: np.ndarray,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x_npy, q_npy, x, _ = files
    uri = uri_of("killed")
    build = _build(x_npy, backend, uri, "killed")
    seen = _kill_mid_build(build)
    with open_vectordb(backend, uri, "killed") as store:
        rows = store.ntotal  # what the killed build left
        assert seen <= rows <= N
        assert not store.complete
        assert store.expected_rows == N
        assert not _has_ann_index(store)  # built once, after the last row
    capsys.readouterr()

    # searching is refused, with the counts and the two commands that finish the build
    search = ["search", "--queries", str(q_npy), "--k", "10", "--model-name", "ingest-model"]
    assert run_cli([*search, *_db(backend, uri, "killed")]) == 2
    err = capsys.readouterr().err
    assert f"is incomplete: {rows} of {N} rows were written and its HNSW index is not built" in err
    resume_cmd = re.search(r"Finish it with\n  (mrl index build .*) --resume\n", err)
    assert resume_cmd is not None, err
    assert f"{resume_cmd.group(1)} --overwrite" in err
    assert str(x_npy) in resume_cmd.group(1)  # the build recorded its source file

    # a plain re-run of the build is refused and names both flags
    assert run_cli([*build, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"its build is incomplete, {rows} of {N} rows: pass --resume" in err
    assert "pass --overwrite to drop it and rebuild" in err

    # the printed command with --resume completes it: exactly the corpus, indexed, searchable
    argv = shlex.split(resume_cmd.group(1))[1:]
    assert run_cli([*argv, "--resume", "--no-progress"]) == 0
    assert f"{N} items" in capsys.readouterr().out
    with open_vectordb(backend, uri, "killed") as store:
        assert store.complete
        assert store.ntotal == N
        assert _has_ann_index(store)
        np.testing.assert_array_equal(store._present(N + 100), np.arange(N))  # no id twice
        np.testing.assert_array_equal(store._fetch(np.arange(N)), x)  # every row as in the file
    # the same answers through the HNSW index as a build that was never killed
    np.testing.assert_array_equal(_search(q_npy, backend, uri, "killed", "200"), reference)
    # resuming a complete build changes nothing
    assert run_cli([*argv, "--resume", "--no-progress"]) == 0
    assert f"{N} items" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_build_overwrites(
    files: tuple[Path, Path, np.ndarray, np.ndarray],
    backend: str,
    uri_of: Callable[[str], str],
    reference: np.ndarray,
) -> None:
    """``--overwrite`` after a real kill (the fast library test below overwrites a store left
    incomplete without a subprocess)."""
    x_npy, q_npy, x, _ = files
    uri = uri_of("killed_again")
    build = _build(x_npy, backend, uri, "killed_again")
    _kill_mid_build(build)
    assert run_cli([*build, "--overwrite", "--no-progress"]) == 0
    with open_vectordb(backend, uri, "killed_again") as store:
        assert store.complete
        assert store.ntotal == N
        np.testing.assert_array_equal(store._fetch(np.arange(N)), x)
    np.testing.assert_array_equal(_search(q_npy, backend, uri, "killed_again", "200"), reference)


# -- the checks of a resume, in the library ------------------------------------------------------
def _interrupted(backend: str, uri: str, name: str, x: np.ndarray, rows: int) -> DatabaseFunnel:
    """A store as a killed ``ingest`` leaves it: marked incomplete for ``len(x)`` rows, the
    first ``rows`` written, no ANN index."""
    store = open_vectordb(
        backend, uri, name, dim=D, shortlist_size=M_S, progress=False, overwrite=True
    )
    store.header_.update(complete=False, expected_rows=len(x), source="x.npy")
    store._store_header()
    store._write_batch(x[:rows], np.arange(rows))
    return store


def test_incomplete_store_refuses_writes_and_checks_a_resume(
    files: tuple[Path, Path, np.ndarray, np.ndarray], backend: str, uri_of: Callable[[str], str]
) -> None:
    _, _, x, q = files
    uri = uri_of("lib")
    xs = x[:400]
    with _interrupted(backend, uri, "lib", xs, 150) as store:
        for call in (lambda: store.search(q, 5), lambda: store.add(xs[:2])):
            with pytest.raises(IncompleteStoreError, match="is incomplete: 150 of 400 rows"):
                call()
        with pytest.raises(IncompleteStoreError, match=r"ingest\(vectors, resume=True\)"):
            store.upsert(xs[:1], ids=[0])
    with open_vectordb(backend, uri, "lib", progress=False) as store:
        with pytest.raises(StoreExistsError, match=r"already exists \(incomplete: 150 of 400"):
            store.ingest(xs)
        with pytest.raises(ValueError, match="being built from 400 rows but vectors has 399"):
            store.ingest(xs[:399], resume=True)
        with pytest.raises(ValueError, match=r"row \d+ in .* differs from vectors\[\d+\]"):
            store.ingest(xs + 1, resume=True)
        with pytest.raises(ValueError, match=r"vectors.shape=\(400, 32\) but .* size d=64"):
            store.ingest(xs[:, :32], resume=True)
    with (
        open_vectordb(backend, uri, "lib", progress=False, hnsw_m=8) as store,
        pytest.raises(ValueError, match="started with hnsw_m=32 but hnsw_m=8 was given"),
    ):
        store.ingest(xs, resume=True)
    with open_vectordb(backend, uri, "lib", progress=False) as store:
        store.ingest(xs, resume=True)
        assert store.complete
        assert store.ntotal == 400
        store.shortlist_k = 400
        np.testing.assert_array_equal(store.search(q, 10)[1], _exact_top10(xs, q))
        with pytest.raises(StoreExistsError, match=r"already exists \(complete, 400 rows\)"):
            store.ingest(xs)  # a complete store is refused by a plain ingest too


def test_failed_ingest_in_process_leaves_it_incomplete(
    files: tuple[Path, Path, np.ndarray, np.ndarray], backend: str, uri_of: Callable[[str], str]
) -> None:
    """An ingest that stops on an error (a NaN row in the fourth batch) leaves whole batches and
    the store marked incomplete; the same handle then refuses a plain ingest (no id twice)."""
    _, _, x, q = files
    uri = uri_of("lib_failed")
    bad = x[:400].copy()
    bad[333, 5] = np.nan
    with open_vectordb(
        backend, uri, "lib_failed", dim=D, shortlist_size=M_S, batch_size=100, progress=False
    ) as store:
        store.drop()
    with open_vectordb(
        backend, uri, "lib_failed", dim=D, shortlist_size=M_S, batch_size=100, progress=False
    ) as store:
        with pytest.raises(ValueError, match="NaN or inf"):
            store.ingest(bad)
        assert (store.complete, store.ntotal, store.expected_rows) == (False, 300, 400)
        with pytest.raises(IncompleteStoreError, match="300 of 400 rows"):
            store.search(q, 5)
        with pytest.raises(StoreExistsError, match=r"incomplete: 300 of 400 rows"):
            store.ingest(bad)
        store.ingest(x[:400], resume=True)
        assert (store.complete, store.ntotal) == (True, 400)
        store.drop()


def test_overwrite_rebuilds_an_incomplete_store(
    files: tuple[Path, Path, np.ndarray, np.ndarray], backend: str, uri_of: Callable[[str], str]
) -> None:
    _, _, x, q = files
    uri = uri_of("lib_overwrite")
    _interrupted(backend, uri, "lib_overwrite", x[:400], 150).close()
    with open_vectordb(backend, uri, "lib_overwrite", progress=False) as store:
        assert not store.complete
    # other sizes too: overwrite does not check the old header, it drops the store
    with open_vectordb(
        backend, uri, "lib_overwrite", dim=D, shortlist_size=8, overwrite=True, progress=False
    ) as store:
        assert (store.ntotal, store.shortlist_size, store.complete) == (0, 8, True)
        store.ingest(x[200:500])  # a new (empty) store: a plain ingest
        assert (store.ntotal, store.expected_rows, store.complete) == (300, 300, True)
        store.shortlist_k = 300
        np.testing.assert_array_equal(store.search(q, 10)[1], _exact_top10(x[200:500], q))
        store.drop()


def test_overwrite_refuses_a_foreign_store(backend: str, uri_of: Callable[[str], str]) -> None:
    """``overwrite`` drops only stores written by matryoshka."""
    uri = uri_of("lib")
    with open_vectordb(backend, uri, "foreign", dim=D, shortlist_size=M_S) as store:
        store.header_ = {"format": "someone-else"}
        store._store_header()
    with pytest.raises(ValueError, match="was not written by matryoshka"):
        open_vectordb(backend, uri, "foreign", dim=D, shortlist_size=M_S, overwrite=True)
    with pytest.raises(ValueError, match="was not written by matryoshka"):
        open_vectordb(backend, uri, "foreign")


def test_cli_flag_errors(
    files: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    x_npy = files[0]
    argv = ["index", "build", str(x_npy), "--backend", "milvus", "--uri", str(tmp_path / "f.db")]
    assert run_cli([*argv, "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err
    out = ["--out", str(tmp_path / "x.index")]
    assert run_cli(["index", "build", str(x_npy), "--resume", *out]) == 2
    assert "--resume applies to --backend milvus|pgvector" in capsys.readouterr().err
    assert not (tmp_path / "x.index").exists()


def test_finish_command_hides_the_password(
    files: tuple[Path, Path, np.ndarray, np.ndarray],
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The commands printed for an incomplete table never show the URL's password (pgserver
    trusts local connections, so a URL with one connects as well)."""
    _, q_npy, x, _ = files
    url = pg_url.replace("postgres:@", "postgres:s3cret@")
    assert url != pg_url
    _interrupted("pgvector", url, "secret_t", x[:200], 100).close()
    capsys.readouterr()
    assert run_cli(["search", "--queries", str(q_npy), *_db("pgvector", url, "secret_t")]) == 2
    err = capsys.readouterr().err
    assert "is incomplete: 100 of 200 rows" in err
    assert "--uri 'postgresql://postgres:***@" in err
    assert "(put the password back in --uri)" in err
    assert "s3cret" not in err
    # --interactive is refused on opening, before it reads a query from stdin
    assert run_cli(["search", "--interactive", *_db("pgvector", url, "secret_t")]) == 2
    assert "is incomplete: 100 of 200 rows" in capsys.readouterr().err
    with open_vectordb("pgvector", url, "secret_t") as store:
        store.drop()
