"""Helpers shared by test modules (fixtures live in conftest.py): synthetic clustered embeddings,
an in-process ``mrl`` run, a seconds-long training config."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from matryoshka.training.config import TrainConfig

__all__ = ["LiveServer", "clustered", "have", "pgserver_url", "run_cli", "tiny_train_config"]


@overload
def clustered(
    n: int,
    d: int,
    seed: int = ...,
    n_clusters: int = ...,
    noise: float = ...,
    *,
    return_labels: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def clustered(
    n: int,
    d: int,
    seed: int = ...,
    n_clusters: int = ...,
    noise: float = ...,
    *,
    return_labels: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


def clustered(
    n: int,
    d: int,
    seed: int = 0,
    n_clusters: int = 40,
    noise: float = 0.35,
    *,
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``(n, d)`` float32 points around ``n_clusters`` random standard-normal centres, plus
    ``noise``-scaled Gaussian noise: real-like structure (graph indexes and ANN recall need it).

    Draws, from ``np.random.default_rng(seed)``: the ``(n_clusters, d)`` centres, the ``(n,)``
    cluster labels, then the ``(n, d)`` noise, in that order, so a caller's data depends only on
    these arguments. ``return_labels=True`` also returns the ``(n,)`` int64 labels.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    labels = rng.integers(0, n_clusters, n)
    x = (centres[labels] + noise * rng.standard_normal((n, d))).astype(np.float32)
    return (x, labels) if return_labels else x


def run_cli(argv: Sequence[str]) -> int:
    """Run ``mrl ARGV...`` in this process through the real entry point; its exit status."""
    from matryoshka.cli import main

    return main(list(argv))


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A seconds-long MRL run on the CPU: an MLP backbone of width 32, an 8-d embedding with
    the doubling ladder from 2, no progress bars; ``overrides`` replace any field."""
    fields: dict[str, Any] = {
        "backbone": "mlp",
        "backbone_width": 32,
        "embed_dim": 8,
        "progress": False,
        **overrides,
    }
    return TrainConfig(**fields)


class LiveServer:
    """A uvicorn server for ``app`` in a background thread on a free loopback port, with an
    ``httpx`` client on ``url`` (needs the serve extra)."""

    def __init__(self, app: Any) -> None:
        import threading
        import time

        import httpx
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def have(*modules: str) -> bool:
    """Whether every named module can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


@contextlib.contextmanager
def pgserver_url(folder: Path) -> Iterator[str]:
    """A real PostgreSQL (pgserver, pgvector inside) on a private data ``folder``: its URL,
    stopped on exit; skips the test when the pgvector extra is missing."""
    import warnings

    import pytest

    if not have("pgserver", "psycopg", "pgvector"):
        pytest.skip("pgserver/psycopg/pgvector not installed: pip install 'matryoshka[pgvector]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver

        server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
