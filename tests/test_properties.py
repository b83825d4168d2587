"""Property-based tests: random ladders, shapes and values for the core pieces."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka import (
    MatryoshkaHead,
    MatryoshkaLoss,
    Nesting,
    prefix_similarities,
    truncate,
    truncate_numpy,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def ladders(draw, max_dim=48):
    dim = draw(st.integers(1, max_dim))
    inner = (
        draw(st.lists(st.integers(1, max(1, dim - 1)), max_size=5, unique=True)) if dim > 1 else []
    )
    sizes = [*sorted(s for s in set(inner) if s < dim), dim]
    weights = draw(st.lists(st.floats(0.0, 4.0), min_size=len(sizes), max_size=len(sizes)))
    if sum(weights) == 0:
        weights[-1] = 1.0
    return Nesting(sizes, weights)


@SETTINGS
@given(ladders())
def test_nesting_invariants(n):
    assert list(n) == sorted(set(n))
    assert n.chunks[0][0] == 0
    assert n.chunks[-1][1] == n.dim
    assert all(a < b for a, b in n.chunks)
    assert sum(b - a for a, b in n.chunks) == n.dim
    assert Nesting.from_dict(n.to_dict()) == n


@SETTINGS
@given(st.lists(st.integers(-5, 60), min_size=0, max_size=6), st.data())
def test_nesting_accepts_exactly_valid_ladders(sizes, data):
    valid = (
        len(sizes) > 0
        and all(s > 0 for s in sizes)
        and all(a < b for a, b in itertools.pairwise(sizes))
    )
    if valid:
        assert list(Nesting(sizes)) == sizes
    else:
        with pytest.raises(ValueError, match=r"sizes="):
            Nesting(sizes)


@SETTINGS
@given(ladders(), st.integers(1, 6), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_fused_heads_equal_per_size_linear(n, batch, classes, tied, seed):
    torch.manual_seed(seed)
    head = MatryoshkaHead(n.dim, classes, n, tied=tied).double()
    z = torch.randn(batch, n.dim, dtype=torch.float64, requires_grad=True)
    out = head(z)
    want = torch.stack([F.linear(z[:, :m], head.weight_for(m), head.bias_for(m)) for m in n])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (got_z,) = torch.autograd.grad((out * g).sum(), z)
    (want_z,) = torch.autograd.grad((want * g).sum(), z)
    torch.testing.assert_close(got_z, want_z, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(ladders(max_dim=12), st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_loss_is_weighted_sum_of_cross_entropies(n, batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(n), batch, classes, generator=g, dtype=torch.float64) * 5
    target = torch.randint(0, classes, (batch,), generator=g)
    out = MatryoshkaLoss(nesting=n)(logits, target)
    per = [F.cross_entropy(logits[i], target).item() for i in range(len(n))]
    assert out.per_size.tolist() == pytest.approx(per, rel=1e-9)
    assert out.loss.item() == pytest.approx(
        sum(w * p for w, p in zip(n.weights, per, strict=True)), rel=1e-9
    )


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 4), st.data())
def test_truncate_prefix_and_norm(dim, batch, data):
    m = data.draw(st.integers(1, dim))
    z = np.asarray(
        data.draw(st.lists(st.floats(-1e3, 1e3), min_size=batch * dim, max_size=batch * dim))
    ).reshape(batch, dim)
    t = truncate(torch.from_numpy(z), m)
    assert torch.equal(t, torch.from_numpy(z)[:, :m])
    zn = truncate_numpy(z, m, normalize=True)
    norms = np.linalg.norm(zn, axis=1)
    nonzero = np.linalg.norm(z[:, :m], axis=1) > 1e-3
    assert np.allclose(norms[nonzero], 1.0, atol=1e-5)
    assert all(math.isfinite(v) for v in zn.ravel())


@SETTINGS
@given(ladders(max_dim=16), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_prefix_similarities_match_per_size_cosine(n, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(q, n.dim, generator=g, dtype=torch.float64)
    b = torch.randn(k, n.dim, generator=g, dtype=torch.float64)
    sims = prefix_similarities(a, b, n)
    for i, m in enumerate(n):
        want = F.normalize(a[:, :m], dim=1) @ F.normalize(b[:, :m], dim=1).T
        torch.testing.assert_close(sims[i], want, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(
    st.integers(1, 12),  # d
    st.integers(1, 40),  # corpus size
    st.integers(1, 5),  # queries
    st.integers(1, 50),  # k (may exceed the corpus)
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_exact_index_matches_brute_force(d, n, q, k, normalize, seed):
    from matryoshka.retrieval.index import NO_SCORE, make_index

    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    index = make_index("exact", d, normalize=normalize).add(corpus)
    scores, ids = index.search(queries, k)
    assert scores.shape == ids.shape == (q, k)
    c = truncate_numpy(corpus, d, normalize=normalize)
    qq = truncate_numpy(queries, d, normalize=normalize)
    want = qq @ c.T  # (q, n)
    found = min(k, n)
    for i in range(q):
        best = np.sort(want[i])[::-1][:found]
        np.testing.assert_allclose(scores[i, :found], best, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(want[i, ids[i, :found]], scores[i, :found], rtol=1e-4, atol=1e-4)
        assert (ids[i, found:] == -1).all()
        assert (scores[i, found:] == NO_SCORE).all()


@settings(max_examples=8, deadline=None, derandomize=True)
@given(ladders(max_dim=12), st.integers(0, 2**31 - 1))
def test_adaptor_outputs_nested_unit_prefixes(n, seed):
    from matryoshka.models.adaptor import MatryoshkaAdaptor

    x = np.random.default_rng(seed).normal(size=(24, n.dim)).astype(np.float32)
    adaptor = MatryoshkaAdaptor(n, hidden=8, epochs=1, batch_size=8, progress=False, seed=seed).fit(
        x
    )
    full = adaptor.transform(x, normalize=False)
    assert full.shape == (24, n.dim)
    assert np.isfinite(full).all()
    for m in n:
        prefix = adaptor.transform(x, dim=m)
        np.testing.assert_allclose(np.linalg.norm(prefix, axis=1), 1.0, rtol=1e-4)
        np.testing.assert_allclose(
            prefix, truncate_numpy(full, m, normalize=True), rtol=1e-4, atol=1e-5
        )
