"""Multi-task MRL: the aggregated loss, the heads, the recipe's config errors, and the WordNet
variant end to end on ~60 definitions with the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from matryoshka.apps.multitask import (
    DIGIT_TASKS,
    WORDNET_TASKS,
    MultiTaskConfig,
    MultiTaskLoss,
    MultiTaskModel,
    run_multitask,
    wordnet_labels,
    wordnet_task_data,
)
from matryoshka.backbones import create_backbone
from matryoshka.data.wordnet import Synset, load_synsets
from matryoshka.nesting import Nesting
from tests.markers import WORDNET, needs_text, needs_wordnet


def _model(nesting: Nesting) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_backbone("mlp", embed_dim=nesting.dim, image_size=8, width=32)
    return MultiTaskModel(backbone, {"digit": 10, "parity": 2}, nesting)


def test_forward_gives_every_task_every_size():
    nesting = Nesting([2, 4, 8])
    out = _model(nesting)(torch.randn(5, 1, 8, 8))
    assert out["digit"].shape == (3, 5, 10)
    assert out["parity"].shape == (3, 5, 2)


def test_loss_is_the_hand_weighted_sum_of_per_task_matryoshka_losses():
    nesting = Nesting([2, 4, 8], weights=[0.5, 1.0, 2.0])
    torch.manual_seed(1)
    logits = {"digit": torch.randn(3, 6, 10), "parity": torch.randn(3, 6, 2)}
    y = torch.randint(0, 10, (6,))
    targets = {"digit": y, "parity": y % 2}
    out = MultiTaskLoss(nesting, {"digit": 1.0, "parity": 0.25})(logits, targets)
    expected = 0.0
    for task, w_task in (("digit", 1.0), ("parity", 0.25)):
        for i, c in enumerate(nesting.weights):
            expected += w_task * c * F.cross_entropy(logits[task][i], targets[task]).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.per_task["parity"][1].item() == pytest.approx(
        F.cross_entropy(logits["parity"][1], targets["parity"]).item(), rel=1e-5
    )


def test_zero_weight_task_gets_no_gradient_but_the_other_does():
    nesting = Nesting([2, 4, 8])
    model = _model(nesting)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = MultiTaskLoss(nesting, {"digit": 1.0, "parity": 0.0})(
        model(x), {"digit": y, "parity": y % 2}
    ).loss
    loss.backward()
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in model.heads["parity"].parameters()
    )
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads["digit"].parameters()
    )


def test_joint_training_beats_chance_on_every_task(mnist_small):
    nesting = Nesting([4, 16])
    torch.manual_seed(0)
    backbone = create_backbone("mlp", embed_dim=16, width=64)
    model = MultiTaskModel(backbone, {t: DIGIT_TASKS[t][1] for t in ("digit", "parity")}, nesting)
    loss_fn = MultiTaskLoss(nesting, {"digit": 1.0, "parity": 1.0})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = mnist_small.x_train, mnist_small.y_train
    for _ in range(10):
        for idx in torch.arange(len(y)).split(64):
            targets = {t: DIGIT_TASKS[t][0](y[idx]) for t in ("digit", "parity")}
            loss = loss_fn(model(x[idx]), targets).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(mnist_small.x_test)
    digit_acc = (out["digit"][-1].argmax(-1) == mnist_small.y_test).float().mean()
    parity_acc = (out["parity"][-1].argmax(-1) == mnist_small.y_test % 2).float().mean()
    assert digit_acc > 0.5
    assert parity_acc > 0.65


def test_loss_errors_name_the_problem():
    nesting = Nesting([2, 4])
    with pytest.raises(ValueError, match="task_weights=\\{\\} is empty"):
        MultiTaskLoss(nesting, {})
    with pytest.raises(ValueError, match="must be a finite float >= 0"):
        MultiTaskLoss(nesting, {"a": -1.0})
    with pytest.raises(ValueError, match="are all zero"):
        MultiTaskLoss(nesting, {"a": 0.0})
    loss = MultiTaskLoss(nesting, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="tasks \\['b'\\] have no logits or no targets"):
        loss({"a": torch.randn(2, 3, 4)}, {"a": torch.zeros(3, dtype=torch.long)})


def test_model_and_config_errors():
    nesting = Nesting([2, 4])
    with pytest.raises(ValueError, match="tasks=\\{\\} is empty"):
        MultiTaskModel(create_backbone("mlp", embed_dim=4, image_size=8), {}, nesting)
    with pytest.raises(ValueError, match=r"backbone\.embed_dim=8"):
        MultiTaskModel(create_backbone("mlp", embed_dim=8, image_size=8), {"a": 2}, nesting)
    with pytest.raises(ValueError, match="must be a non-empty list from"):
        MultiTaskConfig(tasks=["digit", "colour"])
    with pytest.raises(ValueError, match="give one weight per task"):
        MultiTaskConfig(tasks=["digit", "parity"], task_weights=[1.0])
    with pytest.raises(ValueError, match="epochs=0 must be a positive int"):
        MultiTaskConfig(epochs=0)


def test_config_defaults_follow_the_data_set():
    mnist = MultiTaskConfig()
    assert (mnist.tasks, mnist.backbone, mnist.backbone_width) == (
        ["digit", "parity", "high"],
        "cnn",
        16,
    )
    wordnet = MultiTaskConfig(data="wordnet")
    assert (wordnet.tasks, wordnet.backbone, wordnet.backbone_width) == (
        ["pos", "lexname"],
        "mlp",
        None,
    )
    assert wordnet.weights() == {"pos": 1.0, "lexname": 1.0}


def test_wordnet_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"data='cifar' is not one of \['mnist', 'wordnet'\]"):
        MultiTaskConfig(data="cifar")
    with pytest.raises(ValueError, match=r"must be a non-empty list from .*'lexname'.*"):
        MultiTaskConfig(data="wordnet", tasks=["digit"])
    with pytest.raises(ValueError, match=r"backbone='cnn' cannot read data='wordnet'.*'mlp'"):
        MultiTaskConfig(data="wordnet", backbone="cnn")
    with pytest.raises(ValueError, match=r"wordnet_fraction=0.0 must be in \(0, 1\]"):
        MultiTaskConfig(data="wordnet", wordnet_fraction=0.0)
    with pytest.raises(ValueError, match="backbone_width=0 must be a positive int"):
        MultiTaskConfig(data="wordnet", backbone_width=0)
    with pytest.raises(ValueError, match=r"tasks \['digit'\] are not WordNet tasks"):
        wordnet_labels([], ["digit"])
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \(0, 1\]"):
        wordnet_task_data(["pos"], fraction=1.5)


@pytest.fixture(scope="module")
def synsets() -> list[Synset]:
    return load_synsets(WORDNET)


@needs_wordnet
def test_wordnet_labels_match_the_lexicographer_files(synsets):
    labels = wordnet_labels(synsets, ["pos", "ss_type", "lexname"])
    pos = [WORDNET_TASKS["pos"][i] for i in labels["pos"].tolist()]
    lex = [WORDNET_TASKS["lexname"][i] for i in labels["lexname"].tolist()]
    prefix = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
    assert all(prefix[name.split(".")[0]] == p for p, name in zip(pos, lex, strict=True))
    # WordNet 3.0: 82,115 nouns, 13,767 verbs, 7,463 head adjectives, 10,693 satellites, 3,621
    # adverbs; satellites are adjectives of the coarse task.
    counts = torch.bincount(labels["ss_type"], minlength=5).tolist()
    assert dict(zip(WORDNET_TASKS["ss_type"], counts, strict=True)) == {
        "n": 82115,
        "v": 13767,
        "a": 7463,
        "s": 10693,
        "r": 3621,
    }
    satellite = labels["ss_type"] == WORDNET_TASKS["ss_type"].index("s")
    assert (labels["pos"][satellite] == WORDNET_TASKS["pos"].index("a")).all()


@needs_wordnet
def test_wordnet_split_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fraction=1e-05 leaves 0 training and 0 test synsets"):
        wordnet_task_data(["pos"], WORDNET, fraction=1e-5)


@needs_wordnet
@needs_text
@pytest.mark.usefixtures("one_thread")
def test_wordnet_recipe_end_to_end_on_a_tiny_subset(tmp_path: Path, monkeypatch):
    config = MultiTaskConfig(
        data="wordnet",
        tasks=["pos", "lexname"],
        task_weights=[0.5, 1.0],
        backbone_width=16,
        embed_dim=8,
        nesting_start=2,
        epochs=2,
        batch_size=16,
        single_task_baselines=True,
        ordinary_baseline=True,
        wordnet_fraction=0.0005,  # 59 synsets: 47 train, 6 test
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        progress=False,
    )
    results = run_multitask(config)
    assert results["sizes"] == [2, 4, 8]
    assert results["meta"]["train_examples"] == 47
    assert results["meta"]["test_examples"] == 6
    methods = {
        "multi-task MRL",
        "single-task MRL (pos)",
        "single-task MRL (lexname)",
        "ordinary multi-task, truncated + new heads",
    }
    for task in ("pos", "lexname"):
        by_method = results["metrics"][f"top1_{task}"]
        assert set(by_method) == {m for m in methods if "single" not in m or task in m}
        assert all(0.0 <= v <= 1.0 for values in by_method.values() for v in values)
    out = tmp_path / "out"
    assert (out / "report.md").is_file()
    assert (out / "top1_lexname.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["task"].startswith(
        "Multi-task MRL on WordNet definitions (all-MiniLM-L6-v2"
    )
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # A second load reuses the cached embeddings: encoding again would raise.
    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr("matryoshka.models.text_encoder.TextEncoder.encode", no_encoding)
    data = wordnet_task_data(
        ["ss_type"], WORDNET, fraction=0.0005, cache_dir=tmp_path / "cache", progress=False
    )
    assert data.x_train.shape == (47, 384)
    assert data.num_classes == {"ss_type": 5}
