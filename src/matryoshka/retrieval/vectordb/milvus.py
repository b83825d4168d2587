"""Funnel retrieval in Milvus: Milvus Lite (a local file), a Milvus server, or a Milvus cluster.

One collection per corpus, fields ``id`` (INT64 primary key), ``short_prefix``
(FLOAT_VECTOR ``m_s``, unit-normalised when ``normalize``, HNSW index, inner product) and
``embedding`` (FLOAT_VECTOR ``d``, the vector as given; a FLAT index, which Milvus requires on
every vector field before loading). The header is a collection property (JSON). A collection is
created without indexes; they are built once, after :meth:`~DatabaseFunnel.ingest` wrote the
last row (or after the first :meth:`~DatabaseFunnel.add`), and the collection is loaded then.

A search sends the queries' short prefixes to the HNSW index on ``short_prefix`` and asks for the
shortlisted items' ``embedding`` in the same request; the rerank chain then runs in the client
(Milvus has no expression to score a prefix of a stored vector) with
:func:`matryoshka.retrieval.funnel.rerank_candidates`, the kernel of the in-memory funnel. The URI alone picks the
deployment: ``./corpus.db`` runs the embedded engine from ``milvus-lite``, ``http://host:19530``
talks to a server or a cluster's proxy; nothing in this module depends on which.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka.retrieval.funnel import FunnelSpec, rerank_candidates
from matryoshka.retrieval.index import EF_CONSTRUCTION, EF_SEARCH, HNSW_M
from matryoshka.retrieval.vectordb.base import DatabaseFunnel, check_name

__all__ = ["MilvusFunnel"]

_HEADER_KEY = "matryoshka.header"
_NEXT_ID_KEY = "matryoshka.next_id"
_FETCH_BYTES = 32 * 2**20  # bound on the vectors one search request brings back
_QUERY_LIMIT = 16384  # Milvus' largest query limit


def _import() -> Any:
    try:
        import pymilvus
    except ImportError as e:
        raise ImportError(
            "The Milvus backend needs pymilvus (and milvus-lite for local files), which is not "
            "installed: pip install 'matryoshka[milvus]'."
        ) from e
    return pymilvus


def _shortlist_block(hits: Any, kp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One search response as a rerank block: the ``(n,)`` ids and ``(n, d)`` vectors of all
    ``n`` hits, and ``(b, k')`` positions into them per query (``-1`` past a query's hits)."""
    pos = np.full((len(hits), kp), -1, np.int64)
    found: list[int] = []
    rows: list[Any] = []
    for j, row in enumerate(hits):
        pos[j, : len(row)] = np.arange(len(found), len(found) + len(row))
        found += [int(h["id"]) for h in row]
        rows += [h["entity"]["embedding"] for h in row]
    return np.asarray(found, np.int64), np.asarray(rows, np.float32), pos


