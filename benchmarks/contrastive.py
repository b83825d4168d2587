"""Fused Matryoshka contrastive loss against sentence-transformers' MatryoshkaLoss(MNRL).

    python benchmarks/contrastive.py [--batch 256 1024] [--dim 384] [--repeats 20]
                                     [--out results/contrastive.json] [--threads 1]

Forward + backward of the loss on fixed embeddings (the transformer's cost is the same for every
variant), for every size of ``Nesting.doubling(8, dim)``, timed side by side and interleaved:

* ``fused``: :class:`matryoshka.contrastive.MatryoshkaContrastiveLoss`;
* ``loop``: the same loss as a per-size Python loop through autograd (normalise, matmul, CE);
* ``st``: sentence-transformers' ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model))``;
* ``one``: one full-size InfoNCE (the cost of a single similarity matrix, the floor).

Memory is the bytes autograd keeps for the backward pass (measured with saved-tensor hooks).
The values are checked equal before timing. Target (DESIGN.md): fused >= 3x faster than ``st``.
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

from matryoshka import Nesting
from matryoshka.contrastive import MatryoshkaContrastiveLoss


class _FixedEmbeddings(nn.Module):
    """A stand-in sentence-transformers model whose "forward" returns given embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self) -> int:
        return self.dim


def loop_loss(q: torch.Tensor, k: torch.Tensor, nesting: Nesting, t: float) -> torch.Tensor:
    """The per-size loop through autograd."""
    y = torch.arange(q.shape[0])
    total = q.new_zeros(())
    for m, w in zip(nesting.sizes, nesting.weights, strict=True):
        a = F.normalize(q[:, :m], dim=-1) @ F.normalize(k[:, :m], dim=-1).T / t
        total = total + w * F.cross_entropy(a, y)
    return total


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while building ``fn``'s graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("results/contrastive.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a shared machine more threads than free "
        "cores make every small kernel wait for the slowest thread, which swamps the timings)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers.sentence_transformer.losses import (
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    torch.manual_seed(0)
    nesting = Nesting.doubling(8, args.dim)
    fused = MatryoshkaContrastiveLoss(nesting, temperature=args.temperature)
    model = _FixedEmbeddings(args.dim)
    st = MatryoshkaLoss(
        model,  # type: ignore[arg-type]
        MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature),  # type: ignore[arg-type]
        list(nesting.sizes),
    )
    rows = []
    for batch in args.batch:
        q = torch.randn(batch, args.dim, requires_grad=True)
        k = torch.randn(batch, args.dim, requires_grad=True)
        y = torch.arange(batch)

        def fused_fn(q: torch.Tensor = q, k: torch.Tensor = k) -> torch.Tensor:
            return fused(q, k).loss

        def loop_fn(q: torch.Tensor = q, k: torch.Tensor = k) -> torch.Tensor:
            return loop_loss(q, k, nesting, args.temperature)

        def st_fn(q: torch.Tensor = q, k: torch.Tensor = k) -> torch.Tensor:
            out: torch.Tensor = st([{"emb": q}, {"emb": k}], None)
            return out

        def one_fn(q: torch.Tensor = q, k: torch.Tensor = k, y: torch.Tensor = y) -> torch.Tensor:
            sims = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
            return F.cross_entropy(sims / args.temperature, y)

        variants: dict[str, Callable[[], torch.Tensor]] = {
            "fused": fused_fn,
            "loop": loop_fn,
            "st": st_fn,
            "one": one_fn,
        }
        values = {name: fn().detach().item() for name, fn in variants.items()}
        for name in ("loop", "st"):
            if abs(values[name] - values["fused"]) > 1e-4 * abs(values["fused"]):
                raise RuntimeError(f"{name} loss {values[name]} != fused {values['fused']}")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats + 2):
            for name, fn in variants.items():
                q.grad = k.grad = None
                t0 = time.perf_counter()
                fn().backward()
                if rep >= 2:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        mem = {name: saved_bytes(fn) for name, fn in variants.items()}
        rows.append(
            {
                "batch": batch,
                "dim": args.dim,
                "sizes": list(nesting.sizes),
                "loss": values,
                "median_s": med,
                "saved_bytes": mem,
                "st_over_fused_time": med["st"] / med["fused"],
                "loop_over_fused_time": med["loop"] / med["fused"],
                "fused_over_one_time": med["fused"] / med["one"],
                "st_over_fused_memory": mem["st"] / mem["fused"],
            }
        )
    print(f"sizes {list(nesting.sizes)}, temperature {args.temperature}, forward + backward")
    print(
        f"{'batch':>6} {'fused ms':>9} {'loop ms':>8} {'st ms':>8} {'one ms':>8} "
        f"{'st/fused':>9} {'loop/fused':>11} {'fused/one':>10} {'mem st/fused':>13}"
    )
    for r in rows:
        m = r["median_s"]
        print(
            f"{r['batch']:>6} {m['fused'] * 1e3:>9.2f} {m['loop'] * 1e3:>8.2f} "
            f"{m['st'] * 1e3:>8.2f} {m['one'] * 1e3:>8.2f} {r['st_over_fused_time']:>8.2f}x "
            f"{r['loop_over_fused_time']:>10.2f}x {r['fused_over_one_time']:>9.2f}x "
            f"{r['st_over_fused_memory']:>12.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
    }
    args.out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
