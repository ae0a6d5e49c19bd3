"""Graceful shutdown: requests in flight finish, idle connections close, the deadline cuts the rest.

In-process tests drive :meth:`GuestSite.drain` and :class:`DrainService` over
real loopback sockets; end-to-end tests send SIGTERM to a real ``twistd``
(with ``--workers 2`` too) while requests wait on a ``--proxy`` backend that
this test process runs and releases.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Generator
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_httpwasm.service import stopping as _stopping
from twisted_httpwasm.service.stopping import DrainService, stop_reactor, take_over_stop_signals
from twisted_httpwasm.service.tap import Options, makeService
from twisted_httpwasm.service.workers import STOP_TIMEOUT, WorkersService
from twisted_httpwasm.web import drain as _drain
from twisted_httpwasm.web.site import GuestSite

from .support import ServerTestCase, TempFilesMixin, poll
from .test_daemon import DaemonTestCase
from .test_http2 import H2_SKIP, certificates, h2_fetch
from .test_twistd import DEADLINE, TwistdTestCase, accepts_connections, free_port
from .test_workers import alive

#: What the held backend answers: big enough that a cut response would show.
BODY = b"0123456789abcdef" * 4096

#: Passes requests on; its handle_response loops a while, so guest calls run while the server drains.
BUSY_RESPONSE_GUEST = """
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32)
    (local $i i32)
    (local.set $i (i32.const 3000000))
    (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i))))
"""


class HeldBackend(Resource):
    """Holds every request until :meth:`release`; then answers BODY with its length."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.held.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            if not request._disconnected:
                request.setHeader(b"content-length", b"%d" % len(BODY))
                request.write(BODY)
                request.finish()


class RawClient(Protocol):
    """Sends bytes, keeps what comes back; ``closed`` fires when the server closes the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.received)


# -- in process: GuestSite.drain and DrainService ----------------------------------------


class DrainTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.backend = HeldBackend()
        self.addCleanup(self.backend.release)
        self.site = GuestSite(self.backend)
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    @inlineCallbacks
    def client(self, data: bytes) -> Generator[Any, Any, RawClient]:
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.transport.write(data)
        return client

    @inlineCallbacks
    def test_drain_lets_the_request_finish_and_closes_its_connection(self) -> Generator[Any, Any, None]:
        """A request in flight completes in full with ``Connection: close``; its connection ends; drain fires True."""
        client = yield self.client(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.backend.held, 5)
        drained = self.site.drain(10)
        self.assertNoResult(drained)
        self.backend.release()
        received = yield client.closed
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nconnection: close", head.lower())
        self.assertEqual(body, BODY)
        self.assertIs((yield drained), True)

    @inlineCallbacks
    def test_idle_keep_alive_connection_is_closed(self) -> Generator[Any, Any, None]:
        """A keep-alive connection between requests is closed at once; one with a request waits for it."""
        idle = yield self.client(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.backend.held, 5)
        self.backend.release()
        yield poll(lambda: BODY in idle.received, 5)
        busy = yield self.client(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.backend.held, 5)
        drained = self.site.drain(10)
        yield idle.closed
        self.assertFalse(busy.closed.called)
        self.backend.release()
        received = yield busy.closed
        self.assertTrue(received.endswith(BODY))
        self.assertIs((yield drained), True)

    @inlineCallbacks
    def test_deadline_cuts_what_still_runs(self) -> Generator[Any, Any, None]:
        """At the deadline a request still running is cut (its connection aborted) and logged; drain fires False."""
        events: list[dict[str, Any]] = []
        self.patch(_drain, "_log", _drain.Logger(namespace="httpwasm", observer=events.append))
        client = yield self.client(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.backend.held, 5)
        finished = yield self.site.drain(0.1)
        self.assertIs(finished, False)
        self.assertEqual((yield client.closed), b"")
        cut = [event for event in events if "cutting" in event["log_format"]]
        self.assertEqual(len(cut), 1)
        self.assertEqual((cut[0]["method"], cut[0]["uri"]), ("GET", "/never"))

    @inlineCallbacks
    def test_nothing_in_flight_drains_at_once(self) -> Generator[Any, Any, None]:
        """With no request in flight the drain fires True at once, and again when asked again."""
        self.assertIs((yield self.site.drain(10)), True)
        self.assertIs((yield self.site.drain(10)), True)

    @inlineCallbacks
    def test_drain_service_drains_when_it_stops(self) -> Generator[Any, Any, None]:
        """DrainService: stopping it waits for the site's requests in flight."""
        service = DrainService(self.site, 10, stop_signals=False)
        service.startService()
        client = yield self.client(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.backend.held, 5)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.backend.release()
        yield stopped
        self.assertTrue((yield client.closed).endswith(BODY))


