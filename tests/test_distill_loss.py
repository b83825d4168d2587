"""The self-distillation loss against an independent NumPy computation, and its input checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.markers import needs_text

pytestmark = needs_text

SIZES = [4, 8, 16]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax_rows(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def _numpy_terms(
    y: np.ndarray, t: np.ndarray, t_temp: float, pw: float, lw: float
) -> tuple[np.ndarray, float]:
    """Per-size pairwise + listwise terms and the keep term, written out in NumPy (float64)."""
    t = _unit(t.astype(np.float64))
    target = t @ t.T
    b = y.shape[0]
    off = ~np.eye(b, dtype=bool)
    per = []
    for m in SIZES:
        p = _unit(y[:, :m].astype(np.float64))
        sims = p @ p.T
        pairwise = np.abs(sims - target).mean()
        # the row itself is left out of each neighbour distribution
        kl = 0.0
        for i in range(b):
            lp = _log_softmax_rows(target[i, off[i]][None] / t_temp)[0]
            lq = _log_softmax_rows(sims[i, off[i]][None] / t_temp)[0]
            kl += float((np.exp(lp) * (lp - lq)).sum())
        per.append(pw * pairwise + lw * kl / b)
    full = _unit(y[:, : SIZES[-1]].astype(np.float64))
    keep = float((1.0 - (full * t).sum(1)).mean())
    return np.array(per), keep


@pytest.mark.parametrize(
    ("pw", "lw", "temp"), [(1.0, 1.0, 0.05), (0.5, 2.0, 0.1), (1.0, 0.0, 0.05)]
)
def test_distill_term_matches_numpy(pw: float, lw: float, temp: float) -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss, similarity_distill_loss
    from matryoshka.nesting import Nesting

    rng = np.random.default_rng(0)
    y = rng.normal(size=(7, 16)).astype(np.float32)
    t = rng.normal(size=(7, 16)).astype(np.float32)
    per_np, keep_np = _numpy_terms(y, t, temp, pw, lw)
    loss = MatryoshkaDistillLoss(
        torch.nn.Identity(),
        [16, 4, 8],  # any order
        keep_weight=0.7,
        pairwise_weight=pw,
        listwise_weight=lw,
        temperature=temp,
    )
    value = loss.distill_term(torch.from_numpy(y), torch.from_numpy(t))
    np.testing.assert_allclose(loss.last_terms["per_size"].numpy(), per_np, rtol=1e-4, atol=1e-5)
    assert float(loss.last_terms["keep"]) == pytest.approx(keep_np, rel=1e-4, abs=1e-6)
    expected = per_np.mean() + 0.7 * keep_np  # equal size weights, normalised to sum 1
    assert float(value) == pytest.approx(expected, rel=1e-4)
    # the shared function alone: the same per-size terms, weighted as asked
    tn = torch.nn.functional.normalize(torch.from_numpy(t), dim=1)
    w = torch.tensor([0.2, 0.3, 0.5])
    total, per = similarity_distill_loss(
        torch.from_numpy(y), tn @ tn.T, Nesting(SIZES), w, pw, lw, temp
    )
    np.testing.assert_allclose(per.numpy(), per_np, rtol=1e-4, atol=1e-5)
    assert float(total) == pytest.approx(float((w.numpy() * per_np).sum()), rel=1e-4)


def test_a_student_equal_to_its_teacher_has_zero_full_size_terms() -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    t = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    loss = MatryoshkaDistillLoss(torch.nn.Identity(), SIZES)
    loss.distill_term(3.0 * t, t)  # the scale does not matter: cosines
    assert float(loss.last_terms["per_size"][-1]) == pytest.approx(0.0, abs=1e-5)
    assert float(loss.last_terms["keep"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss.last_terms["per_size"][0]) > 0.01  # a 4-d prefix loses structure


def test_the_loss_gradient_moves_prefixes_toward_the_teacher() -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    g = torch.Generator().manual_seed(2)
    t = torch.randn(12, 16, generator=g)
    y = torch.randn(12, 16, generator=g, requires_grad=True)
    loss = MatryoshkaDistillLoss(torch.nn.Identity(), SIZES)
    opt = torch.optim.SGD([y], lr=0.5)
    per_before, keep_before = _numpy_terms(y.detach().numpy(), t.numpy(), 0.05, 1.0, 1.0)
    for _ in range(50):
        opt.zero_grad()
        loss.distill_term(y, t).backward()
        opt.step()
    per_after, keep_after = _numpy_terms(y.detach().numpy(), t.numpy(), 0.05, 1.0, 1.0)
    assert (per_after < per_before).all()
    assert keep_after < keep_before


def test_teacher_rows_follow_the_column_order_of_torch_cat() -> None:
    from matryoshka.losses.distill import teacher_rows

    a, p = torch.arange(6.0).reshape(3, 2), 10 + torch.arange(6.0).reshape(3, 2)
    labels = torch.cat([a, p], dim=1)  # row i: teacher(anchor_i), teacher(positive_i)
    torch.testing.assert_close(teacher_rows(labels, 2), torch.cat([a, p]))
    with pytest.raises(ValueError, match=r"labels of shape \(3, 4\) for 3 text column\(s\)"):
        teacher_rows(labels, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_weight": -1.0}, "keep_weight=-1.0 must be a float >= 0, e.g. 1.0."),
        ({"pairwise_weight": "x"}, "pairwise_weight='x' must be a float >= 0"),
        ({"temperature": 0.0}, "temperature=0.0 must be a positive float, e.g. 0.05."),
        ({"matryoshka_weights": [1.0]}, "matryoshka_weights has 1 entries but matryoshka_dims 3"),
    ],
)
def test_bad_loss_options_are_named(kwargs: dict[str, object], message: str) -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    with pytest.raises(ValueError, match=re.escape(message)):
        MatryoshkaDistillLoss(torch.nn.Identity(), SIZES, **kwargs)  # type: ignore[arg-type]


def test_missing_labels_and_wrong_shapes_are_explained() -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    loss = MatryoshkaDistillLoss(torch.nn.Identity(), SIZES)
    with pytest.raises(ValueError, match=r"got no labels: .*'label' column"):
        loss([{}], None)
    with pytest.raises(ValueError, match=r"teacher labels \(4, 8\) must be \(n, d\) and \(n, 16\)"):
        loss.distill_term(torch.zeros(4, 16), torch.zeros(4, 8))
