"""Transfer: a frozen backbone really stays frozen; fine-tuning moves it; data helpers."""

from __future__ import annotations

import pytest
import torch

from matryoshka.apps.common import load_digits_images, select_classes
from matryoshka.apps.transfer import TransferConfig, fit_transfer, transfer_classifier
from matryoshka.backbones import create_backbone
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.nesting import Nesting


@pytest.fixture
def source_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("cnn_tiny", embed_dim=16)


@pytest.fixture(scope="module")
def target():
    data = load_digits_images(28, seed=0, digit_size=28)  # whole frame: more signal for tiny nets
    return select_classes(data, [0, 1, 2], "digits 0-2")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_frozen_backbone_has_no_gradient_and_does_not_change(source_backbone, target):
    nesting = Nesting([4, 16])
    model = transfer_classifier(source_backbone, 3, nesting, "frozen")
    before, head_before = _state(model.backbone), _state(model.head)
    # A direct backward through the whole model leaves the backbone without gradients.
    MatryoshkaLoss(nesting=nesting)(model(target.x_train[:8]), target.y_train[:8]).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    model.head.zero_grad(set_to_none=True)
    fit_transfer(model, target, "frozen", epochs=2, batch_size=32, progress=False)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers included
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    # The source backbone was copied, not frozen in place.
    assert all(p.requires_grad for p in source_backbone.parameters())


def test_frozen_heads_learn_the_new_task(source_backbone, target):
    model = transfer_classifier(source_backbone, 3, Nesting([4, 16]), "frozen")
    fit_transfer(model, target, "frozen", epochs=20, batch_size=32, lr=1e-2, progress=False)
    model.eval()
    with torch.no_grad():
        acc = (model(target.x_test).argmax(-1) == target.y_test).float().mean(1)
    assert acc[-1] > 0.6  # 3 classes: chance is 1/3, even from a random frozen backbone


def test_finetune_moves_the_backbone(source_backbone, target):
    model = transfer_classifier(source_backbone, 3, Nesting([4, 16]), "finetune")
    before = _state(model.backbone)
    fit_transfer(model, target, "finetune", epochs=1, batch_size=32, progress=False)
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_errors_name_the_fix(source_backbone, target):
    with pytest.raises(ValueError, match="mode='thaw' is not one of"):
        transfer_classifier(source_backbone, 3, Nesting([16]), "thaw")
    model = transfer_classifier(source_backbone, 3, Nesting([16]), "finetune")
    with pytest.raises(ValueError, match="has trainable parameters"):
        fit_transfer(model, target, "frozen", progress=False)
    with pytest.raises(ValueError, match="target='cifar' is not one of"):
        TransferConfig(target="cifar")
    with pytest.raises(ValueError, match="target_train_per_class=-1 must be >= 0"):
        TransferConfig(target_train_per_class=-1)


def test_digits_images_and_class_selection(target):
    data = load_digits_images(28, seed=0)
    assert data.input_shape == (1, 28, 28)
    # Laid out like MNIST: the 4-pixel border around the 20x20 digit is background.
    background = data.x_train.min()
    assert (data.x_train[:, :, :4] == background).all()
    assert (data.x_train[:, :, :, -4:] == background).all()
    with pytest.raises(ValueError, match="digit_size=30 must be in"):
        load_digits_images(28, digit_size=30)
    assert sum(data.sizes().values()) == 1797
    assert sorted(target.y_train.unique().tolist()) == [0, 1, 2]
    assert target.num_classes == 3
    # Classes 5..9 relabelled 0..4 in the order given.
    sub = select_classes(data, [9, 5], "two")
    assert sub.y_test.tolist().count(0) == (data.y_test == 9).sum().item()
