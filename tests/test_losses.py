import math

import pytest
import torch
import torch.nn.functional as F

from matryoshka import MatryoshkaLoss, Nesting


def test_cross_entropy_matches_hand_computation():
    nesting = Nesting([1, 2], weights=[0.5, 2.0])
    logits = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 1.0]],  # size 1, batch of 2, 2 classes
            [[1.0, 1.0], [3.0, 0.0]],  # size 2
        ]
    )
    target = torch.tensor([0, 1])

    def ce(row, t):
        return -row[t] + math.log(sum(math.exp(v) for v in row))

    l1 = (ce([2.0, 0.0], 0) + ce([0.0, 1.0], 1)) / 2
    l2 = (ce([1.0, 1.0], 0) + ce([3.0, 0.0], 1)) / 2
    out = MatryoshkaLoss(nesting=nesting)(logits, target)
    assert out.per_size.tolist() == pytest.approx([l1, l2], rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * l1 + 2.0 * l2, rel=1e-6)


def test_custom_base_loss_equals_fused_default():
    torch.manual_seed(0)
    nesting = Nesting([2, 4, 8], weights=[1.0, 0.5, 0.25])
    logits = torch.randn(3, 6, 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    fused = MatryoshkaLoss(nesting=nesting)(logits, target)
    looped = MatryoshkaLoss(F.cross_entropy, nesting)(logits, target)
    torch.testing.assert_close(fused.loss, looped.loss)
    torch.testing.assert_close(fused.per_size, looped.per_size)
    g1 = torch.autograd.grad(fused.loss, logits)[0]
    g2 = torch.autograd.grad(looped.loss, logits)[0]
    torch.testing.assert_close(g1, g2)
    assert not fused.per_size.requires_grad


def test_loss_errors():
    with pytest.raises(TypeError, match=r"pass a Nesting"):
        MatryoshkaLoss()
    loss = MatryoshkaLoss(nesting=Nesting([2, 4]))
    with pytest.raises(ValueError, match=r"logits.shape=\(3, 5, 2\) but the nesting has 2 sizes"):
        loss(torch.zeros(3, 5, 2), torch.zeros(5, dtype=torch.long))
