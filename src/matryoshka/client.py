"""A small Python client for ``mrl serve`` (standard library only: no extra needed).

from matryoshka.client import EmbeddingClient
client = EmbeddingClient("http://127.0.0.1:8000")
z = client.embed(["a cat", "a dog"], dimensions=64)   # (2, 64) float32, unit rows
hits = client.search("a kitten", k=5, target_recall=0.95)
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["EmbeddingClient", "ServerError"]


class ServerError(RuntimeError):
    """An error answered by the server: ``status``, and OpenAI's ``message``/``param``/``code``."""

    def __init__(self, status: int, message: str, param: str | None, code: str | None) -> None:
        super().__init__(f"HTTP {status} ({code}): {message}")
        self.status, self.message, self.param, self.code = status, message, param, code


class EmbeddingClient:
    """Client of the embeddings and search endpoints of a ``mrl serve`` server.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        model: model id sent with each request (``None``: the server's default).
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 60.0) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url={base_url!r} must be an http(s) URL, e.g. 'http://127.0.0.1:8000'."
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                raise ServerError(e.code, str(e.reason), None, None) from e
            raise ServerError(e.code, err["message"], err.get("param"), err.get("code")) from e
        return json.loads(raw) if "json" in ctype else raw.decode()

    def embed(
        self, texts: str | Sequence[str], dimensions: int | None = None, base64_: bool = True
    ) -> np.ndarray:
        """Embeddings of ``texts`` (a string or ``n`` strings): ``(n, dimensions)`` float32.

        Rows are unit-norm prefixes of size ``dimensions`` (``None``: the model's full size).
        ``base64_`` transfers raw float32 (compact, exact) instead of JSON numbers.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        body: dict[str, Any] = {
            "input": items,
            "encoding_format": "base64" if base64_ else "float",
        }
        if dimensions is not None:
            body["dimensions"] = dimensions
        if self.model is not None:
            body["model"] = self.model
        out = self._request("POST", "/v1/embeddings", body)
        rows = sorted(out["data"], key=lambda d: d["index"])
        if base64_:
            vecs = [np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") for r in rows]
        else:
            vecs = [np.asarray(r["embedding"], dtype=np.float32) for r in rows]
        return np.stack(vecs).astype(np.float32)  # (n, dimensions)

    def search(
        self,
        query: str | Sequence[float] | np.ndarray,
        k: int = 10,
        *,
        shortlist_size: int | None = None,
        shortlist_k: int | None = None,
        rerank_sizes: Sequence[int] | None = None,
        target_recall: float | None = None,
    ) -> dict[str, Any]:
        """Top-``k`` ids and scores for a query text or a full-size ``(d,)`` vector.

        Exact search by default; an explicit funnel with ``shortlist_size`` (m_s),
        ``shortlist_k`` (k') and ``rerank_sizes``; or the tuned funnel for ``target_recall``.
        Returns the server's JSON: ``ids``, ``scores``, ``sizes`` (the funnel used), ...
        """
        q: Any = query if isinstance(query, str) else [float(x) for x in np.ravel(query)]
        body: dict[str, Any] = {"query": q, "k": k}
        for name, value in (
            ("shortlist_size", shortlist_size),
            ("shortlist_k", shortlist_k),
            ("rerank_sizes", list(rerank_sizes) if rerank_sizes is not None else None),
            ("target_recall", target_recall),
            ("model", self.model),
        ):
            if value is not None:
                body[name] = value
        result: dict[str, Any] = self._request("POST", "/v1/search", body)
        return result

    def models(self) -> list[dict[str, Any]]:
        """The served models (``GET /v1/models``)."""
        data: list[dict[str, Any]] = self._request("GET", "/v1/models")["data"]
        return data

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        out: dict[str, Any] = self._request("GET", "/health")
        return out
