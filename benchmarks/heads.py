"""Fused Matryoshka heads against one full-size Linear and against the per-size loop.

    python benchmarks/heads.py [--batch 256] [--classes 1000] [--repeats 30] [--out results/heads.json]

Forward + backward of every size of ``Nesting.doubling(8, 2048)`` (9 sizes), timed side by side
in one run, interleaved so that drift on the machine hits every variant alike. Prints a table of
median times and ratios and writes JSON. Targets (DESIGN.md): tied <= 1.15x one
``nn.Linear(2048, 1000)``; untied at least 2x faster than the per-size loop.
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

from matryoshka import MatryoshkaHead, Nesting


class LoopHead(nn.Module):
    """The original implementation's way: one ``nn.Linear`` per size (untied), or slices of one
    weight (tied), evaluated in a Python loop and stacked."""

    def __init__(self, dim: int, n_classes: int, nesting: Nesting, tied: bool) -> None:
        super().__init__()
        self.nesting, self.tied = nesting, tied
        if tied:
            self.full = nn.Linear(dim, n_classes)
        else:
            self.heads = nn.ModuleList(nn.Linear(m, n_classes) for m in nesting)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.tied:
            w, b = self.full.weight, self.full.bias
            return torch.stack([F.linear(z[:, :m], w[:, :m], b) for m in self.nesting])
        return torch.stack([h(z[:, :m]) for h, m in zip(self.heads, self.nesting, strict=True)])


def step_fn(module: nn.Module, z: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward with a fixed upstream gradient."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        z.grad = None
        out = module(z)
        out.backward(grad if out.shape == grad.shape else grad[-1])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("results/heads.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nesting = Nesting.doubling(args.start, args.dim)
    z = torch.randn(args.batch, args.dim, requires_grad=True)
    grad = torch.randn(len(nesting), args.batch, args.classes)
    variants: dict[str, nn.Module] = {
        "linear (full size only)": nn.Linear(args.dim, args.classes),
        "tied fused (MRL-E)": MatryoshkaHead(args.dim, args.classes, nesting, tied=True),
        "tied loop": LoopHead(args.dim, args.classes, nesting, tied=True),
        "untied fused (MRL)": MatryoshkaHead(args.dim, args.classes, nesting, tied=False),
        "untied loop": LoopHead(args.dim, args.classes, nesting, tied=False),
    }
    fns = {name: step_fn(mod, z, grad) for name, mod in variants.items()}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["linear (full size only)"]
    ratios = {
        "tied_fused_vs_linear": med["tied fused (MRL-E)"] / base,
        "tied_loop_vs_linear": med["tied loop"] / base,
        "untied_fused_vs_linear": med["untied fused (MRL)"] / base,
        "untied_loop_vs_linear": med["untied loop"] / base,
        "untied_speedup_over_loop": med["untied loop"] / med["untied fused (MRL)"],
        "tied_speedup_over_loop": med["tied loop"] / med["tied fused (MRL-E)"],
    }
    print(
        f"heads: {len(nesting)} sizes {list(nesting)}, {args.classes} classes, batch {args.batch}, "
        f"forward+backward, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'variant':<26}{'ms':>9}{'x linear':>10}")
    for name, t in med.items():
        print(f"{name:<26}{t * 1e3:>9.2f}{t / base:>10.2f}")
    flop_floor = sum(nesting) / args.dim  # untied heads share nothing: sum(m_l) / d of one head
    ratios["untied_flop_floor_vs_linear"] = flop_floor
    print(
        f"untied flop floor (sum of sizes / d): {flop_floor:.2f}x linear; the untied loop is "
        f"{ratios['untied_loop_vs_linear'] / flop_floor:.2f}x that floor, fused "
        f"{ratios['untied_fused_vs_linear'] / flop_floor:.2f}x"
    )
    print(
        f"targets: tied fused <= 1.15x linear: {ratios['tied_fused_vs_linear']:.2f}x; "
        f"untied fused >= 2x faster than loop: {ratios['untied_speedup_over_loop']:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "nesting": list(nesting),
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
