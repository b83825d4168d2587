"""The shard file format of ``mrl embed --shard I/N`` and the checked merge of ``mrl embed-merge``.

Shard ``I`` of ``N`` holds the contiguous block of rows ``[I*n//N, (I+1)*n//N)`` of the ``n``
texts (:func:`shard_rows`) as ``FOLDER/shard-0000I-of-0000N.npy`` (:func:`shard_path`), an
``(rows, size)`` array, and a JSON sidecar beside it (``format`` :data:`SHARD_FORMAT`: rows,
model name and weights fingerprint, size, adaptor, source, SHA-256 of the ``.npy`` file and of
the texts). :func:`write_shard` writes both atomically, the JSON last, so a shard without its
JSON is not there yet. :func:`merge_shards` checks that all ``N`` shards exist, agree, cover
every row exactly once and pass their checksums, then writes the merged ``(n, size)`` ``.npy``
(row ``i`` = text ``i``), its sidecar, and the manifest (``format`` :data:`MANIFEST_FORMAT`)
last. Every refusal is a ``ValueError`` naming the shard and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka.io import atomic_write_bytes

if TYPE_CHECKING:
    from matryoshka.models.text_encoder import TextEncoder

__all__ = [
    "MANIFEST_FORMAT",
    "SHARD_FORMAT",
    "merge_shards",
    "parse_shard",
    "shard_path",
    "shard_rows",
    "write_shard",
]

#: ``format`` of a shard's JSON sidecar and of the merge manifest.
SHARD_FORMAT = "matryoshka.embed-shard/1"
MANIFEST_FORMAT = "matryoshka.embed-manifest/1"
_SHARD_JSON = re.compile(r"shard-(\d+)-of-(\d+)\.json")
#: The keys of a shard's JSON sidecar, in the order they are written.
_SHARD_KEYS = (
    "format",
    "shard",
    "num_shards",
    "row_start",
    "row_stop",
    "count",
    "total_rows",
    "model",
    "model_fingerprint",
    "size",
    "full_size",
    "dtype",
    "normalized",
    "adaptor",
    "adaptor_sha256",
    "source",
    "texts_sha256",
    "sha256",
)
#: Fields every shard must share, and the fix when one differs from shard 0's.
_SAME_FIX = "re-run it with the same --model, --dim, --adaptor and --normalize as the others"
_SAME_TEXTS = "it was embedded from other texts: re-run it with the same --input/--wordnet options"
_MUST_AGREE = (
    ("model", _SAME_FIX),
    ("model_fingerprint", _SAME_FIX + " (same name, other weights)"),
    ("full_size", _SAME_FIX),
    ("size", _SAME_FIX),
    ("adaptor_sha256", _SAME_FIX),
    ("normalized", _SAME_FIX),
    ("dtype", _SAME_FIX),
    ("total_rows", _SAME_TEXTS),
    ("texts_sha256", _SAME_TEXTS),
)


def parse_shard(spec: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``--shard`` -> ``(index, count)``: ``"I/N"`` (0-based, ``0 <= I < N``), or ``"auto"``:
    torchrun's ``RANK`` and ``WORLD_SIZE`` (global ranks, so it spans machines) from
    ``environ`` (default :data:`os.environ`). Raises ``ValueError`` naming the fix."""
    env = os.environ if environ is None else environ
    if spec == "auto":
        rank, world = env.get("RANK"), env.get("WORLD_SIZE")
        if rank is None or world is None:
            raise ValueError(
                "--shard auto reads RANK and WORLD_SIZE, which are not set: launch with torchrun "
                "(torchrun --nproc-per-node 4 -m matryoshka.cli embed ... --shard auto) or pass "
                "--shard I/N."
            )
        text, where = f"{rank}/{world}", "--shard auto (RANK/WORLD_SIZE)"
    else:
        text, where = spec, "--shard"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise ValueError(
            f"{where} {text!r} is not I/N: pass e.g. --shard 0/4 (block 0 of 4) or --shard auto."
        )
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        n = max(count, 1)
        raise ValueError(
            f"{where} {text!r}: I is 0-based and needs 0 <= I < N, i.e. --shard 0/{n} ... "
            f"--shard {n - 1}/{n}."
        )
    return index, count


def shard_rows(n_rows: int, index: int, count: int) -> tuple[int, int]:
    """Half-open row range ``[start, stop)`` of shard ``index`` of ``count`` over ``n_rows``
    rows: contiguous blocks, in order, sizes differing by at most one, covering each row once."""
    return index * n_rows // count, (index + 1) * n_rows // count


def shard_path(folder: str | Path, index: int, count: int) -> Path:
    """``folder/shard-0000I-of-0000N.npy``; its JSON sidecar is the same path with ``.json``."""
    return Path(folder) / f"shard-{index:05d}-of-{count:05d}.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _adaptor_sha256(adaptor: str | None) -> str | None:
    """SHA-256 of the adaptor's weights file: the same adaptor may lie at other paths elsewhere."""
    if not adaptor:
        return None
    p = Path(adaptor)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return _file_sha256(stem.with_suffix(".safetensors"))


