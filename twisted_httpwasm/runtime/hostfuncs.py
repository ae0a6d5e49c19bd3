"""Every ``http_handler`` host function, each in one place.

The table of what the ABI defines (names, parameters, results) is
:data:`abi.HOST_FUNCTIONS`; here are the implementations, bound to it by name
in :data:`IMPLEMENTATIONS`.  Each takes the calling instance's
:class:`HostContext` and the guest's i32 arguments, and works on plain data
(:class:`RequestState`) and the guest's memory only.  Raising :class:`HostTrap`
traps the guest; :func:`trap_reason` names the host function in the reason,
once, for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from ..abi import (
    HOST_FUNCTIONS,
    BodyKind,
    Feature,
    HeaderKind,
    LogLevel,
    encode_nul_list,
    pack_count_len,
    pack_eof_len,
)
from .native import HostTrap, NativeMemory
from .state import REQUEST_PHASE, RESPONSE_PHASE, BodyTooLarge, HeaderList, RequestState

__all__ = [
    "IMPLEMENTATIONS",
    "MAX_LOG_MESSAGE",
    "SUPPORTED_FEATURES",
    "HostContext",
    "HostImplementation",
    "trap_reason",
]

_U32 = 0xFFFFFFFF

#: Bytes of one guest log message that reach the log; the rest is counted, not copied.
MAX_LOG_MESSAGE = 16 * 1024

#: Twisted cannot send HTTP trailers, so ``trailers`` is never enabled.
SUPPORTED_FEATURES = Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE
_SUPPORTED = int(SUPPORTED_FEATURES)
_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_BUFFER_RESPONSE = int(Feature.BUFFER_RESPONSE)

_LOG_NONE = int(LogLevel.NONE)  # an int: LogLevel.NONE is an Enum class attribute (see state.REQUEST_PHASE)

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


#: A host function's implementation: the context, then the guest's i32 arguments; the result or None.
HostImplementation = Callable[..., int | None]
_F = TypeVar("_F", bound=HostImplementation)
_IMPLEMENTED: dict[str, HostImplementation] = {}


def _host_function(function: _F) -> _F:
    """Register ``function`` as the implementation of the ABI function of the same name."""
    _IMPLEMENTED[function.__name__] = function
    return function


# -- helpers ---------------------------------------------------------------
#
# A helper raises HostTrap with the reason alone: the native callback knows which
# host function is running and names it once, through trap_reason below.


def trap_reason(ctx: HostContext, function: str, trap: HostTrap) -> str:
    """The reason a trap in host function ``function`` gives: ``"function: why"``.

    It is also recorded on the request (the first one wins), so that it reaches
    the log even when a threaded engine reports the trap vaguely.
    """
    reason = f"{function}: {trap}"
    state = ctx.state
    if state is not None and state.trap_reason is None:
        state.trap_reason = reason
    return reason


def _request(ctx: HostContext) -> RequestState:
    state = ctx.state
    if state is None:
        raise HostTrap("no request in flight (called during init)")
    return state


def _write_value(ctx: HostContext, buf: int, buf_limit: int, value: bytes) -> int:
    """The buf/buf_limit rule: write only if it fits; return the length either way."""
    if len(value) <= buf_limit & _U32:
        ctx.memory.write(buf, value)
    return len(value)


def _write_list(ctx: HostContext, buf: int, buf_limit: int, items: list[bytes]) -> int:
    count, data = encode_nul_list(items)
    if not count:
        return 0
    _write_value(ctx, buf, buf_limit, data)
    return pack_count_len(count, len(data))


def _header_kind(kind: int) -> HeaderKind:
    try:
        return HeaderKind(kind)
    except ValueError:
        raise HostTrap(f"unknown header kind {kind}") from None


_BODY_KINDS = {int(kind): kind for kind in BodyKind}


def _body_kind(kind: int) -> BodyKind:
    body_kind = _BODY_KINDS.get(kind)  # not BodyKind(kind): building an enum per host call costs more
    if body_kind is None:
        raise HostTrap(f"unknown body kind {kind}")
    return body_kind


def _header_name(ctx: HostContext, name: int, name_len: int) -> bytes:
    raw = ctx.memory.read(name, name_len)
    if not raw:
        raise HostTrap("empty header name")
    return raw


def _headers_to_read(state: RequestState, kind: HeaderKind) -> HeaderList | None:
    """The header map to read, or None for trailers (never present here)."""
    if kind is HeaderKind.REQUEST:
        return state.request_headers
    if kind is HeaderKind.RESPONSE:
        return state.response_headers
    return None


_REQUEST_HEADERS = int(HeaderKind.REQUEST)
_RESPONSE_HEADERS = int(HeaderKind.RESPONSE)
_TRAILERS = (int(HeaderKind.REQUEST_TRAILERS), int(HeaderKind.RESPONSE_TRAILERS))


def _headers_to_change(state: RequestState, kind: int) -> HeaderList:
    # The kind is compared as an int: making a HeaderKind per host call cost more than the rest of the check.
    if kind == _REQUEST_HEADERS:
        if state.phase is not REQUEST_PHASE:
            _require_request_phase(state, "request headers")
        return state.request_headers
    if kind == _RESPONSE_HEADERS:
        if state.phase is RESPONSE_PHASE:
            _require_response_writable(state, "response headers")
        return state.response_headers
    if kind in _TRAILERS:
        raise HostTrap("trailers are not supported by this host")
    raise HostTrap(f"unknown header kind {kind}")


def _require_request_phase(state: RequestState, what: str) -> None:
    if state.phase is not REQUEST_PHASE:
        raise HostTrap(f"too late to change the {what} after the next handler ran")


def _require_response_writable(state: RequestState, what: str) -> None:
    if state.phase is RESPONSE_PHASE and not state.features & _BUFFER_RESPONSE:
        raise HostTrap(f"the {what} may already be sent; enable buffer_response to change it in handle_response")


def _check_size(state: RequestState, size: int, what: str = "body") -> None:
    """Bodies and headers count against the buffer limit: a guest adding in a loop is stopped."""
    try:
        state.check_size(size, what)
    except BodyTooLarge as error:
        raise HostTrap(str(error)) from None


def _checked_field(name: bytes, value: bytes) -> None:
    if not _TOKEN.match(name):
        raise HostTrap(f"invalid header name {name[:64]!r}")
    if _FIELD_VALUE_FORBIDDEN.search(value):
        raise HostTrap("header value contains CR, LF or NUL")


def _change_header(
    ctx: HostContext, kind: int, name: int, name_len: int, value: int, value_len: int, *, replace: bool
) -> None:
    """``set_header_value`` (``replace``) or ``add_header_value``: the field checked, the headers held to the limit."""
    state = _request(ctx)
    headers = _headers_to_change(state, kind)
    memory = ctx.memory
    key = memory.read(name, name_len)
    if not key:
        raise HostTrap("empty header name")
    data = memory.read(value, value_len)
    if not _TOKEN.match(key) or _FIELD_VALUE_FORBIDDEN.search(data):
        _checked_field(key, data)  # raises, with the reason
    limit = state.max_buffer_bytes
    added = headers.size + len(key) + len(data)
    # What an add makes the size; a set only replaces, so it is a bound for a set, worked out exactly near the limit.
    if limit is not None and added > limit:
        _check_size(state, headers.size_after_set(key, data) if replace else added, "headers")
    if replace:
        headers.set(key, data)
    else:
        headers.add(key, data)


# -- host functions: guest-wide ------------------------------------------------


@_host_function
def enable_features(ctx: HostContext, features: int) -> int:
    wanted = features & _SUPPORTED
    state = ctx.state
    if state is None:
        ctx.features |= wanted
        return ctx.features
    if state.phase is REQUEST_PHASE:
        state.features |= wanted
    return state.features


@_host_function
def get_config(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, buf, buf_limit, ctx.config)


@_host_function
def log(ctx: HostContext, level: int, message: int, message_len: int) -> None:
    if not log_enabled(ctx, level):
        return
    try:
        length = message_len & _U32
        if not ctx.memory.holds(message, length):
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


@_host_function
def log_enabled(ctx: HostContext, level: int) -> int:
    return 1 if ctx.log_level <= level < _LOG_NONE else 0


# -- host functions: the request line --------------------------------------------


@_host_function
def get_method(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, buf, buf_limit, _request(ctx).method)


@_host_function
def set_method(ctx: HostContext, ptr: int, length: int) -> None:
    state = _request(ctx)
    _require_request_phase(state, "method")
    method = ctx.memory.read(ptr, length)
    if not method:
        raise HostTrap("empty method")
    if not _TOKEN.match(method):
        raise HostTrap(f"invalid method {method[:64]!r}")
    state.method = method
    state.method_changed = True


@_host_function
def get_uri(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, buf, buf_limit, _request(ctx).uri)


@_host_function
def set_uri(ctx: HostContext, ptr: int, length: int) -> None:
    state = _request(ctx)
    _require_request_phase(state, "URI")
    uri = ctx.memory.read(ptr, length) or b"/"
    if not _REQUEST_TARGET.match(uri):
        raise HostTrap(f"not an origin-form URI (path starting with '/', no spaces): {uri[:64]!r}")
    state.uri = uri
    state.uri_changed = True


@_host_function
def get_protocol_version(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, buf, buf_limit, _request(ctx).protocol)


@_host_function
def get_source_addr(ctx: HostContext, buf: int, buf_limit: int) -> int:
    return _write_value(ctx, buf, buf_limit, _request(ctx).source_addr)


# -- host functions: headers ------------------------------------------------------


@_host_function
def get_header_names(ctx: HostContext, kind: int, buf: int, buf_limit: int) -> int:
    headers = _headers_to_read(_request(ctx), _header_kind(kind))
    return _write_list(ctx, buf, buf_limit, headers.names() if headers is not None else [])


@_host_function
def get_header_values(ctx: HostContext, kind: int, name: int, name_len: int, buf: int, buf_limit: int) -> int:
    state = _request(ctx)
    if kind != _REQUEST_HEADERS and kind != _RESPONSE_HEADERS:
        _header_kind(kind)  # an unknown kind traps
        _header_name(ctx, name, name_len)
        return 0  # trailers: never present here
    key = _header_name(ctx, name, name_len)
    values = state.request_header_values(key) if kind == _REQUEST_HEADERS else state.response_headers.values(key)
    if not values:
        return 0
    data = b"\0".join(values) + b"\0"  # the NUL-terminated list, as abi.encode_nul_list makes it
    if len(data) <= buf_limit & _U32:
        ctx.memory.write(buf, data)
    # abi.pack_count_len, in line: the count is far below 2**31, so the i64 is never negative.
    return (len(values) << 32) | len(data)


@_host_function
def set_header_value(ctx: HostContext, kind: int, name: int, name_len: int, value: int, value_len: int) -> None:
    _change_header(ctx, kind, name, name_len, value, value_len, replace=True)


@_host_function
def add_header_value(ctx: HostContext, kind: int, name: int, name_len: int, value: int, value_len: int) -> None:
    _change_header(ctx, kind, name, name_len, value, value_len, replace=False)


@_host_function
def remove_header(ctx: HostContext, kind: int, name: int, name_len: int) -> None:
    headers = _headers_to_change(_request(ctx), kind)
    headers.remove(_header_name(ctx, name, name_len))


# -- host functions: bodies ----------------------------------------------------------


@_host_function
def read_body(ctx: HostContext, kind: int, buf: int, buf_limit: int) -> int:
    state = _request(ctx)
    body_kind = _body_kind(kind)
    limit = buf_limit & _U32
    if limit == 0:
        raise HostTrap("buf_limit is 0")
    # Check the whole buffer first, so that nothing is consumed when the write would trap.
    if not ctx.memory.holds(buf, limit):
        raise HostTrap(f"buffer of {limit} bytes at {buf & _U32} is outside memory")
    if body_kind is BodyKind.REQUEST:
        if state.phase is RESPONSE_PHASE and not state.features & _BUFFER_REQUEST:
            raise HostTrap("the request body is gone; enable buffer_request to read it in handle_response")
        chunk, eof = state.request_reader.read(limit)
    else:
        if state.phase is RESPONSE_PHASE and not state.features & _BUFFER_RESPONSE:
            raise HostTrap("enable buffer_response to read the response body")
        body = state.response_body or b""
        start = state.response_reader_position
        chunk = bytes(body[start : start + limit])
        state.response_reader_position = start + len(chunk)
        eof = state.response_reader_position >= len(body)
    ctx.memory.write(buf, chunk)
    return pack_eof_len(eof, len(chunk))


@_host_function
def write_body(ctx: HostContext, kind: int, ptr: int, length: int) -> None:
    state = _request(ctx)
    body_kind = _body_kind(kind)
    data = ctx.memory.read(ptr, length)
    if body_kind is BodyKind.REQUEST:
        _require_request_phase(state, "request body")
        if state.first_write(body_kind) or state.request_body is None:
            state.request_body = bytearray()
        target = state.request_body
    else:
        _require_response_writable(state, "response body")
        if state.first_write(body_kind) or state.response_body is None:
            state.response_body = bytearray()
        target = state.response_body
    _check_size(state, len(target) + len(data))
    target += data


# -- host functions: status ----------------------------------------------------------


@_host_function
def get_status_code(ctx: HostContext) -> int:
    return _request(ctx).status


@_host_function
def set_status_code(ctx: HostContext, code: int) -> None:
    state = _request(ctx)
    _require_response_writable(state, "status")
    if not 100 <= code <= 599:
        raise HostTrap(f"{code} is not an HTTP status code")
    state.status = code
    state.status_changed = True


def _bind() -> dict[str, HostImplementation]:
    """Each function of the ABI table with its implementation here; a missing or extra one fails the import."""
    names = [spec.name for spec in HOST_FUNCTIONS]
    if sorted(names) != sorted(_IMPLEMENTED):
        missing = sorted(set(names) - set(_IMPLEMENTED))
        extra = sorted(set(_IMPLEMENTED) - set(names))
        raise RuntimeError(f"host functions out of step with the ABI table: missing {missing}, extra {extra}")
    return {name: _IMPLEMENTED[name] for name in names}


#: The implementation of each function of :data:`abi.HOST_FUNCTIONS`, by name, in the table's order.
IMPLEMENTATIONS: Mapping[str, HostImplementation] = _bind()
