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

#: ``name: (module, config class, run function, one-line help)``.
APPS: dict[str, tuple[str, str, str, str]] = {
    "multitask": (
        "matryoshka.apps.multitask",
        "MultiTaskConfig",
        "run_multitask",
        "multi-task heads on one nested embedding (MNIST subset or WordNet)",
    ),
    "autoencoder": (
        "matryoshka.apps.autoencoder",
        "AutoencoderConfig",
        "run_autoencoder",
        "Matryoshka autoencoder on the MNIST subset, with 2-D views",
    ),
    "transfer": (
        "matryoshka.apps.transfer",
        "TransferConfig",
        "run_transfer",
        "transfer a nested MNIST embedding to another target task",
    ),
    "features": (
        "matryoshka.apps.features",
        "FeaturesConfig",
        "run_features",
        "nested features from frozen MiniLM on WordNet lexicographer categories",
    ),
    "vit": ("matryoshka.apps.vit", "ViTConfig", "run_vit", "MRL with a tiny ViT on MNIST"),
    "depth": (
        "matryoshka.apps.depth",
        "DepthConfig",
        "run_depth",
        "adaptive depth x width: ViT exits after every block, MRL heads at every exit",
    ),
    "rl": (
        "matryoshka.apps.rl",
        "RLConfig",
        "run_rl",
        "PPO on CartPole-v1, a nested state encoder",
    ),
}


def get_app(name: str) -> tuple[type, Callable[[Any], dict[str, Any]]]:
    """``(config class, run function)`` of the application ``name``."""
    if name not in APPS:
        raise ValueError(f"app={name!r} is not one of {sorted(APPS)}.")
    module, cfg, run, _ = APPS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg), getattr(mod, run)