def write_shard(
    folder: str | Path,
    shard: tuple[int, int],
    rows: tuple[int, int],
    texts: Sequence[str],
    source: str,
    encoder: TextEncoder,
    emb: np.ndarray,
    normalized: bool,
    adaptor: str | None = None,
) -> Path:
    """Write shard ``shard = (index, count)``: ``emb (stop - start, size)``, the embeddings of
    rows ``rows = (start, stop)`` of all the ``texts`` (read from ``source``) by ``encoder``,
    ``normalized`` or not, through the fitted ``adaptor`` (its path) if any.

    The ``.npy`` and then its JSON are each written atomically. Returns the ``.npy`` path.
    """
    index, count = shard
    start, stop = rows
    path = shard_path(folder, index, count)
    data = _npy_bytes(emb)
    meta = {
        "format": SHARD_FORMAT,
        "shard": index,
        "num_shards": count,
        "row_start": start,
        "row_stop": stop,
        "count": int(emb.shape[0]),
        "total_rows": len(texts),
        "model": encoder.name,
        "model_fingerprint": encoder.fingerprint(),
        "size": int(emb.shape[1]),
        "full_size": int(encoder.dim),
        "dtype": str(emb.dtype),
        "normalized": bool(normalized),
        "adaptor": str(adaptor) if adaptor else None,
        "adaptor_sha256": _adaptor_sha256(adaptor),
        "source": source,
        "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def _rerun(folder: Path, index: int, count: int) -> str:
    return (
        f"re-run `mrl embed <the same options> --shard {index}/{count} --out {folder}` and merge "
        "again"
    )


def _shard_counts(folder: Path) -> dict[int, set[int]]:
    """``{N: {I, ...}}`` of the ``shard-I-of-N.json`` files in ``folder``."""
    found: dict[int, set[int]] = {}
    for p in folder.iterdir():
        m = _SHARD_JSON.fullmatch(p.name)
        if m:
            found.setdefault(int(m[2]), set()).add(int(m[1]))
    return found


def _check_shard_set(folder: Path) -> int:
    """``N``, once ``folder`` holds the JSON of every shard ``0..N-1`` of one run and no other."""
    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is not a folder: pass the --out folder of `mrl embed --shard`."
        )
    found = _shard_counts(folder)
    if not found:
        raise ValueError(
            f"{folder} holds no shard-*-of-*.json: write the shards with `mrl embed ... "
            f"--shard I/N --out {folder}` (or --shard auto under torchrun) first."
        )
    if len(found) > 1:
        raise ValueError(
            f"{folder} holds shards of runs with different N {sorted(found)}: keep the shards "
            "of one run only (delete the others' shard-*-of-* files or use separate folders)."
        )
    ((count, indices),) = found.items()
    stray = sorted(i for i in indices if i >= count)
    if stray:
        raise ValueError(
            f"{folder} holds shard(s) {stray} of {count}, but shards are numbered 0..{count - 1}: "
            "delete those files."
        )
    missing = [i for i in range(count) if i not in indices]
    if missing:
        i = missing[0]
        also = f" ({len(missing)} shards are missing: {missing})" if len(missing) > 1 else ""
        raise ValueError(
            f"shard {i} of {count} ({shard_path(folder, i, count)}) is missing{also}: "
            f"{_rerun(folder, i, count)}."
        )
    return count


def _read_shard_meta(folder: Path, index: int, count: int) -> dict[str, Any]:
    """Shard ``index``'s JSON, checked to be a whole shard sidecar of that name."""
    path = shard_path(folder, index, count).with_suffix(".json")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"shard {index} ({path}) is not readable JSON ({e}): {_rerun(folder, index, count)}."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ValueError(
            f"shard {index} ({path}) is not a shard written by `mrl embed --shard` (format "
            f"{SHARD_FORMAT!r}): {_rerun(folder, index, count)}."
        )
    missing = [k for k in _SHARD_KEYS if k not in meta]
    if missing or (meta["shard"], meta["num_shards"]) != (index, count):
        raise ValueError(
            f"shard {index} ({path}) is damaged or renamed (missing {missing}, or it says shard "
            f"{meta.get('shard')} of {meta.get('num_shards')}): {_rerun(folder, index, count)}."
        )
    return meta


def _check_agreement(folder: Path, metas: Sequence[dict[str, Any]]) -> None:
    """Every shard has shard 0's model, weights, sizes, adaptor, normalization and texts."""
    count, ref = len(metas), metas[0]
    for i, meta in enumerate(metas[1:], 1):
        for key, fix in _MUST_AGREE:
            if meta[key] != ref[key]:
                raise ValueError(
                    f"shard {i} ({shard_path(folder, i, count)}) has {key}={meta[key]!r} but "
                    f"shard 0 has {key}={ref[key]!r}: {fix} ({_rerun(folder, i, count)})."
                )


