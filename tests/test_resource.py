"""GuestResource end-to-end: pinning, and what the guest changes on the request.

Every behaviour runs in both execution modes: each ``...Mixin`` below is
combined with :class:`ServerTestCase` once per mode.  Helpers shared with
``test_resource_response`` and ``test_resource_failures`` live here too.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, Guest, GuestResource

from .support import NOOP_RESPONSE, ServerTestCase, execution_variants, module

# -- helpers shared by the test_resource* modules -----------------------------------


class Strings:
    """Constant strings for an inline WAT guest, laid out from ``base``.

    ``s(b"x-a")`` gives ``(i32.const PTR) (i32.const 3)``, the ``(ptr, len)``
    pair the ABI takes; ``s.data()`` gives the data segments to put in the module.
    """

    def __init__(self, base: int = 0x8000):
        self._next = base
        self._placed: dict[bytes, int] = {}

    def __call__(self, value: bytes | str) -> str:
        raw = value.encode() if isinstance(value, str) else value
        if raw not in self._placed:
            self._placed[raw] = self._next
            self._next += len(raw) + 1
        return f"(i32.const {self._placed[raw]}) (i32.const {len(raw)})"

    def wrap(self, wat: str) -> str:
        """``wat`` followed by the data segments of every string it used."""
        return wat + "\n" + self.data()

    def data(self) -> str:
        segments = []
        for raw, ptr in self._placed.items():
            text = "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\{b:02x}" for b in raw)
            segments.append(f'(data (i32.const {ptr}) "{text}")')
        return "\n".join(segments)


class GuestTestMixin:
    """Builds guests in this test case's execution mode."""

    execution: Execution
    timeout = 10  # trial's default is 120 s; these tests take well under one

    def guest(self, *body: str, memory_pages: int = 1, **options: Any) -> Guest:
        return Guest(module(*body, memory_pages=memory_pages), execution=self.execution, **options)

    @inlineCallbacks
    def get(self, url: str, method: str = "GET", **kwargs: Any) -> Any:
        """A :class:`Fetched` response; Content-Length is ``length`` (treq hides the header)."""
        response = yield self.http.request(method, url, **kwargs)  # type: ignore[attr-defined]
        body = yield response.content()
        length = response.length if isinstance(response.length, int) else None
        return Fetched(response.code, response.headers, body, length)

    def wait_for_log(self, text: str) -> Deferred[str]:
        """Fires with the first log message that contains ``text``, one reactor turn later."""
        fired: Deferred[str] = Deferred()

        def observer(event: dict[str, Any]) -> None:
            message = event_text(event)
            if text in message and not fired.called:
                globalLogPublisher.removeObserver(observer)
                reactor.callLater(0, fired.callback, message)  # type: ignore[attr-defined]

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)  # type: ignore[attr-defined]
        return fired

    def capture_log(self) -> list[dict[str, Any]]:
        """Every log event from now until the end of the test."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[attr-defined]
        return events


class Fetched(NamedTuple):
    status: int
    headers: Any
    body: bytes
    length: int | None  # the Content-Length, None when chunked


def event_text(event: dict[str, Any]) -> str:
    """The formatted text of a log event.

    A legacy observer (trial's, twistd's) replaces a non-tuple ``message`` key in
    the shared event with ``()``, keeping the pristine event in ``log_legacy``.
    """
    pristine = event.get("log_legacy")
    return str(pristine) if pristine is not None else formatEvent(event) or ""


def log_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(event_text(event) for event in events)


def released(guest: Any, count: int = 1) -> Deferred[None]:
    """Fires on the reactor thread once ``count`` more instances were given back to the pool."""
    pool = guest.pool
    original = pool.release
    fired: Deferred[None] = Deferred()
    seen = [0]

    def release(instance: Any) -> None:
        original(instance)
        seen[0] += 1
        if seen[0] == count:
            del pool.release
            reactor.callFromThread(fired.callback, None)  # type: ignore[attr-defined]

    pool.release = release
    return fired


class RawClient(Protocol):
    """A hand-driven HTTP client: sends bytes, collects everything until the close."""

    def __init__(self, request: bytes = b""):
        self.request = request
        self.received = bytearray()
        self.first_data: Deferred[None] = Deferred()
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.local_port = self.transport.getHost().port
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.first_data.called:
            self.first_data.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(bytes(self.received))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_connect(url: str, request: bytes = b"") -> Deferred[RawClient]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(url))
    return connectProtocol(endpoint, RawClient(request))


def split_response(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, lowercase headers, body) of one raw HTTP/1.x response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


class Echo(Resource):
    """Answers with JSON describing the request it saw (method, path, args, headers, body)."""

    isLeaf = True

    def __init__(self, name: str = "echo"):
        super().__init__()
        self.name = name

    def render(self, request: Any) -> bytes:
        content = request.content.read() if request.content is not None else b""
        seen = {
            "name": self.name,
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "path": request.path.decode(),
            "args": {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            "prepath": [p.decode() for p in request.prepath],
            "postpath": [p.decode() for p in request.postpath],
            "headers": {
                k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            "body": content.decode("latin-1"),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen).encode()


class Slow(Resource):
    """Answers ``path`` after ``delay(request)`` seconds, asynchronously."""

    isLeaf = True

    def __init__(self, delay: Any):
        super().__init__()
        self.delay = delay

    def render_GET(self, request: Any) -> object:
        def answer() -> None:
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"answer for " + request.path)
            request.finish()

        reactor.callLater(self.delay(request), answer)  # type: ignore[attr-defined]
        return NOT_DONE_YET


# -- pinning ----------------------------------------------------------------------

S = Strings()
PINNING = S.wrap(f"""
  ;; 0: busy flag, 4: stored req_ctx, 8: request counter, 12: stored URI length, 4096: stored URI
  (func (export "handle_request") (result i64)
    (if (i32.load (i32.const 0)) (then (unreachable)))  ;; an instance lent to two requests at once
    (i32.store (i32.const 0) (i32.const 1))
    (drop (call $enable_features (i32.const 2)))
    (i32.store (i32.const 8) (i32.add (i32.load (i32.const 8)) (i32.const 1)))
    ;; the high bit makes req_ctx a negative i32: it must come back unchanged
    (i32.store (i32.const 4) (i32.or (i32.load (i32.const 8)) (i32.const 0x80000000)))
    (i32.store (i32.const 12) (call $get_uri (i32.const 4096) (i32.const 1024)))
    (i64.or (i64.shl (i64.extend_i32_u (i32.load (i32.const 4))) (i64.const 32)) (i64.const 1)))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (local $n i32) (local $i i32)
    (if (i32.eqz (i32.load (i32.const 0))) (then (unreachable)))  ;; not the instance that ran handle_request
    (if (i32.ne (local.get $ctx) (i32.load (i32.const 4))) (then (unreachable)))
    (if (local.get $is_error) (then (unreachable)))
    ;; the request this instance stored is the request it is answering
    (local.set $n (call $get_uri (i32.const 6144) (i32.const 1024)))
    (if (i32.ne (local.get $n) (i32.load (i32.const 12))) (then (unreachable)))
    (block $same
      (loop $compare
        (br_if $same (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.ne (i32.load8_u (i32.add (i32.const 4096) (local.get $i)))
                    (i32.load8_u (i32.add (i32.const 6144) (local.get $i))))
          (then (unreachable)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $compare)))
    (i32.store (i32.const 0) (i32.const 0))
    (call $set_header_value (i32.const 1) {S("x-seen-uri")} (i32.const 4096) (i32.load (i32.const 12))))
