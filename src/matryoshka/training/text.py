"""Fine-tune a text encoder with the Matryoshka loss inside sentence-transformers' trainer.

    mrl train --config configs/text_wordnet_mrl.yaml        # WordNet pairs (the default data)
    mrl train --config configs/text_own_data.yaml           # your pairs: data: pairs.jsonl
    mrl train --config ... --resume                         # continue an interrupted run
    mrl eval --run runs/text_mrl [--beir FOLDER]            # per-size retrieval

:func:`train_text` runs ``SentenceTransformerTrainer`` with
:class:`~matryoshka.losses.sentence_transformers.FusedMatryoshkaLoss` over the recipe's
``sizes`` (``MatryoshkaLoss(MultipleNegativesRankingLoss)`` in one fused pass;
``matryoshka: false`` trains the full size only, the baseline that is truncated afterwards), so
checkpoints, resuming, bf16 on CUDA and ``torchrun`` / ``accelerate launch`` are the trainer's.
The pairs are the recipe's ``data`` (a JSONL / CSV / Parquet file or a saved ``datasets``
folder, :func:`~matryoshka.data.pairs.load_pairs`), or WordNet (definition, lemmas) pairs from a
seeded share of the synsets when ``data`` is absent. ``eval_data`` (pairs, or a BEIR folder's
``dev`` split) is scored per size at every checkpoint and at the end.

The run folder holds ``model/`` (a plain sentence-transformers folder: ``SentenceTransformer(path)``
loads it without this package; its README.md model card names the loss and the sizes),
``text_model.json`` (config, loss, sizes, data, timings) and, only while a run is unfinished,
``checkpoints/``. The 2D recipe (``layers:``) keeps the hand-written loop :func:`finetune`: its
loss reads every layer's pooled output, which a sentence-transformers loss does not see.

Data flows one way: this module imports no evaluation code (the evaluation fine-tunes with
:func:`finetune` as a baseline, so it imports this module).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka.config import from_dict
from matryoshka.io import atomic_write_bytes
from matryoshka.training.text_options import (
    WordnetTextOptions,
    check_sizes_match_model,
    check_text_options,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from matryoshka.data.wordnet import Synset
    from matryoshka.losses.distill import MatryoshkaDistillLoss
    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

__all__ = [
    "CHECKPOINTS",
    "OBJECTIVES",
    "TEXT_MODEL_FILE",
    "TEXT_MODEL_FORMAT",
    "DistillOptions",
    "TextTrainConfig",
    "add_rotation",
    "build_distill_loss",
    "build_loss",
    "distill",
    "finetune",
    "freeze_all_but_last",
    "latest_checkpoint",
    "pca_rotation",
    "sample_pairs",
    "teacher_labels",
    "train_text",
]

#: The metadata file that marks a run folder as a fine-tuned text model.
TEXT_MODEL_FILE = "text_model.json"
#: ``format`` of :data:`TEXT_MODEL_FILE`.
TEXT_MODEL_FORMAT = "matryoshka.text_model/1"
#: The trainer's checkpoint folder inside a run folder (removed once the run has finished).
CHECKPOINTS = "checkpoints"
#: The values of ``objective``: the Matryoshka loss on pairs, or self-distillation on texts.
OBJECTIVES = ("contrastive", "distill")


@dataclass
class TextTrainConfig(WordnetTextOptions):
    """Options of :func:`train_text` (YAML keys; ``task: text`` routes ``mrl train`` here).

    Validated on construction; :meth:`from_dict` reads a YAML recipe's mapping.
    """

    task: str = field(
        default="text",
        metadata={"help": "must be 'text' (tells `mrl train` this is a text recipe)"},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "sentence-transformers model name or path (default: the bundled all-MiniLM-L6-v2)"
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "your training pairs: a .jsonl/.csv/.parquet file or a Dataset.save_to_disk "
            "folder with (anchor, positive[, negative]) columns; absent: WordNet pairs"
        },
    )
    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "the data's columns to use as (anchor, positive[, negative...]), e.g. "
            "[query, doc] (default: anchor, positive and negative if present)"
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "scored per size at each checkpoint: a pairs file like data (same columns) "
            "or a BEIR folder (its qrels/dev.tsv)"
        },
    )
    matryoshka: bool = field(
        default=True,
        metadata={
            "help": "train every size with the fused Matryoshka loss (false: full size only)"
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step (in-batch negatives)"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate"})
    temperature: float = field(
        default=0.05,
        metadata={"help": "softmax temperature on cosine similarities (the loss's scale is 1/t)"},
    )
    n_sizes_per_step: int | None = field(
        default=None,
        metadata={"help": "train a random subset of this many sizes each step (default: all)"},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "2D Matryoshka: also train these layers' pooled outputs (0-based, ending at "
            "the last layer, e.g. [1, 3, 5] for MiniLM)"
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "checkpoint (and score eval_data) every N steps (0: each epoch's end)"},
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "how many recent checkpoints to keep while training"}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue an interrupted run from the newest complete checkpoint in "
            "out_dir/checkpoints"
        },
    )
    out_dir: str = field(
        default="runs/text_mrl", metadata={"help": "run folder: model/ and text_model.json"}
    )
    wordnet_root: str = field(
        default="/usr/share/wordnet", metadata={"help": "WordNet data folder"}
    )
    objective: str = field(
        default="contrastive",
        metadata={
            "help": "contrastive: the Matryoshka loss on pairs; distill: unlabeled texts, every "
            "prefix keeps the frozen base model's similarity structure (self-distillation)",
            "choices": OBJECTIVES,
        },
    )
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "distill: the column of texts in a .jsonl/.csv/.parquet/datasets data "
            "(default: text); a .txt data file has one text per line"
        },
    )
    max_texts: int | None = field(
        default=None,
        metadata={"help": "distill: train on a seeded sample of at most this many texts"},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "contrastive: add this weight x the distillation term (prefix similarity "
            "structure + keep) of the frozen base model, so narrow pairs do not make it forget "
            "(0: off)"
        },
    )
    keep_weight: float = field(
        default=1.0,
        metadata={
            "help": "distillation term: weight of 1 - cos(full-size output, base model's output)"
        },
    )
    pairwise_weight: float = field(
        default=1.0,
        metadata={"help": "distillation term: weight of the pairwise prefix-cosine error"},
    )
    listwise_weight: float = field(
        default=1.0,
        metadata={"help": "distillation term: weight of the listwise neighbour KL"},
    )
    listwise_temperature: float = field(
        default=0.05, metadata={"help": "distillation term: softmax temperature of the KL"}
    )
    rotate: bool = field(
        default=True,
        metadata={
            "help": "distill: start the student from the uncentred PCA rotation of the "
            "teacher's embeddings (a Dense layer after pooling; same full-size cosines)"
        },
    )
    start_epochs: int = field(
        default=0,
        metadata={
            "help": "distill: fit the start rotation for N epochs as an orthogonal "
            "MatryoshkaAdaptor on the teacher's embeddings of the texts, from their PCA (0: the "
            "PCA rotation itself)"
        },
    )
    trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "train only the last N transformer layers (the rest, embeddings included, "
            "frozen; default: the whole model)"
        },
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "gradient caching: embed each batch this many texts at a time (memory of a "
            "mini-batch, loss over the whole batch; null: off)"
        },
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "share of the steps over which the learning rate warms up from 0"},
    )
    neighbour_group: int = field(
        default=1,
        metadata={
            "help": "distill: fill each batch with groups of N texts that are neighbours under "
            "the teacher, cut afresh each epoch (1: random batches)"
        },
    )

    def __post_init__(self) -> None:
        self._check_objective()
        if self.task != "text":
            raise ValueError(f"task={self.task!r} must be 'text' in a text training recipe.")
        check_text_options(
            self,
            ints=(
                ("train_pairs", 2),
                ("epochs", 1),
                ("batch_size", 2),
                ("seed", 0),
                ("checkpoint_every", 0),
                ("keep_checkpoints", 1),
                ("start_epochs", 0),
                ("neighbour_group", 1),
            ),
            floats=(("lr", 0.0, False), ("temperature", 0.0, False)),
        )
        n = self.n_sizes_per_step
        if n is not None and (
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.sizes)
        ):
            raise ValueError(
                f"n_sizes_per_step={n!r} must be null (every size) or an int in "
                f"[1, {len(self.sizes)}] (the recipe has {len(self.sizes)} sizes)."
            )
        if n is not None and not self.matryoshka:
            raise ValueError(
                f"n_sizes_per_step={n} with matryoshka: false: the plain baseline trains the full "
                "size only; drop n_sizes_per_step or set matryoshka: true."
            )
        layers = self.layers
        if layers is not None and (
            not isinstance(layers, list)
            or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers)
            or layers != sorted(set(layers))
        ):
            raise ValueError(
                f"layers={layers!r} must be null or increasing 0-based layer indices ending at "
                "the model's last layer, e.g. [1, 3, 5] for MiniLM's 6 layers."
            )
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"{name}={value!r} must be a path (a non-empty string), e.g. pairs.jsonl."
                )
        if self.columns is not None and self.data is None:
            raise ValueError(
                f"columns={self.columns!r} needs data: name your pairs file with data: "
                "(WordNet pairs have fixed columns), or drop columns."
            )
        if layers is not None and self.eval_data is not None:
            raise ValueError(
                f"eval_data={self.eval_data!r} with layers={layers}: the 2D loop scores no "
                "evaluation set while training; drop eval_data (mrl eval scores the run after)."
            )

    def _check_objective(self) -> None:
        """Validate ``objective`` and the options that go with it."""
        if self.objective not in OBJECTIVES:
            close = difflib.get_close_matches(str(self.objective), OBJECTIVES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"objective={self.objective!r} is not one of {list(OBJECTIVES)}: {hint}use "
                "contrastive for (anchor, positive) pairs or distill for unlabeled texts."
            )
        for name, example in (
            ("distill_weight", "0.5"),
            ("keep_weight", "1.0"),
            ("pairwise_weight", "1.0"),
            ("listwise_weight", "1.0"),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"{name}={v!r} must be a float >= 0, e.g. {example}.")
        t = self.listwise_temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(f"listwise_temperature={t!r} must be a positive float, e.g. 0.05.")
        w = self.warmup_ratio
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < 1:
            raise ValueError(
                f"warmup_ratio={w!r} must be a share of the steps in [0, 1), e.g. 0.1."
            )
        for name, low in (("max_texts", 2), ("trainable_layers", 1), ("mini_batch_size", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name}={v!r} must be null or an int >= {low}.")
        if self.text_column is not None and (
            not isinstance(self.text_column, str) or not self.text_column
        ):
            raise ValueError(f"text_column={self.text_column!r} must be a column name, e.g. text.")
        if self.objective == "distill":
            clashes = {
                "columns": (self.columns is not None, "name the column of texts with text_column"),
                "layers": (self.layers is not None, "the 2D loop trains pairs only"),
                "n_sizes_per_step": (
                    self.n_sizes_per_step is not None,
                    "distillation scores every size each step",
                ),
                "matryoshka": (not self.matryoshka, "distillation trains every prefix"),
                "distill_weight": (
                    self.distill_weight > 0,
                    "objective: distill is the distillation term alone",
                ),
            }
            for name, (bad, why) in clashes.items():
                if bad:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} with objective: distill: {why}; drop "
                        f"{name} (or use objective: contrastive)."
                    )
        else:
            extra = {
                "text_column": self.text_column is not None,
                "max_texts": self.max_texts is not None,
                "neighbour_group": self.neighbour_group != 1,
            }
            if any(extra.values()):
                name = next(n for n, bad in extra.items() if bad)
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is for objective: distill (unlabeled "
                    "texts); drop it, or set objective: distill."
                )
            if self.mini_batch_size is not None and (
                self.distill_weight > 0 or self.layers is not None
            ):
                why = "distill_weight" if self.distill_weight > 0 else "layers"
                raise ValueError(
                    f"mini_batch_size={self.mini_batch_size} with {why}: gradient caching "
                    f"needs the plain contrastive or the distill loss; drop one of them."
                )
            if self.distill_weight > 0 and self.layers is not None:
                raise ValueError(
                    f"distill_weight={self.distill_weight} with layers: the 2D loop has no "
                    "distillation term; drop one of them."
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextTrainConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys are an error naming them."""
        return from_dict(cls, data)


