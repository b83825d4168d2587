"""An out-of-domain retrieval corpus from the docstrings of installed Python packages.

Every machine with this package's environment installed has the same text, offline: the
docstrings of the Python standard library and of numpy, scipy, scikit-learn and torch. Each
public function, class and method of the modules in :data:`DOCSTRING_MODULES` gives at most one
pair: the **query** is the docstring's one-paragraph summary (a signature line such as
``f(x) -> y`` is skipped), the **document** is the rest of the docstring (whitespace collapsed,
cut at :data:`MAX_DOCUMENT_CHARS`). Pairs are kept when the query has 20-200 characters and the
document at least 100, and deduplicated so each query has exactly one relevant document and each
document one query (aliases that share a docstring count once; a summary with two different
bodies is dropped). A seeded split holds out ``test_size`` pairs (queries and corpus of the
retrieval task); the **training texts** are every other docstring's summary and body (also the
docstrings without a two-part structure), with nothing that equals a held-out query or document.

The build imports those modules (about 15 s on 2 cores) and is deterministic for the same
installed versions, which :func:`load_docstring_corpus` records (``versions``); it caches the
result as JSON under ``cache_dir``, keyed by the versions and the options.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from matryoshka.data.wordnet import RetrievalTask
from matryoshka.io import atomic_write_bytes

__all__ = [
    "DOCSTRING_MODULES",
    "MAX_DOCUMENT_CHARS",
    "DocstringCorpus",
    "DocstringPair",
    "collect_docstrings",
    "docstring_pairs",
    "docstring_task",
    "load_docstring_corpus",
]

#: The modules whose public members' docstrings make the corpus (missing ones are skipped and
#: not listed in the corpus' ``modules``).
DOCSTRING_MODULES: tuple[str, ...] = (
    *[
        "argparse",
        "ast",
        "asyncio",
        "base64",
        "binascii",
        "bisect",
        "calendar",
        "cmath",
        "codecs",
        "collections",
        "concurrent.futures",
        "configparser",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "dis",
        "email.message",
        "enum",
        "fnmatch",
        "fractions",
        "ftplib",
        "functools",
        "glob",
        "gzip",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "http.client",
        "imaplib",
        "importlib",
        "inspect",
        "io",
        "ipaddress",
        "itertools",
        "json",
        "locale",
        "logging",
        "mailbox",
        "math",
        "multiprocessing",
        "operator",
        "os",
        "os.path",
        "pathlib",
        "pickle",
        "platform",
        "pprint",
        "queue",
        "random",
        "re",
        "secrets",
        "shutil",
        "smtplib",
        "socket",
        "sqlite3",
        "statistics",
        "string",
        "struct",
        "subprocess",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "time",
        "timeit",
        "tokenize",
        "traceback",
        "types",
        "typing",
        "unittest",
        "urllib.parse",
        "urllib.request",
        "uuid",
        "warnings",
        "weakref",
        "xml.etree.ElementTree",
        "zipfile",
    ],
    *[
        "numpy",
        "numpy.linalg",
        "numpy.fft",
        "numpy.random",
        "numpy.ma",
        "numpy.polynomial",
        "numpy.lib.recfunctions",
    ],
    *[
        "scipy.linalg",
        "scipy.stats",
        "scipy.optimize",
        "scipy.signal",
        "scipy.sparse",
        "scipy.sparse.linalg",
        "scipy.sparse.csgraph",
        "scipy.special",
        "scipy.interpolate",
        "scipy.integrate",
        "scipy.spatial",
        "scipy.spatial.distance",
        "scipy.ndimage",
        "scipy.cluster.hierarchy",
        "scipy.cluster.vq",
        "scipy.io",
        "scipy.fft",
    ],
    *[
        "sklearn.linear_model",
        "sklearn.svm",
        "sklearn.tree",
        "sklearn.ensemble",
        "sklearn.cluster",
        "sklearn.decomposition",
        "sklearn.manifold",
        "sklearn.metrics",
        "sklearn.model_selection",
        "sklearn.preprocessing",
        "sklearn.feature_extraction.text",
        "sklearn.feature_selection",
        "sklearn.neighbors",
        "sklearn.naive_bayes",
        "sklearn.pipeline",
        "sklearn.impute",
        "sklearn.mixture",
        "sklearn.covariance",
        "sklearn.datasets",
        "sklearn.utils",
        "sklearn.calibration",
        "sklearn.inspection",
        "sklearn.kernel_approximation",
        "sklearn.neural_network",
        "sklearn.random_projection",
        "sklearn.semi_supervised",
        "sklearn.cross_decomposition",
        "sklearn.discriminant_analysis",
        "sklearn.gaussian_process",
        "sklearn.isotonic",
        "sklearn.multiclass",
        "sklearn.compose",
    ],
    *[
        "torch",
        "torch.nn",
        "torch.nn.functional",
        "torch.linalg",
        "torch.fft",
        "torch.special",
        "torch.distributions",
        "torch.optim",
        "torch.utils.data",
        "torch.autograd",
        "torch.nn.init",
        "torch.nn.utils",
        "torch.sparse",
        "torch.random",
    ],
)
#: Documents are cut to this many characters (MiniLM reads at most 256 tokens anyway).
MAX_DOCUMENT_CHARS = 600
_PACKAGES = ("numpy", "scipy", "scikit-learn", "torch")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # "f(x, y) -> z": a signature, not a summary
_FORMAT = "matryoshka.docstrings/1"


@dataclass(frozen=True)
class DocstringPair:
    """One retrieval pair: the member's dotted ``name``, its summary and its body."""

    name: str
    query: str
    document: str


