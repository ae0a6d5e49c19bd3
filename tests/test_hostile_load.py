"""Bounded under hostile load: work for clients that left, and what one connection may make the server hold."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_httpwasm import GuestResource
from twisted_httpwasm.runtime.pool import GuestPool
from twisted_httpwasm.service.tap import Options, make_site
from twisted_httpwasm.web.guest_threads import GuestWorkers
from twisted_httpwasm.web.site import HOUSEKEEPING_INTERVAL, GuestSite

from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, make_guest, module, on_guest_log, poll
from .test_http2 import H2_SKIP, certificates, h2_fetch, serve_tls
from .test_resource import RawClient, raw_connect

LOGGING_GUEST = """
  (data (i32.const 0) "ran")
  (func (export "handle_request") (result i64)
    (call $log (i32.const 1) (i32.const 0) (i32.const 3))
    (i64.const 1))
"""


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"ok"


class _Watched(Resource):
    """Renders ``inner`` and counts the requests it got and the clients that went away."""

    isLeaf = True

    def __init__(self, inner: Resource):
        super().__init__()
        self.inner = inner
        self.rendered = 0
        self.lost = 0

    def render(self, request: Request) -> Any:
        self.rendered += 1
        request.notifyFinish().addErrback(lambda _: setattr(self, "lost", self.lost + 1))
        return self.inner.render(request)


class AbandonedWorkTests(ServerTestCase):
    @inlineCallbacks
    def test_guest_calls_for_clients_that_left_are_not_started(self):
        """Requests queued behind a busy worker whose clients leave never run the guest; nothing leaks.

        The only worker thread is held; five clients send a request and hang up
        while their guest calls wait. Once the worker is free, those calls are
        dropped unstarted (the guest logs nothing for them), no instance is lent
        out, and the next request is served as usual.
        """
        guest = make_guest(LOGGING_GUEST, NOOP_RESPONSE)
        runs: list[object] = []
        on_guest_log(guest, runs.append)
        resource = GuestResource(guest, _Ok())
        workers = GuestWorkers(reactor, max_size=1)
        self.addCleanup(workers.stop)
        resource.runner = workers
        watched = _Watched(resource)
        url = self.serve(watched)
        port = int(url.rsplit(":", 1)[1])

        release = threading.Event()
        self.addCleanup(release.set)
        workers.run(lambda: release.wait(30), lambda _: None, lambda _: None)
        clients = []
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.addCleanup(client.close)
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            clients.append(client)
        self.assertTrue((yield poll(lambda: watched.rendered == 5, timeout=10, interval=0.01)))
        for client in clients:
            client.close()
        self.assertTrue((yield poll(lambda: watched.lost == 5, timeout=10, interval=0.01)))

        release.set()
        status, _, body = yield self.fetch("GET", url + "/")
        self.assertEqual((status, body), (200, b"ok"))
        self.assertEqual(len(runs), 1)  # the good request only
        self.assertEqual(workers.dropped, 5)
        stats = guest.pool.stats
        self.assertEqual(stats.in_use, 0)
        self.assertEqual(stats.idle, stats.created - stats.discarded)


class _Body(Resource):
    """Answers with the length of the request body it got."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        return b"%d" % len(request.content.read())


class LimitsTestCase(ServerTestCase):
    def serve_limited(self, **limits: Any) -> tuple[str, GuestResource, list[object]]:
        """A GuestSite with ``limits`` serving a logging guest in front of _Body; (url, resource, guest runs)."""
        guest = make_guest(LOGGING_GUEST, NOOP_RESPONSE)
        runs: list[object] = []
        on_guest_log(guest, runs.append)
        resource = GuestResource(guest, _Body())
        return self.listen(GuestSite(resource, **limits)), resource, runs


