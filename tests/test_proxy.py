"""ProxyResource behind a guest: a real backend on a loopback port, a real client.

Each behaviour runs in both execution modes (``...Mixin`` x ``EXECUTIONS``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from twisted_httpwasm import Execution
from twisted_httpwasm.web.proxy import BadGateway, NotOriginForm, ProxyResource, end_to_end_headers

from .support import (
    ServerTestCase,
    collect_streamed,
    execution_variants,
    guest_text,
    make_guest,
    on_guest_log,
    poll,
)

# -- guests ---------------------------------------------------------------------------

#: Strips a leading "/api" from the URI, adds the request header x-guest: yes and the
#: response header x-guest-response: yes; handle_response logs "is_error=<0|1>".
FORWARD_GUEST = """
  (data (i32.const 0) "/api")
  (data (i32.const 16) "x-guest")
  (data (i32.const 32) "yes")
  (data (i32.const 48) "x-guest-response")
  (data (i32.const 80) "is_error=1")
  (data (i32.const 96) "is_error=0")
  (func (export "handle_request") (result i64)
    (local $len i32)
    (local.set $len (call $get_uri (i32.const 1024) (i32.const 4096)))
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (i32.const 1024)) (i32.load (i32.const 0))))
      (then (call $set_uri (i32.const 1028) (i32.sub (local.get $len) (i32.const 4)))))
    (call $set_header_value (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 3))
    (call $set_header_value (i32.const 1) (i32.const 48) (i32.const 16) (i32.const 32) (i32.const 3))
    (i64.const 1))
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (if (local.get $is_error)
      (then (call $log (i32.const 1) (i32.const 80) (i32.const 10)))
      (else (call $log (i32.const 0) (i32.const 96) (i32.const 10)))))
"""

#: buffer_response at init; handle_response wraps the whole body as "<<body>>" and sets
#: x-buffered: yes, or logs "is_error=1" and leaves the response alone.
BUFFER_GUEST = """
  (data (i32.const 0) "<<")
  (data (i32.const 8) ">>")
  (data (i32.const 16) "x-buffered")
  (data (i32.const 32) "yes")
  (data (i32.const 80) "is_error=1")
  (func (export "_initialize") (drop (call $enable_features (i32.const 2))))
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (local $len i32)
    (local $eof_len i64)
    (if (local.get $is_error)
      (then (call $log (i32.const 1) (i32.const 80) (i32.const 10)) (return)))
    (block $eof
      (loop $more
        (local.set $eof_len (call $read_body (i32.const 1)
          (i32.add (i32.const 4096) (local.get $len)) (i32.sub (i32.const 61440) (local.get $len))))
        (local.set $len (i32.add (local.get $len) (i32.wrap_i64 (local.get $eof_len))))
        (br_if $eof (i64.ne (i64.shr_u (local.get $eof_len) (i64.const 32)) (i64.const 0)))
        (br $more)))
    (call $write_body (i32.const 1) (i32.const 0) (i32.const 2))
    (call $write_body (i32.const 1) (i32.const 4096) (local.get $len))
    (call $write_body (i32.const 1) (i32.const 8) (i32.const 2))
    (call $set_header_value (i32.const 1) (i32.const 16) (i32.const 10) (i32.const 32) (i32.const 3)))
"""

# -- the backend -------------------------------------------------------------------------


class BackendEcho(Resource):
    """Answers 201 with JSON describing the request it got, plus a few telling headers."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {
                name.decode().lower(): [value.decode() for value in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            "body": request.content.read().decode("latin-1"),
        }
        request.setResponseCode(201, b"Made It")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-backend", b"yes")
        request.setHeader(b"keep-alive", b"timeout=99")  # hop-by-hop: must not reach the client
        request.addCookie(b"a", b"1")
        request.addCookie(b"b", b"2")
        return json.dumps(seen).encode()


