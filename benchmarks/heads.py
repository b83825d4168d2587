"""Fused Matryoshka heads against one full-size Linear and against the per-size loop.

    python benchmarks/heads.py [--batch 256] [--classes 1000] [--repeats 40] [--threads 0]
                               [--clock wall|thread] [--out results/heads.json]

Forward + backward of every size of ``Nesting.doubling(8, 2048)`` (9 sizes), timed side by side
in one run: every round times each variant once, in an order rotated from round to round, so
drift on the machine hits every variant alike. A variant's ratio is the median over rounds of
its time divided by the Linear's time in the same round. Prints a table (median and min ms,
ratio) and writes JSON with the torch thread count and the load average before and after, so a
reader can judge whether the run was quiet. ``--clock thread`` times CPU time of the calling
thread (needs ``--threads 1``): far less sensitive to other processes on a loaded machine.

Targets (DESIGN.md): tied <= 1.10x one ``nn.Linear(2048, 1000)``; untied within 1.1x of its
flop floor ``sum(m) / d`` (2.0x for this ladder).
"""

from __future__ import annotations

import argparse
import json
import os
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


def time_rounds(
    fns: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds, order rotated every round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: perf_counter; thread: CPU time of this thread (needs --threads 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/heads.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1, e.g. --repeats 40")
    if args.clock == "thread" and args.threads != 1:
        parser.error(
            f"--clock thread with --threads {args.threads}: thread CPU time misses the work of "
            "other torch threads; pass --threads 1 or use --clock wall"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    load_before = os.getloadavg()
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
    time_rounds(fns, args.warmup, clock)
    times = time_rounds(fns, args.repeats, clock)
    load_after = os.getloadavg()
    base_name = "linear (full size only)"
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    # Paired: each round's time over the Linear's time in that same round.
    paired = {
        name: statistics.median(t / b for t, b in zip(ts, times[base_name], strict=True))
        for name, ts in times.items()
    }
    flop_floor = sum(nesting) / args.dim  # untied heads share nothing: sum(m_l) / d of one head
    ratios = {
        "tied_fused_vs_linear": paired["tied fused (MRL-E)"],
        "tied_loop_vs_linear": paired["tied loop"],
        "untied_fused_vs_linear": paired["untied fused (MRL)"],
        "untied_loop_vs_linear": paired["untied loop"],
        "untied_flop_floor_vs_linear": flop_floor,
        "untied_fused_vs_flop_floor": paired["untied fused (MRL)"] / flop_floor,
        "untied_speedup_over_loop": med["untied loop"] / med["untied fused (MRL)"],
        "tied_speedup_over_loop": med["tied loop"] / med["tied fused (MRL-E)"],
    }
    print(
        f"heads: {len(nesting)} sizes {list(nesting)}, {args.classes} classes, batch {args.batch}, "
        f"forward+backward, {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
        f"{args.clock} clock, {args.repeats} rounds; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    print(f"{'variant':<26}{'median ms':>11}{'min ms':>9}{'x linear':>10}")
    for name in times:
        print(f"{name:<26}{med[name] * 1e3:>11.2f}{best[name] * 1e3:>9.2f}{paired[name]:>10.2f}")
    print(
        f"untied flop floor (sum of sizes / d): {flop_floor:.2f}x linear; the untied loop is "
        f"{ratios['untied_loop_vs_linear'] / flop_floor:.2f}x that floor, fused "
        f"{ratios['untied_fused_vs_flop_floor']:.2f}x"
    )
    tied_ok = ratios["tied_fused_vs_linear"] <= 1.10
    untied_ok = ratios["untied_fused_vs_flop_floor"] <= 1.10
    print(
        f"targets: tied fused <= 1.10x linear: {ratios['tied_fused_vs_linear']:.2f}x "
        f"({'met' if tied_ok else 'missed'}); untied fused <= 1.10x its flop floor: "
        f"{ratios['untied_fused_vs_flop_floor']:.2f}x ({'met' if untied_ok else 'missed'})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "nesting": list(nesting),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "ratios": ratios,
        "targets_met": {"tied": tied_ok, "untied": untied_ok},
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
