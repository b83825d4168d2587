"""Same seed, same machine, same weights: a tiny training run repeated is bitwise identical."""

from __future__ import annotations

from dataclasses import replace

import torch

from matryoshka.training.image import train
from tests.helpers import tiny_train_config


def test_training_twice_gives_bitwise_equal_weights(tmp_path, mnist_small) -> None:
    config = tiny_train_config(epochs=1, batch_size=64, augment_shift=2)
    one = train(replace(config, out_dir=str(tmp_path / "a")), mnist_small)
    two = train(replace(config, out_dir=str(tmp_path / "b")), mnist_small)
    a, b = one.model.state_dict(), two.model.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert one.history == two.history
