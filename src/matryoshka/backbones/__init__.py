"""Feature extractors registered by name: ``create_backbone("cnn", embed_dim=128)``.

A backbone is any ``nn.Module`` mapping a batch to ``(batch, embed_dim)`` and exposing
``embed_dim``. Register new ones with :func:`register_backbone`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["backbone_accepts", "create_backbone", "list_backbones", "register_backbone"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a factory ``(**kwargs) -> nn.Module`` available as ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered: pick another name.")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names."""
    return sorted(_REGISTRY)


def backbone_accepts(name: str, param: str) -> bool:
    """Whether the factory of the registered backbone ``name`` takes the keyword ``param``."""
    if name not in _REGISTRY:
        raise ValueError(f"backbone={name!r} is not registered: use one of {list_backbones()}.")
    return param in inspect.signature(_REGISTRY[name]).parameters


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; ``kwargs`` go to its factory (``embed_dim``, ``in_channels``...)."""
    if name not in _REGISTRY:
        raise ValueError(f"backbone={name!r} is not registered: use one of {list_backbones()}.")
    return _REGISTRY[name](**kwargs)


# Importing the modules registers their backbones.
from matryoshka.backbones import cnn, mlp, resnet, timm_vit, vit  # noqa: E402, F401
