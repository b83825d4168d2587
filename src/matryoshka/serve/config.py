"""The server's configuration: :class:`ServeConfig`, validated once when it is built.

Every field carries its one-line help as ``metadata["help"]``; ``mrl serve`` generates its flags
from these fields (:mod:`matryoshka.cli.serve`), so the CLI and the Python API cannot drift apart.
Two further metadata keys shape a flag: ``choices`` (the accepted values) and ``flag`` (the flag's
name when it is not the field's, e.g. the repeatable ``--alias`` for ``aliases``).

This module imports nothing beyond the standard library: the CLI reads it without FastAPI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["BACKENDS", "LONG_INPUT_POLICIES", "ServeConfig"]

#: Where the encoder's forward pass runs: torch, or ONNX Runtime (the ``onnx`` extra).
BACKENDS = ("torch", "onnx")

#: What happens to a text over the length limits: a 400 error, or a cut to the limits.
LONG_INPUT_POLICIES = ("reject", "truncate")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with ``default`` and its CLI help (plus ``choices`` / ``flag``)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class ServeConfig:
    """Everything the server needs; validated once in ``__post_init__``.

    Attributes:
        model: sentence-transformers model name or path; ``None`` is the bundled MiniLM.
        model_name: the base model's id (default: the model's name); the served id without an
            adaptor.
        served_model_name: the id the server reports and clients pass as ``model``; default:
            ``model_name``, or with an adaptor ``<model_name>+adaptor-<8 hex of the adaptor
            weights' SHA-256>`` (then the base id is refused: its vectors differ).
        aliases: further ids accepted as ``model``.
        adaptor: path of a saved :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` making the
            model's prefixes good; without one, sizes are plain truncations of the model's output.
        corpus: ``(N, d)`` ``.npy`` corpus embeddings (in the served space: adapted if an adaptor
            is used) for ``/v1/search``.
        index: a saved shortlist index (``mrl index build``) over that corpus; a full-size exact
            index can stand in for ``corpus``. Or a saved funnel folder (``mrl index build
            --kind funnel``): ``/v1/search`` then answers with it (its shortlist backend and
            rerank matrix) unless a request names another shortlist size or a target recall;
            a float32 rerank matrix stands in for ``corpus``.
        host, port: where uvicorn listens.
        device: torch device of the encoder.
        backend: ``"torch"`` (default) or ``"onnx"``: the model's transformer exported at
            start-up and run in ONNX Runtime on the CPU (``pip install 'matryoshka[onnx]'``);
            same vectors to ~1e-7.
        max_inputs: most texts in one request.
        max_input_tokens: most tokens per text, special tokens included (``None``: the model's
            ``max_seq_length``).
        max_input_chars: most characters per text (a cheap guard before tokenising).
        long_input: ``"reject"`` (400) or ``"truncate"`` (cut to the limits) for longer texts.
        batching: dynamic batching of concurrent requests (``False``: one encoder call each).
        max_batch_size: most texts per encoder call.
        max_wait_ms: how long the first request of a batch waits for company.
        max_k: largest ``k`` accepted by ``/v1/search``.
        tune_queries_file: ``(Q, d)`` ``.npy`` of held-out query embeddings (in the served space,
            not corpus rows) on which a funnel is tuned for a ``target_recall``.
        tune_queries: without ``tune_queries_file``: how many stand-in queries are made from
            corpus rows, each perturbed by Gaussian noise (see ``tune_noise``) and renormalised.
        tune_noise: ``sigma``, the expected norm of the noise added to a (unit) corpus row to
            make a stand-in query: ``q = normalize(x + sigma * g / sqrt(d))``, ``g ~ N(0, I_d)``
            (0.5 puts a stand-in at cosine ~0.89 from its row).
        max_body_bytes: largest request body accepted (HTTP 413 beyond), checked before parsing.
        allow_model_mismatch: serve an ``index`` whose header names another model (or
            ``"unknown"``), with a warning, instead of refusing to start.
        log_level: uvicorn's log level.
    """

    model: str | None = _opt(
        None, "sentence-transformers model name or path (default: bundled MiniLM)"
    )
    model_name: str | None = _opt(
        None, "base model id (default: the model's name); the served id without --adaptor"
    )
    served_model_name: str | None = _opt(
        None,
        "id reported and accepted as `model` (default: --model-name, or with --adaptor "
        "MODEL+adaptor-<8 hex of its SHA-256>)",
    )
    aliases: tuple[str, ...] = _opt((), "further accepted model ids (repeatable)", flag="alias")
    adaptor: str | None = _opt(
        None, "saved MatryoshkaAdaptor (stem of .json/.safetensors): nested sizes"
    )
    corpus: str | None = _opt(
        None, "(N, d) .npy corpus embeddings, in the served space, for /v1/search"
    )
    index: str | None = _opt(
        None,
        "saved shortlist index over the corpus (`mrl index build`), or a saved funnel folder "
        "(`--kind funnel`) that /v1/search then answers with",
    )
    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8000, "TCP port")
    device: str = _opt("cpu", "torch device of the encoder")
    backend: str = _opt(
        "torch",
        "forward pass in 'torch' or 'onnx' (ONNX Runtime, CPU; pip install 'matryoshka[onnx]')",
        choices=BACKENDS,
    )
    max_inputs: int = _opt(256, "most texts per request")
    max_input_tokens: int | None = _opt(
        None, "most tokens per text (default: the model's max_seq_length)"
    )
    max_input_chars: int = _opt(20_000, "most characters per text")
    long_input: str = _opt(
        "reject",
        "longer texts: 'reject' (HTTP 400) or 'truncate'",
        choices=LONG_INPUT_POLICIES,
    )
    batching: bool = _opt(True, "dynamic batching of concurrent requests")
    max_batch_size: int = _opt(64, "most texts per encoder call")
    max_wait_ms: float = _opt(5.0, "how long a batch waits for more requests (ms)")
    max_k: int = _opt(1000, "largest k accepted by /v1/search")
    tune_queries_file: str | None = _opt(
        None, "(Q, d) .npy held-out query embeddings to tune target_recall funnels on"
    )
    tune_queries: int = _opt(
        200, "without --tune-queries-file: stand-in queries (noisy corpus rows) for tuning"
    )
    tune_noise: float = _opt(
        0.5, "noise norm sigma of the stand-in tuning queries (unit rows + noise, renormalised)"
    )
    max_body_bytes: int = _opt(2_000_000, "largest request body in bytes (HTTP 413 beyond)")
    allow_model_mismatch: bool = _opt(
        False, "serve an --index built for another (or an unknown) model, with a warning"
    )
    log_level: str = _opt("warning", "uvicorn log level")

    def __post_init__(self) -> None:
        for name in (
            "max_inputs",
            "max_input_chars",
            "max_batch_size",
            "max_k",
            "tune_queries",
            "max_body_bytes",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("model_name", "served_model_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"{name}={value!r} must be a non-empty string, e.g. 'my-model' (or omit it)."
                )
        if isinstance(self.tune_noise, bool) or not (
            isinstance(self.tune_noise, int | float) and 0 < self.tune_noise <= 10
        ):
            raise ValueError(
                f"tune_noise={self.tune_noise!r} must be a number in (0, 10], e.g. 0.5 (the norm "
                "of the noise added to a unit corpus row)."
            )
        _check_int("port", self.port, 0)
        if self.max_input_tokens is not None:
            _check_int("max_input_tokens", self.max_input_tokens, 3)
        if self.long_input not in LONG_INPUT_POLICIES:
            raise ValueError(
                f"long_input={self.long_input!r} is not a policy: use 'reject' or 'truncate'."
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend={self.backend!r} is not a backend: use 'torch' or 'onnx' (ONNX Runtime, "
                "`pip install 'matryoshka[onnx]'`)."
            )
        if self.backend == "onnx" and self.device != "cpu":
            raise ValueError(
                f"backend='onnx' runs on the CPU, but device={self.device!r}: pass device='cpu' "
                "or use backend='torch'."
            )
        if isinstance(self.max_wait_ms, bool) or not (
            isinstance(self.max_wait_ms, int | float) and 0 <= self.max_wait_ms <= 10_000
        ):
            raise ValueError(
                f"max_wait_ms={self.max_wait_ms!r} must be a number of milliseconds in "
                "[0, 10000], e.g. 5."
            )
        self.aliases = tuple(self.aliases)


def _check_int(name: str, value: Any, low: int) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}.")
