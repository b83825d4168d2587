"""Funnel retrieval against exact full-size search on >= 100k real vectors, side by side in one run.

    python benchmarks/retrieval.py [--encoder minilm|static] [--pca] [--adaptor] [--vectors X.npy] [--tune]
        [--n-queries 1000] [--k 10] [--threads 1] [--out results/retrieval.json]
        [--code-backends binary,sq8,rabitq] [--rerank-dtypes float32 int8]

Corpus: every WordNet synset definition (117,659); queries: usage examples of 1,000 synsets
(texts that are not in the corpus). ``--encoder minilm`` embeds them with all-MiniLM-L6-v2
(cached by :func:`matryoshka.models.text_encoder.encode_cached`; ~7 min once on an idle 2-core machine);
``--encoder static`` uses the mean of MiniLM's input token embeddings (no transformer layers,
mean-centred: seconds, for a quick run or a machine too busy to encode). ``--vectors X.npy`` uses any cached ``(N, d)`` matrix and holds out its
last ``--n-queries`` rows as queries. ``--pca`` adds a PCA-rotated copy of the same vectors: an
orthogonal rotation (inner products unchanged, so the same reference) whose coordinates are
ordered by variance, a fair way to get nested prefixes from a model that is not
Matryoshka-trained.

``--adaptor`` adds a third space: the unsupervised :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor`
fitted on (up to ``--adaptor-rows``) corpus rows, which makes the prefixes nested; it is not a
rotation, so its rows answer a slightly different question, and their recall is still measured
against the reference (exact full-size search of the base vectors). ``--adaptor-orthogonal``
adds the adaptor's rotation-only variant (``MatryoshkaAdaptor(orthogonal=True)``): inner products
unchanged, like PCA, but the rotation is trained so that prefixes keep each row's neighbours.

Compared in one run: exact full-size flat search (FAISS ``IndexFlatIP``, the reference; and the
torch exact backend), FAISS HNSW at full size (``--hnsw-ms`` x ``--ef-searches``), FAISS IVF at full size
(``--ivf-nprobes``), the quantized peers at full size with a float32 rescore of their top ``k'``
(``--code-backends``: ``sq8``, ``binary`` sign codes, ``rabitq``, optionally ``binary-hnsw``;
"X d + rescore"), and the funnel with an exact shortlist, an HNSW graph on the prefix (8-bit
codes, ``sq8-hnsw``, by default; ``--hnsw-shortlist-backends``, ``--hnsw-shortlist-sizes``,
searched at each ``--shortlist-efs`` beam keeping ``k' = min(efSearch, --graph-shortlist-ks)``)
and each quantized shortlist (``--code-shortlist-sizes``) for several ``(m_s, k')``, reranking from the
memory-mapped matrix with precomputed prefix norms (``--rerank-dtypes`` float32, float16, int8).
Reported: queries/s, recall@k against the reference, bytes of vectors touched per query, RAM
bytes per vector (what the method holds in memory: the index, plus the funnel's prefix-norm
factors) and memory-mapped bytes per vector (the rerank matrix read from disk, listed
separately), index size and build time. Prints a table, writes JSON and two PNGs (queries/s vs
recall, and RAM bytes per vector vs recall, the Pareto front of each marked).

The summary compares, at recall@k >= 0.95 and >= 0.99, the fastest funnel with the fastest
peer (every other method but the reference), as ratios of q/s and of RAM bytes per vector.
``--tune`` checks :class:`~matryoshka.retrieval.tuner.FunnelTuner`: tuned on one half of the
queries (backends ``--tune-backends``), its reported recall is compared with its choice's recall
on the other half. ``--scale N1 N2 ...`` re-measures the reference and the best funnel at 0.99 on
random corpus subsets of those sizes (and the whole corpus), so the growth of each with N shows.

``--backends milvus,pgvector`` adds the funnel inside the vector databases (:mod:`matryoshka.retrieval.vectordb`)
for ``--db-shortlist-sizes`` x ``--shortlist-ks``: Milvus Lite on a temp file (or ``--milvus-uri``)
and PostgreSQL + pgvector started with pgserver in a temp folder (or ``--pg-url``). Their build
time is the ingestion (including the HNSW build), their size the bytes on disk, and their
KB/query is not known (nan): the engines do not report the vectors their HNSW search visits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka.ops import truncate_numpy
from matryoshka.retrieval.funnel import FunnelRetriever, recall_vs_reference
from matryoshka.retrieval.index import (
    CODE_BACKENDS,
    EF_CONSTRUCTION,
    HNSW_M,
    FaissIndex,
    VectorIndex,
    add_in_chunks,
    import_faiss,
    make_index,
)
from matryoshka.retrieval.prefixes import PrefixMatrix
from matryoshka.retrieval.tuner import FunnelTuner

TARGET_RECALL, TARGET_SPEEDUP = 0.99, 14.0
#: recall levels of the summary: the best funnel against the best peer at each
LEVELS = (0.95, 0.99)


def wordnet_texts(n_queries: int, seed: int) -> tuple[list[str], list[str]]:
    """Corpus = all synset definitions; queries = first usage example of held-out synsets."""
    from matryoshka.data.wordnet import load_synsets

    synsets = load_synsets()
    with_examples = [i for i, s in enumerate(synsets) if s.examples]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(with_examples), size=n_queries, replace=False)
    queries = [synsets[with_examples[i]].examples[0] for i in picked]
    return [s.definition for s in synsets], queries


def static_minilm(texts: list[str]) -> np.ndarray:
    """Mean of MiniLM's input token embeddings over each text's word pieces: ``(N, 384)``."""
    from matryoshka.models.text_encoder import load_model

    model = load_model()
    table = model[0].auto_model.embeddings.word_embeddings.weight.detach().numpy()  # (V, 384)
    ids = model.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=256)
    lengths = np.array([max(len(t), 1) for t in ids["input_ids"]])
    flat = np.concatenate([t if t else [0] for t in ids["input_ids"]])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = np.add.reduceat(table[flat], starts, axis=0) / lengths[:, None]
    return truncate_numpy(out.astype(np.float32), out.shape[1], normalize=True)


def load_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """``(N, d)`` corpus, ``(Q, d)`` held-out queries and a description of where they come from."""
    if args.vectors:
        x = np.load(args.vectors).astype(np.float32)
        return x[: -args.n_queries], x[-args.n_queries :], f"{args.vectors} (last rows = queries)"
    corpus, queries = wordnet_texts(args.n_queries, args.seed)
    if args.encoder == "static":
        x = static_minilm(corpus + queries)
        # Token-embedding means are highly anisotropic (all cosines near 1), which breaks graph
        # indexes; removing the corpus mean and renormalising is the standard fix.
        x = truncate_numpy(x - x[: len(corpus)].mean(0), x.shape[1], normalize=True)
        desc = (
            "WordNet definitions / examples, MiniLM static token-embedding means (no transformer "
            "layers), mean-centred"
        )
        return x[: len(corpus)], x[len(corpus) :], desc
    from matryoshka.models.text_encoder import encode_cached

    xc = encode_cached(corpus, key="wordnet/all/definitions")
    xq = encode_cached(queries, key=f"wordnet/examples/{args.n_queries}/seed{args.seed}")
    return xc, xq, "WordNet definitions / examples, all-MiniLM-L6-v2 sentence embeddings"


def pca_rotate(corpus: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by the corpus' principal axes (uncentred, so inner products are unchanged)."""
    cov = corpus.T.astype(np.float64) @ corpus.astype(np.float64) / corpus.shape[0]  # (d, d)
    _, vecs = np.linalg.eigh(cov)
    rot = vecs[:, ::-1].astype(np.float32)  # columns by decreasing variance
    return corpus @ rot, queries @ rot


