"""Fused Matryoshka InfoNCE against a naive per-size loop (float64) and sentence-transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmarks.st_reference import st_loss, st_matryoshka_mnrl

from matryoshka import Nesting
from matryoshka.losses.contrastive import (
    Matryoshka2dContrastiveLoss,
    MatryoshkaContrastiveLoss,
    _softmax_needs_no_logs,
)

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


@pytest.mark.parametrize("symmetric", [False, True])
def test_equals_sentence_transformers_matryoshka_mnrl(symmetric: bool) -> None:
    pytest.importorskip("sentence_transformers")
    nesting = Nesting([4, 8, 16, 24], [1.0, 2.0, 0.5, 1.0])
    # MNRL: scale = 1 / temperature, cosine similarity; ST sorts the dims but keeps each weight
    st = st_matryoshka_mnrl(24, [16, 4, 24, 8], [0.5, 1.0, 1.0, 2.0], 1 / 0.05, symmetric)
    g = torch.Generator().manual_seed(1)
    cols = [
        torch.randn(8, 24, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    if symmetric:
        cols = cols[:2]  # ST's doc_to_query uses the positives only
    ref = st_loss(st, *cols)
    ours = MatryoshkaContrastiveLoss(nesting, 0.05, symmetric)(cols[0], torch.cat(cols[1:])).loss
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, cols), torch.autograd.grad(ref, cols), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_large_scale_takes_the_log_softmax_path(symmetric: bool) -> None:
    # scale 1000 in float64: exp(-2 scale) underflows, so the shortcuts are off
    assert not _softmax_needs_no_logs(1000.0, 10, torch.float64)
    q, k = _inputs(6, 10 if not symmetric else 6, seed=2)
    loss = MatryoshkaContrastiveLoss(NEST, temperature=1e-3, symmetric=symmetric)
    out = loss(q, k)
    ref = naive(q, k, NEST, 1e-3, symmetric)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-9)
    for a, b in zip(
        torch.autograd.grad(out.loss, [q, k]), torch.autograd.grad(ref, [q, k]), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_softmax_shortcut_threshold() -> None:
    assert _softmax_needs_no_logs(20.0, 4096, torch.float32)
    assert not _softmax_needs_no_logs(45.0, 16, torch.float32)
    assert _softmax_needs_no_logs(300.0, 10**6, torch.float64)
    assert not _softmax_needs_no_logs(400.0, 16, torch.float64)
    assert not _softmax_needs_no_logs(20.0, 16, torch.float16)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 0.025, 0.01])  # scale 20 and 40: shortcut; 100: not
def test_float32_both_paths_match_float64(symmetric: bool, temperature: float) -> None:
    g = torch.Generator().manual_seed(4)
    q64 = torch.randn(16, 12, generator=g, dtype=torch.float64)
    k64 = torch.randn(24 if not symmetric else 16, 12, generator=g, dtype=torch.float64)
    k64[:3] = -q64[:3]  # positives at cosine -1: the largest losses, P_ii ~ exp(-2 scale)
    k64[3:6] = q64[3:6]  # and at +1
    loss = MatryoshkaContrastiveLoss(NEST, temperature=temperature, symmetric=symmetric)
    q32, k32 = (z.float().requires_grad_() for z in (q64, k64))
    out = loss(q32, k32)
    q64.requires_grad_()
    k64.requires_grad_()
    ref = naive(q64, k64, NEST, temperature, symmetric)
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-5, atol=1e-4)
    g32 = torch.autograd.grad(out.loss, [q32, k32])
    g64 = torch.autograd.grad(ref, [q64, k64])
    for a, b in zip(g32, g64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_no_grad_partial_grad_and_repeated_backward() -> None:
    q, k = _inputs(5, 8)
    loss = MatryoshkaContrastiveLoss(NEST, temperature=0.1, symmetric=True)
    ref = naive(q, k, NEST, 0.1, True)
    with torch.no_grad():
        out = loss(q, k)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
    k_fixed = k.detach()  # only q needs a gradient
    (g_q,) = torch.autograd.grad(loss(q, k_fixed).loss, [q])
    torch.testing.assert_close(g_q, torch.autograd.grad(ref, [q], retain_graph=True)[0])
    # the gradients are computed in forward: backward twice (retain_graph) and a scaled upstream
    # gradient both give the right answer
    total = loss(q, k).loss
    first = torch.autograd.grad(3.0 * total, [q, k], retain_graph=True)
    second = torch.autograd.grad(total, [q, k])
    for a, b, c in zip(first, second, torch.autograd.grad(ref, [q, k]), strict=True):
        torch.testing.assert_close(a, 3.0 * c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


def test_zero_weight_sizes_are_skipped() -> None:
    nesting = Nesting([3, 5, 8, 12], [0.0, 1.0, 0.0, 0.0])
    q, k = _inputs(4, 6)
    out = MatryoshkaContrastiveLoss(nesting, temperature=0.1)(q, k)
    torch.testing.assert_close(out.loss, naive(q, k, nesting, 0.1, False))
    grads = torch.autograd.grad(out.loss, [q, k])
    assert (grads[0][:, 5:] == 0).all()
    assert (grads[1][:, 5:] == 0).all()
    only_zero = MatryoshkaContrastiveLoss(nesting)(q, k, active=(True, False, False, False))
    assert only_zero.loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(only_zero.loss, [q, k]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_matches_cpu(symmetric: bool) -> None:
    q, k = _inputs(6, 10 if not symmetric else 6)
    loss = MatryoshkaContrastiveLoss(NEST, temperature=0.05, symmetric=symmetric)
    out = loss(q, k)
    grads = torch.autograd.grad(out.loss, [q, k])
    qc, kc = (z.detach().cuda().requires_grad_() for z in (q, k))
    out_c = loss(qc, kc)
    torch.testing.assert_close(out_c.loss.cpu(), out.loss.detach())
    for a, b in zip(torch.autograd.grad(out_c.loss, [qc, kc]), grads, strict=True):
        torch.testing.assert_close(a.cpu(), b)


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
