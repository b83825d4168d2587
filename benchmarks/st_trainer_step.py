"""A whole SentenceTransformerTrainer step: MNRL vs MatryoshkaLoss(MNRL) vs FusedMatryoshkaLoss.

    python benchmarks/st_trainer_step.py [--batch 64 256] [--dims 384 256 128 64 32 16 8]
                                         [--rounds 3] [--steps 3] [--repeats 20]
                                         [--device auto|cpu|cuda] [--threads 1]
                                         [--layers 6] [--max-seq-length 64]
                                         [--out results/st_trainer_step.json]

Two measurements, each with the three losses side by side in one run:

* ``step``: the bundled all-MiniLM-L6-v2 trained by ``SentenceTransformerTrainer`` on synthetic
  (anchor, positive) pairs, ``batch`` pairs a step; the time of a step is the interval between
  the trainer's consecutive ``on_step_end`` callbacks, so it holds everything the trainer does in
  a step (fetching and tokenizing the batch, forward, loss, backward, optimizer and scheduler).
  Each variant gets its own copy of the model; ``--rounds`` rounds run the variants in turn, each
  a ``trainer.train()`` of ``--steps`` timed steps after one untimed warm-up step. Medians.
* ``loss``: the loss alone, forward + backward on fixed ``(batch, dim)`` embeddings (a stand-in
  model returns them), interleaved ``--repeats`` times after two warm-up rounds. Medians.

Variants: ``mnrl`` = ``MultipleNegativesRankingLoss`` (full size only, the floor),
``st`` = ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims)``,
``fused`` = :class:`matryoshka.losses.sentence_transformers.FusedMatryoshkaLoss` ``(model, dims)``.
The three losses' values are checked before timing (``st`` and ``fused`` equal to 1e-4).

Load: a shared machine slows the variants unevenly. The 1-minute load average is read before and
after each measurement; where it exceeds this process's threads by more than 0.5 (other jobs were
running) the row is marked ``*`` in the table and ``"under_load": true`` in the JSON: its ratios
are indicative only. ``--layers`` and ``--max-seq-length`` shrink the model for a quick smoke run.
Needs the text extra and sentence-transformers' train extra (datasets, accelerate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks.*

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model only

VARIANTS = ("mnrl", "st", "fused")


def make_loss(name: str, model: nn.Module, dims: list[int]) -> nn.Module:
    """The loss ``name`` (one of :data:`VARIANTS`) for ``model`` at ``dims``."""
    from sentence_transformers.sentence_transformer.losses import (
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss

    if name == "mnrl":
        return MultipleNegativesRankingLoss(model)  # type: ignore[arg-type]
    if name == "st":
        return MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims)  # type: ignore[arg-type]
    return FusedMatryoshkaLoss(model, dims)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platform dependent
        return 0.0


def pairs(n: int) -> Any:
    """``n`` distinct synthetic (anchor, positive) pairs, a ``datasets.Dataset``."""
    from datasets import Dataset

    topics = ["rivers", "violins", "tax law", "volcanoes", "chess", "bread", "satellites"]
    return Dataset.from_dict(
        {
            "anchor": [f"question {i}: what is known about {topics[i % 7]}?" for i in range(n)],
            "positive": [
                f"passage {i} explains {topics[i % 7]}, with detail {i * 7 % 13}." for i in range(n)
            ],
        }
    )


class StepClock(TrainerCallback):
    """Records the time between the trainer's consecutive ``on_step_end`` callbacks."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.last: float | None = None
        self.times: list[float] = []

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.sync()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def trainer_steps(
    model_dir: str,
    batch: int,
    dims: list[int],
    rounds: int,
    steps: int,
    device: str,
    sync: Callable[[], None],
    out_dir: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of a trainer step per variant, and each variant's first-step loss."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    data = pairs(batch * (steps + 1))
    models = {name: SentenceTransformer(model_dir, device=device) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    first: dict[str, float] = {}
    for r in range(rounds):
        for name in VARIANTS:
            model = models[name]
            loss = make_loss(name, model, dims)
            values: list[float] = []
            loss.register_forward_hook(lambda _m, _i, out, v=values: v.append(float(out.item())))
            clock = StepClock(sync)
            args = SentenceTransformerTrainingArguments(
                output_dir=out_dir,
                per_device_train_batch_size=batch,
                max_steps=steps + 1,
                learning_rate=1e-7,  # timing only: keep the three models near the same weights
                seed=r,
                report_to="none",
                save_strategy="no",
                logging_strategy="no",
                use_cpu=device == "cpu",
                disable_tqdm=True,
                dataloader_drop_last=True,
            )
            trainer = SentenceTransformerTrainer(
                model=model,
                args=args,
                train_dataset=data,
                loss=loss,
                callbacks=[clock],
            )
            trainer.train()
            times[name].extend(clock.times)  # the warm-up step only starts the clock
            if r == 0:
                first[name] = values[0]
    return {name: statistics.median(ts) for name, ts in times.items()}, first


def loss_alone(
    batch: int, dim: int, dims: list[int], repeats: int, device: str, sync: Callable[[], None]
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of the loss's forward + backward on fixed embeddings, and the values."""
    from benchmarks.st_reference import FixedEmbeddings

    model = FixedEmbeddings(dim)
    losses = {name: make_loss(name, model, dims) for name in VARIANTS}
    g = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    k = torch.randn(batch, dim, generator=g).to(device).requires_grad_()

    def run(name: str) -> torch.Tensor:
        return losses[name]([{"emb": q}, {"emb": k}], None)  # type: ignore[no-any-return]

    values = {name: float(run(name).item()) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(repeats + 2):
        for name in VARIANTS:
            q.grad = k.grad = None
            sync()
            t0 = time.perf_counter()
            run(name).backward()
            sync()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, values


def tiny_copy(layers: int, max_seq_length: int, device: str, folder: str) -> str:
    """The bundled MiniLM cut to ``layers`` transformer layers, saved under ``folder``."""
    from sentence_transformers import SentenceTransformer

    from matryoshka.models.text_encoder import default_model_path

    model = SentenceTransformer(default_model_path(), device=device)
    bert: Any = model[0].auto_model
    if layers < len(bert.encoder.layer):
        bert.encoder.layer = bert.encoder.layer[:layers]
        bert.config.num_hidden_layers = layers
    model.max_seq_length = max_seq_length
    model.save(folder)
    return folder


def check_values(values: dict[str, float], what: str) -> None:
    """``st`` and ``fused`` must agree; raise if not."""
    if abs(values["st"] - values["fused"]) > 1e-4 * abs(values["st"]):
        raise RuntimeError(f"{what}: st loss {values['st']} != fused {values['fused']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64, 32, 16, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed trainer steps per round")
    parser.add_argument("--repeats", type=int, default=20, help="timed loss-alone repeats")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--layers", type=int, default=6, help="transformer layers kept (smoke)")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/st_trainer_step.json"))
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dim = max(args.dims)
    cores = os.cpu_count() or 1

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_copy(args.layers, args.max_seq_length, device, f"{tmp}/model")
        for batch in args.batch:
            load_before = load_average()
            step_s, step_loss = trainer_steps(
                model_dir, batch, args.dims, args.rounds, args.steps, device, sync, f"{tmp}/run"
            )
            loss_s, loss_values = loss_alone(batch, dim, args.dims, args.repeats, device, sync)
            load = max(load_before, load_average())
            check_values(step_loss, f"batch {batch}, first trainer step")
            check_values(loss_values, f"batch {batch}, fixed embeddings")
            rows.append(
                {
                    "batch": batch,
                    "step_median_s": step_s,
                    "loss_median_s": loss_s,
                    "step_st_over_fused": step_s["st"] / step_s["fused"],
                    "step_st_over_mnrl": step_s["st"] / step_s["mnrl"],
                    "step_fused_over_mnrl": step_s["fused"] / step_s["mnrl"],
                    "loss_st_over_fused": loss_s["st"] / loss_s["fused"],
                    "loss_fused_over_mnrl": loss_s["fused"] / loss_s["mnrl"],
                    "first_step_loss": step_loss,
                    "load_average": load,
                    "under_load": load > args.threads + 0.5,
                }
            )

    print(
        f"device {device}, dims {args.dims}, MiniLM {args.layers} layers, "
        f"max_seq_length {args.max_seq_length}, medians"
    )
    print(
        f"{'batch':>6} | {'step ms: mnrl':>13} {'st':>8} {'fused':>8} | {'st/fused':>8} "
        f"{'st/mnrl':>8} {'fused/mnrl':>10} | {'loss ms: st':>11} {'fused':>7} {'st/fused':>8}"
    )
    for r in rows:
        s, m = r["step_median_s"], r["loss_median_s"]
        mark = "*" if r["under_load"] else " "
        print(
            f"{r['batch']:>5}{mark} | {s['mnrl'] * 1e3:>13.1f} {s['st'] * 1e3:>8.1f} "
            f"{s['fused'] * 1e3:>8.1f} | {r['step_st_over_fused']:>7.2f}x "
            f"{r['step_st_over_mnrl']:>7.2f}x {r['step_fused_over_mnrl']:>9.2f}x | "
            f"{m['st'] * 1e3:>11.2f} {m['fused'] * 1e3:>7.2f} {r['loss_st_over_fused']:>7.2f}x"
        )
    if any(r["under_load"] for r in rows):
        print(
            f"* measured under load (1-minute load average above {args.threads} thread(s) + 0.5 "
            f"on {cores} cores): other jobs shared the machine, so these ratios are indicative only"
        )
    meta = {
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "cores": cores,
        "machine": platform.machine(),
        "dims": args.dims,
        "layers": args.layers,
        "max_seq_length": args.max_seq_length,
        "rounds": args.rounds,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
