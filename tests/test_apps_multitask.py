"""Multi-task MRL: the aggregated loss, the heads, and the recipe's config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matryoshka.apps.multitask import (
    DIGIT_TASKS,
    MultiTaskConfig,
    MultiTaskLoss,
    MultiTaskModel,
)
from matryoshka.backbones import create_backbone
from matryoshka.nesting import Nesting


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
