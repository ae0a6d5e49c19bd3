"""GuestResource end-to-end: responses built by the guest, buffered, or streamed."""

from __future__ import annotations

import os
import zlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import ResponseFailed
from twisted.web.resource import EncodingResourceWrapper, Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory
from twisted.web.static import Data, File

from .support import NOOP_RESPONSE, ServerTestCase, collect_streamed, execution_variants
from .test_resource import GuestTestMixin, Strings, log_text, raw_connect, split_response

HELLO = b"hello from downstream"


def hello() -> Resource:
    """A static.Data answering at any path (a leaf), with its own Content-Length."""
    data = Data(HELLO, "text/plain")
    data.isLeaf = True
    return data


def leaf_file(path: str) -> Resource:
    """A static.File answering at any path below its mount point."""
    file = File(path)
    file.isLeaf = True
    return file


class Chunks(Resource):
    """Writes ``chunks`` one reactor turn apart, without a Content-Length (so chunked on HTTP/1.1)."""

    isLeaf = True

    def __init__(self, *chunks: bytes):
        super().__init__()
        self.chunks = chunks

    def render_GET(self, request: Any) -> object:
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"x-remove-me", b"downstream")
        request.addCookie(b"flavour", b"oat")
        pending = list(self.chunks)

        def next_chunk() -> None:
            if pending:
                request.write(pending.pop(0))
                reactor.callLater(0.001, next_chunk)  # type: ignore[attr-defined]
            else:
                request.finish()

        reactor.callLater(0, next_chunk)  # type: ignore[attr-defined]
        return NOT_DONE_YET


class Gate(Resource):
    """Writes a first chunk, then waits for ``opened`` before writing the rest and finishing."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> object:
        request.write(b"first chunk;")

        def rest(_: object) -> None:
            request.write(b"second chunk")
            request.finish()

        self.opened.addCallback(rest)
        return NOT_DONE_YET


class SizedChunks(Chunks):
    """Chunks with a Content-Length announced up front."""

    def render_GET(self, request: Any) -> object:
        request.setHeader(b"content-length", b"%d" % sum(len(chunk) for chunk in self.chunks))
        return super().render_GET(request)


class SizedGate(Gate):
    def render_GET(self, request: Any) -> object:
        request.setHeader(b"content-length", b"%d" % len(b"first chunk;second chunk"))
        return super().render_GET(request)


def gzipped(resource: Resource) -> Resource:
    return EncodingResourceWrapper(resource, [GzipEncoderFactory()])


class Status(Resource):
    """Answers with ``code`` and an empty body."""

    isLeaf = True

    def __init__(self, code: int):
        super().__init__()
        self.code = code

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return b""


# -- guests --------------------------------------------------------------------------------

S = Strings()
ANSWER_PLAIN = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (call $write_body (i32.const 1) {S("answered by ")})
    (call $write_body (i32.const 1) {S("the guest")})
    (i64.const 0))
  {NOOP_RESPONSE}
""")

S = Strings()
ANSWER_TEAPOT = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (call $set_status_code (i32.const 418))
    (call $set_header_value (i32.const 1) {S("content-type")} {S("text/x-tea")})
    (call $add_header_value (i32.const 1) {S("x-tea")} {S("green")})
    (call $add_header_value (i32.const 1) {S("x-tea")} {S("black")})
    (call $write_body (i32.const 1) {S("short and stout")})
    ;; a req_ctx with next=0 is ignored, and handle_response must not run
    (i64.const 0x700000000))
  (func (export "handle_response") (param i32 i32) (unreachable))
""")

S = Strings()
PREFIX_THEN_NEXT = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 1) {S("x-guest")} {S("before next")})
    (call $write_body (i32.const 1) {S("guest prefix;")})
    (i64.const 1))
  {NOOP_RESPONSE}
""")

S = Strings()
BRACKET = S.wrap(f"""
  ;; buffer_response: read the whole downstream body, answer "[" body "]" with 203 instead of 200
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const 2)))
    (i64.const 1))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (local $n i32) (local $r i64)
    (loop $more
      (local.set $r (call $read_body (i32.const 1) (i32.add (i32.const 65536) (local.get $n)) (i32.const 65536)))
      (local.set $n (i32.add (local.get $n) (i32.wrap_i64 (local.get $r))))
      (br_if $more (i64.eqz (i64.shr_u (local.get $r) (i64.const 32)))))
    (call $write_body (i32.const 1) {S("[")})
    (call $write_body (i32.const 1) (i32.const 65536) (local.get $n))
    (call $write_body (i32.const 1) {S("]")})
    (if (i32.eq (call $get_status_code) (i32.const 200)) (then (call $set_status_code (i32.const 203))))
    (call $set_header_value (i32.const 1) {S("x-rewritten")} {S("yes")})
    (call $remove_header (i32.const 1) {S("x-remove-me")}))
""")

S = Strings()
BUFFERED_HEADER_ONLY = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const 2)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)
    (call $set_header_value (i32.const 1) {S("x-buffered")} {S("yes")}))