class MilvusFunnel(DatabaseFunnel):
    """A corpus in a Milvus collection, searched with the Matryoshka funnel.

    Args:
        uri: ``./corpus.db`` (Milvus Lite, embedded) or ``http://host:19530`` (server/cluster).
        collection: collection name (letters, digits, underscores).
        dim, shortlist_size, model_name, normalize, shortlist_k, rerank, keep, ef_search,
            batch_size, progress: see :class:`matryoshka.retrieval.vectordb.DatabaseFunnel`.
        hnsw_m, ef_construction: HNSW build parameters (``M``, ``efConstruction``), new collections.
        allow_model_mismatch: open a store recorded for another model (a warning, not an error).
        overwrite: drop an existing collection of this name (written by matryoshka) first.
        token: ``"user:password"`` or an API key for a secured server; ``db_name``: its database.
        timeout: seconds for connecting and for each request.
    """

    backend = "milvus"
    max_ann_k = 16384  # Milvus' largest topk

    def __init__(
        self,
        uri: str,
        collection: str = "matryoshka",
        *,
        dim: int | None = None,
        shortlist_size: int | None = None,
        model_name: str | None = None,
        normalize: bool | None = None,
        shortlist_k: int = 200,
        rerank: Sequence[int] | None = None,
        keep: Sequence[int] | None = None,
        ef_search: int = EF_SEARCH,
        hnsw_m: int = HNSW_M,
        ef_construction: int = EF_CONSTRUCTION,
        batch_size: int = 4096,
        progress: bool = True,
        allow_model_mismatch: bool = False,
        overwrite: bool = False,
        token: str = "",
        db_name: str = "",
        timeout: float = 30,
    ) -> None:
        self._pm = pymilvus = _import()
        self.uri = str(uri)
        self.name = check_name(collection, "collection")
        self.shortlist_k, self.rerank, self.keep = shortlist_k, rerank, keep
        self.ef_search = ef_search
        self.batch_size = int(batch_size)
        self.progress = progress
        self.timeout = timeout
        try:
            self._client = pymilvus.MilvusClient(
                uri=self.uri, token=token, db_name=db_name, timeout=timeout
            )
        except pymilvus.MilvusException as e:
            raise ConnectionError(
                f"cannot connect to Milvus at uri={self.uri!r}: {getattr(e, 'message', e)}. For "
                f"a server or cluster check that it runs and the URI/token are right; for Milvus "
                f"Lite pass a file path in an existing folder and pip install milvus-lite."
            ) from None
        stored: dict[str, Any] | None = None
        if self._client.has_collection(self.name):
            props = self._client.describe_collection(self.name).get("properties", {}) or {}
            try:
                stored = json.loads(props.get(_HEADER_KEY, "{}"))
            except ValueError:
                stored = {}
        create = self._setup(
            stored,
            self.where,
            dim=dim,
            shortlist_size=shortlist_size,
            model_name=model_name,
            normalize=normalize,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            allow_model_mismatch=allow_model_mismatch,
            overwrite=overwrite,
        )
        if create:
            if stored is not None:  # overwrite
                self.drop()
            self._create()
        self._indexed = "short_prefix" in self._client.list_indexes(self.name)
        if self._indexed:
            self._client.load_collection(self.name)

    @property
    def where(self) -> str:
        return f"Milvus collection {self.name!r} at {self.uri!r}"

    @property
    def location(self) -> str:
        return self.uri

    def _create(self) -> None:
        pm, c = self._pm, self._client
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        schema.add_field("short_prefix", pm.DataType.FLOAT_VECTOR, dim=self.shortlist_size)
        schema.add_field("embedding", pm.DataType.FLOAT_VECTOR, dim=self.dim)
        c.create_collection(self.name, schema=schema, consistency_level="Strong")
        c.alter_collection_properties(
            self.name, properties={_HEADER_KEY: self._header_json(), _NEXT_ID_KEY: "0"}
        )

    def _ensure_index(self) -> None:
        """Build the HNSW index on ``short_prefix`` (and the FLAT one Milvus needs on
        ``embedding``) if missing, then load the collection for search."""
        if not self._indexed:
            c = self._client
            index = c.prepare_index_params()
            index.add_index(
                field_name="short_prefix",
                index_type="HNSW",
                metric_type="IP",
                params={
                    "M": self.header_["hnsw_m"],
                    "efConstruction": self.header_["ef_construction"],
                },
            )
            index.add_index(field_name="embedding", index_type="FLAT", metric_type="IP")
            c.create_index(self.name, index)
            self._indexed = True
        self._client.load_collection(self.name)

    def _store_header(self) -> None:
        self._client.alter_collection_properties(
            self.name, properties={_HEADER_KEY: self._header_json()}
        )

    # -- storage ---------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        self._readable()
        rows = self._client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _next_id(self) -> int:
        props = self._client.describe_collection(self.name).get("properties", {}) or {}
        return int(props.get(_NEXT_ID_KEY, 0))

    def _write(self, x: np.ndarray, ids: np.ndarray, upsert: bool) -> None:
        if not upsert and ids.size:
            # Milvus would silently store a second row under an existing primary key.
            present = self._existing(ids)
            if present:
                raise ValueError(
                    f"ids {present[:5]} are already in {self.where}: use upsert(vectors, ids) "
                    f"to replace them, or add(vectors) without ids to append under new ids."
                )
        write = self._client.upsert if upsert else self._client.insert
        step = max(1, self.batch_size)
        with tqdm(
            total=x.shape[0], desc=f"milvus {self.name}", disable=not self.progress, leave=False
        ) as bar:
            for s in range(0, x.shape[0], step):
                xb, ib = x[s : s + step], ids[s : s + step]
                short = self.prefix(xb, self.shortlist_size)  # (b, m_s)
                rows = [
                    {"id": int(i), "short_prefix": sv, "embedding": fv}
                    for i, sv, fv in zip(ib, short, xb, strict=True)
                ]
                write(self.name, rows)
                bar.update(xb.shape[0])
        self._raise_next_id(int(ids.max()) + 1 if ids.size else 0)
        self._ensure_index()

    def _raise_next_id(self, end: int) -> None:
        if end > self._next_id():
            self._client.alter_collection_properties(self.name, properties={_NEXT_ID_KEY: str(end)})

    def _write_batch(self, x: np.ndarray, ids: np.ndarray) -> None:
        short = self.prefix(x, self.shortlist_size)  # (b, m_s)
        rows = [
            {"id": int(i), "short_prefix": sv, "embedding": fv}
            for i, sv, fv in zip(ids, short, x, strict=True)
        ]
        self._client.insert(self.name, rows)

    def _finish(self, n: int) -> None:
        self._raise_next_id(n)
        self._ensure_index()

    def _readable(self) -> None:
        """Queries need a loaded collection. Milvus Lite loads one without indexes; a server
        loads only an indexed one, so there the indexes are built first (on the rows written
        so far: a resumed build then adds to a maintained index)."""
        state = self._client.get_load_state(self.name).get("state")
        if state != self._pm.client.types.LoadState.Loaded:
            self._ensure_index()

    def _present(self, n: int) -> np.ndarray:
        self._readable()
        found: list[int] = []
        for lo in range(0, n, _QUERY_LIMIT):
            rows = self._client.query(
                self.name,
                filter=f"id >= {lo} and id < {min(n, lo + _QUERY_LIMIT)}",
                output_fields=["id"],
                limit=_QUERY_LIMIT,
            )
            found += [int(r["id"]) for r in rows]
        return np.asarray(found, np.int64)

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        self._readable()
        rows = self._client.query(
            self.name, filter=f"id in {ids.tolist()}", output_fields=["id", "embedding"]
        )
        by_id = {int(r["id"]): r["embedding"] for r in rows}
        return np.asarray([by_id[int(i)] for i in ids], np.float32).reshape(len(ids), self.dim)

    def _existing(self, ids: np.ndarray) -> list[int]:
        found: list[int] = []
        for s in range(0, ids.size, 8192):
            chunk = ids[s : s + 8192].tolist()
            rows = self._client.query(self.name, filter=f"id in {chunk}", output_fields=["id"])
            found += [int(r["id"]) for r in rows]
        return sorted(found)

    def _delete(self, ids: np.ndarray) -> int:
        present = self._existing(ids)
        if present:
            self._client.delete(self.name, ids=present)
        return len(present)

    # -- search ------------------------------------------------------------------------------------
    def _search(
        self,
        q: np.ndarray,
        spec: FunnelSpec,
        keeps: tuple[int, ...],
        scores: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        kp, chain = spec.shortlist_k, tuple(spec.rerank or (self.dim,))
        if kp > self.max_ann_k:
            raise ValueError(
                f"shortlist_k={kp} is above Milvus' largest topk {self.max_ann_k}: use "
                f"shortlist_k <= {self.max_ann_k}."
            )
        if not self._indexed:  # a store created but never written
            self._ensure_index()
        qs = self.prefix(q, self.shortlist_size)  # (Q, m_s)
        batch = max(1, _FETCH_BYTES // (kp * self.dim * 4))
        params = {"metric_type": "IP", "params": {"ef": max(self.ef_search, kp)}}
        for s in range(0, q.shape[0], batch):
            hits = self._client.search(
                self.name,
                data=qs[s : s + batch],
                anns_field="short_prefix",
                limit=kp,
                search_params=params,
                output_fields=["embedding"],
            )
            found, rows, pos = _shortlist_block(hits, kp)
            if not found.size:
                continue
            sc, top = rerank_candidates(
                q[s : s + batch], pos, rows, chain, keeps, normalize=self.normalize
            )
            scores[s : s + batch] = sc
            ids[s : s + batch] = np.where(top >= 0, found[np.maximum(top, 0)], -1)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def drop(self) -> None:
        self._client.drop_collection(self.name)
        self._indexed = False
