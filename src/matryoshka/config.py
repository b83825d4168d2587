"""Recipes: config dataclasses read from YAML files and command-line flags, one way for all.

Every command's options are a dataclass whose fields carry their help text
(:func:`help_field`); a YAML recipe is a mapping of those fields; flags given on the command line
override the recipe. :func:`load_recipe` is the one reader:

    config = load_recipe("configs/mnist_mrl.yaml", TrainConfig, overrides={"epochs": 3})

The nesting ladder is spelled one way in recipes: ``sizes: [8, 16, 32, 64]``. The older
spellings (``nesting`` / ``nesting_start`` / ``embed_dim``) are still read, with a
``FutureWarning``, for one release. This module imports neither torch nor numpy, so building the
CLI's help is fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "LADDER_KEY",
    "from_dict",
    "help_field",
    "ladder_fields",
    "load_recipe",
    "load_yaml",
]

C = TypeVar("C")

#: The recipe key of the nesting ladder.
LADDER_KEY = "sizes"
_OLD_LADDER_KEYS = ("nesting", "nesting_start", "embed_dim")


def help_field(text: str, **kw: Any) -> Any:
    """A dataclass field whose ``text`` becomes the CLI flag's help (and the recipe key's doc)."""
    return dataclasses.field(metadata={"help": text}, **kw)


def _known(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """``cls(**data)`` for the config dataclass ``cls``; unknown keys are a ``ValueError`` that
    names them, suggests the closest known key and lists the known ones."""
    known = _known(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown config keys {unknown} for {cls.__name__}{hint}: known keys are "
            f"{sorted(known)}."
        )
    return cls(**data)


def load_yaml(path: str | Path, what: str = "config fields") -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ``FileNotFoundError`` / ``ValueError`` naming the
    file otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist: pass a YAML recipe.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of {what}.")
    return data


def _doubling(start: int, stop: int) -> list[int]:
    from matryoshka.nesting import Nesting

    return list(Nesting.doubling(min(start, stop), stop))


def ladder_fields(cls: type, sizes: Any, where: str = "recipe") -> dict[str, Any]:
    """The fields of ``cls`` that spell the ladder ``sizes`` (the recipe's ``sizes: [...]``).

    A config with a ``sizes`` field takes it as is; one with ``nesting`` and ``embed_dim``
    (:class:`~matryoshka.training.config.TrainConfig`) gets ``nesting=sizes`` and
    ``embed_dim=sizes[-1]``; one with ``embed_dim`` and ``nesting_start`` trains the doubling
    ladder, so ``sizes`` must be one (``[2, 4, 8, ..., d]``).
    """
    known = set(_known(cls))
    if "sizes" in known:
        return {"sizes": sizes}
    if not isinstance(sizes, list) or not sizes or not all(isinstance(m, int) for m in sizes):
        raise ValueError(f"{where}: sizes={sizes!r} must be a list of ints, e.g. [8, 16, 32, 64].")
    if {"nesting", "embed_dim"} <= known:
        return {"nesting": sizes, "embed_dim": sizes[-1]}
    if {"nesting_start", "embed_dim"} <= known:
        want = _doubling(sizes[0], sizes[-1])
        if sizes != want:
            raise ValueError(
                f"{where}: sizes={sizes} is not a doubling ladder, and {cls.__name__} trains "
                f"one: use sizes: {want}."
            )
        return {"nesting_start": sizes[0], "embed_dim": sizes[-1]}
    raise ValueError(f"{where}: {cls.__name__} has no nesting ladder: remove the key 'sizes'.")


def _read_ladder(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` with the recipe's ``sizes`` turned into ``cls``'s fields; old spellings are
    read with a ``FutureWarning``."""
    known = set(_known(cls))
    if "sizes" in known:
        return data
    old = [k for k in _OLD_LADDER_KEYS if k in data and k in known]
    if LADDER_KEY in data:
        if old:
            raise ValueError(
                f"{where} gives the ladder twice (sizes and {old}): keep only sizes: "
                f"{data[LADDER_KEY]}."
            )
        rest = {k: v for k, v in data.items() if k != LADDER_KEY}
        return {**rest, **ladder_fields(cls, data[LADDER_KEY], where)}
    if old:
        warnings.warn(
            f"{where}: the recipe keys {old} are deprecated and will stop working in the next "
            f"release: spell the ladder as one list, e.g. sizes: [8, 16, 32, 64].",
            FutureWarning,
            stacklevel=3,
        )
    return data


def load_recipe(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> C:
    """The config ``cls`` from a YAML recipe (``path``) or an already-read mapping (``data``),
    with ``overrides`` (the flags given on the command line) applied last.

    ``drop`` names keys that select the entry point (``task``, ``app``) and are not fields.
    Unknown keys are a ``ValueError`` naming them (:func:`from_dict`).
    """
    where = f"--config {str(path)!r}" if path is not None else "the recipe"
    recipe = dict(data) if data is not None else (load_yaml(path) if path is not None else {})
    for key in drop:
        recipe.pop(key, None)
    recipe = _read_ladder(cls, recipe, where)
    recipe.update(overrides or {})
    return from_dict(cls, recipe)