def adaptor_space(
    corpus: np.ndarray, queries: np.ndarray, args: argparse.Namespace, orthogonal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and queries mapped by the unsupervised Matryoshka adaptor fitted on corpus rows
    (``orthogonal``: its rotation-only variant, which keeps every full-size inner product)."""
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    d = corpus.shape[1]
    sizes = [m for m in (8, 16, 32, 64, 128, 256, 512, 1024) if m < d] + [d]
    rows = np.random.default_rng(args.seed).permutation(corpus.shape[0])[: args.adaptor_rows]
    adaptor = MatryoshkaAdaptor(
        Nesting(sizes),
        epochs=args.adaptor_epochs,
        seed=args.seed,
        progress=False,
        orthogonal=orthogonal,
        lr=3e-3 if orthogonal else 1e-3,
    )
    adaptor.fit(corpus[np.sort(rows)])
    # unnormalised: every prefix is normalised by the indexes and the funnel themselves
    return adaptor.transform(corpus, normalize=False), adaptor.transform(queries, normalize=False)


def model_space(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The corpus and queries embedded by ``--model`` (a sentence-transformers folder, e.g. the
    Matryoshka fine-tuned or self-distilled MiniLM that ``mrl train`` writes), unit norm, cached
    like the base vectors."""
    from matryoshka.models.text_encoder import TextEncoder, encode_cached

    if args.vectors or args.encoder != "minilm":
        raise SystemExit(
            f"--model {args.model} embeds the WordNet texts itself: drop --vectors and use "
            "--encoder minilm (the reference is then the base MiniLM on the same texts)."
        )
    if not Path(args.model).is_dir():
        raise SystemExit(
            f"--model {args.model} is not a folder: pass a sentence-transformers model folder, "
            "e.g. runs/text-distill/model."
        )
    enc = TextEncoder(args.model)
    corpus, queries = wordnet_texts(args.n_queries, args.seed)
    xc = encode_cached(corpus, enc, key="wordnet/all/definitions")
    xq = encode_cached(queries, enc, key=f"wordnet/examples/{args.n_queries}/seed{args.seed}")
    return xc, xq


def pareto(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points not dominated by another (``x`` and ``y`` both higher is better),
    sorted by ``x``."""
    order = sorted(range(len(xs)), key=lambda i: (-xs[i], -ys[i]))
    front, best_y = [], -float("inf")
    for i in order:
        if ys[i] > best_y:
            front.append(i)
            best_y = ys[i]
    return sorted(front, key=lambda i: xs[i])


def timed(fn: Any, repeats: int) -> tuple[Any, float]:
    """Best-of-``repeats`` wall time of ``fn()`` and its result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def build(backend: str, m: int, corpus: np.ndarray, **params: Any) -> tuple[VectorIndex, float]:
    t0 = time.perf_counter()
    index = make_index(backend, m, model_name="bench", **params).add(corpus)
    return index, time.perf_counter() - t0


def hnsw_visits(index: VectorIndex, queries: np.ndarray, k: int) -> float:
    """Distance computations per query of a FAISS HNSW search (its vectors touched)."""
    faiss = import_faiss()
    faiss.cvar.hnsw_stats.reset()
    index.search(queries, k)
    return float(faiss.cvar.hnsw_stats.ndis) / queries.shape[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant; returns the JSON-ready results."""
    corpus, queries, source = load_vectors(args)  # encoding (once, cached) uses every core
    torch.set_num_threads(args.threads)  # the timed part runs on --threads
    import_faiss().omp_set_num_threads(args.threads)
    n, d = corpus.shape
    k, reps = args.k, args.repeats
    print(f"corpus {n} x {d} ({source}); {queries.shape[0]} held-out queries; k={k}")
    spaces = {"raw": (corpus, queries)}
    if args.pca:
        spaces["pca"] = pca_rotate(corpus, queries)
    if args.adaptor:
        spaces["adaptor"] = adaptor_space(corpus, queries, args)
    if args.adaptor_orthogonal:
        spaces["rotation"] = adaptor_space(corpus, queries, args, orthogonal=True)
    if args.model:
        spaces["model"] = model_space(args)
    rows: list[dict[str, Any]] = []
    # A trained model's rows are scored against its own exact full-size search (what its user
    # deploys); every other space against the base vectors' (same texts, same question).
    own_refs: dict[str, np.ndarray] = {}

    def add_row(name: str, space: str, ids: np.ndarray, secs: float, **extra: Any) -> None:
        row = {
            "method": name,
            "space": space,
            "qps": queries.shape[0] / secs,
            f"recall@{k}": recall_vs_reference(ids, own_refs.get(space, ref_ids)),
            "reference": "own full size" if space in own_refs else "base full size",
            **extra,
        }
        # RAM: what the method holds in memory; mapped: files read through a memory map
        row.setdefault("ram_bytes_per_vector", row["index_bytes"] / n)
        row.setdefault("mmap_bytes_per_vector", 0.0)
        rows.append(row)
        print(
            f"  {space:7s} {name:40s} {row['qps']:9.0f} q/s  recall {row[f'recall@{k}']:.4f}",
            flush=True,
        )

    ref_index, ref_build = build("faiss-flat", d, corpus)
    (_, ref_ids), ref_secs = timed(lambda: ref_index.search(queries, k), reps)
    add_row(
        "exact flat d (FAISS, reference)",
        "raw",
        ref_ids,
        ref_secs,
        bytes_per_query=n * d * 4,
        index_bytes=ref_index.nbytes,
        build_s=ref_build,
    )
    ex_index, ex_build = build("exact", d, corpus)
    (_, ids), secs = timed(lambda f=ex_index.search: f(queries, k), reps)
    add_row(
        "exact flat d (torch)",
        "raw",
        ids,
        secs,
        bytes_per_query=n * d * 4,
        index_bytes=ex_index.nbytes,
        build_s=ex_build,
    )
    del ex_index

    def hnsw_peers(space: str, xc: np.ndarray, xq: np.ndarray) -> None:
        """Full-size HNSW graphs of every ``--hnsw-ms`` at every ``--ef-searches``."""
        for hnsw_m in args.hnsw_ms:
            hnsw_full, hb = build(
                "faiss-hnsw", d, xc, hnsw_m=hnsw_m, ef_construction=args.ef_construction
            )
            assert isinstance(hnsw_full, FaissIndex)
            for ef in args.ef_searches:
                hnsw_full.ef_search = ef
                (_, ids), secs = timed(lambda f=hnsw_full.search: f(xq, k), reps)
                visits = hnsw_visits(hnsw_full, xq, k)
                add_row(
                    f"HNSW{hnsw_m} d ef={ef}",
                    space,
                    ids,
                    secs,
                    backend="faiss-hnsw",
                    hnsw_m=hnsw_m,
                    ef_search=ef,
                    bytes_per_query=visits * d * 4,
                    index_bytes=hnsw_full.nbytes,
                    build_s=hb,
                )
            del hnsw_full

    hnsw_peers("raw", corpus, queries)
    if args.ivf_nprobes:
        t0 = time.perf_counter()
        ivf = add_in_chunks(make_index("faiss-ivf", d, model_name="bench"), corpus)
        ivf_build = time.perf_counter() - t0
        assert isinstance(ivf, FaissIndex)
        for nprobe in args.ivf_nprobes:
            ivf.nprobe = nprobe
            (_, ids), secs = timed(lambda f=ivf.search: f(queries, k), reps)
            add_row(
                f"IVF d nlist={ivf.nlist} nprobe={nprobe}",
                "raw",
                ids,
                secs,
                bytes_per_query=n * min(nprobe, ivf.nlist or 1) / (ivf.nlist or 1) * d * 4,
                index_bytes=ivf.nbytes,
                build_s=ivf_build,
            )
        del ivf
    if "model" in spaces:
        xc, xq = spaces["model"]
        own, own_build = build("faiss-flat", d, xc)
        (_, own_ids), own_secs = timed(lambda: own.search(xq, k), reps)
        add_row(  # how far the model's full-size top k is from the base model's
            "exact flat d (FAISS), model vs base",
            "model",
            own_ids,
            own_secs,
            bytes_per_query=n * d * 4,
            index_bytes=own.nbytes,
            build_s=own_build,
        )
        own_refs["model"] = own_ids
        del own
        hnsw_peers("model", xc, xq)  # the peer its user would run: HNSW on its full vectors

    tmp = tempfile.TemporaryDirectory(prefix="mrl-bench-")
    for space, (xc, xq) in spaces.items():
        # the funnel reranks from a memory-mapped .npy, as deployed (page cache warm after 1st run)
        corpus_path = Path(tmp.name) / f"{space}.npy"
        np.save(corpus_path, xc)
        flat = [("exact", "exact", m) for m in args.shortlist_sizes]
        flat += [("faiss-flat", "FAISS flat", m) for m in args.faiss_flat_shortlist_sizes]
        for backend, label, m_s in flat:
            ex, eb = build(backend, m_s, xc)
            for kp in args.shortlist_ks:
                fr = FunnelRetriever(m_s, kp, index=ex).fit(corpus_path)
                (_, ids), secs = timed(lambda fr=fr, xq=xq: fr.search(xq, k), reps)
                add_row(
                    f"funnel {label} m_s={m_s} k'={kp} -> {d}",
                    space,
                    ids,
                    secs,
                    shortlist_size=m_s,
                    shortlist_k=kp,
                    backend=backend,
                    bytes_per_query=n * m_s * 4 + fr.rerank_bytes_per_query(k),
                    index_bytes=ex.nbytes,
                    build_s=eb,
                    ram_bytes_per_vector=fr.nbytes / n,
                    mmap_bytes_per_vector=fr.mapped_bytes / n,
                )
            del ex
        graphs = [b for b in args.hnsw_shortlist_backends.split(",") if b]
        for backend, m_s in [(b, m) for b in graphs for m in args.hnsw_shortlist_sizes]:
            hn, hb = build(
                backend,
                m_s,
                xc,
                hnsw_m=args.shortlist_hnsw_m,
                ef_construction=args.ef_construction,
            )
            label = {"faiss-hnsw": "HNSW", "sq8-hnsw": "HNSW-SQ8"}.get(backend, backend)
            label += f" M={args.shortlist_hnsw_m}"
            code_bytes = m_s * (1 if backend.startswith("sq8") else 4)
            # the beam (efSearch) and the candidates kept for the rerank (k') are set apart
            for ef in args.shortlist_efs:
                for kp in sorted({min(ef, c) for c in args.graph_shortlist_ks}):
                    hn.ef_search = ef  # type: ignore[attr-defined]
                    fr = FunnelRetriever(m_s, kp, index=hn).fit(corpus_path)
                    (_, ids), secs = timed(lambda fr=fr, xq=xq: fr.search(xq, k), reps)
                    visits = hnsw_visits(hn, xq, kp)
                    add_row(
                        f"funnel {label} m_s={m_s} ef={ef} k'={kp} -> {d}",
                        space,
                        ids,
                        secs,
                        shortlist_size=m_s,
                        shortlist_k=kp,
                        ef_search=ef,
                        hnsw_m=args.shortlist_hnsw_m,
                        backend=backend,
                        bytes_per_query=visits * code_bytes + fr.rerank_bytes_per_query(k),
                        index_bytes=hn.nbytes,
                        build_s=hb,
                        ram_bytes_per_vector=fr.nbytes / n,
                        mmap_bytes_per_vector=fr.mapped_bytes / n,
                    )
            del hn
        bench_codes(args, space, xc, xq, corpus_path, Path(tmp.name), k, add_row)
    tmp.cleanup()
    for backend in [b for b in args.backends.split(",") if b]:
        bench_database(backend, args, spaces, k, add_row)
    # The floor of any exact shortlist: selecting the top k' of N scores per query, whatever m_s.
    rand_scores = torch.randn(queries.shape[0], n)  # (Q, N)
    _, sel_secs = timed(lambda s=rand_scores: torch.topk(s, 100, dim=1), reps)
    ref_qps = rows[0]["qps"]
    for r in rows:
        r["speedup"] = r["qps"] / ref_qps
    ok = [r for r in rows[1:] if r[f"recall@{k}"] >= TARGET_RECALL]
    best = max(ok, key=lambda r: r["qps"]) if ok else None
    ok_funnel = [r for r in ok if r["method"].startswith("funnel")]
    best_funnel = max(ok_funnel, key=lambda r: r["qps"]) if ok_funnel else None
    levels = [level_summary(rows, k, level) for level in LEVELS]
    tuner = tune_check(args, spaces, k) if args.tune else []
    scale = scale_curve(args, spaces, best_funnel, k) if args.scale and best_funnel else []
    return {
        "source": source,
        "n_corpus": n,
        "dim": d,
        "n_queries": int(queries.shape[0]),
        "k": k,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "reference_qps": ref_qps,
        "topk_selection_qps": queries.shape[0] / sel_secs,
        "best_at_target": best,
        "best_funnel_at_target": best_funnel,
        "levels": levels,
        "tuner": tuner,
        "scale": scale,
        "target": {"recall": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "rows": rows,
    }


def level_summary(rows: list[dict[str, Any]], k: int, level: float) -> dict[str, Any]:
    """The fastest funnel and the fastest peer (any other method but the reference) reaching
    recall@k >= ``level``, and the funnel's q/s and RAM as ratios of the peer's."""
    ok = [r for r in rows[1:] if r[f"recall@{k}"] >= level]
    funnels = [r for r in ok if r["method"].startswith("funnel")]
    peers = [r for r in ok if not r["method"].startswith("funnel")]
    funnel = max(funnels, key=lambda r: r["qps"]) if funnels else None
    peer = max(peers, key=lambda r: r["qps"]) if peers else None
    both = funnel is not None and peer is not None
    return {
        "recall": level,
        "funnel": funnel,
        "peer": peer,
        "qps_ratio": funnel["qps"] / peer["qps"] if both else None,  # type: ignore[index]
        "ram_ratio": (
            funnel["ram_bytes_per_vector"] / peer["ram_bytes_per_vector"] if both else None  # type: ignore[index]
        ),
    }


def tune_check(
    args: argparse.Namespace, spaces: dict[str, tuple[np.ndarray, np.ndarray]], k: int
) -> list[dict[str, Any]]:
    """The tuner keeps its word: tuned on one half of the queries, its reported recall is
    compared with the chosen funnel's recall on the other half (real queries, none a corpus
    row). In the adaptor space both are measured against that space's own full-size search."""
    out = []
    for space, (xc, xq) in spaces.items():
        half = xq.shape[0] // 2
        for target in LEVELS:
            tuner = FunnelTuner(
                target,
                k,
                shortlist_sizes=[m for m in args.shortlist_sizes if m < xc.shape[1]],
                shortlist_ks=args.shortlist_ks,
                backends=[b for b in args.tune_backends.split(",") if b],
                repeats=args.repeats,
            ).fit(xc, xq[:half], validation_queries=xq[half:])
            assert tuner.validation_recall_ is not None
            row = {
                "space": space,
                "target": target,
                "chosen": tuner.best_params_,
                "reported_recall": tuner.best_recall_,
                "validation_recall": tuner.validation_recall_,
                "gap": tuner.best_recall_ - tuner.validation_recall_,
                "target_met": tuner.target_met_,
            }
            out.append(row)
            print(
                f"  tuner {space:7s} target {target}: reported {row['reported_recall']:.4f} on "
                f"{half} queries, measured {row['validation_recall']:.4f} on {xq.shape[0] - half} "
                f"others (gap {row['gap']:+.4f})",
                flush=True,
            )
    return out


def scale_curve(
    args: argparse.Namespace,
    spaces: dict[str, tuple[np.ndarray, np.ndarray]],
    best_funnel: dict[str, Any],
    k: int,
) -> list[dict[str, Any]]:
    """q/s of the reference (flat) and of the best funnel's configuration on random subsets of
    the corpus of ``--scale`` sizes (and the whole corpus), each against exact search of that
    subset, so each method's growth with N shows."""
    xc, xq = spaces[best_funnel["space"]]
    own = best_funnel.get("reference") == "own full size"
    raw_c, raw_q = (xc, xq) if own else spaces["raw"]  # the rows' reference
    n = xc.shape[0]
    m_s, kp = best_funnel["shortlist_size"], best_funnel["shortlist_k"]
    backend = best_funnel["backend"]
    rng = np.random.default_rng(args.seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="mrl-scale-") as tmp:
        for size in sorted({*(s for s in args.scale if s < n), n}):
            rows = np.sort(rng.permutation(n)[:size])
            ref, _ = build("faiss-flat", raw_c.shape[1], raw_c[rows])
            (_, ref_ids), ref_secs = timed(lambda ref=ref: ref.search(raw_q, k), args.repeats)
            del ref
            path = Path(tmp) / f"{size}.npy"
            np.save(path, xc[rows])
            params = (
                {
                    "ef_search": best_funnel.get("ef_search", kp),
                    "hnsw_m": best_funnel.get("hnsw_m", HNSW_M),
                    "ef_construction": args.ef_construction,
                }
                if "hnsw" in backend
                else {}
            )
            index, build_s = build(backend, m_s, xc[rows], **params)
            fr = FunnelRetriever(m_s, kp, index=index).fit(path)
            (_, ids), secs = timed(lambda fr=fr: fr.search(xq, k), args.repeats)
            row = {
                "n": int(size),
                "reference_qps": raw_q.shape[0] / ref_secs,
                "funnel_qps": xq.shape[0] / secs,
                "funnel_recall": recall_vs_reference(ids, ref_ids),
                "funnel_build_s": build_s,
            }
            row["speedup"] = row["funnel_qps"] / row["reference_qps"]
            out.append(row)
            print(
                f"  scale N={size:7d}: flat {row['reference_qps']:8.0f} q/s, funnel "
                f"{row['funnel_qps']:8.0f} q/s ({row['speedup']:.2f}x), recall "
                f"{row['funnel_recall']:.4f}",
                flush=True,
            )
            del index, fr
    return out


def bench_codes(
    args: argparse.Namespace,
    space: str,
    xc: np.ndarray,
    xq: np.ndarray,
    corpus_path: Path,
    tmp: Path,
    k: int,
    add_row: Any,
) -> None:
    """The quantized backends in one space: at full size with a rescore of their top ``k'``
    (the usual "SQ8 / binary / RaBitQ + rescore" peers), and as funnel shortlists at
    ``--code-shortlist-sizes``; each reranks from the memory-mapped matrix of every
    ``--rerank-dtypes`` (float32 is the corpus file itself; others are written once)."""
    backends = [b for b in args.code_backends.split(",") if b]
    unknown = [b for b in backends if b not in CODE_BACKENDS]
    if unknown:
        raise SystemExit(f"--code-backends: {unknown} not in {list(CODE_BACKENDS)}")
    n, d = xc.shape
    mapped = np.load(corpus_path, mmap_mode="r")
    matrices: dict[str, tuple[PrefixMatrix, float]] = {}
    for dtype in args.rerank_dtypes:
        t0 = time.perf_counter()
        path = None if dtype == "float32" else tmp / f"{space}.{dtype}.npy"
        pm = PrefixMatrix.build(mapped, (d,), dtype=dtype, path=path)
        matrices[dtype] = (pm, time.perf_counter() - t0)
    sizes = sorted({d, *(m for m in args.code_shortlist_sizes if m < d)})
    for backend in backends:
        for m_s in sizes:
            params: dict[str, Any] = {"ef_search": 64} if backend == "binary-hnsw" else {}
            t0 = time.perf_counter()
            index = add_in_chunks(make_index(backend, m_s, model_name="bench", **params), xc)
            index_build = time.perf_counter() - t0
            # a flat code scan reads every code once per query; the HNSW visits are not counted
            scan = float(index.nbytes) if backend != "binary-hnsw" else float("nan")
            for dtype, (pm, pm_build) in matrices.items():
                tag = "" if dtype == "float32" else f" [{dtype}]"
                for kp in args.shortlist_ks:
                    if backend == "binary-hnsw":
                        index.ef_search = kp  # type: ignore[attr-defined]
                    fr = FunnelRetriever(m_s, kp, index=index, prefixes=pm).fit(mapped)
                    (_, ids), secs = timed(lambda fr=fr, xq=xq: fr.search(xq, k), args.repeats)
                    name = (
                        f"{backend} d + rescore k'={kp}{tag}"
                        if m_s == d
                        else f"funnel {backend} m_s={m_s} k'={kp} -> {d}{tag}"
                    )
                    add_row(
                        name,
                        space,
                        ids,
                        secs,
                        shortlist_size=m_s,
                        shortlist_k=kp,
                        backend=backend,
                        rerank_dtype=dtype,
                        bytes_per_query=scan + fr.rerank_bytes_per_query(k),
                        index_bytes=index.nbytes,
                        build_s=index_build + pm_build,
                        ram_bytes_per_vector=fr.nbytes / n,
                        mmap_bytes_per_vector=fr.mapped_bytes / n,
                    )
            del index


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def bench_database(
    backend: str,
    args: argparse.Namespace,
    spaces: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    add_row: Any,
) -> None:
    """Funnel inside Milvus (Lite) or PostgreSQL + pgvector: ingest, then search each ``k'``."""
    from matryoshka.retrieval.vectordb import open_vectordb

    if backend not in ("milvus", "pgvector"):
        raise SystemExit(f"--backends: {backend!r} is not 'milvus' or 'pgvector'")
    tmp = Path(tempfile.mkdtemp(prefix=f"mrl-bench-{backend}-"))
    server = None
    if backend == "pgvector":
        uri = args.pg_url
        if uri is None:
            import pgserver

            server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
            uri = server.get_uri()
    else:
        uri = args.milvus_uri or str(tmp / "corpus.db")
    try:
        for space, (xc, xq) in spaces.items():
            d = xc.shape[1]
            for m_s in args.db_shortlist_sizes:
                name = f"bench_{space}_{m_s}"
                store = open_vectordb(
                    backend, uri, name, dim=d, shortlist_size=m_s, model_name="bench"
                )
                store.drop()
                store.close()
                store = open_vectordb(
                    backend,
                    uri,
                    name,
                    dim=d,
                    shortlist_size=m_s,
                    model_name="bench",
                    hnsw_m=HNSW_M,
                    ef_construction=args.ef_construction,
                )
                t0 = time.perf_counter()
                store.add(xc)
                build_s = time.perf_counter() - t0
                # pgvector: table + indexes; Milvus Lite: the .db folder (0 for a server)
                size = int(getattr(store, "nbytes", 0)) or _disk_bytes(Path(uri))
                for kp in args.shortlist_ks:
                    store.shortlist_k, store.ef_search = kp, kp
                    store.search(xq[:10], k)  # warm up
                    (_, ids), secs = timed(lambda s=store, xq=xq: s.search(xq, k), args.db_repeats)
                    add_row(
                        f"{backend} m_s={m_s} k'={kp} -> {d}",
                        space,
                        ids,
                        secs,
                        shortlist_size=m_s,
                        shortlist_k=kp,
                        backend=backend,
                        bytes_per_query=float("nan"),
                        index_bytes=size,
                        build_s=build_s,
                    )
                store.drop()
                store.close()
    finally:
        if server is not None:
            server.cleanup()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def print_table(res: dict[str, Any]) -> None:
    k = res["k"]
    head = (
        f"{'space':7s} {'method':44s} {'q/s':>9s} {'speedup':>8s} {f'R@{k}':>7s} "
        f"{'KB/query':>10s} {'RAM B/vec':>9s} {'mmap B/v':>8s} {'index MB':>9s} {'build s':>8s}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in res["rows"]:
        print(
            f"{r['space']:7s} {r['method']:44s} {r['qps']:9.0f} {r['speedup']:7.1f}x "
            f"{r[f'recall@{k}']:7.4f} {r['bytes_per_query'] / 1024:10.0f} "
            f"{r['ram_bytes_per_vector']:9.1f} {r['mmap_bytes_per_vector']:8.0f} "
            f"{r['index_bytes'] / 2**20:9.1f} {r['build_s']:8.1f}"
        )
    n, d = res["n_corpus"], res["dim"]
    print(
        f"\nA full scan touches 4·d·N = {4 * d * n / 2**20:.0f} MiB per query if unbatched; "
        f"batched, the reference reads the corpus once per query batch, so its cost is the "
        f"2·d·N = {2 * d * n / 1e6:.0f} MFLOP per query of the matmul, not bandwidth."
    )
    sel = res["topk_selection_qps"]
    print(
        f"Selecting the top 100 of N={n} scores alone (torch.topk) runs at {sel:.0f} q/s = "
        f"{sel / res['reference_qps']:.1f}x the reference: an upper bound for any exact shortlist."
    )
    for label, key in (("any method", "best_at_target"), ("funnel", "best_funnel_at_target")):
        best = res[key]
        if best is None:
            print(f"Fastest {label} at recall@{k} >= {TARGET_RECALL}: none reached it.")
            continue
        verdict = "reached" if best["speedup"] >= TARGET_SPEEDUP else "NOT reached"
        print(
            f"Fastest {label} at recall@{k} >= {TARGET_RECALL}: {best['space']} {best['method']}:"
            f" {best['speedup']:.2f}x the reference (target {TARGET_SPEEDUP:.0f}x: {verdict})."
        )
    for lv in res.get("levels", []):
        f, p = lv["funnel"], lv["peer"]
        if f is None or p is None:
            print(
                f"At recall@{k} >= {lv['recall']}: funnel {f and f['method']}, peer {p and p['method']}."
            )
            continue
        print(
            f"At recall@{k} >= {lv['recall']}: best funnel {f['space']} {f['method']} "
            f"({f['qps']:.0f} q/s, {f['ram_bytes_per_vector']:.0f} B/vec) vs best peer {p['space']} "
            f"{p['method']} ({p['qps']:.0f} q/s, {p['ram_bytes_per_vector']:.0f} B/vec): "
            f"{lv['qps_ratio']:.2f}x its q/s at {lv['ram_ratio']:.2f}x its RAM."
        )
    for t in res.get("tuner", []):
        c = t["chosen"]
        print(
            f"Tuner {t['space']} target {t['target']}: chose {c['backend']} m_s={c['shortlist_size']}"
            f" k'={c['shortlist_k']} -> {c['rerank']}; reported {t['reported_recall']:.4f}, "
            f"measured on disjoint queries {t['validation_recall']:.4f} (gap {t['gap']:+.4f})."
        )
    for sc in res.get("scale", []):
        print(
            f"Scale N={sc['n']}: flat {sc['reference_qps']:.0f} q/s, best funnel "
            f"{sc['funnel_qps']:.0f} q/s ({sc['speedup']:.2f}x), recall {sc['funnel_recall']:.4f}."
        )
    print(
        "Note: MiniLM is not Matryoshka-trained: short prefixes of its raw coordinates make weak "
        "shortlists; 'pca' rows rotate the same vectors so that prefixes are ordered by variance."
    )


def _group(r: dict[str, Any]) -> str:
    """The curve a row belongs to: its method without the swept parameter, plus its space."""
    key = r["method"].split(" k'=")[0].split(" ef=")[0].split(" nprobe=")[0].split(" (")[0]
    dtype = r.get("rerank_dtype", "float32")
    return key + ("" if dtype == "float32" else f" {dtype}") + f" [{r['space']}]"


def plot(res: dict[str, Any], path: Path) -> None:
    """Two PNGs: queries/s vs recall at ``path``, RAM bytes per vector vs recall next to it
    (``<stem>.ram.png``); each with its Pareto front (black line) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res["k"]
    rows = res["rows"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    recall = [r[f"recall@{k}"] for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, label, better_high, out in (
        ("qps", "queries / s", True, path),
        (
            "ram_bytes_per_vector",
            "RAM bytes / vector (memory-mapped rerank matrix not counted)",
            False,
            path.with_suffix(".ram.png"),
        ),
    ):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for name, rs in groups.items():
            style = {"[pca]": "s--", "[adaptor]": "^:", "[rotation]": "d-."}.get(
                name[name.rfind("[") :], "o-"
            )
            rs = sorted(rs, key=lambda r: r[key])  # a graph's (efSearch, k') pairs interleave
            ax.plot([r[key] for r in rs], [r[f"recall@{k}"] for r in rs], style, ms=4, label=name)
        xs = [r[key] if better_high else -r[key] for r in rows]
        front = pareto(xs, recall)
        ax.plot(
            [rows[i][key] for i in front],
            [recall[i] for i in front],
            "k-",
            lw=2,
            alpha=0.5,
            drawstyle="steps-post" if not better_high else "steps-pre",
            label="Pareto front",
        )
        ax.scatter(
            [rows[i][key] for i in front],
            [recall[i] for i in front],
            s=60,
            facecolors="none",
            edgecolors="k",
            zorder=5,
        )
        ax.axhline(TARGET_RECALL, color="grey", ls=":", lw=1)
        if key == "qps":
            ax.axvline(
                TARGET_SPEEDUP * res["reference_qps"],
                color="grey",
                ls="--",
                lw=1,
                label=f"{TARGET_SPEEDUP:.0f}x reference",
            )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"recall@{k} vs exact full-size search")
        ax.set_title(f"{res['n_corpus']} x {res['dim']}, {res['threads']} thread(s)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``mrl bench retrieval``)."""
    p.add_argument("--vectors", default=None, help="(N, d) .npy; last --n-queries rows = queries")
    p.add_argument("--encoder", choices=["minilm", "static"], default="minilm")
    p.add_argument("--pca", action="store_true", help="also measure PCA-rotated vectors")
    p.add_argument(
        "--adaptor", action="store_true", help="also measure the unsupervised MatryoshkaAdaptor"
    )
    p.add_argument(
        "--adaptor-orthogonal",
        action="store_true",
        help="also measure the adaptor's rotation-only variant (full-size inner products kept)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="also measure a trained model's space (a sentence-transformers folder, e.g. the "
        "self-distilled MiniLM), scored against its own exact full-size search",
    )
    p.add_argument("--adaptor-rows", type=int, default=20000, help="corpus rows it is fitted on")
    p.add_argument("--adaptor-epochs", type=int, default=8)
    p.add_argument("--n-queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortlist-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--hnsw-shortlist-sizes", type=int, nargs="+", default=[128, 160, 192])
    p.add_argument(
        "--hnsw-shortlist-backends",
        default="sq8-hnsw",
        help="graph shortlists on the prefix: 8-bit codes (sq8-hnsw) and/or float32 (faiss-hnsw)",
    )
    p.add_argument(
        "--shortlist-hnsw-m", type=int, default=16, help="graph degree M of the prefix graphs"
    )
    p.add_argument(
        "--shortlist-efs",
        type=int,
        nargs="+",
        default=[48, 64, 96, 128, 160, 200, 256],
        help="efSearch of the prefix graphs",
    )
    p.add_argument(
        "--graph-shortlist-ks",
        type=int,
        nargs="+",
        default=[50, 100],
        help="k' kept from a prefix graph's beam for the rerank (capped at efSearch)",
    )
    p.add_argument(
        "--faiss-flat-shortlist-sizes",
        type=int,
        nargs="*",
        default=[64, 128],
        help="exact shortlists scanned by FAISS IndexFlatIP instead of torch (none: skip)",
    )
    p.add_argument("--shortlist-ks", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument(
        "--hnsw-ms",
        type=int,
        nargs="+",
        default=[16, HNSW_M],
        help="graph degrees M of the full-size HNSW peers (the library's default and 16)",
    )
    p.add_argument(
        "--ef-searches", type=int, nargs="+", default=[32, 48, 64, 96, 128, 200, 256, 512]
    )
    p.add_argument(
        "--ivf-nprobes", type=int, nargs="*", default=[8, 32, 128], help="none: skip IVF"
    )
    p.add_argument(
        "--code-backends",
        default="binary,sq8,rabitq",
        help=f"quantized peers and funnel shortlists, from {','.join(CODE_BACKENDS)} ('': none)",
    )
    p.add_argument("--code-shortlist-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument(
        "--rerank-dtypes",
        nargs="+",
        choices=["float32", "float16", "int8"],
        default=["float32"],
        help="storage of the memory-mapped rerank matrix of the quantized rows",
    )
    p.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION)
    p.add_argument(
        "--tune",
        action="store_true",
        help="check the tuner: tune on half the queries, measure its choice on the other half",
    )
    p.add_argument("--tune-backends", default="exact,binary", help="shortlist backends it tries")
    p.add_argument(
        "--scale",
        type=int,
        nargs="*",
        default=[10000, 30000],
        help="corpus sizes of the scale curve (none: skip)",
    )
    p.add_argument("--backends", default="", help="vector databases to add, e.g. milvus,pgvector")
    p.add_argument("--db-shortlist-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--db-repeats", type=int, default=1, help="timed runs per database setting")
    p.add_argument("--milvus-uri", default=None, help="Milvus URI (default: Lite on a temp file)")
    p.add_argument(
        "--pg-url", default=None, help="PostgreSQL URL (default: pgserver in a temp dir)"
    )
    p.add_argument("--out", default="results/retrieval.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")


def run_and_report(args: argparse.Namespace) -> int:
    """Run, print the table, write JSON and PNG; the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args)
    k, rows = res["k"], res["rows"]
    for key, sign in (("qps", 1.0), ("ram_bytes_per_vector", -1.0)):
        front = set(pareto([sign * r[key] for r in rows], [r[f"recall@{k}"] for r in rows]))
        for i, r in enumerate(rows):
            r[f"pareto_{key}"] = i in front
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(res, png)
    print(f"wrote {out}, {png} and {png.with_suffix('.ram.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_and_report(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
