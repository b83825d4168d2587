"""torchvision ResNets: ResNet-18 with its stem adapted to small images, ResNet-50 for ImageNet
(2048-d feature); weights come from a local file, nothing downloads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from matryoshka.backbones import register_backbone

__all__ = ["ResNet50Backbone", "ResNetBackbone", "load_pretrained", "load_weights_file"]


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (loaded with
    ``weights_only=True``: no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r} does not exist: pass a local weights file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights={str(path)!r} does not hold a state dict.")
    return state


def _tensors(state: Mapping[str, object], path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``
    checkpoints and DistributedDataParallel's ``module.`` prefix."""
    for key in ("state_dict", "model"):
        inner = state.get(key)
        if isinstance(inner, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = inner
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"pretrained={str(path)!r} holds no tensors: pass a state dict file.")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_pretrained(
    module: nn.Module, path: str | Path, ignore: tuple[str, ...] = (), what: str = "the backbone"
) -> None:
    """Load the local weights file ``path`` into ``module``, strictly: every parameter and buffer
    of ``module`` must be in the file with its shape, and the file may hold nothing else except
    keys starting with ``ignore`` (a classifier the backbone drops, say).

    ``FileNotFoundError`` names a missing file; ``ValueError`` names the file and the first
    missing, unexpected and mismatched keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={str(path)!r} does not exist: pass the path of a local .pth or "
            ".safetensors weights file."
        )
    state = _tensors(load_weights_file(path), path)
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing from the file (first: {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} shape mismatches (first: {k} is {tuple(state[k].shape)} in the "
            f"file, {tuple(own[k].shape)} in the model)"
        )
    if problems:
        raise ValueError(
            f"pretrained={str(path)!r} does not fit {what}: {'; '.join(problems)}. Pass weights "
            "saved from the same architecture (its state_dict()), or drop pretrained."
        )
    module.load_state_dict(state)


def _adapt_stem(net: nn.Module, in_channels: int, small_input: bool) -> None:
    """Fit a torchvision ResNet's stem to the input, in place: a 3x3 stride-1 first conv and no
    max-pool for small images (28x28, 32x32), a first conv of ``in_channels``; drop ``fc``."""
    if small_input or in_channels != 3:
        stride, kernel = (1, 3) if small_input else (2, 7)
        net.conv1 = nn.Conv2d(
            in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False
        )
    if small_input:
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18 as a feature extractor: ``(B, C, H, W) -> (B, embed_dim)``.

    ``small_input=True`` replaces the 7x7/2 stem and max-pool with a 3x3/1 convolution, the usual
    adaptation for 28x28-32x32 images. The pooled 512-d feature is the embedding when
    ``embed_dim == 512``; otherwise a linear layer projects it. ``weights`` loads a local file
    (ImageNet weights from torchvision, say); tensors whose shapes differ (the adapted stem, the
    classifier) are skipped.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        in_channels: int = 3,
        small_input: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        _adapt_stem(net, in_channels, small_input)
        self.skipped_weights: list[str] = []
        if weights is not None:
            state = load_weights_file(weights)
            own = net.state_dict()
            usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            self.skipped_weights = sorted(set(state) - set(usable))
            net.load_state_dict(usable, strict=False)
        self.net = net
        self.embed_dim = embed_dim
        self.proj: nn.Module = nn.Identity() if embed_dim == 512 else nn.Linear(512, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``."""
        return self.proj(self.net(x))


@register_backbone("resnet18")
def resnet18_small(
    embed_dim: int = 512,
    in_channels: int = 3,
    small_input: bool = True,
    weights: str | Path | None = None,
) -> ResNetBackbone:
    """ResNet-18, small-image stem by default, random init unless ``weights`` is a local file."""
    return ResNetBackbone(embed_dim, in_channels, small_input, weights)


class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50 as a feature extractor: ``(B, C, H, W) -> (B, embed_dim)``.

    The standard ImageNet stem (7x7/2 + max-pool) unless ``small_input``; the pooled 2048-d
    feature is the embedding when ``embed_dim == 2048`` (the MRL ladder 8...2048), otherwise a
    linear layer projects it. ``weights`` is a local file with torchvision ResNet-50 weights
    (``fc.*`` is ignored), loaded strictly by :func:`load_pretrained`.
    """

    def __init__(
        self,
        embed_dim: int = 2048,
        in_channels: int = 3,
        small_input: bool = False,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        _adapt_stem(net, in_channels, small_input)
        if weights is not None:
            load_pretrained(net, weights, ignore=("fc.",), what="backbone='resnet50'")
        self.net = net
        self.embed_dim = embed_dim
        self.proj: nn.Module = nn.Identity() if embed_dim == 2048 else nn.Linear(2048, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, embed_dim)``."""
        return self.proj(self.net(x))


@register_backbone("resnet50")
def resnet50(
    embed_dim: int = 2048,
    in_channels: int = 3,
    small_input: bool = False,
    weights: str | Path | None = None,
) -> ResNet50Backbone:
    """ResNet-50 (ImageNet stem), random init unless ``weights`` is a local file."""
    return ResNet50Backbone(embed_dim, in_channels, small_input, weights)
