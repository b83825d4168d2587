"""The hand-built ViT backbone: shapes, registration, errors, and that it learns."""

from __future__ import annotations

import pytest
import torch

from matryoshka.apps.vit import ViTBackbone, ViTConfig
from matryoshka.backbones import create_backbone, list_backbones
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.nesting import Nesting
from matryoshka.training.config import TrainConfig


def test_vit_maps_images_to_embeddings():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny", embed_dim=12, width=16, depth=2)
    assert isinstance(vit, ViTBackbone)
    assert vit.embed_dim == 12
    z = vit(torch.randn(3, 1, 28, 28))
    assert z.shape == (3, 12)
    assert vit.tokens(torch.randn(3, 1, 28, 28)).shape == (3, 17, 16)  # 16 patches + class token


def test_vit_is_a_registered_backbone_for_train_configs():
    assert "vit_tiny" in list_backbones()
    config = TrainConfig(backbone="vit_tiny", embed_dim=16, backbone_width=16)
    assert config.backbone == "vit_tiny"


def test_vit_attention_mixes_patches():
    """The class token sees every patch: changing one corner patch changes the embedding."""
    torch.manual_seed(0)
    vit = ViTBackbone(embed_dim=8, width=16, depth=1, heads=2).eval()
    x = torch.randn(1, 1, 28, 28)
    x2 = x.clone()
    x2[..., 21:, 21:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(vit(x), vit(x2))


def test_mrl_vit_fits_a_small_batch():
    torch.manual_seed(0)
    nesting = Nesting([2, 8])
    model = MatryoshkaClassifier(ViTBackbone(embed_dim=8, width=16, depth=1, heads=2), 4, nesting)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 4
    loss_fn = MatryoshkaLoss(nesting=nesting)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss_fn(model(x), y).loss.item()
    for _ in range(60):
        loss = loss_fn(model(x), y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_vit_errors_name_the_fix():
    with pytest.raises(ValueError, match="not a multiple of patch_size=5"):
        ViTBackbone(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible by heads=3"):
        ViTBackbone(width=16, heads=3)
    vit = ViTBackbone(embed_dim=8, width=16, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"expects \(batch, 1, 28, 28\)"):
        vit(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="epochs=0 must be a positive int"):
        ViTConfig(epochs=0)
