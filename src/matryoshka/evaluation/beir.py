"""Per-size retrieval of a text run on a BEIR folder: ``mrl eval --run RUN --beir FOLDER``.

For each prefix size of the run's ladder, nDCG@10, recall@100 and MRR@10 of cosine search over
the whole corpus, for four models:

* ``base truncated``: the run's base model, its embeddings cut to the size;
* ``base + PCA``: the base embeddings rotated by an uncentred PCA fitted on the corpus;
* ``base + adaptor``: the base embeddings through a
  :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` fitted (unsupervised) on the corpus;
* ``fine-tuned``: the run's own model (``RUN/model``), truncated.

Besides :data:`BEIR_METRICS`, ``meta["per_size"]`` gives every method :data:`RELATIVE` (its
nDCG@10 over the base model's full-size one: what forgetting or truncation costs) and
:data:`FUNNEL` (a shortlist of 200 at each size reranked at the method's full size, against its
own exact top 10), one value per size.

The metrics come from ``pytrec_eval`` (trec_eval's own code: graded nDCG, the qrels' relevant
documents as recall's denominator, queries averaged over the split's judged queries), fed the
ranking this module computes; :func:`ir_metrics` is that step alone. The results have the layout
of every text report: ``{"task", "sizes", "metrics": {metric: {method: [per size]}}, "meta"}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.data.beir import BeirData, load_beir
from matryoshka.evaluation.metrics import top_k_indices
from matryoshka.ops import truncate_numpy

__all__ = ["BEIR_METRICS", "FUNNEL", "RELATIVE", "evaluate_beir", "ir_metrics", "rank_corpus"]

#: The metrics reported per size, in table order.
BEIR_METRICS = ("ndcg@10", "recall@100", "mrr@10")
#: nDCG@10 divided by the base model's full-size nDCG@10 (what each method keeps of it).
RELATIVE = "ndcg@10 / base full size"
#: Recall@10 of a funnel (shortlist of 200 at the size, rerank at the method's full size)
#: against the same method's exact full-size search.
FUNNEL = "funnel recall@10 (shortlist at size, k'=200)"
#: A map of full-size embeddings ``(N, d)`` to size ``m``: ``(N, d), m -> (N, m)``, unit rows.
Transform = Callable[[np.ndarray, int], np.ndarray]
_CHUNK = 256  # queries scored at a time: (256, N) float32 scores


def _pytrec_eval() -> Any:
    try:
        import pytrec_eval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mrl eval --beir computes its metrics with pytrec_eval: install it with "
            "`pip install pytrec-eval-terrier`."
        ) from e
    return pytrec_eval


def rank_corpus(q: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most cosine-similar documents per query, best first: ``(Q, m), (N, m) -> (Q, k)``
    indices into the corpus (unit rows in; ties go to the lower index). Scored ``256`` queries at
    a time, so memory is ``256 x N`` floats."""
    k = min(k, c.shape[0])
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], _CHUNK):
        out[s : s + _CHUNK] = top_k_indices(q[s : s + _CHUNK] @ c.T, k)
    return out


