"""Adaptive depth and width: exit after transformer block ``l`` with the prefix ``m``.

:class:`DepthMatryoshka` puts an exit after chosen blocks of a :class:`~matryoshka.apps.vit.ViTBackbone`:
exit ``e`` normalises the class token, projects it to ``d`` and feeds a
:class:`~matryoshka.models.heads.MatryoshkaHead`, so every ``(layer, size)`` pair is a classifier.
The loss sums :class:`~matryoshka.losses.classification.MatryoshkaLoss` over exits with per-exit weights (the
2-D Matryoshka idea applied to a vision model). At deployment, :meth:`DepthMatryoshka.forward_exit`
runs only the first ``l`` blocks. The recipe reports accuracy per layer and size and plots it
against the FLOPs each pair costs (counted by ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from matryoshka.apps.common import check_positive, config_to_dict, finish, make_nesting
from matryoshka.apps.vit import ViTBackbone
from matryoshka.config import help_field
from matryoshka.data.images import load_mnist_subset
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.report import line_axes, save_line_plot
from matryoshka.training.image import seed_everything
from matryoshka.training.loop import fit

__all__ = ["DepthConfig", "DepthMatryoshka", "depth_loss", "plot_quality_vs_compute", "run_depth"]


class DepthMatryoshka(nn.Module):
    """A ViT with a Matryoshka classifier after each block in ``exits``.

    Args:
        vit: the transformer (its ``blocks``, ``tokens`` are used; its own final projection
            is not).
        num_classes: ``C``.
        nesting: the width ladder; ``nesting.dim`` is each exit's embedding size.
        exits: 1-based block indices to exit after, increasing (default: every block).

    ``forward(x) -> (E, L, B, C)``: logits of every exit and size.
    """

    def __init__(
        self,
        vit: ViTBackbone,
        num_classes: int,
        nesting: Nesting,
        exits: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        exits = list(exits) if exits is not None else list(range(1, vit.depth + 1))
        if not exits or exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] > vit.depth:
            raise ValueError(
                f"exits={exits} must be increasing block indices in [1, {vit.depth}] "
                f"(the ViT has depth={vit.depth})."
            )
        self.vit = vit
        self.nesting = nesting
        self.exits = exits
        d = nesting.dim
        self.norms = nn.ModuleList(nn.LayerNorm(vit.width) for _ in exits)
        self.projs = nn.ModuleList(nn.Linear(vit.width, d) for _ in exits)
        self.heads = nn.ModuleList(MatryoshkaHead(d, num_classes, nesting) for _ in exits)

    def _exit_index(self, layer: int) -> int:
        if layer not in self.exits:
            raise ValueError(f"layer={layer} has no exit: pick one of {self.exits}.")
        return self.exits.index(layer)

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Every exit's embedding: ``(B, C, H, W) -> (E, B, d)``."""
        t = self.vit.tokens(x)
        out = []
        for i, block in enumerate(self.vit.blocks[: self.exits[-1]], start=1):
            t = block(t)
            if i in self.exits:
                e = self.exits.index(i)
                out.append(self.projs[e](self.norms[e](t[:, 0])))
        return torch.stack(out)  # (E, B, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (E, L, B, C)``."""
        z = self.forward_embeddings(x)
        return torch.stack([head(z[e]) for e, head in enumerate(self.heads)])

    def embed(self, x: torch.Tensor, layer: int, m: int) -> torch.Tensor:
        """The size-``m`` embedding at exit ``layer``, running only blocks ``1..layer``:
        ``(B, C, H, W) -> (B, m)``."""
        e = self._exit_index(layer)
        self.nesting.index(m)
        t = self.vit.tokens(x)
        for block in self.vit.blocks[:layer]:
            t = block(t)
        return self.projs[e](self.norms[e](t[:, 0]))[:, :m]

    def forward_exit(self, x: torch.Tensor, layer: int, m: int) -> torch.Tensor:
        """Logits of one ``(layer, m)`` pair, computing only what it needs: ``-> (B, C)``."""
        z = self.embed(x, layer, m)
        head: MatryoshkaHead = self.heads[self._exit_index(layer)]  # type: ignore[assignment]
        return head.forward_size(z, m)

    def exit_flops(self, layer: int, m: int) -> int:
        """FLOPs of :meth:`forward_exit` for one image, counted by ``torch.utils.flop_counter``."""
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.training
        x = torch.zeros(1, self.vit.in_channels, self.vit.image_size, self.vit.image_size)
        x = x.to(next(self.parameters()).device)
        # Train mode keeps nn.TransformerEncoderLayer off its fused inference kernel, whose
        # matmuls the counter cannot see; there is no dropout, so the arithmetic is the same.
        self.train()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.forward_exit(x, layer, m)
        self.train(was_training)
        return int(counter.get_total_flops())


