"""The host owns HTTP/1.x response framing, end-to-end over raw loopback sockets.

Responses are read as raw bytes and parsed by :func:`parse_responses`, which
frames them the way a strict client does (RFC 9112 section 6.3): a response
that is cut, that announces two framings, or whose body runs into the next
response shows up as a failed parse or as leftover bytes.

- No response is complete before ``handle_response`` returned: a trap there
  turns an empty, HEAD or 204 response into a 500 or a cut connection.
- A guest that sets ``content-length``, ``transfer-encoding`` or ``connection``
  on the response cannot desync the connection: every response of a pipelined
  pair parses with its true body.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.static import Data

from twisted_httpwasm import Execution

from .support import ServerTestCase
from .test_resource import GuestTestMixin, raw_connect
from .test_resource_failures import trap_in_response
from .test_resource_response import Status, hello

# -- a strict raw HTTP/1.x response parser ------------------------------------------


class FramingError(Exception):
    """The bytes are not a well-framed HTTP/1.x response."""


class Incomplete(FramingError):
    """The bytes end inside a response: the connection was cut."""


class RawResponse(NamedTuple):
    version: bytes
    status: int
    headers: dict[bytes, list[bytes]]  # lowercase names, every value in order
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return b", ".join(values) if values else None


def _parse_head(head: bytes) -> tuple[bytes, int, dict[bytes, list[bytes]]]:
    status_line, *lines = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.0", b"HTTP/1.1") or not code.isdigit():
        raise FramingError(f"not a status line: {status_line!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise FramingError(f"not a header line: {line!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return version, int(code), headers


def _dechunk(raw: bytes, start: int) -> tuple[bytes, int]:
    """The body of a chunked message starting at ``start``, and where the message ends."""
    body = bytearray()
    position = start
    while True:
        end = raw.find(b"\r\n", position)
        if end < 0:
            raise Incomplete("chunked body cut before a chunk size")
        size_text = raw[position:end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FramingError(f"bad chunk size {size_text!r}") from None
        position = end + 2
        if size == 0:
            trailer_end = raw.find(b"\r\n", position)
            while trailer_end != position:  # trailer fields, then the empty line
                if trailer_end < 0:
                    raise Incomplete("chunked body cut in its trailer")
                position = trailer_end + 2
                trailer_end = raw.find(b"\r\n", position)
            return bytes(body), position + 2
        if len(raw) < position + size + 2 or raw[position + size : position + size + 2] != b"\r\n":
            raise Incomplete("chunked body cut inside a chunk")
        body += raw[position : position + size]
        position += size + 2


def parse_responses(raw: bytes, methods: list[bytes], strict: bool = True) -> tuple[list[RawResponse], bytes]:
    """Every response in ``raw`` (all the bytes of a closed connection), answering ``methods`` in order.

    Returns the responses and what is left after the last one.  Raises
    :class:`Incomplete` for a response that is cut, :class:`FramingError` for one
    framed two ways (or, when ``strict``, a 204 with a length).
    """
    responses: list[RawResponse] = []
    position = 0
    for method in methods:
        if position == len(raw):
            break
        head_end = raw.find(b"\r\n\r\n", position)
        if head_end < 0:
            raise Incomplete(f"response to {method!r} cut in its headers")
        version, status, headers = _parse_head(raw[position:head_end])
        position = head_end + 4
        length = headers.get(b"content-length")
        encoding = headers.get(b"transfer-encoding")
        if status in (204, 304) or 100 <= status < 200 or method == b"HEAD":
            if strict and status == 204 and (length or encoding):
                raise FramingError("204 response with Content-Length or Transfer-Encoding")
            body = b""
        elif encoding is not None:
            if length is not None:
                raise FramingError("both Transfer-Encoding and Content-Length")
            if b",".join(encoding).split(b",")[-1].strip().lower() != b"chunked":
                raise FramingError(f"Transfer-Encoding {encoding!r} does not end with chunked")
            body, position = _dechunk(raw, position)
        elif length is not None:
            if len(set(length)) != 1 or not length[0].isdigit():
                raise FramingError(f"bad Content-Length {length!r}")
            size = int(length[0])
            if len(raw) < position + size:
                raise Incomplete(f"body cut: {len(raw) - position} of {size} bytes")
            body = raw[position : position + size]
            position += size
        else:  # delimited by the connection's close
            body, position = raw[position:], len(raw)
        responses.append(RawResponse(version, status, headers, body))
        if status >= 200 and (b"close" in (headers.get(b"connection") or [b""])[0].lower() or version == b"HTTP/1.0"):
            if b"keep-alive" not in b",".join(headers.get(b"connection", [])).lower():
                break  # the server closes after this one
    return responses, raw[position:]


def request_bytes(method: bytes, path: bytes, version: bytes = b"HTTP/1.1", close: bool = False) -> bytes:
    return (
        method
        + b" "
        + path
        + b" "
        + version
        + b"\r\nHost: x\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
    )


# -- 1. nothing completes before handle_response --------------------------------------


def empty_sized() -> Resource:
    """A static.Data with an empty body: ``Content-Length: 0``."""
    data = Data(b"", "text/plain")
    data.isLeaf = True
    return data


class HoldBackTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def assert_never_complete_success(self, downstream: Resource, method: bytes) -> Any:
        """With a guest that traps in handle_response, ``method`` gets a 500 or a cut connection."""
        guest = self.guest(trap_in_response(features=0))
        url = self.serve_guest(guest, downstream)
        client = yield raw_connect(url, request_bytes(method, b"/", close=True))
        raw = yield client.closed
        try:
            responses, _ = parse_responses(raw, [method], strict=False)
        except Incomplete:
            return  # cut: the client knows the response is incomplete
        for response in responses:
            self.assertEqual(response.status, 500, f"complete {response.status} for {method!r}: {raw!r}")
        self.assertEqual(guest.pool.stats.discarded, 1)

    def test_trap_after_empty_sized_response_is_not_a_success(self):
        """Content-Length: 0 from the downstream: the headers wait for handle_response."""
        return self.assert_never_complete_success(empty_sized(), b"GET")

    def test_trap_after_head_response_is_not_a_success(self):
        """A HEAD response is only headers: they wait for handle_response."""
        return self.assert_never_complete_success(hello(), b"HEAD")

    def test_trap_after_no_content_response_is_not_a_success(self):
        """A 204 is only headers: they wait for handle_response."""
        return self.assert_never_complete_success(Status(204), b"GET")

    def test_trap_after_not_modified_response_is_not_a_success(self):
        return self.assert_never_complete_success(Status(304), b"GET")

    @inlineCallbacks
    def test_held_back_empty_responses_are_sent_when_the_guest_succeeds(self):
        """The headers held back for an empty, HEAD or 204 response go out once handle_response returned."""
        cases = [(hello(), b"HEAD", 200, b""), (empty_sized(), b"GET", 200, b""), (Status(204), b"GET", 204, b"")]
        for downstream, method, status, body in cases:
            url = self.serve_guest(self.guest(trap_in_response(features=0).replace("(unreachable)", "")), downstream)
            client = yield raw_connect(url, request_bytes(method, b"/") + request_bytes(b"GET", b"/", close=True))
            responses, rest = parse_responses((yield client.closed), [method, b"GET"])
            self.assertEqual([(r.status, r.body) for r in responses][:1], [(status, body)])
            self.assertEqual((len(responses), rest), (2, b""))


class HoldBackThreadTests(HoldBackTestsMixin, ServerTestCase):
    execution = Execution.THREAD


class HoldBackInlineTests(HoldBackTestsMixin, ServerTestCase):
    execution = Execution.INLINE
