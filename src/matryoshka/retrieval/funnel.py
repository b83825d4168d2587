"""Funnel retrieval: shortlist with a short prefix from an index, rerank with longer prefixes.

The paper's adaptive retrieval (Kusupati et al. 2022, §4.3): search the whole corpus with the
cheap size-``m_s`` prefix to get ``k'`` candidates, then rescore only those candidates with larger
prefixes (a chain ``m_1 < m_2 < ... <= d`` whose stages keep fewer and fewer candidates), and
return the top ``k``. The long prefixes are read from a (memory-mapped) ``(N, d)`` matrix, so the
corpus need not be held in RAM twice: only the short-prefix index lives in memory.

:class:`FunnelSpec` is the one funnel specification (validated once against the corpus dimension;
its ``keeps(k)`` is the one keep-count rule) and :func:`rerank_candidates` the one rerank kernel;
the database funnels of :mod:`matryoshka.retrieval.vectordb` use both. :class:`~matryoshka.retrieval.tuner.FunnelTuner`
(in :mod:`matryoshka.retrieval.tuner`, still importable from here) picks ``(m_s, k', chain)`` for
a target recall@k against exact full-size search with the highest throughput measured on
held-out queries.

The rerank reads a :class:`~matryoshka.retrieval.prefixes.PrefixMatrix`: the full-size rows
(float32, float16 or int8 with a per-row scale; memory-mapped from a ``.npy``) and the inverse
norms of every row's prefix at each rerank size, computed once at ``fit``, so a stage is a
gather + dot + scale. The shortlist can be any backend, including the quantized ones of
:mod:`matryoshka.retrieval.codes` (``binary``, ``binary-hnsw``, ``sq8``, ``sq8-hnsw``,
``rabitq``).
:meth:`FunnelRetriever.save` writes the whole funnel as one checked folder (header with
checksums + shortlist index + rerank matrix or a reference to it); :meth:`FunnelRetriever.load`
verifies it.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka._validate import positive_int
from matryoshka.io import atomic_write_bytes
from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.index import (
    NO_SCORE,
    VectorIndex,
    add_in_chunks,
    import_faiss,
    is_graph,
    load_index,
    make_index,
)
from matryoshka.retrieval.prefixes import PrefixMatrix, check_dtype, file_sha256

if TYPE_CHECKING:
    from matryoshka.retrieval.tuner import FunnelTuner

__all__ = [
    "FUNNEL_FORMAT",
    "FunnelRetriever",
    "FunnelSpec",
    "FunnelTuner",
    "check_chain",
    "is_saved_funnel",
    "open_corpus",
    "recall_vs_reference",
    "rerank_candidates",
]


FUNNEL_FORMAT = "matryoshka-funnel"
FUNNEL_VERSION = 1
_FUNNEL_META = "matryoshka_funnel"
#: file names inside a saved funnel folder
HEADER_FILE, SHORTLIST_FILE, MATRIX_FILE = "funnel.safetensors", "shortlist.index", "rerank.npy"


def is_saved_funnel(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a funnel folder written by :meth:`FunnelRetriever.save` (``mrl index
    build --kind funnel``)."""
    return Path(path).is_dir() and (Path(path) / HEADER_FILE).is_file()


def __getattr__(name: str) -> Any:
    if name == "FunnelTuner":  # its home is matryoshka.retrieval.tuner; kept importable from here
        from matryoshka.retrieval.tuner import FunnelTuner

        return FunnelTuner
    raise AttributeError(f"module 'matryoshka.retrieval.funnel' has no attribute {name!r}")


def open_corpus(corpus: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    """A ``(N, d)`` corpus: an array as is (a memory map stays one), or a ``.npy`` path
    memory-mapped read-only."""
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus={str(path)!r} does not exist: pass a (N, d) .npy file."
            )
        arr = np.load(path, mmap_mode="r")
    else:
        arr = corpus if isinstance(corpus, np.memmap) else np.asarray(corpus)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"corpus.shape={arr.shape}: pass a non-empty (N, d) matrix of embeddings.")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"corpus.dtype={arr.dtype}: pass float embeddings.")
    return arr


def recall_vs_reference(ids: np.ndarray, reference: np.ndarray) -> float:
    """Mean fraction of the reference top-k found in ``ids``: ``(Q, k), (Q, k) -> float``.

    This is recall@k of an approximate search against exact search (``-1`` never matches).
    """
    ids, reference = np.asarray(ids), np.asarray(reference)
    if ids.shape[0] != reference.shape[0]:
        raise ValueError(
            f"ids has {ids.shape[0]} queries but reference has {reference.shape[0]}: "
            "compare results of the same queries."
        )
    hits = [
        len(np.intersect1d(a[a >= 0], b[b >= 0], assume_unique=False))
        for a, b in zip(ids, reference, strict=True)
    ]
    return float(np.mean(hits) / reference.shape[1])


