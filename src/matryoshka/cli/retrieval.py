"""``mrl index build`` and ``mrl search``: indexes over prefixes and funnel retrieval.

(The retrieval benchmark is a script of the source tree: ``python benchmarks/retrieval.py``.)

    mrl index build corpus.npy --dim 64 --backend faiss-hnsw --model-name all-MiniLM-L6-v2 \\
        --out corpus-64.index
    mrl search --index corpus-64.index --queries q.npy --k 10 --out hits.jsonl
    mrl search --index corpus-64.index --queries q.npy --funnel-corpus corpus.npy \\
        --shortlist-k 200 --rerank 384        # funnel: shortlist from the index, rerank at 384
    mrl search --index corpus-64.index --interactive   # one vector per stdin line

A funnel saved as one artefact (:class:`~matryoshka.retrieval.funnel.FunnelRetriever`): a
shortlist index on the ``--dim`` prefix (any ``--backend``: exact, FAISS, or the quantized codes
binary / binary-hnsw / sq8 / sq8-hnsw / rabitq), ``k'``, the rerank chain, and the full-size rerank matrix
memory-mapped (``--rerank-dtype float32|float16|int8``):

    mrl index build corpus.npy --kind funnel --dim 64 --backend binary --shortlist-k 400 \
        --rerank 128 384 --rerank-dtype int8 --model-name all-MiniLM-L6-v2 --out corpus.funnel
    mrl search --index corpus.funnel --queries q.npy --k 10 --out hits.jsonl

Vector databases (the funnel runs inside them; see :mod:`matryoshka.retrieval.vectordb`):

    mrl index build corpus.npy --backend milvus --uri ./corpus.db --collection wordnet --dim 64
    mrl index build corpus.npy --backend pgvector --uri postgresql://u:p@host/db --dim 64
    mrl index build corpus.npy --backend milvus ... --resume     # finish an interrupted build
    mrl index build corpus.npy --backend milvus ... --overwrite  # drop and rebuild
    mrl search --backend milvus --uri ./corpus.db --collection wordnet --queries q.npy \\
        --shortlist-k 200 --rerank 128 384
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from matryoshka.cli.args import add_deprecated_alias, fail
from matryoshka.retrieval.index import (
    BACKENDS,
    EF_CONSTRUCTION,
    EF_SEARCH,
    HNSW_M,
    add_in_chunks,
    load_index,
    make_index,
)
from matryoshka.retrieval.prefixes import RERANK_DTYPES

DB_BACKENDS = (
    "milvus",
    "pgvector",
)  # funnel stores in vector databases (matryoshka.retrieval.vectordb)

__all__ = ["add_arguments", "cmd_index_build", "cmd_search"]


def _load_npy(path: str, name: str, mmap: bool = False) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}={path!r} does not exist: pass an (n, d) float .npy file.")
    arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(f"{name}={path!r} has shape {arr.shape}: pass an (n, d) matrix.")
    return arr


def _db_open(args: argparse.Namespace, **kwargs: Any) -> Any:
    """Open the ``--backend milvus|pgvector`` store named by ``--uri`` and ``--collection``."""
    from matryoshka.retrieval.vectordb import open_vectordb

    if not args.uri:
        raise ValueError(
            f"--backend {args.backend} needs --uri: a Milvus Lite file (./corpus.db), a Milvus "
            f"server (http://host:19530) or a PostgreSQL URL (postgresql://user:pass@host/db)."
        )
    return open_vectordb(args.backend, args.uri, args.collection, **kwargs)


def _db_build(args: argparse.Namespace) -> int:
    """``mrl index build --backend milvus|pgvector``: ingest ``(N, d)`` embeddings, ``m_s = --dim``.

    Crash-safe (:meth:`~matryoshka.retrieval.vectordb.DatabaseFunnel.ingest`): ids are row
    numbers; the store is marked complete only once every row is written and the HNSW index is
    built. An existing store needs ``--resume`` (continue from the rows written) or
    ``--overwrite`` (drop and rebuild)."""
    from matryoshka.retrieval.vectordb import StoreExistsError

    try:
        if args.resume and args.overwrite:
            raise ValueError(
                "--resume and --overwrite exclude each other: pass --resume to continue an "
                "interrupted build from the rows already written, or --overwrite to drop the "
                "store and rebuild it."
            )
        x = _load_npy(args.embeddings, "embeddings", mmap=True)
        store = _db_open(
            args,
            dim=x.shape[1],
            shortlist_size=args.dim if args.dim is not None else x.shape[1],
            model_name=_build_model_name(args),
            normalize=args.normalize,
            hnsw_m=args.hnsw_m,
            ef_construction=args.ef_construction,
            batch_size=min(args.batch_size, 8192),
            progress=args.progress,
            overwrite=args.overwrite,
        )
        with store:
            try:
                store.ingest(x, resume=args.resume, source=str(Path(args.embeddings).resolve()))
            except StoreExistsError as e:
                if e.complete:
                    state = f"it is complete, with {e.rows} rows: search it with `mrl search`, or"
                else:
                    state = (
                        f"its build is incomplete, {e.rows} of {e.expected} rows: pass --resume "
                        "to continue it from the rows already written (same embeddings and "
                        "options), or"
                    )
                raise ValueError(
                    f"{e.where} already exists; {state} pass --overwrite to drop it and rebuild."
                ) from None
            print(f"wrote {store.where}: {store.ntotal} items, {store}")
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as e:
        return fail(str(e))
    return 0


def _finish_command(e: Any) -> str:
    """The ``mrl index build`` command that finishes the incomplete store of ``e``
    (an :class:`~matryoshka.retrieval.vectordb.IncompleteStoreError`), from its header."""
    h = e.header
    words = ["mrl", "index", "build", h.get("source") or "EMBEDDINGS.npy"]
    words += ["--backend", e.backend, "--uri", e.uri, "--collection", e.name]
    words += ["--dim", str(h["shortlist_size"]), "--model-name", str(h["model_name"])]
    if not h["normalize"]:
        words.append("--no-normalize")
    if int(h["hnsw_m"]) != HNSW_M:
        words += ["--hnsw-m", str(h["hnsw_m"])]
    if int(h["ef_construction"]) != EF_CONSTRUCTION:
        words += ["--ef-construction", str(h["ef_construction"])]
    return shlex.join(words)


def _incomplete_message(e: Any) -> str:
    """``mrl search`` on an incomplete store: how many rows, and the commands that finish it."""
    command = _finish_command(e)
    return (
        f"{e.where} is incomplete: {e.rows} of {e.expected} rows were written and its HNSW "
        f"index is not built (its `mrl index build` was interrupted, or is still running), so "
        f"it cannot be searched. Finish it with\n  {command} --resume\n(continues from the "
        f"rows already written), or rebuild it with\n  {command} --overwrite"
        + ("\n(put the password back in --uri)" if ":***@" in e.uri else "")
    )


def _db_search(args: argparse.Namespace) -> Any:
    """The ``search`` function of the ``--backend milvus|pgvector`` store (funnel in the DB).

    The store refuses a header of another model than ``--model-name``; with
    ``--allow-model-mismatch`` it is opened unchecked and a mismatch is only a warning."""
    allow = bool(args.allow_model_mismatch)
    kwargs: dict[str, Any] = {"model_name": None if allow else args.model_name}
    kwargs["shortlist_k"] = args.shortlist_k if args.shortlist_k is not None else 200
    kwargs["rerank"] = tuple(args.rerank) if args.rerank else None
    if args.ef_search is not None:
        kwargs["ef_search"] = args.ef_search
    store = _db_open(args, **kwargs)
    store.check_complete()  # before the first query (--interactive reads them one by one)
    if allow and args.model_name and store.model_name != args.model_name:
        print(
            f"mrl search: warning: model_name={args.model_name!r} but {store.where} holds "
            f"embeddings of model {store.model_name!r}; searching anyway (--allow-model-mismatch).",
            file=sys.stderr,
        )
    return store.search


#: ``mrl index build`` flags that only a funnel (``--kind funnel``) takes
_FUNNEL_FLAGS = ("shortlist_k", "rerank", "keep", "rerank_dtype", "copy_matrix")


def _shortlist_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--backend``'s parameters from the command line (HNSW beams, IVF cells)."""
    if args.backend in ("faiss-hnsw", "binary-hnsw", "sq8-hnsw"):
        params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
        return {**params, "ef_search": args.ef_search}
    if args.backend == "faiss-ivf":
        return {"nlist": args.nlist, "nprobe": args.nprobe}
    return {}


