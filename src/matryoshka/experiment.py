"""The image experiment end to end: train MRL, MRL-E and one FF model per size, evaluate every
size against post-hoc baselines, write the report. ``mrl demo`` runs it on the bundled MNIST
subset.
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka.cascade import AdaptiveClassifier, cascade_curve
from matryoshka.data.images import ImageSplits, load_dataset
from matryoshka.evaluation.image import (
    POSTHOC,
    embed,
    knn1_accuracy,
    linear_probe,
    posthoc_reduce,
    retrieval_map,
)
from matryoshka.ops import truncate_numpy
from matryoshka.report import write_report
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import predict_logits, train

__all__ = ["ImageExperimentConfig", "run_image_experiment"]

METRIC_LABELS = {
    "top1": "top-1 accuracy (trained heads; linear probe for post-hoc baselines)",
    "probe": "linear-probe top-1 (logistic regression on the size-m embedding, every method alike)",
    "knn1": "1-NN top-1 accuracy (cosine, training split as database)",
    "map@10": "retrieval mAP@10 (same class relevant, query excluded)",
}


@dataclass
class ImageExperimentConfig:
    """What to train and compare. ``train`` holds the shared training settings; ``method``,
    ``embed_dim`` and ``out_dir`` are set per run."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(embed_dim=128, nesting_start=2, epochs=15)
    )
    methods: tuple[str, ...] = ("mrl", "mrl-e", "ff")
    posthoc: tuple[str, ...] = POSTHOC
    out_dir: str = "runs/demo"
    map_k: int = 10
    cascade_tolerance: float = 0.005

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in ("mrl", "mrl-e", "ff"):
                raise ValueError(f"methods contains {m!r}: use any of 'mrl', 'mrl-e', 'ff'.")
        for p in self.posthoc:
            if p not in POSTHOC:
                raise ValueError(f"posthoc contains {p!r}: use any of {list(POSTHOC)}.")
        if self.posthoc and "ff" not in self.methods:
            raise ValueError(
                "posthoc baselines reduce the full-size FF embedding: add 'ff' to methods "
                "or set posthoc=()."
            )


@dataclass
class _Experiment:
    """What one image experiment accumulates while it trains and evaluates each method."""

    config: ImageExperimentConfig
    data: ImageSplits
    sizes: list[int]
    metrics: dict[str, dict[str, list[float | None]]] = field(
        default_factory=lambda: {k: {} for k in METRIC_LABELS}
    )
    train_seconds: dict[str, float] = field(default_factory=dict)
    adaptive: dict[str, dict[str, Any]] = field(default_factory=dict)
    cascade_series: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    def embedding_metrics(self, z_tr: np.ndarray, z_te: np.ndarray) -> tuple[float, float, float]:
        """``(linear probe, 1-NN, mAP@k)`` of one size's ``(N, m)`` train/test embeddings."""
        y_train, y_test = self.data.y_train.numpy(), self.data.y_test.numpy()
        return (
            linear_probe(z_tr, y_train, z_te, y_test, seed=self.config.train.seed),
            knn1_accuracy(z_tr, y_train, z_te, y_test),
            retrieval_map(z_te, y_test, self.config.map_k),
        )

    def record(self, name: str, rows: list[tuple[float, float, float, float]]) -> None:
        """``rows``: one ``(top1, probe, knn1, map)`` per size."""
        for metric, values in zip(METRIC_LABELS, zip(*rows, strict=True), strict=True):
            self.metrics[metric][name] = list(values)


def _run_nested(exp: _Experiment, method: str) -> None:
    """Train ``mrl`` or ``mrl-e`` once; every size's metrics, its cascade and cascade curve."""
    base, data = exp.config.train, exp.data
    name = {"mrl": "MRL", "mrl-e": "MRL-E"}[method]
    run = train(replace(base, method=method, out_dir=str(exp.out / "runs" / method)), data)
    exp.train_seconds[name] = run.seconds
    # One backbone pass per split; the heads run on the stored embeddings.
    z_tr, z_te = embed(run.model, data.x_train), embed(run.model, data.x_test)
    head = run.model.head
    with torch.no_grad():
        test_logits = head(torch.from_numpy(z_te))  # (L, N, C)
    top1 = (test_logits.argmax(-1) == data.y_test).double().mean(1)
    # Adaptive classification: thresholds fit on the validation split, measured on test.
    cascade = AdaptiveClassifier(head, head.nesting, tolerance=exp.config.cascade_tolerance)
    cascade.fit(torch.from_numpy(embed(run.model, data.x_val)), data.y_val)
    exp.adaptive[name] = cascade.evaluate(torch.from_numpy(z_te), data.y_test)
    curve = cascade_curve(
        test_logits.numpy(), data.y_test.numpy(), head.nesting, tied=head.tied, seed=base.seed
    )
    for series, points in ((f"{name} cascade", "cascade"), (f"{name} fixed sizes", "fixed")):
        exp.cascade_series[series] = {
            "x": [p["expected_dim"] for p in curve[points]],
            "y": [p["accuracy"] for p in curve[points]],
        }
    exp.record(
        name,
        [
            (float(t), *exp.embedding_metrics(truncate_numpy(z_tr, m), truncate_numpy(z_te, m)))
            for t, m in zip(top1.tolist(), exp.sizes, strict=True)
        ],
    )


