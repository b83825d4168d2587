"""A retrieval benchmark in the BEIR folder format: corpus, queries and graded relevance.

    FOLDER/corpus.jsonl       {"_id": "d1", "title": "...", "text": "..."} per line
    FOLDER/queries.jsonl      {"_id": "q1", "text": "..."} per line
    FOLDER/qrels/test.tsv     query-id <TAB> corpus-id <TAB> score   (a header row first)

:func:`load_beir` reads one split (``qrels/<split>.tsv``) into a :class:`BeirData`: the whole
corpus (a document's text is its title and text joined by a space, as BEIR's own models read
it), the queries that have at least one judged-relevant document in that split, and the
qrels as ``{query id: {doc id: grade}}``. Ids are strings whatever the file wrote. The format is
strict and small, so it is read here line by line: every error names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BeirData", "is_beir_folder", "load_beir"]


@dataclass(frozen=True)
class BeirData:
    """One split of a BEIR folder.

    ``corpus_ids[i]`` / ``corpus[i]``: document ``i`` (``N`` of them); ``query_ids[j]`` /
    ``queries[j]``: query ``j`` (``Q``, only those with a relevant document in ``qrels``);
    ``qrels[qid][doc_id]``: the relevance grade (> 0 relevant).
    """

    name: str
    split: str
    corpus_ids: tuple[str, ...]
    corpus: tuple[str, ...]
    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    qrels: dict[str, dict[str, int]]


def is_beir_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with ``corpus.jsonl`` and ``queries.jsonl``."""
    p = Path(path)
    return (p / "corpus.jsonl").is_file() and (p / "queries.jsonl").is_file()


def _jsonl(path: Path, need: tuple[str, ...]) -> list[dict[str, Any]]:
    """The objects of a JSONL file; ``ValueError`` naming the file and line of a bad one."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}): each "
                    'line must be one object such as {"_id": "d1", "text": "..."}.'
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {number}: a JSON {type(row).__name__}, not an object with "
                    f"the keys {list(need)}."
                )
            missing = [k for k in need if k not in row]
            if missing:
                raise ValueError(
                    f"{path}, line {number}: no {', '.join(repr(k) for k in missing)} key (it "
                    f"has {sorted(row)}): BEIR rows need {list(need)}."
                )
            if not isinstance(row["text"], str):
                raise ValueError(
                    f"{path}, line {number}: 'text' is a {type(row['text']).__name__}, not a "
                    "string."
                )
            rows.append(row)
    return rows


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    """``{query id: {doc id: grade}}`` from a BEIR qrels TSV (header row optional)."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rstrip("\r").split("\t")
            if len(parts) != 3:
                raise ValueError(
                    f"{path}, line {number}: {len(parts)} tab-separated field(s), not 3: each "
                    "row is query-id <TAB> corpus-id <TAB> score."
                )
            try:
                grade = int(float(parts[2]))
            except ValueError:
                if number == 1:  # the header row: query-id corpus-id score
                    continue
                raise ValueError(
                    f"{path}, line {number}: score={parts[2]!r} is not a number: each row is "
                    "query-id <TAB> corpus-id <TAB> score (an integer grade)."
                ) from None
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read the ``split`` of the BEIR folder ``folder`` (see the module docstring).

    Raises ``FileNotFoundError`` naming a missing file (and the splits there are) and
    ``ValueError`` naming the file and line of a malformed row, a repeated id, or a split with
    no query that has both text and a relevant document.
    """
    root = Path(folder)
    qrels_path = root / "qrels" / f"{split}.tsv"
    for p in (root / "corpus.jsonl", root / "queries.jsonl", qrels_path):
        if not p.is_file():
            splits = sorted(q.stem for q in (root / "qrels").glob("*.tsv"))
            have = f" (qrels there: {splits})" if splits and p == qrels_path else ""
            raise FileNotFoundError(
                f"--beir {str(folder)!r}: {p} does not exist{have}: pass a BEIR folder with "
                "corpus.jsonl, queries.jsonl and qrels/<split>.tsv, and --split one of its splits."
            )
    corpus_ids: list[str] = []
    corpus: list[str] = []
    seen: set[str] = set()
    for row in _jsonl(root / "corpus.jsonl", ("_id", "text")):
        doc_id = str(row["_id"])
        if doc_id in seen:
            raise ValueError(f"{root / 'corpus.jsonl'}: the document id {doc_id!r} repeats.")
        seen.add(doc_id)
        title = row.get("title") or ""
        corpus_ids.append(doc_id)
        corpus.append(f"{title} {row['text']}".strip() if isinstance(title, str) else row["text"])
    if len(corpus) < 2:
        raise ValueError(f"{root / 'corpus.jsonl'} holds {len(corpus)} document(s): need >= 2.")
    query_text = {str(r["_id"]): r["text"] for r in _jsonl(root / "queries.jsonl", ("_id", "text"))}
    qrels = _qrels(qrels_path)
    judged = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    query_ids = [q for q in judged if q in query_text]
    if not query_ids:
        raise ValueError(
            f"{qrels_path} judges no query of {root / 'queries.jsonl'} relevant to any document: "
            "check that its query ids match the queries' _id values and that scores are > 0."
        )
    return BeirData(
        name=root.resolve().name,
        split=split,
        corpus_ids=tuple(corpus_ids),
        corpus=tuple(corpus),
        query_ids=tuple(query_ids),
        queries=tuple(query_text[q] for q in query_ids),
        qrels={q: judged[q] for q in query_ids},
    )
