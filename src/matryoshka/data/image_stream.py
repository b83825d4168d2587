"""Image data read from disk batch by batch: ImageFolder trees and webdataset-style tar shards.

Memory stays ``O(batch)`` whatever the data set size: a data set is a table of file names (one
packed byte buffer, so forked DataLoader workers share it without copy-on-read growth) and
labels; images are decoded, augmented and normalised in the workers.

Layouts (``data_root``):

* ``folder``, pre-split: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (optionally
  ``root/test/<class>/...``; without it the validation split is also the test split, as for
  ImageNet-1K, whose test labels are not public).
* ``folder``, one tree: ``root/<class>/*.png``, split stratified with the run's seed, the same
  membership as the in-memory :func:`~matryoshka.data.images.load_image_folder`.
* ``webdataset``: ``root/train/*.tar`` and ``root/val/*.tar``; in a shard, the files of one
  sample share a key (``n0001.jpg`` + ``n0001.cls``, the ``.cls`` file holding the integer
  label as text). Read with :mod:`tarfile`; the ``webdataset`` package is not needed.

Determinism: the training order of a folder is ``randperm`` of ``(seed, epoch)`` cut into the
global batches (the in-memory path's order), each rank loads its shard of every batch, and each
image's augmentation is drawn from a generator seeded by ``(seed, epoch, index)``; so the images
of a step do not depend on ``num_workers`` or the number of processes, and a run resumed mid-epoch
sees the same images as an uninterrupted one.

Unreadable images (truncated, not an image) never raise inside a worker: the sample comes back
with label ``-1`` and its name, the training step drops it, and the caller counts and reports
them (``bad_images: skip``) or stops with :class:`UnreadableImageError` (``bad_images: fail``).
"""

from __future__ import annotations

import io
import math
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

__all__ = [
    "AUGMENTS",
    "BAD_LABEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageLog",
    "FileTable",
    "FolderDataset",
    "ImageTransform",
    "StepBatchSampler",
    "StreamData",
    "TarShardDataset",
    "UnreadableImageError",
    "decode_image",
    "epoch_order",
    "has_split_layout",
    "micro_plan",
    "open_folder",
    "open_tar_shards",
    "progressive_size",
    "shard_indices",
    "tar_steps",
]

#: ImageNet channel statistics (RGB); grayscale images use their luma-weighted mean.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_MEAN, _GRAY_STD = (0.449,), (0.226,)
#: The label a sample carries when its image could not be decoded.
BAD_LABEL = -1
#: Training augmentations: none, horizontal flip, RandomResizedCrop + flip (natural images).
AUGMENTS = ("none", "flip", "crop-flip")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImageError(ValueError):
    """An image file could not be decoded and ``bad_images='fail'``."""


