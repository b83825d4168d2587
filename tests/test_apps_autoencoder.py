"""Matryoshka autoencoder: per-prefix reconstruction, its loss, and the 2-D scatter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from matryoshka.apps.autoencoder import (
    AutoencoderConfig,
    MatryoshkaAutoencoder,
    plot_scatter_2d,
    prefix_masks,
)
from matryoshka.nesting import Nesting
from matryoshka.training.loop import fit


def test_prefix_masks_keep_the_first_m_columns():
    masks = prefix_masks(Nesting([1, 3, 4]))
    assert masks.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_forward_is_decode_of_each_prefix_and_ignores_the_tail():
    torch.manual_seed(0)
    nesting = Nesting([2, 4, 8])
    model = MatryoshkaAutoencoder(20, nesting, hidden=[16])
    x = torch.randn(5, 20)
    recon = model(x)
    assert recon.shape == (3, 5, 20)
    z = model.encode(x)
    for i, m in enumerate(nesting):
        torch.testing.assert_close(recon[i], model.decode(z, m))
        z2 = z.clone()
        z2[:, m:] = torch.randn_like(z2[:, m:])  # changing the tail changes nothing
        torch.testing.assert_close(model.decode(z2, m), recon[i])


def test_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    nesting = Nesting([1, 2, 4], weights=[3.0, 1.0, 0.5])
    model = MatryoshkaAutoencoder(6, nesting, hidden=[])  # linear encoder and decoder
    x = torch.randn(7, 6)
    loss, per_size = model.loss_fn()(model(x), x)
    enc, dec = model.encoder[0], model.decoder[0]
    assert isinstance(enc, torch.nn.Linear)
    assert isinstance(dec, torch.nn.Linear)
    enc_w, enc_b, dec_w, dec_b = enc.weight, enc.bias, dec.weight, dec.bias
    z = x @ enc_w.T + enc_b
    expected = 0.0
    for i, (m, c) in enumerate(zip(nesting, nesting.weights, strict=True)):
        recon = z[:, :m] @ dec_w[:, :m].T + dec_b
        mse = ((recon - x) ** 2).mean()
        assert per_size[i].item() == pytest.approx(mse.item(), rel=1e-5)
        expected += c * mse.item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_trained_reconstruction_error_decreases_with_size():
    digits = load_digits()
    x = torch.as_tensor(digits.data / 16.0, dtype=torch.float32)  # (1797, 64)
    x = x - x.mean(0)
    torch.manual_seed(0)
    nesting = Nesting([1, 2, 4, 8, 16])
    model = MatryoshkaAutoencoder(64, nesting, hidden=[])
    loss_fn = model.loss_fn()
    start = loss_fn(model(x), x).per_size

    def step(idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(x[idx]), x[idx]).loss

    fit(model.parameters(), step, len(x), 15, 128, 1e-2, progress=False)
    with torch.no_grad():
        errors = loss_fn(model(x), x).per_size
    assert (errors < start).all()
    assert (errors[1:] < errors[:-1]).all(), errors
    # A linear Matryoshka AE approaches PCA's optimum: at m=16 it explains most of the variance.
    assert errors[-1] < 0.35 * x.pow(2).mean()


def test_decode_rejects_a_size_outside_the_code():
    model = MatryoshkaAutoencoder(6, Nesting([2, 4]), hidden=[])
    with pytest.raises(ValueError, match="m=5 must be in \\[1, 4\\]"):
        model.decode(torch.zeros(3, 4), 5)


def test_scatter_writes_a_png_and_rejects_1d_codes(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    path = plot_scatter_2d(
        {"a": rng.normal(size=(50, 4)), "b": rng.normal(size=(50, 2))}, labels, tmp_path / "s.png"
    )
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="need \\(N, >= 2\\)"):
        plot_scatter_2d({"a": rng.normal(size=(50, 1))}, labels, tmp_path / "t.png")


def test_config_errors():
    with pytest.raises(ValueError, match="is not sorted"):
        AutoencoderConfig(sizes=[4, 2])
    with pytest.raises(ValueError, match="hidden=\\[0\\] must be positive ints"):
        AutoencoderConfig(hidden=[0])
