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


# --- gradient caching ----------------------------------------------------------------------------

_TEXTS = [
    "a cat",
    "the long and winding road that leads to your door",
    "rain",
    "a small red house by the river, with a garden",
    "snow on the hills",
    "fire",
    "the wind in the willows and the reeds",
]


def _grads(model_dir: str, mini_batch_size: int | None) -> tuple[float, dict[str, torch.Tensor]]:
    """One loss + backward of two text columns of different lengths in float64, dropout off:
    ``(loss, {parameter name: gradient})``."""
    from sentence_transformers import SentenceTransformer

    from matryoshka.losses.distill import MatryoshkaDistillLoss

    model = SentenceTransformer(model_dir, device="cpu").to(torch.float64)
    model.eval()  # dropout off: both passes of gradient caching see the same network
    loss = MatryoshkaDistillLoss(
        model, [8, 32, 384], keep_weight=0.5, mini_batch_size=mini_batch_size
    )
    g = torch.Generator().manual_seed(0)
    labels = torch.randn(len(_TEXTS), 2 * 384, generator=g, dtype=torch.float64)
    columns = [model.tokenize(_TEXTS), model.tokenize([t[::-1] + " x" for t in _TEXTS[::-1]])]
    value = loss(columns, labels)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), grads


@needs_text
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mini_batch_size", [1, 3])
def test_gradient_caching_equals_one_pass(tiny_model_dir: str, mini_batch_size: int) -> None:
    """Sorted by length and embedded in mini-batches, two columns of texts give the loss and
    every parameter gradient of the plain single pass (the teacher's rows follow the sort)."""
    plain_loss, plain = _grads(tiny_model_dir, None)
    cached_loss, cached = _grads(tiny_model_dir, mini_batch_size)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-10)
    assert plain.keys() == cached.keys()
    assert len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-8, atol=1e-12, msg=name)


def test_by_length_sorts_each_column_and_its_teacher_rows() -> None:
    from matryoshka.losses.distill import _by_length

    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    ids = torch.tensor([[5, 0, 0], [6, 7, 8], [9, 10, 0]])
    cols = [{"input_ids": ids, "attention_mask": mask, "modality": "text"}] * 2
    teacher = torch.arange(6.0)[:, None]  # rows 0-2: column 0, rows 3-5: column 1
    out, rows = _by_length(cols, teacher)
    assert out[0]["input_ids"].tolist() == [[6, 7, 8], [9, 10, 0], [5, 0, 0]]
    assert out[1]["modality"] == "text"
    assert rows[:, 0].tolist() == [1.0, 2.0, 0.0, 4.0, 5.0, 3.0]
    flat = [{"input_ids": ids.flatten(), "attention_mask": mask}]  # not (B, ...): order kept
    same, kept = _by_length(flat, teacher[:3])
    assert same is flat
    assert kept.tolist() == teacher[:3].tolist()


def test_gradient_caching_options_are_checked() -> None:
    from matryoshka.losses.distill import MatryoshkaDistillLoss

    with pytest.raises(ValueError, match=re.escape("mini_batch_size=0 must be None")):
        MatryoshkaDistillLoss(torch.nn.Identity(), SIZES, mini_batch_size=0)
    loss = MatryoshkaDistillLoss(torch.nn.Identity(), SIZES, mini_batch_size=4)
    assert loss.uses_gradient_cache
    assert loss.get_config_dict()["mini_batch_size"] == 4
    plain = MatryoshkaDistillLoss(torch.nn.Identity(), SIZES)
    assert "mini_batch_size" not in plain.get_config_dict()
