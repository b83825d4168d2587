"""matryoshka: Matryoshka Representation Learning in PyTorch.

One embedding, every size: train a representation whose every prefix ``z[:, :m]`` on a nesting
ladder is useful on its own, evaluate it per size against honest baselines, and deploy it at the
size the budget allows.
"""

from matryoshka.losses.classification import MatryoshkaLoss, MatryoshkaLossOutput
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.ops import normalize, prefix_norms, prefix_similarities, truncate, truncate_numpy

__version__ = "0.1.0"

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
