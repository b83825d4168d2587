"""Funnel retrieval against exact full-size search on >= 100k real vectors, side by side in one run.

    python benchmarks/retrieval.py [--encoder minilm|static] [--pca] [--vectors X.npy]
        [--n-queries 1000] [--k 10] [--threads 1] [--out results/retrieval.json]

Corpus: every WordNet synset definition (117,659); queries: usage examples of 1,000 synsets
(texts that are not in the corpus). ``--encoder minilm`` embeds them with all-MiniLM-L6-v2
(cached by :func:`matryoshka.models.text_encoder.encode_cached`; ~7 min once on an idle 2-core machine);
``--encoder static`` uses the mean of MiniLM's input token embeddings (no transformer layers,
mean-centred: seconds, for a quick run or a machine too busy to encode). ``--vectors X.npy`` uses any cached ``(N, d)`` matrix and holds out its
last ``--n-queries`` rows as queries. ``--pca`` adds a PCA-rotated copy of the same vectors: an
orthogonal rotation (inner products unchanged, so the same reference) whose coordinates are
ordered by variance, a fair way to get nested prefixes from a model that is not
Matryoshka-trained.

Compared in one run: exact full-size flat search (FAISS ``IndexFlatIP``, the reference; and the
torch exact backend), FAISS HNSW at full size, and the funnel with an exact shortlist and with an
HNSW shortlist for several ``(m_s, k')``. Reported: queries/s, recall@k against the reference,
bytes of vectors touched per query, index size and build time. Prints a table, writes JSON and a
PNG (recall vs queries/s).

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
from matryoshka.retrieval.index import FaissIndex, VectorIndex, import_faiss, make_index

TARGET_RECALL, TARGET_SPEEDUP = 0.99, 14.0


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
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    corpus, queries, source = load_vectors(args)
    n, d = corpus.shape
    k, reps = args.k, args.repeats
    print(f"corpus {n} x {d} ({source}); {queries.shape[0]} held-out queries; k={k}")
    spaces = {"raw": (corpus, queries)}
    if args.pca:
        spaces["pca"] = pca_rotate(corpus, queries)
    rows: list[dict[str, Any]] = []

    def add_row(name: str, space: str, ids: np.ndarray, secs: float, **extra: Any) -> None:
        row = {
            "method": name,
            "space": space,
            "qps": queries.shape[0] / secs,
            f"recall@{k}": recall_vs_reference(ids, ref_ids),
            **extra,
        }
        rows.append(row)
        print(
            f"  {space:4s} {name:34s} {row['qps']:9.0f} q/s  recall {row[f'recall@{k}']:.4f}",
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
    hnsw_full, hb = build(
        "faiss-hnsw", d, corpus, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction
    )
    assert isinstance(hnsw_full, FaissIndex)
    for ef in (32, 64, 128):
        hnsw_full.ef_search = ef
        (_, ids), secs = timed(lambda f=hnsw_full.search: f(queries, k), reps)
        visits = hnsw_visits(hnsw_full, queries, k)
        add_row(
            f"HNSW d ef={ef}",
            "raw",
            ids,
            secs,
            bytes_per_query=visits * d * 4,
            index_bytes=hnsw_full.nbytes,
            build_s=hb,
        )
    del hnsw_full

    tmp = tempfile.TemporaryDirectory(prefix="mrl-bench-")
    for space, (xc, xq) in spaces.items():
        # the funnel reranks from a memory-mapped .npy, as deployed (page cache warm after 1st run)
        corpus_path = Path(tmp.name) / f"{space}.npy"
        np.save(corpus_path, xc)
        for m_s in args.shortlist_sizes:
            ex, eb = build("exact", m_s, xc)
            for kp in args.shortlist_ks:
                fr = FunnelRetriever(m_s, kp, index=ex).fit(corpus_path)
                (_, ids), secs = timed(lambda fr=fr, xq=xq: fr.search(xq, k), reps)
                add_row(
                    f"funnel exact m_s={m_s} k'={kp} -> {d}",
                    space,
                    ids,
                    secs,
                    shortlist_size=m_s,
                    shortlist_k=kp,
                    backend="exact",
                    bytes_per_query=n * m_s * 4 + fr.rerank_bytes_per_query(k),
                    index_bytes=ex.nbytes,
                    build_s=eb,
                )
            del ex
        for m_s in args.hnsw_shortlist_sizes:
            hn, hb = build(
                "faiss-hnsw", m_s, xc, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction
            )
            assert isinstance(hn, FaissIndex)
            for kp in args.shortlist_ks:
                hn.ef_search = kp
                fr = FunnelRetriever(m_s, kp, index=hn).fit(corpus_path)
                (_, ids), secs = timed(lambda fr=fr, xq=xq: fr.search(xq, k), reps)
                visits = hnsw_visits(hn, xq, kp)
                add_row(
                    f"funnel HNSW m_s={m_s} k'={kp} -> {d}",
                    space,
                    ids,
                    secs,
                    shortlist_size=m_s,
                    shortlist_k=kp,
                    backend="faiss-hnsw",
                    bytes_per_query=visits * m_s * 4 + fr.rerank_bytes_per_query(k),
                    index_bytes=hn.nbytes,
                    build_s=hb,
                )
            del hn
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
        "target": {"recall": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "rows": rows,
    }


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
                    hnsw_m=args.hnsw_m,
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
        f"{'space':5s} {'method':36s} {'q/s':>9s} {'speedup':>8s} {f'R@{k}':>7s} "
        f"{'KB/query':>10s} {'index MB':>9s} {'build s':>8s}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in res["rows"]:
        print(
            f"{r['space']:5s} {r['method']:36s} {r['qps']:9.0f} {r['speedup']:7.1f}x "
            f"{r[f'recall@{k}']:7.4f} {r['bytes_per_query'] / 1024:10.0f} "
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
    print(
        "Note: MiniLM is not Matryoshka-trained: short prefixes of its raw coordinates make weak "
        "shortlists; 'pca' rows rotate the same vectors so that prefixes are ordered by variance."
    )


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    k = res["k"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in res["rows"]:
        key = r["method"].split(" k'=")[0].split(" ef=")[0].split(" (")[0] + f" [{r['space']}]"
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        style = "s--" if key.endswith("[pca]") else "o-"
        ax.plot([r["qps"] for r in rs], [r[f"recall@{k}"] for r in rs], style, label=key)
    ax.axhline(TARGET_RECALL, color="grey", ls=":", lw=1)
    ax.axvline(
        TARGET_SPEEDUP * res["reference_qps"],
        color="grey",
        ls="--",
        lw=1,
        label=f"{TARGET_SPEEDUP:.0f}x reference",
    )
    ax.set_xscale("log")
    ax.set_xlabel("queries / s")
    ax.set_ylabel(f"recall@{k} vs exact full-size search")
    ax.set_title(f"{res['n_corpus']} x {res['dim']}, {res['threads']} thread(s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``mrl bench retrieval``)."""
    p.add_argument("--vectors", default=None, help="(N, d) .npy; last --n-queries rows = queries")
    p.add_argument("--encoder", choices=["minilm", "static"], default="minilm")
    p.add_argument("--pca", action="store_true", help="also measure PCA-rotated vectors")
    p.add_argument("--n-queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortlist-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--hnsw-shortlist-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--shortlist-ks", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=80)
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
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(res, png)
    print(f"wrote {out} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_and_report(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
