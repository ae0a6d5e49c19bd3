"""The responses the host writes itself, whole: an error, a guest's own answer, a buffered response.

Each sets the framing (Content-Length, no Transfer-Encoding) for the bytes it
sends, never a guest's, and keeps Twisted's own Connection header (``connection``:
what Twisted had set before any downstream ran).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web.http import (
    BAD_GATEWAY,
    INTERNAL_SERVER_ERROR,
    NO_BODY_CODES,
    REQUEST_ENTITY_TOO_LARGE,
    SERVICE_UNAVAILABLE,
)
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from .request_changes import FRAMING_HEADERS

__all__ = ["GUEST_BODY_CHUNK", "has_body_status", "send_buffered", "send_error", "send_guest_answer"]

#: Bytes of a guest's own answer handed to the transport at a time.
GUEST_BODY_CHUNK = 64 * 1024

_ERROR_BODIES = {
    INTERNAL_SERVER_ERROR: b"Internal Server Error\n",
    BAD_GATEWAY: b"Bad Gateway\n",
    SERVICE_UNAVAILABLE: b"Service Unavailable\n",
    REQUEST_ENTITY_TOO_LARGE: b"Request Entity Too Large\n",
}


def has_body_status(status: int) -> bool:
    """False for the statuses that never have a body: 1xx, 204, 304."""
    return status >= 200 and status not in NO_BODY_CODES


def _fresh_headers(headers: Iterable[tuple[bytes, bytes]], connection: Sequence[bytes] | None) -> Headers:
    """``headers`` without framing headers, plus Twisted's own Connection header."""
    fresh = Headers()
    for name, value in headers:
        if name.lower() not in FRAMING_HEADERS:
            fresh.addRawHeader(name, value)
    if connection:
        fresh.setRawHeaders(b"connection", connection)
    return fresh


def send_error(request: Request, status: int, connection: Sequence[bytes] | None) -> None:
    """A short plain answer with ``status``; a Retry-After already set is kept."""
    body = _ERROR_BODIES.get(status, b"Error\n")
    request.setResponseCode(status)
    request.cookies = []
    retry_after = request.responseHeaders.getRawHeaders(b"retry-after")
    request.responseHeaders = _fresh_headers([(b"content-type", b"text/plain; charset=utf-8")], connection)
    if retry_after:
        request.responseHeaders.setRawHeaders(b"retry-after", retry_after)
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def send_guest_answer(
    request: Request, status: int, body: bytes | bytearray, release: Callable[[], None] | None = None
) -> None:
    """A guest's own answer (next=0), its headers already on the request.

    With ``release`` (the body's bytes are counted in a budget), the body is
    handed to the transport a chunk at a time, as the client reads it (a push
    producer), and ``release`` is called once it is all written or the client
    is gone: the body is counted for as long as the process holds it, and a
    client that does not read holds one chunk of transport buffer, not a copy
    of the body.
    """
    request.setResponseCode(status)
    request.responseHeaders.removeHeader(b"transfer-encoding")
    if has_body_status(status):
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if release is not None and request.method != b"HEAD" and body:
            _GuestBody(request, body, release).start()
            return
        request.write(bytes(body))
    else:
        request.responseHeaders.removeHeader(b"content-length")
    request.finish()
    if release is not None:
        release()


@implementer(IPushProducer)
class _GuestBody:
    """Writes a guest's answer body as the client takes it; gives its budget back once, at the end."""

    def __init__(self, request: Request, body: bytes | bytearray, release: Callable[[], None]):
        self.request = request
        self.body: memoryview | None = memoryview(body)
        self.offset = 0
        self.paused = False
        self.writing = False
        self._release: Callable[[], None] | None = release

    def start(self) -> None:
        request: Any = self.request
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        if self.writing:
            return  # resumed from inside a write: the loop below goes on
        self.writing = True
        try:
            while self.body is not None and not self.paused:
                chunk = self.body[self.offset : self.offset + GUEST_BODY_CHUNK]
                self.offset += len(chunk)
                if self.offset >= len(self.body):
                    self.body = None
                request: Any = self.request
                request.write(bytes(chunk))
                if self.body is None:
                    request.unregisterProducer()
                    request.finish()
                    self._done()
        finally:
            self.writing = False

    def _done(self) -> None:
        self.body = None
        release, self._release = self._release, None
        if release is not None:
            release()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._write()

    def stopProducing(self) -> None:
        """The client is gone (or the transport stops): the rest is not sent."""
        self._done()


def send_buffered(
    request: Request,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes | bytearray,
    connection: Sequence[bytes] | None,
) -> None:
    """A buffered response (status >= 200) with ``headers`` replacing the downstream's."""
    request.setResponseCode(status)
    downstream_headers = request.responseHeaders
    request.cookies = []
    request.responseHeaders = _fresh_headers(headers, connection)
    if has_body_status(status):
        if request.method != b"HEAD" or body:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        else:
            # A HEAD response has no body to measure: it keeps the Content-Length a GET
            # would have, as the downstream set it.
            lengths = downstream_headers.getRawHeaders(b"content-length")
            if lengths:
                request.responseHeaders.setRawHeaders(b"content-length", lengths[-1:])
        request.write(bytes(body))
    request.finish()