def _funnel_build(args: argparse.Namespace) -> int:
    """``mrl index build --kind funnel``: shortlist index on the ``--dim`` prefix + rerank matrix,
    saved as one checked folder (:meth:`FunnelRetriever.save`)."""
    from matryoshka.retrieval.funnel import MATRIX_FILE, FunnelRetriever

    try:
        if args.backend in DB_BACKENDS:
            raise ValueError(
                f"--kind funnel saves a funnel artefact (a folder); --backend {args.backend} "
                f"builds the funnel inside the database: drop --kind funnel, or pick a shortlist "
                f"backend from {list(BACKENDS)}."
            )
        x = _load_npy(args.embeddings, "embeddings", mmap=True)  # checks the shape
        m_s = args.dim if args.dim is not None else int(x.shape[1])
        dtype = args.rerank_dtype or "float32"
        out = Path(args.out or Path(args.embeddings).with_suffix(f".m{m_s}.funnel"))
        if out.exists() and not out.is_dir():
            raise ValueError(
                f"--out {str(out)!r} is a file: a funnel is saved as a folder; give a folder "
                f"path (created if missing)."
            )
        fr = FunnelRetriever(
            m_s,
            args.shortlist_k if args.shortlist_k is not None else 200,
            tuple(args.rerank) if args.rerank else None,
            tuple(args.keep) if args.keep else None,
            backend=args.backend,
            index_params=_shortlist_params(args),
            normalize=args.normalize,
            model_name=_build_model_name(args),
            rerank_dtype=dtype,
            # a float32 matrix is the corpus file itself, read in place (or copied at save)
            rerank_path=None if dtype == "float32" else out / MATRIX_FILE,
            progress=args.progress,
        ).fit(args.embeddings)  # the path: fit maps it (an array would lose its file name)
        out = fr.save(out, copy_matrix=bool(args.copy_matrix))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e))
    n = fr.ntotal
    print(
        f"wrote {out}: {fr!r} over {n} vectors of size {fr.dim}, "
        f"{fr.nbytes / n:.0f} B/vector in memory + {fr.mapped_bytes / n:.0f} B/vector "
        f"memory-mapped ({fr.prefixes_.dtype} rerank matrix)"
    )
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    """``mrl index build``: embeddings ``.npy`` ``(N, d)`` -> saved index over prefixes ``:dim``
    (``--kind index``), a saved funnel (``--kind funnel``), or a vector-database store."""
    if args.kind == "funnel":
        return _funnel_build(args)
    given = [f"--{n.replace('_', '-')}" for n in _FUNNEL_FLAGS if getattr(args, n) is not None]
    if given:
        return fail(
            f"{', '.join(given)} applies to a funnel: pass --kind funnel to build one (a "
            f"shortlist index on the --dim prefix plus the rerank matrix), or drop "
            f"{', '.join(given)}."
        )
    if args.backend in DB_BACKENDS:
        return _db_build(args)
    if args.resume or args.overwrite:
        flag = "--resume" if args.resume else "--overwrite"
        return fail(
            f"{flag} applies to --backend milvus|pgvector: an index file is written whole "
            f"(atomically) once built, so a killed build leaves no file to resume; drop {flag}."
        )
    try:
        x = _load_npy(args.embeddings, "embeddings", mmap=True)
        dim = args.dim if args.dim is not None else x.shape[1]
        params = _shortlist_params(args)
        index = make_index(
            args.backend,
            dim,
            model_name=_build_model_name(args),
            normalize=args.normalize,
            **params,
        )
        add_in_chunks(index, x, step=args.batch_size, progress=args.progress, desc="index build")
        out = index.save(args.out or Path(args.embeddings).with_suffix(f".m{dim}.index"))
    except (ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e))
    print(f"wrote {out}: {index}")
    return 0


