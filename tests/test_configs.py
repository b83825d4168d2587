from pathlib import Path

import pytest
import yaml

from matryoshka.config import load_recipe
from matryoshka.training.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_train_config(path):
    data = yaml.safe_load(path.read_text())
    if "method" not in data:  # recipes of other entry points carry their own schema
        pytest.skip(f"{path.name} is not a TrainConfig recipe")
    assert "sizes" in data  # the ladder is spelled one way in every recipe
    config = load_recipe(TrainConfig, path)
    assert config.nesting_obj().dim == config.embed_dim
    assert list(config.nesting_obj()) == data["sizes"]
