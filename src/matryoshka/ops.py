"""Prefix operations on embeddings: the one place that knows how to cut and scale a prefix.

Every other module truncates, normalises and compares prefixes through these functions.
"""

from __future__ import annotations

import numpy as np
import torch

from matryoshka.nesting import Nesting

__all__ = [
    "normalize",
    "prefix_norms",
    "prefix_similarities",
    "truncate",
    "truncate_numpy",
]


def _check_m(m: int, dim: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= dim:
        raise ValueError(
            f"m={m!r} is not a valid prefix size for embeddings of size {dim}: "
            f"use an int in [1, {dim}]."
        )


def normalize(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last axis: ``(..., d) -> (..., d)``; zero vectors stay zero."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(eps)


def truncate(z: torch.Tensor, m: int, normalize: bool = False) -> torch.Tensor:
    """The first ``m`` coordinates of each embedding: ``(..., d) -> (..., m)``.

    With ``normalize=True`` each prefix is rescaled to unit L2 norm (what cosine similarity and
    inner-product search at size ``m`` need). The result is a view unless normalised.
    """
    _check_m(m, z.shape[-1])
    out = z[..., :m]
    if normalize:
        out = _normalize(out)
    return out


_normalize = normalize  # `truncate` shadows the name with its keyword argument


def truncate_numpy(z: np.ndarray, m: int, normalize: bool = False) -> np.ndarray:
    """NumPy twin of :func:`truncate` for evaluation and indexes: ``(n, d) -> (n, m)`` float32."""
    _check_m(m, z.shape[-1])
    out = np.ascontiguousarray(z[..., :m], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return out


def prefix_norms(z: torch.Tensor, nesting: Nesting) -> torch.Tensor:
    """L2 norms of every prefix on the ladder in one pass: ``(B, d) -> (L, B)``.

    Squared norms of the chunks are summed cumulatively, so all sizes cost one pass over ``z``.
    """
    nesting.check_dim(z.shape[-1], "z.shape[-1]")
    chunk_sq = torch.stack([z[:, a:b].pow(2).sum(-1) for a, b in nesting.chunks])  # (L, B)
    return chunk_sq.cumsum(0).sqrt()


def prefix_similarities(
    q: torch.Tensor, k: torch.Tensor, nesting: Nesting, cosine: bool = True
) -> torch.Tensor:
    """Similarities of every query to every key at every prefix size: ``(Q, d), (N, d) -> (L, Q, N)``.

    The prefix dot products are a cumulative sum of chunk products, so all ``L`` sizes cost one
    full-size ``Q x N`` product plus ``L - 1`` additions. With ``cosine=True`` each size is divided
    by the prefix norms (cosine similarity of ``q[:, :m]`` and ``k[:, :m]``).
    """
    nesting.check_dim(q.shape[-1], "q.shape[-1]")
    nesting.check_dim(k.shape[-1], "k.shape[-1]")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # Autograd path: chunk products stacked and summed cumulatively (one extra copy).
        out = torch.stack([q[:, a:b] @ k[:, a:b].T for a, b in nesting.chunks]).cumsum(0)
    else:
        out = q.new_empty((len(nesting), q.shape[0], k.shape[0]))  # (L, Q, N)
        prev: torch.Tensor | None = None
        for i, (a, b) in enumerate(nesting.chunks):
            if prev is None:
                torch.mm(q[:, a:b], k[:, a:b].T, out=out[i])
            else:
                torch.addmm(prev, q[:, a:b], k[:, a:b].T, out=out[i])
            prev = out[i]
    if cosine:
        qn = prefix_norms(q, nesting).clamp_min(1e-12)  # (L, Q)
        kn = prefix_norms(k, nesting).clamp_min(1e-12)  # (L, N)
        out = out / (qn[:, :, None] * kn[:, None, :])
    return out