""")

SET_STATUS_TOO_LATE = """
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32) (call $set_status_code (i32.const 201)))
"""

PASS = f"""
  (func (export "handle_request") (result i64) (i64.const 1))
  {NOOP_RESPONSE}
"""


class GuestResponseTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_guest_answers_with_default_status(self):
        """next=0: the guest's body is the response, status 200 unless set, Content-Length exact."""
        guest = self.guest(ANSWER_PLAIN)
        url = self.serve_guest(guest, hello())
        status, _, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (200, b"answered by the guest", 21))
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_guest_answers_with_status_and_headers(self):
        url = self.serve_guest(self.guest(ANSWER_TEAPOT), hello())
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (418, b"short and stout", 15))
        self.assertEqual(headers.getRawHeaders(b"x-tea"), [b"green", b"black"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/x-tea"])

    @inlineCallbacks
    def test_guest_answer_to_head_has_length_but_no_body(self):
        client = yield raw_connect(
            self.serve_guest(self.guest(ANSWER_PLAIN), hello()),
            b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        status, headers, body = split_response((yield client.closed))
        self.assertEqual((status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", b"21", b""))

    @inlineCallbacks
    def test_response_set_before_next_joins_downstream_response(self):
        """Headers and body the guest wrote in handle_request with next=1 are part of the
        final response, before the downstream's; Content-Length covers both."""
        url = self.serve_guest(self.guest(PREFIX_THEN_NEXT), hello())
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body), (200, b"guest prefix;" + HELLO))
        self.assertEqual(length, len(body))
        self.assertEqual(headers.getRawHeaders(b"x-guest"), [b"before next"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain"])

    @inlineCallbacks
    def test_response_set_before_next_joins_streamed_response(self):
        url = self.serve_guest(self.guest(PREFIX_THEN_NEXT), Chunks(b"one;", b"two"))
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (200, b"guest prefix;one;two", None))
        self.assertEqual(headers.getRawHeaders(b"x-guest"), [b"before next"])

    @inlineCallbacks
    def test_response_set_before_next_with_empty_downstream(self):
        url = self.serve_guest(self.guest(PREFIX_THEN_NEXT), Status(200))
        status, _, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (200, b"guest prefix;", 13))


globals().update(execution_variants(GuestResponseTestsMixin, ServerTestCase))


class BufferedResponseTestsMixin(GuestTestMixin):
    def bracket(self) -> Any:
        return self.guest(BRACKET, memory_pages=8)

    @inlineCallbacks
    def test_rewrites_data_resource(self):
        """The guest reads the whole response, replaces it, changes status and headers."""
        guest = self.bracket()
        url = self.serve_guest(guest, hello())
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (203, b"[" + HELLO + b"]", len(HELLO) + 2))
        self.assertEqual(headers.getRawHeaders(b"x-rewritten"), [b"yes"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_rewrites_chunks_written_asynchronously(self):
        """A downstream that writes in several chunks over several reactor turns is held whole."""
        url = self.serve_guest(self.bracket(), Chunks(b"one;", b"two;", b"three"))
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (203, b"[one;two;three]", 15))
        self.assertIsNone(headers.getRawHeaders(b"x-remove-me"))
        self.assertEqual(headers.getRawHeaders(b"set-cookie"), [b"flavour=oat"])
        self.assertIsNone(headers.getRawHeaders(b"transfer-encoding"))

    @inlineCallbacks
    def test_rewrites_static_file_pull_producer(self):
        """twisted.web.static.File streams with a pull producer; buffering drives it to the end."""
        path = self.mktemp()
        content = os.urandom(200_000)
        with open(path, "wb") as f:
            f.write(content)
        url = self.serve_guest(self.bracket(), leaf_file(path))
        status, _, body, length = yield self.get(url + "/")
        self.assertEqual((status, length), (203, len(content) + 2))
        self.assertTrue(body == b"[" + content + b"]", "body differs")

    @inlineCallbacks
    def test_head_keeps_downstream_content_length(self):
        """HEAD through a buffering guest: no body, and the Content-Length a GET would have."""
        url = self.serve_guest(self.guest(BUFFERED_HEADER_ONLY), hello())
        client = yield raw_connect(url, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"x-buffered"], b"yes")
        self.assertEqual(headers[b"content-length"], b"%d" % len(HELLO))
        self.assertEqual(body, b"")

    @inlineCallbacks
    def test_not_modified_passes_through(self):
        """A 304 from static.File stays a 304 without a body, even when the guest wrote one."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"cached content")
        url = self.serve_guest(self.bracket(), leaf_file(path))
        client = yield raw_connect(
            url,
            b"GET / HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n"
            b"Connection: close\r\n\r\n",
        )
        status, headers, body = split_response((yield client.closed))
        self.assertEqual(status, b"HTTP/1.1 304 Not Modified")
        self.assertEqual(body, b"")
        self.assertNotIn(b"transfer-encoding", headers)

    @inlineCallbacks
    def test_no_content_passes_through(self):
        url = self.serve_guest(self.bracket(), Status(204))
        client = yield raw_connect(url, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual(status, b"HTTP/1.1 204 No Content")
        self.assertEqual(body, b"")
        self.assertNotIn(b"transfer-encoding", headers)

    @inlineCallbacks
    def test_gzip_child_is_encoded_after_the_guest_rewrote_it(self):
        """An EncodingResourceWrapper below the guest still compresses; the guest reads and
        rewrites the plain body, and the client gets it gzipped."""
        root = Resource()
        root.putChild(b"z", gzipped(hello()))
        url = self.serve_guest(self.bracket(), root)
        client = yield raw_connect(url, b"GET /z HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual(status, b"HTTP/1.0 203 Non-Authoritative Information")
        self.assertEqual(headers[b"content-encoding"], b"gzip")
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(zlib.decompress(body, 16 + zlib.MAX_WBITS), b"[" + HELLO + b"]")


globals().update(execution_variants(BufferedResponseTestsMixin, ServerTestCase))


class StreamedResponseTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_downstream_bytes_stream_before_it_finishes(self):
        """Without buffer_response the client gets the first chunk while the downstream still
        waits; the downstream goes on only once the test saw that chunk arrive."""
        gate = Gate()
        url = self.serve_guest(self.guest(PASS), gate)
        response = yield self.http.get(url + "/")
        received, first, done = collect_streamed(response)
        yield first
        self.assertTrue(b"first chunk;".startswith(b"".join(received)), received)
        self.assertFalse(done.called)
        gate.opened.callback(None)
        yield done
        self.assertEqual(b"".join(received), b"first chunk;second chunk")

    @inlineCallbacks
    def test_sized_response_streams_before_it_finishes(self):
        """With a Content-Length the body streams the same; only its last byte waits for handle_response."""
        gate = SizedGate()
        url = self.serve_guest(self.guest(PASS), gate)
        response = yield self.http.get(url + "/")
        self.assertEqual(response.length, 24)
        received, first, done = collect_streamed(response)
        yield first
        self.assertTrue(b"first chunk;".startswith(b"".join(received)), received)
        gate.opened.callback(None)
        yield done
        self.assertEqual(b"".join(received), b"first chunk;second chunk")

    @inlineCallbacks
    def test_sized_chunks_arrive_whole(self):
        url = self.serve_guest(self.guest(PASS), SizedChunks(b"one;", b"two;", b"three"))
        status, _, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (200, b"one;two;three", 13))

    @inlineCallbacks
    def test_gzip_child_is_encoded(self):
        root = Resource()
        root.putChild(b"z", gzipped(hello()))
        url = self.serve_guest(self.guest(PREFIX_THEN_NEXT), root)
        client = yield raw_connect(url, b"GET /z HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual(status, b"HTTP/1.0 200 OK")
        self.assertEqual(headers[b"content-encoding"], b"gzip")
        self.assertEqual(zlib.decompress(body, 16 + zlib.MAX_WBITS), b"guest prefix;" + HELLO)

    @inlineCallbacks
    def test_head_passes_through(self):
        url = self.serve_guest(self.guest(PASS), hello())
        client = yield raw_connect(url, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual((status, headers[b"content-length"], body), (b"HTTP/1.1 200 OK", b"%d" % len(HELLO), b""))

    @inlineCallbacks
    def test_not_modified_and_no_content_pass_through(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"cached content")
        root = Resource()
        root.putChild(b"file", File(path))
        root.putChild(b"empty", Status(204))
        url = self.serve_guest(self.guest(PASS), root)
        client = yield raw_connect(
            url,
            b"GET /file HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n"
            b"Connection: close\r\n\r\n",
        )
        status, _, body = split_response((yield client.closed))
        self.assertEqual((status, body), (b"HTTP/1.1 304 Not Modified", b""))
        client = yield raw_connect(url, b"GET /empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response((yield client.closed))
        self.assertEqual((status, body), (b"HTTP/1.1 204 No Content", b""))
        self.assertNotIn(b"transfer-encoding", headers)

    @inlineCallbacks
    def test_setting_status_after_next_fails_a_sized_response(self):
        """Without buffer_response, set_status_code in handle_response cannot be honoured: the
        response is cut (the client sees it incomplete), not silently sent as if it had worked."""
        events = self.capture_log()
        guest = self.guest(SET_STATUS_TOO_LATE)
        url = self.serve_guest(guest, hello())
        failure = yield self.assertFailure(self.get(url + "/"), ResponseFailed)
        self.assertTrue(failure.reasons)
        self.assertIn("enable buffer_response", log_text(events))
        self.assertEqual(guest.pool.stats.discarded, 1)
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_setting_status_after_next_fails_a_chunked_response(self):
        events = self.capture_log()
        url = self.serve_guest(self.guest(SET_STATUS_TOO_LATE), Chunks(b"one;", b"two"))
        yield self.assertFailure(self.get(url + "/"), ResponseFailed)
        self.assertIn("enable buffer_response", log_text(events))


globals().update(execution_variants(StreamedResponseTestsMixin, ServerTestCase))
