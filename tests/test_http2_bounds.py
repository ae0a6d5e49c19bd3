"""HTTP/2 bounds of ``twistd httpwasm``, end to end over TLS: after a GOAWAY, and streams per connection.

- After a protocol error (65 CONTINUATION frames) the server sends GOAWAY; what
  the client sends afterwards (here: more than 100 MiB) must cost no memory,
  and the connection must be closed within a few seconds (not at the idle
  timeout).  Server memory is read from ``/proc/PID/status`` of the real
  ``twistd`` process.
- ``--max-streams-per-connection N`` is advertised as
  ``SETTINGS_MAX_CONCURRENT_STREAMS``, and streams a client opens past it are
  reset with ``REFUSED_STREAM`` without reaching the guest.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .support import poll
from .test_http2 import H2_SKIP, _client_context, certificates
from .test_twistd import DEADLINE, HEADER_GUEST, TwistdTestCase, accepts_connections, free_port

if not H2_SKIP:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import hpack
    from hyperframe.frame import ContinuationFrame, HeadersFrame

MiB = 1024 * 1024
#: What the client tries to send after the protocol error.
FLOOD = 120 * MiB
#: How much the server's resident memory may grow over the whole exchange.
MAX_GROWTH = 48 * MiB
#: How long the test waits for the server to close the connection (its idle timeout is 60 s).
CLOSE_WAIT = 30.0


def rss_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


class Flood(NamedTuple):
    sent: int  # bytes the client managed to hand to its socket after the protocol error
    goaway: bool  # a GOAWAY frame came back
    closed: bool  # the server closed the connection within CLOSE_WAIT
    rss_before: int
    rss_peak: int  # VmHWM once it is over


def _tls(port: int) -> ssl.SSLSocket:
    context = _client_context(certificates().ca_pem, ["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    return tls


def flood_after_protocol_error(port: int, pid: int) -> Flood:
    """Break HTTP/2 with 70 CONTINUATION frames, then send up to FLOOD bytes more; watch the server."""
    rss_before, _ = rss_of(pid)
    tls = _tls(port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = HeadersFrame(1)
    headers.data = hpack.Encoder().encode(
        [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", f"127.0.0.1:{port}")]
    )
    continuations = b"".join(ContinuationFrame(1, data=b"\x00").serialize() for _ in range(70))
    tls.sendall(conn.data_to_send() + headers.serialize() + continuations)
    return _flood(tls, conn, pid, rss_before, goaway=False)


def flood_after_idle_goaway(port: int, pid: int) -> Flood:
    """Say nothing until the server's idle timeout sends GOAWAY, then send up to FLOOD bytes; watch the server."""
    rss_before, _ = rss_of(pid)
    tls = _tls(port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    goaway = False
    tls.settimeout(CLOSE_WAIT)
    while not goaway:
        data = tls.recv(65536)
        if not data:
            break
        goaway = any(isinstance(event, h2.events.ConnectionTerminated) for event in conn.receive_data(data))
    return _flood(tls, conn, pid, rss_before, goaway=goaway)


def _flood(tls: ssl.SSLSocket, conn: Any, pid: int, rss_before: int, *, goaway: bool) -> Flood:
    chunk = b"\x00" * MiB
    sent = 0
    tls.settimeout(5)  # a server that stops reading blocks sendall: that is the end of the flood
    try:
        while sent < FLOOD:
            tls.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, OSError):
        pass
    closed = False
    deadline = time.monotonic() + CLOSE_WAIT
    tls.settimeout(1)
    while time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            closed = True
            break
        if not data:
            closed = True
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        goaway = goaway or any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
    tls.close()
    _, peak = rss_of(pid)
    return Flood(sent, goaway, closed, rss_before, peak)


class Slow(Resource):
    """Answers after half a second (``--class tests.test_http2_bounds.Slow``): the streams stay open meanwhile."""

    isLeaf = True

    def render(self, request: Any) -> object:
        from twisted.internet import reactor

        def answer() -> None:
            request.write(b"slow")
            request.finish()

        reactor.callLater(0.5, answer)  # type: ignore[attr-defined]
        return NOT_DONE_YET


