"""Guest configuration as Traefik hands it to a wasm plugin: a mapping, encoded the way Go encodes it.

Traefik gives a wasm middleware plugin its configuration (``get_config``) as
``json.Marshal`` of the ``map[string]interface{}`` it decoded from the
dynamic configuration; the plugin catalog validates a plugin by running it with
``json.Marshal`` of its manifest's ``testData``, a map that ``gopkg.in/yaml.v3``
decoded.  Go marshals a *map*, not a struct, so the bytes are:

- object keys sorted by their UTF-8 bytes, at every level, no whitespace;
- strings with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as ``\\u003c``
  and so on, ``\\b \\f \\n \\r \\t`` short, other control characters as
  ``\\u00XX`` (lowercase hex), every other character as raw UTF-8;
- integers as written; floats as Go's shortest representation (``1.5``,
  ``3`` for ``3.0``, ``1e+21``, ``1e-7``); NaN and infinities cannot be
  encoded (Traefik refuses them too);
- ``null``, ``true``, ``false``; lists as arrays.

YAML values get the types yaml.v3 gives them, not PyYAML's YAML 1.1 ones:
only ``true``/``false`` (any of three casings) are booleans (``yes``, ``on``
stay strings), ``~``/``null``/empty are null, integers may be ``0x``, ``0o``,
``0b`` or ``0``-prefixed octal with ``_`` separators, an integer beyond 64
bits is a float, and timestamps and ``1:20`` stay strings.  Keys must be
strings; a scalar key of another type is taken as written (``404:`` is
``"404"``), as Traefik's file provider does.

This module needs PyYAML only for YAML (the ``yaml`` extra, imported through
:mod:`twisted_httpwasm._optional` when a YAML file is read); JSON needs
nothing, TOML needs Python 3.11's ``tomllib``.  The plugin loader, the command
line and ``check`` share it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

from .._optional import ExtraMissing, require

__all__ = [
    "CONFIG_SUFFIXES",
    "ConfigError",
    "decode_json",
    "decode_toml",
    "decode_yaml",
    "encode",
    "encode_mapping",
    "read_config_file",
    "require_yaml",
]

#: The --guest-config-file suffixes read as a mapping and passed JSON-encoded; any other file is passed as it is.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")

#: A bound on the values a document may expand to (YAML aliases can multiply a small file).
MAX_VALUES = 1_000_000


class ConfigError(ValueError):
    """A configuration that cannot be read or encoded; ``str()`` is one line naming where and why."""


def require_yaml(feature: str) -> ModuleType:
    """PyYAML, imported; :class:`ConfigError` naming the ``yaml`` extra if it is not installed."""
    try:
        return require("yaml", "yaml", feature)
    except ExtraMissing as missing:
        raise ConfigError(str(missing)) from None


# -- encoding: Go's json.Marshal -------------------------------------------------------------


def encode(value: object) -> bytes:
    """``value`` (dicts with str keys, lists, str, int, float, bool, None) as Go's ``json.Marshal`` writes it."""
    out: list[str] = []
    _encode(value, out, "")
    return "".join(out).encode("utf-8", "surrogatepass")