class RequestBodyLimitTests(LimitsTestCase):
    @inlineCallbacks
    def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_sent(self):
        """Content-Length over max_request_body: 413 and a closed connection while the client has sent
        only the first 100 bytes of a 10 MB body; the guest never runs."""
        url, _, runs = self.serve_limited(max_request_body=1024)
        client: RawClient = yield raw_connect(
            url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100
        )
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertIn(b"connection: close", received.lower())
        self.assertEqual(runs, [])

    @inlineCallbacks
    def test_a_chunked_body_crossing_the_limit_gets_413_before_the_rest(self):
        """A chunked body is refused as soon as it crosses the limit; the client never sent its end."""
        url, _, runs = self.serve_limited(max_request_body=1024)
        chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
        client: RawClient = yield raw_connect(
            url, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
        )
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertEqual(runs, [])

    @inlineCallbacks
    def test_a_refused_body_that_arrives_whole_is_never_processed(self):
        """A chunked body over the limit that arrives whole, its last chunk in the same read, still gets
        the 413 alone: the request is not processed once its body was refused (no guest, no second answer)."""
        url, _, runs = self.serve_limited(max_request_body=1024)
        chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
        client: RawClient = yield raw_connect(
            url, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
        )
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertEqual(received.count(b"HTTP/1.1 "), 1, received)
        self.assertEqual(runs, [])

    @inlineCallbacks
    def test_no_100_continue_for_a_refused_body(self):
        """With Expect: 100-continue, a body over the limit gets the 413 only: no 100 asks for the body."""
        url, _, _ = self.serve_limited(max_request_body=1024)
        client: RawClient = yield raw_connect(
            url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertNotIn(b"100 Continue", received)

    @inlineCallbacks
    def test_bodies_up_to_the_limit_pass(self):
        """A body of exactly the limit, sized or chunked, reaches the guest and the downstream."""
        url, _, runs = self.serve_limited(max_request_body=1024)
        status, _, body = yield self.fetch("POST", url + "/", data=b"y" * 1024)
        self.assertEqual((status, body), (200, b"1024"))
        chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
        client: RawClient = yield raw_connect(
            url,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunk * 2
            + b"0\r\n\r\n",
        )
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertTrue(received.endswith(b"1024"), received)
        self.assertEqual(len(runs), 2)

    @inlineCallbacks
    def test_no_limit(self):
        """max_request_body=None takes any body."""
        url, _, _ = self.serve_limited(max_request_body=None)
        status, _, body = yield self.fetch("POST", url + "/", data=b"y" * 100_000)
        self.assertEqual((status, body), (200, b"100000"))


class ConnectionDeadlineTests(LimitsTestCase):
    @inlineCallbacks
    def test_headers_trickled_past_the_deadline_close_the_connection(self):
        """A client that keeps sending header bytes, but never finishes them, is cut at the header deadline.

        It sends a byte every 20 ms (each resets the idle timeout, which is long here);
        the header deadline closes the connection with a 408 while it is still sending.
        """
        url, _, runs = self.serve_limited(header_timeout=0.3, idle_timeout=60)
        client: RawClient = yield raw_connect(url, b"GET / HTTP/1.1\r\n")
        sent = [0]

        def trickle() -> None:
            if client.transport is not None and client.transport.connected:
                client.transport.write(b"X-Slow-%d: 1\r\n" % sent[0])
                sent[0] += 1

        dripping = LoopingCall(trickle)
        dripping.start(0.02)
        self.addCleanup(lambda: dripping.running and dripping.stop())
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(dripping.running)  # still sending when the server closed
        self.assertGreater(sent[0], 1)
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received)
        self.assertEqual(runs, [])

    @inlineCallbacks
    def test_an_idle_keep_alive_connection_is_closed(self):
        """After a complete keep-alive exchange, a connection that stays silent is closed at the idle timeout."""
        url, _, _ = self.serve_limited(idle_timeout=0.3)
        client: RawClient = yield raw_connect(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertTrue(received.endswith(b"2"), received)

    @inlineCallbacks
    def test_a_slow_request_within_the_deadline_is_served(self):
        """The header deadline counts from the request's first byte; headers sent in time are served."""
        url, _, runs = self.serve_limited(header_timeout=5)
        client: RawClient = yield raw_connect(url, b"POST / HTTP/1.1\r\nHost: x\r\n")
        client.transport.write(b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
        received = yield client.closed.addTimeout(20, reactor)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertEqual(len(runs), 1)


class HeaderDeadlineSweepTests(SynchronousTestCase):
    """The header deadline on a fake clock: the site's sweep looks at its HTTP/1 connections, nothing per request.

    Deadline 2 s: the sweep runs every 0.25 s and a connection past the deadline
    is closed at most min(1 s, 2 s/4) = 0.5 s after it.
    """

    TIMEOUT = 2.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.site = GuestSite(_Ok(), reactor=self.clock, header_timeout=self.TIMEOUT, idle_timeout=600)
        self.site.doStart()
        self.addCleanup(self.site.doStop)

    def connect(self) -> tuple[Any, StringTransport]:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = self.site.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return protocol, transport

    def advance_to(self, when: float) -> None:
        self.clock.advance(when - self.clock.seconds())

    def test_headers_trickled_after_a_keep_alive_request_are_cut_at_the_deadline(self) -> None:
        """A request served, then the next one's headers trickled a line at a time: 408 and closed once the
        deadline from that request's first byte is over, not before (and not more than half a second after)."""
        protocol, transport = self.connect()
        self.advance_to(0.1)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        transport.clear()
        self.advance_to(0.3)
        protocol.dataReceived(b"GE")  # the next request's first bytes
        step = 0
        while not transport.disconnecting and self.clock.seconds() < 10:
            self.advance_to(0.3 + 0.1 * (step + 1))
            step += 1
            protocol.dataReceived(b"T / HTTP/1.1\r\n" if step == 1 else b"X-Slow-%d: 1\r\n" % step)
            if self.clock.seconds() < 0.3 + self.TIMEOUT:
                self.assertFalse(transport.disconnecting, self.clock.seconds())
        self.assertLessEqual(self.clock.seconds(), 0.3 + self.TIMEOUT + 0.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())

    def test_a_request_line_trickled_is_cut_at_the_deadline(self) -> None:
        """Bytes of a request line that never ends count too, from the first one."""
        protocol, transport = self.connect()
        self.advance_to(0.1)
        while not transport.disconnecting and self.clock.seconds() < 10:
            protocol.dataReceived(b"G" if self.clock.seconds() < 0.15 else b"x")
            self.advance_to(self.clock.seconds() + 0.1)
        self.assertGreaterEqual(self.clock.seconds(), 0.1 + self.TIMEOUT)
        self.assertLessEqual(self.clock.seconds(), 0.1 + self.TIMEOUT + 0.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())

    def test_a_fast_keep_alive_client_caught_mid_headers_at_every_sweep_stays_open(self) -> None:
        """Each request takes less than a sweep interval, but every sweep finds the connection in the middle of
        one (in its request line, or in its headers): many deadlines long, it is never closed, each request
        served."""
        for head, tail in [(b"GET / HT", b"TP/1.1\r\nHost: x\r\n\r\n"), (b"GET / HTTP/1.1\r\nHo", b"st: x\r\n\r\n")]:
            protocol, transport = self.connect()
            start = self.clock.seconds()
            served = 0
            for sweep in range(1, 41):  # ten seconds: five deadlines
                self.advance_to(start + sweep * 0.25 - 0.05)
                protocol.dataReceived((tail if sweep > 1 else b"") + head)
                self.advance_to(start + sweep * 0.25)  # a sweep: this request has begun, its headers are not all in
                self.assertFalse(transport.disconnecting, (head, self.clock.seconds()))
                served += transport.value().count(b"HTTP/1.1 200 ")
                transport.clear()
            self.assertEqual(served, 39)

    def test_a_slow_body_is_not_the_header_deadline(self) -> None:
        """Once the headers are in, a body that comes slowly is left to the idle timeout."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
        for _ in range(50):
            self.advance_to(self.clock.seconds() + 0.1)
            protocol.dataReceived(b"y")
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"y" * 10)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 "), transport.value())
        self.assertNotIn(b" 408 ", transport.value())

    def test_a_lost_connection_is_left_alone(self) -> None:
        """A connection lost in the middle of its headers gets no 408 later."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost")
        self.advance_to(0.5)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.advance_to(3 * self.TIMEOUT)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.site.awaiting_headers, {})

    def test_twisted_http_channel_state_the_sweep_reads(self) -> None:
        """The sweep reads HTTPChannel's private state (see GuestSite._sweep_headers): if this fails, Twisted
        changed it, and the header deadline must be looked at again."""
        protocol, transport = self.connect()
        channel = protocol._channel

        def state() -> tuple[object, ...]:
            return (channel.line_mode, channel._handlingRequest, channel._buffer, channel._HTTPChannel__first_line)

        self.assertEqual(state(), (1, False, b"", 1))  # idle
        held_back = channel._dataBuffer
        protocol.dataReceived(b"GET / HT")
        self.assertEqual(state(), (1, False, b"GET / HT", 1))  # a partial request line
        protocol.dataReceived(b"TP/1.1\r\nHost: x\r\n")
        self.assertEqual(state(), (1, False, b"", 0))  # request line parsed, headers coming
        self.assertEqual(len(channel.requests), 1)
        self.assertIs(channel._dataBuffer, held_back)
        protocol.dataReceived(b"\r\n")  # served: back to lines, a new list for the bytes held back
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(state(), (1, False, b"", 1))
        self.assertIsNot(channel._dataBuffer, held_back)
        protocol.dataReceived(b"\r\n")  # the one empty line HTTP/1 tolerates before a request
        self.assertEqual(state(), (1, False, b"", 2))
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(channel.line_mode, 0)  # the body: not lines
        protocol.dataReceived(b"12345")
        self.site._sweep_headers(self.TIMEOUT)
        self.assertEqual(self.site.awaiting_headers, {})
        protocol.dataReceived(b"GET")
        self.site._sweep_headers(self.TIMEOUT)
        self.assertEqual(list(self.site.awaiting_headers), [channel])


