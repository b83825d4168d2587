"""Training loop in plain PyTorch: seeded, AdamW + cosine (or SGD + the FFCV triangular
schedule), per-size progress, atomic checkpoints, ``resume``.

One :class:`TrainConfig` describes a run (the CLI and the YAML recipes are generated from it).
``method`` picks what is trained on the same backbone: ``mrl`` (a head per size), ``mrl-e``
(tied heads) or ``ff`` (an ordinary model whose embedding has size ``embed_dim``: the fixed-feature
baseline, one per size).

The loop keeps everything that decides the result in the checkpoint (weights, optimizer,
scheduler, RNG, step) and derives the batch order from ``(seed, epoch)``, so a run killed at any
step and resumed ends with the same weights as an uninterrupted one.

Two data paths feed the same step. In memory (``loader: memory``; the bundled MNIST subset, the
torchvision sets, small folders): every image sits in one tensor and a batch is an index. Streamed
(``loader: stream``; image folders of any size, webdataset tar shards): a
:class:`~torch.utils.data.DataLoader` with ``num_workers`` processes decodes and augments each
rank's share of every batch, so memory is ``O(batch)``. A streamed folder run keeps the in-memory
path's guarantees: the batch order is the same permutation of ``(seed, epoch)``, each image's
augmentation is seeded by ``(seed, epoch, index)``, so ``resume`` is exact at any step on the CPU.
Tar shards are read in order and resume at epoch boundaries (``checkpoint_every`` must be 0).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka.backbones import backbone_accepts, create_backbone
from matryoshka.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from matryoshka.data.image_stream import (
    BAD_LABEL,
    BadImageLog,
    FileTable,
    FolderDataset,
    ImageTransform,
    StepBatchSampler,
    StreamData,
    TarShardDataset,
    micro_plan,
    open_folder,
    open_tar_shards,
    progressive_size,
    shard_indices,
    tar_steps,
)
from matryoshka.data.images import ImageSplits, load_dataset
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.classifier import MatryoshkaClassifier
from matryoshka.training.config import TrainConfig

__all__ = [
    "TrainResult",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate_split",
    "init_distributed",
    "load_model",
    "open_data",
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
    """The backbone named by ``config`` with a Matryoshka head (or a single-size FF head);
    ``config.pretrained`` loads the backbone's weights from that local file."""
    kwargs: dict[str, Any] = {"embed_dim": config.embed_dim, "in_channels": in_channels}
    if config.backbone_width:
        kwargs["width"] = config.backbone_width
    if config.pretrained is not None:
        if not backbone_accepts(config.backbone, "weights"):
            raise ValueError(
                f"pretrained={config.pretrained!r} but backbone={config.backbone!r} takes no "
                "weights file: use resnet18, resnet50 or vit_b16, or drop pretrained."
            )
        kwargs["weights"] = config.pretrained
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
    # the saved weights replace any pretrained ones: do not read (or need) that file again
    config = TrainConfig.from_dict({**meta["config"], "pretrained": None})
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


Data = ImageSplits | StreamData


def open_data(config: TrainConfig) -> Data:
    """The data ``config`` trains on: :class:`ImageSplits` in memory, or a :class:`StreamData`
    listing (nothing decoded) when ``config.streams()``."""
    if not config.streams():
        return load_dataset(
            config.data,
            config.data_root,
            seed=config.seed,
            image_size=config.image_size or 32,
            grayscale=config.grayscale,
            bad_images=config.bad_images,
        )
    if config.data_root is None:
        raise ValueError(f"data={config.data!r} needs data_root: the folder that holds its files.")
    if config.data == "webdataset":
        return open_tar_shards(config.data_root, config.grayscale)
    return open_folder(config.data_root, seed=config.seed, grayscale=config.grayscale)


