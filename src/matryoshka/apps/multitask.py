"""Multi-task MRL: one nested representation, a Matryoshka head per task, losses summed over
tasks and sizes with weights.

``loss = sum_t w_t * sum_l c_l * CE(head_t,l(z[:, :m_l]), y_t)``: task weights ``w_t`` times the
nesting's size weights ``c_l``. Two data sets (``data``):

* ``mnist``: a CNN on the bundled MNIST subset with digit class, parity and "digit >= 5" heads.
* ``wordnet``: frozen all-MiniLM-L6-v2 embeddings (384-d) of WordNet 3.0 definitions into a
  trainable MLP trunk, with part-of-speech (4-way, or 5-way ``ss_type`` that keeps adjective
  satellites apart) and lexicographer-category (45-way) heads, on a seeded 80/10/10 synset split.

The recipe reports test accuracy per task per size beside one single-task MRL model per task
(same trunk, same budget) and, with ``ordinary_baseline``, the same multi-task model trained at
full size only, its embedding truncated and new heads fit per size on the frozen trunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from matryoshka.apps.common import check_positive, config_to_dict, finish, make_nesting
from matryoshka.backbones import create_backbone
from matryoshka.backbones.mlp import MLP
from matryoshka.config import help_field
from matryoshka.data.images import load_mnist_subset
from matryoshka.data.wordnet import LEXNAMES, POS_NAMES, Synset
from matryoshka.evaluation.image import embed
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.classifier import backbone_dim
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.training.image import seed_everything
from matryoshka.training.loop import fit

__all__ = [
    "DATASETS",
    "DIGIT_TASKS",
    "SS_TYPES",
    "WORDNET_TASKS",
    "MultiTaskConfig",
    "MultiTaskLoss",
    "MultiTaskLossOutput",
    "MultiTaskModel",
    "TaskData",
    "digit_task_data",
    "load_task_data",
    "run_multitask",
    "wordnet_labels",
    "wordnet_task_data",
]

#: Label functions of the digit tasks: digit ``(N,)`` -> task label ``(N,)``, and class counts.
DIGIT_TASKS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "digit": (lambda y: y, 10),
    "parity": (lambda y: y % 2, 2),
    "high": (lambda y: (y >= 5).long(), 2),
}

#: Synset type of wndb(5): noun, verb, adjective, adjective satellite, adverb.
SS_TYPES: tuple[str, ...] = ("n", "v", "a", "s", "r")

#: Class names of the WordNet tasks (labels index into them): ``pos`` is the loader's coarse part
#: of speech (satellites count as ``a``), ``ss_type`` keeps satellites apart, ``lexname`` is the
#: lexicographer category.
WORDNET_TASKS: dict[str, tuple[str, ...]] = {
    "pos": POS_NAMES,
    "ss_type": SS_TYPES,
    "lexname": LEXNAMES,
}

#: ``data`` -> (its tasks, the default tasks, the default backbone).
DATASETS: dict[str, tuple[tuple[str, ...], list[str], str]] = {
    "mnist": (tuple(DIGIT_TASKS), ["digit", "parity", "high"], "cnn"),
    "wordnet": (tuple(WORDNET_TASKS), ["pos", "lexname"], "mlp"),
}

#: Cache key under which the embeddings of all 117,659 definitions (file order) are stored; the
#: retrieval benchmark uses the same key, so one encoding serves both.
ALL_DEFINITIONS_KEY = "wordnet/all/definitions"


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


class TaskData(NamedTuple):
    """Inputs and per-task labels of one multi-task data set.

    ``x_train``: ``(N, ...)`` inputs (images ``(N, 1, 28, 28)`` or vectors ``(N, D)``);
    ``y_train``: ``{task: (N,)}`` int64 labels; likewise for the test split; ``num_classes``:
    ``{task: C_task}``.
    """

    name: str
    x_train: torch.Tensor
    y_train: dict[str, torch.Tensor]
    x_test: torch.Tensor
    y_test: dict[str, torch.Tensor]
    num_classes: dict[str, int]


def digit_task_data(tasks: Sequence[str], seed: int = 0) -> TaskData:
    """The bundled MNIST subset with the labels of ``tasks`` (keys of :data:`DIGIT_TASKS`)."""
    data = load_mnist_subset(seed=seed)
    return TaskData(
        name="the MNIST subset",
        x_train=data.x_train,
        y_train={t: DIGIT_TASKS[t][0](data.y_train) for t in tasks},
        x_test=data.x_test,
        y_test={t: DIGIT_TASKS[t][0](data.y_test) for t in tasks},
        num_classes={t: DIGIT_TASKS[t][1] for t in tasks},
    )


def wordnet_labels(synsets: Sequence[Synset], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{task: (N,)}`` int64 labels of ``synsets`` for ``tasks`` (keys of
    :data:`WORDNET_TASKS`)."""
    unknown = [t for t in tasks if t not in WORDNET_TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown} are not WordNet tasks: pick from {list(WORDNET_TASKS)}.")
    out: dict[str, torch.Tensor] = {}
    for t in tasks:
        index = {name: i for i, name in enumerate(WORDNET_TASKS[t])}
        if t == "pos":
            labels = [index[s.pos] for s in synsets]
        elif t == "ss_type":
            labels = [index["s" if s.satellite else s.pos] for s in synsets]
        else:
            labels = [index[s.lexname] for s in synsets]
        out[t] = torch.tensor(labels, dtype=torch.int64)
    return out


