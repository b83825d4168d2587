"""Client errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

:class:`ServeError` is what every check of the service raises; :func:`validation_error` turns
FastAPI's request-validation errors into one such error that names the parameter, the value sent
and what is expected, and :func:`http_error` does the same for Starlette's 400/404/405.

Nothing here imports FastAPI until a response is rendered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

__all__ = [
    "ENDPOINTS",
    "EXPECTED",
    "ServeError",
    "body_too_large",
    "http_error",
    "internal_error",
    "validation_error",
]

#: The routes, listed in 404/405 messages.
ENDPOINTS = "POST /v1/embeddings, POST /v1/search, GET /v1/models, GET /health, GET /metrics"

#: What each request parameter accepts, quoted in the messages about it.
EXPECTED = {
    "input": 'a non-empty string or a list of non-empty strings, e.g. "hello" or ["a", "b"], '
    "or token ids of the model's tokenizer: a list of ints, or a list of lists of ints",
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

_EXAMPLE_BODY = '{"input": "hello", "dimensions": 64}'


class ServeError(Exception):
    """A client error, rendered as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        message: what is wrong and how to fix it.
        status: the HTTP status (400 unless told).
        param: the request parameter at fault (``input[3]`` for a list element), if any.
        code: a stable machine-readable code, e.g. ``"invalid_value"``.
        type: OpenAI's error type.
    """

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
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, dict[str, Any]]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The JSON error response, with this error's status."""
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _body_error(err: dict[str, Any]) -> ServeError:
    """The body as a whole is unusable: not JSON, not an object, or missing."""
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "malformed JSON")
        return ServeError(
            f"The request body is not valid JSON ({detail}): send a JSON object such as "
            f"{_EXAMPLE_BODY} with Content-Type: application/json.",
            code="invalid_json",
        )
    got = err.get("input")
    what = (
        "is missing"
        if got is None
        else f"is not JSON (Content-Type must be application/json), got {_short(got)}"
        if isinstance(got, bytes)
        else f"must be a JSON object, got {_short(got)}"
    )
    return ServeError(
        f"The request body {what}: send a JSON object such as {_EXAMPLE_BODY} with "
        "Content-Type: application/json.",
        code="invalid_body",
    )


def _positions(err: dict[str, Any]) -> tuple[int, ...]:
    """The list positions an error points at, e.g. ``(0, 1)`` for ``input[0][1]``."""
    return tuple(p for p in err.get("loc", ())[1:] if isinstance(p, int))


def _closest_branch(errors: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of a union's failed branches, the first error of the one the value came closest to.

    Only errors pointing into a list element (e.g. ``input[3]``) count. A branch is closer when
    it has fewer errors, then when its first error lies further into the value (``input[1]``
    before ``input[0]``, ``input[0][1]`` before ``input[0]``): ``["ok", 3]`` is a list of
    strings with a bad ``input[1]``, ``[101, true]`` a list of token ids with a bad ``input[1]``.
    """
    branches: dict[Any, list[dict[str, Any]]] = {}
    for e in errors:
        if _positions(e):
            loc = e.get("loc", ())
            branches.setdefault(loc[2] if len(loc) > 2 else None, []).append(e)
    if not branches:
        return None

    def closeness(errs: list[dict[str, Any]]) -> tuple[int, int, list[int]]:
        first = _positions(errs[0])
        return len(errs), -len(first), [-p for p in first]

    best = min(branches.values(), key=closeness)
    return best[0]


def validation_error(exc: RequestValidationError) -> ServeError:
    """Turn pydantic/FastAPI validation errors into one clear OpenAI-style error."""
    errors = list(exc.errors())
    if not errors:  # pragma: no cover - FastAPI always reports at least one
        return ServeError("The request body is invalid.", code="invalid_request")
    err = _closest_branch(errors) or errors[0]
    kind = str(err.get("type", ""))
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if kind == "json_invalid" or not loc:
        return _body_error(err)
    field = str(loc[0])
    # Element of a list (e.g. ("input", "list[str]", 3)): name it input[3].
    param = field + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    expected = EXPECTED.get(field, "a valid value")
    if kind == "missing":
        return ServeError(
            f"Missing required parameter '{field}': pass {expected}.",
            param=field,
            code="missing_required_parameter",
        )
    if kind == "extra_forbidden":
        return ServeError(
            f"Unknown parameter '{field}': remove it (accepted: {', '.join(EXPECTED)}).",
            param=field,
            code="unknown_parameter",
        )
    value = err.get("input")
    if field in ("input", "query", "rerank_sizes") and param == field:
        value = _sent_value(exc, field, value)
    ranged = kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    why = f" ({err.get('msg', 'out of range')})" if ranged else ""
    return ServeError(
        f"Invalid value for '{param}': {_short(value)} ({type(value).__name__}){why}; expected "
        f"{expected}.",
        param=param,
        code="invalid_value" if ranged else "invalid_type",
    )


def _sent_value(exc: RequestValidationError, field: str, fallback: Any) -> Any:
    """The value the client sent for ``field`` (a union's error may quote only a part of it)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and field in body:
        return body[field]
    return fallback


def http_error(method: str, path: str, status: int, detail: Any) -> ServeError:
    """Starlette's own HTTP errors (body not decodable, unknown route or method) as a ServeError."""
    if status == 400:  # FastAPI could not even decode the body
        return ServeError(
            f"The request body is not valid JSON ({detail}): send a UTF-8 JSON object "
            f"such as {_EXAMPLE_BODY}.",
            code="invalid_json",
        )
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    message = f"{method} {path}: {detail}."
    if status in (404, 405):
        message += f" Endpoints: {ENDPOINTS}."
    return ServeError(message, status=status, code=code)


def body_too_large(size: int, limit: int, *, streamed: bool = False) -> ServeError:
    """The 413 for a body of ``size`` bytes (at least, when ``streamed``) over ``limit``."""
    got = f"more than {limit}" if streamed else f"{size}"
    return ServeError(
        f"The request body has {got} bytes, more than this server's limit of {limit} "
        "(max_body_bytes): send fewer or shorter inputs per request (or base64 vectors), or "
        "start the server with a larger --max-body-bytes.",
        status=413,
        code="request_too_large",
    )


def internal_error(exc: BaseException) -> ServeError:
    """A 500 that names only the exception's type (no internals leak to the client)."""
    return ServeError(
        f"Internal server error ({type(exc).__name__}).",
        status=500,
        code="internal",
        type="server_error",
    )