def _input_shape(config: TrainConfig, data: Data) -> tuple[int, int, int]:
    if isinstance(data, ImageSplits):
        return data.input_shape
    side = config.image_size or 32
    if config.progressive_resize is not None:
        side = config.progressive_resize[1]
    return data.channels, side, side


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (``config.optimizer``); ``decay_norm=False`` exempts the parameters of
    normalisation layers from weight decay."""
    params: Any = model.parameters()
    if not config.decay_norm:
        norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
        no_decay = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters()}
        params = [
            {"params": [p for p in model.parameters() if id(p) in no_decay], "weight_decay": 0.0},
            {"params": [p for p in model.parameters() if id(p) not in no_decay]},
        ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: cosine to 0 over the run, or FFCV's triangular one (linear from
    ``lr * 1e-4`` at step 0 to ``lr`` at ``lr_peak_epoch``, linear to 0 at the last epoch)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    peak, end = config.lr_peak_epoch, float(config.epochs)

    def factor(step: int) -> float:
        return float(np.interp(step / steps_per_epoch, [0.0, peak, end], [1e-4, 1.0, 0.0]))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class _Run:
    """Everything one training run carries between steps (built by :func:`_setup`)."""

    config: TrainConfig
    data: Data
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
    bad: BadImageLog = field(default_factory=BadImageLog)

    @property
    def streams(self) -> bool:
        """Whether the training data come through a DataLoader."""
        return isinstance(self.data, StreamData)


def _steps_per_epoch(config: TrainConfig, data: Data, world: int) -> int:
    if isinstance(data, ImageSplits):
        return math.ceil(len(data.y_train) / config.batch_size)
    if data.kind == "folder":
        return math.ceil(len(data.train) / config.batch_size)
    if config.batch_size % world:
        raise ValueError(
            f"batch_size={config.batch_size} must be a multiple of the {world} processes for "
            f"data='webdataset' (each reads batch_size / {world} samples per step)."
        )
    return tar_steps(data.train, config.batch_size // world, world)


def _setup(config: TrainConfig, data: Data | None) -> _Run:
    """Seed, load (or list) the data, build model/optimizer/schedule (DDP under torchrun),
    resume."""
    seed_everything(config.seed)
    if data is None:
        data = open_data(config)
    rank, world, device = init_distributed(_device(config.device))
    in_channels = _input_shape(config, data)[0]
    model = build_model(config, data.num_classes, in_channels).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    base_loss = None
    if config.label_smoothing:
        base_loss = partial(
            torch.nn.functional.cross_entropy, label_smoothing=config.label_smoothing
        )
    loss_fn = MatryoshkaLoss(base_loss, nesting=model.nesting).to(device)
    optimizer = build_optimizer(config, model)
    steps_per_epoch = _steps_per_epoch(config, data, world)
    total_steps = config.epochs * steps_per_epoch
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
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
    run.bad = BadImageLog(config.bad_images)
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


#: ``fetch(i, positions) -> (x, y)``: micro-batch ``i``'s examples at those global positions.
Fetch = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _train_step(
    run: _Run, batch_len: int, plan: list[tuple[torch.Tensor, float]], fetch: Fetch
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step's gradients on a global batch of ``batch_len`` examples: this rank's
    part of every micro-batch (``plan``, from :func:`micro_plan`), losses scaled so the summed
    (and DDP-averaged) gradient is that of the batch mean. Streamed batches drop examples whose
    image was unreadable (label :data:`BAD_LABEL`). Returns the batch loss (scalar) and the
    ``(L,)`` per-size losses."""
    config, device, world = run.config, run.device, run.world
    shifts = None
    if config.augment_shift:  # drawn for the whole batch, so every sharding sees the same
        gen = torch.Generator().manual_seed(_step_seed(config.seed, run.step))
        shifts = torch.randint(0, 2 * config.augment_shift + 1, (batch_len, 2), generator=gen)
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"
    )
    run.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    per_size = torch.zeros(len(run.model.nesting), device=device)
    for i, (shard, planned) in enumerate(plan):
        weight = planned
        x, y = fetch(i, shard)
        if shifts is not None:
            x = shift_images(x, config.augment_shift, shifts[shard])
        if run.streams:
            good = y != BAD_LABEL
            n_good = int(good.sum())
            if n_good < len(y):  # drop unreadable images; keep a zero-weight one if none left
                weight *= n_good / len(y)
                x, y = (x[good], y[good]) if n_good else (x[:1], torch.zeros_like(y[:1]))
        if config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = world == 1 or i == len(plan) - 1
        with autocast, nullcontext() if sync else run.forward.no_sync():  # type: ignore[operator]
            loss, sizes_loss = run.loss_fn(run.forward(x).float(), y)
            (loss * weight).backward()
        total += loss.detach() * weight / world
        per_size += sizes_loss * weight / world
    if world > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(per_size)
    return total, per_size


def _finish_step(
    run: _Run, epoch: int, loss: torch.Tensor, per_size: torch.Tensor, bar: Any
) -> None:
    """Apply (or, on a non-finite loss, skip) the step; schedule, progress, mid-epoch
    checkpoint."""
    config, nesting = run.config, run.model.nesting
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


def _run_epoch(run: _Run, epoch: int, bar: Any) -> torch.Tensor:
    """The remaining steps of ``epoch`` (all of them unless resumed mid-epoch); its last loss."""
    if run.streams:
        return _run_stream_epoch(run, epoch, bar)
    config, data = run.config, run.data
    assert isinstance(data, ImageSplits)
    # The batch order depends only on (seed, epoch): resuming mid-epoch skips what was done.
    order = torch.randperm(
        len(data.y_train),
        generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
    )
    loss = torch.zeros(())
    for idx in order.split(config.batch_size)[run.step - epoch * run.steps_per_epoch :]:
        run.model.train()

        def fetch(_: int, shard: torch.Tensor, idx: torch.Tensor = idx) -> Any:
            x = data.x_train[idx[shard]].to(run.device, non_blocking=True)
            return x, data.y_train[idx[shard]].to(run.device, non_blocking=True)

        plan = micro_plan(len(idx), config.grad_accum, run.rank, run.world)
        loss, per_size = _train_step(run, len(idx), plan, fetch)
        _finish_step(run, epoch, loss, per_size, bar)
    return loss


