import json
import subprocess
import sys

import pytest

import matryoshka
from matryoshka.cli import build_parser, main


def test_train_eval_report_round_trip(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("backbone: mlp\nbackbone_width: 32\nsizes: [2, 4, 8]\nepochs: 5\n")
    out = tmp_path / "run"
    assert (
        main(["train", "--config", str(cfg), "--epochs", "1", "--no-progress", "--out", str(out)])
        == 0
    )
    saved = json.loads((out / "model.json").read_text())
    assert saved["meta"]["config"]["epochs"] == 1  # the flag overrides the recipe
    assert saved["meta"]["config"]["backbone"] == "mlp"
    assert main(["eval", "--run", str(out / "model.json"), "--out", str(tmp_path / "e.json")]) == 0
    table = json.loads((tmp_path / "e.json").read_text())["test_top1"]
    assert list(table) == ["2", "4", "8"]
    assert table["8"] > 0.3  # chance is 0.1; one epoch
    assert "top-1" in capsys.readouterr().out
    # the old spellings still work for one release, with a warning naming the new flag
    old = tmp_path / "old.json"
    assert main(["eval", "--model", str(out / "model.json"), "--json", str(old)]) == 0
    assert json.loads(old.read_text())["test_top1"] == table
    err = capsys.readouterr().err
    assert "--model is deprecated" in err
    assert "use --run" in err
    assert "--json is deprecated" in err
    assert "use --out" in err


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


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "flag", [["--method", "mrl-e"], ["--device", "cpu"], ["--amp"], ["--augment-shift", "2"]]
)
def test_text_recipe_refuses_image_only_flags(tmp_path, flag):
    recipe = _recipe(tmp_path, "task: text\ntrain_pairs: 16\n")
    with pytest.raises(SystemExit, match=rf"{flag[0]} does not apply to a text recipe"):
        main(["train", "--config", recipe, *flag])


def test_image_recipe_refuses_text_only_flags(tmp_path):
    recipe = _recipe(tmp_path, "backbone: mlp\n")
    with pytest.raises(SystemExit, match=r"--train-pairs does not apply to a image recipe"):
        main(["train", "--config", recipe, "--train-pairs", "100"])


def test_unknown_task_names_task(tmp_path):
    recipe = _recipe(tmp_path, "task: txt\ntrain_pairs: 16\n")
    with pytest.raises(
        SystemExit, match=r"task='txt' in --config .* is not one of \['image', 'text'\]"
    ):
        main(["train", "--config", recipe])


def test_text_flags_reach_the_text_recipe(tmp_path):
    from matryoshka.cli.train import train_config

    recipe = _recipe(tmp_path, "task: text\ntrain_pairs: 16\nsizes: [8, 384]\n")
    args = build_parser("train").parse_args(
        ["train", "--config", recipe, "--train-pairs", "32", "--epochs", "2", "--out", "x"]
    )
    config = train_config(args)
    assert (config.train_pairs, config.epochs, config.out_dir, config.sizes) == (
        32,
        2,
        "x",
        [8, 384],
    )


def test_recipe_ladder_is_spelled_sizes(tmp_path):
    from matryoshka.cli.train import train_config

    recipe = _recipe(tmp_path, "backbone: mlp\nsizes: [2, 4, 8]\n")
    config = train_config(build_parser("train").parse_args(["train", "--config", recipe]))
    assert (config.nesting, config.embed_dim) == ([2, 4, 8], 8)
    old = _recipe(tmp_path, "backbone: mlp\nembed_dim: 8\nnesting_start: 2\n")
    with pytest.warns(FutureWarning, match=r"\['nesting_start', 'embed_dim'\] are deprecated"):
        config = train_config(build_parser("train").parse_args(["train", "--config", old]))
    assert list(config.nesting_obj()) == [2, 4, 8]
    both = _recipe(tmp_path, "backbone: mlp\nsizes: [2, 4, 8]\nembed_dim: 8\n")
    with pytest.raises(SystemExit, match=r"gives the ladder twice"):
        train_config(build_parser("train").parse_args(["train", "--config", both]))


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mrl (matryoshka) {matryoshka.__version__}"


def test_help_imports_no_heavy_library():
    """`mrl --help` and `mrl train --help` import neither torch nor the command modules they do
    not need (a subprocess: this test process has torch loaded already)."""
    code = (
        "import sys, contextlib, io\n"
        "from matryoshka.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['serve', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = ('torch', 'fastapi', 'faiss', 'sentence_transformers', 'uvicorn')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
