"""The coerce functions of ``twistd httpwasm``'s options: sizes, seconds, counts, choices.

Each maker takes the option's name and returns what ``usage.Options``'
``optParameters`` calls with the option's text: the value, or a
``usage.UsageError`` that names the option and says what was expected (raised
as it is: a ``ValueError`` would be reworded by ``usage`` as "Parameter type
enforcement failed").  Each carries a ``coerceDoc``, which ``--help`` shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

from twisted.python import usage

__all__ = ["choice", "count", "format_size", "parse_size", "seconds", "size"]

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {"": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_UNLIMITED = ("0", "none")


def parse_size(text: str) -> int:
    """Bytes named by ``text``: a plain integer, or one with a KiB, MiB or GiB suffix (``64MiB``)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: give a number of bytes, optionally with a KiB, MiB or GiB suffix")
    value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def format_size(value: int) -> str:
    """``value`` bytes as ``parse_size`` reads them, in the largest unit that divides it (``64MiB``)."""
    for unit in ("GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit.lower()]
        if value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def _documented(coerce: Callable[[str], T], doc: str) -> Callable[[str], T]:
    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


def size(option: str, *, unlimited: bool = False) -> Callable[[str], Any]:
    """Bytes, or with a KiB, MiB or GiB suffix; ``unlimited``: 0 or none is None (no limit)."""

    def coerce(text: str) -> int | None:
        if unlimited and text.strip().lower() in _UNLIMITED:
            return None
        try:
            return parse_size(text)
        except ValueError as error:
            raise usage.UsageError(f"{option}: {error}") from None

    return _documented(coerce, "")


def seconds(option: str, *, unlimited: bool = False, zero: bool = False) -> Callable[[str], Any]:
    """A positive number of seconds; ``unlimited``: 0 or none is None; ``zero``: 0 is allowed (and is 0)."""

    def coerce(text: str) -> float | None:
        if unlimited and text.strip().lower() in _UNLIMITED:
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (value > 0 or (zero and value == 0)):
            return value
        if unlimited:
            expected = "a positive number of seconds (or 0 or none)"
        elif zero:
            expected = "a number of seconds (0 or more)"
        else:
            expected = "a positive number of seconds"
        raise usage.UsageError(f"{option} must be {expected}, not {text!r}")

    return _documented(coerce, "")


def count(option: str, what: str, *, unlimited: bool = False, expected: str | None = None) -> Callable[[str], Any]:
    """A positive whole number of ``what`` (requests, processes); ``unlimited``: 0 or none is None.

    ``expected`` words what the refusal says was expected (default: "a positive number of ``what``").
    """

    def coerce(text: str) -> int | None:
        if unlimited and text.strip().lower() in _UNLIMITED:
            return None
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise usage.UsageError(f"{option} must be {expected or f'a positive number of {what}'}, not {text!r}")
        return value

    return _documented(coerce, "")


def choice(option: str, enum: type[E], *, normalise: bool = False) -> Callable[[str], E]:
    """One of ``enum``'s values (``normalise``: stripped and lower-cased first)."""

    def coerce(text: str) -> E:
        try:
            return enum(text.strip().lower() if normalise else text)
        except ValueError:
            choices = ", ".join(str(item.value) for item in enum)
            raise usage.UsageError(f"{option} must be one of {choices}, not {text!r}") from None

    return _documented(coerce, "")
