"""`objective: distill` end to end on a tiny text file, and the clear errors of its inputs."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from matryoshka.data.texts import load_texts
from matryoshka.training.text import TextTrainConfig
from tests.markers import needs_text

SIZES = [8, 16, 32, 64, 128, 256, 384]


def _texts() -> list[str]:
    """~45 distinct texts, the same on every machine with this Python: str's method docstrings."""
    docs = [inspect.getdoc(getattr(str, n)) for n in sorted(dir(str)) if not n.startswith("_")]
    return list(dict.fromkeys(" ".join(d.split()) for d in docs if d))


def _structure_error(x: np.ndarray, teacher: np.ndarray, m: int) -> float:
    """Mean |cos(x_i[:m], x_j[:m]) - cos(t_i, t_j)| over all pairs (NumPy, not the loss)."""
    p = x[:, :m] / np.linalg.norm(x[:, :m], axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    return float(np.abs(p @ p.T - t @ t.T).mean())


def _neighbour_recall(x: np.ndarray, teacher: np.ndarray, m: int, k: int = 5) -> float:
    """Share of each text's ``k`` nearest teacher neighbours that its ``m``-prefix also ranks in
    its top ``k`` (the row itself left out): a retrieval measure, not a term of the loss."""
    p = x[:, :m] / np.linalg.norm(x[:, :m], axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    sp, st = p @ p.T, t @ t.T
    np.fill_diagonal(sp, -np.inf)
    np.fill_diagonal(st, -np.inf)
    a, b = np.argsort(-sp, axis=1)[:, :k], np.argsort(-st, axis=1)[:, :k]
    return float(np.mean([len(set(i) & set(j)) / k for i, j in zip(a, b, strict=True)]))


@needs_text
@pytest.mark.slow
def test_distill_recipe_nests_prefixes_and_saves_a_plain_model(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from matryoshka.models.text_encoder import default_model_path
    from matryoshka.training.text import train_text

    texts = _texts()
    assert len(texts) >= 30
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n\n")  # a trailing blank line is skipped
    out = train_text(
        TextTrainConfig.from_dict(
            {
                "task": "text",
                "objective": "distill",
                "data": str(data),
                "sizes": SIZES,
                "epochs": 1,
                "batch_size": 16,
                "mini_batch_size": 5,  # gradient caching, as the shipped recipe
                "neighbour_group": 4,  # batches of teacher neighbours, as the shipped recipe
                "lr": 1e-5,
                "progress": False,
                "cache_dir": str(tmp_path / "cache"),
                "out_dir": str(tmp_path / "run"),
            }
        )
    )
    meta = json.loads((out / "text_model.json").read_text())
    assert meta["objective"] == "distill"
    assert meta["train_texts"] == len(texts)
    assert meta["loss"]["name"] == "MatryoshkaDistillLoss"
    assert meta["steps"] == -(-len(texts) // 16)
    # plain sentence-transformers loads it: a Dense rotation before Normalize, nothing custom
    student = SentenceTransformer(str(out / "model"), device="cpu")
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Dense", "Normalize"]
    teacher = SentenceTransformer(default_model_path(), device="cpu")
    s = student.encode(texts, convert_to_numpy=True)
    t = teacher.encode(texts, convert_to_numpy=True)
    for m in (8, 16, 32):  # every small prefix is closer to the teacher's full-size structure
        assert _structure_error(s, t, m) < 0.8 * _structure_error(t, t, m), m
        assert _neighbour_recall(s, t, m) > _neighbour_recall(t, t, m), m
    assert _structure_error(s, t, 384) < 0.02  # and the full size kept it
    assert np.allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)


@needs_text
@pytest.mark.slow
def test_distillation_without_rotation_moves_prefixes_toward_the_teacher() -> None:
    """The encoder itself learns (no rotation): a few steps lower the prefix error."""
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting
    from matryoshka.training.text import distill

    texts = _texts()[:32]
    base = TextEncoder()
    t = base.encode(texts, progress=False)
    tuned = distill(
        base,
        texts,
        Nesting([8, 32, 384]),
        batch_size=16,
        lr=1e-4,
        epochs=2,
        progress=False,
        rotate=False,
        trainable_layers=1,
        cache_dir=".cache/embeddings",
    )
    s = tuned.encode(texts, progress=False)
    assert _neighbour_recall(s, t, 8) > _neighbour_recall(t, t, 8)
    assert _neighbour_recall(s, t, 384) > 0.9  # the full size keeps its neighbours
    assert base.fingerprint() != tuned.fingerprint()  # a copy was trained, not the base


@needs_text
@pytest.mark.usefixtures("one_thread")
def test_fitted_start_rotation_keeps_cosines_and_nests_better_than_pca() -> None:
    """start_epochs > 0: the student's added Dense layer is an orthogonal rotation fitted on the
    teacher's embeddings; at step 0 the student outputs exactly the rotated targets, full-size
    cosines are the teacher's, and the 8-d prefix keeps its structure better than PCA's (on 47
    texts the fit trades some 16/32-d error for it: measured 0.105 vs 0.128 at 8, 0.049 vs 0.049
    at 16)."""
    import torch

    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting
    from matryoshka.training.text import _distill_start, pca_rotation

    texts = _texts()
    base = TextEncoder()
    t = base.encode(texts, progress=False)  # (n, 384) unit rows
    targets, meta = _distill_start(base.model, t, True, Nesting(SIZES), start_epochs=30)
    assert "orthogonal MatryoshkaAdaptor" in meta["rotation"]
    dense: list[Any] = [m for m in base.model if type(m).__name__ == "Dense"]
    assert len(dense) == 1
    rot = dense[0].linear.weight.detach().numpy().T  # Dense computes x W^T = x R
    np.testing.assert_allclose(rot @ rot.T, np.eye(384), atol=1e-4)
    np.testing.assert_allclose(targets, t @ rot, atol=1e-6)
    with torch.no_grad():
        s = base.encode(texts, progress=False)
    np.testing.assert_allclose(s, targets, atol=1e-4)  # the student starts at its targets
    np.testing.assert_allclose(s @ s.T, t @ t.T, atol=1e-4)
    pca = t @ pca_rotation(t)
    assert _structure_error(s, t, 8) < 0.9 * _structure_error(pca, t, 8)
    assert _neighbour_recall(s, t, 8) > _neighbour_recall(pca, t, 8)


def test_load_texts_reads_lines_and_columns(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first text\n\n  second text  \nfirst text\n")
    assert load_texts(txt) == ["first text", "second text"]  # blank and repeated lines dropped
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"body": "x one", "id": 1}\n{"body": "x two", "id": 2}\n')
    assert load_texts(jsonl, "body") == ["x one", "x two"]


@pytest.mark.parametrize(
    ("name", "content", "column", "error", "message"),
    [
        ("none.txt", None, None, FileNotFoundError, "data='{p}' does not exist: pass a .txt file"),
        ("empty.txt", "", None, ValueError, "data='{p}' is empty: it must hold at least 2 texts."),
        ("one.txt", "only one\n\n", None, ValueError, "holds 1 distinct non-blank text(s)"),
        ("t.jsonl", '{"body": "a"}\n{"body": "b"}\n', None, ValueError,
         "has no column 'text': its columns are ['body']; set text_column: to one of them."),
        ("t.jsonl", '{"body": "a"}\n{"body": "b"}\n', "txt", ValueError,
         "has no column 'txt': its columns are ['body']; fix text_column:."),
        ("n.jsonl", '{"text": "a"}\n{"text": null}\n', None, ValueError,
         "column 'text' is empty (null) in row 1"),
        ("n.jsonl", '{"text": 1}\n{"text": 2}\n', None, ValueError, "holds int64, not text"),
        ("a.txt", "a\nb\n", "text", ValueError, "text_column='text' with the plain text file"),
        ("a.docx", "a\nb\n", None, ValueError, "has the suffix '.docx'"),
    ],
)  # fmt: skip
def test_bad_text_inputs_are_named(
    tmp_path: Path,
    name: str,
    content: str | None,
    column: str | None,
    error: type[Exception],
    message: str,
) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(error, match=re.escape(message.format(p=p))):
        load_texts(p, column)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"objective": "distil"}, "objective='distil' is not one of ['contrastive', 'distill']: "
         "did you mean 'distill'?"),
        ({"objective": "distill", "columns": ["a", "b"]}, "columns=['a', 'b'] with objective: "
         "distill: name the column of texts with text_column"),
        ({"objective": "distill", "distill_weight": 0.5}, "distill_weight=0.5 with objective: "
         "distill"),
        ({"objective": "distill", "matryoshka": False}, "matryoshka=False with objective: distill"),
        ({"text_column": "body"}, "text_column='body' is for objective: distill"),
        ({"max_texts": 100}, "max_texts=100 is for objective: distill"),
        ({"keep_weight": -1}, "keep_weight=-1 must be a float >= 0, e.g. 1.0."),
        ({"listwise_temperature": 0}, "listwise_temperature=0 must be a positive float"),
        ({"objective": "distill", "max_texts": 1}, "max_texts=1 must be null or an int >= 2."),
        ({"trainable_layers": 0}, "trainable_layers=0 must be null or an int >= 1."),
        ({"distill_weight": 1.0, "layers": [3, 5]}, "distill_weight=1.0 with layers"),
        ({"mini_batch_size": 0}, "mini_batch_size=0 must be null or an int >= 1."),
        ({"mini_batch_size": 8, "distill_weight": 0.5}, "mini_batch_size=8 with distill_weight: "
         "gradient caching needs the plain contrastive or the distill loss"),
        ({"mini_batch_size": 8, "layers": [3, 5]}, "mini_batch_size=8 with layers"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0 must be a share of the steps in [0, 1)"),
        ({"neighbour_group": 4}, "neighbour_group=4 is for objective: distill"),
        ({"objective": "distill", "neighbour_group": 0}, "neighbour_group=0 must be"),
    ],
)  # fmt: skip
def test_bad_distill_options_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TextTrainConfig.from_dict({"task": "text", **values})


