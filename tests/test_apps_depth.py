"""Adaptive depth: exits ignore later blocks, early exit equals the full pass, FLOPs grow."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from matryoshka.apps.depth import DepthConfig, DepthMatryoshka, depth_loss
from matryoshka.apps.vit import ViTBackbone
from matryoshka.nesting import Nesting


@pytest.fixture
def model() -> DepthMatryoshka:
    torch.manual_seed(0)
    vit = ViTBackbone(embed_dim=8, width=16, depth=3, heads=2)
    return DepthMatryoshka(vit, 5, Nesting([2, 4, 8])).eval()


def test_forward_shapes(model):
    x = torch.randn(4, 1, 28, 28)
    assert model(x).shape == (3, 3, 4, 5)  # (exits, sizes, batch, classes)
    assert model.forward_embeddings(x).shape == (3, 4, 8)


def test_exit_does_not_depend_on_later_blocks(model):
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        for p in model.vit.blocks[1:].parameters():  # blocks 2 and 3
            p.add_(torch.randn_like(p))
        after = model(x)
    torch.testing.assert_close(after[0], before[0])  # exit after block 1 unchanged
    assert not torch.allclose(after[1], before[1])
    # and no gradient flows from exit 1 into later blocks
    model.zero_grad()
    model(x)[0].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.vit.blocks[1:].parameters())
    assert model.vit.blocks[0].linear1.weight.grad.abs().sum() > 0


def test_early_exit_equals_the_full_pass(model):
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
        for e, layer in enumerate(model.exits):
            for i, m in enumerate(model.nesting):
                torch.testing.assert_close(model.forward_exit(x, layer, m), full[e, i])


def test_flops_grow_with_depth_and_size(model):
    flops = [[model.exit_flops(layer, m) for m in model.nesting] for layer in model.exits]
    assert all(a < b for row in flops for a, b in itertools.pairwise(row))
    assert all(flops[i][0] < flops[i + 1][0] for i in range(len(flops) - 1))
    # one block costs far more than the head-size difference
    assert flops[1][0] - flops[0][0] > flops[0][-1] - flops[0][0]


def test_depth_loss_is_the_weighted_sum_over_exits_and_sizes():
    torch.manual_seed(0)
    nesting = Nesting([2, 4], weights=[1.0, 2.0])
    logits, y = torch.randn(3, 2, 6, 5), torch.randint(0, 5, (6,))
    loss, per = depth_loss(logits, y, nesting, [0.5, 1.0, 3.0])
    expected = sum(
        a * c * F.cross_entropy(logits[e, i], y).item()
        for e, a in enumerate([0.5, 1.0, 3.0])
        for i, c in enumerate(nesting.weights)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert per.shape == (3, 2)


def test_errors_name_the_fix(model):
    vit = ViTBackbone(embed_dim=8, width=16, depth=3, heads=2)
    with pytest.raises(ValueError, match=r"exits=\[2, 1\] must be increasing"):
        DepthMatryoshka(vit, 5, Nesting([8]), exits=[2, 1])
    with pytest.raises(
        ValueError, match=r"exits=\[4\] must be increasing block indices in \[1, 3\]"
    ):
        DepthMatryoshka(vit, 5, Nesting([8]), exits=[4])
    with pytest.raises(ValueError, match="layer=7 has no exit"):
        model.forward_exit(torch.randn(1, 1, 28, 28), 7, 2)
    with pytest.raises(ValueError, match="m=3 is not on the nesting ladder"):
        model.forward_exit(torch.randn(1, 1, 28, 28), 1, 3)
    with pytest.raises(ValueError, match="one weight per exit"):
        depth_loss(torch.randn(2, 1, 3, 4), torch.zeros(3, dtype=torch.long), Nesting([4]), [1.0])
    with pytest.raises(ValueError, match="depth=4: give one weight per exit"):
        DepthConfig(depth=4, exit_weights=[1.0])
