"""Multi-task MRL: one nested representation, a Matryoshka head per task, losses summed over
tasks and sizes with weights.

``loss = sum_t w_t * sum_l c_l * CE(head_t,l(z[:, :m_l]), y_t)``: task weights ``w_t`` times the
nesting's size weights ``c_l``. The recipe trains digit class, parity and "digit >= 5" on the
bundled MNIST subset and reports accuracy per task per size, beside one single-task MRL model per
task (same backbone, same budget).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from matryoshka.apps.common import (
    check_positive,
    config_to_dict,
    finish,
    fit,
    help_field,
    make_nesting,
)
from matryoshka.backbones import create_backbone
from matryoshka.data.images import load_mnist_subset
from matryoshka.heads import MatryoshkaHead
from matryoshka.losses import MatryoshkaLoss
from matryoshka.models import backbone_dim
from matryoshka.nesting import Nesting
from matryoshka.train import seed_everything

__all__ = [
    "DIGIT_TASKS",
    "MultiTaskConfig",
    "MultiTaskLoss",
    "MultiTaskLossOutput",
    "MultiTaskModel",
    "run_multitask",
]

#: Label functions of the digit tasks: digit ``(N,)`` -> task label ``(N,)``, and class counts.
DIGIT_TASKS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "digit": (lambda y: y, 10),
    "parity": (lambda y: y % 2, 2),
    "high": (lambda y: (y >= 5).long(), 2),
}


class MultiTaskModel(nn.Module):
    """``backbone`` (``(B, ...) -> (B, d)``) and one :class:`MatryoshkaHead` per task.

    ``forward(x)`` returns ``{task: (L, B, C_task)}`` logits for every size of ``nesting``.
    """

    def __init__(
        self, backbone: nn.Module, tasks: Mapping[str, int], nesting: Nesting, tied: bool = False
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("tasks={} is empty: give at least one {name: num_classes}.")
        dim = backbone_dim(backbone, nesting)
        self.backbone = backbone
        self.nesting = nesting
        self.heads = nn.ModuleDict(
            {t: MatryoshkaHead(dim, c, nesting, tied=tied) for t, c in tasks.items()}
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, d)``."""
        return self.backbone(x)

    def forward_heads(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, d) -> {task: (L, B, C_task)}``."""
        return {t: head(z) for t, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, ...) -> {task: (L, B, C_task)}``."""
        return self.forward_heads(self.backbone(x))


class MultiTaskLossOutput(NamedTuple):
    """``loss``: scalar (differentiable); ``per_task``: ``{task: (L,)}`` detached per-size losses."""

    loss: torch.Tensor
    per_task: dict[str, torch.Tensor]


class MultiTaskLoss(nn.Module):
    """``sum_t w_t * MatryoshkaLoss_t(logits[t], targets[t])``.

    Args:
        nesting: the ladder (its weights weigh the sizes within each task).
        task_weights: ``{task: w_t}``, non-negative, not all zero.
        base_losses: optional ``{task: (logits (B, C), target) -> scalar}``; cross-entropy where
            absent.
    """

    def __init__(
        self,
        nesting: Nesting,
        task_weights: Mapping[str, float],
        base_losses: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
        | None = None,
    ) -> None:
        super().__init__()
        if not task_weights:
            raise ValueError("task_weights={} is empty: give one weight per task.")
        for t, w in task_weights.items():
            if not float(w) >= 0.0 or float(w) == float("inf"):
                raise ValueError(f"task_weights[{t!r}]={w} must be a finite float >= 0.")
        if sum(float(w) for w in task_weights.values()) <= 0:
            raise ValueError(f"task_weights={dict(task_weights)} are all zero.")
        base_losses = dict(base_losses or {})
        unknown = sorted(set(base_losses) - set(task_weights))
        if unknown:
            raise ValueError(
                f"base_losses for unknown tasks {unknown}: tasks are {list(task_weights)}."
            )
        self.task_weights = {t: float(w) for t, w in task_weights.items()}
        self.losses = nn.ModuleDict(
            {t: MatryoshkaLoss(base_losses.get(t), nesting) for t in task_weights}
        )

    def forward(
        self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> MultiTaskLossOutput:
        """``{task: (L, B, C_t)}, {task: (B,)} -> (scalar, {task: (L,)})``."""
        missing = sorted(
            (set(self.task_weights) - set(logits)) | (set(self.task_weights) - set(targets))
        )
        if missing:
            raise ValueError(
                f"tasks {missing} have no logits or no targets: pass both for every task in "
                f"{list(self.task_weights)}."
            )
        total: torch.Tensor | None = None
        per_task: dict[str, torch.Tensor] = {}
        for t, w in self.task_weights.items():
            loss, per_size = self.losses[t](logits[t], targets[t])
            per_task[t] = per_size
            total = w * loss if total is None else total + w * loss
        assert total is not None  # at least one task (checked in __init__)
        return MultiTaskLossOutput(total, per_task)


@dataclass
class MultiTaskConfig:
    """Multi-task recipe on the bundled MNIST subset. Every field is a CLI flag and a YAML key."""

    tasks: list[str] = help_field(  # noqa: RUF009
        f"tasks, from {sorted(DIGIT_TASKS)}", default_factory=lambda: ["digit", "parity", "high"]
    )
    task_weights: list[float] | None = help_field(  # noqa: RUF009
        "one loss weight per task (default all 1)", default=None
    )
    backbone: str = help_field("registered backbone", default="cnn")
    backbone_width: int = help_field("channel width of the cnn backbone", default=16)
    embed_dim: int = help_field("embedding size d", default=64)
    nesting_start: int = help_field("first size of the doubling ladder", default=2)
    epochs: int = help_field("training epochs", default=6)
    batch_size: int = help_field("examples per step", default=128)
    lr: float = help_field("peak AdamW learning rate", default=3e-3)
    single_task_baselines: bool = help_field(
        "also train one single-task MRL model per task", default=True
    )
    seed: int = help_field("seed of split, init and batches", default=0)
    out_dir: str = help_field("report folder", default="runs/app_multitask")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in DIGIT_TASKS]
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks={self.tasks} must be a non-empty list from {sorted(DIGIT_TASKS)}."
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks={self.tasks} repeats a task.")
        if self.task_weights is not None and len(self.task_weights) != len(self.tasks):
            raise ValueError(
                f"task_weights={self.task_weights} has {len(self.task_weights)} entries but "
                f"tasks={self.tasks} has {len(self.tasks)}: give one weight per task."
            )
        check_positive(self, "embed_dim", "nesting_start", "epochs", "batch_size")
        make_nesting(self.embed_dim, self.nesting_start)

    def weights(self) -> dict[str, float]:
        """``{task: weight}``."""
        ws = self.task_weights or [1.0] * len(self.tasks)
        return dict(zip(self.tasks, ws, strict=True))


