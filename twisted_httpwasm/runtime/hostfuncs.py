"""Every ``http_handler`` host function, each in one place.

Each function takes the calling instance's :class:`HostContext` and the
guest's i32 arguments, and works on plain data (:class:`RequestState`) and the
guest's memory only.  Raising :class:`HostTrap` traps the guest; the reason is
also recorded on the request so that it reaches the log even when a threaded
engine reports the trap vaguely.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..abi import BodyKind, Feature, HeaderKind, LogLevel, encode_nul_list, pack_count_len, pack_eof_len
from .native import HostTrap, NativeMemory
from .state import BodyTooLarge, HeaderList, Phase, RequestState

__all__ = ["HOST_FUNCTIONS", "MAX_LOG_MESSAGE", "SUPPORTED_FEATURES", "HostContext", "HostFunctionSpec"]

_U32 = 0xFFFFFFFF

#: Bytes of one guest log message that reach the log; the rest is counted, not copied.
MAX_LOG_MESSAGE = 16 * 1024

#: Twisted cannot send HTTP trailers, so ``trailers`` is never enabled.
SUPPORTED_FEATURES = Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE
_SUPPORTED = int(SUPPORTED_FEATURES)
_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_BUFFER_RESPONSE = int(Feature.BUFFER_RESPONSE)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE_FORBIDDEN = re.compile(rb"[\x00\r\n]")
_REQUEST_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")


class HostContext(Protocol):
    """What a host function needs from the instance that called it."""

    memory: NativeMemory
    state: RequestState | None
    features: int
    config: bytes
    log_level: LogLevel

    def log(self, level: LogLevel, message: str) -> None: ...

    def log_room(self, length: int) -> int:
        """Bytes of a ``length``-byte message the call's log budget lets through; -1: drop it."""
        ...


# -- helpers ---------------------------------------------------------------


def _trap(ctx: HostContext, reason: str) -> HostTrap:
    if ctx.state is not None and ctx.state.trap_reason is None:
        ctx.state.trap_reason = reason
    return HostTrap(reason)


def _request(ctx: HostContext, function: str) -> RequestState:
    if ctx.state is None:
        raise _trap(ctx, f"{function}: no request in flight (called during init)")
    return ctx.state


def _write_value(ctx: HostContext, function: str, buf: int, buf_limit: int, value: bytes) -> int:
    """The buf/buf_limit rule: write only if it fits; return the length either way."""
    if len(value) <= buf_limit & _U32:
        _write(ctx, function, buf, value)
    return len(value)


def _write(ctx: HostContext, function: str, ptr: int, data: bytes) -> None:
    try:
        ctx.memory.write(ptr, data)
    except HostTrap as trap:
        raise _trap(ctx, f"{function}: {trap}") from None


def _read(ctx: HostContext, function: str, ptr: int, length: int) -> bytes:
    try:
        return ctx.memory.read(ptr, length)
    except HostTrap as trap:
        raise _trap(ctx, f"{function}: {trap}") from None


def _write_list(ctx: HostContext, function: str, buf: int, buf_limit: int, items: list[bytes]) -> int:
    count, data = encode_nul_list(items)
    if not count:
        return 0
    _write_value(ctx, function, buf, buf_limit, data)
    return pack_count_len(count, len(data))


def _header_kind(ctx: HostContext, function: str, kind: int) -> HeaderKind:
    try:
        return HeaderKind(kind)
    except ValueError:
        raise _trap(ctx, f"{function}: unknown header kind {kind}") from None


def _body_kind(ctx: HostContext, function: str, kind: int) -> BodyKind:
    try:
        return BodyKind(kind)
    except ValueError:
        raise _trap(ctx, f"{function}: unknown body kind {kind}") from None


def _header_name(ctx: HostContext, function: str, name: int, name_len: int) -> bytes:
    raw = _read(ctx, function, name, name_len)
    if not raw:
        raise _trap(ctx, f"{function}: empty header name")
    return raw


def _headers_to_read(ctx: HostContext, state: RequestState, kind: HeaderKind) -> HeaderList | None:
    """The header map to read, or None for trailers (never present here)."""
    if kind is HeaderKind.REQUEST:
        return state.request_headers
    if kind is HeaderKind.RESPONSE:
        return state.response_headers
    return None


def _headers_to_change(ctx: HostContext, function: str, kind_value: int) -> HeaderList:
    state = _request(ctx, function)
    kind = _header_kind(ctx, function, kind_value)
    if kind is HeaderKind.REQUEST:
        _require_request_phase(ctx, state, function, "request headers")
        return state.request_headers
    if kind is HeaderKind.RESPONSE:
        _require_response_writable(ctx, state, function, "response headers")
        return state.response_headers
    raise _trap(ctx, f"{function}: trailers are not supported by this host")


def _require_request_phase(ctx: HostContext, state: RequestState, function: str, what: str) -> None:
    if state.phase is not Phase.REQUEST:
        raise _trap(ctx, f"{function}: too late to change the {what} after the next handler ran")


