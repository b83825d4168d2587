"""``mrl serve``: start the HTTP embedding and search service (:mod:`matryoshka.serve`).

    mrl serve                                            # bundled all-MiniLM-L6-v2 on :8000
    mrl serve --adaptor adaptor --corpus corpus.npy --index corpus-32.index --port 8080

The options mirror :class:`matryoshka.serve.ServeConfig` field by field (a test keeps the two in
step); FastAPI and uvicorn are imported only when the command runs, so ``mrl --help`` works
without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["OPTIONS", "add_arguments", "cmd_serve"]

#: ``(field of ServeConfig, type, default, help)``; the flag is ``--field-with-dashes``.
OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("model", str, None, "sentence-transformers model name or path (default: bundled MiniLM)"),
    ("model_name", str, None, "model id clients send as `model` (default: the model's name)"),
    ("aliases", str, (), "further accepted model ids (repeatable)"),
    ("adaptor", str, None, "saved MatryoshkaAdaptor (stem of .json/.safetensors): nested sizes"),
    ("corpus", str, None, "(N, d) .npy corpus embeddings, in the served space, for /v1/search"),
    ("index", str, None, "saved shortlist index over the corpus (`mrl index build`)"),
    ("host", str, "127.0.0.1", "interface to listen on"),
    ("port", int, 8000, "TCP port"),
    ("device", str, "cpu", "torch device of the encoder"),
    ("max_inputs", int, 256, "most texts per request"),
    ("max_input_tokens", int, None, "most tokens per text (default: the model's max_seq_length)"),
    ("max_input_chars", int, 20_000, "most characters per text"),
    ("long_input", str, "reject", "longer texts: 'reject' (HTTP 400) or 'truncate'"),
    ("batching", bool, True, "dynamic batching of concurrent requests"),
    ("max_batch_size", int, 64, "most texts per encoder call"),
    ("max_wait_ms", float, 5.0, "how long a batch waits for more requests (ms)"),
    ("max_k", int, 1000, "largest k accepted by /v1/search"),
    ("tune_queries", int, 200, "corpus rows used as queries when tuning for a target recall"),
    ("log_level", str, "warning", "uvicorn log level"),
)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 2 on a configuration error."""
    values = {name: getattr(args, name) for name, *_ in OPTIONS}
    values["aliases"] = tuple(values["aliases"] or ())
    try:
        from matryoshka.serve import ServeConfig, run

        config = ServeConfig(**values)
        run(config)
    except (ImportError, ValueError, FileNotFoundError) as e:
        print(f"mrl serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 0
    return 0


def add_arguments(command: str, p: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``serve``."""
    p.description = (
        "Serve /v1/embeddings, /v1/search, /v1/models, /health and /metrics. "
        "Needs `pip install 'matryoshka[serve]'`."
    )
    for name, typ, default, help_ in OPTIONS:
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif name == "aliases":
            p.add_argument("--alias", dest=name, action="append", default=None, help=help_)
        elif name == "long_input":
            p.add_argument(flag, choices=("reject", "truncate"), default=default, help=help_)
        else:
            p.add_argument(flag, type=typ, default=default, help=help_)
    p.set_defaults(func=cmd_serve)
