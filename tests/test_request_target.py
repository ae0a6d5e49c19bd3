"""Request targets that are not origin-form (``/...``), in front of ``--proxy`` and of any downstream.

A request target is origin-form (``/path?query``), ``*`` for ``OPTIONS``, or an
absolute-form URL naming this server (``http://<its Host>/path``), which is
reduced to its path before any guest or resource sees it.  Anything else
(``a:1/``, ``host:443``, ``http://other-host/x``, ``*`` for GET) is answered
400 and reaches no guest, no downstream, no backend.  The backend URL of
``--proxy`` takes its scheme, host and port from the operator only, and the
base path stays a boundary for every form.

The end-to-end tests run ``twistd httpwasm --proxy`` in front of a recording
backend on a real loopback port, with a second listener on the port the
client's bytes would have named (which must receive nothing).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Generator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.web.backend_request import NotOriginForm, origin_form
from twisted_httpwasm.web.proxy import ProxyResource
from twisted_httpwasm.web.site import GuestSite

from .support import make_guest
from .test_proxy_security import SET_URI_GUEST, RecordingBackend, raw_get, status_of
from .test_twistd import HEADER_GUEST, TwistdTestCase

#: Targets that are not origin-form and name no authority of this server: 400, nothing forwarded.
REFUSED = [
    b"a:1/",
    b"a:-admin/x",
    b"a:..%2fx",
    b"a:.evil.example/x",
    b"http://other-host/x",
    b"https://front.example/x",  # this server's name, but not the scheme the client speaks to it
    b"http://user@front.example/x",
    b"front.example:80",  # authority-form
    b"127.0.0.1:1",
    b"*",  # asterisk-form outside OPTIONS
    b"x",
    b"?q",
]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def low_port_pair() -> tuple[int, int]:
    """A free port P < 6553 whose "P1" (P * 10 + 1, what ``a:1/`` makes of it) is free too."""
    start = random.randint(2000, 6000)
    for port in range(start, 6553):
        if _bindable(port) and _bindable(port * 10 + 1):
            return port, port * 10 + 1
    raise AssertionError("no free pair of loopback ports")


def backend_on(case: TestCase, port: int) -> RecordingBackend:
    """A recording backend listening on 127.0.0.1:``port`` until the end of ``case``."""
    from twisted.internet import reactor

    from .test_proxy import ConnectionTracker

    backend = RecordingBackend()
    tracker = ConnectionTracker(Site(backend))
    listening = reactor.listenTCP(port, tracker, interface="127.0.0.1")  # type: ignore[attr-defined]
    case.addCleanup(tracker.close_all)
    case.addCleanup(listening.stopListening)
    return backend


class ProxyTargetTests(TwistdTestCase):
    """``twistd httpwasm --proxy`` with the targets of the attack, on raw sockets."""

    timeout = 120

    def backend_on(self, port: int) -> RecordingBackend:
        return backend_on(self, port)

    @inlineCallbacks
    def proxy_server(self, backend_url: str) -> Generator[Any, Any, str]:
        return (yield self.start_server("--guest", self.guest_file(HEADER_GUEST), "--proxy", backend_url))

    @inlineCallbacks
    def test_a_port_glued_to_the_backend_port_is_refused(self) -> Generator[Any, Any, None]:
        """``--proxy http://127.0.0.1:P``: ``GET a:1/`` must not reach port P1 (it did: 400 now)."""
        port, glued = low_port_pair()
        backend = self.backend_on(port)
        injected = self.backend_on(glued)
        url = yield self.proxy_server(f"http://127.0.0.1:{port}")
        for target in REFUSED:
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 400, (target, answer))
            self.assertTrue(answer.endswith(b"\r\n\r\nBad Request\n"), answer)
        self.assertEqual((backend.targets, injected.targets), ([], []))
        # Origin-form, and an absolute-form URL naming this server (as Host does), are forwarded.
        for target in (b"/x?q=1", b"http://front.example/y", b"HTTP://FRONT.EXAMPLE:80/z?k"):
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 200, (target, answer))
        self.assertEqual((backend.targets, injected.targets), ([b"/x?q=1", b"/y", b"/z?k"], []))
        output = self.server.output()
        self.assertIn("refusing GET a:1/ from ", output)
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_a_port_after_a_portless_backend_is_refused(self) -> Generator[Any, Any, None]:
        """``--proxy http://127.0.0.1``: ``GET a::PORT/y`` must not reach PORT."""
        injected_port, _ = low_port_pair()
        injected = self.backend_on(injected_port)
        url = yield self.proxy_server("http://127.0.0.1")
        for target in (b"a::%d/y" % injected_port, b"a::%d" % injected_port, b"//127.0.0.1:%d/y" % injected_port):
            answer = yield raw_get(url, target)
            self.assertIn(status_of(answer), (400, 502), (target, answer))  # 502: port 80 has no backend
        self.assertEqual(injected.targets, [])

    @inlineCallbacks
    def test_the_base_path_is_a_boundary_for_every_form(self) -> Generator[Any, Any, None]:
        """``--proxy http://127.0.0.1:P/base``: ``a:-admin/x`` must not reach ``/base-admin/x``."""
        port, _ = low_port_pair()
        backend = self.backend_on(port)
        url = yield self.proxy_server(f"http://127.0.0.1:{port}/base")
        for target in [*REFUSED, b"http://front.example/../x", b"http://front.example/%2e%2e/x"]:
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 400, (target, answer))
        self.assertEqual(backend.targets, [])
        for target in (b"/x", b"http://front.example/y/./z", b"http://front.example", b"OPTIONS"):
            if target == b"OPTIONS":
                answer = yield raw_options_star(url)
            else:
                answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 200, (target, answer))
        # OPTIONS * is the server's own answer: the backend is asked nothing for it.
        self.assertEqual(backend.targets, [b"/base/x", b"/base/y/z", b"/base/"])


