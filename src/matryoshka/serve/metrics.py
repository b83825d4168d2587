"""Counters and histograms of the service, rendered in the Prometheus text format (0.0.4)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Histogram", "Metrics"]

#: Upper bounds (seconds) of the request-latency histogram.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Upper bounds of the texts-per-call and requests-per-call histograms.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (not thread-safe)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose bound is ``>= value``."""
        i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """The exposition lines of ``name`` with ``labels`` (``'route="/x"'`` or ``""``)."""
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
        self.latency: dict[str, Histogram] = {}
        self.dimensions: dict[int, int] = {}
        self.texts = 0
        self.tokens = 0
        self.encoder_calls = 0
        self.batch_texts = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.max_batch_requests = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request."""
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

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
