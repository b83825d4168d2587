"""Batches of teacher neighbours: texts that lie close under the teacher share a batch.

A similarity-distillation loss only sees the pairs inside a batch. In a batch of random texts
from a large corpus, a text's nearest neighbours are almost never present, so the listwise term
learns to separate texts that are far apart anyway, while retrieval lives on the fine order of
close ones. :func:`neighbour_groups` cuts a corpus into small groups of mutual teacher
neighbours (a fresh, seeded cut each epoch); :class:`NeighbourBatchSampler` shuffles the groups
and fills each batch with them, so every batch holds both local structure (within a group) and
global structure (across groups).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

try:
    from sentence_transformers.base.sampler import DefaultBatchSampler
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "matryoshka.training.neighbours needs sentence-transformers>=6.2: install it with "
        "`pip install 'matryoshka[text]'`."
    ) from e

__all__ = ["NeighbourBatchSampler", "nearest_neighbours", "neighbour_groups"]


def nearest_neighbours(emb: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """The ``k`` nearest rows of each row of ``emb (N, d)`` by cosine, itself excluded, nearest
    first: ``(N, min(k, N - 1))`` int64. Computed ``chunk`` rows at a time (memory ``chunk x N``)."""
    x = np.asarray(emb, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    k = min(k, n - 1)
    out = np.empty((n, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    for lo in range(0, n, chunk):
        sims = x[lo : lo + chunk] @ x.T  # (c, N)
        rows = np.arange(sims.shape[0])
        sims[rows, rows + lo] = -np.inf  # not itself
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (c, k) unordered
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[lo : lo + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def neighbour_groups(knn: np.ndarray, group: int, rng: np.random.Generator) -> list[list[int]]:
    """A partition of ``N`` rows into groups of at most ``group`` mutual neighbours.

    ``knn (N, k)``: each row's nearest rows (:func:`nearest_neighbours`). Rows are visited in a
    random order; each row not yet taken opens a group and takes its nearest rows not yet taken,
    up to ``group`` in all. Every row lies in exactly one group (late rows whose neighbours are all
    taken form smaller groups)."""
    n = knn.shape[0]
    taken = np.zeros(n, dtype=bool)
    groups: list[list[int]] = []
    for a in rng.permutation(n).tolist():
        if taken[a]:
            continue
        members = [a]
        for j in knn[a].tolist():
            if len(members) == group:
                break
            if not taken[j]:
                members.append(j)
        taken[members] = True
        groups.append(members)
    return groups


class NeighbourBatchSampler(DefaultBatchSampler):
    """Batches made of groups of ``group`` teacher neighbours, for ``SentenceTransformerTrainer``.

    The neighbours come from the dataset's ``label`` column (the teacher's embeddings, one row
    per example, as :class:`~matryoshka.losses.distill.MatryoshkaDistillLoss` reads them), found
    once at construction. Each epoch the rows are cut into neighbour groups afresh (seeded by
    ``seed`` and the epoch), the groups shuffled and concatenated, and the stream cut into
    batches of ``batch_size``; every row appears once per epoch. Pass it to the trainer with
    ``functools.partial(NeighbourBatchSampler, group=8)`` as ``batch_sampler``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: Any = None,
        seed: int = 0,
        group: int = 8,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(
                f"group={group!r} must be an int >= 1 (texts per neighbour group), e.g. 8."
            )
        if "label" not in dataset.column_names:
            raise ValueError(
                "NeighbourBatchSampler needs the teacher's embeddings as the dataset's 'label' "
                f"column; the dataset has {dataset.column_names}."
            )
        self.group = group
        self.n = len(dataset)
        emb = np.asarray(dataset["label"], dtype=np.float32)  # (N, w)
        self.knn = nearest_neighbours(emb, 4 * group) if group > 1 else None

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``: lists of row indices, each row once."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.knn is None:
            stream = rng.permutation(self.n).tolist()
        else:
            groups = neighbour_groups(self.knn, self.group, rng)
            stream = [i for g in rng.permutation(len(groups)).tolist() for i in groups[g]]
        out = [stream[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