def encode_mapping(value: object, where: str) -> bytes:
    """A decoded configuration as Traefik passes it: a mapping (``null`` if empty document), JSON-encoded."""
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{where}: the configuration must be a mapping (key: value), not {_kind(value)}")
    try:
        return encode(value)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _encode(value: object, out: list[str], path: str) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_go_float(value, path))
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif isinstance(value, dict):
        out.append("{")
        for position, key in enumerate(sorted(value, key=_key_bytes)):
            if position:
                out.append(",")
            out.append(_go_string(key))
            out.append(":")
            _encode(value[key], out, f"{path}.{key}" if path else key)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for position, item in enumerate(value):
            if position:
                out.append(",")
            _encode(item, out, f"{path}[{position}]")
        out.append("]")
    else:
        raise ConfigError(f"{path or 'the configuration'}: {_kind(value)} cannot be encoded as JSON")


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _go_float(value: float, path: str) -> str:
    """Go's ``strconv.AppendFloat(v, 'f' or 'e', -1, 64)`` as encoding/json picks it, with its exponent cleanup."""
    if not math.isfinite(value):
        raise ConfigError(f"{path or 'the configuration'}: {value} cannot be encoded as JSON (Traefik refuses it too)")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = Decimal(repr(value)).normalize()  # the shortest digits that round-trip, as Go finds them
    magnitude = abs(value)
    if 1e-6 <= magnitude < 1e21:
        return format(shortest, "f")
    sign, digits, _ = shortest.as_tuple()
    exponent = shortest.adjusted()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    written = f"{'-' if sign else ''}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    # encoding/json turns e-07 into e-7 (two-digit negative exponents only).
    return re.sub(r"e-0(\d)$", r"e-\1", written)


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _go_string(text: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if char in _HTML_ESCAPES:
        return _HTML_ESCAPES[char]
    if "\ud800" <= char <= "\udfff":
        return "\ufffd"  # a lone surrogate is not UTF-8: Go writes the replacement character
    return f"\\u{ord(char):04x}"


# -- YAML, the way yaml.v3 types it ----------------------------------------------------------------

_PLAIN = "!twisted-httpwasm/plain"  # the tag given to plain (unquoted, untagged) scalars: typed below
_CORE = "tag:yaml.org,2002:"
_BOOLEANS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_NULLS = {"", "~", "null", "Null", "NULL"}
_SPECIAL_FLOATS = {
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]+|[1-9][0-9]*|0)")
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


def _go_int(text: str) -> int | None:
    """``strconv.ParseInt(text, 0, 64)``, then ``ParseUint`` (no sign): the value, or None."""
    match = _GO_INT.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "0123456789":
        number = int(digits, 8)
    else:
        number = int(digits, 0)
    number = -number if sign == "-" else number
    if _INT64[0] <= number <= _INT64[1]:
        return number
    if not sign and 0 <= number <= _UINT64_MAX:
        return number
    return None


def plain_scalar(text: str) -> object:
    """The value yaml.v3 gives an unquoted scalar decoded into ``interface{}``."""
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    if text in _NULLS:
        return None
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    first = text[0]
    if first == "." and _DOT_FLOAT.fullmatch(text):
        return float(text)
    if first in "+-0123456789":
        plain = text.replace("_", "")
        number = _go_int(plain)
        if number is not None:
            return number
        if _YAML_FLOAT.fullmatch(plain):
            value = float(plain)
            if math.isfinite(value):  # Go's ParseFloat fails on overflow: the scalar stays a string
                return value
    return text


def decode_yaml(data: bytes, where: str) -> object:
    """The first YAML document of ``data``, typed as yaml.v3 types it; :class:`ConfigError` if malformed."""
    yaml = require_yaml(f"{where}: YAML")
    loader = _loader_class(yaml)(data)
    try:
        node = loader.get_node() if loader.check_node() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(error)}") from None
    finally:
        loader.dispose()
    if node is None:
        return None
    return _Converter(where).value(node)


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


_loader_cache: dict[int, type] = {}


def _loader_class(yaml: ModuleType) -> Any:
    """A PyYAML loader that builds nodes only, tagging plain scalars for :func:`plain_scalar`."""
    cached = _loader_cache.get(id(yaml))
    if cached is not None:
        return cached

    class _Resolver(yaml.resolver.BaseResolver):  # type: ignore[misc, name-defined]
        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            if kind is yaml.nodes.ScalarNode and implicit[0]:
                return _PLAIN
            return super().resolve(kind, value, implicit)

    class _Loader(
        yaml.reader.Reader,  # type: ignore[misc, name-defined]
        yaml.scanner.Scanner,  # type: ignore[misc, name-defined]
        yaml.parser.Parser,  # type: ignore[misc, name-defined]
        yaml.composer.Composer,  # type: ignore[misc, name-defined]
        _Resolver,
    ):
        def __init__(self, stream: bytes) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _Resolver.__init__(self)

    _loader_cache[id(yaml)] = _Loader
    return _Loader