PASSING_GUEST = '(func (export "handle_request") (result i64) (i64.const 1))' + NOOP_RESPONSE
BUFFERING_GUEST = """
  (func (export "_initialize") (drop (call $enable_features (i32.const 1))))
  (func (export "handle_request") (result i64) (i64.const 1))
"""


class LimitOptionsTests(TempFilesMixin, SynchronousTestCase):
    """``twistd httpwasm`` options for the limits, and what the site gets from them."""

    def site_for(
        self, *args: str, guest: str = NOOP_RESPONSE + '(func (export "handle_request") (result i64) (i64.const 1))'
    ) -> GuestSite:
        options = Options()
        options.parseOptions(["--guest", self.guest_file(guest), "--path", ".", *args])
        site = make_site(options, MultiService())
        assert isinstance(site, GuestSite)
        return site

    def test_defaults(self) -> None:
        """1 GiB bodies, 60 s idle connections, 30 s to send the headers."""
        site = self.site_for()
        self.assertEqual((site.max_request_body, site.timeOut, site.header_timeout), (1024**3, 60.0, 30.0))

    def test_options_set_the_limits(self) -> None:
        """--max-request-body takes a size, the timeouts seconds; 0 or none lifts each."""
        site = self.site_for("--max-request-body", "8MiB", "--idle-timeout", "5", "--header-timeout", "2.5")
        self.assertEqual((site.max_request_body, site.timeOut, site.header_timeout), (8 * 1024**2, 5.0, 2.5))
        site = self.site_for("--max-request-body", "none", "--idle-timeout", "0", "--header-timeout", "none")
        self.assertEqual((site.max_request_body, site.timeOut, site.header_timeout), (None, None, None))

    def test_max_buffered_total_is_one_budget_for_every_guest(self) -> None:
        """--max-buffered-total gives every guest of the chain the same budget (256 MiB by default; none: unbounded)."""
        guest = self.guest_file(NOOP_RESPONSE + '(func (export "handle_request") (result i64) (i64.const 1))')
        site = self.site_for("--guest", guest)
        outer = site.resource
        inner = outer.downstream
        self.assertIs(outer.buffer_budget, inner.buffer_budget)
        self.assertEqual(outer.buffer_budget.total, 256 * 1024**2)
        self.assertEqual(self.site_for("--max-buffered-total", "2MiB").resource.buffer_budget.total, 2 * 1024**2)
        self.assertIsNone(self.site_for("--max-buffered-total", "none").resource.buffer_budget.total)

    def test_bad_values_are_usage_errors(self) -> None:
        """A limit that is not a size or a positive number of seconds is refused with the option's name."""
        for option, value in (("--max-request-body", "lots"), ("--idle-timeout", "-1"), ("--header-timeout", "x")):
            error = self.assertRaises(usage.UsageError, Options().parseOptions, [option, value])
            self.assertIn(option, str(error))

    def test_a_guest_buffering_every_body_lowers_the_body_limit_to_its_buffer(self) -> None:
        """A guest that enables buffer_request at init would refuse bodies past --max-buffer-bytes: the site
        refuses them from the Content-Length, before reading them."""
        site = self.site_for("--max-buffer-bytes", "64KiB", guest=BUFFERING_GUEST + NOOP_RESPONSE)
        self.assertEqual(site.max_request_body, 64 * 1024)
        site = self.site_for(
            "--max-buffer-bytes", "64KiB", "--max-request-body", "none", guest=BUFFERING_GUEST + NOOP_RESPONSE
        )
        self.assertEqual(site.max_request_body, 64 * 1024)
        site = self.site_for("--max-buffer-bytes", "64KiB")  # no buffer_request: the body limit stays
        self.assertEqual(site.max_request_body, 1024**3)