class Http2DrainTests(ServerTestCase):
    skip = H2_SKIP

    @inlineCallbacks
    def test_http2_request_in_flight_finishes(self) -> Generator[Any, Any, None]:
        """Over HTTP/2 (TLS, ALPN h2) a request in flight completes in full during the drain; drain fires True."""
        from twisted.internet.ssl import CertificateOptions, PrivateCertificate

        backend = HeldBackend()
        self.addCleanup(backend.release)
        site = GuestSite(backend)
        certs = certificates()
        private = PrivateCertificate.loadPEM(certs.key_pem + certs.cert_pem)
        options = CertificateOptions(
            privateKey=private.privateKey.original, certificate=private.original, acceptableProtocols=[b"h2"]
        )
        port = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        answer = deferToThread(h2_fetch, port.getHost().port, certs.ca_pem, "GET", "/h2")
        if not (yield poll(lambda: backend.held, 10)):
            self.fail("the HTTP/2 request did not arrive")
        drained = site.drain(10)
        self.assertNoResult(drained)
        backend.release()
        result = yield answer
        self.assertEqual((result.protocol, result.status, result.body), ("h2", 200, BODY))
        self.assertIs((yield drained), True)


class FakeReactor:
    """Records stops; a second ``stop`` raises ReactorNotRunning, as a real reactor's does."""

    def __init__(self) -> None:
        self.stops = 0
        self.from_thread: list[Any] = []

    def stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.from_thread.append((function, args))

    def handler(self, number: int, frame: Any) -> None:
        """Stands for the reactor's own signal handler."""


class StopSignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        self.events: list[dict[str, Any]] = []
        self.patch(_stopping, "_log", _stopping.Logger(namespace="httpwasm", observer=self.events.append))

    def test_signals_stop_the_reactor_once(self) -> None:
        """The reactor's SIGTERM/SIGINT handlers are replaced; a repeated signal only logs, it raises nothing."""
        fake = FakeReactor()
        signal.signal(signal.SIGTERM, fake.handler)
        signal.signal(signal.SIGINT, fake.handler)
        take_over_stop_signals(fake)
        for number in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(number)
            self.assertNotEqual(handler, fake.handler)
            handler(number, None)  # type: ignore[operator]
        for function, args in fake.from_thread:
            function(*args)
        self.assertEqual(fake.stops, 3)
        texts = [event["why"] + event["log_format"].split("}")[-1] for event in self.events]
        self.assertEqual(
            texts,
            ["Received SIGTERM; stopping", "Received SIGTERM; already stopping", "Received SIGINT; already stopping"],
        )

    def test_other_handlers_are_left_alone(self) -> None:
        """A handler the reactor did not install (an application's, SIG_IGN) stays."""
        fake = FakeReactor()
        other = FakeReactor()
        signal.signal(signal.SIGTERM, other.handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        take_over_stop_signals(fake)
        self.assertEqual(signal.getsignal(signal.SIGTERM), other.handler)
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)

    def test_stop_reactor_is_idempotent(self) -> None:
        """stop_reactor on a reactor already stopping logs and returns."""
        fake = FakeReactor()
        stop_reactor(fake, "first")
        stop_reactor(fake, "second")
        self.assertEqual(fake.stops, 2)


