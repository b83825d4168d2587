"""Application recipes built on the core library: multi-task heads, a Matryoshka autoencoder
with 2-D views, transfer learning, feature extraction from pretrained backbones, a small vision
transformer, adaptive depth, and reinforcement learning with a Matryoshka state encoder.

Each module ``matryoshka.apps.<name>`` has a config dataclass and ``run_<name>(config)`` that
writes a report; ``mrl app <name> --config configs/app_<name>.yaml`` runs it from the command
line. :data:`APPS` maps each name to its module, imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["APPS", "get_app"]

#: ``name: (module, config class, run function)``.
APPS: dict[str, tuple[str, str, str]] = {
    "multitask": ("matryoshka.apps.multitask", "MultiTaskConfig", "run_multitask"),
    "autoencoder": ("matryoshka.apps.autoencoder", "AutoencoderConfig", "run_autoencoder"),
    "transfer": ("matryoshka.apps.transfer", "TransferConfig", "run_transfer"),
    "features": ("matryoshka.apps.features", "FeaturesConfig", "run_features"),
    "vit": ("matryoshka.apps.vit", "ViTConfig", "run_vit"),
    "depth": ("matryoshka.apps.depth", "DepthConfig", "run_depth"),
    "rl": ("matryoshka.apps.rl", "RLConfig", "run_rl"),
}


def get_app(name: str) -> tuple[type, Callable[[Any], dict[str, Any]]]:
    """``(config class, run function)`` of the application ``name``."""
    if name not in APPS:
        raise ValueError(f"app={name!r} is not one of {sorted(APPS)}.")
    module, cfg, run = APPS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg), getattr(mod, run)
