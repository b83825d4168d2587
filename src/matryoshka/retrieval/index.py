"""Vector indexes over one prefix size of Matryoshka embeddings: exact and FAISS backends.

An index stores the size-``m`` prefix ``z[:, :m]`` of every corpus vector (unit-normalised when
``normalize=True``, so inner product is cosine similarity) and answers
``search(queries, k) -> (scores, ids)`` in FAISS conventions: both ``(Q, k)``, best first, ids
``int64`` with ``-1`` (and score ``-FLT_MAX``) where fewer than ``k`` results exist. Vectors of any
size ``>= m`` may be given to ``add`` and ``search``; they are cut with :func:`truncate_numpy`.

Backends (:func:`make_index`):

* ``exact``: brute-force inner product in torch (or numpy), batched over queries and corpus
  blocks so the score matrix never exceeds ``memory_limit`` bytes.
* ``faiss-flat``, ``faiss-hnsw``, ``faiss-ivf``: FAISS ``IndexFlatIP``, ``IndexHNSWFlat`` and
  ``IndexIVFFlat`` with the inner-product metric (optional extra: ``pip install 'matryoshka[faiss]'``).
* ``binary``, ``binary-hnsw``, ``sq8``, ``sq8-hnsw``, ``rabitq``: quantized codes of the prefix for cheap
  funnel shortlists (FAISS too), see :mod:`matryoshka.retrieval.codes`.

``save(path)`` writes one safetensors file (no pickle) whose metadata holds a JSON header with the
backend, model name, size ``m``, normalisation, vector count, parameters and a SHA-256 checksum
of the payload; the write is atomic (temp file, fsync, ``os.replace``). :func:`load_index`
verifies all of it and raises a clear error on corruption or on a model/size mismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka._validate import positive_int
from matryoshka.io import atomic_write_bytes

__all__ = [
    "BACKENDS",
    "CODE_BACKENDS",
    "ExactIndex",
    "FaissIndex",
    "VectorIndex",
    "add_in_chunks",
    "import_faiss",
    "is_graph",
    "load_index",
    "make_index",
]

#: quantized shortlist backends, implemented in :mod:`matryoshka.retrieval.codes`
CODE_BACKENDS = ("binary", "binary-hnsw", "sq8", "sq8-hnsw", "rabitq")
BACKENDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", *CODE_BACKENDS)
FORMAT = "matryoshka-index"
FORMAT_VERSION = 1
_META_KEY = "matryoshka_index"
CHUNK_ROWS = 65536  # rows added at a time by add_in_chunks: bounds the float32 copy of a chunk
#: HNSW defaults of every backend (FAISS, Milvus, pgvector) and of ``mrl index build``.
HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 32, 200, 128
NO_SCORE = float(-np.finfo(np.float32).max)  # FAISS's score for a missing result (inner product)


def import_faiss() -> Any:
    """Import ``faiss`` lazily; a clear error naming the extra when it is not installed."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "The FAISS backends need faiss, which is not installed: "
            "pip install 'matryoshka[faiss]' (or pip install faiss-cpu), or use backend='exact'."
        ) from e
    return faiss


