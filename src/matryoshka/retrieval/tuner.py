"""Funnel tuning: the fastest ``(m_s, backend, k', chain)`` reaching a target recall@k.

:class:`FunnelTuner` measures :class:`~matryoshka.retrieval.funnel.FunnelRetriever` configurations
against exact full-size search (recall@k by :func:`~matryoshka.retrieval.funnel.recall_vs_reference`)
on held-out queries, and keeps the one with the highest measured throughput that meets the target
(within an optional RAM budget per vector). The recall it reports is a measurement on those
queries, so they must be real queries that are not corpus rows: a corpus row finds itself and
inflates recall. ``fit(..., validation_queries=...)`` measures the chosen funnel once more on a
second, disjoint set and reports both.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka._validate import positive_int
from matryoshka.retrieval.funnel import (
    FunnelRetriever,
    FunnelSpec,
    open_corpus,
    recall_vs_reference,
)
from matryoshka.retrieval.index import BACKENDS, ExactIndex, VectorIndex, add_in_chunks, is_graph
from matryoshka.retrieval.prefixes import PrefixMatrix

__all__ = ["FunnelTuner"]


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
    """Pick ``(m_s, backend, k', chain)`` reaching a target recall@k at the highest throughput.

    For every shortlist size, shortlist backend and rerank chain, ``k'`` grows through
    ``shortlist_ks`` until the recall@k against exact full-size search (on the held-out
    ``queries`` given to ``fit``) reaches ``target_recall``; each such configuration's queries/s
    is measured, and the fastest one that meets the target (and ``max_ram_bytes_per_vector``)
    wins. Larger ``k'`` for the same ``(m_s, backend, chain)`` is never faster, so it is not
    measured. A graph shortlist (``faiss-hnsw``, ``binary-hnsw``, ``sq8-hnsw``) searches with a
    beam ``efSearch = k'`` (unless ``index_params`` sets ``ef_search``), so ``k'`` is its cost knob
    too; its rows record ``ef_search`` and the chosen funnel keeps its own.

    Args:
        target_recall: recall@k to reach, in ``(0, 1]``.
        k: the ``k`` of recall@k.
        shortlist_sizes: candidate ``m_s`` (each ``<= d``).
        shortlist_ks: candidate ``k'``, increasing (each ``>= k``).
        chains: candidate rerank chains; ``None`` gives ``[(d,)]`` plus ``(4·m_s, d)`` where
            ``4·m_s < d``.
        backend, index_params, normalize: for the shortlist index (see :class:`FunnelRetriever`).
        backends: several shortlist backends to choose from (e.g. ``("exact", "sq8-hnsw",
            "binary")``); overrides ``backend``. ``index_params`` apply to every one of them.
        max_ram_bytes_per_vector: RAM budget: configurations whose in-memory bytes per corpus
            vector (shortlist index + prefix-norm factors; the memory-mapped rerank matrix is not
            counted) exceed it are measured but never chosen.
        repeats: timed runs per configuration (the best is kept).

    After ``fit(corpus, queries)``: ``best_`` (a fitted :class:`FunnelRetriever`), ``best_spec_``
    (its validated :class:`FunnelSpec`), ``best_params_``,
    ``best_recall_``, ``best_qps_``, ``reference_qps_`` (exact full-size search), ``target_met_``
    and ``results_`` (one dict per measured configuration, with its ``backend`` and
    ``ram_bytes_per_vector``). With ``validation_queries``: ``validation_recall_``, the chosen
    funnel's recall on them (else ``None``).
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
        backends: Sequence[str] | None = None,
        index_params: dict[str, Any] | None = None,
        normalize: bool = True,
        max_ram_bytes_per_vector: float | None = None,
        repeats: int = 2,
    ) -> None:
        self.target_recall = target_recall
        self.k = k
        self.shortlist_sizes = shortlist_sizes
        self.shortlist_ks = shortlist_ks
        self.chains = chains
        self.backend = backend
        self.backends = backends
        self.index_params = index_params
        self.normalize = normalize
        self.max_ram_bytes_per_vector = max_ram_bytes_per_vector
        self.repeats = repeats

    def _backends(self) -> list[str]:
        """The shortlist backends tried."""
        return [self.backend] if self.backends is None else list(self.backends)

    def _chains(self, m_s: int, d: int) -> list[tuple[int, ...]]:
        """The rerank chains tried with shortlist size ``m_s``."""
        if self.chains is None:
            return [(d,)] + ([(4 * m_s, d)] if 4 * m_s < d else [])
        return [tuple(chain) for chain in self.chains]

    def _validate(self, d: int) -> None:
        if not 0.0 < float(self.target_recall) <= 1.0:
            raise ValueError(f"target_recall={self.target_recall!r} must be in (0, 1].")
        positive_int(self.k, "k")
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
        for m_s in self.shortlist_sizes:  # every funnel of the grid is valid before timing any
            for chain in self._chains(m_s, d):
                FunnelSpec(m_s, int(ks[0]), chain).validate(d)
        backends = self._backends()
        unknown = [b for b in backends if b not in BACKENDS]
        if not backends or unknown:
            raise ValueError(
                f"backends={backends} must be non-empty shortlist backends, each one of "
                f"{list(BACKENDS)}."
            )
        budget = self.max_ram_bytes_per_vector
        if budget is not None and not float(budget) > 0:
            raise ValueError(
                f"max_ram_bytes_per_vector={budget!r} must be > 0 (bytes per corpus vector), "
                f"or None for no budget."
            )

    def _measure(
        self, arr: np.ndarray, q: np.ndarray, ref_ids: np.ndarray
    ) -> Iterator[tuple[dict[str, Any], FunnelRetriever]]:
        """Each measured configuration's result row and fitted retriever. For every ``(m_s,
        backend, chain)``, ``k'`` grows until the target is met; one shortlist index per
        ``(m_s, backend)``."""
        n, d = arr.shape
        sizes = sorted({m for m_s in self.shortlist_sizes for c in self._chains(m_s, d) for m in c})
        prefixes = PrefixMatrix.build(arr, sizes, normalize=self.normalize)  # one pass for all
        grid = [(m_s, b) for m_s in self.shortlist_sizes for b in self._backends()]
        for m_s, backend in tqdm(grid, desc="tune (m_s, backend)", leave=False):
            index: VectorIndex | None = None
            for chain in self._chains(m_s, d):
                for kp in self.shortlist_ks:
                    if kp > n:
                        break
                    fr = FunnelRetriever(
                        m_s,
                        int(kp),
                        chain,
                        backend=backend,
                        index_params=self.index_params,
                        index=index,
                        normalize=self.normalize,
                        prefixes=prefixes,
                    ).fit(arr)
                    index = fr.index_
                    beam = self._beam(index, int(kp))
                    ids, qps = _timed_search(fr.search, q, self.k, self.repeats)
                    rec = recall_vs_reference(ids, ref_ids)
                    row = {
                        "shortlist_size": m_s,
                        "backend": backend,
                        "shortlist_k": int(kp),
                        "rerank": list(fr.chain_),
                        "recall": rec,
                        "qps": qps,
                        "ram_bytes_per_vector": fr.nbytes / n,
                    }
                    if beam is not None:
                        row["ef_search"] = beam
                    yield row, fr
                    if rec >= self.target_recall:
                        break

    def _beam(self, index: VectorIndex, kp: int) -> int | None:
        """For a graph shortlist (an index with ``ef_search``), set its beam to ``k'`` -- the
        beam is the cost knob of a graph, as ``k'`` is of a scan -- unless ``index_params``
        fixes it; the beam measured, or ``None`` for indexes without one."""
        if not is_graph(index):
            return None
        if "ef_search" not in (self.index_params or {}):
            index.ef_search = kp  # type: ignore[attr-defined]
        return int(index.ef_search)  # type: ignore[attr-defined]

    def fit(
        self,
        corpus: np.ndarray | str | os.PathLike[str],
        queries: Any,
        validation_queries: Any = None,
    ) -> FunnelTuner:
        """Measure every configuration on held-out ``(Q, d)`` queries; set ``best_`` etc.

        ``validation_queries`` ``(V, d)``, disjoint from ``queries``: the chosen funnel's recall
        on them is measured once more (``validation_recall_``), the check that the reported
        recall carries over to queries the choice never saw.
        """
        arr = open_corpus(corpus)
        d = arr.shape[1]
        self._validate(d)
        q = _queries(queries, d, "queries")
        val = (
            None
            if validation_queries is None
            else _queries(validation_queries, d, "validation_queries")
        )
        if self.shortlist_ks[0] > arr.shape[0]:
            raise ValueError(
                f"shortlist_ks={list(self.shortlist_ks)} exceed the corpus size {arr.shape[0]}: "
                f"use shortlist sizes k' <= {arr.shape[0]}."
            )
        ref = add_in_chunks(ExactIndex(d, normalize=self.normalize), arr)
        ref_ids, self.reference_qps_ = _timed_search(ref.search, q, self.k, self.repeats)
        del ref
        results: list[dict[str, Any]] = []
        best: tuple[float, dict[str, Any], FunnelRetriever] | None = None
        fallback: tuple[float, dict[str, Any], FunnelRetriever] | None = None
        budget = self.max_ram_bytes_per_vector
        for row, fr in self._measure(arr, q, ref_ids):
            results.append(row)
            if budget is not None and row["ram_bytes_per_vector"] > float(budget):
                row["over_budget"] = True
                continue
            if fallback is None or row["recall"] > fallback[1]["recall"]:
                fallback = (row["qps"], row, fr)
            if row["recall"] >= self.target_recall and (best is None or row["qps"] > best[0]):
                best = (row["qps"], row, fr)
        self.results_ = results
        self.target_met_ = best is not None
        if fallback is None:
            cheapest = min(r["ram_bytes_per_vector"] for r in results)
            raise ValueError(
                f"max_ram_bytes_per_vector={budget} is below every measured configuration (the "
                f"smallest needs {cheapest:.1f} bytes per vector): raise the budget or add a "
                f"compact backend such as 'binary' to backends."
            )
        if best is None:
            warnings.warn(
                f"no configuration reached target_recall={self.target_recall} (best recall "
                f"{fallback[1]['recall']:.4f}): best_ is the most accurate one; try larger "
                f"shortlist_ks or shortlist_sizes.",
                stacklevel=2,
            )
            best = fallback
        self.best_qps_, self.best_params_, self.best_ = best
        if "ef_search" in self.best_params_:  # the graph is shared by every k' measured
            self.best_.index_.ef_search = self.best_params_["ef_search"]  # type: ignore[attr-defined]
        self.best_spec_ = self.best_.spec_
        self.best_recall_ = float(self.best_params_["recall"])
        self.validation_recall_: float | None = None
        if val is not None:
            ref = add_in_chunks(ExactIndex(d, normalize=self.normalize), arr)
            _, val_ref = ref.search(val, self.k)
            del ref
            _, val_ids = self.best_.search(val, self.k)
            self.validation_recall_ = recall_vs_reference(val_ids, val_ref)
        return self


def _queries(queries: Any, d: int, name: str) -> np.ndarray:
    """``queries`` as a non-empty ``(Q, d)`` float32 array, else a ``ValueError`` naming it."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0:
        raise ValueError(f"{name}.shape={q.shape}: pass (Q, {d}) held-out query embeddings.")
    return q