@inlineCallbacks
def raw_options_star(url: str) -> Generator[Any, Any, bytes]:
    """``OPTIONS * HTTP/1.1`` on a new connection; the raw answer."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from .test_proxy import Recording

    client = Recording(b"OPTIONS * HTTP/1.1\r\nHost: front.example\r\nConnection: close\r\n\r\n")
    port = int(url.rsplit(":", 1)[1])
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    yield client.closed
    return bytes(client.received)


class Hello(Resource):
    """A downstream that says what it was asked for (``--class tests.test_request_target.Hello``)."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"downstream saw %s %s" % (request.method, request.uri)


class GuestTargetTests(TwistdTestCase):
    """Without --proxy: the same targets reach no guest and no downstream."""

    timeout = 60

    @inlineCallbacks
    def test_targets_that_are_not_origin_form_get_400(self) -> Generator[Any, Any, None]:
        url = yield self.start_server(
            "--guest", self.guest_file(HEADER_GUEST), "--class", "tests.test_request_target.Hello"
        )
        for target in REFUSED:
            answer = yield raw_get(url, target)
            self.assertEqual(status_of(answer), 400, (target, answer))
            self.assertNotIn(b"x-guest", answer.lower())  # no guest ran
        answer = yield raw_get(url, b"http://front.example/x?y")
        self.assertEqual(status_of(answer), 200, answer)
        self.assertTrue(answer.endswith(b"downstream saw GET /x?y"), answer)
        self.assertIn(b"x-guest: seen", answer.lower())
        answer = yield raw_options_star(url)  # Twisted's Site answers OPTIONS * itself
        self.assertEqual(status_of(answer), 200, answer)
        self.assertNotIn("Traceback", self.server.output())


# -- the property, on the request parsing and proxy code of a real site --------------------------


class _RecordingAgent:
    """An agent that records the URL it is asked for and answers nothing (the request stays open)."""

    def __init__(self) -> None:
        self.urls: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.urls.append(uri)
        return Deferred()


_PIECES = [
    b"/",
    b"//",
    b":",
    b"a:",
    b"http:",
    b"https:",
    b"http://",
    b"front.example",
    b"127.0.0.1",
    b":4321",
    b":1",
    b"1",
    b"@",
    b".",
    b"..",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%2F",
    b"?",
    b"#",
    b"*",
    b"-admin",
    b"base",
    b"x",
    b";",
    b"\\",
    b"[::1]",
    b"evil.example",
]


