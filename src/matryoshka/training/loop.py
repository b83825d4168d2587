"""The small training loop the application recipes share: AdamW + cosine over seeded batches.

The recipes (:mod:`matryoshka.apps`) decide what a batch is and what its loss is; this loop only
steps the optimizer. The image loop with checkpoints, resume and DDP is
:mod:`matryoshka.training.image`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["fit"]


def fit(
    params: Iterable[nn.Parameter],
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 1e-4,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW + cosine decay over ``epochs`` passes of ``n`` examples in seeded random batches.

    ``step_loss(idx)`` gets the ``(b,)`` indices of one batch and returns the scalar loss; the
    caller decides what a batch is and which modules are in train mode. Returns the mean loss of
    every epoch.
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        history.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch)
    bar.close()
    return history
