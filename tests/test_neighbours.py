"""Batches of teacher neighbours (matryoshka.training.neighbours)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
from datasets import Dataset

from matryoshka.training.neighbours import (
    NeighbourBatchSampler,
    nearest_neighbours,
    neighbour_groups,
)


def _clustered(n_clusters: int = 12, per: int = 10, d: int = 16, seed: int = 0) -> np.ndarray:
    """``(n_clusters * per, d)`` unit rows in tight clusters, cluster by cluster, then shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    x = np.repeat(centres, per, axis=0) + 0.05 * rng.normal(size=(n_clusters * per, d))
    x = x[rng.permutation(x.shape[0])]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_nearest_neighbours_match_a_full_sort() -> None:
    x = np.random.default_rng(1).normal(size=(53, 8)).astype(np.float32)
    got = nearest_neighbours(x, 5, chunk=7)  # several chunks, the last one short
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u.astype(np.float64) @ u.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, want)
    assert nearest_neighbours(x[:3], 10).shape == (3, 2)  # k capped at N - 1


def test_groups_partition_the_rows_into_neighbours() -> None:
    x = _clustered()
    knn = nearest_neighbours(x, 16)
    groups = neighbour_groups(knn, 5, np.random.default_rng(0))
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(x.shape[0]))  # every row exactly once
    assert max(len(g) for g in groups) == 5
    # each group's members are its opener's nearest rows: inside one tight cluster
    sims = [float(x[g[0]] @ x[j]) for g in groups for j in g[1:]]
    assert np.mean(sims) > 0.9
    again = neighbour_groups(knn, 5, np.random.default_rng(0))
    assert again == groups  # seeded
    assert neighbour_groups(knn, 5, np.random.default_rng(1)) != groups


def _sampler(x: np.ndarray, **kw: object) -> NeighbourBatchSampler:
    ds = Dataset.from_dict({"text": [f"t{i}" for i in range(x.shape[0])], "label": x.tolist()})
    args = {"batch_size": 20, "drop_last": False, "seed": 3, **kw}
    return NeighbourBatchSampler(ds, **args)  # type: ignore[arg-type]


def test_sampler_batches_hold_neighbours_and_every_row_once() -> None:
    x = _clustered()  # 120 rows
    s = _sampler(x, group=10)
    batches = list(s)
    assert len(batches) == len(s) == 6
    assert sorted(i for b in batches for i in b) == list(range(120))

    def within(bs: list[list[int]]) -> float:  # mean cosine of pairs sharing a batch
        return float(np.mean([(x[b] @ x[b].T).mean() for b in bs]))

    random = [list(b) for b in np.random.default_rng(0).permutation(120).reshape(6, 20)]
    assert within(batches) > within(random) + 0.2
    s.set_epoch(1)
    assert list(s) != batches  # a fresh cut each epoch
    s.set_epoch(0)
    assert list(s) == batches  # and seeded


def test_sampler_group_one_is_a_plain_shuffle_and_drop_last() -> None:
    x = _clustered()
    s = _sampler(x, group=1, batch_size=25, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 4
    assert all(len(b) == 25 for b in batches)
    assert len({i for b in batches for i in b}) == 100


def test_sampler_errors_name_the_fix() -> None:
    x = _clustered()
    with pytest.raises(ValueError, match=r"group=0 must be an int >= 1"):
        _sampler(x, group=0)
    ds = Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(
        ValueError, match=r"needs the teacher's embeddings as the dataset's 'label'"
    ):
        NeighbourBatchSampler(ds, batch_size=2, drop_last=False)


def test_trainer_builds_the_sampler_from_a_partial() -> None:
    """The form :func:`matryoshka.training.text.distill` hands the trainer."""
    from matryoshka.training.text import _neighbour_sampler

    assert _neighbour_sampler(1) is None
    make = _neighbour_sampler(10)
    assert isinstance(make, functools.partial)
    x = _clustered()
    ds = Dataset.from_dict({"text": [str(i) for i in range(120)], "label": x.tolist()})
    s = make(ds, batch_size=20, drop_last=False, valid_label_columns=None, generator=None, seed=0)
    assert isinstance(s, NeighbourBatchSampler)
    assert s.group == 10
