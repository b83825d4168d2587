"""WordNet 3.0 synsets from the Debian ``wordnet-base`` files, seeded splits, and tasks on them.

The loader parses ``data.{noun,verb,adj,adv}`` directly (format: wndb(5)); no NLTK needed.
Each line of a data file is one synset::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames] | gloss

``w_cnt`` and ``lex_id`` are hexadecimal, ``p_cnt`` decimal; a pointer is
``symbol offset pos source/target``; the gloss is a definition followed by ``"quoted"`` usage
examples. ``lex_filenum`` indexes the 45 lexicographer files of lexnames(5WN) (:data:`LEXNAMES`).

Tasks built here (all over one list of synsets, e.g. one split):

* :func:`definition_to_lemmas`, :func:`lemmas_to_definition`, :func:`example_to_definition`:
  retrieval tasks (:class:`RetrievalTask`), with graded duplicates handled honestly: every
  corpus entry whose text equals the target's text counts as relevant.
* :func:`lexname_task`: definition -> lexicographer category (45-way), with the coarse part of
  speech as a second label for multi-task training (:class:`ClassificationTask`).

Text lists and splits shared by the text commands: :func:`wordnet_texts` (what ``mrl embed
--wordnet`` and ``mrl adaptor fit --wordnet`` embed) and :func:`wordnet_split` (the seeded
train/test split of the text recipes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LEXNAMES",
    "POS_NAMES",
    "WORDNET_FIELDS",
    "ClassificationTask",
    "RetrievalTask",
    "Synset",
    "definition_to_lemmas",
    "example_to_definition",
    "lemmas_to_definition",
    "lexname_task",
    "load_synsets",
    "mask_example",
    "split_synsets",
    "wordnet_split",
    "wordnet_texts",
]

#: Lexicographer file number -> category name, from lexnames(5WN). 45 categories.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip

#: Coarse part of speech: the letter used in synset ids (adjective satellites count as "a").
POS_NAMES: tuple[str, ...] = ("n", "v", "a", "r")

#: What :func:`wordnet_texts` (``--wordnet``) can list: every synset's definition, lemma list, or
#: usage examples.
WORDNET_FIELDS: tuple[str, ...] = ("definitions", "lemmas", "examples")

_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_HYPERNYM_SYMBOLS = {"@", "@i"}  # hypernym and instance hypernym
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers of adjectives, wndb(5)
_QUOTED = re.compile(r'"([^"]*)"')
APT_HINT = "apt-get install --no-install-recommends wordnet-base"


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    Attributes:
        id: ``"{offset:08d}-{pos}"``, e.g. ``"02084071-n"`` (dog); unique across the database.
        pos: coarse part of speech, one of :data:`POS_NAMES` (``n``, ``v``, ``a``, ``r``).
        lexname: lexicographer category, one of :data:`LEXNAMES`, e.g. ``"noun.animal"``.
        lemmas: the synset's words, underscores replaced by spaces, adjective markers removed.
        definition: the gloss without its usage examples.
        examples: the quoted usage examples of the gloss (often empty).
        hypernyms: ids of the (instance) hypernym synsets.
        satellite: an adjective satellite (``ss_type`` ``s`` in ``data.adj``; ``pos`` is ``a``).
    """

    id: str
    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    hypernyms: tuple[str, ...]
    satellite: bool = False

    @property
    def lemma_text(self) -> str:
        """The lemmas joined as one document: ``"dog, domestic dog, Canis familiaris"``."""
        return ", ".join(self.lemmas)


