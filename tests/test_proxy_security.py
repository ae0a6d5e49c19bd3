"""The --proxy boundary, asserted on what a real backend receives.

- The base path of the backend URL is a boundary: no URI a client sends or a
  guest sets (``..``, ``%2e%2e``, mixed case, ``./``, trailing segments)
  reaches a path outside it; those that would climb above it get 400 and never
  reach the backend.
- The client's ``Connection`` tokens remove the client's headers only, never a
  header a guest set or added.
- The forwarding headers describe what the proxy saw: the client's own
  ``Forwarded``/``X-Forwarded-*``/``X-Real-IP`` are replaced or dropped, unless
  the client side is trusted (``trust_forwarded``, ``--proxy-trust-forwarded``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.service.tap import Options, make_site
from twisted_httpwasm.web.backend_request import remember_client_headers
from twisted_httpwasm.web.proxy import PathOutsideBase, ProxyResource

from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, make_guest
from .test_proxy import Recording, serve_backend

# -- guests ---------------------------------------------------------------------------------

#: When the request has an x-target header, set_uri to its value, as given.
SET_URI_GUEST = (
    """
  (data (i32.const 0) "x-target")
  (func (export "handle_request") (result i64)
    (local $count_len i64)
    (local.set $count_len
      (call $get_header_values (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 1024) (i32.const 4096)))
    (if (i64.ne (i64.shr_u (local.get $count_len) (i64.const 32)) (i64.const 0))
      (then (call $set_uri (i32.const 1024) (i32.sub (i32.wrap_i64 (local.get $count_len)) (i32.const 1)))))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Adds the request header x-role: admin after whatever the client sent.
ADD_ROLE_GUEST = (
    """
  (data (i32.const 0) "x-role")
  (data (i32.const 16) "admin")
  (func (export "handle_request") (result i64)
    (call $add_header_value (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16) (i32.const 5))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Sets x-role: admin and x-real-ip: 203.0.113.7, replacing the client's.
SET_ROLE_GUEST = (
    """
  (data (i32.const 0) "x-role")
  (data (i32.const 16) "admin")
  (data (i32.const 32) "x-real-ip")
  (data (i32.const 48) "203.0.113.7")
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 16) (i32.const 5))
    (call $set_header_value (i32.const 0) (i32.const 32) (i32.const 9) (i32.const 48) (i32.const 11))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

# -- what is sent, what is received -----------------------------------------------------------

#: Request targets that climb above the base path, spelled every way a client or guest might.
ESCAPES = [
    b"/../private.txt",
    b"/%2e%2e/private.txt",
    b"/%2E%2e/private.txt",
    b"/.%2E/private.txt",
    b"/x/../../private.txt",
    b"/./../private.txt",
    b"/x/%2e%2e/%2E%2E/private.txt",
    b"/x/./../../private.txt?a=b",
    b"/..",
    b"/x/../..",
    b"/x/../%2e%2e/",
    b"/..;/private.txt",
    b"http://front.example/../private.txt",
]

#: The escapes a guest can set: set_uri takes origin-form only (the host traps on the others).
GUEST_ESCAPES = [target for target in ESCAPES if target.startswith(b"/")]

#: Request targets that stay inside, and what the backend (base path /base) is asked for.
INSIDE = {
    b"/a/./b/../c": b"/base/a/c",
    b"/a/b/..": b"/base/a/",
    b"/a/%2e/b/%2E%2E/c/.": b"/base/a/c/",
    b"/x/..": b"/base/",
    b"/a/..%2fprivate.txt": b"/base/a/..%2fprivate.txt",
    b"/x/../y?next=/../../z": b"/base/y?next=/../../z",
    b"/a//b/../c": b"/base/a//c",
    b"/": b"/base/",
}


class RecordingBackend(Resource):
    """Answers 200 and records each request's method, target (as received) and headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bytes, Headers]] = []

    def render(self, request: Any) -> bytes:
        self.received.append((request.method, request.uri, request.requestHeaders.copy()))
        return b"from the backend"

    @property
    def targets(self) -> list[bytes]:
        return [target for _, target, _ in self.received]

    def last_headers(self) -> Headers:
        return self.received[-1][2]


@inlineCallbacks
def raw_get(url: str, target: bytes, headers: bytes = b"") -> Generator[Any, Any, bytes]:
    """Send ``GET target`` with ``headers`` (raw lines) on a new connection; the raw answer."""
    client = Recording(
        b"GET " + target + b" HTTP/1.1\r\nHost: front.example\r\nConnection: close\r\n" + headers + b"\r\n"
    )
    port = int(url.rsplit(":", 1)[1])
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    yield client.closed
    return bytes(client.received)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


class ProxySecurityTestCase(TempFilesMixin, ServerTestCase):
    timeout = 30

    def backend(self) -> tuple[RecordingBackend, str]:
        backend = RecordingBackend()
        return backend, serve_backend(self, backend)

    def front(self, guest_wat: str, backend_url: str, **proxy_options: Any) -> str:
        """A server with ``guest_wat`` in front of a proxy to ``backend_url``, as an embedder builds it."""
        proxy = ProxyResource(backend_url, **proxy_options)
        self.addCleanup(proxy.close)
        guest = make_guest(guest_wat, execution=Execution.INLINE)
        return self.listen(Site(GuestResource(guest, proxy)))  # a plain Site, as embedders have

    def front_from_tap(self, *args: str) -> str:
        """A server built by ``twistd httpwasm``'s own make_site from ``args``."""
        options = Options()
        options.parseOptions([*args, "--execution", "inline"])
        self.addCleanup(options["root"].close)
        return self.listen(make_site(options, MultiService()))


