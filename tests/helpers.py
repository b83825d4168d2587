"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any

from matryoshka.training.config import TrainConfig


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A seconds-long MRL run on the CPU: an MLP backbone of width 32, an 8-d embedding with
    the doubling ladder from 2, no progress bars; ``overrides`` replace any field."""
    fields: dict[str, Any] = {
        "backbone": "mlp",
        "backbone_width": 32,
        "embed_dim": 8,
        "progress": False,
        **overrides,
    }
    return TrainConfig(**fields)
