import pickle

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.backbones import create_backbone, list_backbones, register_backbone
from matryoshka.backbones.resnet import ResNetBackbone, load_weights_file
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.nesting import Nesting


@pytest.mark.parametrize("name", ["cnn", "cnn_tiny", "mlp", "resnet18", "vit_tiny"])
def test_backbones_map_images_to_embeddings(name):
    torch.manual_seed(0)
    net = create_backbone(name, embed_dim=24, in_channels=1)
    assert net.embed_dim == 24
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 24)


def test_resnet_keeps_512_features_without_projection():
    net = ResNetBackbone(embed_dim=512, in_channels=3)
    assert isinstance(net.proj, torch.nn.Identity)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_resnet_loads_local_weights_and_skips_mismatched(tmp_path):
    torch.manual_seed(0)
    src = ResNetBackbone(embed_dim=512, in_channels=3)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    dst = ResNetBackbone(embed_dim=512, in_channels=3, weights=path)
    assert dst.skipped_weights == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))
    gray = ResNetBackbone(embed_dim=512, in_channels=1, weights=path)  # stem shape differs
    assert gray.skipped_weights == ["conv1.weight"]


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": _Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_weights_file(path)
    assert not (tmp_path / "PWNED").exists()


def test_registry_and_model_errors():
    with pytest.raises(ValueError, match=r"backbone='vgg' is not registered: use one of \["):
        create_backbone("vgg")
    with pytest.raises(ValueError, match=r"backbone 'cnn' is already registered"):
        register_backbone("cnn")(lambda: torch.nn.Identity())
    assert "resnet18" in list_backbones()
    with pytest.raises(FileNotFoundError, match=r"weights='nope.pt' does not exist"):
        load_weights_file("nope.pt")
    with pytest.raises(ValueError, match=r"has no embed_dim attribute"):
        MatryoshkaClassifier(torch.nn.Linear(4, 4), 3, Nesting([2, 4]))
    with pytest.raises(
        ValueError, match=r"backbone.embed_dim=16 but the nesting's largest size is 8"
    ):
        MatryoshkaClassifier(create_backbone("cnn_tiny", embed_dim=16), 3, Nesting([4, 8]))