def _require_response_writable(ctx: HostContext, state: RequestState, function: str, what: str) -> None:
    if state.phase is Phase.RESPONSE and not state.features & _BUFFER_RESPONSE:
        raise _trap(
            ctx,
            f"{function}: the {what} may already be sent; enable buffer_response to change it in handle_response",
        )


def _check_header_room(ctx: HostContext, function: str, size: int) -> None:
    """Headers count against the buffer limit too: a guest adding values in a loop is stopped."""
    assert ctx.state is not None  # _headers_to_change checked it
    try:
        ctx.state.check_size(size, "headers")
    except BodyTooLarge as error:
        raise _trap(ctx, f"{function}: {error}") from None


def _checked_field(ctx: HostContext, function: str, name: bytes, value: bytes) -> None:
    if not _TOKEN.match(name):
        raise _trap(ctx, f"{function}: invalid header name {name[:64]!r}")
    if _FIELD_VALUE_FORBIDDEN.search(value):
        raise _trap(ctx, f"{function}: header value contains CR, LF or NUL")


# -- host functions: guest-wide ------------------------------------------------


def enable_features(ctx: HostContext, features: int) -> int:
    wanted = features & _SUPPORTED
    state = ctx.state
    if state is None:
        ctx.features |= wanted
        return ctx.features
    if state.phase is Phase.REQUEST:
        state.features |= wanted
    return state.features


def get_config(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, "get_config", buf, buf_limit, ctx.config)


def log(ctx: HostContext, level: int, message: int, message_len: int) -> None:
    if not log_enabled(ctx, level):
        return
    try:
        length = message_len & _U32
        if (message & _U32) + length > ctx.memory.size():
            return  # outside memory: not logged, as if reading it had failed
        # Checked before copying: past the call's budget a message costs a counter, not a copy.
        room = ctx.log_room(length)
        if room < 0:
            return
        # Only so much is copied and logged: a guest cannot make the host hold its whole memory per call.
        kept = min(room, MAX_LOG_MESSAGE)
        text = ctx.memory.read(message, kept).decode("utf-8", "replace")
        if length > kept:
            text += f"... [{length - kept} more bytes not logged]"
        ctx.log(LogLevel(max(min(level, LogLevel.ERROR), LogLevel.DEBUG)), text)
    except Exception:  # noqa: BLE001 - the ABI says a failure to log is ignored, never a trap
        return


def log_enabled(ctx: HostContext, level: int) -> int:
    return 1 if ctx.log_level <= level < LogLevel.NONE else 0


# -- host functions: the request line --------------------------------------------


def get_method(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, "get_method", buf, buf_limit, _request(ctx, "get_method").method)


def set_method(ctx: HostContext, ptr: int, length: int) -> None:
    state = _request(ctx, "set_method")
    _require_request_phase(ctx, state, "set_method", "method")
    method = _read(ctx, "set_method", ptr, length)
    if not method:
        raise _trap(ctx, "set_method: empty method")
    if not _TOKEN.match(method):
        raise _trap(ctx, f"set_method: invalid method {method[:64]!r}")
    state.method = method
    state.method_changed = True


def get_uri(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, "get_uri", buf, buf_limit, _request(ctx, "get_uri").uri)


def set_uri(ctx: HostContext, ptr: int, length: int) -> None:
    state = _request(ctx, "set_uri")
    _require_request_phase(ctx, state, "set_uri", "URI")
    uri = _read(ctx, "set_uri", ptr, length) or b"/"
    if not _REQUEST_TARGET.match(uri):
        raise _trap(ctx, f"set_uri: not an origin-form URI (path starting with '/', no spaces): {uri[:64]!r}")
    state.uri = uri
    state.uri_changed = True


def get_protocol_version(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, "get_protocol_version", buf, buf_limit, _request(ctx, "get_protocol_version").protocol)


def get_source_addr(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, "get_source_addr", buf, buf_limit, _request(ctx, "get_source_addr").source_addr)


# -- host functions: headers ------------------------------------------------------


def get_header_names(ctx: HostContext, kind: int, buf: int, buf_limit: int) -> int:
    state = _request(ctx, "get_header_names")
    headers = _headers_to_read(ctx, state, _header_kind(ctx, "get_header_names", kind))
    return _write_list(ctx, "get_header_names", buf, buf_limit, headers.names() if headers is not None else [])


def get_header_values(ctx: HostContext, kind: int, name: int, name_len: int, buf: int, buf_limit: int) -> int:
    state = _request(ctx, "get_header_values")
    headers = _headers_to_read(ctx, state, _header_kind(ctx, "get_header_values", kind))
    key = _header_name(ctx, "get_header_values", name, name_len)
    return _write_list(ctx, "get_header_values", buf, buf_limit, headers.values(key) if headers is not None else [])


def set_header_value(ctx: HostContext, kind: int, name: int, name_len: int, value: int, value_len: int) -> None:
    headers = _headers_to_change(ctx, "set_header_value", kind)
    key = _header_name(ctx, "set_header_value", name, name_len)
    data = _read(ctx, "set_header_value", value, value_len)
    _checked_field(ctx, "set_header_value", key, data)
    _check_header_room(ctx, "set_header_value", headers.size - headers.size_of(key) + len(key) + len(data))
    headers.set(key, data)