def open_streams(port: int, count: int) -> tuple[int, dict[int, int], dict[int, int]]:
    """Open ``count`` streams at once, before the server's SETTINGS are read.

    Returns (the server's advertised max concurrent streams, status by answered
    stream, error code by reset stream).
    """
    tls = _tls(port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    streams = []
    for _ in range(count):
        stream = conn.get_next_available_stream_id()
        streams.append(stream)
        conn.send_headers(
            stream,
            [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", f"127.0.0.1:{port}")],
            end_stream=True,
        )
    tls.sendall(conn.data_to_send())
    answered: dict[int, int] = {}
    reset: dict[int, int] = {}
    tls.settimeout(10)
    while len(answered) + len(reset) < count:
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answered[event.stream_id] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.StreamReset):
                reset[event.stream_id] = int(event.error_code)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        tls.sendall(conn.data_to_send())
    advertised = conn.remote_settings.max_concurrent_streams
    tls.close()
    return advertised, answered, reset


class TlsTwistdTestCase(TwistdTestCase):
    """twistd httpwasm over TLS with ALPN h2 (and http/1.1)."""

    timeout = 180
    skip = H2_SKIP or (None if sys.platform.startswith("linux") else "reads /proc/PID/status")

    @inlineCallbacks
    def start_tls(self, *args: str) -> Generator[Any, Any, int]:
        """twistd httpwasm over TLS (ALPN h2, http/1.1) with ``args``; its port once it listens."""
        certs = certificates()
        pem = Path(self.mktemp() + ".pem")
        pem.write_bytes(certs.key_pem + certs.cert_pem)
        port = free_port()
        server = self.twistd(
            "--guest",
            self.guest_file(HEADER_GUEST),
            "--listen",
            f"ssl:{port}:interface=127.0.0.1:privateKey={pem}:certKey={pem}",
            *args,
        )
        ready = yield poll(lambda: server.exited() or accepts_connections(port), DEADLINE)
        if server.exited() or not ready:
            self.fail(f"twistd did not start listening on {port}:\n{server.output()}")
        self.server = server
        return port


class Http2BoundsTests(TlsTwistdTestCase):
    @inlineCallbacks
    def test_nothing_is_read_after_a_goaway(self) -> Generator[Any, Any, None]:
        """65+ CONTINUATION frames, then 120 MiB: bounded server memory, connection closed soon."""
        port = yield self.start_tls("--class", "tests.test_twistd.Hello")
        pid = self.server.process.pid
        flood = yield deferToThread(flood_after_protocol_error, port, pid)
        self.assertTrue(flood.goaway, flood)
        self.assertTrue(flood.closed, flood)  # within CLOSE_WAIT, where the idle timeout alone takes 75 s
        self.assertLess(flood.sent, FLOOD, flood)  # the server stopped reading
        self.assertLess(flood.rss_peak - flood.rss_before, MAX_GROWTH, flood)
        self.assertIn("sent GOAWAY: reading stopped", self.server.output())
        # The server goes on serving.
        self.assertTrue((yield accepts_connections(port)))

    @inlineCallbacks
    def test_nothing_is_read_after_the_idle_timeouts_goaway(self) -> Generator[Any, Any, None]:
        """--idle-timeout 1: its GOAWAY, then 120 MiB: bounded server memory, connection closed soon."""
        port = yield self.start_tls("--class", "tests.test_twistd.Hello", "--idle-timeout", "1")
        pid = self.server.process.pid
        flood = yield deferToThread(flood_after_idle_goaway, port, pid)
        self.assertTrue(flood.goaway, flood)
        self.assertTrue(flood.closed, flood)
        self.assertLess(flood.sent, FLOOD, flood)
        self.assertLess(flood.rss_peak - flood.rss_before, MAX_GROWTH, flood)

    @inlineCallbacks
    def test_streams_past_the_cap_are_refused(self) -> Generator[Any, Any, None]:
        """--max-streams-per-connection 3: advertised, and streams 4-6 reset with REFUSED_STREAM."""
        port = yield self.start_tls("--class", "tests.test_http2_bounds.Slow", "--max-streams-per-connection", "3")
        advertised, answered, reset = yield deferToThread(open_streams, port, 6)
        self.assertEqual(advertised, 3)
        self.assertEqual(sorted(answered.values()), [200, 200, 200], (answered, reset))
        self.assertEqual(sorted(reset.values()), [int(h2.errors.ErrorCodes.REFUSED_STREAM)] * 3, (answered, reset))
        self.assertNotIn("Traceback", self.server.output())

    @inlineCallbacks
    def test_the_default_cap(self) -> Generator[Any, Any, None]:
        """Without the option, 16 streams are advertised and a 17th open at once is refused."""
        port = yield self.start_tls("--class", "tests.test_http2_bounds.Slow")
        advertised, answered, reset = yield deferToThread(open_streams, port, 17)
        self.assertEqual(advertised, 16)
        self.assertEqual((len(answered), list(reset.values())), (16, [int(h2.errors.ErrorCodes.REFUSED_STREAM)]))


def h2_statuses(port: int, paths: list[str]) -> list[int | str]:
    """One HTTP/2 stream per ``:path`` (sent as given); the status of each, or how its stream ended."""
    tls = _tls(port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8", validate_outbound_headers=False)
    )
    conn.initiate_connection()
    streams = {}
    for path in paths:
        stream = conn.get_next_available_stream_id()
        streams[stream] = path
        conn.send_headers(
            stream,
            [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", f"127.0.0.1:{port}")],
            end_stream=True,
        )
    tls.sendall(conn.data_to_send())
    outcome: dict[int, int | str] = {}
    ended: set[int] = set()
    tls.settimeout(10)
    while len(ended) < len(streams):
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                outcome[event.stream_id] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.StreamReset):
                outcome.setdefault(event.stream_id, f"reset {event.error_code}")
                ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        tls.sendall(conn.data_to_send())
    tls.close()
    return [outcome.get(stream, "none") for stream in streams]


class Http2RequestTargetTests(TlsTwistdTestCase):
    """Over HTTP/2 the ``:path`` is the request target: the same rule as HTTP/1's (see test_request_target)."""

    @inlineCallbacks
    def test_a_path_that_is_not_origin_form_never_reaches_the_backend(self) -> Generator[Any, Any, None]:
        from .test_request_target import backend_on, low_port_pair

        port, glued = low_port_pair()
        backend = backend_on(self, port)
        injected = backend_on(self, glued)
        server_port = yield self.start_tls("--proxy", f"http://127.0.0.1:{port}")
        paths = ["a:1/", "a:-admin/x", "http://other-host/x", "127.0.0.1:1", "*", "/fine"]
        statuses = yield deferToThread(h2_statuses, server_port, paths)
        self.assertEqual(statuses, [400, 400, 400, 400, 400, 200], dict(zip(paths, statuses, strict=True)))
        self.assertEqual((backend.targets, injected.targets), ([b"/fine"], []))
