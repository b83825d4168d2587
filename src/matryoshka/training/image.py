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
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka.backbones import create_backbone
from matryoshka.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from matryoshka.data.images import ImageSplits, load_dataset
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.training.config import TrainConfig

__all__ = [
    "TrainResult",
    "build_model",
    "init_distributed",
    "load_model",
    "predict_logits",
    "random_shift",
    "save_model",
    "seed_everything",
    "shift_images",
    "train",
]


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


def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by a random ``(dy, dx)`` in ``[-max_shift, max_shift]``, replicating
    the border: ``(B, C, H, W) -> (B, C, H, W)``."""
    b = x.shape[0]
    shifts = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return shift_images(x, max_shift, shifts)


def shift_images(x: torch.Tensor, max_shift: int, shifts: torch.Tensor) -> torch.Tensor:
    """Crop each image of the border-replicated ``x`` at offsets ``shifts: (B, 2)`` in
    ``[0, 2 * max_shift]``: ``(B, C, H, W) -> (B, C, H, W)``."""
    b, c, h, w = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
    dy, dx = shifts[:, 0].to(x.device), shifts[:, 1].to(x.device)
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


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``): gloo on CPU,
    nccl on CUDA (one GPU per local rank). Returns ``(rank, world_size, device)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


@dataclass
class _Run:
    """Everything one training run carries between steps (built by :func:`_setup`)."""

    config: TrainConfig
    data: ImageSplits
    model: MatryoshkaClassifier
    forward: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    loss_fn: MatryoshkaLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int
    world: int
    steps_per_epoch: int
    total_steps: int
    ckpt_dir: Path
    step: int = 0
    skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _setup(config: TrainConfig, data: ImageSplits | None) -> _Run:
    """Seed, load the data, build model/optimizer/schedule (DDP under torchrun), resume."""
    seed_everything(config.seed)
    if data is None:
        data = load_dataset(config.data, config.data_root, seed=config.seed)
    rank, world, device = init_distributed(_device(config.device))
    model = build_model(config, data.num_classes, data.input_shape[0]).to(device)
    loss_fn = MatryoshkaLoss(nesting=model.nesting).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    forward: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    run = _Run(
        config, data, model, forward, loss_fn, optimizer, scheduler, device, rank, world,
        steps_per_epoch, total_steps, Path(config.out_dir) / "checkpoints",
    )  # fmt: skip
    if config.resume:
        last = latest_checkpoint(run.ckpt_dir)
        if last is not None:
            meta = load_checkpoint(last, model, optimizer, scheduler, rng=True)
            run.step, run.history = meta["step"], meta["history"]
            run.skipped = meta.get("skipped", 0)
    return run


def _checkpoint(run: _Run) -> None:
    """Rank 0 writes ``checkpoints/step-<step>`` and prunes to ``keep_checkpoints``."""
    if run.rank == 0:
        meta = {
            "step": run.step,
            "history": run.history,
            "skipped": run.skipped,
            "config": run.config.to_dict(),
        }
        save_checkpoint(
            run.ckpt_dir / f"step-{run.step:08d}", run.model, run.optimizer, run.scheduler, meta
        )
        for old in sorted(run.ckpt_dir.glob("step-*.json"))[: -run.config.keep_checkpoints]:
            old.with_name(old.stem + ".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    if run.world > 1:
        torch.distributed.barrier()


def _train_step(run: _Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step's gradients on the global batch ``idx``: this rank's shard of every
    micro-batch, losses scaled so the summed (and DDP-averaged) gradient is that of the batch
    mean. Returns the batch loss (scalar) and the ``(L,)`` per-size losses."""
    config, data, device, rank, world = run.config, run.data, run.device, run.rank, run.world
    shifts = None
    if config.augment_shift:  # drawn for the whole batch, so every sharding sees the same
        gen = torch.Generator().manual_seed(_step_seed(config.seed, run.step))
        shifts = torch.randint(0, 2 * config.augment_shift + 1, (len(idx), 2), generator=gen)
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"
    )
    positions = torch.arange(len(idx))
    micro = positions.tensor_split(config.grad_accum)
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    per_size = torch.zeros(len(run.model.nesting), device=device)
    for i, pos in enumerate(micro):
        shard = pos[rank::world]
        weight = len(shard) * world / len(idx)
        if len(shard) == 0:  # keep this rank in the collective with a zero-weight example
            shard, weight = pos[:1] if len(pos) else positions[:1], 0.0
        x = data.x_train[idx[shard]].to(device, non_blocking=True)
        y = data.y_train[idx[shard]].to(device, non_blocking=True)
        if shifts is not None:
            x = shift_images(x, config.augment_shift, shifts[shard])
        sync = world == 1 or i == len(micro) - 1
        with autocast, nullcontext() if sync else run.forward.no_sync():  # type: ignore[operator]
            loss, sizes_loss = run.loss_fn(run.forward(x).float(), y)
            (loss * weight).backward()
        total += loss.detach() * weight / world
        per_size += sizes_loss * weight / world
    if world > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(per_size)
    return total, per_size


