"""CLI subcommands for text embeddings: ``mrl embed``, ``mrl adaptor fit``, ``mrl text-eval``.
:func:`register` adds them to the ``mrl`` parser.

    mrl embed --input texts.txt --dim 64 --out emb.npy          # one text per line
    mrl embed --wordnet definitions --dim 64 --adaptor adaptor --out defs-64.npy
    mrl adaptor fit --wordnet definitions --fraction 0.05 --sizes 16 32 64 128 384 --out adaptor
    mrl adaptor fit --embeddings X.npy --sizes 16 32 64 128 384 --out adaptor
    mrl adaptor fit --embeddings X.npy --queries Q.npy --documents D.npy --reg 0.5 \
        --sizes 16 32 64 128 384 --out adaptor                 # supervised on matching pairs
    mrl adaptor fit --beir data/scifact --sizes 16 64 384 --out adaptor     # a BEIR corpus
    mrl adaptor fit --pairs pairs.jsonl --columns query doc --supervised --reg 0.5 \
        --sizes 16 64 384 --out adaptor          # the pairs of `mrl train` (data:, columns:)
    mrl text-eval --config configs/text_wordnet.yaml --train-pairs 500

Sharded embedding of a large corpus (each process or machine writes its own shard; no process
group is needed), then one merge:

    mrl embed --input corpus.txt --dim 64 --shard 0/3 --out shards/   # ... 1/3, 2/3 elsewhere
    torchrun --nproc-per-node 4 -m matryoshka.cli embed --input corpus.txt --dim 64 \
        --shard auto --out shards/                       # shard = $RANK of $WORLD_SIZE
    mrl embed-merge shards/ --out corpus.npy             # checks, writes shards/manifest.json
    mrl index build corpus.npy --dim 64 --out corpus-64.index

Shard ``I`` of ``N`` embeds the contiguous block of rows ``[I*n//N, (I+1)*n//N)`` of the ``n``
texts (every process reads the same source, so all options but ``--shard`` must be the same);
the shard files and the checks of the merge are :mod:`matryoshka.embed.shards`.

``embed`` writes an ``(N, dim)`` float32 ``.npy`` and a JSON sidecar beside it (model, size,
count, source). Encodings of the full vectors are cached on disk (``--cache-dir``), so
re-running with another ``--dim`` or adaptor does not re-encode. ``text-eval`` takes the fields
of :class:`~matryoshka.evaluation.text.TextEvalConfig` as flags and/or a YAML recipe (flags
override the recipe). This module only reads arguments and calls the library.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.cli.args import (
    UsageError,
    add_dataclass_arguments,
    add_deprecated_alias,
    fail,
    overrides,
)
from matryoshka.data.wordnet import WORDNET_FIELDS, wordnet_texts
from matryoshka.embed.shards import merge_shards, parse_shard, shard_rows, write_shard
from matryoshka.evaluation.text import TextEvalConfig

__all__ = [
    "add_arguments",
    "cmd_adaptor_fit",
    "cmd_embed",
    "cmd_embed_merge",
    "cmd_text_eval",
]


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--input {path!r} does not exist: pass a text file, one text per line.")
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise UsageError(
                f"--input {path!r} line {i} is empty: put one non-empty text on every line "
                "(row i of the output is line i)."
            )
    if not lines:
        raise UsageError(f"--input {path!r} is empty: put one text per line.")
    return lines


def _check_source(args: argparse.Namespace) -> None:
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise UsageError(f"--fraction {args.fraction} must be in (0, 1], e.g. 0.05.")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be a positive int.")


def _pair_texts(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """``--pairs``: (every text of the pairs, the anchors, the positives), read as `mrl train`
    reads ``data:`` (:func:`~matryoshka.data.pairs.load_pairs`, ``--columns``)."""
    from matryoshka.data.pairs import load_pairs

    ds = load_pairs(args.pairs, args.columns, what="--pairs")
    columns = [list(ds[c]) for c in ds.column_names]
    return [t for col in columns for t in col], columns[0], columns[1]


def _source_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """The texts to embed and a label of where they came from."""
    if args.input is not None:
        texts = _read_lines(args.input)
        label = f"file:{args.input}"
    elif getattr(args, "pairs", None) is not None:
        texts = _pair_texts(args)[0]
        label = f"pairs:{args.pairs}:columns={args.columns}"
    elif getattr(args, "beir", None) is not None:
        from matryoshka.data.beir import load_beir

        texts = list(load_beir(args.beir, args.split).corpus)
        label = f"beir:{args.beir}:corpus"
    else:
        texts = wordnet_texts(args.wordnet, args.wordnet_root, args.fraction, args.seed)
        label = f"wordnet:{args.wordnet}:fraction={args.fraction}:seed={args.seed}"
    if args.limit is not None:
        texts, label = texts[: args.limit], f"{label}:limit={args.limit}"
    if not texts:
        raise UsageError(f"{label} has no texts: choose another source or a larger --fraction.")
    return texts, label


def _encode(
    args: argparse.Namespace, texts: list[str], label: str, encoder: Any, batch_size: int = 64
) -> np.ndarray:
    """Full-size unit-norm embeddings ``(N, d)``, through the on-disk cache unless disabled."""
    from matryoshka.models.text_encoder import encode_cached

    if args.no_cache:
        out: np.ndarray = encoder.encode(texts, batch_size=batch_size, progress=args.progress)
        return out
    return encode_cached(
        texts,
        encoder,
        cache_dir=args.cache_dir,
        key=f"cli/{label}",
        batch_size=batch_size,
        progress=args.progress,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    """``mrl embed``: texts -> ``(N, dim)`` float32 ``.npy`` + JSON sidecar; returns 0, or 2
    with a message on stderr for bad input."""
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.ops import truncate_numpy

    try:
        _check_source(args)
        if args.dim is not None and args.dim < 1:
            raise UsageError(f"--dim {args.dim} must be a positive int, e.g. 64.")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size} must be a positive int, e.g. 64.")
        out = Path(args.out)
        shard = None if args.shard is None else parse_shard(args.shard)
        if shard is not None:
            if out.suffix == ".npy" or out.is_file():
                raise UsageError(
                    f"--out {args.out!r}: with --shard, --out is a folder for the shard files "
                    "(e.g. --out shards/); merge them with `mrl embed-merge shards/ --out X.npy`."
                )
        elif out.suffix != ".npy":
            raise UsageError(f"--out {args.out!r} must end in .npy, e.g. emb.npy.")
        adaptor = MatryoshkaAdaptor.load(args.adaptor) if args.adaptor else None
        texts, label = _source_texts(args)
        encoder = TextEncoder(args.model)
        d = encoder.dim
        dim = d if args.dim is None else args.dim
        if dim > d:
            raise UsageError(
                f"--dim {dim} is larger than {encoder.name}'s {d} dimensions: pass --dim "
                f"between 1 and {d}."
            )
        if adaptor is not None and adaptor.nesting.dim != d:
            raise UsageError(
                f"--adaptor {args.adaptor!r} was fitted on {adaptor.nesting.dim}-d embeddings but "
                f"{encoder.name} makes {d}-d ones: fit an adaptor on this model's embeddings."
            )
        all_texts, start, stop = texts, 0, len(texts)
        if shard is not None:
            start, stop = shard_rows(len(texts), *shard)
            texts = texts[start:stop]
        if texts:
            cache_label = label if shard is None else f"{label}:rows={start}-{stop}"
            full = _encode(args, texts, cache_label, encoder, args.batch_size)  # (N, d), unit
            if adaptor is not None:
                full = adaptor.transform(full, normalize=False)  # (N, d), nested
            emb = truncate_numpy(full, dim, normalize=args.normalize)  # (N, dim)
        else:  # a shard of more shards than rows: an empty block, nothing to encode
            emb = np.zeros((0, dim), dtype=np.float32)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e))
    if shard is not None:
        path = write_shard(
            out, shard, (start, stop), all_texts, label, encoder, emb, args.normalize, args.adaptor
        )
        print(
            f"wrote {path} (shard {shard[0]} of {shard[1]}: rows {start}:{stop} of "
            f"{len(all_texts)}, {emb.shape[0]} x {emb.shape[1]}, {encoder.name}) and "
            f"{path.with_suffix('.json')}"
        )
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb)
    meta = {
        "model": encoder.name,
        "size": dim,
        "full_size": d,
        "count": int(emb.shape[0]),
        "dtype": str(emb.dtype),
        "normalized": bool(args.normalize),
        "adaptor": str(args.adaptor) if args.adaptor else None,
        "source": label,
    }
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=2))
    print(f"wrote {out} ({emb.shape[0]} x {dim}, {encoder.name}) and {sidecar}")
    return 0


def cmd_embed_merge(args: argparse.Namespace) -> int:
    """``mrl embed-merge FOLDER --out X.npy``: check and merge the shards of ``mrl embed
    --shard``, write the manifest; returns 0, or 2 with a message naming the shard and the fix."""
    try:
        manifest = merge_shards(args.folder, args.out, args.manifest)
    except (UsageError, ValueError, OSError) as e:
        return fail(str(e))
    rows, size = manifest["merged"]["shape"]
    where = args.manifest or Path(args.folder) / "manifest.json"
    print(
        f"wrote {args.out} ({rows} x {size}, {manifest['model']}, {manifest['num_shards']} "
        f"shards) and {where}"
    )
    return 0


def _load_embeddings(path: str, flag: str = "--embeddings") -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"{flag} {path!r} does not exist: pass an (N, d) float .npy (e.g. from "
            "`mrl embed` without --dim)."
        )
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"{flag} {path!r} is not a NumPy .npy array ({e}).") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise UsageError(
            f"{flag} {path!r} holds a {arr.dtype} array of shape {arr.shape}: pass an "
            "(N, d) float matrix."
        )
    return np.asarray(arr, dtype=np.float32)


def _load_pairs(
    args: argparse.Namespace, encoder: Any = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``--queries`` and ``--documents`` (row i of each a matching pair), the encoded anchors and
    positives of ``--pairs`` with ``--supervised``, or None."""
    if getattr(args, "supervised", False):
        if args.pairs is None or encoder is None:
            raise UsageError(
                "--supervised fits on the (anchor, positive) pairs of --pairs: pass --pairs FILE "
                "(or --queries Q.npy --documents D.npy without --supervised)."
            )
        if args.queries is not None or args.documents is not None:
            raise UsageError(
                "--supervised takes its pairs from --pairs: drop --queries and --documents."
            )
        _, anchors, positives = _pair_texts(args)
        label = f"pairs:{args.pairs}:columns={args.columns}"
        return (
            _encode(args, anchors, f"{label}:anchors", encoder),
            _encode(args, positives, f"{label}:positives", encoder),
        )
    if (args.queries is None) != (args.documents is None):
        raise UsageError(
            "--queries and --documents go together: pass both (.npy files of matching rows) "
            "for the supervised fit, or neither."
        )
    if args.queries is None:
        return None
    return _load_embeddings(args.queries, "--queries"), _load_embeddings(
        args.documents, "--documents"
    )