def _write_hits(scores: np.ndarray, ids: np.ndarray, stream: TextIO) -> None:
    for s, i in zip(scores, ids, strict=True):
        stream.write(json.dumps({"ids": i.tolist(), "scores": [round(float(v), 6) for v in s]}))
        stream.write("\n")


def _read_vectors(lines: Iterable[str]) -> Iterable[np.ndarray]:
    for line in lines:
        line = line.strip().replace(",", " ")
        if line:
            yield np.array([float(v) for v in line.split()], dtype=np.float32)


def _sidecar_model(npy: str | None) -> str | None:
    """The ``model`` of an embeddings file's ``.json`` sidecar (written by ``mrl embed``; not
    used when it names an adaptor, whose vectors are not the model's), else ``None``."""
    if not npy:
        return None
    sidecar = Path(npy).with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("adaptor") or not meta.get("model"):
        return None
    return str(meta["model"])


def _queries_model(args: argparse.Namespace) -> str | None:
    """The model the queries come from: ``--model-name``, else their sidecar's, else ``None``."""
    return str(args.model_name) if args.model_name else _sidecar_model(args.queries)


def _build_model_name(args: argparse.Namespace) -> str:
    """The model recorded in a new index: ``--model-name``, else the embeddings' sidecar's,
    else ``"unknown"`` (which ``mrl search`` refuses unless ``--allow-model-mismatch``)."""
    return args.model_name or _sidecar_model(args.embeddings) or "unknown"