@dataclass
class FileTable:
    """``N`` images: names packed in one byte buffer plus ``(N + 1,)`` offsets, ``(N,)`` labels.

    ``name(i)`` is the file's path relative to ``root`` (folders) or ``shard::member`` (tars).
    """

    root: Path
    blob: np.ndarray  # (total_bytes,) uint8, the utf-8 names back to back
    offsets: np.ndarray  # (N + 1,) int64
    labels: np.ndarray  # (N,) int64

    @classmethod
    def build(cls, root: Path, names: Sequence[str], labels: Sequence[int]) -> FileTable:
        """Pack ``names`` (``N`` strings) and their ``labels``."""
        encoded = [n.encode() for n in names]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(root, blob, offsets, np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        """The ``i``-th file's name (relative to ``root``)."""
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> Path:
        """The ``i``-th file's path."""
        return self.root / self.name(i)

    def subset(self, idx: np.ndarray) -> FileTable:
        """The files at ``idx`` (``(K,)`` ints), in that order."""
        return FileTable.build(self.root, [self.name(int(i)) for i in idx], self.labels[idx])


@dataclass
class StreamData:
    """A data set read from disk: a :class:`FileTable` per split (tar data sets: shard lists).

    ``input_shape`` is ``(C, H, W)`` of the images the model sees at the full training size.
    """

    name: str
    kind: str  # "folder" or "tar"
    train: Any  # FileTable, or a list of (shard path, sample count) for tars
    val: Any
    test: Any
    num_classes: int
    channels: int
    classes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {k: _count(getattr(self, k)) for k in ("train", "val", "test")}


def _count(split: Any) -> int:
    return len(split) if isinstance(split, FileTable) else sum(n for _, n in split)


def has_split_layout(root: str | Path) -> bool:
    """Whether ``root`` is pre-split: ``root/train`` and ``root/val`` folders, ``root/train``
    holding class folders (not images)."""
    root = Path(root)
    train, val = root / "train", root / "val"
    return train.is_dir() and val.is_dir() and any(p.is_dir() for p in train.iterdir())


def _scan(root: Path, class_to_idx: dict[str, int] | None = None) -> tuple[FileTable, list[str]]:
    """One ImageFolder tree (``root/<class>/**/<image>``, sorted) -> its table and classes."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"data_root: {str(root)!r} holds no class folders: put the images of each class in "
            f"their own sub-folder ({root}/<class>/<image>.jpg)."
        )
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(classes) - set(class_to_idx))
    if unknown:
        raise ValueError(
            f"data_root: {str(root)!r} has classes {unknown[:5]} that the training split lacks: "
            "give every split the same class folders."
        )
    names: list[str] = []
    labels: list[int] = []
    for c in classes:
        files = sorted(
            p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS
        )
        names += [str(p.relative_to(root)) for p in files]
        labels += [class_to_idx[c]] * len(files)
    if not names:
        raise FileNotFoundError(
            f"data_root: {str(root)!r} holds no images ({', '.join(_IMAGE_EXTS)}) in its class "
            "folders."
        )
    return FileTable.build(root, names, labels), list(class_to_idx)


def open_folder(
    root: str | Path,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    grayscale: bool = False,
) -> StreamData:
    """List an image folder (pre-split or one tree split stratified by ``seed``); nothing is
    decoded."""
    from matryoshka.data.images import stratified_split

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_root={str(root)!r} is not a folder: pass a folder with train/ and val/ "
            "sub-folders of class folders, or one with a sub-folder of images per class."
        )
    channels = 1 if grayscale else 3
    if has_split_layout(root):
        train, classes = _scan(root / "train")
        index = {c: i for i, c in enumerate(classes)}
        val, _ = _scan(root / "val", index)
        test = _scan(root / "test", index)[0] if (root / "test").is_dir() else val
        return StreamData(root.name, "folder", train, val, test, len(classes), channels, classes)
    table, classes = _scan(root)
    parts = stratified_split(table.labels, fractions, seed)
    train, val, test = (table.subset(p) for p in parts)
    return StreamData(root.name, "folder", train, val, test, len(classes), channels, classes)


def decode_image(data: bytes | Path, grayscale: bool) -> Any:
    """A fully decoded PIL image (``L`` or ``RGB``) from a file or its bytes; raises ``OSError``
    / ``ValueError`` (PIL's) on a file that is not a readable image."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        img.load()  # decode now: a truncated file fails here, not later
        return img.convert("L" if grayscale else "RGB")


def progressive_size(epoch: int, schedule: Sequence[int] | None, default: int) -> int:
    """The training image side at ``epoch`` under ``schedule = [min, max, start, end]``: ``min``
    until epoch ``start``, ``max`` from ``end``, linearly between, rounded to a multiple of 32
    (the FFCV ResNet-50 recipe). ``None``: ``default`` every epoch."""
    if schedule is None:
        return default
    lo, hi, start, end = schedule
    if epoch <= start:
        return lo
    if epoch >= end:
        return hi
    return round((lo + (hi - lo) * (epoch - start) / (end - start)) / 32) * 32


class ImageTransform:
    """PIL image -> normalised ``(C, size, size)`` float32 tensor.

    ``train=True`` applies ``augment`` (``none``: resize the shorter side and centre-crop, as
    for evaluation; ``flip``: that plus a random horizontal flip; ``crop-flip``:
    RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip). Evaluation resizes the shorter side
    to ``size / crop_ratio`` and centre-crops ``size`` (``crop_ratio=0.875``: the usual 224 of
    256).
    """

    def __init__(
        self, size: int, train: bool, augment: str, grayscale: bool, crop_ratio: float = 1.0
    ) -> None:
        from torchvision.transforms import v2

        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r} is not one of {list(AUGMENTS)}.")
        mean, std = (_GRAY_MEAN, _GRAY_STD) if grayscale else (IMAGENET_MEAN, IMAGENET_STD)
        steps: list[Any]
        if train and augment == "crop-flip":
            steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            ratio = 1.0 if train else crop_ratio
            steps = [v2.Resize(math.floor(size / ratio + 0.5), antialias=True)]
            steps.append(v2.CenterCrop(size))
            if train and augment == "flip":
                steps.append(v2.RandomHorizontalFlip())
        steps += [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
        self.size = size
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Any) -> torch.Tensor:
        """``PIL image -> (C, size, size)``."""
        return self.pipeline(image)  # type: ignore[no-any-return]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % 2**63


class FolderDataset(Dataset[tuple[torch.Tensor, int, str]]):
    """Map-style data set over a :class:`FileTable`: ``i -> (image (C, S, S), label, name)``.

    The augmentation of image ``i`` in ``epoch`` uses torch's RNG seeded by
    ``(seed, epoch, i)`` (forked, so the caller's RNG is untouched). An unreadable image comes
    back as zeros with label :data:`BAD_LABEL`.
    """

    def __init__(
        self,
        table: FileTable,
        transform: ImageTransform,
        grayscale: bool,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.table, self.transform, self.grayscale = table, transform, grayscale
        self.seed, self.epoch = seed, epoch
        self.channels = 1 if grayscale else 3

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        name = self.table.name(i)
        try:
            image = decode_image(self.table.root / name, self.grayscale)
        except (OSError, ValueError, SyntaxError):  # PIL raises all three on bad files
            s = self.transform.size
            return torch.zeros(self.channels, s, s), BAD_LABEL, name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, i))
            x = self.transform(image)
        return x, int(self.table.labels[i]), name


