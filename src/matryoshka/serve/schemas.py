"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI schema).

Requests are strict (no coercion: ``"64"`` is not a size) and ignore unknown fields, as OpenAI's
API does. Responses document what the routes return.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_RESPONSES",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorResponse",
    "SearchHit",
    "SearchRequest",
    "SearchResponse",
    "SearchSizes",
    "Usage",
]


# The response models carry no docstrings on purpose: pydantic would copy them into the served
# OpenAPI schema as descriptions, and the schema is part of the API.


class _Strict(BaseModel):
    """Strict fields (no coercion), unknown ones ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings`` body (OpenAI's embeddings API)."""

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, or token ids of the model's tokenizer: a list of "
        "ints (one input, e.g. tokenizer(text)['input_ids'], special tokens included) or a list "
        "of such lists (a batch)."
    )
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
    ef_search: int | None = Field(
        None,
        ge=1,
        description="Served funnel with a graph shortlist: its search beam (HNSW efSearch).",
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
    backend: str | None = Field(
        None, description="The served funnel's shortlist backend (saved funnels only)."
    )
    ef_search: int | None = Field(
        None, description="The graph beam of the served funnel's shortlist (graph backends)."
    )
    measured_recall: float | None = None
    recall_measured_on: str | None = Field(
        None,
        description="What measured_recall was measured on: 'held-out queries' (the server's "
        "--tune-queries-file) or 'perturbed corpus rows (sigma=S)' (unit corpus rows plus "
        "Gaussian noise of norm S, renormalised; never the rows themselves).",
    )


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


#: The error responses documented for the POST routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
}