def _check_index_model(args: argparse.Namespace, index: Any) -> None:
    """Refuse an index of another model than the queries', or of model ``"unknown"`` (a
    ``ValueError`` naming both), unless ``--allow-model-mismatch`` (then a warning)."""
    queries_model = _queries_model(args)
    built = str(index.model_name)
    if built == "unknown":
        problem = (
            f"the index {args.index} does not record its model (model_name 'unknown'), so the "
            f"queries ({queries_model or 'model not stated'}) cannot be checked against it: "
            "rebuild it with `mrl index build --model-name NAME`"
        )
    elif queries_model is not None and queries_model != built:
        problem = (
            f"the index {args.index} was built from model {built!r} but the queries come from "
            f"{queries_model!r}: embed the queries with {built!r} or rebuild the index for "
            f"{queries_model!r}"
        )
    else:
        return
    if not args.allow_model_mismatch:
        raise ValueError(f"{problem}, or pass --allow-model-mismatch to search anyway.")
    print(
        f"mrl search: warning: {problem}; searching anyway (--allow-model-mismatch).",
        file=sys.stderr,
    )


def _check_query_dim(q: np.ndarray, index: Any, funnel_dim: int | None) -> None:
    """Queries ``(Q, D)`` need ``D >= m`` (the index's prefix size), and ``D == d`` (the funnel
    corpus's size) with ``--funnel-corpus``; a ``ValueError`` naming both sizes otherwise."""
    d = int(q.shape[-1])
    if funnel_dim is not None and d != funnel_dim:
        raise ValueError(
            f"the queries have dimension {d} but the funnel's corpus holds {funnel_dim}-d "
            f"vectors: pass (Q, {funnel_dim}) full-size queries from the corpus's model."
        )
    if d < int(index.dim):
        raise ValueError(
            f"the queries have dimension {d} but the index {index!r} holds prefixes of size "
            f"m={index.dim}: pass queries with at least {index.dim} dimensions from the "
            f"index's model {index.model_name!r}."
        )