class _Converter:
    """Composed YAML nodes to Python values, with yaml.v3's typing, merge keys and duplicate-key refusal."""

    def __init__(self, where: str):
        self.where = where
        self.count = 0
        self.active: set[int] = set()

    def fail(self, node: Any, problem: str) -> ConfigError:
        mark = node.start_mark
        return ConfigError(f"{self.where}: {problem} (line {mark.line + 1}, column {mark.column + 1})")

    def value(self, node: Any) -> object:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.fail(node, f"more than {MAX_VALUES} values (aliases expanding without bound?)")
        kind = type(node).__name__
        if kind == "ScalarNode":
            return self.scalar(node)
        if id(node) in self.active:
            raise self.fail(node, "an alias refers to a node that contains it")
        self.active.add(id(node))
        try:
            if kind == "SequenceNode":
                return [self.value(item) for item in node.value]
            return self.mapping(node)
        finally:
            self.active.discard(id(node))

    def scalar(self, node: Any) -> object:
        tag, text = node.tag, node.value
        if tag == _PLAIN:
            return plain_scalar(text)
        if not tag.startswith(_CORE):
            return text  # a quoted scalar, or a local tag (!foo): a string, as yaml.v3 keeps it
        short = tag[len(_CORE) :]
        if short in ("str", "timestamp"):
            return text
        typed = plain_scalar(text)
        if short == "float" and isinstance(typed, int) and not isinstance(typed, bool):
            return float(typed)
        wanted: dict[str, Callable[[object], bool]] = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, float),
            "bool": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
        }
        check = wanted.get(short)
        if check is None:
            raise self.fail(node, f"the tag !!{short} is not supported in a configuration")
        if not check(typed):
            raise self.fail(node, f"cannot decode {text!r} as !!{short}")
        return typed

    def mapping(self, node: Any) -> dict[str, object]:
        result: dict[str, object] = {}
        merges: list[Any] = []
        for key_node, value_node in node.value:
            if type(key_node).__name__ != "ScalarNode":
                raise self.fail(key_node, "a key must be a scalar, not a list or mapping")
            if key_node.tag == _PLAIN and key_node.value == "<<":
                merges.append(value_node)
                continue
            key = key_node.value  # a non-string scalar key is taken as written (404: -> "404")
            if key in result:
                raise self.fail(key_node, f"mapping key {key!r} already defined")
            result[key] = self.value(value_node)
        for merged in merges:
            sources = merged.value if type(merged).__name__ == "SequenceNode" else [merged]
            for source in sources:
                if type(source).__name__ != "MappingNode":
                    raise self.fail(source, "a merge (<<) must name a mapping or a list of mappings")
                for key, value in self.mapping(source).items():
                    result.setdefault(key, value)
        return result


# -- JSON and TOML ----------------------------------------------------------------------------------


def decode_json(data: bytes, where: str) -> object:
    """A JSON document, its numbers typed as yaml.v3 types them (Traefik reads .json files with it)."""

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in items:
            if key in result:
                raise ConfigError(f"{where}: mapping key {key!r} already defined")
            result[key] = value
        return result

    def constant(name: str) -> object:
        raise ConfigError(f"{where}: {name} is not JSON")

    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=pairs,
            parse_int=plain_scalar,
            parse_float=plain_scalar,
            parse_constant=constant,
        )
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not UTF-8: {error.reason} at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None


def decode_toml(data: bytes, where: str) -> object:
    """A TOML document (Python 3.11's tomllib); dates and times are refused (Go would write them differently)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        raise ConfigError(f"{where}: reading TOML needs Python 3.11 or later (tomllib)") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not UTF-8: {error.reason} at byte {error.start}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where}: not valid TOML: {error}") from None
    for path, value in _walk(document, ""):
        if not isinstance(value, (dict, list, str, int, float, bool)):
            raise ConfigError(f"{where}: {path}: TOML dates and times are not supported in a configuration")
    return document


def _walk(value: object, path: str) -> Iterator[tuple[str, object]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


_DECODERS: dict[str, Callable[[bytes, str], object]] = {
    ".yaml": decode_yaml,
    ".yml": decode_yaml,
    ".json": decode_json,
    ".toml": decode_toml,
}


def read_config_file(path: str | Path) -> bytes:
    """What ``--guest-config-file PATH`` passes to the guest.

    A ``.yaml``, ``.yml``, ``.json`` or ``.toml`` file is read as a mapping and
    passed as Traefik passes a plugin's configuration (see the module
    docstring); any other file is passed as its bytes.  Raises ``OSError`` if
    it cannot be read, :class:`ConfigError` if it is not a valid mapping.
    """
    path = Path(path)
    data = path.read_bytes()
    decoder = _DECODERS.get(path.suffix.lower())
    if decoder is None:
        return data
    return encode_mapping(decoder(data, str(path)), str(path))


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__