# --- the loss and the trainer ---------------------------------------------------------------------


def build_loss(
    model: SentenceTransformer,
    sizes: Sequence[int],
    matryoshka: bool = True,
    temperature: float = 0.05,
    n_sizes_per_step: int | None = None,
    mini_batch_size: int | None = None,
) -> FusedMatryoshkaLoss:
    """The recipe's loss: :class:`FusedMatryoshkaLoss` over ``sizes`` (``matryoshka=False``: the
    largest size alone, i.e. MultipleNegativesRankingLoss), ``scale = 1 / temperature``,
    ``n_dims_per_step = n_sizes_per_step`` (``None``: every size, ``-1``), gradient caching
    with ``mini_batch_size`` (``None``: off)."""
    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss

    dims = list(sizes) if matryoshka else [max(sizes)]
    return FusedMatryoshkaLoss(
        model,
        dims,
        n_dims_per_step=-1 if n_sizes_per_step is None else n_sizes_per_step,
        scale=1.0 / temperature,
        mini_batch_size=mini_batch_size,
    )


@dataclass(frozen=True)
class DistillOptions:
    """The distillation term's weights (:class:`~matryoshka.losses.distill.MatryoshkaDistillLoss`)."""

    keep_weight: float = 1.0
    pairwise_weight: float = 1.0
    listwise_weight: float = 1.0
    listwise_temperature: float = 0.05

    @classmethod
    def of(cls, config: TextTrainConfig) -> DistillOptions:
        """The options of a recipe."""
        return cls(
            config.keep_weight,
            config.pairwise_weight,
            config.listwise_weight,
            config.listwise_temperature,
        )