def _loader(dataset: Any, config: TrainConfig, device: torch.device, **kw: Any) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset, num_workers=config.num_workers, pin_memory=device.type == "cuda", **kw
    )


def _rebatch(batches: Iterable[Any], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Re-cut ``(x, y, names)`` batches of any sizes (one per DataLoader worker's tail) into
    batches of exactly ``size``; the remainder is dropped."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    names: list[str] = []
    for x, y, n in batches:
        xs.append(x)
        ys.append(y)
        names += list(n)
        while len(names) >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size], names[:size]  # type: ignore[misc]
            xs, ys, names = [x_all[size:]], [y_all[size:]], names[size:]


def _train_batches(
    run: _Run, epoch: int, start: int
) -> Iterator[tuple[int, list[tuple[torch.Tensor, float]], Any]]:
    """``(global batch length, plan, (x, y, names))`` for the remaining steps of ``epoch``:
    ``(x, y)`` holds this rank's examples of every micro-batch, in plan order."""
    config, data = run.config, run.data
    assert isinstance(data, StreamData)
    size = progressive_size(epoch, config.progressive_resize, config.image_size or 32)
    transform = ImageTransform(size, True, config.augment, config.grayscale)
    if data.kind == "folder":
        dataset = FolderDataset(data.train, transform, config.grayscale, config.seed, epoch)
        sampler = StepBatchSampler(
            len(data.train), config.batch_size, config.seed, epoch, config.grad_accum,
            run.rank, run.world, start,
        )  # fmt: skip
        loader = _loader(dataset, config, run.device, batch_sampler=sampler)
        for idx, batch in zip(sampler.batches, loader, strict=True):
            yield len(idx), micro_plan(len(idx), config.grad_accum, run.rank, run.world), batch
        return
    local = config.batch_size // run.world
    tars = TarShardDataset(
        data.train, transform, config.grayscale, run.rank, run.world, config.seed, epoch
    )
    loader = _loader(tars, config, run.device, batch_size=local)
    plan = micro_plan(local, config.grad_accum, 0, 1)  # every rank: its own full local batch
    batches = _rebatch(loader, local)
    for _ in range(run.steps_per_epoch - start):
        yield local, plan, next(batches)


def _run_stream_epoch(run: _Run, epoch: int, bar: Any) -> torch.Tensor:
    """:func:`_run_epoch` on batches a DataLoader decodes."""
    loss = torch.zeros(())
    where = f"data_root={run.config.data_root!r} (training split)"
    start = run.step - epoch * run.steps_per_epoch
    for batch_len, plan, (x_all, y_all, names) in _train_batches(run, epoch, start):
        run.model.train()
        bad = (y_all == BAD_LABEL).nonzero().flatten().tolist()
        run.bad.add([names[i] for i in bad], where)
        x_all = x_all.to(run.device, non_blocking=True)
        y_all = y_all.to(run.device, non_blocking=True)
        cuts = np.cumsum([0] + [len(p) for p, _ in plan]).tolist()

        def fetch(
            i: int, _: torch.Tensor, x: Any = x_all, y: Any = y_all, c: list[int] = cuts
        ) -> Any:
            return x[c[i] : c[i + 1]], y[c[i] : c[i + 1]]

        loss, per_size = _train_step(run, batch_len, plan, fetch)
        _finish_step(run, epoch, loss, per_size, bar)
    return loss


@torch.no_grad()
def _stream_accuracy(
    model: MatryoshkaClassifier,
    config: TrainConfig,
    split: Any,
    kind: str,
    device: torch.device,
    rank: int,
    world: int,
    bad: BadImageLog,
    where: str,
) -> list[float]:
    """Top-1 per size over a streamed split (``FileTable`` or tar shards), each rank its share,
    counts summed over ranks; unreadable images are left out (and logged in ``bad``)."""
    model.eval()
    size = config.val_image_size or config.image_size or 32
    if config.progressive_resize is not None and not config.val_image_size:
        size = config.progressive_resize[1]
    transform = ImageTransform(size, False, "none", config.grayscale, config.val_crop_ratio)
    if kind == "folder":
        assert isinstance(split, FileTable)
        dataset: Any = torch.utils.data.Subset(
            FolderDataset(split, transform, config.grayscale),
            shard_indices(len(split), rank, world),
        )
    else:
        dataset = TarShardDataset(
            split, transform, config.grayscale, rank, world, config.seed, shuffle=False
        )
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"
    )
    correct = torch.zeros(len(model.nesting), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, names in _loader(dataset, config, device, batch_size=config.batch_size):
        good = y != BAD_LABEL
        bad.add([n for n, g in zip(names, good.tolist(), strict=True) if not g], where)
        x, y = x[good].to(device, non_blocking=True), y[good].to(device, non_blocking=True)
        if len(y) == 0:
            continue
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)  # (L, B, C)
        correct += (logits.argmax(-1) == y).sum(1).double()
        seen += len(y)
    if world > 1:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(seen)
    return (correct / seen.clamp(min=1)).tolist()