def ir_metrics(
    qrels: Mapping[str, Mapping[str, int]], ranked: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """nDCG@10, recall@100 and MRR@10 of the rankings ``ranked[qid]`` (document ids, best first,
    at least 100 where the corpus has them), averaged over the queries of ``qrels``.

    Computed by ``pytrec_eval``; each ranking is handed over with scores ``len - rank`` so that
    trec_eval keeps exactly this order (it would otherwise break score ties by document id). A
    query of ``qrels`` missing from ``ranked`` counts as 0.
    """
    pytrec_eval = _pytrec_eval()
    judged = {q: dict(d) for q, d in qrels.items()}

    def run(depth: int) -> dict[str, dict[str, float]]:
        return {
            q: {doc: float(depth - r) for r, doc in enumerate(list(ranked[q])[:depth])}
            for q in judged
            if q in ranked and len(ranked[q]) > 0
        }

    full = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.100"}).evaluate(run(100))
    top10 = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(run(10))
    n = len(judged)
    if n == 0:
        raise ValueError("qrels is empty: pass at least one query with a relevant document.")
    return {
        "ndcg@10": sum(v["ndcg_cut_10"] for v in full.values()) / n,
        "recall@100": sum(v["recall_100"] for v in full.values()) / n,
        "mrr@10": sum(v["recip_rank"] for v in top10.values()) / n,
    }


def _scores(data: BeirData, q: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """Metrics of cosine search with queries ``(Q, m)`` over the corpus ``(N, m)``."""
    idx = rank_corpus(q, c, 100)
    ranked = {
        qid: [data.corpus_ids[i] for i in row] for qid, row in zip(data.query_ids, idx, strict=True)
    }
    return ir_metrics(data.qrels, ranked)


def evaluate_beir(
    run: str | Path,
    folder: str | Path,
    split: str = "test",
    cache_dir: str | Path | None = None,
    adaptor_epochs: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the text run ``run`` (a folder of ``mrl train``) on the ``split`` of the BEIR folder
    ``folder``: every metric of :data:`BEIR_METRICS` at every size of the run's ladder for the
    base model truncated, + PCA, + the unsupervised adaptor (both fitted on the corpus
    embeddings) and the fine-tuned model.

    ``cache_dir`` (default: the run's) caches the embeddings, keyed by the weights and the texts.
    Returns the results dict (values in [0, 1], one per size).
    """
    from matryoshka.evaluation.text import fit_pca, funnel_recall, read_text_run
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.models.text_encoder import TextEncoder, encode_cached
    from matryoshka.nesting import Nesting
    from matryoshka.training.text import TextTrainConfig

    if (
        isinstance(adaptor_epochs, bool)
        or not isinstance(adaptor_epochs, int)
        or adaptor_epochs < 1
    ):
        raise ValueError(f"adaptor_epochs={adaptor_epochs!r} must be an int >= 1, e.g. 6.")
    t0 = time.time()
    run_folder, meta = read_text_run(run)
    config = TextTrainConfig.from_dict(meta["config"])
    data = load_beir(folder, split)
    nesting = Nesting(list(config.sizes))
    cache = Path(cache_dir if cache_dir is not None else config.cache_dir)
    base = TextEncoder(meta.get("base_model_path") or config.model, name=config.model)
    tuned = TextEncoder(str(run_folder / "model"), name=f"{run_folder.name}-fine-tuned")
    key = f"beir/{data.name}"

    def embed(enc: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
        q = encode_cached(data.queries, enc, cache, f"{key}/{split}/queries", progress=progress)
        c = encode_cached(data.corpus, enc, cache, f"{key}/corpus", progress=progress)
        return q, c  # (Q, d), (N, d)

    base_q, base_c = embed(base)
    t_fit = time.time()
    adaptor = MatryoshkaAdaptor(
        nesting, epochs=adaptor_epochs, seed=config.seed, progress=progress
    ).fit(base_c)
    adaptor_s = time.time() - t_fit
    tuned_q, tuned_c = embed(tuned)
    methods: dict[str, tuple[np.ndarray, np.ndarray, Transform]] = {
        "base truncated": (base_q, base_c, _truncate),
        "base + PCA": (base_q, base_c, fit_pca(base_c)),
        "base + adaptor": (base_q, base_c, lambda e, m: adaptor.transform(e, dim=m)),
        "fine-tuned": (tuned_q, tuned_c, _truncate),
    }
    metrics: dict[str, dict[str, list[float]]] = {name: {} for name in BEIR_METRICS}
    extra: dict[str, dict[str, list[float]]] = {RELATIVE: {}, FUNNEL: {}}
    for label, (q, c, fn) in methods.items():
        qf, cf = fn(q, nesting.dim), fn(c, nesting.dim)
        for m in nesting:
            qm, cm = fn(q, m), fn(c, m)
            for metric, value in _scores(data, qm, cm).items():
                metrics[metric].setdefault(label, []).append(round(value, 6))
            extra[FUNNEL].setdefault(label, []).append(round(funnel_recall(qm, cm, qf, cf), 6))
    base_full = metrics["ndcg@10"]["base truncated"][-1]
    for label, values in metrics["ndcg@10"].items():
        extra[RELATIVE][label] = [round(v / base_full, 6) if base_full > 0 else 0.0 for v in values]
    return {
        "task": f"BEIR {data.name} retrieval ({split} split)",
        "sizes": list(nesting.sizes),
        "metrics": metrics,
        "meta": {
            "run": str(run_folder),
            "beir": str(folder),
            "split": split,
            "queries": len(data.queries),
            "corpus": len(data.corpus),
            "base_model": config.model or "all-MiniLM-L6-v2",
            "metrics_library": "pytrec_eval",
            "fits": "PCA and adaptor fitted on the base model's corpus embeddings",
            "adaptor_epochs": adaptor_epochs,
            "adaptor_fit_s": round(adaptor_s, 1),
            "total_s": round(time.time() - t0, 1),
            "train": {
                k: meta[k]
                for k in ("loss", "data", "objective", "train_pairs", "train_texts")
                if k in meta
            },
            "per_size": extra,
        },
    }


def _truncate(e: np.ndarray, m: int) -> np.ndarray:
    return truncate_numpy(e, m, True)
