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
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from matryoshka._validate import positive_int
from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.index import NO_SCORE, VectorIndex, add_in_chunks, make_index

if TYPE_CHECKING:
    from matryoshka.retrieval.tuner import FunnelTuner

__all__ = [
    "FunnelRetriever",
    "FunnelSpec",
    "FunnelTuner",
    "check_chain",
    "open_corpus",
    "recall_vs_reference",
    "rerank_candidates",
]


def __getattr__(name: str) -> Any:
    if name == "FunnelTuner":  # its home is matryoshka.retrieval.tuner; kept importable from here
        from matryoshka.retrieval.tuner import FunnelTuner

        return FunnelTuner
    raise AttributeError(f"module 'matryoshka.retrieval.funnel' has no attribute {name!r}")


def open_corpus(corpus: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    """A ``(N, d)`` corpus: an array as is, or a ``.npy`` path memory-mapped read-only."""
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus={str(path)!r} does not exist: pass a (N, d) .npy file."
            )
        arr = np.load(path, mmap_mode="r")
    else:
        arr = np.asarray(corpus)
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


def _rescore(
    q: np.ndarray, cand: np.ndarray, vectors: np.ndarray, m: int, keep: int, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One rerank stage: rescore ``(b, c)`` candidate ids (rows of ``vectors`` ``(N, >=m)``,
    ``-1`` none) at prefix size ``m`` against ``q`` ``(b, >=m)``, keep the best ``keep``:
    scores ``(b, keep)`` float32 and ids ``(b, keep)`` int64, ``NO_SCORE``/``-1`` padded."""
    b, c = cand.shape
    valid = cand >= 0
    rows = vectors[np.where(valid, cand, 0).ravel(), :m]  # (b*c, m), read from the map
    rows = truncate_numpy(rows, m, normalize=normalize).reshape(b, c, m)
    qm = truncate_numpy(q, m, normalize=normalize)  # (b, m)
    s = torch.bmm(torch.from_numpy(rows), torch.from_numpy(qm)[:, :, None])[..., 0]  # (b, c)
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
) -> tuple[np.ndarray, np.ndarray]:
    """The funnel's rerank, the one kernel every funnel uses (in memory and in the databases).

    Args:
        queries: ``(Q, D)`` float32 full-size queries (``D >= rerank[-1]``).
        candidates: ``(Q, c)`` int64 shortlisted row ids into ``vectors``, ``-1`` for none.
        vectors: ``(N, D)`` float32 rows (a memory-mapped corpus, or the candidates' vectors);
            only the first ``m`` columns are read at a stage of size ``m``.
        rerank: the validated size chain ``m_1 < ... <= D``.
        keeps: :meth:`FunnelSpec.keeps` -- ``len(rerank) + 1`` counts, the last is ``k``.
        normalize: cosine (each prefix unit-normalised) rather than raw inner product.
        batch_size: queries rescored at once (the gathered block is ``batch_size·c·m·4`` bytes).

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
    n_q, k = candidates.shape[0], int(keeps[-1])
    scores = np.empty((n_q, k), np.float32)
    ids = np.empty((n_q, k), np.int64)
    for s in range(0, n_q, batch_size):
        sc, c = np.empty(0, np.float32), candidates[s : s + batch_size]
        for m, keep in zip(rerank, keeps[1:], strict=True):
            sc, c = _rescore(queries[s : s + batch_size], c, vectors, m, keep, normalize)
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
        backend: index backend for the shortlist (see :func:`matryoshka.retrieval.index.make_index`).
        index_params: extra backend parameters (e.g. ``{"ef_search": 256}``).
        index: a prebuilt index over the corpus' size-``m_s`` prefixes to use instead of building
            one (its size, normalisation and count are checked by ``fit``).
        normalize: cosine similarity (each prefix unit-normalised) rather than raw inner product.
        model_name: recorded in the index header.
        batch_size: queries reranked at once (bounds the gathered candidate block to
            ``batch_size * k' * m * 4`` bytes).

    ``fit(corpus)`` takes a ``(N, d)`` array or a ``.npy`` path (memory-mapped) and sets
    ``corpus_``, ``index_``, ``dim_``, ``spec_`` and ``chain_`` (``spec_.rerank``).
    ``search(queries, k)`` maps ``(Q, d)`` queries to ``(scores, ids)``, both ``(Q, k)``, in FAISS
    conventions.
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

    @classmethod
    def from_spec(cls, spec: FunnelSpec, **kwargs: Any) -> FunnelRetriever:
        """A retriever for ``spec``; ``kwargs`` are the other constructor arguments."""
        return cls(spec.shortlist_size, spec.shortlist_k, spec.rerank, spec.keep, **kwargs)

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, corpus: np.ndarray | str | os.PathLike[str]) -> FunnelRetriever:
        """Open the ``(N, d)`` corpus and build (or check) the size-``m_s`` index. Returns self."""
        arr = open_corpus(corpus)
        n, d = arr.shape
        spec = FunnelSpec(self.shortlist_size, self.shortlist_k, self.rerank, self.keep)
        spec = spec.validate(d)
        positive_int(self.batch_size, "batch_size")
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
            add_in_chunks(idx, arr, progress=True, desc=f"index m={spec.shortlist_size}")
        self.corpus_ = arr
        self.dim_ = d
        self.spec_ = spec
        self.chain_ = tuple(spec.rerank or (d,))
        self.index_ = idx
        return self

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
            self.corpus_,
            self.chain_,
            counts,
            normalize=self.normalize,
            batch_size=self.batch_size,
        )

    def rerank_bytes_per_query(self, k: int) -> int:
        """Bytes of corpus prefixes read by the rerank stages for one query: ``sum_i c_i·m_i·4``."""
        self._check_fitted()
        return self.spec_.rerank_bytes_per_query(k)

    def __repr__(self) -> str:
        return (
            f"FunnelRetriever(shortlist_size={self.shortlist_size}, shortlist_k={self.shortlist_k},"
            f" rerank={self.rerank}, keep={self.keep}, backend={self.backend!r})"
        )