def build_distill_loss(
    model: SentenceTransformer,
    sizes: Sequence[int],
    options: DistillOptions = DistillOptions(),
    mini_batch_size: int | None = None,
    weights: Sequence[float] | None = None,
) -> MatryoshkaDistillLoss:
    """:class:`~matryoshka.losses.distill.MatryoshkaDistillLoss` over ``sizes`` (one of
    ``weights`` each; default all 1) with ``options`` (gradient caching with
    ``mini_batch_size``; ``None``: off)."""
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    return MatryoshkaDistillLoss(
        model,
        list(sizes),
        None if weights is None else list(weights),
        keep_weight=options.keep_weight,
        pairwise_weight=options.pairwise_weight,
        listwise_weight=options.listwise_weight,
        temperature=options.listwise_temperature,
        mini_batch_size=mini_batch_size,
    )


def freeze_all_but_last(model: SentenceTransformer, n: int | None) -> None:
    """Train only the last ``n`` transformer layers of ``model`` (``None``: all of it): every
    other parameter, the token embeddings included, gets ``requires_grad = False`` (the trainer's
    optimizer skips them and backward stops below the first trained layer)."""
    if n is None:
        return
    auto = model[0].auto_model
    blocks = getattr(getattr(auto, "encoder", None), "layer", None)
    if blocks is None:
        raise ValueError(
            f"trainable_layers={n}: {type(auto).__name__} has no encoder.layer list of "
            "transformer blocks (a BERT-style model); drop trainable_layers to train it whole."
        )
    if n > len(blocks):
        raise ValueError(
            f"trainable_layers={n} but the model has {len(blocks)} transformer layers: pass at "
            f"most {len(blocks)} (or null for the whole model)."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - n :]:
        for p in block.parameters():
            p.requires_grad_(True)


def pca_rotation(embeddings: np.ndarray) -> np.ndarray:
    """The uncentred PCA rotation of unit rows ``(n, d) -> (d, d)``: ``x R`` has the same
    cosines as ``x`` and its prefixes are the best rank-``m`` inner-product approximations
    (with fewer rows than dimensions the basis is completed)."""
    x = embeddings.astype(np.float64)
    _, _, vh = np.linalg.svd(x, full_matrices=x.shape[0] < x.shape[1])
    return np.ascontiguousarray(vh.T.astype(np.float32))  # (d, d)


