"""The served encoder's forward passes: length-sorted passes of FORWARD_BATCH_SIZE inputs (torch)
and the opt-in ONNX Runtime backend, each checked against sentence-transformers' own encode."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from matryoshka.cli import build_parser
from matryoshka.cli.serve import config_from_args
from matryoshka.models.text_encoder import TextEncoder
from matryoshka.serve import ServeConfig
from matryoshka.serve.encoder import FORWARD_BATCH_SIZE, OnnxForward, ServedEncoder, load_encoder

WORDS = [
    "cat",
    "dog",
    "tree",
    "river",
    "stone",
    "cloud",
    "house",
    "music",
    "light",
    "paper",
    "window",
    "garden",
]


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 1-40 random words (so forward passes pad very differently)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 41))).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def reference(encoder: TextEncoder, batch: list[str]) -> np.ndarray:
    """sentence-transformers' own encode, one text at a time (no padding at all): ``(n, d)``."""
    return np.stack([encoder.model.encode([t], normalize_embeddings=True)[0] for t in batch])


def test_sorted_forward_passes_match_unpadded_encoding(encoder: TextEncoder) -> None:
    served = load_encoder(ServeConfig(max_batch_size=64), encoder=encoder)
    assert served.batch_size == FORWARD_BATCH_SIZE == 16
    batch = texts(24)
    ids = [served.tokenizer(t)["input_ids"] for t in batch[:6]]
    # Token ids first, then texts: the output keeps the request order whatever the sort did.
    z = served([*ids, *batch])
    ref = reference(encoder, batch)
    np.testing.assert_allclose(z[6:], ref, atol=2e-6)
    np.testing.assert_allclose(z[:6], ref[:6], atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)


def test_backend_mistakes_name_the_fix(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match=r"backend='tensorrt' is not a backend: use 'torch' or"):
        ServeConfig(backend="tensorrt")
    with pytest.raises(ValueError, match=r"backend='onnx' runs on the CPU, but device='cuda'"):
        ServeConfig(backend="onnx", device="cuda")
    with pytest.raises(ValueError, match=r"backend='tpu' is not a backend: use one of"):
        ServedEncoder(encoder, None, 16, backend="tpu")


def test_cli_flag_reaches_the_config() -> None:
    parser = build_parser("serve")
    assert config_from_args(parser.parse_args(["serve"])).backend == "torch"
    assert config_from_args(parser.parse_args(["serve", "--backend", "onnx"])).backend == "onnx"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--backend", "openvino"])


def test_onnx_without_onnxruntime_names_the_extra(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'matryoshka\[onnx\]'"):
        OnnxForward(encoder)


def test_onnx_refuses_a_model_without_a_transformer() -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    odd = TextEncoder(SentenceTransformer(modules=[Normalize()], device="cpu"), name="odd")
    with pytest.raises(ValueError, match=r"first module is a Hugging Face transformer.*'odd'"):
        OnnxForward(odd)


@pytest.mark.slow
def test_onnx_backend_gives_the_torch_vectors(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # idle ONNX Runtime threads sleep too
    served = load_encoder(ServeConfig(backend="onnx"), encoder=encoder)
    assert served.onnx is not None
    options = served.onnx.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    batch = texts(24, seed=1)
    ids = [served.tokenizer(t)["input_ids"] for t in batch[:6]]
    z = served([*batch, *ids])
    ref = reference(encoder, batch)
    cos = np.sum(z[:24] * ref, axis=1)
    assert cos.min() > 1 - 1e-5, cos.min()
    np.testing.assert_allclose(z[24:], ref[:6], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
