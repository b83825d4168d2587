"""Per-size text evaluation: metrics by hand, a few fine-tuning steps, a whole tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka import Nesting
from matryoshka.data.wordnet import RetrievalTask, Synset, split_synsets
from matryoshka.evaluation.text import TextEvalConfig, format_tables, retrieval_metrics
from matryoshka.losses.contrastive import MatryoshkaContrastiveLoss
from matryoshka.report import validate_results
from tests.markers import needs_text, needs_wordnet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_retrieval_metrics_by_hand() -> None:
    """Three queries, 14 documents in 2-D; every rank below is worked out by hand."""
    docs = [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0), (-1.0, 0.0)] + [(-0.8, 0.6)] * 10
    c = np.array(docs, dtype=np.float32)  # (14, 2), unit rows
    q = np.array([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)], dtype=np.float32)  # (3, 2)
    task = RetrievalTask(
        name="hand",
        queries=("q0", "q1", "q2"),
        corpus=tuple(f"d{i}" for i in range(14)),
        relevant=((1,), (2, 3), (0,)),
        query_ids=("0", "1", "2"),
        corpus_ids=tuple(str(i) for i in range(14)),
    )
    # q0 scores: d0 1, d1 .6, d2 0, fillers -.8, d3 -1      -> relevant d1 at rank 2
    # q1 scores: d2 1, d1 .8, fillers .6, d0 0, d3 0 (tie: lower index first)
    #                                                        -> d2 at rank 1, d3 at rank 14
    # q2 scores: d3 1, fillers .8, d2 0, d1 -.6, d0 -1       -> d0 at rank 14
    ndcg = [1 / math.log2(3), 1 / (1 + 1 / math.log2(3)), 0.0]
    got = retrieval_metrics(task, q, c)
    assert got["ndcg@10"] == pytest.approx(sum(ndcg) / 3)
    assert got["recall@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["recall@100"] == pytest.approx(1.0)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)


@needs_wordnet
@needs_text
def test_finetune_changes_weights_and_lowers_the_loss(wordnet: list[Synset]) -> None:
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.training.text import finetune

    torch.manual_seed(0)
    pairs = split_synsets(wordnet, seed=0, fractions={"train": 0.0001})["train"][:8]
    anchors, positives = [s.definition for s in pairs], [s.lemma_text for s in pairs]
    nesting = Nesting([32, 128, 384])
    loss_fn = MatryoshkaContrastiveLoss(nesting)

    @torch.no_grad()
    def loss_on_pairs(enc: TextEncoder) -> float:
        enc.model.eval()
        return loss_fn(enc.forward(enc.tokenize(anchors)), enc.forward(enc.tokenize(positives)))[
            0
        ].item()

    base = TextEncoder()
    before = [p.detach().clone() for p in base.model.parameters()]
    loss_before = loss_on_pairs(base)
    ft = finetune(base, anchors, positives, nesting, batch_size=4, lr=1e-4, progress=False)
    assert ft.model is not base.model
    changed = [not torch.equal(a, b) for a, b in zip(before, ft.model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2  # 2 steps of AdamW move (nearly) every tensor
    assert all(torch.equal(a, b) for a, b in zip(before, base.model.parameters(), strict=True))
    assert not ft.model.training  # returned ready for encoding
    assert loss_on_pairs(ft) < loss_before - 0.05, (loss_on_pairs(ft), loss_before)
    with pytest.raises(ValueError, match="anchors has 8 texts and positives 7"):
        finetune(base, anchors, positives[:7], nesting)


@needs_wordnet
@needs_text
def test_tiny_wordnet_evaluation_writes_a_report(tmp_path: Path, shared_cache: Path) -> None:
    from matryoshka.evaluation.text import run_wordnet_evaluation

    out, sizes = tmp_path / "out", [32, 384]
    res = run_wordnet_evaluation(
        TextEvalConfig(
            out_dir=str(out),
            sizes=sizes,
            train_fraction=0.0017,  # 200 synsets: 400 rows for the adaptor, more than d = 384
            test_fraction=0.0003,  # 35 synsets
            train_pairs=16,  # one fine-tuning step per variant
            adaptor_epochs=1,
            cache_dir=str(shared_cache),
            ood_test_size=20,  # the out-of-domain check, on 20 docstring pairs
            progress=False,
        )
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert set(saved) == {"task", "sizes", "metrics", "meta"}
    assert saved["sizes"] == sizes
    validate_results(saved)
    methods = {
        "base truncated",
        "base + PCA",
        "base + adaptor",
        "base + adaptor (supervised)",
        "fine-tuned MRL",
        "fine-tuned plain",
    }
    extra = ("ndcg@10, lemmas->definition", "ndcg@10, example->definition")
    for metric in ("ndcg@10", "recall@10", "recall@100", "mrr@10", *extra):
        assert set(saved["metrics"][metric]) == methods
        for values in saved["metrics"][metric].values():
            assert len(values) == len(sizes)
            assert all(0.0 <= v <= 1.0 for v in values)
    probes = saved["metrics"]["lexname probe accuracy"]
    assert set(probes) == methods - {"fine-tuned MRL", "fine-tuned plain"}
    for probe in probes.values():
        assert len(probe) == len(sizes)
        assert all(0.0 <= v <= 1.0 for v in probe)
    # at full size PCA is a rotation of the features: the probe sees the same information
    assert probes["base + PCA"][-1] == pytest.approx(probes["base truncated"][-1], abs=0.06)
    ndcg, r10 = saved["metrics"]["ndcg@10"], saved["metrics"]["recall@10"]
    assert all(
        n <= r + 1e-9 for n, r in zip(ndcg["base truncated"], r10["base truncated"], strict=True)
    )
    # at full size PCA is a rotation: same cosines, same ranking (up to float ties)
    assert ndcg["base + PCA"][-1] == pytest.approx(ndcg["base truncated"][-1], abs=0.02)
    assert ndcg["base truncated"][-1] > 0.3  # MiniLM finds the lemmas of a definition
    meta = saved["meta"]
    assert meta["queries"] == meta["corpus"] == 35
    assert meta["train_pairs"] == 16
    assert set(meta["finetune_s"]) == {"fine-tuned MRL", "fine-tuned plain"}
    md = (out / "report.md").read_text()  # rendered by the evaluation itself
    assert "## ndcg@10" in md
    assert "| fine-tuned MRL |" in md
    assert "| 384 |" in md
    table = format_tables(saved)
    assert table.splitlines()[0] == "ndcg@10"
    assert "base + adaptor" in table


@needs_text
def test_evaluation_rejects_bad_options(tmp_path: Path) -> None:
    from matryoshka.evaluation.text import run_wordnet_evaluation

    with pytest.raises(ValueError, match=r"train_pairs=-1 must be an int >= 0"):
        run_wordnet_evaluation(
            TextEvalConfig(out_dir=str(tmp_path), train_pairs=-1, progress=False)
        )
    with pytest.raises(ValueError, match=r"sizes=\[8, 64\] ends at 64.*make the last size 384"):
        run_wordnet_evaluation(TextEvalConfig(out_dir=str(tmp_path), sizes=[8, 64], progress=False))
    assert not any(tmp_path.iterdir())  # refused before anything is written
