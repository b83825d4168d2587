"""Images/s of the streaming DataLoader path against the in-memory path, and peak memory when
training on an image folder larger than one would hold in memory.

    python benchmarks/image_stream.py [--workers 0 2 4] [--big-images 20000] [--side 224]
                                      [--out results/image_stream.json]

1. Throughput, on the bundled MNIST subset (3,500 training images, 28x28): the in-memory path
   (batches indexed out of one tensor) against the streaming path over the same images written
   as PNG files (``data: folder``, pre-split layout, ``loader: stream``), for each
   ``--workers``. Two numbers per path: images/s of the data alone (every training batch of one
   epoch, delivered to the training loop) and images/s of one training epoch of the default
   ``cnn`` backbone on the CPU (``mrl train``'s step, validation excluded).
2. Memory: ``--big-images`` JPEGs of ``--side`` pixels squared (generated once in ``--work``),
   one streamed training epoch of ``cnn_tiny`` in a fresh process; the peak resident memory of
   that process and its DataLoader workers together (sampled with psutil every 50 ms) against
   the size of the ``(N, 3, side, side)`` float32 tensor the in-memory path would stack.

Prints a table and writes JSON. Timings depend on the machine and its load; run it on an idle
one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka.data.image_stream import (
    FolderDataset,
    ImageTransform,
    StepBatchSampler,
    open_folder,
)
from matryoshka.data.images import load_mnist_subset
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import _loader, _setup, _train_batches, _train_step, micro_plan


def write_mnist_folder(root: Path) -> Path:
    """The bundled subset's train and val splits as ``root/{train,val}/<digit>/<i>.png``."""
    from PIL import Image

    data = load_mnist_subset(seed=0)
    for split, x, y in (("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val)):
        raw = ((x * 0.3081 + 0.1307) * 255).round().clamp(0, 255).byte()  # (N, 1, 28, 28)
        for i, (img, label) in enumerate(zip(raw, y, strict=True)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:05d}.png")
    return root


def write_big_folder(root: Path, n: int, side: int, classes: int = 10) -> Path:
    """``n`` smooth random RGB JPEGs of ``side``x``side`` in ``root/{train,val}/<class>``
    (val: 1 in 20)."""
    from PIL import Image

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "val" if i % 20 == 0 else "train"
        folder = root / split / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BILINEAR).save(
            folder / f"{i:07d}.jpg", quality=90
        )
    (root / "done").write_text(str(n))
    return root


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "backbone": "cnn", "embed_dim": 128, "epochs": 1, "batch_size": 128, "device": "cpu",
        "progress": False, "seed": 0,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


def memory_data_rate() -> float:
    """Images/s of the in-memory path's batches (index + gather), one epoch."""
    data = load_mnist_subset(seed=0)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = 0
    for idx in order.split(128):
        x, y = data.x_train[idx], data.y_train[idx]
        n += len(y) if x.shape[0] == len(y) else 0
    return n / (time.perf_counter() - t0)


def stream_data_rate(root: Path, workers: int) -> float:
    """Images/s of the streaming path's batches (decode + transform in ``workers``), one epoch."""
    data = open_folder(root, grayscale=True)
    cfg = _config(data="folder", data_root=str(root), loader="stream", grayscale=True,
                  image_size=28, num_workers=workers)  # fmt: skip
    ds = FolderDataset(data.train, ImageTransform(28, True, "none", True), True)
    sampler = StepBatchSampler(len(data.train), 128, 0, 0, 1, 0, 1)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y, _ in _loader(ds, cfg, torch.device("cpu"), batch_sampler=sampler))
    return n / (time.perf_counter() - t0)