@dataclass(frozen=True)
class DocstringCorpus:
    """The held-out pairs (``test``), the training texts and how they were built.

    ``versions`` names Python and each package's installed version; ``modules`` the modules
    that were imported; ``seed`` and ``test_size`` the split.
    """

    test: tuple[DocstringPair, ...]
    train_texts: tuple[str, ...]
    versions: dict[str, str]
    modules: tuple[str, ...]
    seed: int
    test_size: int
    n_pairs: int

    @property
    def name(self) -> str:
        """``"docstrings"`` and the seed: the corpus' name in reports and cache keys."""
        return f"docstrings/s{self.seed}/test{self.test_size}"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _summary_and_body(doc: str) -> tuple[str, str] | None:
    """``(summary, body)`` of a cleaned docstring, whitespace collapsed, or None if it has one
    paragraph only (after skipping leading signature lines)."""
    paras = [_flat(p) for p in doc.split("\n\n") if p.strip()]
    while paras and _SIGNATURE.match(paras[0]):
        paras = paras[1:]
    if len(paras) < 2:
        return None
    return paras[0], " ".join(paras[1:])[:MAX_DOCUMENT_CHARS]


def _doc_of(obj: object) -> str | None:
    if not (inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property)):
        return None
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # some extension objects raise on attribute access
        return None
    return doc or None


def collect_docstrings(
    modules: Sequence[str] = DOCSTRING_MODULES,
) -> tuple[dict[str, str], list[str]]:
    """The docstrings of the public members (and public class attributes) of ``modules``.

    Returns ``({dotted name: cleaned docstring}, modules imported)``, names in a fixed order
    (modules as given, members sorted); a module that cannot be imported is skipped.
    """
    docs: dict[str, str] = {}
    imported: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # not installed here (e.g. a Python built without sqlite3)
                continue
            imported.append(module_name)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or inspect.ismodule(obj):
                    continue
                members = [(f"{module_name}.{attr}", obj)]
                if inspect.isclass(obj):
                    members += [
                        (f"{module_name}.{attr}.{a}", o)
                        for a, o in sorted(vars(obj).items())
                        if not a.startswith("_")
                    ]
                for name, member in members:
                    doc = _doc_of(member)
                    if doc is not None:
                        docs.setdefault(name, doc)
    return docs, imported


