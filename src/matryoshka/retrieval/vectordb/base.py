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

from matryoshka._validate import positive_int
from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.funnel import FunnelSpec
from matryoshka.retrieval.index import NO_SCORE

__all__ = ["FORMAT", "FORMAT_VERSION", "DatabaseFunnel", "check_name"]

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


class DatabaseFunnel(ABC):
    """Shared part of the database backends: header checks, validation, the funnel spec.

    A store is an index over the full vectors like
    :class:`~matryoshka.retrieval.funnel.FunnelRetriever`: ``dim``, ``ntotal``, ``normalize`` and
    ``search(queries, k) -> (scores, ids)``.

    Subclasses open the database in ``__init__``, then call :meth:`_setup` with the stored header
    (``None`` when the collection/table does not exist yet).

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
    ) -> bool:
        """Check or create the header; returns True if the store must be created.

        An existing store whose header names another model than ``model_name`` (or
        ``"unknown"``, which cannot be checked) is refused with a ``ValueError`` naming both,
        unless ``allow_model_mismatch`` (then a ``UserWarning``).
        """
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
            }
            self._set_fields()
            return True
        if stored.get("format") != FORMAT or stored.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{where} exists but was not written by matryoshka (header {stored!r}): pick "
                f"another name or drop it."
            )
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

    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """Insert ``(n, d)`` embeddings under new ``ids`` (default: after the largest id); the ids."""
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
        x = self._vectors(vectors, "vectors")
        self._write(x, self._ids(ids, x.shape[0]), upsert=True)
        return self

    def delete(self, ids: Any) -> int:
        """Delete items by id; returns how many existed."""
        idv = self._ids(ids)
        return self._delete(idv) if idv.size else 0

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` through the funnel: ``(Q, d) -> scores (Q, k) float32, ids (Q, k) int64``."""
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
