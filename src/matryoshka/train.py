"""Training loop in plain PyTorch: seeded, AdamW + cosine, per-size progress, atomic checkpoints,
``resume``.

One :class:`TrainConfig` describes a run (the CLI and the YAML recipes are generated from it).
``method`` picks what is trained on the same backbone: ``mrl`` (a head per size), ``mrl-e``
(tied heads) or ``ff`` (an ordinary model whose embedding has size ``embed_dim``: the fixed-feature
baseline, one per size).

The loop keeps everything that decides the result in the checkpoint (weights, optimizer,
scheduler, RNG, step) and derives the batch order from ``(seed, epoch)``, so a run killed at any
step and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka.backbones import create_backbone, list_backbones
from matryoshka.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from matryoshka.data.images import DATASETS, ImageSplits, load_dataset
from matryoshka.losses import MatryoshkaLoss
from matryoshka.models import MatryoshkaClassifier
from matryoshka.nesting import Nesting

__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load_model",
    "predict_logits",
    "random_shift",
    "save_model",
    "seed_everything",
    "train",
]

METHODS = ("mrl", "mrl-e", "ff")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """One training run. Every field is a CLI flag (``--epochs 5``) and a YAML key."""

    data: str = _help(
        "data set: mnist-subset (bundled), mnist, fashion-mnist, cifar10, folder",
        default="mnist-subset",
    )
    data_root: str | None = _help(
        "folder with the data set's files (not for mnist-subset)", default=None
    )
    backbone: str = _help(
        "registered feature extractor: cnn, resnet18, mlp, cnn_tiny", default="cnn"
    )
    backbone_width: int = _help(
        "channel width of the cnn backbones (0: the backbone's default)", default=0
    )
    embed_dim: int = _help("embedding size d (the largest nesting size)", default=128)
    method: str = _help(
        "mrl (head per size), mrl-e (tied heads) or ff (fixed size, baseline)", default="mrl"
    )
    nesting: list[int] | None = _help(
        "sizes, e.g. [2, 4, 8]; default doubling from nesting_start to embed_dim", default=None
    )
    nesting_start: int = _help("first size of the default doubling ladder", default=2)
    nesting_weights: list[float] | None = _help(
        "one loss weight per size (default all 1)", default=None
    )
    epochs: int = _help("passes over the training split", default=10)
    batch_size: int = _help("examples per step", default=128)
    lr: float = _help("peak AdamW learning rate (cosine decay to 0)", default=3e-3)
    weight_decay: float = _help("AdamW weight decay", default=5e-4)
    augment_shift: int = _help(
        "random translation of training images by up to N pixels (0: off)", default=0
    )
    seed: int = _help("seed of the split, the init and the batch order", default=0)
    out_dir: str = _help("folder for checkpoints, the model and the history", default="runs/train")
    checkpoint_every: int = _help(
        "also checkpoint every N steps (0: at the end of each epoch only)", default=0
    )
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=2)
    resume: bool = _help("continue from the newest good checkpoint in out_dir", default=False)
    nonfinite: str = _help(
        "on a NaN/inf loss: stop (raise) or skip (drop the batch)", default="stop"
    )
    device: str = _help("cpu, cuda, or auto", default="auto")
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {list(METHODS)}.")
        if self.backbone not in list_backbones():
            raise ValueError(f"backbone={self.backbone!r} is not one of {list_backbones()}.")
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} is not one of {list(DATASETS)}.")
        for name in ("embed_dim", "epochs", "batch_size", "keep_checkpoints", "nesting_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int.")
        for name in ("checkpoint_every", "backbone_width", "augment_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0 (0 turns it off).")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr={self.lr!r} must be a positive finite float, e.g. 3e-3.")
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
        """Build from a dict (a YAML recipe); unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}: known keys are {sorted(known)}.")
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, per-epoch history, where it was saved."""

    model: MatryoshkaClassifier
    history: list[dict[str, Any]]
    model_path: Path
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by a random ``(dy, dx)`` in ``[-max_shift, max_shift]``, replicating
    the border: ``(B, C, H, W) -> (B, C, H, W)``. Draws from torch's global RNG (checkpointed)."""
    b, c, h, w = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
    dy = torch.randint(0, 2 * s + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * s + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' but no CUDA device is available: use device='cpu' or 'auto'."
        )
    return torch.device(name)


def build_model(config: TrainConfig, num_classes: int, in_channels: int) -> MatryoshkaClassifier:
    """The backbone named by ``config`` with a Matryoshka head (or a single-size FF head)."""
    kwargs: dict[str, Any] = {"embed_dim": config.embed_dim, "in_channels": in_channels}
    if config.backbone_width:
        kwargs["width"] = config.backbone_width
    backbone = create_backbone(config.backbone, **kwargs)
    return MatryoshkaClassifier(
        backbone, num_classes, config.nesting_obj(), tied=config.method == "mrl-e"
    )


