"""The guest's view of a Twisted request, and the guest's changes applied back to it.

:class:`TwistedRequestState` reads the request on first use (nothing is
copied for a guest that does not ask), and its :meth:`~TwistedRequestState.apply_changes`
makes the request what the guest changed it to before the downstream renders it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.http import parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from ..abi import Feature
from ..runtime.state import HeaderList, RequestState
from .backend_request import remember_client_headers
from .downstream import BodyRemainder

__all__ = [
    "FRAMING_HEADERS",
    "NoteDropped",
    "TwistedRequestState",
    "merge_guest_response_headers",
    "raw_headers",
]

#: Says once why something a guest set for framing is not sent: (key, what the guest did).
NoteDropped = Callable[[bytes, str], None]

_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)

#: Response headers that frame the message or describe the connection: only the host sets
#: them, to match the bytes it sends (RFC 9112 6, RFC 9110 7.6.1). A guest's are dropped.
FRAMING_HEADERS = frozenset(
    {
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def raw_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Every (name, value) pair, in order; RequestState lowercases the names."""
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class TwistedRequestState(RequestState):
    """The guest's view of a Twisted request, read from it on first use.

    Read in whichever thread runs the guest: during a guest call nothing else
    touches the request's headers (the reactor waits for the call's result).
    The filter sets ``request``, and ``client_headers``: the headers object, not
    a copy (a guest's changes replace it on the request, never change it).
    """

    request: Request
    client_headers: Headers

    def read_protocol(self) -> bytes:
        proto = self.request.clientproto or b"HTTP/1.0"
        return b"HTTP/2.0" if proto in (b"HTTP/2", b"HTTP/2.0") else proto

    def read_source_addr(self) -> bytes:
        address = self.request.getClientAddress()
        host = getattr(address, "host", None)
        port = getattr(address, "port", None)
        if host is None or port is None:
            return b""
        if ":" in host:
            return f"[{host}]:{port}".encode()
        return f"{host}:{port}".encode()

    def read_request_headers(self) -> Iterable[tuple[bytes, bytes]]:
        return raw_headers(self.client_headers)

    def read_request_header_values(self, name: bytes) -> list[bytes] | None:
        try:
            return list(self.client_headers.getRawHeaders(name, ()))
        except ValueError:  # a name Twisted cannot hold (a space, a NUL, a colon; InvalidHeaderName): none has it
            return []

    def read_response_headers(self) -> Iterable[tuple[bytes, bytes]]:
        request = self.request
        return raw_headers(request.responseHeaders) + [(b"set-cookie", cookie) for cookie in request.cookies]

    def apply_changes(self, note_dropped: NoteDropped) -> None:
        """Make the request what the guest changed it to (method, headers, body, URI), and the response
        what it set before next (headers, status), for the downstream.

        Read from the state's own fields (the request headers if the guest changed them, how much of
        the body it read): one frame for the whole of it.
        """
        request = self.request
        if self.method_changed:
            request.method = self.method
        changed = self._request_headers
        if changed is not None and not changed.changed:
            changed = None
        if changed is not None:
            remember_client_headers(request)  # a proxy downstream tells the client's headers from a guest's
            headers = Headers()
            for name, value in changed.items():
                headers.addRawHeader(name, value)
            request.requestHeaders = headers
        body: Any = None
        length = 0
        reader = self._request_reader
        consumed = reader.consumed if reader is not None else 0
        if self.request_body is not None:
            body = io.BytesIO(self.request_body)
            length = len(self.request_body)
        elif consumed and not self.features & _BUFFER_REQUEST and request.content is not None:
            # What the guest read is gone; the rest is read from where Twisted spooled it, not copied.
            length = max(0, self.body_length - consumed)
            body = io.BufferedReader(BodyRemainder(request.content, consumed, length))
        if body is not None:
            request.content = body
            if changed is None:  # the guest's view (and the client's) keeps the headers as they came
                remember_client_headers(request)
                request.requestHeaders = request.requestHeaders.copy()
            request.requestHeaders.removeHeader(b"transfer-encoding")
            request.requestHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        elif consumed and request.content is not None:
            request.content.seek(0)
        if self.uri_changed:
            uri = self.uri
            request.uri = uri
            path, _, query = uri.partition(b"?")
            request.path = path
            request.args = parse_qs(query, 1)
            segments = [unquote_to_bytes(segment) for segment in path[1:].split(b"/")]
            mount = list(request.prepath or [])
            if segments[: len(mount)] == mount:
                segments = segments[len(mount) :]
            request.prepath = mount
            request.postpath = segments
        # What the guest set on the response before next is part of the final response.
        response = self._response_headers
        if response is not None and response.changed:
            merge_guest_response_headers(request, response, note_dropped)
        if self.status_changed:
            if self.status >= 200:
                request.setResponseCode(self.status)
            else:
                note_dropped(b":status", f"set the interim status {self.status} on the response")


def merge_guest_response_headers(request: Request, headers: HeaderList | None, note_dropped: NoteDropped) -> None:
    """Set each response header the guest set, over what the request has.

    Framing and connection headers are left out: the host sets those for the bytes it sends.
    """
    if headers is None:
        return
    response_headers = request.responseHeaders
    for name, values in headers.grouped().items():
        if name in FRAMING_HEADERS:
            note_dropped(name, f"set the response header {name.decode('latin-1')}")
        else:
            response_headers.setRawHeaders(name, values)
