"""The ViT recipe: the small vision transformer of :mod:`matryoshka.backbones.vit` (registered as
``vit_tiny``, so ``mrl train --backbone vit_tiny`` works too) trained with the same MRL loop.

Images are cut into ``patch_size``-square patches, linearly embedded, prefixed with a learned
class token, given learned position embeddings and passed through pre-norm transformer encoder
blocks; the class token after the last block is normalised and projected to ``embed_dim``.
The recipe trains it with the same MRL loop as the CNN (:func:`matryoshka.training.image.train`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.apps.common import check_positive, config_to_dict, finish
from matryoshka.backbones.vit import ViTBackbone, vit_tiny
from matryoshka.config import help_field
from matryoshka.data.images import load_mnist_subset
from matryoshka.evaluation.image import embed, linear_probe
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import predict_logits, train

__all__ = ["ViTBackbone", "ViTConfig", "run_vit", "vit_tiny"]


@dataclass
class ViTConfig:
    """ViT recipe: MRL with ``vit_tiny`` on the MNIST subset, beside an ordinary ViT truncated."""

    embed_dim: int = help_field("embedding size d", default=64)
    nesting_start: int = help_field("first size of the doubling ladder", default=2)
    width: int = help_field("transformer width", default=64)
    epochs: int = help_field("training epochs", default=10)
    lr: float = help_field("peak AdamW learning rate", default=1e-3)
    baseline: bool = help_field("also train an ordinary ViT and truncate it", default=True)
    seed: int = help_field("seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_vit")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        check_positive(self, "embed_dim", "nesting_start", "width", "epochs")


def run_vit(config: ViTConfig) -> dict[str, Any]:
    """Train ``vit_tiny`` with MRL (and an ordinary one); write the report."""
    t0 = time.perf_counter()
    data = load_mnist_subset(seed=config.seed)
    out = Path(config.out_dir)
    metrics: dict[str, dict[str, list[Any]]] = {"top1": {}}
    common: dict[str, Any] = {
        "backbone": "vit_tiny",
        "backbone_width": config.width,
        "embed_dim": config.embed_dim,
        "nesting_start": config.nesting_start,
        "epochs": config.epochs,
        "lr": config.lr,
        "weight_decay": 0.05,
        "seed": config.seed,
        "progress": config.progress,
        "device": "cpu",
    }
    mrl = train(TrainConfig(method="mrl", out_dir=str(out / "mrl"), **common), data)
    sizes = list(mrl.model.nesting)
    acc = predict_logits(mrl.model, data.x_test).argmax(-1) == data.y_test  # (L, N)
    metrics["top1"]["MRL ViT (its heads)"] = acc.double().mean(1).tolist()
    timings = {"mrl_train_seconds": round(mrl.seconds, 1)}
    y_tr, y_te = data.y_train.numpy(), data.y_test.numpy()
    z_tr, z_te = embed(mrl.model, data.x_train), embed(mrl.model, data.x_test)
    metrics["top1"]["MRL ViT, linear probe"] = [
        linear_probe(z_tr[:, :m].copy(), y_tr, z_te[:, :m].copy(), y_te, config.seed) for m in sizes
    ]
    if config.baseline:
        ff = train(TrainConfig(method="ff", out_dir=str(out / "ff"), **common), data)
        z_tr, z_te = embed(ff.model, data.x_train), embed(ff.model, data.x_test)
        metrics["top1"]["ordinary ViT, truncated + linear probe"] = [
            linear_probe(
                np.ascontiguousarray(z_tr[:, :m]),
                y_tr,
                np.ascontiguousarray(z_te[:, :m]),
                y_te,
                config.seed,
            )
            for m in sizes
        ]
        timings["ff_train_seconds"] = round(ff.seconds, 1)
    n_params = sum(p.numel() for p in mrl.model.backbone.parameters())
    top = metrics["top1"]["MRL ViT (its heads)"]
    notes = [
        f"vit_tiny: {n_params:,} backbone parameters, 16 patches of 7x7, width {config.width}",
        f"MRL ViT top-1: {100 * top[0]:.1f}% at m={sizes[0]}, {100 * top[-1]:.1f}% at "  # type: ignore[operator]
        f"m={sizes[-1]}",
    ]
    results = {
        "task": "Vision transformer (vit_tiny) with MRL on the MNIST subset",
        "sizes": sizes,
        "metrics": metrics,
        "metric_labels": {"top1": "test top-1"},
        "notes": notes,
        "meta": {"config": config_to_dict(config), **timings},
    }
    return finish(results, out, t0)
