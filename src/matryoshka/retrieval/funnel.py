"""Funnel retrieval: shortlist with a short prefix from an index, rerank with longer prefixes.

The paper's adaptive retrieval (Kusupati et al. 2022, §4.3): search the whole corpus with the
cheap size-``m_s`` prefix to get ``k'`` candidates, then rescore only those candidates with larger
prefixes (a chain ``m_1 < m_2 < ... <= d`` whose stages keep fewer and fewer candidates), and
return the top ``k``. The long prefixes are read from a (memory-mapped) ``(N, d)`` matrix, so the
corpus need not be held in RAM twice: only the short-prefix index lives in memory.

:class:`FunnelTuner` picks ``(m_s, k', chain)`` for a target recall@k against exact full-size
search with the highest throughput measured on held-out queries.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.index import NO_SCORE, ExactIndex, VectorIndex, make_index

__all__ = ["FunnelRetriever", "FunnelTuner", "check_chain", "open_corpus", "recall_vs_reference"]


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


def check_chain(rerank: Sequence[int], dim: int, name: str = "rerank") -> tuple[int, ...]:
    """The rerank chain as a tuple of strictly increasing sizes in ``[1, dim]``; a clear error
    naming ``name`` otherwise."""
    chain = tuple(int(m) for m in rerank)
    if not chain:
        raise ValueError(f"{name}=() is empty: give at least one rerank size, e.g. ({dim},).")
    if any(not 1 <= m <= dim for m in chain) or any(a >= b for a, b in itertools.pairwise(chain)):
        raise ValueError(
            f"{name}={list(chain)} must be strictly increasing sizes in [1, {dim}] (the corpus "
            f"dimension), e.g. ({dim},) or (64, {dim})."
        )
    return chain


class FunnelRetriever:
    """Shortlist ``k'`` candidates at prefix size ``m_s``, rerank with a chain of larger sizes.

    Args:
        shortlist_size: ``m_s``, the prefix size searched over the whole corpus.
        shortlist_k: ``k'``, how many candidates the shortlist returns (``>= k`` at search).
        rerank: increasing sizes of the rerank stages; ``None`` means one stage at the full size
            ``d``. The last stage keeps ``k``.
        keep: candidates kept after each stage but the last (``len(rerank) - 1`` counts,
            decreasing, between ``k`` and ``k'``); ``None`` interpolates geometrically from ``k'``
            to ``k``.
        backend: index backend for the shortlist (see :func:`matryoshka.retrieval.index.make_index`).
        index_params: extra backend parameters (e.g. ``{"ef_search": 256}``).
        index: a prebuilt index over the corpus' size-``m_s`` prefixes to use instead of building
            one (its size, normalisation and count are checked by ``fit``).
        normalize: cosine similarity (each prefix unit-normalised) rather than raw inner product.
        model_name: recorded in the index header.
        batch_size: queries reranked at once (bounds the gathered candidate block to
            ``batch_size * k' * m * 4`` bytes).

    ``fit(corpus)`` takes a ``(N, d)`` array or a ``.npy`` path (memory-mapped) and sets
    ``corpus_``, ``index_``, ``dim_``. ``search(queries, k)`` maps ``(Q, d)`` queries to
    ``(scores, ids)``, both ``(Q, k)``, in FAISS conventions.
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

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, corpus: np.ndarray | str | os.PathLike[str]) -> FunnelRetriever:
        """Open the ``(N, d)`` corpus and build (or check) the size-``m_s`` index. Returns self."""
        arr = open_corpus(corpus)
        n, d = arr.shape
        if not isinstance(self.shortlist_size, int) or not 1 <= self.shortlist_size <= d:
            raise ValueError(
                f"shortlist_size={self.shortlist_size!r} must be an int in [1, {d}] "
                f"(the corpus dimension)."
            )
        if not isinstance(self.shortlist_k, int) or self.shortlist_k < 1:
            raise ValueError(f"shortlist_k={self.shortlist_k!r} must be a positive int.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive int.")
        chain = check_chain(self.rerank if self.rerank is not None else (d,), d)
        if self.keep is not None and len(self.keep) != len(chain) - 1:
            raise ValueError(
                f"keep={list(self.keep)} has {len(self.keep)} counts but rerank={list(chain)} has "
                f"{len(chain)} stages: give one count per stage but the last (which keeps k)."
            )
        if self.index is not None:
            idx = self.index
            if idx.dim != self.shortlist_size:
                raise ValueError(
                    f"index holds prefixes of size {idx.dim} but shortlist_size="
                    f"{self.shortlist_size}: pass shortlist_size={idx.dim} or an index of size "
                    f"{self.shortlist_size}."
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
                self.shortlist_size,
                model_name=self.model_name,
                normalize=self.normalize,
                **(self.index_params or {}),
            )
            step = 65536
            for s in tqdm(range(0, n, step), desc=f"index m={self.shortlist_size}", leave=False):
                idx.add(arr[s : s + step])
        self.corpus_ = arr
        self.dim_ = d
        self.chain_ = chain
        self.index_ = idx
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError(
                "This FunnelRetriever is not fitted yet: call fit(corpus) before search()."
            )

    def keeps(self, k: int) -> tuple[int, ...]:
        """Candidates entering each rerank stage, ``k'`` first: ``len(chain) + 1`` counts, last ``k``."""
        self._check_fitted()
        kp = self.shortlist_k
        if self.keep is None:
            stages = len(self.chain_)
            mid = [round(kp * (k / kp) ** (i / stages)) for i in range(1, stages)]
        else:
            mid = [int(c) for c in self.keep]
        counts = (kp, *mid, k)
        if any(b > a for a, b in itertools.pairwise(counts)) or any(c < k for c in mid):
            raise ValueError(
                f"keep={mid} must decrease from shortlist_k={kp} down to k={k} (each count in "
                f"[{k}, {kp}]): the funnel only narrows."
            )
        return counts

    # -- search --------------------------------------------------------------------------------
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` through the funnel: ``(Q, d) -> scores (Q, k) float32, ids (Q, k) int64``."""
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive int.")
        if k > self.shortlist_k:
            raise ValueError(
                f"k={k} is larger than shortlist_k={self.shortlist_k}: the funnel can only return "
                f"shortlisted candidates; use shortlist_k >= k."
            )
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim_:
            raise ValueError(
                f"queries.shape={q.shape}: pass (Q, {self.dim_}) full-size query embeddings "
                f"(the corpus dimension)."
            )
        counts = self.keeps(k)
        _, cand = self.index_.search(q, self.shortlist_k)  # (Q, k')
        scores = np.empty((q.shape[0], k), np.float32)
        ids = np.empty((q.shape[0], k), np.int64)
        for s in range(0, q.shape[0], self.batch_size):
            c = cand[s : s + self.batch_size]
            sc = np.empty(c.shape, np.float32)
            for m, keep in zip(self.chain_, counts[1:], strict=True):
                sc, c = self._rerank(q[s : s + self.batch_size], c, m, keep)
            scores[s : s + self.batch_size], ids[s : s + self.batch_size] = sc, c
        return scores, ids

    def _rerank(
        self, q: np.ndarray, cand: np.ndarray, m: int, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rescore ``(b, c)`` candidate ids at size ``m`` and keep the best ``keep``: ``(b, keep)``."""
        b, c = cand.shape
        valid = cand >= 0
        rows = self.corpus_[np.where(valid, cand, 0).ravel(), :m]  # (b*c, m), read from the map
        rows = truncate_numpy(rows, m, normalize=self.normalize).reshape(b, c, m)
        qm = truncate_numpy(q, m, normalize=self.normalize)  # (b, m)
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

    def rerank_bytes_per_query(self, k: int) -> int:
        """Bytes of corpus prefixes read by the rerank stages for one query: ``sum_i c_i·m_i·4``."""
        counts = self.keeps(k)
        return int(sum(c * m * 4 for c, m in zip(counts[:-1], self.chain_, strict=True)))

    def __repr__(self) -> str:
        return (
            f"FunnelRetriever(shortlist_size={self.shortlist_size}, shortlist_k={self.shortlist_k},"
            f" rerank={self.rerank}, keep={self.keep}, backend={self.backend!r})"
        )


def _timed_search(
    search: Any, queries: np.ndarray, k: int, repeats: int
) -> tuple[np.ndarray, float]:
    """Run ``search(queries, k)`` ``repeats`` times; the ids and the best queries/s."""
    best = float("inf")
    ids = np.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return ids, queries.shape[0] / best


class FunnelTuner:
    """Pick ``(m_s, k', chain)`` reaching a target recall@k at the highest measured throughput.

    For every shortlist size and rerank chain, ``k'`` grows through ``shortlist_ks`` until the
    recall@k against exact full-size search (on the held-out ``queries`` given to ``fit``) reaches
    ``target_recall``; each such configuration's queries/s is measured, and the fastest one that
    meets the target wins. Larger ``k'`` for the same ``(m_s, chain)`` is never faster, so it is
    not measured.

    Args:
        target_recall: recall@k to reach, in ``(0, 1]``.
        k: the ``k`` of recall@k.
        shortlist_sizes: candidate ``m_s`` (each ``<= d``).
        shortlist_ks: candidate ``k'``, increasing (each ``>= k``).
        chains: candidate rerank chains; ``None`` gives ``[(d,)]`` plus ``(4·m_s, d)`` where
            ``4·m_s < d``.
        backend, index_params, normalize: for the shortlist index (see :class:`FunnelRetriever`).
        repeats: timed runs per configuration (the best is kept).

    After ``fit(corpus, queries)``: ``best_`` (a fitted :class:`FunnelRetriever`), ``best_params_``,
    ``best_recall_``, ``best_qps_``, ``reference_qps_`` (exact full-size search), ``target_met_``
    and ``results_`` (one dict per measured configuration).
    """

    def __init__(
        self,
        target_recall: float = 0.99,
        k: int = 10,
        shortlist_sizes: Sequence[int] = (16, 32, 64, 128),
        shortlist_ks: Sequence[int] = (20, 50, 100, 200, 400, 800),
        chains: Sequence[Sequence[int]] | None = None,
        *,
        backend: str = "exact",
        index_params: dict[str, Any] | None = None,
        normalize: bool = True,
        repeats: int = 2,
    ) -> None:
        self.target_recall = target_recall
        self.k = k
        self.shortlist_sizes = shortlist_sizes
        self.shortlist_ks = shortlist_ks
        self.chains = chains
        self.backend = backend
        self.index_params = index_params
        self.normalize = normalize
        self.repeats = repeats

    def _validate(self, d: int) -> None:
        if not 0.0 < float(self.target_recall) <= 1.0:
            raise ValueError(f"target_recall={self.target_recall!r} must be in (0, 1].")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be a positive int.")
        bad = [m for m in self.shortlist_sizes if not 1 <= m <= d]
        if not self.shortlist_sizes or bad:
            raise ValueError(
                f"shortlist_sizes={list(self.shortlist_sizes)} must be non-empty sizes in "
                f"[1, {d}] (the corpus dimension)."
            )
        ks = list(self.shortlist_ks)
        if not ks or ks != sorted(ks) or ks[0] < self.k:
            raise ValueError(
                f"shortlist_ks={ks} must be non-empty, increasing and each >= k={self.k}."
            )

    def fit(self, corpus: np.ndarray | str | os.PathLike[str], queries: Any) -> FunnelTuner:
        """Measure every configuration on held-out ``(Q, d)`` queries; set ``best_`` etc."""
        arr = open_corpus(corpus)
        d = arr.shape[1]
        self._validate(d)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0:
            raise ValueError(f"queries.shape={q.shape}: pass (Q, {d}) held-out query embeddings.")
        if self.shortlist_ks[0] > arr.shape[0]:
            raise ValueError(
                f"shortlist_ks={list(self.shortlist_ks)} exceed the corpus size {arr.shape[0]}: "
                f"use shortlist sizes k' <= {arr.shape[0]}."
            )
        ref = ExactIndex(d, normalize=self.normalize)
        for s in range(0, arr.shape[0], 65536):
            ref.add(arr[s : s + 65536])
        ref_ids, self.reference_qps_ = _timed_search(ref.search, q, self.k, self.repeats)
        del ref
        results: list[dict[str, Any]] = []
        best: tuple[float, dict[str, Any], FunnelRetriever] | None = None
        fallback: tuple[float, dict[str, Any], FunnelRetriever] | None = None
        for m_s in tqdm(list(self.shortlist_sizes), desc="tune m_s", leave=False):
            chains = self.chains
            if chains is None:
                chains = [(d,)] + ([(4 * m_s, d)] if 4 * m_s < d else [])
            index: VectorIndex | None = None
            for chain in chains:
                for kp in self.shortlist_ks:
                    if kp > arr.shape[0]:
                        break
                    fr = FunnelRetriever(
                        m_s,
                        int(kp),
                        tuple(chain),
                        backend=self.backend,
                        index_params=self.index_params,
                        index=index,
                        normalize=self.normalize,
                    ).fit(arr)
                    index = fr.index_
                    ids, qps = _timed_search(fr.search, q, self.k, self.repeats)
                    rec = recall_vs_reference(ids, ref_ids)
                    row = {
                        "shortlist_size": m_s,
                        "shortlist_k": int(kp),
                        "rerank": list(fr.chain_),
                        "recall": rec,
                        "qps": qps,
                    }
                    results.append(row)
                    if fallback is None or rec > fallback[1]["recall"]:
                        fallback = (qps, row, fr)
                    if rec >= self.target_recall:
                        if best is None or qps > best[0]:
                            best = (qps, row, fr)
                        break
        self.results_ = results
        self.target_met_ = best is not None
        if best is None:
            assert fallback is not None  # at least one configuration ran: shortlist_ks[0] >= k
            warnings.warn(
                f"no configuration reached target_recall={self.target_recall} (best recall "
                f"{fallback[1]['recall']:.4f}): best_ is the most accurate one; try larger "
                f"shortlist_ks or shortlist_sizes.",
                stacklevel=2,
            )
            best = fallback
        self.best_qps_, self.best_params_, self.best_ = best
        self.best_recall_ = float(self.best_params_["recall"])
        return self
