"""The served encoder: text (or the tokenizer's ids) -> the model's unit-norm embedding, then the
adaptor (if any).

:class:`ServedEncoder` also counts tokens (special tokens included), cuts texts to a token limit
and checks token ids against the vocabulary; :func:`load_encoder` builds it from a
:class:`~matryoshka.serve.config.ServeConfig` and :func:`served_model_ids` names the model the
way clients address it (one id per model and adaptor: ``all-MiniLM-L6-v2+adaptor-1a2b3c4d``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.serve.config import ServeConfig

__all__ = [
    "EncodeInput",
    "ServedEncoder",
    "ServedIds",
    "adaptor_digest",
    "load_encoder",
    "served_model_ids",
]

#: One input of an encoder call: a text, or the model tokenizer's ids for one text.
EncodeInput = str | list[int]


class ServedEncoder:
    """Text or token ids -> served embedding: the model's output, then the adaptor (if any).

    Args:
        text_encoder: the :class:`~matryoshka.models.text_encoder.TextEncoder`.
        adaptor: a fitted :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor`, or ``None``.
        batch_size: most inputs per forward pass.
    """

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
        self.vocab_size = _vocab_size(text_encoder, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self._type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        # Non-tensor entries the model's own tokenisation adds (e.g. {"modality": "text"}).
        self._extra = {
            k: v for k, v in text_encoder.tokenize(["x"]).items() if not hasattr(v, "shape")
        }

    def __call__(self, inputs: list[EncodeInput]) -> np.ndarray:
        """``n`` texts and/or token-id lists -> ``(n, d)`` float32 (unit-norm model output,
        adapted when configured), in the order given."""
        z = np.empty((len(inputs), self.dim), dtype=np.float32)
        text_at, texts, ids_at, id_lists = [], [], [], []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                text_at.append(i)
                texts.append(x)
            else:
                ids_at.append(i)
                id_lists.append(x)
        if texts:
            z[text_at] = self.text_encoder.encode(
                texts, batch_size=self.batch_size, normalize=True, progress=False
            )
        if id_lists:
            z[ids_at] = self._encode_ids(id_lists)
        if self.adaptor is not None:
            z = self.adaptor.transform(z, normalize=False)
        return np.asarray(z, dtype=np.float32)

    def _encode_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Token-id lists -> ``(n, d)`` unit-norm model output: the ids go into the model as they
        are (no special tokens added), every id attended (padding only fills a batch)."""
        import torch

        model = self.text_encoder
        device = model.model.device
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        was_training = model.model.training
        model.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(batch), self.batch_size):
                    chunk = batch[s : s + self.batch_size]
                    width = max(len(ids) for ids in chunk)
                    ids_t = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, ids in enumerate(chunk):
                        ids_t[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                        mask[r, : len(ids)] = 1
                    feats: dict[str, Any] = {"input_ids": ids_t.to(device)}
                    feats["attention_mask"] = mask.to(device)
                    if self._type_ids:
                        feats["token_type_ids"] = torch.zeros_like(ids_t).to(device)
                    emb = model.forward({**self._extra, **feats})  # (b, d)
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                    out[s : s + len(chunk)] = emb.float().cpu().numpy()
        finally:
            model.model.train(was_training)
        return out

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


def _vocab_size(text_encoder: Any, tokenizer: Any) -> int:
    """How many token ids the model can embed (its input embedding table, else the tokenizer's)."""
    try:
        return int(text_encoder._auto_model().get_input_embeddings().num_embeddings)
    except (AttributeError, IndexError, KeyError, TypeError):
        return len(tokenizer)


def load_encoder(config: ServeConfig, encoder: Any = None, adaptor: Any = None) -> ServedEncoder:
    """The encoder named by ``config`` (``encoder`` / ``adaptor`` may be passed already loaded)."""
    if encoder is None:
        from matryoshka.models.text_encoder import TextEncoder

        encoder = TextEncoder(config.model, device=config.device)
    if adaptor is None and config.adaptor is not None:
        from matryoshka.models.adaptor import MatryoshkaAdaptor

        adaptor = MatryoshkaAdaptor.load(config.adaptor)
    return ServedEncoder(encoder, adaptor, config.max_batch_size)


def adaptor_digest(adaptor: Any, path: str | None = None) -> str:
    """SHA-256 (hex) of an adaptor's weights: the bytes of its saved ``.safetensors`` file.

    With ``path`` (the stem or either file given to
    :meth:`~matryoshka.models.adaptor.MatryoshkaAdaptor.load`) the file is hashed as it is on
    disk; otherwise the in-memory weights are serialised the way
    :meth:`~matryoshka.models.adaptor.MatryoshkaAdaptor.save` writes them (same bytes, same
    digest).
    """
    if path is not None:
        p = Path(path)
        stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
        weights = stem.with_suffix(".safetensors")  # where MatryoshkaAdaptor.load reads them
        if weights.is_file():
            return hashlib.sha256(weights.read_bytes()).hexdigest()
    from safetensors.torch import save as st_save

    net = adaptor._check_fitted()
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    return hashlib.sha256(st_save(tensors)).hexdigest()


@dataclasses.dataclass(frozen=True)
class ServedIds:
    """How the server names what it serves.

    Attributes:
        served: the one id reported (``/v1/models``, every response, indexes built here).
        accepted: every id a request may send as ``model`` (``served`` and the aliases; without
            an adaptor also the base model's names, which give the same vectors).
        base: the base model's ids (refused with an adaptor: its vectors are not the model's).
        adaptor_sha256: the adaptor's weights digest, or ``None`` without an adaptor.
        base_id: the base model's own id (``model_name``, else the model's name).
    """

    served: str
    accepted: frozenset[str]
    base: frozenset[str]
    adaptor_sha256: str | None
    base_id: str


def served_model_ids(config: ServeConfig, adaptor: Any = None) -> ServedIds:
    """The model ids of the server (see :class:`ServedIds`).

    The base id is ``config.model_name``, else the model's name (the bundled MiniLM's, or the
    last part of a path). Without an adaptor the served id is the base id; with one it is
    ``<base>+adaptor-<first 8 hex of the weights' SHA-256>`` (:func:`adaptor_digest`), so two
    adaptors over one model never share an id. ``config.served_model_name`` replaces either.
    """
    from matryoshka.models.text_encoder import DEFAULT_MODEL

    base_id = config.model_name or (
        DEFAULT_MODEL if config.model is None else Path(config.model).name or config.model
    )
    base = {base_id}
    if config.model is None:
        base |= {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
    else:
        base.add(config.model)
    digest = adaptor_digest(adaptor, config.adaptor) if adaptor is not None else None
    served = config.served_model_name or (
        base_id if digest is None else f"{base_id}+adaptor-{digest[:8]}"
    )
    accepted = {served, *config.aliases} | (base if digest is None else set())
    return ServedIds(served, frozenset(accepted), frozenset(base - {served}), digest, base_id)
