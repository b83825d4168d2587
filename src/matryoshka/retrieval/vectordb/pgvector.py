"""Funnel retrieval in PostgreSQL with the pgvector extension (psycopg 3).

One table per corpus::

    id bigint PRIMARY KEY, short_prefix vector(m_s), embedding vector(d)

``short_prefix`` holds the unit-normalised size-``m_s`` prefix (when ``normalize``) under an HNSW
index (``vector_ip_ops``); ``embedding`` holds the vector as given (pgvector 0.6 has no
``subvector()``, hence the separate column). The header is the table's ``COMMENT`` (JSON).

A search is one SQL statement per query: the shortlist is a CTE ordered by ``short_prefix <#> q``
through the HNSW index, each rerank stage a CTE over the previous one scoring the prefix
``(embedding::real[])[1:m]`` (cosine when ``normalize``, inner product otherwise), the last at the
full size. Queries of one call are sent together (psycopg pipeline). pgvector's HNSW returns at
most ``hnsw.ef_search <= 1000`` rows, so a ``shortlist_k`` above 1000 scans the short column
exactly (still at size ``m_s``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka.retrieval.funnel import FunnelSpec
from matryoshka.retrieval.index import EF_CONSTRUCTION, EF_SEARCH, HNSW_M
from matryoshka.retrieval.vectordb.base import DatabaseFunnel, check_name

__all__ = ["PgvectorFunnel"]

_EXTRA = "pip install 'matryoshka[pgvector]' (psycopg[binary] and pgvector)"


def _import() -> tuple[Any, Any, Any]:
    try:
        import psycopg
        from pgvector.psycopg import register_vector
        from psycopg import sql
    except ImportError as e:
        raise ImportError(
            f"The pgvector backend needs psycopg 3 and pgvector, which are not installed: {_EXTRA}."
        ) from e
    return psycopg, sql, register_vector


def _redact(url: str) -> str:
    """The URL without its password (an empty one stays empty)."""
    return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", url)


class PgvectorFunnel(DatabaseFunnel):
    """A corpus in a PostgreSQL table, searched with the Matryoshka funnel in one SQL statement.

    Args:
        url: a libpq URL, e.g. ``postgresql://user:pass@host:5432/db``.
        table: table name (letters, digits, underscores).
        dim, shortlist_size, model_name, normalize, shortlist_k, rerank, keep, ef_search,
            batch_size, progress: see :class:`matryoshka.retrieval.vectordb.DatabaseFunnel`.
        hnsw_m, ef_construction: HNSW build parameters (``m``, ``ef_construction``), new tables.
        allow_model_mismatch: open a store recorded for another model (a warning, not an error).
        overwrite: drop an existing table of this name (written by matryoshka) first.
        connect_timeout: seconds to wait for the server.

    The HNSW index is built once, after :meth:`~DatabaseFunnel.ingest` wrote the last row (or
    after the first :meth:`~DatabaseFunnel.add`): a bulk build, much faster than inserting into
    an existing graph. PostgreSQL maintains it afterwards. Each ingestion batch is one
    transaction, so a killed build leaves whole batches.
    """

    backend = "pgvector"
    max_ann_k = 1000  # pgvector's largest hnsw.ef_search

    def __init__(
        self,
        url: str,
        table: str = "matryoshka",
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
        connect_timeout: float = 10,
    ) -> None:
        psycopg, self._sql, register_vector = _import()
        self._psycopg = psycopg
        self.url = url
        self.name = check_name(table, "table")
        self.shortlist_k, self.rerank, self.keep = shortlist_k, rerank, keep
        self.ef_search = ef_search
        self.batch_size = int(batch_size)
        self.progress = progress
        try:
            self._conn = psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            )
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConnectionError(
                f"cannot connect to PostgreSQL at url={_redact(url)!r}: {first}. Check that the "
                f"server is running and the URL (host, port, user, database) is right."
            ) from None
        try:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as e:
            self._conn.close()
            raise RuntimeError(
                f"the pgvector extension is not available in {_redact(url)!r} ({e}): install "
                f"pgvector on the server (https://github.com/pgvector/pgvector) or ask an admin "
                f"to run CREATE EXTENSION vector."
            ) from None
        register_vector(self._conn)
        self._t = self._sql.Identifier(self.name)
        exists, comment = self._conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')",
            (self.name, self.name),
        ).fetchone()
        stored: dict[str, Any] | None = None
        if exists:
            import json

            try:
                stored = json.loads(comment) if comment else {}
            except ValueError:
                stored = {}
            if not isinstance(stored, dict):
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

    @property
    def where(self) -> str:
        return f"pgvector table {self.name!r} at {_redact(self.url)!r}"

    @property
    def location(self) -> str:
        return _redact(self.url)

    def _q(self, query: str, **names: Any) -> Any:
        """``query`` with ``{t}`` the table and other ``{name}`` SQL fragments filled in."""
        return self._sql.SQL(query).format(t=self._t, **names)

    def _create(self) -> None:
        lit = self._sql.Literal
        with self._conn.transaction():
            self._conn.execute(
                self._q(
                    "CREATE TABLE {t} (id bigint PRIMARY KEY, short_prefix vector({ms}) NOT NULL,"
                    " embedding vector({d}) NOT NULL)",
                    ms=lit(self.shortlist_size),
                    d=lit(self.dim),
                )
            )
            self._store_header()

    def _store_header(self) -> None:
        self._conn.execute(
            self._q("COMMENT ON TABLE {t} IS {h}", h=self._sql.Literal(self._header_json()))
        )

    @property
    def _index_name(self) -> Any:
        return self._sql.Identifier(f"{self.name}_short_hnsw")

    def _ensure_index(self) -> None:
        lit = self._sql.Literal
        self._conn.execute(
            self._q(
                "CREATE INDEX IF NOT EXISTS {ix} ON {t} USING hnsw (short_prefix vector_ip_ops) "
                "WITH (m = {m}, ef_construction = {ef})",
                ix=self._index_name,
                m=lit(self.header_["hnsw_m"]),
                ef=lit(self.header_["ef_construction"]),
            )
        )

    # -- storage ---------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._conn.execute(self._q("SELECT count(*) FROM {t}")).fetchone()[0])

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the table, its TOAST data and its indexes."""
        row = self._conn.execute("SELECT pg_total_relation_size(to_regclass(%s))", (self.name,))
        return int(row.fetchone()[0])

    def _next_id(self) -> int:
        return int(
            self._conn.execute(self._q("SELECT coalesce(max(id) + 1, 0) FROM {t}")).fetchone()[0]
        )

    def _copy(self, target: Any, x: np.ndarray, ids: np.ndarray) -> None:
        short = self.prefix(x, self.shortlist_size)  # (n, m_s)
        with (
            self._conn.cursor() as cur,
            cur.copy(
                self._sql.SQL(
                    "COPY {} (id, short_prefix, embedding) FROM STDIN WITH (FORMAT BINARY)"
                ).format(target)
            ) as copy,
        ):
            copy.set_types(["bigint", "vector", "vector"])
            for i in range(x.shape[0]):
                copy.write_row((int(ids[i]), short[i], x[i]))

    def _write(self, x: np.ndarray, ids: np.ndarray, upsert: bool) -> None:
        step = max(1, self.batch_size)
        bar = tqdm(
            total=x.shape[0], desc=f"pgvector {self.name}", disable=not self.progress, leave=False
        )
        try:
            for s in range(0, x.shape[0], step):
                xb, ib = x[s : s + step], ids[s : s + step]
                with self._conn.transaction():
                    if upsert:
                        tmp = self._sql.Identifier(f"_mrl_upsert_{self.name}")
                        self._conn.execute(
                            self._sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                                tmp, self._t
                            )
                        )
                        self._copy(tmp, xb, ib)
                        self._conn.execute(
                            self._q(
                                "INSERT INTO {t} SELECT * FROM {tmp} ON CONFLICT (id) DO UPDATE "
                                "SET short_prefix = EXCLUDED.short_prefix, "
                                "embedding = EXCLUDED.embedding",
                                tmp=tmp,
                            )
                        )
                    else:
                        self._copy(self._t, xb, ib)
                bar.update(xb.shape[0])
        except self._psycopg.errors.UniqueViolation:
            raise ValueError(
                f"some ids are already in {self.where}: use upsert(vectors, ids) to replace "
                f"them, or add(vectors) without ids to append under new ids."
            ) from None
        finally:
            bar.close()
        self._ensure_index()

    def _write_batch(self, x: np.ndarray, ids: np.ndarray) -> None:
        with self._conn.transaction():
            self._copy(self._t, x, ids)

    def _before_rows(self) -> None:
        # a bulk build after the last row is several times faster than inserting into the graph
        self._conn.execute(self._q("DROP INDEX IF EXISTS {ix}", ix=self._index_name))

    def _finish(self, n: int) -> None:
        self._ensure_index()

    def _present(self, n: int) -> np.ndarray:
        rows = self._conn.execute(self._q("SELECT id FROM {t} WHERE id < %s"), (n,)).fetchall()
        return np.asarray([r[0] for r in rows], np.int64)

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        rows = self._conn.execute(
            self._q("SELECT id, embedding FROM {t} WHERE id = ANY(%s)"), (ids.tolist(),)
        ).fetchall()
        by_id = {int(i): np.asarray(v.to_numpy(), np.float32) for i, v in rows}
        return np.stack([by_id[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.dim))

    def _delete(self, ids: np.ndarray) -> int:
        cur = self._conn.execute(self._q("DELETE FROM {t} WHERE id = ANY(%s)"), (ids.tolist(),))
        return int(cur.rowcount)

    # -- search ------------------------------------------------------------------------------------
    def _score(self, m: int) -> Any:
        """SQL for the score of ``embedding[:m]`` against the next ``%s`` parameter."""
        col = "embedding" if m == self.dim else f"(embedding::real[])[1:{int(m)}]::vector"
        op = "1 - ({col} <=> %s)" if self.normalize else "-({col} <#> %s)"
        return self._sql.SQL(op.format(col=col))

    def funnel_sql(self, chain: tuple[int, ...]) -> Any:
        """The funnel statement for a rerank chain; parameters ``q_s, k', (q_m, keep) per stage``."""
        sql = self._sql
        parts = [
            self._q(
                "c0 AS MATERIALIZED (SELECT id, embedding FROM {t} "
                "ORDER BY short_prefix <#> %s LIMIT %s)"
            )
        ]
        for i, m in enumerate(chain[:-1], start=1):
            parts.append(
                sql.SQL(
                    "{c} AS MATERIALIZED (SELECT id, embedding, {s} AS score FROM {p} "
                    "ORDER BY score DESC LIMIT %s)"
                ).format(c=sql.Identifier(f"c{i}"), s=self._score(m), p=sql.Identifier(f"c{i - 1}"))
            )
        last = sql.SQL("SELECT id, {s} AS score FROM {p} ORDER BY score DESC LIMIT %s").format(
            s=self._score(chain[-1]), p=sql.Identifier(f"c{len(chain) - 1}")
        )
        return sql.SQL("WITH {} {}").format(sql.SQL(", ").join(parts), last)

    def _search(
        self,
        q: np.ndarray,
        spec: FunnelSpec,
        keeps: tuple[int, ...],
        scores: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        kp, chain = spec.shortlist_k, tuple(spec.rerank or (self.dim,))
        statement = self.funnel_sql(chain)
        qs = self.prefix(q, self.shortlist_size)  # (Q, m_s)
        stage_q = [self.prefix(q, m) for m in chain]  # [(Q, m)]
        params = []
        for j in range(q.shape[0]):
            p: list[Any] = [qs[j], kp]
            for m_q, keep in zip(stage_q, keeps[1:], strict=True):
                p += [m_q[j], keep]
            params.append(p)
        ann = kp <= self.max_ann_k
        ef = str(min(self.max_ann_k, max(self.ef_search, kp)))
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), "
                "set_config('enable_indexscan', %s, true)",
                (ef, "on" if ann else "off"),
            )
            cur.executemany(statement, params, returning=True)
            for j in range(q.shape[0]):
                rows = cur.fetchall()
                if rows:
                    ids[j, : len(rows)] = [r[0] for r in rows]
                    scores[j, : len(rows)] = [r[1] for r in rows]
                cur.nextset()

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def drop(self) -> None:
        self._conn.execute(self._q("DROP TABLE IF EXISTS {t}"))
