"""Quantized shortlist backends: 1-bit sign codes, 8-bit scalar codes (flat or in an HNSW graph)
and RaBitQ over a prefix.

Each backend is a :class:`~matryoshka.retrieval.index.VectorIndex` over the size-``m`` prefix
(unit-normalised when ``normalize=True``) that stores a compressed code per vector instead of
``m`` floats, for the cheap first stage of a funnel whose rerank reads full-precision prefixes
(:class:`~matryoshka.retrieval.funnel.FunnelRetriever`). FAISS conventions as every index:
``search(queries, k) -> (scores, ids)``, both ``(Q, k)``, best first, ``-1`` / ``NO_SCORE`` padded.

Backends (:func:`make_code_index`, also reachable through
:func:`~matryoshka.retrieval.index.make_index`):

* ``binary``: one bit per dimension, ``bit_j = 1`` iff ``x_j > 0`` (:func:`sign_codes`, packed
  little-endian into ``ceil(m / 8)`` bytes, padding bits 0), searched by Hamming distance with
  FAISS ``IndexBinaryFlat`` (exact over the codes). The score is the number of **matching bits**
  ``m - hamming(q, x)`` (float32, in ``[0, m]``): a monotone map of Hamming distance, so higher is
  better as for inner products. Normalisation does not change signs, so ``normalize`` only
  matters for the float queries' validation.
* ``binary-hnsw``: the same codes and scores in FAISS ``IndexBinaryHNSW`` (approximate).
* ``sq8`` / ``sq8-hnsw``: FAISS ``IndexScalarQuantizer`` with ``QT_8bit`` (or ``IndexHNSWSQ``,
  an HNSW graph over the same codes: a compact sublinear shortlist), inner product. Trained on the first
  ``add`` (per-dimension ``vmin``, ``vdiff = vmax - vmin``); the code of ``x_j`` is
  ``floor(255 * clip((x_j - vmin_j) / vdiff_j, 0, 1))`` (:func:`sq8_codes`), decoded as
  ``vmin_j + (c_j + 0.5) / 255 * vdiff_j``; the score is ``<q, decode(x)>`` with the float query.
* ``rabitq``: FAISS ``IndexRaBitQ`` (1 bit per dimension plus two float factors per vector, an
  unbiased inner-product estimate), after a fixed random rotation (``rotate=True``, as the method
  assumes); ``qb`` bits per query coordinate (``0``: float queries). Trained on the first ``add``
  (the centroid). Needs a FAISS with ``IndexRaBitQ`` (>= 1.11).

All are saved by :meth:`VectorIndex.save` into the same checked safetensors artefact (payload:
the serialised FAISS index) and restored by :func:`~matryoshka.retrieval.index.load_index`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka._validate import positive_int
from matryoshka.retrieval.index import (
    CODE_BACKENDS,
    EF_CONSTRUCTION,
    EF_SEARCH,
    HNSW_M,
    NO_SCORE,
    VectorIndex,
    import_faiss,
)

__all__ = [
    "CODE_BACKENDS",
    "BinaryIndex",
    "RaBitQIndex",
    "SQ8Index",
    "make_code_index",
    "restore_code_index",
    "sign_codes",
    "sq8_codes",
]


def sign_codes(x: np.ndarray) -> np.ndarray:
    """1-bit sign codes: ``(n, m)`` float -> ``(n, ceil(m / 8))`` uint8, bit ``j`` = ``x_j > 0``,
    packed little-endian within each byte (bit ``j`` is bit ``j % 8`` of byte ``j // 8``)."""
    return np.packbits(np.asarray(x) > 0, axis=1, bitorder="little")


def sq8_codes(x: np.ndarray, vmin: np.ndarray, vdiff: np.ndarray) -> np.ndarray:
    """The ``sq8`` codes of ``(n, m)`` vectors for per-dimension ``vmin``, ``vdiff`` ``(m,)``:
    ``floor(255 * clip((x - vmin) / vdiff, 0, 1))`` as ``(n, m)`` uint8."""
    u = np.clip((np.asarray(x, np.float32) - vmin) / vdiff, 0.0, 1.0)
    return np.minimum(np.floor(255.0 * u), 255).astype(np.uint8)


class _CodeIndex(VectorIndex):
    """A FAISS index over codes of the prefix, created (and trained) on the first ``add``."""

    #: the FAISS index of this backend is a binary index (``IndexBinary*``)
    binary = False

    def __init__(self, dim: int, *, model_name: str = "unknown", normalize: bool = True) -> None:
        super().__init__(dim, model_name=model_name, normalize=normalize)
        self._faiss = import_faiss()
        self._index: Any = None

    @abstractmethod
    def _new_index(self) -> Any:
        """An empty FAISS index of this backend."""

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (``None`` before the first ``add``)."""
        return self._index

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _serialize(self) -> np.ndarray:
        if self.binary:
            return np.asarray(self._faiss.serialize_index_binary(self._index), np.uint8)
        return np.asarray(self._faiss.serialize_index(self._index), np.uint8)

    @property
    def nbytes(self) -> int:
        return 0 if self._index is None else int(self._serialize().nbytes)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """What FAISS receives for ``(n, m)`` prepared vectors (codes for binary indexes)."""
        return x

    def _add(self, x: np.ndarray) -> None:
        if self._index is None:
            index = self._new_index()
            if not index.is_trained:
                index.train(self._encode(x))
            self._index = index
        self._index.add(self._encode(x))

    def _payload(self) -> dict[str, np.ndarray]:
        if self._index is None:
            return {"faiss": np.empty(0, np.uint8)}
        return {"faiss": self._serialize()}

    def _restore(self, blob: np.ndarray) -> None:
        if blob.size == 0:
            self._index = None
        elif self.binary:
            self._index = self._faiss.deserialize_index_binary(blob)
        else:
            self._index = self._faiss.deserialize_index(blob)


class _FlatOrGraphIndex(_CodeIndex):
    """Codes scanned flat (exact over the codes) or held in a FAISS HNSW graph over them.

    Subclasses name their two backends in :attr:`backends` (flat, graph) and build the FAISS
    index of each kind in ``_new_index``.
    """

    #: the backend names of the flat scan and of the graph
    backends: tuple[str, str]

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "flat",
        model_name: str = "unknown",
        normalize: bool = True,
        hnsw_m: int = HNSW_M,
        ef_construction: int = EF_CONSTRUCTION,
        ef_search: int = EF_SEARCH,
    ) -> None:
        super().__init__(dim, model_name=model_name, normalize=normalize)
        if kind not in ("flat", "hnsw"):
            raise ValueError(
                f"kind={kind!r} is not a {self.backends[0]} index kind: use 'flat' or 'hnsw'."
            )
        self.kind = kind
        self.backend = self.backends[0] if kind == "flat" else self.backends[1]
        self.hnsw_m = positive_int(hnsw_m, "hnsw_m")
        self.ef_construction = positive_int(ef_construction, "ef_construction")
        self.ef_search = positive_int(ef_search, "ef_search")

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "hnsw":
            out.update(
                hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search
            )
        return out

    def _graph(self, index: Any) -> Any:
        """``index`` (a new FAISS HNSW index) with this index's build beam."""
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS search of ``q`` (already encoded), the graph's beam raised to ``k``."""
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        dist, ids = self._index.search(q, k)
        return dist, ids


class BinaryIndex(_FlatOrGraphIndex):
    """1-bit sign codes of the prefix searched by Hamming distance; scores = matching bits.

    Args:
        dim, model_name, normalize: see :class:`~matryoshka.retrieval.index.VectorIndex`.
        kind: ``"flat"`` (``IndexBinaryFlat``, exact over the codes; backend ``binary``) or
            ``"hnsw"`` (``IndexBinaryHNSW``; backend ``binary-hnsw``).
        hnsw_m, ef_construction, ef_search: the HNSW graph (``ef_search`` raised to ``k``).

    ``search`` returns scores ``m - hamming`` (float32 in ``[0, m]``) and ids; the codes are
    ``ceil(m / 8)`` bytes per vector (:func:`sign_codes`).
    """

    binary = True
    backends = ("binary", "binary-hnsw")

    @property
    def code_bits(self) -> int:
        """Bits of a code: ``m`` rounded up to whole bytes."""
        return 8 * math.ceil(self.dim / 8)

    def _new_index(self) -> Any:
        if self.kind == "flat":
            return self._faiss.IndexBinaryFlat(self.code_bits)
        return self._graph(self._faiss.IndexBinaryHNSW(self.code_bits, self.hnsw_m))

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return sign_codes(x)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, ids = self._faiss_search(sign_codes(q), k)
        scores = (self.dim - dist).astype(np.float32)
        scores[ids < 0] = NO_SCORE
        return scores, ids


class SQ8Index(_FlatOrGraphIndex):
    """8-bit scalar quantization of the prefix, inner product with the float query; ``m`` bytes
    per vector.

    Args:
        dim, model_name, normalize: see :class:`~matryoshka.retrieval.index.VectorIndex`.
        kind: ``"flat"`` (FAISS ``IndexScalarQuantizer`` with ``QT_8bit``, exact over the codes;
            backend ``sq8``) or ``"hnsw"`` (``IndexHNSWSQ``: an HNSW graph over the same codes,
            ``m + 8·hnsw_m`` bytes per vector and more for upper levels; backend ``sq8-hnsw``).
        hnsw_m, ef_construction, ef_search: the HNSW graph (``ef_search`` raised to ``k``;
            settable after build).

    Trained on the first ``add`` (per-dimension range of those vectors; later vectors outside it
    are clipped), so the first batch should be representative (``add_in_chunks`` gives 65,536).
    """

    backends = ("sq8", "sq8-hnsw")

    def _new_index(self) -> Any:
        faiss = self._faiss
        qt, ip = faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexScalarQuantizer(self.dim, qt, ip)
        return self._graph(faiss.IndexHNSWSQ(self.dim, qt, self.hnsw_m, ip))

    def _quantizer(self) -> Any:
        """The FAISS ``ScalarQuantizer`` of the codes (inside the graph's storage for HNSW)."""
        if self.kind == "flat":
            return self._index.sq
        return self._faiss.downcast_index(self._index.storage).sq

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained per-dimension ``(vmin, vdiff)``, both ``(m,)`` float32."""
        if self._index is None:
            raise RuntimeError(f"the {self.backend} index is not trained yet: add vectors first.")
        trained = self._faiss.vector_to_array(self._quantizer().trained)
        return trained[: self.dim].copy(), trained[self.dim :].copy()

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._faiss_search(q, k)
        scores = np.where(ids < 0, NO_SCORE, scores).astype(np.float32)
        return scores, ids


class RaBitQIndex(_CodeIndex):
    """RaBitQ codes of the prefix (FAISS ``IndexRaBitQ``): ``ceil(m / 8) + 8`` bytes per vector.

    Args:
        dim, model_name, normalize: see :class:`~matryoshka.retrieval.index.VectorIndex`.
        qb: bits per query coordinate in the distance estimate, in ``[0, 8]`` (``0``: the float
            query); settable after build.
        rotate: apply a fixed random orthogonal rotation first (``IndexPreTransform``), which the
            RaBitQ estimate assumes; ``False`` codes the coordinates as they are.
    """

    backend = "rabitq"

    def __init__(
        self,
        dim: int,
        *,
        model_name: str = "unknown",
        normalize: bool = True,
        qb: int = 8,
        rotate: bool = True,
    ) -> None:
        super().__init__(dim, model_name=model_name, normalize=normalize)
        if not hasattr(self._faiss, "IndexRaBitQ"):
            raise ImportError(
                f"backend='rabitq' needs faiss.IndexRaBitQ, which faiss "
                f"{getattr(self._faiss, '__version__', '?')} lacks: upgrade faiss-cpu (>= 1.11) or "
                f"use backend='binary' or 'sq8'."
            )
        if isinstance(qb, bool) or not isinstance(qb, int) or not 0 <= qb <= 8:
            raise ValueError(f"qb={qb!r} must be an int in [0, 8] (bits per query coordinate).")
        self.qb = qb
        self.rotate = bool(rotate)

    def params(self) -> dict[str, Any]:
        return {"qb": self.qb, "rotate": self.rotate}

    def _new_index(self) -> Any:
        faiss = self._faiss
        inner = faiss.IndexRaBitQ(self.dim, faiss.METRIC_INNER_PRODUCT)
        if not self.rotate:
            return inner
        # faiss' Python constructor keeps references to the rotation and the inner index
        return faiss.IndexPreTransform(faiss.RandomRotationMatrix(self.dim, self.dim), inner)

    def _rabitq(self) -> Any:
        """The ``IndexRaBitQ`` itself (inside the rotation when ``rotate``)."""
        if self.rotate:
            return self._faiss.downcast_index(self._index.index)
        return self._index

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._rabitq().qb = self.qb
        scores, ids = self._index.search(q, k)
        scores = np.where(ids < 0, NO_SCORE, scores).astype(np.float32)
        return scores, ids


def make_code_index(
    backend: str,
    dim: int,
    *,
    model_name: str = "unknown",
    normalize: bool = True,
    **params: Any,
) -> VectorIndex:
    """An empty quantized index: ``backend`` in :data:`CODE_BACKENDS`; ``params`` go to its class
    (``hnsw_m``, ``ef_construction``, ``ef_search`` for ``binary-hnsw`` and ``sq8-hnsw``; ``qb``, ``rotate`` for
    ``rabitq``; none for ``binary`` and ``sq8``)."""
    common: dict[str, Any] = {"model_name": model_name, "normalize": normalize}
    if backend == "binary":
        return BinaryIndex(dim, kind="flat", **common, **params)
    if backend == "binary-hnsw":
        return BinaryIndex(dim, kind="hnsw", **common, **params)
    if backend == "sq8":
        if params:
            raise ValueError(
                f"backend='sq8' takes no parameters but got {sorted(params)}: drop them."
            )
        return SQ8Index(dim, **common)
    if backend == "sq8-hnsw":
        return SQ8Index(dim, kind="hnsw", **common, **params)
    if backend == "rabitq":
        return RaBitQIndex(dim, **common, **params)
    raise ValueError(f"backend={backend!r} is not a quantized backend: use one of {CODE_BACKENDS}.")


def restore_code_index(
    backend: str,
    dim: int,
    model_name: str,
    normalize: bool,
    params: dict[str, Any],
    tensors: dict[str, np.ndarray],
    path: Path,
) -> VectorIndex:
    """Rebuild a quantized index from a loaded artefact's header fields and payload (used by
    :func:`~matryoshka.retrieval.index.load_index`, which has verified the checksums)."""
    params = dict(params)
    params.pop("kind", None)
    index = make_code_index(backend, dim, model_name=model_name, normalize=normalize, **params)
    assert isinstance(index, _CodeIndex)
    if "faiss" not in tensors:
        raise ValueError(
            f"{path} is not a valid matryoshka index file (no 'faiss' payload for backend "
            f"{backend!r}): rebuild it with VectorIndex.save()."
        )
    index._restore(tensors["faiss"])
    if index._index is not None and int(index._index.d) != (
        index.code_bits if isinstance(index, BinaryIndex) else dim
    ):
        raise ValueError(
            f"{path} is not a valid matryoshka index file (the FAISS payload has d="
            f"{index._index.d}, the header dim={dim}): rebuild it with VectorIndex.save()."
        )
    return index