""")


class PinningTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_concurrent_requests_keep_their_instance(self):
        """50 overlapping requests each run handle_response on the instance that ran their
        handle_request; afterwards every instance is idle again and several were in use at once."""
        guest = self.guest(PINNING)
        url = self.serve_guest(guest, Slow(lambda request: 0.002 * (int(request.path.rsplit(b"/", 1)[1]) % 11)))

        results = yield gatherResults([self.get(f"{url}/n/{n}?q={n}") for n in range(50)])
        for n, (status, headers, body, length) in enumerate(results):
            self.assertEqual(status, 200, body)
            self.assertEqual(body, b"answer for /n/%d" % n)
            self.assertEqual(headers.getRawHeaders(b"x-seen-uri"), [b"/n/%d?q=%d" % (n, n)])
            self.assertEqual(length, len(body))  # buffered: the host sets Content-Length
        stats = guest.pool.stats
        self.assertEqual(stats.in_use, 0)
        self.assertEqual(stats.discarded, 0)
        self.assertEqual(stats.idle, stats.created)
        self.assertGreater(stats.peak_in_use, 1)


globals().update(execution_variants(PinningTestsMixin, ServerTestCase))


# -- what the guest changes on the request -----------------------------------------

S = Strings()
REWRITE = S.wrap(f"""
  ;; /a...: set_uri to /items/b%20c?y=2&y=3 ; /m...: set_method POST ; /h...: header changes
  (func (export "handle_request") (result i64)
    (local $c i32)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    (local.set $c (i32.load8_u (i32.const 101)))
    (if (i32.eq (local.get $c) (i32.const 97))  ;; a
      (then (call $set_uri {S("/items/b%20c?y=2&y=3")})))
    (if (i32.eq (local.get $c) (i32.const 109))  ;; m
      (then (call $set_method {S("POST")})))
    (if (i32.eq (local.get $c) (i32.const 104))  ;; h
      (then
        (call $set_header_value (i32.const 0) {S("x-set")} {S("new")})
        (call $add_header_value (i32.const 0) {S("X-Add")} {S("second")})
        (call $remove_header (i32.const 0) {S("x-remove")})))
    (i64.const 1))
  {NOOP_RESPONSE}
