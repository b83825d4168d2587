"""The served encoder: text -> the model's unit-norm embedding, then the adaptor (if any).

:class:`ServedEncoder` also counts tokens (special tokens included) and cuts texts to a token limit;
:func:`load_encoder` builds it from a :class:`~matryoshka.serve.config.ServeConfig` and
:func:`served_model_ids` names the model the way clients address it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.serve.config import ServeConfig

__all__ = ["ServedEncoder", "load_encoder", "served_model_ids"]


class ServedEncoder:
    """Text -> served embedding: the model's output, then the adaptor (if any), full size."""

    def __init__(self, text_encoder: Any, adaptor: Any, batch_size: int) -> None:
        self.text_encoder = text_encoder
        self.adaptor = adaptor
        self.batch_size = batch_size
        self.dim = int(text_encoder.dim)
        if adaptor is not None and adaptor.nesting.dim != self.dim:
            raise ValueError(
                f"adaptor expects {adaptor.nesting.dim}-d embeddings but the model gives "
                f"{self.dim}-d: fit the adaptor on this model's embeddings."
            )
        st = text_encoder.model
        self.max_tokens = int(getattr(st, "max_seq_length", 0) or 512)
        # A private tokenizer for counting: the model's own one is used by the encoder thread,
        # and a Rust tokenizer must not be reconfigured from two threads at once.
        self.tokenizer = copy.deepcopy(st.tokenizer)
        self.tokenizer.model_max_length = 10**9  # no "sequence too long" warnings when counting
        self.n_special = int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """``n`` texts -> ``(n, d)`` float32 (unit-norm model output, adapted when configured)."""
        z = self.text_encoder.encode(
            texts, batch_size=self.batch_size, normalize=True, progress=False
        )
        if self.adaptor is not None:
            z = self.adaptor.transform(z, normalize=False)
        return np.asarray(z, dtype=np.float32)

    def count_and_cut(
        self, texts: list[str], max_tokens: int, truncate: bool
    ) -> tuple[list[str], list[int]]:
        """Token counts (special tokens included); texts cut to ``max_tokens`` if ``truncate``."""
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=truncate, verbose=False
        )
        counts, out = [], []
        for i, ids in enumerate(enc["input_ids"]):
            n = len(ids) + self.n_special
            text = texts[i]
            if n > max_tokens and truncate:
                keep = max_tokens - self.n_special
                text = text[: enc["offset_mapping"][i][keep - 1][1]]
                n = max_tokens
            counts.append(n)
            out.append(text)
        return out, counts


def load_encoder(config: ServeConfig, encoder: Any = None, adaptor: Any = None) -> ServedEncoder:
    """The encoder named by ``config`` (``encoder`` / ``adaptor`` may be passed already loaded)."""
    if encoder is None:
        from matryoshka.models.text_encoder import TextEncoder

        encoder = TextEncoder(config.model, device=config.device)
    if adaptor is None and config.adaptor is not None:
        from matryoshka.models.adaptor import MatryoshkaAdaptor

        adaptor = MatryoshkaAdaptor.load(config.adaptor)
    return ServedEncoder(encoder, adaptor, config.max_batch_size)


def served_model_ids(config: ServeConfig) -> tuple[str, frozenset[str]]:
    """The model id the server reports, and every id it accepts as ``model``.

    The reported id is ``config.model_name``, else the model's name (the bundled MiniLM's, or the
    last part of a path). Accepted: that id, ``config.aliases``, and the name the model was
    loaded by (for the bundled one also its ``sentence-transformers/`` hub id).
    """
    from matryoshka.models.text_encoder import DEFAULT_MODEL

    model_name = config.model_name or (
        DEFAULT_MODEL if config.model is None else Path(config.model).name or config.model
    )
    accepted = {model_name, *config.aliases}
    if config.model is None:
        accepted |= {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
    else:
        accepted.add(config.model)
    return model_name, frozenset(accepted)