def _val_accuracy(run: _Run) -> list[float]:
    if isinstance(run.data, ImageSplits):
        return _accuracy_per_size(run.model, run.data.x_val, run.data.y_val)
    where = f"data_root={run.config.data_root!r} (validation split)"
    return _stream_accuracy(
        run.model, run.config, run.data.val, run.data.kind, run.device, run.rank, run.world,
        run.bad, where,
    )  # fmt: skip


def evaluate_split(
    model: MatryoshkaClassifier, config: TrainConfig, split: str = "test", data: Data | None = None
) -> list[float]:
    """Top-1 accuracy per size of ``model`` on ``split`` (``train``, ``val`` or ``test``) of the
    data ``config`` names, in memory or streamed (``mrl eval`` for either kind of run)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} must be 'train', 'val' or 'test'.")
    data = open_data(config) if data is None else data
    if isinstance(data, ImageSplits):
        x, y = {"train": (data.x_train, data.y_train), "val": (data.x_val, data.y_val)}.get(
            split, (data.x_test, data.y_test)
        )
        return _accuracy_per_size(model, x, y)
    device = next(model.parameters()).device
    log = BadImageLog(config.bad_images)
    acc = _stream_accuracy(
        model, config, getattr(data, split), data.kind, device, 0, 1, log,
        f"data_root={config.data_root!r} ({split} split)",
    )  # fmt: skip
    log.report(f"data_root={config.data_root!r} ({split} split)")
    return acc


def _save(run: _Run) -> Path:
    """Rank 0 writes ``model.json`` (+ safetensors) and ``history.json``; the model's path."""
    out = Path(run.config.out_dir)
    extra = {
        "num_classes": run.data.num_classes,
        "input_shape": list(_input_shape(run.config, run.data)),
        "data": run.data.name,
        "history": run.history,
        "skipped_steps": run.skipped,
        "world_size": run.world,
    }
    if isinstance(run.data, StreamData):
        extra["classes"] = run.data.classes
        extra["bad_images"] = run.bad.count
    model_path = out / "model.json"
    if run.rank == 0:
        model_path = save_model(run.model, run.config, out / "model", extra)
        (out / "history.json").write_text(json.dumps(run.history, indent=1))
    if run.world > 1:
        torch.distributed.barrier()
    return model_path


def train(config: TrainConfig, data: Data | None = None) -> TrainResult:
    """Train one model as ``config`` says and save it to ``config.out_dir/model.json``.

    ``data`` overrides ``config.data`` (the demo loads the split once for every run). Under
    ``torchrun`` every process takes its shard of each batch and DistributedDataParallel averages
    the gradients, so N processes follow the same trajectory as one process with the same
    ``batch_size`` (exactly, up to float summation order, for backbones without BatchNorm, whose
    statistics stay per process). Rank 0 alone writes checkpoints, the model and the progress bar.
    Streamed data (``loader: stream``) are sharded the same way: each rank's DataLoader decodes
    only its share of every batch (tar shards: each rank reads ``shards[rank::world]``).
    Unreadable images are counted per epoch (``history[i]["bad_images"]``) and reported in a
    ``RuntimeWarning`` naming the first ones, or stop the run (``bad_images: fail``).
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
        before = run.bad.count
        loss = _run_epoch(run, epoch, bar)
        val_acc = _val_accuracy(run)
        entry = {"epoch": epoch + 1, "step": run.step, "loss": loss.item(), "val_acc": val_acc}
        if run.streams:
            entry["bad_images"] = run.bad.count - before
            if run.bad.count > before:
                rank = f" on rank {run.rank}" if run.world > 1 else ""
                run.bad.report(f"epoch {epoch + 1}{rank} (bad_images so far, train + val)")
        run.history.append(entry)
        if run.rank == 0:
            bar.write(
                f"epoch {epoch + 1}/{config.epochs} val top-1 "
                + " ".join(f"{m}:{a:.3f}" for m, a in zip(nesting, val_acc, strict=True))
            )
        _checkpoint(run)
    bar.close()
    model_path = _save(run)
    return TrainResult(run.model.eval(), run.history, model_path, time.perf_counter() - t0)
