import numpy as np
import pytest
import torch

from matryoshka import (
    Nesting,
    normalize,
    prefix_norms,
    prefix_similarities,
    truncate,
    truncate_numpy,
)


def test_truncate_is_prefix_and_normalizes():
    z = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(truncate(z, 4), z[:, :4])
    t = truncate(z, 4, normalize=True)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(t * z[:, :4].norm(dim=1, keepdim=True), z[:, :4])
    assert torch.equal(normalize(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_truncate_numpy_matches_torch():
    z = np.random.default_rng(0).normal(size=(6, 10))
    got = truncate_numpy(z, 3, normalize=True)
    want = truncate(torch.from_numpy(z), 3, normalize=True).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("m", [0, 13, -1, 2.0])
def test_truncate_rejects_bad_size(m):
    with pytest.raises(
        ValueError, match=rf"m={m!r} is not a valid prefix size for embeddings of size 12"
    ):
        truncate(torch.zeros(2, 12), m)


def test_prefix_norms_and_similarities_match_naive():
    g = torch.Generator().manual_seed(1)
    n = Nesting([3, 5, 11, 16])
    q = torch.randn(4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(7, 16, generator=g, dtype=torch.float64)
    norms = prefix_norms(q, n)
    torch.testing.assert_close(norms, torch.stack([q[:, :m].norm(dim=1) for m in n]))
    for cosine in (True, False):
        sims = prefix_similarities(q, k, n, cosine=cosine)
        want = torch.stack(
            [
                (normalize(q[:, :m]) @ normalize(k[:, :m]).T) if cosine else q[:, :m] @ k[:, :m].T
                for m in n
            ]
        )
        torch.testing.assert_close(sims, want, rtol=1e-12, atol=1e-12)


def test_prefix_similarities_autograd_path_matches():
    g = torch.Generator().manual_seed(2)
    n = Nesting([2, 6])
    q = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 6, generator=g, dtype=torch.float64)
    sims = prefix_similarities(q, k, n)
    (grad,) = torch.autograd.grad(sims.sum(), q)
    want = torch.stack([normalize(q[:, :m]) @ normalize(k[:, :m]).T for m in n])
    (grad_want,) = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(sims, want)
    torch.testing.assert_close(grad, grad_want)


def test_prefix_similarities_checks_dim():
    with pytest.raises(ValueError, match=r"q.shape\[-1\]=8 but the nesting's largest size is 6"):
        prefix_similarities(torch.zeros(2, 8), torch.zeros(2, 6), Nesting([2, 6]))
