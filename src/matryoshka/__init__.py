"""matryoshka: Matryoshka Representation Learning in PyTorch.

One embedding, every size: train a representation whose every prefix ``z[:, :m]`` on a nesting
ladder is useful on its own, evaluate it per size against honest baselines, and deploy it at the
size the budget allows.

The names below are imported on first use, so ``import matryoshka`` (and ``mrl --help``) does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MatryoshkaHead": "matryoshka.models.heads",
    "MatryoshkaLoss": "matryoshka.losses.classification",
    "MatryoshkaLossOutput": "matryoshka.losses.classification",
    "Nesting": "matryoshka.nesting",
    "normalize": "matryoshka.ops",
    "prefix_norms": "matryoshka.ops",
    "prefix_similarities": "matryoshka.ops",
    "truncate": "matryoshka.ops",
    "truncate_numpy": "matryoshka.ops",
}

if TYPE_CHECKING:
    from matryoshka.losses.classification import MatryoshkaLoss, MatryoshkaLossOutput
    from matryoshka.models.heads import MatryoshkaHead
    from matryoshka.nesting import Nesting
    from matryoshka.ops import (
        normalize,
        prefix_norms,
        prefix_similarities,
        truncate,
        truncate_numpy,
    )

__all__ = [
    "MatryoshkaHead",
    "MatryoshkaLoss",
    "MatryoshkaLossOutput",
    "Nesting",
    "__version__",
    "normalize",
    "prefix_norms",
    "prefix_similarities",
    "truncate",
    "truncate_numpy",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'matryoshka' has no attribute {name!r}")