def _as_matrix(x: Any, dim: int, name: str) -> np.ndarray:
    """Validate ``(n, D)`` with ``D >= dim``; return its size-``dim`` prefix, float32, C order."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"{name}.shape={arr.shape}: pass a (n, d) matrix of embeddings (or one (d,) vector)."
        )
    if arr.shape[1] < dim:
        raise ValueError(
            f"{name}.shape={arr.shape} has {arr.shape[1]} dimensions but the index holds prefixes "
            f"of size m={dim}: pass embeddings with at least {dim} dimensions (or build the "
            f"index with a smaller size)."
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}.dtype={arr.dtype}: pass numeric (float) embeddings.")
    return arr


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


class VectorIndex(ABC):
    """Common interface of every backend: ``add``, ``search``, ``save``, and a header.

    Args:
        dim: the prefix size ``m`` stored in the index.
        model_name: the embedding model, recorded in the saved header and checked on load.
        normalize: unit-normalise each size-``m`` prefix (cosine similarity) before indexing and
            searching; ``False`` searches raw inner products.
    """

    backend: str = ""

    def __init__(self, dim: int, *, model_name: str = "unknown", normalize: bool = True) -> None:
        self.dim = positive_int(dim, "dim")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name={model_name!r} must be a non-empty string.")
        self.model_name = model_name
        self.normalize = bool(normalize)

    # -- to implement --------------------------------------------------------------------------
    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Approximate memory size of the index in bytes."""

    @abstractmethod
    def _add(self, x: np.ndarray) -> None: ...

    @abstractmethod
    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def _payload(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Backend parameters, JSON-ready (recorded in the saved header)."""

    # -- shared --------------------------------------------------------------------------------
    def prepare(self, x: Any, name: str = "vectors") -> np.ndarray:
        """Cut ``(n, D)`` embeddings (``D >= m``) to the stored form ``(n, m)`` float32."""
        arr = _as_matrix(x, self.dim, name)
        from matryoshka.ops import truncate_numpy  # torch: imported when vectors arrive

        return truncate_numpy(arr, self.dim, normalize=self.normalize)

    def add(self, vectors: Any) -> VectorIndex:
        """Append ``(n, D)`` embeddings (``D >= m``); ids continue from :attr:`ntotal`. Returns self."""
        x = self.prepare(vectors, "vectors")
        if x.shape[0]:
            self._add(x)
        return self

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(Q, D) -> scores (Q, k) float32, ids (Q, k) int64``.

        Best first; where fewer than ``k`` vectors are found, ids are ``-1`` and scores ``-FLT_MAX``.
        """
        k = positive_int(k, "k")
        q = self.prepare(queries, "queries")
        if self.ntotal == 0:
            raise ValueError(
                "the index is empty (ntotal=0): add vectors with index.add(vectors) before search."
            )
        if q.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        scores, ids = self._search(q, k)
        return np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64)

    def header(self) -> dict[str, Any]:
        """The JSON header written by :meth:`save` (without the checksum)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backend": self.backend,
            "model_name": self.model_name,
            "dim": self.dim,
            "normalize": self.normalize,
            "ntotal": self.ntotal,
            "params": self.params(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to one safetensors file (atomically) and return its path."""
        path = Path(path)
        payload = self._payload()
        header = self.header()
        header["sha256"] = {name: _sha256(arr) for name, arr in payload.items()}
        from safetensors.numpy import save as st_save

        atomic_write_bytes(path, st_save(payload, metadata={_META_KEY: json.dumps(header)}))
        return path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, dim={self.dim}, "
            f"ntotal={self.ntotal}, model_name={self.model_name!r}, normalize={self.normalize})"
        )