class _Instance:
    trapped = False


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class IdleRetirementTests(SynchronousTestCase):
    """The pool gives back the instances a burst needed once they have been idle for idle_timeout."""

    def setUp(self) -> None:
        self.clock = _Clock()
        self.made: list[_Instance] = []
        self.pool: GuestPool[_Instance] = GuestPool(self.make, clock=self.clock, idle_timeout=30)

    def make(self) -> _Instance:
        instance = _Instance()
        self.made.append(instance)
        return instance

    def burst(self, size: int) -> list[_Instance]:
        """``size`` requests at once, all given back."""
        lent = [self.pool.acquire() for _ in range(size)]
        for instance in lent:
            self.pool.release(instance)
        return lent

    def test_instances_idle_past_the_timeout_are_dropped_down_to_one(self) -> None:
        """After a burst of 50, a quiet pool keeps its 50 until idle_timeout, then one."""
        self.burst(50)
        self.clock.now += 30
        self.assertEqual(self.pool.retire_idle(), 0)
        self.assertEqual(self.pool.stats.idle, 50)
        self.clock.now += 0.5
        self.assertEqual(self.pool.retire_idle(), 49)
        stats = self.pool.stats
        self.assertEqual((stats.idle, stats.retired, stats.in_use), (1, 49, 0))
        self.assertIs(self.pool.acquire(), self.made[-1])  # the most recently used one stayed

    def test_what_steady_traffic_needs_stays(self) -> None:
        """Instances that steady traffic (3 at once) keeps using are never dropped; the burst's extra ones are."""
        self.burst(20)
        for _ in range(100):  # 100 s of steady traffic, three requests at once
            self.clock.now += 1
            self.burst(3)
        self.assertEqual(self.pool.stats.idle, 3)
        self.assertEqual(self.pool.stats.created, 20)  # nothing re-created for the steady traffic

    def test_releases_retire_too(self) -> None:
        """Each release retires what has been idle too long, so busy pools need no timer."""
        self.burst(10)
        self.clock.now += 31
        self.burst(1)
        self.assertEqual(self.pool.stats.idle, 1)

    def test_no_idle_timeout_keeps_everything(self) -> None:
        """idle_timeout=None: the pool never drops a healthy instance."""
        pool: GuestPool[_Instance] = GuestPool(self.make, clock=self.clock, idle_timeout=None)
        lent = [pool.acquire() for _ in range(5)]
        for instance in lent:
            pool.release(instance)
        self.clock.now += 1e6
        self.assertEqual((pool.retire_idle(), pool.stats.idle), (0, 5))

    def test_the_site_runs_housekeeping_while_it_listens(self) -> None:
        """GuestSite's housekeeping runs every few seconds from the first port's start to the last's stop."""
        clock = Clock()
        runs: list[None] = []
        site = GuestSite(Resource(), housekeeping=lambda: runs.append(None), reactor=clock)
        clock.advance(HOUSEKEEPING_INTERVAL * 3)
        self.assertEqual(runs, [])  # not before it listens (twistd forks in between)
        site.doStart()
        site.doStart()
        clock.advance(HOUSEKEEPING_INTERVAL)
        clock.advance(HOUSEKEEPING_INTERVAL)
        self.assertEqual(len(runs), 2)
        site.doStop()
        clock.advance(HOUSEKEEPING_INTERVAL)
        self.assertEqual(len(runs), 3)  # one port still listens
        site.doStop()
        clock.advance(HOUSEKEEPING_INTERVAL * 3)
        self.assertEqual(len(runs), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_twistd_retires_idle_instances_in_housekeeping(self) -> None:
        """twistd httpwasm's site retires every guest's idle instances in its housekeeping."""
        options = Options()
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "g.wat")
            Path(path).write_bytes(module(PASSING_GUEST))
            options.parseOptions(["--guest", path, "--path", directory])
            site = make_site(options, MultiService())
        assert isinstance(site, GuestSite) and site._housekeeping is not None
        guest = site.resource.guest
        lent = [guest.pool.acquire() for _ in range(3)]
        for instance in lent:
            guest.pool.release(instance)
        self.assertEqual(guest.pool.stats.idle, 3)
        guest.pool.idle_timeout = -1  # every idle instance is past it now
        site._housekeeping.f()
        self.assertEqual(guest.pool.stats.idle, 1)


