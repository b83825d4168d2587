"""Fine-tune a text encoder with the Matryoshka contrastive loss, save it, evaluate it per size.

    mrl train --config configs/text_wordnet_mrl.yaml        # a YAML with `task: text`
    mrl eval --model runs/text_mrl                            # per-size retrieval on held-out synsets

Training pairs are WordNet (definition, lemmas) pairs from a seeded share of the synsets; the
loss is the fused :class:`~matryoshka.losses.contrastive.MatryoshkaContrastiveLoss` over every size of
the nesting (``matryoshka: false`` trains plain InfoNCE at the full size only, the baseline that
is truncated afterwards). The run folder holds ``model/`` (a sentence-transformers model folder,
loadable with ``SentenceTransformer(path)`` or ``TextEncoder(path)``) and ``text_model.json``
(the config, the split and the timings). Evaluation re-creates the same seeded split, so its
queries are synsets the model never saw, and reports nDCG@10, recall@10/100 and MRR@10 per size
next to the base model truncated.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from matryoshka.io import atomic_write_bytes

__all__ = [
    "TEXT_MODEL_FILE",
    "TextTrainConfig",
    "WordnetTextOptions",
    "check_text_options",
    "config_from_dict",
    "evaluate_text_model",
    "is_text_run",
    "train_text",
]

_C = TypeVar("_C")

#: The metadata file that marks a run folder as a fine-tuned text model.
TEXT_MODEL_FILE = "text_model.json"
_FORMAT = "matryoshka.text_model/1"


@dataclass
class WordnetTextOptions:
    """The options every WordNet text recipe shares: sizes, the seeded split, the pairs, the
    cache. :class:`TextTrainConfig` and :class:`matryoshka.cli.text.TextEvalConfig` extend it."""

    sizes: list[int] = field(
        default_factory=lambda: [8, 16, 32, 64, 128, 256, 384],
        metadata={"help": "prefix sizes, increasing, the last one the model's dimension (384)"},
    )
    train_fraction: float = field(
        default=0.17,
        metadata={"help": "share of synsets for training (pairs, and PCA/adaptor/probe fits)"},
    )
    test_fraction: float = field(
        default=0.02, metadata={"help": "share of synsets held out for evaluation (drawn first)"}
    )
    train_pairs: int = field(
        default=8000, metadata={"help": "(definition, lemmas) pairs to fine-tune MiniLM on"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the split, sampling and training"})
    cache_dir: str = field(default=".cache/embeddings", metadata={"help": "embedding cache folder"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


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
        default=0.05, metadata={"help": "softmax temperature on cosine similarities"}
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
    out_dir: str = field(
        default="runs/text_mrl", metadata={"help": "run folder: model/ and text_model.json"}
    )
    wordnet_root: str = field(
        default="/usr/share/wordnet", metadata={"help": "WordNet data folder"}
    )

    def __post_init__(self) -> None:
        if self.task != "text":
            raise ValueError(f"task={self.task!r} must be 'text' in a text training recipe.")
        check_text_options(
            self,
            ints=(("train_pairs", 2), ("epochs", 1), ("batch_size", 2), ("seed", 0)),
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextTrainConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys are an error naming them."""
        return config_from_dict(cls, data, "text training")


def check_text_options(
    config: Any,
    ints: tuple[tuple[str, int], ...],
    floats: tuple[tuple[str, float, bool], ...] = (),
) -> None:
    """Validate a text recipe's ``sizes``, ``train_fraction`` + ``test_fraction``, the int
    fields ``(name, lowest)`` and float fields ``(name, bound, bound_allowed)``; raises a
    ``ValueError`` naming the field, its value and the fix."""
    from matryoshka.nesting import Nesting

    Nesting(list(config.sizes))  # raises naming sizes= and the fix
    for name in ("train_fraction", "test_fraction"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"{name}={value!r} must be a share of the synsets in (0, 1], e.g. 0.05."
            )
    if config.train_fraction + config.test_fraction > 1:
        raise ValueError(
            f"train_fraction={config.train_fraction} + test_fraction={config.test_fraction} > 1: "
            "the splits must not overlap; make them sum to at most 1."
        )
    for name, low in ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}.")
    for name, bound, inclusive in floats:
        value = getattr(config, name)
        ok = isinstance(value, int | float) and (value >= bound if inclusive else value > bound)
        if isinstance(value, bool) or not ok:
            relation = ">=" if inclusive else ">"
            raise ValueError(f"{name}={value!r} must be a float {relation} {bound}.")


def config_from_dict(cls: type[_C], data: dict[str, Any], what: str) -> _C:
    """``cls(**data)`` for a dataclass ``cls``; unknown keys are an error naming them."""
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}: the valid keys are {known}.")
    return cls(**data)


def _split(config: TextTrainConfig) -> tuple[list[Any], list[Any]]:
    from matryoshka.data.wordnet import load_synsets, wordnet_split

    synsets = load_synsets(config.wordnet_root)
    return wordnet_split(synsets, config.seed, config.train_fraction, config.test_fraction)


