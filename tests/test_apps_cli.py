"""`mrl app <name>` and `mrl embed-images`: parsing, recipes, and errors a user can trigger."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from matryoshka.apps import APPS, get_app
from matryoshka.cli import build_parser
from matryoshka.cli.apps import load_app_config

RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("app_*.yaml"))


def _parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_app_recipe_builds_its_config(path):
    data = yaml.safe_load(path.read_text())
    assert "method" not in data  # not a TrainConfig recipe
    config = load_app_config(data["app"], str(path), {})
    assert type(config) is get_app(data["app"])[0]


def test_every_app_has_a_recipe():
    assert {yaml.safe_load(p.read_text())["app"] for p in RECIPES} == set(APPS)


def test_flags_override_the_recipe():
    args = _parser().parse_args(
        [
            "app",
            "multitask",
            "--config",
            "configs/app_multitask.yaml",
            "--epochs",
            "2",
            "--tasks",
            "digit",
            "parity",
            "--no-single-task-baselines",
        ]
    )
    assert args.app == "multitask"
    assert args.epochs == 2
    assert args.tasks == ["digit", "parity"]
    assert args.single_task_baselines is False


def test_user_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"app='nope' is not one of"):
        get_app("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_app_config("rl", str(tmp_path / "missing.yaml"), {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("app: rl\ntotal_steps: 10\n")
    with pytest.raises(ValueError, match="is a recipe for app 'rl', not 'depth'"):
        load_app_config("depth", str(recipe), {})
    recipe.write_text("app: rl\nsteps: 10\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['steps'\] for RLConfig"):
        load_app_config("rl", str(recipe), {})
    args = _parser().parse_args(["app", "rl", "--config", str(recipe)])
    assert args.func(args) == 2
    assert "unknown config keys" in capsys.readouterr().err


def test_embed_images_reports_a_missing_model(tmp_path, capsys):
    args = _parser().parse_args(
        ["embed-images", "--run", str(tmp_path / "none.json"), "--out", str(tmp_path / "z.npy")]
    )
    assert args.func(args) == 2
    assert "mrl: error" in capsys.readouterr().err