class BackendSlow(Resource):
    """Writes a first chunk, then the rest only when the test fires ``release``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.release: Deferred[None] = Deferred()
        self.finished = False

    def render(self, request: Any) -> object:
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"first chunk;")

        def rest(_: None) -> None:
            request.write(b"second chunk")
            request.finish()
            self.finished = True

        self.release.addCallback(rest)
        return NOT_DONE_YET


class BackendBreaking(BackendSlow):
    """Writes a first chunk, then drops the connection when the test fires ``release``."""

    def render(self, request: Any) -> object:
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"first chunk;")
        self.release.addCallback(lambda _: request.channel.transport.abortConnection())
        return NOT_DONE_YET


class BackendHanging(Resource):
    """Never answers; ``got`` fires with the request, ``gone`` when its client left."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.got: Deferred[Any] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def render(self, request: Any) -> object:
        request.notifyFinish().addErrback(lambda _: self.gone.callback(None))
        self.got.callback(request)
        return NOT_DONE_YET


class ConnectionTracker(WrappingFactory):
    """A WrappingFactory that can close every live connection and wait for them."""

    def __init__(self, wrapped: Any):
        super().__init__(wrapped)
        self._waiting: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: Any) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    def close_all(self) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if not self.protocols:
            done.callback(None)
            return done
        self._waiting.append(done)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return done


def serve_backend(case: ServerTestCase, resource: Resource) -> str:
    """Serve ``resource`` on a loopback port for the test; close every connection at the end."""
    tracker = ConnectionTracker(Site(resource))
    case.addCleanup(tracker.close_all)
    return case.listen(tracker)


@inlineCallbacks
def dead_port() -> Any:
    """A loopback port that was just bound and closed: connecting to it is refused."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    number = port.getHost().port
    yield port.stopListening()
    return number


def wait_for_guest_log(guest: Any, text: str) -> Deferred[dict[str, Any]]:
    """Fires with (a copy of) the first event whose guest message is ``text``."""
    fired: Deferred[dict[str, Any]] = Deferred()

    def observer(event: dict[str, Any]) -> None:
        if guest_text(event) == text and not fired.called:
            fired.callback(dict(event))

    on_guest_log(guest, observer)
    return fired


class Recording(Protocol):
    """A raw client: sends ``request`` and keeps what comes back."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


# -- the tests ---------------------------------------------------------------------------