def train_text(config: TextTrainConfig) -> Path:
    """Fine-tune, save ``out_dir/model`` and ``out_dir/text_model.json``; returns the folder."""
    from matryoshka.evaluation.text import finetune
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

    t0 = time.time()
    base = TextEncoder(config.model)
    nesting = Nesting(list(config.sizes))
    if nesting.dim != base.dim:
        raise ValueError(
            f"sizes={list(config.sizes)} ends at {nesting.dim}, but {base.name} embeds in "
            f"{base.dim} dimensions: make the last size {base.dim}."
        )
    train, _ = _split(config)
    pick = np.random.default_rng(config.seed).permutation(len(train))[: config.train_pairs]
    pairs = [train[i] for i in sorted(pick.tolist())]
    tuned = finetune(
        base,
        [s.definition for s in pairs],
        [s.lemma_text for s in pairs],
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
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tuned.model.save(str(out / "model"))
    meta = {
        "format": _FORMAT,
        "config": dataclasses.asdict(config),
        "base_model": base.name,
        "train_pairs": len(pairs),
        "train_seconds": round(time.time() - t0, 1),
    }
    atomic_write_bytes(out / TEXT_MODEL_FILE, json.dumps(meta, indent=2).encode())
    return out


def is_text_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (or its ``text_model.json``) written by :func:`train_text`."""
    p = Path(path)
    return (p / TEXT_MODEL_FILE).is_file() or (p.name == TEXT_MODEL_FILE and p.is_file())


def evaluate_text_model(
    path: str | Path, cache_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Per-size retrieval (definition -> lemmas) of a saved text run on its held-out synsets.

    Returns ``{"sizes", "metrics": {metric: {"fine-tuned": [...], "base truncated": [...]}},
    "meta"}`` with values in [0, 1], one per size; a 2D run (``layers``) adds one entry per
    early exit (``"fine-tuned, exit after layer l of L"``) and the base model's mean pool at
    the same layer (``"base, exit after ..."``).
    """
    from matryoshka.data.wordnet import definition_to_lemmas
    from matryoshka.evaluation.text import retrieval_metrics
    from matryoshka.models.text_encoder import TextEncoder, encode_cached
    from matryoshka.ops import truncate_numpy

    p = Path(path)
    folder = p.parent if p.name == TEXT_MODEL_FILE else p
    if not is_text_run(folder):
        raise FileNotFoundError(
            f"path={str(path)!r} holds no {TEXT_MODEL_FILE}: pass a run folder written by "
            "`mrl train` with a text recipe (task: text)."
        )
    meta = json.loads((folder / TEXT_MODEL_FILE).read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{folder / TEXT_MODEL_FILE} has format={meta.get('format')!r}, not {_FORMAT!r}: "
            "it was not written by matryoshka.training.text."
        )
    config = TextTrainConfig.from_dict(meta["config"])
    cache = Path(cache_dir if cache_dir is not None else config.cache_dir)
    _, test = _split(config)
    task = definition_to_lemmas(test)
    kind = "mrl" if config.matryoshka else "plain"
    tuned = TextEncoder(str(folder / "model"), name=f"{Path(folder).name}-{kind}")
    models = {"fine-tuned": tuned, "base truncated": TextEncoder(config.model)}
    metrics: dict[str, dict[str, list[float]]] = {}
    for label, enc in models.items():
        key = f"wordnet/s{config.seed}/test{round(config.test_fraction * 1000)}"
        q = encode_cached(task.queries, enc, cache, f"{key}/definitions", progress=progress)
        c = encode_cached(task.corpus, enc, cache, f"{key}/lemmas", progress=progress)
        for m in config.sizes:
            scores = retrieval_metrics(task, truncate_numpy(q, m, True), truncate_numpy(c, m, True))
            for metric, value in scores.items():
                metrics.setdefault(metric, {}).setdefault(label, []).append(value)
    if config.layers is not None and len(config.layers) > 1:
        # 2D: score the early exits too, and the base model's mean pool at the same layers
        exits = config.layers[:-1]
        for who, enc in (("fine-tuned", tuned), ("base", models["base truncated"])):
            q = enc.encode(task.queries, layers=exits, progress=progress)  # (exits, Q, d)
            c = enc.encode(task.corpus, layers=exits, progress=progress)
            for j, layer in enumerate(exits):
                label = f"{who}, exit after layer {layer + 1} of {enc.n_layers}"
                for m in config.sizes:
                    qm, cm = truncate_numpy(q[j], m, True), truncate_numpy(c[j], m, True)
                    for metric, value in retrieval_metrics(task, qm, cm).items():
                        metrics.setdefault(metric, {}).setdefault(label, []).append(value)
    return {
        "task": "wordnet definition->lemmas retrieval (held-out synsets)",
        "sizes": list(config.sizes),
        "metrics": metrics,
        "meta": {"queries": len(task.queries), "corpus": len(task.corpus), **meta},
    }