def _feed(site: Site, raw: bytes) -> bytes:
    """Feed ``raw`` to a new connection of ``site``; what it wrote back."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    written = transport.value()
    protocol.connectionLost(Failure(ConnectionDone()))
    return written


class TargetPropertyTests(SynchronousTestCase):
    """Whatever the request target, the backend is asked only for its own authority, under its base."""

    def setUp(self) -> None:
        self.agent = _RecordingAgent()
        proxy = ProxyResource("http://127.0.0.1:4321/base", agent=self.agent)
        guest = make_guest(SET_URI_GUEST, execution=Execution.INLINE)
        self.sites = [GuestSite(proxy), GuestSite(GuestResource(guest, proxy)), Site(GuestResource(guest, proxy))]

    def check(self, url: bytes) -> None:
        parsed = URI.fromBytes(url)  # as the proxy's Agent reads it
        self.assertEqual((parsed.scheme, parsed.host, parsed.port), (b"http", b"127.0.0.1", 4321), url)
        target = parsed.originForm
        self.assertTrue(target == b"/base" or target.startswith((b"/base/", b"/base?")), url)
        segments = target.partition(b"?")[0].split(b"/")
        self.assertNotIn(b"..", segments, url)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map(b"".join), st.sampled_from([0, 1, 2]))
    def test_backend_urls_stay_with_the_backend(self, target: bytes, which: int) -> None:
        self.agent.urls.clear()
        request = b"GET " + target + b" HTTP/1.1\r\nHost: front.example\r\nConnection: close\r\n\r\n"
        answer = _feed(self.sites[which], request)
        for url in self.agent.urls:
            self.check(url)
        if not self.agent.urls:
            self.assertTrue(answer.startswith(b"HTTP/1.1 4"), (target, answer))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map(b"".join))
    def test_guest_set_uris_stay_with_the_backend(self, uri: bytes) -> None:
        """A guest's set_uri goes through the same check (set_uri itself traps on a target that is not origin-form)."""
        self.agent.urls.clear()
        request = b"GET /start HTTP/1.1\r\nHost: front.example\r\nX-Target: " + uri + b"\r\nConnection: close\r\n\r\n"
        answer = _feed(self.sites[1], request)
        for url in self.agent.urls:
            self.check(url)
        if not self.agent.urls:
            self.assertTrue(answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 500")), (uri, answer))


class OriginFormUnitTests(SynchronousTestCase):
    """:func:`origin_form`: what each form becomes, or why it is refused."""

    def reduce(self, target: bytes, method: bytes = b"GET", host: bytes | None = b"front.example") -> bytes:
        return origin_form(target, method=method, host=host, secure=False, local=b"127.0.0.1:8080")

    def test_origin_form_is_kept(self) -> None:
        for target in (b"/", b"/x?q", b"//x", b"/a:1/"):
            self.assertEqual(self.reduce(target), target)

    def test_absolute_form_for_this_server_is_reduced_to_its_path(self) -> None:
        self.assertEqual(self.reduce(b"http://front.example/x?q"), b"/x?q")
        self.assertEqual(self.reduce(b"http://front.example"), b"/")
        self.assertEqual(self.reduce(b"http://front.example?q"), b"/?q")
        self.assertEqual(self.reduce(b"http://FRONT.example:80/x"), b"/x")
        self.assertEqual(self.reduce(b"http://front.example:8080/x", host=b"front.example:8080"), b"/x")
        self.assertEqual(self.reduce(b"http://127.0.0.1:8080/x", host=None), b"/x")  # no Host: the local address
        secure = origin_form(b"https://front.example/x", method=b"GET", host=b"front.example", secure=True, local=b"")
        self.assertEqual(secure, b"/x")

    def test_asterisk_is_for_options_only(self) -> None:
        self.assertEqual(self.reduce(b"*", b"OPTIONS"), b"*")
        self.assertRaises(NotOriginForm, self.reduce, b"*")

    def test_everything_else_is_refused(self) -> None:
        for target in [
            *REFUSED,
            b"",
            b"http://front.example:8080/x",  # another port than Host's
            b"http://front.example:/x",
            b"http://front.example#x",
            b"http:/front.example/x",
            b"http://front.example/x#y",
        ]:
            self.assertRaises(NotOriginForm, self.reduce, target)

    def test_the_agent_reads_an_origin_form_url_as_the_proxy_built_it(self) -> None:
        """Guards the property test's oracle: Twisted's URI parser on a URL with odd paths."""
        for path, expected in [(b"//x", b"//x"), (b"/a:1/", b"/a:1/"), (b"/@evil/", b"/@evil/")]:
            parsed = URI.fromBytes(b"http://127.0.0.1:4321/base" + path)
            self.assertEqual((parsed.host, parsed.port, parsed.originForm), (b"127.0.0.1", 4321, b"/base" + expected))
