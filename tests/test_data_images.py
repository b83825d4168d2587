import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.data.images import load_dataset, load_image_folder, stratified_split


def test_mnist_subset_split_is_stratified_and_fixed(mnist):
    assert mnist.sizes() == {"train": 3500, "val": 500, "test": 1000}
    assert mnist.input_shape == (1, 28, 28)
    assert mnist.num_classes == 10
    for y, per_class in ((mnist.y_train, 350), (mnist.y_val, 50), (mnist.y_test, 100)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    # normalised with MNIST statistics: background is (0 - 0.1307) / 0.3081
    assert mnist.x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    again = load_dataset("mnist-subset", seed=0)
    assert torch.equal(again.x_test, mnist.x_test)
    other = load_dataset("mnist-subset", seed=1)
    assert not torch.equal(other.x_train, mnist.x_train)


def test_stratified_split_covers_everything_once():
    y = np.repeat(np.arange(3), [10, 20, 30])
    parts = stratified_split(y, (0.5, 0.3, 0.2), seed=3)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(60))
    assert [np.bincount(y[p]).tolist() for p in parts] == [[5, 10, 15], [3, 6, 9], [2, 4, 6]]
    with pytest.raises(ValueError, match=r"fractions=\[0.5, 0.6\] must be positive and sum to 1"):
        stratified_split(y, (0.5, 0.6))


def test_image_folder_round_trip(tmp_path, mnist):
    raw = ((mnist.x_train[:40] * 0.3081 + 0.1307) * 255).round().clamp(0, 255).byte()
    for i, (img, label) in enumerate(zip(raw, mnist.y_train[:40], strict=True)):
        folder = tmp_path / f"class_{int(label)}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i}.png")
    splits = load_image_folder(tmp_path, image_size=28, grayscale=True, fractions=(0.5, 0.25, 0.25))
    assert splits.input_shape == (1, 28, 28)
    assert sum(splits.sizes().values()) == 40
    assert splits.num_classes == len({int(v) for v in mnist.y_train[:40]})


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data='imagenet' is not one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"data='mnist' needs data_root"):
        load_dataset("mnist")
    with pytest.raises(
        FileNotFoundError, match=r"holds no MNIST files: put them there or pass download=True"
    ):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        load_image_folder(tmp_path / "missing")
