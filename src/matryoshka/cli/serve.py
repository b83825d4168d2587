"""``mrl serve``: start the HTTP embedding and search service (:mod:`matryoshka.serve`).

    mrl serve                                            # bundled all-MiniLM-L6-v2 on :8000
    mrl serve --adaptor adaptor --corpus corpus.npy --index corpus-32.index --port 8080

The flags are generated from :class:`matryoshka.serve.config.ServeConfig`'s fields (type,
default, help, choices) by :func:`matryoshka.cli.args.add_dataclass_arguments`, so the two cannot
drift apart; the module needs only the standard library to build the parser, and FastAPI and
uvicorn are imported only when the command runs, so ``mrl --help`` works without the ``serve``
extra. Once the socket is bound the command writes ``mrl serve: listening on http://HOST:PORT
(...)`` to stderr.

Unless the environment sets it, the command sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads:
in a server, OpenMP threads that spin between operators take the cores the tokenizer and the
HTTP threads need. Measured with ``benchmarks/serve.py`` (16 texts per request, 32 clients, 2
threads, quiet 2-core machine): 1.6 requests/s spinning against 6.2 passive for the torch
backend, and 6.1 against 15.6 for ``--backend onnx``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from matryoshka.cli.args import add_dataclass_arguments, fail
from matryoshka.serve.config import ServeConfig

__all__ = ["add_arguments", "cmd_serve", "config_from_args"]


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` the parsed flags describe (validated: ``ValueError`` if not)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    values["aliases"] = tuple(values["aliases"] or ())
    return ServeConfig(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 2 on a configuration error."""
    try:
        config = config_from_args(args)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads
        from matryoshka.serve import run

        run(config)
    except (ImportError, ValueError, FileNotFoundError) as e:
        return fail(str(e), "mrl serve")
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 0
    return 0


def add_arguments(command: str, parser: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``serve``: one flag per :class:`ServeConfig` field."""
    parser.description = (
        "Serve /v1/embeddings, /v1/search, /v1/models, /health and /metrics. "
        "Needs `pip install 'matryoshka[serve]'`."
    )
    add_dataclass_arguments(parser, ServeConfig, defaults=True)
    parser.set_defaults(func=cmd_serve)
