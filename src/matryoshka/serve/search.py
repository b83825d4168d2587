"""Search over the served corpus: a saved funnel, exact, an explicit funnel, or a funnel tuned
for a recall.

A saved funnel (``mrl index build --kind funnel``, served with ``--index FOLDER``) answers every
request that does not ask for another shortlist size or a target recall: its shortlist backend
(e.g. an 8-bit HNSW graph on a prefix) and its rerank matrix are the ones built offline, and a
request may change its ``k'``, rerank chain and graph beam (``shortlist_k``, ``rerank_sizes``,
``ef_search``) without rebuilding anything (:meth:`FunnelRetriever.with_params`).

A funnel tuned for a ``target_recall`` is measured on queries that are not corpus rows (a corpus
row finds itself at every prefix size, so tuning on rows over-promises): on held-out query
embeddings when the server has them (``tune_queries_file``), else on stand-ins made from corpus
rows by adding Gaussian noise of norm ``sigma`` and renormalising (:func:`perturbed_rows`). Each
tuned answer says which (``recall_measured_on``).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.serve.errors import ServeError

__all__ = ["HELD_OUT", "SearchEngine", "check_index_model", "load_search", "perturbed_rows"]

#: ``recall_measured_on`` of a funnel tuned on the server's held-out queries.
HELD_OUT = "held-out queries"


def perturbed_rows(corpus: np.ndarray, n: int, sigma: float, seed: int = 0) -> np.ndarray:
    """Stand-in queries: ``n`` random corpus rows, each plus Gaussian noise, renormalised.

    ``(N, d) -> (n', d)`` float32 with ``n' = min(n, N)``: ``q = normalize(x / |x| + sigma * g /
    sqrt(d))`` with ``g ~ N(0, I_d)``, so the noise has expected norm ``sigma`` against a unit
    row (``sigma = 0.5``: cosine ~0.89 to the row). Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    n_rows, d = int(corpus.shape[0]), int(corpus.shape[1])
    rows = np.sort(rng.choice(n_rows, size=min(n, n_rows), replace=False))
    x = np.asarray(corpus[rows], dtype=np.float32)  # (n', d)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    q = x + (sigma / math.sqrt(d)) * rng.standard_normal(x.shape).astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q


class SearchEngine:
    """Exact, explicit-funnel and target-recall search over a ``(N, d)`` corpus.

    Args:
        corpus: ``(N, d)`` float corpus embeddings (array or memory map), in the served space.
        index: an optional prebuilt shortlist index over the corpus (its size ``m`` is reused for
            funnels with ``shortlist_size == m``).
        model_name: recorded in indexes built here (the served model id).
        tune_queries: without ``held_out``: how many stand-in queries (:func:`perturbed_rows`)
            a funnel is tuned on for a target recall.
        tune_noise: ``sigma`` of the stand-in queries.
        held_out: ``(Q, d)`` held-out query embeddings (not corpus rows) to tune on instead.
        funnel: a fitted :class:`~matryoshka.retrieval.funnel.FunnelRetriever` over the same
            corpus, served by :meth:`saved` (e.g. one loaded from ``mrl index build --kind
            funnel``).

    Funnel retrievers and prefix indexes are built on first use and cached.
    """

    def __init__(
        self,
        corpus: np.ndarray,
        index: Any = None,
        model_name: str = "unknown",
        tune_queries: int = 200,
        tune_noise: float = 0.5,
        held_out: np.ndarray | None = None,
        funnel: Any = None,
    ) -> None:
        from matryoshka.retrieval.funnel import open_corpus

        self.corpus = open_corpus(corpus)
        self.n, self.dim = (int(s) for s in self.corpus.shape)
        self.model_name = model_name
        self.tune_queries = tune_queries
        self.tune_noise = float(tune_noise)
        self.held_out = None if held_out is None else _check_queries(held_out, self.dim)
        self.recall_measured_on = (
            HELD_OUT
            if self.held_out is not None
            else f"perturbed corpus rows (sigma={tune_noise:g})"
        )
        self._lock = threading.Lock()
        self._indexes: dict[int, Any] = {}
        if index is not None:
            self._indexes[int(index.dim)] = index
        self._retrievers: dict[tuple[int, int, tuple[int, ...]], Any] = {}
        self._tuned: dict[tuple[float, int], tuple[Any, float]] = {}
        self.saved_funnel = funnel
        self._variants: dict[tuple[int, tuple[int, ...], int | None], Any] = {}

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

    def check_saved(
        self,
        k: int,
        shortlist_k: int | None,
        rerank: list[int] | None,
        ef_search: int | None,
    ) -> tuple[int, tuple[int, ...], int | None]:
        """Validate a request's changes to the saved funnel: ``(k', chain, ef_search)``.

        ``shortlist_k`` defaults to the saved ``k'`` (at least ``k``), ``rerank`` to the saved
        chain; every rerank size must be one the saved matrix has factors for, and ``ef_search``
        needs a graph shortlist. Raises :class:`ServeError` naming the parameter and the fix.
        """
        from matryoshka.retrieval.index import is_graph

        fr = self.saved_funnel
        assert fr is not None
        kp = shortlist_k if shortlist_k is not None else max(k, int(fr.spec_.shortlist_k))
        if not k <= kp <= self.n:
            raise ServeError(
                f"shortlist_k={kp} must be in [k={k}, {self.n}] (between k and the corpus size).",
                param="shortlist_k",
                code="invalid_value",
            )
        chain = fr.chain_ if rerank is None else self._check_rerank(fr.shortlist_size, rerank)
        stored = tuple(int(m) for m in fr.prefixes_.chain)
        if any(m not in stored for m in chain):
            raise ServeError(
                f"rerank_sizes={list(chain)}: the served funnel's rerank matrix has prefix "
                f"norms for sizes {list(stored)} only; pick increasing sizes among them (or "
                f"rebuild the funnel with mrl index build --kind funnel --rerank ...).",
                param="rerank_sizes",
                code="invalid_value",
            )
        if ef_search is not None and not is_graph(fr.index_):
            raise ServeError(
                f"ef_search={ef_search} applies to a graph shortlist (faiss-hnsw, binary-hnsw, "
                f"sq8-hnsw) but the served funnel's is {fr.index_.backend!r}: drop it, or change "
                f"shortlist_k instead.",
                param="ef_search",
                code="invalid_value",
            )
        return kp, tuple(int(m) for m in chain), ef_search

    def saved(
        self, q: np.ndarray, k: int, params: tuple[int, tuple[int, ...], int | None]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Search with the saved funnel under ``params`` (:meth:`check_saved`): ``(d,) ->
        scores (k,), ids (k,)``, sizes used (with the shortlist's backend and graph beam)."""
        from matryoshka.retrieval.index import is_graph

        base = self.saved_funnel
        assert base is not None
        kp, chain, ef = params
        with self._lock:
            fr = self._variants.get(params)
        if fr is None:
            same = kp == base.spec_.shortlist_k and chain == tuple(base.chain_) and ef is None
            fr = base if same else base.with_params(shortlist_k=kp, rerank=chain, ef_search=ef)
            with self._lock:
                if len(self._variants) >= 64:
                    self._variants.pop(next(iter(self._variants)))
                fr = self._variants.setdefault(params, fr)
        scores, ids = fr.search(q[None, :], k)
        index = fr.index_
        sizes = {
            "mode": "funnel",
            "shortlist_size": int(fr.shortlist_size),
            "shortlist_k": kp,
            "rerank_sizes": list(chain),
            "backend": str(index.backend),
            "ef_search": int(index.ef_search) if is_graph(index) else None,
        }
        return scores[0], ids[0], sizes

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
        """Search with the fastest funnel measured to reach ``target`` recall@k on this corpus,
        on held-out queries or noisy stand-ins (never the corpus rows themselves): ``(d,) ->
        scores (k,), ids (k,)``, sizes used with ``measured_recall`` and ``recall_measured_on``."""
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
            "recall_measured_on": self.recall_measured_on,
        }
        return scores[0], ids[0], sizes

    def tuning_queries(self) -> np.ndarray:
        """The ``(Q, d)`` queries funnels are tuned on: the held-out ones, else noisy rows."""
        if self.held_out is not None:
            return self.held_out
        return perturbed_rows(self.corpus, self.tune_queries, self.tune_noise)

    def _tune(self, target: float, k: int) -> tuple[Any, float]:
        from matryoshka.retrieval.funnel import FunnelTuner

        queries = self.tuning_queries()  # (Q, d)
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
    tune_queries_path: str | None = None,
    tune_noise: float = 0.5,
    model_ids: Collection[str] | None = None,
    allow_model_mismatch: bool = False,
) -> SearchEngine | None:
    """The search engine over the served corpus, or ``None`` when there is no corpus.

    ``corpus`` (``(N, dim)``) and ``index`` may be passed loaded; otherwise they are read from
    ``corpus_path`` / ``index_path``. A full-size exact index stands in for a missing corpus. A
    corpus of the wrong width, an index of another size, a prefix index without a corpus, or an
    index built for a model outside ``model_ids`` (default: ``{model_name}``; see
    :func:`check_index_model`, ``allow_model_mismatch`` downgrades it to a warning) is a
    ``ValueError`` that says what to pass instead. ``tune_queries_path``: a ``(Q, dim)`` ``.npy``
    of held-out query embeddings for target-recall tuning.

    ``index_path`` may also be a saved funnel folder (``mrl index build --kind funnel``; or
    ``index`` a fitted :class:`~matryoshka.retrieval.funnel.FunnelRetriever`): it is then served
    as is (:meth:`SearchEngine.saved`), and a float32 rerank matrix stands in for a missing
    corpus.
    """
    from matryoshka.retrieval.funnel import FunnelRetriever, is_saved_funnel

    if index is None and index_path is not None:
        if is_saved_funnel(index_path):
            index = FunnelRetriever.load(index_path)
        else:
            from matryoshka.retrieval.index import load_index

            index = load_index(index_path)
    if index is not None:
        ids = set(model_ids) if model_ids is not None else {model_name}
        check_index_model(index, model_name, ids, index_path, allow_model_mismatch)
    funnel = index if isinstance(index, FunnelRetriever) else None
    if funnel is not None:
        index = None
        if funnel.dim != dim:
            raise ValueError(
                f"index={index_path!r} is a funnel over {funnel.dim}-d vectors but the model "
                f"serves {dim}-d ones: build the funnel from {model_name!r}'s embeddings."
            )
        if corpus is None and corpus_path is None:
            if funnel.prefixes_.dtype != "float32":
                raise ValueError(
                    f"index={index_path!r} is a funnel whose rerank matrix is "
                    f"{funnel.prefixes_.dtype}: pass corpus= the (N, {dim}) float embeddings "
                    "too (exact search and tuning read them), or rebuild the funnel with "
                    "--rerank-dtype float32."
                )
            corpus = funnel.corpus_  # the float32 rerank matrix is the corpus
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
    for part in (index, funnel):
        if part is not None and part.ntotal != corpus.shape[0]:
            raise ValueError(
                f"index has {part.ntotal} vectors but the corpus has {corpus.shape[0]}: build "
                "the index from this corpus."
            )
    held_out = None
    if tune_queries_path is not None:
        path = Path(tune_queries_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tune_queries_file={tune_queries_path!r} does not exist: pass a (Q, {dim}) .npy "
                f"of held-out query embeddings from {model_name!r}."
            )
        held_out = np.load(path, allow_pickle=False)
    return SearchEngine(
        corpus,
        index,
        model_name=model_name,
        tune_queries=tune_queries,
        tune_noise=tune_noise,
        held_out=held_out,
        funnel=funnel,
    )


def _check_queries(q: np.ndarray, dim: int) -> np.ndarray:
    """Held-out queries as ``(Q, dim)`` finite float32 rows, none all zero (else ``ValueError``)."""
    arr = np.asarray(q)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != dim:
        raise ValueError(
            f"tune_queries_file holds an array of shape {arr.shape}: pass (Q, {dim}) held-out "
            f"query embeddings (Q >= 1) in the served space."
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"tune_queries_file has dtype {arr.dtype}: pass float embeddings.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all() or not np.any(arr, axis=1).all():
        raise ValueError(
            "tune_queries_file has NaN, inf or all-zero rows: pass finite query embeddings."
        )
    return arr


def check_index_model(
    index: Any,
    model_name: str,
    accepted: Collection[str],
    where: str | None = None,
    allow_mismatch: bool = False,
) -> None:
    """Refuse an index whose header names a model outside ``accepted`` (or ``"unknown"``).

    The message names both models and the fixes; with ``allow_mismatch`` it is a warning.
    """
    built = str(getattr(index, "model_name", "unknown"))
    if built in accepted:
        return
    at = f"index={where!r}" if where is not None else "the index"
    if built == "unknown":
        problem = (
            f"{at} does not record its model (model_name 'unknown'), so it cannot be checked "
            f"against the served model {model_name!r}"
        )
    else:
        problem = f"{at} was built from model {built!r} but this server serves {model_name!r}"
    fix = (
        f"rebuild it from this server's vectors (mrl index build --model-name {model_name!r}), "
        "or pass --allow-model-mismatch (allow_model_mismatch=True) to serve it anyway"
    )
    if allow_mismatch:
        warnings.warn(f"{problem}; serving it anyway (allow_model_mismatch).", stacklevel=2)
        return
    raise ValueError(f"{problem}: {fix}.")
