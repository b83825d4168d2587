"""The out-of-domain docstring corpus (deterministic, deduplicated, held out) and the funnel recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matryoshka.data.docstrings import (
    DocstringPair,
    collect_docstrings,
    docstring_pairs,
    docstring_task,
    load_docstring_corpus,
)
from matryoshka.evaluation.text import funnel_recall

BODY = "A body long enough to pass the filter of one hundred characters, written out here in full, twice over."
SMALL = ("json", "textwrap", "difflib", "statistics", "argparse", "logging", "shutil")


def test_pairs_skip_signatures_filter_lengths_and_keep_one_to_one() -> None:
    docs = {
        "m.sig": f"sig(x, y) -> int\n\nReturn the signature-free summary here.\n\n{BODY}",
        "m.short": "Too short.\n\n" + BODY,
        "m.nobody": "A summary without any body paragraph after it.",
        "m.alias_a": f"The same docstring under two names.\n\n{BODY} alias",
        "m.alias_b": f"The same docstring under two names.\n\n{BODY} alias",
        "m.amb_1": f"An ambiguous summary shared by two bodies.\n\n{BODY} one",
        "m.amb_2": f"An ambiguous summary shared by two bodies.\n\n{BODY} two",
        "m.thin": "A summary whose body is thin.\n\nToo thin.",
    }
    pairs = docstring_pairs(docs)
    assert pairs == [
        DocstringPair("m.alias_a", "The same docstring under two names.", f"{BODY} alias"),
        DocstringPair("m.sig", "Return the signature-free summary here.", BODY),
    ]


def test_collection_is_deterministic_and_ordered() -> None:
    a, mods_a = collect_docstrings(SMALL)
    b, mods_b = collect_docstrings(SMALL)
    assert a == b
    assert list(a) == list(b)
    assert mods_a == list(SMALL) == mods_b
    assert "json.dumps" in a
    assert a["json.dumps"].startswith("Serialize")
    missing, mods = collect_docstrings(["json", "no_such_module_xyz"])
    assert mods == ["json"]
    assert all(k.startswith("json.") for k in missing)


def test_split_holds_out_its_pairs_and_is_cached(tmp_path: Path) -> None:
    corpus = load_docstring_corpus(seed=3, test_size=20, modules=SMALL, cache_dir=tmp_path)
    assert len(corpus.test) == 20
    assert corpus.n_pairs > 20
    assert {"python", "numpy", "scipy", "scikit-learn", "torch"} <= set(corpus.versions)
    held = {p.query for p in corpus.test} | {p.document for p in corpus.test}
    assert not held & set(corpus.train_texts)  # nothing held out is trained on
    assert len(set(corpus.train_texts)) == len(corpus.train_texts)
    for p in corpus.test:  # no training text contains a held-out summary either
        assert not any(p.query == t for t in corpus.train_texts)
    again = load_docstring_corpus(seed=3, test_size=20, modules=SMALL, cache_dir=tmp_path)
    assert again == corpus  # read back from the cache
    (cached,) = tmp_path.glob("docstrings-*.json")
    assert json.loads(cached.read_text())["corpus"]["seed"] == 3
    other = load_docstring_corpus(seed=4, test_size=20, modules=SMALL, cache_dir=None)
    assert {p.name for p in other.test} != {p.name for p in corpus.test}
    task = docstring_task(corpus)
    assert task.relevant == tuple((i,) for i in range(20))
    assert task.queries[5] == corpus.test[5].query
    assert task.corpus[5] == corpus.test[5].document


def test_bad_split_sizes_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"test_size=0 must be an int >= 1, e.g. 1500\."):
        load_docstring_corpus(test_size=0, cache_dir=None)
    with pytest.raises(ValueError, match=r"test_size=100000 but the docstrings of 1 importable"):
        load_docstring_corpus(test_size=100000, modules=["json"], cache_dir=tmp_path)


def _funnel_by_hand(qs, cs, qf, cf, k, shortlist):  # type: ignore[no-untyped-def]
    total = 0.0
    for i in range(qf.shape[0]):
        exact = sorted(range(cf.shape[0]), key=lambda j: (-float(qf[i] @ cf[j]), j))[:k]
        short = sorted(range(cs.shape[0]), key=lambda j: (-float(qs[i] @ cs[j]), j))[:shortlist]
        found = sorted(short, key=lambda j: (-float(qf[i] @ cf[j]), j))[:k]
        total += len(set(found) & set(exact)) / k
    return total / qf.shape[0]


def test_funnel_recall_matches_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(15, 24)), rng.normal(size=(120, 24))
    qs, cs = q[:, :4], c[:, :4]
    for shortlist in (10, 30, 120):
        got = funnel_recall(qs, cs, q, c, k=10, shortlist=shortlist)
        assert got == pytest.approx(_funnel_by_hand(qs, cs, q, c, 10, shortlist))
    assert funnel_recall(q, c, q, c, k=10, shortlist=10) == 1.0  # the full size shortlists itself
    assert funnel_recall(qs, cs, q, c, k=10, shortlist=120) == 1.0  # everything reranked
    assert funnel_recall(qs, cs, q, c, k=10, shortlist=10) < 0.9  # 4 of 24 dims lose neighbours
