"""CLI subcommands for text embeddings: ``mrl embed``, ``mrl adaptor fit``, ``mrl text-eval``.
:func:`register` adds them to the ``mrl`` parser.

    mrl embed --input texts.txt --dim 64 --out emb.npy          # one text per line
    mrl embed --wordnet definitions --dim 64 --adaptor adaptor --out defs-64.npy
    mrl adaptor fit --wordnet definitions --fraction 0.05 --sizes 16 32 64 128 384 --out adaptor
    mrl adaptor fit --embeddings X.npy --sizes 16 32 64 128 384 --out adaptor
    mrl text-eval --config configs/text_wordnet.yaml --train-pairs 500

``embed`` writes an ``(N, dim)`` float32 ``.npy`` and a JSON sidecar beside it (model, size,
count, source). Encodings of the full vectors are cached on disk (``--cache-dir``), so
re-running with another ``--dim`` or adaptor does not re-encode. ``text-eval`` takes the fields
of :class:`TextEvalConfig` as flags and/or a YAML recipe (flags override the recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.cli import add_dataclass_arguments

__all__ = [
    "WORDNET_FIELDS",
    "TextEvalConfig",
    "cmd_adaptor_fit",
    "cmd_embed",
    "cmd_text_eval",
    "register",
    "wordnet_texts",
]

#: What ``--wordnet`` can embed: every synset's definition, lemma list, or usage examples.
WORDNET_FIELDS = ("definitions", "lemmas", "examples")


class _UsageError(ValueError):
    """A bad option or input: reported as ``mrl: error: ...`` with exit status 2."""


def _fail(message: str) -> int:
    print(f"mrl: error: {message}", file=sys.stderr)
    return 2


@dataclass
class TextEvalConfig:
    """Options of the WordNet text evaluation (:func:`matryoshka.text_eval.run_wordnet_evaluation`).

    Validated on construction; :meth:`from_dict` reads a YAML recipe's mapping.
    """

    out_dir: str = field(
        default="results/text_wordnet",
        metadata={"help": "folder for results.json and the report"},
    )
    sizes: list[int] = field(
        default_factory=lambda: [8, 16, 32, 64, 128, 256, 384],
        metadata={"help": "prefix sizes, increasing, the last one the model's dimension (384)"},
    )
    train_fraction: float = field(
        default=0.05,
        metadata={"help": "share of synsets for fitting PCA, adaptor, probe and fine-tuning"},
    )
    test_fraction: float = field(
        default=0.02, metadata={"help": "share of synsets held out for retrieval and the probe"}
    )
    train_pairs: int = field(
        default=2000,
        metadata={"help": "(definition, lemmas) pairs to fine-tune on; 0 skips fine-tuning"},
    )
    adaptor_epochs: int = field(default=6, metadata={"help": "epochs of the adaptor fit"})
    seed: int = field(default=0, metadata={"help": "seed of the split, sampling and training"})
    cache_dir: str = field(default=".cache/embeddings", metadata={"help": "embedding cache folder"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        from matryoshka.nesting import Nesting

        Nesting(list(self.sizes))  # raises naming sizes= and the fix
        for name in ("train_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(
                    f"{name}={value!r} must be a share of the synsets in (0, 1], e.g. 0.05."
                )
        if self.train_fraction + self.test_fraction > 1:
            raise ValueError(
                f"train_fraction={self.train_fraction} + test_fraction={self.test_fraction} > 1: "
                "the splits must not overlap; make them sum to at most 1."
            )
        for name, low in (("train_pairs", 0), ("adaptor_epochs", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEvalConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys are an error naming them."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown text-eval option(s) {unknown}: the valid keys are {known}.")
        return cls(**data)


def wordnet_texts(
    what: str,
    root: str | Path = "/usr/share/wordnet",
    fraction: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
) -> list[str]:
    """Texts from WordNet: ``what`` of a seeded share ``fraction`` of the synsets (file order),
    at most ``limit`` of them. ``examples`` yields every usage example of those synsets."""
    from matryoshka.data.wordnet import load_synsets, split_synsets

    if what not in WORDNET_FIELDS:
        raise _UsageError(
            f"what={what!r} (--wordnet) is not one of {list(WORDNET_FIELDS)}: pick one of them."
        )
    synsets = load_synsets(root)
    if fraction != 1.0:
        synsets = split_synsets(synsets, seed, {"subset": fraction})["subset"]
    if what == "definitions":
        texts = [s.definition for s in synsets]
    elif what == "lemmas":
        texts = [s.lemma_text for s in synsets]
    else:
        texts = [e for s in synsets for e in s.examples]
    return texts if limit is None else texts[:limit]


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise _UsageError(f"--input {path!r} does not exist: pass a text file, one text per line.")
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise _UsageError(
                f"--input {path!r} line {i} is empty: put one non-empty text on every line "
                "(row i of the output is line i)."
            )
    if not lines:
        raise _UsageError(f"--input {path!r} is empty: put one text per line.")
    return lines


def _check_source(args: argparse.Namespace) -> None:
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise _UsageError(f"--fraction {args.fraction} must be in (0, 1], e.g. 0.05.")
    if args.limit is not None and args.limit < 1:
        raise _UsageError(f"--limit {args.limit} must be a positive int.")


def _source_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """The texts to embed and a label of where they came from."""
    if args.input is not None:
        texts = _read_lines(args.input)
        label = f"file:{args.input}"
    else:
        texts = wordnet_texts(args.wordnet, args.wordnet_root, args.fraction, args.seed)
        label = f"wordnet:{args.wordnet}:fraction={args.fraction}:seed={args.seed}"
    if args.limit is not None:
        texts, label = texts[: args.limit], f"{label}:limit={args.limit}"
    if not texts:
        raise _UsageError(f"{label} has no texts: choose another source or a larger --fraction.")
    return texts, label


def _encode(
    args: argparse.Namespace, texts: list[str], label: str, encoder: Any, batch_size: int = 64
) -> np.ndarray:
    """Full-size unit-norm embeddings ``(N, d)``, through the on-disk cache unless disabled."""
    from matryoshka.text import encode_cached

    if args.no_cache:
        out: np.ndarray = encoder.encode(texts, batch_size=batch_size, progress=not args.quiet)
        return out
    return encode_cached(
        texts,
        encoder,
        cache_dir=args.cache_dir,
        key=f"cli/{label}",
        batch_size=batch_size,
        progress=not args.quiet,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    """``mrl embed``: texts -> ``(N, dim)`` float32 ``.npy`` + JSON sidecar; returns 0, or 2
    with a message on stderr for bad input."""
    from matryoshka.adaptor import MatryoshkaAdaptor
    from matryoshka.ops import truncate_numpy
    from matryoshka.text import TextEncoder

    try:
        _check_source(args)
        if args.dim is not None and args.dim < 1:
            raise _UsageError(f"--dim {args.dim} must be a positive int, e.g. 64.")
        if args.batch_size < 1:
            raise _UsageError(f"--batch-size {args.batch_size} must be a positive int, e.g. 64.")
        out = Path(args.out)
        if out.suffix != ".npy":
            raise _UsageError(f"--out {args.out!r} must end in .npy, e.g. emb.npy.")
        adaptor = MatryoshkaAdaptor.load(args.adaptor) if args.adaptor else None
        texts, label = _source_texts(args)
        encoder = TextEncoder(args.model)
        d = encoder.dim
        dim = d if args.dim is None else args.dim
        if dim > d:
            raise _UsageError(
                f"--dim {dim} is larger than {encoder.name}'s {d} dimensions: pass --dim "
                f"between 1 and {d}."
            )
        if adaptor is not None and adaptor.nesting.dim != d:
            raise _UsageError(
                f"--adaptor {args.adaptor!r} was fitted on {adaptor.nesting.dim}-d embeddings but "
                f"{encoder.name} makes {d}-d ones: fit an adaptor on this model's embeddings."
            )
        full = _encode(args, texts, label, encoder, args.batch_size)  # (N, d), unit norm
        if adaptor is not None:
            full = adaptor.transform(full, normalize=False)  # (N, d), nested
        emb = truncate_numpy(full, dim, normalize=args.normalize)  # (N, dim)
    except (_UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return _fail(str(e))
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


def _load_embeddings(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise _UsageError(
            f"--embeddings {path!r} does not exist: pass an (N, d) float .npy (e.g. from "
            "`mrl embed` without --dim)."
        )
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        raise _UsageError(f"--embeddings {path!r} is not a NumPy .npy array ({e}).") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise _UsageError(
            f"--embeddings {path!r} holds a {arr.dtype} array of shape {arr.shape}: pass an "
            "(N, d) float matrix."
        )
    return np.asarray(arr, dtype=np.float32)


def cmd_adaptor_fit(args: argparse.Namespace) -> int:
    """``mrl adaptor fit``: fit a :class:`~matryoshka.adaptor.MatryoshkaAdaptor` on cached or
    given embeddings ``(N, d)`` and save it (safetensors + JSON); returns 0, or 2 on bad input."""
    from matryoshka.adaptor import MatryoshkaAdaptor
    from matryoshka.nesting import Nesting

    try:
        _check_source(args)
        try:
            nesting = Nesting(args.sizes)
        except ValueError as e:
            raise _UsageError(f"--sizes: {e}") from None
        if args.embeddings is not None:
            x = _load_embeddings(args.embeddings)
            source = str(args.embeddings)
        else:
            from matryoshka.text import TextEncoder

            texts, source = _source_texts(args)
            encoder = TextEncoder(args.model)
            if encoder.dim != nesting.dim:  # before encoding, which takes minutes
                raise _UsageError(
                    f"--sizes {args.sizes} ends at {nesting.dim} but {encoder.name} makes "
                    f"{encoder.dim}-d embeddings: make the last size {encoder.dim}."
                )
            x = _encode(args, texts, source, encoder)
        n, d = x.shape
        if d != nesting.dim:
            raise _UsageError(
                f"--sizes {args.sizes} ends at {nesting.dim} but the embeddings have {d} "
                f"dimensions: make the last size {d}."
            )
        if n < d:
            raise _UsageError(
                f"{source} gives {n} embeddings of {d} dimensions: fit the adaptor on at least "
                f"{d} (its starting rotation is a PCA of them); use more texts."
            )
        adaptor = MatryoshkaAdaptor(
            nesting,
            hidden=args.hidden,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=not args.quiet,
        ).fit(x)
        path = adaptor.save(args.out)
    except (_UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return _fail(str(e))
    print(
        f"wrote {path} and {path.with_suffix('.json')}: sizes {list(nesting)}, fitted on {n} "
        f"embeddings ({source}); loss {adaptor.history_[0]:.4f} -> {adaptor.history_[-1]:.4f}"
    )
    return 0


def _text_eval_config(args: argparse.Namespace) -> TextEvalConfig:
    data: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        p = Path(args.config)
        if not p.is_file():
            raise _UsageError(f"--config {args.config!r} does not exist: pass a YAML recipe.")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise _UsageError(
                f"--config {args.config!r} must hold a mapping of text-eval options, e.g. "
                "train_pairs: 2000."
            )
        data.update(loaded)
    for f in dataclasses.fields(TextEvalConfig):
        if getattr(args, f.name, None) is not None:
            data[f.name] = getattr(args, f.name)
    return TextEvalConfig.from_dict(data)


def cmd_text_eval(args: argparse.Namespace) -> int:
    """``mrl text-eval``: the per-size WordNet evaluation; writes results.json + report."""
    from matryoshka.text_eval import format_tables, run_wordnet_evaluation

    try:
        config = _text_eval_config(args)
        results = run_wordnet_evaluation(
            out_dir=Path(config.out_dir),
            sizes=config.sizes,
            train_fraction=config.train_fraction,
            test_fraction=config.test_fraction,
            train_pairs=config.train_pairs,
            adaptor_epochs=config.adaptor_epochs,
            seed=config.seed,
            cache_dir=Path(config.cache_dir),
            progress=config.progress,
        )
    except (_UsageError, ValueError, FileNotFoundError, ImportError) as e:
        return _fail(str(e))
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``adaptor fit`` and ``text-eval`` to the ``mrl`` parser."""
    p = subparsers.add_parser("embed", help="embed texts (file or WordNet) at a prefix size")
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
    p.set_defaults(func=cmd_embed)

    p_ad = subparsers.add_parser("adaptor", help="post-hoc Matryoshka adaptor")
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
    p.set_defaults(func=cmd_adaptor_fit)

    p = subparsers.add_parser(
        "text-eval", help="per-size WordNet retrieval and probe: baselines, adaptor, fine-tuning"
    )
    p.add_argument("--config", default=None, help="YAML recipe of text-eval options")
    add_dataclass_arguments(p, TextEvalConfig)
    p.set_defaults(func=cmd_text_eval)