def add_rotation(model: SentenceTransformer, rotation: np.ndarray) -> None:
    """Insert a bias-free, identity-activation ``Dense`` layer ``y = x R`` (``R (d, d)``) into
    ``model`` after pooling (before its ``Normalize``, if any), in place: the saved folder is
    still a plain sentence-transformers model."""
    import collections

    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    d = rotation.shape[0]
    dense = Dense(
        d,
        d,
        bias=False,
        activation_function=torch.nn.Identity(),
        init_weight=torch.from_numpy(rotation.T.copy()),  # Dense computes x W^T
    ).to(model.device)
    mods = list(model._modules.values())
    at = next((i for i, m in enumerate(mods) if isinstance(m, Normalize)), len(mods))
    mods.insert(at, dense)
    model._modules = collections.OrderedDict((str(i), m) for i, m in enumerate(mods))


def _no_dropout(model: SentenceTransformer) -> None:
    """Switch dropout off in ``model`` (the teacher's targets are exact; dropout would only add
    noise to the student's side of every term)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _distill_start(
    model: SentenceTransformer,
    labels: np.ndarray,
    rotate: bool,
    nesting: Nesting | None = None,
    start_epochs: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Prepare the student (dropout off; with ``rotate`` a rotation of the teacher's embeddings
    ``labels (n, d)`` added) and return the targets ``(n, d)`` it must keep. The rotation is the
    uncentred PCA of ``labels``, or with ``start_epochs > 0`` an orthogonal
    :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` fitted on them for that many epochs
    from the same PCA (same full-size cosines, more nested prefixes)."""
    _no_dropout(model)
    if not rotate:
        return labels, {"rotation": None}
    if start_epochs > 0:
        from matryoshka.models.adaptor import MatryoshkaAdaptor

        if nesting is None:
            raise ValueError("start_epochs > 0 needs the nesting the rotation is fitted for.")
        adaptor = MatryoshkaAdaptor(
            nesting, epochs=start_epochs, orthogonal=True, seed=seed, progress=progress
        ).fit(labels)
        assert adaptor.net_ is not None
        rot = adaptor.net_.rotation.detach().numpy().astype(np.float32)
        what = (
            f"orthogonal MatryoshkaAdaptor fitted {start_epochs} epochs on the teacher's embeddings"
        )
    else:
        rot = pca_rotation(labels)
        what = "uncentred PCA of the teacher's embeddings of the texts"
    add_rotation(model, rot)
    return labels @ rot, {"rotation": what}


def teacher_labels(
    teacher: TextEncoder,
    columns: Sequence[Sequence[str]],
    cache_dir: str | Path,
    key: str,
    progress: bool = True,
) -> np.ndarray:
    """The teacher's unit embeddings of ``C`` equally long text columns, concatenated per row:
    ``C x N`` texts ``-> (N, C d)`` float32 (each distinct text encoded once, cached on disk)."""
    from matryoshka.models.text_encoder import encode_cached

    distinct = list(dict.fromkeys(t for col in columns for t in col))
    emb = encode_cached(distinct, teacher, cache_dir, key=key, progress=progress)  # (U, d)
    row = {t: i for i, t in enumerate(distinct)}
    return np.concatenate([emb[[row[t] for t in col]] for col in columns], axis=1)


def _with_labels(dataset: Dataset, labels: np.ndarray) -> Dataset:
    """``dataset`` plus a last ``label`` column of ``labels (N, w)`` rows."""
    return dataset.add_column("label", labels.tolist())  # type: ignore[arg-type]


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _use_bf16() -> bool:
    """bf16 mixed precision where it is real: a CUDA device that supports it; never on CPU."""
    import torch

    return bool(_cuda() and torch.cuda.is_bf16_supported())


def _training_arguments(
    output_dir: str | Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    save: bool,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    evaluate: bool = False,
    warmup_ratio: float = 0.0,
    batch_sampler: Any = None,
) -> Any:
    """``SentenceTransformerTrainingArguments`` for one run (linear decay after ``warmup_ratio``
    of the steps of linear warm-up); checkpoints (``save``) every
    ``checkpoint_every`` steps, or at each epoch's end when it is 0, and the evaluator (``evaluate``)
    at the same times. Batches hold no duplicate texts (a duplicate would be a false negative);
    bf16 on a CUDA device that supports it."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    strategy = "steps" if checkpoint_every else "epoch"
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        **_warmup(warmup_ratio),
        seed=seed,
        data_seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES if batch_sampler is None else batch_sampler,
        save_strategy=strategy if save else "no",
        save_steps=checkpoint_every or 500,
        save_total_limit=keep_checkpoints,
        eval_strategy=strategy if evaluate else "no",
        eval_steps=checkpoint_every or None,
        logging_strategy="steps" if progress else "no",
        logging_steps=max(1, checkpoint_every or 50),
        report_to="none",
        disable_tqdm=not progress,
        bf16=_use_bf16(),
        dataloader_pin_memory=_cuda(),
        use_cpu=_cpu_processes(),
    )


def _neighbour_sampler(group: int) -> Any:
    """The trainer's ``batch_sampler`` for batches of ``group`` teacher neighbours (``None``,
    the default sampler, for 1)."""
    if group == 1:
        return None
    from matryoshka.training.neighbours import NeighbourBatchSampler

    return functools.partial(NeighbourBatchSampler, group=group)


def _cpu_processes() -> bool:
    """Whether this is one of several torchrun processes without CUDA: transformers then runs
    DistributedDataParallel over gloo only with ``use_cpu=True`` (without it every process
    silently trains alone on the whole data set)."""
    return not _cuda() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _warmup(ratio: float) -> dict[str, Any]:
    """The training argument for ``ratio`` of the steps of warm-up: ``warmup_steps`` as a float
    in transformers 5 (which deprecates ``warmup_ratio``), ``warmup_ratio`` before."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"warmup_steps": float(ratio)}
    return {"warmup_ratio": float(ratio)}


