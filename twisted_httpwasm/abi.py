"""The http-wasm ``http_handler`` ABI: names, constants and packed results.

This module knows neither wasmtime nor twisted.web: it is the vocabulary that
the runtime layer and the twisted.web adapter share.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "HOST_FUNCTIONS",
    "HOST_MODULE",
    "WASI_MODULE",
    "BodyKind",
    "CountLen",
    "CtxNext",
    "EofLen",
    "Feature",
    "HeaderKind",
    "HostFunction",
    "LogLevel",
    "encode_nul_list",
    "pack_count_len",
    "pack_ctx_next",
    "pack_eof_len",
    "unpack_count_len",
    "unpack_ctx_next",
    "unpack_eof_len",
]

HOST_MODULE = "http_handler"
WASI_MODULE = "wasi_snapshot_preview1"

_U32 = 0xFFFFFFFF


class Feature(enum.IntFlag):
    """Features a guest may enable with ``enable_features``."""

    NONE = 0
    BUFFER_REQUEST = 1
    BUFFER_RESPONSE = 2
    TRAILERS = 4


class HeaderKind(enum.IntEnum):
    """Which header map a header host function addresses."""

    REQUEST = 0
    RESPONSE = 1
    REQUEST_TRAILERS = 2
    RESPONSE_TRAILERS = 3


class BodyKind(enum.IntEnum):
    """Which body ``read_body`` and ``write_body`` address."""

    REQUEST = 0
    RESPONSE = 1


class LogLevel(enum.IntEnum):
    """Log levels of the ``log`` and ``log_enabled`` host functions."""

    DEBUG = -1
    INFO = 0
    WARN = 1
    ERROR = 2
    NONE = 3

    @classmethod
    def parse(cls, text: str) -> LogLevel:
        """The level named by ``text`` (``debug``, ``info``, ``warn``, ``error``, ``none``)."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(level.name.lower() for level in cls)
            raise ValueError(f"unknown log level {text!r}; expected one of {names}") from None


@dataclass(frozen=True)
class HostFunction:
    """One import of module ``http_handler``: its name and wasm type.

    Every parameter is an i32; ``param_names`` are the names the host's
    implementation gives them.  ``result`` is ``"i32"``, ``"i64"`` or ``None``.
    """

    name: str
    param_names: tuple[str, ...]
    result: str | None

    @property
    def params(self) -> int:
        """How many i32 parameters the function takes."""
        return len(self.param_names)

    @property
    def signature(self) -> str:
        """The wasm type as wasmtime prints a function type: ``(i32 i32) -> (i32)``."""
        return f"({' '.join(['i32'] * len(self.param_names))}) -> ({self.result or ''})"


#: Every host function of module ``http_handler``, as the specification defines it: the
#: linker, the import check and the tests derive from this table.
HOST_FUNCTIONS: tuple[HostFunction, ...] = (
    HostFunction("enable_features", ("features",), "i32"),
    HostFunction("get_config", ("buf", "buf_limit"), "i32"),
    HostFunction("log", ("level", "message", "message_len"), None),
    HostFunction("log_enabled", ("level",), "i32"),
    HostFunction("get_method", ("buf", "buf_limit"), "i32"),
    HostFunction("set_method", ("ptr", "length"), None),
    HostFunction("get_uri", ("buf", "buf_limit"), "i32"),
    HostFunction("set_uri", ("ptr", "length"), None),
    HostFunction("get_protocol_version", ("buf", "buf_limit"), "i32"),
    HostFunction("get_source_addr", ("buf", "buf_limit"), "i32"),
    HostFunction("get_header_names", ("kind", "buf", "buf_limit"), "i64"),
    HostFunction("get_header_values", ("kind", "name", "name_len", "buf", "buf_limit"), "i64"),
    HostFunction("set_header_value", ("kind", "name", "name_len", "value", "value_len"), None),
    HostFunction("add_header_value", ("kind", "name", "name_len", "value", "value_len"), None),
    HostFunction("remove_header", ("kind", "name", "name_len"), None),
    HostFunction("read_body", ("kind", "buf", "buf_limit"), "i64"),
    HostFunction("write_body", ("kind", "ptr", "length"), None),
    HostFunction("get_status_code", (), "i32"),
    HostFunction("set_status_code", ("code",), None),
)


class CtxNext(NamedTuple):
    """The unpacked result of ``handle_request``."""

    next: bool
    req_ctx: int


@dataclass(frozen=True)
class CountLen:
    """The unpacked result of the header-list host functions."""

    count: int
    length: int


class EofLen(NamedTuple):
    """The unpacked result of ``read_body``."""

    eof: bool
    length: int


def pack_ctx_next(next: bool, req_ctx: int = 0) -> int:
    """Pack ``handle_request``'s result as a guest would (as a signed i64)."""
    return _to_i64(((req_ctx & _U32) << 32) | (1 if next else 0))


def unpack_ctx_next(value: int) -> CtxNext:
    """Split ``handle_request``'s i64 result; the low 32 bits are ``next``."""
    value &= 0xFFFFFFFFFFFFFFFF
    return CtxNext(next=(value & _U32) == 1, req_ctx=value >> 32)


def pack_count_len(count: int, length: int) -> int:
    """``count << 32 | len``, as the signed i64 the guest receives."""
    return _to_i64((count << 32) | length)


def unpack_count_len(value: int) -> CountLen:
    value &= 0xFFFFFFFFFFFFFFFF
    return CountLen(count=value >> 32, length=value & _U32)


def pack_eof_len(eof: bool, length: int) -> int:
    """``eof << 32 | len``, as the signed i64 the guest receives."""
    return _to_i64(((1 if eof else 0) << 32) | length)


def unpack_eof_len(value: int) -> EofLen:
    value &= 0xFFFFFFFFFFFFFFFF
    return EofLen(eof=(value >> 32) == 1, length=value & _U32)


def encode_nul_list(items: Iterable[bytes]) -> tuple[int, bytes]:
    """The count and bytes of a NUL-terminated list (``b"a\\0b\\0"``)."""
    parts = list(items)
    return len(parts), b"".join(part + b"\0" for part in parts)


def _to_i64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value & (1 << 63) else value
