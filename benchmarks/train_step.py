"""A whole training step of ResNet-18 with Matryoshka heads + loss against the same step with a
plain head.

    python benchmarks/train_step.py [--batch 32] [--classes 1000] [--repeats 10]

Forward, loss, backward and the AdamW step of a small-input ResNet-18 (512-d embedding) on a
batch of 3x32x32 images, with (a) one ``nn.Linear(512, C)`` + cross-entropy, (b) the fused MRL
head over ``Nesting.doubling(8, 512)`` + ``MatryoshkaLoss``, (c) the same with MRL-E, and (d) the
per-size loop head for reference. Timed interleaved in one run; prints medians and ratios and
writes JSON. Target (DESIGN.md): MRL step <= 1.05x the plain step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from matryoshka import MatryoshkaHead, MatryoshkaLoss, Nesting
from matryoshka.backbones import create_backbone


class PlainModel(nn.Module):
    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.backbone = create_backbone("resnet18", embed_dim=512, in_channels=3)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


class MatryoshkaModel(nn.Module):
    def __init__(self, n_classes: int, nesting: Nesting, tied: bool, loop: bool = False) -> None:
        super().__init__()
        self.backbone = create_backbone("resnet18", embed_dim=512, in_channels=3)
        self.nesting, self.loop = nesting, loop
        if loop:
            self.heads = nn.ModuleList(nn.Linear(m, n_classes) for m in nesting)
        else:
            self.head = MatryoshkaHead(512, n_classes, nesting, tied=tied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)
        if self.loop:
            return torch.stack([h(z[:, :m]) for h, m in zip(self.heads, self.nesting, strict=True)])
        return self.head(z)


def make_step(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/train_step.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    nesting = Nesting.doubling(8, 512)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.classes, (args.batch,))
    mrl_loss = MatryoshkaLoss(nesting=nesting)

    def matryoshka(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mrl_loss(logits, target).loss

    steps = {
        "plain (Linear + CE)": make_step(PlainModel(args.classes), F.cross_entropy, x, y),
        "MRL fused": make_step(
            MatryoshkaModel(args.classes, nesting, tied=False), matryoshka, x, y
        ),
        "MRL-E fused": make_step(
            MatryoshkaModel(args.classes, nesting, tied=True), matryoshka, x, y
        ),
        "MRL per-size loop": make_step(
            MatryoshkaModel(args.classes, nesting, False, loop=True), matryoshka, x, y
        ),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain (Linear + CE)"]
    print(
        f"train step: ResNet-18 (small stem), batch {args.batch} x 3x32x32, {args.classes} classes, "
        f"{len(nesting)} sizes {list(nesting)}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'variant':<22}{'ms':>10}{'x plain':>10}")
    for name, t in med.items():
        print(f"{name:<22}{t * 1e3:>10.1f}{t / base:>10.3f}")
    ratios = {name: t / base for name, t in med.items()}
    print(f"target: MRL fused <= 1.05x plain: {ratios['MRL fused']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "nesting": list(nesting),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.platform(),
                "median_ms": {k: v * 1e3 for k, v in med.items()},
                "ratio_vs_plain": ratios,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
