"""BEIR folders: the reader, its errors, and pytrec_eval's metrics against our own."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from matryoshka.data.beir import is_beir_folder, load_beir
from matryoshka.evaluation.metrics import mrr_at_k, ndcg_at_k, recall_at_k, top_k_indices
from tests.text_data import THINGS, write_beir

pytest.importorskip("pytrec_eval")

from matryoshka.evaluation.beir import ir_metrics, rank_corpus


def test_load_beir_reads_one_split(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "b", ("test", "dev"))
    assert is_beir_folder(folder)
    data = load_beir(folder, "test")
    assert data.name == "b"
    assert len(data.corpus) == len(THINGS) + 8
    assert data.corpus[0] == f"cat {THINGS[0][1]}"  # title and text joined
    assert data.corpus[-1] == "an unrelated note number 7"  # no title
    assert data.query_ids == tuple(f"q{i}" for i in range(len(THINGS)))
    assert data.qrels["q0"] == {"d0": 1, "d1": 2}  # the header row is skipped; grades kept


def _corrupt(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"_id": "d1" "text": "b"}\n', "line 2: not valid JSON"),
        ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"text": "b"}\n', "line 2: no '_id' key (it has ['text'])"),
        ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"_id": "d0", "text": "b"}\n', "the document id 'd0' repeats"),
        ("queries.jsonl", '{"_id": "q0", "text": 3}\n', "line 1: 'text' is a int, not a string"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq0 d0 1\n", "test.tsv, line 2: 1 tab-separated field(s), not 3"),
        ("qrels/test.tsv", "q0\td0\t0\n", "judges no query of"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq0\td0\tx\n", "line 2: score='x' is not a number"),
        ("qrels/test.tsv", "zz\td0\t1\n", "judges no query of"),
    ],
    ids=["json", "no-id", "repeat", "text-type", "fields", "grade-0", "score", "no-query"],
)  # fmt: skip
def test_bad_beir_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    folder = write_beir(tmp_path / "b")
    _corrupt(folder, name, text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_beir(folder)


def test_a_missing_split_names_the_splits_there(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "b", ("test", "dev"))
    with pytest.raises(FileNotFoundError, match=re.escape("(qrels there: ['dev', 'test'])")):
        load_beir(folder, "train")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl does not exist"):
        load_beir(folder)


def test_pytrec_eval_agrees_with_our_metrics_on_the_same_run() -> None:
    """Binary qrels, random (tie-free) embeddings, a corpus larger than 100, some relevant
    documents ranked below 100 and one judged document missing from the corpus."""
    rng = np.random.default_rng(0)
    n_docs, n_q, d = 300, 40, 16
    c = rng.normal(size=(n_docs, d)).astype(np.float32)
    q = rng.normal(size=(n_q, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    qrels = {
        f"q{j}": {f"d{i}": 1 for i in rng.choice(n_docs, size=1 + j % 5, replace=False)}
        for j in range(n_q)
    }
    qrels["q0"]["missing-doc"] = 1  # judged relevant, not in the corpus: recall can't reach 1
    idx = rank_corpus(q, c, 100)
    np.testing.assert_array_equal(idx, top_k_indices(q @ c.T, 100))
    ranked = {f"q{j}": [doc_ids[i] for i in row] for j, row in enumerate(idx)}
    got = ir_metrics(qrels, ranked)

    rel = np.array([[doc_ids[i] in qrels[f"q{j}"] for i in row] for j, row in enumerate(idx)])
    n_rel = np.array([len(qrels[f"q{j}"]) for j in range(n_q)])
    ours = {
        "ndcg@10": ndcg_at_k(rel[:, :10], n_rel),
        "recall@100": recall_at_k(rel, n_rel),
        "mrr@10": mrr_at_k(rel[:, :10]),
    }
    assert 0 < ours["recall@100"] < 1  # the check has something to disagree about
    assert ours["ndcg@10"] > 0
    for name, value in ours.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_ir_metrics_keeps_our_order_on_ties_and_counts_unranked_queries() -> None:
    qrels = {"a": {"x": 1}, "b": {"y": 1}}
    got = ir_metrics(qrels, {"a": ["z", "x"]})  # b has no ranking: it scores 0
    assert got["mrr@10"] == pytest.approx(0.5 * 0.5)
    assert got["recall@100"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="qrels is empty"):
        ir_metrics({}, {})
