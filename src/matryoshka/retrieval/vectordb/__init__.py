"""Funnel retrieval inside vector databases: Milvus (Lite, server or cluster) and PostgreSQL + pgvector.

Each backend stores, per item, an ``int64`` id, the unit-normalised short prefix ``z[:m_s]`` under
the database's ANN index (HNSW), and the full vector ``z`` (as given) for the rerank. ``search(queries,
k)`` runs the funnel of :class:`matryoshka.retrieval.funnel.FunnelRetriever`: shortlist ``k'`` items by
the short prefix, rescore them with a chain of longer prefixes ``m_1 < ... <= d`` (each stage
keeping fewer), and return ``(scores, ids)``, both ``(Q, k)``, in FAISS conventions (``-1`` and
``NO_SCORE`` where fewer than ``k`` items exist).

* :class:`MilvusFunnel` (``pip install 'matryoshka[milvus]'``): a local path runs Milvus Lite, an
  ``http://host:19530`` URI a Milvus server or cluster; the same code either way.
* :class:`PgvectorFunnel` (``pip install 'matryoshka[pgvector]'``): any PostgreSQL URL with the
  ``vector`` extension; the whole funnel is one SQL statement per query.

Both record a header (model name, sizes, normalisation) in the database and check it on open.
:meth:`DatabaseFunnel.ingest` builds a store crash-safely: the header says "incomplete" until
every row is written and the ANN index is built, an incomplete store refuses searches
(:class:`IncompleteStoreError`), and ``ingest(vectors, resume=True)`` or ``overwrite=True``
finishes or restarts it.
The backend modules are imported lazily, so importing this package needs neither driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matryoshka.retrieval.vectordb.base import (
    DatabaseFunnel,
    IncompleteStoreError,
    StoreExistsError,
)

if TYPE_CHECKING:
    from matryoshka.retrieval.vectordb.milvus import MilvusFunnel
    from matryoshka.retrieval.vectordb.pgvector import PgvectorFunnel

__all__ = [
    "DatabaseFunnel",
    "IncompleteStoreError",
    "MilvusFunnel",
    "PgvectorFunnel",
    "StoreExistsError",
    "open_vectordb",
]


def __getattr__(name: str) -> Any:
    if name == "MilvusFunnel":
        from matryoshka.retrieval.vectordb.milvus import MilvusFunnel

        return MilvusFunnel
    if name == "PgvectorFunnel":
        from matryoshka.retrieval.vectordb.pgvector import PgvectorFunnel

        return PgvectorFunnel
    raise AttributeError(f"module 'matryoshka.retrieval.vectordb' has no attribute {name!r}")


def open_vectordb(backend: str, uri: str, name: str, **kwargs: Any) -> DatabaseFunnel:
    """Open (or create) a funnel store: ``backend`` is ``"milvus"`` or ``"pgvector"``."""
    if backend == "milvus":
        from matryoshka.retrieval.vectordb.milvus import MilvusFunnel

        return MilvusFunnel(uri, name, **kwargs)
    if backend == "pgvector":
        from matryoshka.retrieval.vectordb.pgvector import PgvectorFunnel

        return PgvectorFunnel(uri, name, **kwargs)
    raise ValueError(f"backend={backend!r} is not a vector database: use 'milvus' or 'pgvector'.")