def _run_fixed(exp: _Experiment) -> None:
    """One ordinary (FF) model per size, then the post-hoc reductions of the full-size one."""
    base, data = exp.config.train, exp.data
    ff_rows = []
    for m in exp.sizes:
        ff_cfg = replace(base, method="ff", embed_dim=m, out_dir=str(exp.out / "runs" / f"ff-{m}"))
        run = train(ff_cfg, data)
        exp.train_seconds[f"FF-{m}"] = run.seconds
        logits = predict_logits(run.model, data.x_test)[0]  # (N, C): the one size
        top1_ff = float((logits.argmax(-1) == data.y_test).double().mean())
        z_tr, z_te = embed(run.model, data.x_train), embed(run.model, data.x_test)
        ff_rows.append((top1_ff, *exp.embedding_metrics(z_tr, z_te)))
    exp.record("FF", ff_rows)
    # Post-hoc baselines reduce the last (full-size) FF model's embeddings.
    for method in exp.config.posthoc:
        rows = []
        for m in exp.sizes:
            r_tr, r_te = posthoc_reduce(method, z_tr, z_te, m, seed=base.seed)
            probe, knn, mp = exp.embedding_metrics(r_tr, r_te)
            rows.append((probe, probe, knn, mp))  # no trained head: top-1 is the probe
        exp.record(f"FF-{exp.sizes[-1]} + {method}", rows)


def _results(exp: _Experiment, wall_seconds: float) -> dict[str, Any]:
    """The results dict of the report schema (:mod:`matryoshka.report`)."""
    data, sizes, metrics = exp.data, exp.sizes, exp.metrics
    curves = {
        "cascade": {
            "title": "adaptive classification: top-1 against expected dimension (test)",
            "xlabel": "expected representation size (log2)",
            "ylabel": "top-1 accuracy",
            "log2x": True,
            "series": exp.cascade_series,
        }
    }
    return {
        "task": f"{data.name}: {data.num_classes}-way image classification and retrieval",
        "sizes": sizes,
        "metrics": metrics,
        "metric_labels": METRIC_LABELS,
        "notes": _findings(metrics, sizes) + _adaptive_findings(exp.adaptive, metrics, sizes),
        "adaptive": exp.adaptive,
        "curves": curves if exp.cascade_series else {},
        "meta": {
            "wall_seconds": round(wall_seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "train_seconds": {k: round(v, 1) for k, v in exp.train_seconds.items()},
            "data": {"name": data.name, **data.sizes()},
            "train_config": asdict(exp.config.train),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
        },
    }


def run_image_experiment(
    config: ImageExperimentConfig, data: ImageSplits | None = None
) -> dict[str, Any]:
    """Train, evaluate at every size, write ``metrics.json``, ``report.md`` and plots to
    ``config.out_dir``; returns the results dict (schema in :mod:`matryoshka.report`)."""
    t0 = time.perf_counter()
    base = config.train
    if data is None:
        data = load_dataset(base.data, base.data_root, seed=base.seed)
    exp = _Experiment(config, data, list(base.nesting_obj()))
    for method in (m for m in config.methods if m != "ff"):
        _run_nested(exp, method)
    if "ff" in config.methods:
        _run_fixed(exp)
    results = _results(exp, time.perf_counter() - t0)
    write_report(results, exp.out)
    return results


def _adaptive_findings(
    adaptive: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, list[float | None]]],
    sizes: list[int],
) -> list[str]:
    notes = []
    for name, res in adaptive.items():
        full = metrics["top1"][name][-1] or 0.0
        notes.append(
            f"Adaptive {name} cascade (thresholds fit on val to stay within the tolerance of "
            f"full size): test top-1 {100 * res['accuracy']:.1f} at an expected size of "
            f"{res['expected_dim']:.1f} dims, against {100 * full:.1f} at {sizes[-1]} dims."
        )
    return notes


def _findings(metrics: dict[str, dict[str, list[float | None]]], sizes: list[int]) -> list[str]:
    """The report's headline numbers, computed from the table (never written by hand)."""
    notes: list[str] = []
    top1 = metrics["top1"]
    if "FF" in top1:
        ff = top1["FF"]
        for name in ("MRL", "MRL-E"):
            if name in top1:
                gaps = [
                    100 * (a - b)
                    for a, b in zip(top1[name], ff, strict=True)
                    if a is not None and b is not None
                ]
                worst = min(range(len(gaps)), key=lambda i: gaps[i])
                notes.append(
                    f"{name} minus FF, top-1 points, per size: "
                    + ", ".join(f"{m}: {g:+.1f}" for m, g in zip(sizes, gaps, strict=True))
                    + f" (worst {gaps[worst]:+.1f} at m={sizes[worst]})."
                )
    posthoc = [k for k in top1 if "+" in k]
    small = [i for i, m in enumerate(sizes) if m <= 8]
    if posthoc and "MRL" in top1 and small:
        for metric in ("probe", "knn1", "map@10"):
            table = metrics[metric]
            parts = []
            for i in small:
                best = max(posthoc, key=lambda k: table[k][i] or 0.0)
                mrl, other = 100 * (table["MRL"][i] or 0.0), 100 * (table[best][i] or 0.0)
                parts.append(f"m={sizes[i]}: {mrl:.1f} vs {other:.1f} ({best}, {mrl - other:+.1f})")
            notes.append(
                f"MRL against the best post-hoc baseline, {metric}: " + "; ".join(parts) + "."
            )
    return notes
