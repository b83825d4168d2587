"""Search over the served corpus: exact, an explicit funnel, or a funnel tuned for a recall."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from matryoshka.serve.errors import ServeError

__all__ = ["SearchEngine", "load_search"]


class SearchEngine:
    """Exact, explicit-funnel and target-recall search over a ``(N, d)`` corpus.

    Args:
        corpus: ``(N, d)`` float corpus embeddings (array or memory map), in the served space.
        index: an optional prebuilt shortlist index over the corpus (its size ``m`` is reused for
            funnels with ``shortlist_size == m``).
        model_name: recorded in indexes built here.
        tune_queries: corpus rows used as held-out queries when tuning for a target recall.

    Funnel retrievers and prefix indexes are built on first use and cached.
    """

    def __init__(
        self,
        corpus: np.ndarray,
        index: Any = None,
        model_name: str = "unknown",
        tune_queries: int = 200,
    ) -> None:
        from matryoshka.retrieval.funnel import open_corpus

        self.corpus = open_corpus(corpus)
        self.n, self.dim = (int(s) for s in self.corpus.shape)
        self.model_name = model_name
        self.tune_queries = tune_queries
        self._lock = threading.Lock()
        self._indexes: dict[int, Any] = {}
        if index is not None:
            self._indexes[int(index.dim)] = index
        self._retrievers: dict[tuple[int, int, tuple[int, ...]], Any] = {}
        self._tuned: dict[tuple[float, int], tuple[Any, float]] = {}

    def _index(self, m: int) -> Any:
        from matryoshka.retrieval.index import ExactIndex, add_in_chunks

        with self._lock:
            idx = self._indexes.get(m)
        if idx is None:
            idx = ExactIndex(m, model_name=self.model_name)
            add_in_chunks(idx, self.corpus)
            _ = idx.vectors  # merge the chunks now, not during a concurrent search
            with self._lock:
                idx = self._indexes.setdefault(m, idx)
        return idx

    def _retriever(self, m_s: int, k_prime: int, chain: tuple[int, ...]) -> Any:
        from matryoshka.retrieval.funnel import FunnelRetriever

        key = (m_s, k_prime, chain)
        with self._lock:
            fr = self._retrievers.get(key)
        if fr is None:
            fr = FunnelRetriever(m_s, k_prime, chain, index=self._index(m_s)).fit(self.corpus)
            with self._lock:
                if len(self._retrievers) >= 64:
                    self._retrievers.pop(next(iter(self._retrievers)))
                fr = self._retrievers.setdefault(key, fr)
        return fr

    def check_funnel(
        self, k: int, shortlist_size: int | None, shortlist_k: int | None, rerank: list[int] | None
    ) -> tuple[int, int, tuple[int, ...]]:
        """Validate an explicit funnel against the corpus: ``(m_s, k', chain)``.

        ``shortlist_k`` defaults to ``min(N, max(10 k, 100))`` and ``rerank`` to ``[d]``. Raises
        :class:`ServeError` naming the parameter, the value and the accepted range.
        """
        if shortlist_size is None:
            raise ServeError(
                "An explicit funnel needs 'shortlist_size' (m_s), e.g. 32, together with "
                "'shortlist_k' and optionally 'rerank_sizes'.",
                param="shortlist_size",
                code="missing_required_parameter",
            )
        if not 1 <= shortlist_size <= self.dim:
            raise ServeError(
                f"shortlist_size={shortlist_size} must be in [1, {self.dim}] (the corpus "
                f"dimension).",
                param="shortlist_size",
                code="invalid_value",
            )
        kp = shortlist_k if shortlist_k is not None else min(self.n, max(10 * k, 100))
        if not k <= kp <= self.n:
            raise ServeError(
                f"shortlist_k={kp} must be in [k={k}, {self.n}] (between k and the corpus size).",
                param="shortlist_k",
                code="invalid_value",
            )
        return shortlist_size, kp, self._check_rerank(shortlist_size, rerank)

    def _check_rerank(self, shortlist_size: int, rerank: list[int] | None) -> tuple[int, ...]:
        """The rerank chain: the library's rule (:func:`~matryoshka.retrieval.funnel.check_chain`:
        non-empty, strictly increasing, in ``[1, d]``), plus the server's own floor: no stage
        below ``shortlist_size`` (rescoring with a shorter prefix than the shortlist used only
        loses accuracy, so the server refuses it as a likely client mistake)."""
        from matryoshka.retrieval.funnel import check_chain

        chain = tuple(rerank) if rerank is not None else (self.dim,)
        problem = ServeError(
            f"rerank_sizes={list(chain)} must be non-empty, strictly increasing sizes in "
            f"[shortlist_size={shortlist_size}, {self.dim}], e.g. [{self.dim}].",
            param="rerank_sizes",
            code="invalid_value",
        )
        try:
            return check_chain(chain, self.dim, "rerank_sizes", min_size=shortlist_size)
        except ValueError as e:  # the library's message speaks Python; the client's is JSON
            raise problem from e

    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Exact full-size search: ``(d,) -> scores (k,), ids (k,)``, sizes used."""
        scores, ids = self._index(self.dim).search(q[None, :], k)
        sizes = {"mode": "exact", "shortlist_size": self.dim, "shortlist_k": k, "rerank_sizes": []}
        return scores[0], ids[0], sizes

    def funnel(
        self, q: np.ndarray, k: int, funnel: tuple[int, int, tuple[int, ...]]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Explicit funnel search: ``(d,) -> scores (k,), ids (k,)``, sizes used."""
        m_s, kp, chain = funnel
        scores, ids = self._retriever(m_s, kp, chain).search(q[None, :], k)
        sizes = {"mode": "funnel", "shortlist_size": m_s, "shortlist_k": kp}
        return scores[0], ids[0], {**sizes, "rerank_sizes": list(chain)}

    def tuned(
        self, q: np.ndarray, k: int, target: float
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Search with the fastest funnel measured to reach ``target`` recall@k on this corpus."""
        # Targets are rounded up to a 0.01 grid: at most 100 tunings per k, each target still met.
        key = (min(1.0, math.ceil(round(float(target) * 100, 6)) / 100), k)
        with self._lock:
            entry = self._tuned.get(key)
        if entry is None:
            entry = self._tune(key[0], k)
            with self._lock:
                entry = self._tuned.setdefault(key, entry)
        fr, recall = entry
        scores, ids = fr.search(q[None, :], k)
        sizes = {
            "mode": "tuned",
            "shortlist_size": int(fr.shortlist_size),
            "shortlist_k": int(fr.shortlist_k),
            "rerank_sizes": [int(m) for m in fr.chain_],
            "measured_recall": recall,
        }
        return scores[0], ids[0], sizes

    def _tune(self, target: float, k: int) -> tuple[Any, float]:
        import warnings

        from matryoshka.retrieval.funnel import FunnelTuner

        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(self.n, size=min(self.tune_queries, self.n), replace=False))
        queries = np.asarray(self.corpus[rows], dtype=np.float32)  # (Q, d)
        sizes = [m for m in (8, 16, 32, 64, 128) if m < self.dim] or [self.dim]
        ks = [c for c in (20, 50, 100, 200, 400, 800) if k <= c <= self.n] or [self.n]
        tuner = FunnelTuner(target, k, sizes, ks, repeats=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # target not met: the most accurate funnel is used
            tuner.fit(self.corpus, queries)
        return tuner.best_, float(tuner.best_recall_)


def load_search(
    dim: int,
    model_name: str,
    *,
    corpus: np.ndarray | None = None,
    index: Any = None,
    corpus_path: str | None = None,
    index_path: str | None = None,
    tune_queries: int = 200,
) -> SearchEngine | None:
    """The search engine over the served corpus, or ``None`` when there is no corpus.

    ``corpus`` (``(N, dim)``) and ``index`` may be passed loaded; otherwise they are read from
    ``corpus_path`` / ``index_path``. A full-size exact index stands in for a missing corpus. A
    corpus of the wrong width, an index of another size, or a prefix index without a corpus is a
    ``ValueError`` that says what to pass instead.
    """
    if index is None and index_path is not None:
        from matryoshka.retrieval.index import load_index

        index = load_index(index_path)
    if corpus is None and corpus_path is not None:
        from matryoshka.retrieval.funnel import open_corpus

        corpus = open_corpus(corpus_path)
    if corpus is None and index is not None and getattr(index, "dim", None) == dim:
        corpus = getattr(index, "vectors", None)  # a full-size exact index holds the corpus
    if corpus is None:
        if index is not None:
            raise ValueError(
                f"index={index_path!r} holds {index.dim}-d prefixes: pass corpus= the (N, {dim}) "
                "full-size embeddings too (the funnel reranks with them)."
            )
        return None
    if corpus.shape[1] != dim:
        raise ValueError(
            f"corpus has {corpus.shape[1]}-d vectors but the model serves {dim}-d ones: "
            f"embed the corpus with {model_name!r} (and the same adaptor)."
        )
    if index is not None and index.ntotal != corpus.shape[0]:
        raise ValueError(
            f"index has {index.ntotal} vectors but the corpus has {corpus.shape[0]}: build "
            "the index from this corpus."
        )
    return SearchEngine(corpus, index, model_name=model_name, tune_queries=tune_queries)