def depth_loss(
    logits: torch.Tensor, target: torch.Tensor, nesting: Nesting, exit_weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_e a_e * sum_l c_l * CE(logits[e, l], target)``: ``(E, L, B, C), (B,) ->
    (scalar, (E, L) detached per-pair losses)``."""
    if logits.shape[0] != len(exit_weights):
        raise ValueError(
            f"logits has {logits.shape[0]} exits but exit_weights has {len(exit_weights)} "
            "entries: give one weight per exit."
        )
    loss_fn = MatryoshkaLoss(nesting=nesting)
    total = logits.new_zeros(())
    per = []
    for e, a in enumerate(exit_weights):
        loss, per_size = loss_fn(logits[e], target)
        total = total + float(a) * loss
        per.append(per_size)
    return total, torch.stack(per)


def plot_quality_vs_compute(
    points: dict[str, list[tuple[float, float]]], path: str | Path, title: str
) -> Path:
    """Accuracy against MFLOPs, one line per exit (points ordered by size)."""
    fig, ax = line_axes()
    for name, pts in points.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (forward to this exit, this size)")
    ax.set_ylabel("test top-1")
    ax.set_title(title)
    return save_line_plot(fig, ax, path)


@dataclass
class DepthConfig:
    """Adaptive depth x width recipe: ViT exits after every block, MRL heads at every exit."""

    depth: int = help_field("transformer blocks (an exit after each)", default=4)
    width: int = help_field("transformer width", default=64)
    embed_dim: int = help_field("embedding size d of every exit", default=64)
    nesting_start: int = help_field("first size of the doubling ladder", default=2)
    exit_weights: list[float] | None = help_field(
        "one loss weight per exit (default all 1)", default=None
    )
    epochs: int = help_field("training epochs", default=10)
    batch_size: int = help_field("examples per step", default=128)
    lr: float = help_field("peak AdamW learning rate", default=1e-3)
    seed: int = help_field("seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_depth")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        check_positive(self, "depth", "width", "embed_dim", "nesting_start", "epochs", "batch_size")
        if self.exit_weights is not None and len(self.exit_weights) != self.depth:
            raise ValueError(
                f"exit_weights={self.exit_weights} has {len(self.exit_weights)} entries but "
                f"depth={self.depth}: give one weight per exit."
            )
        make_nesting(self.embed_dim, self.nesting_start)


def run_depth(config: DepthConfig) -> dict[str, Any]:
    """Train the exits jointly; accuracy and FLOPs per (layer, size); write the report."""
    t0 = time.perf_counter()
    data = load_mnist_subset(seed=config.seed)
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    seed_everything(config.seed)
    vit = ViTBackbone(config.embed_dim, 1, 28, 7, config.width, config.depth, 4)
    model = DepthMatryoshka(vit, data.num_classes, nesting)
    weights = config.exit_weights or [1.0] * config.depth

    def step(idx: torch.Tensor) -> torch.Tensor:
        model.train()
        return depth_loss(model(data.x_train[idx]), data.y_train[idx], nesting, weights)[0]

    fit(
        model.parameters(),
        step,
        len(data.y_train),
        config.epochs,
        config.batch_size,
        config.lr,
        seed=config.seed,
        weight_decay=0.05,
        progress=config.progress,
        desc="depth x width",
    )
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb in data.x_test.split(500)], dim=2)  # (E, L, N, C)
    acc = (logits.argmax(-1) == data.y_test).double().mean(-1).numpy()  # (E, L)
    flops = np.array([[model.exit_flops(layer, m) for m in nesting] for layer in model.exits])
    metrics: dict[str, dict[str, list[Any]]] = {
        "top1": {
            f"exit after block {layer}": acc[e].tolist() for e, layer in enumerate(model.exits)
        },
        "kflops": {
            f"exit after block {layer}": (flops[e] / 1e3).tolist()
            for e, layer in enumerate(model.exits)
        },
    }
    points = {
        f"block {layer}": list(zip((flops[e] / 1e6).tolist(), acc[e].tolist(), strict=True))
        for e, layer in enumerate(model.exits)
    }
    out = Path(config.out_dir)
    plot = plot_quality_vs_compute(
        points, out / "quality_vs_compute.png", "adaptive depth x width, MNIST subset"
    )
    full = acc[-1, -1]
    cheap = [
        (flops[e, i], acc[e, i], layer, m)
        for e, layer in enumerate(model.exits)
        for i, m in enumerate(nesting)
        if acc[e, i] >= full - 0.02
    ]
    f_min, a_min, l_min, m_min = min(cheap)
    notes = [
        f"full model (block {model.exits[-1]}, m={nesting.dim}): top-1 {100 * full:.1f}% at "
        f"{flops[-1, -1] / 1e6:.2f} MFLOPs per image",
        "per exit at m="
        + str(nesting.dim)
        + ": "
        + ", ".join(
            f"block {layer} {100 * acc[e, -1]:.1f}% for {100 * flops[e, -1] / flops[-1, -1]:.0f}% "
            "of the FLOPs"
            for e, layer in enumerate(model.exits)
        ),
        f"cheapest (block, size) within 2 points of the full model: block {l_min}, m={m_min}: "
        f"{100 * a_min:.1f}% at {f_min / 1e6:.2f} MFLOPs ({flops[-1, -1] / f_min:.2f}x fewer)",
        "width barely changes compute here (the head is tiny next to a block); depth does",
        "the kflops table is compute per image (kFLOPs), not a percentage",
    ]
    results = {
        "task": "Adaptive depth x width (ViT exits) on the MNIST subset",
        "sizes": list(nesting),
        "metrics": metrics,
        "metric_labels": {"top1": "test top-1", "kflops": "kFLOPs per image"},
        "notes": notes,
        "meta": {"config": config_to_dict(config)},
    }
    return finish(results, out, t0, {"Quality against compute": plot})