def _checkpoint_step(path: Path) -> int | None:
    """The step of a complete trainer checkpoint folder, else ``None``.

    The trainer writes ``trainer_state.json`` last, so a checkpoint cut short by an interruption
    has none (or a truncated one) and is never resumed from.
    """
    try:
        step = int(path.name.rsplit("-", 1)[1])
        json.loads((path / "trainer_state.json").read_text())
    except (IndexError, ValueError, OSError):
        return None
    return step


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step under ``folder``."""
    steps = {}
    for p in Path(folder).glob("checkpoint-*"):
        step = _checkpoint_step(p)
        if p.is_dir() and step is not None:
            steps[step] = p
    return steps[max(steps)] if steps else None


def _resume_from(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (``resume``), or ``None`` for a fresh run; refuses a fresh
    run over an interrupted one and a resume with nothing to resume, naming the fix."""
    ckpt = out / CHECKPOINTS
    found = latest_checkpoint(ckpt)
    if resume and found is None:
        done = (
            " (the run there has finished: model/ is its result)"
            if (out / "model").is_dir()
            else ""
        )
        raise ValueError(
            f"resume=True but out_dir={str(out)!r} has no complete checkpoint in {ckpt}{done}: "
            "drop --resume to train from the start, or point --out at the interrupted run."
        )
    if not resume and any(ckpt.glob("checkpoint-*")):
        raise ValueError(
            f"out_dir={str(out)!r} holds checkpoints of an unfinished run ({ckpt}): pass --resume "
            "(resume: true) to continue it, or another --out / delete the folder to start over."
        )
    return found


def _ir_evaluator(
    queries: dict[str, str],
    corpus: dict[str, str],
    relevant: dict[str, set[str]],
    sizes: Sequence[int],
    batch_size: int,
) -> Any:
    """One ``InformationRetrievalEvaluator`` per size (``truncate_dim``), named ``dim_<m>``, in a
    ``SequentialEvaluator`` whose main score is the largest size's nDCG@10."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    per_size = [
        InformationRetrievalEvaluator(
            dict[str, Any](queries),
            dict[str, Any](corpus),
            relevant,
            mrr_at_k=[10],
            ndcg_at_k=[10],
            accuracy_at_k=[1],
            precision_recall_at_k=[10, 100],
            map_at_k=[100],
            batch_size=batch_size,
            name=f"dim_{m}",
            write_csv=False,
            truncate_dim=m,
        )
        for m in sorted(sizes)
    ]
    return SequentialEvaluator(per_size)


def _eval_set(config: TextTrainConfig) -> Any:
    """The evaluator of ``config.eval_data`` (``None`` without one): queries are the anchors
    and the corpus every distinct positive and negative text, or a BEIR folder's dev split."""
    if config.eval_data is None:
        return None
    from matryoshka.data.beir import is_beir_folder, load_beir
    from matryoshka.data.pairs import load_pairs

    if is_beir_folder(config.eval_data):
        beir = load_beir(config.eval_data, "dev")
        queries = dict(zip(beir.query_ids, beir.queries, strict=True))
        corpus = dict(zip(beir.corpus_ids, beir.corpus, strict=True))
        relevant = {q: {d for d, g in docs.items() if g > 0} for q, docs in beir.qrels.items()}
    else:
        ds = load_pairs(config.eval_data, config.columns, what="eval_data")
        doc_id: dict[str, str] = {}
        for col in ds.column_names[1:]:
            for text in ds[col]:
                doc_id.setdefault(text, f"d{len(doc_id)}")
        queries = {f"q{i}": a for i, a in enumerate(ds["anchor"])}
        corpus = {i: t for t, i in doc_id.items()}
        relevant = {f"q{i}": {doc_id[p]} for i, p in enumerate(ds["positive"])}
    return _ir_evaluator(queries, corpus, relevant, config.sizes, config.batch_size)


def _run_trainer(
    model: SentenceTransformer,
    dataset: Dataset,
    loss: Any,
    args: Any,
    evaluator: Any = None,
    resume_from: Path | None = None,
) -> Any:
    """``SentenceTransformerTrainer(...).train()``; returns the trainer."""
    from sentence_transformers import SentenceTransformerTrainer

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


# --- fine-tuning on in-memory pairs (the evaluation's baselines, and the 2D loop) -----------------


