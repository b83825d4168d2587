"""Feature extraction: multi-level features, pretrained weights, nested image features."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.apps.common import load_digits_images
from matryoshka.apps.features import (
    FeaturesConfig,
    MatryoshkaProjection,
    MultiLevelFeatures,
    embed_images,
    pool,
)
from matryoshka.backbones import create_backbone
from matryoshka.backbones.resnet import ResNetBackbone
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import build_model, save_model


def test_pool_handles_maps_tokens_and_vectors():
    assert pool(torch.ones(2, 3, 4, 4)).shape == (2, 3)
    assert pool(torch.ones(2, 5, 3)).shape == (2, 3)
    assert pool(torch.ones(2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="cannot pool a feature of shape"):
        pool(torch.ones(2, 3, 4, 4, 4))


def test_pretrained_resnet_multi_level_features(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("resnet18", in_channels=1)
    assert isinstance(source, ResNetBackbone)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = create_backbone("resnet18", in_channels=1, weights=str(path)).eval()
    x = torch.randn(2, 1, 28, 28)
    extractor = MultiLevelFeatures(loaded, ["net.layer3", "net.layer4"])
    with torch.no_grad():
        levels = extractor.forward_levels(x)
        assert {k: v.shape[1] for k, v in levels.items()} == {
            "net.layer3": 256,
            "net.layer4": 512,
            "output": 512,
        }
        # The pooled last stage is the network's own embedding (embed_dim=512: no projection),
        # and the weights are the saved ones.
        torch.testing.assert_close(levels["net.layer4"], levels["output"])
        torch.testing.assert_close(levels["output"], source.eval()(x))
        assert extractor(x).shape == (2, 1280)


def test_multi_level_errors_and_projection_freezes():
    cnn = create_backbone("cnn_tiny")
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not modules of SmallCNN"):
        MultiLevelFeatures(cnn, ["nope"])
    with pytest.raises(ValueError, match="no features"):
        MultiLevelFeatures(cnn, [], include_output=False)
    proj = MatryoshkaProjection(MultiLevelFeatures(cnn, ["features.1"]), 4 + 16, 8)
    assert proj(torch.randn(3, 1, 28, 28)).shape == (3, 8)
    assert not any(p.requires_grad for p in cnn.parameters())
    assert all(p.requires_grad for p in proj.proj.parameters())


def test_embed_images_gives_the_nested_prefix(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(backbone="cnn_tiny", embed_dim=16, nesting=[4, 16], out_dir=str(tmp_path))
    model = build_model(config, 10, 1).eval()
    path = save_model(
        model, config, tmp_path / "model", {"num_classes": 10, "input_shape": [1, 28, 28]}
    )
    z, y = embed_images(path, "digits-8x8", "test", dim=4)
    data = load_digits_images()
    assert z.shape == (len(data.y_test), 4)
    assert (y == data.y_test.numpy()).all()
    with torch.no_grad():
        expected = model.backbone(data.x_test)[:, :4].numpy()
    assert abs(z - expected).max() < 1e-4
    z2, _ = embed_images(path, "digits-8x8", "test", dim=4, layers=["features.1"])
    assert z2.shape == (len(y), 8)  # 4 nested dims + 4 channels of the first stage
    with pytest.raises(ValueError, match=r"dim=32 must be in \[1, 16\]"):
        embed_images(path, "digits-8x8", "test", dim=32)
    with pytest.raises(ValueError, match="split='dev'"):
        embed_images(path, "digits-8x8", "dev")


def test_config_errors():
    with pytest.raises(ValueError, match="1-based layer numbers"):
        FeaturesConfig(layers=[0])
    with pytest.raises(ValueError, match="n_train=0 must be a positive int"):
        FeaturesConfig(n_train=0)
