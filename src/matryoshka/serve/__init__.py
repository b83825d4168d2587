"""HTTP service: text embeddings of any nested size, and adaptive (funnel) search.

    mrl serve --port 8000                                  # the bundled all-MiniLM-L6-v2
    mrl serve --adaptor adaptor --corpus corpus.npy        # nested prefixes + /v1/search

Endpoints (the embeddings API follows OpenAI's, so its clients work unchanged):

* ``POST /v1/embeddings``: ``input`` (a string, a list of strings, or the model tokenizer's ids:
  a list of ints for one input or a list of such lists, as OpenAI's API and TEI take them),
  ``model``, ``dimensions`` (any size ``1..d``: the first ``dimensions`` coordinates,
  re-normalised to unit length), ``encoding_format`` (``float`` or ``base64``: little-endian
  float32); ``usage`` counts tokens.
* ``POST /v1/search``: a query text or vector, ``k``, and either an explicit funnel
  (``shortlist_size`` m_s, ``shortlist_k`` k', ``rerank_sizes``) or a ``target_recall`` served by
  a funnel tuned on queries that are not corpus rows (``tune_queries_file``, else noisy corpus
  rows; ``recall_measured_on`` says which); exact full-size search when neither is given.
  Returns ids, scores and the sizes used.

The served model id is the model's name, or with an adaptor ``<model>+adaptor-<8 hex of the
adaptor weights' SHA-256>`` (``served_model_name`` replaces it); with an adaptor the base model's
id is refused (404), its vectors being different. An ``index`` built for another model is refused
at start (``allow_model_mismatch`` overrides). Request bodies over ``max_body_bytes`` (2 MB) get
a 413 before they are parsed; tokenisation and input checks run in a worker thread.
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).

Concurrent requests are batched into one encoder call (:class:`DynamicBatcher`: an asyncio queue
drained up to ``max_batch_size`` texts or ``max_wait_ms``, encoded in one worker thread). Every
bad request gets a 4xx JSON error in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``.

One module per job:

* :mod:`~matryoshka.serve.config`: :class:`ServeConfig` (fields carry the ``mrl serve`` help).
* :mod:`~matryoshka.serve.errors`: :class:`ServeError` and the mapping of validation errors.
* :mod:`~matryoshka.serve.schemas`: the pydantic request and response bodies.
* :mod:`~matryoshka.serve.metrics`: counters and histograms in Prometheus text.
* :mod:`~matryoshka.serve.batching`: :class:`DynamicBatcher`.
* :mod:`~matryoshka.serve.encoder`: the served encoder (model + adaptor, token counting).
* :mod:`~matryoshka.serve.inputs`: the limits on request texts.
* :mod:`~matryoshka.serve.search`: :class:`SearchEngine` (exact, funnel, tuned).
* :mod:`~matryoshka.serve.service`: :class:`EmbeddingService`, every endpoint as a plain method.
* :mod:`~matryoshka.serve.app`: :func:`create_app` (the FastAPI routes) and :func:`run`.

FastAPI and uvicorn are an optional extra (``pip install 'matryoshka[serve]'``), needed only by
:func:`create_app` / :func:`run`: the names here are imported on first use, so
``from matryoshka.serve import ServeConfig`` works without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matryoshka.serve.app import build_app, create_app, run
    from matryoshka.serve.batching import DynamicBatcher
    from matryoshka.serve.config import ServeConfig
    from matryoshka.serve.errors import ServeError
    from matryoshka.serve.metrics import Metrics
    from matryoshka.serve.schemas import (
        EmbeddingRequest,
        EmbeddingResponse,
        SearchRequest,
        SearchResponse,
    )
    from matryoshka.serve.search import SearchEngine
    from matryoshka.serve.service import EmbeddingService

__all__ = [
    "DynamicBatcher",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingService",
    "Metrics",
    "SearchEngine",
    "SearchRequest",
    "SearchResponse",
    "ServeConfig",
    "ServeError",
    "build_app",
    "create_app",
    "run",
]

#: Public name -> the submodule that defines it.
_HOMES = {
    "DynamicBatcher": "batching",
    "EmbeddingRequest": "schemas",
    "EmbeddingResponse": "schemas",
    "EmbeddingService": "service",
    "Metrics": "metrics",
    "SearchEngine": "search",
    "SearchRequest": "schemas",
    "SearchResponse": "schemas",
    "ServeConfig": "config",
    "ServeError": "errors",
    "build_app": "app",
    "create_app": "app",
    "run": "app",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'matryoshka.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"matryoshka.serve.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted({*globals(), *__all__})