def micro_plan(
    batch_len: int, grad_accum: int, rank: int, world: int
) -> list[tuple[torch.Tensor, float]]:
    """How one global batch of ``batch_len`` examples is computed on ``rank`` of ``world``:
    per micro-batch, the ``(K,)`` positions (into the global batch) this rank loads and the
    loss weight that makes the summed, DDP-averaged gradient that of the batch mean.

    A rank with nothing to do in a micro-batch loads one example with weight 0 (every rank must
    join each collective).
    """
    positions = torch.arange(batch_len)
    plan = []
    for pos in positions.tensor_split(grad_accum):
        shard = pos[rank::world]
        weight = len(shard) * world / batch_len
        if len(shard) == 0:
            shard, weight = pos[:1] if len(pos) else positions[:1], 0.0
        plan.append((shard, weight))
    return plan


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The ``(n,)`` training order of ``epoch``: the in-memory path's permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class StepBatchSampler(Sampler[list[int]]):
    """The indices this rank loads at each remaining step of ``epoch``: for each global batch of
    :func:`epoch_order` (from step ``start`` on), the concatenated :func:`micro_plan` shards."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        grad_accum: int,
        rank: int,
        world: int,
        start: int = 0,
    ) -> None:
        self.batches = epoch_order(n, seed, epoch).split(batch_size)[start:]
        self.grad_accum, self.rank, self.world = grad_accum, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.batches:
            plan = micro_plan(len(idx), self.grad_accum, self.rank, self.world)
            yield torch.cat([idx[pos] for pos, _ in plan]).tolist()


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of ``n`` evaluation examples (strided, no padding: counts are summed)."""
    return list(range(rank, n, world))


@dataclass
class BadImageLog:
    """Unreadable images met so far: a count and the first few names."""

    policy: str = "skip"
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, names: Sequence[str], where: str) -> None:
        """Record ``names``; raise :class:`UnreadableImageError` under ``policy='fail'``."""
        if not names:
            return
        if self.policy == "fail":
            raise UnreadableImageError(
                f"bad_images='fail': {len(names)} unreadable image(s) in {where}, first "
                f"{names[0]!r}: fix or remove the file, or set bad_images='skip' to drop such "
                "images with a warning."
            )
        self.count += len(names)
        self.first += list(names[: max(0, 5 - len(self.first))])

    def report(self, where: str) -> None:
        """Warn with the count and the first names (no-op when none)."""
        if self.count:
            warnings.warn(
                f"skipped {self.count} unreadable image(s) in {where} (bad_images='skip'); "
                f"first: {self.first}. Fix or remove them, or set bad_images='fail' to stop on "
                "the first one.",
                RuntimeWarning,
                stacklevel=2,
            )


# -- webdataset-style tar shards ---------------------------------------------------------------


def _shard_samples(path: Path) -> tuple[int, int]:
    """``(samples with an image and a label, largest label)`` of one shard (labels are read;
    image bytes are skipped)."""
    keys_img: set[str] = set()
    labels: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            if "." + ext.lower() in _IMAGE_EXTS:
                keys_img.add(key)
            elif ext == "cls":
                f = tar.extractfile(m)
                labels[key] = int(f.read().decode().strip()) if f else BAD_LABEL
    keys = keys_img & set(labels)
    return len(keys), max((labels[k] for k in keys), default=-1)


def _list_shards(folder: Path, split: str) -> list[Path]:
    shards = sorted((folder / split).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"data_root: {str(folder / split)!r} holds no .tar shards: put the {split} shards "
            f"there ({folder}/{split}/shard-000000.tar, ...)."
        )
    return shards


