"""Unlabeled texts for self-distillation: a text file, JSONL / CSV / Parquet, or a ``datasets`` folder.

    data: texts.txt                   # one text per line (blank lines skipped)
    data: texts.jsonl                 # {"text": "..."} per line; text_column: names another key
    data: texts.csv / texts.parquet   # a column of texts (text_column, default "text")
    data: my_dataset/                 # written by datasets' Dataset.save_to_disk (or a
                                      # DatasetDict with a "train" split)

:func:`load_texts` returns the distinct non-blank texts in file order (a repeated text is kept
once: in one batch it would be its own false neighbour). Bad input is an error that names the
recipe key, the file and the fix: a missing path, an unknown suffix, an empty file, a missing
column (with the columns the file has), a null or non-text value (with its row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TEXT_FORMATS", "load_texts"]

#: File suffixes :func:`load_texts` reads, and the ``datasets`` builder of each (``None``: plain
#: text, one text per line).
TEXT_FORMATS: dict[str, str | None] = {
    ".txt": None,
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_FIX = (
    "pass a .txt file (one text per line), a .jsonl/.json/.csv/.parquet file with a text "
    "column, or a folder written by Dataset.save_to_disk"
)


def _read_table(path: Path, what: str) -> Any:
    """The saved dataset or table file at ``path`` as one ``datasets.Dataset``."""
    from matryoshka.data.pairs import read_table

    formats = {suffix: b for suffix, b in TEXT_FORMATS.items() if b is not None}
    return read_table(
        path, what, formats, _FIX, rows="the texts", example='{"text": "A cat is a small feline."}'
    )


def load_texts(path: str | Path, text_column: str | None = None, what: str = "data") -> list[str]:
    """The distinct non-blank texts of ``path``, in file order.

    A ``.txt`` file holds one text per line (``text_column`` must be ``None`` then); a table
    (``.jsonl``/``.json``/``.csv``/``.parquet`` or a ``save_to_disk`` folder) has them in
    ``text_column`` (default ``"text"``). ``what`` names the recipe key in error messages.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unknown suffix, an
    empty file, a missing or non-text column, or a null value, each naming the fix.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}={str(path)!r} does not exist: {_FIX}.")
    if text_column is not None and (not isinstance(text_column, str) or not text_column):
        raise ValueError(
            f"text_column={text_column!r} must be a column name (a non-empty string), e.g. text."
        )
    suffix = p.suffix.lower()
    if not p.is_dir() and suffix not in TEXT_FORMATS:
        raise ValueError(f"{what}={str(path)!r} has the suffix {p.suffix!r}: {_FIX}.")
    if not p.is_dir() and p.stat().st_size == 0:
        raise ValueError(f"{what}={str(path)!r} is empty: it must hold at least 2 texts.")
    if not p.is_dir() and TEXT_FORMATS[suffix] is None:
        if text_column is not None:
            raise ValueError(
                f"text_column={text_column!r} with the plain text file {what}={str(path)!r}: a "
                ".txt file has one text per line and no columns; drop text_column."
            )
        raw = p.read_text(encoding="utf-8").splitlines()
    else:
        ds = _read_table(p, what)
        column = text_column or "text"
        if column not in ds.column_names:
            hint = "set text_column: to one of them" if text_column is None else "fix text_column:"
            raise ValueError(
                f"{what}={str(path)!r} has no column {column!r}: its columns are "
                f"{list(ds.column_names)}; {hint}."
            )
        dtype = getattr(ds.features[column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise ValueError(
                f"{what}={str(path)!r}: column {column!r} holds {dtype or 'non-text values'}, "
                "not text: name a column of strings with text_column:."
            )
        raw = ds[column]
        if None in raw:
            row = raw.index(None)
            raise ValueError(
                f"{what}={str(path)!r}: column {column!r} is empty (null) in row {row} "
                "(0-based): fill in or drop that row."
            )
    texts = list(dict.fromkeys(t.strip() for t in raw if t.strip()))
    if len(texts) < 2:
        raise ValueError(
            f"{what}={str(path)!r} holds {len(texts)} distinct non-blank text(s): "
            "distillation compares texts within a batch, so it needs at least 2 (thousands "
            "for a useful fine-tune)."
        )
    return texts
