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
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import Data

from twisted_httpwasm import Execution, GuestResource, ProxyResource

from .support import ServerTestCase, TempFilesMixin, execution_variants, make_guest
from .test_http2 import BIG, H2_SKIP, Http2Mixin, certificates, h2_fetch
from .test_proxy import serve_backend
from .test_resource import GuestTestMixin, Strings, event_text, log_text, raw_connect
from .test_resource_failures import trap_in_response
from .test_resource_response import HELLO, Chunks, Status, hello, leaf_file

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


globals().update(execution_variants(HoldBackTestsMixin, ServerTestCase))


# -- 2. guest-set framing headers never reach the wire --------------------------------

TEN = b"0123456789"

#: Wrong framing and connection headers a buggy or hostile guest may set on the response.
BAD_FRAMINGS = {
    "content-length": [("content-length", "2")],
    "transfer-encoding": [("transfer-encoding", "chunked")],
    "connection": [("connection", "close")],
    "all": [
        ("content-length", "2"),
        ("transfer-encoding", "gzip, chunked"),
        ("connection", "keep-alive, x-foo"),
        ("keep-alive", "timeout=99"),
    ],
}


def framing_guest(
    headers: list[tuple[str, str]],
    *,
    answer: bytes | None = None,
    status: int | None = None,
    features: int = 0,
    late: bool = False,
) -> str:
    """A guest that sets ``headers`` on the response in handle_request (or, ``late``, in handle_response).

    With ``answer`` it answers itself with that body (next=0); ``status`` sets the status too.
    """
    s = Strings()
    sets = "\n".join(f"(call $set_header_value (i32.const 1) {s(name)} {s(value)})" for name, value in headers)
    status_call = f"(call $set_status_code (i32.const {status}))" if status is not None else ""
    body_call = f"(call $write_body (i32.const 1) {s(answer)})" if answer else ""
    return s.wrap(f"""
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const {features})))
    {status_call}
    {"" if late else sets}
    {body_call}
    (i64.const {0 if answer is not None else 1}))
  (func (export "handle_response") (param i32 i32)
    {sets if late else ""})
""")


class ChunkedBackend(Resource):
    """A proxy backend answering TEN in two chunks, without Content-Length (so chunked)."""

    isLeaf = True

    def render(self, request: Any) -> object:
        request.write(TEN[:5])
        request.write(TEN[5:])
        request.finish()
        return NOT_DONE_YET


