"""Fused Matryoshka InfoNCE against a naive per-size loop (float64) and sentence-transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matryoshka import Nesting
from matryoshka.contrastive import Matryoshka2dContrastiveLoss, MatryoshkaContrastiveLoss

NEST = Nesting([3, 5, 8, 12], [1.0, 0.5, 2.0, 1.0])


def naive(
    q: torch.Tensor,
    k: torch.Tensor,
    nesting: Nesting,
    t: float,
    symmetric: bool,
    active: tuple[bool, ...] | None = None,
) -> torch.Tensor:
    y = torch.arange(q.shape[0])
    total = q.new_zeros(())
    for i, (m, w) in enumerate(zip(nesting.sizes, nesting.weights, strict=True)):
        if active is not None and not active[i]:
            continue
        a = F.normalize(q[:, :m], dim=-1) @ F.normalize(k[:, :m], dim=-1).T / t
        loss = F.cross_entropy(a, y)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(a[:, : q.shape[0]].T, y))
        total = total + w * loss
    return total


def _inputs(n_q: int, n_k: int, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n_k, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n_k", [6, 10])  # in-batch only, and with 4 extra hard negatives
@pytest.mark.parametrize("active", [None, (True, False, True, False), (False, True, False, False)])
def test_fused_equals_naive(symmetric: bool, n_k: int, active: tuple[bool, ...] | None) -> None:
    q, k = _inputs(6, n_k)
    loss = MatryoshkaContrastiveLoss(NEST, temperature=0.1, symmetric=symmetric)
    out = loss(q, k, active=active)
    ref = naive(q, k, NEST, 0.1, symmetric, active)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    g_fused = torch.autograd.grad(out.loss, [q, k])
    g_ref = torch.autograd.grad(ref, [q, k])
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert out.per_size.shape == (4,)
    if active is not None:
        assert (out.per_size[[i for i, x in enumerate(active) if not x]] == 0).all()


def test_gradcheck() -> None:
    q, k = _inputs(4, 7)
    loss = MatryoshkaContrastiveLoss(NEST, temperature=0.2, symmetric=True)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b).loss, (q, k))


class _FixedEmbeddings(nn.Module):
    """A sentence-transformers "model" whose forward returns the given embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self) -> int:
        return self.dim


@pytest.mark.parametrize("symmetric", [False, True])
def test_equals_sentence_transformers_matryoshka_mnrl(symmetric: bool) -> None:
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    nesting = Nesting([4, 8, 16, 24], [1.0, 2.0, 0.5, 1.0])
    model = _FixedEmbeddings(24)
    kwargs: dict[str, object] = {}
    if symmetric:
        kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    # MNRL: scale = 1 / temperature, cosine similarity; ST sorts the dims but keeps each weight
    st = st_losses.MatryoshkaLoss(
        model,
        st_losses.MultipleNegativesRankingLoss(model, scale=1 / 0.05, **kwargs),
        [16, 4, 24, 8],
        [0.5, 1.0, 1.0, 2.0],
    )
    g = torch.Generator().manual_seed(1)
    cols = [
        torch.randn(8, 24, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    if symmetric:
        cols = cols[:2]  # ST's doc_to_query uses the positives only
    ref = st([{"emb": c} for c in cols], None)
    ours = MatryoshkaContrastiveLoss(nesting, 0.05, symmetric)(cols[0], torch.cat(cols[1:])).loss
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, cols), torch.autograd.grad(ref, cols), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_size_sampling_is_seeded_and_keeps_the_full_size() -> None:
    loss = MatryoshkaContrastiveLoss(NEST, n_sizes_per_step=2)
    torch.manual_seed(0)
    a = [loss.sample_sizes() for _ in range(5)]
    torch.manual_seed(0)
    b = [loss.sample_sizes() for _ in range(5)]
    assert a == b
    assert all(sum(x) == 2 for x in a)
    full = MatryoshkaContrastiveLoss(NEST, n_sizes_per_step=1, always_full=True)
    assert all(f[-1] for f in (full.sample_sizes() for _ in range(10)))
    q, k = _inputs(5, 5)
    torch.manual_seed(3)
    flags = loss.sample_sizes()
    torch.manual_seed(3)
    out = loss(q, k)
    torch.testing.assert_close(out.loss, naive(q, k, NEST, 0.05, False, flags))


def test_2d_loss_equals_sum_over_layers() -> None:
    g = torch.Generator().manual_seed(0)
    ql = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    kl = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    loss2d = Matryoshka2dContrastiveLoss(NEST, layers=[0, 2], layer_weights=[0.5, 1.0])
    out = loss2d(ql, kl)
    ref = 0.5 * naive(ql[0], kl[0], NEST, 0.05, False) + naive(ql[2], kl[2], NEST, 0.05, False)
    torch.testing.assert_close(out.loss, ref)
    assert out.per_size.shape == (2, 4)
    sampled = Matryoshka2dContrastiveLoss(NEST, layers=[0, 1, 2], n_layers_per_step=1)
    torch.testing.assert_close(
        sampled(ql, kl).per_size[2].sum(), naive(ql[2], kl[2], NEST, 0.05, False)
    )


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"nesting=\[8, 16\] is a list: pass a Nesting"):
        MatryoshkaContrastiveLoss([8, 16])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature=0 must be a positive finite float"):
        MatryoshkaContrastiveLoss(NEST, temperature=0)
    with pytest.raises(ValueError, match=r"n_sizes_per_step=5 must be None .* in \[1, 4\]"):
        MatryoshkaContrastiveLoss(NEST, n_sizes_per_step=5)
    loss = MatryoshkaContrastiveLoss(NEST)
    with pytest.raises(ValueError, match=r"q.shape=\(4, 10\) but the nesting's largest size is 12"):
        loss(torch.randn(4, 10), torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"k.shape=\(3, 12\) .* N >= 4"):
        loss(torch.randn(4, 12), torch.randn(3, 12))
    with pytest.raises(ValueError, match="at least one True"):
        loss(torch.randn(4, 12), torch.randn(4, 12), active=[False] * 4)
    with pytest.raises(ValueError, match="must increase without repeats"):
        Matryoshka2dContrastiveLoss(NEST, layers=[2, 1])
    with pytest.raises(ValueError, match=r"layer_weights=.* must be 2 non-negative floats"):
        Matryoshka2dContrastiveLoss(NEST, layers=[0, 1], layer_weights=[1.0])
    with pytest.raises(ValueError, match=r"n_layers_per_step=2 must be None .* \[0, 1\]"):
        Matryoshka2dContrastiveLoss(NEST, layers=[0, 1], n_layers_per_step=2)
    with pytest.raises(ValueError, match="only 2 layer outputs were given"):
        Matryoshka2dContrastiveLoss(NEST, layers=[0, 3])(
            torch.randn(2, 4, 12), torch.randn(2, 4, 12)
        )
