"""Fused Matryoshka contrastive loss against sentence-transformers' MatryoshkaLoss(MNRL).

    python benchmarks/contrastive.py [--batch 256 1024] [--dim 384] [--repeats 20]
                                     [--out results/contrastive.json] [--threads 1]
                                     [--clock wall|cpu] [--symmetric] [--text-step 32]

Forward + backward of the loss on fixed embeddings (the transformer's cost is the same for every
variant), for every size of ``Nesting.doubling(8, dim)``, timed side by side and interleaved:

* ``fused``: :class:`matryoshka.losses.contrastive.MatryoshkaContrastiveLoss`;
* ``loop``: the same loss as a per-size Python loop through autograd (normalise, matmul, CE);
* ``st``: sentence-transformers' ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model))``;
* ``one``: one full-size InfoNCE (the cost of a single similarity matrix, the floor).

Memory is the bytes autograd keeps for the backward pass (measured with saved-tensor hooks). The
fused loss computes its gradients during forward and keeps only them (``(B + N) x d``); its
transient peak inside forward is about ``(sizes + 2) x B x N`` floats, freed before it returns.
The values are checked equal before timing. Target (DESIGN.md): fused >= 3x faster than ``st``.

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared
with other jobs it leaves out the time spent waiting for a core (use it with ``--threads 1``).
``--text-step B`` also times a whole training step of the bundled MiniLM (``TextEncoder``, the
text extra) on ``B`` synthetic query/document pairs: the fused loss against one full-size InfoNCE
(target: <= 1.05x).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from matryoshka import Nesting
from matryoshka.losses.contrastive import MatryoshkaContrastiveLoss

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root: benchmarks.st_reference


def loop_loss(q: torch.Tensor, k: torch.Tensor, nesting: Nesting, t: float) -> torch.Tensor:
    """The per-size loop through autograd."""
    y = torch.arange(q.shape[0])
    total = q.new_zeros(())
    for m, w in zip(nesting.sizes, nesting.weights, strict=True):
        a = F.normalize(q[:, :m], dim=-1) @ F.normalize(k[:, :m], dim=-1).T / t
        total = total + w * F.cross_entropy(a, y)
    return total


def one_loss(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """One full-size InfoNCE: ``(B, d), (N, d) -> ()``."""
    sims = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
    return F.cross_entropy(sims / t, torch.arange(q.shape[0], device=q.device))


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while building ``fn``'s graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def backward_step(fn: Callable[[], torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> None:
    """Forward + backward of ``fn`` with fresh gradients of ``q`` and ``k``."""
    q.grad = k.grad = None
    fn().backward()


def interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each step, run side by side (2 warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(repeats + 2):
        for name, step in steps.items():
            t0 = clock()
            step()
            if rep >= 2:
                times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def text_step(
    batch: int, nesting: Nesting, t: float, repeats: int, clock: Callable[[], float]
) -> dict[str, object]:
    """One MiniLM training step (tokenised batch -> loss -> backward -> SGD): fused vs one."""
    from matryoshka.models.text_encoder import TextEncoder

    enc = TextEncoder()
    model = enc.model
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    topics = ["rivers", "violins", "tax law", "volcanoes", "chess", "bread", "satellites"]
    queries = [
        f"question {i}: what is known about {topics[i % 7]} in case {i}?" for i in range(batch)
    ]
    docs = [
        f"passage {i} explains {topics[i % 7]}, with detail number {i * 7 % 13}."
        for i in range(batch)
    ]
    fq, fd = enc.tokenize(queries), enc.tokenize(docs)
    fused = MatryoshkaContrastiveLoss(nesting, temperature=t)

    def step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(enc.forward(fq), enc.forward(fd)).backward()
        opt.step()

    med = interleaved(
        {
            "fused": lambda: step(lambda q, k: fused(q, k).loss),
            "one": lambda: step(lambda q, k: one_loss(q, k, t)),
        },
        repeats,
        clock,
    )
    return {"batch": batch, "median_s": med, "fused_over_one_time": med["fused"] / med["one"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument(
        "--symmetric", action="store_true", help="both directions (MNRL's doc_to_query too)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/contrastive.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a shared machine more threads than free "
        "cores make every small kernel wait for the slowest thread, which swamps the timings)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (leaves out waiting for a core)",
    )
    parser.add_argument(
        "--text-step",
        type=int,
        default=0,
        metavar="B",
        help="also time a MiniLM training step on B pairs, fused vs one InfoNCE (0: off)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    from benchmarks.st_reference import st_loss, st_matryoshka_mnrl

    torch.manual_seed(0)
    nesting = Nesting.doubling(8, args.dim)
    t = args.temperature
    fused = MatryoshkaContrastiveLoss(nesting, temperature=t, symmetric=args.symmetric)
    st = st_matryoshka_mnrl(args.dim, nesting.sizes, scale=1.0 / t, symmetric=args.symmetric)

    def fused_total(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return fused(q, k).loss

    if args.symmetric:
        print("--symmetric: loop and one are one-directional (timed for reference only)")
    rows = []
    for batch in args.batch:
        q = torch.randn(batch, args.dim, requires_grad=True)
        k = torch.randn(batch, args.dim, requires_grad=True)
        variants: dict[str, Callable[[], torch.Tensor]] = {
            "fused": partial(fused_total, q, k),
            "loop": partial(loop_loss, q, k, nesting, t),
            "st": partial(st_loss, st, q, k),
            "one": partial(one_loss, q, k, t),
        }
        values = {name: fn().detach().item() for name, fn in variants.items()}
        for name in ("st",) if args.symmetric else ("loop", "st"):
            if abs(values[name] - values["fused"]) > 1e-4 * abs(values["fused"]):
                raise RuntimeError(f"{name} loss {values[name]} != fused {values['fused']}")
        steps: dict[str, Callable[[], None]] = {
            name: partial(backward_step, fn, q, k) for name, fn in variants.items()
        }
        med = interleaved(steps, args.repeats, clock)
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
    print(
        f"sizes {list(nesting.sizes)}, temperature {t}, symmetric {args.symmetric}, "
        f"forward + backward, {args.clock} clock"
    )
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
    text = None
    if args.text_step:
        text = text_step(args.text_step, nesting, t, args.repeats, clock)
        tm = text["median_s"]
        assert isinstance(tm, dict)
        print(
            f"MiniLM training step, batch {args.text_step}: fused {tm['fused'] * 1e3:.1f} ms, "
            f"one InfoNCE {tm['one'] * 1e3:.1f} ms, fused/one {text['fused_over_one_time']:.3f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "clock": args.clock,
        "temperature": t,
        "symmetric": args.symmetric,
    }
    out: dict[str, object] = {"rows": rows, "meta": meta}
    if text is not None:
        out["text_step"] = text
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
