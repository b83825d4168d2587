"""Fine-tune a text encoder with the Matryoshka contrastive loss and save it.

    mrl train --config configs/text_wordnet_mrl.yaml        # a YAML with `task: text`
    mrl eval --model runs/text_mrl                            # per-size retrieval on held-out synsets

Training pairs are WordNet (definition, lemmas) pairs from a seeded share of the synsets; the
loss is the fused :class:`~matryoshka.losses.contrastive.MatryoshkaContrastiveLoss` over every size of
the nesting (``matryoshka: false`` trains plain InfoNCE at the full size only, the baseline that
is truncated afterwards). The run folder holds ``model/`` (a sentence-transformers model folder,
loadable with ``SentenceTransformer(path)`` or ``TextEncoder(path)``) and ``text_model.json``
(the config, the split and the timings). :func:`~matryoshka.evaluation.text.evaluate_text_model`
re-creates the same seeded split, so its queries are synsets the model never saw.

Data flows one way: this module imports no evaluation code (the evaluation fine-tunes with
:func:`finetune` as a baseline, so it imports this module).
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
    from matryoshka.data.wordnet import Synset
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

__all__ = [
    "TEXT_MODEL_FILE",
    "TEXT_MODEL_FORMAT",
    "TextTrainConfig",
    "finetune",
    "sample_pairs",
    "train_text",
]

#: The metadata file that marks a run folder as a fine-tuned text model.
TEXT_MODEL_FILE = "text_model.json"
#: ``format`` of :data:`TEXT_MODEL_FILE`.
TEXT_MODEL_FORMAT = "matryoshka.text_model/1"


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
        return from_dict(cls, data)


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
) -> TextEncoder:
    """Fine-tune a copy of ``encoder`` on (anchor, positive) pairs with in-batch negatives.

    ``anchors[i]`` and ``positives[i]`` are a pair (at least 2 pairs); each step embeds
    ``batch_size`` of them to ``(B, d)`` (``(len(layers), B, d)`` with ``layers``), ``d =
    nesting.dim``, and every other positive of the batch is a negative.
    ``matryoshka=True``: the fused Matryoshka InfoNCE over all sizes of ``nesting``; ``False``:
    the same InfoNCE at the full size only (a plain model, truncated later). Returns the copy,
    in eval mode; ``encoder`` is left unchanged.
    ``n_sizes_per_step``: train a random subset of that many sizes each step (seeded).
    ``layers``: the 2D variant, prefix of layers x prefix of dims
    (:class:`~matryoshka.losses.contrastive.Matryoshka2dContrastiveLoss` on the mean-pooled output of
    those layers, 0-based; the last entry must be the model's last layer).
    """
    import torch
    from tqdm.auto import tqdm

    from matryoshka.losses.contrastive import (
        Matryoshka2dContrastiveLoss,
        MatryoshkaContrastiveLoss,
    )
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

    if len(anchors) != len(positives) or len(anchors) < 2:
        raise ValueError(
            f"anchors has {len(anchors)} texts and positives {len(positives)}: pass at least "
            "2 pairs, the same number of each."
        )
    model = TextEncoder(copy.deepcopy(encoder.model), name=f"{encoder.name}-ft")
    ladder = nesting if matryoshka else Nesting([nesting.dim])
    loss_fn: MatryoshkaContrastiveLoss | Matryoshka2dContrastiveLoss
    if layers is not None:
        last = model.n_layers - 1
        if not layers or list(layers)[-1] != last:
            raise ValueError(
                f"layers={list(layers)} must end at the model's last layer ({last}, 0-based) so "
                f"the full model is trained, e.g. layers=[{max(0, last - 2)}, {last}]."
            )
        loss_fn = Matryoshka2dContrastiveLoss(
            ladder, list(layers), temperature=temperature, n_sizes_per_step=n_sizes_per_step
        )
    else:
        loss_fn = MatryoshkaContrastiveLoss(
            ladder, temperature=temperature, n_sizes_per_step=n_sizes_per_step
        )
    torch.manual_seed(seed)  # the size (and layer) sampling draws from torch's global RNG
    opt = torch.optim.AdamW(model.model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.model.train()
    steps = max(1, len(anchors) // batch_size)  # fewer pairs than batch_size: one smaller batch
    bar = tqdm(total=epochs * steps, desc="fine-tune", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(anchors), generator=gen).tolist()
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            fa = model.tokenize([anchors[i] for i in idx])
            fp = model.tokenize([positives[i] for i in idx])
            if isinstance(loss_fn, Matryoshka2dContrastiveLoss):
                out = loss_fn(model.forward_layers(fa), model.forward_layers(fp))
            else:
                out = loss_fn(model.forward(fa), model.forward(fp))
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


def train_text(config: TextTrainConfig) -> Path:
    """Fine-tune, save ``out_dir/model`` and ``out_dir/text_model.json``; returns the folder.

    Raises ``ValueError`` naming ``sizes`` right after the encoder loads when the ladder does not
    end at the model's dimension, and naming ``layers`` when a 2D run's last layer is not the
    model's last one; nothing is written then.
    """
    from matryoshka.data.wordnet import load_synsets, wordnet_split
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

    t0 = time.time()
    base = TextEncoder(config.model)
    nesting = Nesting(list(config.sizes))
    check_sizes_match_model(nesting, base)  # before the split, sampling and training
    train, _ = wordnet_split(
        load_synsets(config.wordnet_root), config.seed, config.train_fraction, config.test_fraction
    )
    pairs = sample_pairs(train, config.train_pairs, config.seed)
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
        "format": TEXT_MODEL_FORMAT,
        "config": dataclasses.asdict(config),
        "base_model": base.name,
        "train_pairs": len(pairs),
        "train_seconds": round(time.time() - t0, 1),
    }
    atomic_write_bytes(out / TEXT_MODEL_FILE, json.dumps(meta, indent=2).encode())
    return out
