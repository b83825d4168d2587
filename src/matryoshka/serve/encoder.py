"""The served encoder: text (or the tokenizer's ids) -> the model's unit-norm embedding, then the
adaptor (if any).

:class:`ServedEncoder` also counts tokens (special tokens included), cuts texts to a token limit
and checks token ids against the vocabulary; :func:`load_encoder` builds it from a
:class:`~matryoshka.serve.config.ServeConfig` and :func:`served_model_ids` names the model the
way clients address it (one id per model and adaptor: ``all-MiniLM-L6-v2+adaptor-1a2b3c4d``).

An encoder call (the texts of every request in one dynamic batch) is sorted by length and run
in forward passes of :data:`FORWARD_BATCH_SIZE` inputs, so short texts are not padded to the
longest one of the call. The forward pass runs in torch (default) or, with ``backend="onnx"``,
in ONNX Runtime (:class:`OnnxForward`: the model's transformer exported once at start-up; the
pooling and any later modules stay the model's own).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.serve.config import BACKENDS, ServeConfig

__all__ = [
    "FORWARD_BATCH_SIZE",
    "EncodeInput",
    "OnnxForward",
    "ServedEncoder",
    "ServedIds",
    "adaptor_digest",
    "load_encoder",
    "served_model_ids",
]

#: One input of an encoder call: a text, or the model tokenizer's ids for one text.
EncodeInput = str | list[int]

#: Most inputs per forward pass. A call holds up to ``max_batch_size`` inputs (64 by default, the
#: requests of one dynamic batch); sorted by length and cut into passes of 16, it pads far less:
#: 64 texts of 6-34 tokens took 20-27 % less CPU than one pass of 64 (MiniLM, 1 thread, loaded).
FORWARD_BATCH_SIZE = 16


class ServedEncoder:
    """Text or token ids -> served embedding: the model's output, then the adaptor (if any).

    Args:
        text_encoder: the :class:`~matryoshka.models.text_encoder.TextEncoder`.
        adaptor: a fitted :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor`, or ``None``.
        batch_size: most inputs per forward pass (a call of more is cut into several).
        backend: ``"torch"`` or ``"onnx"`` (the forward pass in ONNX Runtime, see
            :class:`OnnxForward`).
    """

    def __init__(
        self, text_encoder: Any, adaptor: Any, batch_size: int, backend: str = "torch"
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend: use one of {BACKENDS}.")
        self.text_encoder = text_encoder
        self.adaptor = adaptor
        self.batch_size = batch_size
        self.backend = backend
        self.onnx = OnnxForward(text_encoder) if backend == "onnx" else None
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
            z[text_at] = self._encode_texts(texts)
        if id_lists:
            z[ids_at] = self._encode_ids(id_lists)
        if self.adaptor is not None:
            z = self.adaptor.transform(z, normalize=False)
        return np.asarray(z, dtype=np.float32)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        """``n`` texts -> ``(n, d)`` unit-norm model output, longest first in passes of
        ``batch_size`` (torch: :meth:`TextEncoder.encode`, which sorts the same way)."""
        if self.onnx is None:
            return np.asarray(
                self.text_encoder.encode(
                    texts, batch_size=self.batch_size, normalize=True, progress=False
                ),
                dtype=np.float32,
            )
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            out[idx] = self._forward(self.text_encoder.tokenize([texts[i] for i in idx]))
        return out

    def _forward(self, feats: dict[str, Any]) -> np.ndarray:
        """One tokenised batch -> ``(b, d)`` unit-norm sentence embeddings, in this backend."""
        import torch

        with torch.no_grad():
            if self.onnx is not None:
                emb = self.onnx(feats)
            else:
                model = self.text_encoder
                was_training = model.model.training
                model.model.eval()
                try:
                    emb = model.forward(feats)  # (b, d)
                finally:
                    model.model.train(was_training)
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return np.asarray(emb.float().cpu().numpy(), dtype=np.float32)

    def _encode_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Token-id lists -> ``(n, d)`` unit-norm model output: the ids go into the model as they
        are (no special tokens added), every id attended (padding only fills a batch); longest
        first in passes of ``batch_size``."""
        import torch

        device = self.text_encoder.model.device
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        order = np.argsort([-len(ids) for ids in batch], kind="stable")
        for s in range(0, len(batch), self.batch_size):
            idx = order[s : s + self.batch_size]
            chunk = [batch[i] for i in idx]
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
            out[idx] = self._forward({**self._extra, **feats})
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


class OnnxForward:
    """The forward pass of a sentence-transformers model with its transformer in ONNX Runtime.

    At construction the model's first module (a Hugging Face transformer, e.g. MiniLM's
    ``BertModel``) is exported to ONNX (torch's exporter, dynamic batch and sequence axes) into a
    temporary folder and loaded into an ``onnxruntime.InferenceSession`` on the CPU, with as
    many intra-op threads as torch uses (``torch.get_num_threads()``: ``OMP_NUM_THREADS``), idle
    ones spinning unless ``OMP_WAIT_POLICY=PASSIVE`` (as torch's OpenMP threads). A call
    runs that session for the token embeddings, then the model's own remaining modules (pooling,
    normalisation, dense layers) in torch, so the output is the model's sentence embedding.

    Args:
        text_encoder: the :class:`~matryoshka.models.text_encoder.TextEncoder` (its weights are
            read once; later changes to them are not seen).
    """

    def __init__(self, text_encoder: Any) -> None:
        import tempfile

        import torch

        st = text_encoder.model
        first = st[0] if len(st) else None
        auto_model = getattr(first, "auto_model", None)
        if auto_model is None:
            raise ValueError(
                f"backend='onnx' needs a sentence-transformers model whose first module is a "
                f"Hugging Face transformer (with .auto_model); {text_encoder.name!r} starts with "
                f"{type(first).__name__}: use backend='torch'."
            )
        if st.device.type != "cpu":
            raise ValueError(
                f"backend='onnx' runs on the CPU but the model is on {st.device}: load it with "
                "device='cpu', or use backend='torch'."
            )
        try:
            import onnx  # noqa: F401  (torch's exporter writes the file with it)
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                f"backend='onnx' needs ONNX Runtime and onnx ({e.name or e} is missing): install "
                "them with `pip install 'matryoshka[onnx]'`, or use backend='torch'."
            ) from e
        sample = text_encoder.tokenize(["a b c d", "x"])
        self.input_names = [
            k
            for k in ("input_ids", "attention_mask", "token_type_ids")
            if isinstance(sample.get(k), torch.Tensor)
        ]
        self.rest = list(st)[1:]  # pooling, normalize, dense ... (run in torch)

        class _Hidden(torch.nn.Module):
            def __init__(self, model: Any, names: list[str]) -> None:
                super().__init__()
                self.model, self.names = model, names

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                out = self.model(**dict(zip(self.names, tensors, strict=True)), return_dict=True)
                return out.last_hidden_state  # type: ignore[no-any-return]

        was_training = auto_model.training
        auto_model.eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One knob for both runtimes: with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep
        # instead of spinning) ONNX Runtime's idle threads sleep too.
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if passive else "1")
        axes = {k: {0: "batch", 1: "tokens"} for k in [*self.input_names, "hidden"]}
        try:
            # The tracer's warnings (legacy exporter, shape checks read as constants) are
            # expected: the exported graph is checked against torch on varied shapes in the tests.
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = str(Path(tmp) / "model.onnx")
                torch.onnx.export(
                    _Hidden(auto_model, self.input_names),
                    tuple(sample[k] for k in self.input_names),
                    path,
                    input_names=self.input_names,
                    output_names=["hidden"],
                    dynamic_axes=axes,
                    opset_version=17,
                    dynamo=False,
                )
                self.session = ort.InferenceSession(
                    path, options, providers=["CPUExecutionProvider"]
                )
        finally:
            auto_model.train(was_training)

    def __call__(self, feats: dict[str, Any]) -> Any:
        """A tokenised batch (the model's features: ``input_ids``, ``attention_mask`` ...,
        ``(b, s)`` each) -> ``(b, d)`` torch float32 sentence embeddings (not renormalised)."""
        import torch

        inputs = {k: feats[k].cpu().numpy() for k in self.input_names}
        hidden = self.session.run(["hidden"], inputs)[0]  # (b, s, h)
        out: dict[str, Any] = {**feats, "token_embeddings": torch.from_numpy(hidden)}
        for module in self.rest:
            out = module(out)
        return out["sentence_embedding"]


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
    batch_size = min(config.max_batch_size, FORWARD_BATCH_SIZE)
    return ServedEncoder(encoder, adaptor, batch_size, backend=config.backend)


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