def finetune(
    encoder: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    nesting: Nesting,
    matryoshka: bool = True,
    batch_size: int = 32,
    lr: float = 2e-5,
    epochs: int = 1,
    temperature: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    n_sizes_per_step: int | None = None,
    layers: Sequence[int] | None = None,
    distill_weight: float = 0.0,
    distill_options: DistillOptions = DistillOptions(),
    cache_dir: str | Path = ".cache/embeddings",
) -> TextEncoder:
    """Fine-tune a copy of ``encoder`` on (anchor, positive) pairs with in-batch negatives.

    ``anchors[i]`` and ``positives[i]`` are a pair (at least 2 pairs); each step embeds
    ``batch_size`` of them to ``(B, d)``, ``d = nesting.dim``, and every other positive of the
    batch is a negative. ``matryoshka=True``: the fused Matryoshka loss over all sizes of
    ``nesting``; ``False``: the same loss at the full size only (a plain model, truncated later).
    Runs ``SentenceTransformerTrainer`` with :func:`build_loss` (no checkpoints). Returns the
    copy, in eval mode; ``encoder`` is left unchanged.
    ``n_sizes_per_step``: train a random subset of that many sizes each step (seeded).
    ``layers``: the 2D variant, prefix of layers x prefix of dims
    (:class:`~matryoshka.losses.contrastive.Matryoshka2dContrastiveLoss` on the mean-pooled output
    of those layers, ``(len(layers), B, d)``, 0-based; the last entry must be the model's last
    layer), trained by a hand-written AdamW loop: a sentence-transformers loss sees only the
    final embedding.
    ``distill_weight > 0``: add that weight x the distillation term against ``encoder`` frozen
    (:class:`~matryoshka.losses.distill.KeepTeacherLoss`; its teacher embeddings are cached under
    ``cache_dir``), so the fine-tune keeps the base model's general similarity structure.
    """
    from matryoshka.data.pairs import pairs_from_lists
    from matryoshka.models.text_encoder import TextEncoder

    if len(anchors) != len(positives) or len(anchors) < 2:
        raise ValueError(
            f"anchors has {len(anchors)} texts and positives {len(positives)}: pass at least "
            "2 pairs, the same number of each."
        )
    model = TextEncoder(copy.deepcopy(encoder.model), name=f"{encoder.name}-ft")
    if layers is not None:
        return _finetune_2d(
            model,
            anchors,
            positives,
            nesting,
            matryoshka,
            batch_size,
            lr,
            epochs,
            temperature,
            seed,
            progress,
            n_sizes_per_step,
            layers,
        )
    loss: Any = build_loss(model.model, nesting.sizes, matryoshka, temperature, n_sizes_per_step)
    dataset = pairs_from_lists(anchors, positives)
    if distill_weight > 0:
        from matryoshka.losses.distill import KeepTeacherLoss

        loss = KeepTeacherLoss(
            loss,
            build_distill_loss(
                model.model, nesting.sizes, distill_options, weights=nesting.weights
            ),
            distill_weight,
        )
        labels = teacher_labels(
            encoder, [anchors, positives], cache_dir, "finetune/teacher", progress
        )
        dataset = _with_labels(dataset, labels)
    with tempfile.TemporaryDirectory(prefix="mrl-finetune-") as tmp:
        args = _training_arguments(
            tmp,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
            save=False,
        )
        _run_trainer(model.model, dataset, loss, args)
    model.model.eval()
    return model


def distill(
    encoder: TextEncoder,
    texts: Sequence[str],
    nesting: Nesting,
    batch_size: int = 256,
    lr: float = 2e-4,
    epochs: int = 1,
    seed: int = 0,
    progress: bool = True,
    options: DistillOptions = DistillOptions(),
    trainable_layers: int | None = None,
    cache_dir: str | Path = ".cache/embeddings",
    rotate: bool = True,
    mini_batch_size: int | None = 32,
    warmup_ratio: float = 0.1,
    start_epochs: int = 20,
    neighbour_group: int = 8,
) -> TextEncoder:
    """Self-distil a copy of ``encoder`` on unlabeled ``texts`` (at least 2): every prefix of
    ``nesting`` learns to keep ``encoder``'s full-size similarity structure, the full size stays
    near ``encoder``'s output (:class:`~matryoshka.losses.distill.MatryoshkaDistillLoss`; the
    teacher's embeddings are computed once and cached under ``cache_dir``). Runs
    ``SentenceTransformerTrainer`` (no checkpoints); ``trainable_layers``: only the last ``n``
    transformer layers learn. ``rotate``: the student starts from ``encoder`` followed by the
    uncentred PCA rotation of the teacher's embeddings of ``texts`` (a ``Dense`` layer; same
    full-size cosines, prefixes at PCA quality from step 0) and keeps that rotated output.
    Dropout is off while training. ``mini_batch_size``: gradient caching (the similarity
    structure is kept over all ``batch_size`` texts, embedded that many at a time);
    ``warmup_ratio``: the share of steps of learning-rate warm-up; ``start_epochs``: fit the
    start rotation as an orthogonal adaptor on the teacher's embeddings (0: PCA);
    ``neighbour_group``: fill each batch with groups of that many teacher neighbours
    (:class:`~matryoshka.training.neighbours.NeighbourBatchSampler`; 1: random batches). Returns
    the copy, in eval mode; ``encoder`` is unchanged.
    """
    from datasets import Dataset

    from matryoshka.models.text_encoder import TextEncoder

    texts = list(dict.fromkeys(texts))
    if len(texts) < 2:
        raise ValueError(f"texts has {len(texts)} distinct text(s): distil on at least 2.")
    labels = teacher_labels(encoder, [texts], cache_dir, "distill/teacher", progress)
    model = TextEncoder(copy.deepcopy(encoder.model), name=f"{encoder.name}-distilled")
    labels, _ = _distill_start(model.model, labels, rotate, nesting, start_epochs, seed, progress)
    freeze_all_but_last(model.model, trainable_layers)
    loss = build_distill_loss(
        model.model, nesting.sizes, options, mini_batch_size, weights=nesting.weights
    )
    dataset = _with_labels(Dataset.from_dict({"text": texts}), labels)
    with tempfile.TemporaryDirectory(prefix="mrl-distill-") as tmp:
        args = _training_arguments(
            tmp,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
            save=False,
            warmup_ratio=warmup_ratio,
            batch_sampler=_neighbour_sampler(neighbour_group),
        )
        _run_trainer(model.model, dataset, loss, args)
    for p in model.model.parameters():
        p.requires_grad_(True)
    model.model.eval()
    return model