def cmd_adaptor_fit(args: argparse.Namespace) -> int:
    """``mrl adaptor fit``: fit a :class:`~matryoshka.models.adaptor.MatryoshkaAdaptor` on cached or
    given embeddings ``(N, d)`` and save it (safetensors + JSON); returns 0, or 2 on bad input."""
    from matryoshka.models.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    try:
        _check_source(args)
        try:
            nesting = Nesting(args.sizes)
        except ValueError as e:
            raise UsageError(f"--sizes: {e}") from None
        encoder: Any = None
        if args.embeddings is not None:
            x = _load_embeddings(args.embeddings)
            source = str(args.embeddings)
        else:
            from matryoshka.models.text_encoder import TextEncoder

            texts, source = _source_texts(args)
            encoder = TextEncoder(args.model)
            if encoder.dim != nesting.dim:  # before encoding, which takes minutes
                raise UsageError(
                    f"--sizes {args.sizes} ends at {nesting.dim} but {encoder.name} makes "
                    f"{encoder.dim}-d embeddings: make the last size {encoder.dim}."
                )
            x = _encode(args, texts, source, encoder)
        n, d = x.shape
        if d != nesting.dim:
            raise UsageError(
                f"--sizes {args.sizes} ends at {nesting.dim} but the embeddings have {d} "
                f"dimensions: make the last size {d}."
            )
        if n < d:
            raise UsageError(
                f"{source} gives {n} embeddings of {d} dimensions: fit the adaptor on at least "
                f"{d} (its starting rotation is a PCA of them); use more texts."
            )
        pairs = _load_pairs(args, encoder)
        adaptor = MatryoshkaAdaptor(
            nesting,
            hidden=args.hidden,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            reg=args.reg,
            seed=args.seed,
            progress=args.progress,
            orthogonal=args.orthogonal,
        )
        if pairs is None:
            adaptor.fit(x)
        else:
            adaptor.fit(x, queries=pairs[0], documents=pairs[1])
        path = adaptor.save(args.out)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e))
    print(
        f"wrote {path} and {path.with_suffix('.json')}: sizes {list(nesting)}, fitted on {n} "
        f"embeddings ({source}); loss {adaptor.history_[0]:.4f} -> {adaptor.history_[-1]:.4f}"
    )
    return 0