def wordnet_task_data(
    tasks: Sequence[str],
    root: str | Path = "/usr/share/wordnet",
    seed: int = 0,
    fraction: float = 1.0,
    text_model: str | None = None,
    cache_dir: str | Path = ".cache/embeddings",
    progress: bool = True,
) -> TaskData:
    """Frozen sentence embeddings of WordNet definitions with the labels of ``tasks``.

    The synsets are split ``train/val/test = 0.8/0.1/0.1`` of ``fraction`` of them by
    :func:`~matryoshka.data.wordnet.split_synsets` with ``seed`` (val is left unused: the recipe
    selects nothing). With ``fraction == 1`` every definition is embedded under the key
    ``wordnet/all/definitions`` (shared with the retrieval benchmark, so a cached run reuses it);
    otherwise only the chosen synsets are. ``x_*`` are ``(N, D)`` unit-norm float32
    (``D = 384`` for the default all-MiniLM-L6-v2).
    """
    from matryoshka.data.wordnet import load_synsets, split_synsets
    from matryoshka.models.text_encoder import TextEncoder, encode_cached

    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"fraction={fraction} must be in (0, 1]: the share of WordNet's synsets to use."
        )
    synsets = load_synsets(root)
    split = split_synsets(
        synsets, seed, {"train": 0.8 * fraction, "val": 0.1 * fraction, "test": 0.1 * fraction}
    )
    train, test = split["train"], split["test"]
    if not train or not test:
        raise ValueError(
            f"fraction={fraction} leaves {len(train)} training and {len(test)} test synsets: "
            "raise fraction so both splits are non-empty."
        )
    encoder = TextEncoder(text_model)
    if fraction == 1.0:
        row = {s.id: i for i, s in enumerate(synsets)}
        x = encode_cached(
            [s.definition for s in synsets],
            encoder,
            cache_dir,
            key=ALL_DEFINITIONS_KEY,
            progress=progress,
        )
        x_train, x_test = (x[[row[s.id] for s in part]] for part in (train, test))
    else:
        x = encode_cached(
            [s.definition for s in (*train, *test)],
            encoder,
            cache_dir,
            key=f"wordnet/multitask/s{seed}/f{fraction:g}/definitions",
            progress=progress,
        )
        x_train, x_test = x[: len(train)], x[len(train) :]
    return TaskData(
        name=f"WordNet definitions ({encoder.name} embeddings, frozen)",
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=wordnet_labels(train, tasks),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=wordnet_labels(test, tasks),
        num_classes={t: len(WORDNET_TASKS[t]) for t in tasks},
    )