def open_tar_shards(root: str | Path, grayscale: bool = False) -> StreamData:
    """List ``root/train/*.tar`` and ``root/val/*.tar`` (and ``root/test``; else val) and count
    their samples (one pass over the tar headers and ``.cls`` members)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_root={str(root)!r} is not a folder: pass a folder with train/ and val/ "
            "sub-folders of .tar shards."
        )
    splits: dict[str, list[tuple[Path, int]]] = {}
    top = -1
    for split in ("train", "val", "test"):
        if split == "test" and not (root / "test").is_dir():
            splits["test"] = splits["val"]
            continue
        rows = []
        for shard in _list_shards(root, split):
            n, biggest = _shard_samples(shard)
            rows.append((shard, n))
            top = max(top, biggest)
        splits[split] = rows
    if top < 0:
        raise ValueError(f"data_root={str(root)!r}: no sample has an image and a .cls label.")
    ch = 1 if grayscale else 3
    return StreamData(root.name, "tar", splits["train"], splits["val"], splits["test"], top + 1, ch)


def tar_steps(shards: list[tuple[Path, int]], local_batch: int, world: int) -> int:
    """Steps per epoch when rank ``r`` reads shards ``r::world`` in full batches: the fewest
    any rank can fill (all ranks stop together)."""
    per_rank = [sum(n for _, n in shards[r::world]) for r in range(world)]
    steps = min(per_rank) // local_batch
    if steps < 1:
        raise ValueError(
            f"batch_size: {local_batch} per process but a process's shards hold only "
            f"{min(per_rank)} samples: lower batch_size or use more, larger shards "
            f"(at least {world} shards, one per process)."
        )
    return steps


class TarShardDataset(IterableDataset[tuple[torch.Tensor, int, str]]):
    """Iterable over this rank's shards (``shards[rank::world]``, then split among DataLoader
    workers): ``(image (C, S, S), label, "shard::member")``.

    ``shuffle=True`` permutes the shard order by ``(seed, epoch)`` and shuffles within a
    ``buffer``-sample window; the augmentation of the ``n``-th sample a worker emits is seeded by
    ``(seed, epoch, n)``. The order depends on ``num_workers`` (shards are dealt to workers), so
    a tar run is reproducible for a fixed ``num_workers`` and resumes at epoch boundaries only.
    """

    def __init__(
        self,
        shards: list[tuple[Path, int]],
        transform: ImageTransform,
        grayscale: bool,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        buffer: int = 1000,
    ) -> None:
        self.shards = [s for s, _ in shards]
        self.transform, self.grayscale = transform, grayscale
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.shuffle, self.buffer = shuffle, buffer
        self.channels = 1 if grayscale else 3

    def _my_shards(self) -> list[Path]:
        mine = self.shards[self.rank :: self.world]  # fixed per rank: its sample count is known
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            mine = [mine[i] for i in torch.randperm(len(mine), generator=g).tolist()]
        info = torch.utils.data.get_worker_info()
        return mine if info is None else mine[info.id :: info.num_workers]

    def _raw(self) -> Iterator[tuple[bytes, int, str]]:
        for shard in self._my_shards():
            pending: dict[str, dict[str, bytes]] = {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rpartition(".")
                    f = tar.extractfile(m)
                    parts = pending.setdefault(key, {})
                    parts[ext.lower()] = f.read() if f else b""
                    img = next((e for e in parts if "." + e in _IMAGE_EXTS), None)
                    if img is not None and "cls" in parts:
                        del pending[key]
                        name = f"{shard}::{key}.{img}"
                        yield parts[img], int(parts["cls"].decode().strip()), name

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, self.rank))
        window: list[tuple[bytes, int, str]] = []
        count = 0
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)

        def emit(item: tuple[bytes, int, str]) -> tuple[torch.Tensor, int, str]:
            nonlocal count
            number = count * nw + wid
            count += 1
            data, label, name = item
            try:
                image = decode_image(data, self.grayscale)
            except (OSError, ValueError, SyntaxError):
                s = self.transform.size
                return torch.zeros(self.channels, s, s), BAD_LABEL, name
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, self.epoch, number))
                return self.transform(image), label, name

        for item in self._raw():
            if not self.shuffle:
                yield emit(item)
                continue
            window.append(item)
            if len(window) >= self.buffer:
                j = int(torch.randint(len(window), (1,), generator=g))
                window[j], window[-1] = window[-1], window[j]
                yield emit(window.pop())
        while window:
            j = int(torch.randint(len(window), (1,), generator=g))
            window[j], window[-1] = window[-1], window[j]
            yield emit(window.pop())