def check_chain(
    rerank: Sequence[int], dim: int, name: str = "rerank", *, min_size: int = 1
) -> tuple[int, ...]:
    """The rerank chain as a tuple of strictly increasing sizes in ``[min_size, dim]``; a clear
    error naming ``name`` otherwise.

    ``min_size`` lets a caller with a stricter policy (e.g. sizes no smaller than the shortlist
    size) state it here instead of writing its own chain rule; the library's funnel uses 1.
    """
    try:
        chain = tuple(int(m) for m in rerank)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={rerank!r} must be a sequence of int sizes, e.g. ({dim},)."
        ) from None
    if not chain:
        raise ValueError(
            f"{name}=() is empty: give a non-empty chain of at least one rerank size, e.g. "
            f"({dim},)."
        )
    if any(not min_size <= m <= dim for m in chain) or any(
        a >= b for a, b in itertools.pairwise(chain)
    ):
        example = f"({dim},)"
        if max(min_size, dim // 2) < dim:
            example += f" or ({max(min_size, dim // 2)}, {dim})"
        raise ValueError(
            f"{name}={list(chain)} must be strictly increasing sizes in [{min_size}, {dim}] (the "
            f"corpus dimension), e.g. {example}."
        )
    return chain


@dataclass(frozen=True)
class FunnelSpec:
    """One funnel: shortlist ``k'`` at prefix size ``m_s``, then rerank through a size chain.

    The single home of the funnel's rules, shared by :class:`FunnelRetriever`,
    :class:`~matryoshka.retrieval.tuner.FunnelTuner` and the database funnels (:mod:`matryoshka.retrieval.vectordb`):
    :meth:`validate` checks the sizes against the corpus dimension ``d`` once, :meth:`keeps` gives
    the candidates entering each stage for a given ``k``.

    Args:
        shortlist_size: ``m_s``, the prefix size searched over the whole corpus, in ``[1, d]``.
        shortlist_k: ``k'``, how many candidates the shortlist returns (``>= k`` at search).
        rerank: strictly increasing rerank sizes ``m_1 < ... <= d``; ``None`` is one stage at
            ``d``. The last stage keeps ``k``.
        keep: candidates kept after each stage but the last (``len(rerank) - 1`` counts,
            non-increasing, each in ``[k, k']``); ``None`` interpolates geometrically from ``k'``
            to ``k``.

    Frozen; a validated spec holds only ints and tuples, so it is hashable (a cache key).
    """

    shortlist_size: int
    shortlist_k: int
    rerank: Sequence[int] | None = None
    keep: Sequence[int] | None = None

    def validate(self, dim: int) -> FunnelSpec:
        """This spec checked against corpus dimension ``dim`` (``d``), in canonical form: ints,
        tuples, and ``rerank`` resolved (``None`` becomes ``(d,)``). Raises ``ValueError`` naming
        the parameter, its value and the fix."""
        d = positive_int(dim, "dim")
        m_s = self.shortlist_size
        if isinstance(m_s, bool) or not isinstance(m_s, int | np.integer) or not 1 <= m_s <= d:
            raise ValueError(
                f"shortlist_size={m_s!r} must be an int in [1, {d}] (the corpus dimension)."
            )
        kp = positive_int(self.shortlist_k, "shortlist_k")
        chain = check_chain(self.rerank if self.rerank is not None else (d,), d)
        keep = self._keep_counts(len(chain))
        return FunnelSpec(int(m_s), kp, chain, keep)

    def _keep_counts(self, stages: int) -> tuple[int, ...] | None:
        """``keep`` as ints, one count per stage but the last; ``None`` stays ``None``."""
        if self.keep is None:
            return None
        try:
            keep = tuple(int(c) for c in self.keep)
        except (TypeError, ValueError):
            raise ValueError(
                f"keep={self.keep!r} must be a sequence of int counts (one per rerank stage but "
                f"the last), or None."
            ) from None
        if len(keep) != stages - 1:
            chain = list(self.rerank) if self.rerank is not None else "(d,)"
            raise ValueError(
                f"keep={list(keep)} has {len(keep)} counts but rerank={chain} has {stages} "
                f"stages: give one count per stage but the last (which keeps k)."
            )
        return keep

    def keeps(self, k: int) -> tuple[int, ...]:
        """Candidates entering each rerank stage, ``k'`` first: ``len(rerank) + 1`` counts, last
        ``k``. The funnel only narrows: a ``k`` above ``k'`` or a ``keep`` outside ``[k, k']`` (or
        increasing) is an error, never clamped."""
        k = positive_int(k, "k")
        kp = positive_int(self.shortlist_k, "shortlist_k")
        if k > kp:
            raise ValueError(
                f"k={k} is larger than shortlist_k={kp}: the funnel only returns shortlisted "
                f"candidates; set shortlist_k >= k."
            )
        stages = 1 if self.rerank is None else len(self.rerank)
        keep = self._keep_counts(stages)
        if keep is None:
            mid = [round(kp * (k / kp) ** (i / stages)) for i in range(1, stages)]
        else:
            mid = list(keep)
        counts = (kp, *mid, k)
        if any(b > a for a, b in itertools.pairwise(counts)) or any(c < k for c in mid):
            raise ValueError(
                f"keep={mid} must decrease from shortlist_k={kp} down to k={k} (each count in "
                f"[{k}, {kp}]): the funnel only narrows."
            )
        return counts

    def rerank_bytes_per_query(self, k: int) -> int:
        """Bytes of corpus prefixes read by the rerank stages for one query: ``sum_i c_i·m_i·4``
        (``rerank`` must be resolved: call :meth:`validate` first)."""
        if self.rerank is None:
            raise ValueError(
                "rerank=None is not resolved yet: call spec.validate(dim) first, which sets it to "
                "(d,)."
            )
        counts = self.keeps(k)
        return int(sum(c * m * 4 for c, m in zip(counts[:-1], self.rerank, strict=True)))


def _dots_by_ids(qm: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray | None:
    """``<vectors[ids[i·c + j], :m], qm[i]>`` for ``(b, m)`` queries and ``(b·c,)`` row ids:
    ``(b·c,)`` float32, computed by FAISS' ``fvec_inner_products_by_idx`` straight from the
    (memory-mapped) rows, with no gathered copy; ``None`` where it does not apply (FAISS not
    installed, or ``vectors`` not a C-contiguous float32 matrix), so the caller gathers instead.

    A prefix size ``m < D`` uses the query zero-padded to ``D``: the dot is then the prefix dot.
    This reads whole rows, and still costs less than a per-row gather in numpy (~3x less on 384-d
    rows).
    """
    if vectors.dtype != np.float32 or not vectors.flags.c_contiguous or vectors.ndim != 2:
        return None
    try:
        faiss = import_faiss()
    except ImportError:
        return None
    b, m = qm.shape
    d = vectors.shape[1]
    qp = qm if m == d else np.pad(qm, ((0, 0), (0, d - m)))  # (b, D)
    qp = np.ascontiguousarray(qp, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape[0], np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(qp),
        faiss.swig_ptr(vectors),
        faiss.swig_ptr(ids),
        d,
        b,
        ids.shape[0] // max(b, 1),
    )
    return out


def _rescore(
    q: np.ndarray,
    cand: np.ndarray,
    vectors: np.ndarray,
    m: int,
    keep: int,
    normalize: bool,
    factors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One rerank stage: rescore ``(b, c)`` candidate ids (rows of ``vectors`` ``(N, >=m)``,
    ``-1`` none) at prefix size ``m`` against ``q`` ``(b, >=m)``, keep the best ``keep``:
    scores ``(b, keep)`` float32 and ids ``(b, keep)`` int64, ``NO_SCORE``/``-1`` padded.

    ``factors`` ``(N,)`` float32, when given, are this stage's precomputed per-row multipliers
    (:class:`~matryoshka.retrieval.prefixes.PrefixMatrix`): the rows are then not renormalised,
    the score is ``<row[:m], q̂[:m]> * factors[row]``."""
    b, c = cand.shape
    valid = cand >= 0
    flat = np.where(valid, cand, 0).ravel()
    qm = truncate_numpy(q, m, normalize=normalize)  # (b, m)
    fast = None if factors is None else _dots_by_ids(qm, flat, vectors)
    if fast is not None:
        s = torch.from_numpy(fast.reshape(b, c))
    else:
        rows = vectors[flat, :m]  # (b*c, m), read from the map
        if factors is None:
            rows = truncate_numpy(rows, m, normalize=normalize).reshape(b, c, m)
        else:
            rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(b, c, m)
        s = torch.bmm(torch.from_numpy(rows), torch.from_numpy(qm)[:, :, None])[..., 0]  # (b, c)
    if factors is not None:
        s *= torch.from_numpy(np.ascontiguousarray(factors[flat], np.float32).reshape(b, c))
    s[torch.from_numpy(~valid)] = NO_SCORE
    kk = min(keep, c)
    top = torch.topk(s, kk, dim=1, sorted=True)
    out_s = np.full((b, keep), NO_SCORE, np.float32)
    out_i = np.full((b, keep), -1, np.int64)
    out_s[:, :kk] = top.values.numpy()
    picked = np.take_along_axis(cand, top.indices.numpy(), 1)
    out_i[:, :kk] = np.where(out_s[:, :kk] > NO_SCORE, picked, -1)
    return out_s, out_i


def rerank_candidates(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors: np.ndarray,
    rerank: Sequence[int],
    keeps: Sequence[int],
    *,
    normalize: bool = True,
    batch_size: int = 256,
    factors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The funnel's rerank, the one kernel every funnel uses (in memory and in the databases).

    Args:
        queries: ``(Q, D)`` float32 full-size queries (``D >= rerank[-1]``).
        candidates: ``(Q, c)`` int64 shortlisted row ids into ``vectors``, ``-1`` for none.
        vectors: ``(N, D)`` float32 rows (a memory-mapped corpus, or the candidates' vectors);
            only the first ``m`` columns are read at a stage of size ``m``. With ``factors``,
            any stored dtype (float16, int8 codes) cast to float32 after the gather.
        rerank: the validated size chain ``m_1 < ... <= D``.
        keeps: :meth:`FunnelSpec.keeps` -- ``len(rerank) + 1`` counts, the last is ``k``.
        normalize: cosine (each prefix unit-normalised) rather than raw inner product.
        batch_size: queries rescored at once (the gathered block is ``batch_size·c·m·4`` bytes).
        factors: ``(N, len(rerank))`` float32 per-row multipliers precomputed at build
            (:meth:`PrefixMatrix.factors_for(rerank) <matryoshka.retrieval.prefixes.PrefixMatrix.factors_for>`:
            prefix inverse norms, times the int8 row scale): the stage score is then
            ``<vectors[r, :m], q̂[:m]> * factors[r, stage]``, a gather + dot + scale with no
            per-query renormalisation of rows. ``None`` renormalises the gathered rows.

    Each stage rescores the surviving candidates at its prefix size and keeps the best
    ``keeps[i + 1]``. Returns scores ``(Q, k)`` float32 and ids ``(Q, k)`` int64, best first, in
    FAISS conventions (``NO_SCORE`` and ``-1`` where fewer than ``k`` candidates exist).
    """
    if len(keeps) != len(rerank) + 1:
        raise ValueError(
            f"keeps={list(keeps)} has {len(keeps)} counts but rerank={list(rerank)} has "
            f"{len(rerank)} stages: pass spec.keeps(k), one count per stage plus k."
        )
    batch_size = positive_int(batch_size, "batch_size")
    if factors is not None and (
        factors.ndim != 2 or factors.shape != (vectors.shape[0], len(rerank))
    ):
        raise ValueError(
            f"factors.shape={factors.shape} but vectors has {vectors.shape[0]} rows and "
            f"rerank={list(rerank)} has {len(rerank)} stages: pass "
            f"PrefixMatrix.factors_for(rerank), shape ({vectors.shape[0]}, {len(rerank)})."
        )
    n_q, k = candidates.shape[0], int(keeps[-1])
    scores = np.empty((n_q, k), np.float32)
    ids = np.empty((n_q, k), np.int64)
    for s in range(0, n_q, batch_size):
        sc, c = np.empty(0, np.float32), candidates[s : s + batch_size]
        for j, (m, keep) in enumerate(zip(rerank, keeps[1:], strict=True)):
            f = None if factors is None else factors[:, j]
            sc, c = _rescore(queries[s : s + batch_size], c, vectors, m, keep, normalize, f)
        scores[s : s + batch_size], ids[s : s + batch_size] = sc, c
    return scores, ids


class FunnelRetriever:
    """Shortlist ``k'`` candidates at prefix size ``m_s``, rerank with a chain of larger sizes.

    The funnel is an index: like a :class:`~matryoshka.retrieval.index.VectorIndex` it has
    ``dim`` (here the full size ``d`` its queries must have), ``ntotal``, ``normalize`` and
    ``search(queries, k) -> (scores, ids)``, so a caller can use either the same way.

    Args:
        shortlist_size, shortlist_k, rerank, keep: the funnel (see :class:`FunnelSpec`, which
            ``fit`` validates into ``spec_``).
        backend: index backend for the shortlist (see :func:`matryoshka.retrieval.index.make_index`;
            the quantized ``binary``, ``binary-hnsw``, ``sq8``, ``sq8-hnsw`` and ``rabitq`` make cheap
            ones).
        index_params: extra backend parameters (e.g. ``{"ef_search": 256}``).
        index: a prebuilt index over the corpus' size-``m_s`` prefixes to use instead of building
            one (its size, normalisation and count are checked by ``fit``).
        normalize: cosine similarity (each prefix unit-normalised) rather than raw inner product.
        model_name: recorded in the index header.
        batch_size: queries reranked at once (bounds the gathered candidate block to
            ``batch_size * k' * m * 4`` bytes).
        rerank_dtype: storage of the full-size rerank matrix: ``"float32"`` (scores as exact as
            the corpus), ``"float16"`` (half the bytes; scores within ~1e-3) or ``"int8"`` (a
            quarter, per-row scale; scores within ~2e-2), see :mod:`matryoshka.retrieval.prefixes`.
        rerank_path: ``.npy`` file ``fit`` writes the rerank matrix to (then memory-mapped);
            ``None`` reads a float32 corpus as it is (memory-mapped when given as a path) and
            keeps other dtypes in memory.
        prefixes: a prebuilt :class:`~matryoshka.retrieval.prefixes.PrefixMatrix` of this corpus
            to use instead of building one (its rows, normalisation and chain are checked).
        progress: show a progress bar while ``fit`` builds the shortlist index.

    ``fit(corpus)`` takes a ``(N, d)`` array or a ``.npy`` path (memory-mapped) and sets
    ``corpus_``, ``index_``, ``prefixes_``, ``dim_``, ``spec_`` and ``chain_`` (``spec_.rerank``).
    ``search(queries, k)`` maps ``(Q, d)`` queries to ``(scores, ids)``, both ``(Q, k)``, in FAISS
    conventions. ``save(folder)`` / ``FunnelRetriever.load(folder)`` store it as one artefact.
    """

    def __init__(
        self,
        shortlist_size: int,
        shortlist_k: int,
        rerank: Sequence[int] | None = None,
        keep: Sequence[int] | None = None,
        *,
        backend: str = "exact",
        index_params: dict[str, Any] | None = None,
        index: VectorIndex | None = None,
        normalize: bool = True,
        model_name: str = "unknown",
        batch_size: int = 256,
        rerank_dtype: str = "float32",
        rerank_path: str | os.PathLike[str] | None = None,
        prefixes: PrefixMatrix | None = None,
        progress: bool = True,
    ) -> None:
        self.shortlist_size = shortlist_size
        self.shortlist_k = shortlist_k
        self.rerank = rerank
        self.keep = keep
        self.backend = backend
        self.index_params = index_params
        self.index = index
        self.normalize = normalize
        self.model_name = model_name
        self.batch_size = batch_size
        self.rerank_dtype = rerank_dtype
        self.rerank_path = rerank_path
        self.prefixes = prefixes
        self.progress = progress

    @classmethod
    def from_spec(cls, spec: FunnelSpec, **kwargs: Any) -> FunnelRetriever:
        """A retriever for ``spec``; ``kwargs`` are the other constructor arguments."""
        return cls(spec.shortlist_size, spec.shortlist_k, spec.rerank, spec.keep, **kwargs)

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, corpus: np.ndarray | str | os.PathLike[str]) -> FunnelRetriever:
        """Open the ``(N, d)`` corpus, build (or check) the size-``m_s`` index and the rerank
        matrix with its prefix norms. Returns self."""
        arr = open_corpus(corpus)
        n, d = arr.shape
        spec = FunnelSpec(self.shortlist_size, self.shortlist_k, self.rerank, self.keep)
        spec = spec.validate(d)
        positive_int(self.batch_size, "batch_size")
        chain = tuple(spec.rerank or (d,))
        dtype = check_dtype(self.rerank_dtype)
        pm = None if self.prefixes is None else self._check_prefixes(self.prefixes, n, d, chain)
        if self.index is not None:
            idx = self.index
            if idx.dim != spec.shortlist_size:
                raise ValueError(
                    f"index holds prefixes of size {idx.dim} but shortlist_size="
                    f"{spec.shortlist_size}: pass shortlist_size={idx.dim} or an index of size "
                    f"{spec.shortlist_size}."
                )
            if idx.ntotal != n:
                raise ValueError(
                    f"index has {idx.ntotal} vectors but the corpus has {n}: the index must be "
                    f"built from this corpus (same rows, same order)."
                )
            if idx.normalize != self.normalize:
                raise ValueError(
                    f"index.normalize={idx.normalize} but normalize={self.normalize}: use the "
                    f"same similarity for the shortlist and the rerank."
                )
        else:
            idx = make_index(
                self.backend,
                spec.shortlist_size,
                model_name=self.model_name,
                normalize=self.normalize,
                **(self.index_params or {}),
            )
            add_in_chunks(idx, arr, progress=self.progress, desc=f"index m={spec.shortlist_size}")
        if pm is None:
            pm = PrefixMatrix.build(
                arr, chain, dtype=dtype, normalize=self.normalize, path=self.rerank_path
            )
        self.corpus_ = arr
        self.dim_ = d
        self.spec_ = spec
        self.chain_ = chain
        self.index_ = idx
        self.prefixes_ = pm
        self._factors = pm.factors_for(chain)
        return self

    def _check_prefixes(
        self, pm: PrefixMatrix, n: int, d: int, chain: tuple[int, ...]
    ) -> PrefixMatrix:
        if (pm.ntotal, pm.dim) != (n, d):
            raise ValueError(
                f"prefixes holds a ({pm.ntotal}, {pm.dim}) matrix but the corpus is ({n}, {d}): "
                f"build the PrefixMatrix from this corpus."
            )
        if pm.normalize != self.normalize:
            raise ValueError(
                f"prefixes.normalize={pm.normalize} but normalize={self.normalize}: build the "
                f"PrefixMatrix with normalize={self.normalize}."
            )
        pm.factors_for(chain)  # every rerank size must have its factors
        return pm

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError(
                "This FunnelRetriever is not fitted yet: call fit(corpus) before search()."
            )

    @property
    def dim(self) -> int:
        """``d``, the size of the full query vectors :meth:`search` takes (fitted)."""
        self._check_fitted()
        return int(self.dim_)

    @property
    def ntotal(self) -> int:
        """Number of corpus vectors searched (fitted)."""
        self._check_fitted()
        return int(self.corpus_.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (fitted): the shortlist index, the rerank factors, and the rerank
        matrix when it is not memory-mapped (see :attr:`mapped_bytes`)."""
        self._check_fitted()
        return int(self.index_.nbytes + self.prefixes_.nbytes)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the memory-mapped rerank matrix (0 when it is held in memory; fitted)."""
        self._check_fitted()
        return self.prefixes_.mapped_bytes

    def keeps(self, k: int) -> tuple[int, ...]:
        """``spec_.keeps(k)``: candidates entering each rerank stage, ``k'`` first, ``k`` last."""
        self._check_fitted()
        return self.spec_.keeps(k)

    # -- search --------------------------------------------------------------------------------
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` through the funnel: ``(Q, d) -> scores (Q, k) float32, ids (Q, k) int64``."""
        self._check_fitted()
        counts = self.spec_.keeps(k)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim_:
            raise ValueError(
                f"queries.shape={q.shape}: pass (Q, {self.dim_}) full-size query embeddings "
                f"(the corpus dimension)."
            )
        _, cand = self.index_.search(q, self.spec_.shortlist_k)  # (Q, k')
        return rerank_candidates(
            q,
            cand,
            self.prefixes_.matrix,
            self.chain_,
            counts,
            normalize=self.normalize,
            batch_size=self.batch_size,
            factors=self._factors,
        )

    def with_params(
        self,
        *,
        shortlist_k: int | None = None,
        rerank: Sequence[int] | None = None,
        keep: Sequence[int] | None = None,
        ef_search: int | None = None,
    ) -> FunnelRetriever:
        """This fitted funnel with another ``k'``, rerank chain, keep counts or graph beam,
        sharing its shortlist index and rerank matrix: nothing is rebuilt, and ``self`` is left
        as it was. ``None`` keeps a setting (a new ``rerank`` drops the old ``keep``).

        Every rerank size must be one the matrix has factors for (``prefixes_.chain``, fixed at
        build); ``ef_search`` applies to graph shortlists only (``faiss-hnsw``, ``binary-hnsw``,
        ``sq8-hnsw``). Errors name the parameter and the fix.
        """
        self._check_fitted()
        index = self.index_
        if ef_search is not None:
            if not is_graph(index):
                raise ValueError(
                    f"ef_search={ef_search!r} applies to a graph shortlist (faiss-hnsw, "
                    f"binary-hnsw, sq8-hnsw) but this funnel's is {index.backend!r}: drop it, or "
                    f"change k' (shortlist_k) instead."
                )
            index = copy.copy(index)  # the same FAISS graph; its own beam, set at each search
            index.ef_search = positive_int(ef_search, "ef_search")  # type: ignore[attr-defined]
        spec = self.spec_
        if keep is None and rerank is None:
            keep = spec.keep
        fr = FunnelRetriever(
            spec.shortlist_size,
            spec.shortlist_k if shortlist_k is None else shortlist_k,
            self.chain_ if rerank is None else rerank,
            keep,
            backend=index.backend,
            index=index,
            normalize=self.normalize,
            model_name=self.model_name,
            batch_size=self.batch_size,
            rerank_dtype=self.prefixes_.dtype,
            prefixes=self.prefixes_,
            progress=False,
        )
        return (
            fr.fit(self.corpus_)
            if self.prefixes_.dtype == "float32"
            else fr._fit_stored(self.corpus_)
        )

    def rerank_bytes_per_query(self, k: int) -> int:
        """Bytes of corpus prefixes read by the rerank stages for one query: ``sum_i c_i·m_i·4``
        for a float32 rerank matrix (``·2`` for float16, ``·1`` for int8)."""
        self._check_fitted()
        full = self.spec_.rerank_bytes_per_query(k)
        if self.prefixes_.dtype == "float32":
            return full
        return full * self.prefixes_.matrix.itemsize // 4

    # -- save / load ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, copy_matrix: bool = False) -> Path:
        """Write the fitted funnel to the folder ``path`` (created) and return it.

        The folder holds ``funnel.safetensors`` (one JSON header -- model name, sizes, chain,
        keep, rerank dtype, the shortlist backend, checksums of every part -- and the rerank
        factors and int8 scales as tensors), ``shortlist.index`` (the shortlist
        :class:`~matryoshka.retrieval.index.VectorIndex` file) and ``rerank.npy`` (the rerank
        matrix). A matrix already memory-mapped from a ``.npy`` outside the folder is referenced
        by its absolute path (with its size and SHA-256) instead of copied, unless
        ``copy_matrix``. Each file is written atomically; the header last.
        """
        self._check_fitted()
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"path={str(folder)!r} is a file: a funnel is saved as a folder; give a folder "
                f"path (created if missing)."
            )
        folder.mkdir(parents=True, exist_ok=True)
        pm = self.prefixes_
        shortlist = self.index_.save(folder / SHORTLIST_FILE)
        source = _npy_source(pm)
        if source is not None and source.parent.resolve() == folder.resolve():
            matrix_ref = source.name
        elif source is not None and not copy_matrix:
            matrix_ref = str(source.resolve())
        else:
            matrix_ref = MATRIX_FILE
            _atomic_save_npy(folder / MATRIX_FILE, pm.matrix)
        matrix_file = folder / matrix_ref
        payload = {"factors": np.ascontiguousarray(pm.factors), "scale": pm.scale}
        header = {
            "format": FUNNEL_FORMAT,
            "version": FUNNEL_VERSION,
            "model_name": self._model_name(),
            "ntotal": self.ntotal,
            "dim": self.dim_,
            "normalize": bool(self.normalize),
            "shortlist_size": self.spec_.shortlist_size,
            "shortlist_k": self.spec_.shortlist_k,
            "rerank": list(self.chain_),
            "keep": None if self.spec_.keep is None else list(self.spec_.keep),
            "factor_chain": list(pm.chain),
            "batch_size": int(self.batch_size),
            "rerank_dtype": pm.dtype,
            "backend": self.index_.backend,
            "files": {
                "shortlist": _file_entry(shortlist, SHORTLIST_FILE),
                "matrix": {
                    **_file_entry(matrix_file, matrix_ref),
                    "shape": [pm.ntotal, pm.dim],
                    "dtype": pm.dtype,
                },
            },
            "sha256": {name: _array_sha256(arr) for name, arr in payload.items()},
        }
        from safetensors.numpy import save as st_save

        meta = {_FUNNEL_META: json.dumps(header)}
        atomic_write_bytes(folder / HEADER_FILE, st_save(payload, metadata=meta))
        return folder

    def _model_name(self) -> str:
        if self.model_name == "unknown":
            return self.index_.model_name
        if self.index_.model_name not in ("unknown", self.model_name):
            raise ValueError(
                f"model_name={self.model_name!r} but the shortlist index was built from "
                f"{self.index_.model_name!r}: use one model for the whole funnel."
            )
        return self.model_name

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        verify_matrix: bool = True,
    ) -> FunnelRetriever:
        """A fitted funnel from a folder written by :meth:`save`, every part verified.

        Checks the header (format, version), the checksums of the factors, of
        ``shortlist.index`` and (``verify_matrix``; ``False`` skips hashing a large matrix and
        checks only its size, shape and dtype) of the rerank matrix, and that the parts agree;
        ``model_name``, when given, must be the header's. Errors name the offending file.
        """
        folder = Path(path)
        head_file = folder / HEADER_FILE
        if not head_file.is_file():
            raise FileNotFoundError(
                f"{head_file} does not exist: path={str(folder)!r} must be a folder written by "
                f"FunnelRetriever.save()."
            )
        header, tensors = _read_header(head_file)
        hmodel = str(header["model_name"])
        if model_name is not None and model_name != hmodel:
            raise ValueError(
                f"model_name={model_name!r} but the funnel at {folder} was built from model "
                f"{hmodel!r}: embed the queries with {hmodel!r} or rebuild the funnel."
            )
        files = header["files"]
        n, d = int(header["ntotal"]), int(header["dim"])
        shortlist_file = _check_file(folder, files["shortlist"], verify=True)
        index = load_index(
            shortlist_file, dim=int(header["shortlist_size"]), normalize=bool(header["normalize"])
        )
        if index.ntotal != n or index.model_name not in ("unknown", hmodel):
            raise ValueError(
                f"{shortlist_file} does not belong to this funnel (it holds {index.ntotal} "
                f"vectors of model {index.model_name!r}; {head_file} says {n} of {hmodel!r}): "
                f"save the funnel again."
            )
        matrix_file = _check_file(folder, files["matrix"], verify=verify_matrix)
        try:
            matrix = np.load(matrix_file, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(
                f"{matrix_file} is not a readable .npy rerank matrix ({e}): save the funnel again."
            ) from e
        dtype = str(header["rerank_dtype"])
        if matrix.shape != (n, d) or str(matrix.dtype) != dtype:
            raise ValueError(
                f"{matrix_file} holds a {matrix.shape} {matrix.dtype} matrix but {head_file} "
                f"says ({n}, {d}) {dtype}: it is not this funnel's rerank matrix; save the "
                f"funnel again."
            )
        factor_chain = tuple(int(m) for m in header["factor_chain"])
        factors, scale = tensors["factors"], tensors["scale"]
        if factors.shape != (n, len(factor_chain)) or scale.shape != (n,):
            raise ValueError(
                f"{head_file} holds factors of shape {factors.shape} and scales {scale.shape}, "
                f"expected ({n}, {len(factor_chain)}) and ({n},): save the funnel again."
            )
        normalize = bool(header["normalize"])
        pm = PrefixMatrix(
            matrix, factors, factor_chain, normalize, dtype, scale, matrix_file.resolve()
        )
        keep = header["keep"]
        fr = cls(
            int(header["shortlist_size"]),
            int(header["shortlist_k"]),
            tuple(header["rerank"]),
            None if keep is None else tuple(keep),
            backend=str(header["backend"]),
            index=index,
            normalize=normalize,
            model_name=hmodel,
            batch_size=int(header["batch_size"]),
            rerank_dtype=dtype,
            prefixes=pm,
        )
        return fr.fit(matrix) if dtype == "float32" else fr._fit_stored(matrix)

    def _fit_stored(self, matrix: np.ndarray) -> FunnelRetriever:
        """Fit on a loaded non-float32 rerank matrix (``open_corpus`` takes floats only)."""
        d = matrix.shape[1]
        spec = FunnelSpec(self.shortlist_size, self.shortlist_k, self.rerank, self.keep)
        spec = spec.validate(d)
        assert self.prefixes is not None
        assert self.index is not None
        self.corpus_ = matrix
        self.dim_, self.spec_, self.chain_ = d, spec, tuple(spec.rerank or (d,))
        self.index_, self.prefixes_ = self.index, self.prefixes
        self._factors = self.prefixes.factors_for(self.chain_)
        return self

    def __repr__(self) -> str:
        return (
            f"FunnelRetriever(shortlist_size={self.shortlist_size}, shortlist_k={self.shortlist_k},"
            f" rerank={self.rerank}, keep={self.keep}, backend={self.backend!r})"
        )


def _array_sha256(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _npy_source(pm: PrefixMatrix) -> Path | None:
    """The ``.npy`` file a memory-mapped rerank matrix is read from, or ``None``."""
    if pm.path is not None:
        return Path(pm.path)
    name = getattr(pm.matrix, "filename", None)
    if name is None:
        return None
    try:
        again = np.load(name, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if again.shape != pm.matrix.shape or again.dtype != pm.matrix.dtype:
        return None  # a view of part of the file, or not an .npy: copy it
    return Path(name)


def _atomic_save_npy(path: Path, arr: np.ndarray, step: int = 65536) -> None:
    """``np.save`` streamed ``step`` rows at a time to a temp file, fsync'ed, then renamed."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(arr.dtype),
                    "fortran_order": False,
                    "shape": arr.shape,
                },
            )
            for s in range(0, arr.shape[0], step):
                f.write(np.ascontiguousarray(arr[s : s + step]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_entry(file: Path, ref: str) -> dict[str, Any]:
    return {"path": ref, "bytes": file.stat().st_size, "sha256": file_sha256(file)}


def _check_file(folder: Path, entry: dict[str, Any], *, verify: bool) -> Path:
    """The file of a header ``entry`` (relative to ``folder`` or absolute), size and (``verify``)
    checksum checked; errors name the file."""
    file = folder / str(entry["path"])
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: the funnel at {folder} needs it; save the funnel again (or "
            f"restore the file)."
        )
    size = file.stat().st_size
    if size != int(entry["bytes"]):
        raise ValueError(
            f"{file} has {size} bytes but the funnel header says {entry['bytes']}: it was "
            f"truncated or replaced; save the funnel again."
        )
    if verify and file_sha256(file) != entry["sha256"]:
        raise ValueError(
            f"{file} does not match its checksum in the funnel header: it is corrupted or was "
            f"changed after the funnel was saved; save the funnel again."
        )
    return file


def _read_header(head_file: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The verified header and tensors of ``funnel.safetensors``; errors name the file."""
    from safetensors import safe_open

    def bad(why: str) -> ValueError:
        return ValueError(
            f"{head_file} is not a valid funnel header ({why}): it may be truncated or "
            f"corrupted; save the funnel again with FunnelRetriever.save()."
        )

    try:
        with safe_open(str(head_file), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for malformed files
        raise bad(f"unreadable safetensors file: {e}") from e
    if _FUNNEL_META not in meta:
        raise bad("no matryoshka funnel header")
    try:
        header = json.loads(meta[_FUNNEL_META])
        checksums = dict(header["sha256"])
        needed = ("model_name", "ntotal", "dim", "normalize", "shortlist_size", "files")
        missing = [key for key in needed if key not in header]
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"malformed header: {e}") from e
    if missing:
        raise bad(f"malformed header: no {missing}")
    if header.get("format") != FUNNEL_FORMAT or header.get("version") != FUNNEL_VERSION:
        raise bad(f"format {header.get('format')!r} v{header.get('version')!r}")
    if set(checksums) != set(tensors) or set(tensors) != {"factors", "scale"}:
        raise bad(f"payload {sorted(tensors)} does not match header {sorted(checksums)}")
    for name, arr in tensors.items():
        if _array_sha256(arr) != checksums[name]:
            raise bad(f"checksum mismatch in {name!r}")
    return header, tensors
