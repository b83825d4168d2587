"""FusedMatryoshkaLoss against sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss).

Real sentence-transformers, a real SentenceTransformerTrainer, and the bundled all-MiniLM-L6-v2
cut to its first transformer layer (saved once per module; loading it takes well under a second).
The trainer comparisons run in float64: the fused loss sums the same terms in another order
(running prefix sums over chunks, one softmax per size), so in float32 the two agree to ~1e-6
and a few Adam steps can magnify that; in float64 they agree to ~1e-15 relative, and the tests
ask for 1e-10, far above rounding and far below any real difference.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model only; no hub look-ups

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.markers import HAS_TEXT

pytestmark = [
    pytest.mark.skipif(not HAS_TEXT, reason="needs the text extra: pip install 'matryoshka[text]'"),
    pytest.mark.usefixtures("one_thread"),
]

if HAS_TEXT:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.util import dot_score

    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss

DIMS = [32, 384, 8, 128]  # unsorted on purpose: both losses sort them
WEIGHTS = [1.0, 2.0, 0.5, 1.0]
WORDS = ["red", "blue", "green", "cat", "dog", "fish", "tree", "house"]
WORDS += ["car", "road", "sun", "moon", "rain", "snow", "wind", "fire"]


def _dataset(negatives: bool) -> Any:
    from datasets import Dataset

    cols = {"anchor": [f"a {w} thing" for w in WORDS], "positive": [f"the {w}" for w in WORDS]}
    if negatives:
        cols["negative"] = [f"no {w[::-1]} here" for w in WORDS]
    return Dataset.from_dict(cols)


def _train(
    model_dir: str,
    make_loss: Callable[[SentenceTransformer], nn.Module],
    out_dir: Path,
    negatives: bool = False,
    steps: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 3,
) -> tuple[list[float], SentenceTransformer, SentenceTransformerTrainer]:
    """``steps`` trainer steps (batch 4, seeded); returns each step's loss, the model, the trainer."""
    model = SentenceTransformer(model_dir, device="cpu").to(dtype)
    loss = make_loss(model)
    values: list[float] = []
    loss.register_forward_hook(lambda _m, _i, out: values.append(float(out.item())))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-3,
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=_dataset(negatives), loss=loss
    )
    trainer.train()
    return values, model, trainer


def _assert_same_run(
    a: tuple[list[float], SentenceTransformer, Any], b: tuple[list[float], SentenceTransformer, Any]
) -> None:
    assert len(a[0]) == len(b[0]) > 0
    torch.testing.assert_close(
        torch.tensor(a[0], dtype=torch.float64), torch.tensor(b[0], dtype=torch.float64),
        rtol=1e-10, atol=0.0,
    )  # fmt: skip
    for (name, pa), pb in zip(a[1].named_parameters(), b[1].parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-12, msg=name)


