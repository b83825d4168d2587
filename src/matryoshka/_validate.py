"""Checks of user input written once: every error names the parameter, the value and the fix.

Validation happens at the edge (config ``__post_init__``, estimator ``__init__``/``fit``, CLI
arguments); inner code trusts what passed these checks. No torch import here: the CLI uses these
before any heavy module is loaded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from matryoshka.nesting import Nesting

__all__ = [
    "as_embeddings",
    "check_nesting",
    "nonnegative_int",
    "positive_float",
    "positive_int",
]


def _is_int(value: Any) -> bool:
    import numbers

    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def positive_int(value: Any, name: str, example: Any = None) -> int:
    """``value`` as an ``int`` if it is an integer ``>= 1``; else ``ValueError`` naming ``name``
    (``"name=0 must be a positive int, e.g. 64."``)."""
    if not _is_int(value) or value < 1:
        hint = "" if example is None else f", e.g. {example}"
        raise ValueError(f"{name}={value!r} must be a positive int{hint}.")
    return int(value)


def nonnegative_int(value: Any, name: str, zero: str = "0 turns it off") -> int:
    """``value`` as an ``int`` if it is an integer ``>= 0``; else ``ValueError`` naming ``name``
    and what ``0`` means."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be an int >= 0 ({zero}).")
    return int(value)


def positive_float(value: Any, name: str, example: Any = None) -> float:
    """``value`` as a ``float`` if it is a finite number ``> 0``; else ``ValueError``."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value <= 0:
        hint = "" if example is None else f", e.g. {example}"
        raise ValueError(f"{name}={value!r} must be a positive finite float{hint}.")
    return float(value)


def check_nesting(nesting: Any, example: str | None = None) -> Nesting:
    """``nesting`` itself if it is a :class:`~matryoshka.nesting.Nesting`; else ``TypeError``
    showing how to build one (``example``, default ``Nesting(<the given list>)``)."""
    from matryoshka.nesting import Nesting

    if isinstance(nesting, Nesting):
        return nesting
    if example is None:
        example = (
            f"Nesting({list(nesting)})"
            if isinstance(nesting, list | tuple)
            else "Nesting([8, 16, 32])"
        )
    raise TypeError(
        f"nesting={nesting!r} is a {type(nesting).__name__}: pass a Nesting, e.g. {example}."
    )


def as_embeddings(x: Any, name: str, dim: int | None = None, finite: bool = False) -> np.ndarray:
    """``x`` as a float32 ``(n, d)`` array (``d == dim`` when given); ``ValueError`` naming
    ``name`` and the shape otherwise. ``finite``: also reject NaN and inf."""
    import numpy as np

    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(f"{name}.shape={arr.shape}: pass a 2-D array of embeddings {want}.")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf: clean the embeddings first.")
    return arr
