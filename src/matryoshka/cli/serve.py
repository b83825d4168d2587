"""``mrl serve``: start the HTTP embedding and search service (:mod:`matryoshka.serve`).

    mrl serve                                            # bundled all-MiniLM-L6-v2 on :8000
    mrl serve --adaptor adaptor --corpus corpus.npy --index corpus-32.index --port 8080

The flags are generated from :class:`matryoshka.serve.config.ServeConfig`'s fields (type,
default, help, choices), so the two cannot drift apart; the module needs only the standard library
to build the parser, and FastAPI and uvicorn are imported only when the command runs, so
``mrl --help`` works without the ``serve`` extra. Once the socket is bound the command writes
``mrl serve: listening on http://HOST:PORT (...)`` to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from matryoshka.serve.config import ServeConfig

__all__ = ["add_config_arguments", "cmd_serve", "config_from_args", "register"]

#: Annotation -> the argparse ``type`` of a one-value flag.
_SCALARS: dict[Any, type] = {
    str: str,
    int: int,
    float: float,
    str | None: str,
    int | None: int,
    float | None: float,
}


def _flag_kwargs(f: dataclasses.Field[Any], annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords for field ``f`` (annotated ``annotation``)."""
    kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif annotation == tuple[str, ...]:  # repeatable: --alias a --alias b
        kwargs.update(action="append", default=None)
    elif annotation in _SCALARS:
        kwargs["type"] = _SCALARS[annotation]
    else:  # pragma: no cover - a new field with a new kind of type
        raise TypeError(f"ServeConfig.{f.name}: no CLI mapping for the annotation {annotation!r}")
    if "choices" in f.metadata:
        kwargs["choices"] = tuple(f.metadata["choices"])
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServeConfig` field: ``--field-with-dashes`` (or the field's
    ``metadata["flag"]``), with the field's default and ``metadata["help"]``."""
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        parser.add_argument(flag, **_flag_kwargs(f, hints[f.name]))


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` the parsed flags describe (validated: ``ValueError`` if not)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    values["aliases"] = tuple(values["aliases"] or ())
    return ServeConfig(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 2 on a configuration error."""
    try:
        config = config_from_args(args)
        from matryoshka.serve import run

        run(config)
    except (ImportError, ValueError, FileNotFoundError) as e:
        print(f"mrl serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 0
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``mrl`` parser."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP embeddings (OpenAI-compatible, with `dimensions`) and funnel search",
        description="Serve /v1/embeddings, /v1/search, /v1/models, /health and /metrics. "
        "Needs `pip install 'matryoshka[serve]'`.",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_serve)