class Http2BodyLimitTests(ServerTestCase):
    skip = H2_SKIP

    def serve_tls(self, site: GuestSite) -> int:
        """Serve ``site`` over TLS, ALPN h2 and http/1.1; the port."""
        return serve_tls(self, site)

    @inlineCallbacks
    def test_an_http2_body_over_the_limit_gets_413_on_its_stream(self):
        """Over HTTP/2 the stream gets the 413 and ends; the guest never runs; a small body still passes."""
        guest = make_guest(LOGGING_GUEST, NOOP_RESPONSE)
        runs: list[object] = []
        on_guest_log(guest, runs.append)
        port = self.serve_tls(GuestSite(GuestResource(guest, _Body()), max_request_body=1024))
        ca_pem = certificates().ca_pem
        refused = yield deferToThread(h2_fetch, port, ca_pem, "POST", "/", b"z" * 5000)
        self.assertEqual((refused.protocol, refused.status), ("h2", 413))
        self.assertEqual(runs, [])
        passed = yield deferToThread(h2_fetch, port, ca_pem, "POST", "/", b"z" * 1000)
        self.assertEqual((passed.status, passed.body), (200, b"1000"))

    @inlineCallbacks
    def test_the_connection_outlives_a_refused_stream(self):
        """After a 413 on one stream, data the client still sends on it is ignored and the connection serves on."""
        guest = make_guest(LOGGING_GUEST, NOOP_RESPONSE)
        site = GuestSite(GuestResource(guest, _Body()), max_request_body=1024)
        port = self.serve_tls(site)
        first, second, body = yield deferToThread(_h2_refused_then_reused, port, certificates().ca_pem)
        self.assertEqual((first, second, body), (413, 200, b"2"))
        # The refused request is over (a shutdown drain does not wait for it).
        self.assertTrue((yield poll(lambda: not site.in_flight.requests, timeout=10, interval=0.01)))


