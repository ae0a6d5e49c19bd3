"""Per-request plain data that the host functions read and change.

A :class:`RequestState` is made on the reactor thread for each request,
handed to whichever thread runs the guest, and read back on the reactor
thread, which applies the guest's changes to the real request.  It knows no
Twisted object (the twisted.web adapter subclasses it to read its request on
first use), so the runtime never touches the reactor.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import BinaryIO

from ..abi import BodyKind

__all__ = ["REQUEST_PHASE", "RESPONSE_PHASE", "BodyTooLarge", "HeaderList", "Phase", "RequestState"]


class Phase(enum.Enum):
    """Where the guest is in the life of a request: decides what is legal."""

    INIT = "init"  # _start/_initialize: no request in flight
    REQUEST = "handle_request"
    RESPONSE = "handle_response"


# The phases as the request path compares with them: read once, because in Python 3.11 an Enum
# class's attribute costs ~10x a module constant (EnumType defines __getattr__, which slows
# every lookup on the class).
REQUEST_PHASE = Phase.REQUEST
RESPONSE_PHASE = Phase.RESPONSE


class BodyTooLarge(Exception):
    """A body grew past the host's buffer limit."""


class HeaderList:
    """An ordered multi-map of header names (lowercase bytes) to values.

    ``size`` is the bytes of every name and value, so that the host can hold a
    guest's header changes to its buffer limit.  It is counted the first time it
    is asked for (most requests never change a header) and kept up to date after.
    """

    __slots__ = ("_entries", "_size", "changed")

    def __init__(self, entries: Iterable[tuple[bytes, bytes]] = ()):
        self._entries: list[tuple[bytes, bytes]] = [(name.lower(), value) for name, value in entries]
        self._size: int | None = None if self._entries else 0
        self.changed = False

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = sum(len(name) + len(value) for name, value in self._entries)
        return self._size

    def names(self) -> list[bytes]:
        """Each name once, in the order first seen."""
        return list(dict.fromkeys(name for name, _ in self._entries))

    def grouped(self) -> dict[bytes, list[bytes]]:
        """Each name once, in the order first seen, with its values in order."""
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in self._entries:
            values = grouped.get(name)
            if values is None:
                grouped[name] = [value]
            else:
                values.append(value)
        return grouped

    def values(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [value for key, value in self._entries if key == name]

    def size_after_set(self, name: bytes, value: bytes) -> int:
        """What :attr:`size` would be after ``set(name, value)``."""
        name = name.lower()
        size = self.size
        for key, old in self._entries:
            if key == name:
                size -= len(key) + len(old)
        return size + len(name) + len(value)

    def set(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        for key, _ in self._entries:
            if key == name:
                self.remove(name)
                break
        self._entries.append((name, value))  # as add(), without lowering the name again
        if self._size is not None:
            self._size += len(name) + len(value)
        self.changed = True

    def add(self, name: bytes, value: bytes) -> None:
        self._entries.append((name.lower(), value))
        if self._size is not None:
            self._size += len(name) + len(value)
        self.changed = True

    def remove(self, name: bytes) -> None:
        name = name.lower()
        kept = [entry for entry in self._entries if entry[0] != name]
        if len(kept) != len(self._entries):
            self._entries = kept
            self._size = None
        self.changed = True

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class BodyReader:
    """Reads a body stream once, in order: the stateful side of ``read_body``."""

    __slots__ = ("_eof", "_stream", "consumed")

    def __init__(self, stream: BinaryIO | None):
        self._stream = stream
        self._eof = stream is None
        self.consumed = 0

    def read(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes, and whether the body is now exhausted."""
        if self._eof or self._stream is None:
            return b"", True
        chunk = self._stream.read(limit)
        self.consumed += len(chunk)
        if len(chunk) < limit:
            self._eof = True
        else:
            # Peek so that the last full chunk already reports eof.
            position = self._stream.tell()
            if not self._stream.read(1):
                self._eof = True
            self._stream.seek(position)
        return chunk, self._eof

    def rest(self) -> bytes:
        """What has not been read yet."""
        if self._eof or self._stream is None:
            return b""
        return self._stream.read()


class RequestState:
    """Everything the guest can see or change for one request.

    Made for every request, so it copies nothing up front: what most guests
    never ask for (the protocol, the client's address, the request headers, the
    body's length, the response headers after ``next``) is read on first use,
    through the ``read_*`` methods.  Here they return what the constructor was
    given; the twisted.web adapter overrides them to read its request, which
    nothing else touches while a guest call runs.  What is never changed keeps
    its class-level default, so that an untouched request costs no attribute
    writes, and :meth:`touched` tells the adapter whether there is anything to
    apply to the real request at all.
    """

    #: True when this request's guest calls run inline, on the thread serving it, which holds the GIL
    #: (set by ``Guest.session``): the compiled accelerator then reads a request header when the guest
    #: asks for it, where a call on another thread gets a copy of them all before it starts.
    inline = False
    # Defaults for the many requests that never change them (set per instance on first change).
    method_changed = False
    uri_changed = False
    status = 200
    status_changed = False
    request_body: bytearray | None = None  # set when the guest wrote one
    response_body: bytearray | None = None
    response_reader_position = 0
    is_error = False
    trap_reason: str | None = None
    _written = 0  # the BodyKind values written in this phase, as bits
    _request_headers: HeaderList | None = None
    _response_headers: HeaderList | None = None
    _request_reader: BodyReader | None = None
    _body_length: int | None = None
    _protocol = b""
    _source_addr = b""
    _headers: Iterable[tuple[bytes, bytes]] = ()

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        body: BinaryIO | None,
        max_buffer_bytes: int | None = None,
        *,
        protocol: bytes = b"",
        source_addr: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        features: int = 0,
    ):
        # method, uri, body and max_buffer_bytes may be passed by position: the adapter makes a state
        # for every request, and in CPython 3.11 making an object with keyword arguments builds a dict
        # of them first (~2.4k instructions more).
        self.phase = REQUEST_PHASE
        self.features = features  # a plain int: IntFlag arithmetic is slow on the hot path
        self.max_buffer_bytes = max_buffer_bytes
        self.method = method
        self.uri = uri or b"/"
        self.request_body_source = body
        #: Each guest call on this request: (phase, monotonic start, end, error: None, "trap" or "timeout"),
        #: recorded when the guest has an observer (metrics, traces), which reads it once the request is over.
        self.calls: list[tuple[Phase, float, float, str | None]] = []
        if protocol:
            self._protocol = protocol
        if source_addr:
            self._source_addr = source_addr
        if headers:
            self._headers = headers

    def touched(self) -> bool:
        """Whether the guest may have changed the request or the response so far (False: nothing to apply).

        Reading the headers or the body counts (they may be changed through what was read).
        """
        return (
            self.method_changed
            or self.uri_changed
            or self.status_changed
            or self._request_headers is not None
            or self._response_headers is not None
            or self._request_reader is not None
            or self.request_body is not None
            or self.response_body is not None
        )

    # -- read on first use ----------------------------------------------------------

    def read_protocol(self) -> bytes:
        """The request's protocol version (``HTTP/1.1``); the adapter reads its request."""
        return self._protocol

    def read_source_addr(self) -> bytes:
        """The client's ``host:port``; the adapter reads its request."""
        return self._source_addr

    def read_request_headers(self) -> Iterable[tuple[bytes, bytes]]:
        """The request's header fields, in order; the adapter reads its request."""
        return self._headers

    def read_response_headers(self) -> Iterable[tuple[bytes, bytes]]:
        """The next handler's response header fields, in the response phase; the adapter reads its request."""
        return ()

    def read_request_header_values(self, name: bytes) -> list[bytes] | None:
        """The values of request header ``name`` read straight from the request, or None to read them all.

        Here None; the adapter answers from its request's own header map, so that
        a guest that only looks at a header or two costs no copy of them all.
        """
        return None

    def request_header_values(self, name: bytes) -> list[bytes]:
        """The values of request header ``name`` (any case), in order, as the guest sees them now."""
        headers = self._request_headers
        if headers is None:
            values = self.read_request_header_values(name)
            if values is not None:
                return values
            headers = self.request_headers
        return headers.values(name)

    @property
    def protocol(self) -> bytes:
        return self.read_protocol()

    @property
    def source_addr(self) -> bytes:
        return self.read_source_addr()

    @property
    def request_headers(self) -> HeaderList:
        headers = self._request_headers
        if headers is None:
            headers = self._request_headers = HeaderList(self.read_request_headers())
        return headers

    @property
    def response_headers(self) -> HeaderList:
        """In the request phase what the guest set so far; in the response phase the next handler's."""
        headers = self._response_headers
        if headers is None:
            entries = self.read_response_headers() if self.phase is RESPONSE_PHASE else ()
            headers = self._response_headers = HeaderList(entries)
        return headers

    @property
    def request_reader(self) -> BodyReader:
        reader = self._request_reader
        if reader is None:
            reader = self._request_reader = BodyReader(self.request_body_source)
        return reader

    @property
    def body_length(self) -> int:
        """The length of the request body as received (0 without one)."""
        length = self._body_length
        if length is None:
            length = 0
            body = self.request_body_source
            if body is not None:
                position = body.tell()
                length = body.seek(0, 2)
                body.seek(position)
            self._body_length = length
        return length

    # -- what the adapter asks after a call ------------------------------------------

    def changed_response_headers(self) -> HeaderList | None:
        """The response headers as the guest left them, if it changed them in this phase."""
        headers = self._response_headers
        return headers if headers is not None and headers.changed else None

    # -- phases ------------------------------------------------------------------------

    def enter_response_phase(
        self, status: int, headers: Iterable[tuple[bytes, bytes]] | None = None, body: bytearray | bytes | None = None
    ) -> None:
        """Move to ``handle_response`` with what the next handler produced.

        ``headers`` None: read on first use (:meth:`read_response_headers`).
        ``body`` is the buffered response body; a bytearray is taken as it is,
        not copied (the guest's own writes replace it with a new one).
        """
        self.phase = RESPONSE_PHASE
        self.status = status
        self._response_headers = None if headers is None else HeaderList(headers)
        if body is not None and not isinstance(body, bytearray):
            body = bytearray(body)
        self.response_body = body
        self.response_reader_position = 0
        self._written = 0

    def first_write(self, kind: BodyKind) -> bool:
        """True once per phase and body kind: that write replaces the body."""
        bit = 1 << kind
        if self._written & bit:
            return False
        self._written |= bit
        return True

    def check_size(self, size: int, what: str = "body") -> None:
        """Raise :class:`BodyTooLarge` if ``size`` bytes of ``what`` would pass the buffer limit."""
        if self.max_buffer_bytes is not None and size > self.max_buffer_bytes:
            raise BodyTooLarge(f"{what} of {size} bytes exceeds the limit of {self.max_buffer_bytes}")
