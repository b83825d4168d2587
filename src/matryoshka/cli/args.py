"""Flags built one way for every ``mrl`` command.

* :func:`add_dataclass_arguments`: one ``--flag`` per field of a config dataclass, with the help
  text the field carries (:func:`matryoshka.config.help_field`); defaults are ``None`` so that only
  the flags given override a recipe (:func:`overrides`).
* One spelling across commands: ``--out``, ``--batch-size``, ``--no-progress``, ``--device``,
  ``--model`` (an encoder) and ``--run`` (a trained run folder or its ``model.json``). Older
  spellings still parse, with a warning, for one release (:func:`add_deprecated_alias`).
* :class:`UsageError` and :func:`fail`: a bad option is ``mrl: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "FLAG_NAMES",
    "UsageError",
    "add_dataclass_arguments",
    "add_deprecated_alias",
    "fail",
    "flag_of",
    "given_flags",
    "overrides",
]

#: Fields whose flag is spelled differently from ``--field-name`` (one spelling across commands).
FLAG_NAMES = {"out_dir": "--out"}


class UsageError(ValueError):
    """A bad option or input: reported as ``mrl: error: ...`` with exit status 2."""


def fail(message: str, command: str = "mrl") -> int:
    """Print ``<command>: error: message`` on stderr and return the exit status 2."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return 2


def flag_of(name: str) -> str:
    """The command-line flag of the config field ``name`` (``batch_size`` -> ``--batch-size``)."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


_SCALARS: dict[Any, type] = {str: str, int: int, float: float}


def _arg_type(annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field of type ``annotation`` (resolved, not a string)."""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation in _SCALARS or (len(args) == 1 and args[0] in _SCALARS and origin is not list):
        return {"type": _SCALARS[annotation if annotation in _SCALARS else args[0]]}
    if origin is tuple and args[:1] == [str]:  # tuple[str, ...]: a repeatable flag
        return {"action": "append"}
    inner = args[0] if len(args) == 1 and typing.get_origin(args[0]) is list else annotation
    if typing.get_origin(inner) is list and typing.get_args(inner)[0] in _SCALARS:
        return {"type": _SCALARS[typing.get_args(inner)[0]], "nargs": "+"}
    raise TypeError(f"no CLI mapping for a field annotated {annotation!r}")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude: Iterable[str] = (),
    *,
    defaults: bool = False,
) -> None:
    """One flag per field of the dataclass ``cls`` (but ``exclude``), with the field's help,
    ``choices`` and ``flag`` (another spelling) metadata.

    ``defaults=False`` (a command with a recipe): every default is ``None``, so only the flags
    given override the recipe (:func:`overrides`). ``defaults=True`` (a command whose flags are
    the whole config): the field defaults, and ``None`` for repeatable flags (read as empty).
    Every field must carry help text: a field without it is a ``TypeError`` (for the developer
    adding it), so no flag of ``mrl`` goes undocumented.
    """
    skip = set(exclude)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_ = f.metadata.get("help")
        if not help_:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with help_field")
        kwargs = _arg_type(hints[f.name])
        if "choices" in f.metadata:
            kwargs["choices"] = tuple(f.metadata["choices"])
        default = None
        if defaults and kwargs.get("action") != "append":
            default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.metadata["flag"].replace("_", "-") if "flag" in f.metadata else None
        parser.add_argument(
            flag or flag_of(f.name), dest=f.name, default=default, help=help_, **kwargs
        )


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags left unset are ``None``)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The flags (spelled as on the command line) among the fields ``names`` that were given."""
    return [flag_of(n) for n in names if getattr(args, n, None) is not None]


class _Deprecated(argparse.Action):
    """An old spelling: warns once on stderr, then stores into the new flag's destination."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        self.new_flag = kw.pop("new_flag")
        self.const_value = kw.pop("const_value", None)
        nargs = 0 if self.const_value is not None else kw.pop("nargs", None)
        super().__init__(option_strings, dest, nargs=nargs, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"mrl: warning: {option_string} is deprecated and will be removed in the next "
            f"release: use {self.new_flag}.",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, self.const_value if self.const_value is not None else values)


def add_deprecated_alias(
    parser: argparse.ArgumentParser,
    old: str,
    new: str,
    dest: str,
    const: Any = None,
    **kw: Any,
) -> None:
    """Accept the old flag ``old`` for ``new`` (hidden from ``--help``): a switch when ``const``
    is given (``--quiet`` stores ``progress=False``), else it takes the new flag's value."""
    parser.add_argument(
        old,
        dest=dest,
        action=_Deprecated,
        new_flag=new,
        const_value=const,
        help=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        **kw,
    )
