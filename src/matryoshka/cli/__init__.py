"""The ``mrl`` command line: ``mrl train | eval | demo | report`` (+ commands other modules add).

Training flags are generated from :class:`~matryoshka.training.image.TrainConfig`'s fields (help text
included), so the CLI, the YAML recipes and the Python API never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_dataclass_arguments", "build_parser", "main"]

# Modules that add their own subcommands with a `register(subparsers)` function, if installed.
_PLUGINS = (
    "matryoshka.cli.retrieval",
    "matryoshka.cli.text",
    "matryoshka.cli.serve",
    "matryoshka.cli.apps",
)


def _arg_type(annotation: str) -> dict[str, Any]:
    ann = annotation.replace(" ", "")
    if ann == "bool":
        return {"action": argparse.BooleanOptionalAction}
    scalar = {"int": int, "float": float, "str": str}
    for name, typ in scalar.items():
        if ann in (name, f"{name}|None"):
            return {"type": typ}
        if ann in (f"list[{name}]", f"list[{name}]|None"):
            return {"type": typ, "nargs": "+"}
    raise TypeError(f"no CLI mapping for a field annotated {annotation!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with the field's help; defaults are ``None`` so that
    only flags given on the command line override a YAML config."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            help=f.metadata.get("help", ""),
            **_arg_type(str(f.type)),
        )


def _overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def _load_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"mrl: --config {path!r} does not exist.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"mrl: --config {path!r} must hold a mapping of TrainConfig fields.")
    return data


def _train_config(data: dict[str, Any], args: argparse.Namespace) -> Any:
    """An image recipe's mapping with the flags given on the command line applied."""
    from matryoshka.training.image import TrainConfig

    data.update(_overrides(args, TrainConfig))
    try:
        return TrainConfig.from_dict(data)
    except ValueError as e:
        raise SystemExit(f"mrl: bad config: {e}") from None


def _text_train_config(data: dict[str, Any], args: argparse.Namespace) -> Any:
    """A ``task: text`` recipe: the flags that both configs share override its keys."""
    from matryoshka.training.image import TrainConfig
    from matryoshka.training.text import TextTrainConfig

    shared = {f.name for f in dataclasses.fields(TextTrainConfig)}
    data.update({k: v for k, v in _overrides(args, TrainConfig).items() if k in shared})
    try:
        return TextTrainConfig.from_dict(data)
    except ValueError as e:
        raise SystemExit(f"mrl: bad config: {e}") from None


def _print_text_tables(results: dict[str, Any]) -> None:
    for metric in ("ndcg@10", "recall@10"):
        table = results["metrics"][metric]
        widths = [max(18, len(name) + 2) for name in table]
        print(f"{metric:>6} " + "".join(f"{n:>{w}}" for n, w in zip(table, widths, strict=True)))
        for i, m in enumerate(results["sizes"]):
            cells = (f"{100 * v[i]:.1f}%" for v in table.values())
            print(f"{m:>6} " + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


def cmd_train(args: argparse.Namespace) -> int:
    """``mrl train``: one run from a YAML recipe and/or flags (``task: text``: a text model)."""
    from matryoshka.training.image import train

    data = _load_yaml(args.config)
    if data.get("task") == "text":
        from matryoshka.training.text import train_text

        folder = train_text(_text_train_config(data, args))
        print(f"saved {folder / 'model'}; evaluate it with: mrl eval --model {folder}")
        return 0
    config = _train_config(data, args)
    result = train(config)
    last = result.history[-1]["val_acc"] if result.history else []
    print(f"saved {result.model_path} ({result.seconds:.1f} s); val top-1 per size: {last}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``mrl eval``: top-1 per size of a saved model on its data set's test split, or per-size
    retrieval of a text run (a folder with ``text_model.json``) on its held-out synsets."""
    from matryoshka.data.images import load_dataset
    from matryoshka.training.image import TrainConfig, load_model, predict_logits
    from matryoshka.training.text import evaluate_text_model, is_text_run

    if is_text_run(args.model):
        results = evaluate_text_model(args.model)
        _print_text_tables(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0
    model, meta = load_model(args.model)
    config = TrainConfig.from_dict(meta["config"])
    data = load_dataset(config.data, config.data_root, seed=config.seed)
    acc = (predict_logits(model, data.x_test).argmax(-1) == data.y_test).double().mean(1)
    table = {m: round(float(a), 4) for m, a in zip(model.nesting, acc, strict=True)}
    print(f"{'m':>6} {'top-1':>8}")
    for m, a in table.items():
        print(f"{m:>6} {100 * a:>7.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"test_top1": table}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``mrl demo``: the whole image path on the bundled MNIST subset."""
    from matryoshka.experiment import ImageExperimentConfig, run_image_experiment
    from matryoshka.training.image import TrainConfig

    train_cfg = TrainConfig(
        embed_dim=128, nesting_start=2, epochs=args.epochs, seed=args.seed, progress=not args.quiet
    )
    config = ImageExperimentConfig(train=train_cfg, out_dir=args.out)
    results = run_image_experiment(config)
    out = Path(args.out)
    print()
    print((out / "report.md").read_text().split("## ")[0])
    print(
        f"report: {out / 'report.md'} (plots beside it); wall {results['meta']['wall_seconds']} s, "
        f"peak RSS {results['meta']['peak_rss_mib']} MiB"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``mrl report``: re-render a report from its ``metrics.json``."""
    from matryoshka.report import load_results, write_report

    results = load_results(args.results)
    out = args.out or (
        Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent
    )
    print(write_report(results, out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``mrl`` parser with every subcommand."""
    from matryoshka.training.image import TrainConfig

    parser = argparse.ArgumentParser(prog="mrl", description="Matryoshka Representation Learning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (mrl, mrl-e or ff; or a `task: text` recipe)")
    p.add_argument("--config", help="YAML recipe of TrainConfig fields (flags override it)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 per size of a saved model on its test split")
    p.add_argument(
        "--model", required=True, help="model.json written by mrl train, or a text run folder"
    )
    p.add_argument("--json", help="also write the table to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train MRL, MRL-E, FF per size on bundled MNIST; report")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=int, default=15, help="epochs per trained model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="re-render report.md and plots from a metrics.json")
    p.add_argument("--results", required=True, help="metrics.json or the folder holding it")
    p.add_argument("--out", help="output folder (default: beside the results)")
    p.set_defaults(func=cmd_report)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mrl`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