def _load_funnel(args: argparse.Namespace) -> Any:
    """The funnel artefact of ``--index`` (every part verified by :meth:`FunnelRetriever.load`),
    with ``--shortlist-k``, ``--rerank`` and ``--ef-search`` applied when given (nothing is
    rebuilt: :meth:`FunnelRetriever.with_params`). Its rerank matrix is its own, so
    ``--funnel-corpus`` is refused."""
    from matryoshka.retrieval.funnel import FunnelRetriever

    fr = FunnelRetriever.load(args.index)
    if args.funnel_corpus is not None:
        raise ValueError(
            f"--index {args.index} is a funnel over its own rerank matrix: drop --funnel-corpus "
            f"(change k', the rerank chain or the graph beam with --shortlist-k, --rerank, "
            f"--ef-search)."
        )
    if args.shortlist_k is None and args.rerank is None and args.ef_search is None:
        return fr
    return fr.with_params(
        shortlist_k=args.shortlist_k,
        rerank=None if args.rerank is None else tuple(args.rerank),
        ef_search=args.ef_search,
    )


def cmd_search(args: argparse.Namespace) -> int:
    """``mrl search``: batch (``--queries q.npy``) or ``--interactive`` (a vector per line).

    ``--index`` is an index file or a funnel folder (``mrl index build --kind funnel``). Exits 2
    when the index was built for another model than the queries' (``--model-name``, else the
    queries' ``mrl embed`` sidecar), for model ``"unknown"``, or when the queries' dimension does
    not fit the index (or the funnel's corpus); ``--allow-model-mismatch`` lets the model checks
    pass with a warning.
    """
    from matryoshka.retrieval.funnel import is_saved_funnel
    from matryoshka.retrieval.vectordb import IncompleteStoreError

    funnel_dim: int | None = None
    try:
        if args.backend in DB_BACKENDS:
            search: Any = _db_search(args)
            index: Any = f"{args.backend} store {args.collection!r} at {args.uri!r}"
        elif not args.index:
            return fail("pass --index FILE, or --backend milvus|pgvector --uri URI.")
        elif is_saved_funnel(args.index):
            index = _load_funnel(args)
            _check_index_model(args, index)
            funnel_dim = int(index.dim)
            search = index.search
        else:
            index = load_index(args.index)
            _check_index_model(args, index)
            search = index.search
        if args.funnel_corpus and args.backend not in DB_BACKENDS:
            from matryoshka.retrieval.funnel import FunnelRetriever

            rerank = tuple(args.rerank) if args.rerank else None
            kp = args.shortlist_k if args.shortlist_k is not None else 200
            fr = FunnelRetriever(index.dim, kp, rerank, index=index, normalize=index.normalize).fit(
                args.funnel_corpus
            )
            funnel_dim = int(fr.dim)
            search = fr.search
        if args.interactive:
            print(f"{index}: one query vector per line (floats), Ctrl-D to quit", file=sys.stderr)
            for q in _read_vectors(sys.stdin):
                if args.backend not in DB_BACKENDS:
                    _check_query_dim(q[None, :], index, funnel_dim)
                scores, ids = search(q[None, :], args.k)
                _write_hits(scores, ids, sys.stdout)
                sys.stdout.flush()
            return 0
        if not args.queries:
            return fail("pass --queries Q.npy (batch) or --interactive.")
        q = _load_npy(args.queries, "queries")
        if args.backend not in DB_BACKENDS:
            _check_query_dim(q, index, funnel_dim)
        scores, ids = search(q, args.k)
    except IncompleteStoreError as e:
        return fail(_incomplete_message(e))
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as e:
        return fail(str(e))
    if args.out and args.out.endswith(".npz"):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, scores=scores, ids=ids)
    elif args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            _write_hits(scores, ids, f)
    else:
        _write_hits(scores, ids, sys.stdout)
    if args.out:
        print(f"wrote {args.out}: {ids.shape[0]} queries x top-{args.k}", file=sys.stderr)
    return 0