def train_rate(config: TrainConfig) -> float:
    """Images/s of one training epoch (data + step, no validation) under ``config``."""
    with tempfile.TemporaryDirectory() as out:
        run = _setup(TrainConfig(**{**config.to_dict(), "out_dir": out}), None)
        n = 0
        t0 = time.perf_counter()
        if run.streams:
            for batch_len, plan, (x, y, _) in _train_batches(run, 0, 0):
                cuts = np.cumsum([0] + [len(p) for p, _ in plan]).tolist()

                def fetch(i: int, _: torch.Tensor, x: Any = x, y: Any = y, c: Any = cuts) -> Any:
                    return x[c[i] : c[i + 1]], y[c[i] : c[i + 1]]

                _train_step(run, batch_len, plan, fetch)
                run.optimizer.step()
                n += batch_len
        else:
            d = run.data
            for idx in torch.randperm(len(d.y_train)).split(config.batch_size):  # type: ignore[union-attr]

                def fetch_mem(_: int, s: torch.Tensor, idx: torch.Tensor = idx) -> Any:
                    return d.x_train[idx[s]], d.y_train[idx[s]]  # type: ignore[union-attr]

                _train_step(run, len(idx), micro_plan(len(idx), 1, 0, 1), fetch_mem)
                run.optimizer.step()
                n += len(idx)
        return n / (time.perf_counter() - t0)


_CHILD = """
import sys, json
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import train
train(TrainConfig(**json.loads(sys.argv[1])))
"""


def peak_rss(config: TrainConfig) -> tuple[float, float]:
    """``(peak MiB of the process tree, seconds)`` of ``train(config)`` in a fresh process."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config.to_dict())])
    top = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            top = max(top, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"the training process failed ({proc.returncode})")
    return top / 2**20, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--big-images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--big-workers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("results/image_stream_data"))
    parser.add_argument("--out", type=Path, default=Path("results/image_stream.json"))
    parser.add_argument("--skip-train", action="store_true", help="data throughput only")
    args = parser.parse_args()
    torch.manual_seed(0)
    mnist_root = (
        write_mnist_folder(args.work / "mnist")
        if not (args.work / "mnist" / "train").is_dir()
        else args.work / "mnist"
    )
    rows: list[dict[str, Any]] = [
        {"path": "memory", "workers": 0, "data_img_s": memory_data_rate()}
    ]
    for w in args.workers:
        rows.append({"path": "stream", "workers": w, "data_img_s": stream_data_rate(mnist_root, w)})
    if not args.skip_train:
        rows[0]["train_img_s"] = train_rate(_config(data="mnist-subset"))
        for row in rows[1:]:
            row["train_img_s"] = train_rate(
                _config(data="folder", data_root=str(mnist_root), loader="stream",
                        grayscale=True, image_size=28, num_workers=row["workers"])
            )  # fmt: skip
    big = write_big_folder(args.work / f"big_{args.big_images}_{args.side}", args.big_images,
                           args.side)  # fmt: skip
    n_train = open_folder(big).sizes()["train"]
    mib, secs = peak_rss(
        _config(data="folder", data_root=str(big), loader="stream", backbone="cnn_tiny",
                embed_dim=16, image_size=args.side, augment="crop-flip",
                num_workers=args.big_workers, batch_size=64, out_dir=str(args.work / "big_run"))
    )  # fmt: skip
    in_memory_mib = n_train * 3 * args.side**2 * 4 / 2**20
    print(f"{'path':>8} {'workers':>7} {'data img/s':>11} {'train img/s':>12}")
    for r in rows:
        train_s = f"{r['train_img_s']:.0f}" if "train_img_s" in r else "-"
        print(f"{r['path']:>8} {r['workers']:>7} {r['data_img_s']:>11.0f} {train_s:>12}")
    print(
        f"\nstreamed epoch over {n_train} images of {args.side}x{args.side} "
        f"({args.big_workers} workers): peak RSS {mib:.0f} MiB (process + workers), "
        f"{secs:.0f} s; the in-memory tensor alone would be {in_memory_mib:.0f} MiB"
    )
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "throughput": rows,
        "memory": {
            "train_images": n_train,
            "side": args.side,
            "workers": args.big_workers,
            "peak_rss_mib": mib,
            "seconds": secs,
            "in_memory_tensor_mib": in_memory_mib,
            "ratio": in_memory_mib / mib if mib else math.nan,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
