"""``mrl train``, ``mrl eval``, ``mrl demo`` and ``mrl report``.

    mrl train --config configs/mnist_mrl.yaml --epochs 3         # flags override the recipe
    mrl train --config configs/text_wordnet_mrl.yaml --train-pairs 2000   # a `task: text` recipe
    mrl eval --run runs/mnist_mrl --out eval.json
    mrl eval --run runs/text_own --beir data/scifact --split test --out beir.json   # text runs
    mrl demo --out runs/demo
    mrl report --results runs/demo/metrics.json

``mrl train`` takes the fields of :class:`~matryoshka.training.config.TrainConfig` (image recipes)
and of :class:`~matryoshka.training.text.TextTrainConfig` (``task: text`` recipes) as flags; a
flag that only the other kind of recipe has is an error naming it, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matryoshka.cli.args import (
    add_dataclass_arguments,
    add_deprecated_alias,
    given_flags,
    overrides,
)

__all__ = ["TASKS", "add_arguments", "cmd_demo", "cmd_eval", "cmd_report", "cmd_train"]

#: What a recipe's ``task`` key may say (``image`` when it is absent).
TASKS = ("image", "text")


def _config_classes() -> dict[str, type]:
    from matryoshka.training.config import TrainConfig
    from matryoshka.training.text import TextTrainConfig

    return {"image": TrainConfig, "text": TextTrainConfig}


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def train_config(args: argparse.Namespace) -> Any:
    """The recipe of ``mrl train`` (``--config`` and the flags given) as its config dataclass;
    ``SystemExit`` with ``mrl: ...`` naming the key or flag on a bad recipe."""
    from matryoshka.config import load_recipe, load_yaml

    try:
        data = load_yaml(args.config, "TrainConfig fields") if args.config else {}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"mrl: {e}") from None
    task = data.get("task", "image")
    where = f"--config {args.config!r}" if args.config else "the command line"
    if task not in TASKS:
        raise SystemExit(
            f"mrl: bad config: task={task!r} in {where} is not one of {list(TASKS)}: write "
            f"task: text for a text recipe, or leave task out for an image recipe."
        )
    classes = _config_classes()
    cls = classes[task]
    other = next(c for t, c in classes.items() if t != task)
    foreign = given_flags(args, sorted(_names(other) - _names(cls)))
    if foreign:
        raise SystemExit(
            f"mrl: {', '.join(foreign)} does not apply to a {task} recipe ({where}): "
            f"{cls.__name__} has no such option; see `mrl train --help` for the {task} flags."
        )
    try:
        return load_recipe(
            cls,
            data=data,
            overrides=overrides(args, cls),
            drop=("task",) if task == "image" else (),
        )
    except ValueError as e:
        raise SystemExit(f"mrl: bad config: {e}") from None


def _print_text_tables(
    results: dict[str, Any], metrics: Sequence[str] = ("ndcg@10", "recall@10")
) -> None:
    """One table per metric of ``metrics``: rows are sizes, columns methods, values in %."""
    for metric in metrics:
        table = results["metrics"][metric]
        widths = [max(18, len(name) + 2) for name in table]
        print(f"{metric:>6} " + "".join(f"{n:>{w}}" for n, w in zip(table, widths, strict=True)))
        for i, m in enumerate(results["sizes"]):
            cells = (f"{100 * v[i]:.1f}%" for v in table.values())
            print(f"{m:>6} " + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


def cmd_train(args: argparse.Namespace) -> int:
    """``mrl train``: one run from a YAML recipe and/or flags (``task: text``: a text model)."""
    config = train_config(args)
    if getattr(config, "task", "image") == "text":
        from matryoshka.training.text import train_text

        try:
            folder = train_text(config)
        except (FileNotFoundError, ValueError) as e:  # e.g. sizes, data, columns, resume
            raise SystemExit(f"mrl: bad config: {e}") from None
        # a distilled run is scored on WordNet and the docstrings whatever its texts were
        own_data = config.data is not None and config.objective != "distill"
        beir = " --beir FOLDER" if own_data else ""
        print(f"saved {folder / 'model'}; evaluate it with: mrl eval --run {folder}{beir}")
        return 0
    from matryoshka.training.image import train

    result = train(config)
    last = result.history[-1]["val_acc"] if result.history else []
    print(f"saved {result.model_path} ({result.seconds:.1f} s); val top-1 per size: {last}")
    return 0


def _eval_text(args: argparse.Namespace) -> int:
    """``mrl eval`` of a text run: on a BEIR folder (``--beir``) or its held-out synsets."""
    from matryoshka.evaluation.text import evaluate_text_model
    from matryoshka.io import atomic_write_bytes

    try:
        if args.beir is not None:
            from matryoshka.evaluation.beir import BEIR_METRICS, evaluate_beir

            results = evaluate_beir(
                args.run,
                args.beir,
                split=args.split,
                cache_dir=args.cache_dir,
                adaptor_epochs=args.adaptor_epochs,
                progress=args.progress,
            )
            print(results["task"])
            _print_text_tables(results, BEIR_METRICS)
        else:
            from matryoshka.evaluation.text import OOD_FUNNEL, OOD_RELATIVE

            results = evaluate_text_model(
                args.run, cache_dir=args.cache_dir, progress=args.progress
            )
            print(results["task"])
            _print_text_tables(results)
            print("out of domain: docstrings of the installed packages (summary line -> body)")
            _print_text_tables(results, (OOD_RELATIVE, OOD_FUNNEL))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"mrl eval: error: {e}") from None
    if args.out:
        atomic_write_bytes(args.out, json.dumps(results, indent=1).encode())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``mrl eval``: top-1 per size of a saved model on its data set's test split, or per-size
    retrieval of a text run (a folder with ``text_model.json``) on its held-out synsets or, with
    ``--beir FOLDER``, on a BEIR folder's ``--split``."""
    from matryoshka.evaluation.text import is_text_run

    if args.run is None:
        raise SystemExit(
            "mrl eval: error: pass --run RUN (the model.json of mrl train, or a text run folder)."
        )
    if is_text_run(args.run):
        return _eval_text(args)
    if args.beir is not None:
        raise SystemExit(
            f"mrl eval: error: --beir {args.beir!r} scores text runs, but --run {args.run!r} is "
            "not one (no text_model.json): pass the folder of a `task: text` run."
        )
    from matryoshka.training.config import TrainConfig
    from matryoshka.training.image import evaluate_split, load_model

    model, meta = load_model(args.run)
    config = TrainConfig.from_dict(meta["config"])
    acc = evaluate_split(model, config, "test")  # in memory or streamed, as the run trained
    table = {m: round(float(a), 4) for m, a in zip(model.nesting, acc, strict=True)}
    print(f"{'m':>6} {'top-1':>8}")
    for m, a in table.items():
        print(f"{m:>6} {100 * a:>7.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps({"test_top1": table}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``mrl demo``: the whole image path on the bundled MNIST subset."""
    from matryoshka.experiment import ImageExperimentConfig, run_image_experiment
    from matryoshka.training.config import TrainConfig

    train_cfg = TrainConfig(
        embed_dim=128, nesting_start=2, epochs=args.epochs, seed=args.seed, progress=args.progress
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


def _add_train(p: argparse.ArgumentParser) -> None:
    classes = _config_classes()
    image, text = classes["image"], classes["text"]
    p.add_argument("--config", help="YAML recipe (flags override it); `task: text` for text")
    group = p.add_argument_group("image recipes (TrainConfig) and options both kinds share")
    add_dataclass_arguments(group, image)
    group = p.add_argument_group("text recipes only (task: text; TextTrainConfig)")
    add_dataclass_arguments(group, text, exclude={"task", *_names(image)})
    add_deprecated_alias(p, "--out-dir", "--out", dest="out_dir")
    p.set_defaults(func=cmd_train)


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run of mrl train: its model.json, or a text run's folder")
    p.add_argument("--out", help="also write the table to this JSON file")
    text = p.add_argument_group("text runs only")
    text.add_argument(
        "--beir",
        default=None,
        metavar="FOLDER",
        help="score on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): base "
        "truncated, + PCA, + adaptor (fitted on the corpus) and the fine-tuned model, per size",
    )
    text.add_argument("--split", default="test", help="with --beir: the qrels split to score")
    text.add_argument(
        "--adaptor-epochs", type=int, default=6, help="with --beir: epochs of the adaptor fit"
    )
    text.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default: the run's cache_dir)"
    )
    text.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars (--no-progress: none)",
    )
    add_deprecated_alias(p, "--model", "--run", dest="run")
    add_deprecated_alias(p, "--json", "--out", dest="out")
    p.set_defaults(func=cmd_eval)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=int, default=15, help="epochs per trained model")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, inits and batches")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars (--no-progress: none)",
    )
    add_deprecated_alias(p, "--quiet", "--no-progress", dest="progress", const=False)
    p.set_defaults(func=cmd_demo)


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="metrics.json or the folder holding it")
    p.add_argument("--out", help="output folder (default: beside the results)")
    p.set_defaults(func=cmd_report)


_ADDERS = {"train": _add_train, "eval": _add_eval, "demo": _add_demo, "report": _add_report}


def add_arguments(command: str, parser: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``command`` (``train``, ``eval``, ``demo`` or ``report``)."""
    _ADDERS[command](parser)
