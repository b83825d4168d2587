"""The funnel's rerank matrix: the full-size corpus (float32, float16 or int8 on disk, read
memory-mapped) plus one float32 multiplier per row and rerank size, computed once at build.

A rerank stage at prefix size ``m`` scores candidate row ``r`` against query ``q`` as

    score = <stored_r[:m], q̂[:m]> * factor[r, j]          (j = the stage's index in the chain)

where ``q̂[:m]`` is the query's ``m``-prefix (unit-normalised when ``normalize``) and

* float32 / float16 rows: ``stored_r = x_r`` (cast), ``factor = 1 / max(|stored_r[:m]|, 1e-12)``
  when ``normalize``, else ``1``;
* int8 rows: ``stored_r = round(x_r / s_r)`` in ``[-127, 127]`` with the per-row scale
  ``s_r = max_j |x_rj| / 127`` (``1`` for a zero row), ``factor = s_r / max(|s_r · stored_r[:m]|,
  1e-12)`` when ``normalize`` (the scale cancels), else ``s_r``.

So the rerank is a gather + dot + scale, with no per-query renormalisation of corpus rows. The
norms are those of the *stored* rows, so float16 / int8 scores are exact cosines of the stored
(rounded) vectors: within ~1e-3 (float16) and ~2e-2 (int8) of the float32 cosines for unit-scale
embeddings. float32 scores equal the per-query-normalising kernel up to float rounding (~1e-7).

:class:`PrefixMatrix` holds the matrix and the factors; :meth:`PrefixMatrix.build` writes the
matrix to a ``.npy`` file (and maps it back read-only) or keeps it in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka._validate import positive_int
from matryoshka.retrieval.index import CHUNK_ROWS

__all__ = ["RERANK_DTYPES", "PrefixMatrix", "file_sha256"]

RERANK_DTYPES = ("float32", "float16", "int8")
_EPS = 1e-12


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read ``block`` bytes at a time (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_dtype(dtype: Any, name: str = "rerank_dtype") -> str:
    """``dtype`` as one of :data:`RERANK_DTYPES`; a clear error otherwise."""
    if dtype not in RERANK_DTYPES:
        raise ValueError(
            f"{name}={dtype!r} is not supported: use one of {list(RERANK_DTYPES)} (the storage of "
            f"the full-size rerank matrix)."
        )
    return str(dtype)


def _encode_block(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(n, d)`` float rows -> stored rows ``(n, d)`` of ``dtype`` and scales ``(n,)`` float32."""
    x = np.asarray(x, np.float32)
    if dtype == "int8":
        amax = np.abs(x).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
        return codes, scale
    return x.astype(dtype, copy=False), np.ones(x.shape[0], np.float32)


def _factors_block(
    stored: np.ndarray, scale: np.ndarray, chain: Sequence[int], normalize: bool
) -> np.ndarray:
    """Per-row, per-size multipliers ``(n, len(chain))`` float32 of stored rows ``(n, d)``."""
    out = np.empty((stored.shape[0], len(chain)), np.float32)
    for j, m in enumerate(chain):
        if not normalize:
            out[:, j] = scale
            continue
        rows = np.ascontiguousarray(stored[:, :m], dtype=np.float32) * scale[:, None]
        out[:, j] = scale / np.maximum(np.linalg.norm(rows, axis=-1), _EPS)
    return out