def _text_eval_config(args: argparse.Namespace) -> TextEvalConfig:
    from matryoshka.config import load_recipe, load_yaml

    data = (
        load_yaml(args.config, "text-eval options, e.g. train_pairs: 2000") if args.config else {}
    )
    return load_recipe(TextEvalConfig, args.config, overrides(args, TextEvalConfig), data=data)


def cmd_text_eval(args: argparse.Namespace) -> int:
    """``mrl text-eval``: the per-size WordNet evaluation; writes results.json + report."""
    from matryoshka.evaluation.text import format_tables, run_wordnet_evaluation

    try:
        config = _text_eval_config(args)
        results = run_wordnet_evaluation(config)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return fail(str(e))
    print(format_tables(results))
    print(f"wrote {Path(config.out_dir) / 'results.json'} ({results['meta']['total_s']} s)")
    return 0


def _add_source_arguments(p: argparse.ArgumentParser, other: str) -> None:
    """``--input`` (embed) or ``--embeddings`` (adaptor fit), or ``--wordnet``, + shared options."""
    src = p.add_mutually_exclusive_group(required=True)
    if other == "input":
        src.add_argument("--input", default=None, help="text file, one text per line")
    else:
        src.add_argument("--embeddings", default=None, help="(N, d) float .npy, full size")
        src.add_argument(
            "--pairs",
            default=None,
            help="every text of a pairs file, as mrl train's data: (.jsonl/.csv/.parquet or a "
            "save_to_disk folder)",
        )
        src.add_argument(
            "--beir", default=None, metavar="FOLDER", help="the corpus of a BEIR folder"
        )
        p.add_argument(
            "--columns",
            nargs="+",
            default=None,
            help="with --pairs: the columns (anchor, positive[, negative...]), as mrl train's",
        )
        p.add_argument(
            "--split", default="test", help="with --beir: the qrels split the folder must have"
        )
        p.add_argument(
            "--supervised",
            action="store_true",
            help="with --pairs: also fit on its (anchor, positive) pairs (see --reg)",
        )
        p.set_defaults(input=None)
    src.add_argument(
        "--wordnet",
        choices=WORDNET_FIELDS,
        default=None,
        help="encode every synset's definition, lemma list or usage examples",
    )
    p.add_argument("--wordnet-root", default="/usr/share/wordnet", help="WordNet data folder")
    p.add_argument(
        "--fraction", type=float, default=1.0, help="seeded share of synsets (0.05: ~5.9k)"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    p.add_argument("--seed", type=int, default=0, help="seed of --fraction (and the fit)")
    p.add_argument("--model", default=None, help="sentence-transformers model (default MiniLM)")
    p.add_argument("--cache-dir", default=".cache/embeddings", help="embedding cache folder")
    p.add_argument("--no-cache", action="store_true", help="encode without the disk cache")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )
    add_deprecated_alias(p, "--quiet", "--no-progress", dest="progress", const=False)


