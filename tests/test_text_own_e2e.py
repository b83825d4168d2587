"""The issue's end-to-end path: your pairs.jsonl and your BEIR folder, two commands, a per-size
report (`mrl train --config own.yaml`, `mrl eval --run ... --beir ...`), on tiny generated files
and a 1-layer MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from matryoshka.cli import main
from matryoshka.report import validate_results
from tests.markers import needs_text
from tests.text_data import THINGS, tiny_model, write_beir, write_pairs

pytestmark = [needs_text, pytest.mark.usefixtures("one_thread")]
pytest.importorskip("pytrec_eval")

METHODS = ["base truncated", "base + PCA", "base + adaptor", "fine-tuned"]


def test_own_pairs_and_a_beir_folder_in_two_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, as a user writes them
    model = tiny_model(tmp_path / "tiny")
    write_pairs(tmp_path / "pairs.jsonl", ("query", "doc"))
    write_beir(tmp_path / "beir")
    recipe = {
        "task": "text",
        "model": "tiny",
        "data": "pairs.jsonl",
        "columns": ["query", "doc"],
        "sizes": [32, 128, 384],
        "batch_size": 8,
        "lr": 1e-4,
        "out_dir": "runs/own",
        "cache_dir": "cache",
        "progress": False,
    }
    Path("own.yaml").write_text(yaml.safe_dump(recipe))
    assert Path(model).name == "tiny"

    assert main(["train", "--config", "own.yaml"]) == 0
    assert "mrl eval --run runs/own --beir FOLDER" in capsys.readouterr().out

    argv = ["eval", "--run", "runs/own", "--beir", "beir", "--split", "test", "--out", "beir.json"]
    assert main([*argv, "--adaptor-epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert metric in printed
    for method in METHODS:
        assert method in printed
    res = json.loads(Path("beir.json").read_text())
    validate_results(res)
    assert res["sizes"] == [32, 128, 384]
    assert res["meta"]["queries"] == len(THINGS)
    assert res["meta"]["corpus"] == len(THINGS) + 8
    assert res["meta"]["metrics_library"] == "pytrec_eval"
    assert set(res["metrics"]) == {"ndcg@10", "recall@100", "mrr@10"}
    for table in res["metrics"].values():
        assert list(table) == METHODS
        for values in table.values():
            assert len(values) == 3
            assert all(0.0 <= v <= 1.0 for v in values)
    ndcg = res["metrics"]["ndcg@10"]
    # at full size PCA is a rotation: the same cosines, the same ranking
    assert ndcg["base + PCA"][-1] == pytest.approx(ndcg["base truncated"][-1], abs=1e-4)
    assert ndcg["base truncated"][-1] > 0.3  # even one layer finds the described thing
    assert ndcg["fine-tuned"] != ndcg["base truncated"]  # two steps moved the weights


def test_eval_errors_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_model(tmp_path / "tiny")
    write_pairs(tmp_path / "pairs.jsonl")
    recipe = {"task": "text", "model": "tiny", "data": "pairs.jsonl", "sizes": [32, 384]}
    Path("own.yaml").write_text(yaml.safe_dump({**recipe, "out_dir": "run", "progress": False}))
    assert main(["train", "--config", "own.yaml", "--batch-size", "8"]) == 0
    with pytest.raises(SystemExit, match=r"trained on your data \(data='pairs\.jsonl'\).*--beir"):
        main(["eval", "--run", "run"])
    with pytest.raises(SystemExit, match=r"--beir 'nope': .*corpus\.jsonl does not exist"):
        main(["eval", "--run", "run", "--beir", "nope"])
    Path("bad.jsonl").write_text('{"q": "a", "d": "b"}\n{"q": "c", "d": "d"}\n')
    with pytest.raises(
        SystemExit, match=r"mrl: bad config: data='bad\.jsonl' has no column 'anchor'"
    ):
        main(["train", "--config", "own.yaml", "--data", "bad.jsonl", "--out", "run2"])
    image_run = tmp_path / "model.json"
    image_run.write_text("{}")
    with pytest.raises(SystemExit, match=r"--beir 'b' scores text runs"):
        main(["eval", "--run", str(image_run), "--beir", "b"])