def _add_db_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the vector-database backends (``--backend milvus|pgvector``)."""
    p.add_argument(
        "--uri", default=None, help="milvus: ./file.db or http://host:19530; pgvector: a PG URL"
    )
    p.add_argument("--collection", default="matryoshka", help="vector DB collection/table name")


def _add_index(p_index: argparse.ArgumentParser) -> None:
    index_sub = p_index.add_subparsers(dest="index_command", required=True)
    p = index_sub.add_parser("build", help="index an (N, d) embeddings .npy at prefix size --dim")
    p.add_argument("embeddings", help="(N, d) float .npy (read memory-mapped)")
    p.add_argument(
        "--kind",
        choices=("index", "funnel"),
        default="index",
        help="index: one index over the --dim prefix; funnel: that index as the shortlist of a "
        "funnel (k', rerank chain, rerank matrix) saved as one folder",
    )
    p.add_argument(
        "--dim", type=int, default=None, help="prefix size m to index (funnel: m_s; default: d)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS + DB_BACKENDS,
        default="exact",
        help="index engine (funnel: the shortlist engine or code: binary, sq8, rabitq, ...)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="embedding model, saved in the header (default: the embeddings' mrl embed sidecar)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="index file (default: EMBEDDINGS.m<dim>.index) or funnel folder (EMBEDDINGS.m<dim>"
        ".funnel)",
    )
    p.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=True, help="cosine"
    )
    p.add_argument("--hnsw-m", type=int, default=HNSW_M, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION, help="HNSW build beam")
    p.add_argument("--ef-search", type=int, default=EF_SEARCH, help="HNSW search beam")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4·sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells visited per query")
    p.add_argument("--batch-size", type=int, default=65536, help="rows added at a time")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )
    add_deprecated_alias(p, "--batch", "--batch-size", dest="batch_size", type=int)
    add_deprecated_alias(p, "--quiet", "--no-progress", dest="progress", const=False)
    f = p.add_argument_group("funnel (--kind funnel)")
    f.add_argument("--shortlist-k", type=int, default=None, help="shortlist size k' (default 200)")
    f.add_argument(
        "--rerank",
        type=int,
        nargs="+",
        default=None,
        help="rerank sizes m_1 < ... <= d (default d)",
    )
    f.add_argument(
        "--keep", type=int, nargs="+", default=None, help="candidates kept per stage but the last"
    )
    f.add_argument(
        "--rerank-dtype",
        choices=RERANK_DTYPES,
        default=None,
        help="storage of the memory-mapped rerank matrix (default float32: the corpus file itself)",
    )
    f.add_argument(
        "--copy-matrix",
        action="store_const",
        const=True,
        default=None,
        help="float32: copy the corpus into the folder instead of referencing its path",
    )
    _add_db_arguments(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="vector DB: continue an interrupted build from the rows already written",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="vector DB: drop an existing store and rebuild"
    )
    p.set_defaults(func=cmd_index_build)


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, help="index file from `mrl index build`")
    p.add_argument("--queries", default=None, help="(Q, d) query embeddings .npy")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default=None, help="results: .jsonl (ids, scores) or .npz")
    p.add_argument(
        "--model-name",
        default=None,
        help="the queries' model (default: their mrl embed sidecar): refuse an index of another",
    )
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="search an index built for another (or an unknown) model anyway, with a warning",
    )
    p.add_argument("--interactive", action="store_true", help="read query vectors from stdin")
    p.add_argument("--funnel-corpus", default=None, help="(N, d) .npy: rerank through a funnel")
    p.add_argument(
        "--shortlist-k",
        type=int,
        default=None,
        help="funnel shortlist size k' (default 200; a funnel --index: its own)",
    )
    p.add_argument("--rerank", type=int, nargs="+", default=None, help="funnel rerank sizes")
    p.add_argument("--backend", choices=DB_BACKENDS, default=None, help="search a vector DB")
    p.add_argument(
        "--ef-search",
        type=int,
        default=None,
        help="HNSW search beam of a vector DB, or of a funnel's graph shortlist",
    )
    _add_db_arguments(p)
    p.set_defaults(func=cmd_search)


def add_arguments(command: str, parser: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``command`` (``index`` or ``search``)."""
    (_add_index if command == "index" else _add_search)(parser)
