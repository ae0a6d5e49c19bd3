"""Per-request plain data that the host functions read and change.

A :class:`RequestState` is built on the reactor thread from the Twisted
request, handed to whichever thread runs the guest, and read back on the
reactor thread, which applies the guest's changes to the real request.  It
holds no Twisted object, so a worker thread can never touch the reactor.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import BinaryIO

from ..abi import BodyKind

__all__ = ["BodyTooLarge", "HeaderList", "Phase", "RequestState"]


class Phase(enum.Enum):
    """Where the guest is in the life of a request: decides what is legal."""

    INIT = "init"  # _start/_initialize: no request in flight
    REQUEST = "handle_request"
    RESPONSE = "handle_response"


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
        self._size: int | None = None
        self.changed = False

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = sum(len(name) + len(value) for name, value in self._entries)
        return self._size

    def names(self) -> list[bytes]:
        """Each name once, in the order first seen."""
        return list(dict.fromkeys(name for name, _ in self._entries))

    def values(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [value for key, value in self._entries if key == name]

    def size_of(self, name: bytes) -> int:
        """The bytes the entries named ``name`` take (what ``set`` would replace)."""
        return sum(len(name) + len(value) for value in self.values(name))

    def set(self, name: bytes, value: bytes) -> None:
        self.remove(name)
        self.add(name, value)

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
    """Everything the guest can see or change for one request."""

    def __init__(
        self,
        *,
        method: bytes,
        uri: bytes,
        protocol: bytes,
        source_addr: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: BinaryIO | None,
        features: int = 0,
        max_buffer_bytes: int | None = None,
    ):
        self.phase = Phase.REQUEST
        self.features = int(features)  # a plain int: IntFlag arithmetic is slow on the hot path
        self.max_buffer_bytes = max_buffer_bytes
        self.method = method
        self.uri = uri or b"/"
        self.protocol = protocol
        self.source_addr = source_addr
        self.request_headers = HeaderList(headers)
        self.request_body_source = body
        self.request_reader = BodyReader(body)
        self.request_body: bytearray | None = None  # set when the guest wrote one
        self.method_changed = False
        self.uri_changed = False
        self.status = 200
        self.status_changed = False
        self.response_headers = HeaderList()
        self.response_body: bytearray | None = None
        self.response_reader_position = 0
        self.is_error = False
        self.trap_reason: str | None = None
        #: Each guest call on this request: (phase, monotonic start, end, error: None, "trap" or "timeout").
        #: Read by observers (metrics, traces) once the request is over.
        self.calls: list[tuple[Phase, float, float, str | None]] = []
        self._written: set[BodyKind] = set()

    def enter_response_phase(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes | None) -> None:
        """Move to ``handle_response`` with what the next handler produced."""
        self.phase = Phase.RESPONSE
        self.status = status
        self.response_headers = HeaderList(headers)
        self.response_body = bytearray(body) if body is not None else None
        self.response_reader_position = 0
        self._written.clear()

    def first_write(self, kind: BodyKind) -> bool:
        """True once per phase and body kind: that write replaces the body."""
        if kind in self._written:
            return False
        self._written.add(kind)
        return True

    def check_size(self, size: int, what: str = "body") -> None:
        """Raise :class:`BodyTooLarge` if ``size`` bytes of ``what`` would pass the buffer limit."""
        if self.max_buffer_bytes is not None and size > self.max_buffer_bytes:
            raise BodyTooLarge(f"{what} of {size} bytes exceeds the limit of {self.max_buffer_bytes}")