def _run_epoch(run: _Run, epoch: int, bar: Any) -> torch.Tensor:
    """The remaining steps of ``epoch`` (all of them unless resumed mid-epoch); its last loss."""
    config, nesting = run.config, run.model.nesting
    # The batch order depends only on (seed, epoch): resuming mid-epoch skips what was done.
    order = torch.randperm(
        len(run.data.y_train),
        generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
    )
    loss = torch.zeros(())
    for idx in order.split(config.batch_size)[run.step - epoch * run.steps_per_epoch :]:
        run.model.train()
        loss, per_size = _train_step(run, idx)
        if not torch.isfinite(loss):  # the same verdict on every rank (reduced loss)
            if config.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at step {run.step} (epoch {epoch}); "
                    f"per-size losses {per_size.tolist()}. Lower lr, check the data, or set "
                    "nonfinite='skip' to drop such batches. No checkpoint was written."
                )
            run.skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        bar.update(1)
        bar.set_postfix_str(
            " ".join(f"{m}:{v:.2f}" for m, v in zip(nesting, per_size.tolist(), strict=True))
        )
        at_epoch_end = run.step % run.steps_per_epoch == 0  # checkpointed after validation
        every = config.checkpoint_every
        if every and run.step % every == 0 and not at_epoch_end:
            _checkpoint(run)
    return loss


def _save(run: _Run) -> Path:
    """Rank 0 writes ``model.json`` (+ safetensors) and ``history.json``; the model's path."""
    out = Path(run.config.out_dir)
    extra = {
        "num_classes": run.data.num_classes,
        "input_shape": list(run.data.input_shape),
        "data": run.data.name,
        "history": run.history,
        "skipped_steps": run.skipped,
        "world_size": run.world,
    }
    model_path = out / "model.json"
    if run.rank == 0:
        model_path = save_model(run.model, run.config, out / "model", extra)
        (out / "history.json").write_text(json.dumps(run.history, indent=1))
    if run.world > 1:
        torch.distributed.barrier()
    return model_path


def train(config: TrainConfig, data: ImageSplits | None = None) -> TrainResult:
    """Train one model as ``config`` says and save it to ``config.out_dir/model.json``.

    ``data`` overrides ``config.data`` (the demo loads the split once for every run). Under
    ``torchrun`` every process takes its shard of each batch and DistributedDataParallel averages
    the gradients, so N processes follow the same trajectory as one process with the same
    ``batch_size`` (exactly, up to float summation order, for backbones without BatchNorm, whose
    statistics stay per process). Rank 0 alone writes checkpoints, the model and the progress bar.
    """
    t0 = time.perf_counter()
    run = _setup(config, data)
    nesting = run.model.nesting
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not config.progress or run.rank != 0,
        desc=f"{config.method} d={config.embed_dim}",
        dynamic_ncols=True,
    )
    for epoch in range(run.step // run.steps_per_epoch, config.epochs):
        loss = _run_epoch(run, epoch, bar)
        val_acc = _accuracy_per_size(run.model, run.data.x_val, run.data.y_val)
        run.history.append(
            {"epoch": epoch + 1, "step": run.step, "loss": loss.item(), "val_acc": val_acc}
        )
        if run.rank == 0:
            bar.write(
                f"epoch {epoch + 1}/{config.epochs} val top-1 "
                + " ".join(f"{m}:{a:.3f}" for m, a in zip(nesting, val_acc, strict=True))
            )
        _checkpoint(run)
    bar.close()
    model_path = _save(run)
    return TrainResult(run.model.eval(), run.history, model_path, time.perf_counter() - t0)
