"""The nesting ladder: which prefix sizes of an embedding are trained, and with what weight.

Everything that needs the sizes takes a :class:`Nesting`. It validates once, here, so the rest
of the library trusts it (STYLE.md principle 2).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from matryoshka._validate import positive_int

__all__ = ["Nesting"]


class Nesting:
    """An increasing ladder of prefix sizes ``m_1 < m_2 < ... < m_L`` with one weight each.

    The last size is the embedding dimension ``d``: prefix ``z[:, :m_L]`` is the whole vector.
    Iterating a ``Nesting`` yields the sizes.

    Args:
        sizes: strictly increasing positive ints, e.g. ``[8, 16, 32, 64]``.
        weights: one non-negative float per size (the ``c_m`` of the paper's loss); all ones if
            omitted. Their sum must be positive.

    Example:
        >>> n = Nesting.doubling(8, 64)
        >>> list(n), n.dim
        ([8, 16, 32, 64], 64)
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None) -> None:
        sizes = list(sizes)
        if not sizes:
            raise ValueError(
                "sizes=[] is empty: a Nesting needs at least one size, e.g. Nesting([8, 16, 32])."
            )
        for m in sizes:
            if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
                raise ValueError(
                    f"sizes={sizes} contains {m!r}, which is not a positive int: "
                    "every size must be an int >= 1."
                )
        for a, b in itertools.pairwise(sizes):
            if a == b:
                raise ValueError(
                    f"sizes={sizes} repeats {a}: every size must appear once; "
                    f"use sorted(set(sizes)) = {sorted(set(sizes))}."
                )
            if b < a:
                raise ValueError(
                    f"sizes={sizes} is not sorted: sizes must increase; "
                    f"use sorted(sizes) = {sorted(sizes)}."
                )
        if weights is None:
            weights = [1.0] * len(sizes)
        weights = [float(w) for w in weights]
        if len(weights) != len(sizes):
            raise ValueError(
                f"weights={weights} has {len(weights)} entries but sizes={sizes} has "
                f"{len(sizes)}: give one weight per size, or omit weights for all ones."
            )
        for w in weights:
            if not w >= 0.0 or w == float("inf"):  # also rejects NaN
                raise ValueError(
                    f"weights={weights} contains {w}: every weight must be a finite float >= 0."
                )
        if sum(weights) <= 0.0:
            raise ValueError(
                f"weights={weights} are all zero: at least one size must have a positive weight."
            )
        self._sizes: tuple[int, ...] = tuple(sizes)
        self._weights: tuple[float, ...] = tuple(weights)

    @classmethod
    def doubling(cls, start: int, stop: int, weights: Sequence[float] | None = None) -> Nesting:
        """The ladder ``start, 2·start, 4·start, ...`` up to ``stop``; ``stop`` is always included.

        ``Nesting.doubling(8, 2048)`` is the paper's ResNet-50 ladder (9 sizes);
        ``Nesting.doubling(8, 100)`` is ``[8, 16, 32, 64, 100]``.
        """
        positive_int(start, "start", "Nesting.doubling(8, 2048)")
        if isinstance(stop, bool) or not isinstance(stop, int) or stop < start:
            raise ValueError(
                f"stop={stop!r} must be an int >= start={start}, e.g. Nesting.doubling(8, 2048)."
            )
        sizes = []
        m = start
        while m < stop:
            sizes.append(m)
            m *= 2
        sizes.append(stop)
        return cls(sizes, weights)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes, increasing."""
        return self._sizes

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per size."""
        return self._weights

    @property
    def dim(self) -> int:
        """The largest size: the embedding dimension this ladder is used with."""
        return self._sizes[-1]

    @property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` column ranges between consecutive sizes: ``(0, m_1), (m_1, m_2), ...``.

        Size ``m_l`` is the union of the first ``l`` chunks; fused heads and similarities work
        chunk by chunk and keep running sums.
        """
        starts = (0, *self._sizes[:-1])
        return tuple(zip(starts, self._sizes, strict=True))

    def index(self, m: int) -> int:
        """Position of size ``m`` in the ladder; a clear error if ``m`` is not on it."""
        try:
            return self._sizes.index(m)
        except ValueError:
            raise ValueError(
                f"m={m!r} is not on the nesting ladder {list(self._sizes)}: pick one of those sizes."
            ) from None

    def check_dim(self, dim: int, name: str = "in_features") -> None:
        """Raise if the largest size differs from the embedding size ``dim`` it is used with."""
        if dim != self.dim:
            raise ValueError(
                f"{name}={dim} but the nesting's largest size is {self.dim} (sizes={list(self._sizes)}): "
                f"the last size must equal the embedding size; use e.g. "
                f"Nesting.doubling({self._sizes[0]}, {dim}) or set {name}={self.dim}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` inverts it."""
        return {"sizes": list(self._sizes), "weights": list(self._weights)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Nesting:
        """Rebuild from :meth:`to_dict` output."""
        return cls(data["sizes"], data.get("weights"))

    def __iter__(self) -> Iterator[int]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i: int) -> int:
        return self._sizes[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Nesting):
            return NotImplemented
        return self._sizes == other._sizes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self._sizes, self._weights))

    def __repr__(self) -> str:
        if all(w == 1.0 for w in self._weights):
            return f"Nesting({list(self._sizes)})"
        return f"Nesting({list(self._sizes)}, weights={list(self._weights)})"
