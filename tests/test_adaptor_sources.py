"""`mrl adaptor fit` on the inputs of `mrl train` and `mrl eval --beir`: a pairs file, a BEIR corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matryoshka.cli import main
from matryoshka.models.adaptor import MatryoshkaAdaptor
from tests.markers import needs_text
from tests.text_data import tiny_model

pytestmark = [needs_text, pytest.mark.usefixtures("one_thread")]


def _write(tmp_path: Path, n: int = 200) -> tuple[Path, Path]:
    """``n`` (question, answer) pairs and a BEIR folder of ``2n`` documents: >= 384 texts each."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"q": f"question {i}?", "d": f"answer number {i}"}) + "\n" for i in range(n)
        )
    )
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "text": f"document {i} about topic {i % 7}"} for i in range(2 * n)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "topic 0"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return pairs, beir


def test_adaptor_fit_on_pairs_and_on_a_beir_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model(tmp_path / "tiny")
    pairs, beir = _write(tmp_path)
    common = ["--model", model, "--sizes", "32", "384", "--epochs", "1", "--hidden", "16"]
    common += ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    argv = ["adaptor", "fit", "--pairs", str(pairs), "--columns", "q", "d", "--supervised"]
    assert main([*argv, *common, "--reg", "0.5", "--out", str(tmp_path / "a")]) == 0
    assert "fitted on 400 embeddings (pairs:" in capsys.readouterr().out
    assert list(MatryoshkaAdaptor.load(tmp_path / "a").nesting) == [32, 384]
    assert main(["adaptor", "fit", "--beir", str(beir), *common, "--out", str(tmp_path / "b")]) == 0
    assert "fitted on 400 embeddings (beir:" in capsys.readouterr().out

    assert main(["adaptor", "fit", "--pairs", str(pairs), *common, "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "--pairs=" in err
    assert "its columns are ['q', 'd']" in err
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((400, 384), dtype=np.float32))
    assert (
        main(["adaptor", "fit", "--embeddings", str(x), "--supervised", *common, "--out", "y"]) == 2
    )
    assert "--supervised fits on the (anchor, positive) pairs of --pairs" in capsys.readouterr().err