@dataclass
class PrefixMatrix:
    """The rerank matrix of a funnel and its precomputed per-row, per-size factors.

    Attributes:
        matrix: ``(N, d)`` stored rows: float32 / float16 / int8 (``dtype``), an array or a
            read-only ``np.memmap`` of ``path``.
        factors: ``(N, len(chain))`` float32; column ``j`` multiplies the dot products at size
            ``chain[j]`` (see the module docstring).
        chain: the rerank sizes the factors are for, strictly increasing, ``<= d``.
        normalize: whether the factors include the prefix inverse norms (cosine).
        dtype: one of :data:`RERANK_DTYPES`.
        scale: ``(N,)`` float32 per-row scales of int8 rows (ones otherwise).
        path: the ``.npy`` the matrix is mapped from, or ``None`` when in memory.
    """

    matrix: np.ndarray
    factors: np.ndarray
    chain: tuple[int, ...]
    normalize: bool
    dtype: str
    scale: np.ndarray
    path: Path | None = None

    @classmethod
    def build(
        cls,
        corpus: np.ndarray,
        chain: Sequence[int],
        *,
        dtype: str = "float32",
        normalize: bool = True,
        path: str | os.PathLike[str] | None = None,
        step: int = CHUNK_ROWS,
    ) -> PrefixMatrix:
        """Store ``corpus`` ``(N, d)`` as ``dtype`` and compute the factors, ``step`` rows at a time.

        With ``path``, the stored matrix is written to that ``.npy`` and mapped back read-only;
        without, a float32 ``corpus`` (e.g. already memory-mapped) is used as it is and anything
        else is stored in memory.
        """
        dtype = check_dtype(dtype)
        step = positive_int(step, "step")
        chain = tuple(int(m) for m in chain)
        n, d = corpus.shape
        if not chain or chain[-1] > d:
            raise ValueError(f"chain={list(chain)} must be non-empty sizes <= d={d}.")
        out: np.ndarray
        target: Path | None = None if path is None else Path(path)
        if target is not None:
            source = getattr(corpus, "filename", None)
            if source is not None and Path(source).resolve() == target.resolve():
                raise ValueError(
                    f"path={str(target)!r} is the corpus file itself: give another path for the "
                    f"{dtype} rerank matrix (or path=None to read the float32 corpus as it is)."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=(n, d))
        elif dtype == "float32" and corpus.dtype == np.float32:
            out = corpus  # read as it is (a memory-mapped corpus stays on disk)
        else:
            out = np.empty((n, d), dtype)
        factors = np.empty((n, len(chain)), np.float32)
        scale = np.ones(n, np.float32)
        for s in range(0, n, step):
            stored, sc = _encode_block(corpus[s : s + step], dtype)
            if out is not corpus:
                out[s : s + step] = stored
            scale[s : s + step] = sc
            factors[s : s + step] = _factors_block(stored, sc, chain, normalize)
        if target is not None:
            assert isinstance(out, np.memmap)
            out.flush()
            del out
            out = np.load(target, mmap_mode="r")
        return cls(out, factors, chain, bool(normalize), dtype, scale, target)

    @property
    def ntotal(self) -> int:
        """``N``, the number of rows."""
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        """``d``, the full size of the rows."""
        return int(self.matrix.shape[1])

    @property
    def mapped(self) -> bool:
        """Whether the matrix is read from a file (memory-mapped) rather than held in memory."""
        return isinstance(self.matrix, np.memmap)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: the factors, the int8 scales, and the matrix unless mapped."""
        extra = self.scale.nbytes if self.dtype == "int8" else 0
        return int(self.factors.nbytes + extra + (0 if self.mapped else self.matrix.nbytes))

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the memory-mapped matrix file (0 when the matrix is in memory)."""
        return int(self.matrix.nbytes) if self.mapped else 0

    def factors_for(self, chain: Sequence[int]) -> np.ndarray:
        """The factor columns of ``chain`` (each size must be one the matrix was built for):
        ``(N, len(chain))`` float32."""
        cols = []
        for m in chain:
            if int(m) not in self.chain:
                raise ValueError(
                    f"rerank size {m} has no precomputed factors: the prefix matrix was built for "
                    f"chain={list(self.chain)}; rebuild it with a chain containing {m}."
                )
            cols.append(self.chain.index(int(m)))
        return self.factors if cols == list(range(len(self.chain))) else self.factors[:, cols]

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """The float32 rows ``(n, d)`` that stored rows ``rows`` (ids ``(n,)``) stand for."""
        rows = np.asarray(rows, np.int64)
        return np.asarray(self.matrix[rows], np.float32) * self.scale[rows, None]
