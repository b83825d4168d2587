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


def chunk_products(
    nesting: Nesting, batch: int, n_classes: int, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each product of the tied head's chunk loop, summed over the chunks, for
    a row-major and a column-major weight, next to the full-size matmuls of one ``Linear``.

    The three products per chunk ``[a, b)``: forward ``z_i W_i^T`` ``(B, w) @ (w, C)``, input
    gradient ``G W_i`` ``(B, C) @ (C, w)`` and weight gradient ``G^T z_i`` ``(C, B) @ (B, w)``;
    plus the elementwise work of the fused pass (copying each size's logits into the next, the
    running sum of output gradients).
    """
    d, chunks = nesting.dim, nesting.chunks
    z = torch.randn(batch, d)  # (B, d)
    w = torch.randn(n_classes, d)  # (C, d) row-major
    wt = w.t().contiguous()  # (d, C): the column-major weight's storage
    g = torch.randn(batch, n_classes)  # (B, C)
    grads = torch.randn(len(chunks), batch, n_classes)  # (L, B, C)
    out = torch.empty(len(chunks), batch, n_classes)
    gz, gzt = torch.empty(batch, d), torch.empty(d, batch)
    gw, gwt = torch.empty(n_classes, d), torch.empty(d, n_classes)

    n = len(chunks)

    Product = Callable[[int, int, int], torch.Tensor]

    def chunks_of(product: Product, which: range) -> Callable[[], None]:
        def run() -> None:
            for i in which:
                product(i, *chunks[i])

        return run

    def every_chunk(product: Product) -> Callable[[], None]:
        return chunks_of(product, range(n))

    fns_col: dict[str, Product] = {
        "forward": lambda i, a, b: torch.mm(z[:, a:b], wt[a:b], out=out[i]),
        "input grad": lambda i, a, b: torch.mm(g, wt[a:b].t(), out=gz[:, a:b]),
        "weight grad": lambda i, a, b: torch.mm(z[:, a:b].t(), g, out=gwt[a:b]),
    }

    def once(product: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            product()

        return run

    def copies() -> None:
        for i in range(1, n):
            out[i].copy_(out[i - 1])

    def running_sum() -> None:
        run = grads[-1].clone()
        for i in range(n - 2, -1, -1):
            run.add_(grads[i])

    fns: dict[str, Callable[[], None]] = {
        "full forward": once(lambda: torch.mm(z, w.t(), out=out[0])),
        "full input grad": once(lambda: torch.mm(g, w, out=gz)),
        "full weight grad": once(lambda: torch.mm(g.t(), z, out=gw)),
        "row-major forward": every_chunk(
            lambda i, a, b: torch.mm(z[:, a:b], w[:, a:b].t(), out=out[i])
        ),
        "row-major input grad, (d, B) rows": every_chunk(
            lambda i, a, b: torch.mm(w[:, a:b].t(), g.t(), out=gzt[a:b])
        ),
        "row-major weight grad, (C, w) cols": every_chunk(
            lambda i, a, b: torch.mm(g.t(), z[:, a:b], out=gw[:, a:b])
        ),
        "col-major forward": every_chunk(fns_col["forward"]),
        "col-major input grad, (B, w) cols": every_chunk(fns_col["input grad"]),
        "col-major weight grad, (w, C) rows": every_chunk(fns_col["weight grad"]),
        "copy logits_{i-1} into logits_i": copies,
        "running sum of output grads": running_sum,
    }
    for i, (a, b) in enumerate(chunks):  # each chunk's column-major products alone
        for kind, product in fns_col.items():
            fns[f"chunk {a}:{b} {kind}"] = chunks_of(product, range(i, i + 1))
    time_rounds(fns, 3, clock)
    times = time_rounds(fns, repeats, clock)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time each product of the tied chunk loop alone, for both weight layouts",
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
    profile: dict[str, float] = {}
    if args.profile:
        profile = chunk_products(nesting, args.batch, args.classes, args.repeats, clock)
        print(f"tied chunk loop, each product alone (sum over {len(nesting)} chunks), median ms:")
        full = profile["full forward"] + profile["full input grad"] + profile["full weight grad"]
        for name, t in profile.items():
            if not name.startswith("chunk"):
                print(f"  {name:<36}{t * 1e3:>9.2f}")
        for layout in ("row-major", "col-major"):
            total = sum(t for name, t in profile.items() if name.startswith(layout))
            print(f"  {layout} products: {total / full:.2f}x the full-size matmuls")
        print("column-major products per chunk, GFLOP/s (forward, input grad, weight grad):")
        for a, b in [(0, args.dim), *nesting.chunks]:
            flops = 2 * args.batch * args.classes * (b - a)
            rates = [
                flops / profile[f"chunk {a}:{b} {p}" if b - a < args.dim else f"full {p}"] / 1e9
                for p in ("forward", "input grad", "weight grad")
            ]
            label = "full" if b - a == args.dim else f"{a}:{b}"
            print(f"  {label:<12}" + "".join(f"{r:>8.1f}" for r in rates))
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
        "profile_ms": {k: v * 1e3 for k, v in profile.items()},
        "targets_met": {"tied": tied_ok, "untied": untied_ok},
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
