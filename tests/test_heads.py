import math
import random

import pytest
import torch
import torch.nn.functional as F

from matryoshka import MatryoshkaHead, Nesting
from matryoshka.models.heads import _TiedPrefixLinear, _UntiedPrefixLinear


def random_ladder(seed: int) -> Nesting:
    rng = random.Random(seed)
    dim = rng.randint(3, 40)
    sizes = [*sorted(rng.sample(range(1, dim), k=rng.randint(0, min(5, dim - 1)))), dim]
    return Nesting(sizes)


LADDERS = [Nesting([3, 6, 12, 24]), Nesting([5, 7, 31]), Nesting([1]), Nesting([10])] + [
    random_ladder(s) for s in range(8)
]


def naive_logits(z, weights, biases, sizes):
    """Independent reference: one F.linear per size on the sliced input."""
    return torch.stack(
        [F.linear(z[:, :m], w, b) for w, b, m in zip(weights, biases, sizes, strict=True)]
    )


@pytest.mark.parametrize("nesting", LADDERS, ids=str)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_matches_naive_values_and_gradients(nesting, tied, bias):
    torch.manual_seed(0)
    dim, n_classes, batch = nesting.dim, 5, 7
    head = MatryoshkaHead(dim, n_classes, nesting, tied=tied, bias=bias).double()
    z = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    params = list(head.parameters())
    # Reference weights built from the raw parameters, not through weight_for().
    if tied:
        weights = [head.weight[:, :m] for m in nesting]
        biases = [head.bias] * len(nesting)
    else:
        weights = list(head.weights)
        biases = list(head.bias) if head.bias is not None else [None] * len(nesting)
    out = head(z)
    assert out.shape == (len(nesting), batch, n_classes)
    want = naive_logits(z, weights, biases, list(nesting))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    got_grads = torch.autograd.grad((out * upstream).sum(), [z, *params])
    want_grads = torch.autograd.grad((want * upstream).sum(), [z, *params])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_size_m_never_depends_on_later_coordinates(tied):
    torch.manual_seed(1)
    nesting = Nesting([2, 4, 8, 16])
    head = MatryoshkaHead(16, 3, nesting, tied=tied).double()
    z = torch.randn(4, 16, dtype=torch.float64)
    base = head(z)
    for i, m in enumerate(nesting):
        z2 = z.clone()
        z2[:, m:] = torch.randn(4, 16 - m, dtype=torch.float64) * 100
        out = head(z2)
        torch.testing.assert_close(out[: i + 1], base[: i + 1], rtol=0, atol=0)
        torch.testing.assert_close(head.forward_size(z2, m), base[i], rtol=1e-12, atol=1e-12)


def test_tied_head_is_prefix_of_one_weight():
    nesting = Nesting([4, 8])
    head = MatryoshkaHead(8, 3, nesting, tied=True)
    assert head.weight_for(4).data_ptr() == head.weight.data_ptr()
    assert head.weight_for(4).shape == (3, 4)
    assert head.bias_for(4) is head.bias_for(8)
    assert sum(p.numel() for p in head.parameters()) == 3 * 8 + 3


def test_untied_head_parameter_count_and_init():
    nesting = Nesting([4, 16, 64])
    head = MatryoshkaHead(64, 10, nesting)
    assert sum(p.numel() for p in head.parameters()) == 10 * (4 + 16 + 64) + 3 * 10
    for m in nesting:
        assert head.weight_for(m).shape == (10, m)
        assert head.weight_for(m).abs().max() <= 1 / math.sqrt(m)


def test_head_errors():
    with pytest.raises(ValueError, match=r"in_features=32 but the nesting's largest size is 16"):
        MatryoshkaHead(32, 10, Nesting([8, 16]))
    with pytest.raises(TypeError, match=r"pass a Nesting, e.g. Nesting\(\[8, 16\]\)"):
        MatryoshkaHead(16, 10, [8, 16])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_classes=0 must be a positive int"):
        MatryoshkaHead(16, 0, Nesting([8, 16]))
    head = MatryoshkaHead(16, 10, Nesting([8, 16]))
    with pytest.raises(ValueError, match=r"z.shape=\(4, 12\) but this head expects \(batch, 16\)"):
        head(torch.zeros(4, 12))
    with pytest.raises(ValueError, match=r"m=9 is not on the nesting ladder \[8, 16\]"):
        head.weight_for(9)
    with pytest.raises(ValueError, match=r"size m=16 needs \(batch, >= 16\)"):
        head.forward_size(torch.zeros(2, 8), 16)


def test_state_dict_round_trip():
    nesting = Nesting([2, 8])
    a = MatryoshkaHead(8, 4, nesting)
    b = MatryoshkaHead(8, 4, nesting)
    b.load_state_dict(a.state_dict())
    z = torch.randn(3, 8)
    torch.testing.assert_close(a(z), b(z))