# --- the trainer, step by step -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("negatives", "symmetric"),
    [(False, False), (True, False), (True, True)],
    ids=["pairs", "hard-negatives", "hard-negatives-symmetric"],
)
def test_trainer_steps_equal_matryoshka_mnrl(
    tiny_model_dir: str, tmp_path: Path, negatives: bool, symmetric: bool
) -> None:
    kw: dict[str, Any] = {"scale": 10.0}
    if symmetric:
        kw |= {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    theirs = _train(
        tiny_model_dir,
        lambda m: MatryoshkaLoss(m, MultipleNegativesRankingLoss(m, **kw), DIMS, WEIGHTS),
        tmp_path / "theirs",
        negatives,
    )
    ours = _train(
        tiny_model_dir,
        lambda m: FusedMatryoshkaLoss(m, DIMS, WEIGHTS, **kw),
        tmp_path / "ours",
        negatives,
    )
    _assert_same_run(theirs, ours)
    assert theirs[0][-1] < theirs[0][0]  # it trains


def test_n_dims_per_step_draws_the_same_dims_as_theirs(tiny_model_dir: str, tmp_path: Path) -> None:
    """Both draw ``random.sample`` from Python's RNG, which the trainer seeds: same dims, same run."""
    theirs = _train(
        tiny_model_dir,
        lambda m: MatryoshkaLoss(
            m, MultipleNegativesRankingLoss(m), DIMS, WEIGHTS, n_dims_per_step=2
        ),
        tmp_path / "theirs",
        steps=4,
    )
    loss: list[FusedMatryoshkaLoss] = []

    def make(m: SentenceTransformer) -> nn.Module:
        loss.append(FusedMatryoshkaLoss(m, DIMS, WEIGHTS, n_dims_per_step=2))
        return loss[0]

    ours = _train(tiny_model_dir, make, tmp_path / "ours", steps=4)
    _assert_same_run(theirs, ours)
    assert all(v == v and abs(v) < float("inf") for v in ours[0])
    assert loss[0].last_per_dim is not None
    assert int((loss[0].last_per_dim != 0).sum()) == 2  # two dims trained in the last step


def test_n_dims_per_step_equal_to_len_dims_is_the_all_dims_loss(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    every = _train(tiny_model_dir, lambda m: FusedMatryoshkaLoss(m, DIMS), tmp_path / "a")
    full = _train(
        tiny_model_dir, lambda m: FusedMatryoshkaLoss(m, DIMS, n_dims_per_step=4), tmp_path / "b"
    )
    assert every[0] == full[0]


def test_sample_dims_maps_their_draw_onto_the_ascending_nesting(tiny_model_dir: str) -> None:
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    loss = FusedMatryoshkaLoss(model, DIMS, n_dims_per_step=2)
    assert loss.matryoshka_dims == (384, 128, 32, 8)  # largest first, as theirs
    for seed in range(5):
        random.seed(seed)
        picked = random.sample(range(4), 2)
        random.seed(seed)
        flags = loss.sample_dims()  # over (8, 32, 128, 384)
        assert {(8, 32, 128, 384)[i] for i, f in enumerate(flags) if f} == {
            loss.matryoshka_dims[j] for j in picked
        }


# --- gradient caching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mini_batch_size", "symmetric"),
    [(2, False), (3, False), (3, True)],
    ids=["even-chunks", "uneven-chunks", "symmetric"],
)
def test_gradient_cache_equals_cached_matryoshka_mnrl(
    tiny_model_dir: str, tmp_path: Path, mini_batch_size: int, symmetric: bool
) -> None:
    """Same mini-batches and replayed RNG as CachedMultipleNegativesRankingLoss, so same dropout."""
    kw: dict[str, Any] = {"mini_batch_size": mini_batch_size}
    if symmetric:
        kw |= {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    theirs = _train(
        tiny_model_dir,
        lambda m: MatryoshkaLoss(m, CachedMultipleNegativesRankingLoss(m, **kw), DIMS, WEIGHTS),
        tmp_path / "theirs",
        negatives=True,
    )
    ours = _train(
        tiny_model_dir,
        lambda m: FusedMatryoshkaLoss(m, DIMS, WEIGHTS, **kw),
        tmp_path / "ours",
        negatives=True,
    )
    _assert_same_run(theirs, ours)


def test_gradient_cache_without_dropout_equals_no_cache(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    def no_dropout(loss: nn.Module) -> nn.Module:
        for mod in loss.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        return loss

    plain = _train(
        tiny_model_dir, lambda m: no_dropout(FusedMatryoshkaLoss(m, DIMS)), tmp_path / "a", True
    )
    cached = _train(
        tiny_model_dir,
        lambda m: no_dropout(FusedMatryoshkaLoss(m, DIMS, mini_batch_size=3)),
        tmp_path / "b",
        True,
    )
    _assert_same_run(plain, cached)


# --- saving and the model card -------------------------------------------------------------------


def test_trained_folder_loads_with_plain_sentence_transformer(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    _, model, trainer = _train(
        tiny_model_dir,
        lambda m: FusedMatryoshkaLoss(m, DIMS, n_dims_per_step=2),
        tmp_path / "run",
        negatives=True,
        dtype=torch.float32,
    )
    out = tmp_path / "final"
    trainer.save_model(str(out))
    loaded = SentenceTransformer(str(out), device="cpu")
    texts = ["a red thing", "the moon"]
    model.eval()
    torch.testing.assert_close(
        loaded.encode(texts, convert_to_tensor=True),
        model.encode(texts, convert_to_tensor=True),
        rtol=1e-5,
        atol=1e-6,
    )
    truncated = SentenceTransformer(str(out), device="cpu", truncate_dim=32)
    assert truncated.encode(texts).shape == (2, 32)
    card = (out / "README.md").read_text()
    assert "FusedMatryoshkaLoss" in card
    assert "kusupati2022matryoshka" in card


def test_config_dict_and_citation(tiny_model_dir: str) -> None:
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    loss = FusedMatryoshkaLoss(model, DIMS, WEIGHTS, n_dims_per_step=3, scale=25.0)
    config = loss.get_config_dict()
    assert config["matryoshka_dims"] == (384, 128, 32, 8)
    assert config["matryoshka_weights"] == (2.0, 1.0, 1.0, 0.5)
    assert config["n_dims_per_step"] == 3
    assert config["scale"] == 25.0
    assert config["similarity_fct"] == "cos_sim"
    assert "mini_batch_size" not in config
    assert (
        FusedMatryoshkaLoss(model, DIMS, mini_batch_size=8).get_config_dict()["mini_batch_size"]
        == 8
    )
    assert loss.temperature == pytest.approx(0.04)
    assert "Matryoshka Representation Learning" in loss.citation


# --- the loss alone, on given embeddings --------------------------------------------------------


class _Fixed(nn.Module):
    """A stand-in model: each column's features carry its embeddings under ``"emb"``."""

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self) -> int | None:
        return self.dim

    def _get_untruncated_embedding_dimension(self) -> int | None:
        """What ``MatryoshkaLoss`` asks its model since sentence-transformers 6.3."""
        return self.dim


def _columns(
    n: int, rows: int = 6, dim: int = 24, dtype: torch.dtype = torch.float64
) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, dim, generator=g, dtype=dtype).requires_grad_() for _ in range(n)]


def test_loss_and_gradients_equal_theirs_on_fixed_embeddings() -> None:
    dims, weights = [8, 24, 4, 16], [1.0, 0.5, 2.0, 1.0]
    model = _Fixed(24)
    theirs = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims, weights)  # type: ignore[arg-type]
    ours = FusedMatryoshkaLoss(model, dims, weights)
    cols = _columns(4)  # anchor, positive, two hard negatives
    a = theirs([{"emb": c} for c in cols], None)
    ga = torch.autograd.grad(a, cols)
    b = ours([{"emb": c} for c in cols], None)
    gb = torch.autograd.grad(b, cols)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    assert ours.last_per_dim is not None
    assert ours.last_per_dim.shape == (4,)
    torch.testing.assert_close(ours.last_per_dim.sum(), b.detach())