def _train_and_eval(
    config: MultiTaskConfig,
    tasks: Sequence[str],
    weights: Mapping[str, float],
    data: Any,
    nesting: Nesting,
    desc: str,
) -> dict[str, list[float]]:
    """Train one model on ``tasks``; test accuracy ``{task: [one per size]}``."""
    seed_everything(config.seed)
    kw: dict[str, Any] = {"embed_dim": config.embed_dim, "in_channels": data.input_shape[0]}
    if config.backbone_width and config.backbone.startswith("cnn"):
        kw["width"] = config.backbone_width
    n_classes = {t: DIGIT_TASKS[t][1] for t in tasks}
    model = MultiTaskModel(create_backbone(config.backbone, **kw), n_classes, nesting)
    loss_fn = MultiTaskLoss(nesting, {t: weights[t] for t in tasks})
    labels = {t: DIGIT_TASKS[t][0](data.y_train) for t in tasks}

    def step(idx: torch.Tensor) -> torch.Tensor:
        model.train()
        return loss_fn(model(data.x_train[idx]), {t: labels[t][idx] for t in tasks}).loss

    fit(
        model.parameters(),
        step,
        len(data.y_train),
        config.epochs,
        config.batch_size,
        config.lr,
        seed=config.seed,
        progress=config.progress,
        desc=desc,
    )
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
    return {
        t: (out[t].argmax(-1) == DIGIT_TASKS[t][0](data.y_test)).double().mean(1).tolist()
        for t in tasks
    }


def run_multitask(config: MultiTaskConfig) -> dict[str, Any]:
    """Train the multi-task model (and single-task baselines); write the report to
    ``config.out_dir``; return the results dict."""
    t0 = time.perf_counter()
    data = load_mnist_subset(seed=config.seed)
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    weights = config.weights()
    multi = _train_and_eval(config, config.tasks, weights, data, nesting, "multi-task")
    metrics: dict[str, dict[str, list[Any]]] = {
        f"top1_{t}": {"multi-task MRL": list(multi[t])} for t in config.tasks
    }
    if config.single_task_baselines and len(config.tasks) > 1:
        for t in config.tasks:
            single = _train_and_eval(config, [t], {t: 1.0}, data, nesting, f"single {t}")
            metrics[f"top1_{t}"][f"single-task MRL ({t})"] = list(single[t])
    notes = [
        f"one {config.backbone} backbone, d={config.embed_dim}, heads for {config.tasks} with "
        f"task weights {weights}; every size of every task trained jointly",
    ]
    for t in config.tasks:
        accs = multi[t]
        notes.append(
            f"{t}: multi-task top-1 {100 * accs[0]:.1f}% at m={nesting[0]}, "
            f"{100 * accs[-1]:.1f}% at m={nesting.dim}"  # type: ignore[operator]
        )
    results = {
        "task": "Multi-task MRL on the MNIST subset",
        "sizes": list(nesting),
        "metrics": metrics,
        "metric_labels": {f"top1_{t}": f"test top-1, task '{t}'" for t in config.tasks},
        "notes": notes,
        "meta": {"config": config_to_dict(config), "test_examples": len(data.y_test)},
    }
    return finish(results, config.out_dir, t0)