@torch.no_grad()
def predict_logits(
    model: MatryoshkaClassifier, x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """All sizes' logits in eval mode: ``(N, ...) -> (L, N, C)`` on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    outs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs, dim=1)


def _accuracy_per_size(
    model: MatryoshkaClassifier, x: torch.Tensor, y: torch.Tensor
) -> list[float]:
    logits = predict_logits(model, x)  # (L, N, C)
    return (logits.argmax(-1) == y).double().mean(1).tolist()


def save_model(
    model: MatryoshkaClassifier, config: TrainConfig, path: Path, extra: dict[str, Any]
) -> Path:
    """Save weights (safetensors) + the config and ``extra`` (JSON); :func:`load_model` inverts it."""
    meta = {"config": config.to_dict(), "nesting": model.nesting.to_dict(), **extra}
    return save_checkpoint(path, model, meta=meta, rng=False)


def load_model(
    json_path: str | Path, device: str = "cpu"
) -> tuple[MatryoshkaClassifier, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`: ``(model in eval mode, metadata)``."""
    meta = load_checkpoint(json_path)
    config = TrainConfig.from_dict(meta["config"])
    model = build_model(config, meta["num_classes"], meta["input_shape"][0])
    load_checkpoint(json_path, model)
    return model.to(device).eval(), meta


def train(config: TrainConfig, data: ImageSplits | None = None) -> TrainResult:
    """Train one model as ``config`` says and save it to ``config.out_dir/model.json``.

    ``data`` overrides ``config.data`` (the demo loads the split once for every run).
    """
    t0 = time.perf_counter()
    out = Path(config.out_dir)
    ckpt_dir = out / "checkpoints"
    seed_everything(config.seed)
    if data is None:
        data = load_dataset(config.data, config.data_root, seed=config.seed)
    device = _device(config.device)
    model = build_model(config, data.num_classes, data.input_shape[0]).to(device)
    nesting = model.nesting
    loss_fn = MatryoshkaLoss(nesting=nesting).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    n_train = len(data.y_train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    step, history, skipped = 0, [], 0
    if config.resume:
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            meta = load_checkpoint(last, model, optimizer, scheduler, rng=True)
            step, history, skipped = meta["step"], meta["history"], meta.get("skipped", 0)

    def checkpoint() -> None:
        meta = {"step": step, "history": history, "skipped": skipped, "config": config.to_dict()}
        save_checkpoint(ckpt_dir / f"step-{step:08d}", model, optimizer, scheduler, meta)
        for old in sorted(ckpt_dir.glob("step-*.json"))[: -config.keep_checkpoints]:
            old.with_name(old.stem + ".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not config.progress,
        desc=f"{config.method} d={config.embed_dim}",
        dynamic_ncols=True,
    )
    for epoch in range(step // steps_per_epoch, config.epochs):
        # The batch order depends only on (seed, epoch): resuming mid-epoch skips what was done.
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        )
        batches = order.split(config.batch_size)
        for idx in batches[step - epoch * steps_per_epoch :]:
            model.train()
            x = data.x_train[idx].to(device, non_blocking=True)
            y = data.y_train[idx].to(device, non_blocking=True)
            if config.augment_shift:
                x = random_shift(x, config.augment_shift)
            loss, per_size = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                if config.nonfinite == "stop":
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch}); per-size "
                        f"losses {per_size.tolist()}. Lower lr, check the data, or set "
                        "nonfinite='skip' to drop such batches. No checkpoint was written."
                    )
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix_str(
                " ".join(f"{m}:{v:.2f}" for m, v in zip(nesting, per_size.tolist(), strict=True))
            )
            at_epoch_end = step % steps_per_epoch == 0  # checkpointed below, after validation
            if config.checkpoint_every and step % config.checkpoint_every == 0 and not at_epoch_end:
                checkpoint()
        val_acc = _accuracy_per_size(model, data.x_val, data.y_val)
        history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), "val_acc": val_acc})
        bar.write(
            f"epoch {epoch + 1}/{config.epochs} val top-1 "
            + " ".join(f"{m}:{a:.3f}" for m, a in zip(nesting, val_acc, strict=True))
        )
        checkpoint()
    bar.close()
    seconds = time.perf_counter() - t0
    model_path = save_model(
        model,
        config,
        out / "model",
        {
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "data": data.name,
            "history": history,
            "skipped_steps": skipped,
        },
    )
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return TrainResult(model.eval(), history, model_path, seconds)