def _add_embed(p: argparse.ArgumentParser) -> None:
    _add_source_arguments(p, "input")
    p.add_argument("--dim", type=int, default=None, help="prefix size m (default: the full d)")
    p.add_argument("--adaptor", default=None, help="fitted MatryoshkaAdaptor (stem or file)")
    p.add_argument("--out", required=True, help="output .npy; a .json sidecar is written beside")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="unit-norm prefixes (for cosine / inner-product search)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="I/N: embed only block I (0-based) of N contiguous row blocks into the folder "
        "--out (shard-0000I-of-0000N.npy + .json); 'auto': I, N = $RANK, $WORLD_SIZE (torchrun)",
    )
    p.set_defaults(func=cmd_embed)


def _add_embed_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of shard-*-of-*.npy/.json written by mrl embed --shard")
    p.add_argument("--out", required=True, help="merged (n, dim) .npy; a .json sidecar beside")
    p.add_argument("--manifest", default=None, help="manifest path (default: FOLDER/manifest.json)")
    p.set_defaults(func=cmd_embed_merge)


def _add_adaptor(p_ad: argparse.ArgumentParser) -> None:
    ad_sub = p_ad.add_subparsers(dest="adaptor_command", required=True)
    p = ad_sub.add_parser("fit", help="fit an adaptor on cached or given embeddings")
    _add_source_arguments(p, "embeddings")
    p.add_argument(
        "--sizes", type=int, nargs="+", required=True, help="prefix sizes, the last one = d"
    )
    p.add_argument("--out", required=True, help="stem: writes OUT.safetensors and OUT.json")
    p.add_argument("--epochs", type=int, default=8, help="passes over the embeddings")
    p.add_argument("--hidden", type=int, default=512, help="width of the residual MLP")
    p.add_argument("--batch-size", type=int, default=512, help="embeddings per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--reg", type=float, default=0.0, help="weight pulling the map towards its PCA start"
    )
    p.add_argument(
        "--orthogonal",
        action="store_true",
        help="learn a rotation only: full-size cosines stay the base model's (for funnels)",
    )
    p.add_argument("--queries", default=None, help="supervised: (P, d) .npy of query embeddings")
    p.add_argument(
        "--documents", default=None, help="supervised: (P, d) .npy, row i matches query i"
    )
    p.set_defaults(func=cmd_adaptor_fit)


def _add_text_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe of text-eval options")
    add_dataclass_arguments(p, TextEvalConfig)
    p.set_defaults(func=cmd_text_eval)


_ADDERS = {
    "embed": _add_embed,
    "embed-merge": _add_embed_merge,
    "adaptor": _add_adaptor,
    "text-eval": _add_text_eval,
}


def add_arguments(command: str, parser: argparse.ArgumentParser, rest: Sequence[str] = ()) -> None:
    """Fill the parser of ``command`` (``embed``, ``embed-merge``, ``adaptor``, ``text-eval``)."""
    _ADDERS[command](parser)
