"""Options shared by the WordNet text recipes, and their checks.

:class:`WordnetTextOptions` holds the fields every text recipe has (sizes, the seeded split, the
pairs, the cache); :class:`~matryoshka.training.text.TextTrainConfig` (``mrl train``, ``task:
text``) and :class:`~matryoshka.evaluation.text.TextEvalConfig` (``mrl text-eval``) extend it.
This module imports neither, so both can import it: training never depends on evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

__all__ = [
    "WordnetTextOptions",
    "check_sizes_match_model",
    "check_text_options",
]


@dataclass
class WordnetTextOptions:
    """The options every WordNet text recipe shares: sizes, the seeded split, the pairs, the
    out-of-domain split, the cache. :class:`~matryoshka.training.text.TextTrainConfig` and
    :class:`~matryoshka.evaluation.text.TextEvalConfig` extend it."""

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
    ood_test_size: int = field(
        default=1500,
        metadata={
            "help": "out-of-domain check: docstring pairs held out as queries and corpus (the "
            "rest of the docstrings are the default distillation texts)"
        },
    )
    cache_dir: str = field(default=".cache/embeddings", metadata={"help": "embedding cache folder"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def check_text_options(
    config: WordnetTextOptions,
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
    for name, low in (*ints, ("ood_test_size", 10)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}.")
    for name, bound, inclusive in floats:
        value = getattr(config, name)
        ok = isinstance(value, int | float) and (value >= bound if inclusive else value > bound)
        if isinstance(value, bool) or not ok:
            relation = ">=" if inclusive else ">"
            raise ValueError(f"{name}={value!r} must be a float {relation} {bound}.")


def check_sizes_match_model(nesting: Nesting, encoder: TextEncoder) -> None:
    """Raise a ``ValueError`` naming ``sizes``, its last size, the model's dimension and the fix
    unless the ladder ends at ``encoder.dim`` (the full embedding is the largest prefix).

    Called right after the encoder loads, before any split, encoding or training work.
    """
    if nesting.dim != encoder.dim:
        raise ValueError(
            f"sizes={list(nesting.sizes)} ends at {nesting.dim}, but {encoder.name} embeds in "
            f"{encoder.dim} dimensions: make the last size {encoder.dim}."
        )
