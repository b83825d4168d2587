"""Every user-facing input tried with a bad value: the catalogue behind docs/inputs.md.

Each case is ``(area, field, what was tried, thunk)``; the thunk must raise a clear exception
whose message names ``field``. ``tests/test_bad_inputs.py`` checks that, and
``python tools/inputs_table.py`` runs them all and writes the table of what each one got.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from matryoshka import MatryoshkaHead, MatryoshkaLoss, Nesting, prefix_similarities, truncate
from matryoshka.backbones import create_backbone
from matryoshka.backbones.resnet import load_weights_file
from matryoshka.checkpoint import load_checkpoint
from matryoshka.cli import main as cli
from matryoshka.data.images import load_dataset, stratified_split
from matryoshka.evaluation.image import posthoc_reduce
from matryoshka.evaluation.metrics import top_k_indices
from matryoshka.evaluation.text import TextEvalConfig, evaluate_text_model
from matryoshka.models.adaptor import MatryoshkaAdaptor
from matryoshka.report import validate_results
from matryoshka.retrieval.index import load_index, make_index
from matryoshka.training.config import TrainConfig
from matryoshka.training.text import TextTrainConfig

Case = tuple[str, str, str, Callable[[], object]]


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="mrl-bad-"))


def _torn_checkpoint() -> object:
    d = _tmp()
    (d / "step.json").write_text('{"format": "matry')
    return load_checkpoint(d / "step.json")


def _foreign_index() -> object:
    d = _tmp()
    index = make_index("exact", 8, model_name="minilm")
    index.add(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    index.save(d / "i.safetensors")
    return load_index(d / "i.safetensors", model_name="other-model")


def _config_file(text: str) -> Callable[[], object]:
    def run() -> object:
        p = _tmp() / "c.yaml"
        p.write_text(text)
        return cli(["train", "--config", str(p)])

    return run


CASES: list[Case] = [
    ("Nesting", "sizes", "[] (empty)", lambda: Nesting([])),
    ("Nesting", "sizes", "[0, 8] (non-positive)", lambda: Nesting([0, 8])),
    ("Nesting", "sizes", "[16, 8] (unsorted)", lambda: Nesting([16, 8])),
    ("Nesting", "sizes", "[8, 8] (repeated)", lambda: Nesting([8, 8])),
    ("Nesting", "weights", "one weight for two sizes", lambda: Nesting([8, 16], [1.0])),
    ("Nesting", "weights", "a negative weight", lambda: Nesting([8, 16], [1.0, -1.0])),
    ("Nesting", "weights", "NaN", lambda: Nesting([8, 16], [1.0, float("nan")])),
    ("Nesting.doubling", "start", "0", lambda: Nesting.doubling(0, 64)),
    (
        "MatryoshkaHead",
        "in_features",
        "64 with a ladder ending at 32",
        lambda: MatryoshkaHead(64, 10, Nesting([8, 32])),
    ),
    ("MatryoshkaHead", "nesting", "a plain list", lambda: MatryoshkaHead(32, 10, [8, 32])),  # type: ignore[arg-type]
    ("MatryoshkaHead", "num_classes", "0", lambda: MatryoshkaHead(32, 0, Nesting([8, 32]))),
    (
        "MatryoshkaHead.forward",
        "z.shape",
        "(4, 16) for a 32-d head",
        lambda: MatryoshkaHead(32, 3, Nesting([8, 32]))(torch.zeros(4, 16)),
    ),
    (
        "MatryoshkaLoss",
        "logits.shape",
        "3 sizes of logits for a 2-size ladder",
        lambda: MatryoshkaLoss(nesting=Nesting([2, 4]))(
            torch.zeros(3, 5, 2), torch.zeros(5, dtype=torch.long)
        ),
    ),
    ("MatryoshkaLoss", "nesting", "missing", lambda: MatryoshkaLoss()),
    ("truncate", "m", "13 for 12-d embeddings", lambda: truncate(torch.zeros(2, 12), 13)),
    ("truncate", "m", "0", lambda: truncate(torch.zeros(2, 12), 0)),
    (
        "prefix_similarities",
        "q.shape[-1]",
        "8-d queries, 6-d ladder",
        lambda: prefix_similarities(torch.zeros(2, 8), torch.zeros(2, 6), Nesting([2, 6])),
    ),
    ("TrainConfig", "method", "'svd'", lambda: TrainConfig(method="svd")),
    ("TrainConfig", "backbone", "'vgg'", lambda: TrainConfig(backbone="vgg")),
    ("TrainConfig", "data", "'imagenet'", lambda: TrainConfig(data="imagenet")),
    ("TrainConfig", "epochs", "0", lambda: TrainConfig(epochs=0)),
    ("TrainConfig", "batch_size", "-1", lambda: TrainConfig(batch_size=-1)),
    ("TrainConfig", "lr", "-1.0", lambda: TrainConfig(lr=-1.0)),
    ("TrainConfig", "lr", "inf", lambda: TrainConfig(lr=float("inf"))),
    ("TrainConfig", "weight_decay", "-0.1", lambda: TrainConfig(weight_decay=-0.1)),
    ("TrainConfig", "grad_accum", "0", lambda: TrainConfig(grad_accum=0)),
    ("TrainConfig", "checkpoint_every", "-2", lambda: TrainConfig(checkpoint_every=-2)),
    ("TrainConfig", "nonfinite", "'ignore'", lambda: TrainConfig(nonfinite="ignore")),
    ("TrainConfig", "device", "'tpu'", lambda: TrainConfig(device="tpu")),
    (
        "TrainConfig",
        "embed_dim",
        "16 with nesting [4, 8]",
        lambda: TrainConfig(nesting=[4, 8], embed_dim=16),
    ),
    (
        "TrainConfig",
        "weights",
        "nesting_weights of the wrong length",
        lambda: TrainConfig(nesting_weights=[1.0]),
    ),
    (
        "TrainConfig.from_dict",
        "unknown config keys",
        "a misspelt key 'epoch'",
        lambda: TrainConfig.from_dict({"epoch": 3}),
    ),
    ("mrl train", "--config", "a missing file", lambda: cli(["train", "--config", "missing.yaml"])),
    ("mrl train", "--config", "a YAML list instead of a mapping", _config_file("- 1\n- 2\n")),
    ("mrl train", "method", "--method svd", lambda: cli(["train", "--method", "svd"])),
    ("mrl train", "unknown config keys", "YAML key 'epoch'", _config_file("epoch: 3\n")),
    ("load_dataset", "data", "'imagenet'", lambda: load_dataset("imagenet")),
    ("load_dataset", "data_root", "mnist without a folder", lambda: load_dataset("mnist")),
    (
        "load_dataset",
        "root",
        "mnist from an empty folder",
        lambda: load_dataset("mnist", root=_tmp()),
    ),
    (
        "stratified_split",
        "fractions",
        "(0.5, 0.6)",
        lambda: stratified_split(np.zeros(10), (0.5, 0.6)),
    ),
    ("create_backbone", "backbone", "'vgg'", lambda: create_backbone("vgg")),
    ("weights file", "weights", "a missing path", lambda: load_weights_file("missing.pt")),
    ("checkpoint", "checkpoint", "a torn JSON file", _torn_checkpoint),
    ("checkpoint", "checkpoint", "a missing file", lambda: load_checkpoint("missing.json")),
    (
        "posthoc_reduce",
        "method",
        "'ica'",
        lambda: posthoc_reduce("ica", np.zeros((4, 4)), np.zeros((2, 4)), 2),
    ),
    (
        "posthoc_reduce",
        "m",
        "9 for 8-d embeddings",
        lambda: posthoc_reduce("pca", np.zeros((4, 8)), np.zeros((2, 8)), 9),
    ),
    ("top_k_indices", "k", "5 of 4 candidates", lambda: top_k_indices(np.zeros((2, 4)), 5)),
    (
        "report",
        "sizes",
        "results without sizes",
        lambda: validate_results({"task": "t", "metrics": {}}),
    ),
    ("index", "model", "an index of another model", _foreign_index),
    (
        "MatryoshkaAdaptor.fit",
        "embeddings",
        "one row",
        lambda: MatryoshkaAdaptor(Nesting([4, 8]), progress=False).fit(
            np.zeros((1, 8), dtype=np.float32)
        ),
    ),
    (
        "MatryoshkaAdaptor.transform",
        "fit",
        "before fit",
        lambda: MatryoshkaAdaptor(Nesting([4, 8])).transform(np.zeros((2, 8), dtype=np.float32)),
    ),
    (
        "MatryoshkaAdaptor",
        "listwise_temperature",
        "0",
        lambda: MatryoshkaAdaptor(Nesting([4, 8]), listwise_temperature=0),
    ),
    ("MatryoshkaAdaptor", "reg", "-1", lambda: MatryoshkaAdaptor(Nesting([4, 8]), reg=-1)),
    (
        "text recipe (mrl train, task: text)",
        "train_pairs",
        "1",
        lambda: TextTrainConfig.from_dict({"train_pairs": 1}),
    ),
    (
        "text recipe (mrl train, task: text)",
        "test_fraction",
        "0.9 with train_fraction 0.17",
        lambda: TextTrainConfig.from_dict({"test_fraction": 0.9}),
    ),
    (
        "text recipe (mrl train, task: text)",
        "unknown config keys",
        "an unknown key",
        lambda: TextTrainConfig.from_dict({"epoch": 2}),
    ),
    (
        "mrl eval (text run)",
        "path",
        "a folder without text_model.json",
        lambda: evaluate_text_model(_tmp()),
    ),
    (
        "text-eval recipe",
        "adaptor_reg",
        "-0.5",
        lambda: TextEvalConfig(adaptor_reg=-0.5),
    ),
]


def run_case(thunk: Callable[[], object]) -> tuple[str, str]:
    """Run one case: ``(exception type, message)``, or ``("no error", repr(result))``."""
    try:
        result = thunk()
    except SystemExit as e:
        return "SystemExit", str(e.code)
    except Exception as e:
        return type(e).__name__, str(e)
    return "no error", json.dumps(repr(result))