def test_dims_below_the_embedding_size_leave_the_rest_untrained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _Fixed(24)
    with caplog.at_level("WARNING"):
        ours = FusedMatryoshkaLoss(model, [4, 16])
    assert "does not include the model's embedding dimension 24" in caplog.text
    theirs = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [4, 16])  # type: ignore[arg-type]
    cols = _columns(2)
    a, b = theirs([{"emb": c} for c in cols], None), ours([{"emb": c} for c in cols], None)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    grad = torch.autograd.grad(b, cols[0])[0]
    assert (grad[:, 16:] == 0).all()
    assert (grad[:, :16] != 0).any()


def test_half_precision_embeddings_get_a_float32_loss() -> None:
    model = _Fixed(24)
    loss = FusedMatryoshkaLoss(model, [8, 24])
    cols = _columns(2, dtype=torch.bfloat16)
    out = loss([{"emb": c} for c in cols], None)
    assert out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out, cols[0])
    assert grad.dtype == torch.bfloat16
    assert torch.isfinite(grad.float()).all()
    ref = loss([{"emb": c.detach().float()} for c in cols], None)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-6, atol=1e-6)


# --- user errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matryoshka_dims": []}, r"matryoshka_dims=\[\] must be a non-empty list of positive ints"),
        ({"matryoshka_dims": [8, 0]}, r"matryoshka_dims=\[8, 0\] must be a non-empty list"),
        ({"matryoshka_dims": [8, 8, 24]}, r"matryoshka_dims=\[8, 8, 24\] repeats \[8\]"),
        ({"matryoshka_dims": [8, 32]}, r"contains 32 but the model's embedding dimension is 24"),
        ({"matryoshka_weights": [1.0]}, r"matryoshka_weights=\[1.0\] has 1 entries but"),
        ({"matryoshka_weights": [1.0, -1.0]}, r"matryoshka_weights=\[1.0, -1.0\] must be finite"),
        ({"matryoshka_weights": [0, 0]}, r"matryoshka_weights=\[0, 0\] must be .* positive sum"),
        ({"n_dims_per_step": 0}, r"n_dims_per_step=0 must be -1 \(every dim each step\) or an int in \[1, 2\]"),
        ({"n_dims_per_step": 3}, r"n_dims_per_step=3 must be -1"),
        ({"scale": 0.0}, r"scale=0.0 must be a positive finite float"),
        ({"similarity_fct": dot_score}, r"similarity_fct=dot_score is not supported: .* cosine-only"),
        ({"gather_across_devices": True}, r"gather_across_devices=True is not supported"),
        ({"directions": ("query_to_doc", "query_to_query")}, r"directions=\('query_to_doc', 'query_to_query'\) is not supported"),
        ({"directions": ("query_to_doc", "doc_to_query")}, r"partition_mode='joint' with directions=.* set partition_mode='per_direction'"),
        ({"partition_mode": "both"}, r"partition_mode='both' must be 'joint' or 'per_direction'"),
        ({"hardness_mode": "hard_negatives"}, r"hardness_mode='hard_negatives' is not supported: set hardness_mode=None"),
        ({"hardness_strength": -1.0}, r"hardness_strength=-1.0 must be a float >= 0"),
        ({"mini_batch_size": 0}, r"mini_batch_size=0 must be None \(no gradient caching\) or a positive int"),
        ({"mini_batch_num_tokens": 64}, r"mini_batch_num_tokens=64 needs gradient caching: also set mini_batch_size"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"matryoshka_dims": [8, 24], **kwargs}
    with pytest.raises(ValueError, match=message):
        FusedMatryoshkaLoss(_Fixed(24), **args)


def test_bad_inputs_are_named() -> None:
    loss = FusedMatryoshkaLoss(_Fixed(24), [8, 24])
    cols = _columns(3)
    with pytest.raises(ValueError, match=r"got 1 input column\(s\): .* needs \(anchor, positive\)"):
        loss([{"emb": cols[0]}], None)
    with pytest.raises(
        ValueError,
        match=r"column 2 has embeddings of shape \(4, 24\) but the anchors are \(6, 24\)",
    ):
        loss([{"emb": cols[0]}, {"emb": cols[1]}, {"emb": cols[2][:4]}], None)
    unknown = FusedMatryoshkaLoss(_Fixed(None), [8, 24])  # no embedding dimension to check early
    with pytest.raises(
        ValueError, match=r"embeddings have 16 dims but matryoshka_dims goes up to 24"
    ):
        unknown([{"emb": c[:, :16]} for c in cols], None)
