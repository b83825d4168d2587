"""Your own text pairs (``data:``): every format through ``datasets``, columns, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from matryoshka.training.text import TextTrainConfig
from tests.text_data import write_pairs

datasets = pytest.importorskip("datasets")

from matryoshka.data.pairs import load_pairs, pair_columns  # noqa: E402

ROWS = {"q": ["what is a cat?", "what is a dog?", "what is rain?"], "d": ["a cat", "a dog", "rain"]}


def _same(ds: object, anchors: list[str], positives: list[str]) -> None:
    assert ds.column_names == ["anchor", "positive"]  # type: ignore[attr-defined]
    assert list(ds["anchor"]) == anchors  # type: ignore[index]
    assert list(ds["positive"]) == positives  # type: ignore[index]


def test_every_format_gives_anchor_and_positive(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict({**ROWS, "id": [1, 2, 3]})
    table.to_json(str(tmp_path / "p.jsonl"))
    table.to_csv(str(tmp_path / "p.csv"), index=False)
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    for name in ("p.jsonl", "p.csv", "p.parquet", "folder", "dict"):
        _same(load_pairs(tmp_path / name, ["q", "d"]), ROWS["q"], ROWS["d"])
    # columns in another order: the first named is the anchor
    _same(load_pairs(tmp_path / "p.csv", ["d", "q"]), ROWS["d"], ROWS["q"])


def test_default_columns_and_hard_negatives(tmp_path: Path) -> None:
    ds = load_pairs(write_pairs(tmp_path / "p.jsonl", negatives=True))
    assert ds.column_names == ["anchor", "positive", "negative"]  # the id column is dropped
    assert ds[0]["anchor"] == "what is a cat?"
    assert pair_columns(4) == ["anchor", "positive", "negative_1", "negative_2"]


@pytest.mark.parametrize(
    ("content", "columns", "message"),
    [
        (
            '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": "d"}\n{"anchor": "e" "p"}\n',
            None,
            "p.jsonl, line 3: not valid JSON",
        ),
        ('{"anchor": "a", "positive": "b"}\n[1, 2]\n', None, "p.jsonl, line 2: a JSON list"),
        (
            '{"q": "a", "d": "b", "id": 1}\n{"q": "c", "d": "d", "id": 2}\n',
            None,
            "has no column 'anchor', 'positive': its columns are ['q', 'd', 'id']; set columns: "
            "[q, d]",
        ),
        (
            '{"q": "a", "d": "b"}\n{"q": "c", "d": "d"}\n',
            ["q", "doc"],
            "has no column 'doc': its columns are ['q', 'd']",
        ),
        (
            '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": null}\n',
            None,
            "column 'positive' is empty (null) in row 1",
        ),
        (
            '{"anchor": "a", "positive": 1}\n{"anchor": "c", "positive": 2}\n',
            None,
            "column 'positive' holds int64, not text",
        ),
        ('{"anchor": "a", "positive": "b"}\n', None, "holds 1 row(s): in-batch negatives need"),
        ('{"a": "x", "b": "y"}\n{"a": "z", "b": "w"}\n', ["a", "a"], "columns=['a', 'a'] must"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "default-columns",
        "named-column",
        "null",
        "int",
        "1-row",
        "dup",
    ],
)
def test_bad_pairs_are_named(
    tmp_path: Path, content: str, columns: list[str] | None, message: str
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pairs(path, columns)


def test_bad_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data='.*nope\.jsonl' does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "p.txt").write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"has the suffix '\.txt': pass a \.jsonl/\.json/\.csv"):
        load_pairs(tmp_path / "p.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder but not a saved Hugging Face dataset"):
        load_pairs(tmp_path / "empty")
    table = datasets.Dataset.from_dict({"anchor": ["a", "b"], "positive": ["c", "d"]})
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"splits \['validation'\] but no 'train' split"):
        load_pairs(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"^eval_data="):
        load_pairs(tmp_path / "dict", what="eval_data")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"columns": ["q", "d"]}, "columns=['q', 'd'] needs data"),
        ({"matryoshka": False, "n_sizes_per_step": 2}, "n_sizes_per_step=2 with matryoshka: false"),
        ({"checkpoint_every": -1}, "checkpoint_every=-1 must be an int >= 0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be an int >= 1"),
        ({"data": ""}, "data='' must be a path"),
        ({"layers": [3, 5], "eval_data": "e.jsonl"}, "eval_data='e.jsonl' with layers=[3, 5]"),
    ],
)
def test_bad_own_data_config_values_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TextTrainConfig.from_dict(values)


def test_the_own_data_recipe_names_its_data() -> None:
    import yaml

    recipe = Path(__file__).parent.parent / "configs" / "text_own_data.yaml"
    config = TextTrainConfig.from_dict(yaml.safe_load(recipe.read_text()))
    assert config.data is not None
    assert config.columns is not None
    assert json.loads(json.dumps(config.columns)) == config.columns