def _h2_refused_then_reused(port: int, ca_pem: bytes) -> tuple[int, int, bytes]:
    """HTTP/2: declare a 100 kB body, send 1000 bytes, read the answer, send more on that stream,
    then a second request on the same connection: (first status, second status, second body)."""
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()

            def request(stream: int, length: int) -> None:
                headers = [(":method", "POST"), (":path", "/"), (":scheme", "https"), (":authority", "x")]
                conn.send_headers(stream, [*headers, ("content-length", str(length))])

            def answer(stream: int) -> tuple[int, bytes]:
                status, body = 0, bytearray()
                while True:
                    tls.sendall(conn.data_to_send())
                    data = tls.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    for event in conn.receive_data(data):
                        if getattr(event, "stream_id", None) != stream:
                            continue
                        if isinstance(event, h2.events.ResponseReceived):
                            status = int(dict(event.headers)[":status"])
                        elif isinstance(event, h2.events.DataReceived):
                            body += event.data
                            conn.acknowledge_received_data(event.flow_controlled_length, stream)
                        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                            return status, bytes(body)

            request(1, 100_000)
            conn.send_data(1, b"a" * 1000)
            first, _ = answer(1)
            try:
                conn.send_data(1, b"b" * 1000)  # the client goes on sending, as a slow one would
            except h2.exceptions.StreamClosedError:
                pass  # the server reset the stream: the client knows to stop
            request(3, 2)
            conn.send_data(3, b"ok", end_stream=True)
            second, body = answer(3)
            return first, second, body
