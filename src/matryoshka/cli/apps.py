"""CLI of the application recipes: ``mrl app <name> --config configs/app_<name>.yaml`` and
``mrl embed-images``. :func:`register` adds them to the ``mrl`` parser.

    mrl app multitask --config configs/app_multitask.yaml --epochs 3   # flags override YAML
    mrl app rl --config configs/app_rl.yaml
    mrl embed-images --model runs/mnist_mrl/model.json --dim 16 --out z16.npy
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

from matryoshka.apps import APPS

__all__ = ["cmd_app", "cmd_embed_images", "load_app_config", "register"]


def load_app_config(name: str, path: str | None, overrides: dict[str, Any]) -> Any:
    """The config of app ``name`` from a YAML recipe (its optional ``app`` key must match) and
    ``overrides`` (flags given on the command line)."""
    from matryoshka.apps import get_app
    from matryoshka.apps.common import config_from_dict

    cfg_cls, _ = get_app(name)
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {path!r} does not exist.")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {path!r} must hold a mapping of {cfg_cls.__name__} fields.")
    app = data.pop("app", name)
    if app != name:
        raise ValueError(
            f"--config {path!r} is a recipe for app {app!r}, not {name!r}: run `mrl app {app}`."
        )
    data.update(overrides)
    return config_from_dict(cfg_cls, data)


def cmd_app(args: argparse.Namespace) -> int:
    """``mrl app <name>``: run one application recipe and print its report's summary."""
    from matryoshka.apps import get_app

    cfg_cls, run = get_app(args.app)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cfg_cls)
        if getattr(args, f.name, None) is not None
    }
    try:
        config = load_app_config(args.app, args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"mrl: error: {e}", file=sys.stderr)
        return 2
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

    try:
        z, y = embed_images(
            args.model,
            args.data,
            args.split,
            args.dim,
            args.data_root,
            normalize=args.normalize,
            layers=args.layers,
        )
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"mrl: error: {e}", file=sys.stderr)
        return 2
    np.save(args.out, z)
    if args.labels:
        np.save(args.labels, y)
    print(f"wrote {args.out}: {z.shape[0]} x {z.shape[1]} float32")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mrl app <name>`` (one per application) and ``mrl embed-images``."""
    from matryoshka.cli import add_dataclass_arguments

    p = subparsers.add_parser("app", help="run an application recipe (multitask, rl, ...)")
    apps = p.add_subparsers(dest="app", required=True)
    for name, (module, cfg, _) in APPS.items():
        try:
            cfg_cls = getattr(importlib.import_module(module), cfg)
        except ImportError:  # pragma: no cover - an app whose import fails is left out
            continue
        doc = (cfg_cls.__doc__ or "").strip().splitlines()[0]
        q = apps.add_parser(name, help=doc, description=doc)
        q.add_argument("--config", help=f"YAML recipe (configs/app_{name}.yaml); flags override")
        add_dataclass_arguments(q, cfg_cls)
        q.set_defaults(func=cmd_app)

    p = subparsers.add_parser(
        "embed-images", help="nested image features at size --dim from a trained model"
    )
    p.add_argument("--model", required=True, help="model.json written by mrl train")
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
