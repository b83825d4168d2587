"""The options of one image training run (:func:`matryoshka.training.image.train`).

Every field is a CLI flag of ``mrl train`` (``--epochs 5``) and a YAML recipe key; the help text
lives on the field. Importing this module needs neither torch nor numpy, so ``mrl train --help``
is fast; the checks that need the backbone registry or the data set list import them when a
config is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from matryoshka._validate import nonnegative_int, positive_float, positive_int
from matryoshka.config import from_dict, help_field
from matryoshka.nesting import Nesting

__all__ = ["METHODS", "TrainConfig"]

METHODS = ("mrl", "mrl-e", "ff")
_POSITIVE = ("embed_dim", "epochs", "batch_size", "keep_checkpoints", "nesting_start", "grad_accum")


@dataclass
class TrainConfig:
    """One training run. Every field is a CLI flag (``--epochs 5``) and a YAML key."""

    data: str = help_field(
        "data set: mnist-subset (bundled), mnist, fashion-mnist, cifar10, folder",
        default="mnist-subset",
    )
    data_root: str | None = help_field(
        "folder with the data set's files (not for mnist-subset)", default=None
    )
    backbone: str = help_field(
        "registered feature extractor: cnn, resnet18, mlp, cnn_tiny", default="cnn"
    )
    backbone_width: int = help_field(
        "channel width of the cnn backbones (0: the backbone's default)", default=0
    )
    embed_dim: int = help_field("embedding size d (the largest nesting size)", default=128)
    method: str = help_field(
        "mrl (head per size), mrl-e (tied heads) or ff (fixed size, baseline)", default="mrl"
    )
    nesting: list[int] | None = help_field(
        "sizes, e.g. [2, 4, 8]; default doubling from nesting_start to embed_dim", default=None
    )
    nesting_start: int = help_field("first size of the default doubling ladder", default=2)
    nesting_weights: list[float] | None = help_field(
        "one loss weight per size (default all 1)", default=None
    )
    epochs: int = help_field("passes over the training split", default=10)
    batch_size: int = help_field("examples per step", default=128)
    lr: float = help_field("peak AdamW learning rate (cosine decay to 0)", default=3e-3)
    weight_decay: float = help_field("AdamW weight decay", default=5e-4)
    augment_shift: int = help_field(
        "random translation of training images by up to N pixels (0: off)", default=0
    )
    seed: int = help_field("seed of the split, the init and the batch order", default=0)
    out_dir: str = help_field(
        "folder for checkpoints, the model and the history", default="runs/train"
    )
    checkpoint_every: int = help_field(
        "also checkpoint every N steps (0: at the end of each epoch only)", default=0
    )
    keep_checkpoints: int = help_field("how many recent checkpoints to keep", default=2)
    resume: bool = help_field("continue from the newest good checkpoint in out_dir", default=False)
    nonfinite: str = help_field(
        "on a NaN/inf loss: stop (raise) or skip (drop the batch)", default="stop"
    )
    grad_accum: int = help_field(
        "split each batch into N micro-batches, one optimizer step (same result, less memory)",
        default=1,
    )
    amp: bool = help_field(
        "bfloat16 autocast on CUDA (mixed precision); no effect on CPU", default=False
    )
    device: str = help_field("cpu, cuda, or auto", default="auto")
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        from matryoshka.backbones import list_backbones
        from matryoshka.data.images import DATASETS

        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {list(METHODS)}.")
        if self.backbone not in list_backbones():
            raise ValueError(f"backbone={self.backbone!r} is not one of {list_backbones()}.")
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} is not one of {list(DATASETS)}.")
        for name in _POSITIVE:
            positive_int(getattr(self, name), name)
        for name in ("checkpoint_every", "backbone_width", "augment_shift"):
            nonnegative_int(getattr(self, name), name)
        positive_float(self.lr, "lr", "3e-3")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0.")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite={self.nonfinite!r} must be 'stop' or 'skip'.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'.")
        self.nesting_obj()  # validates nesting, weights and embed_dim together

    def nesting_obj(self) -> Nesting:
        """The ladder this run trains: one size (``embed_dim``) for ``ff``."""
        if self.method == "ff":
            return Nesting([self.embed_dim])
        if self.nesting is not None:
            nesting = Nesting(self.nesting, self.nesting_weights)
        else:
            start = min(self.nesting_start, self.embed_dim)
            nesting = Nesting.doubling(start, self.embed_dim)
            if self.nesting_weights is not None:
                nesting = Nesting(nesting.sizes, self.nesting_weights)
        nesting.check_dim(self.embed_dim, "embed_dim")
        return nesting

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (a YAML recipe's fields); unknown keys are an error naming them."""
        return from_dict(cls, data)