def test_weights_are_column_major_and_init_matches_a_contiguous_draw():
    # The weights are stored column-major (each prefix block contiguous) but hold the values a
    # contiguous nn.Linear-style draw gives for the same seed, so a seed means the same model.
    nesting = Nesting([4, 8, 16])
    torch.manual_seed(5)
    tied = MatryoshkaHead(16, 6, nesting, tied=True)
    torch.manual_seed(5)
    bound = 1 / math.sqrt(16)
    want_w = torch.empty(6, 16).uniform_(-bound, bound)
    want_b = torch.empty(6).uniform_(-bound, bound)
    assert tied.weight.stride() == (1, 6)
    assert torch.equal(tied.weight, want_w)
    assert tied.bias is not None
    assert torch.equal(tied.bias, want_b)
    torch.manual_seed(5)
    untied = MatryoshkaHead(16, 6, nesting)
    assert untied.bias is not None
    torch.manual_seed(5)
    for j, m in enumerate(nesting):
        bound = 1 / math.sqrt(m)
        want_w = torch.empty(6, m).uniform_(-bound, bound)
        want_b = torch.empty(6).uniform_(-bound, bound)
        assert untied.weights[j].stride() == (1, 6)
        assert torch.equal(untied.weights[j], want_w)
        assert torch.equal(untied.bias[j], want_b)
    assert untied.double().weights[1].stride() == (1, 6)  # dtype casts keep the layout


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layout", ["column_major", "contiguous"])
def test_gradients_come_in_the_parameters_layout(tied, layout):
    # The backward fills each weight gradient in its weight's own layout (so autograd stores it
    # without a copy) and the input gradient contiguous, whatever layout the weights have; values
    # stay equal to the per-size reference, also for an expanded (stride-0) upstream gradient.
    torch.manual_seed(2)
    nesting = Nesting([2, 5, 9])
    head = MatryoshkaHead(9, 4, nesting, tied=tied).double()
    if layout == "contiguous":  # e.g. weights assigned by a user
        with torch.no_grad():
            for name, param in head.named_parameters():
                if param.ndim == 2 and name != "bias":
                    param.data = param.data.contiguous()
    weights = (
        [head.weight[:, :m] for m in nesting] if tied else [head.weight_for(m) for m in nesting]
    )
    biases = [head.bias_for(m) for m in nesting]
    z = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    params = [p for p in head.parameters() if p.ndim == 2 and p.shape[0] == 4]
    assert all(p.is_contiguous() == (layout == "contiguous") for p in params)
    got = torch.autograd.grad(head(z).sum(), [z, *params])
    want = torch.autograd.grad(naive_logits(z, weights, biases, list(nesting)).sum(), [z, *params])
    assert got[0].is_contiguous()
    for x, g, w in zip([z, *params], got, want, strict=True):
        if x is not z:
            assert g.stride() == x.stride(), (layout, g.stride(), x.stride())
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_column_major_head_checkpoint_round_trip(tmp_path):
    from matryoshka.checkpoint import load_checkpoint, save_checkpoint

    nesting = Nesting([4, 8])
    torch.manual_seed(3)
    a = MatryoshkaHead(8, 5, nesting, tied=True)
    torch.manual_seed(4)
    b = MatryoshkaHead(8, 5, nesting, tied=True)
    save_checkpoint(tmp_path / "head", a, rng=False)
    load_checkpoint(tmp_path / "head.json", b)
    assert torch.equal(a.weight, b.weight)
    assert b.weight.stride() == (1, 5)
    z = torch.randn(3, 8)
    assert torch.equal(a(z), b(z))


def test_prefix_functions_pass_gradcheck():
    # Numerical gradients (finite differences) of the two Functions themselves, including an
    # untied ladder whose largest size is below z's width (z's last columns get zero gradient).
    torch.manual_seed(6)
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64).t().contiguous().t().requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    chunks = Nesting([2, 3, 7]).chunks
    assert torch.autograd.gradcheck(
        lambda z, w, b: _TiedPrefixLinear.apply(z, w, b, chunks), (z, w, b)
    )
    sizes = (2, 5)
    ws = [torch.randn(4, m, dtype=torch.float64, requires_grad=True) for m in sizes]
    bs = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, bs, *ws: _UntiedPrefixLinear.apply(z, bs, sizes, *ws), (z, bs, *ws)
    )
    (gz,) = torch.autograd.grad(_UntiedPrefixLinear.apply(z, bs, sizes, *ws).sum(), [z])
    assert torch.equal(gz[:, 5:], torch.zeros(3, 2, dtype=torch.float64))
