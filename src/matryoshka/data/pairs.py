"""Your own text pairs for fine-tuning: JSONL, CSV, Parquet or a saved Hugging Face dataset.

    data: pairs.jsonl                 # {"anchor": "...", "positive": "..."} per line
    data: pairs.csv                   # a header row, then one pair per row
    data: pairs.parquet
    data: my_dataset/                 # written by datasets' Dataset.save_to_disk (or a DatasetDict
                                      # with a "train" split)
    columns: [query, doc]             # which columns are (anchor, positive[, negative, ...])

:func:`load_pairs` reads the file with Hugging Face ``datasets`` and returns a ``Dataset`` whose
columns are exactly ``anchor``, ``positive`` and, with hard negatives, ``negative`` (or
``negative_1``, ``negative_2``, ... for several): the layout sentence-transformers' trainer and
:class:`~matryoshka.losses.sentence_transformers.FusedMatryoshkaLoss` take. Without ``columns``
the file must have ``anchor`` and ``positive`` columns (a ``negative`` column is used when
present); other columns are dropped.

Bad input is an error that says where: a malformed JSONL line names the file and its line
number, a missing column names the columns the file has, a null or non-text value names its
column and row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["PAIR_FORMATS", "load_pairs", "pair_columns", "pairs_from_lists"]

#: File suffixes :func:`load_pairs` reads, and the ``datasets`` builder of each.
PAIR_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_DEFAULT = ("anchor", "positive")
_EXAMPLE = '{"anchor": "what is a cat?", "positive": "A cat is a small domesticated feline."}'


def pair_columns(n: int) -> list[str]:
    """The trainer's names for ``n >= 2`` text columns: anchor, positive, then the negatives."""
    if n == 2:
        return list(_DEFAULT)
    if n == 3:
        return [*_DEFAULT, "negative"]
    return [*_DEFAULT, *(f"negative_{i}" for i in range(1, n - 1))]


def pairs_from_lists(anchors: Sequence[str], positives: Sequence[str]) -> Dataset:
    """A ``Dataset`` with columns ``anchor`` and ``positive`` from two equally long lists."""
    from datasets import Dataset

    if len(anchors) != len(positives) or len(anchors) < 2:
        raise ValueError(
            f"anchors has {len(anchors)} texts and positives {len(positives)}: pass at least "
            "2 pairs, the same number of each."
        )
    return Dataset.from_dict({"anchor": list(anchors), "positive": list(positives)})


def _first_bad_jsonl_line(path: Path) -> tuple[int, str] | None:
    """``(line number, reason)`` of the first line that is not one JSON object, else None.

    Only called after ``datasets`` has refused the file, to say where the problem is.
    """
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return number, f"not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(value, dict):
                return number, f"a JSON {type(value).__name__}, not an object"
    return None