""")


class RequestChangesTestsMixin(GuestTestMixin):
    def tree(self) -> Resource:
        root = Resource()
        items = Resource()
        root.putChild(b"items", items)
        items.putChild(b"b c", Echo("b c"))
        root.putChild(b"a", Echo("a"))
        root.putChild(b"m", Echo("m"))
        root.putChild(b"h", Echo("h"))
        return root

    @inlineCallbacks
    def test_set_uri_routes_downstream_tree_and_updates_args(self):
        """The downstream tree routes on the URI the guest set; path, args and uri follow it."""
        url = self.serve_guest(self.guest(REWRITE), self.tree())
        status, _, body = yield self.fetch("GET", url + "/a?x=1")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["name"], "b c")
        self.assertEqual(seen["uri"], "/items/b%20c?y=2&y=3")
        self.assertEqual(seen["path"], "/items/b%20c")
        self.assertEqual(seen["args"], {"y": ["2", "3"]})
        self.assertEqual(seen["prepath"], ["items", "b c"])

    @inlineCallbacks
    def test_set_uri_under_a_mount_point(self):
        """A GuestResource mounted at /app keeps its mount: /app/a is rewritten to
        /items/b%20c, which is routed below the guest's downstream."""
        root = Resource()
        root.putChild(b"app", GuestResource(self.guest(REWRITE), self.tree()))
        url = self.serve(root)
        status, _, body = yield self.fetch("GET", url + "/app/a")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["name"], "b c")
        self.assertEqual(seen["prepath"], ["app", "items", "b c"])

    @inlineCallbacks
    def test_untouched_uri_routes_as_sent(self):
        """Without set_uri the downstream tree sees the request path as sent."""
        url = self.serve_guest(self.guest(REWRITE), self.tree())
        status, _, body = yield self.fetch("GET", url + "/items/b%20c?z=9")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual((seen["name"], seen["args"]), ("b c", {"z": ["9"]}))

    @inlineCallbacks
    def test_set_method_is_seen_downstream(self):
        url = self.serve_guest(self.guest(REWRITE), self.tree())
        status, _, body = yield self.fetch("GET", url + "/m")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["method"], "POST")

    @inlineCallbacks
    def test_request_header_changes_are_seen_downstream(self):
        url = self.serve_guest(self.guest(REWRITE), self.tree())
        status, _, body = yield self.fetch(
            "GET", url + "/h", headers={"X-Set": ["old", "older"], "X-Add": ["first"], "X-Remove": ["gone"]}
        )
        self.assertEqual(status, 200, body)
        headers = json.loads(body)["headers"]
        self.assertEqual(headers["x-set"], ["new"])
        self.assertEqual(headers["x-add"], ["first", "second"])
        self.assertNotIn("x-remove", headers)
        self.assertIn("host", headers)


globals().update(execution_variants(RequestChangesTestsMixin, ServerTestCase))


# -- request bodies --------------------------------------------------------------------

