"""The ``mrl`` command line: one table of commands, one module per command family.

======================  =====================================================================
module                  commands
======================  =====================================================================
``cli/train.py``        ``train``, ``eval``, ``demo``, ``report``
``cli/retrieval.py``    ``index build``, ``search``
``cli/text.py``         ``embed``, ``embed-merge``, ``adaptor fit``, ``text-eval``
``cli/serve.py``        ``serve``
``cli/apps.py``         ``app <name>``, ``embed-images``
======================  =====================================================================

Each module has ``add_arguments(command, parser, rest)`` (``rest``: the command line after the
command, for families such as ``mrl app <name>``); only the module of the command being run is
imported (``mrl --help`` imports none), and the heavy libraries (torch, faiss, fastapi) are
imported by the command itself, so help is instant. Flags are built by :mod:`matryoshka.cli.args`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: ``command -> (module that builds and runs it, one-line help)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("matryoshka.cli.train", "train one model from a recipe (mrl, mrl-e, ff; task: text)"),
    "eval": ("matryoshka.cli.train", "per-size quality of a trained run on its test split"),
    "demo": ("matryoshka.cli.train", "train MRL, MRL-E, FF per size on bundled MNIST; report"),
    "report": ("matryoshka.cli.train", "re-render report.md and plots from a metrics.json"),
    "index": ("matryoshka.cli.retrieval", "build vector indexes over embedding prefixes"),
    "search": ("matryoshka.cli.retrieval", "search a saved index or vector DB (batch or stdin)"),
    "embed": ("matryoshka.cli.text", "embed texts (file or WordNet) at a prefix size"),
    "embed-merge": ("matryoshka.cli.text", "check and merge the shards of `mrl embed --shard`"),
    "adaptor": ("matryoshka.cli.text", "post-hoc Matryoshka adaptor (mrl adaptor fit)"),
    "text-eval": (
        "matryoshka.cli.text",
        "per-size WordNet retrieval: baselines, adaptor, fine-tune",
    ),
    "serve": ("matryoshka.cli.serve", "HTTP embeddings (OpenAI-compatible) and funnel search"),
    "app": ("matryoshka.cli.apps", "run an application recipe (multitask, rl, ...)"),
    "embed-images": ("matryoshka.cli.apps", "nested image features at size --dim of a trained run"),
}


def _version() -> str:
    from matryoshka import __version__

    return f"mrl (matryoshka) {__version__}"


def build_parser(command: str | None = None, rest: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``mrl`` parser: every command listed, and the arguments of ``command`` (of every
    command when ``None``; pass the one being run so that only its module is imported).
    ``rest``, the command line after ``command``, lets a command family with sub-commands
    (``mrl app <name>``) import only the one named."""
    parser = argparse.ArgumentParser(prog="mrl", description="Matryoshka Representation Learning")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(name, p, rest)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mrl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    rest = argv[argv.index(command) + 1 :] if command in COMMANDS else []
    args = build_parser(command if command in COMMANDS else "", rest).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