@dataclass
class MultiTaskConfig:
    """Multi-task recipe on the MNIST subset or WordNet definitions. Every field is a CLI flag
    and a YAML key."""

    data: str = help_field(f"data set, one of {sorted(DATASETS)}", default="mnist")
    tasks: list[str] | None = help_field(
        "tasks; mnist: digit, parity, high (default all); wordnet: pos, ss_type, lexname "
        "(default pos, lexname)",
        default=None,
    )
    task_weights: list[float] | None = help_field(
        "one loss weight per task (default all 1)", default=None
    )
    backbone: str | None = help_field(
        "registered backbone (default cnn for mnist; wordnet takes only mlp)", default=None
    )
    backbone_width: int | None = help_field(
        "channel width of the cnn (default 16) / hidden width of the mlp (default 256)",
        default=None,
    )
    embed_dim: int = help_field("embedding size d", default=64)
    nesting_start: int = help_field("first size of the doubling ladder", default=2)
    epochs: int = help_field("training epochs", default=6)
    batch_size: int = help_field("examples per step", default=128)
    lr: float = help_field("peak AdamW learning rate", default=3e-3)
    single_task_baselines: bool = help_field(
        "also train one single-task MRL model per task", default=True
    )
    ordinary_baseline: bool = help_field(
        "also train the multi-task model at full size only, then fit new heads on its "
        "truncated embedding",
        default=False,
    )
    wordnet_root: str = help_field(
        "folder of WordNet's data.{noun,verb,adj,adv} (data=wordnet)", default="/usr/share/wordnet"
    )
    wordnet_fraction: float = help_field(
        "share of the synsets to use, split 80/10/10 (data=wordnet)", default=1.0
    )
    text_model: str | None = help_field(
        "sentence-transformers model (default: the bundled all-MiniLM-L6-v2; data=wordnet)",
        default=None,
    )
    cache_dir: str = help_field(
        "embedding cache folder (data=wordnet)", default=".cache/embeddings"
    )
    seed: int = help_field("seed of split, init and batches", default=0)
    out_dir: str = help_field("report folder", default="runs/app_multitask")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} is not one of {sorted(DATASETS)}.")
        known, default_tasks, default_backbone = DATASETS[self.data]
        if self.tasks is None:
            self.tasks = list(default_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks={self.tasks} must be a non-empty list from {list(known)} "
                f"(the tasks of data={self.data!r})."
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks={self.tasks} repeats a task.")
        if self.task_weights is not None and len(self.task_weights) != len(self.tasks):
            raise ValueError(
                f"task_weights={self.task_weights} has {len(self.task_weights)} entries but "
                f"tasks={self.tasks} has {len(self.tasks)}: give one weight per task."
            )
        if self.backbone is None:
            self.backbone = default_backbone
        if self.data == "wordnet" and self.backbone != "mlp":
            raise ValueError(
                f"backbone={self.backbone!r} cannot read data='wordnet' (sentence-embedding "
                "vectors): use backbone='mlp'."
            )
        if self.backbone_width is None and self.backbone.startswith("cnn"):
            self.backbone_width = 16
        if self.backbone_width is not None:
            check_positive(self, "backbone_width")
        if not 0.0 < self.wordnet_fraction <= 1.0:
            raise ValueError(
                f"wordnet_fraction={self.wordnet_fraction} must be in (0, 1]: the share of "
                "WordNet's synsets to use (1 for all)."
            )
        check_positive(self, "embed_dim", "nesting_start", "epochs", "batch_size")
        make_nesting(self.embed_dim, self.nesting_start)

    def task_list(self) -> list[str]:
        """The tasks (resolved from the data set's defaults when not given)."""
        assert self.tasks is not None  # set in __post_init__
        return list(self.tasks)

    def weights(self) -> dict[str, float]:
        """``{task: weight}``."""
        tasks = self.task_list()
        ws = self.task_weights or [1.0] * len(tasks)
        return dict(zip(tasks, ws, strict=True))


def load_task_data(config: MultiTaskConfig) -> TaskData:
    """The data set ``config.data`` with the labels of ``config.tasks``."""
    if config.data == "wordnet":
        return wordnet_task_data(
            config.task_list(),
            config.wordnet_root,
            config.seed,
            config.wordnet_fraction,
            config.text_model,
            config.cache_dir,
            config.progress,
        )
    return digit_task_data(config.task_list(), config.seed)


def _backbone(config: MultiTaskConfig, data: TaskData) -> nn.Module:
    """A fresh trunk ``(B, ...) -> (B, embed_dim)`` for ``data``'s inputs."""
    assert config.backbone is not None  # set in __post_init__
    if data.x_train.dim() == 2:  # vectors: an MLP over their D features
        hidden = config.backbone_width or 256
        return MLP(int(data.x_train.shape[1]), config.embed_dim, hidden)
    kw: dict[str, Any] = {"embed_dim": config.embed_dim, "in_channels": data.x_train.shape[1]}
    if config.backbone_width is not None and config.backbone.startswith(("cnn", "mlp")):
        kw["width"] = config.backbone_width
    return create_backbone(config.backbone, **kw)


def _fit_model(
    config: MultiTaskConfig,
    model: MultiTaskModel,
    weights: Mapping[str, float],
    x: torch.Tensor,
    y: Mapping[str, torch.Tensor],
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    params: Any,
    desc: str,
) -> None:
    """Minimise the multi-task loss of ``forward(x[idx])`` against ``y`` over ``params``."""
    loss_fn = MultiTaskLoss(model.nesting, weights)

    def step(idx: torch.Tensor) -> torch.Tensor:
        model.train()
        return loss_fn(forward(x[idx]), {t: y[t][idx] for t in weights}).loss

    fit(
        params,
        step,
        len(x),
        config.epochs,
        config.batch_size,
        config.lr,
        seed=config.seed,
        progress=config.progress,
        desc=desc,
    )
    model.eval()


def _accuracy(
    logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
) -> dict[str, list[float]]:
    """``{task: (L, N, C)}, {task: (N,)} -> {task: [top-1 per size]}``."""
    return {
        t: (out.argmax(-1) == targets[t]).double().mean(1).tolist() for t, out in logits.items()
    }


def _train_and_eval(
    config: MultiTaskConfig,
    tasks: Sequence[str],
    weights: Mapping[str, float],
    data: TaskData,
    nesting: Nesting,
    desc: str,
) -> dict[str, list[float]]:
    """Train one model on ``tasks`` at every size of ``nesting``; test accuracy
    ``{task: [one per size]}``."""
    seed_everything(config.seed)
    model = MultiTaskModel(
        _backbone(config, data), {t: data.num_classes[t] for t in tasks}, nesting
    )
    w = {t: weights[t] for t in tasks}
    _fit_model(config, model, w, data.x_train, data.y_train, model, model.parameters(), desc)
    with torch.no_grad():
        return _accuracy(model(data.x_test), data.y_test)


def _ordinary_truncated(
    config: MultiTaskConfig,
    tasks: Sequence[str],
    weights: Mapping[str, float],
    data: TaskData,
    nesting: Nesting,
) -> dict[str, list[float]]:
    """The ordinary baseline: train at full size only (``Nesting([d])``), freeze the trunk, and
    fit new heads for every size of ``nesting`` on its truncated embedding."""
    seed_everything(config.seed)
    full = Nesting([nesting.dim])
    n_classes = {t: data.num_classes[t] for t in tasks}
    model = MultiTaskModel(_backbone(config, data), n_classes, full)
    w = {t: weights[t] for t in tasks}
    _fit_model(config, model, w, data.x_train, data.y_train, model, model.parameters(), "ordinary")
    z_train = torch.from_numpy(embed(model.backbone, data.x_train))  # (N, d), frozen
    z_test = torch.from_numpy(embed(model.backbone, data.x_test))
    seed_everything(config.seed)
    probe = MultiTaskModel(model.backbone, n_classes, nesting)
    _fit_model(
        config,
        probe,
        w,
        z_train,
        data.y_train,
        probe.forward_heads,
        probe.heads.parameters(),
        "ordinary: new heads",
    )
    with torch.no_grad():
        return _accuracy(probe.forward_heads(z_test), data.y_test)


def run_multitask(config: MultiTaskConfig) -> dict[str, Any]:
    """Train the multi-task model (and the baselines); write the report to ``config.out_dir``;
    return the results dict."""
    t0 = time.perf_counter()
    tasks = config.task_list()
    data = load_task_data(config)
    t_data = time.perf_counter() - t0
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    weights = config.weights()
    multi = _train_and_eval(config, tasks, weights, data, nesting, "multi-task")
    metrics: dict[str, dict[str, list[Any]]] = {
        f"top1_{t}": {"multi-task MRL": list(multi[t])} for t in tasks
    }
    if config.single_task_baselines and len(tasks) > 1:
        for t in tasks:
            single = _train_and_eval(config, [t], {t: 1.0}, data, nesting, f"single {t}")
            metrics[f"top1_{t}"][f"single-task MRL ({t})"] = list(single[t])
    if config.ordinary_baseline:
        ordinary = _ordinary_truncated(config, tasks, weights, data, nesting)
        for t in tasks:
            metrics[f"top1_{t}"]["ordinary multi-task, truncated + new heads"] = list(ordinary[t])
    trunk = (
        f"an MLP trunk ({data.x_train.shape[1]} -> {config.backbone_width or 256} -> "
        f"{config.backbone_width or 256} -> {config.embed_dim})"
        if data.x_train.dim() == 2
        else f"one {config.backbone} backbone"
    )
    notes = [
        f"{trunk}, d={config.embed_dim}, heads for {tasks} with task weights {weights}; every "
        f"size of every task trained jointly; {len(data.x_train)} training and "
        f"{len(data.x_test)} test examples",
    ]
    for t in tasks:
        majority = float(torch.bincount(data.y_test[t]).max()) / len(data.y_test[t])
        by_method = [
            f"{method} {100 * accs[0]:.1f}% / {100 * accs[-1]:.1f}%"
            for method, accs in metrics[f"top1_{t}"].items()
        ]
        notes.append(
            f"{t} ({data.num_classes[t]} classes, majority class {100 * majority:.1f}%), top-1 "
            f"at m={nesting[0]} / m={nesting.dim}: " + "; ".join(by_method)
        )
    results = {
        "task": f"Multi-task MRL on {data.name}",
        "sizes": list(nesting),
        "metrics": metrics,
        "metric_labels": {f"top1_{t}": f"test top-1, task '{t}'" for t in tasks},
        "notes": notes,
        "meta": {
            "config": config_to_dict(config),
            "train_examples": len(data.x_train),
            "test_examples": len(data.x_test),
            "data_seconds": round(t_data, 1),
        },
    }
    return finish(results, config.out_dir, t0)