# -- 9.2: the base path ------------------------------------------------------------------------


class BasePathTests(ProxySecurityTestCase):
    """No request target reaches the backend outside the base path of --proxy URL."""

    @inlineCallbacks
    def test_client_targets_climbing_above_the_base_get_400(self) -> Any:
        """Every escape a client sends on a raw socket is answered 400 and the backend sees nothing."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url + "/base")
        for target in ESCAPES:
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 400, target)
            self.assertTrue(answer.endswith(b"\r\n\r\nBad Request\n"), answer)
        self.assertEqual(backend.targets, [])

    @inlineCallbacks
    def test_guest_set_targets_climbing_above_the_base_get_400(self) -> Any:
        """The same escapes set by a guest with set_uri are answered 400; the backend sees nothing."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url + "/base/")
        for target in GUEST_ESCAPES:
            answer = yield raw_get(url, b"/start", b"X-Target: " + target + b"\r\n")
            self.assertEqual(status_of(answer), 400, target)
        self.assertEqual(backend.targets, [])

    @inlineCallbacks
    def test_client_targets_inside_the_base_arrive_normalised(self) -> Any:
        """Dot segments are removed (%2e is a dot, %2f stays data) and the result stays under /base."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url + "/base")
        for target in INSIDE:
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 200, (target, answer))
        self.assertEqual(backend.targets, list(INSIDE.values()))

    @inlineCallbacks
    def test_guest_set_targets_inside_the_base_arrive_normalised(self) -> Any:
        """A guest's set_uri gets the same normalisation as a client's target."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url + "/base")
        for target in INSIDE:
            answer = yield raw_get(url, b"/start", b"X-Target: " + target + b"\r\n")
            self.assertEqual(status_of(answer), 200, (target, answer))
        self.assertEqual(backend.targets, list(INSIDE.values()))


class PathInsideBaseUnitTests(SynchronousTestCase):
    """ProxyResource.backend_url without sockets."""

    def test_escapes_raise(self) -> None:
        """backend_url refuses each escape with PathOutsideBase (a 400 for the client)."""
        proxy = ProxyResource("http://backend/base", agent=object())  # type: ignore[arg-type]
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [b"front.example"])  # the absolute-form names it
        for target in ESCAPES:
            request.uri = target
            error = self.assertRaises(PathOutsideBase, proxy.backend_url, request)
            self.assertEqual(error.http_status, 400)

    def test_inside_targets_are_normalised(self) -> None:
        """backend_url removes dot segments and keeps %2f, the query and empty segments."""
        proxy = ProxyResource("http://backend/base/", agent=object())  # type: ignore[arg-type]
        request = DummyRequest([b""])
        for target, expected in INSIDE.items():
            request.uri = target
            self.assertEqual(proxy.backend_url(request), b"http://backend" + expected, target)


# -- 9.4: Connection tokens and forwarding headers --------------------------------------------


class ConnectionTokenTests(ProxySecurityTestCase):
    """A client's Connection tokens name the client's own hop-by-hop headers, never a guest's."""

    @inlineCallbacks
    def test_guest_added_header_survives_client_connection_token(self) -> Any:
        """Connection: x-role drops the client's X-Role value, not the x-role value the guest added."""
        backend, backend_url = self.backend()
        url = self.front(ADD_ROLE_GUEST, backend_url)
        answer = yield raw_get(
            url, b"/", b"Connection: x-role, x-other\r\nX-Role: client\r\nX-Other: 1\r\nX-Kept: 2\r\n"
        )
        self.assertEqual(status_of(answer), 200)
        sent = backend.last_headers()
        self.assertEqual(sent.getRawHeaders(b"x-role"), [b"admin"])
        self.assertFalse(sent.hasHeader(b"x-other"))
        self.assertFalse(sent.hasHeader(b"connection"))
        self.assertEqual(sent.getRawHeaders(b"x-kept"), [b"2"])

    @inlineCallbacks
    def test_guest_set_header_survives_client_connection_token(self) -> Any:
        """A header the guest set (replacing the client's) reaches the backend despite Connection: x-role."""
        backend, backend_url = self.backend()
        url = self.front(SET_ROLE_GUEST, backend_url)
        answer = yield raw_get(url, b"/", b"Connection: x-role\r\nX-Role: client\r\nX-Real-IP: 6.6.6.6\r\n")
        self.assertEqual(status_of(answer), 200)
        sent = backend.last_headers()
        self.assertEqual(sent.getRawHeaders(b"x-role"), [b"admin"])
        # The guest's X-Real-IP is the operator's word, not the client's: it is kept.
        self.assertEqual(sent.getRawHeaders(b"x-real-ip"), [b"203.0.113.7"])

    @inlineCallbacks
    def test_twistd_httpwasm_site_keeps_guest_headers(self) -> Any:
        """The site twistd httpwasm builds records the client's headers, so --proxy keeps the guest's."""
        backend, backend_url = self.backend()
        url = self.front_from_tap("--guest", self.guest_file(ADD_ROLE_GUEST), "--proxy", backend_url)
        answer = yield raw_get(url, b"/", b"Connection: x-role\r\nX-Role: client\r\n")
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(backend.last_headers().getRawHeaders(b"x-role"), [b"admin"])