@needs_text
def test_a_missing_text_file_stops_training_before_any_step(tmp_path: Path) -> None:
    from matryoshka.training.text import train_text

    missing = tmp_path / "nope.txt"
    config = TextTrainConfig.from_dict(
        {"objective": "distill", "data": str(missing), "out_dir": str(tmp_path / "run")}
    )
    with pytest.raises(FileNotFoundError, match=re.escape(f"data='{missing}' does not exist")):
        train_text(config)
    assert not (tmp_path / "run" / "model").exists()


@needs_text
def test_too_many_trainable_layers_are_named() -> None:
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.training.text import freeze_all_but_last

    model = TextEncoder().model
    with pytest.raises(ValueError, match=r"trainable_layers=7 but the model has 6 transformer"):
        freeze_all_but_last(model, 7)
    freeze_all_but_last(model, 2)
    trained = {n.split(".")[4] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"4", "5"}  # encoder.layer.4 and .5 only


@needs_text
@pytest.mark.slow
def test_distill_recipe_runs_under_torchrun(tmp_path: Path) -> None:
    """Two gloo processes (torchrun, CPU) train the distill recipe with gradient caching: each
    rank keeps the similarity structure of its share of every batch, rank 0 saves a plain
    sentence-transformers folder whose small prefixes moved toward the teacher."""
    import os
    import subprocess
    import sys

    import yaml
    from sentence_transformers import SentenceTransformer

    from matryoshka.models.text_encoder import default_model_path

    texts = _texts()
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    recipe = {
        "task": "text",
        "objective": "distill",
        "data": str(data),
        "sizes": SIZES,
        "epochs": 2,
        "batch_size": 8,
        "mini_batch_size": 3,
        "start_epochs": 5,
        "lr": 1e-5,
        "progress": False,
        "cache_dir": str(tmp_path / "cache"),
        "out_dir": str(tmp_path / "run"),
    }
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "matryoshka.cli", "train", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "text_model.json").read_text())
    assert meta["objective"] == "distill"
    assert meta["loss"]["mini_batch_size"] == 3
    # 47 texts make 5 full batches of 8 (DDP drops the last, uneven one), shared by the two
    # processes: 2 steps an epoch, 2 epochs (each process alone on all texts would take 12)
    assert meta["steps"] == 2 * ((len(texts) // 8) // 2)
    student = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    teacher = SentenceTransformer(default_model_path(), device="cpu")
    s = student.encode(texts, convert_to_numpy=True)
    t = teacher.encode(texts, convert_to_numpy=True)
    assert _structure_error(s, t, 8) < 0.8 * _structure_error(t, t, 8)
    assert _structure_error(s, t, 384) < 0.02


def test_distill_loss_takes_the_nesting_weights() -> None:
    """distill() and the recipes pass their nesting's weights on (they were dropped before)."""
    import torch

    from matryoshka.training.text import build_distill_loss

    loss = build_distill_loss(torch.nn.Identity(), [16, 8], weights=[2.0, 0.5])  # type: ignore[arg-type]
    assert list(loss.nesting.sizes) == [8, 16]
    assert list(loss.nesting.weights) == [0.5, 2.0]  # kept with their sizes when sorted
    assert list(build_distill_loss(torch.nn.Identity(), [8, 16]).nesting.weights) == [1.0, 1.0]  # type: ignore[arg-type]