class ProxyBehindGuestMixin:
    """ProxyResource as the downstream of a GuestResource, end to end."""

    timeout = 15

    execution: Execution

    def proxy_to(self, backend_url: str) -> ProxyResource:
        proxy = ProxyResource(backend_url)
        self.addCleanup(proxy.close)  # type: ignore[attr-defined]
        return proxy

    def front(self, guest_wat: str, backend_url: str) -> tuple[Any, str]:
        """(guest, URL of a server running the guest in front of a proxy to ``backend_url``)."""
        guest = make_guest(guest_wat, execution=self.execution)
        url = self.serve_guest(guest, self.proxy_to(backend_url))  # type: ignore[attr-defined]
        return guest, url

    @inlineCallbacks
    def test_request_forwarded_as_the_guest_left_it(self) -> Any:
        """Method, the rewritten URI under the base path, end-to-end headers and body reach
        the backend; Host is the backend's and X-Forwarded-* describe the client (replacing its own)."""
        backend = serve_backend(self, BackendEcho())
        guest, url = self.front(FORWARD_GUEST, backend + "/base/")
        headers = {
            "X-Custom": ["a", "b"],
            "Keep-Alive": ["timeout=5"],
            "TE": ["trailers"],
            "Proxy-Authorization": ["Basic eA=="],
            "Trailer": ["x-t"],
            "X-Forwarded-For": ["10.9.8.7"],
        }
        response = yield self.http.request(  # type: ignore[attr-defined]
            "POST", url + "/api/items/1?q=a%20b", headers=headers, data=b"the body \x00\xff"
        )
        body = yield response.content()
        self.assertEqual(response.code, 201)
        seen = json.loads(body)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["uri"], "/base/items/1?q=a%20b")
        self.assertEqual(seen["body"], "the body \x00\xff")
        sent = seen["headers"]
        self.assertEqual(sent["x-custom"], ["a", "b"])
        self.assertEqual(sent["x-guest"], ["yes"])
        self.assertEqual(sent["host"], [backend.removeprefix("http://")])
        self.assertEqual(sent["x-forwarded-for"], ["127.0.0.1"])  # the client's own value is not believed
        self.assertEqual(sent["x-forwarded-host"], [url.removeprefix("http://")])
        self.assertEqual(sent["x-forwarded-proto"], ["http"])
        self.assertEqual(sent["content-length"], ["11"])
        for hop in ("keep-alive", "te", "proxy-authorization", "trailer", "transfer-encoding", "upgrade"):
            self.assertNotIn(hop, sent)
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_backend_response_returned(self) -> Any:
        """The backend's status and reason, end-to-end headers (every cookie too) and body
        come back, with the header the guest set; hop-by-hop headers do not."""
        backend = serve_backend(self, BackendEcho())
        guest, url = self.front(FORWARD_GUEST, backend)
        logged = wait_for_guest_log(guest, "is_error=0")
        response = yield self.http.request("GET", url + "/echo")  # type: ignore[attr-defined]
        body = yield response.content()
        self.assertEqual((response.code, response.phrase), (201, b"Made It"))
        self.assertEqual(response.headers.getRawHeaders("x-backend"), ["yes"])
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(sorted(response.headers.getRawHeaders("set-cookie")), ["a=1", "b=2"])
        self.assertEqual(response.headers.getRawHeaders("x-guest-response"), ["yes"])
        self.assertIsNone(response.headers.getRawHeaders("keep-alive"))
        self.assertEqual(json.loads(body)["uri"], "/echo")
        yield logged
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_head_gets_headers_only(self) -> Any:
        """HEAD is forwarded as HEAD: the backend's status and Content-Length, no body."""
        root = Resource()
        root.putChild(b"eleven", Data(b"eleven long", "text/plain"))
        guest, url = self.front(FORWARD_GUEST, serve_backend(self, root))
        response = yield self.http.request("HEAD", url + "/eleven")  # type: ignore[attr-defined]
        head_body = yield response.content()
        self.assertEqual((response.code, head_body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders("content-length"), ["11"])
        self.assertEqual(response.headers.getRawHeaders("x-guest-response"), ["yes"])
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_body_streamed_as_it_arrives(self) -> Any:
        """The client gets the backend's first chunk while the backend is still working."""
        slow = BackendSlow()
        backend = serve_backend(self, slow)
        guest, url = self.front(FORWARD_GUEST, backend)
        response = yield self.http.request("GET", url + "/slow", unbuffered=True)  # type: ignore[attr-defined]
        chunks, first, done = collect_streamed(response)
        yield first
        self.assertEqual(b"".join(chunks), b"first chunk;")
        self.assertFalse(slow.finished)
        slow.release.callback(None)
        yield done
        self.assertEqual(b"".join(chunks), b"first chunk;second chunk")
        self.assertEqual(response.code, 200)
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_backend_failing_mid_body_cuts_the_response(self) -> Any:
        """A backend that dies after part of its body was relayed: the client's response
        is cut (no clean end, no error page appended) and the guest sees is_error=1."""
        breaking = BackendBreaking()
        backend = serve_backend(self, breaking)
        guest, url = self.front(FORWARD_GUEST, backend)
        logged = wait_for_guest_log(guest, "is_error=1")
        response = yield self.http.request("GET", url + "/breaks", unbuffered=True)  # type: ignore[attr-defined]
        chunks, first, done = collect_streamed(response)
        yield first
        breaking.release.callback(None)
        yield self.assertFailure(done, ResponseFailed)  # type: ignore[attr-defined]
        yield logged
        self.assertEqual(b"".join(chunks), b"first chunk;")
        # The guest logs from inside handle_response; its worker gives the instance back just after.
        released = yield poll(lambda: guest.pool.stats.in_use == 0, timeout=5, interval=0.005)
        self.assertTrue(released, "the instance was not given back to the pool")

    @inlineCallbacks
    def test_buffer_response_guest_rewrites_proxied_body(self) -> Any:
        """With buffer_response the guest gets the whole proxied body and replaces it;
        the backend's status and headers stay and Content-Length fits the new body."""
        backend = serve_backend(self, BackendEcho())
        guest, url = self.front(BUFFER_GUEST, backend)
        response = yield self.http.request("GET", url + "/x")  # type: ignore[attr-defined]
        body = yield response.content()
        self.assertEqual(response.code, 201)
        self.assertTrue(body.startswith(b"<<{") and body.endswith(b"}>>"), body)
        self.assertEqual(json.loads(body[2:-2])["uri"], "/x")
        self.assertEqual(response.length, len(body))
        self.assertEqual(response.headers.getRawHeaders("x-buffered"), ["yes"])
        self.assertEqual(response.headers.getRawHeaders("x-backend"), ["yes"])
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_buffer_response_guest_streams_slow_backend_whole(self) -> Any:
        """A buffering guest in front of a streaming backend gets the complete body."""
        slow = BackendSlow()
        backend = serve_backend(self, slow)
        guest, url = self.front(BUFFER_GUEST, backend)
        fetched = self.fetch("GET", url + "/slow")  # type: ignore[attr-defined]
        slow.release.callback(None)
        status, _, body = yield fetched
        self.assertEqual((status, body), (200, b"<<first chunk;second chunk>>"))
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_dead_backend_is_502_and_guest_sees_is_error(self) -> Any:
        """A backend that refuses connections: 502 with a short plain body, and the
        guest's handle_response ran with is_error=1."""
        port = yield dead_port()
        guest, url = self.front(FORWARD_GUEST, f"http://127.0.0.1:{port}")
        logged = wait_for_guest_log(guest, "is_error=1")
        status, headers, body = yield self.fetch("GET", url + "/anything")  # type: ignore[attr-defined]
        event = yield logged
        self.assertTrue(event["log_namespace"].startswith("httpwasm.guest"), event)
        self.flushLoggedErrors(BadGateway)  # type: ignore[attr-defined]
        self.assertEqual(status, 502)
        self.assertEqual(body, b"Bad Gateway\n")
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_dead_backend_with_buffering_guest(self) -> Any:
        """The same with a buffer_response guest: 502, and handle_response saw is_error=1."""
        port = yield dead_port()
        guest, url = self.front(BUFFER_GUEST, f"http://127.0.0.1:{port}")
        logged = wait_for_guest_log(guest, "is_error=1")
        status, _, body = yield self.fetch("GET", url + "/anything")  # type: ignore[attr-defined]
        yield logged
        self.flushLoggedErrors(BadGateway)  # type: ignore[attr-defined]
        self.assertEqual((status, body), (502, b"Bad Gateway\n"))
        self.assertEqual(guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_client_gone_cancels_backend_request(self) -> Any:
        """A client that leaves before the backend answered: the backend request is
        cancelled (its connection closes) and the guest sees is_error=1."""
        hanging = BackendHanging()
        backend = serve_backend(self, hanging)
        guest, url = self.front(FORWARD_GUEST, backend)
        logged = wait_for_guest_log(guest, "is_error=1")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(url.rsplit(":", 1)[1]))
        client = yield connectProtocol(endpoint, Recording(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n"))
        yield hanging.got
        client.transport.loseConnection()
        yield client.closed
        yield hanging.gone
        yield logged
        self.assertEqual(bytes(client.received), b"")
        # The guest logs is_error=1 during handle_response; the instance goes back right after.
        returned = yield poll(lambda: guest.pool.stats.in_use == 0, timeout=10)
        self.assertTrue(returned, "the pinned instance never went back to the pool")

    @inlineCallbacks
    def test_backend_paused_while_client_is(self) -> Any:
        """Back-pressure: while the body streams, the backend connection is the request's
        producer, so a client that cannot keep up stops the proxy reading the backend."""
        slow = BackendSlow()
        backend = serve_backend(self, slow)
        seen: list[Any] = []

        class Recorder(ProxyResource):
            def render(self, request: Any) -> object:
                seen.append(request)
                return super().render(request)

        proxy = Recorder(backend)
        self.addCleanup(proxy.close)  # type: ignore[attr-defined]
        guest = make_guest(FORWARD_GUEST, execution=self.execution)
        url = self.serve_guest(guest, proxy)  # type: ignore[attr-defined]
        response = yield self.http.request("GET", url + "/slow", unbuffered=True)  # type: ignore[attr-defined]
        chunks, first, done = collect_streamed(response)
        yield first
        (request,) = seen
        producer = request.producer
        self.assertIsNotNone(producer)
        backend_transport = producer._producer
        readers = reactor.getReaders  # type: ignore[attr-defined]
        self.assertIn(backend_transport, readers())
        request.channel.pauseProducing()  # what a full client socket does
        self.assertNotIn(backend_transport, readers())
        request.channel.resumeProducing()
        self.assertIn(backend_transport, readers())
        slow.release.callback(None)
        yield done
        self.assertEqual(b"".join(chunks), b"first chunk;second chunk")
        self.assertIsNone(request.producer)


globals().update(execution_variants(ProxyBehindGuestMixin, ServerTestCase))


class ProxyAloneTests(ServerTestCase):
    """ProxyResource with no guest in front."""

    @inlineCallbacks
    def test_dead_backend_answers_502(self) -> Any:
        """Without a wrapper, the proxy answers 502 itself."""
        port = yield dead_port()
        proxy = ProxyResource(f"http://127.0.0.1:{port}")
        self.addCleanup(proxy.close)
        status, headers, body = yield self.fetch("GET", self.serve(proxy) + "/x")
        self.assertEqual((status, body), (502, b"Bad Gateway\n"))
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])

    @inlineCallbacks
    def test_connections_reused_then_closed(self) -> Any:
        """The proxy keeps one persistent connection to the backend and close() ends it."""
        backend = BackendEcho()
        tracker = ConnectionTracker(Site(backend))
        proxy = ProxyResource(self.listen(tracker))
        url = self.serve(proxy)
        for _ in range(3):
            status, _, _ = yield self.fetch("GET", url + "/again")
            self.assertEqual(status, 201)
        self.assertEqual(len(tracker.protocols), 1)
        closed = tracker.close_all()
        yield proxy.close()
        yield closed
        self.assertEqual(len(tracker.protocols), 0)


class ProxyUnitTests(SynchronousTestCase):
    """What the proxy sends, without sockets."""

    def test_base_url_checked(self) -> None:
        """Only an absolute http(s) URL without query is a backend."""
        for bad in ("127.0.0.1:80", "ftp://x/", "http://x/?q=1", "http:///path"):
            with self.assertRaises(ValueError, msg=bad):
                ProxyResource(bad, agent=object())  # type: ignore[arg-type]

    def test_backend_url_joins_base_path_and_uri(self) -> None:
        """The URI is appended to the base path, one slash between them."""
        proxy = ProxyResource(b"http://backend:81/base/", agent=object())  # type: ignore[arg-type]
        request = DummyRequest([b""])
        request.uri = b"/a/b?c=%20"
        self.assertEqual(proxy.backend_url(request), b"http://backend:81/base/a/b?c=%20")
        bare = ProxyResource("https://backend", agent=object())  # type: ignore[arg-type]
        self.assertEqual(bare.backend_url(request), b"https://backend/a/b?c=%20")

    def test_absolute_form_uri_keeps_path_and_query(self) -> None:
        """A request in absolute form ("GET http://front/a?b") is forwarded as /a?b."""
        proxy = ProxyResource("http://backend/base", agent=object())  # type: ignore[arg-type]
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [b"front:8080"])
        request.uri = b"http://front:8080/a/b?c=1"
        self.assertEqual(proxy.backend_url(request), b"http://backend/base/a/b?c=1")
        request.uri = b"http://front:8080"
        self.assertEqual(proxy.backend_url(request), b"http://backend/base/")
        # Another authority than the request's Host, or a target that is not a URL: refused (400).
        for target in (b"http://elsewhere:8080/a", b"a:1/", b"front:8080"):
            request.uri = target
            self.assertRaises(NotOriginForm, proxy.backend_url, request)

    def test_hop_by_hop_headers_dropped(self) -> None:
        """RFC 9110 hop-by-hop headers, proxy-*, and those the Connection header names go."""
        headers = Headers(
            {
                b"Connection": [b"close, X-Private"],
                b"X-Private": [b"1"],
                b"Keep-Alive": [b"5"],
                b"Proxy-Anything": [b"1"],
                b"TE": [b"trailers"],
                b"Transfer-Encoding": [b"chunked"],
                b"Upgrade": [b"h2c"],
                b"Trailer": [b"x"],
                b"X-Kept": [b"1", b"2"],
            }
        )
        self.assertEqual(dict(end_to_end_headers(headers)), {b"x-kept": [b"1", b"2"]})