class ExactIndex(VectorIndex):
    """Brute-force inner-product search, batched and memory-bounded.

    Args:
        dim, model_name, normalize: see :class:`VectorIndex`.
        engine: ``"torch"`` (matmul + ``topk``; fastest on CPU) or ``"numpy"`` (matmul +
            ``argpartition``).
        memory_limit: upper bound in bytes of the score matrix computed at once; the corpus is
            scanned in blocks and queries in batches so that ``batch * block * 4 <= memory_limit``.

    Stores the corpus as one ``(n, m)`` float32 matrix.
    """

    backend = "exact"

    def __init__(
        self,
        dim: int,
        *,
        model_name: str = "unknown",
        normalize: bool = True,
        engine: str = "torch",
        memory_limit: int = 256 * 2**20,
    ) -> None:
        super().__init__(dim, model_name=model_name, normalize=normalize)
        if engine not in ("torch", "numpy"):
            raise ValueError(f"engine={engine!r} is not supported: use 'torch' or 'numpy'.")
        self.engine = engine
        self.memory_limit = positive_int(memory_limit, "memory_limit")
        self._chunks: list[np.ndarray] = []
        self._x = np.empty((0, self.dim), np.float32)

    @property
    def vectors(self) -> np.ndarray:
        """The stored prefixes ``(n, m)`` float32 (normalised if ``normalize``)."""
        if self._chunks:
            self._x = np.concatenate([self._x, *self._chunks])
            self._chunks = []
        return self._x

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0] + sum(c.shape[0] for c in self._chunks))

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4

    def params(self) -> dict[str, Any]:
        return {"engine": self.engine, "memory_limit": self.memory_limit}

    def _add(self, x: np.ndarray) -> None:
        self._chunks.append(x)

    def _payload(self) -> dict[str, np.ndarray]:
        return {"vectors": self.vectors}

    def _batches(self, n_queries: int) -> tuple[int, int]:
        """(query batch, corpus block) sizes with ``batch * block * 4 <= memory_limit``."""
        n = self.ntotal
        cells = max(1, self.memory_limit // 4)
        block = min(n, max(1, cells // min(n_queries, 64)))  # at least 64 queries per batch
        batch = max(1, min(n_queries, cells // block))
        return batch, block

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.vectors
        n = x.shape[0]
        kk = min(k, n)
        scores = np.full((q.shape[0], k), NO_SCORE, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        batch, block = self._batches(q.shape[0])
        for qs in range(0, q.shape[0], batch):
            qb = q[qs : qs + batch]  # (b, m)
            best_s: np.ndarray | None = None
            best_i: np.ndarray | None = None
            for xs in range(0, n, block):
                s, i = self._block_topk(qb, x[xs : xs + block], kk)  # (b, <=kk)
                i += xs
                if best_s is None or best_i is None:
                    best_s, best_i = s, i
                    continue
                s = np.concatenate([best_s, s], axis=1)  # (b, 2kk)
                i = np.concatenate([best_i, i], axis=1)
                order = np.argsort(-s, axis=1, kind="stable")[:, :kk]
                best_s = np.take_along_axis(s, order, 1)
                best_i = np.take_along_axis(i, order, 1)
            assert best_s is not None  # n > 0 is checked by search()
            assert best_i is not None
            scores[qs : qs + batch, :kk] = best_s
            ids[qs : qs + batch, :kk] = best_i
        return scores, ids

    def _block_topk(self, q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``q @ x.T`` per row, sorted: ``(b, m), (nb, m) -> (b, k), (b, k)``."""
        k = min(k, x.shape[0])
        if self.engine == "torch":
            import torch

            s = torch.from_numpy(q) @ torch.from_numpy(x).T  # (b, nb)
            top = torch.topk(s, k, dim=1, largest=True, sorted=True)
            return top.values.numpy(), top.indices.numpy().astype(np.int64)
        s = q @ x.T  # (b, nb)
        if k < s.shape[1]:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]  # (b, k), unsorted
        else:
            part = np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1).astype(np.int64)


class FaissIndex(VectorIndex):
    """A FAISS inner-product index: ``kind`` is ``"flat"``, ``"hnsw"`` or ``"ivf"``.

    Args:
        dim, model_name, normalize: see :class:`VectorIndex`.
        kind: ``"flat"`` (``IndexFlatIP``, exact), ``"hnsw"`` (``IndexHNSWFlat``) or ``"ivf"``
            (``IndexIVFFlat``; trained on the first ``add``, which must bring ``>= nlist`` vectors).
        hnsw_m: HNSW graph degree ``M``.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW search beam width (raised to ``k`` when smaller); settable after build.
        nlist: IVF cells; ``None`` picks ``round(4 * sqrt(n))`` on the first ``add``.
        nprobe: IVF cells visited per query; settable after build.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "hnsw",
        model_name: str = "unknown",
        normalize: bool = True,
        hnsw_m: int = HNSW_M,
        ef_construction: int = EF_CONSTRUCTION,
        ef_search: int = EF_SEARCH,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        super().__init__(dim, model_name=model_name, normalize=normalize)
        if kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"kind={kind!r} is not a FAISS backend: use 'flat', 'hnsw' or 'ivf'.")
        self.kind = kind
        self.backend = f"faiss-{kind}"
        self.hnsw_m = positive_int(hnsw_m, "hnsw_m")
        self.ef_construction = positive_int(ef_construction, "ef_construction")
        self.ef_search = positive_int(ef_search, "ef_search")
        self.nlist = None if nlist is None else positive_int(nlist, "nlist")
        self.nprobe = positive_int(nprobe, "nprobe")
        self._faiss = import_faiss()
        self._index: Any = None if kind == "ivf" else self._new_index()

    def _new_index(self, nlist: int | None = None) -> Any:
        faiss = self._faiss
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        quantizer = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)

    @property
    def faiss_index(self) -> Any:
        """The underlying ``faiss.Index`` (``None`` for an IVF index before its first ``add``)."""
        return self._index

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        if self._index is None:
            return 0
        return int(self._faiss.serialize_index(self._index).nbytes)

    def params(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
        }

    def _add(self, x: np.ndarray) -> None:
        if self._index is None:  # IVF: train on the first batch
            nlist = self.nlist or max(1, round(4 * math.sqrt(x.shape[0])))
            if x.shape[0] < nlist:
                raise ValueError(
                    f"the first add() to an IVF index brings {x.shape[0]} vectors but nlist={nlist}:"
                    f" IVF is trained on the first batch and needs at least nlist vectors; add more"
                    f" vectors at once or pass a smaller nlist."
                )
            self.nlist = nlist
            index = self._new_index(nlist)
            index.train(x)
            self._index = index
        self._index.add(x)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        elif self.kind == "ivf":
            self._index.nprobe = min(self.nprobe, self.nlist or self.nprobe)
        scores, ids = self._index.search(q, k)
        return scores, ids

    def _payload(self) -> dict[str, np.ndarray]:
        if self._index is None:
            return {"faiss": np.empty(0, np.uint8)}
        return {"faiss": np.asarray(self._faiss.serialize_index(self._index), np.uint8)}

    def _restore(self, blob: np.ndarray) -> None:
        self._index = None if blob.size == 0 else self._faiss.deserialize_index(blob)


def is_graph(index: VectorIndex) -> bool:
    """Whether ``index`` is an HNSW graph (``faiss-hnsw``, ``binary-hnsw``, ``sq8-hnsw``), whose
    search beam ``ef_search`` can be set between searches."""
    return getattr(index, "kind", None) == "hnsw" and hasattr(index, "ef_search")


def make_index(
    backend: str,
    dim: int,
    *,
    model_name: str = "unknown",
    normalize: bool = True,
    **params: Any,
) -> VectorIndex:
    """An empty index of the named backend (one of :data:`BACKENDS`) over prefixes of size ``dim``.

    ``params`` go to the backend: ``engine``/``memory_limit`` for ``exact``; ``hnsw_m``,
    ``ef_construction``, ``ef_search`` for HNSW; ``nlist``, ``nprobe`` for IVF.
    """
    if backend == "exact":
        return ExactIndex(dim, model_name=model_name, normalize=normalize, **params)
    if backend in CODE_BACKENDS:
        from matryoshka.retrieval.codes import make_code_index

        return make_code_index(backend, dim, model_name=model_name, normalize=normalize, **params)
    if backend in BACKENDS:
        kind = backend.removeprefix("faiss-")
        return FaissIndex(dim, kind=kind, model_name=model_name, normalize=normalize, **params)
    raise ValueError(f"backend={backend!r} is not known: use one of {list(BACKENDS)}.")


def add_in_chunks(
    index: VectorIndex,
    x: np.ndarray,
    *,
    step: int = CHUNK_ROWS,
    progress: bool = False,
    desc: str = "index",
) -> VectorIndex:
    """Add the rows of ``x`` ``(N, D)`` (``D >= index.dim``; e.g. a memory-mapped ``.npy``) to
    ``index`` ``step`` rows at a time, so only one chunk is ever copied to float32. Returns it.

    An IVF index is trained on its first chunk, which must hold at least ``nlist`` vectors, so
    ``step`` is raised to ``nlist`` when smaller. ``progress`` shows a bar labelled ``desc``.
    """
    step = positive_int(step, "step")
    step = max(step, index.params().get("nlist") or 0)
    n = int(np.shape(x)[0])
    for s in tqdm(range(0, n, step), desc=desc, disable=not progress, leave=False):
        index.add(x[s : s + step])
    return index


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid matryoshka index file ({why}): it may be truncated or corrupted; "
        f"rebuild it with `mrl index build` or VectorIndex.save()."
    )


def load_index(
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    dim: int | None = None,
    normalize: bool | None = None,
    allow_model_mismatch: bool = False,
) -> VectorIndex:
    """Load an index written by :meth:`VectorIndex.save`, verifying header and checksum.

    ``model_name``, ``dim`` and ``normalize``, when given, must match the header (the model and
    prefix size the queries will come from); a mismatch raises ``ValueError`` naming both values.
    A header whose model is ``"unknown"`` does not match a given ``model_name`` either.
    ``allow_model_mismatch=True`` turns a model mismatch into a ``UserWarning`` (the index is
    loaded as it is); the size and normalisation checks stay.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} does not exist: build an index first.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for malformed files
        raise _corrupt(path, f"unreadable safetensors file: {e}") from e
    if _META_KEY not in meta:
        raise _corrupt(path, "no matryoshka index header")
    try:
        header = json.loads(meta[_META_KEY])
        backend, hdim, hmodel = header["backend"], int(header["dim"]), str(header["model_name"])
        hnorm, ntotal, hparams = bool(header["normalize"]), int(header["ntotal"]), header["params"]
        checksums = dict(header["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"malformed header: {e}") from e
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise _corrupt(path, f"format {header.get('format')!r} v{header.get('version')!r}")
    if set(checksums) != set(tensors):
        raise _corrupt(path, f"payload {sorted(tensors)} does not match header {sorted(checksums)}")
    for name, arr in tensors.items():
        if _sha256(arr) != checksums[name]:
            raise _corrupt(path, f"checksum mismatch in {name!r}")
    if model_name is not None and model_name != hmodel:
        if hmodel == "unknown":
            message = (
                f"model_name={model_name!r} but the index at {path} does not record its model "
                f"(model_name 'unknown'): rebuild it with `mrl index build --model-name "
                f"{model_name}`, or pass allow_model_mismatch=True (--allow-model-mismatch)."
            )
        else:
            message = (
                f"model_name={model_name!r} but the index at {path} was built from model "
                f"{hmodel!r}: embed the queries with {hmodel!r} or rebuild the index for "
                f"{model_name!r} (allow_model_mismatch=True / --allow-model-mismatch to go on)."
            )
        if not allow_model_mismatch:
            raise ValueError(message)
        warnings.warn(f"{message} Loading it anyway (allow_model_mismatch).", stacklevel=2)
    if dim is not None and dim != hdim:
        raise ValueError(
            f"dim={dim} but the index at {path} holds prefixes of size m={hdim}: "
            f"load it with dim={hdim} or rebuild the index with --dim {dim}."
        )
    if normalize is not None and normalize != hnorm:
        raise ValueError(
            f"normalize={normalize} but the index at {path} was built with normalize={hnorm}: "
            f"use normalize={hnorm} or rebuild the index."
        )
    if backend not in BACKENDS:
        raise _corrupt(path, f"unknown backend {backend!r}")
    index: VectorIndex
    if backend == "exact":
        index = ExactIndex(hdim, model_name=hmodel, normalize=hnorm, **hparams)
        vec = tensors.get("vectors")
        if vec is None or vec.ndim != 2 or vec.shape[1] != hdim:
            raise _corrupt(path, "vector payload has the wrong shape")
        index._x = np.ascontiguousarray(vec, np.float32)
    elif backend in CODE_BACKENDS:
        from matryoshka.retrieval.codes import restore_code_index

        index = restore_code_index(backend, hdim, hmodel, hnorm, hparams, tensors, path)
    else:
        faiss_index = FaissIndex(hdim, model_name=hmodel, normalize=hnorm, **hparams)
        faiss_index._restore(tensors["faiss"])
        index = faiss_index
    if index.ntotal != ntotal:
        raise _corrupt(path, f"header says {ntotal} vectors, payload holds {index.ntotal}")
    return index