def add_header_value(ctx: HostContext, kind: int, name: int, name_len: int, value: int, value_len: int) -> None:
    headers = _headers_to_change(ctx, "add_header_value", kind)
    key = _header_name(ctx, "add_header_value", name, name_len)
    data = _read(ctx, "add_header_value", value, value_len)
    _checked_field(ctx, "add_header_value", key, data)
    _check_header_room(ctx, "add_header_value", headers.size + len(key) + len(data))
    headers.add(key, data)


def remove_header(ctx: HostContext, kind: int, name: int, name_len: int) -> None:
    headers = _headers_to_change(ctx, "remove_header", kind)
    headers.remove(_header_name(ctx, "remove_header", name, name_len))


# -- host functions: bodies ----------------------------------------------------------


def read_body(ctx: HostContext, kind: int, buf: int, buf_limit: int) -> int:
    state = _request(ctx, "read_body")
    body_kind = _body_kind(ctx, "read_body", kind)
    limit = buf_limit & _U32
    if limit == 0:
        raise _trap(ctx, "read_body: buf_limit is 0")
    # Check the whole buffer first, so that nothing is consumed when the write would trap.
    if (buf & _U32) + limit > ctx.memory.size():
        raise _trap(ctx, f"read_body: buffer of {limit} bytes at {buf & _U32} is outside memory")
    if body_kind is BodyKind.REQUEST:
        if state.phase is Phase.RESPONSE and not state.features & _BUFFER_REQUEST:
            raise _trap(ctx, "read_body: the request body is gone; enable buffer_request to read it in handle_response")
        chunk, eof = state.request_reader.read(limit)
    else:
        if state.phase is Phase.RESPONSE and not state.features & _BUFFER_RESPONSE:
            raise _trap(ctx, "read_body: enable buffer_response to read the response body")
        body = state.response_body or b""
        start = state.response_reader_position
        chunk = bytes(body[start : start + limit])
        state.response_reader_position = start + len(chunk)
        eof = state.response_reader_position >= len(body)
    _write(ctx, "read_body", buf, chunk)
    return pack_eof_len(eof, len(chunk))


def write_body(ctx: HostContext, kind: int, ptr: int, length: int) -> None:
    state = _request(ctx, "write_body")
    body_kind = _body_kind(ctx, "write_body", kind)
    data = _read(ctx, "write_body", ptr, length)
    if body_kind is BodyKind.REQUEST:
        _require_request_phase(ctx, state, "write_body", "request body")
        if state.first_write(body_kind) or state.request_body is None:
            state.request_body = bytearray()
        target = state.request_body
    else:
        _require_response_writable(ctx, state, "write_body", "response body")
        if state.first_write(body_kind) or state.response_body is None:
            state.response_body = bytearray()
        target = state.response_body
    try:
        state.check_size(len(target) + len(data))
    except BodyTooLarge as error:
        raise _trap(ctx, f"write_body: {error}") from None
    target += data


# -- host functions: status ----------------------------------------------------------


def get_status_code(ctx: HostContext) -> int:
    return _request(ctx, "get_status_code").status


def set_status_code(ctx: HostContext, code: int) -> None:
    state = _request(ctx, "set_status_code")
    _require_response_writable(ctx, state, "set_status_code", "status")
    if not 100 <= code <= 599:
        raise _trap(ctx, f"set_status_code: {code} is not an HTTP status code")
    state.status = code
    state.status_changed = True


@dataclass(frozen=True)
class HostFunctionSpec:
    """One import of module ``http_handler``: its wasm type and implementation."""

    name: str
    params: int  # all parameters are i32
    result: str | None  # "i32", "i64" or None
    function: Callable[..., int | None]


HOST_FUNCTIONS: tuple[HostFunctionSpec, ...] = (
    HostFunctionSpec("enable_features", 1, "i32", enable_features),
    HostFunctionSpec("get_config", 2, "i32", get_config),
    HostFunctionSpec("log", 3, None, log),
    HostFunctionSpec("log_enabled", 1, "i32", log_enabled),
    HostFunctionSpec("get_method", 2, "i32", get_method),
    HostFunctionSpec("set_method", 2, None, set_method),
    HostFunctionSpec("get_uri", 2, "i32", get_uri),
    HostFunctionSpec("set_uri", 2, None, set_uri),
    HostFunctionSpec("get_protocol_version", 2, "i32", get_protocol_version),
    HostFunctionSpec("get_source_addr", 2, "i32", get_source_addr),
    HostFunctionSpec("get_header_names", 3, "i64", get_header_names),
    HostFunctionSpec("get_header_values", 5, "i64", get_header_values),
    HostFunctionSpec("set_header_value", 5, None, set_header_value),
    HostFunctionSpec("add_header_value", 5, None, add_header_value),
    HostFunctionSpec("remove_header", 3, None, remove_header),
    HostFunctionSpec("read_body", 3, "i64", read_body),
    HostFunctionSpec("write_body", 3, None, write_body),
    HostFunctionSpec("get_status_code", 0, "i32", get_status_code),
    HostFunctionSpec("set_status_code", 1, None, set_status_code),
)
