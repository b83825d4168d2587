"""The HTTP layer: :func:`create_app` routes FastAPI requests to an
:class:`~matryoshka.serve.service.EmbeddingService`; :func:`run` serves it with uvicorn.

This is the only module of :mod:`matryoshka.serve` that needs FastAPI at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "matryoshka.serve needs FastAPI and uvicorn: install them with "
        "`pip install 'matryoshka[serve]'`."
    ) from e

from matryoshka.serve.config import ServeConfig
from matryoshka.serve.errors import (
    ServeError,
    body_too_large,
    http_error,
    internal_error,
    validation_error,
)
from matryoshka.serve.schemas import (
    ERROR_RESPONSES,
    EmbeddingRequest,
    EmbeddingResponse,
    SearchRequest,
    SearchResponse,
)
from matryoshka.serve.service import EmbeddingService

__all__ = ["BodyLimit", "build_app", "create_app", "listening_message", "run"]

#: Exit status of :func:`run` when the app failed to start (uvicorn's own).
STARTUP_FAILURE = 3

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with HTTP 413 before parsing.

    A ``Content-Length`` over the limit is refused before a byte of the body is read; otherwise
    the body is read here, counting the bytes as they stream in (chunked uploads carry no
    length), and refused as soon as the count passes the limit. A body within the limit is
    handed to the app unchanged. Refused bodies are drained (up to ``drain_bytes``) before the
    413 goes out, so that a client still sending reads the answer instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(64 << 20, 8 * max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass ``scope`` on, with its body checked (``http`` requests only)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            if length <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._refuse(scope, receive, send, body_too_large(length, self.max_bytes))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > self.max_bytes:
                if more:
                    await self._drain(receive, size)
                error = body_too_large(size, self.max_bytes, streamed=length is None)
                await self._refuse(scope, receive, send, error)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, seen: int) -> None:
        """Read and drop the rest of the body, up to ``drain_bytes`` in all."""
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: ServeError) -> None:
        """Answer ``error`` (a 413) and close the connection."""
        response = error.response()
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or ``None`` when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def create_app(
    config: ServeConfig,
    *,
    encoder: Any = None,
    adaptor: Any = None,
    corpus: np.ndarray | None = None,
    index: Any = None,
) -> FastAPI:
    """Build the FastAPI app for ``config``.

    ``encoder`` (a :class:`~matryoshka.models.text_encoder.TextEncoder`), ``adaptor``, ``corpus``
    (``(N, d)``) and ``index`` may be passed already loaded; otherwise they are loaded from
    ``config``.
    """
    service = EmbeddingService.from_config(
        config, encoder=encoder, adaptor=adaptor, corpus=corpus, index=index
    )
    return build_app(service)


def build_app(service: EmbeddingService) -> FastAPI:
    """The FastAPI app serving ``service``: routes, error handlers, request metrics, lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="matryoshka",
        version="0.1.0",
        description="Matryoshka embeddings of any size (OpenAI-compatible) and funnel search.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.config = service.config
    app.state.metrics = service.metrics
    app.state.batcher = service.batcher
    app.state.search = service.engine
    _add_error_handlers(app)
    # Added first, so it runs inside the metrics middleware: 413s are counted too.
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    _add_request_metrics(app, service)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(request.method, request.url.path, exc.status_code, exc.detail).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        return internal_error(exc).response()


def _add_request_metrics(app: FastAPI, service: EmbeddingService) -> None:
    """Count every request by method, route and status, and time it."""

    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        service.metrics.observe_request(
            request.method, _route_of(request), response.status_code, time.perf_counter() - t0
        )
        return response


def _route_of(request: Request) -> str:
    """The matched route's path template (``"unmatched"`` for an unknown path)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def _add_routes(app: FastAPI, service: EmbeddingService) -> None:
    """The five endpoints, each a thin call into ``service``.

    The handlers' names are the OpenAPI operation ids' stems: renaming one changes the schema.
    """

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=ERROR_RESPONSES,
        summary="Embeddings of any nested size (OpenAI-compatible).",
    )
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        return JSONResponse((await service.embed(body)).model_dump(exclude_unset=True))

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        summary="Top-k search: exact, an explicit funnel, or a funnel tuned for a target recall.",
    )
    async def search_endpoint(body: SearchRequest) -> JSONResponse:
        return JSONResponse((await service.search(body)).model_dump(exclude_unset=True))

    @app.get("/health", summary="Liveness and what is loaded.")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models", summary="The served model (OpenAI's list format) with its sizes.")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics.")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(
            service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )


def listening_message(service: EmbeddingService, host: str, port: int) -> str:
    """One line saying where the server listens and what it serves, e.g.
    ``listening on http://127.0.0.1:8000 (model all-MiniLM-L6-v2, sizes 1..384, ...)``."""
    where = f"[{host}]" if ":" in host else host
    trained = service.trained_sizes()
    sizes = f"sizes 1..{service.dim}" + (
        f", adaptor trained at {','.join(map(str, trained))}"
        if trained is not None
        else ", plain truncations (no adaptor)"
    )
    engine = service.engine
    search = f"search over {engine.n} vectors" if engine is not None else "no search corpus"
    fr = engine.saved_funnel if engine is not None else None
    if fr is not None:
        search += (
            f" with a saved funnel ({fr.index_.backend} shortlist at {fr.shortlist_size} dims, "
            f"k'={fr.spec_.shortlist_k}, rerank {','.join(map(str, fr.chain_))})"
        )
    return f"listening on http://{where}:{port} (model {service.model_name}, {sizes}, {search})"


def run(config: ServeConfig, *, prog: str = "mrl serve") -> None:
    """Load everything named in ``config`` and serve it with uvicorn until interrupted.

    The socket is bound and listening first, so the line ``{prog}: listening on http://HOST:PORT (...)``
    written to stderr names the real port (also for ``port=0``, a free one the OS picks).
    """
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "matryoshka.serve needs uvicorn: install it with `pip install 'matryoshka[serve]'`."
        ) from e
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    service = EmbeddingService.from_config(config)
    settings = uvicorn.Config(
        build_app(service), host=config.host, port=config.port, log_level=config.log_level
    )
    sock = settings.bind_socket()  # exits with uvicorn's message if the port is taken
    sock.listen(settings.backlog)  # from here on connections queue until the app is up
    host, port = sock.getsockname()[:2]
    print(
        f"{prog}: {listening_message(service, str(host), int(port))}", file=sys.stderr, flush=True
    )
    server = uvicorn.Server(settings)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