def read_table(
    path: Path,
    what: str,
    formats: dict[str, str],
    fix: str,
    rows: str = "the training pairs",
    example: str = _EXAMPLE,
) -> Dataset:
    """The file or saved dataset at ``path`` as one ``Dataset`` (all its columns).

    ``formats`` maps a file suffix to its ``datasets`` builder; ``what`` (the recipe key),
    ``fix`` (what to pass instead), ``rows`` (what the rows are) and ``example`` (one JSONL
    line) word the errors: a folder
    that is no saved dataset, a ``DatasetDict`` without a ``train`` split, an unknown suffix,
    a file the parser refuses (for JSONL: the first bad line).
    """
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(
                f"{what}={str(path)!r} is a folder but not a saved Hugging Face dataset ({e}): "
                f"{fix}."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(
                    f"{what}={str(path)!r} is a DatasetDict with splits {sorted(loaded)} but no "
                    f"'train' split: save {rows} as the 'train' split (or as a single Dataset)."
                )
            return loaded["train"]
        return loaded
    builder = formats.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{what}={str(path)!r} has the suffix {path.suffix!r}: {fix}.")
    try:
        out = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps the parser's error; say which line is bad
        if builder == "json":
            bad = _first_bad_jsonl_line(path)
            if bad is not None:
                raise ValueError(
                    f"{path}, line {bad[0]}: {bad[1]}: each line of a JSONL file must be one "
                    f"JSON object, e.g. {example}"
                ) from None
        raise ValueError(f"{what}={str(path)!r} could not be read as {builder}: {e}") from e
    assert isinstance(out, datasets.Dataset)
    return out


def _read(path: Path, what: str) -> Dataset:
    """The pairs file or saved dataset at ``path`` as one ``Dataset`` (all its columns)."""
    fix = f"pass a {'/'.join(PAIR_FORMATS)} file or a folder written by Dataset.save_to_disk"
    return read_table(path, what, PAIR_FORMATS, fix)


def load_pairs(
    path: str | Path, columns: Sequence[str] | None = None, what: str = "data"
) -> Dataset:
    """Training pairs from ``path``: a ``Dataset`` with columns anchor, positive[, negative...].

    ``columns`` names the file's columns to use, in the order (anchor, positive, negatives...);
    ``None`` uses ``anchor`` and ``positive`` (and ``negative`` when present). ``what`` names the
    recipe key in error messages (``data`` or ``eval_data``). Raises ``FileNotFoundError`` for a
    missing path and ``ValueError`` for a malformed file, missing columns, nulls, non-text values
    or fewer than 2 rows, each naming the file, the column or row, and the fix.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{what}={str(path)!r} does not exist: pass a .jsonl/.csv/.parquet file of "
            "(anchor, positive) pairs or a folder written by Dataset.save_to_disk."
        )
    if columns is not None:
        cols = list(columns)
        if (
            len(cols) < 2
            or len(set(cols)) != len(cols)
            or not all(isinstance(c, str) for c in cols)
        ):
            raise ValueError(
                f"columns={cols!r} must name 2 or more different columns: (anchor, positive"
                "[, negative, ...]), e.g. columns: [query, doc]."
            )
    ds = _read(p, what)
    found = list(ds.column_names)
    if columns is None:
        cols = [*_DEFAULT, *(["negative"] if "negative" in found else [])]
    missing = [c for c in cols if c not in found]
    if missing:
        hint = (
            f"set columns: [{', '.join(found[:2])}] in the recipe (anchor column first)"
            if columns is None and len(found) >= 2
            else "fix columns: in the recipe, or rename the file's columns"
        )
        raise ValueError(
            f"{what}={str(path)!r} has no column {', '.join(repr(c) for c in missing)}: its columns "
            f"are {found}; {hint}."
        )
    ds = ds.select_columns(cols)
    for c in cols:
        _check_text_column(ds, c, p, what)
    if len(ds) < 2:
        raise ValueError(
            f"{what}={str(path)!r} holds {len(ds)} row(s): in-batch negatives need at least 2 "
            "pairs (thousands for a useful fine-tune)."
        )
    names = pair_columns(len(cols))
    if cols != names:
        # two steps, so that e.g. columns [positive, anchor] never collide while renaming
        tmp = {c: f"__mrl_{i}" for i, c in enumerate(cols)}
        ds = ds.rename_columns(tmp).rename_columns({f"__mrl_{i}": n for i, n in enumerate(names)})
    return ds


def _check_text_column(ds: Dataset, column: str, path: Path, what: str) -> None:
    """Raise naming ``column`` (and its first bad row) unless it holds strings only."""
    feature: Any = ds.features[column]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(
            f"{what}={str(path)!r}: column {column!r} holds {dtype or type(feature).__name__}, "
            "not text: every anchor, positive and negative must be a string."
        )
    arrow = ds.data.column(column)
    if arrow.null_count:
        row = next(i for i, v in enumerate(arrow.to_pylist()) if v is None)
        raise ValueError(
            f"{what}={str(path)!r}: column {column!r} is empty (null) in row {row} (0-based, "
            f"{arrow.null_count} such row(s)): fill in or drop those rows."
        )