def _parse_line(line: str, pos: str, path: Path, lineno: int) -> Synset:
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        offset, lex_filenum = fields[0], int(fields[1])
        w_cnt = int(fields[3], 16)
        words = fields[4 : 4 + 2 * w_cnt : 2]
        i = 4 + 2 * w_cnt
        p_cnt = int(fields[i])
        ptrs = fields[i + 1 : i + 1 + 4 * p_cnt]
        if len(words) != w_cnt or len(ptrs) != 4 * p_cnt:
            raise IndexError
    except (IndexError, ValueError):
        raise ValueError(
            f"{path}:{lineno} is not a wndb(5) synset line: {line[:80]!r}; "
            f"reinstall the data files ({APT_HINT})."
        ) from None
    hypernyms = tuple(
        f"{ptrs[j + 1]}-{'a' if ptrs[j + 2] == 's' else ptrs[j + 2]}"
        for j in range(0, len(ptrs), 4)
        if ptrs[j] in _HYPERNYM_SYMBOLS
    )
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    gloss = gloss.strip() if sep else ""
    first_quote = gloss.find('"')
    definition = gloss if first_quote < 0 else gloss[:first_quote]
    definition = definition.strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    return Synset(
        id=f"{offset}-{pos}",
        pos=pos,
        lexname=LEXNAMES[lex_filenum],
        lemmas=lemmas,
        definition=definition,
        examples=examples,
        hypernyms=hypernyms,
        satellite=fields[2] == "s",
    )


