"""Shared pieces of the application recipes: config helpers, the
8x8 digits as images, and report helpers.

Every recipe is ``run_<app>(config) -> results`` where ``results`` follows
:mod:`matryoshka.report`'s schema and is also written to ``config.out_dir`` (report.md + PNGs).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from matryoshka._validate import positive_int
from matryoshka.data.images import MNIST_MEAN, MNIST_STD, ImageSplits, _from_arrays
from matryoshka.nesting import Nesting
from matryoshka.report import write_report

__all__ = [
    "append_images",
    "check_positive",
    "config_to_dict",
    "load_digits_images",
    "make_nesting",
    "select_classes",
]

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready form of a config dataclass."""
    return asdict(config)


def check_positive(config: Any, *names: str) -> None:
    """Raise a ``ValueError`` naming the first of ``names`` that is not a positive int."""
    for name in names:
        positive_int(getattr(config, name), name)


def make_nesting(dim: int, start: int, sizes: list[int] | None = None) -> Nesting:
    """``Nesting(sizes)`` if given, else the doubling ladder ``start .. dim``; checked against
    ``dim``."""
    nesting = Nesting(sizes) if sizes is not None else Nesting.doubling(min(start, dim), dim)
    nesting.check_dim(dim, "embed_dim")
    return nesting


def load_digits_images(
    image_size: int = 28,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.7, 0.1, 0.2),
    digit_size: int | None = None,
) -> ImageSplits:
    """scikit-learn's 1,797 8x8 digits as ``(N, 1, image_size, image_size)`` images, laid out
    like MNIST: upsampled bilinearly to ``digit_size`` (default ``image_size * 5 // 7``, i.e. 20
    for 28) and centred on a blank canvas, normalised with MNIST's statistics (so an MNIST model
    reads them), split stratified with ``seed``."""
    from sklearn.datasets import load_digits

    digit_size = digit_size if digit_size is not None else max(8, image_size * 5 // 7)
    if not 1 <= digit_size <= image_size:
        raise ValueError(f"digit_size={digit_size} must be in [1, image_size={image_size}].")
    digits = load_digits()
    x = torch.as_tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8)
    if digit_size != 8:
        x = nn.functional.interpolate(
            x, size=(digit_size, digit_size), mode="bilinear", align_corners=False
        )
    lo = (image_size - digit_size) // 2
    hi = image_size - digit_size - lo
    x = nn.functional.pad(x, (lo, hi, lo, hi))  # (N, 1, image_size, image_size)
    y = np.asarray(digits.target, dtype=np.int64)
    return _from_arrays("digits-8x8", x.numpy(), y, MNIST_MEAN, MNIST_STD, fractions, seed)


def select_classes(data: ImageSplits, classes: list[int], name: str) -> ImageSplits:
    """Keep only ``classes`` in every split, relabelled ``0..len(classes)-1`` in that order."""
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))

    def keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = lookup[y] >= 0
        return x[mask], lookup[y[mask]]

    x_tr, y_tr = keep(data.x_train, data.y_train)
    x_va, y_va = keep(data.x_val, data.y_val)
    x_te, y_te = keep(data.x_test, data.y_test)
    return ImageSplits(name, x_tr, y_tr, x_va, y_va, x_te, y_te, len(classes))


def append_images(report: Path, images: dict[str, Path]) -> None:
    """Add ``## title`` + an image link to ``report.md`` for each extra figure."""
    lines = [""]
    for title, path in images.items():
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    with report.open("a") as f:
        f.write("\n".join(lines))


def finish(
    results: dict[str, Any], out_dir: str | Path, t0: float, images: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Stamp the wall time into ``results['meta']``, write the report, link extra figures."""
    results.setdefault("meta", {})["wall_seconds"] = round(time.perf_counter() - t0, 1)
    path = write_report(results, out_dir)
    if images:
        append_images(path, images)
    return results
