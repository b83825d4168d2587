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

__all__ = ["LOADERS", "METHODS", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]

METHODS = ("mrl", "mrl-e", "ff")
LOADERS = ("auto", "memory", "stream")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "triangular")
_AUGMENTS = ("none", "flip", "crop-flip")  # matryoshka.data.image_stream.AUGMENTS (torch-free)
_POSITIVE = ("embed_dim", "epochs", "batch_size", "keep_checkpoints", "nesting_start", "grad_accum")


@dataclass
class TrainConfig:
    """One training run. Every field is a CLI flag (``--epochs 5``) and a YAML key."""

    data: str = help_field(
        "data set: mnist-subset (bundled), mnist, fashion-mnist, cifar10, folder, webdataset "
        "(tar shards in data_root/train and data_root/val)",
        default="mnist-subset",
    )
    data_root: str | None = help_field(
        "folder with the data set's files (not for mnist-subset)", default=None
    )
    backbone: str = help_field(
        "registered feature extractor: cnn, resnet18, resnet50, vit_b16 (timm), mlp, cnn_tiny",
        default="cnn",
    )
    pretrained: str | None = help_field(
        "local .pth/.safetensors weights for the backbone (resnet50, vit_b16, resnet18); "
        "nothing downloads",
        default=None,
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
    lr: float = help_field("peak learning rate (see schedule)", default=3e-3)
    weight_decay: float = help_field("weight decay of the optimizer", default=5e-4)
    optimizer: str = help_field("adamw, or sgd (with momentum, nesterov off)", default="adamw")
    momentum: float = help_field("SGD momentum (optimizer=sgd)", default=0.9)
    decay_norm: bool = help_field(
        "apply weight decay to normalisation layers (off: BatchNorm/LayerNorm parameters are "
        "not decayed, as in the FFCV ResNet-50 recipe)",
        default=True,
    )
    schedule: str = help_field(
        "cosine (decay to 0 over the run) or triangular (linear from lr/1e4 up to lr at "
        "lr_peak_epoch, then linear to 0: FFCV's 'cyclic')",
        default="cosine",
    )
    lr_peak_epoch: float = help_field("epoch of the peak lr (schedule=triangular)", default=2.0)
    label_smoothing: float = help_field(
        "label smoothing of the cross-entropy of every size (0: off)", default=0.0
    )
    augment_shift: int = help_field(
        "random translation of training images by up to N pixels (0: off)", default=0
    )
    loader: str = help_field(
        "memory (every image in one tensor), stream (a DataLoader reads files batch by batch: "
        "memory O(batch)), or auto (stream for webdataset and pre-split folders "
        "root/train + root/val, memory otherwise)",
        default="auto",
    )
    num_workers: int = help_field(
        "DataLoader worker processes decoding images (loader=stream; 0: in the main process)",
        default=0,
    )
    image_size: int = help_field(
        "side of the square training images of folder/webdataset data (0: 32)", default=0
    )
    val_image_size: int = help_field(
        "side of the evaluation images when streaming (0: image_size)", default=0
    )
    val_crop_ratio: float = help_field(
        "streamed evaluation: resize the shorter side to val_image_size / ratio, centre-crop "
        "(0.875: the usual 224 of 256; 1: no margin)",
        default=1.0,
    )
    augment: str = help_field(
        "streamed training augmentation: none, flip, or crop-flip (RandomResizedCrop + "
        "horizontal flip, for natural images; keep none for digits)",
        default="none",
    )
    progressive_resize: list[int] | None = help_field(
        "[min, max, start_epoch, end_epoch]: streamed training images grow from min to max "
        "between the epochs (multiples of 32; FFCV ResNet-50 recipe)",
        default=None,
    )
    grayscale: bool = help_field("read folder/webdataset images as one channel", default=False)
    bad_images: str = help_field(
        "on an unreadable image file: skip (count, warn with the first paths) or fail (stop)",
        default="skip",
    )
    channels_last: bool = help_field(
        "channels-last memory format for the model and the batches (faster convolutions on "
        "CUDA with amp)",
        default=False,
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
        from matryoshka.backbones import backbone_accepts, list_backbones
        from matryoshka.data.images import DATASETS

        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {list(METHODS)}.")
        if self.backbone not in list_backbones():
            raise ValueError(f"backbone={self.backbone!r} is not one of {list_backbones()}.")
        if self.pretrained is not None and not backbone_accepts(self.backbone, "weights"):
            raise ValueError(
                f"pretrained={self.pretrained!r} but backbone={self.backbone!r} takes no weights "
                "file: use resnet18, resnet50 or vit_b16, or drop pretrained."
            )
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} is not one of {list(DATASETS)}.")
        for name in _POSITIVE:
            positive_int(getattr(self, name), name)
        for name in (
            "checkpoint_every", "backbone_width", "augment_shift", "num_workers", "image_size",
            "val_image_size",
        ):  # fmt: skip
            nonnegative_int(getattr(self, name), name)
        self._check_streaming()
        positive_float(self.lr, "lr", "3e-3")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0.")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite={self.nonfinite!r} must be 'stop' or 'skip'.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'.")
        self.nesting_obj()  # validates nesting, weights and embed_dim together

    def _check_streaming(self) -> None:
        """The options of the streaming loader, the optimizer and the schedule."""
        choices = {
            "loader": LOADERS,
            "augment": _AUGMENTS,
            "bad_images": ("skip", "fail"),
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if self.data == "webdataset" and self.loader == "memory":
            raise ValueError(
                "loader='memory' but data='webdataset' is read batch by batch: use "
                "loader='stream' or 'auto'."
            )
        if self.loader == "stream" and self.data not in ("folder", "webdataset"):
            raise ValueError(
                f"loader='stream' reads image files but data={self.data!r} is loaded into "
                "memory: use data='folder' or 'webdataset', or loader='memory'."
            )
        if self.data == "webdataset" and self.checkpoint_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} but data='webdataset' resumes at "
                "epoch boundaries only: set checkpoint_every=0 (a checkpoint per epoch)."
            )
        if not 0 < self.val_crop_ratio <= 1:
            raise ValueError(
                f"val_crop_ratio={self.val_crop_ratio!r} must be in (0, 1], e.g. 0.875."
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"label_smoothing={self.label_smoothing!r} must be in [0, 1), e.g. 0.1."
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} must be in [0, 1), e.g. 0.9.")
        if self.schedule == "triangular" and not 0 <= self.lr_peak_epoch <= self.epochs:
            raise ValueError(
                f"lr_peak_epoch={self.lr_peak_epoch!r} must be in [0, epochs={self.epochs}]."
            )
        pr = self.progressive_resize
        if pr is not None and (
            len(pr) != 4 or not all(isinstance(v, int) and v >= 0 for v in pr)
            or not 0 < pr[0] <= pr[1] or pr[2] > pr[3]
        ):  # fmt: skip
            raise ValueError(
                f"progressive_resize={pr!r} must be [min, max, start_epoch, end_epoch] with "
                "0 < min <= max and start_epoch <= end_epoch, e.g. [160, 192, 29, 34]."
            )

    def streams(self) -> bool:
        """Whether this run reads its training data batch by batch (``loader`` resolved;
        ``auto`` looks at ``data_root``)."""
        if self.loader != "auto":
            return self.loader == "stream"
        if self.data == "webdataset":
            return True
        if self.data != "folder" or self.data_root is None:
            return False
        from pathlib import Path

        root = Path(self.data_root)
        train, val = root / "train", root / "val"
        return train.is_dir() and val.is_dir() and any(p.is_dir() for p in train.iterdir())

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