def docstring_pairs(docs: Mapping[str, str]) -> list[DocstringPair]:
    """The (summary, body) pairs of ``docs`` that pass the length filter, deduplicated so every
    query has one document and every document one query, sorted by name."""
    first: dict[tuple[str, str], str] = {}
    for name in sorted(docs):
        split = _summary_and_body(docs[name])
        if split is None:
            continue
        q, d = split
        if 20 <= len(q) <= 200 and len(d) >= 100:
            first.setdefault((q, d), name)
    docs_of: dict[str, set[str]] = {}
    queries_of: dict[str, set[str]] = {}
    for q, d in first:
        docs_of.setdefault(q, set()).add(d)
        queries_of.setdefault(d, set()).add(q)
    pairs = [
        DocstringPair(name, q, d)
        for (q, d), name in first.items()
        if len(docs_of[q]) == 1 and len(queries_of[d]) == 1
    ]
    return sorted(pairs, key=lambda p: p.name)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.system()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _build(modules: Sequence[str], seed: int, test_size: int) -> DocstringCorpus:
    docs, imported = collect_docstrings(modules)
    pairs = docstring_pairs(docs)
    if len(pairs) < test_size + 2:
        raise ValueError(
            f"test_size={test_size} but the docstrings of {len(imported)} importable module(s) "
            f"give {len(pairs)} pairs: pass a test_size below {max(1, len(pairs) - 2)}, or "
            "install numpy, scipy, scikit-learn and torch."
        )
    pick = set(np.random.default_rng(seed).permutation(len(pairs))[:test_size].tolist())
    test = tuple(p for i, p in enumerate(pairs) if i in pick)
    held = {p.query for p in test} | {p.document for p in test}
    texts: dict[str, None] = {}
    for name in docs:
        split = _summary_and_body(docs[name])
        parts = [*split] if split is not None else [_flat(docs[name])[:MAX_DOCUMENT_CHARS]]
        paras = {_flat(p) for p in docs[name].split("\n\n")}
        if held & ({*parts} | paras):
            continue  # this docstring holds a held-out query or document
        for t in parts:
            if len(t) >= 20:
                texts.setdefault(t)
    return DocstringCorpus(
        test=test,
        train_texts=tuple(texts),
        versions=_versions(),
        modules=tuple(imported),
        seed=seed,
        test_size=test_size,
        n_pairs=len(pairs),
    )


def load_docstring_corpus(
    seed: int = 0,
    test_size: int = 1500,
    modules: Sequence[str] = DOCSTRING_MODULES,
    cache_dir: str | Path | None = ".cache/docstrings",
) -> DocstringCorpus:
    """The docstring corpus split with ``seed``: ``test_size`` held-out pairs and the training
    texts (see the module docstring). Cached as JSON under ``cache_dir`` (``None``: no cache),
    keyed by the installed versions, ``modules``, ``seed`` and ``test_size``."""
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ValueError(f"test_size={test_size!r} must be an int >= 1, e.g. 1500.")
    key = json.dumps([_FORMAT, _versions(), list(modules), seed, test_size, MAX_DOCUMENT_CHARS])
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"docstrings-{digest}.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            if raw.get("key") == key:
                c = raw["corpus"]
                return DocstringCorpus(
                    test=tuple(DocstringPair(**p) for p in c["test"]),
                    train_texts=tuple(c["train_texts"]),
                    versions=dict(c["versions"]),
                    modules=tuple(c["modules"]),
                    seed=int(c["seed"]),
                    test_size=int(c["test_size"]),
                    n_pairs=int(c["n_pairs"]),
                )
    corpus = _build(modules, seed, test_size)
    if path is not None:
        atomic_write_bytes(path, json.dumps({"key": key, "corpus": asdict(corpus)}).encode())
    return corpus


def docstring_task(corpus: DocstringCorpus) -> RetrievalTask:
    """The held-out retrieval task: summary -> body, one relevant document per query (the
    corpus is every held-out body, in the same order as the queries)."""
    test = corpus.test
    return RetrievalTask(
        name="docstring summary->body",
        queries=tuple(p.query for p in test),
        corpus=tuple(p.document for p in test),
        relevant=tuple((i,) for i in range(len(test))),
        query_ids=tuple(p.name for p in test),
        corpus_ids=tuple(p.name for p in test),
    )
