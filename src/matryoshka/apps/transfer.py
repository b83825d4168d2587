"""Transfer learning: reuse a trained Matryoshka backbone on a new task, at any size.

``mode="frozen"`` keeps the backbone fixed (no gradients, BatchNorm statistics untouched) and fits
a new :class:`~matryoshka.models.heads.MatryoshkaHead` on its cached features: one independent head per
size, so the new task can be served at whichever prefix the budget allows.
``mode="finetune"`` trains backbone and new head together.

The recipe trains MRL and an ordinary (fixed-feature) model on the MNIST subset, then transfers
both to scikit-learn's 8x8 digits upsampled to 28x28 (a different scanner and resolution) with few
labels per class, or to MNIST digits 5-9 from a source that saw only 0-4.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matryoshka.apps.common import (
    check_positive,
    config_to_dict,
    finish,
    load_digits_images,
    select_classes,
)
from matryoshka.config import help_field
from matryoshka.data.images import ImageSplits, load_mnist_subset
from matryoshka.evaluation.image import embed
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.nesting import Nesting
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import predict_logits, seed_everything, train
from matryoshka.training.loop import fit

__all__ = [
    "MODES",
    "TARGETS",
    "TransferConfig",
    "fit_transfer",
    "freeze",
    "run_transfer",
    "transfer_classifier",
]

MODES = ("frozen", "finetune")
TARGETS = ("digits-8x8", "mnist-5to9")


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter and put ``module`` in eval mode (in place)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def transfer_classifier(
    backbone: nn.Module, num_classes: int, nesting: Nesting, mode: str = "frozen"
) -> MatryoshkaClassifier:
    """A new classifier on a copy of ``backbone`` (``(B, ...) -> (B, d)``) with fresh heads for
    every size of ``nesting``; the copy is frozen when ``mode == "frozen"``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}.")
    backbone = copy.deepcopy(backbone)
    for p in backbone.parameters():
        p.requires_grad_(True)
    model = MatryoshkaClassifier(backbone, num_classes, nesting)
    if mode == "frozen":
        freeze(model.backbone)
    return model


def fit_transfer(
    model: MatryoshkaClassifier,
    data: ImageSplits,
    mode: str,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``data.x_train``: the head alone on cached features when frozen, or
    everything when fine-tuning. Returns per-epoch mean losses."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}.")
    if mode == "frozen" and any(p.requires_grad for p in model.backbone.parameters()):
        raise ValueError(
            "mode='frozen' but the backbone has trainable parameters: build the model with "
            "transfer_classifier(..., mode='frozen') or call freeze(model.backbone)."
        )
    seed_everything(seed)
    loss_fn = MatryoshkaLoss(nesting=model.nesting)
    y = data.y_train
    if mode == "frozen":
        feats = torch.from_numpy(embed(model.backbone, data.x_train))  # (N, d), no gradients

        def step(idx: torch.Tensor) -> torch.Tensor:
            return loss_fn(model.head(feats[idx]), y[idx]).loss

        return fit(
            model.head.parameters(),
            step,
            len(y),
            epochs,
            batch_size,
            lr,
            seed=seed,
            progress=progress,
            desc="frozen head",
        )

    def step_ft(idx: torch.Tensor) -> torch.Tensor:
        model.train()
        return loss_fn(model(data.x_train[idx]), y[idx]).loss

    return fit(
        model.parameters(),
        step_ft,
        len(y),
        epochs,
        batch_size,
        lr,
        seed=seed,
        progress=progress,
        desc="fine-tune",
    )


@dataclass
class TransferConfig:
    """Transfer recipe: source = MNIST subset, target = ``target``."""

    target: str = help_field(f"target task: {' or '.join(TARGETS)}", default="mnist-5to9")
    target_train_per_class: int = help_field(
        "labelled target examples per class (0: all of the training split)", default=20
    )
    backbone: str = help_field("registered backbone of the source models", default="cnn")
    backbone_width: int = help_field("cnn channel width", default=16)
    embed_dim: int = help_field("embedding size d", default=64)
    nesting_start: int = help_field("first size of the doubling ladder", default=2)
    source_epochs: int = help_field("epochs of the source models", default=6)
    target_epochs: int = help_field("epochs on the target task", default=60)
    target_batch_size: int = help_field("examples per step on the target task", default=16)
    lr: float = help_field("learning rate of source training and frozen heads", default=3e-3)
    finetune_lr: float = help_field("learning rate when fine-tuning", default=1e-3)
    seed: int = help_field("seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_transfer")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not one of {list(TARGETS)}.")
        check_positive(
            self,
            "embed_dim",
            "nesting_start",
            "source_epochs",
            "target_epochs",
            "target_batch_size",
        )
        if self.target_train_per_class < 0:
            raise ValueError(
                f"target_train_per_class={self.target_train_per_class} must be >= 0 (0: all)."
            )