class FramingTestsMixin(GuestTestMixin):
    """Every response of a pipelined pair (and of an HTTP/1.0 request) parses with its true body."""

    def ten_bytes_file(self) -> Resource:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(TEN)
        return leaf_file(path)

    @inlineCallbacks
    def exchange(self, url: str, requests: list[tuple[bytes, bytes]], version: bytes) -> Any:
        """Send ``requests`` ((method, path)) pipelined on one connection, the last asking to close."""
        raw = b"".join(
            request_bytes(method, path, version, close=i == len(requests) - 1 and version == b"HTTP/1.1")
            for i, (method, path) in enumerate(requests)
        )
        client = yield raw_connect(url, raw)
        received = yield client.closed
        return received

    @inlineCallbacks
    def assert_framed(self, make_guest: Any, downstream: Any, body: bytes, status: int = 200) -> Any:
        """For every bad framing: GET and HEAD, pipelined over HTTP/1.1 and alone over HTTP/1.0."""
        for framing, headers in BAD_FRAMINGS.items():
            url = self.serve_guest(make_guest(headers), downstream())
            for version, methods in [
                (b"HTTP/1.1", [b"GET", b"GET"]),
                (b"HTTP/1.1", [b"HEAD", b"GET"]),
                (b"HTTP/1.0", [b"GET"]),
                (b"HTTP/1.0", [b"HEAD"]),
            ]:
                case = f"{framing} {version.decode()} {b'+'.join(methods).decode()}"
                raw = yield self.exchange(url, [(method, b"/a") for method in methods], version)
                try:
                    responses, rest = parse_responses(raw, methods)
                except FramingError as error:
                    self.fail(f"{case}: {error}: {raw!r}")
                self.assertEqual((len(responses), rest), (len(methods), b""), f"{case}: {raw!r}")
                for method, response in zip(methods, responses, strict=True):
                    expected = b"" if method == b"HEAD" or status in (204, 304) else body
                    self.assertEqual((response.status, response.body), (status, expected), f"{case}: {raw!r}")
                    self.assertIsNone(response.header(b"keep-alive"), case)
                    length = response.header(b"content-length")
                    if method == b"HEAD" and length is not None:
                        self.assertEqual(length, b"%d" % len(body), f"{case}: HEAD announces the GET's length")
                # Only the host says how the connection goes on: close only where it closes.
                first = responses[0]
                if version == b"HTTP/1.1" and len(methods) > 1:
                    self.assertIsNone(first.header(b"connection"), f"{case}: {raw!r}")

    def test_static_file(self):
        """In front of a static.File (Content-Length from the file)."""
        guest_for = lambda headers: self.guest(framing_guest(headers))  # noqa: E731
        return self.assert_framed(guest_for, self.ten_bytes_file, TEN)

    def test_chunked_streaming_downstream(self):
        """In front of a downstream that writes in chunks without Content-Length (chunked on HTTP/1.1)."""
        guest_for = lambda headers: self.guest(framing_guest(headers))  # noqa: E731
        return self.assert_framed(guest_for, lambda: Chunks(b"01234", b"56789"), TEN)

    def test_guest_answered(self):
        """A response the guest builds itself (next=0)."""
        guest_for = lambda headers: self.guest(framing_guest(headers, answer=b"answered"))  # noqa: E731
        return self.assert_framed(guest_for, hello, b"answered")

    def test_buffered_response(self):
        """With buffer_response, headers set in handle_request."""
        guest_for = lambda headers: self.guest(framing_guest(headers, features=2))  # noqa: E731
        return self.assert_framed(guest_for, lambda: Chunks(b"01234", b"56789"), TEN)

    def test_buffered_response_set_in_handle_response(self):
        """With buffer_response, headers set in handle_response, over a sized downstream."""
        guest_for = lambda headers: self.guest(framing_guest(headers, features=2, late=True))  # noqa: E731
        return self.assert_framed(guest_for, self.ten_bytes_file, TEN)

    def test_chained_guests(self):
        """Both of two chained guests set wrong framing (the inner one all of it)."""
        guest_for = lambda headers: self.guest(framing_guest(headers))  # noqa: E731

        def downstream() -> Resource:
            return GuestResource(self.guest(framing_guest(BAD_FRAMINGS["all"])), Chunks(b"01234", b"56789"))

        return self.assert_framed(guest_for, downstream, TEN)

    def test_proxy_to_a_chunked_backend(self):
        """In front of a ProxyResource whose backend answers chunked."""
        backend = serve_backend(self, ChunkedBackend())  # type: ignore[arg-type]
        guest_for = lambda headers: self.guest(framing_guest(headers))  # noqa: E731

        def proxy() -> ProxyResource:
            resource = ProxyResource(backend)
            self.addCleanup(resource.close)
            return resource

        return self.assert_framed(guest_for, proxy, TEN)

    def test_no_content_from_the_guest(self):
        """A guest answering 204 with a body and Content-Length: 50 sends neither."""
        guest_for = lambda headers: self.guest(  # noqa: E731
            framing_guest([*headers, ("content-length", "50")], answer=b"no body for 204", status=204)
        )
        return self.assert_framed(guest_for, hello, b"", status=204)

    def test_no_content_from_the_downstream(self):
        """A downstream answering 204: no Content-Length, whatever the guest set."""
        guest_for = lambda headers: self.guest(framing_guest([*headers, ("content-length", "50")]))  # noqa: E731
        return self.assert_framed(guest_for, lambda: Status(204), b"", status=204)

    def test_no_content_buffered(self):
        guest_for = lambda headers: self.guest(  # noqa: E731
            framing_guest([*headers, ("content-length", "50")], features=2, late=True)
        )
        return self.assert_framed(guest_for, lambda: Status(204), b"", status=204)

    @inlineCallbacks
    def assert_pair(self, url: str, status: int, body: bytes) -> Any:
        """A pipelined pair of GETs: the first answered ``status`` with ``body``, the second intact."""
        raw = yield self.exchange(url, [(b"GET", b"/a"), (b"GET", b"/a")], b"HTTP/1.1")
        responses, rest = parse_responses(raw, [b"GET", b"GET"])
        self.assertEqual([(r.status, r.body) for r in responses], [(status, body)] * 2, raw)
        self.assertEqual(rest, b"", raw)

    @inlineCallbacks
    def test_guest_answering_an_interim_status_gets_a_500(self):
        """A 1xx cannot end a response (the client would take the next response for its end): 500."""
        events = self.capture_log()
        url = self.serve_guest(self.guest(framing_guest([], answer=b"", status=100)), hello())
        yield self.assert_pair(url, 500, b"Internal Server Error\n")
        self.assertIn("interim status 100", log_text(events))

    @inlineCallbacks
    def test_interim_status_set_before_next_is_not_sent(self):
        url = self.serve_guest(self.guest(framing_guest([], status=101)), hello())
        yield self.assert_pair(url, 200, HELLO)

    @inlineCallbacks
    def test_interim_status_set_on_a_buffered_response_is_not_sent(self):
        s = Strings()
        guest = self.guest(
            s.wrap("""
  (func (export "handle_request") (result i64) (drop (call $enable_features (i32.const 2))) (i64.const 1))
  (func (export "handle_response") (param i32 i32) (call $set_status_code (i32.const 103)))
""")
        )
        url = self.serve_guest(guest, hello())
        yield self.assert_pair(url, 200, HELLO)

    @inlineCallbacks
    def test_dropped_framing_header_is_logged_once_at_debug(self):
        events = self.capture_log()
        url = self.serve_guest(self.guest(framing_guest(BAD_FRAMINGS["content-length"])), hello())
        for _ in range(2):
            yield self.exchange(url, [(b"GET", b"/")], b"HTTP/1.0")
        lines = [event_text(e) for e in events if "frames responses itself" in event_text(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("content-length", lines[0])
        self.assertEqual([e["log_level"] for e in events if "frames responses" in event_text(e)], [LogLevel.debug])


class Lying(Resource):
    """Announces ``announced`` as its Content-Length and writes TEN, in two writes."""

    isLeaf = True

    def __init__(self, announced: int):
        super().__init__()
        self.announced = announced

    def render_GET(self, request: Any) -> object:
        request.setHeader(b"content-length", b"%d" % self.announced)
        request.write(TEN[:5])
        request.write(TEN[5:])
        request.finish()
        return NOT_DONE_YET


class DownstreamLengthTestsMixin(GuestTestMixin):
    """A downstream whose Content-Length is wrong cannot desync the connection either."""

    @inlineCallbacks
    def test_bytes_past_the_content_length_are_not_sent(self):
        events = self.capture_log()
        url = self.serve_guest(self.guest(framing_guest([])), Lying(7))
        client = yield raw_connect(url, request_bytes(b"GET", b"/") + request_bytes(b"GET", b"/", close=True))
        raw = yield client.closed
        responses, rest = parse_responses(raw, [b"GET", b"GET"])
        self.assertEqual([(r.status, r.body) for r in responses], [(200, TEN[:7])] * 2, raw)
        self.assertEqual(rest, b"", raw)
        self.assertIn("wrote more than its Content-Length of 7", log_text(events))

    @inlineCallbacks
    def test_a_body_short_of_its_content_length_cuts_the_connection(self):
        """Instead of a client waiting for bytes that never come (or reading the next response into it)."""
        url = self.serve_guest(self.guest(framing_guest([])), Lying(20))
        client = yield raw_connect(url, request_bytes(b"GET", b"/") + request_bytes(b"GET", b"/", close=True))
        raw = yield client.closed
        if raw:  # an abort may also drop what was still buffered: then nothing at all arrives
            self.assertRaises(Incomplete, parse_responses, raw, [b"GET", b"GET"])


globals().update(execution_variants(DownstreamLengthTestsMixin, ServerTestCase))


globals().update(execution_variants(FramingTestsMixin, TempFilesMixin, ServerTestCase))


class Http2FramingTestsMixin:
    """Over HTTP/2 (h2's client validates the headers and the length), wrong framing is not sent either."""

    execution: Execution
    timeout = 20
    skip = H2_SKIP

    @inlineCallbacks
    def test_guest_framing_headers_are_not_sent_over_http2(self) -> Any:
        guest = make_guest(framing_guest(BAD_FRAMINGS["all"]), execution=self.execution)
        port = Http2Mixin.serve_tls(self, guest)  # type: ignore[arg-type]
        ca_pem = certificates().ca_pem
        for path, body in [("/data", b"downstream body\n"), ("/big", BIG)]:
            answer = yield deferToThread(h2_fetch, port, ca_pem, "GET", path)
            self.assertEqual((answer.protocol, answer.status, answer.body), ("h2", 200, body))  # type: ignore[attr-defined]
            self.assertNotIn("connection", answer.headers)  # type: ignore[attr-defined]
            self.assertNotIn("keep-alive", answer.headers)  # type: ignore[attr-defined]


globals().update(execution_variants(Http2FramingTestsMixin, ServerTestCase))