S = Strings()
WRITE_REQUEST_BODY = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (call $write_body (i32.const 0) {S("replaced ")})
    (call $write_body (i32.const 0) {S("body")})
    (i64.const 1))
  {NOOP_RESPONSE}
""")


def read_four(features: int) -> str:
    """A guest that reads the first four request-body bytes, with ``features`` enabled."""
    return f"""
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const {features})))
    (drop (call $read_body (i32.const 0) (i32.const 1024) (i32.const 4)))
    ;; echo what it read as a request header, so the test sees the guest read it
    (call $set_header_value (i32.const 0) (i32.const 2048) (i32.const 6) (i32.const 1024) (i32.const 4))
    (i64.const 1))
  (data (i32.const 2048) "x-read")
  {NOOP_RESPONSE}
"""


class RequestBodyTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_body_written_by_guest_is_what_downstream_reads(self):
        """The guest's request body replaces the client's; Content-Length follows it."""
        url = self.serve_guest(self.guest(WRITE_REQUEST_BODY), Echo())
        status, _, body = yield self.fetch("POST", url + "/", data=b"the original body, longer")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["body"], "replaced body")
        self.assertEqual(seen["headers"]["content-length"], ["13"])

    @inlineCallbacks
    def test_partly_read_body_without_buffer_request_is_gone(self):
        """What the guest read without buffer_request is consumed: the downstream gets the rest."""
        url = self.serve_guest(self.guest(read_four(0)), Echo())
        status, _, body = yield self.fetch("POST", url + "/", data=b"0123456789")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["headers"]["x-read"], ["0123"])
        self.assertEqual(seen["body"], "456789")
        self.assertEqual(seen["headers"]["content-length"], ["6"])

    @inlineCallbacks
    def test_partly_read_body_with_buffer_request_is_whole(self):
        """With buffer_request the downstream still reads the whole original body."""
        url = self.serve_guest(self.guest(read_four(1)), Echo())
        status, _, body = yield self.fetch("POST", url + "/", data=b"0123456789")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["headers"]["x-read"], ["0123"])
        self.assertEqual(seen["body"], "0123456789")
        self.assertEqual(seen["headers"]["content-length"], ["10"])


globals().update(execution_variants(RequestBodyTestsMixin, ServerTestCase))


# -- what the guest reads about the request ------------------------------------------------

S = Strings()
DESCRIBE_REQUEST = S.wrap(f"""
  ;; answers itself (next=0) with "uri|protocol|source address"
  (func $append (param $n i32)
    (call $write_body (i32.const 1) (i32.const 1024) (local.get $n))
    (call $write_body (i32.const 1) {S("|")}))
  (func (export "handle_request") (result i64)
    (call $append (call $get_uri (i32.const 1024) (i32.const 1024)))
    (call $append (call $get_protocol_version (i32.const 1024) (i32.const 1024)))
    (call $write_body (i32.const 1) (i32.const 1024) (call $get_source_addr (i32.const 1024) (i32.const 1024)))
    (i64.const 0))
  {NOOP_RESPONSE}
""")


class RequestInfoTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_uri_is_percent_encoded_as_sent_over_http11(self):
        url = self.serve_guest(self.guest(DESCRIBE_REQUEST), Echo())
        client = yield raw_connect(
            url, b"GET /disney%2Fx?name=chip%26dale HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        raw = yield client.closed
        status, headers, body = split_response(raw)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        uri, protocol, source = body.split(b"|")
        self.assertEqual(uri, b"/disney%2Fx?name=chip%26dale")
        self.assertEqual(protocol, b"HTTP/1.1")
        self.assertEqual(source, b"127.0.0.1:%d" % client.local_port)
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))

    @inlineCallbacks
    def test_protocol_version_http10(self):
        url = self.serve_guest(self.guest(DESCRIBE_REQUEST), Echo())
        client = yield raw_connect(url, b"GET / HTTP/1.0\r\n\r\n")
        raw = yield client.closed
        status, _, body = split_response(raw)
        self.assertEqual(status, b"HTTP/1.0 200 OK")
        self.assertEqual(body.split(b"|")[:2], [b"/", b"HTTP/1.0"])


globals().update(execution_variants(RequestInfoTestsMixin, ServerTestCase))