def _few_shot(data: ImageSplits, per_class: int, seed: int) -> ImageSplits:
    """Keep ``per_class`` training examples of every class (seeded); other splits unchanged."""
    if per_class == 0:
        return data
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.y_train == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    idx = torch.cat(keep).sort().values
    return replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])


def _splits(config: TransferConfig) -> tuple[ImageSplits, ImageSplits]:
    mnist = load_mnist_subset(seed=config.seed)
    if config.target == "digits-8x8":
        source, target = mnist, load_digits_images(28, seed=config.seed)
    else:
        source = select_classes(mnist, [0, 1, 2, 3, 4], "mnist 0-4")
        target = select_classes(mnist, [5, 6, 7, 8, 9], "mnist 5-9")
    return source, _few_shot(target, config.target_train_per_class, config.seed)


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    """Train the source models, transfer each way, write the report."""
    t0 = time.perf_counter()
    source, target = _splits(config)
    out = Path(config.out_dir)
    sources: dict[str, MatryoshkaClassifier] = {}
    for method in ("mrl", "ff"):
        tc = TrainConfig(
            backbone=config.backbone,
            backbone_width=config.backbone_width,
            embed_dim=config.embed_dim,
            method=method,
            nesting_start=config.nesting_start,
            epochs=config.source_epochs,
            lr=config.lr,
            seed=config.seed,
            out_dir=str(out / f"source_{method}"),
            progress=config.progress,
            device="cpu",
        )
        sources[method] = train(tc, source).model
    nesting = sources["mrl"].nesting

    def test_acc(model: MatryoshkaClassifier) -> list[float | None]:
        logits = predict_logits(model, target.x_test)  # (L, N, C)
        return (logits.argmax(-1) == target.y_test).double().mean(1).tolist()

    runs = {
        "MRL backbone, frozen": ("mrl", "frozen", config.lr),
        "MRL backbone, fine-tuned": ("mrl", "finetune", config.finetune_lr),
        "ordinary backbone, frozen, truncated": ("ff", "frozen", config.lr),
        "ordinary backbone, fine-tuned with new MRL heads": ("ff", "finetune", config.finetune_lr),
    }
    metrics: dict[str, dict[str, list[Any]]] = {"top1": {}}
    for name, (src, mode, lr) in runs.items():
        model = transfer_classifier(sources[src].backbone, target.num_classes, nesting, mode)
        fit_transfer(
            model,
            target,
            mode,
            config.target_epochs,
            config.target_batch_size,
            lr,
            config.seed,
            config.progress,
        )
        metrics["top1"][name] = test_acc(model)
    seed_everything(config.seed)
    from matryoshka.backbones import create_backbone

    scratch = MatryoshkaClassifier(
        create_backbone(
            config.backbone, embed_dim=config.embed_dim, in_channels=1, width=config.backbone_width
        ),
        target.num_classes,
        nesting,
    )
    fit_transfer(
        scratch,
        target,
        "finetune",
        config.target_epochs,
        config.target_batch_size,
        config.finetune_lr,
        config.seed,
        config.progress,
    )
    metrics["top1"]["MRL from scratch on target"] = test_acc(scratch)
    fr = metrics["top1"]["MRL backbone, frozen"]
    ff = metrics["top1"]["ordinary backbone, frozen, truncated"]
    notes = [
        f"source: {source.name} ({len(source.y_train)} training images); target: {target.name}, "
        f"{len(target.y_train)} labelled training images, {len(target.y_test)} test images",
        f"frozen MRL at m={nesting[0]}: {100 * fr[0]:.1f}% vs ordinary backbone truncated "  # type: ignore[operator]
        f"{100 * ff[0]:.1f}%; at m={nesting.dim}: {100 * fr[-1]:.1f}% vs {100 * ff[-1]:.1f}%",  # type: ignore[operator]
    ]
    results = {
        "task": f"Transfer: {source.name} -> {target.name}",
        "sizes": list(nesting),
        "metrics": metrics,
        "metric_labels": {"top1": "target test top-1"},
        "notes": notes,
        "meta": {"config": config_to_dict(config)},
    }
    return finish(results, out, t0)
