"""What the server does, without HTTP: :class:`EmbeddingService` answers embeddings, search,
model and health requests with plain methods; :mod:`matryoshka.serve.app` only routes to them.

    service = EmbeddingService.from_config(ServeConfig(), corpus=corpus)
    await service.start()
    reply = await service.embed(EmbeddingRequest(input=["a", "b"], dimensions=64))
    await service.stop()

Every client mistake raises :class:`~matryoshka.serve.errors.ServeError` (the HTTP layer renders
it); every setup mistake raises ``ValueError`` when the service is built.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from matryoshka.ops import truncate_numpy
from matryoshka.serve.batching import DynamicBatcher
from matryoshka.serve.config import ServeConfig
from matryoshka.serve.encoder import EncodeInput, ServedEncoder, load_encoder, served_model_ids
from matryoshka.serve.errors import ServeError
from matryoshka.serve.inputs import TextLimits
from matryoshka.serve.metrics import Metrics
from matryoshka.serve.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    SearchRequest,
    SearchResponse,
)
from matryoshka.serve.search import SearchEngine, load_search

__all__ = ["EmbeddingService"]

SearchResult = tuple[np.ndarray, np.ndarray, dict[str, Any]]
T = TypeVar("T")


class EmbeddingService:
    """The served model, its limits, its batcher and (with a corpus) its search engine.

    Args:
        config: the server's configuration.
        encoder: the served encoder (model + adaptor).
        corpus, index: ``(N, d)`` corpus embeddings and a shortlist index, already loaded;
            otherwise read from ``config.corpus`` / ``config.index`` (see
            :func:`~matryoshka.serve.search.load_search`).

    Call :meth:`start` on the running event loop before the first request and :meth:`stop`
    after the last (the HTTP app does both in its lifespan).

    Request inputs are tokenised and checked in a worker thread (one, so the counting tokenizer
    is never used by two threads at once) and encoded in the batcher's thread: the event loop
    only parses and routes, so ``/health`` answers while a large request is being worked on.
    """

    def __init__(
        self,
        config: ServeConfig,
        encoder: ServedEncoder,
        *,
        corpus: np.ndarray | None = None,
        index: Any = None,
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.dim = encoder.dim
        self.limits = TextLimits.from_config(config, encoder.max_tokens)
        self.ids = served_model_ids(config, encoder.adaptor)
        self.model_name, self.accepted = self.ids.served, self.ids.accepted
        self.engine: SearchEngine | None = load_search(
            self.dim,
            self.model_name,
            corpus=corpus,
            index=index,
            corpus_path=config.corpus,
            index_path=config.index,
            tune_queries=config.tune_queries,
            tune_queries_path=config.tune_queries_file,
            tune_noise=config.tune_noise,
            model_ids=self.accepted,
            allow_model_mismatch=config.allow_model_mismatch,
        )
        self._validator: ThreadPoolExecutor | None = None
        self.metrics = Metrics()
        self.batcher = DynamicBatcher(
            encoder, config.max_batch_size, config.max_wait_ms, config.batching, self.metrics
        )
        self.started = time.time()

    @classmethod
    def from_config(
        cls,
        config: ServeConfig,
        *,
        encoder: Any = None,
        adaptor: Any = None,
        corpus: np.ndarray | None = None,
        index: Any = None,
    ) -> EmbeddingService:
        """Load what ``config`` names; ``encoder`` (a
        :class:`~matryoshka.models.text_encoder.TextEncoder`), ``adaptor``, ``corpus`` and
        ``index`` may be passed already loaded."""
        return cls(config, load_encoder(config, encoder, adaptor), corpus=corpus, index=index)

    async def start(self) -> None:
        """Start the batcher on the running event loop."""
        await self.batcher.start()

    async def stop(self) -> None:
        """Stop the batcher (pending requests get an error) and the validation thread."""
        await self.batcher.stop()
        if self._validator is not None:
            self._validator.shutdown(wait=False, cancel_futures=True)
            self._validator = None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the service's validation thread, awaited without blocking the loop."""
        if self._validator is None:
            self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-validate")
        return await asyncio.get_running_loop().run_in_executor(self._validator, fn, *args)

    def check_model(self, model: str | None) -> None:
        """``model`` must be omitted or one of the accepted ids (404 otherwise).

        With an adaptor the base model's ids are refused too (404 ``model_not_found``, with a
        message saying why): the server's vectors are the adapted ones, not the base model's.
        """
        if model is not None and model in self.ids.base and model not in self.accepted:
            raise ServeError(
                f"The model {model!r} is not served as such: this server serves it through the "
                f"adaptor {self.config.adaptor or '(in memory)'} as {self.model_name!r}, whose "
                f"vectors differ from {model!r}'s; send model={self.model_name!r} or omit "
                "'model' (start a server without --adaptor for the base model's vectors).",
                status=404,
                param="model",
                code="model_not_found",
            )
        if model is not None and model not in self.accepted:
            raise ServeError(
                f"The model {model!r} does not exist on this server: use {self.model_name!r} "
                "(GET /v1/models lists the served models) or omit 'model'.",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """``POST /v1/embeddings``: the first ``dimensions`` coordinates, re-normalised."""
        self.check_model(request.model)
        dim = self.dim
        m = request.dimensions if request.dimensions is not None else dim
        if not 1 <= m <= dim:
            raise ServeError(
                f"dimensions={m} is out of range: {self.model_name!r} gives {dim}-d embeddings; "
                f"pass 1 <= dimensions <= {dim} (or omit it for {dim}).",
                param="dimensions",
                code="invalid_dimensions",
            )
        inputs, counts = await self.off_loop(self._check_inputs, request.input)
        z = truncate_numpy(await self.batcher.embed(inputs), m, normalize=True)  # (n, m)
        tokens = int(sum(counts))
        self.metrics.observe_embedding(m, len(inputs), tokens)
        data: list[dict[str, Any]] = []
        for i, row in enumerate(z):
            vec: list[float] | str
            if request.encoding_format == "base64":
                vec = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
            else:
                vec = row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return EmbeddingResponse.model_validate(
            {
                "object": "list",
                "data": data,
                "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _check_inputs(
        self, given: str | list[str] | list[int] | list[list[int]]
    ) -> tuple[list[EncodeInput], list[int]]:
        """The request's ``input`` as ``n`` texts or token-id lists to encode, with their token
        counts; a :class:`ServeError` naming ``input`` / ``input[i]`` if a limit is broken."""
        if isinstance(given, str):
            texts, counts = self.limits.check([given], "input", self.encoder)
            return list(texts), counts
        if given and isinstance(given[0], int):  # one text's token ids
            one, counts = self.limits.check_ids([list(given)], "input", self.encoder.vocab_size)
            return list(one), counts
        if given and isinstance(given[0], list):  # a batch of token-id lists
            batch = [list(ids) for ids in given if isinstance(ids, list)]
            ids_, counts = self.limits.check_ids(batch, "input", self.encoder.vocab_size)
            return list(ids_), counts
        texts, counts = self.limits.check([str(t) for t in given], "input", self.encoder)
        return list(texts), counts

    async def search(self, request: SearchRequest) -> SearchResponse:
        """``POST /v1/search``: exact, explicit-funnel or target-recall top-k search."""
        self.check_model(request.model)
        engine = self._check_search(request)
        q, tokens = await self._query_vector(request.query)
        scores, ids, sizes = await self._run_search(engine, q, request)
        keep = ids >= 0
        ids_l, scores_l = ids[keep].tolist(), [float(s) for s in scores[keep]]
        return SearchResponse.model_validate(
            {
                "object": "search.result",
                "model": self.model_name,
                "data": [
                    {"rank": r, "id": i, "score": s}
                    for r, (i, s) in enumerate(zip(ids_l, scores_l, strict=True))
                ],
                "ids": ids_l,
                "scores": scores_l,
                "sizes": sizes,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _check_search(self, request: SearchRequest) -> SearchEngine:
        """The engine, once the request's ``k`` and mode are known to be acceptable."""
        engine = self.engine
        if engine is None:
            raise ServeError(
                "This server has no corpus to search: start it with --corpus (N, d) .npy "
                "embeddings (and optionally --index).",
                param=None,
                code="search_unavailable",
            )
        limit = min(self.config.max_k, engine.n)
        if request.k > limit:
            raise ServeError(
                f"k={request.k} is larger than allowed: use k <= {limit} "
                f"(corpus size {engine.n}, server limit {self.config.max_k}).",
                param="k",
                code="invalid_value",
            )
        if request.target_recall is not None and _explicit_funnel(request):
            raise ServeError(
                "Give either an explicit funnel (shortlist_size, shortlist_k, rerank_sizes, "
                "ef_search) or target_recall, not both.",
                param="target_recall",
                code="invalid_value",
            )
        return engine

    async def _query_vector(self, query: str | list[float]) -> tuple[np.ndarray, int]:
        """The ``(d,)`` query embedding and the tokens spent on it (0 for a given vector)."""
        if isinstance(query, str):
            texts, counts = await self.off_loop(self.limits.check, [query], "query", self.encoder)
            return (await self.batcher.embed(list(texts)))[0], counts[0]
        with np.errstate(over="ignore"):  # huge numbers become inf, rejected just below
            q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.dim,) or not np.isfinite(q).all() or not np.any(q):
            raise ServeError(
                f"'query' is a vector of length {q.shape[0]}: pass {self.dim} finite numbers, "
                f"not all zero (a full-size embedding), or a query text.",
                param="query",
                code="invalid_value",
            )
        return q, 0

    async def _run_search(
        self, engine: SearchEngine, q: np.ndarray, request: SearchRequest
    ) -> SearchResult:
        """Search in a worker thread with the mode the request asks for: the saved funnel
        unless the request names another shortlist size or a target recall."""
        saved = engine.saved_funnel
        if (
            saved is not None
            and request.target_recall is None
            and request.shortlist_size in (None, saved.shortlist_size)
        ):
            params = engine.check_saved(
                request.k, request.shortlist_k, request.rerank_sizes, request.ef_search
            )
            return await run_in_threadpool(engine.saved, q, request.k, params)
        if request.ef_search is not None:
            served = (
                f"the served funnel's shortlist size {saved.shortlist_size}"
                if saved is not None
                else "a funnel served with --index FOLDER (mrl index build --kind funnel)"
            )
            raise ServeError(
                f"ef_search={request.ef_search} applies to {served}: drop ef_search, or drop "
                "shortlist_size and target_recall to search the served funnel.",
                param="ef_search",
                code="invalid_value",
            )
        if _explicit_funnel(request):
            funnel = engine.check_funnel(
                request.k, request.shortlist_size, request.shortlist_k, request.rerank_sizes
            )
            return await run_in_threadpool(engine.funnel, q, request.k, funnel)
        if request.target_recall is not None:
            return await run_in_threadpool(engine.tuned, q, request.k, request.target_recall)
        return await run_in_threadpool(engine.exact, q, request.k)

    def health(self) -> dict[str, Any]:
        """``GET /health``: liveness and what is loaded."""
        return {
            "status": "ok",
            "model": self.model_name,
            "dimensions": self.dim,
            "adaptor": self.encoder.adaptor is not None,
            "search": self.engine is not None,
            "corpus_size": self.engine.n if self.engine is not None else 0,
            "funnel": _funnel_summary(self.engine),
            "batching": self.config.batching,
            "uptime_s": round(time.time() - self.started, 3),
        }

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the served model in OpenAI's list format, with its sizes."""
        adaptor = self.encoder.adaptor
        nested = adaptor is not None
        note = (
            "prefixes come from a Matryoshka adaptor: every size is a nested embedding"
            if nested
            else "no adaptor loaded: smaller sizes are plain truncations of a model that was not "
            "Matryoshka-trained (quality drops faster than with an adaptor)"
        )
        sizes = self.trained_sizes()
        model = {
            "id": self.model_name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "matryoshka",
            "dimensions": self.dim,
            "max_input_tokens": self.limits.max_tokens,
            "aliases": sorted(self.accepted - {self.model_name}),
            "matryoshka": {
                "nested": nested,
                "adaptor": self.config.adaptor if nested else None,
                "adaptor_sha256": self.ids.adaptor_sha256,
                "base_model": self.ids.base_id,
                "trained_sizes": sizes,
                "note": note,
            },
        }
        return {"object": "list", "data": [model]}

    def trained_sizes(self) -> list[int] | None:
        """The adaptor's trained nested sizes, or ``None`` without an adaptor."""
        sizes = getattr(getattr(self.encoder.adaptor, "nesting", None), "sizes", None)
        return [int(m) for m in sizes] if sizes is not None else None

    def metrics_text(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        return self.metrics.render()


def _explicit_funnel(request: SearchRequest) -> bool:
    """Whether the request names any part of an explicit funnel."""
    funnel = (request.shortlist_size, request.shortlist_k, request.rerank_sizes, request.ef_search)
    return any(v is not None for v in funnel)


def _funnel_summary(engine: SearchEngine | None) -> dict[str, Any] | None:
    """The served saved funnel's settings for ``/health`` (``None`` without one)."""
    fr = None if engine is None else engine.saved_funnel
    if fr is None:
        return None
    return {
        "shortlist_size": int(fr.shortlist_size),
        "shortlist_k": int(fr.spec_.shortlist_k),
        "rerank_sizes": [int(m) for m in fr.chain_],
        "backend": str(fr.index_.backend),
        "rerank_dtype": str(fr.prefixes_.dtype),
    }
