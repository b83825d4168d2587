import pickle

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.backbones import create_backbone, list_backbones, register_backbone
from matryoshka.backbones.resnet import ResNetBackbone, load_weights_file
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.nesting import Nesting
from matryoshka.training.config import TrainConfig


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


def test_resnet50_is_registered_with_a_2048_feature():
    assert "resnet50" in list_backbones()
    torch.manual_seed(0)
    net = create_backbone("resnet50", embed_dim=2048, in_channels=3)
    assert isinstance(net.proj, torch.nn.Identity)
    assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_resnet50_loads_torchvision_weights_from_a_local_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    tv = resnet50(weights=None)  # what torchvision's ImageNet file holds, fc included
    st, pth = tmp_path / "r50.safetensors", tmp_path / "r50.pth"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(st))
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, pth)
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    for path in (st, pth):
        net = create_backbone("resnet50", weights=path).eval()
        torch.testing.assert_close(net(x), tv.eval()(x))


def test_pretrained_file_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained='.*missing.pth' does not exist"):
        create_backbone("resnet50", weights=tmp_path / "missing.pth")
    r18 = tmp_path / "r18.safetensors"
    net = ResNetBackbone(embed_dim=512, in_channels=3, small_input=False)
    save_file({k: v.contiguous() for k, v in net.net.state_dict().items()}, str(r18))
    with pytest.raises(
        ValueError,
        match=r"pretrained='.*r18.safetensors' does not fit backbone='resnet50': \d+ keys "
        r"missing from the file \(first: \['layer1.0.bn3.bias'.*shape mismatches \(first: "
        r"layer1.0.conv1.weight is \(64, 64, 3, 3\) in the file, \(64, 64, 1, 1\) in the model",
    ):
        create_backbone("resnet50", weights=r18)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ValueError, match=r"pretrained='.*empty.pth' holds no tensors"):
        create_backbone("resnet50", weights=empty)
    with pytest.raises(ValueError, match=r"pretrained='w.pt' but backbone='cnn' takes no weights"):
        TrainConfig(backbone="cnn", pretrained="w.pt")


def test_timm_vit_loads_local_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True
    )
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = create_backbone(
        "vit_b16", embed_dim=192, variant="vit_tiny_patch16_224", weights=path
    ).eval()
    ref.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)  # any multiple of the patch size
    torch.testing.assert_close(net(x), ref.eval()(x))
    assert create_backbone("vit_b16", embed_dim=8, variant="vit_tiny_patch16_224")(x).shape == (
        2,
        8,
    )