def load_synsets(root: str | Path = "/usr/share/wordnet") -> list[Synset]:
    """Parse every synset of ``root/data.{noun,verb,adj,adv}`` (117,659 for WordNet 3.0).

    Returns the synsets in file order (nouns, verbs, adjectives, adverbs). Raises
    ``FileNotFoundError`` naming the apt package if the folder or a data file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"root={str(root)!r} is not a folder: WordNet's data files are missing. "
            f"Install them with `{APT_HINT}` (Debian/Ubuntu), or pass root= pointing at a "
            "folder with data.noun, data.verb, data.adj and data.adv."
        )
    synsets: list[Synset] = []
    for name, pos in _FILES.items():
        path = root / f"data.{name}"
        if not path.is_file():
            raise FileNotFoundError(
                f"root={str(root)!r} has no data.{name}: install WordNet's data files with "
                f"`{APT_HINT}`, or pass the folder that holds data.{{noun,verb,adj,adv}}."
            )
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  "):  # license header
                    continue
                synsets.append(_parse_line(line.rstrip("\n"), pos, path, lineno))
    return synsets


def split_synsets(
    synsets: Sequence[Synset],
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> dict[str, list[Synset]]:
    """Fixed seeded split by synset: ``{name: synsets}`` with the given fractions.

    The assignment depends only on the synset ids and ``seed`` (ids are sorted before a seeded
    permutation), so it is the same whatever the input order. Fractions must be positive and sum
    to at most 1; with a sum below 1 the rest is left out (handy for subsets). Defaults to
    ``{"train": 0.8, "val": 0.1, "test": 0.1}``. Each split keeps the input order.
    """
    fractions = (
        dict(fractions) if fractions is not None else {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    if not fractions:
        raise ValueError("fractions={} is empty: give e.g. {'train': 0.8, 'test': 0.2}.")
    for name, frac in fractions.items():
        if not 0.0 < frac <= 1.0:
            raise ValueError(
                f"fractions[{name!r}]={frac} must be in (0, 1]: each split is a share of the synsets."
            )
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise ValueError(
            f"fractions={fractions} sum to {total:.4g} > 1: the splits must not overlap; "
            "scale them down so they sum to at most 1."
        )
    n = len(synsets)
    order = sorted(range(n), key=lambda i: synsets[i].id)
    perm = np.random.default_rng(seed).permutation(n)
    rank = np.empty(n, dtype=np.int64)  # rank[i]: position of synset i in the shuffled order
    rank[np.asarray(order, dtype=np.int64)[perm]] = np.arange(n)
    bounds = np.floor(np.cumsum([0.0, *fractions.values()]) * n + 1e-9).astype(np.int64)
    out: dict[str, list[Synset]] = {}
    for (name, _), lo, hi in zip(fractions.items(), bounds[:-1], bounds[1:], strict=True):
        out[name] = [s for i, s in enumerate(synsets) if lo <= rank[i] < hi]
    return out


def wordnet_split(
    synsets: Sequence[Synset], seed: int, train_fraction: float, test_fraction: float
) -> tuple[list[Synset], list[Synset]]:
    """Seeded ``(train, test)`` synsets of the text recipes (each in input order).

    The test share is drawn first, so the held-out synsets do not change when
    ``train_fraction`` does. Fractions are validated as in :func:`split_synsets`.
    """
    split = split_synsets(synsets, seed, {"test": test_fraction, "train": train_fraction})
    return split["train"], split["test"]


def wordnet_texts(
    what: str,
    root: str | Path = "/usr/share/wordnet",
    fraction: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
) -> list[str]:
    """Texts from WordNet: ``what`` (one of :data:`WORDNET_FIELDS`) of a seeded share
    ``fraction`` of the synsets, in file order, at most ``limit`` of them.

    ``"definitions"`` and ``"lemmas"`` give one text per synset; ``"examples"`` every usage
    example of those synsets. Raises ``ValueError`` for an unknown ``what``.
    """
    if what not in WORDNET_FIELDS:
        raise ValueError(
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


@dataclass(frozen=True)
class RetrievalTask:
    """Queries against a corpus, with the set of relevant corpus entries per query.

    Attributes:
        name: e.g. ``"definition->lemmas"``.
        queries: ``Q`` query texts.
        corpus: ``N`` document texts.
        relevant: ``Q`` tuples of relevant corpus indices (each non-empty).
        query_ids: the synset id behind each query.
        corpus_ids: the synset id behind each document.
    """

    name: str
    queries: tuple[str, ...]
    corpus: tuple[str, ...]
    relevant: tuple[tuple[int, ...], ...]
    query_ids: tuple[str, ...]
    corpus_ids: tuple[str, ...]

    def n_relevant(self) -> np.ndarray:
        """How many relevant documents each query has: ``(Q,)`` int64."""
        return np.array([len(r) for r in self.relevant], dtype=np.int64)

    def relevance(self, ranked: np.ndarray) -> np.ndarray:
        """Relevance of ranked results: ``(Q, k)`` corpus indices -> ``(Q, k)`` bool."""
        ranked = np.asarray(ranked)
        if ranked.ndim != 2 or ranked.shape[0] != len(self.queries):
            raise ValueError(
                f"ranked.shape={ranked.shape} but the task has {len(self.queries)} queries: "
                "pass a (queries, k) matrix of corpus indices."
            )
        out = np.zeros(ranked.shape, dtype=bool)
        for q, rel in enumerate(self.relevant):
            out[q] = np.isin(ranked[q], rel)
        return out


def _by_text(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    return {t: tuple(ix) for t, ix in groups.items()}


def _check_nonempty(synsets: Sequence[Synset], what: str) -> None:
    if not synsets:
        raise ValueError(f"synsets is empty: {what} needs at least one synset.")


def definition_to_lemmas(synsets: Sequence[Synset]) -> RetrievalTask:
    """Query = a definition, corpus = every synset's lemma list (``"dog, domestic dog, ..."``).

    A document is relevant if its text equals the query synset's lemma text (identical lemma
    lists of different senses cannot be told apart by text).
    """
    _check_nonempty(synsets, "definition_to_lemmas")
    corpus = tuple(s.lemma_text for s in synsets)
    groups = _by_text(corpus)
    return RetrievalTask(
        name="definition->lemmas",
        queries=tuple(s.definition for s in synsets),
        corpus=corpus,
        relevant=tuple(groups[s.lemma_text] for s in synsets),
        query_ids=tuple(s.id for s in synsets),
        corpus_ids=tuple(s.id for s in synsets),
    )


def lemmas_to_definition(synsets: Sequence[Synset]) -> RetrievalTask:
    """Query = a lemma list, corpus = every synset's definition.

    Identical lemma lists become one query whose relevant documents are all their definitions
    (e.g. "bank" -> every single-lemma sense of bank).
    """
    _check_nonempty(synsets, "lemmas_to_definition")
    groups = _by_text([s.lemma_text for s in synsets])
    first = sorted(ix[0] for ix in groups.values())  # one query per distinct lemma text
    return RetrievalTask(
        name="lemmas->definition",
        queries=tuple(synsets[i].lemma_text for i in first),
        corpus=tuple(s.definition for s in synsets),
        relevant=tuple(groups[synsets[i].lemma_text] for i in first),
        query_ids=tuple(synsets[i].id for i in first),
        corpus_ids=tuple(s.id for s in synsets),
    )


MASK = "___"


def mask_example(example: str, lemmas: Sequence[str], mask: str = MASK) -> str | None:
    """Replace the first lemma (and its inflections, e.g. "barked") found in ``example`` by
    ``mask``; ``None`` when no lemma occurs in it."""
    for lemma in sorted(lemmas, key=len, reverse=True):  # "domestic dog" before "dog"
        stem = re.escape(lemma[:-1] if len(lemma) > 3 and lemma.endswith("e") else lemma)
        pattern = re.compile(rf"\b{stem}\w*", re.IGNORECASE)
        if pattern.search(example):
            return pattern.sub(mask, example)
    return None


def example_to_definition(synsets: Sequence[Synset], mask: str = MASK) -> RetrievalTask:
    """Query = a usage example with the headword masked, corpus = every synset's definition.

    One query per synset that has an example containing one of its lemmas (the first such
    example); the relevant documents are the synset's definition and any identical definition.
    """
    _check_nonempty(synsets, "example_to_definition")
    corpus = tuple(s.definition for s in synsets)
    groups = _by_text(corpus)
    queries, relevant, ids = [], [], []
    for s in synsets:
        for ex in s.examples:
            masked = mask_example(ex, s.lemmas, mask)
            if masked is not None:
                queries.append(masked)
                relevant.append(groups[s.definition])
                ids.append(s.id)
                break
    if not queries:
        raise ValueError(
            "synsets have no usage example that contains one of their lemmas: "
            "example_to_definition needs synsets with examples (about 28% have one)."
        )
    return RetrievalTask(
        name="example->definition",
        queries=tuple(queries),
        corpus=corpus,
        relevant=tuple(relevant),
        query_ids=tuple(ids),
        corpus_ids=tuple(s.id for s in synsets),
    )


@dataclass(frozen=True)
class ClassificationTask:
    """Texts with a fine label and a coarse label.

    Attributes:
        name: e.g. ``"definition->lexname"``.
        texts: ``N`` texts.
        labels: ``(N,)`` int64 indices into ``label_names``.
        label_names: the fine classes (all 45 of :data:`LEXNAMES`, present or not).
        coarse_labels: ``(N,)`` int64 indices into ``coarse_names``.
        coarse_names: the coarse classes (:data:`POS_NAMES`).
    """

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    coarse_labels: np.ndarray
    coarse_names: tuple[str, ...]


def lexname_task(synsets: Sequence[Synset]) -> ClassificationTask:
    """Definition -> lexicographer category (45-way), plus part of speech (4-way) as a coarse
    label for multi-task training."""
    _check_nonempty(synsets, "lexname_task")
    lex_index = {name: i for i, name in enumerate(LEXNAMES)}
    pos_index = {name: i for i, name in enumerate(POS_NAMES)}
    return ClassificationTask(
        name="definition->lexname",
        texts=tuple(s.definition for s in synsets),
        labels=np.array([lex_index[s.lexname] for s in synsets], dtype=np.int64),
        label_names=LEXNAMES,
        coarse_labels=np.array([pos_index[s.pos] for s in synsets], dtype=np.int64),
        coarse_names=POS_NAMES,
    )
