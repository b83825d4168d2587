"""The shared part of the database funnels: the :class:`DatabaseFunnel` base, its header, name checks.

A backend (:mod:`~matryoshka.retrieval.vectordb.milvus`, :mod:`~matryoshka.retrieval.vectordb.pgvector`)
stores the vectors and runs the shortlist; the funnel itself -- its specification, keep counts and
the client-side rerank -- comes from :mod:`matryoshka.retrieval.funnel` (:class:`FunnelSpec`,
:func:`rerank_candidates`), the same code the in-memory :class:`FunnelRetriever` runs.
"""

from __future__ import annotations

import json
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka._validate import positive_int
from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.funnel import FunnelSpec
from matryoshka.retrieval.index import NO_SCORE

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DatabaseFunnel",
    "IncompleteStoreError",
    "StoreExistsError",
    "check_name",
]

FORMAT = "matryoshka-vectordb"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_name(name: Any, what: str) -> str:
    """A collection/table name usable unquoted in both databases."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{what}={name!r} is not a valid name: use letters, digits and underscores, starting "
            f"with a letter or underscore, at most 63 characters (e.g. 'wordnet_minilm')."
        )
    return name


class IncompleteStoreError(ValueError):
    """A store whose build (:meth:`DatabaseFunnel.ingest`) did not finish: some rows are missing
    and the ANN index is not built, so it must not answer searches.

    Attributes: ``where`` (the store, in words), ``backend``, ``uri`` (its location, without a
    password), ``name``, ``rows`` (rows present), ``expected`` (rows the build was writing),
    ``header`` (the stored header, with the build's ``source`` if recorded).
    """

    def __init__(self, message: str, store: DatabaseFunnel, rows: int, expected: int) -> None:
        super().__init__(message)
        self.where, self.backend, self.uri = store.where, store.backend, store.location
        self.name, self.rows, self.expected = store.name, rows, expected
        self.header: dict[str, Any] = store.header()


class StoreExistsError(ValueError):
    """:meth:`DatabaseFunnel.ingest` onto a store that already holds a build (complete or
    not) without ``resume``: the caller must choose to resume it or to overwrite it.

    Attributes: ``where``, ``rows`` (rows present), ``expected`` (rows of the build recorded in
    the header, ``None`` if it was not written by ``ingest``), ``complete``.
    """

    def __init__(
        self, message: str, *, where: str, rows: int, expected: int | None, complete: bool
    ) -> None:
        super().__init__(message)
        self.where, self.rows, self.expected, self.complete = where, rows, expected, complete


class DatabaseFunnel(ABC):
    """Shared part of the database backends: header checks, validation, the funnel spec.

    A store is an index over the full vectors like
    :class:`~matryoshka.retrieval.funnel.FunnelRetriever`: ``dim``, ``ntotal``, ``normalize`` and
    ``search(queries, k) -> (scores, ids)``.

    Subclasses open the database in ``__init__``, then call :meth:`_setup` with the stored header
    (``None`` when the collection/table does not exist yet).

    Crash-safe builds: :meth:`ingest` marks the store incomplete in its header before writing
    the first row, writes ids ``0..N-1`` batch by batch, builds the ANN index once, and only then
    marks it complete. A store left incomplete (the process was killed) refuses :meth:`search`,
    :meth:`add` and :meth:`upsert` with an :class:`IncompleteStoreError` saying how many rows are
    there of how many; ``ingest(vectors, resume=True)`` continues it (skipping the ids already
    written, after checking a sample of them against ``vectors``), and ``overwrite=True`` on
    opening drops it first.

    Args (common to both backends):
        dim: ``d``, the full embedding size; ``None`` reads it from an existing store.
        shortlist_size: ``m_s``, the prefix size under the ANN index; ``None`` reads it.
        model_name: the embedding model; checked against an existing store's header (``None``
            accepts any; a new store records ``"unknown"``).
        normalize: cosine similarity (each prefix unit-normalised) rather than raw inner product.
        shortlist_k: ``k'``, candidates taken from the ANN index (``>= k``); settable.
        rerank: increasing rerank sizes ``(m_1, ..., d)``; ``None`` is one stage at ``d``; settable.
        keep: candidates kept after each rerank stage but the last; ``None`` interpolates
            geometrically (see :class:`~matryoshka.retrieval.funnel.FunnelSpec`); settable.
        ef_search: HNSW search beam (raised to ``shortlist_k`` when smaller); settable.
        batch_size: rows sent per ingestion batch.
        progress: show a progress bar while ingesting.
        overwrite: drop an existing store of this name (one written by matryoshka) and create
            it anew, without checking its header against the arguments.
    """

    backend: str = ""
    #: largest shortlist the ANN index can return; larger shortlists scan the short column exactly
    max_ann_k: int = 16384

    def _setup(
        self,
        stored: dict[str, Any] | None,
        where: str,
        *,
        dim: int | None,
        shortlist_size: int | None,
        model_name: str | None,
        normalize: bool | None,
        hnsw_m: int,
        ef_construction: int,
        allow_model_mismatch: bool = False,
        overwrite: bool = False,
    ) -> bool:
        """Check or create the header; returns True if the store must be created (after
        dropping the existing one when ``overwrite`` and ``stored`` is not ``None``).

        An existing store whose header names another model than ``model_name`` (or
        ``"unknown"``, which cannot be checked) is refused with a ``ValueError`` naming both,
        unless ``allow_model_mismatch`` (then a ``UserWarning``).
        """
        self._build_params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction}
        if stored is not None and overwrite:
            self._check_format(stored, where)
            stored = None
        self.created_: bool = stored is None
        if stored is None:
            if dim is None or shortlist_size is None:
                raise ValueError(
                    f"{where} does not exist: pass dim (the full embedding size) and "
                    f"shortlist_size (m_s) to create it, or check the name/URI."
                )
            dim = positive_int(dim, "dim")
            shortlist_size = positive_int(shortlist_size, "shortlist_size")
            if shortlist_size > dim:
                raise ValueError(
                    f"shortlist_size={shortlist_size} is larger than dim={dim}: the shortlist "
                    f"prefix must be at most the full size."
                )
            if model_name is not None and (not isinstance(model_name, str) or not model_name):
                raise ValueError(f"model_name={model_name!r} must be a non-empty string.")
            self.header_: dict[str, Any] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "model_name": model_name or "unknown",
                "dim": dim,
                "shortlist_size": shortlist_size,
                "normalize": True if normalize is None else bool(normalize),
                "hnsw_m": positive_int(hnsw_m, "hnsw_m"),
                "ef_construction": positive_int(ef_construction, "ef_construction"),
                "complete": True,  # an empty store is complete; ingest() marks its build
            }
            self._set_fields()
            return True
        self._check_format(stored, where)
        self.header_ = stored
        h = stored
        if model_name is not None and model_name != h["model_name"]:
            if h["model_name"] == "unknown":
                message = (
                    f"model_name={model_name!r} but {where} does not record its model "
                    f"(model_name 'unknown'): re-create it with model_name={model_name!r}, or "
                    "pass allow_model_mismatch=True."
                )
            else:
                message = (
                    f"model_name={model_name!r} but {where} holds embeddings of model "
                    f"{h['model_name']!r}: embed with {h['model_name']!r}, or use another name "
                    f"for {model_name!r} (allow_model_mismatch=True to go on)."
                )
            if not allow_model_mismatch:
                raise ValueError(message)
            warnings.warn(f"{message} Opening it anyway (allow_model_mismatch).", stacklevel=3)
        if dim is not None and dim != h["dim"]:
            raise ValueError(
                f"dim={dim} but {where} holds vectors of size d={h['dim']}: pass dim={h['dim']} "
                f"(or None), or use another name."
            )
        if shortlist_size is not None and shortlist_size != h["shortlist_size"]:
            raise ValueError(
                f"shortlist_size={shortlist_size} but {where} indexes prefixes of size "
                f"m_s={h['shortlist_size']}: pass shortlist_size={h['shortlist_size']} (or "
                f"None), or use another name."
            )
        if normalize is not None and bool(normalize) != h["normalize"]:
            raise ValueError(
                f"normalize={normalize} but {where} was built with normalize={h['normalize']}: "
                f"pass normalize={h['normalize']} (or None)."
            )
        self._set_fields()
        return False

    @staticmethod
    def _check_format(stored: dict[str, Any], where: str) -> None:
        if stored.get("format") != FORMAT or stored.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where} exists but was not written by matryoshka (header {stored!r}): pick "
                f"another name or drop it."
            )

    def _set_fields(self) -> None:
        h = self.header_
        self.model_name: str = h["model_name"]
        self.dim: int = int(h["dim"])
        self.shortlist_size: int = int(h["shortlist_size"])
        self.normalize: bool = bool(h["normalize"])

    def _header_json(self) -> str:
        return json.dumps(self.header_, sort_keys=True)

    # -- the funnel ------------------------------------------------------------------------------
    @property
    def spec(self) -> FunnelSpec:
        """The current funnel (``shortlist_k``, ``rerank``, ``keep`` are settable), validated
        against ``dim`` by :meth:`FunnelSpec.validate`, the same rules as the in-memory funnel."""
        spec = FunnelSpec(self.shortlist_size, self.shortlist_k, self.rerank, self.keep)
        return spec.validate(self.dim)

    def keeps(self, k: int) -> tuple[int, ...]:
        """``spec.keeps(k)``: candidates entering each rerank stage, ``k'`` first, ``k`` last."""
        return self.spec.keeps(k)

    # -- validation --------------------------------------------------------------------------------
    def _vectors(self, x: Any, name: str) -> np.ndarray:
        """``(n, d)`` float32 (one ``(d,)`` vector allowed); a clear error on any other length."""
        arr = np.asarray(x)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(
                f"{name}.shape={np.shape(x)} but {self.where} holds vectors of size d={self.dim}:"
                f" pass ({'n' if name == 'vectors' else 'Q'}, {self.dim}) embeddings from "
                f"{self.model_name!r}."
            )
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name}.dtype={arr.dtype}: pass numeric (float) embeddings.")
        arr = np.ascontiguousarray(arr, np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf: pass finite embeddings.")
        return arr

    @staticmethod
    def _ids(ids: Any, n: int | None = None) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr[None]
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids={ids!r}: pass a 1-d sequence of non-negative ints.")
        arr = arr.astype(np.int64)
        if n is not None and arr.shape[0] != n:
            raise ValueError(
                f"ids has {arr.shape[0]} entries but vectors has {n} rows: one id per row."
            )
        if arr.size and arr.min() < 0:
            raise ValueError(
                f"ids contain {int(arr.min())}: ids must be >= 0 (-1 means no result)."
            )
        if np.unique(arr).shape[0] != arr.shape[0]:
            raise ValueError("ids contain duplicates: pass each id once per call.")
        return arr

    # -- public API ------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """Human-readable location, e.g. ``milvus collection 'x' at ./corpus.db``."""
        return f"{self.backend} store {self.name!r}"

    @property
    def location(self) -> str:
        """The URI/URL of the database, without a password."""
        return ""

    @property
    def complete(self) -> bool:
        """False while a build (:meth:`ingest`) has not finished: rows are missing and the ANN
        index is not built. Stores written before builds were recorded count as complete."""
        return bool(self.header_.get("complete", True))

    @property
    def expected_rows(self) -> int | None:
        """Rows of the last :meth:`ingest` (``N``, ids ``0..N-1``); ``None`` if never ingested."""
        n = self.header_.get("expected_rows")
        return None if n is None else int(n)

    def check_complete(self) -> None:
        """Raise :class:`IncompleteStoreError` if a build of this store did not finish."""
        if self.complete:
            return
        rows, expected = self.ntotal, int(self.header_.get("expected_rows") or 0)
        raise IncompleteStoreError(
            f"{self.where} is incomplete: {rows} of {expected} rows were written and its ANN "
            f"index is not built (its build was interrupted, or is still running), so it "
            f"cannot be searched. Finish it with ingest(vectors, resume=True) on the same "
            f"vectors (continues from the rows written), or open it with overwrite=True and "
            f"ingest again (drops it and rebuilds).",
            self,
            rows,
            expected,
        )

    def ingest(
        self, vectors: Any, *, resume: bool = False, source: str | None = None
    ) -> DatabaseFunnel:
        """Build the store from ``(N, d)`` embeddings under ids ``0..N-1``, crash-safely.

        The header is marked incomplete (with ``N`` and ``source``) before the first row is
        written; rows go in batches of ``batch_size`` (a progress bar when ``progress``); the
        ANN index is built once, after the last row; then the header is marked complete. A
        killed build leaves the store incomplete, which :meth:`search` refuses.

        Args:
            vectors: ``(N, d)`` embeddings (a memory-mapped array is read batch by batch).
            resume: continue an interrupted build of the same vectors: the stored header must
                match (checked on opening: model, ``d``, ``m_s``, normalisation; here ``N`` and
                the HNSW parameters), a sample of the rows already written must equal
                ``vectors`` at their ids, and only the missing ids are written.
            source: where ``vectors`` come from (e.g. the ``.npy`` path), recorded in the header
                so that an error on an incomplete store can say how to finish it.

        Raises:
            StoreExistsError: the store already existed (a build, complete or not, or rows
                written with :meth:`add`) and ``resume`` is False.
            ValueError: ``resume`` onto a store built from other vectors or parameters.
        """
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"vectors.shape={x.shape} but {self.where} holds vectors of size d={self.dim}: "
                f"pass (N, {self.dim}) embeddings from {self.model_name!r}."
            )
        n = int(x.shape[0])
        present = np.zeros(0, np.int64)
        if not self.created_:
            rows = self.ntotal
            if not resume and (rows or not self.complete):
                state = (
                    f"complete, {rows} rows"
                    if self.complete
                    else f"incomplete: {rows} of {self.expected_rows} rows"
                )
                raise StoreExistsError(
                    f"{self.where} already exists ({state}): resume its build with the same "
                    f"vectors (resume=True), or open it with overwrite=True to drop it and "
                    f"rebuild.",
                    where=self.where,
                    rows=rows,
                    expected=self.expected_rows,
                    complete=self.complete,
                )
            if resume:
                present = self._check_resume(x)
        h = self.header_
        h.update(complete=False, expected_rows=n, source=source)
        self._store_header()
        self.created_ = False  # from here on the store holds a build: a second ingest resumes
        todo = np.setdiff1d(np.arange(n, dtype=np.int64), present, assume_unique=True)
        if todo.size:
            self._before_rows()
        step = max(1, self.batch_size)
        with tqdm(
            total=n,
            initial=n - todo.size,
            desc=f"{self.backend} {self.name}",
            unit="rows",
            disable=not self.progress,
        ) as bar:
            for s in range(0, todo.size, step):
                ib = todo[s : s + step]
                contiguous = ib[-1] - ib[0] + 1 == ib.size
                xb = x[ib[0] : ib[-1] + 1] if contiguous else x[ib]  # a slice reads a mmap once
                self._write_batch(self._vectors(xb, "vectors"), ib)
                bar.update(ib.size)
        rows = self.ntotal
        if rows != n:
            raise ValueError(
                f"{self.where} holds {rows} rows after writing ids 0..{n - 1}: rows with other "
                f"ids were added during the build; open it with overwrite=True and ingest again."
            )
        self._finish(n)  # the ANN index, once
        h["complete"] = True
        self._store_header()
        return self

    def _check_resume(self, x: np.ndarray) -> np.ndarray:
        """The ids already written (sorted), after checking that resuming onto them is sound."""
        n, h = int(x.shape[0]), self.header_
        if h.get("expected_rows") is not None and int(h["expected_rows"]) != n:
            raise ValueError(
                f"resume: {self.where} was being built from {h['expected_rows']} rows but "
                f"vectors has {n}: resume with the same embeddings, or overwrite the store."
            )
        for key, value in self._build_params.items():
            if int(h[key]) != int(value):
                raise ValueError(
                    f"resume: {self.where} was started with {key}={h[key]} but {key}={value} "
                    f"was given: pass {key}={h[key]}, or overwrite the store."
                )
        present = np.sort(self._present(n))
        if present.size:
            sample = present[np.unique(np.linspace(0, present.size - 1, 16).astype(np.int64))]
            stored = self._fetch(sample)  # (s, d)
            given = np.ascontiguousarray(x[sample], np.float32)
            bad = ~np.all(stored == given, axis=1)
            if bad.any():
                raise ValueError(
                    f"resume: row {int(sample[bad][0])} in {self.where} differs from "
                    f"vectors[{int(sample[bad][0])}]: it was built from other embeddings; "
                    f"resume with the same embeddings, or overwrite the store."
                )
        return present

    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """Insert ``(n, d)`` embeddings under new ``ids`` (default: after the largest id); the ids."""
        self.check_complete()
        x = self._vectors(vectors, "vectors")
        if ids is None:
            start = self._next_id()
            idv = np.arange(start, start + x.shape[0], dtype=np.int64)
        else:
            idv = self._ids(ids, x.shape[0])
        self._write(x, idv, upsert=False)
        return idv

    def upsert(self, vectors: Any, ids: Any) -> DatabaseFunnel:
        """Insert or replace ``(n, d)`` embeddings by id. Returns self."""
        self.check_complete()
        x = self._vectors(vectors, "vectors")
        self._write(x, self._ids(ids, x.shape[0]), upsert=True)
        return self

    def delete(self, ids: Any) -> int:
        """Delete items by id; returns how many existed."""
        idv = self._ids(ids)
        return self._delete(idv) if idv.size else 0

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` through the funnel: ``(Q, d) -> scores (Q, k) float32, ids (Q, k) int64``."""
        self.check_complete()
        k = positive_int(k, "k")
        spec = self.spec
        positive_int(self.ef_search, "ef_search")
        keeps = spec.keeps(k)
        q = self._vectors(queries, "queries")
        scores = np.full((q.shape[0], k), NO_SCORE, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        if q.shape[0]:
            self._search(q, spec, keeps, scores, ids)
        return scores, ids

    def prefix(self, x: np.ndarray, m: int) -> np.ndarray:
        """``(n, d) -> (n, m)`` float32 prefix, unit-normalised when ``normalize``."""
        return truncate_numpy(x, m, normalize=self.normalize)

    def header(self) -> dict[str, Any]:
        """The stored header (model name, sizes, normalisation, index build parameters)."""
        return dict(self.header_)

    def __enter__(self) -> DatabaseFunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, model_name={self.model_name!r}, dim={self.dim}, "
            f"shortlist_size={self.shortlist_size}, normalize={self.normalize}, "
            f"shortlist_k={self.shortlist_k}, rerank={self.rerank})"
        )

    # -- to implement ------------------------------------------------------------------------------
    name: str
    batch_size: int
    progress: bool
    shortlist_k: int
    rerank: Sequence[int] | None
    keep: Sequence[int] | None
    ef_search: int

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of items stored."""

    @abstractmethod
    def _next_id(self) -> int: ...

    @abstractmethod
    def _write(self, x: np.ndarray, ids: np.ndarray, upsert: bool) -> None: ...

    @abstractmethod
    def _delete(self, ids: np.ndarray) -> int: ...

    @abstractmethod
    def _store_header(self) -> None:
        """Write ``header_`` to the database (collection property / table comment)."""

    @abstractmethod
    def _present(self, n: int) -> np.ndarray:
        """The ids in ``0..n-1`` that are stored, ``(p,)`` int64."""

    @abstractmethod
    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        """The stored full vectors ``(len(ids), d)`` float32 of existing ``ids``, in that order."""

    @abstractmethod
    def _write_batch(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Insert one batch ``(b, d)`` under ``(b,)`` ids known to be absent (one request or
        transaction: after a crash a batch is there whole or not at all, or row by row)."""

    def _before_rows(self) -> None:
        """Before :meth:`ingest` writes rows: e.g. drop an ANN index a resumed store may hold,
        so that :meth:`_finish` builds it once over all rows instead of inserting into it.
        Nothing by default."""
        return None

    @abstractmethod
    def _finish(self, n: int) -> None:
        """After :meth:`ingest` wrote ids ``0..n-1``: build the ANN index and make the store
        searchable (blocking until it is)."""

    @abstractmethod
    def _search(
        self,
        q: np.ndarray,
        spec: FunnelSpec,
        keeps: tuple[int, ...],
        scores: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        """Fill ``scores``/``ids`` ``(Q, k)`` in place for validated ``(Q, d)`` queries, through
        the validated ``spec`` whose stages keep ``keeps`` (:meth:`FunnelSpec.keeps`)."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (the data stays)."""

    @abstractmethod
    def drop(self) -> None:
        """Delete the collection/table and everything in it."""