class ShutdownTimeoutOptionTests(TempFilesMixin, SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--guest", self.guest_file(BUSY_RESPONSE_GUEST), "--execution", "inline", *args])
        return options

    def test_shutdown_timeout_option(self) -> None:
        """--shutdown-timeout takes seconds (0 or more, default 30); anything else is a usage error naming it."""
        self.assertEqual(self.parse()["shutdown-timeout"], 30.0)
        self.assertEqual(self.parse("--shutdown-timeout", "2.5")["shutdown-timeout"], 2.5)
        self.assertEqual(self.parse("--shutdown-timeout", "0")["shutdown-timeout"], 0.0)
        for bad in ("-1", "soon", "inf", "nan"):
            error = self.assertRaises(usage.UsageError, self.parse, "--shutdown-timeout", bad)
            self.assertIn(f"--shutdown-timeout must be a number of seconds (0 or more), not {bad!r}", str(error))

    def test_make_service_drains_with_the_timeout(self) -> None:
        """makeService adds a DrainService for its site with --shutdown-timeout; workers get it plus STOP_TIMEOUT."""
        service = makeService(self.parse("--shutdown-timeout", "7", "--listen", "tcp:0:interface=127.0.0.1"))
        (drain,) = [child for child in service if isinstance(child, DrainService)]
        (listening,) = [child for child in service if isinstance(child, StreamServerEndpointService)]
        self.assertIs(drain.site, listening.factory)
        self.assertIsInstance(drain.site, GuestSite)
        self.assertEqual(drain.timeout, 7.0)
        service = makeService(self.parse("--shutdown-timeout", "7", "--workers", "2", "--listen", "tcp:0"))
        (workers,) = [child for child in service if isinstance(child, WorkersService)]
        self.assertEqual(workers.stop_timeout, 7.0 + STOP_TIMEOUT)


# -- end to end: SIGTERM to twistd ----------------------------------------------------------

_WAITING = re.compile(r"waiting for (\d+) request\(s\) in flight")


@inlineCallbacks
def refuses_connections(port: int) -> Generator[Any, Any, bool]:
    """True once nothing accepts TCP connections on 127.0.0.1:``port``."""
    return not (yield accepts_connections(port))


class ShutdownEndToEndTests(TwistdTestCase):
    """SIGTERM with requests in flight on a held --proxy backend."""

    def setUp(self) -> None:
        super().setUp()
        self.backend = HeldBackend()
        self.addCleanup(self.backend.release)
        self.backend_url = self.serve(self.backend)

    @inlineCallbacks
    def sigterm_with_requests_in_flight(self, *options: str) -> Generator[Any, Any, None]:
        """10 requests wait on the backend; SIGTERM; the server stops listening; release; all 10 complete; status 0."""
        url = yield self.start_server(
            "--guest", self.guest_file(BUSY_RESPONSE_GUEST), "--proxy", self.backend_url, *options
        )
        port = int(url.rsplit(":", 1)[1])
        server = self.server
        if "--workers" in options and not (
            yield poll(lambda: "httpwasm worker 2 of 2 (pid" in server.output(), DEADLINE)
        ):
            self.fail(f"worker 2 did not start:\n{server.output()}")
        responses = gatherResults([self.fetch("GET", f"{url}/r{n}", timeout=DEADLINE) for n in range(10)])
        if not (yield poll(lambda: len(self.backend.held) == 10, DEADLINE)):
            self.fail(f"{len(self.backend.held)} of 10 requests reached the backend:\n{server.output()}")
        server.process.send_signal(signal.SIGTERM)

        def draining() -> bool:
            return sum(map(int, _WAITING.findall(server.output()))) == 10

        if not (yield poll(draining, DEADLINE)):
            self.fail(f"the server does not wait for its 10 requests in flight:\n{server.output()}")
        # Each process logs that line in the reactor turn that asks its port to stop listening; the socket
        # closes on the next turn, which a loaded machine can hold back past the probe: wait for it.
        self.assertTrue((yield poll(lambda: refuses_connections(port), DEADLINE)), "still accepting connections")
        self.assertFalse(server.exited(), server.output())
        self.backend.release()
        results = yield responses
        self.assertEqual([(status, body) for status, _, body in results], [(200, BODY)] * 10)
        if not (yield poll(server.exited, DEADLINE)):
            self.fail(f"twistd did not stop:\n{server.output()}")
        output = server.output()
        self.assertEqual(server.process.returncode, 0, output)
        self.assertNotIn("#critical", output)
        self.assertNotIn("Traceback", output)
        self.assertIn("drained: every request finished, every connection closed", output)
        self.assertIn("Server Shut Down.", output)
        return output

    def test_sigterm_lets_requests_in_flight_finish(self) -> Any:
        """SIGTERM with 10 requests on a slow --proxy backend: all 10 complete in full, guest calls included; exit 0."""
        return self.sigterm_with_requests_in_flight()

    @inlineCallbacks
    def test_sigterm_with_workers(self) -> Generator[Any, Any, None]:
        """The same with --workers 2: each process drains its share; the worker exits 0 first; no critical line."""
        output = yield self.sigterm_with_requests_in_flight("--workers", "2")
        self.assertRegex(output, r"httpwasm worker 2 \(pid \d+\) stopped: exited with status 0")

    @inlineCallbacks
    def test_deadline_cuts_and_logs_what_still_runs(self) -> Generator[Any, Any, None]:
        """--shutdown-timeout 0.5 with a backend that never answers: the requests are cut and logged; exit 0."""
        url = yield self.start_server(
            "--guest", self.guest_file(BUSY_RESPONSE_GUEST), "--proxy", self.backend_url, "--shutdown-timeout", "0.5"
        )
        server = self.server
        responses = [self.fetch("GET", f"{url}/held{n}", timeout=DEADLINE) for n in range(2)]
        if not (yield poll(lambda: len(self.backend.held) == 2, DEADLINE)):
            self.fail(f"the requests did not reach the backend:\n{server.output()}")
        server.process.send_signal(signal.SIGTERM)
        for response in responses:
            failure = yield self.assertFailure(response, Exception)
            self.assertNotIsInstance(failure, AssertionError)
        if not (yield poll(server.exited, DEADLINE)):
            self.fail(f"twistd did not stop:\n{server.output()}")
        output = server.output()
        self.assertEqual(server.process.returncode, 0, output)
        for n in range(2):
            self.assertIn(f"shutdown timeout (0.5 s): cutting GET /held{n} from", output)
        self.assertNotIn("#critical", output)


class EmbeddedDrainTests(DaemonTestCase):
    """A ``.tac`` file with ``GuestSite`` and ``DrainService``, daemonized by ``twistd -y``."""

    @inlineCallbacks
    def test_tac_drains_on_sigterm(self) -> Generator[Any, Any, None]:
        """SIGTERM through the pidfile with a request in flight: it completes in full, then the daemon ends."""
        backend = HeldBackend()
        self.addCleanup(backend.release)
        backend_url = self.serve(backend)
        port = free_port()
        daemon = yield self.start_tac(
            f"""\
            from twisted.application import service, strports

            from twisted_httpwasm import DrainService, Guest, GuestResource, GuestSite, ProxyResource

            application = service.Application("httpwasm-tac")
            guest = Guest.load({self.guest_file(BUSY_RESPONSE_GUEST)!r})
            site = GuestSite(GuestResource(guest, ProxyResource({backend_url!r})))
            strports.service("tcp:{port}:interface=127.0.0.1", site).setServiceParent(application)
            DrainService(site, timeout=20).setServiceParent(application)
            """,
            port,
        )
        response = self.fetch("GET", f"http://127.0.0.1:{port}/in-flight", timeout=DEADLINE)
        if not (yield poll(lambda: backend.held, DEADLINE)):
            self.fail(f"the request did not reach the backend:\n{daemon.output()}")
        pid = daemon.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        if not (yield poll(lambda: "waiting for 1 request(s) in flight" in daemon.log(), DEADLINE)):
            self.fail(f"the daemon does not drain:\n{daemon.output()}")
        self.assertTrue(alive(pid))
        backend.release()
        status, _, body = yield response
        self.assertEqual((status, body), (200, BODY))
        if not (yield poll(lambda: not alive(pid), DEADLINE)):
            self.fail(f"the daemon outlived its drain:\n{daemon.output()}")
        self.assertIn("drained: every request finished, every connection closed", daemon.log())
        self.assertNotIn("#critical", daemon.log())
