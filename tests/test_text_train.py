"""`mrl train` with a text recipe and `mrl eval` on the saved run: a few real MiniLM steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from matryoshka.cli import main
from matryoshka.evaluation.text import evaluate_text_model, is_text_run
from matryoshka.training.text import TextTrainConfig, train_text
from tests.markers import needs_text, needs_wordnet

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).parent.parent / "configs" / "text_wordnet_mrl.yaml"


TEXT_RECIPES = [
    p
    for p in sorted(RECIPE.parent.glob("*.yaml"))
    if (yaml.safe_load(p.read_text()) or {}).get("task") == "text"
]


def test_the_text_recipes_are_found() -> None:
    assert RECIPE in TEXT_RECIPES
    assert len(TEXT_RECIPES) >= 2


@pytest.mark.parametrize("path", TEXT_RECIPES, ids=lambda p: p.name)
def test_every_shipped_text_recipe_is_a_valid_config(path: Path) -> None:
    config = TextTrainConfig.from_dict(yaml.safe_load(path.read_text()))
    assert config.matryoshka
    assert config.sizes[-1] == 384


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("task", "image", "task='image' must be 'text'"),
        ("sizes", [8, 4], "sizes"),
        ("train_fraction", 0.0, "train_fraction=0.0 must be a share"),
        ("test_fraction", 0.99, "the splits must not overlap"),
        ("train_pairs", 1, "train_pairs=1 must be an int >= 2"),
        ("lr", -1.0, "lr=-1.0 must be a float > 0.0"),
        ("bogus", 1, "unknown config keys ['bogus'] for TextTrainConfig"),
        ("n_sizes_per_step", 9, "n_sizes_per_step=9 must be null (every size) or an int in [1, 7]"),
        ("layers", [5, 3], "layers=[5, 3] must be null or increasing 0-based layer indices"),
    ],
)
def test_bad_text_config_values_are_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TextTrainConfig.from_dict({key: value})


def test_eval_of_a_folder_without_a_text_run_is_explained(tmp_path: Path) -> None:
    assert not is_text_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no text_model\.json"):
        evaluate_text_model(tmp_path)


@needs_text
def test_a_ladder_not_ending_at_the_model_dimension_is_refused_before_training(
    tmp_path: Path,
) -> None:
    """Checked right after the encoder loads: before WordNet is read (the root below does not
    exist) and before anything is written."""
    config = TextTrainConfig(
        sizes=[8, 64],
        wordnet_root=str(tmp_path / "no-wordnet"),
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    message = (
        r"sizes=\[8, 64\] ends at 64, but all-MiniLM-L6-v2 embeds in 384 dimensions: "
        r"make the last size 384\."
    )
    with pytest.raises(ValueError, match=message):
        train_text(config)
    assert not any(tmp_path.iterdir())


@needs_text
@needs_wordnet
def test_train_then_eval_a_text_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "text.yaml"
    out = tmp_path / "run"
    recipe.write_text(
        yaml.safe_dump(
            {
                "task": "text",
                "sizes": [32, 128, 384],
                "train_fraction": 0.001,  # ~118 synsets
                "test_fraction": 0.0005,  # ~59 held-out synsets
                "train_pairs": 16,
                "batch_size": 8,
                "lr": 1e-4,
                "out_dir": str(out),
                "cache_dir": str(tmp_path / "cache"),
                "ood_test_size": 20,  # the out-of-domain check, on 20 docstring pairs
                "progress": False,
            }
        )
    )
    # --seed is a TrainConfig flag too: shared flags override the recipe's keys.
    assert main(["train", "--config", str(recipe), "--seed", "3"]) == 0
    meta = json.loads((out / "text_model.json").read_text())
    assert meta["config"]["seed"] == 3
    assert meta["train_pairs"] == 16
    assert (out / "model" / "config.json").is_file()

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed
    assert "fine-tuned" in printed
    res = json.loads(report.read_text())
    assert res["sizes"] == [32, 128, 384]
    assert res["meta"]["queries"] > 20
    tuned = np.array(res["metrics"]["ndcg@10"]["fine-tuned"])
    base = np.array(res["metrics"]["ndcg@10"]["base truncated"])
    assert tuned.shape == base.shape == (3,)
    assert ((tuned >= 0) & (tuned <= 1)).all()
    assert ((base >= 0) & (base <= 1)).all()
    # Sixteen pairs at lr 1e-4 change the weights: the fine-tuned scores are its own.
    assert not np.allclose(tuned, base)


@needs_text
@needs_wordnet
def test_2d_training_with_sampled_sizes(tmp_path: Path) -> None:
    """layers + n_sizes_per_step: the 2D loss over layers 3 and 5 with 2 sizes a step."""
    common = {
        "sizes": [32, 128, 384],
        "train_fraction": 0.001,
        "test_fraction": 0.0005,
        "train_pairs": 8,
        "batch_size": 4,
        "lr": 1e-4,
        "n_sizes_per_step": 2,
        "cache_dir": str(tmp_path / "cache"),
        "ood_test_size": 20,
        "progress": False,
    }
    with pytest.raises(ValueError, match=r"layers=\[1, 3\] must end at the model's last layer \(5"):
        train_text(
            TextTrainConfig.from_dict({**common, "layers": [1, 3], "out_dir": str(tmp_path)})
        )
    out = train_text(
        TextTrainConfig.from_dict({**common, "layers": [3, 5], "out_dir": str(tmp_path / "r")})
    )
    meta = json.loads((out / "text_model.json").read_text())
    assert meta["config"]["layers"] == [3, 5]
    assert meta["config"]["n_sizes_per_step"] == 2
    from matryoshka.models.text_encoder import TextEncoder

    base, tuned = TextEncoder(), TextEncoder(str(out / "model"))
    texts = ["a domestic animal", "to run fast", "the edge of a river"]
    full = tuned.encode(texts, progress=False)
    moved = np.abs(full - base.encode(texts, progress=False)).max()
    assert moved > 1e-4  # two steps of the 2D loss changed the weights
    # MiniLM's sentence embedding is the normalised mean pool of its last layer
    exits = tuned.encode(texts, layers=[3, 5], progress=False)
    assert exits.shape == (2, 3, 384)
    np.testing.assert_allclose(exits[1], full, atol=1e-5)
    assert np.abs(exits[0] - full).max() > 1e-2  # layer 4's output is another vector
    with pytest.raises(ValueError, match=r"layers=\[6\] must be 0-based layer indices in \[0, 5\]"):
        tuned.encode(texts, layers=[6])

    res = evaluate_text_model(out, progress=False)
    exit_labels = {"fine-tuned, exit after layer 4 of 6", "base, exit after layer 4 of 6"}
    assert set(res["metrics"]["ndcg@10"]) == {"fine-tuned", "base truncated", *exit_labels}
    for label in exit_labels:
        assert len(res["metrics"]["ndcg@10"][label]) == 3