def _finetune_2d(
    model: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    nesting: Nesting,
    matryoshka: bool,
    batch_size: int,
    lr: float,
    epochs: int,
    temperature: float,
    seed: int,
    progress: bool,
    n_sizes_per_step: int | None,
    layers: Sequence[int],
) -> TextEncoder:
    """The 2D loop of :func:`finetune` on ``model`` (already a copy); trains it in place."""
    import torch
    from tqdm.auto import tqdm

    from matryoshka.losses.contrastive import Matryoshka2dContrastiveLoss
    from matryoshka.nesting import Nesting

    ladder = nesting if matryoshka else Nesting([nesting.dim])
    last = model.n_layers - 1
    if not layers or list(layers)[-1] != last:
        raise ValueError(
            f"layers={list(layers)} must end at the model's last layer ({last}, 0-based) so "
            f"the full model is trained, e.g. layers=[{max(0, last - 2)}, {last}]."
        )
    loss_fn = Matryoshka2dContrastiveLoss(
        ladder, list(layers), temperature=temperature, n_sizes_per_step=n_sizes_per_step
    )
    torch.manual_seed(seed)  # the size (and layer) sampling draws from torch's global RNG
    opt = torch.optim.AdamW(model.model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.model.train()
    steps = max(1, len(anchors) // batch_size)  # fewer pairs than batch_size: one smaller batch
    bar = tqdm(total=epochs * steps, desc="fine-tune 2D", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(anchors), generator=gen).tolist()
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            fa = model.tokenize([anchors[i] for i in idx])
            fp = model.tokenize([positives[i] for i in idx])
            out = loss_fn(model.forward_layers(fa), model.forward_layers(fp))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    model.model.eval()
    return model


def sample_pairs(train: Sequence[Synset], n: int, seed: int) -> list[Synset]:
    """A seeded sample of at most ``n`` training synsets, in their input order (the file order
    puts every noun first, so a plain prefix would hold nouns only)."""
    pick = np.random.default_rng(seed).permutation(len(train))[:n]
    return [train[i] for i in sorted(pick.tolist())]


# --- mrl train ------------------------------------------------------------------------------------


def _training_pairs(config: TextTrainConfig) -> tuple[Dataset, dict[str, Any]]:
    """The training ``Dataset`` (anchor, positive[, negative...]) and a description of it."""
    from matryoshka.data.pairs import load_pairs, pairs_from_lists

    if config.data is not None:
        ds = load_pairs(config.data, config.columns)
        return ds, {"source": config.data, "columns": config.columns, "rows": len(ds)}
    from matryoshka.data.wordnet import load_synsets, wordnet_split

    train, _ = wordnet_split(
        load_synsets(config.wordnet_root), config.seed, config.train_fraction, config.test_fraction
    )
    pairs = sample_pairs(train, config.train_pairs, config.seed)
    ds = pairs_from_lists([s.definition for s in pairs], [s.lemma_text for s in pairs])
    return ds, {"source": "wordnet (definition, lemmas)", "rows": len(ds)}


def _distill_texts(config: TextTrainConfig) -> tuple[list[str], dict[str, Any]]:
    """The recipe's unlabeled texts (``data``, or the docstring corpus' training texts when it is
    absent), a seeded sample of at most ``max_texts``, and a description of them."""
    if config.data is not None:
        from matryoshka.data.texts import load_texts

        texts = load_texts(config.data, config.text_column)
        info: dict[str, Any] = {"source": config.data, "text_column": config.text_column}
    else:
        from matryoshka.data.docstrings import load_docstring_corpus

        corpus = load_docstring_corpus(config.seed, config.ood_test_size)
        texts = list(corpus.train_texts)
        info = {
            "source": "docstrings of installed packages (training texts; the held-out "
            f"{corpus.test_size} pairs excluded)",
            "versions": corpus.versions,
        }
    info["texts_available"] = len(texts)
    if config.max_texts is not None and len(texts) > config.max_texts:
        pick = np.random.default_rng(config.seed).permutation(len(texts))[: config.max_texts]
        texts = [texts[i] for i in sorted(pick.tolist())]
    info["rows"] = len(texts)
    return texts, info


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``: readers see the old folder or the whole new
    one, never a half-written one (the old one is renamed aside first, then deleted)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _card(model: SentenceTransformer, base: str, sizes: Sequence[int], loss: str) -> None:
    """Name the loss and the trained sizes in the model card sentence-transformers writes."""
    data = model.model_card_data
    data.model_name = (
        f"{base} fine-tuned with {loss} (Matryoshka sizes {', '.join(map(str, sizes))})"
    )
    data.add_tags(["matryoshka", f"loss:{loss}"])
    if "generated_from_trainer" not in data.tags:
        # trained outside the trainer (the 2D loop): sentence-transformers would copy the base
        # model's README; have it generate a card from the data above instead
        model._model_card_text = None


def _save_run(
    model: SentenceTransformer, out: Path, meta: dict[str, Any], base: str, loss: str
) -> None:
    """Write ``out/model`` (atomically, as a whole folder) and then ``out/text_model.json``."""
    _card(model, base, meta["sizes"], loss)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make model/ private to this user
    try:
        model.save(str(tmp))
        _replace_folder(tmp, out / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(out / TEXT_MODEL_FILE, json.dumps(meta, indent=2).encode())


def train_text(config: TextTrainConfig) -> Path:
    """Fine-tune, save ``out_dir/model`` and ``out_dir/text_model.json``; returns the folder.

    Raises ``ValueError`` naming ``sizes`` right after the encoder loads when the ladder does not
    end at the model's dimension, naming ``resume`` / ``out_dir`` when there is nothing to resume
    or an unfinished run would be overwritten, naming ``data`` / ``columns`` for bad pairs, and
    naming ``layers`` when a 2D run's last layer is not the model's last one; nothing is written
    then. Under ``torchrun`` every process trains and the first one writes the folder.
    """
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

    t0 = time.time()
    base = TextEncoder(config.model)
    nesting = Nesting(list(config.sizes))
    check_sizes_match_model(nesting, base)  # before the data, the split and training
    out = Path(config.out_dir)
    if config.layers is not None and config.resume:
        raise ValueError(
            "resume=True with layers: the 2D loop writes no checkpoints; drop --resume (or "
            "layers to train with the trainer)."
        )
    resume_from = _resume_from(out, config.resume) if config.layers is None else None
    if config.objective == "distill":
        texts, data_info = _distill_texts(config)
        from datasets import Dataset

        dataset = Dataset.from_dict({"text": texts})
    else:
        dataset, data_info = _training_pairs(config)
    meta: dict[str, Any] = {
        "format": TEXT_MODEL_FORMAT,
        "config": dataclasses.asdict(config),
        "base_model": base.name,
        # a local base model, absolute: `mrl eval` may run from another folder
        "base_model_path": (
            str(Path(config.model).resolve())
            if config.model is not None and Path(config.model).exists()
            else None
        ),
        "sizes": list(nesting.sizes) if config.matryoshka else [nesting.dim],
        "data": data_info,
        "objective": config.objective,
        ("train_texts" if config.objective == "distill" else "train_pairs"): len(dataset),
    }
    if config.layers is not None:
        if len(dataset.column_names) > 2:
            raise ValueError(
                f"data={config.data!r} has hard negatives ({dataset.column_names[2:]}) but the 2D "
                "loop (layers) trains (anchor, positive) pairs only: drop the negative columns "
                "with columns: [anchor, positive], or drop layers."
            )
        tuned = finetune(
            base,
            list(dataset["anchor"]),
            list(dataset["positive"]),
            nesting,
            matryoshka=config.matryoshka,
            batch_size=config.batch_size,
            lr=config.lr,
            epochs=config.epochs,
            temperature=config.temperature,
            seed=config.seed,
            progress=config.progress,
            n_sizes_per_step=config.n_sizes_per_step,
            layers=config.layers,
        )
        loss_name = "Matryoshka2dContrastiveLoss"
        meta["loss"] = {
            "name": loss_name,
            "module": "matryoshka.losses.contrastive",
            "matryoshka_dims": meta["sizes"],
            "layers": config.layers,
            "temperature": config.temperature,
            "n_sizes_per_step": config.n_sizes_per_step,
        }
        meta["trainer"] = "matryoshka.training.text.finetune (2D loop)"
        meta["train_seconds"] = round(time.time() - t0, 1)
        _save_run(tuned.model, out, meta, base.name, loss_name)
        return out
    model = base.model
    loss: Any
    if config.objective == "distill":
        loss = build_distill_loss(
            model,
            nesting.sizes,
            DistillOptions.of(config),
            config.mini_batch_size,
            weights=nesting.weights,
        )
    else:
        loss = build_loss(
            model,
            nesting.sizes,
            config.matryoshka,
            config.temperature,
            config.n_sizes_per_step,
            config.mini_batch_size,
        )
    if config.objective == "distill" or config.distill_weight > 0:
        # the teacher: the base model before any step, its embeddings computed once
        columns = [list(dataset[c]) for c in dataset.column_names]
        key = f"{config.objective}/teacher"
        labels = teacher_labels(base, columns, config.cache_dir, key, config.progress)
        if config.objective == "distill":
            labels, meta["start"] = _distill_start(
                model,
                labels,
                config.rotate,
                nesting,
                config.start_epochs,
                config.seed,
                config.progress,
            )
        dataset = _with_labels(dataset, labels)
        if config.distill_weight > 0:
            from matryoshka.losses.distill import KeepTeacherLoss

            distill_term = build_distill_loss(
                model, nesting.sizes, DistillOptions.of(config), weights=nesting.weights
            )
            loss = KeepTeacherLoss(loss, distill_term, config.distill_weight)
    freeze_all_but_last(model, config.trainable_layers)
    evaluator = _eval_set(config)
    args = _training_arguments(
        out / CHECKPOINTS,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        progress=config.progress,
        save=True,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        evaluate=evaluator is not None,
        warmup_ratio=config.warmup_ratio,
        batch_sampler=_neighbour_sampler(config.neighbour_group),
    )
    trainer = _run_trainer(model, dataset, loss, args, evaluator, resume_from)
    for p in model.parameters():
        p.requires_grad_(True)  # the saved model is a whole, trainable model again
    if not trainer.is_world_process_zero():
        return out
    loss_name = type(loss).__name__
    meta["loss"] = {"name": loss_name, "module": type(loss).__module__, **loss.get_config_dict()}
    meta["trainer"] = "sentence_transformers.SentenceTransformerTrainer"
    meta["steps"] = int(trainer.state.global_step)
    meta["resumed_from"] = str(resume_from) if resume_from else None
    meta["bf16"] = bool(args.bf16)
    if evaluator is not None:
        meta["eval"] = {k: float(v) for k, v in evaluator(model).items()}
    meta["train_seconds"] = round(time.time() - t0, 1)
    _save_run(model, out, meta, base.name, loss_name)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the run is finished: model/ is it
    return out