def _check_rows(folder: Path, metas: Sequence[dict[str, Any]]) -> None:
    """The shards' row blocks follow each other and cover rows ``0..total_rows-1`` once."""
    count, row = len(metas), 0
    for i, meta in enumerate(metas):
        start, stop = meta["row_start"], meta["row_stop"]
        if start != row or stop < start or meta["count"] != stop - start:
            raise ValueError(
                f"shard {i} ({shard_path(folder, i, count)}) holds rows {start}:{stop} "
                f"({meta['count']} rows) but the shards before it end at row {row}: rows would "
                f"be missed or doubled; {_rerun(folder, i, count)}."
            )
        row = stop
    if row != metas[0]["total_rows"]:
        raise ValueError(
            f"the shards in {folder} cover rows 0:{row} of {metas[0]['total_rows']}: "
            f"{_rerun(folder, count - 1, count)}."
        )


def _load_shard(folder: Path, index: int, count: int, meta: dict[str, Any]) -> np.ndarray:
    """Shard ``index``'s ``(count, size)`` array (memory-mapped), once it passes its checksum
    and matches its JSON's shape and dtype."""
    npy = shard_path(folder, index, count)
    if not npy.is_file():
        raise ValueError(f"shard {index} ({npy}) is missing: {_rerun(folder, index, count)}.")
    digest = _file_sha256(npy)
    if digest != meta["sha256"]:
        raise ValueError(
            f"shard {index} ({npy}) fails its checksum (SHA-256 {digest[:12]}..., its .json says "
            f"{meta['sha256'][:12]}...): the file is corrupted or torn; "
            f"{_rerun(folder, index, count)}."
        )
    arr: np.ndarray = np.load(npy, mmap_mode="r", allow_pickle=False)
    if arr.shape != (meta["count"], meta["size"]) or str(arr.dtype) != meta["dtype"]:
        raise ValueError(
            f"shard {index} ({npy}) holds a {arr.dtype} array of shape {arr.shape}, not "
            f"({meta['count']}, {meta['size']}) {meta['dtype']}: {_rerun(folder, index, count)}."
        )
    return arr


def _manifest(
    folder: Path, metas: Sequence[dict[str, Any]], out: Path, shape: tuple[int, ...], data: bytes
) -> dict[str, Any]:
    """The manifest of a merge: what the shards share, each shard's rows and checksum, and the
    merged file (``shape``, SHA-256 of its bytes ``data``)."""
    ref, count = metas[0], len(metas)
    shared = ("model", "model_fingerprint", "size", "full_size", "dtype", "normalized")
    return {
        "format": MANIFEST_FORMAT,
        "num_shards": count,
        "rows": ref["total_rows"],
        **{k: ref[k] for k in shared},
        "adaptor": ref["adaptor"],
        "adaptor_sha256": ref["adaptor_sha256"],
        "source": ref["source"],
        "texts_sha256": ref["texts_sha256"],
        "shards": [
            {
                "file": shard_path(folder, i, count).name,
                "shard": i,
                "row_start": m["row_start"],
                "row_stop": m["row_stop"],
                "count": m["count"],
                "sha256": m["sha256"],
            }
            for i, m in enumerate(metas)
        ],
        "merged": {
            "path": str(out),
            "shape": list(shape),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }


def merge_shards(
    folder: str | Path, out: str | Path, manifest: str | Path | None = None
) -> dict[str, Any]:
    """Check the shards of ``mrl embed --shard`` in ``folder`` and merge them into ``out``.

    All ``N`` shards must exist, agree on model (name and weights), size, adaptor, normalization
    and source texts, cover rows ``0..n-1`` exactly once and match their SHA-256; otherwise a
    :class:`ValueError` names the shard and the fix, and nothing is written. Writes (each
    atomically) ``out``: the ``(n, size)`` array in original row order, its JSON sidecar (as
    ``mrl embed`` writes, plus the manifest's path), then ``manifest`` (default
    ``folder/manifest.json``). Returns the manifest.
    """
    folder, out = Path(folder), Path(out)
    manifest_path = folder / "manifest.json" if manifest is None else Path(manifest)
    if out.suffix != ".npy":
        raise ValueError(f"--out {str(out)!r} must end in .npy, e.g. corpus.npy.")
    count = _check_shard_set(folder)
    metas = [_read_shard_meta(folder, i, count) for i in range(count)]
    _check_agreement(folder, metas)
    _check_rows(folder, metas)
    arrays = [_load_shard(folder, i, count, meta) for i, meta in enumerate(metas)]
    merged = np.concatenate(arrays, axis=0)  # (n, size), row i = text i
    data = _npy_bytes(merged)
    atomic_write_bytes(out, data)
    ref = metas[0]
    sidecar = {
        "model": ref["model"],
        "size": ref["size"],
        "full_size": ref["full_size"],
        "count": int(merged.shape[0]),
        "dtype": str(merged.dtype),
        "normalized": ref["normalized"],
        "adaptor": ref["adaptor"],
        "source": ref["source"],
        "manifest": str(manifest_path),
    }
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    result = _manifest(folder, metas, out, merged.shape, data)
    atomic_write_bytes(manifest_path, json.dumps(result, indent=2).encode())
    return result
