"""CLI of the application recipes: ``mrl app <name> --config configs/app_<name>.yaml`` and
``mrl embed-images``. :func:`register` adds them to the ``mrl`` parser.

    mrl app multitask --config configs/app_multitask.yaml --epochs 3   # flags override YAML
    mrl app rl --config configs/app_rl.yaml
    mrl embed-images --run runs/mnist_mrl/model.json --dim 16 --out z16.npy
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matryoshka.apps import APPS
from matryoshka.cli.args import add_dataclass_arguments, add_deprecated_alias, fail, overrides

__all__ = ["add_arguments", "cmd_app", "cmd_embed_images", "load_app_config"]


def load_app_config(name: str, path: str | None, overrides: dict[str, Any]) -> Any:
    """The config of app ``name`` from a YAML recipe (its optional ``app`` key must match) and
    ``overrides`` (flags given on the command line)."""
    from matryoshka.apps import get_app
    from matryoshka.config import load_recipe, load_yaml

    cfg_cls, _ = get_app(name)
    data = load_yaml(path, f"{cfg_cls.__name__} fields") if path is not None else {}
    app = data.get("app", name)
    if app != name:
        raise ValueError(
            f"--config {path!r} is a recipe for app {app!r}, not {name!r}: run `mrl app {app}`."
        )
    return load_recipe(cfg_cls, path, overrides, data=data, drop=("app",))


def cmd_app(args: argparse.Namespace) -> int:
    """``mrl app <name>``: run one application recipe and print its report's summary."""
    from matryoshka.apps import get_app

    cfg_cls, run = get_app(args.app)
    try:
        config = load_app_config(args.app, args.config, overrides(args, cfg_cls))
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    results = run(config)
    out = Path(config.out_dir)
    print(f"{results['task']} ({results['meta'].get('wall_seconds')} s)")
    for note in results.get("notes", []):
        print(f"- {note}")
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_embed_images(args: argparse.Namespace) -> int:
    """``mrl embed-images``: nested features of an image split from a trained model -> ``.npy``."""
    import numpy as np

    from matryoshka.apps.features import embed_images
    from matryoshka.checkpoint import CheckpointError

    if args.run is None:
        return fail("pass --run MODEL.json (the model.json written by mrl train).")
    try:
        z, y = embed_images(
            args.run,
            args.data,
            args.split,
            args.dim,
            args.data_root,
            normalize=args.normalize,
            layers=args.layers,
        )
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return fail(str(e))
    np.save(args.out, z)
    if args.labels:
        np.save(args.labels, y)
    print(f"wrote {args.out}: {z.shape[0]} x {z.shape[1]} float32")
    return 0


def _add_app(p: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """``mrl app <name>``: one subcommand per application, its flags from its config class;
    only the app named in ``rest`` is imported (none for ``mrl app --help``, every app when
    ``rest`` names none)."""
    apps = p.add_subparsers(dest="app", required=True)
    chosen = next((w for w in rest if not w.startswith("-")), None)
    listing = chosen is None and bool({"-h", "--help"} & set(rest))  # `mrl app --help`
    for name, (module, cfg, _, help_) in APPS.items():
        q = apps.add_parser(name, help=help_, description=help_)
        if listing or (chosen in APPS and chosen != name):
            continue
        q.add_argument("--config", help=f"YAML recipe (configs/app_{name}.yaml); flags override")
        add_dataclass_arguments(q, getattr(importlib.import_module(module), cfg))
        q.set_defaults(func=cmd_app)


def _add_embed_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="model.json written by mrl train")
    add_deprecated_alias(p, "--model", "--run", dest="run")
    p.add_argument(
        "--data",
        default="mnist-subset",
        help="mnist-subset, digits-8x8, or a data set of mrl train (with --data-root)",
    )
    p.add_argument("--data-root", default=None, help="folder of the data set's files")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--dim", type=int, default=None, help="prefix size m (default: all of d)")
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="also concatenate pooled outputs of these backbone modules (multi-level)",
    )
    p.add_argument("--normalize", action="store_true", help="unit-normalise each prefix")
    p.add_argument("--out", required=True, help="output .npy (N, m) float32")
    p.add_argument("--labels", default=None, help="also write the labels to this .npy")
    p.set_defaults(func=cmd_embed_images)


def add_arguments(command: str, parser: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``command`` (``app`` or ``embed-images``); ``rest`` is the command
    line after it."""
    if command == "app":
        _add_app(parser, rest)
    else:
        _add_embed_images(parser)
