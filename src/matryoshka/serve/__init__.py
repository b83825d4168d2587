"""HTTP service: text embeddings of any nested size, and adaptive (funnel) search.

    mrl serve --port 8000                                  # the bundled all-MiniLM-L6-v2
    mrl serve --adaptor adaptor --corpus corpus.npy        # nested prefixes + /v1/search

Endpoints (the embeddings API follows OpenAI's, so its clients work unchanged):

* ``POST /v1/embeddings``: ``input`` (a string or a list of strings), ``model``, ``dimensions``
  (any size ``1..d``: the first ``dimensions`` coordinates, re-normalised to unit length),
  ``encoding_format`` (``float`` or ``base64``: little-endian float32); ``usage`` counts tokens.
* ``POST /v1/search``: a query text or vector, ``k``, and either an explicit funnel
  (``shortlist_size`` m_s, ``shortlist_k`` k', ``rerank_sizes``) or a ``target_recall`` served by
  a funnel tuned on the corpus; exact full-size search when neither is given. Returns ids,
  scores and the sizes used.
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).

Concurrent requests are batched into one encoder call (:class:`DynamicBatcher`: an asyncio queue
drained up to ``max_batch_size`` texts or ``max_wait_ms``, encoded in one worker thread). Every
bad request gets a 4xx JSON error in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``.

FastAPI and uvicorn are an optional extra: ``pip install 'matryoshka[serve]'``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from matryoshka.ops import truncate_numpy

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "matryoshka.serve needs FastAPI and uvicorn: install them with "
        "`pip install 'matryoshka[serve]'`."
    ) from e

__all__ = [
    "DynamicBatcher",
    "EmbeddingRequest",
    "Metrics",
    "SearchEngine",
    "SearchRequest",
    "ServeConfig",
    "ServeError",
    "create_app",
    "run",
]

_POLICIES = ("reject", "truncate")


# -- configuration -------------------------------------------------------------------------------
@dataclasses.dataclass
class ServeConfig:
    """Everything the server needs; validated once in ``__post_init__``.

    Attributes:
        model: sentence-transformers model name or path; ``None`` is the bundled MiniLM.
        model_name: the id clients pass as ``model`` (default: the model's name).
        aliases: further ids accepted as ``model``.
        adaptor: path of a saved :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` making the
            model's prefixes good; without one, sizes are plain truncations of the model's output.
        corpus: ``(N, d)`` ``.npy`` corpus embeddings (in the served space: adapted if an adaptor
            is used) for ``/v1/search``.
        index: a saved shortlist index (``mrl index build``) over that corpus; a full-size exact
            index can stand in for ``corpus``.
        host, port: where uvicorn listens.
        device: torch device of the encoder.
        max_inputs: most texts in one request.
        max_input_tokens: most tokens per text, special tokens included (``None``: the model's
            ``max_seq_length``).
        max_input_chars: most characters per text (a cheap guard before tokenising).
        long_input: ``"reject"`` (400) or ``"truncate"`` (cut to the limits) for longer texts.
        batching: dynamic batching of concurrent requests (``False``: one encoder call each).
        max_batch_size: most texts per encoder call.
        max_wait_ms: how long the first request of a batch waits for company.
        max_k: largest ``k`` accepted by ``/v1/search``.
        tune_queries: corpus rows used as held-out queries when tuning a funnel for a target.
        log_level: uvicorn's log level.
    """

    model: str | None = None
    model_name: str | None = None
    aliases: tuple[str, ...] = ()
    adaptor: str | None = None
    corpus: str | None = None
    index: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    max_inputs: int = 256
    max_input_tokens: int | None = None
    max_input_chars: int = 20_000
    long_input: str = "reject"
    batching: bool = True
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_k: int = 1000
    tune_queries: int = 200
    log_level: str = "warning"

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_input_chars", "max_batch_size", "max_k", "tune_queries"):
            _check_config_int(name, getattr(self, name), 1)
        _check_config_int("port", self.port, 0)
        if self.max_input_tokens is not None:
            _check_config_int("max_input_tokens", self.max_input_tokens, 3)
        if self.long_input not in _POLICIES:
            raise ValueError(
                f"long_input={self.long_input!r} is not a policy: use 'reject' or 'truncate'."
            )
        if isinstance(self.max_wait_ms, bool) or not (
            isinstance(self.max_wait_ms, int | float) and 0 <= self.max_wait_ms <= 10_000
        ):
            raise ValueError(
                f"max_wait_ms={self.max_wait_ms!r} must be a number of milliseconds in "
                "[0, 10000], e.g. 5."
            )
        self.aliases = tuple(self.aliases)


def _check_config_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}.")


# -- errors --------------------------------------------------------------------------------------
class ServeError(Exception):
    """A client error, rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (
            message,
            status,
            param,
            code,
            type,
        )

    def response(self) -> JSONResponse:
        """The JSON error response."""
        return _error_response(self.status, self.message, self.param, self.code, self.type)


def _error_response(
    status: int, message: str, param: str | None, code: str | None, type: str
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {
    "input": 'a non-empty string or a list of non-empty strings, e.g. "hello" or ["a", "b"]',
    "model": "a model id string from GET /v1/models",
    "dimensions": "a positive integer (at most the model's dimension), e.g. 64",
    "encoding_format": '"float" or "base64"',
    "user": "a string",
    "query": "a query text (string) or a query vector (list of numbers)",
    "k": "a positive integer, e.g. 10",
    "shortlist_size": "a positive integer prefix size m_s, e.g. 32",
    "shortlist_k": "a positive integer number of candidates k', e.g. 200",
    "rerank_sizes": "a list of increasing prefix sizes, e.g. [384]",
    "target_recall": "a number in (0, 1], e.g. 0.95",
}


def _validation_error(exc: RequestValidationError) -> ServeError:
    """Turn pydantic/FastAPI validation errors into one clear OpenAI-style error."""
    errors = list(exc.errors())
    if not errors:  # pragma: no cover - FastAPI always reports at least one
        return ServeError("The request body is invalid.", code="invalid_request")
    # Prefer the error that points into a list element (e.g. input[3]) over a union's others.
    err = next((e for e in errors if any(isinstance(p, int) for p in e.get("loc", ())[1:])), None)
    err = err or errors[0]
    kind = str(err.get("type", ""))
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "malformed JSON")
        return ServeError(
            f"The request body is not valid JSON ({detail}): send a JSON object such as "
            '{"input": "hello", "dimensions": 64} with Content-Type: application/json.',
            code="invalid_json",
        )
    if not loc:
        got = err.get("input")
        what = (
            "is missing"
            if got is None
            else f"is not JSON (Content-Type must be application/json), got {_short(got)}"
            if isinstance(got, bytes)
            else f"must be a JSON object, got {_short(got)}"
        )
        return ServeError(
            f"The request body {what}: send a JSON object such as "
            '{"input": "hello", "dimensions": 64} with Content-Type: application/json.',
            code="invalid_body",
        )
    field = str(loc[0])
    # Element of a list (e.g. ("input", "list[str]", 3)): name it input[3].
    param = field + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    expected = _EXPECTED.get(field, "a valid value")
    if kind == "missing":
        return ServeError(
            f"Missing required parameter '{field}': pass {expected}.",
            param=field,
            code="missing_required_parameter",
        )
    if kind == "extra_forbidden":
        return ServeError(
            f"Unknown parameter '{field}': remove it (accepted: {', '.join(_EXPECTED)}).",
            param=field,
            code="unknown_parameter",
        )
    value = err.get("input")
    if field in ("input", "query", "rerank_sizes") and param == field:
        value = _field_value(exc, field, value)
    ranged = kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    why = f" ({err.get('msg', 'out of range')})" if ranged else ""
    return ServeError(
        f"Invalid value for '{param}': {_short(value)} ({type(value).__name__}){why}; expected "
        f"{expected}.",
        param=param,
        code="invalid_value" if ranged else "invalid_type",
    )


def _field_value(exc: RequestValidationError, field: str, fallback: Any) -> Any:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and field in body:
        return body[field]
    return fallback


# -- request / response models -------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings`` body (OpenAI's embeddings API)."""

    input: str | list[str] = Field(description="A text or a list of texts to embed.")
    model: str | None = Field(
        None, description="Model id (GET /v1/models); default: the served one."
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Size of the returned embeddings: the first `dimensions` "
        "coordinates, re-normalised. Default: the model's full dimension.",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`float` (JSON numbers) or `base64` (little-endian float32 bytes)."
    )
    user: str | None = Field(None, description="Ignored; accepted for OpenAI compatibility.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class SearchRequest(_Strict):
    """``POST /v1/search`` body."""

    query: str | list[float] = Field(description="Query text, or a full-size query vector.")
    k: int = Field(10, ge=1, description="Number of results.")
    model: str | None = Field(None, description="Model id; default: the served one.")
    shortlist_size: int | None = Field(
        None, ge=1, description="Explicit funnel: prefix size m_s of the shortlist search."
    )
    shortlist_k: int | None = Field(
        None, ge=1, description="Explicit funnel: candidates k' kept by the shortlist (>= k)."
    )
    rerank_sizes: list[int] | None = Field(
        None, description="Explicit funnel: increasing rerank sizes m_r (default [d])."
    )
    target_recall: float | None = Field(
        None, gt=0, le=1, description="Use the fastest funnel tuned to reach this recall@k."
    )


class SearchHit(BaseModel):
    rank: int
    id: int
    score: float


class SearchSizes(BaseModel):
    mode: Literal["exact", "funnel", "tuned"]
    shortlist_size: int
    shortlist_k: int
    rerank_sizes: list[int]
    measured_recall: float | None = None


class SearchResponse(BaseModel):
    object: Literal["search.result"]
    model: str
    data: list[SearchHit]
    ids: list[int]
    scores: list[float]
    sizes: SearchSizes
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
}


# -- metrics -------------------------------------------------------------------------------------
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip((*self.buckets, math.inf), self.counts, strict=True):
            cum += c
            le = "+Inf" if b == math.inf else f"{b:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cum}')
        tail = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{tail} {self.total:.6f}", f"{name}_count{tail} {self.n}"]
        return out


class Metrics:
    """Counters and histograms of the service, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.dimensions: dict[int, int] = {}
        self.texts = 0
        self.tokens = 0
        self.encoder_calls = 0
        self.batch_texts = _Histogram(_BATCH_BUCKETS)
        self.batch_requests = _Histogram(_BATCH_BUCKETS)
        self.max_batch_requests = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request."""
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def observe_embedding(self, dimensions: int, texts: int, tokens: int) -> None:
        """One successful embeddings request."""
        with self._lock:
            self.dimensions[dimensions] = self.dimensions.get(dimensions, 0) + 1
            self.texts += texts
            self.tokens += tokens

    def observe_batch(self, n_requests: int, n_texts: int) -> None:
        """One encoder call serving ``n_requests`` requests with ``n_texts`` texts in all."""
        with self._lock:
            self.encoder_calls += 1
            self.batch_texts.observe(n_texts)
            self.batch_requests.observe(n_requests)
            self.max_batch_requests = max(self.max_batch_requests, n_requests)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        with self._lock:
            lines = [
                "# HELP mrl_requests_total HTTP requests by method, route and status.",
                "# TYPE mrl_requests_total counter",
            ]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'mrl_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP mrl_request_latency_seconds HTTP request latency by route.",
                "# TYPE mrl_request_latency_seconds histogram",
            ]
            for route, h in sorted(self.latency.items()):
                lines += h.lines("mrl_request_latency_seconds", f'route="{route}"')
            lines += [
                "# HELP mrl_embedding_dimensions_total Embedding requests by `dimensions` served.",
                "# TYPE mrl_embedding_dimensions_total counter",
            ]
            for dim, n in sorted(self.dimensions.items()):
                lines.append(f'mrl_embedding_dimensions_total{{dimensions="{dim}"}} {n}')
            lines += [
                "# HELP mrl_embedded_texts_total Texts embedded.",
                "# TYPE mrl_embedded_texts_total counter",
                f"mrl_embedded_texts_total {self.texts}",
                "# HELP mrl_input_tokens_total Input tokens embedded.",
                "# TYPE mrl_input_tokens_total counter",
                f"mrl_input_tokens_total {self.tokens}",
                "# HELP mrl_encoder_calls_total Encoder calls (one per dynamic batch).",
                "# TYPE mrl_encoder_calls_total counter",
                f"mrl_encoder_calls_total {self.encoder_calls}",
                "# HELP mrl_encoder_batch_texts Texts per encoder call.",
                "# TYPE mrl_encoder_batch_texts histogram",
                *self.batch_texts.lines("mrl_encoder_batch_texts", ""),
                "# HELP mrl_encoder_batch_requests Requests merged into one encoder call.",
                "# TYPE mrl_encoder_batch_requests histogram",
                *self.batch_requests.lines("mrl_encoder_batch_requests", ""),
                "# HELP mrl_encoder_batch_requests_max Most requests merged into one call so far.",
                "# TYPE mrl_encoder_batch_requests_max gauge",
                f"mrl_encoder_batch_requests_max {self.max_batch_requests}",
            ]
        return "\n".join(lines) + "\n"


# -- dynamic batching ----------------------------------------------------------------------------
EncodeFn = Callable[[list[str]], np.ndarray]


class DynamicBatcher:
    """Merge concurrent encode requests into few encoder calls.

    Requests wait in an asyncio queue; a worker takes the first one, then gathers more until the
    batch holds ``max_batch_size`` texts or ``max_wait_ms`` has passed, and runs ``encode`` on
    all their texts in one worker thread: ``n`` texts -> ``(n, d)`` float32. With
    ``enabled=False`` every request is its own encoder call (same thread, so calls never overlap).
    """

    def __init__(
        self,
        encode: EncodeFn,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.metrics = metrics or Metrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-encode")
        self._queue: asyncio.Queue[tuple[list[str], asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        if self.enabled:
            self._worker = asyncio.create_task(self._run(), name="mrl-batcher")

    async def stop(self) -> None:
        """Stop the worker and the encoder thread; pending requests get an error."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """``n`` texts -> ``(n, d)`` embeddings, possibly computed with other requests' texts."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            out = await loop.run_in_executor(self._executor, self.encode, texts)
            self.metrics.observe_batch(1, len(texts))
            return out
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not awaited: start the app's lifespan.")
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        await self._queue.put((texts, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    item = self._queue.get_nowait()
                batch.append(item)
                n += len(item[0])
            texts = [t for chunk, _ in batch for t in chunk]
            try:
                out = await loop.run_in_executor(self._executor, self.encode, texts)
            except Exception as e:  # hand the failure to every waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.metrics.observe_batch(len(batch), len(texts))
            start = 0
            for chunk, fut in batch:
                if not fut.done():
                    fut.set_result(out[start : start + len(chunk)])
                start += len(chunk)


# -- search --------------------------------------------------------------------------------------
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
        from matryoshka.retrieval.index import ExactIndex

        with self._lock:
            idx = self._indexes.get(m)
        if idx is None:
            idx = ExactIndex(m, model_name=self.model_name)
            for s in range(0, self.n, 65536):
                idx.add(self.corpus[s : s + 65536])
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
        """Validate an explicit funnel against the corpus; raises :class:`ServeError`."""
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
        chain = tuple(rerank) if rerank is not None else (self.dim,)
        ok = bool(chain) and all(shortlist_size <= m <= self.dim for m in chain)
        if not ok or any(a >= b for a, b in itertools.pairwise(chain)):
            raise ServeError(
                f"rerank_sizes={list(chain)} must be non-empty, strictly increasing sizes in "
                f"[shortlist_size={shortlist_size}, {self.dim}], e.g. [{self.dim}].",
                param="rerank_sizes",
                code="invalid_value",
            )
        return shortlist_size, kp, chain

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


# -- the app -------------------------------------------------------------------------------------
class _Encoder:
    """Text -> served embedding: the model's output, then the adaptor (if any), full size."""

    def __init__(self, text_encoder: Any, adaptor: Any, batch_size: int) -> None:
        self.text_encoder = text_encoder
        self.adaptor = adaptor
        self.batch_size = batch_size
        self.dim = int(text_encoder.dim)
        if adaptor is not None and adaptor.nesting.dim != self.dim:
            raise ValueError(
                f"adaptor expects {adaptor.nesting.dim}-d embeddings but the model gives "
                f"{self.dim}-d: fit the adaptor on this model's embeddings."
            )
        st = text_encoder.model
        self.max_tokens = int(getattr(st, "max_seq_length", 0) or 512)
        # A private tokenizer for counting: the model's own one is used by the encoder thread,
        # and a Rust tokenizer must not be reconfigured from two threads at once.
        self.tokenizer = copy.deepcopy(st.tokenizer)
        self.tokenizer.model_max_length = 10**9  # no "sequence too long" warnings when counting
        self.n_special = int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """``n`` texts -> ``(n, d)`` float32 (unit-norm model output, adapted when configured)."""
        z = self.text_encoder.encode(
            texts, batch_size=self.batch_size, normalize=True, progress=False
        )
        if self.adaptor is not None:
            z = self.adaptor.transform(z, normalize=False)
        return np.asarray(z, dtype=np.float32)

    def count_and_cut(
        self, texts: list[str], max_tokens: int, truncate: bool
    ) -> tuple[list[str], list[int]]:
        """Token counts (special tokens included); texts cut to ``max_tokens`` if ``truncate``."""
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=truncate, verbose=False
        )
        counts, out = [], []
        for i, ids in enumerate(enc["input_ids"]):
            n = len(ids) + self.n_special
            text = texts[i]
            if n > max_tokens and truncate:
                keep = max_tokens - self.n_special
                text = text[: enc["offset_mapping"][i][keep - 1][1]]
                n = max_tokens
            counts.append(n)
            out.append(text)
        return out, counts


def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def create_app(
    config: ServeConfig,
    *,
    encoder: Any = None,
    adaptor: Any = None,
    corpus: np.ndarray | None = None,
    index: Any = None,
) -> FastAPI:
    """Build the FastAPI app for ``config``.

    ``encoder`` (a :class:`~matryoshka.models.text_encoder.TextEncoder`), ``adaptor``, ``corpus`` (``(N, d)``)
    and ``index`` may be passed already loaded; otherwise they are loaded from ``config``.
    """
    from matryoshka.models.text_encoder import DEFAULT_MODEL, TextEncoder

    if encoder is None:
        encoder = TextEncoder(config.model, device=config.device)
    if adaptor is None and config.adaptor is not None:
        from matryoshka.models.adaptor import MatryoshkaAdaptor

        adaptor = MatryoshkaAdaptor.load(config.adaptor)
    enc = _Encoder(encoder, adaptor, config.max_batch_size)
    dim = enc.dim
    max_tokens = config.max_input_tokens or enc.max_tokens
    if max_tokens > enc.max_tokens:
        raise ValueError(
            f"max_input_tokens={max_tokens} exceeds the model's max_seq_length={enc.max_tokens}: "
            f"the model would silently cut longer inputs; use at most {enc.max_tokens}."
        )
    model_name = config.model_name or (
        DEFAULT_MODEL if config.model is None else Path(config.model).name or config.model
    )
    accepted = {model_name, *config.aliases}
    if config.model is None:
        accepted |= {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
    else:
        accepted.add(config.model)

    if index is None and config.index is not None:
        from matryoshka.retrieval.index import load_index

        index = load_index(config.index)
    if corpus is None and config.corpus is not None:
        from matryoshka.retrieval.funnel import open_corpus

        corpus = open_corpus(config.corpus)
    if corpus is None and index is not None and getattr(index, "dim", None) == dim:
        corpus = getattr(index, "vectors", None)  # a full-size exact index holds the corpus
    search: SearchEngine | None = None
    if corpus is not None:
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
        search = SearchEngine(
            corpus, index, model_name=model_name, tune_queries=config.tune_queries
        )
    elif index is not None:
        raise ValueError(
            f"index={config.index!r} holds {index.dim}-d prefixes: pass corpus= the (N, {dim}) "
            "full-size embeddings too (the funnel reranks with them)."
        )

    metrics = Metrics()
    batcher = DynamicBatcher(
        enc, config.max_batch_size, config.max_wait_ms, config.batching, metrics
    )
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="matryoshka",
        version="0.1.0",
        description="Matryoshka embeddings of any size (OpenAI-compatible) and funnel search.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.search = search

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not even decode the body
            return ServeError(
                f"The request body is not valid JSON ({exc.detail}): send a UTF-8 JSON object "
                'such as {"input": "hello", "dimensions": 64}.',
                code="invalid_json",
            ).response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}."
        if exc.status_code in (404, 405):
            message += (
                " Endpoints: POST /v1/embeddings, POST /v1/search, GET /v1/models, "
                "GET /health, GET /metrics."
            )
        return _error_response(exc.status_code, message, None, code, "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        return _error_response(
            500, f"Internal server error ({type(exc).__name__}).", None, "internal", "server_error"
        )

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        metrics.observe_request(
            request.method, _route_of(request), response.status_code, time.perf_counter() - t0
        )
        return response

    def check_model(model: str | None) -> None:
        if model is not None and model not in accepted:
            raise ServeError(
                f"The model {model!r} does not exist on this server: use {model_name!r} "
                "(GET /v1/models lists the served models) or omit 'model'.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_texts(texts: list[str], field: str) -> tuple[list[str], list[int]]:
        if not texts:
            raise ServeError(
                f"'{field}' is an empty list: pass at least one non-empty string.",
                param=field,
                code="empty_input",
            )
        if len(texts) > config.max_inputs:
            raise ServeError(
                f"'{field}' has {len(texts)} texts but this server accepts at most "
                f"{config.max_inputs} per request: split them into several requests.",
                param=field,
                code="too_many_inputs",
            )
        truncate = config.long_input == "truncate"
        out = list(texts)
        for i, t in enumerate(out):
            where = field if len(texts) == 1 else f"{field}[{i}]"
            if not t.strip():
                raise ServeError(
                    f"'{where}' is an empty string: every input must contain text.",
                    param=where,
                    code="empty_input",
                )
            if len(t) > config.max_input_chars:
                if not truncate:
                    raise ServeError(
                        f"'{where}' has {len(t)} characters, more than this server's limit of "
                        f"{config.max_input_chars}: shorten it or split it into several inputs.",
                        param=where,
                        code="input_too_long",
                    )
                out[i] = t[: config.max_input_chars]
        out, counts = enc.count_and_cut(out, max_tokens, truncate)
        for i, n in enumerate(counts):
            if n > max_tokens:
                where = field if len(texts) == 1 else f"{field}[{i}]"
                raise ServeError(
                    f"'{where}' has {n} tokens, more than the limit of {max_tokens}: shorten it "
                    "or split it into several inputs.",
                    param=where,
                    code="input_too_long",
                )
        return out, counts

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=_ERRORS,
        summary="Embeddings of any nested size (OpenAI-compatible).",
    )
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        check_model(body.model)
        m = body.dimensions if body.dimensions is not None else dim
        if not 1 <= m <= dim:
            raise ServeError(
                f"dimensions={m} is out of range: {model_name!r} gives {dim}-d embeddings; "
                f"pass 1 <= dimensions <= {dim} (or omit it for {dim}).",
                param="dimensions",
                code="invalid_dimensions",
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        texts, counts = check_texts(texts, "input")
        z = truncate_numpy(await batcher.embed(texts), m, normalize=True)  # (n, m)
        tokens = int(sum(counts))
        metrics.observe_embedding(m, len(texts), tokens)
        data: list[dict[str, Any]] = []
        for i, row in enumerate(z):
            vec: list[float] | str
            if body.encoding_format == "base64":
                vec = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
            else:
                vec = row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        responses=_ERRORS,
        summary="Top-k search: exact, an explicit funnel, or a funnel tuned for a target recall.",
    )
    async def search_endpoint(body: SearchRequest) -> JSONResponse:
        check_model(body.model)
        if search is None:
            raise ServeError(
                "This server has no corpus to search: start it with --corpus (N, d) .npy "
                "embeddings (and optionally --index).",
                param=None,
                code="search_unavailable",
            )
        if body.k > min(config.max_k, search.n):
            raise ServeError(
                f"k={body.k} is larger than allowed: use k <= {min(config.max_k, search.n)} "
                f"(corpus size {search.n}, server limit {config.max_k}).",
                param="k",
                code="invalid_value",
            )
        explicit = (body.shortlist_size, body.shortlist_k, body.rerank_sizes)
        if body.target_recall is not None and any(v is not None for v in explicit):
            raise ServeError(
                "Give either an explicit funnel (shortlist_size, shortlist_k, rerank_sizes) or "
                "target_recall, not both.",
                param="target_recall",
                code="invalid_value",
            )
        tokens = 0
        if isinstance(body.query, str):
            texts, counts = check_texts([body.query], "query")
            tokens = counts[0]
            q = (await batcher.embed(texts))[0]  # (d,)
        else:
            with np.errstate(over="ignore"):  # huge numbers become inf, rejected just below
                q = np.asarray(body.query, dtype=np.float32)
            if q.shape != (dim,) or not np.isfinite(q).all() or not np.any(q):
                raise ServeError(
                    f"'query' is a vector of length {q.shape[0]}: pass {dim} finite numbers, "
                    f"not all zero (a full-size embedding), or a query text.",
                    param="query",
                    code="invalid_value",
                )
        if any(v is not None for v in explicit):
            funnel = search.check_funnel(body.k, *explicit)
            scores, ids, sizes = await run_in_threadpool(search.funnel, q, body.k, funnel)
        elif body.target_recall is not None:
            scores, ids, sizes = await run_in_threadpool(
                search.tuned, q, body.k, body.target_recall
            )
        else:
            scores, ids, sizes = await run_in_threadpool(search.exact, q, body.k)
        keep = ids >= 0
        ids_l, scores_l = ids[keep].tolist(), [float(s) for s in scores[keep]]
        return JSONResponse(
            {
                "object": "search.result",
                "model": model_name,
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

    @app.get("/health", summary="Liveness and what is loaded.")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "dimensions": dim,
            "adaptor": adaptor is not None,
            "search": search is not None,
            "corpus_size": search.n if search is not None else 0,
            "batching": config.batching,
            "uptime_s": round(time.time() - started, 3),
        }

    @app.get("/v1/models", summary="The served model (OpenAI's list format) with its sizes.")
    async def models() -> dict[str, Any]:
        nested = adaptor is not None
        note = (
            "prefixes come from a Matryoshka adaptor: every size is a nested embedding"
            if nested
            else "no adaptor loaded: smaller sizes are plain truncations of a model that was not "
            "Matryoshka-trained (quality drops faster than with an adaptor)"
        )
        sizes = getattr(getattr(adaptor, "nesting", None), "sizes", None)
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "matryoshka",
                    "dimensions": dim,
                    "max_input_tokens": max_tokens,
                    "aliases": sorted(accepted - {model_name}),
                    "matryoshka": {
                        "nested": nested,
                        "adaptor": config.adaptor if nested else None,
                        "trained_sizes": list(sizes) if sizes is not None else None,
                        "note": note,
                    },
                }
            ],
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics.")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(
            metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app


def run(config: ServeConfig) -> None:
    """Load everything named in ``config`` and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "matryoshka.serve needs uvicorn: install it with `pip install 'matryoshka[serve]'`."
        ) from e
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