#: Forwarding headers a client sends, claiming to be someone else.
SPOOFED = (
    b"Forwarded: for=6.6.6.6;proto=https\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Real-IP: 6.6.6.6\r\n"
)


class ForwardingHeaderTests(ProxySecurityTestCase):
    """Forwarded, X-Forwarded-* and X-Real-IP: what the proxy saw, not what the client claims."""

    def assertForwardedAsSeen(self, sent: Headers) -> None:
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(sent.getRawHeaders(b"forwarded"), [b"for=127.0.0.1;host=front.example;proto=http"])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-host"), [b"front.example"])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertFalse(sent.hasHeader(b"x-real-ip"))

    def assertClientTrusted(self, sent: Headers) -> None:
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-for"), [b"6.6.6.6, 127.0.0.1"])
        self.assertEqual(
            sent.getRawHeaders(b"forwarded"), [b"for=6.6.6.6;proto=https, for=127.0.0.1;host=front.example;proto=http"]
        )
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-host"), [b"evil.example"])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(sent.getRawHeaders(b"x-real-ip"), [b"6.6.6.6"])

    @inlineCallbacks
    def test_client_forwarding_headers_replaced(self) -> Any:
        """By default the client's Forwarded/X-Forwarded-* are replaced and its X-Real-IP dropped."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url)
        answer = yield raw_get(url, b"/", SPOOFED)
        self.assertEqual(status_of(answer), 200)
        self.assertForwardedAsSeen(backend.last_headers())

    @inlineCallbacks
    def test_trusted_client_forwarding_headers_kept_and_appended(self) -> Any:
        """trust_forwarded=True: the client is a proxy; its values are kept and this hop appended."""
        backend, backend_url = self.backend()
        url = self.front(SET_URI_GUEST, backend_url, trust_forwarded=True)
        answer = yield raw_get(url, b"/", SPOOFED)
        self.assertEqual(status_of(answer), 200)
        self.assertClientTrusted(backend.last_headers())

    @inlineCallbacks
    def test_twistd_httpwasm_options(self) -> Any:
        """--proxy replaces the client's forwarding headers; --proxy-trust-forwarded keeps and appends."""
        backend, backend_url = self.backend()
        guest = self.guest_file(SET_URI_GUEST)
        url = self.front_from_tap("--guest", guest, "--proxy", backend_url)
        yield raw_get(url, b"/", SPOOFED)
        self.assertForwardedAsSeen(backend.last_headers())
        url = self.front_from_tap("--guest", guest, "--proxy-trust-forwarded", "--proxy", backend_url)
        yield raw_get(url, b"/", SPOOFED)
        self.assertClientTrusted(backend.last_headers())

    def test_trust_forwarded_needs_proxy(self) -> None:
        """--proxy-trust-forwarded without --proxy is a usage error naming the downstream."""
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--guest", "g.wasm", "--path", ".", "--proxy-trust-forwarded"]
        )
        self.assertIn("--proxy-trust-forwarded applies to --proxy, not to --path .", str(error))


class ForwardingHeaderUnitTests(SynchronousTestCase):
    """ProxyResource.backend_headers without sockets."""

    def test_ipv6_client_and_host_with_port(self) -> None:
        """Forwarded quotes an IPv6 node as "[addr]" and a Host with a port; a guest's own
        X-Forwarded-For value is kept (the client's is not) with this hop appended."""
        proxy = ProxyResource("http://backend:81", agent=object())  # type: ignore[arg-type]
        request = DummyRequest([b""])
        request.client = IPv6Address("TCP", "::1", 4321)
        request.isSecure = lambda: True  # type: ignore[method-assign]
        request.requestHeaders = Headers({b"host": [b"front:8443"], b"x-forwarded-for": [b"6.6.6.6"]})
        remember_client_headers(request)
        # What a guest that adds a value leaves: a new headers object.
        request.requestHeaders = Headers({b"host": [b"front:8443"], b"x-forwarded-for": [b"6.6.6.6", b"203.0.113.9"]})
        sent = proxy.backend_headers(request)
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.9, ::1"])
        self.assertEqual(sent.getRawHeaders(b"forwarded"), [b'for="[::1]";host="front:8443";proto=https'])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-host"), [b"front:8443"])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(sent.getRawHeaders(b"host"), [b"backend:81"])
