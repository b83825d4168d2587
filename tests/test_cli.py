import json

import pytest

from matryoshka.cli import build_parser, main


def test_train_eval_report_round_trip(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("backbone: mlp\nbackbone_width: 32\nembed_dim: 8\nepochs: 5\n")
    out = tmp_path / "run"
    assert (
        main(
            ["train", "--config", str(cfg), "--epochs", "1", "--no-progress", "--out-dir", str(out)]
        )
        == 0
    )
    saved = json.loads((out / "model.json").read_text())
    assert saved["meta"]["config"]["epochs"] == 1  # the flag overrides the recipe
    assert saved["meta"]["config"]["backbone"] == "mlp"
    assert (
        main(["eval", "--model", str(out / "model.json"), "--json", str(tmp_path / "e.json")]) == 0
    )
    table = json.loads((tmp_path / "e.json").read_text())["test_top1"]
    assert list(table) == ["2", "4", "8"]
    assert table["8"] > 0.3  # chance is 0.1; one epoch
    assert "top-1" in capsys.readouterr().out


def test_bad_config_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match=r"bad config: method='svd' is not one of"):
        main(["train", "--method", "svd"])
    with pytest.raises(SystemExit, match=r"--config 'nope.yaml' does not exist"):
        main(["train", "--config", "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(SystemExit, match=r"unknown config keys \['epoch'\]"):
        main(["train", "--config", str(bad)])


def test_parser_has_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "eval", "demo", "report"} <= set(sub.choices or ())
